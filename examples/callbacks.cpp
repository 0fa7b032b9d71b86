// Work in the background and callbacks: Python's apply_async(callback=,
// error_callback=) and map_async.
//
// The Python this mirrors:
//
//     with Pool(2) as pool:
//         r = pool.apply_async(square, (7,), callback=lambda v: print(f"callback: {v}"))
//         print("get:", r.get())
//         pool.map_async(square, [1, 2, 3, 4],
//                        callback=lambda rs: print("sum of squares:", sum(rs))).wait()
//         pool.apply_async(square, (-1,), error_callback=lambda e: print("failed:", e)).wait()
//         for i in range(3): pool.apply_async(report, (i,))
//         for i in range(3): print("reported:", done.get())   # nobody waits on a result
//
// `future::then(on_value, on_error)` runs on the pool's helper thread as
// soon as the task is over; `get()` returns after the callbacks ran, so the
// lines below come out in this order.
#include <fmt/format.h>
#include <procpool/pool.hpp>
#include <procpool/queue.hpp>

#include <exception>
#include <numeric>
#include <stdexcept>
#include <vector>

int main() {
  // Made before the pool, so that its workers hold it too.
  procpool::queue<int> done(64 * 1024);

  procpool::pool square(
      [&done](int n) {
        if (n < 0) throw std::invalid_argument(fmt::format("cannot square {}: negative", n));
        done.push(n);
        return n * n;
      },
      2);

  // 1. A callback for one task; get() still returns the result.
  auto f = square.submit(7);
  f.then([](const int& r) { fmt::print("callback: 7 squared is {}\n", r); });
  fmt::print("get: {}\n", f.get());

  // 2. map_async: every result at once, in input order, to the callback.
  auto all = square.map_async(std::vector<int>{1, 2, 3, 4}, [](const std::vector<int>& r) {
    fmt::print("callback: the squares of 1..4 sum to {}\n", std::accumulate(r.begin(), r.end(), 0));
  });
  all.get();

  // 3. An error goes to the error callback, as the exception get() throws.
  auto bad = square.submit(-1);
  bad.then([](const int&) {},
           [](const std::exception_ptr& e) {
             try {
               std::rethrow_exception(e);
             } catch (const procpool::task_error& te) {
               fmt::print("error callback: {}: {}\n", te.type_name(), te.message());
             }
           });
  (void)bad.exception();

  // 4. Nobody waits on these futures: the tasks still run, and what they
  // push arrives while this thread waits on the queue.
  while (done.try_pop()) {
  }
  for (int n = 10; n < 13; ++n) (void)square.submit(n);
  int sum = 0;
  for (int k = 0; k < 3; ++k) sum += done.pop();
  fmt::print("the three background tasks reported {}\n", sum);
}
