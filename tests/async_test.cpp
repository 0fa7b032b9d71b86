// The pool's async half: work moves while no thread waits (the helper
// thread), callbacks (`future::then`, `map_async`'s), and what careless or
// hostile callbacks do: throw, use the pool, wait on their own future,
// terminate or destroy the pool, run while a worker dies. Run under
// ThreadSanitizer too (the tsan preset, and .ci/run).
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <procpool/queue.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace async_test {

/// Made before any pool, so every worker holds it: the tasks report here.
procpool::queue<int> reports(64 * 1024);
/// Opened before any pool: `give()` lets one `job(-3)` return.
procpool_test::go_signal gate;

/// Reports `x` on `reports` and returns `2x`; throws for 3, kills its own
/// worker for -2, waits for the gate for -3.
int job(int x) {
  if (x == 3) throw std::domain_error("three is refused");
  if (x == -2) ::raise(SIGKILL);
  if (x == -3 && !gate.await()) return 0;
  reports.push(x);
  return 2 * x;
}

/// Empties `reports` of what earlier tests left.
void drain_reports() {
  while (reports.try_pop()) {
  }
}

int twice(int x) {
  return 2 * x;
}

void nothing(int) {}

/// A one-shot flag a callback raises and the test waits on (with a limit:
/// a missing callback fails the test instead of hanging it).
class signal_flag {
 public:
  void raise() {
    std::lock_guard<std::mutex> lock(m_);
    raised_ = true;
    cv_.notify_all();
  }
  bool wait(std::chrono::seconds limit = 30s) {
    std::unique_lock<std::mutex> lock(m_);
    return cv_.wait_for(lock, limit, [&] { return raised_; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool raised_ = false;
};

}  // namespace async_test

using namespace async_test;

TEST_CASE("submitted tasks run while the caller blocks on something they feed (no deadlock)",
          "[async]") {
  // Python's classic: submit, then wait on a queue the tasks fill. Nothing
  // here waits on a future: only the helper thread moves the work.
  drain_reports();
  procpool::pool p(job, 2);
  std::vector<procpool::future<int>> fs;
  for (int i = 10; i < 16; ++i) fs.push_back(p.submit(i));
  int sum = 0;
  for (int k = 0; k < 6; ++k) {
    auto v = reports.pop_for(30s);
    REQUIRE(v);
    sum += *v;
  }
  CHECK(sum == 10 + 11 + 12 + 13 + 14 + 15);
  // The results were collected meanwhile too: they are there without a wait
  // that drives (done() does not drive).
  for (auto& f : fs) {
    for (int spins = 0; !f.done() && spins < 30000; ++spins) std::this_thread::sleep_for(1ms);
    CHECK(f.done());
  }
  for (int i = 0; i < 6; ++i) CHECK(fs[std::size_t(i)].get() == 2 * (10 + i));
}

TEST_CASE("then: the callback runs on the helper thread while the caller sleeps", "[async]") {
  drain_reports();
  procpool::pool p(job, 2);
  signal_flag called;
  std::thread::id ran_on;
  int seen = 0;
  auto f = p.submit(-3);  // not over before the callback is attached: it waits for the gate
  f.then([&](const int& v) {
    seen = v;
    ran_on = std::this_thread::get_id();
    called.raise();
  });
  gate.give();
  REQUIRE(called.wait());  // this thread never drives the pool
  CHECK(seen == -6);
  CHECK(ran_on != std::this_thread::get_id());
  CHECK(f.get() == -6);  // the result stays for get()
}

TEST_CASE("then on a task already over runs at once, in the calling thread", "[async]") {
  procpool::pool p(twice, 1);
  auto f = p.submit(5);
  REQUIRE(f.wait_for(30s));
  std::thread::id ran_on;
  f.then([&](int v) {
    CHECK(v == 10);
    ran_on = std::this_thread::get_id();
  });
  CHECK(ran_on == std::this_thread::get_id());
  CHECK(f.get() == 10);
}

TEST_CASE("then's error callback gets the task's error, the value callback is not called",
          "[async]") {
  procpool::pool p(job, 1);
  std::promise<std::exception_ptr> error;
  std::atomic<bool> value_called{false};
  auto f = p.submit(3);
  f.then([&](int) { value_called = true; },
         [&](const std::exception_ptr& e) { error.set_value(e); });
  auto got = error.get_future();
  REQUIRE(got.wait_for(30s) == std::future_status::ready);
  auto e = got.get();
  REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const procpool::task_error& te) {
    CHECK(te.type_name() == "std::domain_error");
    CHECK(te.message() == "three is refused");
  }
  CHECK_FALSE(value_called);
  CHECK_THROWS_AS(f.get(), procpool::task_error);  // the error stays for get()
}

TEST_CASE("get and wait return only after the task's callbacks ran", "[async]") {
  drain_reports();
  procpool::pool p(job, 1);
  std::atomic<bool> finished_callback{false};
  auto f = p.submit(-3);  // over only once the gate opens, after then()
  f.then([&](int) {
    // Long enough that a get() that did not wait for it would return first.
    std::this_thread::sleep_for(100ms);
    finished_callback = true;
  });
  gate.give();
  CHECK(f.get() == -6);
  CHECK(finished_callback);
  auto g = p.submit(-3);
  std::atomic<bool> second{false};
  g.then([&](int) {
    std::this_thread::sleep_for(100ms);
    second = true;
  });
  gate.give();
  std::vector<procpool::future<int>> fs;
  fs.push_back(std::move(g));
  auto r = procpool::wait(fs);
  CHECK(r.done.size() == 1);
  CHECK(second);
}

TEST_CASE("a callback that throws is reported on stderr and the pool goes on", "[async]") {
  procpool::pool p(twice, 2);
  std::string err = procpool_test::capture_stderr([&] {
    auto f = p.submit(4);
    f.then([](int) { throw std::runtime_error("callback refuses"); });
    CHECK(f.get() == 8);  // returns after the callback ran (and threw)
  });
  CHECK_THAT(err, Contains("std::runtime_error") && Contains("callback refuses"));
  CHECK(p.map(std::vector<int>{1, 2, 3}) == std::vector<int>{2, 4, 6});
  signal_flag later;
  auto g = p.submit(6);
  g.then([&](int) { later.raise(); });
  CHECK(later.wait());
}

TEST_CASE("callbacks may use the pool: submit, get, map, and get on their own future", "[async]") {
  procpool::pool p(twice, 2);
  std::promise<std::vector<int>> out;
  auto f = p.submit(1);
  f.then([&](int v) {
    std::vector<int> r;
    r.push_back(v);
    r.push_back(p.submit(v + 1).get());
    auto m = p.map(std::vector<int>{10, 20});
    r.insert(r.end(), m.begin(), m.end());
    r.push_back(f.get());  // its own future: over on this thread already
    out.set_value(r);
  });
  auto got = out.get_future();
  REQUIRE(got.wait_for(30s) == std::future_status::ready);
  CHECK(got.get() == std::vector<int>{2, 6, 20, 40, 2});
}

TEST_CASE("a fire-and-forget task: its future dropped, its callback still runs", "[async]") {
  procpool::pool p(twice, 1);
  signal_flag called;
  int seen = 0;
  p.submit(7).then([&](int v) {
    seen = v;
    called.raise();
  });
  REQUIRE(called.wait());
  CHECK(seen == 14);
}

TEST_CASE("a worker dies under a task with callbacks: the error callback says so", "[async]") {
  procpool::pool p(job, 2);
  std::promise<std::exception_ptr> error;
  p.submit(-2).then([](int) {}, [&](const std::exception_ptr& e) { error.set_value(e); });
  auto got = error.get_future();
  REQUIRE(got.wait_for(30s) == std::future_status::ready);
  CHECK_THROWS_AS(std::rethrow_exception(got.get()), procpool::worker_died);
  CHECK(p.submit(4).get() == 8);  // a replacement serves the next task
}

TEST_CASE("join and the destructor run the callbacks of the work they finish", "[async]") {
  std::atomic<int> ran{0};
  {
    procpool::pool p(twice, 2);
    for (int i = 0; i < 20; ++i) (void)p.submit(i).then([&](int) { ++ran; });
  }
  CHECK(ran == 20);
  procpool::pool q(twice, 2);
  for (int i = 0; i < 20; ++i) (void)q.submit(i).then([&](int) { ++ran; });
  q.join();
  CHECK(ran == 40);
}

TEST_CASE("terminate: pending tasks' error callbacks get pool_closed", "[async]") {
  procpool::pool p(job, 1);
  std::promise<std::exception_ptr> error;
  auto held = p.submit(-3);  // never released: runs until terminate
  held.then([](int) {}, [&](const std::exception_ptr& e) { error.set_value(e); });
  p.terminate();
  auto got = error.get_future();
  REQUIRE(got.wait_for(30s) == std::future_status::ready);
  CHECK_THROWS_AS(std::rethrow_exception(got.get()), procpool::pool_closed);
  CHECK_THROWS_AS(held.get(), procpool::pool_closed);
}

TEST_CASE("a callback that terminates or destroys its own pool", "[async]") {
  SECTION("terminate from a callback: the pool stops, a task still out ends with pool_closed") {
    drain_reports();
    procpool::pool p(job, 2);
    auto held = p.submit(-3);  // holds a worker until the pool stops
    signal_flag done;
    auto f = p.submit(9);
    f.then([&](int) {
      p.terminate();
      done.raise();
    });
    REQUIRE(done.wait());
    CHECK(f.get() == 18);
    CHECK_THROWS_AS(held.get(), procpool::pool_closed);
    CHECK_THROWS_AS(p.submit(1), procpool::pool_closed);
    REQUIRE(reports.pop_for(30s) == std::optional<int>(9));
  }
  SECTION("the last owner of the pool dropped in a callback") {
    using pool_t = procpool::pool<int (*)(int)>;
    auto p = std::make_shared<pool_t>(twice, 2);
    std::weak_ptr<pool_t> weak = p;
    signal_flag done;
    auto f = p->submit(4);
    f.then([owner = std::move(p), &done](int) mutable {
      owner.reset();  // the last reference: the pool is destroyed on its own helper thread
      done.raise();
    });
    REQUIRE(done.wait());
    CHECK(weak.expired());
    CHECK(f.get() == 8);
  }
}

TEST_CASE("map_async: results in input order, callbacks, errors, void, empty", "[async]") {
  SECTION("results and the callback; the input was read when the call was made") {
    procpool::pool p(twice, 2);
    std::promise<std::vector<int>> seen;
    std::vector<int> xs(1000);
    std::iota(xs.begin(), xs.end(), 100);
    auto f = p.map_async(xs, [&](const std::vector<int>& r) { seen.set_value(r); });
    xs.assign(1000, -1);
    auto got = seen.get_future();
    REQUIRE(got.wait_for(30s) == std::future_status::ready);
    auto r = f.get();
    CHECK(r == got.get());
    REQUIRE(r.size() == 1000);
    for (int i = 0; i < 1000; ++i) CHECK(r[std::size_t(i)] == 2 * (100 + i));
  }
  SECTION("the lowest failing item's error goes to error_callback, and get raises it") {
    procpool::pool p(job, 2);
    std::promise<std::exception_ptr> error;
    std::atomic<bool> value_called{false};
    auto f = p.map_async(
        std::vector<int>{1, 2, 3, 4, 5}, [&](const std::vector<int>&) { value_called = true; },
        [&](const std::exception_ptr& e) { error.set_value(e); });
    auto got = error.get_future();
    REQUIRE(got.wait_for(30s) == std::future_status::ready);
    try {
      std::rethrow_exception(got.get());
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == std::optional<std::size_t>(2));
      CHECK(e.message() == "three is refused");
    }
    CHECK_THROWS_AS(f.get(), procpool::task_error);
    CHECK_FALSE(value_called);
  }
  SECTION("a function that returns nothing: a future<void>, a callback with no argument") {
    procpool::pool p(nothing, 2);
    signal_flag called;
    procpool::future<void> f = p.map_async(std::vector<int>{1, 2, 3}, [&] { called.raise(); });
    REQUIRE(called.wait());
    CHECK_NOTHROW(f.get());
  }
  SECTION("empty input: an empty vector, the callback at once") {
    procpool::pool p(twice, 1);
    std::size_t size = 99;
    auto f = p.map_async(std::vector<int>{}, [&](const std::vector<int>& r) { size = r.size(); });
    CHECK(f.get().empty());
    CHECK(size == 0);
  }
  SECTION("starmap_async and a chunk size of its own") {
    procpool::executor ex(2);
    procpool::pool p([](int a, int b) { return a * b; }, 2);
    auto f = p.starmap_async(std::vector<std::tuple<int, int>>{{2, 3}, {4, 5}, {6, 7}},
                             procpool::map_options{1});
    CHECK(f.get() == std::vector<int>{6, 20, 42});
  }
  SECTION("progress is reported from the helper thread while nobody waits") {
    std::atomic<std::size_t> last{0};
    std::atomic<bool> finished{false};
    procpool::pool_options o;
    o.workers = 2;
    o.on_progress = [&](const procpool::progress_info& info) {
      last = info.done;
      if (info.done == info.total) finished = true;
    };
    procpool::pool p(twice, o);
    signal_flag called;
    auto f =
        p.map_async(std::vector<int>(500, 1), [&](const std::vector<int>&) { called.raise(); });
    REQUIRE(called.wait());
    CHECK(finished);  // the last report comes before the callback
    CHECK(last == 500);
    CHECK(f.get().size() == 500);
  }
  SECTION("after close, map_async is refused") {
    procpool::pool p(twice, 1);
    p.close();
    CHECK_THROWS_AS(p.map_async(std::vector<int>{1}), procpool::pool_closed);
  }
}

TEST_CASE("many submits with callbacks, then a wait for all", "[async]") {
  procpool::pool p(twice, 2);
  std::atomic<long> sum{0};
  std::vector<procpool::future<int>> fs;
  for (int i = 0; i < 2000; ++i) fs.push_back(p.submit(i));
  for (auto& f : fs) f.then([&](int v) { sum += v; });
  auto r = procpool::wait(fs);
  CHECK(r.done.size() == fs.size());
  CHECK(sum == 2L * (1999L * 2000L / 2));
}

TEST_CASE("eight threads adding callbacks while the helper runs them", "[async][threads]") {
  procpool::pool p(twice, 2);
  std::atomic<int> ran{0}, wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) {
        int x = t * 1000 + k;
        auto f = p.submit(x);
        f.then([&, x](int v) {
          wrong += v != 2 * x;
          ++ran;
        });
        if (k % 3 == 0) wrong += f.get() != 2 * x;
      }
    });
  for (auto& t : threads) t.join();
  p.join();
  CHECK(ran == 400);
  CHECK(wrong == 0);
}

TEST_CASE("forking while the helper thread runs: no warning, the child's copy touches nothing",
          "[async][fork]") {
  drain_reports();
  procpool::detail::warned_threaded_fork = false;
  procpool::pool p(job, 1);
  auto held = p.submit(-3);  // the helper is running and the task pending
  // Besides the helper, this process runs only this thread; not under
  // ThreadSanitizer, whose own thread makes the warning right there.
  bool single = procpool::detail::sys::thread_count() <= procpool::detail::fork_safe_threads;
  std::string err = procpool_test::capture_stderr([&] {
    pid_t child = procpool_test::spawn([&] {
      // The copy's lock may have been held by the helper at the fork: it is
      // never waited on. Every use is refused; dropping the copy is quiet.
      try {
        (void)held.wait_for(1ms);
        return 1;
      } catch (const procpool::error&) {
      }
      return 0;
    });
    CHECK(procpool_test::reap(child) == procpool::exit_status::exited(0));
  });
  if (single) CHECK(err.find("warning") == std::string::npos);
  gate.give();
  CHECK(held.get() == -6);
  REQUIRE(reports.pop_for(30s) == std::optional<int>(-3));
}

TEST_CASE("a batch of submitted tasks reports progress, the last report when none is pending",
          "[async][progress]") {
  drain_reports();
  std::mutex m;
  std::vector<procpool::progress_info> seen;
  signal_flag last;
  procpool::pool_options o;
  o.workers = 1;
  o.on_progress = [&](const procpool::progress_info& info) {
    std::lock_guard<std::mutex> lock(m);
    seen.push_back(info);
    if (info.done == info.total) last.raise();
  };
  procpool::pool p(job, o);
  std::vector<procpool::future<int>> fs;
  fs.push_back(p.submit(-3));  // holds the one worker: no task ends before all are submitted
  for (int i = 1; i < 20; ++i) fs.push_back(p.submit(i == 3 ? 4 : i));
  gate.give();
  REQUIRE(last.wait());
  for (auto& f : fs) (void)f.get();
  // Not held while calling the pool: on_progress takes it under the pool's lock.
  std::lock_guard<std::mutex> lock(m);
  REQUIRE_FALSE(seen.empty());
  CHECK(seen.back().done == 20);
  CHECK(seen.back().total == 20);
  for (std::size_t k = 1; k < seen.size(); ++k) CHECK(seen[k].done > seen[k - 1].done);
}

TEST_CASE("a batch's count before its long last task is reported while that task runs",
          "[async][progress]") {
  // Task -3 runs until the callback has seen every other task done. Those
  // end within a tenth of a second of each other, so their last count is
  // held back at first; it must still come while task -3 waits.
  drain_reports();
  constexpr int n = 200;
  signal_flag all_but_one;
  procpool::pool_options o;
  o.workers = 2;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (info.done == n - 1) all_but_one.raise();
  };
  procpool::pool p(job, o);
  std::vector<procpool::future<int>> fs;
  fs.push_back(p.submit(-3));
  for (int i = 1; i < n; ++i) fs.push_back(p.submit(i == 3 ? 4 : i));
  bool reported = all_but_one.wait();
  gate.give();  // task -3 returns either way: a missing report fails, not hangs
  REQUIRE(reported);
  CHECK(fs[0].get() == -6);
  for (int i = 1; i < n; ++i) CHECK(fs[std::size_t(i)].get() == 2 * (i == 3 ? 4 : i));
}

TEST_CASE("callbacks as concurrent.futures' tests have them: cancelled, several, one raising",
          "[async]") {
  SECTION("a cancelled task's error callback gets task_cancelled") {
    drain_reports();
    procpool::pool p(job, 1);
    auto held = p.submit(-3);   // the one worker
    auto queued = p.submit(1);  // in its ring
    auto unsent = p.submit(2);  // not sent
    std::promise<std::exception_ptr> error;
    unsent.then([](int) {}, [&](const std::exception_ptr& e) { error.set_value(e); });
    REQUIRE(unsent.cancel());
    auto got = error.get_future();
    REQUIRE(got.wait_for(30s) == std::future_status::ready);
    CHECK_THROWS_AS(std::rethrow_exception(got.get()), procpool::task_cancelled);
    CHECK_THROWS_AS(unsent.get(), procpool::task_cancelled);
    gate.give();
    CHECK(held.get() == -6);
    CHECK(queued.get() == 2);
  }
  SECTION("several callbacks on one future run in order; one that raises stops none") {
    drain_reports();
    procpool::pool p(job, 1);
    std::mutex m;
    std::vector<int> order;
    auto f = p.submit(-3);
    std::string err = procpool_test::capture_stderr([&] {
      f.then([&](int) {
        std::lock_guard<std::mutex> lock(m);
        order.push_back(1);
      });
      f.then([&](int) { throw std::logic_error("second raises"); });
      f.then([&](int) {
        std::lock_guard<std::mutex> lock(m);
        order.push_back(3);
      });
      gate.give();
      CHECK(f.get() == -6);
    });
    std::lock_guard<std::mutex> lock(m);
    CHECK(order == std::vector<int>{1, 3});
    CHECK_THAT(err, Contains("second raises"));
  }
  SECTION("then on a task already failed, cancelled or cut short by terminate runs at once") {
    procpool::pool p(job, 1);
    auto failed = p.submit(3);
    REQUIRE(failed.wait_for(30s));
    std::exception_ptr e1;
    failed.then([](int) {}, [&](const std::exception_ptr& e) { e1 = e; });
    CHECK_THROWS_AS(std::rethrow_exception(e1), procpool::task_error);
    auto held = p.submit(-3);
    p.terminate();
    std::exception_ptr e2;
    held.then([](int) {}, [&](const std::exception_ptr& e) { e2 = e; });
    CHECK_THROWS_AS(std::rethrow_exception(e2), procpool::pool_closed);
    CHECK_THROWS_AS(p.map_async(std::vector<int>{1}), procpool::pool_closed);
    procpool::future<int> empty;
    CHECK_THROWS_AS(empty.then([](int) {}), procpool::error);
  }
}

TEST_CASE("the fork server killed under tasks with callbacks: every callback gets the error",
          "[async][fork_server]") {
  drain_reports();
  procpool::pool p(job, 1);
  auto held = p.submit(-3);   // the one worker, until it dies
  auto queued = p.submit(1);  // in its ring
  auto unsent = p.submit(2);  // never sent: the pool breaks first
  std::promise<std::exception_ptr> error;
  unsent.then([](int) {}, [&](const std::exception_ptr& e) { error.set_value(e); });
  pid_t server = procpool_test::parent_of(p.pids().at(0));
  REQUIRE(server > 0);
  REQUIRE(::kill(server, SIGKILL) == 0);
  auto got = error.get_future();
  REQUIRE(got.wait_for(30s) == std::future_status::ready);
  CHECK_THROWS_AS(std::rethrow_exception(got.get()), procpool::error);
  CHECK_THROWS_AS(unsent.get(), procpool::error);
  CHECK_THROWS_AS(held.get(), procpool::error);
}
