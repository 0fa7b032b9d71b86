// A call in flight, as every engine sees it, and how the calling thread
// holds an engine while it drives one: `call_state` (what a map, an imap or a
// submitted task is to the engine), `driver` (what an engine is to a call),
// `scoped_use` (threads take turns in a pool), `call_guard` and `drop_call`
// (a call ends on every way out of its user's scope), `function_ref` (a
// callback that does not outlive the call). The calls themselves are in
// map_calls.hpp; the front end that makes them, in call_front.hpp.
#pragma once

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

#include "../../codec.hpp"
#include "../../errors.hpp"

namespace procpool::detail {

inline constexpr std::uint64_t no_item = ~std::uint64_t(0);

template <class Range>
using range_item_t = std::decay_t<decltype(*std::begin(std::declval<Range&>()))>;
template <class R>
using stored_t = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

/// A non-owning reference to a callable, for a callback that does not outlive the call.
template <class Signature>
class function_ref;

template <class R, class... A>
class function_ref<R(A...)> {
 public:
  template <class G, class = std::enable_if_t<!std::is_same_v<std::decay_t<G>, function_ref>>>
  function_ref(G&& g) noexcept  // NOLINT: converts implicitly, like std::function
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(g)))),
        call_([](void* o, A... a) -> R {
          return (*static_cast<std::remove_reference_t<G>*>(o))(std::forward<A>(a)...);
        }) {}
  R operator()(A... a) const { return call_(object_, std::forward<A>(a)...); }

 private:
  void* object_;
  R (*call_)(void*, A...);
};

/// A call in flight: one map, imap or imap_unordered, or one submitted task.
/// Owned jointly by the driver (while chunks are in flight) and by whatever
/// the user holds (map's frame, an imap range, a future).
class call_state {
 public:
  virtual ~call_state() = default;

  /// Encodes the next chunk's items into `out` (appending), at most
  /// `max_count` items; sets `first`, `count` and `handler` (the token that
  /// names, to whoever runs the chunk, the code that runs it: see
  /// `Handlers`). Returns false when no chunk can be made now (input
  /// exhausted, or a window is full).
  virtual bool next_chunk(writer& out, std::size_t max_count, std::uint64_t& first,
                          std::uint32_t& count, std::uint64_t& handler) = 0;
  /// Decodes the results of items `first` .. `first + count - 1` from `in`.
  /// Runs the user's decoders only: progress is reported by the caller of the call.
  virtual void on_results(std::uint64_t first, std::uint32_t count, reader& in) = 0;
  /// True for a call read through a range (`imap`): it advances only while
  /// someone reads it, so stopping the pool ends it rather than waiting for it.
  virtual bool is_range() const noexcept { return false; }

  /// Records that item `index` failed with `e`; the lowest failing index wins.
  void fail(std::uint64_t index, std::exception_ptr e) noexcept {
    if (!error_ || index < error_index_) {
      error_index_ = index;
      error_ = std::move(e);
    }
  }
  /// True once an item failed.
  bool failed() const noexcept { return error_ != nullptr; }
  /// Index of the lowest failing item (when `failed()`).
  std::uint64_t error_index() const noexcept { return error_index_; }
  /// Ends the call now with `e`, whatever is still in flight: its waiters
  /// see `e` at their next step, its late results are dropped. The first
  /// ending wins; a call that finished already is left alone.
  void abort(std::exception_ptr e) noexcept {
    if (!aborted_ && !finished()) aborted_ = std::move(e);
    cancelled = true;
  }
  /// True once `abort` ended the call.
  bool aborted() const noexcept { return aborted_ != nullptr; }
  /// Rethrows what ended the call: the abort, else the lowest failing item's error.
  void rethrow_if_failed() const {
    if (aborted_) std::rethrow_exception(aborted_);
    if (error_) std::rethrow_exception(error_);
  }
  /// True when nothing of this call is in flight and nothing more will be
  /// sent, or when it was aborted: its waiters have nothing more to wait for.
  bool finished() const noexcept {
    return aborted_ || (in_flight == 0 && (input_done || error_ || cancelled));
  }

  std::uint64_t id = 0;
  std::size_t in_flight = 0;  ///< chunks sent and not yet answered
  bool input_done = false;    ///< every chunk has been made
  bool dispatched = false;    ///< a chunk of it was cut to be sent (a future can no longer cancel)
  /// Ended by a cancel before anything of it was sent. Atomic: a future's
  /// `cancelled()` reads it without entering the pool.
  std::atomic<bool> cancelled_unsent{false};
  /// The user gave up on the call (a dropped range, an exception on its way
  /// out): nothing more is sent for it and its results are dropped.
  std::atomic<bool> cancelled{false};

 private:
  std::uint64_t error_index_ = no_item;
  std::exception_ptr error_;
  std::exception_ptr aborted_;
};

/// What a call needs from whoever runs its chunks: the fork engine or the MPI engine.
///
/// The calling thread drives: `drive_until` sends chunks and collects results
/// for every call in flight until `done()` holds. Threads take turns: every
/// entry point of a pool, its futures and its ranges enters the driver
/// first (a mutex), and an engine lets other threads in while the thread
/// driving it sleeps (`released`).
class driver {
 public:
  virtual ~driver() = default;

  /// What `try_enter` found.
  enum class entry { entered, reentrant, other_thread };
  /// Enters the driver if no thread holds it. The same thread entering again
  /// from inside a callback the pool runs (`on_progress`, an input iterator,
  /// an encoder, a decoder) is told so, and must touch nothing.
  entry try_enter() noexcept {
    std::uintptr_t me = thread_token();
    if (holder_.load(std::memory_order_relaxed) == me) return entry::reentrant;
    if (!mutex_.try_lock()) return entry::other_thread;
    holder_.store(me, std::memory_order_relaxed);
    return entry::entered;
  }
  /// Enters the driver, waiting while another thread holds it; false (and
  /// nothing entered) when the calling thread holds it already.
  bool enter() noexcept {
    std::uintptr_t me = thread_token();
    if (holder_.load(std::memory_order_relaxed) == me) return false;
    mutex_.lock();
    holder_.store(me, std::memory_order_relaxed);
    return true;
  }
  /// Ends what `try_enter` or `enter` began.
  void leave() noexcept {
    holder_.store(0, std::memory_order_relaxed);
    mutex_.unlock();
  }
  /// True when the calling thread holds the driver.
  bool held_here() const noexcept {
    return holder_.load(std::memory_order_relaxed) == thread_token();
  }

  /// Lets other threads in while the thread that holds the driver sleeps,
  /// and takes it back after. Does nothing in a thread that does not hold
  /// it (an engine stopped by its destructor).
  class released {
   public:
    explicit released(driver& d) noexcept : d_(d.held_here() ? &d : nullptr) {
      if (d_) d_->leave();
    }
    ~released() {
      if (d_) d_->enter();
    }
    released(const released&) = delete;
    released& operator=(const released&) = delete;

   private:
    driver* d_;
  };

  /// The call is over for its user (returned, raised, or its handle dropped):
  /// cancels what is left of it and forgets it, so nothing in the driver
  /// keeps using its input or its results.
  virtual void end_call(call_state& call) noexcept {
    if (!call.finished()) cancel(call);
  }

  /// Registers a call and queues it for sending.
  virtual void start(const std::shared_ptr<call_state>& call) = 0;
  /// Sends and collects until `done()` or `deadline`; false on timeout.
  virtual bool drive_until(function_ref<bool()> done,
                           std::optional<std::chrono::steady_clock::time_point> deadline) = 0;
  /// Sends and collects until `done()`.
  void drive(function_ref<bool()> done) { drive_until(done, std::nullopt); }
  /// The user gave up on `call`: stop sending it, skip its queued items.
  virtual void cancel(call_state& call) noexcept = 0;
  /// Ends with `e` every task (a call that is no range) of which nothing was
  /// sent yet, and forgets it: it never runs (`executor::shutdown`).
  virtual void cancel_unsent(const std::exception_ptr& e) noexcept = 0;
  /// Throws if no more calls can run (closed, broken).
  virtual void check_usable(const char* operation) const = 0;
  /// How many bytes of items one chunk should carry at most.
  virtual std::size_t chunk_bytes() const noexcept = 0;
  /// How many chunks can run at once (workers, or serving ranks): sets default chunk sizes.
  virtual unsigned parallelism() const noexcept = 0;

 private:
  static std::uintptr_t thread_token() noexcept {
    static thread_local char token;
    return reinterpret_cast<std::uintptr_t>(&token);
  }
  std::mutex mutex_;
  // The thread in the driver (its token), 0 for none. Written by that thread
  // only, under the mutex; read by any thread to tell "me" from "not me".
  std::atomic<std::uintptr_t> holder_{0};
};

/// Holds a driver for the calling thread for one entry point, waiting while
/// another thread holds it.
/// **Throws:** `procpool::error` when the pool is entered again from inside
/// one of its own calls.
class scoped_use {
 public:
  scoped_use(driver& d, const char* operation) : driver_(d) {
    if (d.enter()) return;
    throw error(fmt::format(
        "{} called on a pool from inside one of its own calls (from a callback the pool "
        "runs: on_progress, an input iterator, an encoder or a decoder); a pool does not run "
        "calls re-entrantly",
        operation));
  }
  ~scoped_use() { driver_.leave(); }
  scoped_use(const scoped_use&) = delete;
  scoped_use& operator=(const scoped_use&) = delete;

 private:
  driver& driver_;
};

/// Ends a call for its user on every way out of the scope that runs it:
/// normal return or exception (`driver::end_call`).
class call_guard {
 public:
  call_guard(driver& d, call_state& call) noexcept : driver_(d), call_(call) {}
  ~call_guard() { driver_.end_call(call_); }
  call_guard(const call_guard&) = delete;
  call_guard& operator=(const call_guard&) = delete;

 private:
  driver& driver_;
  call_state& call_;
};

/// Drops the call of a range or a future whose handle is destroyed (noexcept:
/// from a destructor): the call ends and is forgotten, so nothing reads its
/// input or writes its results once the handle is gone. It waits for the
/// pool while another thread holds it. From inside a callback of the pool:
/// `end_call`, which leaves the queues alone while they are walked.
inline void drop_call(const std::weak_ptr<driver>& weak, call_state& call) noexcept {
  auto d = weak.lock();
  if (!d) return;
  if (d->enter()) {
    d->end_call(call);
    d->leave();
  } else {
    d->end_call(call);
  }
}

}  // namespace procpool::detail
