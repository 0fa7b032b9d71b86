/// @file
/// Synchronization between processes: `mutex`, `recursive_mutex`,
/// `semaphore`, `bounded_semaphore`, `condition`, `event` and `barrier` —
/// Python's `Lock`, `RLock`, `Semaphore`, `BoundedSemaphore`, `Condition`,
/// `Event` and `Barrier` from `multiprocessing`.
///
/// Make one as an ordinary object, then fork: its state lives in a small
/// anonymous shared mapping that the object owns (one page), so the copy each
/// child inherits refers to the same state. Every process forked after the
/// object was made can use it; processes forked before cannot, and unrelated
/// processes cannot (share a `shared_value` by name for those).
///
/// Robust: a process that dies holding a `mutex` does not wedge the others —
/// the next locker gets the lock and `owner_died()` says so. A `barrier`
/// notices a participant that died instead of waiting for it forever. A
/// process killed while it waits on a `condition`, `semaphore` or `event`
/// harms no one: waits are futex waits on counters, not condition variables.
///
/// ```cpp
/// procpool::mutex m;
/// procpool::shared_value<long> total;
/// // ... in each of several forked processes:
/// for (int i = 0; i < 1000; ++i) {
///   std::lock_guard<procpool::mutex> hold(m);
///   total.store(total.load() + 1);
/// }
/// ```
#pragma once

#include <fmt/format.h>
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <type_traits>

#include "detail/os/clock.hpp"
#include "detail/os/liveness.hpp"
#include "detail/sync/shared_object.hpp"
#include "detail/sync/sync_state.hpp"
#include "detail/transport/wait.hpp"
#include "errors.hpp"

namespace procpool {

namespace detail {
template <class Lock>
struct condition_lock;
}  // namespace detail

/// A lock shared by processes (Python's `multiprocessing.Lock`), meeting the
/// standard's *TimedLockable*: use it with `std::lock_guard`,
/// `std::unique_lock` and `std::scoped_lock`.
///
/// Robust: when a process (or thread) dies holding it, the lock passes to the
/// next locker as usual and `owner_died()` returns true while that locker
/// holds it: the data the lock guards may be half-updated, so repair it (or
/// discard it) before unlocking. The lock itself needs no repair and stays
/// usable whatever the new holder does.
///
/// Not recursive: locking it again from the thread that holds it deadlocks
/// (use `recursive_mutex`). Not copyable or movable, like `std::mutex`.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
///
/// **Fork safety:** a child forked while a thread holds the lock does not hold
/// it; it blocks like anyone else until the holder unlocks.
class mutex {
 public:
  /// Makes an unlocked mutex in a fresh shared page.
  /// **Throws:** `std::system_error` when the page cannot be mapped.
  mutex();
  mutex(const mutex&) = delete;
  mutex& operator=(const mutex&) = delete;
  /// Unmaps the state; the creating process also destroys the lock. Destroy it
  /// only once no process uses it (it must not be held).
  ~mutex() = default;

  /// Blocks until the lock is held by the caller.
  /// **Throws:** `std::system_error` if the lock is unusable (destroyed by its creator).
  void lock();
  /// Takes the lock if it is free now; true when taken.
  bool try_lock();
  /// Takes the lock, waiting at most `timeout`; true when taken.
  template <class Rep, class Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& timeout);
  /// Takes the lock, waiting at most until `deadline`; true when taken.
  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline);
  /// Releases the lock.
  /// **Throws:** `procpool::error` when the calling thread does not hold it
  /// (unlike Python's `Lock`, another process or thread cannot release it: use
  /// a `bounded_semaphore` for that); nothing changes then.
  void unlock();

  /// True while some thread of some process holds the lock (Python's
  /// `locked()`); a holder that died no longer counts. Already stale when it
  /// returns: for reports, tests and assertions, not for deciding to lock.
  bool locked() const noexcept;

  /// True when the caller took the lock from a holder that died holding it.
  /// Valid only while the caller holds the lock; false after a normal handover.
  bool owner_died() const noexcept;

 private:
  bool took(detail::lock_status s) noexcept;
  detail::shared_object<detail::mutex_state> state_{0};
};

/// A lock shared by processes that its holder may take again (Python's
/// `multiprocessing.RLock`): it is released when `unlock()` has been called as
/// many times as it was taken. *TimedLockable*, robust and shared like
/// `mutex`: after a holder died, the next holder starts at depth one and
/// `owner_died()` is true while it holds the lock.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
///
/// **Fork safety:** as `mutex`; a child does not inherit its parent's holding.
class recursive_mutex {
 public:
  /// Makes an unlocked recursive mutex in a fresh shared page.
  /// **Throws:** `std::system_error` when the page cannot be mapped.
  recursive_mutex();
  recursive_mutex(const recursive_mutex&) = delete;
  recursive_mutex& operator=(const recursive_mutex&) = delete;
  /// Unmaps the state; the creating process also destroys the lock.
  ~recursive_mutex() = default;

  /// Blocks until the caller holds the lock (at once if it holds it already).
  /// **Throws:** `std::system_error` if the lock is unusable or taken too many times.
  void lock();
  /// Takes the lock if it is free now or already the caller's; true when taken.
  bool try_lock();
  /// Takes the lock, waiting at most `timeout`; true when taken.
  template <class Rep, class Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& timeout);
  /// Takes the lock, waiting at most until `deadline`; true when taken.
  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline);
  /// Undoes one `lock()`; the last one releases the lock.
  /// **Throws:** `procpool::error` when the calling thread does not hold it
  /// (Python's `RLock` raises too); nothing changes then.
  void unlock();

  /// True while some thread of some process holds the lock; a holder that
  /// died no longer counts. Already stale when it returns.
  bool locked() const noexcept;

  /// True when the caller took the lock from a holder that died holding it.
  /// Valid only while the caller holds the lock.
  bool owner_died() const noexcept;

 private:
  friend struct detail::condition_lock<recursive_mutex>;
  bool took(detail::lock_status s) noexcept;
  detail::shared_object<detail::recursive_mutex_state> state_{0};
};

/// A counting semaphore shared by processes (Python's
/// `multiprocessing.Semaphore`, C++20's `std::counting_semaphore`): `acquire`
/// takes one unit, waiting while there is none; `release` gives units back.
///
/// Units belong to no one: a process that dies after `acquire` does not give
/// its unit back (as in Python). Waiting is a futex wait on the count, so a
/// waiter killed while waiting harms no one.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
class semaphore {
 public:
  /// The largest count a semaphore can hold.
  static constexpr std::ptrdiff_t max() noexcept { return INT32_MAX; }

  /// Makes a semaphore holding `initial` units.
  /// **Throws:** `procpool::error` when `initial` is negative or above `max()`;
  /// `std::system_error` when the page cannot be mapped.
  explicit semaphore(std::ptrdiff_t initial);
  semaphore(const semaphore&) = delete;
  semaphore& operator=(const semaphore&) = delete;
  /// Unmaps the state. Destroy it only once no process waits on it.
  ~semaphore() = default;

  /// Takes a unit, waiting as long as it takes.
  void acquire();
  /// Takes a unit if one is there now; true when taken.
  bool try_acquire() noexcept;
  /// Takes a unit, waiting at most `timeout`; true when taken.
  template <class Rep, class Period>
  bool try_acquire_for(const std::chrono::duration<Rep, Period>& timeout);
  /// Takes a unit, waiting at most until `deadline`; true when taken.
  template <class Clock, class Duration>
  bool try_acquire_until(const std::chrono::time_point<Clock, Duration>& deadline);
  /// Gives back `n` units and wakes waiters.
  /// **Throws:** `procpool::error` when `n` is negative or the count would
  /// exceed `max()` (a `bounded_semaphore`: its `maximum()`); nothing changes then.
  void release(std::ptrdiff_t n = 1);
  /// The units available now (already stale when it returns; for tests and reports).
  std::ptrdiff_t value() const noexcept;

 protected:
  /// A semaphore holding `initial` units that `release` never takes beyond `maximum`.
  semaphore(std::ptrdiff_t initial, std::ptrdiff_t maximum, const char* what);
  /// The most units it may hold.
  std::ptrdiff_t limit() const noexcept;

 private:
  bool acquire_until(std::optional<detail::steady::time_point> deadline);
  detail::shared_object<detail::semaphore_state> state_;
};

/// A semaphore whose count may not exceed a maximum (Python's
/// `multiprocessing.BoundedSemaphore`): releasing a unit that was never taken
/// is a bug, and `release` reports it instead of letting the count grow.
/// Everything else is `semaphore`'s.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
class bounded_semaphore : public semaphore {
 public:
  /// Makes a semaphore holding `initial` units, at most `initial` (Python's
  /// `BoundedSemaphore(initial)`).
  /// **Throws:** as `semaphore(initial)`.
  explicit bounded_semaphore(std::ptrdiff_t initial)
      : semaphore(initial, initial, "bounded_semaphore") {}
  /// Makes a semaphore holding `initial` units, at most `maximum`.
  /// **Throws:** `procpool::error` unless 0 <= `initial` <= `maximum` <= `max()`;
  /// `std::system_error` when the page cannot be mapped.
  bounded_semaphore(std::ptrdiff_t initial, std::ptrdiff_t maximum)
      : semaphore(initial, maximum, "bounded_semaphore") {}
  /// The most units it may hold.
  std::ptrdiff_t maximum() const noexcept { return limit(); }
};

/// A condition variable shared by processes (Python's
/// `multiprocessing.Condition`, C++'s `std::condition_variable_any`): a
/// process holding a lock waits until another, having changed the state the
/// lock guards, notifies it. Use it with a `procpool::mutex` or
/// `recursive_mutex` (or a `std::unique_lock` of one) that guards state in
/// shared memory.
///
/// ```cpp
/// std::unique_lock<procpool::mutex> hold(m);
/// ready.wait(hold, [&] { return items.load() > 0; });
/// ```
///
/// Robust: a waiter killed at any point, asleep or not, leaves nothing
/// behind that `notify_*` or later waits depend on (no process-shared
/// pthread condition variable, whose bookkeeping a killed waiter corrupts).
/// A waiter killed after being notified takes that notification with it, as
/// in Python.
///
/// Spurious wake-ups: as with `std::condition_variable`, `wait` may return
/// without a notification (a notification also wakes waiters that were about
/// to sleep), so wait in a loop on a condition, or use the overloads that take
/// a predicate.
///
/// Waiting releases the lock as `lock.unlock()` does and retakes it with
/// `lock.lock()` before returning, whatever happened; waiting with a
/// `recursive_mutex` releases every level the caller holds and restores them.
/// After a wait, check `owner_died()` on the mutex as after any lock.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
class condition {
 public:
  /// Makes a condition variable.
  /// **Throws:** `std::system_error` when the page cannot be mapped.
  condition();
  condition(const condition&) = delete;
  condition& operator=(const condition&) = delete;
  /// Unmaps the state. Destroy it only once no process waits on it.
  ~condition() = default;

  /// Releases `lock`, sleeps until notified, takes `lock` again.
  /// **Throws:** `procpool::error` when the caller does not hold `lock` (then
  /// it does not wait); whatever `lock.lock()` throws.
  template <class Lock>
  void wait(Lock& lock);
  /// Waits until `pred()` is true (checked under the lock, first before any wait).
  template <class Lock, class Predicate>
  void wait(Lock& lock, Predicate pred);
  /// Waits at most `timeout`; `std::cv_status::timeout` when it expired.
  template <class Lock, class Rep, class Period>
  std::cv_status wait_for(Lock& lock, const std::chrono::duration<Rep, Period>& timeout);
  /// Waits until `pred()` or `timeout` expires; returns `pred()` (Python's `wait_for`).
  template <class Lock, class Rep, class Period, class Predicate>
  bool wait_for(Lock& lock, const std::chrono::duration<Rep, Period>& timeout, Predicate pred);
  /// Waits at most until `deadline`; `std::cv_status::timeout` when it passed.
  template <class Lock, class Clock, class Duration>
  std::cv_status wait_until(Lock& lock, const std::chrono::time_point<Clock, Duration>& deadline);
  /// Waits until `pred()` or `deadline`; returns `pred()`.
  template <class Lock, class Clock, class Duration, class Predicate>
  bool wait_until(Lock& lock, const std::chrono::time_point<Clock, Duration>& deadline,
                  Predicate pred);

  /// Wakes one waiter, if any (Python's `notify()`). Never blocks.
  void notify_one() noexcept { notify(1); }
  /// Wakes up to `n` waiters (Python's `notify(n)`). Never blocks.
  void notify(std::size_t n) noexcept;
  /// Wakes every waiter. Never blocks.
  void notify_all() noexcept;

 private:
  template <class Lock>
  std::cv_status wait_steady(Lock& lock, std::optional<detail::steady::time_point> deadline);
  template <class Lock, class Predicate>
  bool wait_steady(Lock& lock, std::optional<detail::steady::time_point> deadline, Predicate& pred);
  detail::shared_object<detail::condition_state> state_{0};
};

/// A flag shared by processes that others can wait for (Python's
/// `multiprocessing.Event`): `set()` wakes every waiter, and `wait()` returns
/// at once while the flag is set, until `clear()`.
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
class event {
 public:
  /// Makes an event whose flag is clear.
  /// **Throws:** `std::system_error` when the page cannot be mapped.
  event();
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  /// Unmaps the state. Destroy it only once no process waits on it.
  ~event() = default;

  /// Sets the flag and wakes every waiter.
  void set() noexcept;
  /// Clears the flag: later waits block until the next `set()`.
  void clear() noexcept;
  /// True while the flag is set.
  bool is_set() const noexcept;
  /// Waits until the flag is set.
  void wait();
  /// Waits at most `timeout` for the flag; returns whether it is set.
  template <class Rep, class Period>
  bool wait_for(const std::chrono::duration<Rep, Period>& timeout);
  /// Waits at most until `deadline` for the flag; returns whether it is set.
  template <class Clock, class Duration>
  bool wait_until(const std::chrono::time_point<Clock, Duration>& deadline);

 private:
  bool wait_until_steady(std::optional<detail::steady::time_point> deadline);
  detail::shared_object<detail::event_state> state_{0};
};

/// A meeting point for a fixed number of participants, phase after phase
/// (Python's `multiprocessing.Barrier`, C++20's `std::barrier`): each call of
/// `arrive_and_wait()` waits until `parties()` calls have arrived in this
/// phase, then all of them return and the next phase begins.
///
/// **Participants and their death.** A participant is a thread — of this
/// process or of any process forked after the barrier was made — that has
/// arrived at least once, or a process named by `enroll(pid)`. The barrier
/// keeps a table of up to `parties()` participants. While a call waits, it
/// checks every 10 ms whether a participant that has not yet arrived in the
/// current phase has ended (exited, was killed, or is a zombie waiting to be
/// reaped); if one has, the barrier breaks: every waiter, and every later
/// call, throws `broken_barrier` naming that participant's pid. A participant
/// that dies before its first arrival is unknown to the barrier unless it was
/// enrolled: enroll each child right after forking it to cover that case, or
/// use the timed variants. The set of participants is fixed: a participant
/// that ends for good while others still wait for it breaks the barrier, even
/// if a newcomer would have taken its place.
///
/// `abort()` breaks the barrier on purpose, waking every waiter with
/// `broken_barrier`. A broken barrier stays broken until `reset()`.
///
/// **The action.** A barrier may be given an `action`, run once per phase by
/// the participant that arrives last, in its own process, before anyone is
/// released (Python's `action`). It runs under the barrier's internal lock:
/// the other participants keep waiting meanwhile. If it throws, the barrier
/// breaks: that participant gets the exception, the others `broken_barrier`
/// (`reason::action_failed`). If its process dies in it, the barrier breaks
/// naming that process. Each process runs its own copy of the action (the one
/// it inherited when forked).
///
/// **Thread safety:** all members may be called concurrently from any thread
/// of any process forked after construction.
class barrier {
 public:
  /// Makes a barrier for `parties` participants per phase, running `action`
  /// (if any) each time a phase completes.
  /// **Throws:** `procpool::error` when `parties` is 0 or above 65536;
  /// `std::system_error` when the memory cannot be mapped.
  explicit barrier(std::size_t parties, std::function<void()> action = {});
  barrier(const barrier&) = delete;
  barrier& operator=(const barrier&) = delete;
  /// Unmaps the state. Destroy it only once no process waits on it.
  ~barrier() = default;

  /// Arrives and waits until all `parties()` have arrived in this phase.
  /// Returns the arrival index (Python's `wait()`): 0 for the first to arrive
  /// in the phase, `parties() - 1` for the last, which ran the action.
  /// **Throws:** `broken_barrier` when the barrier is or becomes broken; what
  /// the action throws, in the participant that ran it.
  std::size_t arrive_and_wait();
  /// Arrives and waits at most `timeout`. On timeout the arrival is withdrawn
  /// (the phase goes on without it, and the barrier stays usable) and it
  /// returns empty; otherwise the arrival index. (After a withdrawal, two
  /// participants of a phase may share an index.)
  /// **Throws:** as `arrive_and_wait`.
  template <class Rep, class Period>
  std::optional<std::size_t> arrive_and_wait_for(const std::chrono::duration<Rep, Period>& timeout);
  /// As `arrive_and_wait_for`, with a deadline.
  template <class Clock, class Duration>
  std::optional<std::size_t> arrive_and_wait_until(
      const std::chrono::time_point<Clock, Duration>& deadline);

  /// Registers the main thread of process `pid` as a participant now, so the
  /// barrier notices if it dies before its first arrival. Typically called by
  /// a parent right after forking each participant. Enrolling a participant
  /// already known does nothing.
  /// **Throws:** `procpool::error` when all `parties()` slots hold live
  /// participants; `broken_barrier` when the barrier is broken.
  void enroll(pid_t pid);
  /// Breaks the barrier: every waiter and every later call throws `broken_barrier`.
  void abort();
  /// Returns the barrier to its first, empty state (Python's `reset()`):
  /// participants waiting now throw `broken_barrier` (`reason::reset`), a
  /// broken barrier is usable again, and the participants are forgotten
  /// (enroll them again).
  void reset();
  /// True once the barrier is broken (until `reset()`).
  bool broken() const noexcept;
  /// How many participants have arrived in the current phase and wait (Python's
  /// `n_waiting`). Already stale when it returns; for tests and reports.
  std::size_t waiting() const noexcept;
  /// The number of arrivals that completes a phase.
  std::size_t parties() const noexcept;

 private:
  class guard;
  static constexpr std::uint32_t no_slot = UINT32_MAX;
  std::optional<std::size_t> arrive(std::optional<detail::steady::time_point> deadline);
  std::uint32_t find_or_take_slot(const detail::thread_identity& who, bool must);
  bool others_alive(std::uint32_t generation);
  bool ended_by_reset(std::uint32_t generation) const noexcept;
  void set_broken(detail::barrier_break why, pid_t pid, pid_t tid) noexcept;
  [[noreturn]] void throw_broken() const;
  detail::barrier_slot* slots() const noexcept {
    return static_cast<detail::barrier_slot*>(state_.extra());
  }
  detail::shared_object<detail::barrier_state> state_;
  std::function<void()> action_;
};

// ---------------------------------------------------------------------------
// mutex

namespace detail {
/// The lock needs no repair when its holder died: it is marked consistent at
/// once, so that it stays usable even if the new holder ignores owner_died().
/// The guarded data is the new holder's to check.
inline constexpr auto nothing_to_repair = [] {};

[[noreturn]] inline void throw_not_held(const char* what) {
  throw error(fmt::format("{}::unlock: the calling thread (process {}) does not hold the lock",
                          what, ::getpid()));
}
}  // namespace detail

inline mutex::mutex() = default;
inline void mutex::lock() {
  took(state_->m.lock(detail::nothing_to_repair));
}
inline bool mutex::try_lock() {
  return took(state_->m.try_lock(detail::nothing_to_repair));
}
template <class Rep, class Period>
bool mutex::try_lock_for(const std::chrono::duration<Rep, Period>& timeout) {
  return took(state_->m.lock_until(detail::deadline_after(timeout), detail::nothing_to_repair));
}
template <class Clock, class Duration>
bool mutex::try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return took(state_->m.lock_until(detail::to_steady(deadline), detail::nothing_to_repair));
}
inline void mutex::unlock() {
  if (!state_->m.unlock_if_held()) detail::throw_not_held("mutex");
}
inline bool mutex::locked() const noexcept {
  return state_->m.locked();
}
inline bool mutex::owner_died() const noexcept {
  return state_->owner_died;
}
inline bool mutex::took(detail::lock_status s) noexcept {
  if (s == detail::lock_status::busy) return false;
  state_->owner_died = s == detail::lock_status::owner_died;
  return true;
}

// ---------------------------------------------------------------------------
// recursive_mutex

inline recursive_mutex::recursive_mutex() = default;
inline void recursive_mutex::lock() {
  took(state_->m.lock(detail::nothing_to_repair));
}
inline bool recursive_mutex::try_lock() {
  return took(state_->m.try_lock(detail::nothing_to_repair));
}
template <class Rep, class Period>
bool recursive_mutex::try_lock_for(const std::chrono::duration<Rep, Period>& timeout) {
  return took(state_->m.lock_until(detail::deadline_after(timeout), detail::nothing_to_repair));
}
template <class Clock, class Duration>
bool recursive_mutex::try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return took(state_->m.lock_until(detail::to_steady(deadline), detail::nothing_to_repair));
}
inline void recursive_mutex::unlock() {
  if (!state_->m.unlock_if_held()) detail::throw_not_held("recursive_mutex");
}
inline bool recursive_mutex::locked() const noexcept {
  return state_->m.locked();
}
inline bool recursive_mutex::owner_died() const noexcept {
  return state_->owner_died;
}
inline bool recursive_mutex::took(detail::lock_status s) noexcept {
  if (s == detail::lock_status::busy) return false;
  // After a dead holder, glibc restarts the count at one: the dead holder's
  // depth went with it. Otherwise only the outermost lock resets the flag.
  if (s == detail::lock_status::owner_died) {
    state_->owner_died = true;
  } else if (state_->m.depth() == 1) {
    state_->owner_died = false;
  }
  return true;
}

// ---------------------------------------------------------------------------
// semaphore

inline semaphore::semaphore(std::ptrdiff_t initial) : semaphore(initial, max(), "semaphore") {}

inline semaphore::semaphore(std::ptrdiff_t initial, std::ptrdiff_t maximum, const char* what)
    : state_(0, static_cast<std::uint32_t>(initial < 0 || initial > maximum ? 0 : initial),
             static_cast<std::uint32_t>(maximum < 0 || maximum > max() ? 0 : maximum)) {
  if (maximum < 0 || maximum > max()) {
    throw error(fmt::format("{}: maximum {} is outside [0, {}]", what, maximum, max()));
  }
  if (initial < 0 || initial > maximum) {
    throw error(fmt::format("{}: initial count {} is outside [0, {}]", what, initial, maximum));
  }
}

inline bool semaphore::try_acquire() noexcept {
  auto& count = state_->count;
  std::uint32_t c = count.load(std::memory_order_relaxed);
  while (c > 0) {
    if (count.compare_exchange_weak(c, c - 1, std::memory_order_acquire,
                                    std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}

inline void semaphore::acquire() {
  acquire_until(std::nullopt);
}
template <class Rep, class Period>
bool semaphore::try_acquire_for(const std::chrono::duration<Rep, Period>& timeout) {
  return acquire_until(detail::deadline_after(timeout));
}
template <class Clock, class Duration>
bool semaphore::try_acquire_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return acquire_until(detail::to_steady(deadline));
}

inline bool semaphore::acquire_until(std::optional<detail::steady::time_point> deadline) {
  for (;;) {
    if (try_acquire()) return true;
    auto status = detail::wait_for_condition(
        state_->ec, [&] { return state_->count.load(std::memory_order_relaxed) > 0; }, deadline,
        [] { return true; }, detail::quiet_wait);
    if (status == detail::wait_status::timeout) return try_acquire();
  }
}

inline void semaphore::release(std::ptrdiff_t n) {
  if (n < 0) throw error(fmt::format("semaphore::release({}): the count must not be negative", n));
  auto& count = state_->count;
  std::ptrdiff_t most = limit();
  std::uint32_t c = count.load(std::memory_order_relaxed);
  do {
    if (n > most - static_cast<std::ptrdiff_t>(c)) {
      if (most == max()) {
        throw error(fmt::format("semaphore::release({}): the count {} would exceed max() = {}", n,
                                c, max()));
      }
      throw error(fmt::format(
          "bounded_semaphore::release({}): the count {} would exceed its maximum {} (released "
          "more often than acquired)",
          n, c, most));
    }
  } while (!count.compare_exchange_weak(c, static_cast<std::uint32_t>(c + n),
                                        std::memory_order_release, std::memory_order_relaxed));
  if (n > 0) state_->ec.notify();
}

inline std::ptrdiff_t semaphore::value() const noexcept {
  return static_cast<std::ptrdiff_t>(state_->count.load(std::memory_order_relaxed));
}
inline std::ptrdiff_t semaphore::limit() const noexcept {
  return static_cast<std::ptrdiff_t>(state_->maximum);
}

// ---------------------------------------------------------------------------
// condition

namespace detail {
/// How `condition` releases a lock fully and takes it back: one `unlock()`
/// and one `lock()`, except for a `recursive_mutex`, released at every depth.
template <class Lock>
struct condition_lock {
  static unsigned release(Lock& lock) {
    lock.unlock();
    return 1;
  }
  static void retake(Lock& lock, unsigned) { lock.lock(); }
};
template <>
struct condition_lock<recursive_mutex> {
  static unsigned release(recursive_mutex& m) {
    unsigned depth = m.state_->m.depth();  // meaningful only if held: the unlock checks
    m.unlock();                            // throws, changing nothing, when not held
    for (unsigned i = 1; i < depth; ++i) m.unlock();
    return depth;
  }
  static void retake(recursive_mutex& m, unsigned depth) {
    for (unsigned i = 0; i < depth; ++i) m.lock();
  }
};
template <class M>
struct condition_lock<std::unique_lock<M>> {
  static unsigned release(std::unique_lock<M>& lock) {
    if (!lock.owns_lock()) throw error("condition::wait: the unique_lock does not own its mutex");
    return condition_lock<M>::release(*lock.mutex());
  }
  static void retake(std::unique_lock<M>& lock, unsigned depth) {
    condition_lock<M>::retake(*lock.mutex(), depth);
  }
};
}  // namespace detail

inline condition::condition() = default;

template <class Lock>
void condition::wait(Lock& lock) {
  wait_steady(lock, std::nullopt);
}
template <class Lock, class Predicate>
void condition::wait(Lock& lock, Predicate pred) {
  wait_steady(lock, std::nullopt, pred);
}
template <class Lock, class Rep, class Period>
std::cv_status condition::wait_for(Lock& lock, const std::chrono::duration<Rep, Period>& timeout) {
  return wait_steady(lock, detail::deadline_after(timeout));
}
template <class Lock, class Rep, class Period, class Predicate>
bool condition::wait_for(Lock& lock, const std::chrono::duration<Rep, Period>& timeout,
                         Predicate pred) {
  return wait_steady(lock, detail::deadline_after(timeout), pred);
}
template <class Lock, class Clock, class Duration>
std::cv_status condition::wait_until(Lock& lock,
                                     const std::chrono::time_point<Clock, Duration>& deadline) {
  return wait_steady(lock, detail::to_steady(deadline));
}
template <class Lock, class Clock, class Duration, class Predicate>
bool condition::wait_until(Lock& lock, const std::chrono::time_point<Clock, Duration>& deadline,
                           Predicate pred) {
  return wait_steady(lock, detail::to_steady(deadline), pred);
}

template <class Lock, class Predicate>
bool condition::wait_steady(Lock& lock, std::optional<detail::steady::time_point> deadline,
                            Predicate& pred) {
  while (!pred()) {
    if (wait_steady(lock, deadline) == std::cv_status::timeout) return pred();
  }
  return true;
}

template <class Lock>
std::cv_status condition::wait_steady(Lock& lock,
                                      std::optional<detail::steady::time_point> deadline) {
  auto& s = *state_;
  // The key is read while the lock is held: a notifier that changes the
  // state under the lock after we release it also moves the sequence past
  // the key, and the futex then refuses to sleep.
  std::uint32_t key = s.seq.load(std::memory_order_acquire);
  unsigned depth = detail::condition_lock<Lock>::release(lock);  // throws when not held
  s.waiters.fetch_add(1, std::memory_order_seq_cst);
  bool timed_out = false;
  try {
    if (!deadline) {
      detail::futex_wait(&s.seq, key, std::nullopt);
    } else {
      auto left = *deadline - detail::steady::now();
      timed_out = left <= detail::steady::duration::zero() ||
                  !detail::futex_wait(&s.seq, key,
                                      std::chrono::duration_cast<std::chrono::nanoseconds>(left));
    }
  } catch (...) {
    s.waiters.fetch_sub(1, std::memory_order_relaxed);
    detail::condition_lock<Lock>::retake(lock, depth);
    throw;
  }
  s.waiters.fetch_sub(1, std::memory_order_relaxed);
  detail::condition_lock<Lock>::retake(lock, depth);
  // A notification that came just as the time ran out counts as one.
  if (timed_out && s.seq.load(std::memory_order_acquire) != key) timed_out = false;
  return timed_out ? std::cv_status::timeout : std::cv_status::no_timeout;
}

inline void condition::notify(std::size_t n) noexcept {
  if (n == 0) return;
  auto& s = *state_;
  // Ordered with each waiter's increment of `waiters` (both seq_cst): either
  // this sees the waiter, or the waiter's futex sees the new sequence.
  s.seq.fetch_add(1, std::memory_order_seq_cst);
  if (s.waiters.load(std::memory_order_seq_cst) != 0) {
    detail::futex_wake(&s.seq,
                       n > static_cast<std::size_t>(INT_MAX) ? INT_MAX : static_cast<int>(n));
  }
}
inline void condition::notify_all() noexcept {
  notify(static_cast<std::size_t>(INT_MAX));
}

// ---------------------------------------------------------------------------
// event

inline event::event() = default;
inline void event::set() noexcept {
  state_->flag.store(1, std::memory_order_release);
  state_->ec.notify();
}
inline void event::clear() noexcept {
  state_->flag.store(0, std::memory_order_release);
}
inline bool event::is_set() const noexcept {
  return state_->flag.load(std::memory_order_acquire) != 0;
}
inline void event::wait() {
  wait_until_steady(std::nullopt);
}
template <class Rep, class Period>
bool event::wait_for(const std::chrono::duration<Rep, Period>& timeout) {
  return wait_until_steady(detail::deadline_after(timeout));
}
template <class Clock, class Duration>
bool event::wait_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return wait_until_steady(detail::to_steady(deadline));
}
inline bool event::wait_until_steady(std::optional<detail::steady::time_point> deadline) {
  detail::wait_for_condition(
      state_->ec, [&] { return is_set(); }, deadline, [] { return true; }, detail::quiet_wait);
  return is_set();
}

// ---------------------------------------------------------------------------
// barrier

/// Holds the barrier's bookkeeping lock. A process that died holding it may
/// have left the counts half-updated (or died in the action): the barrier
/// breaks, naming it.
class barrier::guard {
 public:
  explicit guard(barrier& b) : s_(*b.state_) {
    s_.m.lock([&] {
      b.set_broken(detail::barrier_break::participant_died, s_.holder, 0);
      s_.ec.notify();
    });
    s_.holder = ::getpid();
  }
  guard(const guard&) = delete;
  guard& operator=(const guard&) = delete;
  ~guard() { unlock(); }
  void unlock() noexcept {
    if (locked_) {
      s_.holder = 0;
      s_.m.unlock();
      locked_ = false;
    }
  }

 private:
  detail::barrier_state& s_;
  bool locked_ = true;
};

inline barrier::barrier(std::size_t parties, std::function<void()> action)
    : state_((parties == 0 || parties > 65536 ? 0 : parties) * sizeof(detail::barrier_slot),
             static_cast<std::uint32_t>(parties == 0 || parties > 65536 ? 1 : parties)),
      action_(std::move(action)) {
  if (parties == 0 || parties > 65536) {
    throw error(fmt::format("barrier: {} parties; use 1 to 65536", parties));
  }
}

inline std::size_t barrier::arrive_and_wait() {
  return *arrive(std::nullopt);
}
template <class Rep, class Period>
std::optional<std::size_t> barrier::arrive_and_wait_for(
    const std::chrono::duration<Rep, Period>& timeout) {
  auto deadline = detail::deadline_after(timeout);
  if (!deadline) return *arrive(std::nullopt);
  return arrive(deadline);
}
template <class Clock, class Duration>
std::optional<std::size_t> barrier::arrive_and_wait_until(
    const std::chrono::time_point<Clock, Duration>& deadline) {
  auto steady = detail::to_steady(deadline);
  if (!steady) return *arrive(std::nullopt);
  return arrive(steady);
}

inline std::size_t barrier::parties() const noexcept {
  return state_->parties;
}
inline std::size_t barrier::waiting() const noexcept {
  return state_->arrived.load(std::memory_order_relaxed);
}
inline bool barrier::broken() const noexcept {
  return state_->broken.load(std::memory_order_acquire) != 0;
}

inline void barrier::set_broken(detail::barrier_break why, pid_t pid, pid_t tid) noexcept {
  auto& s = *state_;
  if (s.broken.load(std::memory_order_relaxed) != 0) return;  // the first cause stays
  s.culprit_pid.store(pid, std::memory_order_relaxed);
  s.culprit_tid.store(tid, std::memory_order_relaxed);
  s.broken.store(static_cast<std::uint32_t>(why), std::memory_order_release);
}

inline void barrier::throw_broken() const {
  auto& s = *state_;
  auto why = static_cast<detail::barrier_break>(s.broken.load(std::memory_order_acquire));
  auto reason = broken_barrier::reason::participant_died;
  if (why == detail::barrier_break::aborted) reason = broken_barrier::reason::aborted;
  if (why == detail::barrier_break::action_failed) reason = broken_barrier::reason::action_failed;
  throw broken_barrier(reason, s.culprit_pid.load(std::memory_order_relaxed),
                       s.culprit_tid.load(std::memory_order_relaxed));
}

inline bool barrier::ended_by_reset(std::uint32_t generation) const noexcept {
  return (state_->reset_phases.load(std::memory_order_acquire) >> (generation % 64) & 1u) != 0;
}

inline void barrier::abort() {
  {
    guard g(*this);
    set_broken(detail::barrier_break::aborted, 0, 0);
  }
  state_->ec.notify();
}

inline void barrier::reset() {
  auto& s = *state_;
  {
    guard g(*this);
    std::uint32_t generation = s.generation.load(std::memory_order_relaxed);
    if (s.arrived.load(std::memory_order_relaxed) != 0) {
      // End the phase without completing it: its waiters wake and throw.
      std::uint64_t bit = std::uint64_t{1} << (generation % 64);
      s.reset_phases.store(s.reset_phases.load(std::memory_order_relaxed) | bit,
                           std::memory_order_release);
      s.generation.store(generation + 1, std::memory_order_release);
    }
    s.arrived.store(0, std::memory_order_relaxed);
    auto* slot = slots();
    for (std::uint32_t i = 0; i < s.parties; ++i) slot[i] = detail::barrier_slot{0, 0, 0, 0};
    s.culprit_pid.store(0, std::memory_order_relaxed);
    s.culprit_tid.store(0, std::memory_order_relaxed);
    s.broken.store(0, std::memory_order_release);
  }
  s.ec.notify();
}

inline void barrier::enroll(pid_t pid) {
  guard g(*this);
  if (broken()) throw_broken();
  find_or_take_slot(detail::process_identity(pid), true);
}

// Called with the lock held. Returns the slot of `who`, taking an empty one,
// or else one whose participant has ended; `no_slot` when every slot holds a
// live participant (then throws when `must`).
inline std::uint32_t barrier::find_or_take_slot(const detail::thread_identity& who, bool must) {
  auto* slot = slots();
  std::uint32_t n = state_->parties;
  std::uint32_t empty = no_slot;
  for (std::uint32_t i = 0; i < n; ++i) {
    if (slot[i].pid == who.pid && slot[i].tid == who.tid && slot[i].start_time == who.start_time) {
      return i;
    }
    if (slot[i].pid == 0 && empty == no_slot) empty = i;
  }
  if (empty == no_slot) {
    for (std::uint32_t i = 0; i < n && empty == no_slot; ++i) {
      if (!detail::still_running({slot[i].pid, slot[i].tid, slot[i].start_time})) empty = i;
    }
  }
  if (empty == no_slot) {
    if (must) {
      throw error(
          fmt::format("barrier::enroll({}): all {} participants are known and alive", who.pid, n));
    }
    return no_slot;
  }
  slot[empty] = detail::barrier_slot{who.pid, who.tid, who.start_time, 0};
  return empty;
}

// Called between sleep slices by a waiter of phase `generation`: false (and
// the barrier broken) when a participant that has not arrived in it has ended.
inline bool barrier::others_alive(std::uint32_t generation) {
  auto& s = *state_;
  pid_t dead_pid = 0;
  pid_t dead_tid = 0;
  {
    guard g(*this);
    if (s.generation.load(std::memory_order_relaxed) != generation || broken()) return true;
    auto* slot = slots();
    for (std::uint32_t i = 0; i < s.parties; ++i) {
      if (slot[i].pid == 0 || slot[i].arrived_in == generation + 1) continue;
      if (!detail::still_running({slot[i].pid, slot[i].tid, slot[i].start_time})) {
        dead_pid = slot[i].pid;
        dead_tid = slot[i].tid;
        set_broken(detail::barrier_break::participant_died, dead_pid, dead_tid);
        break;
      }
    }
  }
  if (dead_pid == 0) return true;
  s.ec.notify();
  return false;
}

inline std::optional<std::size_t> barrier::arrive(
    std::optional<detail::steady::time_point> deadline) {
  auto& s = *state_;
  const auto& me = detail::this_thread_identity();
  std::uint32_t generation;
  std::uint32_t my_slot;
  std::size_t index;
  // How a phase this call waited in ended: completed (the index), or reset.
  auto released = [&]() -> std::size_t {
    if (ended_by_reset(generation)) throw broken_barrier(broken_barrier::reason::reset, 0, 0);
    return index;
  };
  {
    guard g(*this);
    if (broken()) throw_broken();
    my_slot = find_or_take_slot(me, false);
    generation = s.generation.load(std::memory_order_relaxed);
    if (my_slot != no_slot) slots()[my_slot].arrived_in = generation + 1;
    index = s.arrived.load(std::memory_order_relaxed);
    if (index + 1 == s.parties) {
      // The last arrival runs the action, then completes the phase and wakes the others.
      if (action_) {
        try {
          action_();
        } catch (...) {
          set_broken(detail::barrier_break::action_failed, 0, 0);
          g.unlock();
          s.ec.notify();
          throw;
        }
      }
      std::uint64_t bit = std::uint64_t{1} << (generation % 64);
      s.reset_phases.store(s.reset_phases.load(std::memory_order_relaxed) & ~bit,
                           std::memory_order_relaxed);
      s.arrived.store(0, std::memory_order_relaxed);
      s.generation.store(generation + 1, std::memory_order_release);
      g.unlock();
      s.ec.notify();
      return index;
    }
    s.arrived.fetch_add(1, std::memory_order_relaxed);
  }
  auto status = detail::wait_for_condition(
      s.ec,
      [&] {
        return s.generation.load(std::memory_order_acquire) != generation ||
               s.broken.load(std::memory_order_acquire) != 0;
      },
      deadline, [&] { return others_alive(generation); });
  if (status != detail::wait_status::timeout) {
    if (s.generation.load(std::memory_order_acquire) != generation) return released();
    throw_broken();
  }
  // Timed out: withdraw the arrival, unless the phase ended meanwhile.
  guard g(*this);
  if (s.generation.load(std::memory_order_relaxed) != generation) return released();
  if (broken()) throw_broken();
  s.arrived.fetch_sub(1, std::memory_order_relaxed);
  if (my_slot != no_slot) slots()[my_slot].arrived_in = generation;
  return std::nullopt;
}

}  // namespace procpool
