// The example of README.md, built and run by the tests so that it stays true.
#include <fmt/ranges.h>
#include <procpool/pool.hpp>

#include <vector>

int main() {
  int power = 3;
  procpool::pool p([power](int x) {  // any callable, captures included
    int r = 1;
    for (int i = 0; i < power; ++i) r *= x;
    return r;
  });
  std::vector<int> cubes = p.map(std::vector<int>{1, 2, 3, 4, 5});  // in input order
  fmt::print("Cubes: {}\n", cubes);                                 // Cubes: [1, 8, 27, 64, 125]
}
