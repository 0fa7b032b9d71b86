// Waiting for a condition another process makes true: spin briefly, then
// sleep on an eventcount in slices, checking between slices that the process
// we wait for is still there.
#pragma once

#include <chrono>
#include <optional>
#include <thread>

#include "../os/clock.hpp"
#include "futex.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace procpool::detail {

/// Tells the CPU we are spinning (lets the sibling hyper-thread run).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// How a wait spins and sleeps.
struct wait_policy {
  /// How long to spin before sleeping. On a machine with few cores a spinning
  /// waiter takes CPU from the process it waits for, so keep it short.
  std::chrono::nanoseconds spin{std::chrono::microseconds(2)};
  /// Longest sleep between two checks that the peer is alive.
  std::chrono::nanoseconds slice{std::chrono::milliseconds(10)};
};

/// How a wait ended.
enum class wait_status { ready, timeout, aborted };

/// Waits until `ready()` is true, `deadline` passes, or `keep_waiting()`
/// (called between sleep slices, e.g. to notice a dead peer) returns false.
/// `ec` is the eventcount notified whenever `ready()` may have become true.
template <class Ready, class KeepWaiting>
wait_status wait_for_condition(eventcount& ec, Ready&& ready,
                               std::optional<steady::time_point> deadline,
                               KeepWaiting&& keep_waiting, const wait_policy& policy = {}) {
  if (ready()) return wait_status::ready;
  if (policy.spin.count() > 0) {
    auto spin_end = steady::now() + policy.spin;
    for (unsigned i = 1;; ++i) {
      cpu_relax();
      if (ready()) return wait_status::ready;
      if (i % 64 == 0 && steady::now() >= spin_end) break;
    }
  }
  for (;;) {
    auto key = ec.prepare();
    if (ready()) {
      ec.cancel();
      return wait_status::ready;
    }
    auto slice = policy.slice;
    if (deadline) {
      auto now = steady::now();
      if (*deadline <= now) {  // compared first: `deadline - now` overflows for a far past deadline
        ec.cancel();
        return wait_status::timeout;
      }
      auto left = *deadline - now;
      if (left < slice) slice = std::chrono::duration_cast<std::chrono::nanoseconds>(left);
    }
    ec.wait(key, slice);
    if (ready()) return wait_status::ready;
    if (!keep_waiting()) return wait_status::aborted;
  }
}

}  // namespace procpool::detail
