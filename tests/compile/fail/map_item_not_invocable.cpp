// map over items the function cannot take.
// expect: procpool: the pool's function cannot be called with one item of this range
#include <procpool/pool.hpp>

#include <string>
#include <vector>

void run() {
  procpool::pool p([](const std::string& s) { return s.size(); });
  p.map(std::vector<int>{1, 2, 3});
}
