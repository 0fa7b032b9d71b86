// Python's API on the executor and the pool: apply, starmap, imap,
// imap_unordered and zipped map on the executor, per-call chunk sizes, shutdown(wait,
// cancel_futures), the destructor's exit policy.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <support/support.hpp>

#include <catch2/catch.hpp>
#include <list>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

using Catch::Matchers::Contains;

namespace executor_test {

int square(int x) {
  return x * x;
}
int add(int a, int b) {
  return a + b;
}
std::string repeat(std::string s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}
int fail_on_three(int x) {
  if (x == 3) throw std::domain_error("three");
  return x;
}
/// Opened before any pool, so every worker holds it: `give()` lets one
/// `gated` call return.
procpool_test::go_signal gate;
int gated(int x) {
  return gate.await() ? x : 0;
}
/// The gate of the pool a test of shutdown after short tasks makes: opened
/// by the test before its pool, so that its leftover `give()`s release no
/// other test's tasks.
procpool_test::go_signal* late_gate = nullptr;
int late_gated(int x) {
  return late_gate->await() ? x : 0;
}

/// An executor of 2 workers that ran 3000 short tasks back to back (so it
/// queues many in each worker's ring), then was given 20 `late_gated` ones.
struct deep_queue {
  procpool_test::go_signal gate;
  std::optional<procpool::executor> ex;
  std::vector<procpool::future<int>> held;
  deep_queue() {
    late_gate = &gate;
    ex.emplace(2);
    std::vector<procpool::future<int>> warm;
    for (int i = 0; i < 3000; ++i) warm.push_back(ex->submit(&square, i));
    for (auto& f : warm) REQUIRE(f.get() >= 0);
    for (int i = 0; i < 20; ++i) held.push_back(ex->submit(&late_gated, i));
  }
  /// Opens the gate for every task (more than ever wait: none blocks).
  void open() {
    for (int i = 0; i < 20; ++i) gate.give();
  }
  /// Opens the gate, then counts the tasks that ran and those cancelled.
  std::pair<int, int> outcome() {
    open();
    return count();
  }
  /// Waits for every task: how many ran, how many were cancelled.
  std::pair<int, int> count() {
    int ran = 0, cancelled = 0;
    for (int i = 0; i < 20; ++i) {
      auto& f = held[std::size_t(i)];
      try {
        int v = f.get();  // (outside CHECK, which would catch what it throws)
        CHECK(v == i);
        ++ran;
      } catch (const procpool::task_cancelled&) {
        CHECK(f.cancelled());
        ++cancelled;
      }
    }
    return {ran, cancelled};
  }
};
/// The worker's pid, to count chunks.
int pid_of(int) {
  return static_cast<int>(::getpid());
}
int pid_of2(int, int) {
  return static_cast<int>(::getpid());
}

}  // namespace executor_test

using namespace executor_test;

TEST_CASE("apply runs one call and waits for it, on pool and executor, as Python's apply",
          "[executor][pool]") {
  procpool::executor ex(2);
  CHECK(ex.apply(&add, 2, 3) == 5);
  CHECK(ex.apply(&repeat, std::string("ab"), 3) == "ababab");
  CHECK_THROWS_AS(ex.apply(&fail_on_three, 3), procpool::task_error);
  CHECK(ex.apply(&square, 7) == 49);  // usable after the error
  procpool::pool p(add, 1u);
  CHECK(p.apply(20, 22) == 42);
  p.close();
  CHECK_THROWS_AS(p.apply(1, 1), procpool::pool_closed);
}

TEST_CASE("executor::starmap calls with each tuple's elements", "[executor]") {
  procpool::executor ex(2);
  std::vector<std::tuple<int, int>> pairs{{1, 2}, {3, 4}, {5, 6}};
  CHECK(ex.starmap(&add, pairs) == std::vector<int>{3, 7, 11});
  std::vector<std::pair<std::string, int>> reps{{"ab", 2}, {"c", 3}};
  CHECK(ex.starmap(&repeat, reps) == std::vector<std::string>{"abab", "ccc"});
  CHECK(ex.starmap(&add, std::vector<std::tuple<int, int>>{}).empty());
}

TEST_CASE("executor::map over several ranges zips them and stops at the shortest", "[executor]") {
  procpool::executor ex(2);
  std::vector<int> xs{1, 2, 3, 4};
  std::list<int> ys{10, 20, 30};  // not contiguous, shorter
  CHECK(ex.map(&add, xs, ys) == std::vector<int>{11, 22, 33});
  CHECK(ex.map(&add, ys, xs) == std::vector<int>{11, 22, 33});
  CHECK(ex.map(&add, xs, std::vector<int>{}).empty());
  std::vector<std::string> ss{"x", "y"};
  CHECK(ex.map(&repeat, ss, xs) == std::vector<std::string>{"x", "yy"});
  // One range, as before.
  CHECK(ex.map(&square, xs) == std::vector<int>{1, 4, 9, 16});
  // A captureless lambda over two ranges.
  CHECK(ex.map([](int a, int b) { return a * b; }, xs, xs, procpool::map_options{2}) ==
        std::vector<int>{1, 4, 9, 16});
}

TEST_CASE("executor::imap and imap_unordered, over lvalues and rvalues", "[executor]") {
  procpool::executor ex(2);
  std::vector<int> xs(100);
  for (int i = 0; i < 100; ++i) xs[std::size_t(i)] = i;
  std::vector<int> got;
  for (int r : ex.imap(&square, xs)) got.push_back(r);
  REQUIRE(got.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(got[std::size_t(i)] == i * i);

  std::set<std::size_t> seen;
  for (auto [i, r] : ex.imap_unordered(&square, std::vector<int>(xs), {7})) {
    CHECK(r == int(i * i));
    seen.insert(i);
  }
  CHECK(seen.size() == 100);

  // An error comes through iteration, after the results before it.
  std::vector<int> before;
  CHECK_THROWS_AS(
      [&] {
        for (int r : ex.imap(&fail_on_three, std::vector<int>{1, 2, 3, 4})) before.push_back(r);
      }(),
      procpool::task_error);
  CHECK(before == std::vector<int>{1, 2});
  CHECK(ex.map(&square, {3}) == std::vector<int>{9});
}

TEST_CASE("a per-call chunk size is honoured by pool and executor", "[executor][pool]") {
  // Two idle workers: the first chunks go one to each. A call cut into one
  // chunk runs in one worker; cut into chunks of one item, in both.
  auto pids = [](const std::vector<int>& r) { return std::set<int>(r.begin(), r.end()).size(); };
  // A worker still owing the answers to chunks the last call took back from
  // it (it was slow to wake) gets nothing new until it gave them: the next
  // call may then run in the other alone. So a call of single items is
  // made up to five times; a chunk size not honoured (one chunk of eight)
  // uses one worker every time.
  auto spread = [&](auto&& call) {
    for (int attempt = 0; attempt < 5; ++attempt)
      if (pids(call()) == 2) return true;
    return false;
  };
  std::vector<int> xs(8, 0);
  procpool::pool_options whole;
  whole.workers = 2;
  whole.chunk_size = 8;  // the pool's default: one chunk
  procpool::pool_options single = whole;
  single.chunk_size = 1;  // the pool's default: chunks of one

  procpool::pool p(pid_of, whole);
  CHECK(pids(p.map(xs)) == 1);
  CHECK(spread([&] { return p.map(xs, {1}); }));
  CHECK(spread([&] {
    std::vector<int> imapped;
    for (int r : p.imap(xs, {1})) imapped.push_back(r);
    return imapped;
  }));
  CHECK(spread([&] {
    std::vector<int> unordered;
    for (auto [i, r] : p.imap_unordered(xs, {1})) unordered.push_back(r);
    return unordered;
  }));
  procpool::pool star([](int a, int b) { return static_cast<int>(::getpid()) + a - b; }, whole);
  CHECK(spread([&] { return star.starmap(std::vector<std::pair<int, int>>(8, {1, 1}), {1}); }));

  procpool::pool q(pid_of, single);
  CHECK(pids(q.map(xs, {8})) == 1);
  std::vector<int> one;
  for (int r : q.imap(xs, {8})) one.push_back(r);
  CHECK(pids(one) == 1);

  procpool::executor ex(single);
  CHECK(pids(ex.map(&pid_of, xs, procpool::map_options{8})) == 1);
  CHECK(pids(ex.map(&pid_of2, xs, xs, procpool::map_options{8})) == 1);
  std::vector<int> ex_imapped;
  for (int r : ex.imap(&pid_of, xs, {8})) ex_imapped.push_back(r);
  CHECK(pids(ex_imapped) == 1);
  procpool::executor ex_whole(whole);
  CHECK(spread([&] { return ex_whole.map(&pid_of, xs, procpool::map_options{1}); }));
  CHECK(spread([&] {
    return ex_whole.starmap(&pid_of2, std::vector<std::pair<int, int>>(8, {1, 1}), {1});
  }));
}

TEST_CASE("shutdown(wait, cancel_futures) as Python's", "[executor]") {
  SECTION("cancel_futures: tasks not yet sent fail with task_cancelled; sent ones finish") {
    procpool::executor ex(1);
    auto first = ex.submit(&square, 2);
    CHECK(first.wait_for(std::chrono::seconds(10)));  // sent and done
    // The helper thread sends tasks at once: with the one worker held and a
    // second task in its ring (two per worker), the later ones stay unsent.
    auto held = ex.submit(&gated, 7);
    auto queued = ex.submit(&square, 8);
    std::vector<procpool::future<int>> later;
    for (int i = 0; i < 5; ++i) later.push_back(ex.submit(&square, i));
    ex.shutdown(false, true);
    gate.give();
    CHECK(first.get() == 4);
    CHECK(held.get() == 7);
    CHECK(queued.get() == 64);
    for (auto& f : later) {
      CHECK(f.cancelled());
      CHECK(f.done());
      CHECK_THROWS_AS(f.get(), procpool::task_cancelled);
    }
    CHECK_THROWS_AS(ex.submit(&square, 1), procpool::pool_closed);
  }
  SECTION("after short tasks, which let many wait in each worker, still two per worker run") {
    deep_queue q;
    q.ex->shutdown(false, true);
    // Two per worker were sent, as on a fresh pool; the rest never ran.
    CHECK(q.outcome() == std::pair<int, int>(4, 16));
  }
  SECTION("the same from a second thread, while the first waits on the futures") {
    deep_queue q;
    std::thread stopper([&q] {
      q.ex->shutdown(false, true);
      q.open();
    });
    auto counts = q.count();  // waits on the first task until the gate opens
    stopper.join();
    CHECK(counts == std::pair<int, int>(4, 16));
  }
  SECTION("from a forked child, it cancels nothing of the parent's") {
    deep_queue q;
    procpool::process child([&q] {
      // It closes the child's copy of the executor, or throws: either way
      // the parent's pool is left alone (its shared rings included).
      try {
        q.ex->shutdown(false, true);
      } catch (const procpool::error&) {
      }
      procpool::exit_process(0);
    });
    CHECK(child.join() == procpool::exit_status::exited(0));
    CHECK(q.outcome() == std::pair<int, int>(20, 0));
  }
  SECTION("without cancel_futures every pending task still runs") {
    procpool::executor ex(2);
    std::vector<procpool::future<int>> fs;
    for (int i = 0; i < 5; ++i) fs.push_back(ex.submit(&square, i));
    ex.shutdown();
    for (int i = 0; i < 5; ++i) CHECK(fs[std::size_t(i)].get() == i * i);
  }
  SECTION("wait = false returns at once; the futures still complete") {
    procpool::executor ex(2);
    auto f = ex.submit(&square, 6);
    ex.shutdown(false);
    CHECK_THROWS_AS(ex.submit(&square, 1), procpool::pool_closed);
    CHECK(f.get() == 36);
  }
  SECTION("twice, and after terminate") {
    procpool::executor ex(1);
    ex.shutdown();
    CHECK_NOTHROW(ex.shutdown(true, true));
    procpool::executor ex2(1);
    ex2.terminate();
    CHECK_NOTHROW(ex2.shutdown(true, true));
  }
}

TEST_CASE("exit_policy::terminate stops at once, the default waits", "[pool]") {
  std::optional<procpool::future<int>> pending;
  pid_t worker = 0;
  {
    procpool::pool_options o;
    o.workers = 1;
    o.on_exit = procpool::exit_policy::terminate;
    procpool::pool p(
        [](int) -> int {
          procpool_test::block_forever();
          return 0;
        },
        o);
    worker = p.pids().at(0);
    pending.emplace(p.submit(1));
    CHECK_FALSE(pending->wait_for(std::chrono::milliseconds(20)));
  }  // would wait forever with exit_policy::wait
  CHECK(procpool_test::gone_within(worker, std::chrono::seconds(5)));
  CHECK_THROWS_AS(pending->get(), procpool::pool_closed);

  procpool::future<int> waited;
  {
    procpool::pool p(square, 1);
    waited = p.submit(7);
  }
  CHECK(waited.get() == 49);
}
