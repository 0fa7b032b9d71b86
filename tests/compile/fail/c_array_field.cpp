// A struct with a C array field: procpool's sentence, not Boost.PFR's pages.
// expect: procpool cannot send C arrays
#include <procpool/codec.hpp>

struct sample {
  int id;
  double values[4];
};

void send(procpool::writer& out) {
  procpool::encode(out, sample{});
}
