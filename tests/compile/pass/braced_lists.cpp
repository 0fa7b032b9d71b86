// Braced lists of items where a range is expected: map, starmap, imap,
// imap_unordered, a container argument of submit, and executor::map.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>

#include <string>
#include <tuple>
#include <vector>

int square(int x) {
  return x * x;
}

void run() {
  procpool::pool p([](int x) { return x * 2; });
  std::vector<int> doubled = p.map({1, 2, 3});
  for (int r : p.imap({4, 5})) static_cast<void>(r);
  for (auto& r : p.imap_unordered({6, 7})) static_cast<void>(r);

  procpool::pool pairs([](int a, const std::string& b) { return b.size() + std::size_t(a); });
  std::vector<std::size_t> sizes = pairs.starmap({std::tuple<int, std::string>(1, "a")});

  procpool::pool sums([](const std::vector<int>& v) { return v.size(); });
  auto f = sums.submit({1, 2, 3});
  static_cast<void>(f.get());

  procpool::executor ex(1);
  std::vector<int> squares = ex.map(&square, {1, 2, 3});
  static_cast<void>(doubled.size() + sizes.size() + squares.size());
}
