// A cast between integer types that are the same type on some platforms and
// not on others (std::uint64_t and std::size_t, long and time_t): written as a
// cast it draws -Wuseless-cast where they are the same.
#pragma once

#include <type_traits>

namespace procpool::detail {

/// `static_cast<To>(v)`, or `v` itself when it already is a `To`.
template <class To, class From>
constexpr To int_cast(From v) noexcept {
  static_assert(std::is_integral_v<To> && std::is_integral_v<From>);
  if constexpr (std::is_same_v<To, From>)
    return v;
  else
    return static_cast<To>(v);
}

}  // namespace procpool::detail
