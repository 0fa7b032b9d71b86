// A struct with a base class: procpool's sentence, not Boost.PFR's.
// expect: procpool cannot send a struct with a base class field by field
#include <procpool/codec.hpp>

#include <string>
#include <vector>

struct base {
  int id;
};
struct derived : base {
  std::string name;
};

void send(procpool::reader& in) {
  static_cast<void>(procpool::decode<std::vector<derived>>(in));
}
