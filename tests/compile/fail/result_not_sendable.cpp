// A function whose result cannot be sent back: where, then why.
// expect: procpool: the function's result cannot be sent back from a worker process
// also: procpool cannot send raw pointers
#include <procpool/pool.hpp>

#include <vector>

int table[4];

void run() {
  procpool::pool p([](int i) { return &table[i]; });
  p.map(std::vector<int>{1, 2});
}
