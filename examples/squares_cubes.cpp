// Squares and cubes of 1..5, computed by worker processes.
//
// The Python this mirrors:
//
//     with Pool() as pool:
//         print("Squares:", pool.map(square, numbers))
//         print("Cubes:", pool.map(cube, numbers))
//
// A procpool pool is made for one function: it is given at construction, and
// every worker (one per CPU by default) is a fork of this program holding it.
#include <fmt/ranges.h>
#include <procpool/pool.hpp>

#include <vector>

int main() {
  std::vector<int> numbers{1, 2, 3, 4, 5};

  procpool::pool squares([](int n) { return n * n; });
  procpool::pool cubes([](int n) { return n * n * n; });

  // map sends the numbers to the workers and returns the results in input order.
  fmt::print("Squares: {}\n", squares.map(numbers));
  fmt::print("Cubes: {}\n", cubes.map(numbers));
}
