// What every front end of a pool shares (`pool<F>` in pool.hpp, `mpi::pool<F>`
// in mpi.hpp): `call_front` turns `map`, `starmap`, `imap`, `imap_unordered`
// and `submit` into calls on a driver (map_calls.hpp), with Python's default
// chunk size, and hands back the results, a `future` or a range (handles.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
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
    return run_map<Invoke>(items, name, chunk);
  } else {
    std::size_t n;
    if constexpr (has_size<Range>::value)
      n = static_cast<std::size_t>(std::size(inputs));
    else
      n = static_cast<std::size_t>(std::distance(std::begin(inputs), std::end(inputs)));
    const Item* contiguous = nullptr;
    if constexpr (is_contiguous_of<Range, Item>::value) contiguous = std::data(inputs);
    constexpr bool default_constructible = std::is_default_constructible_v<Result>;
    using Slot = std::conditional_t<default_constructible, Result, std::optional<Result>>;
    std::vector<Slot> results(n);
    auto call = std::make_shared<map_call<F, Handlers, Item, Invoke, Begin, End, Slot>>(
        std::begin(inputs), std::end(inputs), contiguous, n, default_chunk(n, chunk),
        driver_->chunk_bytes(), results, progress_reporter(progress_, on_progress_, n));
    driver_->start(call);
    // However this scope ends (results, an error, an exception from a
    // callback or the driver), the call ends with it: nothing keeps using
    // `inputs` or `results` after it.
    call_guard guard(*driver_, *call);
    driver_->drive([&] {
      call->report_progress();
      return call->finished();
    });
    call->rethrow_if_failed();
    if constexpr (std::is_same_v<Result, std::monostate>) {
      return;
    } else if constexpr (default_constructible) {
      return results;
    } else {
      std::vector<Result> out;
      out.reserve(n);
      for (auto& r : results) out.push_back(std::move(*r));
      return out;
    }
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
