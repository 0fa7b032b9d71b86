// Several producers put numbers into one queue; several consumers take them
// out, square them and put the results into a second queue. Every number is
// taken by exactly one consumer.
//
// The Python this mirrors:
//
//     def produce(work, first):
//         for n in range(first, first + 100):
//             work.put(n)
//
//     def consume(work, results):
//         while (n := work.get()) is not None:
//             results.put((n, n * n))
//
//     work, results = Queue(), Queue()
//     consumers = [Process(target=consume, args=(work, results)) for _ in range(2)]
//     producers = [Process(target=produce, args=(work, 1 + 100 * i)) for i in range(3)]
//     ...start them all, join the producers...
//     for _ in consumers: work.put(None)      # one "stop" per consumer
//     squares = [results.get() for _ in range(300)]
//
// Python stops consumers with sentinel values; a procpool queue is closed
// instead: once it is empty, pop() throws channel_closed in every consumer.
// Which consumer takes which number changes from run to run, so the program
// prints only totals, which do not.
#include <fmt/format.h>
#include <procpool/process.hpp>
#include <procpool/queue.hpp>

#include <algorithm>
#include <list>
#include <utility>
#include <vector>

int main() {
  constexpr int producers = 3, consumers = 2, per_producer = 100;

  // Both queues live in shared memory; make them before starting processes.
  procpool::queue<int> work;
  procpool::queue<std::pair<int, long>> results;

  std::list<procpool::process> consumer_processes;
  for (int c = 0; c < consumers; ++c) {
    consumer_processes.emplace_back([&] {
      try {
        for (;;) {
          int n = work.pop();  // waits while the queue is empty
          results.push({n, long{n} * n});
        }
      } catch (const procpool::channel_closed&) {
        // The queue was closed and everything in it was taken: done.
      }
    });
  }

  std::list<procpool::process> producer_processes;
  for (int p = 0; p < producers; ++p) {
    producer_processes.emplace_back([&, p] {
      for (int n = 1 + p * per_producer; n <= (p + 1) * per_producer; ++n) work.push(n);
    });
  }
  for (auto& p : producer_processes) p.join();
  work.close();  // no more work: consumers finish what is left, then stop
  fmt::print("{} producers pushed {} numbers\n", producers, producers * per_producer);

  // Collect one result per number, then check that each number came back once.
  std::vector<std::pair<int, long>> squares;
  for (int i = 0; i < producers * per_producer; ++i) squares.push_back(results.pop());
  for (auto& c : consumer_processes) c.join();

  std::sort(squares.begin(), squares.end());
  bool each_once = true;
  long sum = 0;
  for (std::size_t i = 0; i < squares.size(); ++i) {
    if (squares[i].first != static_cast<int>(i) + 1) each_once = false;
    sum += squares[i].second;
  }
  fmt::print("{} consumers squared {} numbers, each exactly once: {}\n", consumers, squares.size(),
             each_once);
  fmt::print("sum of the squares: {}\n", sum);  // 1² + 2² + ... + 300² = 9045050
}
