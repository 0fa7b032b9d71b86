// Python's ProcessPoolExecutor, line for line: map over two lists, starmap,
// imap, futures waited on with wait() and as_completed(), shutdown with
// cancel_futures, and a worker's own exception type caught as itself.
#include <procpool/executor.hpp>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

/// An exception a task throws, with more than a message: the line it failed on.
class parse_error : public std::runtime_error {
 public:
  parse_error(const std::string& what, int line) : std::runtime_error(what), line_(line) {}
  int line() const { return line_; }
  // Sendable, so a worker can send it back whole.
  friend void procpool_encode(procpool::writer& out, const parse_error& e) {
    procpool::encode(out, std::string(e.what()));
    procpool::encode(out, e.line_);
  }
  friend parse_error procpool_decode(procpool::reader& in, procpool::type_tag<parse_error>) {
    auto what = procpool::decode<std::string>(in);
    return parse_error(what, procpool::decode<int>(in));
  }

 private:
  int line_;
};

int add(int a, int b) {
  return a + b;
}
int square(int x) {
  return x * x;
}
int slow_square(int x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  return x * x;
}
int parse_line(int line) {
  if (line == 3) throw parse_error("unexpected token", line);
  return line * 10;
}

int main() {
  procpool::executor ex(2);

  // executor.map(add, [1, 2, 3], [10, 20]): stops at the shortest.
  for (int r : ex.map(&add, std::vector<int>{1, 2, 3}, std::vector<int>{10, 20}))
    std::printf("add: %d\n", r);

  // starmap over pairs, with a chunk size for this call.
  std::vector<std::pair<int, int>> pairs{{1, 1}, {2, 2}};
  for (int r : ex.starmap(&add, pairs, {1})) std::printf("starmap: %d\n", r);

  // imap: lazy, in input order.
  for (int r : ex.imap(&square, std::vector<int>{4, 5})) std::printf("imap: %d\n", r);

  // Futures: wait for all, then read them in the order they finished.
  std::vector<procpool::future<int>> fs;
  for (int i = 1; i <= 3; ++i) fs.push_back(ex.submit(&square, i));
  auto waited = procpool::wait(fs, procpool::return_when::all_completed);
  std::printf("done: %zu, not done: %zu\n", waited.done.size(), waited.not_done.size());
  int sum = 0;
  for (auto& f : procpool::as_completed(fs)) sum += f.get();
  std::printf("sum of squares: %d\n", sum);

  // The worker's exception, caught as itself.
  try {
    (void)ex.map(&parse_line, std::vector<int>{1, 2, 3});
  } catch (const procpool::task_error& e) {
    try {
      e.rethrow_as<parse_error>();
    } catch (const parse_error& p) {
      std::printf("parse_error on line %d: %s\n", p.line(), p.what());
    }
  }

  // Tasks not yet sent are cancelled; get() says so. Tasks go to the
  // workers at once, two per worker: of ten slow ones, four are sent.
  std::vector<procpool::future<int>> batch;
  for (int i = 0; i < 10; ++i) batch.push_back(ex.submit(&slow_square, i));
  ex.shutdown(true, true);
  int ran = 0, cancelled = 0;
  for (auto& f : batch) {
    try {
      (void)f.get();
      ++ran;
    } catch (const procpool::task_cancelled&) {
      ++cancelled;
    }
  }
  std::printf("%d tasks ran, %d pending ones were cancelled\n", ran, cancelled);
}
