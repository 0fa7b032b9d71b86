// The failure contract: what happens when a task throws, when a worker dies,
// and when a task hangs — and that the pool keeps working after each.
//
// With Python's multiprocessing.Pool an exception comes back with its
// traceback, but a worker killed by a signal can leave pool.map waiting
// forever. With procpool each of the three is an exception naming the item:
//
//   a task throws        -> procpool::task_error    (index, type, message)
//   a worker dies        -> procpool::worker_died   (index, pid, signal or exit code)
//   a task runs too long -> procpool::timeout_error (index, pid, the limit)
//
// The pool replaces the lost worker and the next call works. All three
// derive from procpool::error. Pids change from run to run, so this example
// prints everything else.
#include <fmt/ranges.h>
#include <procpool/pool.hpp>

#include <sys/resource.h>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

int main() {
  procpool::pool_options options;
  options.workers = 2;
  options.task_timeout = 1s;  // a task running longer than this is stopped
  // Runs in every worker as it starts, replacements included: no core files
  // from the deliberate crash below.
  options.initializer = [] {
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
  };

  procpool::pool pool(
      [](int n) {
        if (n == 3) throw std::runtime_error("3 is unlucky");
        if (n == 13) std::abort();                     // the worker process dies
        if (n == 42) std::this_thread::sleep_for(1h);  // the task hangs
        return n * 10;
      },
      options);

  std::vector<int> fine{1, 2, 4};
  fmt::print("A good map: {}\n", pool.map(fine));

  try {
    pool.map(std::vector<int>{1, 2, 3, 4, 5});
  } catch (const procpool::task_error& e) {
    fmt::print("task_error: item {} threw {}: {}\n", e.index(), e.type_name(), e.message());
  }
  fmt::print("The pool still works: {}\n", pool.map(fine));

  try {
    pool.map(std::vector<int>{1, 2, 13, 4});
  } catch (const procpool::worker_died& e) {
    fmt::print("worker_died: the worker running item {} was {}\n", e.index().value(), e.status());
  }
  fmt::print("The pool still works: {}\n", pool.map(fine));

  try {
    pool.map(std::vector<int>{1, 42, 4});
  } catch (const procpool::timeout_error& e) {
    auto limit = std::chrono::duration_cast<std::chrono::milliseconds>(e.timeout());
    fmt::print("timeout_error: item {} ran past {} ms; its worker was killed\n", e.index(),
               limit.count());
  }
  fmt::print("The pool still works: {}\n", pool.map(fine));
  fmt::print("Workers: {}\n", pool.workers());
}
