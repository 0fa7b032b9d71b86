// What the caller of a pool holds while a call runs: `future<R>` (a submitted
// task) and the two lazy ranges of results, `imap_range<R>` and
// `imap_unordered_range<R>`, both made of one template, `result_range`.
// They are public names (pool.hpp presents them), defined here with the
// calls they hold so that every front end (pool.hpp, mpi.hpp) hands out the
// same ones through call_front.hpp without including another front end.
#pragma once

#include <chrono>
#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "call_state.hpp"
#include "map_calls.hpp"

namespace procpool {

namespace detail {
template <class F, class Handlers>
class call_front;
}  // namespace detail

/// The result of a task submitted to a pool or an executor (Python's `AsyncResult`).
///
/// Waiting on a future drives the pool that made it: the calling thread sends
/// and collects for every call in flight. Move-only.
///
/// **Thread safety:** use a future from the thread that uses its pool; used
/// while another thread is in a call of the pool, it throws `procpool::error`.
template <class R>
class [[nodiscard]] future {
 public:
  future() = default;
  /// True when the result (or error) has arrived; does not wait.
  bool ready() const;
  /// Waits for the result and returns it (moves it out: call once).
  /// **Throws:** `task_error`, `worker_died`, `timeout_error` (their messages
  /// name a task); `pool_closed` when the pool was stopped before the task
  /// finished; `procpool::error` for an empty future, or when another thread is
  /// using the pool.
  R get();
  /// Waits at most `d`; true if the result is ready.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> d) const;
  /// Waits at most `d` and returns the result; empty on timeout.
  template <class Rep, class Period>
  std::optional<detail::stored_t<R>> get_for(std::chrono::duration<Rep, Period> d);
  /// True for a future that belongs to a task (not default-constructed, not moved from).
  bool valid() const noexcept { return state_ != nullptr; }

 private:
  struct state;
  template <class F, class Handlers>
  friend class detail::call_front;
  future(std::shared_ptr<state> s, std::weak_ptr<detail::driver> d)
      : state_(std::move(s)), driver_(std::move(d)) {}
  void wait_until(detail::driver* d,
                  std::optional<std::chrono::steady_clock::time_point> deadline) const;
  void rethrow_failure() const;
  detail::stored_t<R> take();
  std::shared_ptr<state> state_;
  std::weak_ptr<detail::driver> driver_;
};

namespace detail {

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
  class iterator {
   public:
    ///@{
    /// The standard input-iterator types, read by `std::iterator_traits`.
    using iterator_category = std::input_iterator_tag;
    using value_type = typename result_range::value_type;
    using difference_type = std::ptrdiff_t;
    using pointer = value_type*;
    using reference = value_type&;
    ///@}

    iterator() = default;
    /// The current result.
    reference operator*() const { return range_->current(); }
    /// The current result's members.
    pointer operator->() const { return &range_->current(); }
    /// Moves to the next result, waiting for it.
    iterator& operator++() {
      range_->advance();
      return *this;
    }
    /// Moves to the next result, waiting for it (an input iterator's `it++`).
    void operator++(int) { ++*this; }
    /// True when both are at the end, or neither is.
    friend bool operator==(const iterator& a, const iterator& b) {
      return a.at_end() == b.at_end();
    }
    /// True when one is at the end and the other is not.
    friend bool operator!=(const iterator& a, const iterator& b) { return !(a == b); }

   private:
    friend class result_range;
    explicit iterator(result_range* r) : range_(r) {}
    bool at_end() const { return range_ == nullptr || range_->done_; }
    result_range* range_ = nullptr;
  };

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
};

template <class R>
bool future<R>::ready() const {
  if (!state_) return false;
  auto d = driver_.lock();
  std::optional<detail::scoped_use> use;
  if (d) use.emplace(*d, "future::ready");
  return state_->call->finished();
}

template <class R>
void future<R>::wait_until(detail::driver* d,
                           std::optional<std::chrono::steady_clock::time_point> deadline) const {
  auto& call = *state_->call;
  if (call.finished()) return;
  if (!d) throw pool_closed("future::get");
  try {
    d->drive_until([&] { return call.finished(); }, deadline);
  } catch (...) {
    // The wait broke (the pool stopped, a system call failed): the task ends with it.
    call.abort(std::current_exception());
    d->cancel(call);
    throw;
  }
}

template <class R>
void future<R>::rethrow_failure() const {
  // A task is no item of a call: its errors say "a task", not "item 0".
  // Subclasses (the MPI engine's) word their messages themselves.
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
detail::stored_t<R> future<R>::take() {
  rethrow_failure();
  auto& result = *state_->result;
  if (!result) throw error("future::get called twice");
  detail::stored_t<R> r = std::move(*result);
  result.reset();
  return r;
}

template <class R>
R future<R>::get() {
  if (!state_) throw error("get() on an empty future");
  auto d = driver_.lock();
  std::optional<detail::scoped_use> use;
  if (d) use.emplace(*d, "future::get");
  wait_until(d.get(), std::nullopt);
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
  return state_->call->finished();
}

template <class R>
template <class Rep, class Period>
std::optional<detail::stored_t<R>> future<R>::get_for(std::chrono::duration<Rep, Period> d) {
  if (!state_) throw error("get_for on an empty future");
  auto deadline = detail::deadline_after(d);
  auto driver = driver_.lock();
  std::optional<detail::scoped_use> use;
  if (driver) use.emplace(*driver, "future::get_for");
  wait_until(driver.get(), deadline);
  if (!state_->call->finished()) return std::nullopt;
  return take();
}

}  // namespace procpool
