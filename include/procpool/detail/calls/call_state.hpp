// A call in flight, as every engine sees it, and how the calling thread
// holds an engine while it drives one: `call_state` (what a map, an imap or a
// submitted task is to the engine), `driver` (what an engine is to a call),
// `scoped_use` (threads take turns in a pool), `call_guard` and `drop_call`
// (a call ends on every way out of its user's scope), `function_ref` (a
// callback that does not outlive the call). The calls themselves are in
// map_calls.hpp; the front end that makes them, in call_front.hpp.
#pragma once

#include <cxxabi.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../os/fork.hpp"
#include "../os/type_name.hpp"

namespace procpool::detail {

inline constexpr std::uint64_t no_item = ~std::uint64_t(0);

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

/// A block of a task frame that is not copied into the chunk: it is read
/// from the caller's input when the frame goes out, after the first `at` of
/// the frame's own bytes.
struct frame_ref {
  std::size_t at = 0;
  const std::byte* data = nullptr;
  std::size_t size = 0;
};

/// The blocks of a chunk's frame left in the caller's input (see
/// `map_call`): the big arrays and strings among its items, and a chunk's
/// whole run of items when they lie contiguous there, which are then copied
/// once, into the ring, instead of twice. Held inline: it never allocates,
/// so a chunk moved out of the dispatcher leaves nothing to make again.
struct frame_refs {
  /// Blocks per chunk; the items after that are copied.
  static constexpr std::size_t capacity = 4;
  /// Smaller items are copied: an item is worth leaving where it is only
  /// when copying it costs more than keeping track of it (its count is
  /// written between blocks). A block larger than the ring streams through
  /// it from the input, in pieces.
  static constexpr std::size_t min_bytes = std::size_t(16) << 10;

  std::array<frame_ref, capacity> list{};
  std::size_t count = 0;  ///< blocks in `list`
  std::size_t bytes = 0;  ///< all the blocks' sizes

  bool full() const noexcept { return count == capacity; }
  /// Whether an item of `size` bytes is left in place: the list has room,
  /// and it is at least `min_bytes`.
  bool takes(std::size_t size) const noexcept { return !full() && size >= min_bytes; }
  bool empty() const noexcept { return count == 0; }
  /// Lists a block; the list must not be `full()`.
  void add(std::size_t at, const std::byte* data, std::size_t size) noexcept {
    list[count++] = frame_ref{at, data, size};
    bytes += size;
  }
  void clear() noexcept {
    count = 0;
    bytes = 0;
  }
  /// Moves every block `n` bytes further into the frame (bytes were put before them).
  void shift(std::size_t n) noexcept {
    for (std::size_t i = 0; i < count; ++i) list[i].at += n;
  }
  const frame_ref* begin() const noexcept { return list.data(); }
  const frame_ref* end() const noexcept { return list.data() + count; }
};

/// Hands `sink(data, n)` the bytes of a frame made of its own `own_size`
/// bytes at `own` with `blocks` between them, from the frame's byte `from`
/// on, in order, in as many pieces as they lie in, until `sink` has taken
/// `n` of them.
template <class Sink>
void copy_frame_out(const std::byte* own, std::size_t own_size, const frame_refs& blocks,
                    std::size_t from, std::size_t n, Sink&& sink) {
  std::size_t done = 0;  // own bytes before the piece being looked at
  std::size_t at = 0;    // frame bytes before it
  auto piece = [&](const std::byte* data, std::size_t size) {
    if (n == 0 || from >= at + size) {
      at += size;
      return;
    }
    std::size_t skip = from - at;
    std::size_t take = std::min(size - skip, n);
    sink(data + skip, take);
    from += take;
    n -= take;
    at += size;
  };
  for (const frame_ref& b : blocks) {
    if (n == 0) break;
    piece(own + done, b.at - done);
    done = b.at;
    piece(b.data, b.size);
  }
  piece(own + done, own_size - done);
}

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
  /// exhausted, or a window is full). With `refs` (when the engine can send
  /// a frame from several places), a call whose input stays put until the
  /// call ends may leave its big blocks there and list them in `refs`.
  virtual bool next_chunk(writer& out, frame_refs* refs, std::size_t max_count,
                          std::uint64_t& first, std::uint32_t& count, std::uint64_t& handler) = 0;
  /// Whether a chunk of the call may be encoded straight into a ring and
  /// kept nowhere: the call can encode any chunk of its again (`reencode`),
  /// its input staying put and readable at any position until it ends, and
  /// its chunks are not mere blocks of that input (those go from there).
  virtual bool places_chunks() const noexcept { return false; }
  /// Encodes the `count` items from item `first` again, as `next_chunk` did
  /// (into `out`, its blocks listed in `refs`), for a chunk sent again whose
  /// bytes were not kept. Only for a `places_chunks()` call.
  /// **Throws:** what reading or encoding an item throws; `error` when the
  /// input no longer holds those items.
  virtual void reencode(std::uint64_t first, std::uint32_t count, writer& out, frame_refs* refs) {
    (void)first, (void)count, (void)out, (void)refs;
    throw error("a chunk was to be encoded again from an input that cannot be read again");
  }
  /// Whether results from item `first` on, taken now, would be written past
  /// slots whose results are still to come (made first, value-initialized,
  /// and written again later): their answer is better left in its ring
  /// for a moment, as long as that stalls nothing (see `engine::hold_back`).
  virtual bool ahead_of_gap(std::uint64_t first) const noexcept {
    (void)first;
    return false;
  }
  /// Decodes the results of items `first` .. `first + count - 1` from `in`.
  /// Runs the user's decoders only: progress is reported by the caller of the call.
  virtual void on_results(std::uint64_t first, std::uint32_t count, reader& in) = 0;
  /// True for a call read through a range (`imap`): it advances only while
  /// someone reads it, so stopping the pool ends it rather than waiting for it.
  virtual bool is_range() const noexcept { return false; }
  /// Reports progress to the call's bar or `on_progress`, for a call no
  /// caller waits on (`map_async`): the pool's helper thread calls it.
  virtual void report_progress() {}

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
  /// True when the call is finished and its callbacks (`future::then`) ran:
  /// what a future's waiters wait for, as Python sets an `AsyncResult`'s
  /// event only after its callback returned. On the helper thread, which
  /// runs the callbacks, `finished()` is enough: a callback may wait on its
  /// own future.
  bool over() const noexcept;

  std::uint64_t id = 0;
  std::size_t in_flight = 0;  ///< chunks sent and not yet answered
  bool input_done = false;    ///< every chunk has been made
  bool dispatched = false;    ///< a chunk of it was cut to be sent (a future can no longer cancel)
  bool answered = false;      ///< an answer for a chunk of it came back
  /// Ended by a cancel before anything of it was sent. Atomic: a future's
  /// `cancelled()` reads it without entering the pool.
  std::atomic<bool> cancelled_unsent{false};
  /// The user gave up on the call (a dropped range, an exception on its way
  /// out): nothing more is sent for it and its results are dropped.
  std::atomic<bool> cancelled{false};
  /// What to run once the call is finished (`future::then`, `map_async`'s
  /// callbacks), on the pool's helper thread. Read and written under the driver.
  std::vector<std::function<void()>> callbacks;
  /// True from the first callback added until they all ran.
  std::atomic<bool> callbacks_due{false};

 private:
  std::uint64_t error_index_ = no_item;
  std::exception_ptr error_;
  std::exception_ptr aborted_;
};

/// What a call needs from whoever runs its chunks: the fork engine or the MPI engine.
///
/// The thread that waits drives: `drive_until` sends chunks and collects
/// results for every call in flight until `done()` holds. Threads take turns:
/// every entry point of a pool, its futures and its ranges enters the driver
/// first (a mutex), and an engine lets other threads in while the thread
/// driving it sleeps (`released`).
///
/// When no thread waits, the pool's own helper thread drives: it is started
/// the first time a user's thread leaves the pool with work still in flight
/// (a `submit`, a `map_async`; an `imap` range waits for its reader), and from then on it
/// sends and collects whenever no user's thread wants the pool, and runs the
/// callbacks of calls that are over (`future::then`). It steps aside for a
/// thread that enters, so a caller that waits on its result still collects
/// it itself, without a hand-over.
class driver {
 public:
  driver() = default;
  virtual ~driver() = default;
  driver(const driver&) = delete;
  driver& operator=(const driver&) = delete;

  /// What `try_enter` found.
  enum class entry { entered, reentrant, other_thread };
  /// Enters the driver if no thread holds it. The same thread entering again
  /// from inside a callback the pool runs (`on_progress`, an input iterator,
  /// an encoder, a decoder) is told so, and must touch nothing.
  entry try_enter() noexcept {
    if (foreign()) return entry::entered;
    std::uintptr_t me = thread_token();
    if (holder_.load(std::memory_order_relaxed) == me) return entry::reentrant;
    if (!mutex_.try_lock()) return entry::other_thread;
    holder_.store(me, std::memory_order_relaxed);
    return entry::entered;
  }
  /// Enters the driver, waiting while another thread holds it; false (and
  /// nothing entered) when the calling thread holds it already.
  bool enter() noexcept {
    if (foreign()) return true;
    std::uintptr_t me = thread_token();
    if (holder_.load(std::memory_order_relaxed) == me) return false;
    if (helper_started_.load(std::memory_order_relaxed) && helper_of_this_thread() != this) {
      // The helper thread leaves the pool to a user's thread that waits for it.
      entering_.fetch_add(1, std::memory_order_relaxed);
      mutex_.lock();
      entering_.fetch_sub(1, std::memory_order_relaxed);
    } else {
      mutex_.lock();
    }
    holder_.store(me, std::memory_order_relaxed);
    return true;
  }
  /// Ends what `try_enter` or `enter` began.
  void leave() noexcept {
    if (foreign()) return;
    holder_.store(0, std::memory_order_relaxed);
    mutex_.unlock();
  }
  /// Ends a user's turn in the pool: starts or wakes the helper thread when
  /// work is left in flight, then leaves.
  void leave_after_use() noexcept {
    if (!helper_allowed()) {
      // No helper thread (an MPI library that allows one thread at a time):
      // the callbacks of the calls that are over run here, on the way out.
      std::vector<std::shared_ptr<call_state>> due;
      if (!watched_.empty() && !foreign()) take_due(due, nullptr, false);
      leave();
      run_callbacks(due);
      return;
    }
    // Only after a task or a watched call was started: a reader stepping
    // through an imap range, or a map, never pays for the look.
    if (tasks_started_ && !helper_work_.load(std::memory_order_relaxed) && !foreign()) {
      if (!idle() || !watched_.empty())
        give_helper_work();
      else
        tasks_started_ = false;
    }
    leave();
  }
  /// True when the calling thread holds the driver.
  bool held_here() const noexcept {
    return !foreign() && holder_.load(std::memory_order_relaxed) == thread_token();
  }
  /// True in a forked copy of the process that made the pool. The copy's
  /// mutex may have been held by another thread (the helper) at the fork,
  /// and stays so there forever: a copy never locks it. Every operation of
  /// a copy is refused or lets go of the copy, and touches no worker.
  bool foreign() const noexcept { return this_pid() != creator_; }
  /// True on the helper thread of any pool (which runs callbacks).
  static bool on_helper_thread() noexcept { return helper_of_this_thread() != nullptr; }

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
  /// Sends what can be sent now, without waiting (`submit` and `map_async`
  /// dispatch at once; the helper thread does the rest).
  virtual void send_now() {}
  /// Sends and collects until `done()` or `deadline`; false on timeout.
  virtual bool drive_until(function_ref<bool()> done,
                           std::optional<std::chrono::steady_clock::time_point> deadline) = 0;
  /// Sends and collects until `done()`.
  void drive(function_ref<bool()> done) { drive_until(done, std::nullopt); }
  /// The user gave up on `call`: stop sending it, skip its queued items.
  virtual void cancel(call_state& call) noexcept = 0;
  /// Ends with `e` every task (a call that is no range) of which nothing was
  /// sent yet, and forgets it: it never runs (`executor::shutdown`). An
  /// engine that queues chunks in its workers ends those too that no worker
  /// started beyond the first two it holds, as many as a worker holds
  /// however short the chunks before them were.
  virtual void cancel_unsent(const std::exception_ptr& e) noexcept = 0;
  /// Throws if no more calls can run (closed, broken).
  virtual void check_usable(const char* operation) const = 0;
  /// How many bytes of items one chunk should carry at most.
  virtual std::size_t chunk_bytes() const noexcept = 0;
  /// How many chunks can run at once (workers, or serving ranks): sets default chunk sizes.
  virtual unsigned parallelism() const noexcept = 0;

  /// Has the helper thread run `call`'s callbacks and report its progress
  /// once it is finished (with the driver held). Returns true when the
  /// helper thread runs them; false when a user's thread leaving the pool
  /// does (`helper_allowed`), and a waiter must not wait for them.
  bool watch(const std::shared_ptr<call_state>& call) {
    watched_.push_back(call);
    tasks_started_ = true;
    return helper_allowed();
  }
  /// A task (or a `map_async`) was started that may outlive the caller's
  /// turn: the helper thread is told of it when the caller leaves. With the
  /// driver held.
  void task_started() noexcept { tasks_started_ = true; }

  /// Stops the helper thread after a last turn, in which it runs the
  /// callbacks of the calls that are over; every other watched call's
  /// callbacks are dropped. Call it without holding the driver, after the
  /// engine stopped (join, terminate). From the helper thread itself (a
  /// callback that stops or destroys its pool) it only tells the thread to
  /// end once that callback returns (`destroying`: the pool is being
  /// destroyed, and the thread touches it no more).
  void stop_helper(bool destroying = false) noexcept;

 protected:
  /// True when nothing is in flight for the helper to drive: no chunk out,
  /// no task waiting to be sent. With the driver held.
  virtual bool idle() const noexcept = 0;
  /// False when no thread of the pool's own may drive it (an MPI library
  /// without `MPI_THREAD_MULTIPLE`, where the user's thread may call MPI at
  /// any time): calls then move only while a user's thread waits.
  virtual bool helper_allowed() const noexcept { return true; }
  /// Wakes the threads asleep in `drive_until` (they re-check what they wait for).
  virtual void wake_sleepers() noexcept {}
  /// Engines call it after a step that moved any call along.
  void note_progress() noexcept { ++epoch_; }
  /// True when the helper thread should give the pool back to a user's thread.
  bool user_waiting() const noexcept { return entering_.load(std::memory_order_relaxed) > 0; }

 private:
  /// What the helper thread and the pool share; the thread holds it too, so
  /// a pool destroyed from one of its own callbacks leaves it valid.
  struct helper_control {
    std::mutex mutex;
    std::condition_variable wake;
    std::atomic<bool> stop{false};  // the pool stops: a last turn, then exit
    bool orphaned = false;          // the pool is gone (destroyed from a callback): touch nothing
  };

  static std::uintptr_t thread_token() noexcept {
    static thread_local char token;
    return reinterpret_cast<std::uintptr_t>(&token);
  }
  static driver*& helper_of_this_thread() noexcept {
    static thread_local driver* of = nullptr;
    return of;
  }
  void give_helper_work() noexcept;
  void helper_main(const std::shared_ptr<helper_control>& control);
  enum class turn_result { busy, turned, ran_callbacks };
  turn_result helper_turn(const helper_control& control);
  void take_due(std::vector<std::shared_ptr<call_state>>& due, const std::exception_ptr& broke,
                bool last) noexcept;
  static void run_callbacks(std::vector<std::shared_ptr<call_state>>& due) noexcept;

  std::mutex mutex_;
  // The thread in the driver (its token), 0 for none. Written by that thread
  // only, under the mutex; read by any thread to tell "me" from "not me".
  std::atomic<std::uintptr_t> holder_{0};
  // Users' threads waiting in `enter`: the helper thread gives way to them.
  std::atomic<unsigned> entering_{0};

  // The helper thread. Started and told of work under the driver.
  pid_t creator_ = this_pid();
  std::shared_ptr<helper_control> control_;
  std::thread* helper_ = nullptr;  // never destroyed in a forked copy: not its thread
  // True while the helper has something to do or is about to look; false
  // once it found the pool idle and sleeps until told. Written under the driver.
  std::atomic<bool> helper_work_{false};
  std::atomic<bool> helper_started_{false};           // counting `entering_` is worth it only then
  bool tasks_started_ = false;                        // since the helper last found the pool idle
  std::vector<std::shared_ptr<call_state>> watched_;  // calls with callbacks or progress
  std::uint64_t epoch_ = 0;                           // steps with progress (under the driver)
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
  ~scoped_use() { driver_.leave_after_use(); }
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

// ---------------------------------------------------------------------------
// The helper thread.

/// Writes to stderr that a callback threw (`what` names the callback); the
/// pool goes on, as Python's logs it and goes on.
inline void report_callback_error(const char* what) noexcept {
  try {
    std::string type = "unknown exception";
    if (auto* t = abi::__cxa_current_exception_type()) type = demangle(t->name());
    std::string message;
    try {
      throw;
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
      message = "(not derived from std::exception)";
    }
    fmt::print(stderr, "procpool: {} threw {}: {}; the pool goes on\n", what, type, message);
    std::fflush(stderr);
  } catch (...) {
  }
}

inline bool call_state::over() const noexcept {
  return finished() &&
         (!callbacks_due.load(std::memory_order_acquire) || driver::on_helper_thread());
}

inline void driver::give_helper_work() noexcept {
  if (helper_) {
    std::lock_guard<std::mutex> lock(control_->mutex);
    helper_work_.store(true, std::memory_order_relaxed);
    control_->wake.notify_one();
    return;
  }
  try {
    auto control = std::make_shared<helper_control>();
    helper_work_.store(true, std::memory_order_relaxed);
    // A thread whose state no child touches: forking beside it needs no warning.
    fork_safe_threads.fetch_add(1, std::memory_order_relaxed);
    try {
      helper_started_.store(true, std::memory_order_relaxed);
      helper_ = new std::thread([this, control] { helper_main(control); });
    } catch (...) {
      helper_started_.store(false, std::memory_order_relaxed);
      fork_safe_threads.fetch_sub(1, std::memory_order_relaxed);
      throw;
    }
    control_ = std::move(control);
  } catch (...) {
    // No thread now (threads or memory exhausted): the work moves when a
    // thread waits on it, and the next user's turn tries again.
    helper_work_.store(false, std::memory_order_relaxed);
  }
}

inline void driver::helper_main(const std::shared_ptr<helper_control>& control) {
  helper_of_this_thread() = this;
  bool nap = false;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(control->mutex);
      if (nap)
        control->wake.wait_for(lock, std::chrono::milliseconds(1));
      else
        control->wake.wait(lock, [&] {
          return control->stop.load() || helper_work_.load(std::memory_order_relaxed);
        });
      if (control->stop) break;
    }
    auto turn = helper_turn(*control);
    nap = turn == turn_result::busy;
    {
      std::lock_guard<std::mutex> lock(control->mutex);
      if (control->orphaned) {
        // Destroyed by a callback: `this` is gone. The thread ends now.
        fork_safe_threads.fetch_sub(1, std::memory_order_relaxed);
        return;
      }
    }
    // A future's waiter waits for its callbacks too.
    if (turn == turn_result::ran_callbacks) wake_sleepers();
  }
  // The last turn: the callbacks of the calls that are over run; the pool
  // stopped, so every other call is ended too.
  std::vector<std::shared_ptr<call_state>> due;
  enter();
  take_due(due, nullptr, true);
  leave();
  run_callbacks(due);
}

inline driver::turn_result driver::helper_turn(const helper_control& control) {
  if (user_waiting() || !mutex_.try_lock()) return turn_result::busy;
  holder_.store(thread_token(), std::memory_order_relaxed);
  std::vector<std::shared_ptr<call_state>> due;
  take_due(due, nullptr, false);
  std::exception_ptr broke;
  // A watched call still open on an idle pool is driven too: the drive
  // raises what broke the pool (its fork server lost), which ends the call.
  if (due.empty() && (!idle() || !watched_.empty())) {
    using clock = std::chrono::steady_clock;
    std::uint64_t start = epoch_;
    auto started = clock::now();
    try {
      // A turn ends when a user's thread wants the pool, or when something
      // moved and a watched call may be over (with many watched calls, at
      // most once a millisecond: each look walks them all).
      drive_until(
          [&] {
            if (control.stop.load(std::memory_order_relaxed) || user_waiting()) return true;
            if (epoch_ == start || watched_.empty()) return false;
            return watched_.size() < 256 || clock::now() - started >= std::chrono::milliseconds(1);
          },
          clock::now() + std::chrono::milliseconds(10));
    } catch (...) {
      broke = std::current_exception();
    }
    take_due(due, broke, false);
  }
  // Broken or stopped, the pool has nothing more to move: the helper sleeps
  // until a user's thread leaves work again.
  if (broke || (idle() && watched_.empty())) helper_work_.store(false, std::memory_order_relaxed);
  leave();
  if (due.empty()) return turn_result::turned;
  run_callbacks(due);
  return turn_result::ran_callbacks;
}

inline void driver::take_due(std::vector<std::shared_ptr<call_state>>& due,
                             const std::exception_ptr& broke, bool last) noexcept {
  for (std::size_t i = 0; i < watched_.size();) {
    auto& c = *watched_[i];
    if (!c.finished() && (broke || last)) {
      // The wait broke (the pool stopped or failed): the call ends with it,
      // as a future's would.
      c.abort(broke ? broke
                    : std::make_exception_ptr(pool_closed::while_pending("the pool stopped")));
      cancel(c);
    }
    bool finished = c.finished();
    try {
      c.report_progress();
    } catch (...) {
      if (!finished) {
        c.abort(std::current_exception());
        cancel(c);
        finished = true;
      } else {
        report_callback_error("on_progress");
      }
    }
    if (!finished) {
      ++i;
      continue;
    }
    if (!c.callbacks.empty())
      due.push_back(watched_[i]);
    else
      c.callbacks_due.store(false, std::memory_order_release);
    watched_[i] = std::move(watched_.back());
    watched_.pop_back();
  }
}

inline void driver::run_callbacks(std::vector<std::shared_ptr<call_state>>& due) noexcept {
  for (auto& c : due) {
    // Taken out under no lock: only the helper thread touches a finished
    // call's callbacks, and `then` on a finished call runs its own at once.
    auto callbacks = std::move(c->callbacks);
    c->callbacks.clear();
    for (auto& f : callbacks) {
      try {
        f();
      } catch (...) {
        report_callback_error("a callback");
      }
    }
    c->callbacks_due.store(false, std::memory_order_release);
  }
}

inline void driver::stop_helper(bool destroying) noexcept {
  if (!helper_) {
    helper_work_.store(true, std::memory_order_relaxed);  // never starts from now on
    return;
  }
  if (foreign()) return;  // a forked copy: the thread is not this process's
  bool here = helper_of_this_thread() == this;
  {
    std::lock_guard<std::mutex> lock(control_->mutex);
    control_->stop = true;
    if (destroying && here) control_->orphaned = true;
    control_->wake.notify_all();
  }
  wake_sleepers();
  if (here) {
    // From one of its own callbacks: the thread ends when the callback
    // returns (and counts itself out of `fork_safe_threads` then).
    if (!destroying) return;
    helper_->detach();
  } else {
    helper_->join();
    fork_safe_threads.fetch_sub(1, std::memory_order_relaxed);
  }
  delete helper_;
  helper_ = nullptr;
  helper_work_.store(true, std::memory_order_relaxed);
}

}  // namespace procpool::detail
