// One object's state in its own small anonymous shared mapping, so that an
// object made in a parent (a mutex, an event) and its copies in children forked
// later all refer to the same bytes. Also: deadlines on any clock, measured on
// the steady clock.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>

#include "shm.hpp"

namespace procpool::detail {

/// The state `State` of one synchronization object, placed in an anonymous
/// shared mapping of its own (one page for the small ones), followed by
/// `extra_bytes` of zeroed memory the object may use (the barrier keeps its
/// participant table there).
///
/// The process that made it is the only one that runs `~State`; in other
/// processes (children that inherited a copy) the destructor only unmaps.
/// Neither copyable nor movable: the mapping is the object's identity.
template <class State>
class shared_object {
 public:
  /// Maps the memory and constructs `State(args...)` in it.
  /// **Throws:** `std::system_error` naming mmap; whatever `State`'s constructor throws.
  template <class... Args>
  explicit shared_object(std::size_t extra_bytes, Args&&... args)
      : mapping_(align_up(sizeof(State), alignof(std::max_align_t)) + extra_bytes),
        creator_(::getpid()) {
    state_ = ::new (mapping_.data()) State(std::forward<Args>(args)...);
  }
  shared_object(const shared_object&) = delete;
  shared_object& operator=(const shared_object&) = delete;
  ~shared_object() {
    if (::getpid() == creator_) state_->~State();
  }

  /// The shared state.
  State& operator*() const noexcept { return *state_; }
  /// The shared state.
  State* operator->() const noexcept { return state_; }
  /// The `extra_bytes` after the state, suitably aligned for any scalar.
  void* extra() const noexcept {
    return static_cast<char*>(mapping_.data()) + align_up(sizeof(State), alignof(std::max_align_t));
  }

 private:
  shared_mapping mapping_;
  State* state_ = nullptr;
  pid_t creator_;
};

/// The steady-clock deadline `d` from now; saturates at the clock's maximum
/// instead of overflowing for huge durations (e.g. `duration::max()`).
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(const std::chrono::duration<Rep, Period>& d) {
  using std::chrono::steady_clock;
  auto now = steady_clock::now();
  auto room = steady_clock::time_point::max() - now;
  if (std::chrono::duration<double>(d) >= std::chrono::duration<double>(room) / 2) {
    return steady_clock::time_point::max();
  }
  return now + std::chrono::ceil<steady_clock::duration>(d);
}

/// `tp` as a point on the steady clock: itself when `Clock` is the steady
/// clock, otherwise now plus what is left until `tp` on `Clock`.
template <class Clock, class Duration>
std::chrono::steady_clock::time_point to_steady(
    const std::chrono::time_point<Clock, Duration>& tp) {
  if constexpr (std::is_same_v<Clock, std::chrono::steady_clock>) {
    return std::chrono::ceil<std::chrono::steady_clock::duration>(tp);
  } else {
    return deadline_after(tp - Clock::now());
  }
}

}  // namespace procpool::detail
