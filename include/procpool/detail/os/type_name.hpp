// Readable type names for error messages.
#pragma once

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <typeinfo>

namespace procpool::detail {

/// Demangles a name from `typeid(...).name()`; returns it unchanged when it cannot.
inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

/// The readable name of `T`, e.g. `std::vector<int, std::allocator<int> >`.
template <class T>
std::string type_name() {
  return demangle(typeid(T).name());
}

}  // namespace procpool::detail
