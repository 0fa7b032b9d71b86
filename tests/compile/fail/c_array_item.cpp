// Items of map with a C array field: where, then why.
// expect: procpool: the items of this range cannot be sent to a worker process
// also: procpool cannot send C arrays
#include <procpool/pool.hpp>

#include <vector>

struct sample {
  int id;
  double values[4];
};

void run() {
  procpool::pool p([](const sample& s) { return s.id; });
  p.map(std::vector<sample>(3));
}
