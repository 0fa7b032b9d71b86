// What the caller of a pool holds while a call runs: `future<R>` (a submitted
// task) and the two lazy ranges of results, `imap_range<R>` and
// `imap_unordered_range<R>`, both made of one template, `result_range`.
// They are public names (pool.hpp presents them), defined here with the
// calls they hold so that every front end (pool.hpp, mpi.hpp) hands out the
// same ones through call_front.hpp without including another front end.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "call_state.hpp"
#include "map_calls.hpp"

namespace procpool {

namespace detail {
template <class F, class Handlers>
class call_front;
struct future_access;
/// The default error callback of `future::then`: ignores the error (it stays for `get()`).
struct ignore_error {
  void operator()(const std::exception_ptr&) const noexcept {}
};
/// The default value callback of `map_async`: none.
struct ignore_value {
  template <class... A>
  void operator()(const A&...) const noexcept {}
};
}  // namespace detail

/// The result of a task submitted to a pool or an executor (Python's `AsyncResult`).
///
/// Waiting on a future drives the pool that made it: the calling thread sends
/// and collects for every call in flight. While nobody waits, the pool's
/// helper thread does, and runs the callbacks of `then`. Move-only.
///
/// **Thread safety:** a future may be waited on from any thread, while other
/// threads use its pool; one future is used by one thread at a time (`get`
/// moves the result out).
template <class R>
class [[nodiscard]] future {
 public:
  future() = default;
  /// True when the result (or error) has arrived; does not wait.
  bool ready() const;
  /// True when the task is over: its result or error arrived, it was
  /// cancelled, or its pool stopped (Python's `done()`); does not wait.
  bool done() const { return ready(); }
  /// Cancels the task if nothing of it was sent to a worker yet: it never
  /// runs, `get()` and `exception()` raise `task_cancelled`, and this returns
  /// true (again on a second call). Returns false once the task was sent to
  /// a worker or is over otherwise (Python's `cancel()`).
  /// **Throws:** `procpool::error` for an empty future.
  bool cancel();
  /// True when `cancel()` (or `executor::shutdown(..., true)`) cancelled the task.
  bool cancelled() const noexcept { return state_ && state_->call->cancelled_unsent; }
  /// Waits for the task, as `get()` does, and returns its error, or null when
  /// it succeeded; the result stays for `get()` (Python's `exception()`).
  /// **Throws:** `task_cancelled` for a cancelled task; `procpool::error` for
  /// an empty future.
  std::exception_ptr exception();
  /// Waits for the result and returns it (moves it out: call once).
  /// **Throws:** `task_error`, `worker_died`, `timeout_error` (their messages
  /// name a task); `pool_closed` when the pool was stopped before the task
  /// finished; `procpool::error` for an empty future.
  R get();
  /// Waits at most `d`; true if the result is ready.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> d) const;
  /// Waits at most `d` and returns the result; empty on timeout.
  template <class Rep, class Period>
  std::optional<detail::stored_t<R>> get_for(std::chrono::duration<Rep, Period> d);
  /// True for a future that belongs to a task (not default-constructed, not moved from).
  bool valid() const noexcept { return state_ != nullptr; }

  /// Calls `on_value(result)` (`on_value()` for `future<void>`) when the
  /// task succeeds, or `on_error(error)`, an `std::exception_ptr`, when it
  /// fails, is cancelled or its pool stops: Python's `apply_async(callback=,
  /// error_callback=)` and `add_done_callback`. The callback runs on the
  /// pool's helper thread within milliseconds of the result's arrival, while
  /// the caller does something else or sleeps; for a task already over, it
  /// runs at once in the calling thread. `get()`, `wait_for` and
  /// `procpool::wait` return only after the task's callbacks ran, and the
  /// result stays for `get()` (the callback sees it as `const R&`). An
  /// exception thrown by a callback is written to stderr and the pool goes
  /// on. A callback may use the pool, this future included. Both callables
  /// are copied; the future may be dropped before the callback runs. Returns
  /// `*this`.
  /// **Throws:** `procpool::error` for an empty future.
  template <class OnValue, class OnError = detail::ignore_error>
  future& then(OnValue on_value, OnError on_error = {});

 private:
  struct state;
  template <class F, class Handlers>
  friend class detail::call_front;
  friend struct detail::future_access;
  future(std::shared_ptr<state> s, std::weak_ptr<detail::driver> d)
      : state_(std::move(s)), driver_(std::move(d)) {}
  void wait_until(detail::driver* d,
                  std::optional<std::chrono::steady_clock::time_point> deadline) const;
  void rethrow_failure() const;
  static std::exception_ptr failure_of(const future& f);
  detail::stored_t<R> take();
  std::shared_ptr<state> state_;
  std::weak_ptr<detail::driver> driver_;
};

namespace detail {

/// The input iterator of a range that makes its elements one at a time
/// (`result_range`, `completed_range`): `Range` has `current()` (the element
/// now), `advance()` (waits for the next) and `finished()`.
template <class Range, class Value>
class stepping_iterator {
 public:
  ///@{
  /// The standard input-iterator types, read by `std::iterator_traits`.
  using iterator_category = std::input_iterator_tag;
  using value_type = Value;
  using difference_type = std::ptrdiff_t;
  using pointer = Value*;
  using reference = Value&;
  ///@}

  /// The end iterator.
  stepping_iterator() = default;
  /// An iterator at `r`'s current element (made by the range's `begin()`).
  explicit stepping_iterator(Range* r) : range_(r) {}
  /// The current element.
  reference operator*() const { return range_->current(); }
  /// The current element's members.
  pointer operator->() const { return &range_->current(); }
  /// Moves to the next element, waiting for it.
  stepping_iterator& operator++() {
    range_->advance();
    return *this;
  }
  /// Moves to the next element, waiting for it (an input iterator's `it++`).
  void operator++(int) { ++*this; }
  /// True when both are at the end, or neither is.
  friend bool operator==(const stepping_iterator& a, const stepping_iterator& b) {
    return a.at_end() == b.at_end();
  }
  /// True when one is at the end and the other is not.
  friend bool operator!=(const stepping_iterator& a, const stepping_iterator& b) {
    return !(a == b);
  }

 private:
  bool at_end() const { return range_ == nullptr || range_->finished(); }
  Range* range_ = nullptr;
};

/// What `imap_range` and `imap_unordered_range` share: a lazy input range over
/// a call's results, read one at a time. `Ordered`: the results of an `imap`,
/// in input order, each an `R`; otherwise those of an `imap_unordered`, in the
/// order they arrive, each an `(index, result)` pair. Iterating drives the
/// pool; dropping the range cancels what is left of the call.
template <class R, bool Ordered>
class result_range {
 public:
  /// What the range yields: `R`, or `(index, R)` pairs.
  using value_type = std::conditional_t<Ordered, R, std::pair<std::size_t, R>>;

  /// Input iterator over the results.
  using iterator = stepping_iterator<result_range, value_type>;

  /// Starts iterating: waits for the first result.
  iterator begin() {
    if (!started_) advance();
    return iterator(this);
  }
  /// The end of the results.
  iterator end() noexcept { return iterator(); }

  /// Moves the call to a new range; the moved-from one is empty.
  result_range(result_range&&) noexcept = default;
  /// Moves the call to this range; the moved-from one is empty.
  result_range& operator=(result_range&&) noexcept = default;
  /// Cancels what is left of the call (see `drop_call`).
  ~result_range() {
    if (state_ && !done_) drop_call(driver_, *state_);
  }

 protected:
  /// A range over the results of the call `s`, driven through `d`.
  result_range(std::shared_ptr<imap_state<R>> s, std::weak_ptr<driver> d)
      : state_(std::move(s)), driver_(std::move(d)) {}

 private:
  friend class stepping_iterator<result_range, value_type>;
  bool finished() const noexcept { return done_; }
  value_type& current() {
    if constexpr (Ordered)
      return current_.second;
    else
      return current_;
  }
  void advance() {
    auto d = driver_.lock();
    std::optional<scoped_use> use;
    if (d) use.emplace(*d, Ordered ? "imap iteration" : "imap_unordered iteration");
    started_ = true;
    done_ = !state_->next(current_);
  }
  std::shared_ptr<imap_state<R>> state_;
  std::weak_ptr<driver> driver_;
  std::pair<std::size_t, R> current_{};
  bool started_ = false;
  bool done_ = false;
};

}  // namespace detail

/// A lazy range of results from `pool::imap`: an input range of `R`, in input order.
///
/// Iterating drives the pool. Dropping the range cancels what is left of the call.
/// Move-only.
/// **Throws** (from `begin()` and `++`): as `pool::map`, when iteration reaches the failing item.
template <class R>
class [[nodiscard]] imap_range : public detail::result_range<R, true> {
 private:
  template <class F, class Handlers>
  friend class detail::call_front;
  imap_range(std::shared_ptr<detail::imap_state<R>> s, std::weak_ptr<detail::driver> d)
      : detail::result_range<R, true>(std::move(s), std::move(d)) {}
};

/// A lazy range of `(index, result)` pairs from `pool::imap_unordered`, in the
/// order results arrive. Iterating drives the pool; dropping the range cancels
/// what is left of the call. Move-only.
/// **Throws** (from `begin()` and `++`): as `pool::map`, when iteration reaches a failing item.
template <class R>
class [[nodiscard]] imap_unordered_range : public detail::result_range<R, false> {
 private:
  template <class F, class Handlers>
  friend class detail::call_front;
  imap_unordered_range(std::shared_ptr<detail::imap_state<R>> s, std::weak_ptr<detail::driver> d)
      : detail::result_range<R, false>(std::move(s), std::move(d)) {}
};

// ---------------------------------------------------------------------------
// Implementation.

/// What a future shares with its task.
template <class R>
struct future<R>::state {
  std::shared_ptr<detail::call_state> call;
  std::optional<detail::stored_t<R>>* result = nullptr;
  bool one_task = true;  // a submitted task (errors name no item), not a map_async call
};

template <class R>
bool future<R>::ready() const {
  if (!state_) return false;
  auto d = driver_.lock();
  std::optional<detail::scoped_use> use;
  if (d) use.emplace(*d, "future::ready");
  return state_->call->over();
}

template <class R>
void future<R>::wait_until(detail::driver* d,
                           std::optional<std::chrono::steady_clock::time_point> deadline) const {
  auto& call = *state_->call;
  if (call.over()) return;
  if (!d) {
    // The pool is gone; a task that finished keeps its result (its
    // callbacks may still be running, on the thread that destroyed it).
    if (call.finished()) return;
    throw pool_closed("future::get");
  }
  try {
    d->drive_until([&] { return call.over(); }, deadline);
  } catch (...) {
    // The wait broke (the pool stopped, a system call failed): the task ends
    // with it, unless it finished and only its callbacks were still to run.
    if (call.finished()) return;
    call.abort(std::current_exception());
    d->cancel(call);
    throw;
  }
}

template <class R>
void future<R>::rethrow_failure() const {
  // A task is no item of a call: its errors say "a task", not "item 0".
  // Subclasses (the MPI engine's) word their messages themselves.
  if (!state_->one_task) state_->call->rethrow_if_failed();  // map_async: items keep their index
  try {
    state_->call->rethrow_if_failed();
  } catch (const task_error& e) {
    if (typeid(e) != typeid(task_error)) throw;
    throw e.as_task();
  } catch (const worker_died& e) {
    if (typeid(e) != typeid(worker_died) || !e.index()) throw;
    throw worker_died::in_task(e.pid(), e.status());
  } catch (const timeout_error& e) {
    if (typeid(e) != typeid(timeout_error)) throw;
    throw timeout_error::in_task(e.pid(), e.timeout());
  }
}

template <class R>
std::exception_ptr future<R>::failure_of(const future& f) {
  const auto& call = *f.state_->call;
  if (!call.finished())
    return std::make_exception_ptr(pool_closed::while_pending("its pool was destroyed"));
  try {
    if (call.cancelled_unsent) call.rethrow_if_failed();
    f.rethrow_failure();
  } catch (...) {
    return std::current_exception();
  }
  if (!*f.state_->result)
    return std::make_exception_ptr(
        error("the task ended without a result"));  // a bug, never a wait
  return nullptr;
}

template <class R>
template <class OnValue, class OnError>
future<R>& future<R>::then(OnValue on_value, OnError on_error) {
  if constexpr (std::is_void_v<R>)
    static_assert(std::is_invocable_v<OnValue&>,
                  "then(on_value): on_value must be callable with no argument for a future<void>");
  else
    static_assert(std::is_invocable_v<OnValue&, const R&>,
                  "then(on_value): on_value must be callable with the result, as const R&");
  static_assert(std::is_invocable_v<OnError&, const std::exception_ptr&>,
                "then(on_value, on_error): on_error must be callable with a std::exception_ptr");
  if (!state_) throw error("then() on an empty future");
  // The callback holds the task's state (never the pool): the future may be
  // dropped before it runs.
  future reader(state_, driver_);
  std::function<void()> callback = [reader = std::move(reader), on_value = std::move(on_value),
                                    on_error = std::move(on_error)]() mutable {
    if (auto e = failure_of(reader)) {
      on_error(e);
    } else if constexpr (std::is_void_v<R>) {
      on_value();
    } else {
      on_value(std::as_const(**reader.state_->result));
    }
  };
  if (auto d = driver_.lock()) {
    detail::scoped_use use(*d, "future::then");
    auto& call = *state_->call;
    if (!call.finished()) {
      bool first = call.callbacks.empty();
      call.callbacks.push_back(std::move(callback));
      if (first && d->watch(state_->call)) call.callbacks_due = true;
      return *this;
    }
  }
  // Over already: run it now, here (as Python's add_done_callback does).
  try {
    callback();
  } catch (...) {
    detail::report_callback_error("a callback");
  }
  return *this;
}

template <class R>
detail::stored_t<R> future<R>::take() {
  rethrow_failure();
  auto& result = *state_->result;
  if (!result) throw error("future::get called twice");
  detail::stored_t<R> r = std::move(*result);
  result.reset();
  return r;
}

template <class R>
bool future<R>::cancel() {
  if (!state_) throw error("cancel on an empty future");
  auto& call = *state_->call;
  if (call.cancelled_unsent) return true;
  auto d = driver_.lock();
  if (!d) return false;  // the pool is gone: the task ended with it
  detail::scoped_use use(*d, "future::cancel");
  if (call.finished() || call.dispatched) return false;
  call.abort(std::make_exception_ptr(task_cancelled("future::cancel")));
  call.cancelled_unsent = true;
  d->end_call(call);  // forgets it: nothing of it is sent
  return true;
}

template <class R>
std::exception_ptr future<R>::exception() {
  if (!state_) throw error("exception() on an empty future");
  {
    auto d = driver_.lock();
    std::optional<detail::scoped_use> use;
    if (d) use.emplace(*d, "future::exception");
    wait_until(d.get(), std::nullopt);
  }
  if (state_->call->cancelled_unsent) state_->call->rethrow_if_failed();
  try {
    rethrow_failure();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

template <class R>
R future<R>::get() {
  if (!state_) throw error("get() on an empty future");
  {
    auto d = driver_.lock();
    std::optional<detail::scoped_use> use;
    if (d) use.emplace(*d, "future::get");
    wait_until(d.get(), std::nullopt);
  }
  // Taken after leaving the pool: where no helper thread runs, the callbacks
  // run as this thread leaves, and they see the result first.
  if constexpr (std::is_void_v<R>)
    take();
  else
    return take();
}

template <class R>
template <class Rep, class Period>
bool future<R>::wait_for(std::chrono::duration<Rep, Period> d) const {
  if (!state_) throw error("wait_for on an empty future");
  auto deadline = detail::deadline_after(d);
  auto driver = driver_.lock();
  std::optional<detail::scoped_use> use;
  if (driver) use.emplace(*driver, "future::wait_for");
  wait_until(driver.get(), deadline);
  return state_->call->over();
}

template <class R>
template <class Rep, class Period>
std::optional<detail::stored_t<R>> future<R>::get_for(std::chrono::duration<Rep, Period> d) {
  if (!state_) throw error("get_for on an empty future");
  auto deadline = detail::deadline_after(d);
  {
    auto driver = driver_.lock();
    std::optional<detail::scoped_use> use;
    if (driver) use.emplace(*driver, "future::get_for");
    wait_until(driver.get(), deadline);
    if (!state_->call->over()) return std::nullopt;
  }
  return take();  // after leaving the pool, as get()'s
}

// ---------------------------------------------------------------------------
// Waiting on several futures: wait() and as_completed().

/// When `procpool::wait` returns (Python's `FIRST_COMPLETED`,
/// `FIRST_EXCEPTION`, `ALL_COMPLETED`).
enum class return_when {
  first_completed,  ///< as soon as one future is done (or none is left)
  first_exception,  ///< as soon as one future fails (cancelled ones do not count), else all done
  all_completed,    ///< when every future is done
};

/// What `procpool::wait` found: the positions, in the range given, of the
/// futures that are done and of those that are not, each in increasing order.
struct wait_result {
  std::vector<std::size_t> done;      ///< positions of the futures that are done
  std::vector<std::size_t> not_done;  ///< positions of the others
};

namespace detail {

/// What `wait` and `as_completed` see of a future: its call and its pool.
struct waited_call {
  call_state* call;
  std::weak_ptr<driver> pool;
};

/// What the free functions read of a future.
struct future_access {
  template <class R>
  static waited_call of(const future<R>& f) {
    if (!f.state_) throw error("wait or as_completed on an empty future");
    return {f.state_->call.get(), f.driver_};
  }
};

/// True when `call` ended by an error other than a cancel.
inline bool failed_not_cancelled(const call_state& call) noexcept {
  return call.over() && !call.cancelled_unsent && (call.failed() || call.aborted());
}

/// Drives the pools of `calls` until `done()` or `deadline`; false on
/// timeout. One pool is driven as a future's `get` drives it; several take
/// turns of at most a millisecond each, so a result of any of them is seen
/// within about a millisecond per pool. A call whose pool is gone ends with
/// `pool_closed`; a wait on a pool that breaks (terminate from elsewhere, a
/// system call's failure) ends that pool's calls with the error and throws it.
/// `done()` is only evaluated with every pool entered (in one order, by
/// address, so that two threads waiting on the same pools never hold one
/// each), and last before returning: a caller that reads its calls takes
/// its answer there. A turn holds its own pool alone.
inline bool drive_calls(const std::vector<waited_call>& calls, function_ref<bool()> done,
                        std::optional<std::chrono::steady_clock::time_point> deadline) {
  // Drives `d` until `turn_done()` or `until`; if the wait breaks, `d`'s
  // calls end with the error, as a future's would, and it goes on.
  auto drive_one = [&](const std::shared_ptr<driver>& d, function_ref<bool()> turn_done,
                       std::optional<std::chrono::steady_clock::time_point> until) {
    try {
      return d->drive_until(turn_done, until);
    } catch (...) {
      for (auto& w : calls) {
        if (w.pool.lock() != d || w.call->finished()) continue;
        w.call->abort(std::current_exception());
        d->cancel(*w.call);
      }
      throw;
    }
  };
  for (;;) {
    std::vector<std::shared_ptr<driver>> pools;
    for (auto& w : calls) {
      auto d = w.pool.lock();
      if (d && std::find(pools.begin(), pools.end(), d) == pools.end())
        pools.push_back(std::move(d));
    }
    std::sort(pools.begin(), pools.end(), std::owner_less<std::shared_ptr<driver>>());
    std::vector<std::shared_ptr<driver>> busy;  // pools with a call not yet finished
    {
      std::deque<scoped_use> uses;
      for (auto& d : pools) uses.emplace_back(*d, "procpool::wait");
      if (done()) return true;
      for (auto& w : calls) {
        if (w.call->over()) continue;
        auto d = w.pool.lock();
        if (!d) {
          w.call->abort(
              std::make_exception_ptr(pool_closed::while_pending("its pool was destroyed")));
          continue;
        }
        if (std::find(busy.begin(), busy.end(), d) == busy.end()) busy.push_back(std::move(d));
      }
      if (busy.empty()) return done();
      if (deadline && std::chrono::steady_clock::now() >= *deadline) return false;
      if (pools.size() == 1) {  // every call is this pool's: its own predicate is `done`
        drive_one(pools.front(), done, deadline);
        return done();
      }
    }
    for (auto& d : busy) {
      scoped_use use(*d, "procpool::wait");
      std::vector<call_state*> mine;  // read with this pool entered, and no other
      for (auto& w : calls)
        if (w.pool.lock() == d && !w.call->over()) mine.push_back(w.call);
      auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
      if (deadline && *deadline < until) until = *deadline;
      drive_one(
          d,
          [&] {
            for (auto* c : mine)
              if (c->over()) return true;
            return false;
          },
          until);
    }
  }
}

template <class Futures>
std::vector<waited_call> waited_calls(Futures& futures) {
  std::vector<waited_call> calls;
  for (auto& f : futures) calls.push_back(future_access::of(f));
  return calls;
}

}  // namespace detail

/// Waits on futures, of one pool or several, until `when` holds or
/// `timeout` passes (Python's `concurrent.futures.wait`); returns which are
/// done. Waiting drives their pools from the calling thread, as `get()`
/// does. An empty range returns at once.
/// **Throws:** `procpool::error` for an empty future.
template <class Futures, class Rep, class Period>
wait_result wait(Futures& futures, return_when when, std::chrono::duration<Rep, Period> timeout);
/// `wait` without a timeout: waits as long as `when` asks.
template <class Futures>
wait_result wait(Futures& futures, return_when when = return_when::all_completed);

namespace detail {
template <class Futures>
wait_result wait_until(Futures& futures, return_when when,
                       std::optional<std::chrono::steady_clock::time_point> deadline) {
  auto calls = waited_calls(futures);
  // The answer is taken inside the predicate, which drive_calls evaluates
  // last with every pool entered: no call is read while another thread
  // drives its pool.
  wait_result r;
  auto satisfied = [&] {
    r = wait_result{};
    bool all = true, met = calls.empty();
    for (std::size_t i = 0; i < calls.size(); ++i) {
      bool finished = calls[i].call->over();
      (finished ? r.done : r.not_done).push_back(i);
      if (finished && when == return_when::first_completed) met = true;
      if (when == return_when::first_exception && failed_not_cancelled(*calls[i].call)) met = true;
      all = all && finished;
    }
    return met || all;
  };
  drive_calls(calls, satisfied, deadline);
  return r;
}
}  // namespace detail

template <class Futures, class Rep, class Period>
wait_result wait(Futures& futures, return_when when, std::chrono::duration<Rep, Period> timeout) {
  return detail::wait_until(futures, when, detail::deadline_after(timeout));
}

template <class Futures>
wait_result wait(Futures& futures, return_when when) {
  return detail::wait_until(futures, when, std::nullopt);
}

/// A range over futures that yields each as it is done (Python's
/// `as_completed`): an input range of references to the futures given, which
/// must outlive it. Advancing drives their pools, as `procpool::wait` does.
/// A future whose pool is stopped or destroyed meanwhile is yielded done;
/// its `get()` raises `pool_closed`.
/// **Throws** (from `begin()` and `++`): as `wait`.
template <class Future>
class [[nodiscard]] completed_range {
 public:
  /// Input iterator over the futures, in the order they are done.
  using iterator = detail::stepping_iterator<completed_range, Future>;

  /// Starts: waits for the first future to be done.
  iterator begin() {
    if (!started_) advance();
    return iterator(this);
  }
  /// The end of the futures.
  iterator end() noexcept { return iterator(); }

 private:
  template <class Futures>
  friend auto as_completed(Futures& futures);
  friend class detail::stepping_iterator<completed_range, Future>;
  explicit completed_range(std::vector<Future*> pending) : pending_(std::move(pending)) {}
  Future& current() const noexcept { return *current_; }
  bool finished() const noexcept { return current_ == nullptr; }
  void advance() {
    started_ = true;
    current_ = nullptr;
    if (pending_.empty()) return;
    std::vector<detail::waited_call> calls;
    for (auto* f : pending_) calls.push_back(detail::future_access::of(*f));
    // The one done is found inside the predicate, with every pool entered.
    std::size_t found = calls.size();
    detail::drive_calls(
        calls,
        [&] {
          for (found = 0; found < calls.size(); ++found)
            if (calls[found].call->over()) return true;
          return false;
        },
        std::nullopt);
    if (found < calls.size()) {
      current_ = pending_[found];
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(found));
    }
  }
  std::vector<Future*> pending_;
  Future* current_ = nullptr;
  bool started_ = false;
};

/// The futures of `futures` (a range of `future<R>`, say a `std::vector`),
/// each yielded once as it is done: `for (auto& f : as_completed(fs))`.
/// **Throws:** `procpool::error` for an empty future.
template <class Futures>
auto as_completed(Futures& futures) {
  using Future = std::remove_reference_t<decltype(*std::begin(futures))>;
  std::vector<Future*> pending;
  for (auto& f : futures) {
    (void)detail::future_access::of(f);  // refuses an empty future now
    pending.push_back(&f);
  }
  return completed_range<Future>(std::move(pending));
}

}  // namespace procpool
