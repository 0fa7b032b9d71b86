// starmap over items that are not tuples.
// expect: procpool: starmap's items must be tuples or pairs
#include <procpool/pool.hpp>

#include <vector>

void run() {
  procpool::pool p([](int a, int b) { return a + b; });
  p.starmap(std::vector<int>{1, 2});
}
