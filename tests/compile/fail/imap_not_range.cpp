// imap_unordered given a struct that is not a range.
// expect: procpool: the input of map, starmap, imap or imap_unordered must be a range
#include <procpool/pool.hpp>

struct config {
  int n;
};

void run() {
  procpool::pool p([](int x) { return x * x; });
  for (auto& r : p.imap_unordered(config{3})) static_cast<void>(r);
}
