// One object's state in its own small anonymous shared mapping, so that an
// object made in a parent (a mutex, an event) and its copies in children forked
// later all refer to the same bytes.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>

#include "../transport/shm.hpp"

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

}  // namespace procpool::detail
