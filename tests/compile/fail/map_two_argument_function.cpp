// map with a function of two arguments (starmap was meant).
// expect: procpool: the pool's function cannot be called with one item of this range
#include <procpool/pool.hpp>

#include <utility>
#include <vector>

void run() {
  procpool::pool p([](int a, int b) { return a + b; });
  p.map(std::vector<std::pair<int, int>>{{1, 2}});
}
