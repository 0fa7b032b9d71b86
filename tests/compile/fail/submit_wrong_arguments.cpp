// submit with one argument too many.
// expect: procpool: the function cannot be called with the arguments given to submit
#include <procpool/pool.hpp>

void run() {
  procpool::pool p([](int x) { return x * x; });
  auto f = p.submit(1, 2);
  static_cast<void>(f);
}
