// map given a number instead of a range.
// expect: procpool: the input of map, starmap, imap or imap_unordered must be a range
#include <procpool/pool.hpp>

void run() {
  procpool::pool p([](int x) { return x * x; });
  p.map(5);
}
