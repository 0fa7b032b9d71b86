// The core of queue<T> (queue.hpp): the shared block of a queue and its
// byte-level push, pop and repair, before encoding and after decoding.
//
// A queue (one anonymous mapping, made before forking):
//   queue_block     robust mutex, committed head/tail byte counters, message
//                   count, unfinished count and the journal of a push, closed
//                   flag, eventcounts "not empty" / "not full" / "all done"
//   data            circular buffer of messages: u64 size, then the bytes
//
// A queue's shared state changes only under its mutex, and each push or pop
// becomes visible through one store of `tail` or `head` made after the bytes
// are in place. A process that dies holding the mutex therefore leaves either
// the old state or the new one, never a half-written message; the next locker
// only recounts the messages (`count` is updated after the commit), and
// settles the unfinished count from the journal a push writes before its
// commit. No process trusts a number in the block: each is checked against
// the capacity it knows itself.
//
// `queue_test_hook` lets tests stop a process at each stage of a push or pop
// while it holds the mutex, then kill it there.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../int_cast.hpp"
#include "../os/clock.hpp"
#include "../sync/robust_mutex.hpp"
#include "futex.hpp"
#include "shm.hpp"
#include "wait.hpp"

namespace procpool::detail {

/// Where a queue operation stands, for `queue_test_hook`.
enum class queue_stage {
  push_locked,     ///< push holds the mutex
  push_copied,     ///< push wrote the message bytes and its journal, not yet committed
  push_committed,  ///< push stored the new tail; unfinished and message counts not yet updated
  pop_locked,      ///< pop holds the mutex
  pop_copied,      ///< pop copied the message out, not yet committed
  pop_committed,   ///< pop stored the new head, message count not yet updated
  done_locked,     ///< task_done holds the mutex
};

/// Test hook: when set, called at each stage of a queue push or pop while
/// the queue's mutex is held (tests make a child stop there, then kill it).
inline void (*queue_test_hook)(queue_stage) = nullptr;

/// No limit on the number of items in a queue (only its bytes).
inline constexpr std::size_t queue_unlimited_items = static_cast<std::size_t>(-1);

/// The shared part of a queue. Every field but the eventcounts changes only
/// under `mutex`.
struct queue_block {
  robust_mutex mutex;
  alignas(cache_line) std::atomic<std::uint64_t> head{0};  ///< bytes ever popped (committed)
  std::atomic<std::uint64_t> tail{0};                      ///< bytes ever pushed (committed)
  std::atomic<std::uint64_t> count{0};                     ///< messages held (after commits)
  std::atomic<std::uint64_t> unfinished{0};  ///< messages pushed and not yet `task_done`
  /// A push in progress: the tail it commits and the unfinished count that
  /// goes with it, so that a repair after its death knows which one holds.
  std::atomic<std::uint64_t> journal_tail{0};
  std::atomic<std::uint64_t> journal_unfinished{0};
  std::atomic<std::uint32_t> journal_active{0};
  std::atomic<std::uint32_t> closed{0};
  std::uint64_t capacity = 0;  ///< data bytes (for a reader of the mapping; never trusted)
  alignas(cache_line) eventcount not_empty;
  alignas(cache_line) eventcount not_full;
  alignas(cache_line) eventcount all_done;  ///< notified when `unfinished` drops to 0
};

/// Bytes a message header takes in a queue.
inline constexpr std::size_t queue_header_bytes = sizeof(std::uint64_t);

/// A queue's mapping and the byte-level push and pop. Shared by every handle
/// of a process through a `shared_ptr`; every forked child inherits it.
///
/// Every position, length and count read from the shared block is checked
/// against the capacity this process knows (its own copy, not the shared
/// one): a queue whose block was overwritten raises `channel_corrupted` and
/// never reads or writes outside its data bytes.
class queue_core {
 public:
  /// How `pop` ended.
  enum class pop_result { popped, empty, closed };

  /// Maps a queue of `capacity` data bytes holding at most `max_items` messages.
  /// **Throws:** `procpool::error` when `capacity` cannot hold a message or
  /// `max_items` is 0; `std::system_error` naming mmap.
  explicit queue_core(std::size_t capacity, std::size_t max_items = queue_unlimited_items);
  queue_core(const queue_core&) = delete;
  queue_core& operator=(const queue_core&) = delete;

  /// Pushes the `size` bytes at `data`. Waits for room until `deadline`
  /// (forever when empty) if `block`. Returns false when there was no room
  /// in time. **Throws:** `message_too_large`, `channel_closed` (closed
  /// queue), `channel_corrupted`.
  bool push(const void* data, std::size_t size, bool block,
            std::optional<steady::time_point> deadline);
  /// Pops the oldest message into `out`. Waits for one until `deadline`
  /// (forever when empty) if `block`. `closed` once the queue is closed and
  /// empty. **Throws:** `channel_corrupted`.
  pop_result pop(std::vector<std::byte>& out, bool block,
                 std::optional<steady::time_point> deadline);
  /// Refuses further pushes and wakes every waiter.
  void close();
  /// Marks one popped message as processed. **Throws:** `procpool::error`
  /// when every pushed message is marked already; `channel_corrupted`.
  void task_done();
  /// Waits until every pushed message is marked processed, until `deadline`
  /// (forever when empty); false on timeout.
  bool join(std::optional<steady::time_point> deadline);

  /// True once `close()` was called in any process.
  bool closed() const noexcept { return q_->closed.load(std::memory_order_acquire) != 0; }
  /// Messages held at some recent moment (read without the lock).
  std::size_t size_approx() const noexcept {
    return static_cast<std::size_t>(std::min<std::uint64_t>(
        q_->count.load(std::memory_order_relaxed), capacity_ / queue_header_bytes));
  }
  /// How full the queue is now, read under the lock.
  struct fill {
    std::size_t items;       ///< messages held
    std::size_t free_bytes;  ///< data bytes free
    std::size_t unfinished;  ///< messages pushed and not yet marked done
  };
  /// **Throws:** `channel_corrupted`.
  fill state();
  /// Data bytes.
  std::size_t capacity() const noexcept { return capacity_; }
  /// Most messages held at once.
  std::size_t max_items() const noexcept { return max_items_; }

  /// The shared block, as another process could overwrite it (tests, fuzzing).
  queue_block& shared_block() noexcept { return *q_; }

  /// How waits spin and sleep.
  wait_policy policy;

 private:
  class guard;
  bool lock(std::optional<steady::time_point> deadline);
  void repair() noexcept;
  void check(std::uint64_t head, std::uint64_t tail, const char* op) const;
  std::uint64_t used() const noexcept;
  bool room_for(std::uint64_t need) const noexcept;
  void copy_in(std::uint64_t at, const void* src, std::size_t n) noexcept;
  void copy_out(std::uint64_t at, void* dst, std::size_t n) const noexcept;
  static void stage(queue_stage s) {
    if (queue_test_hook != nullptr) queue_test_hook(s);
  }

  shared_mapping map_;
  queue_block* q_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;   // this process's own copy: never read back from shared memory
  std::size_t max_items_ = 0;  // likewise
};

// ---------------------------------------------------------------------------
// Definitions

// Holds a queue's mutex; unlocks on destruction.
class queue_core::guard {
 public:
  explicit guard(robust_mutex& m) noexcept : m_(&m) {}
  guard(const guard&) = delete;
  guard& operator=(const guard&) = delete;
  ~guard() { unlock(); }
  void unlock() noexcept {
    if (m_ != nullptr) std::exchange(m_, nullptr)->unlock();
  }

 private:
  robust_mutex* m_;
};

inline queue_core::queue_core(std::size_t capacity, std::size_t max_items) {
  constexpr std::size_t minimum = 2 * queue_header_bytes;
  if (capacity < minimum || capacity > (std::size_t{1} << 40))
    throw error(
        fmt::format("a queue needs a capacity between {} bytes and 1 TiB; {} bytes were "
                    "asked for",
                    minimum, capacity));
  if (max_items == 0) throw error("a queue needs room for at least one item; 0 were asked for");
  std::size_t header = align_up(sizeof(queue_block), cache_line);
  map_ = shared_mapping(header + capacity);
  auto* base = static_cast<std::byte*>(map_.data());
  // Constructed once, never destroyed in place: other processes may use it
  // until they unmap it (pthread_mutex_destroy would break their locks).
  q_ = new (base) queue_block();
  q_->capacity = capacity;
  data_ = base + header;
  capacity_ = capacity;
  max_items_ = max_items;
}

// Locks the mutex; after a holder died, repairs the state it guards (the
// robust mutex then marks itself consistent). False when `deadline` passed first.
inline bool queue_core::lock(std::optional<steady::time_point> deadline) {
  return q_->mutex.lock_until(deadline, [this] { repair(); }) != lock_status::busy;
}

// Under the mutex: throws channel_corrupted unless head and tail describe at
// most `capacity_` bytes and the message count fits them.
inline void queue_core::check(std::uint64_t head, std::uint64_t tail, const char* op) const {
  std::uint64_t used = tail - head;
  std::uint64_t count = q_->count.load(std::memory_order_relaxed);
  if (used > capacity_ || count > used / queue_header_bytes || (used != 0 && count == 0))
    throw channel_corrupted(
        fmt::format("queue {}: the queue's shared state is corrupt ({} bytes and {} items "
                    "queued in a queue of {} bytes); memory was overwritten, and the queue "
                    "cannot be used any more",
                    op, static_cast<std::int64_t>(used), count, capacity_));
}

// Under the mutex, after its holder died. Every commit is one store, so head
// and tail are whole; `count` may lag, and `unfinished` is settled by the
// journal of a push that died. Recount the messages, checking each size
// against what remains (a corrupt queue is left as it is: the next push or
// pop reports it), and wake waiters the dead process may have owed a
// notification.
inline void queue_core::repair() noexcept {
  std::uint64_t head = q_->head.load(std::memory_order_relaxed);
  std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
  if (q_->journal_active.load(std::memory_order_relaxed) != 0) {
    if (tail == q_->journal_tail.load(std::memory_order_relaxed))
      q_->unfinished.store(q_->journal_unfinished.load(std::memory_order_relaxed),
                           std::memory_order_relaxed);
    q_->journal_active.store(0, std::memory_order_relaxed);
  }
  if (tail - head <= capacity_) {
    std::uint64_t at = head;
    std::uint64_t messages = 0;
    while (tail - at >= queue_header_bytes) {
      std::uint64_t size;
      copy_out(at, &size, sizeof size);
      if (size > tail - at - queue_header_bytes) break;
      at += queue_header_bytes + size;
      ++messages;
    }
    if (at == tail) q_->count.store(messages, std::memory_order_relaxed);
  }
  q_->not_empty.notify();
  q_->not_full.notify();
  if (q_->unfinished.load(std::memory_order_relaxed) == 0) q_->all_done.notify();
}

// Bytes in use; head is read first, so the answer is never below the truth.
inline std::uint64_t queue_core::used() const noexcept {
  std::uint64_t head = q_->head.load(std::memory_order_acquire);
  return q_->tail.load(std::memory_order_acquire) - head;
}

// Whether a message of `need` bytes (header included) fits now, read without
// the lock. A corrupt state says yes, so that the caller locks and reports it.
inline bool queue_core::room_for(std::uint64_t need) const noexcept {
  std::uint64_t u = used();
  if (u > capacity_) return true;
  return capacity_ - u >= need && q_->count.load(std::memory_order_relaxed) < max_items_;
}

inline void queue_core::copy_in(std::uint64_t at, const void* src, std::size_t n) noexcept {
  if (n == 0) return;  // the pointer may be null then, which memcpy does not allow
  std::size_t off = int_cast<std::size_t>(at % capacity_);
  std::size_t first = std::min(n, capacity_ - off);
  std::memcpy(data_ + off, src, first);
  std::memcpy(data_, static_cast<const std::byte*>(src) + first, n - first);
}

inline void queue_core::copy_out(std::uint64_t at, void* dst, std::size_t n) const noexcept {
  if (n == 0) return;  // the pointer may be null then, which memcpy does not allow
  std::size_t off = int_cast<std::size_t>(at % capacity_);
  std::size_t first = std::min(n, capacity_ - off);
  std::memcpy(dst, data_ + off, first);
  std::memcpy(static_cast<std::byte*>(dst) + first, data_, n - first);
}

inline bool queue_core::push(const void* data, std::size_t size, bool block,
                             std::optional<steady::time_point> deadline) {
  if (size > capacity_ - queue_header_bytes)
    throw message_too_large(
        size, capacity_,
        fmt::format("each item takes its encoded size plus {} bytes in a queue, so this one "
                    "needs a queue of at least {} bytes: make it with queue<T>(capacity_bytes), "
                    "or send items this large through a pipe, which streams them",
                    queue_header_bytes, size + queue_header_bytes));
  const std::uint64_t need = queue_header_bytes + size;
  for (;;) {
    if (!lock(deadline)) return false;
    guard g(q_->mutex);
    stage(queue_stage::push_locked);
    if (q_->closed.load(std::memory_order_relaxed) != 0)
      throw channel_closed("queue push: the queue is closed");
    std::uint64_t head = q_->head.load(std::memory_order_relaxed);
    std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
    check(head, tail, "push");
    std::uint64_t count = q_->count.load(std::memory_order_relaxed);
    if (capacity_ - (tail - head) >= need && count < max_items_) {
      std::uint64_t header = size;
      copy_in(tail, &header, sizeof header);
      copy_in(tail + queue_header_bytes, data, size);
      std::uint64_t unfinished = q_->unfinished.load(std::memory_order_relaxed) + 1;
      q_->journal_tail.store(tail + need, std::memory_order_relaxed);
      q_->journal_unfinished.store(unfinished, std::memory_order_relaxed);
      q_->journal_active.store(1, std::memory_order_relaxed);
      stage(queue_stage::push_copied);
      q_->tail.store(tail + need, std::memory_order_release);  // the commit
      stage(queue_stage::push_committed);
      q_->unfinished.store(unfinished, std::memory_order_relaxed);
      q_->journal_active.store(0, std::memory_order_relaxed);
      q_->count.store(count + 1, std::memory_order_relaxed);
      g.unlock();
      q_->not_empty.notify();
      return true;
    }
    g.unlock();
    if (!block) return false;
    auto ws = wait_for_condition(
        q_->not_full, [&] { return closed() || room_for(need); }, deadline, [] { return true; },
        policy);
    if (ws == wait_status::timeout) return false;
  }
}

inline queue_core::pop_result queue_core::pop(std::vector<std::byte>& out, bool block,
                                              std::optional<steady::time_point> deadline) {
  for (;;) {
    if (!lock(deadline)) return pop_result::empty;
    guard g(q_->mutex);
    stage(queue_stage::pop_locked);
    std::uint64_t head = q_->head.load(std::memory_order_relaxed);
    std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
    check(head, tail, "pop");
    if (tail != head) {
      std::uint64_t size = 0;
      if (tail - head >= queue_header_bytes) copy_out(head, &size, sizeof size);
      if (tail - head < queue_header_bytes || size > tail - head - queue_header_bytes)
        throw channel_corrupted(fmt::format(
            "queue pop: the queue's shared state is corrupt (an item of {} bytes where {} "
            "bytes are queued); memory was overwritten, and the queue cannot be used any more",
            size, tail - head));
      out.resize(int_cast<std::size_t>(size));
      copy_out(head + queue_header_bytes, out.data(), out.size());
      stage(queue_stage::pop_copied);
      q_->head.store(head + queue_header_bytes + size, std::memory_order_release);  // the commit
      stage(queue_stage::pop_committed);
      q_->count.fetch_sub(1, std::memory_order_relaxed);
      g.unlock();
      q_->not_full.notify();
      return pop_result::popped;
    }
    if (q_->closed.load(std::memory_order_relaxed) != 0) return pop_result::closed;
    g.unlock();
    if (!block) return pop_result::empty;
    auto ws = wait_for_condition(
        q_->not_empty, [&] { return closed() || used() != 0; }, deadline, [] { return true; },
        policy);
    if (ws == wait_status::timeout) return pop_result::empty;
  }
}

inline void queue_core::close() {
  (void)lock(std::nullopt);
  guard g(q_->mutex);
  q_->closed.store(1, std::memory_order_release);
  g.unlock();
  q_->not_empty.notify();
  q_->not_full.notify();
}

inline void queue_core::task_done() {
  (void)lock(std::nullopt);
  guard g(q_->mutex);
  stage(queue_stage::done_locked);
  std::uint64_t unfinished = q_->unfinished.load(std::memory_order_relaxed);
  if (unfinished == 0) throw error("queue task_done: called more times than items were pushed");
  q_->unfinished.store(unfinished - 1, std::memory_order_release);
  g.unlock();
  if (unfinished == 1) q_->all_done.notify();
}

inline bool queue_core::join(std::optional<steady::time_point> deadline) {
  auto ws = wait_for_condition(
      q_->all_done, [&] { return q_->unfinished.load(std::memory_order_acquire) == 0; }, deadline,
      [] { return true; }, policy);
  return ws == wait_status::ready;
}

inline queue_core::fill queue_core::state() {
  (void)lock(std::nullopt);
  guard g(q_->mutex);
  std::uint64_t head = q_->head.load(std::memory_order_relaxed);
  std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
  check(head, tail, "size");
  return {int_cast<std::size_t>(q_->count.load(std::memory_order_relaxed)),
          capacity_ - int_cast<std::size_t>(tail - head),
          int_cast<std::size_t>(q_->unfinished.load(std::memory_order_relaxed))};
}

}  // namespace procpool::detail
