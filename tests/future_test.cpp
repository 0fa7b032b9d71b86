// Futures as Python's: done(), cancel(), exception(), and the free functions
// procpool::wait(futures, return_when, timeout) and as_completed(futures),
// which drive the pools of the futures from the calling thread.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::return_when;

namespace future_test {
int square(int x) {
  return x * x;
}
/// Opened before any pool, so every worker holds it: `give()` lets one
/// `picky(-3)` return.
procpool_test::go_signal gate;
/// Fails for 3; blocks until killed for -1; kills its own worker for -2;
/// waits for `gate` for -3.
int picky(int x) {
  if (x == 3) throw std::domain_error("three");
  if (x == -1) procpool_test::block_forever();
  if (x == -2) ::raise(SIGKILL);
  if (x == -3) return gate.await() ? x : 0;
  return x;
}
}  // namespace future_test

using namespace future_test;

TEST_CASE("cancel: true before the task is sent, false after, twice, get raises", "[future]") {
  // The helper thread sends tasks at once: with the one worker busy and a
  // second task in its ring (two chunks per worker), a third stays unsent.
  procpool::pool p(picky, 1);
  auto sent = p.submit(2);
  REQUIRE(sent.wait_for(10s));
  auto held = p.submit(-3);
  auto queued = p.submit(5);
  auto unsent = p.submit(3);
  auto other = p.submit(4);
  CHECK_FALSE(unsent.done());
  CHECK(unsent.cancel());
  CHECK(unsent.cancel());  // again: still cancelled (Python returns True)
  CHECK(unsent.cancelled());
  CHECK(unsent.done());
  CHECK_THROWS_AS(unsent.get(), procpool::task_cancelled);
  CHECK_THROWS_AS(unsent.exception(), procpool::task_cancelled);
  CHECK_FALSE(sent.cancel());  // done
  CHECK_FALSE(sent.cancelled());
  gate.give();
  CHECK(held.get() == -3);
  CHECK(queued.get() == 5);
  CHECK(other.get() == 4);  // the cancelled task never held up the others
  CHECK_FALSE(other.cancel());
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{1, 2});
  procpool::future<int> empty;
  CHECK_THROWS_AS(empty.cancel(), procpool::error);
}

TEST_CASE("cancel after terminate() is false: the task ended with pool_closed", "[future]") {
  procpool::pool p(square, 1);
  auto f = p.submit(5);
  p.terminate();
  CHECK(f.done());
  CHECK_FALSE(f.cancel());
  CHECK_THROWS_AS(f.get(), procpool::pool_closed);
}

TEST_CASE("exception() waits, returns the error or null, and leaves the result", "[future]") {
  procpool::pool p(picky, 2);
  auto good = p.submit(7);
  auto bad = p.submit(3);
  CHECK(good.exception() == nullptr);
  CHECK(good.get() == 7);
  auto e = bad.exception();
  REQUIRE(e);
  CHECK_THROWS_AS(std::rethrow_exception(e), procpool::task_error);
  CHECK(bad.exception() != nullptr);  // again
  CHECK_THROWS_AS(bad.get(), procpool::task_error);
}

TEST_CASE("wait on an empty list returns at once", "[future][wait]") {
  std::vector<procpool::future<int>> none;
  auto r = procpool::wait(none, return_when::first_completed, 1h);
  CHECK(r.done.empty());
  CHECK(r.not_done.empty());
}

TEST_CASE("wait: all_completed, first_completed, first_exception, timeout", "[future][wait]") {
  procpool::pool p(picky, 2);
  SECTION("all_completed") {
    std::vector<procpool::future<int>> fs;
    for (int i = 0; i < 6; ++i) fs.push_back(p.submit(i == 3 ? 4 : i));
    auto r = procpool::wait(fs);
    CHECK(r.done.size() == 6);
    CHECK(r.not_done.empty());
    CHECK(fs[5].get() == 5);
  }
  SECTION("first_completed with one task that never ends") {
    std::vector<procpool::future<int>> fs;
    fs.push_back(p.submit(-1));
    fs.push_back(p.submit(8));
    auto r = procpool::wait(fs, return_when::first_completed);
    CHECK(r.done == std::vector<std::size_t>{1});
    CHECK(r.not_done == std::vector<std::size_t>{0});
    auto t = procpool::wait(fs, return_when::all_completed, 50ms);
    CHECK(t.not_done == std::vector<std::size_t>{0});
    p.terminate();
  }
  SECTION("first_exception returns at the failure, before a task that never ends") {
    std::vector<procpool::future<int>> fs;
    fs.push_back(p.submit(-1));
    fs.push_back(p.submit(3));
    auto r = procpool::wait(fs, return_when::first_exception);
    CHECK(r.done == std::vector<std::size_t>{1});
    CHECK(fs[1].exception() != nullptr);
    p.terminate();
  }
  SECTION("first_exception ignores cancelled tasks") {
    procpool::pool one(picky, 1);
    std::vector<procpool::future<int>> fs;
    fs.push_back(one.submit(-3));  // runs until the gate opens
    fs.push_back(one.submit(1));   // waits in the worker's ring
    fs.push_back(one.submit(2));   // not sent yet
    CHECK(fs[2].cancel());
    gate.give();
    auto r = procpool::wait(fs, return_when::first_exception);
    CHECK(r.done.size() == 3);
    CHECK(fs[0].get() == -3);
    CHECK(fs[1].get() == 1);
  }
}

TEST_CASE("wait on futures of two pools, and on one whose worker died", "[future][wait]") {
  procpool::pool a(picky, 1);
  procpool::executor b(1);
  std::vector<procpool::future<int>> fs;
  fs.push_back(a.submit(-2));  // its worker dies
  fs.push_back(b.submit(&square, 9));
  fs.push_back(a.submit(4));
  auto r = procpool::wait(fs);
  CHECK(r.done.size() == 3);
  CHECK_THROWS_AS(fs[0].get(), procpool::worker_died);
  CHECK(fs[1].get() == 81);
  CHECK(fs[2].get() == 4);
}

TEST_CASE("as_completed yields every future once, as each is done", "[future][as_completed]") {
  procpool::pool p(picky, 2);
  std::vector<procpool::future<int>> fs;
  for (int i = 1; i <= 5; ++i) fs.push_back(p.submit(i));
  fs.push_back(p.submit(-1));  // never ends until the pool stops
  std::set<int> got;
  std::size_t seen = 0;
  for (auto& f : procpool::as_completed(fs)) {
    ++seen;
    if (&f == &fs[5]) {
      CHECK_THROWS_AS(f.get(), procpool::pool_closed);
      continue;
    }
    try {
      got.insert(f.get());
    } catch (const procpool::task_error&) {
      got.insert(-3);
    }
    if (got.size() == 5) p.terminate();  // ends the blocked task: it comes last, done
  }
  CHECK(seen == 6);
  CHECK(got == std::set<int>{-3, 1, 2, 4, 5});
  std::vector<procpool::future<int>> none;
  for (auto& f : procpool::as_completed(none)) (void)f;
}

TEST_CASE("as_completed over futures of a pool destroyed mid-iteration", "[future][as_completed]") {
  auto p = std::make_unique<procpool::pool<int (*)(int)>>(picky, 1);
  std::vector<procpool::future<int>> fs;
  fs.push_back(p->submit(1));
  fs.push_back(p->submit(2));
  fs.push_back(p->submit(4));
  std::size_t seen = 0;
  for (auto& f : procpool::as_completed(fs)) {
    ++seen;
    if (seen == 1) {
      CHECK(f.get() == 1);
      p.reset();  // waits for the rest: they are done when yielded
    } else {
      CHECK(f.done());
    }
  }
  CHECK(seen == 3);
  CHECK(fs[2].get() == 4);
}

TEST_CASE("wait and cancel from a forked child touch nothing of the parent's pool",
          "[future][fork]") {
  // Forked while the pool's helper thread runs: the child's copy of the
  // pool must neither wait on its lock nor touch the workers. The first
  // task holds the one worker, so the futures are still pending in the copy.
  procpool::pool p(picky, 1);
  auto f = p.submit(-3);
  std::vector<procpool::future<int>> fs;
  fs.push_back(p.submit(4));
  pid_t child = procpool_test::spawn([&] {
    int code = 0;
    try {
      (void)procpool::wait(fs);
      code = 1;  // a wait in the child must refuse
    } catch (const procpool::error&) {
    }
    try {
      (void)f.cancel();
    } catch (const procpool::error&) {
    }
    return code;
  });
  CHECK(procpool_test::reap(child) == procpool::exit_status::exited(0));
  gate.give();
  CHECK(f.get() == -3);
  CHECK(fs[0].get() == 4);
}

TEST_CASE("wait and as_completed from a second thread while the first waits in get()",
          "[future][thread]") {
  procpool::pool p(picky, 2);
  auto stuck = p.submit(-1);  // never ends until the pool stops
  std::atomic<bool> first_saw_closed{false};
  std::thread first([&] {
    try {
      (void)stuck.get();
    } catch (const procpool::pool_closed&) {
      first_saw_closed = true;
    }
  });
  // The first thread sleeps in get() with the pool released: this thread's
  // waits go through, and are served by the other worker.
  std::vector<procpool::future<int>> fs;
  fs.push_back(p.submit(4));
  fs.push_back(p.submit(5));
  auto r = procpool::wait(fs, return_when::all_completed, 20s);
  CHECK(r.done == std::vector<std::size_t>{0, 1});
  std::vector<int> order;
  fs.push_back(p.submit(6));
  for (auto& f : procpool::as_completed(fs)) order.push_back(f.get());
  std::sort(order.begin(), order.end());
  CHECK(order == std::vector<int>{4, 5, 6});
  p.terminate();  // from this thread: the first thread's get() ends
  first.join();
  CHECK(first_saw_closed);
}
