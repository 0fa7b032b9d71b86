/// @file
/// `executor`: one pool of workers for many different functions — Python's
/// `concurrent.futures.ProcessPoolExecutor`.
///
/// ```cpp
/// int square(int x) { return x * x; }
/// procpool::executor ex(2);
/// auto f = ex.submit(&square, 7);
/// int r = f.get();  // 49
/// ```
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "pool.hpp"

namespace procpool {

namespace detail {

/// A function and its arguments, as one item sent to a worker. The function
/// travels as its address (or, stateless, as nothing): workers are forks of
/// this process, so the address names the same code there.
template <class Fn, class Args>
struct bound_call {
  Fn fn;
  Args args;
};

template <class Fn, class Args>
void procpool_encode(writer& out, const bound_call<Fn, Args>& c) {
  if constexpr (std::is_pointer_v<Fn>) {
    encode(out, reinterpret_cast<std::uintptr_t>(c.fn));
  }
  encode(out, c.args);
}

template <class Fn, class Args>
bound_call<Fn, Args> procpool_decode(reader& in, type_tag<bound_call<Fn, Args>>) {
  if constexpr (std::is_pointer_v<Fn>) {
    auto address = decode<std::uintptr_t>(in);
    Fn fn = reinterpret_cast<Fn>(address);
    return {fn, decode<Args>(in)};
  } else {
    // A stateless, trivially copyable class: any bytes are a valid object
    // (C++17 lambdas cannot be default-constructed, so copy one from storage).
    alignas(Fn) unsigned char storage[sizeof(Fn)] = {};
    const Fn& fn = *std::launder(reinterpret_cast<const Fn*>(storage));
    return {fn, decode<Args>(in)};
  }
}

/// Calls a bound call's function with its arguments.
struct invoke_bound {
  template <class Unused, class Fn, class Args>
  static decltype(auto) call(Unused&, bound_call<Fn, Args>& c) {
    using R = decltype(std::apply(c.fn, c.args));
    if constexpr (std::is_void_v<R>) {
      std::apply(c.fn, c.args);
      return std::monostate{};
    } else {
      return std::apply(c.fn, c.args);
    }
  }
};

/// The items of several ranges zipped, each bound to one function: item *i*
/// calls `fn` with element *i* of each range (`Star`: with the elements of
/// the one range's tuple item, as starmap does). Ends with the shortest
/// range. Each range is held as `Stored` says: a reference, or owned.
template <class Fn, bool Star, class... Stored>
class zip_range {
  template <class S>
  using iter_t = decltype(std::begin(std::declval<const std::remove_reference_t<S>&>()));

 public:
  using args = typename std::conditional_t<
      Star, std::tuple_element<0, std::tuple<range_item_t<std::remove_reference_t<Stored>>...>>,
      std::enable_if<true, std::tuple<range_item_t<std::remove_reference_t<Stored>>...>>>::type;
  using item = bound_call<Fn, args>;

  class iterator {
   public:
    using iterator_category =
        std::conditional_t<(is_forward_iterator_v<iter_t<Stored>> && ...),
                           std::forward_iterator_tag, std::input_iterator_tag>;
    using value_type = item;
    using difference_type = std::ptrdiff_t;
    using pointer = const item*;
    using reference = item;
    iterator() = default;
    iterator(Fn fn, std::tuple<iter_t<Stored>...> its, std::tuple<iter_t<Stored>...> ends)
        : fn_(fn), its_(its), ends_(ends) {}
    item operator*() const {
      if constexpr (Star)
        return item{fn_, args(*std::get<0>(its_))};
      else
        return std::apply([&](const auto&... it) { return item{fn_, args(*it...)}; }, its_);
    }
    iterator& operator++() {
      std::apply([](auto&... it) { (++it, ...); }, its_);
      return *this;
    }
    iterator operator++(int) {
      auto old = *this;
      ++*this;
      return old;
    }
    /// Equal when both are past the shortest range's end, or at the same place.
    friend bool operator==(const iterator& a, const iterator& b) {
      bool a_end = a.at_end();
      bool b_end = b.at_end();
      if (a_end || b_end) return a_end == b_end;
      return std::get<0>(a.its_) == std::get<0>(b.its_);
    }
    friend bool operator!=(const iterator& a, const iterator& b) { return !(a == b); }

   private:
    bool at_end() const { return at_end(std::index_sequence_for<Stored...>{}); }
    template <std::size_t... I>
    bool at_end(std::index_sequence<I...>) const {
      return ((std::get<I>(its_) == std::get<I>(ends_)) || ...);
    }
    Fn fn_{};
    std::tuple<iter_t<Stored>...> its_{};
    std::tuple<iter_t<Stored>...> ends_{};
  };

  template <class... R>
  explicit zip_range(Fn fn, R&&... ranges) : fn_(fn), ranges_(std::forward<R>(ranges)...) {}
  iterator begin() const { return iterator(fn_, begins(), ends()); }
  iterator end() const { return iterator(fn_, ends(), ends()); }
  /// The shortest range's size (when every range has one).
  template <bool Sized = (has_size<std::remove_reference_t<Stored>>::value && ...),
            std::enable_if_t<Sized, int> = 0>
  std::size_t size() const {
    return std::apply(
        [](const auto&... r) { return std::min({static_cast<std::size_t>(std::size(r))...}); },
        ranges_);
  }

 private:
  std::tuple<iter_t<Stored>...> begins() const {
    return std::apply([](const auto&... r) { return std::make_tuple(std::begin(r)...); }, ranges_);
  }
  std::tuple<iter_t<Stored>...> ends() const {
    return std::apply([](const auto&... r) { return std::make_tuple(std::end(r)...); }, ranges_);
  }
  Fn fn_;
  std::tuple<std::conditional_t<std::is_lvalue_reference_v<Stored>, Stored,
                                std::remove_cv_t<std::remove_reference_t<Stored>>>...>
      ranges_;
};

/// True when the last of `T...` is a `map_options`.
template <class... T>
constexpr bool last_is_map_options() {
  if constexpr (sizeof...(T) == 0)
    return false;
  else
    return std::is_same_v<std::decay_t<std::tuple_element_t<sizeof...(T) - 1, std::tuple<T...>>>,
                          map_options>;
}

/// The executor's pool function: never called (each item carries its own).
struct no_function {
  template <class... A>
  void operator()(A&&...) const {}
};

}  // namespace detail

/// A pool of worker processes that runs different functions: plain functions
/// and captureless lambdas, whose addresses are the same in the forked workers
/// (Python's `ProcessPoolExecutor`). For one function with state (a lambda
/// with captures), use `pool<F>`.
///
/// The failure contract is `pool`'s: `task_error`, `worker_died`,
/// `timeout_error`, and the executor stays usable.
///
/// **Thread safety:** as `pool`'s: any number of threads may use an executor
/// and its futures at once. Not copyable, not movable.
class executor {
 public:
  /// Starts `cpu_count()` workers.
  /// **Throws:** `std::system_error` if a worker cannot be forked.
  executor() : executor(pool_options{}) {}
  /// Starts `workers` workers (0: `cpu_count()`).
  /// **Throws:** `procpool::error` if `workers` is negative or above
  /// `max_workers`; `std::system_error` if a worker cannot be forked.
  template <class Count,
            std::enable_if_t<std::is_integral_v<Count> && !std::is_same_v<Count, bool>, int> = 0>
  explicit executor(Count workers) : executor(options_for(workers)) {}
  /// Starts an executor as `options` say.
  explicit executor(pool_options options) : pool_(detail::no_function{}, std::move(options)) {}

  /// Runs `fn(args...)` in a worker; returns a future for the result.
  /// `fn` is a function pointer or a captureless lambda.
  /// **Throws:** `pool_closed` after `close()`.
  template <class Fn, class... Args>
  auto submit(Fn fn, Args&&... args) {
    using fn_t = std::decay_t<Fn>;
    using args_t = std::tuple<std::decay_t<Args>...>;
    if constexpr (detail::check_executor_function<fn_t>() && detail::check_submit<fn_t, args_t>())
      return pool_.template submit_as<detail::invoke_bound>(
          detail::bound_call<fn_t, args_t>{fn, args_t(std::forward<Args>(args)...)});
  }

  /// Runs `fn(args...)` in a worker and waits for its result:
  /// `submit(fn, args...).get()`.
  /// **Throws:** as `future::get`, and `pool_closed` after `close()`.
  template <class Fn, class... Args>
  auto apply(Fn fn, Args&&... args) {
    return submit(fn, std::forward<Args>(args)...).get();
  }

  /// Applies `fn` to every item of `inputs` in the workers; results in
  /// input order. With several ranges, `fn` takes one argument from each,
  /// and the call stops at the shortest range (Python's `map(fn, xs, ys)`).
  /// A `map_options` after the ranges sets this call's chunk size.
  /// **Throws:** as `pool::map`.
  template <class Fn, class Range, class... More>
  auto map(Fn fn, const Range& inputs, const More&... more) {
    if constexpr (detail::last_is_map_options<More...>()) {
      auto all = std::forward_as_tuple(inputs, more...);
      return map_ranges(fn, all, std::get<sizeof...(More)>(all),
                        std::make_index_sequence<sizeof...(More)>{});
    } else {
      auto all = std::forward_as_tuple(inputs, more...);
      return map_ranges(fn, all, map_options{}, std::make_index_sequence<sizeof...(More) + 1>{});
    }
  }
  /// `map` over a braced list of items: `ex.map(&square, {1, 2, 3})`.
  template <class Fn, class T>
  auto map(Fn fn, std::initializer_list<T> inputs, map_options options = {}) {
    return map(fn, std::vector<T>(inputs), options);
  }

  /// `map` for a function of several arguments: each item is a tuple (or
  /// pair) of the arguments (Python's `Pool.starmap`, and
  /// `executor.map(fn, *zip(*items))`).
  /// **Throws:** as `pool::map`.
  template <class Fn, class Range>
  auto starmap(Fn fn, const Range& inputs, map_options options = {}) {
    using fn_t = std::decay_t<Fn>;
    if constexpr (detail::check_executor_function<fn_t>() &&
                  detail::check_map<detail::call_shape::tuple_item, fn_t, const Range&>()) {
      detail::zip_range<fn_t, true, const Range&> bound(fn, inputs);
      return pool_.template run_map<detail::invoke_bound>(bound, "starmap", options.chunk_size);
    }
  }

  /// A lazy range of `fn`'s results in input order, as `pool::imap`: an
  /// lvalue `inputs` must outlive the iteration, an rvalue is moved in.
  /// **Throws** (from iterating): as `pool::imap`.
  template <class Fn, class Range>
  auto imap(Fn fn, Range&& inputs, map_options options = {}) {
    return imap_as<true>(fn, std::forward<Range>(inputs), options);
  }
  /// A lazy range of `(index, result)` pairs as they finish, as `pool::imap_unordered`.
  template <class Fn, class Range>
  auto imap_unordered(Fn fn, Range&& inputs, map_options options = {}) {
    return imap_as<false>(fn, std::forward<Range>(inputs), options);
  }

  /// Python's `shutdown(wait, cancel_futures)`: accepts no more tasks; with
  /// `cancel_futures`, the tasks not yet sent to a worker are cancelled (their
  /// futures raise `task_cancelled`) while those sent finish. A worker is
  /// sent two (as Python's call queue holds a few); the tasks queued behind
  /// those, which no worker started (a pool whose chunks were short queues
  /// more), are cancelled too. With `wait`,
  /// returns once the rest is done and the workers are stopped (`join`).
  /// Without `wait` it returns at once; the work left runs while a future
  /// of it is waited on, and the destructor finishes it.
  void shutdown(bool wait = true, bool cancel_futures = false) {
    pool_.close();
    if (cancel_futures) {
      detail::scoped_use use(*pool_.engine_, "shutdown");
      pool_.engine_->cancel_unsent(
          std::make_exception_ptr(task_cancelled("executor::shutdown with cancel_futures")));
    }
    if (wait) pool_.join();
  }

  /// Accepts no more tasks; tasks in flight still complete.
  void close() noexcept { pool_.close(); }
  /// Finishes the tasks in flight and stops the workers.
  void join() { pool_.join(); }
  /// Stops the workers now.
  void terminate() noexcept { pool_.terminate(); }
  /// Number of worker processes.
  unsigned workers() const noexcept { return pool_.workers(); }
  /// Pids of the workers now.
  std::vector<pid_t> pids() const { return pool_.pids(); }

 private:
  template <class Fn, class Ranges, std::size_t... I>
  auto map_ranges(Fn fn, Ranges& ranges, map_options options, std::index_sequence<I...>) {
    using fn_t = std::decay_t<Fn>;
    using args_t = std::tuple<detail::range_item_t<std::tuple_element_t<I, Ranges>>...>;
    if constexpr (sizeof...(I) == 1) {
      if constexpr (detail::check_executor_function<fn_t>() &&
                    detail::check_map<detail::call_shape::executor_item, fn_t,
                                      std::tuple_element_t<0, Ranges>>()) {
        detail::zip_range<fn_t, false, std::tuple_element_t<I, Ranges>...> bound(
            fn, std::get<I>(ranges)...);
        return pool_.template run_map<detail::invoke_bound>(bound, "map", options.chunk_size);
      }
    } else if constexpr (detail::check_executor_function<fn_t>() &&
                         (detail::check_range<std::tuple_element_t<I, Ranges>>() && ...) &&
                         detail::check_call<detail::call_shape::arguments, fn_t, args_t>()) {
      detail::zip_range<fn_t, false, std::tuple_element_t<I, Ranges>...> bound(
          fn, std::get<I>(ranges)...);
      return pool_.template run_map<detail::invoke_bound>(bound, "map", options.chunk_size);
    }
  }
  template <bool Ordered, class Fn, class Range>
  auto imap_as(Fn fn, Range&& inputs, map_options options) {
    using fn_t = std::decay_t<Fn>;
    if constexpr (detail::check_executor_function<fn_t>() &&
                  detail::check_map<detail::call_shape::executor_item, fn_t, Range>()) {
      return pool_.calls_.template imap<Ordered, detail::invoke_bound>(
          detail::zip_range<fn_t, false, Range>(fn, std::forward<Range>(inputs)),
          options.chunk_size);
    }
  }
  template <class Count>
  static pool_options options_for(Count workers) {
    if constexpr (std::is_signed_v<Count>) {
      if (workers < 0)
        throw error(fmt::format(
            "an executor needs a positive number of workers (or 0 for cpu_count()); {} were "
            "asked for",
            static_cast<long long>(workers)));
    }
    detail::check_worker_count(static_cast<unsigned long long>(workers));
    pool_options o;
    o.workers = static_cast<unsigned>(workers);
    return o;
  }
  pool<detail::no_function> pool_;
};

}  // namespace procpool
