// A map whose results are strings: each worker formats one line per number.
//
// The Python this mirrors:
//
//     def describe(n):
//         return f"Square of {n} is {n * n} and it's Cube is {n * n * n}"
//     with Pool() as pool:
//         for line in pool.map(describe, [1, 2, 3, 4, 5]):
//             print(line)
//
// Strings, vectors, maps, tuples and plain structs of them travel between
// processes without any annotation (see "What can be sent" in docs/guide.md).
#include <fmt/format.h>
#include <procpool/pool.hpp>

#include <string>
#include <vector>

int main() {
  procpool::pool describe([](int n) {
    return fmt::format("Square of {} is {} and it's Cube is {}", n, n * n, n * n * n);
  });

  std::vector<std::string> lines = describe.map(std::vector<int>{1, 2, 3, 4, 5});
  for (const std::string& line : lines) fmt::print("{}\n", line);
}
