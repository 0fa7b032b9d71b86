// The fork server: every worker, first or replacement, is forked from a copy
// of the program made with the pool, so the parent may change its globals and
// run threads without the workers seeing either; and what happens when the
// server itself is killed, or the program ignores SIGCHLD.
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <sys/types.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::pool;

using procpool_test::parent_of;

namespace {

int generation = 1;    // changed by the parent after the pool is made
std::mutex held_lock;  // held by a parent thread while a worker is replaced

}  // namespace

TEST_CASE("a replacement worker is the program as it was when the pool was made", "[fork_server]") {
  generation = 1;
  pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        return generation;
      },
      1u);
  generation = 2;  // after the pool: no worker may see it
  CHECK(p.map(std::vector<int>{0, 0}) == std::vector<int>{1, 1});
  auto before = p.pids();
  CHECK_THROWS_AS(p.map(std::vector<int>{-1}), procpool::worker_died);
  auto after = p.pids();
  REQUIRE(after.size() == 1);
  CHECK(after[0] != before[0]);
  CHECK(p.map(std::vector<int>{0, 0, 0}) == std::vector<int>{1, 1, 1});
  generation = 1;
}

TEST_CASE("a worker replaced while a parent thread holds a lock the function takes",
          "[fork_server]") {
  // A worker forked from the parent now would start with the lock held, and
  // wait for it forever; one forked from the server starts with it free.
  pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        std::lock_guard<std::mutex> hold(held_lock);
        return x + 1;
      },
      1u);
  std::mutex m;
  std::condition_variable cv;
  bool locked = false, release = false;
  std::thread holder([&] {
    std::lock_guard<std::mutex> hold(held_lock);
    std::unique_lock<std::mutex> lk(m);
    locked = true;
    cv.notify_all();
    cv.wait(lk, [&] { return release; });
  });
  {
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return locked; });
  }
  CHECK_THROWS_AS(p.map(std::vector<int>{-1}), procpool::worker_died);
  auto f = p.submit(41);
  auto got = f.get_for(20s);
  {
    std::lock_guard<std::mutex> lk(m);
    release = true;
  }
  cv.notify_all();
  holder.join();
  REQUIRE(got.has_value());  // not a deadlocked replacement
  CHECK(*got == 42);
}

TEST_CASE("workers are the fork server's children, and the server is the owner's",
          "[fork_server]") {
  auto children = procpool_test::child_count();
  {
    pool p([](int x) { return x; }, 3u);
    auto pids = p.pids();
    REQUIRE(pids.size() == 3);
    pid_t server = parent_of(pids[0]);
    CHECK(server != ::getpid());
    CHECK(parent_of(server) == ::getpid());
    for (pid_t w : pids) CHECK(parent_of(w) == server);
    CHECK(procpool_test::child_count() == children + 1);  // the server alone
  }
  CHECK(procpool_test::child_count() == children);
}

TEST_CASE("the fork server killed: calls fail naming it, nothing hangs, nothing is left",
          "[fork_server]") {
  auto children = procpool_test::child_count();
  {
    pool p([](int x) { return x * 2; }, 2u);
    CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{2, 4});
    auto workers = p.pids();
    pid_t server = parent_of(workers[0]);
    REQUIRE(server > 0);
    REQUIRE(::kill(server, SIGKILL) == 0);
    // The workers die with it; the next call learns why.
    for (pid_t w : workers) CHECK(procpool_test::gone_within(w, 5000ms));
    std::string what;
    try {
      auto f = p.submit(3);
      auto got = f.get_for(20s);
      if (!got) what = "hang";
    } catch (const procpool::worker_died& e) {
      what = e.what();  // a call in flight when the workers died may see that first
      try {
        (void)p.map(std::vector<int>{1});
      } catch (const procpool::error& again) {
        what = again.what();
      }
    } catch (const procpool::error& e) {
      what = e.what();
    }
    CHECK_THAT(what, Catch::Contains("fork server") && Catch::Contains(std::to_string(server)));
    CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::error);
  }
  CHECK(procpool_test::child_count() == children);
}

TEST_CASE("a program that ignores SIGCHLD still learns how its workers died", "[fork_server]") {
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGCHLD, &ignore, &old);
  std::string what;
  {
    pool p(
        [](int x) {
          if (x < 0) ::raise(SIGTERM);  // not SIGSEGV: sanitizers catch that one
          return x;
        },
        2u);
    try {
      (void)p.map(std::vector<int>{1, -1, 2});
    } catch (const procpool::worker_died& e) {
      what = e.what();
    }
    CHECK(p.map(std::vector<int>{3, 4}) == std::vector<int>{3, 4});
  }
  ::sigaction(SIGCHLD, &old, nullptr);
  CHECK_THAT(what, Catch::Contains("SIGTERM"));
}

TEST_CASE("workers keep the program's own SIGCHLD disposition", "[fork_server]") {
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGCHLD, &ignore, &old);
  bool ignored = false;
  {
    pool p(
        [](int) {
          struct sigaction now {};
          ::sigaction(SIGCHLD, nullptr, &now);
          return now.sa_handler == SIG_IGN;
        },
        1u);
    ignored = p.submit(0).get();
  }
  ::sigaction(SIGCHLD, &old, nullptr);
  CHECK(ignored);
}

TEST_CASE("a pool made in a forked child gets a fork server of its own", "[fork_server][fork]") {
  pool outer([](int x) { return x; }, 1u);
  procpool::process child([] {
    bool ok = false;
    {
      pool inner([](int x) { return x + 1; }, 2u);
      ok = inner.map(std::vector<int>{1, 2}) == std::vector<int>{2, 3};
      pid_t server = parent_of(inner.pids()[0]);
      ok = ok && parent_of(server) == ::getpid();
    }
    procpool::exit_process(ok && procpool_test::no_children_left() ? 0 : 1);
  });
  auto status = child.join_for(30s);
  if (!status) child.kill();
  REQUIRE(status.has_value());
  CHECK(*status == procpool::exit_status::exited(0));
  CHECK(outer.map(std::vector<int>{5}) == std::vector<int>{5});
}
