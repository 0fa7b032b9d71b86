// A user's program: a pool, a process and a pipe, through the umbrella header.
#include <procpool/procpool.hpp>

#include <fmt/format.h>

#include <vector>

int main() {
  procpool::pool squares([](int n) { return n * n; }, 2u);
  std::vector<int> got = squares.map(std::vector<int>{1, 2, 3});
  procpool::process child([] {});
  bool ok = got == std::vector<int>{1, 4, 9} && child.join().success();
  fmt::print("consumer: {}\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
