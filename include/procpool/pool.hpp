/// @file
/// `pool<F>`: worker processes that map a function over inputs and return the
/// results in input order — Python's `multiprocessing.Pool` for C++.
///
/// ```cpp
/// procpool::pool p([](int x) { return x * x; });
/// std::vector<int> squares = p.map(std::vector<int>{1, 2, 3});  // {1, 4, 9}
/// ```
///
/// What a call hands back comes with this header: `future<R>` from `submit`,
/// `imap_range<R>` and `imap_unordered_range<R>` from `imap` and
/// `imap_unordered` (defined beside the calls they hold, in
/// detail/calls/handles.hpp), and `progress_info` (progress.hpp).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "codec.hpp"
#include "detail/calls/call_checks.hpp"
#include "detail/calls/call_front.hpp"
#include "detail/engine/fork_engine.hpp"
#include "detail/os/clock.hpp"
#include "errors.hpp"
#include "process.hpp"
#include "progress.hpp"

namespace procpool {

/// The most workers a pool or an executor may have. Each worker is a process
/// with two rings of `ring_bytes` and a descriptor, and no machine procpool
/// runs on has more than a few hundred cores: 4096 is 16 times the largest
/// core count of common servers (256), so a count above it is a mistake (a
/// negative number converted to `unsigned`, a byte count passed as a count),
/// refused with a message rather than tried as gigabytes of rings and
/// thousands of forks.
inline constexpr unsigned max_workers = 4096;

namespace detail {
/// Refuses a worker count above `max_workers`.
inline void check_worker_count(unsigned long long workers) {
  if (workers > max_workers)
    throw error(fmt::format(
        "{} workers were asked for; a pool has at most procpool::max_workers = {} (a count this "
        "large is usually a negative number converted to unsigned)",
        workers, max_workers));
}
}  // namespace detail

/// What a pool's destructor does with the work still in flight.
enum class exit_policy {
  /// Finish it, then stop the workers: Python's `close(); join()`, and the end
  /// of `ProcessPoolExecutor`'s `with` block. The default.
  wait,
  /// Stop the workers at once (`terminate()`): Python's `with Pool() as p:`.
  /// Pending futures and ranges raise `pool_closed`.
  terminate,
};

/// Options of one `map`, `starmap`, `imap` or `imap_unordered` call, beside
/// the pool's own: Python's `chunksize` argument. An aggregate:
/// `p.map(xs, {.chunk_size = 100})` in C++20, `p.map(xs, {100})` in C++17.
struct map_options {
  /// Items per chunk for this call; 0 means the pool's `chunk_size`.
  std::size_t chunk_size = 0;
};

/// How a pool runs. A plain aggregate: assign members one by one in C++17,
/// or use designated initializers in C++20 (`{.workers = 4, .chunk_size = 100}`).
struct pool_options {
  /// Worker processes; 0 means `cpu_count()`; at most `max_workers`.
  unsigned workers = 0;
  /// Items per chunk sent to a worker; 0 means Python's default,
  /// `ceil(n / (4 * workers))`. Chunks are also cut short so that one fits
  /// half a ring (`ring_bytes / 2`) whenever a single item does, and, over
  /// a random-access input, so that one fits the free room of its worker's
  /// ring (it is encoded straight there).
  std::size_t chunk_size = 0;
  /// Run once in each worker when it starts (and in each replacement). If it
  /// throws, the pool is unusable and every call raises a `procpool::error`
  /// naming the exception. Workers start with SIGINT and SIGTERM at their
  /// default actions, whatever the parent's handlers; the initializer may
  /// change that.
  std::function<void()> initializer{};  // {}: designated initializers may leave it out
  /// Replace a worker after it ran this many items; 0 means never.
  std::size_t max_tasks_per_child = 0;
  /// An item running longer than this is abandoned: its worker is killed and
  /// replaced and the call raises `timeout_error`. Zero means no limit.
  std::chrono::nanoseconds task_timeout{0};
  /// Bytes of each of the two rings per worker (rounded up to a power of two).
  /// Larger messages are streamed through, so this bounds memory, not item size.
  std::size_t ring_bytes = std::size_t(1) << 20;
  /// How long a worker that ran out of chunks stays awake, watching its ring
  /// for the next, before it sleeps. A chunk that comes within it is taken
  /// without a wake-up, which costs several microseconds (more on a virtual
  /// machine): a loop of `submit(x).get()` round trips, and a caller that
  /// sends chunks a little slower than workers run them, stay fast. Longer
  /// spins help little and, on a machine with few cores, take a core from
  /// the threads that must wake next (a callback's on the helper thread ran
  /// 10 µs later with 10 µs of spin, here). Zero puts idle workers to sleep
  /// at once, which gives the time to other processes.
  std::chrono::nanoseconds worker_spin{std::chrono::microseconds(2)};
  /// Bytes of freed memory each worker keeps for its next items instead of
  /// returning them to the kernel (with glibc; blocks up to this size, at
  /// most 32 MiB, then come from the worker's heap rather than from fresh
  /// mappings). A worker that decodes an 8 MiB item, and whose function
  /// copies it, otherwise takes two page faults per 4 KiB of every item, more
  /// than the copies themselves cost. A worker's memory stays at its peak
  /// plus at most this much; 0 keeps the allocator's defaults.
  std::size_t worker_keep_memory = std::size_t(64) << 20;
  /// Draw a progress bar on stderr when stderr is a terminal, for every call
  /// kind: `map`, `starmap`, `imap`, `imap_unordered`, `map_async`, and
  /// batches of submitted tasks (see the guide's Progress).
  bool progress = false;
  /// Called with the progress of every call kind, as `progress` draws it (at
  /// most ten times a second, and once at the end); replaces the bar when
  /// set. Runs on the pool's helper thread for `map_async` and submitted tasks.
  std::function<void(const progress_info&)> on_progress{};
  /// What the destructor does with work in flight: wait for it (the
  /// default), or terminate the workers at once, as Python's `with Pool()`.
  exit_policy on_exit = exit_policy::wait;
};

/// A pool of worker processes running `F`, made by `fork()` at construction.
///
/// Any callable works, lambdas with captures included: each worker is a copy
/// of this process and calls its own copy of `f`, as it was when the worker
/// was forked. Only inputs and results cross process boundaries, through
/// shared memory, encoded by `codec.hpp`.
///
/// **Failure contract:** an exception in `f` raises `task_error` for the lowest
/// failing index; a worker that dies raises `worker_died` naming the item it
/// ran and is replaced; an item past `task_timeout` raises `timeout_error`.
/// The pool stays usable after each of these.
///
/// **Thread safety:** a pool, its futures and its ranges may be used from
/// any number of threads at once. Threads take turns inside the pool: one
/// sends and collects while the others wait for it, and a thread waiting for
/// results lets the others in while it sleeps, so a long `map` in one thread
/// does not hold up another's `submit`. Whichever thread collects may run
/// another call's input iterator, encoder or decoder. A call from inside a
/// callback the pool runs (`on_progress`, an input iterator, an encoder, a
/// decoder) throws `procpool::error` and touches nothing. `close()` and
/// `terminate()` are safe from any thread: `terminate()` stops the pool at a
/// busy thread's next step (its call raises `pool_closed`) and returns once
/// the workers are reaped. Work moves while some thread waits on the pool.
///
/// **Fork safety:** create pools before starting threads (see the guide's
/// gotchas). Not copyable, not movable: the workers hold on to `f` where it is.
template <class F>
class pool {
 public:
  /// Starts `cpu_count()` workers running `f`.
  /// **Throws:** `std::system_error` if a worker cannot be forked or the shared
  /// memory cannot be mapped; no worker is left running then.
  explicit pool(F f) : pool(std::move(f), pool_options{}) {}
  /// Starts `workers` workers running `f`.
  /// **Throws:** `procpool::error` if `workers` is 0, negative or above
  /// `max_workers`; as above otherwise.
  template <class Count,
            std::enable_if_t<std::is_integral_v<Count> && !std::is_same_v<Count, bool>, int> = 0>
  pool(F f, Count workers) : pool(std::move(f), options_with_workers(workers)) {}
  /// Starts a pool as `options` say.
  /// **Throws:** `procpool::error` if `options.workers` is above `max_workers`,
  /// or 0 after defaulting; as above otherwise.
  pool(F f, pool_options options);
  /// With `exit_policy::wait` (the default), finishes the work in flight
  /// and stops the workers (see `join`), as Python's `close(); join()`; with
  /// `exit_policy::terminate`, stops them at once (see `terminate`), as
  /// Python's `with Pool() as p:`. Never throws. Open `imap` ranges end:
  /// their next step raises `pool_closed`.
  ~pool();
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;

  /// Applies `f` to every item of `inputs` and returns the results in input order
  /// (Python's `Pool.map`). `inputs` is any range: a container, an array, a pair of
  /// iterators in a struct with begin/end, a C++20 view. Items are read from it
  /// while the call runs, and read again for a chunk sent again after its
  /// worker died: leave it unchanged until `map` returns (nothing is read after).
  ///
  /// **Throws:** `task_error` (lowest failing index), `worker_died`,
  /// `timeout_error`, `pool_closed` after `close()`; the pool stays usable after
  /// the first three.
  template <class Range>
  auto map(Range&& inputs);
  /// `map` with options for this call (`{.chunk_size = n}`: Python's `chunksize`).
  template <class Range>
  auto map(Range&& inputs, map_options options);
  /// `map` over a braced list of items: `p.map({1, 2, 3})`.
  template <class T>
  auto map(std::initializer_list<T> inputs) {
    return map(std::vector<T>(inputs));
  }

  /// `map` that writes the results into memory the caller owns, in input
  /// order, and returns the end of what it wrote (as `std::transform`). `out`
  /// is one of:
  /// - a `std::vector<R>` (`R` the function's result type): resized to the
  ///   number of items. A vector that already has that size (the last call's)
  ///   keeps its memory, so a repeated map takes no page faults;
  /// - a writable contiguous range of `R` (`std::span<R>`, `std::array`, an
  ///   array) with room for every result; returns a pointer past the last;
  /// - a pointer or a `std::vector<R>` iterator, with room after it, which the
  ///   caller vouches for as with `std::transform`;
  /// - any other output iterator (`std::back_inserter(list)`): the results
  ///   are assigned through it in order, once every one has arrived.
  ///
  /// Results are decoded straight into `out` as their chunks come back, in
  /// any order. When the call fails, the results that arrived are in place
  /// and the rest of `out` is as it was (the vector keeps its new size).
  ///
  /// **Throws:** as `map`; `std::length_error` naming both sizes, before
  /// anything runs, when a range has less room than the input has items.
  template <class Range, class Out>
  auto map_into(Range&& inputs, Out&& out) {
    return map_into(std::forward<Range>(inputs), std::forward<Out>(out), map_options{});
  }
  /// `map_into` with options for this call.
  template <class Range, class Out>
  auto map_into(Range&& inputs, Out&& out, map_options options) {
    if constexpr (detail::check_map<detail::call_shape::one_item, F, Range>())
      return calls_.template map_into<detail::invoke_one>(inputs, std::forward<Out>(out),
                                                          "map_into", options.chunk_size);
  }

  /// `map_into` for a function of several arguments: each item is a tuple
  /// whose elements are passed as the arguments (as `starmap`).
  template <class Range, class Out>
  auto starmap_into(Range&& inputs, Out&& out) {
    return starmap_into(std::forward<Range>(inputs), std::forward<Out>(out), map_options{});
  }
  /// `starmap_into` with options for this call.
  template <class Range, class Out>
  auto starmap_into(Range&& inputs, Out&& out, map_options options) {
    if constexpr (detail::check_map<detail::call_shape::tuple_item, F, Range>())
      return calls_.template map_into<detail::invoke_apply>(inputs, std::forward<Out>(out),
                                                            "starmap_into", options.chunk_size);
  }

  /// `map` for a function of several arguments: each item is a tuple (or pair)
  /// whose elements are passed as the arguments (Python's `Pool.starmap`).
  template <class Range>
  auto starmap(Range&& inputs);
  /// `starmap` with options for this call.
  template <class Range>
  auto starmap(Range&& inputs, map_options options);
  /// `starmap` over a braced list of tuples: `p.starmap({std::tuple(1, 2), std::tuple(3, 4)})`.
  template <class T>
  auto starmap(std::initializer_list<T> inputs) {
    return starmap(std::vector<T>(inputs));
  }

  /// A lazy range of results in input order (Python's `Pool.imap`). Input is
  /// read only as workers need it and at most a few chunks per worker are in
  /// flight, so an endless input works and memory stays bounded. An lvalue
  /// `inputs` must outlive the iteration; an rvalue is moved into the range.
  /// Dropping the range cancels what is left of the call.
  template <class Range>
  auto imap(Range&& inputs);
  /// `imap` with options for this call.
  template <class Range>
  auto imap(Range&& inputs, map_options options);
  /// `imap` over a braced list of items, copied into the range.
  template <class T>
  auto imap(std::initializer_list<T> inputs) {
    return imap(std::vector<T>(inputs));
  }

  /// A lazy range of `(index, result)` pairs in the order they finish
  /// (Python's `Pool.imap_unordered`).
  template <class Range>
  auto imap_unordered(Range&& inputs);
  /// `imap_unordered` with options for this call.
  template <class Range>
  auto imap_unordered(Range&& inputs, map_options options);
  /// `imap_unordered` over a braced list of items, copied into the range.
  template <class T>
  auto imap_unordered(std::initializer_list<T> inputs) {
    return imap_unordered(std::vector<T>(inputs));
  }

  /// `map` without waiting (Python's `Pool.map_async`): reads `inputs` into
  /// a vector now, starts the call and returns a future of every result in
  /// input order (`future<std::vector<R>>`; `future<void>` for a function
  /// that returns nothing). The pool's helper thread moves the call along
  /// while the caller does something else, draws its progress, and calls
  /// `callback(results)` (`callback()` for `void`) when every result is in,
  /// or `error_callback(std::exception_ptr)` with the error `get()` raises
  /// (see `future::then`).
  /// **Throws:** `pool_closed` after `close()`; what the input's iterators throw.
  template <class Range, class OnValue = detail::ignore_value, class OnError = detail::ignore_error,
            class = std::enable_if_t<!std::is_same_v<std::decay_t<OnValue>, map_options>>>
  auto map_async(Range&& inputs, OnValue callback = {}, OnError error_callback = {}) {
    return map_async(std::forward<Range>(inputs), map_options{}, std::move(callback),
                     std::move(error_callback));
  }
  /// `map_async` with options for this call.
  template <class Range, class OnValue = detail::ignore_value, class OnError = detail::ignore_error>
  auto map_async(Range&& inputs, map_options options, OnValue callback = {},
                 OnError error_callback = {}) {
    if constexpr (detail::check_map<detail::call_shape::one_item, F, Range>())
      return calls_.template map_async<detail::invoke_one>(
          inputs, "map_async", options.chunk_size, std::move(callback), std::move(error_callback));
  }
  /// `map_async` for a function of several arguments, each item a tuple
  /// (Python's `Pool.starmap_async`).
  template <class Range, class OnValue = detail::ignore_value, class OnError = detail::ignore_error,
            class = std::enable_if_t<!std::is_same_v<std::decay_t<OnValue>, map_options>>>
  auto starmap_async(Range&& inputs, OnValue callback = {}, OnError error_callback = {}) {
    return starmap_async(std::forward<Range>(inputs), map_options{}, std::move(callback),
                         std::move(error_callback));
  }
  /// `starmap_async` with options for this call.
  template <class Range, class OnValue = detail::ignore_value, class OnError = detail::ignore_error>
  auto starmap_async(Range&& inputs, map_options options, OnValue callback = {},
                     OnError error_callback = {}) {
    if constexpr (detail::check_map<detail::call_shape::tuple_item, F, Range>())
      return calls_.template map_async<detail::invoke_apply>(
          inputs, "starmap_async", options.chunk_size, std::move(callback),
          std::move(error_callback));
  }

  /// Runs `f(args...)` in a worker and returns a future for its result
  /// (Python's `apply_async`). The task is sent at once; the pool's helper
  /// thread collects it while nobody waits, and `get()` collects it itself.
  template <class... Args>
  auto submit(Args&&... args);
  /// Runs `f(args...)` in a worker and waits for its result (Python's
  /// `apply`): `submit(args...).get()`.
  /// **Throws:** as `future::get`, and `pool_closed` after `close()`.
  template <class... Args>
  auto apply(Args&&... args) {
    return submit(std::forward<Args>(args)...).get();
  }
  /// `submit` of a function that takes a container, given as a braced list:
  /// `p.submit({1, 2, 3})` sends a `std::vector`.
  template <class T>
  auto submit(std::initializer_list<T> items) {
    return submit(std::vector<T>(items));
  }

  /// Accepts no more calls; work in flight still completes. Safe from any thread.
  void close() noexcept { engine_->close(); }
  /// Finishes the work in flight (pending futures included), then stops the
  /// workers: stop frames, a bounded wait, SIGTERM, SIGKILL. Every worker is
  /// reaped. Implies `close()`. Open `imap` ranges are not waited for: they
  /// end, and their next step raises `pool_closed`.
  void join() {
    {
      detail::scoped_use use(*engine_, "join");
      engine_->join();
    }
    engine_->stop_helper();  // after the callbacks of the calls that finished
  }
  /// Stops the workers now (SIGTERM, then SIGKILL after a bounded wait) and
  /// reaps them. Every pending call, future and range raises `pool_closed`.
  /// From a callback of the pool's, the pool stops when the callback returns;
  /// from another thread, at the next step of a thread busy in the pool, and
  /// this waits for it.
  void terminate() noexcept;

  /// Number of worker processes.
  unsigned workers() const noexcept { return engine_->size(); }
  /// Pids of the workers now (they change as workers are replaced); 0 for a stopped one.
  std::vector<pid_t> pids() const {
    detail::scoped_use use(*engine_, "pids");
    return engine_->pids();
  }

 private:
  template <class R>
  friend class future;
  friend class executor;

  template <class Count>
  static pool_options options_with_workers(Count workers) {
    if constexpr (std::is_signed_v<Count>) {
      if (workers < 0)
        throw error(fmt::format("a pool needs a positive number of workers; {} were asked for",
                                static_cast<long long>(workers)));
    }
    if (workers == 0) throw error("a pool needs at least one worker; 0 were asked for");
    detail::check_worker_count(static_cast<unsigned long long>(workers));
    pool_options o;
    o.workers = static_cast<unsigned>(workers);
    return o;
  }
  template <class Invoke, class Range>
  auto run_map(Range& inputs, const char* name, std::size_t chunk = 0) {
    return calls_.template map<Invoke>(inputs, name, chunk);
  }
  template <class Invoke, class Item>
  auto submit_as(Item item) {
    return calls_.template submit<Invoke>(std::move(item));
  }

  F f_;
  pool_options options_;
  std::shared_ptr<detail::engine> engine_;
  detail::call_front<F, detail::local_handlers> calls_;
};

/// Deduces `pool<F>` from the callable.
template <class F>
pool(F) -> pool<F>;
/// Deduces `pool<F>` from the callable and a number of workers.
template <class F>
pool(F, unsigned) -> pool<F>;
/// Deduces `pool<F>` from the callable and a number of workers.
template <class F>
pool(F, int) -> pool<F>;
/// Deduces `pool<F>` from the callable and options.
template <class F>
pool(F, pool_options) -> pool<F>;

// ---------------------------------------------------------------------------
// Implementation.

template <class F>
pool<F>::pool(F f, pool_options options) : f_(std::move(f)), options_(std::move(options)) {
  detail::check_worker_count(options_.workers);
  if (options_.workers == 0) options_.workers = cpu_count();
  detail::engine_config config;
  config.workers = options_.workers;
  config.ring_bytes = options_.ring_bytes;
  config.initializer = options_.initializer;
  config.max_tasks_per_child = options_.max_tasks_per_child;
  config.task_timeout = options_.task_timeout;
  if (options_.worker_spin.count() < 0)
    throw error(fmt::format("pool_options::worker_spin must not be negative; it is {} ns",
                            options_.worker_spin.count()));
  config.worker_wait.spin = options_.worker_spin;
  config.worker_keep_memory = options_.worker_keep_memory;
  config.function = &f_;
  engine_ = std::make_shared<detail::engine>(std::move(config));
  calls_ = detail::call_front<F, detail::local_handlers>(engine_, options_.chunk_size,
                                                         options_.progress, options_.on_progress);
}

template <class F>
pool<F>::~pool() {
  if (options_.on_exit == exit_policy::terminate) {
    terminate();
    return;
  }
  try {
    join();
  } catch (...) {
    terminate();
  }
}

template <class F>
void pool<F>::terminate() noexcept {
  auto& e = *engine_;
  if (e.held_here()) {
    // Called from a callback: the queues may be in use below; the driving
    // loop stops the pool when the callback returns.
    e.request_stop();
    return;
  }
  // A thread busy in a call stops the pool at its next step; one that waits
  // lets this thread in, and finds the pool stopped when it wakes.
  e.request_stop();
  if (e.enter()) {
    e.terminate();
    e.leave();
  }
  e.stop_helper();
}

template <class F>
template <class Range>
auto pool<F>::map(Range&& inputs) {
  return map(std::forward<Range>(inputs), map_options{});
}

template <class F>
template <class Range>
auto pool<F>::map(Range&& inputs, map_options options) {
  if constexpr (detail::check_map<detail::call_shape::one_item, F, Range>())
    return run_map<detail::invoke_one>(inputs, "map", options.chunk_size);
}

template <class F>
template <class Range>
auto pool<F>::starmap(Range&& inputs) {
  return starmap(std::forward<Range>(inputs), map_options{});
}

template <class F>
template <class Range>
auto pool<F>::starmap(Range&& inputs, map_options options) {
  if constexpr (detail::check_map<detail::call_shape::tuple_item, F, Range>())
    return run_map<detail::invoke_apply>(inputs, "starmap", options.chunk_size);
}

template <class F>
template <class Range>
auto pool<F>::imap(Range&& inputs) {
  return imap(std::forward<Range>(inputs), map_options{});
}

template <class F>
template <class Range>
auto pool<F>::imap(Range&& inputs, map_options options) {
  if constexpr (detail::check_map<detail::call_shape::one_item, F, Range>())
    return calls_.template imap<true>(std::forward<Range>(inputs), options.chunk_size);
}

template <class F>
template <class Range>
auto pool<F>::imap_unordered(Range&& inputs) {
  return imap_unordered(std::forward<Range>(inputs), map_options{});
}

template <class F>
template <class Range>
auto pool<F>::imap_unordered(Range&& inputs, map_options options) {
  if constexpr (detail::check_map<detail::call_shape::one_item, F, Range>())
    return calls_.template imap<false>(std::forward<Range>(inputs), options.chunk_size);
}

template <class F>
template <class... Args>
auto pool<F>::submit(Args&&... args) {
  using Tuple = std::tuple<std::decay_t<Args>...>;
  if constexpr (detail::check_submit<F, Tuple>())
    return submit_as<detail::invoke_apply>(Tuple(std::forward<Args>(args)...));
}

}  // namespace procpool
