// Four processes add 1 to one counter, 100 000 times each, under a lock.
//
// The Python this mirrors:
//
//     def work(counter, lock):
//         for _ in range(100_000):
//             with lock:
//                 counter.value += 1
//
//     counter, lock = Value("l", 0), Lock()
//     workers = [Process(target=work, args=(counter, lock)) for _ in range(4)]
//     for w in workers: w.start()
//     for w in workers: w.join()
//     print("total:", counter.value)
//
// Each process has its own memory, so an ordinary `long` would be counted
// four times, once in each copy. The counter and the lock live in shared
// memory instead: made before the processes start, they are inherited by
// every one of them and refer to the same bytes.
#include <fmt/format.h>
#include <procpool/process.hpp>
#include <procpool/shared.hpp>
#include <procpool/sync.hpp>

#include <list>
#include <mutex>

int main() {
  procpool::shared_value<long> counter;  // 0, in shared memory
  procpool::mutex lock;                  // Python's Lock

  auto work = [&] {
    for (int i = 0; i < 100'000; ++i) {
      // Read, add one, write back: three steps, so only one process at a time.
      std::lock_guard<procpool::mutex> hold(lock);
      counter.store(counter.load() + 1);
    }
  };

  std::list<procpool::process> workers;
  for (int n = 0; n < 4; ++n) workers.emplace_back(work);  // each starts at once
  for (auto& w : workers) w.join();

  fmt::print("total: {}\n", counter.load());  // total: 400000

  // One atomic step needs no lock at all: fetch_add adds in a single step.
  counter.store(0);
  {
    std::list<procpool::process> adders;
    for (int n = 0; n < 4; ++n) {
      adders.emplace_back([&] {
        for (int i = 0; i < 100'000; ++i) counter.fetch_add(1);
      });
    }
  }  // a process's destructor joins it, like std::jthread
  fmt::print("total with fetch_add: {}\n", counter.load());  // total with fetch_add: 400000
}
