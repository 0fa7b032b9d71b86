// Blocking waits between processes: a futex word in shared memory, and an
// eventcount built on it that costs no system call when nobody sleeps.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <optional>

#include "../int_cast.hpp"
#include "../os/sys.hpp"

namespace procpool::detail {

static_assert(sizeof(std::atomic<std::uint32_t>) == 4 &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "futex words must be plain lock-free 32-bit atomics");

/// Sleeps while `*word == expected`, at most `timeout` (forever when empty).
/// Returns false on timeout; true on a wake-up, a changed word or a signal
/// (callers re-check their condition either way). Shared futex: works across
/// processes that map the same memory.
inline bool futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                       std::optional<std::chrono::nanoseconds> timeout) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout) {
    auto ns = timeout->count() < 0 ? 0 : timeout->count();
    ts.tv_sec = int_cast<time_t>(ns / 1'000'000'000);
    ts.tv_nsec = int_cast<long>(ns % 1'000'000'000);
    tsp = &ts;
  }
  long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected, tsp,
                     nullptr, 0);
  if (r == 0) return true;
  switch (errno) {
    case EAGAIN:  // the word had already changed
    case EINTR:
      return true;
    case ETIMEDOUT:
      return false;
    default:
      sys::throw_errno("futex(FUTEX_WAIT)");
  }
}

/// Wakes up to `count` processes sleeping on `word`.
inline void futex_wake(std::atomic<std::uint32_t>* word, int count = INT_MAX) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr,
            0);
}

/// A wake-up channel in shared memory: a waiter takes a key, re-checks its
/// condition, then sleeps on the key; a notifier that changed the condition
/// starts a new epoch and wakes the sleepers — with a system call only when
/// someone waits and announced itself since the last wake-up. (Counting the
/// waiters alone cost a notifier a system call for every notification until
/// the woken waiter had run again: on a busy machine, several per wake-up.)
/// Trivially constructible from zeroed memory.
struct eventcount {
  /// Bit 0: a waiter announced itself in this epoch. The other bits: the epoch.
  std::atomic<std::uint32_t> seq{0};
  /// Waiters between `prepare` and the end of `wait` or `cancel`.
  std::atomic<std::uint32_t> waiters{0};

  /// Announces a waiter and returns the key to sleep on. The caller must re-check
  /// its condition after this, then call `wait(key)` or `cancel()`.
  std::uint32_t prepare() noexcept {
    waiters.fetch_add(1, std::memory_order_seq_cst);
    return seq.fetch_or(1, std::memory_order_seq_cst) | 1u;
  }
  /// Withdraws a waiter announced by `prepare` whose condition turned out true.
  void cancel() noexcept { waiters.fetch_sub(1, std::memory_order_relaxed); }
  /// Sleeps until notified after `prepare` returned `key`, or `timeout`.
  /// Returns false on timeout.
  bool wait(std::uint32_t key, std::optional<std::chrono::nanoseconds> timeout) {
    bool woke = true;
    if (seq.load(std::memory_order_acquire) == key) woke = futex_wait(&seq, key, timeout);
    waiters.fetch_sub(1, std::memory_order_relaxed);
    return woke;
  }
  /// Wakes every waiter. Call after making the condition true (with release
  /// or stronger ordering); costs one atomic read-modify-write when nobody waits.
  void notify() noexcept {
    // Read-modify-writes rather than a fence and loads: each is ordered with
    // the waiter's own in `prepare`, so either it sees the waiter, or the
    // waiter's reads from it and then sees the condition. Same cost as a
    // seq_cst fence, and ThreadSanitizer, which does not model standalone
    // fences (GCC rejects them under -fsanitize=thread with -Werror),
    // understands them.
    if (waiters.fetch_add(0, std::memory_order_seq_cst) == 0) return;
    std::uint32_t v = seq.fetch_add(0, std::memory_order_seq_cst);
    // Whoever clears the bit wakes; a waiter announced in the new epoch sets
    // it again, and is woken by the next notification.
    while (v & 1u) {
      if (seq.compare_exchange_weak(v, (v + 2) & ~1u, std::memory_order_seq_cst)) {
        futex_wake(&seq);
        return;
      }
    }
  }
};

}  // namespace procpool::detail
