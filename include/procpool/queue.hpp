/// @file
/// `queue<T>`: a bounded multi-producer multi-consumer queue in shared memory,
/// after Python's `multiprocessing.Queue`.
///
/// ```cpp
/// procpool::queue<std::string> q;            // before forking
/// procpool::process producer([&] { q.push("work"); });
/// std::string item = q.pop();
/// ```
///
/// Every process forked after the queue was made can push and pop, and so can
/// any number of threads in each, all at once. Items are encoded (see
/// codec.hpp) into a circular buffer of `capacity()` bytes; each takes its
/// encoded size plus an 8-byte header. A queue may also be limited to
/// `max_items()` items, as Python's `Queue(maxsize)`. Copies of a `queue`
/// object are handles to the same queue.
///
/// ## Size limit
///
/// An item must fit the buffer whole: one whose encoding is larger than
/// `capacity() - 8` bytes throws `message_too_large`, whose message says the
/// capacity it would need. Unlike Python's `Queue`, which feeds an unbounded
/// OS pipe from a thread, the queue is bounded memory that any process may
/// be killed in without losing or tearing an item, so items are not streamed
/// through it piecewise. Size the queue for the largest item, or send large
/// items through a `pipe`, which streams a message of any size through its
/// buffer.
///
/// ## Unfinished items (Python's `JoinableQueue`)
///
/// Every push counts one unfinished item; `task_done()` marks one processed
/// and `join()` waits until none is unfinished. A queue whose consumers never
/// call `task_done()` is an ordinary queue: its unfinished count only grows.
///
/// ## Closing
///
/// `close()`, from any process, ends the stream: from then on every push
/// (`push`, `try_push`, `push_for`, `push_until`) throws `channel_closed`,
/// and a push waiting for room wakes and throws. Pops still deliver every item
/// pushed before; once the queue is closed *and* empty, `pop()` throws
/// `channel_closed` and `try_pop`, `pop_for` and `pop_until` return empty at
/// once (`closed()` tells this from a timeout). A pop waiting on an empty
/// queue wakes when it is closed.
///
/// ## Failures
///
/// A process killed at any point, even while it holds the queue's lock,
/// leaves the queue intact: each push or pop becomes visible by one store made
/// after its bytes are in place, so the item it was handling is either wholly
/// in the queue or wholly out of it. The next process to take the lock is told
/// by the robust mutex, recounts the items and carries on. (An item a killed
/// consumer had popped but not yet used is lost with it; if it would have
/// called `task_done()` for it, `join()` waits for good: use `join_for`.)
///
/// Every position, length and count in the shared memory is checked before
/// use: a queue whose shared memory was overwritten throws `channel_corrupted`
/// from then on, and never reads or writes outside its own bytes.
#pragma once

#include <chrono>
#include <cstddef>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "codec.hpp"
#include "detail/calls/call_checks.hpp"
#include "detail/transport/queue_core.hpp"
#include "errors.hpp"

namespace procpool {

/// Default capacity of a queue, in bytes.
inline constexpr std::size_t default_queue_capacity = 1024 * 1024;

/// `max_items` of a queue limited by its bytes only (the default).
inline constexpr std::size_t unlimited_items = std::numeric_limits<std::size_t>::max();

/// A bounded queue of `T` values shared by processes forked after it was
/// made; multi-producer, multi-consumer, first in first out.
///
/// **Thread safety:** every member may be called by any number of threads and
/// processes at once.
/// **Fork safety:** made before a fork, it works in the child, with every
/// copy of it; the shared memory goes away with the last process holding it.
template <class T>
class queue {
  // The check's own sentences say what is wrong; `|| true` keeps a third,
  // bare "static assertion failed" out of the user's build log.
  static_assert(detail::check_sendable<detail::sent_as::queue_item, T>() || true);

 public:
  /// The type of the items.
  using value_type = T;

  /// Makes a queue holding up to `capacity_bytes` bytes of items (each takes
  /// its encoded size plus 8), and at most `max_items` items.
  ///
  /// **Throws:** `procpool::error` for a capacity below 16 bytes or beyond
  /// 1 TiB, or `max_items` of 0; `std::system_error` when the shared memory
  /// cannot be mapped.
  /// **Example:** `procpool::queue<int> q(64 * 1024, 100);` holds 100 ints at most.
  explicit queue(std::size_t capacity_bytes = default_queue_capacity,
                 std::size_t max_items = unlimited_items);
  /// Another handle to the same queue.
  queue(const queue&) = default;
  /// Makes this a handle to the same queue as `other`.
  queue& operator=(const queue&) = default;
  ~queue() = default;

  /// Pushes `item`, waiting while the queue has no room for it (too few free
  /// bytes, or `max_items()` items held). Counts one unfinished item.
  ///
  /// **Throws:** `channel_closed` when the queue is closed (before or while
  /// waiting); `message_too_large` when the encoded item could never fit;
  /// `channel_corrupted` (see the file comment); whatever encoding `T` throws.
  void push(const T& item);

  /// Pushes `item` if there is room now; returns false otherwise.
  ///
  /// **Throws:** as `push`.
  [[nodiscard]] bool try_push(const T& item);

  /// Pushes `item` if there is room within `timeout`; returns false otherwise.
  ///
  /// **Throws:** as `push`.
  template <class Rep, class Period>
  [[nodiscard]] bool push_for(const T& item, const std::chrono::duration<Rep, Period>& timeout);

  /// Pushes `item` if there is room by `deadline`; returns false otherwise.
  ///
  /// **Throws:** as `push`.
  template <class Clock, class Duration>
  [[nodiscard]] bool push_until(const T& item,
                                const std::chrono::time_point<Clock, Duration>& deadline);

  /// Pops the oldest item, waiting while the queue is empty.
  ///
  /// **Throws:** `channel_closed` when the queue is closed and empty;
  /// `decode_error` when the bytes do not decode as a `T` (the item is
  /// dropped); `channel_corrupted` (see the file comment).
  [[nodiscard]] T pop();

  /// Pops the oldest item if there is one now; empty otherwise (also when
  /// the queue is closed and empty).
  ///
  /// **Throws:** `decode_error` as `pop`.
  [[nodiscard]] std::optional<T> try_pop();

  /// Pops the oldest item if there is one within `timeout`; empty otherwise
  /// (at once when the queue is closed and empty).
  ///
  /// **Throws:** `decode_error` as `pop`.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<T> pop_for(const std::chrono::duration<Rep, Period>& timeout);

  /// Pops the oldest item if there is one by `deadline`; empty otherwise (at
  /// once when the queue is closed and empty).
  ///
  /// **Throws:** `decode_error` as `pop`.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<T> pop_until(
      const std::chrono::time_point<Clock, Duration>& deadline);

  /// Closes the queue for every process: pushes throw from now on, pops
  /// drain what is left (see the file comment). Closing twice does nothing.
  void close();

  /// Marks one item taken from the queue as processed (Python's
  /// `JoinableQueue.task_done`), from any process.
  ///
  /// **Throws:** `procpool::error` when called more times than items were
  /// pushed; `channel_corrupted`.
  void task_done();

  /// Waits until every item pushed so far is marked processed by `task_done()`.
  void join();

  /// Waits at most `timeout` for `join()`; true when no item is unfinished.
  template <class Rep, class Period>
  [[nodiscard]] bool join_for(const std::chrono::duration<Rep, Period>& timeout);

  /// Waits until `deadline` at most for `join()`; true when no item is unfinished.
  template <class Clock, class Duration>
  [[nodiscard]] bool join_until(const std::chrono::time_point<Clock, Duration>& deadline);

  /// True once the queue was closed, by any process.
  [[nodiscard]] bool closed() const noexcept { return core_->closed(); }

  /// The number of items in the queue (Python's `qsize()`), read under the
  /// queue's lock; other processes may change it as soon as it returns.
  ///
  /// **Throws:** `channel_corrupted`.
  [[nodiscard]] std::size_t size() const { return core_->state().items; }

  /// True when the queue holds no item (as `size() == 0`).
  ///
  /// **Throws:** `channel_corrupted`.
  [[nodiscard]] bool empty() const { return size() == 0; }

  /// True when `max_items()` items are held, or the free bytes cannot take
  /// even an empty item (9 bytes). A false answer does not promise room for a
  /// given item: one larger than the free bytes still waits.
  ///
  /// **Throws:** `channel_corrupted`.
  [[nodiscard]] bool full() const {
    auto f = core_->state();
    return f.items >= max_items() || f.free_bytes <= detail::queue_header_bytes;
  }

  /// The number of items pushed and not yet marked processed by `task_done()`.
  ///
  /// **Throws:** `channel_corrupted`.
  [[nodiscard]] std::size_t unfinished() const { return core_->state().unfinished; }

  /// The number of items in the queue at some recent moment, read without
  /// the lock; other processes may change it at any time.
  [[nodiscard]] std::size_t size_approx() const noexcept { return core_->size_approx(); }

  /// The capacity in bytes given at construction.
  [[nodiscard]] std::size_t capacity() const noexcept { return core_->capacity(); }

  /// The most items held at once (`unlimited_items` when only bytes limit it).
  [[nodiscard]] std::size_t max_items() const noexcept { return core_->max_items(); }

 private:
  bool push_impl(const T& item, bool block,
                 std::optional<std::chrono::steady_clock::time_point> deadline);
  std::optional<T> pop_impl(bool block,
                            std::optional<std::chrono::steady_clock::time_point> deadline,
                            bool throw_when_closed);

  std::shared_ptr<detail::queue_core> core_;
};

// ---------------------------------------------------------------------------

template <class T>
queue<T>::queue(std::size_t capacity_bytes, std::size_t max_items)
    : core_(std::make_shared<detail::queue_core>(capacity_bytes, max_items)) {}

template <class T>
bool queue<T>::push_impl(const T& item, bool block,
                         std::optional<std::chrono::steady_clock::time_point> deadline) {
  writer out;
  encode(out, item);
  return core_->push(out.data(), out.size(), block, deadline);
}

template <class T>
void queue<T>::push(const T& item) {
  (void)push_impl(item, true, std::nullopt);
}

template <class T>
bool queue<T>::try_push(const T& item) {
  return push_impl(item, false, std::nullopt);
}

template <class T>
template <class Rep, class Period>
bool queue<T>::push_for(const T& item, const std::chrono::duration<Rep, Period>& timeout) {
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return push_impl(item, false, std::nullopt);
  return push_impl(item, true, detail::deadline_after(ns));
}

template <class T>
template <class Clock, class Duration>
bool queue<T>::push_until(const T& item, const std::chrono::time_point<Clock, Duration>& deadline) {
  return push_impl(item, true, detail::to_steady(deadline));
}

template <class T>
std::optional<T> queue<T>::pop_impl(bool block,
                                    std::optional<std::chrono::steady_clock::time_point> deadline,
                                    bool throw_when_closed) {
  std::vector<std::byte> bytes;
  switch (core_->pop(bytes, block, deadline)) {
    case detail::queue_core::pop_result::popped:
      return decode<T>(bytes.data(), bytes.size());
    case detail::queue_core::pop_result::closed:
      if (throw_when_closed) throw channel_closed("queue pop: the queue is closed and empty");
      return std::nullopt;
    case detail::queue_core::pop_result::empty:
      break;
  }
  return std::nullopt;
}

template <class T>
T queue<T>::pop() {
  return std::move(*pop_impl(true, std::nullopt, true));
}

template <class T>
std::optional<T> queue<T>::try_pop() {
  return pop_impl(false, std::nullopt, false);
}

template <class T>
template <class Rep, class Period>
std::optional<T> queue<T>::pop_for(const std::chrono::duration<Rep, Period>& timeout) {
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return pop_impl(false, std::nullopt, false);
  return pop_impl(true, detail::deadline_after(ns), false);
}

template <class T>
template <class Clock, class Duration>
std::optional<T> queue<T>::pop_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return pop_impl(true, detail::to_steady(deadline), false);
}

template <class T>
void queue<T>::close() {
  core_->close();
}

template <class T>
void queue<T>::task_done() {
  core_->task_done();
}

template <class T>
void queue<T>::join() {
  (void)core_->join(std::nullopt);
}

template <class T>
template <class Rep, class Period>
bool queue<T>::join_for(const std::chrono::duration<Rep, Period>& timeout) {
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return core_->join(std::chrono::steady_clock::now());
  return core_->join(detail::deadline_after(ns));
}

template <class T>
template <class Clock, class Duration>
bool queue<T>::join_until(const std::chrono::time_point<Clock, Duration>& deadline) {
  return core_->join(detail::to_steady(deadline));
}

}  // namespace procpool
