// The channel fuzz target: a queue's and a pipe's operations, with a hostile
// peer that writes bytes the fuzzer chooses over their shared state between
// operations. Shared by the libFuzzer program (channel_fuzz.cpp) and by
// queue_test.cpp, which runs pseudo-random inputs through it in every build.
//
// The property: whatever the shared bytes say, no operation reads or writes
// outside the channel's own memory (ASan sees every byte beyond it: the rest
// of the mapping's last page is poisoned, and so is each pipe ring beyond
// the capacity the harness gives it), no operation hangs, and each either
// works or throws one of the channel's errors: `channel_corrupted`,
// `channel_closed`, `message_too_large`, or `procpool::error` from
// `task_done`. While no hostile byte was written yet, the channel behaves as
// a FIFO model says.
//
// Everything runs in one thread of one process, which holds both pipe ends.
// A pipe operation that would wait for bytes or room that cannot come
// (single thread) is run with the other end marked closed, as a peer that
// gives up, so that the wait ends.
//
// An input is one setup byte, then operations:
//
//   byte 0   bit 0: 0 queue, 1 pipe; bits 1-3 (v % 6): capacity 64 << v bytes
//            (queue: data bytes; pipe: each ring, carved out of a 4 KiB ring)
//
// Each operation is one byte: the low 3 bits select it, the high 5 bits `a`
// are its argument.
//
//   0 write a: o n b...   hostile: the next byte `n` (% 17) bytes go to
//                         offset o (u16 from two bytes) of the shared state
//   1 push a              push / send a message of 4*a bytes
//   2 pop a               pop / receive one message (a & 1: blocking pipe receive)
//   3 word a: v           hostile: the next 8 bytes as a u64 over the a-th
//                         8-byte word of the shared state
//   4 misc a              queue: task_done, size, full, join_for(0);
//                         pipe: poll, or a capacity written into a ring
//   5 close a             queue: close; pipe: close an end and take a fresh one
//   6 turn                pipe: the ends swap roles (who sends)
//   7 reset user          hostile: forget which process used each end
//
// The pthread mutex of the queue is left out of the shared state the peer
// may write: a peer that can write it can hold the lock forever, which is a
// matter of liveness that no check on our side can answer.
#pragma once

#include <procpool/detail/transport/connection_core.hpp>
#include <procpool/detail/transport/queue_core.hpp>
#include <procpool/detail/transport/ring.hpp>
#include <procpool/detail/transport/shm.hpp>
#include <procpool/errors.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#if defined(__has_include)
#if __has_include(<sanitizer/asan_interface.h>)
#include <sanitizer/asan_interface.h>
#endif
#endif
#ifndef ASAN_POISON_MEMORY_REGION
#define ASAN_POISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif

namespace channel_fuzz {

namespace pd = procpool::detail;

/// Reports a broken property and aborts, so that libFuzzer keeps the input.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "channel_fuzz: %s\n", what);
  std::abort();
}

/// The input, read byte by byte; zeros once it runs out.
class input {
 public:
  input(const std::uint8_t* data, std::size_t size) noexcept : data_(data), size_(size) {}
  bool done() const noexcept { return at_ >= size_; }
  std::uint8_t byte() noexcept { return at_ < size_ ? data_[at_++] : 0; }
  std::uint64_t u64() noexcept {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t{byte()} << (8 * i);
    return v;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_ = 0;
};

/// Spans of shared memory the hostile peer may write, seen as one range.
class hostile_memory {
 public:
  void add(void* p, std::size_t n) { spans_.push_back({static_cast<std::byte*>(p), n}); }
  std::size_t size() const noexcept {
    std::size_t n = 0;
    for (auto& s : spans_) n += s.second;
    return n;
  }
  /// Writes `n` bytes at `offset` (modulo the size), byte by byte across spans.
  void write(std::size_t offset, const std::uint8_t* bytes, std::size_t n) noexcept {
    std::size_t total = size();
    if (total == 0) return;
    for (std::size_t i = 0; i < n; ++i) *at((offset + i) % total) = std::byte{bytes[i]};
  }
  /// Writes a u64 over the `word`-th whole 8-byte word (modulo their number).
  void write_word(std::size_t word, std::uint64_t v) noexcept {
    std::size_t words = size() / 8;
    if (words == 0) return;
    std::uint8_t bytes[8];
    std::memcpy(bytes, &v, 8);
    write((word % words) * 8, bytes, 8);
  }

 private:
  std::byte* at(std::size_t offset) noexcept {
    for (auto& s : spans_) {
      if (offset < s.second) return s.first + offset;
      offset -= s.second;
    }
    return spans_.front().first;
  }
  std::vector<std::pair<std::byte*, std::size_t>> spans_;
};

/// The message of `n` bytes with sequence number `seq`.
inline std::vector<std::byte> message(std::uint64_t seq, std::size_t n) {
  std::vector<std::byte> m(n);
  for (std::size_t i = 0; i < n; ++i) m[i] = static_cast<std::byte>((seq * 31 + i) & 0xff);
  return m;
}

/// Runs `f`; true when it returned, false when it threw one of the errors a
/// channel may throw. Any other exception is a failure.
template <class F>
bool allowed(F&& f) {
  try {
    f();
    return true;
  } catch (const procpool::channel_corrupted&) {
  } catch (const procpool::channel_closed&) {
  } catch (const procpool::message_too_large&) {
  } catch (const procpool::error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "channel_fuzz: unexpected exception: %s\n", e.what());
    fail("an operation threw an exception no channel should throw");
  }
  return false;
}

/// Page size, for the tail of a mapping that ASan is told to watch.
inline std::size_t page() {
  return 4096;
}

/// A queue under a hostile peer.
class queue_harness {
 public:
  explicit queue_harness(std::size_t capacity) : core_(capacity) {
    core_.policy.spin = std::chrono::nanoseconds(0);
    core_.policy.slice = std::chrono::nanoseconds(0);
    auto& b = core_.shared_block();
    auto* base = reinterpret_cast<std::byte*>(&b);
    std::size_t header = pd::align_up(sizeof(pd::queue_block), pd::cache_line);
    data_ = base + header;
    capacity_ = capacity;
    // Beyond the data bytes, up to the end of the mapping's last page.
    tail_ = data_ + capacity;
    tail_bytes_ = pd::align_up(header + capacity, page()) - header - capacity;
    ASAN_POISON_MEMORY_REGION(tail_, tail_bytes_);
    std::size_t after_mutex = pd::align_up(sizeof(pd::robust_mutex), pd::cache_line);
    hostile_.add(base + after_mutex, sizeof(pd::queue_block) - after_mutex);
    hostile_.add(data_, capacity);
  }
  ~queue_harness() { ASAN_UNPOISON_MEMORY_REGION(tail_, tail_bytes_); }
  queue_harness(const queue_harness&) = delete;
  queue_harness& operator=(const queue_harness&) = delete;

  void run(input& in) {
    while (!in.done()) {
      std::uint8_t op = in.byte();
      unsigned a = op >> 3;
      switch (op & 7) {
        case 0: {
          std::size_t offset = in.byte() | (std::size_t{in.byte()} << 8);
          std::uint8_t bytes[16];
          std::size_t n = in.byte() % 17;
          for (std::size_t i = 0; i < n; ++i) bytes[i] = in.byte();
          hostile_.write(offset, bytes, n);
          clean_ = false;
          break;
        }
        case 3:
          hostile_.write_word(a, in.u64());
          clean_ = false;
          break;
        case 1: {
          auto m = message(seq_, 4 * a);
          bool pushed = false;
          if (allowed([&] { pushed = core_.push(m.data(), m.size(), false, std::nullopt); }) &&
              pushed) {
            model_.push_back(std::move(m));
            ++seq_;
          } else if (clean_ && !closed_ && m.size() + 8 <= capacity_ && model_.empty()) {
            fail("a push into an empty, clean queue failed");
          }
          break;
        }
        case 2: {
          std::vector<std::byte> out;
          auto r = pd::queue_core::pop_result::empty;
          bool ok = allowed([&] { r = core_.pop(out, false, std::nullopt); });
          if (!clean_) break;
          if (!ok) fail("a pop from a clean queue threw");
          if (r == pd::queue_core::pop_result::popped) {
            if (model_.empty() || out != model_.front()) fail("a clean queue lost its order");
            model_.pop_front();
          } else if (!model_.empty()) {
            fail("a clean queue holding items said it was empty");
          }
          break;
        }
        case 4: {
          switch (a % 4) {
            case 0:
              (void)allowed([&] { core_.task_done(); });
              break;
            case 1: {
              bool ok = allowed([&] {
                auto f = core_.state();
                if (clean_ && f.items != model_.size()) fail("a clean queue miscounts its items");
                if (f.free_bytes > capacity_) fail("more free bytes than the capacity");
              });
              if (clean_ && !ok) fail("size of a clean queue threw");
              break;
            }
            case 2:
              (void)core_.size_approx();
              break;
            default:
              (void)allowed([&] { (void)core_.join(std::chrono::steady_clock::now()); });
              break;
          }
          break;
        }
        case 5:
          (void)allowed([&] { core_.close(); });
          closed_ = true;
          break;
        default:
          break;
      }
    }
    // Drain what is left, bounded.
    for (std::size_t i = 0; i <= capacity_ / 8; ++i) {
      std::vector<std::byte> out;
      auto r = pd::queue_core::pop_result::empty;
      if (!allowed([&] { r = core_.pop(out, false, std::nullopt); })) break;
      if (r != pd::queue_core::pop_result::popped) break;
    }
  }

 private:
  pd::queue_core core_;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::byte* tail_ = nullptr;
  std::size_t tail_bytes_ = 0;
  hostile_memory hostile_;
  std::deque<std::vector<std::byte>> model_;
  std::uint64_t seq_ = 0;
  bool clean_ = true;
  bool closed_ = false;
};

/// Copies a received message.
struct copy_out {
  std::vector<std::byte>& out;
  void operator()(const std::byte* data, std::size_t size) { out.assign(data, data + size); }
};

/// A pipe under a hostile peer.
class pipe_harness {
 public:
  explicit pipe_harness(std::size_t capacity)
      : mapping_(std::make_shared<pd::pipe_mapping>(4096)), capacity_(capacity) {
    auto& block = mapping_->block();
    hostile_.add(&block, sizeof block);
    for (int end : {0, 1}) {
      pd::ring_control* r = mapping_->ring_written_by(end);
      room_ = static_cast<std::size_t>(r->capacity);
      r = pd::ring_control::create(r, capacity);
      ASAN_POISON_MEMORY_REGION(r->data() + capacity, room_ - capacity);
      // Counters and eventcounts, not the capacity (see `set_capacity`).
      hostile_.add(r, offsetof(pd::ring_control, capacity));
      hostile_.add(r->data(), capacity);
    }
    for (int end : {0, 1}) fresh(end);
  }
  ~pipe_harness() {
    ends_[0].close();
    ends_[1].close();
    for (int end : {0, 1})
      ASAN_UNPOISON_MEMORY_REGION(mapping_->ring_written_by(end)->data() + capacity_,
                                  room_ - capacity_);
  }
  pipe_harness(const pipe_harness&) = delete;
  pipe_harness& operator=(const pipe_harness&) = delete;

  void run(input& in) {
    while (!in.done()) {
      std::uint8_t op = in.byte();
      unsigned a = op >> 3;
      switch (op & 7) {
        case 0: {
          std::size_t offset = in.byte() | (std::size_t{in.byte()} << 8);
          std::uint8_t bytes[16];
          std::size_t n = in.byte() % 17;
          for (std::size_t i = 0; i < n; ++i) bytes[i] = in.byte();
          hostile_.write(offset, bytes, n);
          clean_ = false;
          break;
        }
        case 3:
          hostile_.write_word(a, in.u64());
          clean_ = false;
          break;
        case 7:
          for (auto& e : mapping_->block().ends) e.user.store(0);
          break;
        case 1:
          send(4 * a);
          break;
        case 2:
          receive((a & 1) != 0);
          break;
        case 4:
          if ((a & 1) == 0) {
            (void)allowed([&] { (void)ends_[1 - sender_].poll(false, std::nullopt); });
          } else {
            set_capacity(a >> 1, in.u64());
          }
          break;
        case 5: {
          int end = static_cast<int>(a & 1);
          fresh(end);
          clean_ = false;  // the other end may now see it closed
          break;
        }
        case 6:
          sender_ = 1 - sender_;
          model_.clear();
          clean_ = false;
          break;
        default:
          break;
      }
    }
  }

 private:
  // A new object for `end`, made before the old one (if any) lets go, so the
  // end is never left without a holder (which would close it for good).
  void fresh(int end) {
    pd::connection_core made(mapping_, end);
    ends_[end] = std::move(made);
    ends_[end].policy.spin = std::chrono::nanoseconds(0);
    ends_[end].policy.slice = std::chrono::nanoseconds(0);
  }

  // What a view made now would see of the ring `end` writes: bytes in it, or
  // nothing when its counters are corrupt.
  std::optional<std::uint64_t> queued(int end) {
    pd::ring_control* r = mapping_->ring_written_by(end);
    std::uint64_t used = r->tail.load() - r->head.load();
    if (used > capacity_ || r->capacity != capacity_) return std::nullopt;
    return used;
  }

  // The size in the header at the ring's head.
  std::uint64_t header(int end) {
    pd::ring_control* r = mapping_->ring_written_by(end);
    std::uint64_t at = r->head.load(), size = 0;
    for (std::size_t i = 0; i < 8; ++i)
      size |= std::uint64_t{static_cast<std::uint8_t>(r->data()[(at + i) % capacity_])} << (8 * i);
    return size;
  }

  // Makes each end start from the shared counters on its next call, so the
  // harness knows what it will see (a hostile peer may do this anyway).
  void forget_users() {
    for (auto& e : mapping_->block().ends) e.user.store(0);
  }

  // The other end gives up, so that a wait for it ends; its object then is
  // replaced, and the flag cleared, by the peer that writes what it wants.
  void peer_gives_up(int end) { mapping_->block().ends[end].closed.store(1); }

  void after_give_up(int end) {
    mapping_->block().ends[end].closed.store(0);
    fresh(end);
    fresh(1 - end);
    clean_ = false;
  }

  void send(std::size_t n) {
    forget_users();
    int to = 1 - sender_;
    auto m = message(seq_, n);
    auto used = queued(sender_);
    bool waits = !used || capacity_ - *used < 8 + n;
    if (waits) peer_gives_up(to);
    bool sent = allowed([&] { ends_[sender_].send(m.data(), m.size()); });
    if (waits) {
      after_give_up(to);
      return;
    }
    if (sent) {
      model_.push_back(std::move(m));
      ++seq_;
    } else if (clean_) {
      fail("a send with room to spare on a clean pipe threw");
    } else {
      fresh(sender_);
    }
  }

  void receive(bool block) {
    forget_users();
    int end = 1 - sender_;
    auto used = queued(sender_);
    bool waits = !used || (*used >= 8 && header(sender_) > *used - 8) || (block && *used < 8);
    if (waits) peer_gives_up(sender_);
    std::vector<std::byte> out;
    bool got = false;
    bool ok = allowed(
        [&] { got = ends_[end].receive("recv", block || waits, std::nullopt, copy_out{out}); });
    if (waits) {
      after_give_up(sender_);
      return;
    }
    if (!ok) {
      if (clean_) fail("a receive on a clean pipe threw");
      fresh(end);
      return;
    }
    if (!clean_) return;
    if (got) {
      if (model_.empty() || out != model_.front()) fail("a clean pipe lost its order");
      model_.pop_front();
    } else if (!model_.empty()) {
      fail("a clean pipe holding messages had none to give");
    }
  }

  // A capacity written into the ring `which` writes: values a correct pipe
  // could hold are refused by the harness (its rings are smaller than what
  // is mapped, so they would be legitimate reads of poisoned bytes); any
  // other must be refused by the pipe.
  void set_capacity(unsigned which, std::uint64_t v) {
    if (v >= 64 && v <= room_ && (v & (v - 1)) == 0 && v != capacity_) v |= 1;
    mapping_->ring_written_by(static_cast<int>(which & 1))->capacity = v;
    forget_users();
    (void)allowed([&] { (void)ends_[0].poll(false, std::nullopt); });
    (void)allowed([&] { (void)ends_[1].poll(false, std::nullopt); });
    mapping_->ring_written_by(static_cast<int>(which & 1))->capacity = capacity_;
    fresh(0);
    fresh(1);
    clean_ = false;
  }

  std::shared_ptr<pd::pipe_mapping> mapping_;
  std::size_t capacity_;
  std::size_t room_ = 0;
  hostile_memory hostile_;
  pd::connection_core ends_[2];
  int sender_ = 0;
  std::deque<std::vector<std::byte>> model_;
  std::uint64_t seq_ = 0;
  bool clean_ = true;
};

/// Runs one input.
inline int one_input(const std::uint8_t* data, std::size_t size) {
  input in(data, size);
  std::uint8_t setup = in.byte();
  std::size_t capacity = std::size_t{64} << ((setup >> 1) % 6);
  if ((setup & 1) == 0) {
    queue_harness h(capacity);
    h.run(in);
  } else {
    pipe_harness h(capacity);
    h.run(in);
  }
  return 0;
}

}  // namespace channel_fuzz
