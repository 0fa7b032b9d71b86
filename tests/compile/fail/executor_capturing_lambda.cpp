// executor::submit with a lambda that captures.
// expect: procpool::executor runs plain functions and captureless lambdas
#include <procpool/executor.hpp>

void run(int offset) {
  procpool::executor ex(1);
  auto f = ex.submit([offset](int x) { return x + offset; }, 1);
  static_cast<void>(f);
}
