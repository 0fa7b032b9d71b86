/// @file
/// `pipe<T>()` and `connection<T>`: a duplex channel between two processes,
/// after Python's `multiprocessing.Pipe()`.
///
/// ```cpp
/// auto [parent_end, child_end] = procpool::pipe<std::string>();
/// procpool::process child([&child_end = child_end] { child_end.send("hello"); });
/// std::string greeting = parent_end.recv();
/// ```
///
/// Make the pipe before forking. The bytes travel through shared memory (two
/// single-producer single-consumer rings, one per direction), not through
/// the kernel; a message of any size can be sent, a message larger than the
/// buffer is streamed through it. `pipe<T>(procpool::one_way)` makes a pipe
/// that carries values one way only (Python's `Pipe(duplex=False)`).
///
/// ## Who holds an end, who uses it
///
/// As with a descriptor, a process *holds* an end from the moment it makes
/// the pipe, or is forked by a process that holds it, until it calls
/// `close()` or ends. Any process that holds an end may use it (`send`,
/// `recv`, `poll`), but only one at a time, and in it one thread at a time:
/// the two ends may be used at once (by two threads of one process, or by two
/// processes), but one end never by two users at once. Several processes may
/// take turns on one end when something orders their turns — a `mutex` they
/// all lock around each call, as in Python's idiom of many writers sharing
/// one connection under a lock — and nothing is lost or repeated between
/// turns. Two processes using one end at the same moment corrupt its stream.
///
/// ## When the other end goes away
///
/// `close()` (or the destructor) releases only this process's hold, like
/// closing an inherited descriptor: a child that closes the end it does not
/// use, or a parent that closes the child's end after forking, closes nothing
/// for anyone else. The other end is *gone* when
///
/// - no process holds it any more: each holder closed it or ended in any way
///   (`exit`, `_exit`, a signal, even while it waits as a zombie to be reaped);
/// - or the only process left holding it is the one asking, which never used
///   it while another process did (the parent that kept a copy of the child's
///   end it never uses: the child's death is still noticed);
/// - or a holder called `shutdown()`, which closes it for every process.
///
/// Messages sent before are still delivered; after them, `recv` throws
/// `channel_closed` naming the end and the process, within about 10 ms of the
/// last holder's death, and never blocks forever. `send` throws
/// `channel_closed` as well, as soon as the other end was closed, and within
/// about 10 ms of the death (a message sent in between is lost, as any
/// message the peer never read). No signal is raised (no SIGPIPE).
///
/// Every process forked while an end is held holds it too, as it would
/// inherit a descriptor: pool workers and `process` children forked after
/// the pipe was made included. Close the ends a child does not need, in the
/// child, or make the pipe after forking the processes that do not use it.
/// An end tracks up to 128 holders at once; beyond that it is seen gone only
/// by `shutdown()`.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "codec.hpp"
#include "detail/calls/call_checks.hpp"
#include "detail/transport/connection_core.hpp"
#include "errors.hpp"

namespace procpool {

/// Default size, in bytes, of the buffer of each direction of a pipe.
inline constexpr std::size_t default_pipe_buffer = 256 * 1024;

template <class T>
class connection;

/// Tag type of `one_way`.
struct one_way_t {
  explicit one_way_t() = default;
};
/// Picks the one-way `pipe<T>(procpool::one_way)`, Python's `Pipe(duplex=False)`.
inline constexpr one_way_t one_way{};

/// Makes a duplex pipe carrying values of type `T` and returns its two ends.
///
/// Each direction has a buffer of `buffer_bytes` (rounded up to a power of two,
/// at least 4 KiB); larger messages stream through it. Call before forking:
/// the ends work in every process forked afterwards.
///
/// **Throws:** `procpool::error` for a buffer beyond 1 GiB; `std::system_error`
/// when the shared memory cannot be mapped.
/// **Example:** `auto [a, b] = procpool::pipe<int>();`
template <class T>
[[nodiscard]] std::pair<connection<T>, connection<T>> pipe(
    std::size_t buffer_bytes = default_pipe_buffer);

/// Makes a one-way pipe carrying values of type `T`, as Python's
/// `Pipe(duplex=False)`: the first end only receives, the second only sends.
///
/// Its buffer is of `buffer_bytes` (as for `pipe<T>(buffer_bytes)`). Calling
/// `send` on the first end, or `recv` or `poll` on the second, throws
/// `procpool::error`.
///
/// **Throws:** as `pipe<T>(buffer_bytes)`.
/// **Example:** `auto [reader, writer] = procpool::pipe<int>(procpool::one_way);`
template <class T>
[[nodiscard]] std::pair<connection<T>, connection<T>> pipe(
    one_way_t, std::size_t buffer_bytes = default_pipe_buffer);

/// One end of a pipe made by `pipe<T>()`: sends and receives values of type `T`.
///
/// Move-only. Destroying it closes it (see `close`).
///
/// **Thread safety:** one thread uses an end at a time; the two ends of a pipe
/// may be used by two threads at once.
/// **Fork safety:** made before a fork, it works in the child, which holds
/// the end as well; processes take turns on an end, one at a time (see the
/// file comment).
template <class T>
class connection {
  // The check's own sentences say what is wrong; `|| true` keeps a third,
  // bare "static assertion failed" out of the user's build log.
  static_assert(detail::check_sendable<detail::sent_as::connection_value, T>() || true);

 public:
  /// The type of the values carried.
  using value_type = T;

  /// An empty connection, as a moved-from one: every call but `close()` throws `channel_closed`.
  connection() noexcept = default;
  /// Takes over `other`'s end; `other` is left closed.
  connection(connection&& other) noexcept = default;
  /// Closes this end (see `close`), then takes over `other`'s.
  connection& operator=(connection&& other) noexcept = default;
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;
  /// Closes the connection (see `close`).
  ~connection() = default;

  /// Sends `value` to the other end. Returns once the message is in the
  /// buffer; waits for room while the buffer is full (a message larger than
  /// the buffer streams through it as the other end reads).
  ///
  /// **Throws:** `channel_closed` when this end is closed, or the other end
  /// is gone (see the file comment); `procpool::error` on the receiving end
  /// of a one-way pipe; `channel_corrupted` when the pipe's shared memory was
  /// overwritten; whatever encoding `T` throws.
  void send(const T& value);

  /// Receives the next value, waiting as long as needed.
  ///
  /// **Throws:** `channel_closed` when this end is closed, or when no message
  /// is left and the other end is gone (see the file comment);
  /// `decode_error` for bytes that do not decode as a `T` (the message is
  /// dropped, the connection stays usable); `procpool::error` on the sending
  /// end of a one-way pipe; `channel_corrupted` when the pipe's shared memory
  /// was overwritten.
  [[nodiscard]] T recv();

  /// Receives the next value if one has begun to arrive, else returns empty
  /// at once. (Once a message has begun, it waits for the rest of it.)
  ///
  /// **Throws:** as `recv`.
  [[nodiscard]] std::optional<T> try_recv();

  /// Receives the next value if one begins to arrive within `timeout`, else
  /// returns empty.
  ///
  /// **Throws:** as `recv`.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<T> recv_for(const std::chrono::duration<Rep, Period>& timeout);

  /// Receives the next value if one begins to arrive by `deadline`, else returns empty.
  ///
  /// **Throws:** as `recv`.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<T> recv_until(
      const std::chrono::time_point<Clock, Duration>& deadline);

  /// True when `recv()` would not block now: a message has begun to arrive,
  /// or the other end is gone (`recv` then throws). Like Python's `poll()`.
  ///
  /// **Throws:** `channel_closed` when this end is closed; `procpool::error`
  /// on the sending end of a one-way pipe.
  [[nodiscard]] bool poll();

  /// Waits up to `timeout` for `poll()` to become true and returns it.
  ///
  /// **Throws:** as `poll()`.
  template <class Rep, class Period>
  [[nodiscard]] bool poll(const std::chrono::duration<Rep, Period>& timeout);

  /// Releases this process's hold on the end, like closing a descriptor.
  /// Once no process holds it any more, the other end sees it closed: its
  /// `recv` delivers what was sent and then throws `channel_closed`, its
  /// `send` throws. While another process still holds the end (a child that
  /// inherited it, say), nothing changes for the other end. Closing twice,
  /// or closing a moved-from connection, does nothing.
  void close() noexcept { end_.close(); }

  /// Closes this end for every process that holds it, then releases this
  /// process's hold: the other end sees it closed at once, and any process
  /// still holding it gets `channel_closed` from its next call.
  void shutdown() noexcept { end_.shutdown(); }

  /// True when this object holds no end: closed, moved from or default-constructed.
  [[nodiscard]] bool closed() const noexcept { return end_.closed(); }

  /// False on the sending end of a one-way pipe (and on a closed connection).
  [[nodiscard]] bool readable() const noexcept { return !closed() && can_recv_; }
  /// False on the receiving end of a one-way pipe (and on a closed connection).
  [[nodiscard]] bool writable() const noexcept { return !closed() && can_send_; }

  /// Sets how long a waiting `send`, `recv` or `poll` spins before it sleeps
  /// (2 µs by default). Zero sleeps at once and uses no CPU while waiting. A
  /// longer spin cuts the latency of a round trip from a few microseconds to
  /// a fraction of one, when each process has a core to itself; on a busy
  /// machine spinning only takes time from the process waited for.
  void set_spin(std::chrono::nanoseconds spin) noexcept { end_.policy.spin = spin; }
  /// How long a waiting call spins before it sleeps.
  [[nodiscard]] std::chrono::nanoseconds spin() const noexcept { return end_.policy.spin; }

 private:
  friend std::pair<connection<T>, connection<T>> pipe<T>(std::size_t);
  friend std::pair<connection<T>, connection<T>> pipe<T>(one_way_t, std::size_t);
  connection(std::shared_ptr<detail::pipe_mapping> mapping, int end, bool can_send,
             bool can_recv) noexcept
      : end_(std::move(mapping), end), can_send_(can_send), can_recv_(can_recv) {}
  std::optional<T> receive(const char* op, bool block,
                           std::optional<std::chrono::steady_clock::time_point> deadline);
  void require(bool allowed, const char* op) const;

  detail::connection_core end_;
  writer encoded_;  // reused: once grown, sending allocates nothing
  bool can_send_ = true;
  bool can_recv_ = true;
};

// ---------------------------------------------------------------------------

template <class T>
std::pair<connection<T>, connection<T>> pipe(std::size_t buffer_bytes) {
  auto mapping = std::make_shared<detail::pipe_mapping>(buffer_bytes);
  return {connection<T>(mapping, 0, true, true), connection<T>(mapping, 1, true, true)};
}

template <class T>
std::pair<connection<T>, connection<T>> pipe(one_way_t, std::size_t buffer_bytes) {
  auto mapping = std::make_shared<detail::pipe_mapping>(buffer_bytes);
  // End 1 writes the ring that end 0 reads; the other ring stays unused.
  return {connection<T>(mapping, 0, false, true), connection<T>(mapping, 1, true, false)};
}

template <class T>
void connection<T>::require(bool allowed, const char* op) const {
  end_.require_open(op);
  if (!allowed)
    throw error(fmt::format("{} on the {} end of a one-way pipe, which can only {}", op,
                            can_send_ ? "sending" : "receiving", can_send_ ? "send" : "receive"));
}

template <class T>
void connection<T>::send(const T& value) {
  require(can_send_, "send");
  if constexpr (detail::contiguous_payload<T>::value) {
    // The codec's encoding, written straight from the container's storage.
    const std::uint64_t count = value.size();
    end_.send(&count, sizeof count, value.data(), value.size() * sizeof(typename T::value_type));
  } else {
    encoded_.clear();
    encode(encoded_, value);
    end_.send(encoded_.data(), encoded_.size());
  }
}

namespace detail {

// Receives a message whole (in place in the ring, or put together in a buffer).
template <class T>
struct decode_whole {
  std::optional<T>& out;
  void operator()(const std::byte* data, std::size_t size) { out.emplace(decode<T>(data, size)); }
};

// ... or, for a contiguous payload too large to lie whole in the ring,
// streams its elements straight into the new container.
template <class T>
struct decode_streamed : decode_whole<T> {
  void stream(std::size_t size, connection_source& source) {
    this->out.emplace(read_contiguous<T>(size, source));
  }
};

}  // namespace detail

template <class T>
std::optional<T> connection<T>::receive(
    const char* op, bool block, std::optional<std::chrono::steady_clock::time_point> deadline) {
  require(can_recv_, op);
  std::optional<T> out;
  if constexpr (detail::contiguous_payload<T>::value)
    end_.receive(op, block, deadline, detail::decode_streamed<T>{{out}});
  else
    end_.receive(op, block, deadline, detail::decode_whole<T>{out});
  return out;
}

template <class T>
T connection<T>::recv() {
  return std::move(*receive("recv", true, std::nullopt));
}

template <class T>
std::optional<T> connection<T>::try_recv() {
  return receive("try_recv", false, std::nullopt);
}

template <class T>
template <class Rep, class Period>
std::optional<T> connection<T>::recv_for(const std::chrono::duration<Rep, Period>& timeout) {
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return receive("recv_for", false, std::nullopt);
  return receive("recv_for", true, detail::deadline_after(ns));
}

template <class T>
template <class Clock, class Duration>
std::optional<T> connection<T>::recv_until(
    const std::chrono::time_point<Clock, Duration>& deadline) {
  return receive("recv_until", true, detail::to_steady(deadline));
}

template <class T>
bool connection<T>::poll() {
  require(can_recv_, "poll");
  return end_.poll(false, std::nullopt);
}

template <class T>
template <class Rep, class Period>
bool connection<T>::poll(const std::chrono::duration<Rep, Period>& timeout) {
  require(can_recv_, "poll");
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return end_.poll(false, std::nullopt);
  return end_.poll(true, detail::deadline_after(ns));
}

}  // namespace procpool
