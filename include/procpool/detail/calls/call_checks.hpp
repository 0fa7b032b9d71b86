// Compile-time checks of what a pool, an executor and an MPI pool are given:
// each fails the build with a sentence that says what is wrong, before any
// deeper template fails with a page of its own. Every check returns whether it
// passed, so a caller can stop (`if constexpr`) instead of failing again.
#pragma once

#include <cstddef>
#include <functional>
#include <iterator>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../codec.hpp"

namespace procpool::detail {

template <class Range, class = void>
struct is_range : std::false_type {};
template <class Range>
struct is_range<Range, std::void_t<decltype(std::begin(std::declval<Range&>())),
                                   decltype(std::end(std::declval<Range&>()))>> : std::true_type {};

template <class Tuple, class = void>
struct is_tuple_like : std::false_type {};
template <class Tuple>
struct is_tuple_like<Tuple, std::void_t<decltype(std::tuple_size<Tuple>::value)>> : std::true_type {
};

template <class F, class Tuple, class Indices>
struct is_applicable_impl;
template <class F, class Tuple, std::size_t... I>
struct is_applicable_impl<F, Tuple, std::index_sequence<I...>>
    : std::is_invocable<F, decltype(std::get<I>(std::declval<Tuple&>()))...> {};

/// Whether `std::apply(f, t)` compiles for an `F` and a `Tuple&`.
template <class F, class Tuple>
constexpr bool is_applicable() noexcept {
  if constexpr (is_tuple_like<Tuple>::value)
    return is_applicable_impl<F, Tuple, std::make_index_sequence<std::tuple_size_v<Tuple>>>::value;
  else
    return false;
}

/// The item type of a range: what its iterators give, decayed; `bool` for a
/// `std::vector<bool>`, whose iterators give proxies to its bits.
template <class Range>
using checked_item_t =
    std::conditional_t<std::is_same_v<std::decay_t<decltype(*std::begin(std::declval<Range&>()))>,
                                      std::vector<bool>::reference>,
                       bool, std::decay_t<decltype(*std::begin(std::declval<Range&>()))>>;
/// The item type of a range, as the calls cut it (`checked_item_t`).
template <class Range>
using range_item_t = checked_item_t<Range>;

/// The input of `map`, `starmap`, `imap` and `imap_unordered` is a range.
template <class Range>
constexpr bool check_range() {
  constexpr bool ok = is_range<std::remove_reference_t<Range>>::value;
  static_assert(ok,
                "procpool: the input of map, starmap, imap or imap_unordered must be a range: "
                "something std::begin and std::end accept (a container, an array, a view), or a "
                "braced list of items such as {1, 2, 3}.");
  return ok;
}

/// What a value is to the process that sends it, for the sentence that says
/// why it cannot be sent.
enum class sent_as {
  item,              ///< an item of the input of map, starmap, imap, imap_unordered
  submit_argument,   ///< an argument of a pool's or an executor's submit
  result,            ///< a result of the function, sent back
  rank_argument,     ///< an argument of mpi::pool::submit, sent to another rank
  queue_item,        ///< the `T` of a `queue<T>`
  connection_value,  ///< the `T` of a `connection<T>` (a pipe's end)
};

// The advice every sentence below ends with; spelt once, and not left defined
// for anything that includes this header.
#define PROCPOOL_SENDABLE_ADVICE_ \
  "See codec.hpp for the types procpool can send and how to make a type sendable."

/// A value of type `T` crosses to another process as `Role` says; if not,
/// the build fails with a sentence that names what it is, and the next error
/// says why `T` cannot be sent. Every check of a sent type goes through this
/// one (the pool's, the executor's, the MPI pool's, a queue's, a connection's).
template <sent_as Role, class T>
constexpr bool check_sendable() {
  constexpr bool ok = is_sendable_v<T>;
  static_assert(ok || Role != sent_as::item,
                "procpool: the items of this range cannot be sent to a worker process; the "
                "next error says why. " PROCPOOL_SENDABLE_ADVICE_);
  static_assert(ok || Role != sent_as::submit_argument,
                "procpool: an argument of submit cannot be sent to a worker process; the next "
                "error says why. " PROCPOOL_SENDABLE_ADVICE_);
  static_assert(ok || Role != sent_as::result,
                "procpool: the function's result cannot be sent back from a worker process; the "
                "next error says why. " PROCPOOL_SENDABLE_ADVICE_);
  static_assert(ok || Role != sent_as::rank_argument,
                "procpool: an argument of submit cannot be sent to another rank; the next error "
                "says why. " PROCPOOL_SENDABLE_ADVICE_);
  static_assert(ok || Role != sent_as::queue_item,
                "procpool::queue<T>: T cannot be sent between processes; the next error says "
                "why. " PROCPOOL_SENDABLE_ADVICE_);
  static_assert(ok || Role != sent_as::connection_value,
                "procpool::connection<T>: T cannot be sent between processes; the next error "
                "says why. " PROCPOOL_SENDABLE_ADVICE_);
  if constexpr (!ok) {
    if constexpr (!is_encodable_v<T>)
      verify<false, T>();
    else
      verify<true, T>();
  }
  return ok;
}

#undef PROCPOOL_SENDABLE_ADVICE_

/// What the function is called with: one item (map, imap), one item by an
/// executor, the elements of a tuple item (starmap), the arguments of submit.
enum class call_shape { one_item, executor_item, tuple_item, arguments };

template <class F, class Tuple>
struct apply_result {
  using type = decltype(std::apply(std::declval<F>(), std::declval<Tuple&>()));
};

/// `F` can be called on an `Item` the way `Shape` says.
template <call_shape Shape, class F, class Item>
constexpr bool check_callable() {
  if constexpr (Shape == call_shape::one_item || Shape == call_shape::executor_item) {
    constexpr bool ok = std::is_invocable_v<F&, Item&>;
    static_assert(ok || Shape != call_shape::one_item,
                  "procpool: the pool's function cannot be called with one item of this range "
                  "(map, imap and imap_unordered call f(item)): check the function's parameter "
                  "type against the range's items; for a function of several arguments, use "
                  "starmap with tuples.");
    static_assert(ok || Shape != call_shape::executor_item,
                  "procpool::executor::map calls the function with one item of the range at a "
                  "time: it must take one argument of the items' type. For a function of "
                  "several arguments, submit each call.");
    return ok;
  } else {
    constexpr bool tuple = is_tuple_like<Item>::value;
    static_assert(tuple || Shape != call_shape::tuple_item,
                  "procpool: starmap's items must be tuples or pairs, whose elements are the "
                  "function's arguments; use map for a function of one argument.");
    constexpr bool ok = tuple && is_applicable<F&, Item>();
    static_assert(ok || !tuple || Shape != call_shape::tuple_item,
                  "procpool: the pool's function cannot be called with the elements of one item "
                  "of this range as its arguments (starmap calls f(std::get<0>(item), "
                  "std::get<1>(item), ...)): check the function's parameters against the "
                  "tuples' element types.");
    static_assert(ok || Shape != call_shape::arguments,
                  "procpool: the function cannot be called with the arguments given to submit: "
                  "check their number and types against the function's parameters.");
    return ok;
  }
}

/// The function's result, unless it is `void`, can be sent back.
template <class R>
constexpr bool check_result() {
  if constexpr (std::is_void_v<R>)
    return true;
  else
    return check_sendable<sent_as::result, R>();
}

/// The checks of a call of `F` on `Item`s, in order, each only once the ones
/// before it passed.
template <call_shape Shape, class F, class Item>
constexpr bool check_call() {
  constexpr sent_as role =
      Shape == call_shape::arguments ? sent_as::submit_argument : sent_as::item;
  if constexpr (!check_sendable<role, Item>()) {
    return false;
  } else if constexpr (!check_callable<Shape, F, Item>()) {
    return false;
  } else if constexpr (Shape == call_shape::one_item || Shape == call_shape::executor_item) {
    return check_result<std::invoke_result_t<F&, Item&>>();
  } else {
    return check_result<typename apply_result<F&, Item>::type>();
  }
}

/// The checks of `map`, `starmap`, `imap` and `imap_unordered` of `F` over a `Range`.
template <call_shape Shape, class F, class Range>
constexpr bool check_map() {
  if constexpr (!check_range<Range>())
    return false;
  else
    return check_call<Shape, F, checked_item_t<std::remove_reference_t<Range>>>();
}

/// The checks of `submit(args...)` of `F`; `Tuple` holds the decayed arguments.
template <class F, class Tuple>
constexpr bool check_submit() {
  return check_call<call_shape::arguments, F, Tuple>();
}

/// True for what an executor can send as a function: a plain function pointer,
/// or a class without state (a captureless lambda).
template <class Fn>
inline constexpr bool is_sendable_function_v = (std::is_pointer_v<Fn> &&
                                                std::is_function_v<std::remove_pointer_t<Fn>>) ||
                                               (std::is_class_v<Fn> && std::is_empty_v<Fn> &&
                                                std::is_trivially_copyable_v<Fn>);

/// An executor's function can be sent: it is a plain function or a captureless lambda.
template <class Fn>
constexpr bool check_executor_function() {
  constexpr bool ok = is_sendable_function_v<Fn>;
  static_assert(ok,
                "procpool::executor runs plain functions and captureless lambdas: their code "
                "is at the same address in the worker processes. A lambda with captures "
                "carries state the executor cannot send; use procpool::pool for it.");
  return ok;
}

}  // namespace procpool::detail
