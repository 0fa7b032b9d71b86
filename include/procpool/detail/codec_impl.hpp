// Internals of codec.hpp, which includes this file after defining `writer`
// and `reader`: how a type is classified, checked at compile time, and
// encoded and decoded.
//
//   analysis_t<Decode, T, Seen>  why T cannot be sent (refusal::none if it can),
//                                and the part of T to blame; Seen breaks cycles
//                                through recursive aggregates
//   verify<Decode, T>()          fails the build with a readable sentence
//   codec<T>                     encode(writer&, const T&) / decode(reader&),
//                                picked by kind_of<T>(): custom, trivial
//                                (memcpy), builtin (standard types) or fields
//   codec_min_size<T>()          the fewest bytes any T encodes to, which
//                                bounds counts before anything is reserved
#pragma once

#include <sys/mman.h>

#include <fmt/format.h>
#include <boost/pfr/core.hpp>
#include <boost/pfr/tuple_size.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "../errors.hpp"
#include "int_cast.hpp"
#include "os/type_name.hpp"

namespace procpool::detail {

template <class T>
using bare = std::remove_cv_t<T>;

template <class... Ts>
struct type_list {};

// ---------------------------------------------------------------------------
// Decode failures: cold paths that name the type in their message.

/// A readable name of `T` for messages: demangled, with `std::string` spelled so.
template <class T>
std::string codec_type_name() {
  std::string name = type_name<T>();
  constexpr std::string_view long_string =
      "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >";
  for (std::size_t at = name.find(long_string); at != std::string::npos;
       at = name.find(long_string, at)) {
    name.replace(at, long_string.size(), "std::string");
  }
  return name;
}

/// Throws "expected `need` bytes for `role``T`, N remain".
template <class T>
[[noreturn, gnu::cold, gnu::noinline]] void throw_short(const reader& in, std::size_t need,
                                                        const char* role) {
  throw decode_error(in.offset(), fmt::format("expected {} bytes for {}{}, {} remain", need, role,
                                              codec_type_name<T>(), in.remaining()));
}

/// Consumes `n` bytes that hold (`role` of) a `T`.
template <class T>
inline const std::byte* take_for(reader& in, std::size_t n, const char* role = "") {
  if (n > in.remaining()) throw_short<T>(in, n, role);
  return in.take(n);
}

template <class T>
[[noreturn, gnu::cold, gnu::noinline]] void throw_count(std::size_t at, std::uint64_t n,
                                                        std::size_t min_element, const reader& in) {
  if (min_element > 0)
    throw decode_error(at, fmt::format("{} of {} elements needs at least {} bytes per element, "
                                       "{} bytes remain",
                                       codec_type_name<T>(), n, min_element, in.remaining()));
  throw decode_error(at,
                     fmt::format("{} of {} elements is more than {} remaining bytes and an "
                                 "allowance of {} elements with an empty encoding allow",
                                 codec_type_name<T>(), n, in.remaining(), in.empty_allowance()));
}

template <class T>
[[noreturn, gnu::cold, gnu::noinline]] void throw_bad_tag(std::size_t at, std::uint64_t tag,
                                                          const char* what) {
  throw decode_error(at, fmt::format("invalid {} {} for {}", what, tag, codec_type_name<T>()));
}

template <class T>
[[noreturn, gnu::cold, gnu::noinline]] void throw_duplicate(std::size_t at) {
  throw decode_error(at, fmt::format("duplicate key in {}", codec_type_name<T>()));
}

template <class T>
[[noreturn, gnu::cold, gnu::noinline]] void throw_trailing(const reader& in) {
  throw decode_error(in.offset(), fmt::format("expected the end of the buffer after {}, {} "
                                              "bytes remain",
                                              codec_type_name<T>(), in.remaining()));
}

// ---------------------------------------------------------------------------
// The customization point, found by argument-dependent lookup.

namespace hook {
// Where the hooks are looked up and called. These declarations only hide the
// names of the enclosing namespaces, so that argument-dependent lookup alone
// finds the user's functions; they never match a call.
void procpool_encode() = delete;
void procpool_decode() = delete;

template <class T, class = void>
struct encode_found : std::false_type {};
template <class T>
struct encode_found<
    T, std::void_t<decltype(procpool_encode(std::declval<writer&>(), std::declval<const T&>()))>>
    : std::true_type {};

template <class T, class = void>
struct decode_found {
  static constexpr bool found = false;
  using result = void;
};
template <class T>
struct decode_found<
    T, std::void_t<decltype(procpool_decode(std::declval<reader&>(), type_tag<T>{}))>> {
  static constexpr bool found = true;
  using result = decltype(procpool_decode(std::declval<reader&>(), type_tag<T>{}));
};

template <class T>
void call_encode(writer& out, const T& value) {
  procpool_encode(out, value);
}
template <class T>
T call_decode(reader& in) {
  return procpool_decode(in, type_tag<T>{});
}
}  // namespace hook

namespace hook_probe {
// A hook is for its exact type only: one declared for std::filesystem::path
// must not capture std::string, which converts to a path, nor a hook for a
// base class its derived classes. This probe matches every type exactly, so
// an overload chosen over it takes `const T&` (or `T`) itself, or is a more
// specialized template; a hook that needs a conversion loses to it. An
// ambiguous call means a template hook exactly as good: exact too. Never called.
struct inexact {};
template <class U>
inexact procpool_encode(writer&, const U&);

template <class T, class = void>
struct exact : std::true_type {};
template <class T>
struct exact<
    T, std::void_t<decltype(procpool_encode(std::declval<writer&>(), std::declval<const T&>()))>>
    : std::bool_constant<!std::is_same_v<
          decltype(procpool_encode(std::declval<writer&>(), std::declval<const T&>())), inexact>> {
};
}  // namespace hook_probe

template <class T>
struct has_custom_encode
    : std::bool_constant<hook::encode_found<T>::value && hook_probe::exact<T>::value> {};
template <class T>
using custom_decode = hook::decode_found<T>;

template <class T>
inline constexpr bool is_custom_v = has_custom_encode<T>::value || custom_decode<T>::found;

// ---------------------------------------------------------------------------
// Why a type cannot be sent.

enum class refusal {
  none,
  pointer,
  c_string,
  reference,
  function,
  smart_pointer,
  union_type,
  c_array,
  base_class,
  unfixed_enum,
  view,
  no_custom_encode,
  no_custom_decode,
  bad_custom_decode,
  not_aggregate,
  other,
};

/// Fails the build with a sentence for refusal `R`; `Culprit`, the part of the
/// sent type to blame, shows in the compiler's "in instantiation of" line.
template <refusal R, class Culprit>
constexpr bool report() {
  static_assert(R != refusal::pointer,
                "procpool cannot send raw pointers: the address means nothing in another "
                "process. Send the pointed-to value, or define procpool_encode/procpool_decode "
                "for your type.");
  static_assert(R != refusal::c_string,
                "procpool cannot send a C string (char pointer): the address means nothing in "
                "another process. Send a std::string (or encode a std::string_view).");
  static_assert(R != refusal::reference,
                "procpool cannot send references (std::reference_wrapper and reference fields "
                "included): they name an object of this process. Send the value itself.");
  static_assert(R != refusal::function,
                "procpool cannot send functions or callable objects such as std::function: code "
                "and captured state cannot cross to another process. Send data that says what "
                "to do; forked workers already have every function of the program.");
  static_assert(R != refusal::smart_pointer,
                "procpool cannot send std::unique_ptr, std::shared_ptr or std::weak_ptr: the "
                "address means nothing in another process. Send the pointed-to value "
                "(std::optional if it may be empty), or define procpool_encode/procpool_decode "
                "for your type.");
  static_assert(R != refusal::union_type,
                "procpool cannot send unions: it cannot know which member is active. Use "
                "std::variant, or define procpool_encode/procpool_decode for your type.");
  static_assert(R != refusal::c_array,
                "procpool cannot send C arrays, fields of a struct included: use "
                "std::array<T, N> (or std::string for text).");
  static_assert(R != refusal::base_class,
                "procpool cannot send a struct with a base class field by field: inherited "
                "fields cannot be reflected. Make the base a field instead (struct derived { "
                "base b; ... }), or define procpool_encode/procpool_decode for the derived type.");
  static_assert(R != refusal::unfixed_enum,
                "procpool cannot decode an enum without a fixed underlying type: a value outside "
                "the range of its enumerators would be undefined behaviour. Declare it with one "
                "(enum color : int {...}, or enum class), or define "
                "procpool_encode/procpool_decode for it.");
  static_assert(R != refusal::view,
                "procpool cannot decode std::string_view: a view cannot own the decoded "
                "characters. Decode a std::string, which has the same encoding.");
  static_assert(R != refusal::no_custom_encode,
                "this type defines procpool_decode but no procpool_encode: declare "
                "void procpool_encode(procpool::writer&, const T&) next to it, where "
                "argument-dependent lookup finds it.");
  static_assert(R != refusal::no_custom_decode,
                "this type defines procpool_encode but no procpool_decode: declare "
                "T procpool_decode(procpool::reader&, procpool::type_tag<T>) next to it, where "
                "argument-dependent lookup finds it.");
  static_assert(R != refusal::bad_custom_decode,
                "procpool_decode(procpool::reader&, procpool::type_tag<T>) must return T itself.");
  static_assert(R != refusal::not_aggregate,
                "procpool does not know how to send this class: it is neither a supported "
                "standard type nor an aggregate (public fields, no constructors, no virtual "
                "functions) to send field by field. Define "
                "void procpool_encode(procpool::writer&, const T&) and "
                "T procpool_decode(procpool::reader&, procpool::type_tag<T>) in its namespace, "
                "where argument-dependent lookup finds them.");
  static_assert(R != refusal::other,
                "procpool cannot send this type (void, std::nullptr_t or the like).");
  return R == refusal::none;
}

template <refusal R, class Culprit>
struct verdict {
  static constexpr refusal why = R;
  using culprit = Culprit;
};
using accepted = verdict<refusal::none, void>;

template <class... Verdicts>
struct first_refusal {
  using type = accepted;
};
template <class V, class... Vs>
struct first_refusal<V, Vs...> {
  using type = std::conditional_t<V::why != refusal::none, V, typename first_refusal<Vs...>::type>;
};

// Standard types refused for a reason of their own.
template <class T>
struct special_refusal : std::integral_constant<refusal, refusal::none> {};
template <class T, class D>
struct special_refusal<std::unique_ptr<T, D>>
    : std::integral_constant<refusal, refusal::smart_pointer> {};
template <class T>
struct special_refusal<std::shared_ptr<T>>
    : std::integral_constant<refusal, refusal::smart_pointer> {};
template <class T>
struct special_refusal<std::weak_ptr<T>> : std::integral_constant<refusal, refusal::smart_pointer> {
};
template <class S>
struct special_refusal<std::function<S>> : std::integral_constant<refusal, refusal::function> {};
template <class T>
struct special_refusal<std::reference_wrapper<T>>
    : std::integral_constant<refusal, refusal::reference> {};

template <class T, class = void>
struct has_call_operator : std::false_type {};
template <class T>
struct has_call_operator<T, std::void_t<decltype(&T::operator())>> : std::true_type {};

template <class T>
inline constexpr bool is_char_v =
    std::is_same_v<T, char> || std::is_same_v<T, signed char> || std::is_same_v<T, unsigned char> ||
    std::is_same_v<T, wchar_t> || std::is_same_v<T, char16_t> || std::is_same_v<T, char32_t>
#if defined(__cpp_char8_t)
    || std::is_same_v<T, char8_t>
#endif
    ;

template <class T>
inline constexpr bool is_aggregate_class_v =
    std::is_class_v<T> && !std::is_union_v<T> && std::is_aggregate_v<T>;

// An enum without a fixed underlying type cannot be list-initialized from an integer.
template <class E, class = void>
struct has_fixed_underlying_type : std::false_type {};
template <class E>
struct has_fixed_underlying_type<E, std::void_t<decltype(E{std::underlying_type_t<E>{}})>>
    : std::true_type {};

// ---------------------------------------------------------------------------
// Built-in rules for standard types. Each specialization of `builtin` says:
//   parts                 the types it is made of, checked in turn
//   self_encode/decode    a refusal of its own (none by default)
//   trivial               whether its encoding is its object bytes
//   min_size              the fewest bytes any value encodes to
//   encode/decode         used when it is not trivial

template <class T>
struct codec;
template <class T>
constexpr std::size_t codec_min_size() noexcept;
template <class T>
constexpr bool codec_trivial() noexcept;

template <class T, class = void>
struct builtin {
  static constexpr bool known = false;
};

struct builtin_base {
  static constexpr bool known = true;
  using parts = type_list<>;
  static constexpr refusal self_encode = refusal::none;
  static constexpr refusal self_decode = refusal::none;
  static constexpr bool trivial = false;
  /// True for a container encoded as its element count and then its
  /// elements' bytes as they are in memory (see `bulk_codec`).
  static constexpr bool bulk() noexcept { return false; }
};

/// Bytes from which a decoded array or string asks for huge pages.
inline constexpr std::size_t huge_decode_bytes = std::size_t(4) << 20;

/// Asks the kernel to back the 2 MiB-aligned part of [p, p + n) with huge
/// pages when it first touches it (transparent huge pages in `madvise`
/// mode). A big decoded value usually lands in memory never touched yet,
/// where a fault per 4 KiB page costs several times the copy itself. Only
/// advice: refused (THP off, `PR_SET_THP_DISABLE`, an old kernel) it changes
/// nothing, and memory already backed stays as it is.
inline void advise_huge_pages(const void* p, std::size_t n) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t huge = std::uintptr_t(2) << 20;
  auto begin = (reinterpret_cast<std::uintptr_t>(p) + huge - 1) & ~(huge - 1);
  auto end = (reinterpret_cast<std::uintptr_t>(p) + n) & ~(huge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

/// Makes room for `n` elements in `v` (a vector or a string about to be
/// filled), advised into huge pages when they are many bytes.
template <class Container>
void reserve_for_decode(Container& v, std::size_t n) {
  v.reserve(n);
  std::size_t bytes = n * sizeof(typename Container::value_type);
  if (bytes >= huge_decode_bytes) advise_huge_pages(v.data(), bytes);
}

inline void write_count(writer& out, std::size_t n) {
  const std::uint64_t count = n;
  out.write(&count, sizeof count);
}

/// Reads the count of a `C` whose elements encode to at least `MinElement`
/// bytes, and checks it against what remains before anything is reserved.
template <class C, std::size_t MinElement>
std::size_t read_count(reader& in) {
  const std::size_t at = in.offset();
  std::uint64_t n;
  std::memcpy(&n, take_for<C>(in, sizeof n, "the length of "), sizeof n);
  if constexpr (MinElement > 0) {
    if (n > in.remaining() / MinElement) throw_count<C>(at, n, MinElement, in);
  } else {
    if (n > std::uint64_t{in.remaining()} + in.empty_allowance())
      throw_count<C>(at, n, MinElement, in);
  }
  return int_cast<std::size_t>(n);
}

/// Calls `one()` `n` times to decode `n` elements of at least `MinElement`
/// bytes each; an element decoded from no bytes spends the reader's allowance.
template <std::size_t MinElement, class F>
void repeat(reader& in, std::size_t n, F&& one) {
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (MinElement > 0) {
      one();
    } else {
      const std::size_t before = in.offset();
      one();
      if (in.offset() == before) in.consume_empty(1);
    }
  }
}

// Types whose bytes may be read through a pointer of the type itself.
template <class T>
inline constexpr bool is_byte_like_v =
    std::is_same_v<T, char> || std::is_same_v<T, unsigned char> || std::is_same_v<T, std::byte>;

template <class T>
struct builtin<T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>>>
    : builtin_base {
  static constexpr bool trivial = true;
  static constexpr std::size_t min_size = sizeof(T);
};

template <>
struct builtin<bool> : builtin_base {
  static constexpr std::size_t min_size = 1;
  static void encode(writer& out, bool v) {
    const unsigned char byte = v ? 1 : 0;
    out.write(&byte, 1);
  }
  static bool decode(reader& in) {
    const std::size_t at = in.offset();
    const auto byte = std::to_integer<unsigned>(*take_for<bool>(in, 1));
    if (byte > 1) throw_bad_tag<bool>(at, byte, "byte");
    return byte == 1;
  }
};

template <class E>
struct builtin<E, std::enable_if_t<std::is_enum_v<E>>> : builtin_base {
  using underlying = std::underlying_type_t<E>;
  static constexpr bool fixed = has_fixed_underlying_type<E>::value;
  static constexpr refusal self_decode = fixed ? refusal::none : refusal::unfixed_enum;
  // An enum over bool has only two valid values, so it is sent as a bool.
  static constexpr bool trivial = fixed && !std::is_same_v<underlying, bool>;
  static constexpr std::size_t min_size = sizeof(E);
  static void encode(writer& out, E v) {
    if constexpr (std::is_same_v<underlying, bool>)
      builtin<bool>::encode(out, static_cast<bool>(v));
    else
      out.write(&v, sizeof v);
  }
  static E decode(reader& in) {
    static_assert(std::is_same_v<underlying, bool>);
    return static_cast<E>(builtin<bool>::decode(in));
  }
};

template <class C, class Tr, class A>
struct builtin<std::basic_string<C, Tr, A>> : builtin_base {
  using T = std::basic_string<C, Tr, A>;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const T& s) {
    write_count(out, s.size());
    out.write(s.data(), s.size() * sizeof(C));
  }
  static constexpr bool bulk() noexcept { return true; }
  static const void* bulk_data(const T& s) noexcept { return s.data(); }
  static T decode(reader& in) {
    const std::size_t n = read_count<T, sizeof(C)>(in);
    if constexpr (std::is_same_v<C, char> || std::is_same_v<C, unsigned char>) {
      if (n <= in.at_hand() && n < huge_decode_bytes)
        return T(reinterpret_cast<const C*>(in.take(n)), n);
      // Appended piece by piece as a streamed reader gets them: no zeroing
      // first, no copy between.
      T s;
      reserve_for_decode(s, n);
      for (std::size_t left = n; left > 0;) {
        std::size_t k = left;
        const std::byte* p = in.take_some(k);
        s.append(reinterpret_cast<const C*>(p), k);
        left -= k;
      }
      return s;
    } else {
      T s(n, C{});
      in.read(s.data(), n * sizeof(C));
      return s;
    }
  }
};

/// A path goes as its native string (`std::string` on POSIX).
template <>
struct builtin<std::filesystem::path> : builtin_base {
  using native = std::filesystem::path::string_type;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const std::filesystem::path& p) {
    builtin<native>::encode(out, p.native());
  }
  static std::filesystem::path decode(reader& in) {
    return std::filesystem::path(builtin<native>::decode(in));
  }
};

template <class C, class Tr>
struct builtin<std::basic_string_view<C, Tr>> : builtin_base {
  static constexpr refusal self_decode = refusal::view;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, std::basic_string_view<C, Tr> s) {
    write_count(out, s.size());
    out.write(s.data(), s.size() * sizeof(C));
  }
};

template <class E, class A>
struct builtin<std::vector<E, A>> : builtin_base {
  using T = std::vector<E, A>;
  using parts = type_list<E>;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const T& v) {
    if constexpr (codec_trivial<E>()) {
      // One block: the count, then every element's bytes.
      const std::uint64_t count = v.size();
      const std::size_t bytes = v.size() * sizeof(E);
      if (out.spare() < sizeof count || bytes > out.spare() - sizeof count) {
        // Two writes: a writer that streams (a result longer than the ring)
        // puts a long one straight where it goes, window by window.
        out.write(&count, sizeof count);
        out.write(v.data(), bytes);
        return;
      }
      std::byte* p = out.prepare(sizeof count + bytes);
      std::memcpy(p, &count, sizeof count);
      if (bytes != 0) std::memcpy(p + sizeof count, v.data(), bytes);
      out.commit(sizeof count + bytes);
    } else {
      write_count(out, v.size());
      for (const E& e : v) codec<E>::encode(out, e);
    }
  }
  // A function, not a constant: `E` may be incomplete where the vector is
  // named (an aggregate holding a vector of itself).
  static constexpr bool bulk() noexcept { return codec_trivial<E>(); }
  static const void* bulk_data(const T& v) noexcept { return v.data(); }
  static T decode(reader& in) {
    constexpr std::size_t min_element = codec_min_size<E>();
    const std::size_t n = read_count<T, min_element>(in);
    T v;
    if constexpr (codec_trivial<E>()) {
      if (n * sizeof(E) > in.remaining()) in.take(n * sizeof(E));  // throws, naming the shortfall
      reserve_for_decode(v, n);
      if constexpr (is_byte_like_v<E>) {
        // Piece by piece as a streamed reader gets them (one piece over a
        // buffer): made by the copy, with no zeroing first.
        for (std::size_t left = n; left > 0;) {
          std::size_t k = left;
          auto p = reinterpret_cast<const E*>(in.take_some(k));
          v.insert(v.end(), p, p + k);
          left -= k;
        }
      } else if (n != 0) {
        v.resize(n);
        in.read(static_cast<void*>(v.data()), n * sizeof(E));
      }
    } else {
      if constexpr (min_element > 0) v.reserve(n);
      repeat<min_element>(in, n, [&] { v.push_back(codec<E>::decode(in)); });
    }
    return v;
  }
};

template <class A>
struct builtin<std::vector<bool, A>> : builtin_base {
  using T = std::vector<bool, A>;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const T& v) {
    write_count(out, v.size());
    const std::size_t bytes = v.size() / 8 + (v.size() % 8 != 0);
    std::byte* p = out.prepare(bytes);
    if (bytes != 0) std::memset(p, 0, bytes);
    for (std::size_t i = 0; i < v.size(); ++i)
      if (v[i]) p[i / 8] |= std::byte{1} << (i % 8);
    out.commit(bytes);
  }
  static T decode(reader& in) {
    const std::size_t at = in.offset();
    std::uint64_t n;
    std::memcpy(&n, take_for<T>(in, sizeof n, "the length of "), sizeof n);
    const std::uint64_t bytes = n / 8 + (n % 8 != 0);
    if (bytes > in.remaining())
      throw decode_error(at, fmt::format("{} of {} elements needs {} bytes, {} remain",
                                         codec_type_name<T>(), n, bytes, in.remaining()));
    const std::byte* p = in.take(static_cast<std::size_t>(bytes));
    if (n % 8 != 0 && std::to_integer<unsigned>(p[bytes - 1]) >> (n % 8) != 0)
      throw decode_error(in.offset() - 1, fmt::format("unused bits set in the last byte of {}",
                                                      codec_type_name<T>()));
    T v(int_cast<std::size_t>(n));
    for (std::size_t i = 0; i < n; ++i) v[i] = std::to_integer<unsigned>(p[i / 8] >> (i % 8)) & 1u;
    return v;
  }
};

template <class E, std::size_t N>
struct builtin<std::array<E, N>> : builtin_base {
  using T = std::array<E, N>;
  using parts = type_list<E>;
  static constexpr bool trivial = N > 0 && codec_trivial<E>() && sizeof(T) == N * sizeof(E);
  static constexpr std::size_t min_size = N * codec_min_size<E>();
  static void encode(writer& out, const T& a) {
    for (const E& e : a) codec<E>::encode(out, e);
  }
  static T decode(reader& in) {
    if constexpr (std::is_default_constructible_v<E> && std::is_move_assignable_v<E>) {
      T a{};
      for (E& e : a) e = codec<E>::decode(in);
      return a;
    } else {
      return decode_each(in, std::make_index_sequence<N>{});
    }
  }
  template <std::size_t... I>
  static T decode_each([[maybe_unused]] reader& in, std::index_sequence<I...>) {
    // A braced list decodes the elements in order.
    return T{{(static_cast<void>(I), codec<E>::decode(in))...}};
  }
};

/// Shared by `std::deque` and `std::list`: a count, then the elements.
template <class T, class E>
struct sequence_codec : builtin_base {
  using parts = type_list<E>;
  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const T& s) {
    write_count(out, s.size());
    for (const E& e : s) codec<E>::encode(out, e);
  }
  static T decode(reader& in) {
    constexpr std::size_t min_element = codec_min_size<E>();
    const std::size_t n = read_count<T, min_element>(in);
    T s;
    repeat<min_element>(in, n, [&] { s.push_back(codec<E>::decode(in)); });
    return s;
  }
};

template <class E, class A>
struct builtin<std::deque<E, A>> : sequence_codec<std::deque<E, A>, E> {};
template <class E, class A>
struct builtin<std::list<E, A>> : sequence_codec<std::list<E, A>, E> {};

/// Shared by the maps and sets: a count, then the keys (and values).
template <class M, bool Unique, bool Ordered>
struct associative_codec : builtin_base {
  using key = typename M::key_type;
  static constexpr bool has_value = !std::is_same_v<typename M::value_type, key>;

  template <class V>
  static constexpr std::size_t element_min_size() {
    if constexpr (has_value)
      return codec_min_size<key>() + codec_min_size<typename V::second_type>();
    else
      return codec_min_size<key>();
  }

  static constexpr std::size_t min_size = sizeof(std::uint64_t);
  static void encode(writer& out, const M& m) {
    write_count(out, m.size());
    for (const auto& element : m) {
      if constexpr (has_value) {
        codec<key>::encode(out, element.first);
        codec<typename M::mapped_type>::encode(out, element.second);
      } else {
        codec<key>::encode(out, element);
      }
    }
  }
  static M decode(reader& in) {
    constexpr std::size_t min_element = element_min_size<typename M::value_type>();
    const std::size_t n = read_count<M, min_element>(in);
    M m;
    if constexpr (!Ordered && min_element > 0) m.reserve(n);
    repeat<min_element>(in, n, [&] {
      const std::size_t at = in.offset();
      const std::size_t before = m.size();
      if constexpr (has_value) {
        key k = codec<key>::decode(in);
        typename M::mapped_type v = codec<typename M::mapped_type>::decode(in);
        insert(m, std::move(k), std::move(v));
      } else {
        insert(m, codec<key>::decode(in));
      }
      if (Unique && m.size() == before) throw_duplicate<M>(at);
    });
    return m;
  }
  template <class... Args>
  static void insert(M& m, Args&&... args) {
    if constexpr (Ordered)
      m.emplace_hint(m.end(), std::forward<Args>(args)...);  // sorted input: constant time
    else
      m.emplace(std::forward<Args>(args)...);
  }
};

template <class K, class V, class C, class A>
struct builtin<std::map<K, V, C, A>> : associative_codec<std::map<K, V, C, A>, true, true> {
  using parts = type_list<K, V>;
};
template <class K, class V, class C, class A>
struct builtin<std::multimap<K, V, C, A>>
    : associative_codec<std::multimap<K, V, C, A>, false, true> {
  using parts = type_list<K, V>;
};
template <class K, class V, class H, class Eq, class A>
struct builtin<std::unordered_map<K, V, H, Eq, A>>
    : associative_codec<std::unordered_map<K, V, H, Eq, A>, true, false> {
  using parts = type_list<K, V>;
};
template <class K, class V, class H, class Eq, class A>
struct builtin<std::unordered_multimap<K, V, H, Eq, A>>
    : associative_codec<std::unordered_multimap<K, V, H, Eq, A>, false, false> {
  using parts = type_list<K, V>;
};
template <class K, class C, class A>
struct builtin<std::set<K, C, A>> : associative_codec<std::set<K, C, A>, true, true> {
  using parts = type_list<K>;
};
template <class K, class C, class A>
struct builtin<std::multiset<K, C, A>> : associative_codec<std::multiset<K, C, A>, false, true> {
  using parts = type_list<K>;
};
template <class K, class H, class Eq, class A>
struct builtin<std::unordered_set<K, H, Eq, A>>
    : associative_codec<std::unordered_set<K, H, Eq, A>, true, false> {
  using parts = type_list<K>;
};
template <class K, class H, class Eq, class A>
struct builtin<std::unordered_multiset<K, H, Eq, A>>
    : associative_codec<std::unordered_multiset<K, H, Eq, A>, false, false> {
  using parts = type_list<K>;
};

template <class A, class B>
struct builtin<std::pair<A, B>> : builtin_base {
  using T = std::pair<A, B>;
  using parts = type_list<A, B>;
  static constexpr bool trivial = std::is_trivially_copyable_v<T> &&
                                  std::is_default_constructible_v<T> && codec_trivial<bare<A>>() &&
                                  codec_trivial<bare<B>>();
  static constexpr std::size_t min_size = codec_min_size<bare<A>>() + codec_min_size<bare<B>>();
  static void encode(writer& out, const T& p) {
    codec<bare<A>>::encode(out, p.first);
    codec<bare<B>>::encode(out, p.second);
  }
  static T decode(reader& in) {
    return T{codec<bare<A>>::decode(in), codec<bare<B>>::decode(in)};  // in order
  }
};

template <class... Ts>
struct builtin<std::tuple<Ts...>> : builtin_base {
  using T = std::tuple<Ts...>;
  using parts = type_list<Ts...>;
  static constexpr bool trivial = std::is_trivially_copyable_v<T> &&
                                  std::is_default_constructible_v<T> && sizeof...(Ts) > 0 &&
                                  (codec_trivial<bare<Ts>>() && ...);
  static constexpr std::size_t min_size = (std::size_t{0} + ... + codec_min_size<bare<Ts>>());
  static void encode([[maybe_unused]] writer& out, const T& t) {
    std::apply([&](const auto&... e) { (codec<bare<Ts>>::encode(out, e), ...); }, t);
  }
  static T decode([[maybe_unused]] reader& in) {
    return T{codec<bare<Ts>>::decode(in)...};  // a braced list decodes in order
  }
};

template <class E>
struct builtin<std::optional<E>> : builtin_base {
  using T = std::optional<E>;
  using parts = type_list<E>;
  static constexpr std::size_t min_size = 1;
  static void encode(writer& out, const T& o) {
    const unsigned char tag = o.has_value() ? 1 : 0;
    out.write(&tag, 1);
    if (o) codec<bare<E>>::encode(out, *o);
  }
  static T decode(reader& in) {
    const std::size_t at = in.offset();
    const auto tag = std::to_integer<unsigned>(*take_for<T>(in, 1, "the tag of "));
    if (tag == 0) return T();
    if (tag != 1) throw_bad_tag<T>(at, tag, "tag");
    return T(std::in_place, codec<bare<E>>::decode(in));
  }
};

template <>
struct builtin<std::monostate> : builtin_base {
  static constexpr std::size_t min_size = 0;
  static void encode(writer&, std::monostate) {}
  static std::monostate decode(reader&) { return {}; }
};

template <class... Ts>
struct builtin<std::variant<Ts...>> : builtin_base {
  using T = std::variant<Ts...>;
  using parts = type_list<Ts...>;
  static constexpr std::size_t min_size = sizeof(std::uint32_t);

  static void encode(writer& out, const T& v) {
    if (v.valueless_by_exception()) throw std::bad_variant_access();
    const auto index = static_cast<std::uint32_t>(v.index());
    out.write(&index, sizeof index);
    static constexpr auto table = encode_table(std::index_sequence_for<Ts...>{});
    table[index](out, v);
  }
  static T decode(reader& in) {
    const std::size_t at = in.offset();
    std::uint32_t index;
    std::memcpy(&index, take_for<T>(in, sizeof index, "the index of "), sizeof index);
    if (index >= sizeof...(Ts)) throw_bad_tag<T>(at, index, "alternative index");
    static constexpr auto table = decode_table(std::index_sequence_for<Ts...>{});
    return table[index](in);
  }

 private:
  template <std::size_t I>
  using alternative = bare<std::variant_alternative_t<I, T>>;
  template <std::size_t I>
  static void encode_one(writer& out, const T& v) {
    codec<alternative<I>>::encode(out, *std::get_if<I>(&v));
  }
  template <std::size_t I>
  static T decode_one(reader& in) {
    return T(std::in_place_index<I>, codec<alternative<I>>::decode(in));
  }
  template <std::size_t... I>
  static constexpr auto encode_table(std::index_sequence<I...>) {
    return std::array<void (*)(writer&, const T&), sizeof...(I)>{&encode_one<I>...};
  }
  template <std::size_t... I>
  static constexpr auto decode_table(std::index_sequence<I...>) {
    return std::array<T (*)(reader&), sizeof...(I)>{&decode_one<I>...};
  }
};

template <class Rep, class Period>
struct builtin<std::chrono::duration<Rep, Period>> : builtin_base {
  using T = std::chrono::duration<Rep, Period>;
  using parts = type_list<Rep>;
  static constexpr bool trivial =
      codec_trivial<Rep>() && std::is_trivially_copyable_v<T> && sizeof(T) == sizeof(Rep);
  static constexpr std::size_t min_size = codec_min_size<Rep>();
  static void encode(writer& out, const T& d) { codec<Rep>::encode(out, d.count()); }
  static T decode(reader& in) { return T(codec<Rep>::decode(in)); }
};

template <class Clock, class Duration>
struct builtin<std::chrono::time_point<Clock, Duration>> : builtin_base {
  using T = std::chrono::time_point<Clock, Duration>;
  using parts = type_list<Duration>;
  static constexpr bool trivial =
      codec_trivial<Duration>() && std::is_trivially_copyable_v<T> && sizeof(T) == sizeof(Duration);
  static constexpr std::size_t min_size = codec_min_size<Duration>();
  static void encode(writer& out, const T& t) {
    codec<Duration>::encode(out, t.time_since_epoch());
  }
  static T decode(reader& in) { return T(codec<Duration>::decode(in)); }
};

template <class F>
struct builtin<std::complex<F>> : builtin_base {
  using parts = type_list<F>;
  static constexpr bool trivial = std::is_trivially_copyable_v<std::complex<F>>;
  static constexpr std::size_t min_size = sizeof(std::complex<F>);
  static void encode(writer& out, const std::complex<F>& c) {
    codec<F>::encode(out, c.real());
    codec<F>::encode(out, c.imag());
  }
  static std::complex<F> decode(reader& in) {
    F re = codec<F>::decode(in);
    return {re, codec<F>::decode(in)};
  }
};

// The probes below convert to any field type, and so does a converting
// constructor template of the field (std::optional's, say): GCC's -Wconversion
// then says which of the two it chose, in a check that only asks whether an
// initialization compiles. Nothing is converted at run time.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wconversion"
#endif

// ---------------------------------------------------------------------------
// What Boost.PFR cannot reflect, found first. PFR fails the build deep inside
// itself for an aggregate with a base class or a C array field; these checks
// run before anything reaches PFR, so that procpool's sentence comes first.
//
// The probes appear in unevaluated operands only and are never called. They
// are defined all the same: clang 14 in C++20 mode reports a probe converting
// to a type without linkage (a test's local aggregate) as used but undefined.
struct as_prvalue {
  template <class U>
  [[noreturn]] operator U() const&& noexcept {
    std::abort();
  }
};
struct as_mutable_lvalue {
  template <class U, std::enable_if_t<!std::is_const_v<U>, int> = 0>
  [[noreturn]] operator U&() const&& noexcept {
    std::abort();
  }
};
template <std::size_t>
using prvalue_at = as_prvalue;

template <class T, class Probes, class = void>
struct initializable : std::false_type {};
template <class T, class... Probes>
struct initializable<T, type_list<Probes...>, std::void_t<decltype(T{Probes{}...})>>
    : std::true_type {};

/// Converts to the base classes of `T` only: the first initializer of an
/// aggregate goes to its first base, if it has one.
template <class T>
struct as_base_of {
  template <class U, std::enable_if_t<std::is_base_of_v<U, T> && !std::is_same_v<U, T>, int> = 0>
  [[noreturn]] operator U() const&& noexcept {
    std::abort();
  }
};

template <class T, std::size_t... I>
constexpr bool base_initializes(std::index_sequence<I...>) noexcept {
  return initializable<T, type_list<as_base_of<T>, prvalue_at<I>...>>::value;
}

/// Whether the aggregate `T` has a base class. The fields after the base are
/// left out when they can be, given probes otherwise (up to 16 of them).
template <class T, std::size_t Trailing = 0>
constexpr bool has_base_class() noexcept {
  if constexpr (base_initializes<T>(std::make_index_sequence<Trailing>{}))
    return true;
  else if constexpr (Trailing < 16 && !std::is_default_constructible_v<T>)
    return has_base_class<T, Trailing + 1>();
  else
    return false;
}

template <class T, class Before, class After, class = void>
struct initializable_with_braces : std::false_type {};
template <class T, class... Before, class... After>
struct initializable_with_braces<T, type_list<Before...>, type_list<After...>,
                                 std::void_t<decltype(T{Before{}..., {}, After{}...})>>
    : std::true_type {};

template <class Indices>
struct prvalue_list;
template <std::size_t... I>
struct prvalue_list<std::index_sequence<I...>> {
  using type = type_list<prvalue_at<I>...>;
};
template <std::size_t N>
using prvalues = typename prvalue_list<std::make_index_sequence<N>>::type;

/// Whether `T{p, ..., p, {}, p, ..., p}` compiles, with `Before` probes before
/// the empty braces and `After` after them.
template <class T, std::size_t Before, std::size_t After>
inline constexpr bool braces_at_v =
    initializable_with_braces<T, prvalues<Before>, prvalues<After>>::value;

// Probes alone initialize a C array field element by element (brace elision),
// so PFR counts `N` initializers where the fields are fewer. Empty braces at
// the first element of an array field initialize the whole array instead:
// then the initializers after them are too many, while fewer fit.
template <class T, std::size_t Slot, std::size_t N, std::size_t After = 0>
constexpr bool fewer_fit_after() noexcept {
  if constexpr (After + 1 >= N - Slot)
    return false;
  else if constexpr (braces_at_v<T, Slot, After>)
    return true;
  else
    return fewer_fit_after<T, Slot, N, After + 1>();
}

template <class T, std::size_t N, std::size_t Slot = 0>
constexpr bool c_array_from() noexcept {
  if constexpr (Slot >= N)
    return false;
  else if constexpr (!braces_at_v<T, Slot, N - Slot - 1> && fewer_fit_after<T, Slot, N>())
    return true;
  else
    return c_array_from<T, N, Slot + 1>();
}

/// Whether the aggregate `T` (without a base class) has a C array field of
/// more than one element. One of a single element PFR reflects, as an array.
template <class T>
constexpr bool has_c_array_field() noexcept {
  return c_array_from<T, boost::pfr::tuple_size_v<T>>();
}

/// Why Boost.PFR cannot reflect the aggregate `T`, if it cannot.
enum class unreflectable { no, base_class, c_array };
template <class T>
constexpr unreflectable reflection_problem() noexcept {
  if constexpr (has_base_class<T>())
    return unreflectable::base_class;
  else if constexpr (has_c_array_field<T>())
    return unreflectable::c_array;
  else
    return unreflectable::no;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---------------------------------------------------------------------------
// Aggregates, through Boost.PFR.

template <class T, std::size_t I>
using field_t = boost::pfr::tuple_element_t<I, T>;

template <class T, std::size_t... I>
constexpr bool fields_trivial(std::index_sequence<I...>) noexcept {
  return ((!std::is_reference_v<field_t<T, I>> && codec_trivial<bare<field_t<T, I>>>()) && ...);
}

template <class T, std::size_t... I>
constexpr std::size_t fields_min_size(std::index_sequence<I...>) noexcept {
  return (std::size_t{0} + ... + codec_min_size<bare<field_t<T, I>>>());
}

template <class T>
using field_indices = std::make_index_sequence<boost::pfr::tuple_size_v<T>>;

template <class T>
constexpr bool aggregate_trivial() noexcept {
  if constexpr (std::is_trivially_copyable_v<T> && std::is_default_constructible_v<T>)
    return fields_trivial<T>(field_indices<T>{});
  else
    return false;
}

template <class T>
struct fields_codec {
  static void encode(writer& out, const T& v) { encode_each(out, v, field_indices<T>{}); }
  static T decode(reader& in) { return decode_each(in, field_indices<T>{}); }

 private:
  template <std::size_t... I>
  static void encode_each([[maybe_unused]] writer& out, [[maybe_unused]] const T& v,
                          std::index_sequence<I...>) {
    (codec<bare<field_t<T, I>>>::encode(out, boost::pfr::get<I>(v)), ...);
  }
  template <std::size_t... I>
  static T decode_each([[maybe_unused]] reader& in, std::index_sequence<I...>) {
    return T{codec<bare<field_t<T, I>>>::decode(in)...};  // a braced list decodes in order
  }
};

// ---------------------------------------------------------------------------
// Choosing a codec.

template <class T>
struct custom_codec {
  static void encode(writer& out, const T& v) { hook::call_encode(out, v); }
  static T decode(reader& in) { return hook::call_decode<T>(in); }
};

template <class T>
struct trivial_codec {
  static void encode(writer& out, const T& v) { out.write(&v, sizeof(T)); }
  static T decode(reader& in) {
    const std::byte* p = take_for<T>(in, sizeof(T));
    T v;
    std::memcpy(static_cast<void*>(&v), p, sizeof(T));
    return v;
  }
};

enum class codec_kind { custom, trivial, builtin, fields, refused };

template <class T>
constexpr codec_kind kind_of() noexcept {
  if constexpr (is_custom_v<T>)
    return codec_kind::custom;
  else if constexpr (special_refusal<T>::value != refusal::none)
    return codec_kind::refused;
  else if constexpr (builtin<T>::known)
    return builtin<T>::trivial ? codec_kind::trivial : codec_kind::builtin;
  else if constexpr (is_aggregate_class_v<T>) {
    if constexpr (reflection_problem<T>() != unreflectable::no)
      return codec_kind::refused;
    else
      return aggregate_trivial<T>() ? codec_kind::trivial : codec_kind::fields;
  } else
    return codec_kind::refused;
}

template <class T>
constexpr bool codec_trivial() noexcept {
  return kind_of<T>() == codec_kind::trivial;
}

template <class T>
constexpr std::size_t codec_min_size() noexcept {
  constexpr codec_kind kind = kind_of<T>();
  if constexpr (kind == codec_kind::trivial)
    return sizeof(T);
  else if constexpr (kind == codec_kind::builtin)
    return builtin<T>::min_size;
  else if constexpr (kind == codec_kind::fields)
    return fields_min_size<T>(field_indices<T>{});
  else
    return 0;  // unknown for custom types: their count is bounded like empty ones
}

template <class T, codec_kind Kind>
struct codec_for;
template <class T>
struct codec_for<T, codec_kind::custom> : custom_codec<T> {};
template <class T>
struct codec_for<T, codec_kind::trivial> : trivial_codec<T> {};
template <class T>
struct codec_for<T, codec_kind::builtin> : builtin<T> {};
template <class T>
struct codec_for<T, codec_kind::fields> : fields_codec<T> {};

/// `encode` and `decode` of an unqualified `T` that passed `verify`.
template <class T>
struct codec : codec_for<T, kind_of<T>()> {};

/// True when procpool's own codec sends a `T` as `write_count(size())` and
/// then `size() * sizeof(value_type)` bytes copied from `data()`: a
/// `std::vector` of trivially sendable elements, a `std::basic_string`. Such
/// a value's bytes can be sent from where they are (`bulk_bytes`) rather
/// than copied into a buffer first. Never true for a type with its own
/// `procpool_encode`.
template <class T>
constexpr bool bulk_codec() noexcept {
  if constexpr (kind_of<T>() == codec_kind::builtin)
    return builtin<T>::bulk();
  else
    return false;
}

/// Where the bytes after the count of a `bulk_codec` value start, and how many there are.
template <class T>
std::pair<const std::byte*, std::size_t> bulk_bytes(const T& value) noexcept {
  static_assert(bulk_codec<T>());
  return {static_cast<const std::byte*>(builtin<T>::bulk_data(value)),
          value.size() * sizeof(typename T::value_type)};
}

// ---------------------------------------------------------------------------
// Compile-time checks: why a type cannot be sent, and which part of it is to
// blame. `Seen` holds the enclosing types, so a recursive aggregate (through
// a vector of itself, say) is accepted where it recurs.

template <class T>
struct tid {
  using type = T;
};

template <class List, class T>
struct contains;
template <class... Ts, class T>
struct contains<type_list<Ts...>, T> : std::bool_constant<(std::is_same_v<Ts, T> || ...)> {};

template <class List, class T>
struct push;
template <class... Ts, class T>
struct push<type_list<Ts...>, T> {
  using type = type_list<T, Ts...>;
};

template <bool Decode, class T, class Seen>
struct analysis;
template <bool Decode, class T, class Seen>
using analysis_t = typename analysis<Decode, T, Seen>::type;

template <bool Decode, class Parts, class Seen>
struct analysis_of_parts;
template <bool Decode, class... Parts, class Seen>
struct analysis_of_parts<Decode, type_list<Parts...>, Seen> {
  using type = typename first_refusal<analysis_t<Decode, Parts, Seen>...>::type;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wconversion"  // as for the probes above
#endif

// Boost.PFR reports a reference field as the type it refers to, so reference
// fields are found by aggregate initialization instead, three ways:
// - a non-const lvalue reference cannot bind the prvalues of `as_prvalue`;
// - a reference cannot be left out of a braced initializer, while a field
//   that can be initialized from `{}` can: so if `T{p0, ..., p(I-1)}` fails
//   where `T{p0, ..., pI}` works, and field I accepts `{}`, it is a reference;
// - an rvalue reference cannot bind the lvalue of `as_mutable_lvalue`, which
//   any copyable field accepts.
template <class F>
void take_by_copy(F);
template <class F, class = void>
struct accepts_empty_braces : std::false_type {};
template <class F>
struct accepts_empty_braces<F, std::void_t<decltype(take_by_copy<F>({}))>> : std::true_type {};

template <class T, std::size_t... I>
constexpr bool first_fields_initialize(std::index_sequence<I...>) noexcept {
  return initializable<T, type_list<prvalue_at<I>...>>::value;
}

template <class T, std::size_t Field, std::size_t... I>
constexpr bool binds_lvalue_at(std::index_sequence<I...>) noexcept {
  return initializable<
      T, type_list<std::conditional_t<I == Field, as_mutable_lvalue, as_prvalue>...>>::value;
}

template <class T, std::size_t I>
constexpr bool is_reference_field() noexcept {
  using F = bare<field_t<T, I>>;
  if constexpr (accepts_empty_braces<F>::value &&
                first_fields_initialize<T>(std::make_index_sequence<I + 1>{}) &&
                !first_fields_initialize<T>(std::make_index_sequence<I>{}))
    return true;
  else if constexpr (std::is_copy_constructible_v<F>)
    return !binds_lvalue_at<T, I>(field_indices<T>{});
  else
    return false;
}

template <class T, std::size_t... I>
constexpr bool has_reference_field(std::index_sequence<I...>) noexcept {
  if constexpr (!initializable<T, type_list<prvalue_at<I>...>>::value)
    return true;
  else
    return (is_reference_field<T, I>() || ...);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <bool Decode, class T, class Seen, std::size_t... I>
auto analyze_fields(std::index_sequence<I...>)
    -> first_refusal<analysis_t<Decode, field_t<T, I>, Seen>...>;

template <bool Decode, class T, class Seen>
constexpr auto analyze() {
  using U = bare<std::remove_reference_t<T>>;
  using inner = typename push<Seen, U>::type;
  if constexpr (std::is_reference_v<T>) {
    return tid<verdict<refusal::reference, T>>{};
  } else if constexpr (contains<Seen, U>::value) {
    return tid<accepted>{};
  } else if constexpr (is_custom_v<U>) {
    if constexpr (!Decode)
      return tid<
          verdict<has_custom_encode<U>::value ? refusal::none : refusal::no_custom_encode, U>>{};
    else if constexpr (!custom_decode<U>::found)
      return tid<verdict<refusal::no_custom_decode, U>>{};
    else if constexpr (!std::is_same_v<typename custom_decode<U>::result, U>)
      return tid<verdict<refusal::bad_custom_decode, U>>{};
    else
      return tid<accepted>{};
  } else if constexpr (std::is_pointer_v<U> && is_char_v<bare<std::remove_pointer_t<U>>>) {
    return tid<verdict<refusal::c_string, U>>{};
  } else if constexpr (std::is_pointer_v<U> || std::is_member_pointer_v<U>) {
    return tid<verdict<refusal::pointer, U>>{};
  } else if constexpr (std::is_function_v<U>) {
    return tid<verdict<refusal::function, U>>{};
  } else if constexpr (std::is_array_v<U>) {
    return tid<verdict<refusal::c_array, U>>{};
  } else if constexpr (std::is_union_v<U>) {
    return tid<verdict<refusal::union_type, U>>{};
  } else if constexpr (special_refusal<U>::value != refusal::none) {
    return tid<verdict<special_refusal<U>::value, U>>{};
  } else if constexpr (builtin<U>::known) {
    constexpr refusal own = Decode ? builtin<U>::self_decode : builtin<U>::self_encode;
    if constexpr (own != refusal::none)
      return tid<verdict<own, U>>{};
    else
      return tid<typename analysis_of_parts<Decode, typename builtin<U>::parts, inner>::type>{};
  } else if constexpr (is_aggregate_class_v<U>) {
    constexpr unreflectable problem = reflection_problem<U>();
    if constexpr (problem == unreflectable::base_class)
      return tid<verdict<refusal::base_class, U>>{};
    else if constexpr (problem == unreflectable::c_array)
      return tid<verdict<refusal::c_array, U>>{};
    else if constexpr (has_reference_field<U>(field_indices<U>{}))
      return tid<verdict<refusal::reference, U>>{};
    else
      return tid<typename decltype(analyze_fields<Decode, U, inner>(field_indices<U>{}))::type>{};
  } else if constexpr (std::is_class_v<U> && has_call_operator<U>::value) {
    return tid<verdict<refusal::function, U>>{};
  } else if constexpr (std::is_class_v<U>) {
    return tid<verdict<refusal::not_aggregate, U>>{};
  } else {
    return tid<verdict<refusal::other, U>>{};
  }
}

template <bool Decode, class T, class Seen>
struct analysis {
  using type = typename decltype(analyze<Decode, T, Seen>())::type;
};

/// True if a `T` can be encoded (`Decode` false) or decoded; otherwise fails
/// the build with the sentence for the first part of `T` that cannot.
template <bool Decode, class T>
constexpr bool verify() {
  using v = analysis_t<Decode, T, type_list<>>;
  return report<v::why, typename v::culprit>();
}

}  // namespace procpool::detail
