// The byte-level machinery under pipe<T> and queue<T>: which process uses a
// channel end and whether it still runs, the shared block of a pipe and the
// view one end has of it, and the shared block of a queue with its push, pop
// and repair. The public headers add encoding and decoding on top.
//
// Pipe (one anonymous mapping, made before forking):
//   pipe_block      per end: the token of the process that uses it, a closed flag
//   ring 0          end 0 writes, end 1 reads (SPSC, see ring.hpp)
//   ring 1          end 1 writes, end 0 reads
//
// Queue (one anonymous mapping, made before forking):
//   queue_block     robust mutex, committed head/tail byte counters, message
//                   count, closed flag, eventcounts "not empty" / "not full"
//   data            circular buffer of messages: u64 size, then the bytes
//
// A queue's shared state changes only under its mutex, and each push or pop
// becomes visible through one store of `tail` or `head` made after the bytes
// are in place. A process that dies holding the mutex therefore leaves either
// the old state or the new one, never a half-written message; the next locker
// only recounts the messages (`count` is updated after the commit).
#pragma once

#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../codec.hpp"
#include "../errors.hpp"
#include "futex.hpp"
#include "int_cast.hpp"
#include "liveness.hpp"
#include "ring.hpp"
#include "robust_mutex.hpp"
#include "shm.hpp"
#include "wait.hpp"

namespace procpool::detail {

// ---------------------------------------------------------------------------
// Process tokens

/// A process as its peers see it: the pid in the low 32 bits and the low 32
/// bits of its start time (clock ticks after boot; 0 when unknown) in the
/// high 32, so that a recycled pid does not pass for a process that died.
/// Fits one atomic word. 0 names no process.
using process_token = std::uint64_t;

/// The pid in a token.
constexpr pid_t token_pid(process_token t) noexcept {
  return static_cast<pid_t>(static_cast<std::uint32_t>(t));
}

/// The token of `pid` started at `start` ticks after boot.
constexpr process_token make_process_token(pid_t pid, std::uint64_t start) noexcept {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(start)) << 32) |
         static_cast<std::uint32_t>(pid);
}

/// This process's token once known; cleared in every forked child.
inline std::atomic<process_token> cached_process_token{0};

/// pthread_atfork child handler: the child learns its own token again.
inline void forget_process_token() noexcept {
  cached_process_token.store(0, std::memory_order_relaxed);
}

/// The calling process's token. After the first call in a process (which
/// reads /proc) it costs one load: no system call on the fast path.
inline process_token this_process_token() noexcept {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, &forget_process_token);
    return true;
  }();
  (void)registered;
  process_token t = cached_process_token.load(std::memory_order_relaxed);
  if (t != 0) return t;
  pid_t pid = ::getpid();
  auto st = read_proc_thread(pid, pid);
  t = make_process_token(pid, st.readable ? st.start_time : 0);
  cached_process_token.store(t, std::memory_order_relaxed);
  return t;
}

/// True while the process named by `t` runs: false once it exited (even while
/// it waits as a zombie to be reaped) and false when its pid now belongs to a
/// later process. Costs system calls: call it between sleeps, not per message.
inline bool process_alive(process_token t) noexcept {
  pid_t pid = token_pid(t);
  if (pid <= 0) return true;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  auto st = read_proc_thread(pid, pid);
  if (!st.readable) return ::access("/proc/self/stat", R_OK) != 0;  // gone, unless no /proc
  if (st.state == 'Z' || st.state == 'X' || st.state == 'x') return false;
  auto start = static_cast<std::uint32_t>(t >> 32);
  return start == 0 || static_cast<std::uint32_t>(st.start_time) == start;
}

/// The time point `timeout` from now; empty (wait forever) when that is
/// beyond any clock's range.
inline std::optional<steady::time_point> deadline_after(std::chrono::nanoseconds timeout) noexcept {
  auto now = steady::now();
  if (timeout > steady::time_point::max() - now) return std::nullopt;
  return now + std::chrono::duration_cast<steady::duration>(timeout);
}

/// Converts any duration to nanoseconds, rounding up and saturating.
template <class Rep, class Period>
std::chrono::nanoseconds to_timeout(const std::chrono::duration<Rep, Period>& d) noexcept {
  using namespace std::chrono;
  if (d <= duration<Rep, Period>::zero()) return nanoseconds::zero();
  if (duration<double, std::nano>(d).count() >= static_cast<double>(nanoseconds::max().count()))
    return nanoseconds::max();
  return ceil<nanoseconds>(d);
}

// ---------------------------------------------------------------------------
// Pipe

/// The shared state of one end of a pipe.
struct pipe_end_state {
  /// Token of the process that last used the end; 0 while nobody has.
  alignas(cache_line) std::atomic<process_token> user{0};
  /// Set once by `close()` in the process that used the end.
  std::atomic<std::uint32_t> closed{0};
};

/// The shared header of a pipe: both ends, and the process that made it.
struct pipe_block {
  pipe_end_state ends[2];
  process_token creator = 0;
};

/// A pipe's mapping: the block and the two rings. Shared by the two
/// `pipe_end`s of a process through a `shared_ptr`; unmapped with the last.
class pipe_mapping {
 public:
  /// Maps a pipe with rings of (at least) `buffer_bytes` each.
  /// **Throws:** `procpool::error` for a size beyond 1 GiB; `std::system_error` naming mmap.
  explicit pipe_mapping(std::size_t buffer_bytes);

  /// The shared header.
  pipe_block& block() noexcept { return *block_; }
  /// The ring that `end` writes and the other end reads.
  ring_control* ring_written_by(int end) noexcept { return rings_[end]; }

 private:
  shared_mapping map_;
  pipe_block* block_ = nullptr;
  ring_control* rings_[2] = {nullptr, nullptr};
};

/// What a pipe end knows of the other end.
enum class peer_state { present, closed, exited };

class pipe_end;
class pipe_source;

/// Whether a pipe consumer takes streamed messages (has `stream(size, source)`).
template <class C, class = void>
struct has_stream : std::false_type {};
template <class C>
struct has_stream<C, std::void_t<decltype(std::declval<C&>().stream(
                         std::size_t{}, std::declval<pipe_source&>()))>> : std::true_type {};
template <class C>
inline constexpr bool has_stream_v = has_stream<C>::value;

/// Whether a `T` goes through a pipe straight from and into its own storage:
/// a vector or string of trivially sendable elements with no
/// `procpool_encode` of its own. Its codec encoding is a u64 count followed by
/// the elements' bytes (see the wire format in codec.hpp), so the sender
/// writes the count and then the elements into the ring, and the receiver of
/// a message that does not lie whole in the ring reads them into the new
/// container: one copy on each side.
template <class T>
struct contiguous_payload : std::false_type {};
template <class E, class A>
struct contiguous_payload<std::vector<E, A>>
    : std::bool_constant<is_trivially_sendable_v<E> && !is_custom_v<std::vector<E, A>>> {};
template <class C, class Tr, class A>
struct contiguous_payload<std::basic_string<C, Tr, A>>
    : std::bool_constant<is_trivially_sendable_v<C> && !is_custom_v<std::basic_string<C, Tr, A>>> {
};

/// The body of one message as it streams out of a pipe, for a consumer that
/// takes it in pieces rather than whole (see `pipe_end::receive`).
class pipe_source {
 public:
  /// Bytes of the body not read yet.
  std::size_t remaining() const noexcept { return left_; }
  /// Copies the next `n` bytes (at most `remaining()`) to `dst`, waiting for
  /// them. **Throws:** `channel_closed` when the writer dies before they come.
  void read(void* dst, std::size_t n);

 private:
  friend class pipe_end;
  pipe_source(pipe_end& end, std::size_t size, const char* op) noexcept
      : end_(end), left_(size), size_(size), op_(op) {}
  pipe_end& end_;
  std::size_t left_;
  std::size_t size_;
  const char* op_;
};

/// One end of a pipe as one process sees it: the byte-level work behind
/// `connection<T>`. Move-only; the destructor closes it (see `close`).
class pipe_end {
 public:
  pipe_end() noexcept = default;
  /// End `end` (0 or 1) of the pipe in `mapping`.
  pipe_end(std::shared_ptr<pipe_mapping> mapping, int end) noexcept
      : map_(std::move(mapping)), end_(end) {}
  pipe_end(pipe_end&& o) noexcept { *this = std::move(o); }
  pipe_end& operator=(pipe_end&& o) noexcept;
  pipe_end(const pipe_end&) = delete;
  pipe_end& operator=(const pipe_end&) = delete;
  ~pipe_end() { close(); }

  /// Throws `channel_closed` for `op` if this end is closed or moved from.
  void require_open(const char* op) const;
  /// Sends one message: the `head_size` bytes at `head` followed by the
  /// `body_size` bytes at `body`, copied straight into the ring.
  void send(const void* head, std::size_t head_size, const void* body = nullptr,
            std::size_t body_size = 0);
  /// Receives one message. A message that lies whole in the ring goes to
  /// `consume(const std::byte*, std::size_t)` in place; any other goes to
  /// `consume.stream(std::size_t size, pipe_source&)` if `Consume` has it,
  /// else it is put together in a buffer and given to `consume(data, size)`.
  /// The message is consumed even if the consumer throws. Returns false when
  /// no message began before `deadline`, or at once if not `block`.
  template <class Consume>
  bool receive(const char* op, bool block, std::optional<steady::time_point> deadline,
               Consume&& consume);
  /// True when a message has begun to arrive or the peer is gone. Waits for
  /// either until `deadline` (forever when empty) if `block`.
  bool poll(bool block, std::optional<steady::time_point> deadline);
  /// Closes this end for the peer when this process is the one using it;
  /// in any case releases this process's handle.
  void close() noexcept;
  /// True when this object holds no end (closed or moved from).
  bool closed() const noexcept { return map_ == nullptr; }

  /// How waits spin and sleep.
  wait_policy policy;

 private:
  pipe_end_state& mine() noexcept { return map_->block().ends[end_]; }
  pipe_end_state& theirs() noexcept { return map_->block().ends[1 - end_]; }
  void claim(const char* op);
  peer_state peer(bool check_process) noexcept;
  peer_state peer_throttled() noexcept;
  bool message_begun() noexcept { return in_.available() >= sizeof(std::uint64_t); }
  [[noreturn]] void throw_gone(const char* op, peer_state st);
  template <class Consume>
  void read_begun(const char* op, Consume& consume);
  void write_stream(const void* data, std::size_t size);
  void read_exact(void* dst, std::size_t n, std::size_t message_size, const char* op);
  void discard(std::size_t n) noexcept;
  [[noreturn]] void throw_cut_off(const char* op, std::size_t message_size);
  wait_policy streaming_policy() const noexcept;
  std::size_t chunk() const noexcept;
  friend class pipe_source;

  std::shared_ptr<pipe_mapping> map_;
  int end_ = 0;
  process_token user_ = 0;  // the process the ring views below belong to
  ring_writer out_;
  ring_reader in_;
  peer_state gone_ = peer_state::present;  // sticky once the peer is found gone
  steady::time_point next_check_{};        // next throttled check that the peer runs
  bool broken_ = false;                    // a message was cut off by a dying peer
  // Where a message that does not lie whole in the ring is put together.
  // Not zero-filled, grown as bytes arrive (never from the header alone),
  // kept for the next message.
  std::unique_ptr<std::byte[]> buffer_;
  std::size_t buffer_capacity_ = 0;
};

// ---------------------------------------------------------------------------
// Queue

/// Where a queue operation stands, for `queue_test_hook`.
enum class queue_stage {
  push_locked,     ///< push holds the mutex
  push_copied,     ///< push wrote the message bytes, not yet committed
  push_committed,  ///< push stored the new tail, message count not yet updated
  pop_locked,      ///< pop holds the mutex
  pop_copied,      ///< pop copied the message out, not yet committed
  pop_committed,   ///< pop stored the new head, message count not yet updated
};

/// Test hook: when set, called at each stage of a queue push or pop while
/// the queue's mutex is held (tests make a child stop there, then kill it).
inline void (*queue_test_hook)(queue_stage) = nullptr;

/// The shared part of a queue.
struct queue_block {
  robust_mutex mutex;
  alignas(cache_line) std::atomic<std::uint64_t> head{0};  ///< bytes ever popped (committed)
  std::atomic<std::uint64_t> tail{0};                      ///< bytes ever pushed (committed)
  std::atomic<std::uint64_t> count{0};                     ///< messages held (after commits)
  std::atomic<std::uint32_t> closed{0};
  std::uint64_t capacity = 0;  ///< data bytes
  alignas(cache_line) eventcount not_empty;
  alignas(cache_line) eventcount not_full;
};

/// Bytes a message header takes in a queue.
inline constexpr std::size_t queue_header_bytes = sizeof(std::uint64_t);

/// A queue's mapping and the byte-level push and pop. Shared by every handle
/// of a process through a `shared_ptr`; every forked child inherits it.
class queue_core {
 public:
  /// How `pop` ended.
  enum class pop_result { popped, empty, closed };

  /// Maps a queue of `capacity` data bytes.
  /// **Throws:** `procpool::error` when `capacity` cannot hold a message;
  /// `std::system_error` naming mmap.
  explicit queue_core(std::size_t capacity);
  queue_core(const queue_core&) = delete;
  queue_core& operator=(const queue_core&) = delete;

  /// Pushes the `size` bytes at `data`. Waits for room until `deadline`
  /// (forever when empty) if `block`. Returns false when there was no room
  /// in time. **Throws:** `message_too_large`, `channel_closed` (closed queue).
  bool push(const void* data, std::size_t size, bool block,
            std::optional<steady::time_point> deadline);
  /// Pops the oldest message into `out`. Waits for one until `deadline`
  /// (forever when empty) if `block`. `closed` once the queue is closed and empty.
  pop_result pop(std::vector<std::byte>& out, bool block,
                 std::optional<steady::time_point> deadline);
  /// Refuses further pushes and wakes every waiter.
  void close();

  /// True once `close()` was called in any process.
  bool closed() const noexcept { return q_->closed.load(std::memory_order_acquire) != 0; }
  /// Messages held at some recent moment.
  std::size_t size_approx() const noexcept {
    return int_cast<std::size_t>(q_->count.load(std::memory_order_relaxed));
  }
  /// Data bytes.
  std::size_t capacity() const noexcept { return int_cast<std::size_t>(q_->capacity); }

  /// How waits spin and sleep.
  wait_policy policy;

 private:
  class guard;
  bool lock(std::optional<steady::time_point> deadline);
  void repair() noexcept;
  std::uint64_t used() const noexcept;
  void copy_in(std::uint64_t at, const void* src, std::size_t n) noexcept;
  void copy_out(std::uint64_t at, void* dst, std::size_t n) const noexcept;
  static void stage(queue_stage s) {
    if (queue_test_hook != nullptr) queue_test_hook(s);
  }

  shared_mapping map_;
  queue_block* q_ = nullptr;
  std::byte* data_ = nullptr;
};

// ---------------------------------------------------------------------------
// Definitions: pipe

inline pipe_mapping::pipe_mapping(std::size_t buffer_bytes) {
  if (buffer_bytes > (std::size_t{1} << 30))
    throw error(
        fmt::format("a pipe buffer of {} bytes was asked for; the limit is 1 GiB", buffer_bytes));
  std::size_t capacity = ring_capacity_for(buffer_bytes);
  std::size_t header = align_up(sizeof(pipe_block), cache_line);
  std::size_t ring_bytes = align_up(ring_control::bytes_needed(capacity), cache_line);
  map_ = shared_mapping(header + 2 * ring_bytes);
  auto* base = static_cast<std::byte*>(map_.data());
  block_ = new (base) pipe_block();
  block_->creator = this_process_token();
  rings_[0] = ring_control::create(base + header, capacity);
  rings_[1] = ring_control::create(base + header + ring_bytes, capacity);
}

inline pipe_end& pipe_end::operator=(pipe_end&& o) noexcept {
  if (this != &o) {
    close();
    map_ = std::move(o.map_);
    end_ = o.end_;
    user_ = std::exchange(o.user_, 0);
    out_ = o.out_;
    in_ = o.in_;
    gone_ = o.gone_;
    next_check_ = o.next_check_;
    broken_ = o.broken_;
    buffer_ = std::move(o.buffer_);
    buffer_capacity_ = std::exchange(o.buffer_capacity_, 0);
    policy = o.policy;
  }
  return *this;
}

inline void pipe_end::require_open(const char* op) const {
  if (!map_) throw channel_closed(fmt::format("{} on a closed (or moved-from) connection", op));
}

// Makes this process the user of the end. A process that takes over an end
// (a forked child, say) starts from the shared counters, not from the views
// it inherited.
inline void pipe_end::claim(const char* op) {
  require_open(op);
  if (mine().closed.load(std::memory_order_acquire) != 0)
    throw channel_closed(fmt::format("{} on end {} of a pipe, which process {} closed", op, end_,
                                     token_pid(mine().user.load(std::memory_order_relaxed))));
  process_token t = this_process_token();
  if (t != user_) {
    user_ = t;
    out_ = ring_writer(map_->ring_written_by(end_));
    in_ = ring_reader(map_->ring_written_by(1 - end_));
    next_check_ = {};
    mine().user.store(t, std::memory_order_release);
  }
  if (broken_)
    throw channel_closed(fmt::format(
        "{} on end {} of a pipe whose other end's process died in the middle of a message", op,
        end_));
}

inline peer_state pipe_end::peer(bool check_process) noexcept {
  if (gone_ != peer_state::present) return gone_;
  if (theirs().closed.load(std::memory_order_acquire) != 0) return gone_ = peer_state::closed;
  if (check_process) {
    process_token u = theirs().user.load(std::memory_order_acquire);
    // Nobody has used the other end yet, or this process uses both: it is there.
    if (u != 0 && u != user_ && !process_alive(u)) {
      // It may have closed the end just before it exited.
      if (theirs().closed.load(std::memory_order_acquire) != 0) return gone_ = peer_state::closed;
      return gone_ = peer_state::exited;
    }
  }
  return peer_state::present;
}

// The closed flag on every call; whether the peer's process runs at most once
// per sleep slice, so a busy sender makes no system call per message.
inline peer_state pipe_end::peer_throttled() noexcept {
  auto st = peer(false);
  if (st != peer_state::present) return st;
  auto now = steady::now();
  if (now < next_check_) return st;
  next_check_ = now + policy.slice;
  return peer(true);
}

inline void pipe_end::throw_gone(const char* op, peer_state st) {
  pid_t pid = token_pid(theirs().user.load(std::memory_order_acquire));
  if (st == peer_state::closed)
    throw channel_closed(
        fmt::format("{} on end {} of a pipe: the other end (end {}) was closed "
                    "by process {}",
                    op, end_, 1 - end_, pid));
  throw channel_closed(
      fmt::format("{} on end {} of a pipe: process {}, which used the other end "
                  "(end {}), has exited",
                  op, end_, pid, 1 - end_));
}

inline void pipe_end::send(const void* head, std::size_t head_size, const void* body,
                           std::size_t body_size) {
  claim("send");
  auto st = peer_throttled();
  if (st != peer_state::present) throw_gone("send", st);
  std::uint64_t header = head_size + body_size;
  if (out_.free_space() >= sizeof header + header) {  // the common case: one publish
    out_.put(&header, sizeof header);
    out_.put(head, head_size);
    out_.put(body, body_size);
    out_.publish();
    return;
  }
  write_stream(&header, sizeof header);
  write_stream(head, head_size);
  write_stream(body, body_size);
}

// A message in the middle of its transfer: both sides are busy copying, so a
// wait is short; spinning a little longer than usual saves a sleep and a
// wake-up per chunk.
inline wait_policy pipe_end::streaming_policy() const noexcept {
  wait_policy p = policy;
  p.spin = std::max<std::chrono::nanoseconds>(p.spin, std::chrono::microseconds(50));
  return p;
}

// Large messages move in chunks of a quarter of the ring, each published
// (or released) at once, so that writer and reader copy at the same time.
inline std::size_t pipe_end::chunk() const noexcept {
  return int_cast<std::size_t>(map_->ring_written_by(end_)->capacity / 4);
}

inline void pipe_end::write_stream(const void* data, std::size_t size) {
  auto p = static_cast<const std::byte*>(data);
  const std::size_t most = chunk();
  while (size > 0) {
    std::size_t n = std::min({size, out_.free_space(), most});
    if (n == 0) {
      auto ws = wait_for_condition(
          out_.writable(), [this] { return out_.free_space() > 0; }, std::nullopt,
          [this] { return peer(true) == peer_state::present; }, streaming_policy());
      if (ws != wait_status::ready) throw_gone("send", peer(true));
      continue;
    }
    out_.put(p, n);
    out_.publish();
    p += n;
    size -= n;
  }
}

// Copies the next `n` bytes of the message being read to `dst`, in chunks
// released one by one. Throws when the writer dies first (the stream is then
// cut off for good).
inline void pipe_end::read_exact(void* dst, std::size_t n, std::size_t message_size,
                                 const char* op) {
  auto out = static_cast<std::byte*>(dst);
  const std::size_t most = int_cast<std::size_t>(map_->ring_written_by(1 - end_)->capacity / 4);
  while (n > 0) {
    std::size_t k = std::min({in_.available(1), n, most});
    if (k == 0) {
      in_.release();
      auto ws = wait_for_condition(
          in_.readable(), [this] { return in_.available(1) > 0; }, std::nullopt,
          [this] { return peer(true) == peer_state::present; }, streaming_policy());
      if (ws != wait_status::ready) throw_cut_off(op, message_size);
      continue;
    }
    in_.get(out, k);
    in_.release();
    out += k;
    n -= k;
  }
}

// Skips the next `n` bytes of the message being read (after its consumer
// failed). If the writer dies first the stream is cut off for good.
inline void pipe_end::discard(std::size_t n) noexcept {
  while (n > 0) {
    std::size_t k = std::min(in_.available(1), n);
    if (k == 0) {
      in_.release();
      auto ws = wait_for_condition(
          in_.readable(), [this] { return in_.available(1) > 0; }, std::nullopt,
          [this] { return peer(true) == peer_state::present; }, streaming_policy());
      if (ws != wait_status::ready) {
        broken_ = true;
        return;
      }
      continue;
    }
    in_.skip(k);
    n -= k;
  }
  in_.release();
}

inline void pipe_end::throw_cut_off(const char* op, std::size_t message_size) {
  broken_ = true;
  throw channel_closed(fmt::format(
      "{} on end {} of a pipe: process {}, which used the other end (end {}), died in the "
      "middle of a message of {} bytes",
      op, end_, token_pid(theirs().user.load(std::memory_order_acquire)), 1 - end_, message_size));
}

inline void pipe_source::read(void* dst, std::size_t n) {
  if (n > left_) throw decode_error(size_ - left_, "read past the end of a message");
  end_.read_exact(dst, n, size_, op_);
  left_ -= n;
}

/// Decodes a `contiguous_payload` container of `size` encoded bytes from
/// `source`, reading the elements straight into it. Checks the count against
/// the size before anything is reserved.
/// **Throws:** `decode_error` when they disagree; `channel_closed` as `pipe_source::read`.
template <class T>
T read_contiguous(std::size_t size, pipe_source& source) {
  using element = typename T::value_type;
  std::uint64_t count = 0;
  if (size < sizeof count)
    throw decode_error(0, fmt::format("expected 8 bytes for a length, {} remain", size));
  source.read(&count, sizeof count);
  const std::size_t bytes = size - sizeof count;
  if (bytes % sizeof(element) != 0 || count != bytes / sizeof(element))
    throw decode_error(sizeof count, fmt::format("a length of {} elements of {} bytes does not "
                                                 "fill the {} bytes that remain",
                                                 count, sizeof(element), bytes));
  // One reservation up front (address space only: pages are touched as the
  // bytes come), so a big message is not copied as it grows; but never more
  // than 256 MiB on the header's word alone. Past that the buffer grows with
  // the bytes that arrive, so a header that lies about the length costs at
  // most that, and cannot make receive throw bad_alloc or length_error.
  const std::size_t step = std::max<std::size_t>(1, (64 * 1024) / sizeof(element));
  const std::size_t trusted = (std::size_t(256) << 20) / sizeof(element);
  T out;
  out.reserve(std::min(int_cast<std::size_t>(count), trusted));
  for (std::size_t done = 0; done < count;) {
    std::size_t k = std::min(int_cast<std::size_t>(count) - done, step);
    out.resize(done + k);
    source.read(out.data() + done, k * sizeof(element));
    done += k;
  }
  return out;
}

template <class Consume>
bool pipe_end::receive(const char* op, bool block, std::optional<steady::time_point> deadline,
                       Consume&& consume) {
  claim(op);
  while (!message_begun()) {
    auto st = block ? peer(false) : peer_throttled();
    if (st != peer_state::present) {
      // Messages sent before the peer left are still delivered.
      if (in_.refresh() >= sizeof(std::uint64_t)) break;
      throw_gone(op, st);
    }
    if (!block) return false;
    auto ws = wait_for_condition(
        in_.readable(), [this] { return message_begun(); }, deadline,
        [this] { return peer(true) == peer_state::present; }, policy);
    if (ws == wait_status::timeout) return false;
    // ready: read below; aborted: the loop delivers what is left, then throws.
  }
  read_begun(op, consume);
  return true;
}

template <class Consume>
void pipe_end::read_begun(const char* op, Consume& consume) {
  std::size_t size = *in_.next_message_size();
  std::size_t total = sizeof(std::uint64_t) + size;
  // A message that lies whole and unwrapped in the ring is decoded in place.
  if (size < map_->ring_written_by(1 - end_)->capacity && in_.available(total) >= total) {
    if (const std::byte* p = in_.peek(total)) {
      struct release_on_exit {
        ring_reader& in;
        std::size_t n;
        ~release_on_exit() {
          in.skip(n);
          in.release();
        }
      } release{in_, total};
      consume(p + sizeof(std::uint64_t), size);
      return;
    }
  }
  std::uint64_t header;
  in_.get(&header, sizeof header);
  if constexpr (has_stream_v<std::remove_reference_t<Consume>>) {
    pipe_source source(*this, size, op);
    try {
      consume.stream(size, source);
    } catch (const channel_closed&) {
      throw;  // the stream is cut off: nothing left to skip
    } catch (...) {
      discard(source.remaining());
      throw;
    }
    discard(source.remaining());  // a consumer that stopped short leaves no bytes behind
  } else {
    // Grow the buffer as bytes arrive, never from the header alone: a
    // corrupt header then fails on a dead peer rather than on a huge allocation.
    std::size_t done = 0;
    const std::size_t step = std::max<std::size_t>(chunk(), 4096);
    while (done < size) {
      std::size_t n = std::min(size - done, step);
      if (done + n > buffer_capacity_) {
        std::size_t grown = std::min(size, std::max(done + n, 2 * buffer_capacity_));
        std::unique_ptr<std::byte[]> bigger(new std::byte[grown]);
        if (done > 0) std::memcpy(bigger.get(), buffer_.get(), done);
        buffer_ = std::move(bigger);
        buffer_capacity_ = grown;
      }
      read_exact(buffer_.get() + done, n, size, op);
      done += n;
    }
    consume(static_cast<const std::byte*>(buffer_.get()), size);
  }
}

inline bool pipe_end::poll(bool block, std::optional<steady::time_point> deadline) {
  claim("poll");
  if (message_begun() || peer_throttled() != peer_state::present) return true;
  if (!block) return false;
  auto ws = wait_for_condition(
      in_.readable(), [this] { return message_begun(); }, deadline,
      [this] { return peer(true) == peer_state::present; }, policy);
  return ws != wait_status::timeout;
}

inline void pipe_end::close() noexcept {
  if (!map_) return;
  process_token t = this_process_token();
  auto& me = mine();
  process_token u = me.user.load(std::memory_order_acquire);
  // The process using the end closes it for the peer. So does a process that
  // is not the pipe's maker and closes an end nobody used yet (a child done
  // with its end). The maker closing an unused end, or any process closing
  // an end another process uses, only drops its own handle, as closing an
  // inherited descriptor would.
  bool mine_to_close = u == t || (u == 0 && t != map_->block().creator);
  if (mine_to_close && me.closed.load(std::memory_order_relaxed) == 0) {
    me.user.store(t, std::memory_order_relaxed);
    me.closed.store(1, std::memory_order_release);
    map_->ring_written_by(end_)->readable.notify();      // a peer waiting in recv
    map_->ring_written_by(1 - end_)->writable.notify();  // a peer waiting in send
  }
  map_.reset();
  user_ = 0;
  out_ = ring_writer();
  in_ = ring_reader();
}

// ---------------------------------------------------------------------------
// Definitions: queue

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

inline queue_core::queue_core(std::size_t capacity) {
  constexpr std::size_t minimum = 2 * queue_header_bytes;
  if (capacity < minimum || capacity > (std::size_t{1} << 40))
    throw error(
        fmt::format("a queue needs a capacity between {} bytes and 1 TiB; {} bytes were "
                    "asked for",
                    minimum, capacity));
  std::size_t header = align_up(sizeof(queue_block), cache_line);
  map_ = shared_mapping(header + capacity);
  auto* base = static_cast<std::byte*>(map_.data());
  // Constructed once, never destroyed in place: other processes may use it
  // until they unmap it (pthread_mutex_destroy would break their locks).
  q_ = new (base) queue_block();
  q_->capacity = capacity;
  data_ = base + header;
}

// Locks the mutex; after a holder died, repairs the state it guards and
// marks the mutex consistent. False when `deadline` passed first.
inline bool queue_core::lock(std::optional<steady::time_point> deadline) {
  lock_status s = deadline ? q_->mutex.lock_until(*deadline) : q_->mutex.lock();
  if (s == lock_status::busy) return false;
  if (s == lock_status::owner_died) {
    repair();
    try {
      q_->mutex.mark_consistent();
    } catch (...) {
      q_->mutex.unlock();
      throw;
    }
  }
  return true;
}

// Under the mutex, after its holder died. Every commit is one store, so head
// and tail are whole; only `count` may lag. Recount the messages, checking
// each size against what remains (a failed check cannot happen, but would cut
// the queue at the last good message rather than hand out garbage), and wake
// waiters the dead process may have owed a notification.
inline void queue_core::repair() noexcept {
  std::uint64_t head = q_->head.load(std::memory_order_relaxed);
  std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
  std::uint64_t at = head;
  std::uint64_t messages = 0;
  while (tail - at >= queue_header_bytes) {
    std::uint64_t size;
    copy_out(at, &size, sizeof size);
    if (size > tail - at - queue_header_bytes) break;
    at += queue_header_bytes + size;
    ++messages;
  }
  if (at != tail) q_->tail.store(at, std::memory_order_release);
  q_->count.store(messages, std::memory_order_relaxed);
  q_->not_empty.notify();
  q_->not_full.notify();
}

// Bytes in use; head is read first, so the answer is never below the truth.
inline std::uint64_t queue_core::used() const noexcept {
  std::uint64_t head = q_->head.load(std::memory_order_acquire);
  return q_->tail.load(std::memory_order_acquire) - head;
}

inline void queue_core::copy_in(std::uint64_t at, const void* src, std::size_t n) noexcept {
  if (n == 0) return;  // the pointer may be null then, which memcpy does not allow
  std::size_t cap = int_cast<std::size_t>(q_->capacity);
  std::size_t off = int_cast<std::size_t>(at % cap);
  std::size_t first = std::min(n, cap - off);
  std::memcpy(data_ + off, src, first);
  std::memcpy(data_, static_cast<const std::byte*>(src) + first, n - first);
}

inline void queue_core::copy_out(std::uint64_t at, void* dst, std::size_t n) const noexcept {
  if (n == 0) return;  // the pointer may be null then, which memcpy does not allow
  std::size_t cap = int_cast<std::size_t>(q_->capacity);
  std::size_t off = int_cast<std::size_t>(at % cap);
  std::size_t first = std::min(n, cap - off);
  std::memcpy(dst, data_ + off, first);
  std::memcpy(static_cast<std::byte*>(dst) + first, data_, n - first);
}

inline bool queue_core::push(const void* data, std::size_t size, bool block,
                             std::optional<steady::time_point> deadline) {
  const std::uint64_t cap = q_->capacity;
  if (size > cap - queue_header_bytes) throw message_too_large(size, capacity());
  const std::uint64_t need = queue_header_bytes + size;
  for (;;) {
    if (!lock(deadline)) return false;
    guard g(q_->mutex);
    stage(queue_stage::push_locked);
    if (q_->closed.load(std::memory_order_relaxed) != 0)
      throw channel_closed("queue push: the queue is closed");
    std::uint64_t tail = q_->tail.load(std::memory_order_relaxed);
    if (cap - (tail - q_->head.load(std::memory_order_relaxed)) >= need) {
      std::uint64_t header = size;
      copy_in(tail, &header, sizeof header);
      copy_in(tail + queue_header_bytes, data, size);
      stage(queue_stage::push_copied);
      q_->tail.store(tail + need, std::memory_order_release);  // the commit
      stage(queue_stage::push_committed);
      q_->count.fetch_add(1, std::memory_order_relaxed);
      g.unlock();
      q_->not_empty.notify();
      return true;
    }
    g.unlock();
    if (!block) return false;
    auto ws = wait_for_condition(
        q_->not_full, [&] { return closed() || cap - used() >= need; }, deadline,
        [] { return true; }, policy);
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
    if (tail != head) {
      std::uint64_t size;
      copy_out(head, &size, sizeof size);
      if (tail - head < queue_header_bytes ||
          size > tail - head - queue_header_bytes) {  // cannot happen: commits are whole
        repair();
        continue;
      }
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

}  // namespace procpool::detail
