// executor::map with a function of two arguments.
// expect: procpool::executor::map calls the function with one item of the range at a time
#include <procpool/executor.hpp>

#include <vector>

int add(int a, int b) {
  return a + b;
}

void run() {
  procpool::executor ex(1);
  ex.map(&add, std::vector<int>{1, 2});
}
