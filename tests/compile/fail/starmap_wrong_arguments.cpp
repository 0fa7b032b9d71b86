// starmap over tuples that do not match the function's parameters.
// expect: procpool: the pool's function cannot be called with the elements of one item
#include <procpool/pool.hpp>

#include <string>
#include <tuple>
#include <vector>

void run() {
  procpool::pool p([](int a, int b) { return a + b; });
  p.starmap(std::vector<std::tuple<int, std::string>>{{1, "x"}});
}
