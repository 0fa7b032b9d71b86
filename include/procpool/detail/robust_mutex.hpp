// A process-shared robust mutex over pthreads. When a holder dies, the next
// locker is told so (`lock_status::owner_died`), repairs the state the mutex
// guards, and calls `mark_consistent()` before unlocking; otherwise the mutex
// becomes unrecoverable, as POSIX specifies.
//
// Boost.Interprocess is not used here on purpose: its interprocess_mutex
// (Boost 1.81) answers EOWNERDEAD by unlocking without marking the mutex
// consistent, which makes it unusable for good.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <ctime>
#include <system_error>
#include <thread>

#include "int_cast.hpp"
#include "sys.hpp"

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
inline int polled_lock_until(pthread_mutex_t* m, std::chrono::steady_clock::time_point deadline) {
  using namespace std::chrono;
  auto pause = microseconds(50);
  for (;;) {
    int rc = pthread_mutex_trylock(m);
    if (rc != EBUSY) return rc;
    auto left = deadline - steady_clock::now();
    if (left <= steady_clock::duration::zero()) return ETIMEDOUT;
    std::this_thread::sleep_for(std::min<steady_clock::duration>(left, pause));
    pause = std::min<microseconds>(pause * 2, milliseconds(1));
  }
}

/// How an attempt to lock a `robust_mutex` ended.
enum class lock_status {
  acquired,    ///< locked; the previous holder unlocked normally
  owner_died,  ///< locked; the previous holder died holding it: repair, then mark_consistent()
  busy,        ///< not locked (try_lock, or a timed lock that timed out)
};

/// A robust, process-shared mutex. Lives in shared memory, constructed once
/// before the processes that use it are forked.
class robust_mutex {
 public:
  robust_mutex() {
    pthread_mutexattr_t attr;
    check(pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(&m_, &attr);
    pthread_mutexattr_destroy(&attr);
    check(rc, "pthread_mutex_init");
  }
  ~robust_mutex() { pthread_mutex_destroy(&m_); }
  robust_mutex(const robust_mutex&) = delete;
  robust_mutex& operator=(const robust_mutex&) = delete;

  /// Blocks until locked. **Throws:** `std::system_error` if the mutex is unrecoverable.
  lock_status lock() { return result(pthread_mutex_lock(&m_), "pthread_mutex_lock"); }
  /// Locks if free now.
  lock_status try_lock() { return result(pthread_mutex_trylock(&m_), "pthread_mutex_trylock"); }
  /// Blocks until locked or `deadline` passes (then `busy`).
  lock_status lock_until(std::chrono::steady_clock::time_point deadline) {
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
  /// After `owner_died`, once the guarded state is repaired: makes the mutex usable again.
  void mark_consistent() {
    check(pthread_mutex_consistent(&m_), "pthread_mutex_consistent");
  }
  /// Unlocks. Must be called by the holder.
  void unlock() noexcept {
    pthread_mutex_unlock(&m_);
  }

 private:
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
      default:
        throw std::system_error(rc, std::generic_category(), call);
    }
  }
  pthread_mutex_t m_;
};

}  // namespace procpool::detail
