// sync.hpp: mutex, recursive_mutex, semaphore, bounded_semaphore, condition,
// event and barrier shared by forked processes — exact totals under
// contention, robust recovery from a holder or waiter killed with SIGKILL,
// timeouts, a barrier participant that dies — and the same objects shared by
// threads, so that TSan checks what it can see.
//
// The locks run one templated suite (every lock type through the same
// cases, as Boost.Interprocess's tests do). Cases marked "CPython" are ported
// from CPython's Lib/test/_test_multiprocessing.py (_TestLock,
// _TestSemaphore, _TestCondition, _TestEvent, _TestBarrier).
//
// Children never use Catch2: they report through their exit code (0 = good),
// and the parent asserts.
#include <procpool/detail/os/clock.hpp>
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/sync/robust_mutex.hpp>
#include <procpool/detail/sync/shared_object.hpp>
#include <procpool/shared.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <dirent.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;

namespace {

using procpool_test::all_succeeded;
using procpool_test::block_forever;
using procpool_test::go_signal;
using procpool_test::no_children_left;
using procpool_test::open_fd_count;
using procpool_test::reap;
using procpool_test::spawn;
using procpool_test::wait_until_sleeping;

pid_t this_tid() {
  return static_cast<pid_t>(::syscall(SYS_gettid));
}

constexpr int workers = 4;

template <class Lock>
constexpr bool is_recursive = std::is_same_v<Lock, procpool::recursive_mutex>;

/// Forks `n` children running `f(rank)`; true when all exit with 0.
template <class F>
bool run_processes(int n, F f) {
  std::vector<pid_t> kids;
  for (int rank = 0; rank < n; ++rank) kids.push_back(spawn([&, rank] { return f(rank); }));
  return all_succeeded(kids);
}

/// Polls `done()` (no sleeping: yields) for at most 30 s; its last answer.
template <class F>
bool eventually(F done) {
  auto end = std::chrono::steady_clock::now() + 30s;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------
// Every lock type through the same cases

#define LOCK_TYPES procpool::mutex, procpool::recursive_mutex

TEMPLATE_TEST_CASE("lock: exact total under contention from 4 processes", "[sync][fork]",
                   LOCK_TYPES) {
  constexpr long per_child = 50000;
  TestType m;
  procpool::shared_value<long> total;  // updated by a plain load + store: only the lock protects it
  procpool::event go;                  // starts all children together, for real contention
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      for (long k = 0; k < per_child; ++k) {
        std::lock_guard<TestType> hold(m);
        if constexpr (is_recursive<TestType>) {
          std::unique_lock<TestType> inner(m);  // the holder takes it again
          if (!m.try_lock()) return 1;          // and again, without waiting
          total.store(total.load() + 1);
          m.unlock();
        } else {
          total.store(total.load() + 1);
        }
      }
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(total.load() == workers * per_child);
  REQUIRE_FALSE(m.locked());
}

TEMPLATE_TEST_CASE("lock: a holder killed inside the critical section does not wedge it (x50)",
                   "[sync][fork]", LOCK_TYPES) {
  TestType m;
  procpool::shared_value<long> counter;     // the data the lock guards
  procpool::shared_value<int> in_progress;  // 1 while an update is half done
  long expected = 0;
  for (int round = 0; round < 50; ++round) {
    go_signal holding;
    pid_t victim = spawn([&] {
      int depth = is_recursive<TestType> ? 3 : 1;
      for (int i = 0; i < depth; ++i) m.lock();
      in_progress.store(1);
      counter.store(counter.load() + 1000);  // a half-done update, never completed
      holding.give();
      block_forever();
      return 0;
    });
    REQUIRE(holding.await());
    REQUIRE(m.locked());
    ::kill(victim, SIGKILL);
    REQUIRE(reap(victim) == exit_status::killed(SIGKILL));
    REQUIRE_FALSE(m.locked());  // a dead holder no longer holds it

    std::unique_lock<TestType> hold(m);  // does not hang
    REQUIRE(m.owner_died());
    if constexpr (is_recursive<TestType>) {
      std::lock_guard<TestType> again(m);  // nested: still the same holding
      REQUIRE(m.owner_died());
    }
    // Repair: undo the half-done update, then do the real one.
    REQUIRE(in_progress.load() == 1);
    counter.store(expected);
    in_progress.store(0);
    counter.store(counter.load() + 1);
    ++expected;
    hold.unlock();  // the dead holder's depth went with it: released for good
    REQUIRE_FALSE(m.locked());

    pid_t other = spawn([&] {
      if (!m.try_lock()) return 1;
      int code = m.owner_died() ? 2 : 0;  // a normal handover now
      m.unlock();
      return code;
    });
    REQUIRE(reap(other) == exit_status::exited(0));
  }
  REQUIRE(counter.load() == 50);
  REQUIRE(no_children_left());
}

TEMPLATE_TEST_CASE("lock: a process blocked in lock() gets it when the holder is killed",
                   "[sync][fork]", LOCK_TYPES) {
  TestType m;
  for (int round = 0; round < 10; ++round) {
    go_signal holding;
    pid_t holder = spawn([&] {
      m.lock();
      holding.give();
      block_forever();
      return 0;
    });
    REQUIRE(holding.await());
    pid_t waiter = spawn([&] {
      std::lock_guard<TestType> hold(m);  // blocks until the holder dies
      return m.owner_died() ? 0 : 1;
    });
    wait_until_sleeping(waiter);
    ::kill(holder, SIGKILL);
    REQUIRE(reap(holder).is_signaled());
    REQUIRE(reap(waiter) == exit_status::exited(0));
  }
  REQUIRE(m.try_lock());
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
}

TEMPLATE_TEST_CASE("lock: timed attempts time out promptly while another process holds it",
                   "[sync][fork]", LOCK_TYPES) {
  TestType m;
  go_signal holding;
  go_signal release;
  pid_t holder = spawn([&] {
    std::lock_guard<TestType> hold(m);
    holding.give();
    release.await();
    return 0;
  });
  REQUIRE(holding.await());
  auto timed = [](auto&& attempt) {
    auto start = std::chrono::steady_clock::now();
    bool got = attempt();
    auto took = std::chrono::steady_clock::now() - start;
    CHECK_FALSE(got);
    CHECK(took >= 50ms);
    CHECK(took < 50ms + 3s);  // generous: the machine is shared
  };
  timed([&] { return m.try_lock_for(50ms); });
  timed([&] { return m.try_lock_until(std::chrono::steady_clock::now() + 50ms); });
  timed([&] { return m.try_lock_until(std::chrono::system_clock::now() + 50ms); });
  CHECK_FALSE(m.try_lock());
  CHECK(m.locked());
  release.give();
  REQUIRE(reap(holder) == exit_status::exited(0));
  // Free now: the timed calls succeed at once, however short or huge the timeout.
  REQUIRE(m.try_lock_for(0ms));
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
  REQUIRE(m.try_lock_for(std::chrono::nanoseconds::max()));
  m.unlock();
  REQUIRE(m.try_lock_until(std::chrono::system_clock::time_point::max()));
  m.unlock();
}

TEMPLATE_TEST_CASE("lock: locked(), and unlocking a lock one does not hold throws (CPython)",
                   "[sync]", LOCK_TYPES) {
  // _TestLock.test_lock and test_rlock.
  TestType m;
  REQUIRE_FALSE(m.locked());
  m.lock();
  REQUIRE(m.locked());
  if constexpr (is_recursive<TestType>) {
    m.lock();
    REQUIRE(m.try_lock());
    m.unlock();
    REQUIRE(m.locked());
    m.unlock();
  } else {
    REQUIRE_FALSE(m.try_lock());
  }
  m.unlock();
  REQUIRE_FALSE(m.locked());
  REQUIRE_THROWS_AS(m.unlock(), procpool::error);
  REQUIRE_THROWS_WITH(m.unlock(), Catch::Contains("does not hold"));
  // The refused unlock changed nothing.
  REQUIRE(m.try_lock());
  REQUIRE_FALSE(m.owner_died());
  m.unlock();
}

TEMPLATE_TEST_CASE("lock: another process or thread cannot unlock the holder's lock",
                   "[sync][fork]", LOCK_TYPES) {
  // _TestLock.test_lock_locked_2processes, then a release from elsewhere.
  TestType m;
  procpool::event holding;
  procpool::event done;
  pid_t holder = spawn([&] {
    m.lock();
    int code = m.locked() ? 0 : 1;
    holding.set();
    if (!done.wait_for(30s)) code = 2;
    m.unlock();
    return code;
  });
  REQUIRE(holding.wait_for(30s));
  REQUIRE(m.locked());
  REQUIRE_THROWS_AS(m.unlock(), procpool::error);  // this process does not hold it
  pid_t other = spawn([&] {
    try {
      m.unlock();
    } catch (const procpool::error&) {
      return m.locked() ? 0 : 3;  // refused, and still held
    }
    return 4;
  });
  REQUIRE(reap(other) == exit_status::exited(0));
  REQUIRE(m.locked());
  REQUIRE_FALSE(m.try_lock());
  done.set();
  REQUIRE(reap(holder) == exit_status::exited(0));
  REQUIRE_FALSE(m.locked());

  std::thread([&] { m.lock(); }).join();  // a thread that ends holding it
  REQUIRE(m.try_lock_for(10s));
  REQUIRE(m.owner_died());
  bool refused = false;  // no Catch2 assertion outside the main thread
  std::thread t([&] {
    try {
      m.unlock();
    } catch (const procpool::error&) {
      refused = true;
    }
  });
  t.join();
  REQUIRE(refused);
  REQUIRE(m.locked());
  m.unlock();
  REQUIRE_FALSE(m.locked());
}

TEMPLATE_TEST_CASE("lock: excludes threads of one process", "[sync]", LOCK_TYPES) {
  TestType m;
  long plain = 0;  // a plain variable: TSan reports a race if the lock fails
  auto work = [&] {
    for (int i = 0; i < 20000; ++i) {
      if (i % 3 == 0) {
        std::lock_guard<TestType> hold(m);
        ++plain;
      } else if (i % 3 == 1) {
        std::unique_lock<TestType> hold(m, std::defer_lock);
        while (!hold.try_lock_for(10s)) {
        }
        ++plain;
      } else {
        while (!m.try_lock()) std::this_thread::yield();
        ++plain;
        m.unlock();
      }
    }
  };
  std::thread t(work);
  work();
  t.join();
  REQUIRE(plain == 40000);
}

TEMPLATE_TEST_CASE("lock: works with std::scoped_lock beside another lock type", "[sync]",
                   LOCK_TYPES) {
  TestType m;
  procpool::mutex other;
  long plain = 0;
  auto work = [&] {
    for (int i = 0; i < 5000; ++i) {
      std::scoped_lock both(m, other);
      ++plain;
    }
  };
  std::thread t(work);
  work();
  t.join();
  REQUIRE(plain == 10000);
}

TEMPLATE_TEST_CASE("lock: a condition waits with it, across processes", "[sync][fork]",
                   LOCK_TYPES) {
  TestType m;
  procpool::condition cv;
  procpool::shared_value<int> stage;  // guarded by m
  pid_t kid = spawn([&] {
    std::unique_lock<TestType> hold(m);
    stage.store(1);
    cv.notify_all();
    if (!cv.wait_for(hold, 30s, [&] { return stage.load() == 2; })) return 1;
    return m.locked() ? 0 : 2;  // holds the lock again after the wait
  });
  {
    std::unique_lock<TestType> hold(m);
    REQUIRE(cv.wait_for(hold, 30s, [&] { return stage.load() == 1; }));
    stage.store(2);
    cv.notify_one();
  }
  REQUIRE(reap(kid) == exit_status::exited(0));
}

TEMPLATE_TEST_CASE("lock: leaks no descriptors, mappings or children", "[sync][fork]", LOCK_TYPES) {
  auto fds = open_fd_count();
  auto maps = procpool_test::shared_mapping_count();
  for (int i = 0; i < 50; ++i) {
    TestType m;
    procpool::condition cv;
    pid_t kid = spawn([&] {
      std::unique_lock<TestType> hold(m);
      cv.notify_all();
      return 0;
    });
    REQUIRE(reap(kid) == exit_status::exited(0));
  }
  REQUIRE(open_fd_count() == fds);
  REQUIRE(procpool_test::shared_mapping_count() == maps);
  REQUIRE(no_children_left());
}

// ---------------------------------------------------------------------------
// The one robust mutex template under every lock of the library (the locks
// above, the queue's lock, shared_value's lock, the barrier's lock): each of
// its three ways to lock repairs after a dead holder, once.

#define ROBUST_KINDS procpool::detail::robust_mutex, procpool::detail::robust_recursive_mutex

namespace {

/// Locks `m` through entry point `how` (0: lock, 1: try_lock, 2: lock_until
/// with a deadline, 3: lock_until without one), counting repairs in `repairs`.
template <class M>
procpool::detail::lock_status lock_by(M& m, int how, int& repairs) {
  auto repair = [&] { ++repairs; };
  switch (how) {
    case 0:
      return m.lock(repair);
    case 1:
      return m.try_lock(repair);
    case 2:
      return m.lock_until(procpool::detail::deadline_after(10s), repair);
    default:
      return m.lock_until(std::nullopt, repair);
  }
}

/// A child that takes `m` and exits holding it.
template <class M>
void die_holding(M& m) {
  pid_t kid = spawn([&] {
    int ignored = 0;
    return lock_by(m, 0, ignored) == procpool::detail::lock_status::busy ? 1 : 0;
  });
  REQUIRE(reap(kid) == exit_status::exited(0));
}

}  // namespace

TEMPLATE_TEST_CASE("robust mutex: every way to lock repairs once after a holder died",
                   "[sync][fork]", ROBUST_KINDS) {
  using procpool::detail::lock_status;
  procpool::detail::shared_object<TestType> m(0);
  for (int how = 0; how < 4; ++how) {
    INFO("entry point " << how);
    die_holding(*m);
    REQUIRE_FALSE(m->locked());  // the kernel released it with its holder
    int repairs = 0;
    REQUIRE(lock_by(*m, how, repairs) == lock_status::owner_died);
    REQUIRE(repairs == 1);
    m->unlock();
    REQUIRE(lock_by(*m, how, repairs) == lock_status::acquired);  // marked consistent
    REQUIRE(repairs == 1);
    m->unlock();
  }
  REQUIRE(no_children_left());
}

TEMPLATE_TEST_CASE("robust mutex: a repair that throws leaves it unrecoverable, and says so",
                   "[sync][fork]", ROBUST_KINDS) {
  procpool::detail::shared_object<TestType> m(0);
  die_holding(*m);
  REQUIRE_THROWS_WITH(m->lock([] { throw std::runtime_error("cannot repair"); }), "cannot repair");
  REQUIRE_FALSE(m->locked());  // released on the way out
  // Every later attempt fails at once, naming the call and why, in every process.
  for (int how = 0; how < 4; ++how) {
    int repairs = 0;
    try {
      auto got = lock_by(*m, how, repairs);
      FAIL("an unrecoverable mutex was locked by entry point " << how << ": status "
                                                               << static_cast<int>(got));
    } catch (const std::system_error& e) {
      CHECK(e.code().value() == ENOTRECOVERABLE);
      CHECK_THAT(e.what(), Catch::Contains("pthread_mutex_") && Catch::Contains("repaired"));
    }
    CHECK(repairs == 0);
  }
  pid_t kid = spawn([&] {
    try {
      (void)m->try_lock([] {});
    } catch (const std::system_error& e) {
      return e.code().value() == ENOTRECOVERABLE ? 0 : 2;
    }
    return 1;
  });
  REQUIRE(reap(kid) == exit_status::exited(0));
}

TEMPLATE_TEST_CASE("robust mutex: timed and try locks give up while another process holds it",
                   "[sync][fork]", ROBUST_KINDS) {
  using procpool::detail::lock_status;
  procpool::detail::shared_object<TestType> m(0);
  go_signal held, release;
  pid_t kid = spawn([&] {
    int ignored = 0;
    if (lock_by(*m, 0, ignored) != lock_status::acquired) return 1;
    held.give();
    release.await();
    m->unlock();
    return 0;
  });
  REQUIRE(held.await());
  int repairs = 0;
  REQUIRE(m->try_lock([&] { ++repairs; }) == lock_status::busy);
  auto start = std::chrono::steady_clock::now();
  REQUIRE(m->lock_until(procpool::detail::deadline_after(30ms), [&] { ++repairs; }) ==
          lock_status::busy);
  auto waited = std::chrono::steady_clock::now() - start;
  CHECK(waited >= 30ms);
  CHECK(waited < 5s);
  CHECK(repairs == 0);
  release.give();
  REQUIRE(reap(kid) == exit_status::exited(0));
  REQUIRE(lock_by(*m, 3, repairs) == lock_status::acquired);
  m->unlock();
}

// ---------------------------------------------------------------------------
// recursive_mutex specifics

TEST_CASE("recursive_mutex: a condition wait releases every level and restores them",
          "[sync][fork]") {
  procpool::recursive_mutex m;
  procpool::condition cv;
  procpool::shared_value<int> flag;
  m.lock();
  m.lock();  // depth 2
  pid_t kid = spawn([&] {
    // Can take the lock only if the waiter released both levels.
    if (!m.try_lock_for(30s)) return 1;
    flag.store(1);
    cv.notify_all();
    m.unlock();
    return 0;
  });
  REQUIRE(cv.wait_for(m, 30s, [&] { return flag.load() == 1; }));
  // Both levels are back: two unlocks, and only then is it free.
  m.unlock();
  REQUIRE(m.locked());
  m.unlock();
  REQUIRE_FALSE(m.locked());
  REQUIRE(reap(kid) == exit_status::exited(0));
}

// ---------------------------------------------------------------------------
// semaphore and bounded_semaphore

TEST_CASE("semaphore: counts, and try_acquire fails at zero (CPython)", "[sync]") {
  // _TestSemaphore.test_semaphore and test_bounded_semaphore.
  auto check = [](procpool::semaphore& s) {
    REQUIRE(s.value() == 2);
    s.acquire();
    REQUIRE(s.value() == 1);
    s.acquire();
    REQUIRE(s.value() == 0);
    REQUIRE_FALSE(s.try_acquire());
    REQUIRE(s.value() == 0);
    s.release();
    REQUIRE(s.value() == 1);
    s.release();
    REQUIRE(s.value() == 2);
  };
  procpool::semaphore plain(2);
  check(plain);
  plain.release();
  plain.release();
  REQUIRE(plain.value() == 4);

  procpool::bounded_semaphore bounded(2);
  check(bounded);
  REQUIRE(bounded.maximum() == 2);
  REQUIRE_THROWS_AS(bounded.release(), procpool::error);
  REQUIRE_THROWS_WITH(bounded.release(), Catch::Contains("maximum 2"));
  REQUIRE(bounded.value() == 2);  // unchanged by the refused releases
  bounded.acquire();
  REQUIRE_THROWS_AS(bounded.release(2), procpool::error);
  REQUIRE(bounded.value() == 1);
  bounded.release();
  REQUIRE(bounded.value() == 2);

  procpool::bounded_semaphore roomy(0, 3);
  REQUIRE(roomy.value() == 0);
  REQUIRE_FALSE(roomy.try_acquire());
  roomy.release(3);
  REQUIRE(roomy.value() == 3);
  REQUIRE_THROWS_AS(roomy.release(), procpool::error);
  REQUIRE_THROWS_AS(procpool::bounded_semaphore(4, 3), procpool::error);
  REQUIRE_THROWS_AS(procpool::bounded_semaphore(0, -1), procpool::error);
}

TEST_CASE("semaphore: used as a lock from 4 processes gives an exact total", "[sync][fork]") {
  constexpr long per_child = 50000;
  procpool::bounded_semaphore s(1);
  procpool::shared_value<long> total;
  procpool::event go;
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

TEST_CASE("semaphore: bounds how many processes hold it at once", "[sync][fork]") {
  constexpr int units = 2;
  constexpr int rounds = 2000;
  procpool::semaphore s(units);
  procpool::shared_value<int> inside;
  procpool::shared_value<int> most;
  procpool::shared_value<long> entries;
  procpool::event go;
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

TEST_CASE("semaphore: timed acquires time out (CPython)", "[sync]") {
  // _TestSemaphore.test_timeout.
  procpool::semaphore s(0);
  procpool::bounded_semaphore b(0, 1);
  for (procpool::semaphore* sem : {&s, static_cast<procpool::semaphore*>(&b)}) {
    auto start = std::chrono::steady_clock::now();
    REQUIRE_FALSE(sem->try_acquire());
    REQUIRE_FALSE(sem->try_acquire_for(0s));
    REQUIRE_FALSE(sem->try_acquire_for(100ms));
    REQUIRE_FALSE(sem->try_acquire_until(std::chrono::system_clock::now() + 50ms));
    auto took = std::chrono::steady_clock::now() - start;
    CHECK(took >= 150ms);
    CHECK(took < 150ms + 3s);
  }
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

// ---------------------------------------------------------------------------
// condition

namespace {

/// What each sleeper of the CPython condition tests does: take the lock, say
/// it sleeps, wait (at most `timeout`), say it woke, let go.
struct sleepers {
  procpool::mutex m;
  procpool::condition cv;
  procpool::semaphore sleeping{0};
  procpool::semaphore woken{0};

  int sleep(std::optional<std::chrono::milliseconds> timeout = std::nullopt) {
    std::unique_lock<procpool::mutex> hold(m);
    sleeping.release();
    if (timeout) {
      cv.wait_for(hold, *timeout);
    } else {
      cv.wait(hold);
    }
    woken.release();
    return 0;
  }
  /// Waits until each of `pids` sleeps in the kernel (in the condition's futex).
  void all_asleep(const std::vector<pid_t>& pids) {
    // Each said it sleeps while holding the lock; taking the lock once means
    // each has released it inside wait, so each sleeps, or is about to.
    { std::lock_guard<procpool::mutex> hold(m); }
    for (pid_t pid : pids) wait_until_sleeping(pid);
  }
};

}  // namespace

TEST_CASE("condition: notify wakes one waiter at a time (CPython)", "[sync][fork]") {
  // _TestCondition.test_notify: one process and one thread sleep.
  sleepers s;
  pid_t kid = spawn([&] { return s.sleep(); });
  std::thread t([&] { s.sleep(); });
  s.sleeping.acquire();
  s.sleeping.acquire();
  s.all_asleep({kid});
  REQUIRE(s.woken.value() == 0);
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify_one();
  }
  REQUIRE(s.woken.try_acquire_for(30s));
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify_one();
  }
  REQUIRE(s.woken.try_acquire_for(30s));
  t.join();
  REQUIRE(reap(kid) == exit_status::exited(0));
  REQUIRE(s.woken.value() == 0);
}

TEST_CASE("condition: timed waiters time out, notify_all wakes every waiter (CPython)",
          "[sync][fork]") {
  // _TestCondition.test_notify_all.
  sleepers s;
  std::vector<pid_t> kids;
  std::vector<std::thread> threads;
  // Processes first, then threads: forking with threads running is unsafe.
  for (int i = 0; i < 3; ++i) kids.push_back(spawn([&] { return s.sleep(50ms); }));
  for (int i = 0; i < 3; ++i) threads.emplace_back([&] { s.sleep(50ms); });
  for (int i = 0; i < 6; ++i) s.sleeping.acquire();
  for (int i = 0; i < 6; ++i) REQUIRE(s.woken.try_acquire_for(30s));  // all timed out
  REQUIRE(all_succeeded(kids));
  for (auto& t : threads) t.join();
  threads.clear();
  kids.clear();

  for (int i = 0; i < 3; ++i) kids.push_back(spawn([&] { return s.sleep(); }));
  for (int i = 0; i < 3; ++i) threads.emplace_back([&] { s.sleep(); });
  for (int i = 0; i < 6; ++i) s.sleeping.acquire();
  s.all_asleep(kids);
  REQUIRE(s.woken.value() == 0);
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify_all();
  }
  for (int i = 0; i < 6; ++i) REQUIRE(s.woken.try_acquire_for(30s));
  REQUIRE(all_succeeded(kids));
  for (auto& t : threads) t.join();
}

TEST_CASE("condition: notify(n) wakes n sleepers (CPython)", "[sync][fork]") {
  // _TestCondition.test_notify_n, with processes only, so that each is seen asleep.
  sleepers s;
  std::vector<pid_t> kids;
  for (int i = 0; i < 6; ++i) kids.push_back(spawn([&] { return s.sleep(); }));
  for (int i = 0; i < 6; ++i) s.sleeping.acquire();
  s.all_asleep(kids);
  REQUIRE(s.woken.value() == 0);
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify(2);
  }
  REQUIRE(s.woken.try_acquire_for(30s));
  REQUIRE(s.woken.try_acquire_for(30s));
  REQUIRE_FALSE(s.woken.try_acquire_for(100ms));  // not a third one
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify(4);
  }
  for (int i = 0; i < 4; ++i) REQUIRE(s.woken.try_acquire_for(30s));
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify(3);  // nobody left: does nothing
  }
  REQUIRE(all_succeeded(kids));
  REQUIRE(s.woken.value() == 0);
}

TEST_CASE("condition: wait results and timeouts (CPython)", "[sync][fork]") {
  // _TestCondition.test_timeout and test_wait_result.
  procpool::mutex m;
  procpool::condition cv;
  std::unique_lock<procpool::mutex> hold(m);
  auto start = std::chrono::steady_clock::now();
  REQUIRE(cv.wait_for(hold, 0s) == std::cv_status::timeout);
  REQUIRE(cv.wait_for(hold, 100ms) == std::cv_status::timeout);
  REQUIRE(cv.wait_until(hold, std::chrono::system_clock::now() + 50ms) == std::cv_status::timeout);
  REQUIRE_FALSE(cv.wait_for(hold, 50ms, [] { return false; }));
  auto took = std::chrono::steady_clock::now() - start;
  CHECK(took >= 200ms);
  CHECK(took < 200ms + 3s);
  REQUIRE(hold.owns_lock());
  REQUIRE(m.locked());
  pid_t kid = spawn([&] {
    std::lock_guard<procpool::mutex> h(m);  // only once the parent waits
    cv.notify_one();
    return 0;
  });
  REQUIRE(cv.wait_for(hold, 60s) == std::cv_status::no_timeout);
  hold.unlock();
  REQUIRE(reap(kid) == exit_status::exited(0));
}

TEST_CASE("condition: wait_for with a predicate across processes (CPython)", "[sync][fork]") {
  // _TestCondition.test_waitfor and test_waitfor_timeout.
  procpool::mutex m;
  procpool::condition cv;
  procpool::shared_value<int> state(-1);
  pid_t kid = spawn([&] {
    std::unique_lock<procpool::mutex> hold(m);
    state.store(0);
    cv.notify_one();
    if (!cv.wait_for(hold, 60s, [&] { return state.load() == 4; })) return 1;
    return state.load() == 4 ? 0 : 2;
  });
  {
    std::unique_lock<procpool::mutex> hold(m);
    REQUIRE(cv.wait_for(hold, 60s, [&] { return state.load() == 0; }));
  }
  for (int i = 0; i < 4; ++i) {
    std::lock_guard<procpool::mutex> hold(m);
    state.store(state.load() + 1);
    cv.notify_one();
  }
  REQUIRE(reap(kid) == exit_status::exited(0));

  // Only three increments: the waiter's predicate never holds, it times out.
  state.store(0);
  procpool::event waiting;
  pid_t late = spawn([&] {
    std::unique_lock<procpool::mutex> hold(m);
    waiting.set();
    auto start = std::chrono::steady_clock::now();
    bool ok = cv.wait_for(hold, 100ms, [&] { return state.load() == 4; });
    auto took = std::chrono::steady_clock::now() - start;
    return !ok && took >= 100ms ? 0 : 1;
  });
  REQUIRE(waiting.wait_for(30s));
  for (int i = 0; i < 3; ++i) {
    std::lock_guard<procpool::mutex> hold(m);
    state.store(state.load() + 1);
    cv.notify_one();
  }
  REQUIRE(reap(late) == exit_status::exited(0));
}

TEST_CASE("condition: waiters killed inside wait do not wedge notify", "[sync][fork]") {
  // The defect of process-shared pthread condition variables (and of Python's
  // Condition, whose notify waits for each woken sleeper): a waiter killed
  // while asleep, or right after being woken, must not block notify or later
  // waits.
  sleepers s;
  for (int round = 0; round < 5; ++round) {
    std::vector<pid_t> doomed;
    for (int i = 0; i < 3; ++i) doomed.push_back(spawn([&] { return s.sleep(); }));
    for (int i = 0; i < 3; ++i) s.sleeping.acquire();
    s.all_asleep(doomed);
    for (pid_t pid : doomed) ::kill(pid, SIGKILL);
    for (pid_t pid : doomed) REQUIRE(reap(pid) == exit_status::killed(SIGKILL));

    // One live waiter: a single notify_one reaches it (the dead are no
    // longer counted as sleepers by the kernel).
    pid_t live = spawn([&] { return s.sleep(); });
    s.sleeping.acquire();
    s.all_asleep({live});
    auto start = std::chrono::steady_clock::now();
    {
      std::lock_guard<procpool::mutex> hold(s.m);
      s.cv.notify_one();
    }
    CHECK(std::chrono::steady_clock::now() - start < 1s);  // never blocks
    REQUIRE(s.woken.try_acquire_for(30s));
    REQUIRE(reap(live) == exit_status::exited(0));
  }
  // A waiter killed after being notified, before it took the lock back: the
  // notifier holds the lock meanwhile, so the waiter is stuck in lock().
  std::vector<pid_t> kids;
  for (int i = 0; i < 2; ++i) kids.push_back(spawn([&] { return s.sleep(); }));
  for (int i = 0; i < 2; ++i) s.sleeping.acquire();
  s.all_asleep(kids);
  {
    std::lock_guard<procpool::mutex> hold(s.m);
    s.cv.notify_all();
    for (pid_t pid : kids) wait_until_sleeping(pid);  // now in the mutex's wait
    ::kill(kids[0], SIGKILL);
    REQUIRE(reap(kids[0]) == exit_status::killed(SIGKILL));
  }
  REQUIRE(s.woken.try_acquire_for(30s));
  REQUIRE(reap(kids[1]) == exit_status::exited(0));
  std::unique_lock<procpool::mutex> hold(s.m);
  REQUIRE_FALSE(s.m.owner_died());
  REQUIRE(s.cv.wait_for(hold, 10ms) == std::cv_status::timeout);
  REQUIRE(no_children_left());
}

TEST_CASE("condition: waiting without holding the lock throws and does not wait", "[sync]") {
  procpool::mutex m;
  procpool::condition cv;
  auto start = std::chrono::steady_clock::now();
  REQUIRE_THROWS_AS(cv.wait(m), procpool::error);
  REQUIRE_THROWS_AS(cv.wait_for(m, 30s), procpool::error);
  std::unique_lock<procpool::mutex> not_owning(m, std::defer_lock);
  REQUIRE_THROWS_AS(cv.wait(not_owning), procpool::error);
  procpool::recursive_mutex rm;
  REQUIRE_THROWS_AS(cv.wait_for(rm, 30s), procpool::error);
  REQUIRE(std::chrono::steady_clock::now() - start < 10s);
  REQUIRE_FALSE(m.locked());
  REQUIRE_FALSE(rm.locked());
}

TEST_CASE("condition between threads: a bounded buffer", "[sync]") {
  procpool::mutex m;
  procpool::condition not_full;
  procpool::condition not_empty;
  std::vector<int> items;  // plain memory, guarded by m
  long sum = 0;
  constexpr int n = 20000;
  std::thread producer([&] {
    for (int i = 1; i <= n; ++i) {
      std::unique_lock<procpool::mutex> hold(m);
      not_full.wait(hold, [&] { return items.size() < 4; });
      items.push_back(i);
      not_empty.notify_one();
    }
  });
  for (int got = 0; got < n; ++got) {
    std::unique_lock<procpool::mutex> hold(m);
    not_empty.wait(hold, [&] { return !items.empty(); });
    sum += items.back();
    items.pop_back();
    not_full.notify_one();
  }
  producer.join();
  REQUIRE(sum == long{n} * (n + 1) / 2);
}

// ---------------------------------------------------------------------------
// event

TEST_CASE("event: set() wakes waiters in other processes, clear() resets it (CPython)",
          "[sync][fork]") {
  // _TestEvent.test_event, plus several waiters.
  procpool::event go;
  REQUIRE_FALSE(go.is_set());
  auto start = std::chrono::steady_clock::now();
  REQUIRE_FALSE(go.wait_for(0s));
  REQUIRE_FALSE(go.wait_for(100ms));
  CHECK(std::chrono::steady_clock::now() - start >= 100ms);
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
  REQUIRE(go.wait_for(30s));
  go.clear();
  REQUIRE_FALSE(go.is_set());
  REQUIRE_FALSE(go.wait_for(1ms));
  pid_t setter = spawn([&] {
    go.set();
    return 0;
  });
  go.wait();
  REQUIRE(reap(setter) == exit_status::exited(0));
}

// ---------------------------------------------------------------------------
// barrier

namespace {
constexpr int parties = 5;  // as CPython's _TestBarrier.N
}

TEST_CASE("barrier: 5 processes in lockstep through 10 passes (CPython)", "[sync][fork]") {
  // _TestBarrier.test_barrier_10 (multipass): two counters, a wait between them.
  constexpr int passes = 10;
  procpool::barrier b(parties);
  procpool::shared_value<int> first;
  procpool::shared_value<int> second;
  REQUIRE(run_processes(parties, [&](int) {
    for (int i = 0; i < passes; ++i) {
      first.fetch_add(1);
      if (second.load() != i * parties) return 1;
      b.arrive_and_wait();
      second.fetch_add(1);
      if (first.load() != (i + 1) * parties) return 2;
      b.arrive_and_wait();
    }
    if (b.waiting() != 0) return 3;
    return b.broken() ? 4 : 0;
  }));
  REQUIRE_FALSE(b.broken());
}

TEST_CASE("barrier: arrive_and_wait returns distinct arrival indices (CPython)", "[sync][fork]") {
  // _TestBarrier.test_wait_return, checked more strictly: in each phase the
  // indices are exactly 0 .. parties - 1.
  constexpr int phases = 20;
  procpool::barrier b(parties);
  procpool::shared_array<int> seen(phases * parties);  // how often each index came up
  REQUIRE(run_processes(parties, [&](int) {
    for (int p = 0; p < phases; ++p) {
      std::size_t i = b.arrive_and_wait();
      if (i >= parties) return 1;
      __atomic_fetch_add(&seen[static_cast<std::size_t>(p * parties) + i], 1, __ATOMIC_RELAXED);
    }
    return 0;
  }));
  for (int v : seen) REQUIRE(v == 1);
  procpool::barrier one(1);
  REQUIRE(one.arrive_and_wait() == 0);  // _TestBarrier.test_single_thread
  REQUIRE(one.arrive_and_wait() == 0);
  REQUIRE(one.arrive_and_wait_for(1s) == std::optional<std::size_t>(0));
}

TEST_CASE("barrier: the action runs once per phase, before anyone is released (CPython)",
          "[sync][fork]") {
  // _TestBarrier.test_action.
  constexpr int phases = 10;
  procpool::shared_value<int> runs;
  procpool::shared_value<int> runner;  // arrival index of whoever ran it: always the last
  procpool::barrier b(parties, [&] { runs.fetch_add(1); });
  REQUIRE(run_processes(parties, [&](int) {
    for (int p = 0; p < phases; ++p) {
      std::size_t i = b.arrive_and_wait();
      if (runs.load() < 2 * p + 1) return 1;  // released before the action ran
      if (i == parties - 1) runner.fetch_add(1);
      b.arrive_and_wait();  // nobody starts phase p + 1's action before all checked
    }
    return 0;
  }));
  // Two waits per phase, an action on each.
  REQUIRE(runs.load() == 2 * phases);
  REQUIRE(runner.load() == phases);
}

TEST_CASE("barrier: an action that throws breaks it, one killed inside breaks it naming the pid",
          "[sync][fork]") {
  {
    procpool::barrier b(3, [] { throw std::runtime_error("action failed"); });
    procpool::shared_value<int> got_exception;
    procpool::shared_value<int> got_broken;
    REQUIRE(run_processes(3, [&](int) {
      try {
        b.arrive_and_wait();
      } catch (const procpool::broken_barrier& e) {
        if (e.why() != procpool::broken_barrier::reason::action_failed) return 1;
        got_broken.fetch_add(1);
      } catch (const std::runtime_error& e) {
        got_exception.fetch_add(1);  // the participant that ran it
      }
      return 0;
    }));
    REQUIRE(got_exception.load() == 1);
    REQUIRE(got_broken.load() == 2);
    REQUIRE(b.broken());
    REQUIRE_THROWS_WITH(b.arrive_and_wait(), Catch::Contains("action"));
  }
  {
    procpool::barrier b(3, [] { ::raise(SIGKILL); });  // dies holding the barrier's lock
    procpool::shared_array<pid_t> named(3);
    std::vector<pid_t> kids;
    for (int i = 0; i < 3; ++i) {
      kids.push_back(spawn([&, i] {
        try {
          b.arrive_and_wait();
        } catch (const procpool::broken_barrier& e) {
          named[static_cast<std::size_t>(i)] = e.pid();
          return e.why() == procpool::broken_barrier::reason::participant_died ? 0 : 1;
        }
        return 2;
      }));
    }
    int killed = 0;
    pid_t dead = 0;
    for (pid_t pid : kids) {
      auto st = reap(pid);
      if (st == exit_status::killed(SIGKILL)) {
        ++killed;
        dead = pid;
      } else {
        CHECK(st == exit_status::exited(0));
      }
    }
    REQUIRE(killed == 1);
    int naming = 0;
    for (pid_t pid : named) naming += pid == dead ? 1 : 0;
    REQUIRE(naming == 2);
    REQUIRE(b.broken());
  }
}

TEST_CASE("barrier: abort() breaks it for everyone (CPython)", "[sync][fork]") {
  // _TestBarrier.test_abort: the participant with index N/2 aborts.
  procpool::barrier b(parties);
  procpool::shared_value<int> passed;
  procpool::shared_value<int> broken;
  REQUIRE(run_processes(parties, [&](int) {
    try {
      std::size_t i = b.arrive_and_wait();
      if (i == parties / 2) {
        b.abort();
        return 0;
      }
      b.arrive_and_wait();
      passed.fetch_add(1);
    } catch (const procpool::broken_barrier& e) {
      if (e.why() != procpool::broken_barrier::reason::aborted || e.pid() != 0) return 1;
      broken.fetch_add(1);
    }
    return 0;
  }));
  REQUIRE(passed.load() == 0);
  REQUIRE(broken.load() == parties - 1);
  REQUIRE(b.broken());
  REQUIRE_THROWS_AS(b.arrive_and_wait_for(1s), procpool::broken_barrier);
  REQUIRE_THROWS_WITH(b.arrive_and_wait(), Catch::Contains("abort"));
}

TEST_CASE("barrier: reset() frees the waiters with broken_barrier, then it works (CPython)",
          "[sync][fork]") {
  // _TestBarrier.test_reset.
  procpool::barrier b(parties);
  procpool::shared_value<int> passed;
  procpool::shared_value<int> broken;
  procpool::shared_value<int> again;
  REQUIRE(run_processes(parties, [&](int) {
    std::size_t i = b.arrive_and_wait();
    if (i == parties / 2) {
      // Wait until the others are all in the barrier.
      if (!eventually([&] { return b.waiting() == parties - 1; })) return 1;
      b.reset();
    } else {
      try {
        b.arrive_and_wait();
        passed.fetch_add(1);
      } catch (const procpool::broken_barrier& e) {
        if (e.why() != procpool::broken_barrier::reason::reset) return 2;
        broken.fetch_add(1);
      }
    }
    b.arrive_and_wait();  // pass it again
    again.fetch_add(1);
    return 0;
  }));
  REQUIRE(passed.load() == 0);
  REQUIRE(broken.load() == parties - 1);
  REQUIRE(again.load() == parties);
  REQUIRE_FALSE(b.broken());
}

TEST_CASE("barrier: a broken barrier is usable again after reset() (CPython)", "[sync][fork]") {
  // _TestBarrier.test_abort_and_reset.
  procpool::barrier b(parties);
  procpool::barrier b2(parties);
  procpool::shared_value<int> passed;
  procpool::shared_value<int> broken;
  procpool::shared_value<int> again;
  REQUIRE(run_processes(parties, [&](int) {
    try {
      std::size_t i = b.arrive_and_wait();
      if (i == parties / 2) throw std::runtime_error("abort");
      b.arrive_and_wait();
      passed.fetch_add(1);
    } catch (const procpool::broken_barrier&) {
      broken.fetch_add(1);
    } catch (const std::runtime_error&) {
      b.abort();
    }
    // Everyone has left b before the reset, and nobody enters it before.
    if (b2.arrive_and_wait() == parties / 2) b.reset();
    b2.arrive_and_wait();
    b.arrive_and_wait();
    again.fetch_add(1);
    return 0;
  }));
  REQUIRE(passed.load() == 0);
  REQUIRE(broken.load() == parties - 1);
  REQUIRE(again.load() == parties);
  REQUIRE_FALSE(b.broken());
}

TEST_CASE("barrier: breaks when a participant ends before arriving", "[sync][fork]") {
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
  // reset() forgets the dead participant: the barrier works again.
  b.reset();
  REQUIRE_FALSE(b.broken());
  std::vector<pid_t> partners;
  for (int i = 0; i < 2; ++i) {
    partners.push_back(spawn([&] { return b.arrive_and_wait_for(30s) ? 0 : 1; }));
  }
  CHECK(b.arrive_and_wait_for(30s));
  REQUIRE(all_succeeded(partners));
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

TEST_CASE("barrier: a timed-out arrival is withdrawn and the barrier stays usable",
          "[sync][fork]") {
  procpool::barrier b(2);
  auto start = std::chrono::steady_clock::now();
  REQUIRE_FALSE(b.arrive_and_wait_for(50ms));  // alone: times out
  REQUIRE_FALSE(b.arrive_and_wait_until(std::chrono::system_clock::now() + 50ms));
  CHECK(std::chrono::steady_clock::now() - start >= 100ms);
  REQUIRE(b.waiting() == 0);
  REQUIRE_FALSE(b.broken());
  pid_t partner = spawn([&] { return b.arrive_and_wait_for(30s) ? 0 : 1; });
  b.enroll(partner);
  auto index = b.arrive_and_wait_for(30s);
  REQUIRE(index);
  REQUIRE(*index < 2);
  REQUIRE(reap(partner) == exit_status::exited(0));
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

// ---------------------------------------------------------------------------
// All types

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
  auto maps = procpool_test::shared_mapping_count();
  for (int i = 0; i < 50; ++i) {
    procpool::semaphore s(1);
    procpool::bounded_semaphore bs(1);
    procpool::event e;
    procpool::barrier b(2, [] {});
    pid_t kid = spawn([&] {
      s.acquire();
      bs.acquire();
      bs.release();
      e.set();
      b.arrive_and_wait();
      return 0;
    });
    b.arrive_and_wait();
    REQUIRE(reap(kid) == exit_status::exited(0));
  }
  REQUIRE(open_fd_count() == fds);
  REQUIRE(procpool_test::shared_mapping_count() == maps);
  REQUIRE(no_children_left());
}
