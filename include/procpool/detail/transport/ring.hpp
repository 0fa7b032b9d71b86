// A single-producer single-consumer byte ring in shared memory, and the
// length-prefixed messages carried over it.
//
// The shared part (`ring_control` followed by the data bytes) holds two
// monotonically increasing byte counters, on separate cache lines: `tail`,
// written only by the producer, and `head`, written only by the consumer.
// Each side works through a process-local view (`ring_writer`,
// `ring_reader`) that caches the other side's counter, so the common case
// touches the other side's cache line only when the cached value runs out.
//
// A ring's bytes may lie in the control's own mapping, right after it, or in
// a mirrored mapping (`mirrored_mapping`: the bytes mapped twice in a row),
// given to each view. Through a mirrored view any piece of at most the
// ring's capacity is contiguous, across the ring's end too: it is copied in
// one piece and read in place (`peek`), never gathered.
//
// Messages are `u64 size` + `size` bytes. A message larger than the ring is
// streamed through it: the writer waits for space as the reader drains, so no
// message is too large.
//
// The other side's counter is read from memory another process can write,
// so a view never lets it claim more than the ring holds: a counter that
// says so marks the view `corrupt()` and counts as no bytes (no space), and
// a view's capacity is read once, when it is made. No byte outside the ring
// is ever touched, whatever the shared counters say.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "../int_cast.hpp"
#include "futex.hpp"
#include "shm.hpp"
#include "wait.hpp"

namespace procpool::detail {

/// The shared part of a ring. Place it at a cache-line aligned address with
/// `capacity` data bytes right after it (see `ring_control::bytes_needed`).
struct ring_control {
  alignas(cache_line) std::atomic<std::uint64_t> tail{0};  ///< bytes ever written
  alignas(cache_line) std::atomic<std::uint64_t> head{0};  ///< bytes ever read
  alignas(cache_line) eventcount readable;                 ///< notified after tail moves
  alignas(cache_line) eventcount writable;                 ///< notified after head moves
  alignas(cache_line) std::uint64_t capacity = 0;          ///< power of two

  /// Bytes a ring with `capacity` data bytes occupies (control + data).
  static constexpr std::size_t bytes_needed(std::size_t capacity) noexcept {
    return align_up(sizeof(ring_control), cache_line) + capacity;
  }
  /// Constructs a ring in `memory` (cache-line aligned, `bytes_needed(capacity)` long).
  static ring_control* create(void* memory, std::size_t capacity) noexcept {
    auto* r = new (memory) ring_control();
    r->capacity = capacity;
    return r;
  }
  /// The data bytes.
  std::byte* data() noexcept {
    return reinterpret_cast<std::byte*>(this) + align_up(sizeof(ring_control), cache_line);
  }
  /// Forgets every byte in the ring. Only while neither side uses it.
  void reset() noexcept {
    tail.store(0, std::memory_order_relaxed);
    head.store(0, std::memory_order_relaxed);
  }
};

/// Rounds a requested ring size to the power of two used (at least 4 KiB).
constexpr std::size_t ring_capacity_for(std::size_t requested) noexcept {
  std::size_t c = 4096;
  while (c < requested) c <<= 1;
  return c;
}

/// The producer's view of a ring. One process writes through it at a time.
class ring_writer {
 public:
  ring_writer() = default;
  /// A view of `r`; `publish()` notifies `on_publish` (the ring's own
  /// `readable` when null), so one reader can wait for several rings at once.
  /// With `mirror`, the ring's bytes are there, mapped twice in a row (see
  /// `mirrored_mapping`), not after `r`.
  explicit ring_writer(ring_control* r, eventcount* on_publish = nullptr,
                       std::byte* mirror = nullptr) noexcept
      : r_(r),
        data_(mirror ? mirror : r->data()),
        mask_(r->capacity - 1),
        capacity_(r->capacity),
        on_publish_(on_publish ? on_publish : &r->readable),
        mirrored_(mirror != nullptr) {
    tail_ = r->tail.load(std::memory_order_relaxed);
    head_cache_ = r->head.load(std::memory_order_acquire);
  }

  /// The ring's capacity in bytes.
  std::size_t capacity() const noexcept { return capacity_; }
  /// Bytes that can be put now without waiting.
  /// Counts as none when the reader's counter is corrupt (see `corrupt()`).
  std::size_t free_space() noexcept {
    std::uint64_t used = tail_ - head_cache_;
    if (used > capacity_ || used == capacity_ || capacity_ - used < capacity_ / 2) {
      head_cache_ = r_->head.load(std::memory_order_acquire);
      used = tail_ - head_cache_;
    }
    if (used > capacity_) {  // the reader claims to have read bytes never written
      corrupt_ = true;
      return 0;
    }
    return capacity_ - int_cast<std::size_t>(used);
  }
  /// `free_space()` after reading the reader's counter again (`free_space`
  /// reads it only when what it knew of it leaves less than half the ring).
  std::size_t free_space_now() noexcept {
    head_cache_ = r_->head.load(std::memory_order_acquire);
    return free_space();
  }
  /// True once the reader's counter was found claiming more than the ring holds.
  bool corrupt() const noexcept { return corrupt_; }
  /// Copies `n` bytes in, unpublished; `n` must not exceed `free_space()`.
  void put(const void* src, std::size_t n) noexcept {
    if (n == 0) return;  // src may be null then, which memcpy does not allow
    std::size_t at = int_cast<std::size_t>(tail_ & mask_);
    std::size_t first = mirrored_ ? n : std::min(n, capacity_ - at);
    std::memcpy(data_ + at, src, first);
    if (n > first) std::memcpy(data_, static_cast<const std::byte*>(src) + first, n - first);
    tail_ += n;
  }
  /// Whether the ring's bytes are mapped twice in a row (see `room`).
  bool mirrored() const noexcept { return mirrored_; }
  /// Where the next byte goes. Through a mirrored view the `free_space()`
  /// bytes from there are contiguous: a message may be written there in
  /// place, then counted with `advance`.
  std::byte* room() noexcept { return data_ + int_cast<std::size_t>(tail_ & mask_); }
  /// Counts `n` bytes written at `room()` as put, unpublished; `n` must not
  /// exceed `free_space()`, and the view must be mirrored.
  void advance(std::size_t n) noexcept { tail_ += n; }
  /// Makes everything put so far visible to the reader and wakes it if it sleeps.
  void publish() noexcept {
    r_->tail.store(tail_, std::memory_order_release);
    on_publish_->notify();
  }
  /// The eventcount notified when the reader frees space.
  eventcount& writable() noexcept { return r_->writable; }
  /// The eventcount this writer notifies when it publishes.
  eventcount& readable() noexcept { return r_->readable; }

  /// Writes one message (`u64 size` then the bytes), streaming it through the
  /// ring when it does not fit. `keep_waiting()` is asked between sleeps
  /// whether the reader is still there; returns false if it said no (the
  /// message is then partly written and the ring must be discarded).
  template <class KeepWaiting>
  bool write_message(const void* msg, std::size_t size, KeepWaiting&& keep_waiting,
                     const wait_policy& policy = {}) {
    std::uint64_t header = size;
    if (free_space() >= sizeof header + size) {  // the common case: one copy, one publish
      put(&header, sizeof header);
      put(msg, size);
      publish();
      return true;
    }
    return write_stream(&header, sizeof header, keep_waiting, policy) &&
           write_stream(msg, size, keep_waiting, policy);
  }

  /// Writes `size` bytes, waiting for space as needed; false if `keep_waiting` said no.
  template <class KeepWaiting>
  bool write_stream(const void* src, std::size_t size, KeepWaiting&& keep_waiting,
                    const wait_policy& policy = {}) {
    auto p = static_cast<const std::byte*>(src);
    while (size > 0) {
      std::size_t n = std::min(size, free_space());
      if (n == 0) {
        auto st = wait_for_condition(
            r_->writable, [&] { return free_space() > 0; }, std::nullopt, keep_waiting, policy);
        if (st != wait_status::ready) return false;
        continue;
      }
      put(p, n);
      publish();
      p += n;
      size -= n;
    }
    return true;
  }

 private:
  ring_control* r_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint64_t mask_ = 0;
  std::size_t capacity_ = 0;
  eventcount* on_publish_ = nullptr;
  bool mirrored_ = false;
  std::uint64_t tail_ = 0;
  std::uint64_t head_cache_ = 0;
  bool corrupt_ = false;
};

/// The consumer's view of a ring. One process reads through it at a time.
class ring_reader {
 public:
  ring_reader() = default;
  /// A view of `r`; `release()` notifies `on_release` (the ring's own
  /// `writable` when null), so one writer can wait for several rings at once.
  /// With `mirror`, the ring's bytes are there, mapped twice in a row (see
  /// `mirrored_mapping`), not after `r`.
  explicit ring_reader(ring_control* r, eventcount* on_release = nullptr,
                       std::byte* mirror = nullptr) noexcept
      : r_(r),
        data_(mirror ? mirror : r->data()),
        mask_(r->capacity - 1),
        capacity_(r->capacity),
        on_release_(on_release ? on_release : &r->writable),
        mirrored_(mirror != nullptr) {
    head_ = r->head.load(std::memory_order_relaxed);
    tail_cache_ = r->tail.load(std::memory_order_acquire);
  }

  /// Bytes ready to read now. The view of the writer's progress is refreshed
  /// when fewer than `want` bytes are known, so a caller waiting for `want`
  /// bytes (a message header, say) sees them once they are published.
  /// Counts as none when the writer's counter is corrupt (see `corrupt()`).
  std::size_t available(std::size_t want = sizeof(std::uint64_t)) noexcept {
    std::uint64_t a = tail_cache_ - head_;
    if (a < want || a > capacity_) {
      tail_cache_ = r_->tail.load(std::memory_order_acquire);
      a = tail_cache_ - head_;
    }
    return checked(a);
  }
  /// Refreshes the view of the writer's progress, then returns `available()`.
  std::size_t refresh() noexcept {
    tail_cache_ = r_->tail.load(std::memory_order_acquire);
    return checked(tail_cache_ - head_);
  }
  /// True once the writer's counter was found claiming more than the ring holds.
  bool corrupt() const noexcept { return corrupt_; }
  /// The ring's capacity in bytes, as read when this view was made.
  std::size_t capacity() const noexcept { return capacity_; }
  /// Copies `n` bytes out; `n` must not exceed `available()`. Space is freed on `release()`.
  void get(void* dst, std::size_t n) noexcept {
    if (n == 0) return;  // dst may be null then, which memcpy does not allow
    std::size_t at = int_cast<std::size_t>(head_ & mask_);
    std::size_t first = mirrored_ ? n : std::min(n, capacity_ - at);
    std::memcpy(dst, data_ + at, first);
    if (n > first) std::memcpy(static_cast<std::byte*>(dst) + first, data_, n - first);
    head_ += n;
  }
  /// A pointer to the next `n` bytes if they are available and contiguous
  /// (always, through a mirrored view), else null.
  const std::byte* peek(std::size_t n) noexcept {
    if (available(n) < n) return nullptr;  // and so n <= capacity
    std::size_t at = int_cast<std::size_t>(head_ & mask_);
    return mirrored_ || at + n <= capacity_ ? data_ + at : nullptr;
  }
  /// Where the next bytes start; `n` becomes how many of those available
  /// lie there in a row (all of them, through a mirrored view).
  const std::byte* contiguous(std::size_t& n) noexcept {
    std::size_t a = available();
    std::size_t at = int_cast<std::size_t>(head_ & mask_);
    n = mirrored_ ? a : std::min(a, capacity_ - at);
    return data_ + at;
  }
  /// Whether the ring's bytes are mapped twice in a row (see `peek`).
  bool mirrored() const noexcept { return mirrored_; }
  /// Skips `n` bytes (after `peek`).
  void skip(std::size_t n) noexcept { head_ += n; }
  /// Frees the space of everything read so far and wakes a writer that waits for it.
  void release() noexcept {
    r_->head.store(head_, std::memory_order_release);
    on_release_->notify();
  }
  /// Frees the space like `release()` but wakes nobody: for a reader whose
  /// next step notifies the same eventcount anyway (a worker publishing its
  /// answer on the channel its writer sleeps on), which saves one atomic
  /// read-modify-write on a line other processes use.
  void release_quietly() noexcept { r_->head.store(head_, std::memory_order_release); }
  /// The eventcount notified when the writer publishes.
  eventcount& readable() noexcept { return r_->readable; }

  /// Size of the next message if its header is available, else nothing.
  std::optional<std::size_t> next_message_size() noexcept {
    if (available() < sizeof(std::uint64_t)) return std::nullopt;
    std::uint64_t size;
    std::size_t at = int_cast<std::size_t>(head_ & mask_);
    std::size_t first = std::min(sizeof size, capacity_ - at);
    std::memcpy(&size, data_ + at, first);
    std::memcpy(reinterpret_cast<std::byte*>(&size) + first, data_, sizeof size - first);
    return int_cast<std::size_t>(size);
  }

  /// Reads the next message into `out` (a `std::vector<std::byte>`, resized
  /// to fit, or a `writer`, cleared and appended to without zeroing), waiting
  /// as needed; the caller must know a message has begun or be prepared to
  /// wait for one. False if `keep_waiting` said no or `deadline` passed before
  /// any byte of the message arrived (nothing consumed then) — see `read_status`.
  template <class Buffer, class KeepWaiting>
  wait_status read_message(Buffer& out, std::optional<steady::time_point> deadline,
                           KeepWaiting&& keep_waiting, const wait_policy& policy = {}) {
    auto st = wait_for_condition(
        r_->readable, [&] { return available() >= sizeof(std::uint64_t); }, deadline, keep_waiting,
        policy);
    if (st != wait_status::ready) return st;
    std::uint64_t size = 0;
    get(&size, sizeof size);
    // Grow the buffer as bytes arrive, not from the header alone: a corrupt
    // header then fails on a dead peer rather than on a huge allocation.
    out.clear();
    std::size_t done = 0;
    while (done < size) {
      std::size_t n = std::min<std::size_t>(available(), size - done);
      if (n == 0) {
        release();
        auto s = wait_for_condition(
            r_->readable, [&] { return available() > 0; }, std::nullopt, keep_waiting, policy);
        if (s != wait_status::ready) return s;
        continue;
      }
      if constexpr (std::is_same_v<Buffer, std::vector<std::byte>>) {
        out.resize(done + n);
        get(out.data() + done, n);
      } else {
        get(out.prepare(n), n);
        out.commit(n);
      }
      done += n;
    }
    release();
    return wait_status::ready;
  }

 private:
  ring_control* r_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint64_t mask_ = 0;
  std::size_t capacity_ = 0;
  eventcount* on_release_ = nullptr;
  bool mirrored_ = false;
  std::size_t checked(std::uint64_t a) noexcept {
    if (a <= capacity_) return int_cast<std::size_t>(a);
    corrupt_ = true;  // the writer claims more bytes than the ring holds
    return 0;
  }

  std::uint64_t head_ = 0;
  std::uint64_t tail_cache_ = 0;
  bool corrupt_ = false;
};

}  // namespace procpool::detail
