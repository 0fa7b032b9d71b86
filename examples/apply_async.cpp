// Python's apply_async: start tasks one by one, keep their futures, collect
// the results later.
//
// The Python this mirrors:
//
//     with Pool(2) as pool:
//         results = [pool.apply_async(square, (i,)) for i in range(1, 6)]
//         for i, r in enumerate(results, 1):
//             print(f"Result of task {i}: {r.get()}")
//
// `pool::submit(args...)` calls the pool's function with `args` in a worker
// and returns a `procpool::future`; `executor::submit(f, args...)` does the
// same with a function given at each call. The tasks run while the caller
// does something else (the pool's helper thread sends and collects them);
// callbacks are in examples/callbacks.cpp.
#include <fmt/format.h>
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

std::string greet(const std::string& who) {
  return fmt::format("Hello from the {}", who);
}

int main() {
  // The task: square `n` after thinking for a while; negative numbers are refused.
  procpool::pool square(
      [](int n, std::chrono::milliseconds think) {
        std::this_thread::sleep_for(think);
        if (n < 0) throw std::invalid_argument(fmt::format("cannot square {}: negative", n));
        return n * n;
      },
      2);

  // 1. Submit five tasks, then collect the results in the order we choose.
  std::vector<procpool::future<int>> futures;
  for (int n = 1; n <= 5; ++n) futures.push_back(square.submit(n, 10ms));
  for (std::size_t i = 0; i < futures.size(); ++i)
    fmt::print("Result of task {}: {}\n", i + 1, futures[i].get());

  // 2. Waiting with a time limit, like AsyncResult.wait(timeout) and ready().
  auto slow = square.submit(12, 500ms);
  bool done = slow.wait_for(20ms);  // returns early only if the result arrived
  fmt::print("After 20 ms, the slow task is ready: {}\n", done);
  slow.wait_for(10s);
  fmt::print("After waiting longer, it is ready: {}\n", slow.ready());
  fmt::print("Result of the slow task: {}\n", slow.get());

  // 3. An exception in the task comes back as procpool::task_error, carrying
  //    the exception's type and message (and the worker's pid, not printed
  //    here because it changes from run to run).
  auto refused = square.submit(-3, 0ms);
  try {
    refused.get();
  } catch (const procpool::task_error& e) {
    fmt::print("Task failed: it threw {}: {}\n", e.type_name(), e.message());
  }

  // The pool is still usable after a task failed.
  fmt::print("Result after the failure: {}\n", square.submit(7, 0ms).get());

  // 4. A different function with each task, as apply_async(f, args) allows:
  //    procpool::executor runs plain functions and captureless lambdas.
  procpool::executor executor(2);
  auto cube = executor.submit([](int n) { return n * n * n; }, 4);
  auto greeting = executor.submit(&greet, std::string("processes"));
  fmt::print("Cube of 4: {}\n", cube.get());
  fmt::print("{}\n", greeting.get());
}
