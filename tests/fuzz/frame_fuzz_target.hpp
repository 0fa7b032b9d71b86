// The frame fuzz target: the receiving side of the shared-memory transport
// (connection_core::receive in connection_core.hpp, ring_reader::read_message in ring.hpp)
// fed bytes that the fuzzer controls. Shared by the libFuzzer program and the
// seed-corpus generator, both in frame_fuzz.cpp.
//
// Everything runs in one thread of one process. The harness plays the peer:
// it keeps the byte stream the peer sends, writes it into the ring as space
// allows (as a real writer would) and never lets the receiver wait for bytes
// that cannot come. A model of the stream (length-prefixed frames from its
// first byte) says what each receive must give: the frame's bytes exactly,
// decoded as the reference `procpool::decode` decodes them from one buffer,
// or `decode_error` where that throws, or `channel_closed` once the peer has
// gone and no whole message is left. A known valid message written after
// malformed ones is received intact whenever it starts on a frame boundary
// (pipe.hpp, connection::recv: a message that does not decode is dropped and
// the connection stays usable; lies about lengths leave no boundary to come
// back to).
//
// An input is two setup bytes, then operations:
//
//   byte 0   bits 0-2: ring capacity, 64 << (v % 7) bytes (64 ... 4096)
//            bit 3: receiver: 0 connection_core::receive, 1 ring_reader::read_message
//   byte 1   both ring counters start at byte1 * capacity / 256, so that
//            messages wrap around the end of the ring early
//
// Each operation is one byte: the low nibble (mod 7) selects it, the high
// nibble `a` is its argument.
//
//   raw a n      the next a*256+n input bytes join the peer's stream as they
//                are: headers, bodies, lies about lengths, anything
//   message a n  a u64 header of a*256+n, then that many next input bytes
//   good a n     a valid message: kind a % 5 (see `kind`), 4*n elements
//   feed a       the peer writes up to 2^(a-1) pending bytes (a = 0: all that
//                fit) into the ring, and publishes them
//   recv a       the receiver takes one message with decoder a & 7 (see
//                `decoder`); a & 8: a blocking receive whose deadline has passed.
//                Decoder 7 (the harness's own streaming consumer) reads two
//                more bytes p q: read step 2^(p & 15), stop rule p >> 4 & 3
//                (0 none, 1 return, 2 throw, 3 read past the end) once q bytes
//                are read and the rest of the message is in the ring.
//                A ring_reader has no decoders: it ignores a (not p q).
//   close        the peer closes its end; bytes it had not written are lost
//   poll         connection_core::poll / ring_reader::next_message_size
//
// When the input ends, the peer (unless closed) sends a last valid message,
// and the receiver drains every message that the stream holds whole.
//
// A library decoder is only given a message whose bytes are all in the ring,
// or whose peer has closed its end (then it must throw `channel_closed`):
// `connection_core::receive` waits for missing bytes, and no second thread could
// write them. A message that cannot lie whole in the ring goes to the
// harness's own consumer instead, which writes the peer's next bytes between
// its reads through `connection_source`; ring mode writes them from
// `read_message`'s `keep_waiting`.
//
// One known library issue is tolerated unless FRAME_FUZZ_STRICT is set in
// the environment: read_contiguous reserving what a (lying) header claims
// (see where it is tolerated, in `recv`).
#pragma once

#include <procpool/codec.hpp>
#include <procpool/detail/transport/connection_core.hpp>
#include <procpool/detail/transport/ring.hpp>
#include <procpool/errors.hpp>
#include <procpool/pipe.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
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

namespace frame_fuzz {

namespace pd = procpool::detail;

/// Reports a broken property and aborts, so that libFuzzer keeps the input.
[[noreturn]] inline void fail(const char* what, const char* detail = "") {
  std::fprintf(stderr, "frame_fuzz: %s %s\n", what, detail);
  std::abort();
}

/// Aborts with `what` unless `ok`.
inline void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

/// The operations, in the order of their codes.
enum op : std::uint8_t { op_raw, op_message, op_good, op_feed, op_recv, op_close, op_poll };
inline constexpr unsigned op_count = 7;

/// How the receiver takes a message: the library's consumers (decode_whole,
/// decode_streamed from pipe.hpp) for a few types, or the harness's own.
enum decoder : std::uint8_t {
  whole_string,
  streamed_string,
  streamed_u32,
  streamed_u64,
  whole_strings,
  whole_u64,
  whole_u32,
  own_stream,
};

/// Kinds of valid messages (`good`), and the decoder a kind is drained with.
enum kind : std::uint8_t { kind_string, kind_u32, kind_u64, kind_strings, kind_number };
inline constexpr unsigned kind_count = 5;

/// A type, as a value.
template <class T>
struct type {
  using value = T;
};

/// True for the decoders that stream (decode_streamed, through read_contiguous).
constexpr bool is_streamed(decoder d) noexcept {
  return d == streamed_string || d == streamed_u32 || d == streamed_u64;
}

/// True when FRAME_FUZZ_STRICT is set: the library issues the harness
/// tolerates (see `recv`, `recv_library`) then abort like any other.
inline bool strict() {
  static const bool set = std::getenv("FRAME_FUZZ_STRICT") != nullptr;
  return set;
}

/// Calls `f(type<T>{}, streamed)` for the library decoder `d` (not `own_stream`).
template <class F>
void with_decoder(decoder d, F&& f) {
  switch (d) {
    case whole_string:
      return f(type<std::string>{}, std::false_type{});
    case streamed_string:
      return f(type<std::string>{}, std::true_type{});
    case streamed_u32:
      return f(type<std::vector<std::uint32_t>>{}, std::true_type{});
    case streamed_u64:
      return f(type<std::vector<std::uint64_t>>{}, std::true_type{});
    case whole_strings:
      return f(type<std::vector<std::string>>{}, std::false_type{});
    case whole_u64:
      return f(type<std::uint64_t>{}, std::false_type{});
    case whole_u32:
      return f(type<std::vector<std::uint32_t>>{}, std::false_type{});
    case own_stream:
      break;
  }
  fail("with_decoder: not a library decoder");
}

/// Calls `f(type<T>{})` for the type of messages of kind `k`.
template <class F>
void with_kind(kind k, F&& f) {
  switch (k) {
    case kind_string:
      return f(type<std::string>{});
    case kind_u32:
      return f(type<std::vector<std::uint32_t>>{});
    case kind_u64:
      return f(type<std::vector<std::uint64_t>>{});
    case kind_strings:
      return f(type<std::vector<std::string>>{});
    case kind_number:
      return f(type<std::uint64_t>{});
  }
  fail("with_kind: no such kind");
}

/// The library decoder the drain uses for a valid message of kind `k`.
constexpr decoder decoder_for(kind k) noexcept {
  switch (k) {
    case kind_string:
      return streamed_string;
    case kind_u32:
      return streamed_u32;
    case kind_u64:
      return streamed_u64;
    case kind_strings:
      return whole_strings;
    case kind_number:
      return whole_u64;
  }
  return own_stream;
}

/// The valid value of type `T` with `n` elements (a pattern, not zeros).
template <class T>
T good_value(std::size_t n) {
  T out{};
  if constexpr (std::is_same_v<T, std::uint64_t>) {
    out = 0x9e3779b97f4a7c15u * (n + 1);
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    for (std::size_t i = 0; i < n / 4; ++i) out.push_back(std::string(i % 7, char('a' + i % 26)));
  } else {
    for (std::size_t i = 0; i < n; ++i)
      out.push_back(static_cast<typename T::value_type>(0x2545f491u * (i + 1) + n));
  }
  return out;
}

/// The encoding of the valid message of kind `k` with `n` elements.
inline std::vector<std::byte> good_encoding(kind k, std::size_t n) {
  std::vector<std::byte> out;
  with_kind(k, [&](auto t) { out = procpool::encode(good_value<typename decltype(t)::value>(n)); });
  return out;
}

/// Reads an input front to back; past its end every byte reads as zero.
class input {
 public:
  input(const std::uint8_t* data, std::size_t size) noexcept : data_(data), size_(size) {}
  /// True once every byte was read.
  bool empty() const noexcept { return at_ >= size_; }
  /// The next byte (0 past the end).
  std::uint8_t byte() noexcept { return at_ < size_ ? data_[at_++] : 0; }
  /// The next `n` bytes, or as many as remain; returns their start and count.
  std::pair<const std::byte*, std::size_t> bytes(std::size_t n) noexcept {
    n = std::min(n, size_ - std::min(at_, size_));
    auto* p = reinterpret_cast<const std::byte*>(data_ + std::min(at_, size_));
    at_ += n;
    return {p, n};
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_ = 0;
};

/// Thrown by the harness's own consumer when its stop rule says throw.
struct consumer_stopped {};

/// One run: the ring, the receiver, the peer and the model of the stream.
class harness {
 public:
  /// Most bytes the peer sends in one input (bounds the work per input).
  static constexpr std::size_t max_stream = std::size_t{1} << 20;

  /// A ring of `capacity` bytes (a power of two, at most 4096) whose
  /// counters start at `start`, read by a pipe end (`pipe_mode`) or a ring_reader.
  harness(std::size_t capacity, bool pipe_mode, std::uint64_t start)
      : capacity_(capacity), pipe_mode_(pipe_mode), start_(start) {
    if (pipe_mode_) {
      // A real pipe mapping; its rings (at least 4 KiB) are rebuilt in place
      // with the capacity asked for, the bytes beyond it poisoned for ASan.
      mapping_ = std::make_shared<pd::pipe_mapping>(capacity);
      for (int end : {0, 1}) {
        pd::ring_control* r = mapping_->ring_written_by(end);
        full_capacity_ = static_cast<std::size_t>(r->capacity);
        r = pd::ring_control::create(r, capacity);
        r->tail.store(start, std::memory_order_relaxed);
        r->head.store(start, std::memory_order_relaxed);
        ASAN_POISON_MEMORY_REGION(r->data() + capacity, full_capacity_ - capacity);
      }
      ring_ = mapping_->ring_written_by(0);
      sender_ = pd::connection_core(mapping_, 0);
      receiver_ = pd::connection_core(mapping_, 1);
      receiver_.policy.spin = std::chrono::nanoseconds(0);
      receiver_.policy.slice = std::chrono::nanoseconds(0);
    } else {
      // A heap block of exactly the ring's size: ASan sees any byte beyond it.
      memory_.reset(static_cast<std::byte*>(::operator new (
          pd::ring_control::bytes_needed(capacity), std::align_val_t{pd::cache_line})));
      ring_ = pd::ring_control::create(memory_.get(), capacity);
      ring_->tail.store(start, std::memory_order_relaxed);
      ring_->head.store(start, std::memory_order_relaxed);
      reader_ = pd::ring_reader(ring_);
    }
    peer_ = pd::ring_writer(ring_);
  }

  /// Closes both ends, then unpoisons the rings before they are unmapped.
  ~harness() {
    receiver_.close();
    sender_.close();
    if (pipe_mode_) {
      for (int end : {0, 1})
        ASAN_UNPOISON_MEMORY_REGION(mapping_->ring_written_by(end)->data() + capacity_,
                                    full_capacity_ - capacity_);
    }
  }

  harness(const harness&) = delete;
  harness& operator=(const harness&) = delete;

  /// Runs the operations of `in`, then the final message and the drain.
  void run(input& in) {
    while (!in.empty()) {
      std::uint8_t b = in.byte();
      auto code = static_cast<op>((b & 0x0f) % op_count);
      unsigned a = b >> 4;
      switch (code) {
        case op_raw: {
          auto [p, n] = in.bytes(a * 256 + in.byte());
          send(p, n);
          break;
        }
        case op_message: {
          auto [p, n] = in.bytes(a * 256 + in.byte());
          send_message(p, n);
          break;
        }
        case op_good:
          send_good(static_cast<kind>(a % kind_count), 4 * std::size_t{in.byte()});
          break;
        case op_feed:
          feed(a == 0 ? max_stream : std::size_t{1} << (a - 1));
          break;
        case op_recv: {
          auto d = static_cast<decoder>(a & 7);
          own_params params;
          if (d == own_stream) {
            std::uint8_t p = in.byte();
            params.step = std::size_t{1} << (p & 0x0f);
            params.stop_rule = (p >> 4) & 3;
            params.stop_after = in.byte();
          }
          recv(d, (a & 8) != 0, params);
          break;
        }
        case op_close:
          close_peer();
          break;
        case op_poll:
          poll();
          break;
      }
    }
    finish();
  }

 private:
  /// How the harness's own consumer reads: `step` bytes at a time; after
  /// `stop_after` bytes, if the rest is in the ring, `stop_rule` 1 returns,
  /// 2 throws `consumer_stopped`, 3 reads past the end (decode_error).
  struct own_params {
    std::size_t step = 4096;
    unsigned stop_rule = 0;
    std::size_t stop_after = 0;
  };

  /// The harness's own pipe consumer: takes a message whole in place, or
  /// streamed through `connection_source`, writing the peer's next bytes into the
  /// ring between its reads (so messages larger than the ring arrive whole).
  struct own_consumer {
    /// A consumer for one receive of `h`.
    own_consumer(harness& owner, own_params p) : h(owner), params(p) {}

    harness& h;
    own_params params;
    std::size_t size = 0;
    std::vector<std::byte> got;
    bool streamed = false;
    bool stopped = false;

    /// A message that lies whole in the ring.
    void operator()(const std::byte* data, std::size_t n) {
      require(n == h.header(), "in place: the size is not the header's");
      require(h.frame_in_ring(n), "in place: a message whose bytes are not all in the ring");
      got.assign(data, data + n);
    }

    /// Any other message, read in steps.
    void stream(std::size_t n, pd::connection_source& source) {
      streamed = true;
      size = n;
      require(n == h.header(), "stream: the size is not the header's");
      while (source.remaining() > 0) {
        const std::size_t left = source.remaining();
        require(left == n - got.size(), "stream: remaining() disagrees with the bytes read");
        if (params.stop_rule != 0 && got.size() >= params.stop_after && h.frame_in_ring(n)) {
          // The rest is in the ring: what the library skips needs no wait.
          stopped = true;
          if (params.stop_rule == 1) return;
          if (params.stop_rule == 2) throw consumer_stopped{};
          std::vector<std::byte> sink(left + 1);
          source.read(sink.data(), sink.size());
          fail("connection_source::read read past the end of a message");
        }
        h.feed(max_stream);  // the peer writes while the receiver reads
        const std::size_t position = h.at_ + 8 + got.size();
        std::size_t k = std::min({params.step, left, h.fed_ - position});
        if (k == 0) {
          // The peer has nothing more to write: it goes away mid-message,
          // and the read must throw channel_closed rather than wait.
          require(h.fed_ == h.stream_.size(),
                  "stream: the peer finds no room in a ring the receiver emptied");
          h.close_peer();
          k = std::min(params.step, left);
        }
        const std::size_t old = got.size();
        got.resize(old + k);
        source.read(got.data() + old, k);
      }
    }
  };

  // --- the peer ------------------------------------------------------------

  /// Appends `n` bytes to the peer's stream, unless it closed or the stream is full.
  void send(const void* data, std::size_t n) {
    if (closed_ || stream_.size() + n > max_stream) return;
    auto* p = static_cast<const std::byte*>(data);
    stream_.insert(stream_.end(), p, p + n);
  }

  /// Appends a message: a u64 header of `n`, then the `n` bytes.
  void send_message(const void* data, std::size_t n) {
    if (closed_ || stream_.size() + 8 + n > max_stream) return;
    std::uint64_t header = n;
    send(&header, sizeof header);
    send(data, n);
  }

  /// Appends the valid message of kind `k` with `n` elements, and notes where it starts.
  void send_good(kind k, std::size_t n) {
    std::vector<std::byte> body = good_encoding(k, n);
    if (closed_ || stream_.size() + 8 + body.size() > max_stream) return;
    good_[stream_.size()] = {k, n};
    send_message(body.data(), body.size());
  }

  /// Writes up to `most` pending bytes into the ring, as many as fit, and publishes them.
  void feed(std::size_t most) {
    std::size_t n = std::min({most, stream_.size() - fed_, peer_.free_space()});
    if (n == 0) return;
    peer_.put(stream_.data() + fed_, n);
    peer_.publish();
    fed_ += n;
  }

  /// The peer closes its end; what it had not written is lost.
  void close_peer() {
    if (closed_) return;
    closed_ = true;
    stream_.resize(fed_);
    if (pipe_mode_) {
      // The sender becomes the user of end 0 (as a process that sent would
      // be), so that closing it closes it for the receiver.
      bool begun = sender_.poll(false, std::nullopt);
      require(!begun, "poll on the sending end saw a message");
      sender_.close();
    }
  }

  // --- the model -----------------------------------------------------------

  /// True when the next message's header is in the ring.
  bool header_fed() const noexcept { return fed_ - at_ >= 8; }

  /// The next message's header (it must be in the stream).
  std::uint64_t header() const {
    require(stream_.size() - at_ >= 8, "header: not in the stream");
    std::uint64_t h;
    std::memcpy(&h, stream_.data() + at_, sizeof h);
    return h;
  }

  /// True when all `size` bytes of the next message are in the ring.
  bool frame_in_ring(std::uint64_t size) const noexcept {
    return header_fed() && size <= fed_ - at_ - 8;
  }

  /// True when all `size` bytes of the next message are in the stream.
  bool frame_in_stream(std::uint64_t size) const noexcept {
    return stream_.size() - at_ >= 8 && size <= stream_.size() - at_ - 8;
  }

  /// The next message's body (it must be whole in the stream).
  const std::byte* body() const noexcept { return stream_.data() + at_ + 8; }

  /// The receiver is done with the next message: moves past it and checks
  /// that the ring's read counter stands there, or `lag` bytes before it.
  void advance(std::uint64_t size, std::size_t lag = 0) {
    if (sentinel_ && at_ == *sentinel_ && !sentinel_seen_)
      fail("the final message was not checked");
    at_ += 8 + static_cast<std::size_t>(size);
    head_lag_ = lag;
    require(released(), "the ring's read counter is not at the end of the message");
  }

  /// True when the ring's shared read counter is where the model says.
  bool released() const noexcept {
    return ring_->head.load(std::memory_order_acquire) == start_ + at_ - head_lag_;
  }

  /// If the next message is a valid one and `T` its type, checks `value`.
  template <class T>
  void check_good(const T& value) {
    auto it = good_.find(at_);
    if (it == good_.end()) return;
    with_kind(it->second.first, [&](auto t) {
      using K = typename decltype(t)::value;
      if constexpr (std::is_same_v<K, T>) {
        if (!(value == good_value<K>(it->second.second)))
          fail("a valid message was received changed");
        if (sentinel_ && at_ == *sentinel_) sentinel_seen_ = true;
      }
    });
  }

  /// If the next message is a valid one, checks that `bytes` are its encoding.
  void check_good_bytes(const std::vector<std::byte>& bytes) {
    auto it = good_.find(at_);
    if (it == good_.end()) return;
    if (bytes != good_encoding(it->second.first, it->second.second))
      fail("a valid message was received changed");
    if (sentinel_ && at_ == *sentinel_) sentinel_seen_ = true;
  }

  // --- the receiver --------------------------------------------------------

  /// One receive with decoder `d`.
  void recv(decoder d, bool block, own_params params) {
    if (!pipe_mode_) return recv_ring();
    if (d != own_stream && header_fed() && !broken_ && !closed_) {
      // A real receiver waits for the rest of a message that has begun; let
      // the peer write it now if it fits. A message that cannot lie whole in
      // the ring goes to the harness's consumer, which can let it in piece by piece.
      std::uint64_t size = header();
      if (!frame_in_ring(size)) feed(max_stream);
      if (!frame_in_ring(size)) d = own_stream;
    }
    if (is_streamed(d) && header_fed() && !broken_ && !strict() && header() > max_stream) {
      // Tolerated library issue: read_contiguous reserves the element count
      // that a header claims before any element arrives, so a lying header
      // makes it allocate gigabytes or throw std::length_error / bad_alloc.
      // A message larger than any stream here goes to the harness's consumer.
      d = own_stream;
    }
    if (d == own_stream) return recv_own(block, params);
    with_decoder(d, [&](auto t, auto streamed) {
      recv_library<typename decltype(t)::value, decltype(streamed)::value>(block);
    });
  }

  /// What a pipe receive did.
  enum class outcome { none, value, decode_error, closed, stopped };

  /// Calls `connection_core::receive` with `consume`; sorts out what happened.
  template <class Consume>
  outcome receive(bool block, Consume& consume) {
    std::optional<pd::steady::time_point> deadline;
    if (block) deadline = pd::steady::now();  // passed by the time it is checked
    try {
      return receiver_.receive("recv", block, deadline, consume) ? outcome::value : outcome::none;
    } catch (const procpool::decode_error&) {
      return outcome::decode_error;
    } catch (const procpool::channel_closed&) {
      return outcome::closed;
    } catch (const consumer_stopped&) {
      return outcome::stopped;
    } catch (const std::exception& e) {
      fail("receive threw something else than decode_error or channel_closed:", e.what());
    }
  }

  /// Checks an outcome that takes no message: nothing begun, or the peer gone.
  /// True when it was one of those (the model is then up to date).
  bool settled_without_message(outcome got) {
    if (broken_) {
      require(got == outcome::closed, "a pipe cut off mid-message did not throw channel_closed");
      return true;
    }
    if (!header_fed()) {
      if (closed_)
        require(got == outcome::closed, "no message and the peer gone, but no channel_closed");
      else
        require(got == outcome::none, "no message has begun, but receive did not return false");
      require(released(), "a receive that took no message moved the ring's read counter");
      return true;
    }
    require(got != outcome::none, "a message has begun, but receive returned false");
    return false;
  }

  /// A receive with the library's consumer for `T` (decode_streamed when `Streamed`).
  template <class T, bool Streamed>
  void recv_library(bool block) {
    std::optional<T> out;
    outcome got;
    if constexpr (Streamed) {
      pd::decode_streamed<T> consume{{out}};
      got = receive(block, consume);
    } else {
      pd::decode_whole<T> consume{out};
      got = receive(block, consume);
    }
    if (settled_without_message(got)) return;
    const std::uint64_t size = header();
    if (!frame_in_ring(size)) {
      // Only given to a library decoder once the peer has closed its end.
      require(closed_, "harness: a library decoder was given a message that cannot arrive");
      if (got == outcome::decode_error) {
        bool early = false;  // read_contiguous checks the count before it reads on
        if constexpr (Streamed) early = streamed_rejects<T>(size);
        require(early, "decode_error for a message cut off before it could be decoded");
      } else {
        require(got == outcome::closed, "a message cut off by its peer did not throw");
      }
      broken_ = true;
      return;
    }
    // The message is whole: it must decode exactly as the reference decodes it.
    std::optional<T> expected;
    try {
      expected.emplace(procpool::decode<T>(body(), static_cast<std::size_t>(size)));
    } catch (const procpool::decode_error&) {
    }
    if (expected) {
      require(got == outcome::value, "a message that decodes was not received");
      require(out.has_value(), "receive returned true but gave no value");
      if (!(*out == *expected)) fail("a message was received as another value");
      check_good(*out);
    } else {
      require(got == outcome::decode_error, "a message that does not decode gave no decode_error");
      require(good_.count(at_) == 0 || !decodes_as_kind<T>(), "a valid message did not decode");
    }
    // Every byte read is released, the header of an empty message that
    // straddles the ring's end too (taken without stream(), it is read by
    // `get`, not by `read_exact`): the shared read counter stands at the
    // message's end.
    advance(size);
  }

  /// True when the next message is a valid one of type `T`.
  template <class T>
  bool decodes_as_kind() const {
    bool same = false;
    with_kind(good_.at(at_).first,
              [&](auto t) { same = std::is_same_v<typename decltype(t)::value, T>; });
    return same;
  }

  /// True when `read_contiguous<T>` rejects a message of `size` bytes from
  /// what is in the ring, before it needs bytes that are not.
  template <class T>
  bool streamed_rejects(std::uint64_t size) const {
    using element = typename T::value_type;
    if (size < 8) return true;
    if (fed_ - at_ - 8 < 8) return false;  // it waits for the count first
    std::uint64_t count;
    std::memcpy(&count, body(), sizeof count);
    const std::uint64_t bytes = size - 8;
    return bytes % sizeof(element) != 0 || count != bytes / sizeof(element);
  }

  /// A receive with the harness's own consumer.
  void recv_own(bool block, own_params params) {
    own_consumer consume(*this, params);
    outcome got = receive(block, consume);
    if (settled_without_message(got)) return;
    const std::uint64_t size = header();
    switch (got) {
      case outcome::value:
        if (consume.stopped) {
          require(params.stop_rule == 1, "stopped, yet not by returning");
        } else {
          require(frame_in_stream(size) && consume.got.size() == size &&
                      std::equal(consume.got.begin(), consume.got.end(), body()),
                  "a message was received with other bytes than were sent");
          check_good_bytes(consume.got);
        }
        break;
      case outcome::stopped:
        require(consume.stopped && params.stop_rule == 2, "consumer_stopped from nowhere");
        break;
      case outcome::decode_error:
        require(consume.stopped && params.stop_rule == 3,
                "decode_error, but the consumer read no further than the end");
        break;
      case outcome::closed:
        require(closed_ && !frame_in_ring(size),
                "channel_closed while the whole message was in the ring");
        broken_ = true;
        return;
      case outcome::none:
        fail("unreachable");
    }
    advance(size);
  }

  /// The peer writes more when `read_message` waits, until it has nothing left.
  bool refill() {
    if (fed_ == stream_.size()) return false;
    const std::size_t before = fed_;
    feed(max_stream);
    require(fed_ > before, "read_message: the peer finds no room in a ring the reader emptied");
    return true;
  }

  /// One `ring_reader::read_message`, whose wait for a header has a passed deadline.
  void recv_ring() {
    if (broken_) return;  // read_message gave up mid-message: the ring is discarded
    const pd::wait_policy no_spin{std::chrono::nanoseconds(0), std::chrono::nanoseconds(0)};
    const bool begun = header_fed();
    auto st = reader_.read_message(
        buffer_, pd::steady::now(), [this] { return refill(); }, no_spin);
    switch (st) {
      case pd::wait_status::timeout:
        require(!begun, "read_message timed out on a message that had begun");
        require(released(), "read_message timed out but moved the ring's read counter");
        return;
      case pd::wait_status::aborted:
        require(begun && !frame_in_stream(header()),
                "read_message gave up on a message the peer sent whole");
        broken_ = true;
        return;
      case pd::wait_status::ready: {
        require(begun, "read_message read a message that had not begun");
        const std::uint64_t size = header();
        require(frame_in_stream(size) && buffer_.size() == size &&
                    std::equal(buffer_.begin(), buffer_.end(), body()),
                "read_message gave other bytes than were sent");
        check_good_bytes(buffer_);
        advance(size);
        return;
      }
    }
  }

  /// Checks what the receiver says about the next message without taking it.
  void poll() {
    if (!pipe_mode_) {
      if (broken_) return;
      auto size = reader_.next_message_size();
      require(size.has_value() == header_fed(), "next_message_size disagrees with the ring");
      if (size) require(*size == header(), "next_message_size is not the header");
      return;
    }
    try {
      bool ready = receiver_.poll(false, std::nullopt);
      require(!broken_, "poll on a pipe cut off mid-message did not throw");
      require(ready == (header_fed() || closed_), "poll disagrees with the ring");
    } catch (const procpool::channel_closed&) {
      require(broken_, "poll threw channel_closed on a usable pipe");
    }
  }

  /// The peer sends a last valid message; the receiver takes every message
  /// the stream holds whole, and must get the last one if it starts on a
  /// frame boundary.
  void finish() {
    if (!closed_ && !broken_) {
      sentinel_ = stream_.size();
      send_good(kind_string, 24);
      if (stream_.size() == *sentinel_) sentinel_.reset();  // the stream was full
    }
    while (!broken_) {
      feed(max_stream);
      if (!header_fed()) break;  // what is left is less than a header
      const std::uint64_t size = header();
      if (!frame_in_stream(size)) break;  // the rest will never come
      auto it = good_.find(at_);
      if (pipe_mode_ && it != good_.end() && frame_in_ring(size)) {
        with_decoder(decoder_for(it->second.first), [&](auto t, auto streamed) {
          recv_library<typename decltype(t)::value, decltype(streamed)::value>(false);
        });
      } else if (pipe_mode_) {
        own_params params;
        params.step = capacity_ / 2;
        recv_own(false, params);
      } else {
        recv_ring();
      }
    }
    if (sentinel_ && on_boundary(*sentinel_))
      require(sentinel_seen_, "a valid message after the fuzzed bytes was not received intact");
  }

  /// True when the framing of the stream from its first byte has a message start at `offset`.
  bool on_boundary(std::size_t offset) const {
    std::size_t at = 0;
    while (at < offset && stream_.size() - at >= 8) {
      std::uint64_t size;
      std::memcpy(&size, stream_.data() + at, sizeof size);
      if (size > stream_.size() - at - 8) return false;
      at += 8 + static_cast<std::size_t>(size);
    }
    return at == offset;
  }

  /// Frees the heap ring (aligned as allocated).
  struct aligned_delete {
    void operator()(std::byte* p) const noexcept {
      ::operator delete (p, std::align_val_t{pd::cache_line});
    }
  };

  std::size_t capacity_;
  bool pipe_mode_;
  std::uint64_t start_;
  std::size_t full_capacity_ = 0;                      // the mapping's ring size (pipe mode)
  std::shared_ptr<pd::pipe_mapping> mapping_;          // pipe mode
  std::unique_ptr<std::byte, aligned_delete> memory_;  // ring mode
  pd::ring_control* ring_ = nullptr;                   // the ring the peer writes
  pd::connection_core sender_;                         // end 0, only ever closed
  pd::connection_core receiver_;                       // end 1 (pipe mode)
  pd::ring_reader reader_;                             // ring mode
  pd::ring_writer peer_;
  std::vector<std::byte> buffer_;  // read_message's output, reused

  std::vector<std::byte> stream_;  // every byte the peer sent, in order
  std::size_t fed_ = 0;            // bytes of stream_ written into the ring
  std::size_t at_ = 0;             // where the next message starts in stream_
  bool closed_ = false;            // the peer closed its end
  bool broken_ = false;            // cut off mid-message (pipe) or given up (ring)
  std::map<std::size_t, std::pair<kind, std::size_t>> good_;  // valid messages: kind, n
  std::size_t head_lag_ = 0;             // bytes the ring's read counter may lag behind at_
  std::optional<std::size_t> sentinel_;  // the final valid message
  bool sentinel_seen_ = false;
};

/// The body of LLVMFuzzerTestOneInput.
inline int one_input(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  input in(data, size);
  std::uint8_t setup = in.byte();
  const std::size_t capacity = std::size_t{64} << ((setup & 7) % 7);
  const bool pipe_mode = (setup & 8) == 0;
  const std::uint64_t start = std::uint64_t{in.byte()} * capacity / 256;
  harness h(capacity, pipe_mode, start);
  h.run(in);
  return 0;
}

/// Builds inputs for the seed corpus, operation by operation.
class builder {
 public:
  /// Setup: capacity 64 << `capacity_log`, the receiver, the start byte.
  builder(unsigned capacity_log, bool ring_mode, std::uint8_t start) {
    bytes_.push_back(static_cast<std::uint8_t>(capacity_log | (ring_mode ? 8 : 0)));
    bytes_.push_back(start);
  }
  /// `raw`: `data` joins the stream as it is.
  builder& raw(const std::vector<std::uint8_t>& data) { return with_length(op_raw, data); }
  /// `message`: a header, then `data`.
  builder& message(const std::vector<std::uint8_t>& data) { return with_length(op_message, data); }
  /// `good`: the valid message of kind `k` with 4*`n` elements.
  builder& good(kind k, std::uint8_t n) { return code(op_good, k).put(n); }
  /// `feed`: up to 2^(a-1) bytes, or all that fit for a = 0.
  builder& feed(unsigned a = 0) { return code(op_feed, a); }
  /// `recv` with a library decoder.
  builder& recv(decoder d, bool block = false) { return code(op_recv, d | (block ? 8u : 0u)); }
  /// `recv` with the harness's own consumer.
  builder& recv_own(unsigned step_log, unsigned stop_rule, std::uint8_t stop_after) {
    return code(op_recv, own_stream)
        .put(static_cast<std::uint8_t>(step_log | stop_rule << 4))
        .put(stop_after);
  }
  /// `close`.
  builder& close() { return code(op_close, 0); }
  /// `poll`.
  builder& poll() { return code(op_poll, 0); }
  /// The input built.
  std::vector<std::byte> bytes() const {
    std::vector<std::byte> out(bytes_.size());
    std::memcpy(out.data(), bytes_.data(), bytes_.size());
    return out;
  }

 private:
  builder& put(std::uint8_t b) {
    bytes_.push_back(b);
    return *this;
  }
  builder& code(op o, unsigned a) { return put(static_cast<std::uint8_t>(o | a << 4)); }
  builder& with_length(op o, const std::vector<std::uint8_t>& data) {
    code(o, static_cast<unsigned>(data.size() >> 8)).put(static_cast<std::uint8_t>(data.size()));
    bytes_.insert(bytes_.end(), data.begin(), data.end());
    return *this;
  }
  std::vector<std::uint8_t> bytes_;
};

/// The little-endian bytes of `v` followed by `tail`.
inline std::vector<std::uint8_t> u64_then(std::uint64_t v, std::vector<std::uint8_t> tail = {}) {
  std::vector<std::uint8_t> out(8);
  std::memcpy(out.data(), &v, 8);
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

/// The seed corpus in tests/fuzz/corpus/frame: file name and content.
inline std::vector<std::pair<std::string, std::vector<std::byte>>> seeds() {
  std::vector<std::pair<std::string, std::vector<std::byte>>> out;
  auto add = [&](std::string name, const builder& b) {
    out.emplace_back(std::move(name), b.bytes());
  };

  // Small messages of every kind through a 64-byte ring, wrapping at once.
  add("pipe-kinds", builder(0, false, 200)
                        .good(kind_string, 2)
                        .feed()
                        .recv(streamed_string)
                        .good(kind_number, 0)
                        .feed()
                        .recv(whole_u64)
                        .good(kind_u32, 1)
                        .feed()
                        .recv(streamed_u32)
                        .good(kind_u64, 1)
                        .feed()
                        .recv(streamed_u64)
                        .good(kind_strings, 3)
                        .feed()
                        .recv(whole_strings)
                        .good(kind_string, 3)
                        .feed()
                        .recv(whole_string)
                        .good(kind_u32, 2)
                        .feed()
                        .recv(whole_u32));
  // A vector whose count lies about its bytes, and a string too short for
  // its length, each followed by a valid message.
  add("pipe-bad-then-good", builder(1, false, 100)
                                .message(u64_then(5, {1, 0, 0, 0, 2, 0, 0, 0}))
                                .good(kind_u32, 2)
                                .feed()
                                .recv(streamed_u32)
                                .recv(streamed_u32)
                                .message(u64_then(40, {'a', 'b', 'c'}))
                                .good(kind_string, 1)
                                .feed()
                                .recv(whole_string)
                                .recv(whole_string));
  // Messages larger than the ring, streamed through the harness's consumer.
  add("pipe-larger-than-ring", builder(0, false, 0)
                                   .good(kind_u64, 20)
                                   .feed()
                                   .recv_own(4, 0, 0)
                                   .good(kind_string, 40)
                                   .feed()
                                   .recv(streamed_string)
                                   .good(kind_strings, 30)
                                   .recv_own(12, 0, 0));
  // The consumer stops early: returns, throws, reads past the end.
  add("pipe-consumer-stops", builder(0, false, 7)
                                 .good(kind_string, 20)
                                 .feed()
                                 .recv_own(3, 1, 5)
                                 .good(kind_u32, 8)
                                 .feed()
                                 .recv_own(2, 2, 0)
                                 .good(kind_u64, 4)
                                 .feed()
                                 .recv_own(0, 3, 9)
                                 .good(kind_number, 0)
                                 .feed()
                                 .recv(whole_u64));
  // A header that promises more than comes, then the peer closes.
  add("pipe-cut-off", builder(0, false, 32)
                          .good(kind_string, 1)
                          .raw(u64_then(1000, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}))
                          .feed()
                          .close()
                          .recv(whole_string)
                          .poll()
                          .recv(whole_string)
                          .recv(streamed_string)
                          .poll());
  // A header that arrives a byte at a time; polls and receives in between.
  add("pipe-partial-header", builder(2, false, 250)
                                 .good(kind_u32, 3)
                                 .feed(1)
                                 .poll()
                                 .recv(streamed_u32)
                                 .feed(3)
                                 .recv(streamed_u32, true)
                                 .poll()
                                 .feed(4)
                                 .poll()
                                 .recv(streamed_u32));
  // A 4 KiB ring, the size a pipe really has.
  add("pipe-4k", builder(6, false, 255)
                     .good(kind_string, 100)
                     .good(kind_u64, 60)
                     .good(kind_strings, 200)
                     .feed()
                     .recv(streamed_string)
                     .recv(streamed_u64)
                     .recv(whole_strings));
  // ring_reader::read_message: messages larger than the ring, and one cut short.
  add("ring-large", builder(0, true, 60)
                        .good(kind_string, 50)
                        .feed()
                        .recv(whole_string)
                        .message({1, 2, 3})
                        .good(kind_u64, 10)
                        .feed()
                        .poll()
                        .recv(whole_string)
                        .recv(whole_string)
                        .recv(whole_string));
  add("ring-cut-off", builder(1, true, 0)
                          .good(kind_u32, 2)
                          .raw(u64_then(500, {1, 2, 3}))
                          .feed()
                          .recv(whole_string)
                          .poll()
                          .recv(whole_string)
                          .close()
                          .recv(whole_string));
  return out;
}

}  // namespace frame_fuzz
