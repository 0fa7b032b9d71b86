// What every front end of a pool shares (`pool<F>` in pool.hpp, `mpi::pool<F>`
// in mpi.hpp): `call_front` turns `map`, `starmap`, `imap`, `imap_unordered`
// and `submit` into calls on a driver (map_calls.hpp), with Python's default
// chunk size, and hands back the results, a `future` or a range (handles.hpp).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "call_checks.hpp"
#include "call_state.hpp"
#include "handles.hpp"
#include "map_calls.hpp"
#include "progress_reporter.hpp"

namespace procpool {

namespace detail {

/// What `pool<F>` and `mpi::pool<F>` share: turning `map`, `imap` and `submit`
/// into calls on a driver, with Python's default chunk size.
template <class F, class Handlers>
class call_front {
 public:
  call_front() = default;
  call_front(std::shared_ptr<driver> d, std::size_t chunk_size, bool progress,
             std::function<void(const progress_info&)> on_progress)
      : driver_(std::move(d)),
        chunk_size_(chunk_size),
        progress_(progress),
        on_progress_(std::move(on_progress)) {}

  /// `map` (Invoke = invoke_one) or `starmap` (invoke_apply): results in
  /// input order. `chunk`: items per chunk for this call (0: the pool's).
  template <class Invoke, class Range>
  auto map(Range& inputs, const char* name, std::size_t chunk = 0) {
    scoped_use use(*driver_, name);
    return run_map<Invoke>(inputs, name, chunk);
  }
  /// `map` or `starmap` with every result written into `out`: a vector
  /// (resized), a writable contiguous range (span, array), a contiguous
  /// iterator or any output iterator. Returns the end of what was written.
  template <class Invoke, class Range, class Out>
  auto map_into(Range& inputs, Out&& out, const char* name, std::size_t chunk);
  /// `imap` (Ordered) or `imap_unordered`, items called through `Invoke`.
  template <bool Ordered, class Invoke = invoke_one, class Range>
  auto imap(Range&& inputs, std::size_t chunk = 0);
  /// One task: `item` called through `Invoke`.
  template <class Invoke, class Item>
  auto submit(Item item);
  /// `map_async` (invoke_one) or `starmap_async` (invoke_apply): the input
  /// read into a vector now, the results in a future, the callbacks run by
  /// the helper thread.
  template <class Invoke, class Range, class OnValue, class OnError>
  auto map_async(Range&& inputs, const char* name, std::size_t chunk, OnValue on_value,
                 OnError on_error);

 private:
  template <class Invoke, class Range>
  auto run_map(Range& inputs, const char* name, std::size_t chunk);
  /// Runs a `map` whose result `i` goes to `dest(n)[i]`; `dest` is asked once
  /// `n` is known, before anything is sent.
  template <class Invoke, class Range, class Dest>
  void run_map_into(Range& inputs, const char* name, std::size_t chunk, Dest&& dest);

  std::size_t default_chunk(std::size_t n, std::size_t chunk) const noexcept {
    if (chunk) return chunk;
    if (chunk_size_) return chunk_size_;
    std::size_t parts = 4 * std::size_t(driver_->parallelism());
    return std::max<std::size_t>(1, (n + parts - 1) / parts);
  }

  std::shared_ptr<driver> driver_;
  std::size_t chunk_size_ = 0;
  bool progress_ = false;
  std::function<void(const progress_info&)> on_progress_;
  std::shared_ptr<task_batch> batch_;  // submitted tasks, with progress on
};

template <class F, class Handlers>
template <class Invoke, class Range>
auto call_front<F, Handlers>::run_map(Range& inputs, const char* name, std::size_t chunk) {
  using Result = call_result_t<F, range_item_t<Range>, Invoke>;
  std::vector<result_slot_t<Result>> results;
  run_map_into<Invoke>(inputs, name, chunk,
                       [&](std::size_t n) { return reserve_slots(results, n); });
  if constexpr (std::is_same_v<Result, std::monostate>)
    return;
  else
    return take_results<Result>(results);
}

template <class F, class Handlers>
template <class Invoke, class Range, class Dest>
void call_front<F, Handlers>::run_map_into(Range& inputs, const char* name, std::size_t chunk,
                                           Dest&& dest) {
  using Item = range_item_t<Range>;
  static_assert(check_sendable<sent_as::item, Item>());
  using Result = call_result_t<F, Item, Invoke>;
  static_assert(check_result<Result>());
  using Begin = decltype(std::begin(inputs));
  using End = decltype(std::end(inputs));
  driver_->check_usable(name);
  if constexpr (!has_size<Range>::value && !is_forward_iterator_v<Begin>) {
    // A single-pass range without a size: read it all first, as Python does.
    std::vector<Item> items(std::begin(inputs), std::end(inputs));
    run_map_into<Invoke>(items, name, chunk, std::forward<Dest>(dest));
  } else {
    std::size_t n;
    if constexpr (has_size<Range>::value)
      n = static_cast<std::size_t>(std::size(inputs));
    else
      n = static_cast<std::size_t>(std::distance(std::begin(inputs), std::end(inputs)));
    const Item* contiguous = nullptr;
    if constexpr (is_contiguous_of<Range, Item>::value) contiguous = std::data(inputs);
    // Where result i goes: asked for before the call starts, so that an
    // output too small fails it before any item is sent.
    // A pointer to room for every result, or slots made as results arrive
    // (`growing_slots`).
    auto target = dest(n);
    using Target = decltype(target);
    using Slot = typename std::conditional_t<is_growing_slots<Target>::value, Target,
                                             std::pointer_traits<Target>>::element_type;
    Slot* out;
    std::vector<Slot>* grow = nullptr;
    if constexpr (is_growing_slots<Target>::value) {
      grow = target.slots;
      out = grow->data();
    } else {
      out = target;
    }
    auto call = std::make_shared<map_call<F, Handlers, Item, Invoke, Begin, End, Slot>>(
        std::begin(inputs), std::end(inputs), contiguous, n, default_chunk(n, chunk),
        driver_->chunk_bytes(), out, progress_reporter(progress_, on_progress_, n), grow);
    driver_->start(call);
    // However this scope ends (results, an error, an exception from a
    // callback or the driver), the call ends with it: nothing keeps using
    // `inputs` or the output after it.
    call_guard guard(*driver_, *call);
    driver_->drive([&] {
      call->report_progress();
      return call->finished();
    });
    call->rethrow_if_failed();
  }
}

template <class F, class Handlers>
template <class Invoke, class Range, class Out>
auto call_front<F, Handlers>::map_into(Range& inputs, Out&& out, const char* name,
                                       std::size_t chunk) {
  using Item = range_item_t<Range>;
  using Result = call_result_t<F, Item, Invoke>;
  static_assert(!std::is_same_v<Result, std::monostate>,
                "procpool: map_into writes the function's results, and this function returns "
                "nothing; use map");
  using O = std::remove_cv_t<std::remove_reference_t<Out>>;
  scoped_use use(*driver_, name);
  if constexpr (std::is_same_v<O, std::vector<bool>> && std::is_same_v<Result, bool>) {
    // Bits have no address to decode into: the results are kept as bytes
    // and packed into the vector once all are in.
    std::vector<unsigned char> results;
    run_map_into<Invoke>(inputs, name, chunk,
                         [&](std::size_t n) { return reserve_slots(results, n); });
    out.assign(results.begin(), results.end());
    return out.end();
  } else if constexpr (std::is_same_v<O, std::vector<Result>>) {
    static_assert(!std::is_const_v<std::remove_reference_t<Out>>,
                  "procpool: map_into needs a vector it can write into, not a const one");
    static_assert(std::is_default_constructible_v<Result>,
                  "procpool: map_into resizes the vector to the number of items, which needs a "
                  "result type with a default constructor; pass an output iterator instead");
    // Resized to the input's size: a vector of that size already (the last
    // call's) keeps its memory, and no element is touched before its result
    // arrives.
    run_map_into<Invoke>(inputs, name, chunk, [&](std::size_t n) {
      out.resize(n);
      return out.data();
    });
    return out.end();
  } else if constexpr (is_writable_contiguous_of<std::remove_reference_t<Out>, Result>::value) {
    // A span, an array: room for every result, or nothing runs.
    Result* at = nullptr;
    run_map_into<Invoke>(inputs, name, chunk, [&](std::size_t n) {
      auto room = static_cast<std::size_t>(std::size(out));
      if (room < n)
        throw std::length_error(
            fmt::format("procpool: {}: the output has room for {} results, "
                        "and the input has {} items",
                        name, room, n));
      at = std::data(out) + n;
      return std::data(out);
    });
    return at;
  } else if constexpr (is_contiguous_iterator_of_v<O, Result>) {
    // A pointer, or a vector's iterator: results written where they belong,
    // the caller vouching for the room as with std::transform.
    std::size_t count = 0;
    run_map_into<Invoke>(inputs, name, chunk, [&](std::size_t n) {
      count = n;
      if constexpr (std::is_pointer_v<O>)
        return static_cast<Result*>(out);
      else
        return n == 0 ? static_cast<Result*>(nullptr) : std::addressof(*out);
    });
    return out + static_cast<typename std::iterator_traits<O>::difference_type>(count);
  } else {
    // Any other output iterator (a back_inserter, a list's iterator): the
    // results are assigned through it in input order once they are all in.
    static_assert(!is_writable_contiguous_of<O, Result>::value,
                  "procpool: map_into cannot write into a const range");
    static_assert(std::is_assignable_v<decltype(*std::declval<O&>()), Result&&>,
                  "procpool: map_into's output must be a vector of the function's result type, "
                  "a range of it with data() and size() (a std::span, a std::array), or an "
                  "output iterator that a result can be assigned through");
    std::vector<result_slot_t<Result>> results;
    run_map_into<Invoke>(inputs, name, chunk,
                         [&](std::size_t n) { return reserve_slots(results, n); });
    O it = std::forward<Out>(out);
    for (auto& r : results) {
      if constexpr (std::is_same_v<result_slot_t<Result>, std::optional<Result>>)
        *it = std::move(*r);
      else if constexpr (std::is_same_v<Result, bool>)
        *it = static_cast<bool>(r);
      else
        *it = std::move(r);
      ++it;
    }
    return it;
  }
}

template <class F, class Handlers>
template <bool Ordered, class Invoke, class Range>
auto call_front<F, Handlers>::imap(Range&& inputs, std::size_t chunk_size) {
  using Item = range_item_t<Range>;
  static_assert(check_sendable<sent_as::item, Item>());
  using Result = call_result_t<F, Item, Invoke>;
  static_assert(check_result<Result>());
  scoped_use use(*driver_, Ordered ? "imap" : "imap_unordered");
  driver_->check_usable(Ordered ? "imap" : "imap_unordered");
  std::size_t chunk = chunk_size ? chunk_size : chunk_size_;
  std::size_t total = 0;
  bool grow = false;
  if constexpr (has_size<std::remove_reference_t<Range>>::value) {
    total = static_cast<std::size_t>(std::size(inputs));
    if (chunk == 0) chunk = default_chunk(total, 0);
  }
  if (chunk == 0) {
    chunk = 1;
    grow = true;
  }
  std::size_t window = 4 * std::size_t(driver_->parallelism()) * std::min<std::size_t>(chunk, 4096);
  if (grow) window = 4 * std::size_t(driver_->parallelism()) * 4096;
  using call_t = imap_call<F, Handlers, Item, Invoke, Range, Result, Ordered>;
  auto call =
      std::make_shared<call_t>(std::forward<Range>(inputs), chunk, grow, driver_->chunk_bytes(),
                               window, driver_, progress_reporter(progress_, on_progress_, total));
  driver_->start(call);
  std::shared_ptr<imap_state<Result>> state = call;
  if constexpr (Ordered)
    return imap_range<Result>(std::move(state), driver_);
  else
    return imap_unordered_range<Result>(std::move(state), driver_);
}

template <class F, class Handlers>
template <class Invoke, class Item>
auto call_front<F, Handlers>::submit(Item item) {
  using Result = call_result_t<F, Item, Invoke>;
  static_assert(check_result<Result>());
  using R = std::conditional_t<std::is_same_v<Result, std::monostate>, void, Result>;
  scoped_use use(*driver_, "submit");
  driver_->check_usable("submit");
  if ((progress_ || on_progress_) && !batch_)
    batch_ = std::make_shared<task_batch>(progress_, on_progress_);
  auto call =
      std::make_shared<submit_call<F, Handlers, Item, Invoke, Result>>(std::move(item), batch_);
  driver_->start(call);
  driver_->task_started();
  // The helper thread reports the batch's progress as its tasks end.
  if (batch_) driver_->watch(call);
  driver_->send_now();
  auto s = std::make_shared<typename future<R>::state>();
  s->call = call;
  s->result = &call->result;
  return future<R>(std::move(s), driver_);
}

template <class F, class Handlers>
template <class Invoke, class Range, class OnValue, class OnError>
auto call_front<F, Handlers>::map_async(Range&& inputs, const char* name, std::size_t chunk,
                                        OnValue on_value, OnError on_error) {
  using Item = range_item_t<Range>;
  static_assert(check_sendable<sent_as::item, Item>());
  using Result = call_result_t<F, Item, Invoke>;
  static_assert(check_result<Result>());
  using call_t = map_async_call<F, Handlers, Item, Invoke, Result>;
  using R =
      std::conditional_t<std::is_same_v<Result, std::monostate>, void, typename call_t::value_type>;
  std::optional<future<R>> f;
  {
    scoped_use use(*driver_, name);
    driver_->check_usable(name);
    std::vector<Item> items(std::begin(inputs), std::end(inputs));
    std::size_t n = items.size();
    auto call =
        std::make_shared<call_t>(std::move(items), default_chunk(n, chunk), driver_->chunk_bytes(),
                                 progress_reporter(progress_, on_progress_, n));
    driver_->start(call);
    driver_->task_started();
    driver_->send_now();
    // The helper thread reports its progress (the caller is not waiting).
    if (progress_ || on_progress_) driver_->watch(call);
    auto s = std::make_shared<typename future<R>::state>();
    s->call = call;
    s->result = &call->result;
    s->one_task = false;
    f.emplace(future<R>(std::move(s), driver_));
  }
  if constexpr (!std::is_same_v<OnValue, ignore_value> || !std::is_same_v<OnError, ignore_error>)
    f->then(std::move(on_value), std::move(on_error));
  return std::move(*f);
}

}  // namespace detail

}  // namespace procpool
