// The core of connection<T> (pipe.hpp): the byte-level work under it, before
// encoding and after decoding. Names: a *pipe* is the shared thing that
// `pipe<T>()` maps (pipe_mapping: its block and its two rings, pipe_end_state:
// the shared state of one of its two ends); a *connection* is one process's
// handle on one end (connection_core, kept inside each connection<T>).
//
// A pipe (one anonymous mapping, made before forking):
//   pipe_block      per end: the last process to use it, a closed flag, and the
//                   table of processes that hold it (see pipe_end_state)
//   ring 0          end 0 writes, end 1 reads (SPSC, see ring.hpp)
//   ring 1          end 1 writes, end 0 reads
//
// Which process holds or uses an end is told by process tokens
// (os/liveness.hpp), so a recycled pid never passes for a holder that died.
#pragma once

#include <fmt/format.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../int_cast.hpp"
#include "../os/clock.hpp"
#include "../os/liveness.hpp"
#include "ring.hpp"
#include "shm.hpp"
#include "wait.hpp"

namespace procpool::detail {

/// Most processes that can hold one end of a pipe at once and be watched:
/// each has a slot in the end's table. Beyond it an end is never found gone
/// through deaths, only through `connection_core::shutdown`.
inline constexpr std::size_t pipe_max_holders = 128;

/// Flags of a holder slot, in bits of the pid half of a token that no Linux
/// pid reaches (pids stay below 2^22).
inline constexpr std::uint64_t holder_pending = std::uint64_t{1} << 31;  ///< a fork in progress
inline constexpr std::uint64_t holder_used = std::uint64_t{1} << 30;  ///< the holder used the end
inline constexpr std::uint64_t holder_flags = holder_pending | holder_used;

/// The shared state of one end of a pipe.
///
/// A process *holds* an end from the moment it makes the pipe or is forked
/// by a process that holds it, until it closes its handle or ends; each
/// holder has a slot with its token. A slot reserved by a parent for the
/// child it is forking holds the parent's token and `holder_pending` until
/// the child writes its own token there.
struct pipe_end_state {
  /// Token of the process that used the end last; 0 while nobody has.
  alignas(cache_line) std::atomic<process_token> user{0};
  /// Token of the last process that closed its handle after using the end.
  std::atomic<process_token> closed_by{0};
  /// Set once the end is closed for every process: its last holder closed
  /// it, or a holder called `shutdown()`.
  std::atomic<std::uint32_t> closed{0};
  /// Holders that found the table full: the end is then never found gone by deaths.
  std::atomic<std::uint32_t> untracked{0};
  /// Holder slots: a token with flags, or 0 when free.
  alignas(cache_line) std::atomic<std::uint64_t> holders[pipe_max_holders];
};

/// The shared header of a pipe: both ends.
struct pipe_block {
  pipe_end_state ends[2];
};

/// A pipe's mapping: the block and the two rings. Shared by the two
/// `connection_core`s of a process through a `shared_ptr`; unmapped with the last.
class pipe_mapping {
 public:
  /// Maps a pipe with rings of (at least) `buffer_bytes` each.
  /// **Throws:** `procpool::error` for a size beyond 1 GiB; `std::system_error` naming mmap.
  explicit pipe_mapping(std::size_t buffer_bytes);

  /// The shared header.
  pipe_block& block() noexcept { return *block_; }
  /// The ring that `end` writes and the other end reads.
  ring_control* ring_written_by(int end) noexcept { return rings_[end]; }
  /// Data bytes mapped for each ring (known to this process, not read from
  /// shared memory): no ring may claim more.
  std::size_t ring_room() const noexcept { return ring_room_; }

 private:
  shared_mapping map_;
  pipe_block* block_ = nullptr;
  ring_control* rings_[2] = {nullptr, nullptr};
  std::size_t ring_room_ = 0;
};

/// What a pipe end knows of the other end.
enum class peer_state { present, closed, exited };

class connection_core;
class connection_source;

/// Whether a pipe consumer takes streamed messages (has `stream(size, source)`).
template <class C, class = void>
struct has_stream : std::false_type {};
template <class C>
struct has_stream<C, std::void_t<decltype(std::declval<C&>().stream(
                         std::size_t{}, std::declval<connection_source&>()))>> : std::true_type {};
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
/// takes it in pieces rather than whole (see `connection_core::receive`).
class connection_source {
 public:
  /// Bytes of the body not read yet.
  std::size_t remaining() const noexcept { return left_; }
  /// Copies the next `n` bytes (at most `remaining()`) to `dst`, waiting for
  /// them. **Throws:** `channel_closed` when the writer dies before they come.
  void read(void* dst, std::size_t n);

 private:
  friend class connection_core;
  connection_source(connection_core& end, std::size_t size, const char* op) noexcept
      : end_(end), left_(size), size_(size), op_(op) {}
  connection_core& end_;
  std::size_t left_;
  std::size_t size_;
  const char* op_;
};

/// One end of a pipe as one process sees it: the byte-level work behind
/// `connection<T>`. Move-only; the destructor closes it (see `close`).
///
/// Every open `connection_core` of a process is listed in a registry, so that a
/// fork makes the child a holder of each (see `pipe_end_state`).
class connection_core {
 public:
  connection_core() noexcept = default;
  /// End `end` (0 or 1) of the pipe in `mapping`; this process holds it.
  connection_core(std::shared_ptr<pipe_mapping> mapping, int end) noexcept;
  connection_core(connection_core&& o) noexcept { *this = std::move(o); }
  connection_core& operator=(connection_core&& o) noexcept;
  connection_core(const connection_core&) = delete;
  connection_core& operator=(const connection_core&) = delete;
  ~connection_core() { close(); }

  /// Throws `channel_closed` for `op` if this end is closed or moved from.
  void require_open(const char* op) const;
  /// Sends one message: the `head_size` bytes at `head` followed by the
  /// `body_size` bytes at `body`, copied straight into the ring.
  void send(const void* head, std::size_t head_size, const void* body = nullptr,
            std::size_t body_size = 0);
  /// Receives one message. A message that lies whole in the ring goes to
  /// `consume(const std::byte*, std::size_t)` in place; any other goes to
  /// `consume.stream(std::size_t size, connection_source&)` if `Consume` has it,
  /// else it is put together in a buffer and given to `consume(data, size)`.
  /// The message is consumed even if the consumer throws. Returns false when
  /// no message began before `deadline`, or at once if not `block`.
  template <class Consume>
  bool receive(const char* op, bool block, std::optional<steady::time_point> deadline,
               Consume&& consume);
  /// True when a message has begun to arrive or the peer is gone. Waits for
  /// either until `deadline` (forever when empty) if `block`.
  bool poll(bool block, std::optional<steady::time_point> deadline);
  /// Releases this process's hold on the end. When no other process holds it
  /// any more, the end is closed for every process (the peer sees it closed).
  void close() noexcept;
  /// Closes the end for every process that holds it, then releases this handle.
  void shutdown() noexcept;
  /// True when this object holds no end (closed or moved from).
  bool closed() const noexcept { return map_ == nullptr; }

  /// How waits spin and sleep.
  wait_policy policy;

 private:
  friend class connection_source;
  friend struct connection_registry;

  pipe_end_state& mine() noexcept { return map_->block().ends[end_]; }
  pipe_end_state& theirs() noexcept { return map_->block().ends[1 - end_]; }
  void claim(const char* op);
  void take_over(process_token t);
  peer_state peer(bool check_process) noexcept;
  peer_state peer_throttled() noexcept;
  bool message_begun() { return in_bytes(sizeof(std::uint64_t)) >= sizeof(std::uint64_t); }
  std::size_t in_bytes(std::size_t want);
  std::size_t out_space();
  [[noreturn]] void throw_gone(const char* op, peer_state st);
  [[noreturn]] void throw_corrupt(const char* what);
  template <class Consume>
  void read_begun(const char* op, Consume& consume);
  void write_stream(const void* data, std::size_t size);
  void read_exact(void* dst, std::size_t n, std::size_t message_size, const char* op);
  void discard(std::size_t n) noexcept;
  [[noreturn]] void throw_cut_off(const char* op, std::size_t message_size);
  wait_policy streaming_policy() const noexcept;
  std::size_t chunk() const noexcept;
  // Holder slots (see pipe_end_state), process-local bookkeeping.
  void hold() noexcept;
  void release_hold() noexcept;
  void reserve_fork_slot() noexcept;
  void adopt_fork_slot(process_token child) noexcept;

  std::shared_ptr<pipe_mapping> map_;
  int end_ = 0;
  process_token user_ = 0;  // the process the ring views below belong to
  ring_writer out_;
  ring_reader in_;
  peer_state gone_ = peer_state::present;  // sticky once the peer is found gone
  steady::time_point next_check_{};        // next throttled check that the peer runs
  bool broken_ = false;                    // a message was cut off by a dying peer
  int slot_ = -1;                    // this process's holder slot in mine(); -1 when untracked
  int fork_slot_ = -1;               // the slot reserved for a child while a fork is in progress
  bool marked_used_ = false;         // this process's slot says it used the end
  connection_core* prev_ = nullptr;  // the registry's list of open ends of this process
  connection_core* next_ = nullptr;
  // Where a message that does not lie whole in the ring is put together.
  // Not zero-filled, grown as bytes arrive (never from the header alone),
  // kept for the next message.
  std::unique_ptr<std::byte[]> buffer_;
  std::size_t buffer_capacity_ = 0;
};

/// The open `connection_core`s of this process, and the fork handlers that make a
/// child a holder of each: before the fork a slot is reserved in each end
/// (so a parent that closes its handle right after forking does not close
/// the end), in the child it receives the child's token. A fork that fails
/// leaves its reserved slots to the parent: those ends are then seen held
/// until the parent ends.
struct connection_registry {
  std::mutex lock;
  connection_core* first = nullptr;

  /// The registry of this process (never destroyed: ends may close during exit).
  static connection_registry& get() noexcept;
  void add(connection_core* e) noexcept;
  void remove(connection_core* e) noexcept;
  /// Under `lock`: puts `e` on the list, or takes it off.
  void link(connection_core* e) noexcept;
  void unlink(connection_core* e) noexcept;
  static void before_fork() noexcept;
  static void after_fork_parent() noexcept;
  static void after_fork_child() noexcept;
};

// ---------------------------------------------------------------------------
// Definitions

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
  rings_[0] = ring_control::create(base + header, capacity);
  rings_[1] = ring_control::create(base + header + ring_bytes, capacity);
  ring_room_ = capacity;
}

inline connection_registry& connection_registry::get() noexcept {
  static connection_registry* r = [] {
    auto* made = new connection_registry();
    ::pthread_atfork(&before_fork, &after_fork_parent, &after_fork_child);
    return made;
  }();
  return *r;
}

inline void connection_registry::add(connection_core* e) noexcept {
  std::lock_guard<std::mutex> hold(lock);
  link(e);
}

inline void connection_registry::remove(connection_core* e) noexcept {
  std::lock_guard<std::mutex> hold(lock);
  unlink(e);
}

inline void connection_registry::link(connection_core* e) noexcept {
  e->prev_ = nullptr;
  e->next_ = first;
  if (first != nullptr) first->prev_ = e;
  first = e;
}

inline void connection_registry::unlink(connection_core* e) noexcept {
  if (e->prev_ != nullptr) e->prev_->next_ = e->next_;
  if (e->next_ != nullptr) e->next_->prev_ = e->prev_;
  if (first == e) first = e->next_;
  e->prev_ = e->next_ = nullptr;
}

// The registry stays locked from here to the end of the fork, so no end
// opens, closes or moves while its slots are handed over.
inline void connection_registry::before_fork() noexcept {
  auto& r = get();
  r.lock.lock();
  for (connection_core* e = r.first; e != nullptr; e = e->next_) e->reserve_fork_slot();
}

inline void connection_registry::after_fork_parent() noexcept {
  auto& r = get();
  for (connection_core* e = r.first; e != nullptr; e = e->next_) e->fork_slot_ = -1;
  r.lock.unlock();
}

inline void connection_registry::after_fork_child() noexcept {
  auto& r = get();
  forget_process_token();
  process_token child = this_process_token();
  for (connection_core* e = r.first; e != nullptr; e = e->next_) e->adopt_fork_slot(child);
  r.lock.unlock();
}

// True while the process in holder slot value `v` runs (a pending slot: its parent).
inline bool holder_alive(std::uint64_t v) noexcept {
  return v != 0 && process_alive(v & ~holder_flags);
}

// True when a process other than `except` (0: none) holds `s`; frees the
// slots of holders that ended on the way, so the table does not fill up.
// `except_used` is set when `except` holds it and has used it.
inline bool other_holder_alive(pipe_end_state& s, process_token except,
                               bool* except_holds = nullptr, bool* except_used = nullptr) noexcept {
  bool found = false;
  for (auto& slot : s.holders) {
    std::uint64_t v = slot.load(std::memory_order_acquire);
    if (v == 0) continue;
    if ((v & ~holder_flags) == except && (v & holder_pending) == 0) {
      if (except_holds != nullptr) *except_holds = true;
      if (except_used != nullptr && (v & holder_used) != 0) *except_used = true;
      continue;
    }
    if (holder_alive(v)) {
      found = true;
      break;
    }
    slot.compare_exchange_strong(v, 0, std::memory_order_acq_rel);
  }
  return found;
}

inline connection_core::connection_core(std::shared_ptr<pipe_mapping> mapping, int end) noexcept
    : map_(std::move(mapping)), end_(end) {
  if (!map_) return;
  hold();
  connection_registry::get().add(this);
}

// Takes a free holder slot for this process.
inline void connection_core::hold() noexcept {
  const std::uint64_t me = this_process_token();
  for (std::size_t i = 0; i < pipe_max_holders; ++i) {
    std::uint64_t expected = 0;
    if (mine().holders[i].compare_exchange_strong(expected, me, std::memory_order_acq_rel)) {
      slot_ = static_cast<int>(i);
      return;
    }
  }
  slot_ = -1;
  mine().untracked.fetch_add(1, std::memory_order_relaxed);
}

// Frees this process's slot, if it is still ours (shared memory may say otherwise).
inline void connection_core::release_hold() noexcept {
  if (slot_ < 0) return;
  auto& slot = mine().holders[slot_];
  std::uint64_t v = slot.load(std::memory_order_acquire);
  if ((v & ~holder_flags) == this_process_token() && (v & holder_pending) == 0)
    slot.compare_exchange_strong(v, 0, std::memory_order_acq_rel);
  slot_ = -1;
}

// Before a fork (registry locked): a slot for the child, in the parent's name until it comes.
inline void connection_core::reserve_fork_slot() noexcept {
  fork_slot_ = -1;
  const std::uint64_t pending = this_process_token() | holder_pending;
  for (int pass = 0; pass < 2; ++pass) {
    for (std::size_t i = 0; i < pipe_max_holders; ++i) {
      std::uint64_t expected = 0;
      if (mine().holders[i].compare_exchange_strong(expected, pending, std::memory_order_acq_rel)) {
        fork_slot_ = static_cast<int>(i);
        return;
      }
    }
    if (pass == 0) (void)other_holder_alive(mine(), 0);  // frees the slots of ended holders
  }
  mine().untracked.fetch_add(1, std::memory_order_relaxed);
}

// In the child: the slot reserved before the fork becomes the child's.
inline void connection_core::adopt_fork_slot(process_token child) noexcept {
  slot_ = fork_slot_;
  fork_slot_ = -1;
  marked_used_ = false;
  user_ = 0;
  gone_ = peer_state::present;
  next_check_ = {};
  if (slot_ >= 0) mine().holders[slot_].store(child, std::memory_order_release);
}

inline connection_core& connection_core::operator=(connection_core&& o) noexcept {
  if (this != &o) {
    close();
    // Under the registry's lock: a fork in another thread sees the end in
    // `o` or in this object, never half moved.
    auto& registry = connection_registry::get();
    std::lock_guard<std::mutex> hold(registry.lock);
    if (o.map_) registry.unlink(&o);
    map_ = std::move(o.map_);
    end_ = o.end_;
    user_ = std::exchange(o.user_, 0);
    out_ = o.out_;
    in_ = o.in_;
    gone_ = o.gone_;
    next_check_ = o.next_check_;
    broken_ = o.broken_;
    slot_ = std::exchange(o.slot_, -1);
    fork_slot_ = -1;
    marked_used_ = o.marked_used_;
    buffer_ = std::move(o.buffer_);
    buffer_capacity_ = std::exchange(o.buffer_capacity_, 0);
    policy = o.policy;
    if (map_) registry.link(this);
  }
  return *this;
}

inline void connection_core::require_open(const char* op) const {
  if (!map_) throw channel_closed(fmt::format("{} on a closed (or moved-from) connection", op));
}

inline void connection_core::throw_corrupt(const char* what) {
  broken_ = true;
  throw channel_corrupted(fmt::format(
      "end {} of a pipe: its shared state is corrupt ({}); memory was overwritten, and the pipe "
      "cannot be used any more",
      end_, what));
}

// Makes this process the user of the end. A process that uses the end after
// another one did (a forked child, or the parent again after its child)
// starts from the shared counters, not from the views it had.
inline void connection_core::claim(const char* op) {
  require_open(op);
  auto& m = mine();
  if (m.closed.load(std::memory_order_acquire) != 0)
    throw channel_closed(
        fmt::format("{} on end {} of a pipe, which process {} closed for every "
                    "process",
                    op, end_, token_pid(m.closed_by.load(std::memory_order_relaxed))));
  if (broken_)
    throw channel_closed(fmt::format(
        "{} on end {} of a pipe whose other end's process died in the middle of a message (or "
        "whose shared state is corrupt)",
        op, end_));
  process_token t = this_process_token();
  if (t != user_ || m.user.load(std::memory_order_acquire) != t) take_over(t);
  if (!marked_used_ && slot_ >= 0) {
    m.holders[slot_].fetch_or(holder_used, std::memory_order_acq_rel);
    marked_used_ = true;
  }
}

inline void connection_core::take_over(process_token t) {
  out_ = ring_writer(map_->ring_written_by(end_));
  in_ = ring_reader(map_->ring_written_by(1 - end_));
  // The capacities come from shared memory: they must be ones this process mapped.
  for (std::size_t c : {out_.capacity(), in_.capacity()})
    if (c < 64 || c > map_->ring_room() || (c & (c - 1)) != 0) {
      out_ = ring_writer();
      in_ = ring_reader();
      user_ = 0;
      throw_corrupt("a ring capacity that was never mapped");
    }
  user_ = t;
  next_check_ = {};
  gone_ = peer_state::present;
  mine().user.store(t, std::memory_order_release);
}

// Bytes readable now; throws when the writer's counter is corrupt.
inline std::size_t connection_core::in_bytes(std::size_t want) {
  std::size_t n = in_.available(want);
  if (in_.corrupt()) throw_corrupt("a write position beyond the ring");
  return n;
}

// Room to write now; throws when the reader's counter is corrupt.
inline std::size_t connection_core::out_space() {
  std::size_t n = out_.free_space();
  if (out_.corrupt()) throw_corrupt("a read position beyond the ring");
  return n;
}

// The other end is gone when it was closed for every process, or when no
// process other than this one holds it and this one never used it while
// another process did (so nothing this process does not do itself can ever
// come through it).
inline peer_state connection_core::peer(bool check_process) noexcept {
  if (gone_ != peer_state::present) return gone_;
  auto& th = theirs();
  if (th.closed.load(std::memory_order_acquire) != 0) return gone_ = peer_state::closed;
  if (!check_process || th.untracked.load(std::memory_order_relaxed) != 0)
    return peer_state::present;
  process_token me = this_process_token();
  bool i_hold = false, i_used = false;
  if (other_holder_alive(th, me, &i_hold, &i_used) || i_used) return peer_state::present;
  process_token u = th.user.load(std::memory_order_acquire);
  if (i_hold && (u == 0 || u == me)) return peer_state::present;  // only this process can use it
  if (th.closed.load(std::memory_order_acquire) != 0) return gone_ = peer_state::closed;
  if (u != 0 && th.closed_by.load(std::memory_order_acquire) == u)
    return gone_ = peer_state::closed;
  return gone_ = peer_state::exited;
}

// The closed flag on every call; whether the peer's holders run at most once
// per sleep slice, so a busy sender makes no system call per message.
inline peer_state connection_core::peer_throttled() noexcept {
  auto st = peer(false);
  if (st != peer_state::present) return st;
  auto now = steady::now();
  if (now < next_check_) return st;
  next_check_ = now + policy.slice;
  return peer(true);
}

inline void connection_core::throw_gone(const char* op, peer_state st) {
  auto& th = theirs();
  pid_t user = token_pid(th.user.load(std::memory_order_acquire));
  if (st == peer_state::closed) {
    pid_t by = token_pid(th.closed_by.load(std::memory_order_acquire));
    throw channel_closed(
        fmt::format("{} on end {} of a pipe: the other end (end {}) was closed by process {}", op,
                    end_, 1 - end_, by != 0 ? by : user));
  }
  if (user == 0)
    throw channel_closed(
        fmt::format("{} on end {} of a pipe: no process holds the other end (end {}) any more", op,
                    end_, 1 - end_));
  throw channel_closed(
      fmt::format("{} on end {} of a pipe: process {}, which used the other end "
                  "(end {}), has exited, and no other process holds that end",
                  op, end_, user, 1 - end_));
}

inline void connection_core::send(const void* head, std::size_t head_size, const void* body,
                                  std::size_t body_size) {
  claim("send");
  auto st = peer_throttled();
  if (st != peer_state::present) throw_gone("send", st);
  std::uint64_t header = head_size + body_size;
  if (out_space() >= sizeof header + header) {  // the common case: one publish
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
inline wait_policy connection_core::streaming_policy() const noexcept {
  wait_policy p = policy;
  p.spin = std::max<std::chrono::nanoseconds>(p.spin, std::chrono::microseconds(50));
  return p;
}

// Large messages move in chunks of a quarter of the ring, each published
// (or released) at once, so that writer and reader copy at the same time.
inline std::size_t connection_core::chunk() const noexcept {
  return out_.capacity() / 4;
}

inline void connection_core::write_stream(const void* data, std::size_t size) {
  auto p = static_cast<const std::byte*>(data);
  const std::size_t most = chunk();
  while (size > 0) {
    std::size_t n = std::min({size, out_space(), most});
    if (n == 0) {
      auto ws = wait_for_condition(
          out_.writable(), [this] { return out_.free_space() > 0 || out_.corrupt(); }, std::nullopt,
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
inline void connection_core::read_exact(void* dst, std::size_t n, std::size_t message_size,
                                        const char* op) {
  auto out = static_cast<std::byte*>(dst);
  const std::size_t most = in_.capacity() / 4;
  while (n > 0) {
    std::size_t k = std::min({in_bytes(1), n, most});
    if (k == 0) {
      in_.release();
      auto ws = wait_for_condition(
          in_.readable(), [this] { return in_.available(1) > 0 || in_.corrupt(); }, std::nullopt,
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
inline void connection_core::discard(std::size_t n) noexcept {
  while (n > 0) {
    std::size_t k = std::min(in_.available(1), n);
    if (in_.corrupt()) {
      broken_ = true;
      return;
    }
    if (k == 0) {
      in_.release();
      auto ws = wait_for_condition(
          in_.readable(), [this] { return in_.available(1) > 0 || in_.corrupt(); }, std::nullopt,
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

inline void connection_core::throw_cut_off(const char* op, std::size_t message_size) {
  broken_ = true;
  throw channel_closed(fmt::format(
      "{} on end {} of a pipe: process {}, which used the other end (end {}), died in the "
      "middle of a message of {} bytes",
      op, end_, token_pid(theirs().user.load(std::memory_order_acquire)), 1 - end_, message_size));
}

inline void connection_source::read(void* dst, std::size_t n) {
  if (n > left_) throw decode_error(size_ - left_, "read past the end of a message");
  end_.read_exact(dst, n, size_, op_);
  left_ -= n;
}

/// Decodes a `contiguous_payload` container of `size` encoded bytes from
/// `source`, reading the elements straight into it. Checks the count against
/// the size before anything is reserved.
/// **Throws:** `decode_error` when they disagree; `channel_closed` as `connection_source::read`.
template <class T>
T read_contiguous(std::size_t size, connection_source& source) {
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
bool connection_core::receive(const char* op, bool block,
                              std::optional<steady::time_point> deadline, Consume&& consume) {
  claim(op);
  while (!message_begun()) {
    auto st = block ? peer(false) : peer_throttled();
    if (st != peer_state::present) {
      // Messages sent before the peer left are still delivered.
      if (in_.refresh() >= sizeof(std::uint64_t)) break;
      if (in_.corrupt()) throw_corrupt("a write position beyond the ring");
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
void connection_core::read_begun(const char* op, Consume& consume) {
  std::size_t size = *in_.next_message_size();
  std::size_t total = size < in_.capacity() ? sizeof(std::uint64_t) + size : 0;
  // A message that lies whole and unwrapped in the ring is decoded in place.
  if (size < in_.capacity() && in_bytes(total) >= total) {
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
    connection_source source(*this, size, op);
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
    // Every byte read is released, the header of an empty message too: the
    // next process to use this end starts from the shared counter.
    in_.release();
    consume(static_cast<const std::byte*>(buffer_.get()), size);
  }
}

inline bool connection_core::poll(bool block, std::optional<steady::time_point> deadline) {
  claim("poll");
  if (message_begun() || peer_throttled() != peer_state::present) return true;
  if (!block) return false;
  auto ws = wait_for_condition(
      in_.readable(), [this] { return message_begun(); }, deadline,
      [this] { return peer(true) == peer_state::present; }, policy);
  return ws != wait_status::timeout;
}

inline void connection_core::close() noexcept {
  if (!map_) return;
  connection_registry::get().remove(this);
  auto& m = mine();
  process_token t = this_process_token();
  if (marked_used_ || user_ == t) m.closed_by.store(t, std::memory_order_release);
  release_hold();
  // The last holder closes the end for every process.
  if (m.untracked.load(std::memory_order_relaxed) == 0 && !other_holder_alive(m, 0))
    m.closed.store(1, std::memory_order_release);
  // Either way a peer waiting in recv or send looks again: it may be the
  // only holder left of this end.
  map_->ring_written_by(end_)->readable.notify();
  map_->ring_written_by(1 - end_)->writable.notify();
  map_.reset();
  user_ = 0;
  slot_ = -1;
  marked_used_ = false;
  out_ = ring_writer();
  in_ = ring_reader();
}

inline void connection_core::shutdown() noexcept {
  if (!map_) return;
  auto& m = mine();
  m.closed_by.store(this_process_token(), std::memory_order_release);
  m.closed.store(1, std::memory_order_release);
  close();
}

}  // namespace procpool::detail
