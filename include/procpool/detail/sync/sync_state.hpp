// The shared state of each synchronization object of sync.hpp. Each lives in
// a shared_object (its own anonymous shared mapping), so copies of the object
// in forked children use the same state.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>

#include "../transport/futex.hpp"
#include "../transport/wait.hpp"
#include "robust_mutex.hpp"

namespace procpool::detail {

/// procpool::mutex: the robust mutex, and whether its current holder took it
/// from a holder that died (written by each new holder, read by the holder).
struct mutex_state {
  robust_mutex m;
  bool owner_died = false;
};

/// procpool::recursive_mutex: as mutex_state (the depth is glibc's).
struct recursive_mutex_state {
  robust_recursive_mutex m;
  bool owner_died = false;
};

/// procpool::semaphore and bounded_semaphore: the count, the most it may
/// hold, and a wake-up channel for waiters.
struct semaphore_state {
  semaphore_state(std::uint32_t initial, std::uint32_t limit) : count(initial), maximum(limit) {}
  std::atomic<std::uint32_t> count;
  const std::uint32_t maximum;
  eventcount ec;
};

/// procpool::condition: a sequence number bumped by every notification,
/// which waiters sleep on (futex), and how many may sleep. Nothing in it
/// belongs to a waiter: a waiter killed at any point leaves at worst a count
/// one too high, which costs later notifications a system call each.
struct condition_state {
  std::atomic<std::uint32_t> seq{0};
  std::atomic<std::uint32_t> waiters{0};
};

/// procpool::event: the flag (0 or 1), and a wake-up channel for waiters.
struct event_state {
  std::atomic<std::uint32_t> flag{0};
  eventcount ec;
};

/// How long waits with no peer to watch sleep between two looks at their
/// condition. Wake-ups come from the eventcount; this only bounds the cost of
/// a wake-up lost to a process killed in the middle of notifying.
inline constexpr wait_policy quiet_wait{std::chrono::microseconds(2),
                                        std::chrono::milliseconds(200)};

/// Why a barrier broke (0: it did not).
enum class barrier_break : std::uint32_t {
  none = 0,
  aborted = 1,
  participant_died = 2,
  action_failed = 3,
  reset = 4
};

/// One participant of a barrier: a thread, known by pid, thread id and start
/// time, and the last phase it arrived in (`generation + 1`; 0: none yet).
/// An empty slot has pid 0.
struct barrier_slot {
  pid_t pid;
  pid_t tid;
  std::uint64_t start_time;
  std::uint32_t arrived_in;
};

/// procpool::barrier. Everything but `generation`, `broken` and the wake-up
/// channel is read and written under `m`, which is held only for short
/// bookkeeping, never while sleeping. The participant table (`parties` slots)
/// follows in the shared_object's extra bytes.
struct barrier_state {
  explicit barrier_state(std::uint32_t n) : parties(n) {}

  robust_mutex m;
  /// Process holding `m`: names the culprit if it dies holding it.
  pid_t holder = 0;
  std::uint32_t parties;
  /// Arrivals in the current phase (written under `m`; read without it by `waiting()`).
  std::atomic<std::uint32_t> arrived{0};
  /// Ended phases (completed, or cut short by `reset()`); waiters of a phase
  /// sleep until it changes.
  std::atomic<std::uint32_t> generation{0};
  /// Bit `g % 64` is set when phase `g` was ended by `reset()` rather than
  /// completed (written before `generation` moves on).
  std::atomic<std::uint64_t> reset_phases{0};
  /// A `barrier_break`; set once, never cleared.
  std::atomic<std::uint32_t> broken{0};
  /// Who broke it, written before `broken` (0 after abort).
  std::atomic<pid_t> culprit_pid{0};
  /// Thread of the participant that died; 0 when a process died inside a barrier call.
  std::atomic<pid_t> culprit_tid{0};
  eventcount ec;
};

}  // namespace procpool::detail
