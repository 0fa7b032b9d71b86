// Process-shared robust mutexes over pthreads, plain and recursive, written
// once. When a holder dies, the next locker is told so; the state the mutex
// guards is repaired and the mutex marked consistent before it is unlocked,
// otherwise it becomes unrecoverable, as POSIX specifies. The locking calls
// that take a `repair` function do all of that in one place: every user of a
// robust mutex in the library goes through them.
//
// A state that could not be repaired (the repair threw) is remembered in a
// flag of our own beside the pthread mutex, which is itself marked consistent
// and unlocked normally: glibc 2.36's pthread_mutex_clocklock mishandles a
// mutex left "not recoverable" the POSIX way (the plain kind waits out the
// timeout and leaves waiter bits that hang later lockers; the recursive kind
// takes it as if nothing happened), so no mutex is ever left in that state.
//
// Boost.Interprocess is not used here on purpose: its interprocess_mutex
// (Boost 1.81) answers EOWNERDEAD by unlocking without marking the mutex
// consistent, which makes it unusable for good.
#pragma once

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "../int_cast.hpp"
#include "../os/clock.hpp"

#if !defined(__GLIBC__)
#error "procpool's robust mutexes read glibc's pthread_mutex_t (owner and count words)"
#endif

// ThreadSanitizer (as shipped with GCC 12 and Clang 14) does not intercept
// pthread_mutex_clocklock, and its pthread_mutex_timedlock ignores an
// EOWNERDEAD result: either way it misses the lock being taken, then reports
// its unlock and races on the data it guards. Under TSan, timed locks
// therefore poll pthread_mutex_trylock, which it fully understands.
#if defined(__SANITIZE_THREAD__)
#define PROCPOOL_DETAIL_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PROCPOOL_DETAIL_TSAN 1
#endif
#endif
#ifndef PROCPOOL_DETAIL_TSAN
#define PROCPOOL_DETAIL_TSAN 0
#endif

namespace procpool::detail {

/// Under ThreadSanitizer only: `pthread_mutex_trylock` until it takes the
/// lock or the steady-clock `deadline` passes, sleeping between attempts (50 µs
/// growing to 1 ms). Returns the pthread result (0, EOWNERDEAD, ETIMEDOUT, ...).
inline int polled_lock_until(pthread_mutex_t* m, steady::time_point deadline) {
  using namespace std::chrono;
  auto pause = microseconds(50);
  for (;;) {
    int rc = pthread_mutex_trylock(m);
    if (rc != EBUSY) return rc;
    auto left = deadline - steady::now();
    if (left <= steady::duration::zero()) return ETIMEDOUT;
    std::this_thread::sleep_for(std::min<steady::duration>(left, pause));
    pause = std::min<microseconds>(pause * 2, milliseconds(1));
  }
}

/// How an attempt to lock a robust mutex ended.
enum class lock_status {
  acquired,    ///< locked; the previous holder unlocked normally
  owner_died,  ///< locked; the previous holder died holding it (repaired, when a repair was given)
  busy,        ///< not locked (try_lock, or a timed lock that timed out)
};

/// The kind of a `basic_robust_mutex`.
enum class robust_kind { plain, recursive };

/// A robust, process-shared pthread mutex, plain or recursive (its holder may
/// lock it again; glibc keeps the count). Lives in shared memory, constructed
/// once before the processes that use it are forked.
///
/// Recursion is left to glibc (PTHREAD_MUTEX_RECURSIVE) rather than built from
/// an owner id kept beside a plain mutex: glibc compares the owner thread id
/// held in the futex word, which the kernel clears when the owner dies, so a
/// new thread that happens to reuse a dead owner's id (pid_max is often only
/// 32768) can never take the dead owner's lock for its own.
template <robust_kind Kind>
class basic_robust_mutex {
 public:
  /// **Throws:** `std::system_error` naming the pthread call that failed.
  basic_robust_mutex() {
    pthread_mutexattr_t attr;
    check(pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    int rc = 0;
    const char* call = nullptr;
    if constexpr (Kind == robust_kind::recursive) {
      rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
      call = "pthread_mutexattr_settype";
    }
    if (rc == 0) {
      rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
      call = "pthread_mutexattr_setpshared";
    }
    if (rc == 0) {
      rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
      call = "pthread_mutexattr_setrobust";
    }
    if (rc == 0) {
      rc = pthread_mutex_init(&m_, &attr);
      call = "pthread_mutex_init";
    }
    pthread_mutexattr_destroy(&attr);
    check(rc, call);
  }
  ~basic_robust_mutex() { pthread_mutex_destroy(&m_); }
  basic_robust_mutex(const basic_robust_mutex&) = delete;
  basic_robust_mutex& operator=(const basic_robust_mutex&) = delete;

  /// Blocks until locked; after a holder died, runs `repair()` under the lock
  /// and marks the mutex consistent. Returns `acquired` or `owner_died`.
  /// If `repair` throws, the mutex is unlocked and the guarded state known
  /// broken: every later lock, in every process, throws `std::system_error`
  /// (`ENOTRECOVERABLE`) at once, as POSIX specifies for robust mutexes.
  /// **Throws:** `std::system_error` naming the pthread call when the mutex
  /// is unrecoverable; what `repair` throws.
  template <class Repair>
  lock_status lock(Repair&& repair) {
    refuse_if_unrecoverable("pthread_mutex_lock");
    return recover(raw_lock(), repair, "pthread_mutex_lock");
  }
  /// As `lock(repair)`, but returns `busy` at once when the mutex is taken.
  template <class Repair>
  lock_status try_lock(Repair&& repair) {
    refuse_if_unrecoverable("pthread_mutex_trylock");
    return recover(raw_try_lock(), repair, "pthread_mutex_trylock");
  }
  /// As `lock(repair)`, but returns `busy` once `deadline` has passed (no
  /// deadline: as `lock(repair)`).
  template <class Repair>
  lock_status lock_until(std::optional<steady::time_point> deadline, Repair&& repair) {
    const char* call = deadline ? "pthread_mutex_clocklock" : "pthread_mutex_lock";
    refuse_if_unrecoverable(call);
    return recover(deadline ? raw_lock_until(*deadline) : raw_lock(), repair, call);
  }

  /// Unlocks (recursive: undoes one lock). Must be called by the holder.
  void unlock() noexcept { pthread_mutex_unlock(&m_); }
  /// Unlocks (recursive: undoes one lock) if the calling thread holds the
  /// mutex; false, changing nothing, when it does not.
  bool unlock_if_held() noexcept {
#if PROCPOOL_DETAIL_TSAN
    // TSan reports an unlock by a thread that does not hold the mutex before
    // glibc refuses it: check first (one system call, under TSan only).
    if ((owner_word() & FUTEX_TID_MASK) != static_cast<int>(::syscall(SYS_gettid))) return false;
#endif
    // glibc checks the owner of a robust mutex on unlock: EPERM for anyone else.
    return pthread_mutex_unlock(&m_) == 0;
  }
  /// True while some live thread holds the mutex (a holder that died leaves
  /// it free for the next locker). Already stale when it returns.
  bool locked() const noexcept {
    return (owner_word() & FUTEX_TID_MASK) != 0;
  }
  /// Recursive kind, called by the holder: how many times it holds the mutex.
  unsigned depth() const noexcept {
    return m_.__data.__count;
  }

 private:
  // The raw pthread calls: `owner_died` leaves the mutex inconsistent, which
  // only `recover` settles. Private, so that no caller can forget to.
  lock_status raw_lock() {
    return result(pthread_mutex_lock(&m_), "pthread_mutex_lock");
  }
  lock_status raw_try_lock() {
    return result(pthread_mutex_trylock(&m_), "pthread_mutex_trylock");
  }
  lock_status raw_lock_until(steady::time_point deadline) {
#if PROCPOOL_DETAIL_TSAN
    return result(polled_lock_until(&m_, deadline), "pthread_mutex_trylock");
#else
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch());
    timespec ts{int_cast<time_t>(ns.count() / 1'000'000'000),
                int_cast<long>(ns.count() % 1'000'000'000)};
    // steady_clock is CLOCK_MONOTONIC on Linux with libstdc++ and libc++.
    return result(pthread_mutex_clocklock(&m_, CLOCK_MONOTONIC, &ts), "pthread_mutex_clocklock");
#endif
  }
  // The futex word of a robust mutex: the holder's thread id, plus flag bits
  // (waiters, owner died) that the kernel and glibc set.
  int owner_word() const noexcept {
    return __atomic_load_n(&m_.__data.__lock, __ATOMIC_RELAXED);
  }
  // After a raw lock: repairs after a dead holder and marks the mutex
  // consistent. A repair that throws marks the guarded state unrecoverable
  // for good (the mutex itself consistent and unlocked); a lock taken while
  // that happened is given back and refused.
  template <class Repair>
  lock_status recover(lock_status s, Repair& repair, const char* call) {
    if (s == lock_status::busy) return s;
    if (s == lock_status::owner_died) {
      if (unrecoverable_.load(std::memory_order_acquire) == 0) {
        try {
          repair();
        } catch (...) {
          unrecoverable_.store(1, std::memory_order_release);
          pthread_mutex_consistent(&m_);
          unlock();
          throw;
        }
      }
      try {
        check(pthread_mutex_consistent(&m_), "pthread_mutex_consistent");
      } catch (...) {
        unlock();
        throw;
      }
    }
    if (unrecoverable_.load(std::memory_order_acquire) != 0) {
      unlock();
      throw_unrecoverable(call);
    }
    return s;
  }
  void refuse_if_unrecoverable(const char* call) const {
    if (unrecoverable_.load(std::memory_order_acquire) != 0) throw_unrecoverable(call);
  }
  [[noreturn]] static void throw_unrecoverable(const char* call) {
    throw std::system_error(ENOTRECOVERABLE, std::generic_category(),
                            std::string(call) +
                                ": a holder died and the state this lock guards could not be "
                                "repaired, so the lock can never be taken again");
  }
  static void check(int rc, const char* call) {
    if (rc != 0) throw std::system_error(rc, std::generic_category(), call);
  }
  static lock_status result(int rc, const char* call) {
    switch (rc) {
      case 0:
        return lock_status::acquired;
      case EOWNERDEAD:
        return lock_status::owner_died;
      case EBUSY:
      case ETIMEDOUT:
        return lock_status::busy;
      case ENOTRECOVERABLE:
        throw_unrecoverable(call);
      default:
        throw std::system_error(rc, std::generic_category(), call);
    }
  }
  pthread_mutex_t m_;
  // Set once a repair threw; never cleared (see the head of this file).
  std::atomic<std::uint32_t> unrecoverable_{0};
};

/// A robust, process-shared mutex.
using robust_mutex = basic_robust_mutex<robust_kind::plain>;

/// A robust, recursive, process-shared mutex, for procpool::recursive_mutex.
/// Reports a dead holder as `robust_mutex` does; the recursion count restarts
/// at 1 for the new holder.
using robust_recursive_mutex = basic_robust_mutex<robust_kind::recursive>;

}  // namespace procpool::detail
