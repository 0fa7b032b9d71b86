// sync.hpp: mutex, recursive_mutex, semaphore, event and barrier shared by
// forked processes — exact totals under contention, robust recovery from a
// holder killed with SIGKILL, timeouts, a barrier participant that dies — and
// the same objects shared by threads, so that TSan checks what it can see.
//
// Children never use Catch2: they report through their exit code (0 = good),
// and the parent asserts.
#include <procpool/detail/fork.hpp>
#include <procpool/shared.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <dirent.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <mutex>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;

namespace {

using procpool_test::all_succeeded;
using procpool_test::block_forever;
using procpool_test::go_signal;
using procpool_test::open_fd_count;
using procpool_test::reap;
using procpool_test::spawn;

/// True when this process has no child left to reap (no zombies, none running).
bool no_children_left() {
  int status = 0;
  return ::waitpid(-1, &status, WNOHANG) == -1 && errno == ECHILD;
}

pid_t this_tid() {
  return static_cast<pid_t>(::syscall(SYS_gettid));
}

constexpr int workers = 4;

}  // namespace

// ---------------------------------------------------------------------------
// Across processes

TEST_CASE("mutex gives an exact total under contention from 4 processes", "[sync][fork]") {
  constexpr long per_child = 100000;
  procpool::mutex m;
  procpool::shared_value<long> total;  // updated by a plain load + store: only the lock protects it
  procpool::event go;                  // starts all children together, for real contention
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      for (long k = 0; k < per_child; ++k) {
        std::lock_guard<procpool::mutex> hold(m);
        total.store(total.load() + 1);
      }
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(total.load() == workers * per_child);
}

TEST_CASE("recursive_mutex gives an exact total with nested locking from 4 processes",
          "[sync][fork]") {
  constexpr long per_child = 50000;
  procpool::recursive_mutex m;
  procpool::shared_value<long> total;
  procpool::event go;  // starts all children together, for real contention
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      for (long k = 0; k < per_child; ++k) {
        std::lock_guard<procpool::recursive_mutex> outer(m);
        std::unique_lock<procpool::recursive_mutex> inner(m);  // the holder takes it again
        if (!m.try_lock()) return 1;                           // and again, without waiting
        total.store(total.load() + 1);
        m.unlock();
      }
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(total.load() == workers * per_child);
}

TEST_CASE("semaphore(1) used as a lock gives an exact total from 4 processes", "[sync][fork]") {
  constexpr long per_child = 100000;
  procpool::semaphore s(1);
  procpool::shared_value<long> total;
  procpool::event go;  // starts all children together, for real contention
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      for (long k = 0; k < per_child; ++k) {
        s.acquire();
        total.store(total.load() + 1);
        s.release();
      }
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(total.load() == workers * per_child);
  REQUIRE(s.value() == 1);
}

TEST_CASE("semaphore bounds how many processes hold it at once", "[sync][fork]") {
  constexpr int units = 2;
  constexpr int rounds = 2000;
  procpool::semaphore s(units);
  procpool::shared_value<int> inside;
  procpool::shared_value<int> most;
  procpool::shared_value<long> entries;
  procpool::event go;  // starts all children together, for real contention
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      for (int r = 0; r < rounds; ++r) {
        s.acquire();
        int now = inside.fetch_add(1) + 1;
        int seen = most.load();
        while (now > seen && !most.compare_exchange(seen, now)) {
        }
        entries.fetch_add(1);
        for (int y = 0; y < 3; ++y) std::this_thread::yield();  // stay a little, to overlap
        inside.fetch_sub(1);
        s.release();
      }
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  INFO("most holders seen at once: " << most.load());
  REQUIRE(most.load() <= units);
  REQUIRE(most.load() >= 1);
  REQUIRE(entries.load() == long{workers} * rounds);
  REQUIRE(s.value() == units);
}

TEST_CASE("a holder killed inside the critical section does not wedge the mutex (x100)",
          "[sync][fork]") {
  procpool::mutex m;
  procpool::shared_value<long> counter;     // the data the lock guards
  procpool::shared_value<int> in_progress;  // 1 while an update is half done
  long expected = 0;
  for (int round = 0; round < 100; ++round) {
    go_signal holding;
    pid_t victim = spawn([&] {
      m.lock();
      in_progress.store(1);
      counter.store(counter.load() + 1000);  // a half-done update, never completed
      holding.give();
      block_forever();
      return 0;
    });
    REQUIRE(holding.await());
    ::kill(victim, SIGKILL);
    REQUIRE(reap(victim) == exit_status::killed(SIGKILL));

    std::unique_lock<procpool::mutex> hold(m);  // does not hang
    REQUIRE(m.owner_died());
    // Repair: undo the half-done update, then do the real one.
    REQUIRE(in_progress.load() == 1);
    counter.store(expected);
    in_progress.store(0);
    counter.store(counter.load() + 1);
    ++expected;
    hold.unlock();

    hold.lock();  // a normal handover now
    REQUIRE_FALSE(m.owner_died());
  }
  REQUIRE(counter.load() == 100);
  REQUIRE(no_children_left());
}

TEST_CASE("a process blocked in lock() gets the mutex when the holder is killed", "[sync][fork]") {
  procpool::mutex m;
  for (int round = 0; round < 20; ++round) {
    go_signal holding;
    pid_t holder = spawn([&] {
      m.lock();
      holding.give();
      block_forever();
      return 0;
    });
    REQUIRE(holding.await());
    pid_t waiter = spawn([&] {
      std::lock_guard<procpool::mutex> hold(m);  // blocks until the holder dies
      return m.owner_died() ? 0 : 1;
    });
    ::kill(holder, SIGKILL);
    REQUIRE(reap(holder).is_signaled());
    REQUIRE(reap(waiter) == exit_status::exited(0));
  }
  REQUIRE(m.try_lock());
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
}

TEST_CASE("recursive_mutex recovers from a holder killed at depth 3", "[sync][fork]") {
  procpool::recursive_mutex m;
  for (int round = 0; round < 20; ++round) {
    go_signal holding;
    pid_t victim = spawn([&] {
      m.lock();
      m.lock();
      m.lock();
      holding.give();
      block_forever();
      return 0;
    });
    REQUIRE(holding.await());
    ::kill(victim, SIGKILL);
    REQUIRE(reap(victim).is_signaled());
    m.lock();
    REQUIRE(m.owner_died());
    m.lock();  // nested: still the same holding
    REQUIRE(m.owner_died());
    m.unlock();
    m.unlock();  // depth back to 0: released for good
    pid_t other = spawn([&] {
      if (!m.try_lock()) return 1;
      int code = m.owner_died() ? 2 : 0;
      m.unlock();
      return code;
    });
    REQUIRE(reap(other) == exit_status::exited(0));
  }
}

TEST_CASE("timed waits time out promptly", "[sync][fork]") {
  procpool::mutex m;
  procpool::recursive_mutex rm;
  go_signal holding;
  go_signal release;
  pid_t holder = spawn([&] {
    std::scoped_lock both(m, rm);
    holding.give();
    release.await();
    return 0;
  });
  REQUIRE(holding.await());

  auto timed = [](auto&& attempt) {
    auto start = std::chrono::steady_clock::now();
    bool got = static_cast<bool>(attempt());
    auto took = std::chrono::steady_clock::now() - start;
    CHECK_FALSE(got);
    CHECK(took >= 50ms);
    CHECK(took < 50ms + 3s);  // generous: the machine is shared
  };
  timed([&] { return m.try_lock_for(50ms); });
  timed([&] { return m.try_lock_until(std::chrono::steady_clock::now() + 50ms); });
  timed([&] { return m.try_lock_until(std::chrono::system_clock::now() + 50ms); });
  timed([&] { return rm.try_lock_for(50ms); });
  CHECK_FALSE(m.try_lock());
  CHECK_FALSE(rm.try_lock());

  procpool::semaphore none(0);
  timed([&] { return none.try_acquire_for(50ms); });
  timed([&] { return none.try_acquire_until(std::chrono::system_clock::now() + 50ms); });
  procpool::event never;
  timed([&] { return never.wait_for(50ms); });
  timed([&] { return never.wait_until(std::chrono::steady_clock::now() + 50ms); });
  procpool::barrier alone(2);
  timed([&] { return alone.arrive_and_wait_for(50ms); });
  CHECK(alone.waiting() == 0);  // the arrival was withdrawn

  release.give();
  REQUIRE(reap(holder) == exit_status::exited(0));
  // Free now: the timed calls succeed at once, however short the timeout.
  REQUIRE(m.try_lock_for(0ms));
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
  REQUIRE(rm.try_lock_for(10s));
  rm.unlock();
  // Huge timeouts do not overflow.
  REQUIRE(m.try_lock_for(std::chrono::nanoseconds::max()));
  m.unlock();
  REQUIRE(m.try_lock_until(std::chrono::system_clock::time_point::max()));
  m.unlock();
}

TEST_CASE("event: set() wakes waiters in other processes; clear() resets it", "[sync][fork]") {
  procpool::event go;
  procpool::semaphore started(0);
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      started.release();
      if (!go.wait_for(30s)) return 1;
      go.wait();  // set: returns at once
      return go.is_set() ? 0 : 2;
    }));
  }
  for (int i = 0; i < workers; ++i) started.acquire();
  REQUIRE_FALSE(go.is_set());
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(go.is_set());
  go.clear();
  REQUIRE_FALSE(go.is_set());
  REQUIRE_FALSE(go.wait_for(1ms));
}

TEST_CASE("barrier keeps 4 processes in lockstep through 20 phases", "[sync][fork]") {
  constexpr int phases = 20;
  procpool::barrier b(workers);
  procpool::shared_array<int> marks(phases * workers);
  std::vector<pid_t> kids;
  for (int rank = 0; rank < workers; ++rank) {
    kids.push_back(spawn([&, rank] {
      for (int p = 0; p < phases; ++p) {
        marks[static_cast<std::size_t>(p * workers + rank)] = p + 1;
        b.arrive_and_wait();
        for (int r = 0; r < workers; ++r) {
          // Everyone wrote this phase's mark before anyone got here...
          if (marks[static_cast<std::size_t>(p * workers + r)] != p + 1) return 1;
          // ...and nobody can be two phases ahead: they would need our arrival.
          if (p + 2 < phases && marks[static_cast<std::size_t>((p + 2) * workers + r)] != 0) {
            return 2;
          }
        }
      }
      return 0;
    }));
    b.enroll(kids.back());
  }
  REQUIRE(all_succeeded(kids));
  REQUIRE_FALSE(b.broken());
  for (int v : marks) REQUIRE(v != 0);
}

TEST_CASE("barrier breaks when a participant ends before arriving", "[sync][fork]") {
  // Three participants; the third ends after phase 0 (exiting normally, or
  // killed), and the other two wait for it in phase 1. It stays a zombie
  // (unreaped) while they wait: the barrier must still see it as gone.
  bool killed = GENERATE(false, true);
  CAPTURE(killed);
  procpool::barrier b(3);
  procpool::shared_array<int> caught(2);  // pid each survivor's broken_barrier named
  go_signal passed_phase_0;
  std::vector<pid_t> survivors;
  for (int i = 0; i < 2; ++i) {
    survivors.push_back(spawn([&, i] {
      b.arrive_and_wait();
      try {
        b.arrive_and_wait();
      } catch (const procpool::broken_barrier& e) {
        caught[static_cast<std::size_t>(i)] = e.pid();
        return e.why() == procpool::broken_barrier::reason::participant_died ? 0 : 3;
      }
      return 1;
    }));
  }
  pid_t leaver = spawn([&] {
    b.arrive_and_wait();
    passed_phase_0.give();
    if (killed) block_forever();
    return 0;
  });
  REQUIRE(passed_phase_0.await());
  if (killed) ::kill(leaver, SIGKILL);
  REQUIRE(all_succeeded(survivors));  // the leaver is reaped only after this
  CHECK(caught[0] == leaver);
  CHECK(caught[1] == leaver);
  REQUIRE(b.broken());
  REQUIRE_THROWS_AS(b.arrive_and_wait(), procpool::broken_barrier);
  reap(leaver);
}

TEST_CASE("barrier: an enrolled process that dies before its first arrival breaks it",
          "[sync][fork]") {
  procpool::barrier b(2);
  pid_t dead = spawn([] { return 5; });  // never touches the barrier
  b.enroll(dead);
  b.enroll(dead);  // known already: nothing changes
  try {
    b.arrive_and_wait();  // the dead child is still a zombie here
    FAIL("arrive_and_wait returned");
  } catch (const procpool::broken_barrier& e) {
    CHECK(e.pid() == dead);
    CHECK(e.why() == procpool::broken_barrier::reason::participant_died);
    CHECK_THAT(e.what(), Catch::Contains(std::to_string(dead)));
  }
  REQUIRE(reap(dead) == exit_status::exited(5));
}

TEST_CASE("barrier::abort() wakes every waiter with broken_barrier", "[sync][fork]") {
  procpool::barrier b(3);
  std::vector<pid_t> kids;
  for (int i = 0; i < 2; ++i) {
    kids.push_back(spawn([&] {
      try {
        b.arrive_and_wait();
      } catch (const procpool::broken_barrier& e) {
        return e.why() == procpool::broken_barrier::reason::aborted && e.pid() == 0 ? 0 : 2;
      }
      return 1;
    }));
  }
  while (b.waiting() < 2) std::this_thread::yield();  // both children wait now
  b.abort();
  REQUIRE(all_succeeded(kids));
  REQUIRE(b.broken());
  REQUIRE_THROWS_AS(b.arrive_and_wait_for(1s), procpool::broken_barrier);
  REQUIRE_THROWS_WITH(b.arrive_and_wait(), Catch::Contains("abort"));
}

TEST_CASE("barrier: a timed-out arrival is withdrawn and the barrier stays usable",
          "[sync][fork]") {
  procpool::barrier b(2);
  REQUIRE_FALSE(b.arrive_and_wait_for(20ms));  // alone: times out
  REQUIRE(b.waiting() == 0);
  REQUIRE_FALSE(b.broken());
  pid_t partner = spawn([&] { return b.arrive_and_wait_for(30s) ? 0 : 1; });
  b.enroll(partner);
  REQUIRE(b.arrive_and_wait_for(30s));
  REQUIRE(reap(partner) == exit_status::exited(0));
}

TEST_CASE("sync objects reject invalid arguments", "[sync]") {
  REQUIRE_THROWS_AS(procpool::barrier(0), procpool::error);
  REQUIRE_THROWS_AS(procpool::semaphore(-1), procpool::error);
  procpool::semaphore s(procpool::semaphore::max());
  REQUIRE_THROWS_AS(s.release(), procpool::error);
  REQUIRE_THROWS_AS(s.release(-1), procpool::error);
  REQUIRE(s.value() == procpool::semaphore::max());
  procpool::barrier one(1);
  one.arrive_and_wait();  // completes alone
  REQUIRE(one.arrive_and_wait_for(0ms));
  one.enroll(::getpid());  // this process's main thread: known already, nothing changes
  // Its one slot holds this thread, alive: no room for another participant.
  REQUIRE_THROWS_WITH(one.enroll(::getppid()), Catch::Contains("alive"));
}

TEST_CASE("sync objects leak no descriptors, mappings or children", "[sync][fork]") {
  auto fds = open_fd_count();
  for (int i = 0; i < 50; ++i) {
    procpool::mutex m;
    procpool::recursive_mutex rm;
    procpool::semaphore s(1);
    procpool::event e;
    procpool::barrier b(2);
    pid_t kid = spawn([&] {
      std::lock_guard<procpool::mutex> a(m);
      std::lock_guard<procpool::recursive_mutex> c(rm);
      s.acquire();
      e.set();
      b.arrive_and_wait();
      return 0;
    });
    b.arrive_and_wait();
    REQUIRE(reap(kid) == exit_status::exited(0));
  }
  REQUIRE(open_fd_count() == fds);
  REQUIRE(no_children_left());
}

// ---------------------------------------------------------------------------
// Threads of one process (what TSan can check)

TEST_CASE("mutex and recursive_mutex exclude threads", "[sync]") {
  procpool::mutex m;
  procpool::recursive_mutex rm;
  long plain = 0;  // a plain variable: TSan reports a race if the locks fail
  auto work = [&] {
    for (int i = 0; i < 20000; ++i) {
      if (i % 3 == 0) {
        std::lock_guard<procpool::mutex> hold(m);
        ++plain;
      } else if (i % 3 == 1) {
        std::unique_lock<procpool::mutex> hold(m, std::defer_lock);
        while (!hold.try_lock_for(10s)) {
        }
        ++plain;
      } else {
        std::scoped_lock hold(m, rm);
        std::lock_guard<procpool::recursive_mutex> again(rm);
        ++plain;
      }
    }
  };
  std::thread t(work);
  work();
  t.join();
  REQUIRE(plain == 40000);
}

TEST_CASE("a thread that ends holding the mutex hands it over with owner_died", "[sync]") {
  procpool::mutex m;
  std::thread([&] { m.lock(); }).join();  // ends without unlocking
  REQUIRE(m.try_lock_for(10s));
  REQUIRE(m.owner_died());
  m.unlock();
  REQUIRE(m.try_lock());
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
}

TEST_CASE("semaphore and event between threads", "[sync]") {
  procpool::semaphore s(1);
  procpool::event done;
  long plain = 0;
  auto work = [&] {
    for (int i = 0; i < 20000; ++i) {
      if (i % 2 == 0) {
        s.acquire();
      } else {
        while (!s.try_acquire_for(10s)) {
        }
      }
      ++plain;
      s.release();
    }
  };
  std::thread t([&] {
    work();
    done.set();
  });
  work();
  REQUIRE(done.wait_for(60s));
  t.join();
  REQUIRE(plain == 40000);
}

TEST_CASE("barrier between threads, and a thread that ends breaks it", "[sync]") {
  procpool::barrier b(2);
  std::vector<int> marks(2 * 50, 0);  // plain memory, ordered only by the barrier
  std::atomic<pid_t> helper_tid{0};
  std::thread t([&] {
    helper_tid = this_tid();
    for (int p = 0; p < 50; ++p) {
      marks[static_cast<std::size_t>(2 * p + 1)] = p + 1;
      b.arrive_and_wait();
    }
  });
  for (int p = 0; p < 50; ++p) {
    marks[static_cast<std::size_t>(2 * p)] = p + 1;
    b.arrive_and_wait();
    REQUIRE(marks[static_cast<std::size_t>(2 * p + 1)] == p + 1);
  }
  t.join();
  // The helper thread ended; a next phase waits for it in vain.
  try {
    b.arrive_and_wait();
    FAIL("arrive_and_wait returned");
  } catch (const procpool::broken_barrier& e) {
    CHECK(e.pid() == ::getpid());
    CHECK(e.tid() == helper_tid.load());
    CHECK_THAT(e.what(), Catch::Contains("thread"));
  }
}
