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

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>

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

/// A view of a range whose items are bound to one function, one argument each.
template <class Fn, class Range>
class bound_range {
 public:
  using inner = decltype(std::begin(std::declval<const Range&>()));
  using item = bound_call<Fn, std::tuple<range_item_t<Range>>>;

  class iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = item;
    using difference_type = std::ptrdiff_t;
    using pointer = const item*;
    using reference = item;
    iterator() = default;
    iterator(Fn fn, inner it) : fn_(fn), it_(it) {}
    item operator*() const { return item{fn_, std::tuple<range_item_t<Range>>(*it_)}; }
    iterator& operator++() {
      ++it_;
      return *this;
    }
    iterator operator++(int) {
      auto old = *this;
      ++it_;
      return old;
    }
    friend bool operator==(const iterator& a, const iterator& b) { return a.it_ == b.it_; }
    friend bool operator!=(const iterator& a, const iterator& b) { return a.it_ != b.it_; }

   private:
    Fn fn_{};
    inner it_{};
  };

  bound_range(Fn fn, const Range& r) : fn_(fn), range_(r) {}
  iterator begin() const { return iterator(fn_, std::begin(range_)); }
  iterator end() const { return iterator(fn_, std::end(range_)); }
  std::size_t size() const {
    return static_cast<std::size_t>(std::distance(std::begin(range_), std::end(range_)));
  }

 private:
  Fn fn_;
  const Range& range_;
};

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
/// **Thread safety:** as `pool`'s: one thread uses an executor at a time, and
/// a second thread's call is refused with `procpool::error`; no hidden threads.
/// Not copyable, not movable.
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

  /// Applies `fn` to every item of `inputs` in the workers; results in input order.
  /// **Throws:** as `pool::map`.
  template <class Fn, class Range>
  auto map(Fn fn, const Range& inputs) {
    using fn_t = std::decay_t<Fn>;
    if constexpr (detail::check_executor_function<fn_t>() &&
                  detail::check_map<detail::call_shape::executor_item, fn_t, const Range&>()) {
      detail::bound_range<fn_t, Range> bound(fn, inputs);
      return pool_.template run_map<detail::invoke_bound>(bound, "map");
    }
  }
  /// `map` over a braced list of items: `ex.map(&square, {1, 2, 3})`.
  template <class Fn, class T>
  auto map(Fn fn, std::initializer_list<T> inputs) {
    return map(fn, std::vector<T>(inputs));
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
