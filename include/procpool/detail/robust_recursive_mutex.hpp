// A process-shared robust mutex that its holder may lock again: the
// recursive counterpart of robust_mutex, for procpool::recursive_mutex.
//
// Recursion is left to glibc (PTHREAD_MUTEX_RECURSIVE) rather than built from
// an owner id kept beside a robust_mutex: glibc compares the owner thread id
// held in the futex word, which the kernel clears when the owner dies, so a
// new thread that happens to reuse a dead owner's id (pid_max is often only
// 32768) can never take the dead owner's lock for its own.
#pragma once

#include <pthread.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <system_error>

#include "int_cast.hpp"
#include "robust_mutex.hpp"

namespace procpool::detail {

/// A robust, recursive, process-shared mutex. Lives in shared memory,
/// constructed once before the processes that use it are forked. Reports a
/// dead holder as `robust_mutex` does: `lock_status::owner_died`, then
/// `mark_consistent()` before unlocking (the recursion count restarts at 1).
class robust_recursive_mutex {
 public:
  robust_recursive_mutex() {
    pthread_mutexattr_t attr;
    check(pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(&m_, &attr);
    pthread_mutexattr_destroy(&attr);
    check(rc, "pthread_mutex_init");
  }
  ~robust_recursive_mutex() { pthread_mutex_destroy(&m_); }
  robust_recursive_mutex(const robust_recursive_mutex&) = delete;
  robust_recursive_mutex& operator=(const robust_recursive_mutex&) = delete;

  /// Blocks until locked (at once when the caller holds it already).
  /// **Throws:** `std::system_error` if the mutex is unrecoverable or the count overflows.
  lock_status lock() { return result(pthread_mutex_lock(&m_), "pthread_mutex_lock"); }
  /// Locks if free now or held by the caller.
  lock_status try_lock() { return result(pthread_mutex_trylock(&m_), "pthread_mutex_trylock"); }
  /// Blocks until locked or `deadline` passes (then `busy`).
  lock_status lock_until(std::chrono::steady_clock::time_point deadline) {
#if PROCPOOL_DETAIL_TSAN
    return result(polled_lock_until(&m_, deadline), "pthread_mutex_trylock");
#else
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch());
    timespec ts{int_cast<time_t>(ns.count() / 1'000'000'000),
                int_cast<long>(ns.count() % 1'000'000'000)};
    return result(pthread_mutex_clocklock(&m_, CLOCK_MONOTONIC, &ts), "pthread_mutex_clocklock");
#endif
  }
  /// After `owner_died`, once the guarded state is repaired: makes the mutex usable again.
  void mark_consistent() {
    check(pthread_mutex_consistent(&m_), "pthread_mutex_consistent");
  }
  /// Undoes one lock. Must be called by the holder.
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
