/// @file
/// `pipe<T>()` and `connection<T>`: a duplex channel between two processes,
/// after Python's `multiprocessing.Pipe()`.
///
/// ```cpp
/// auto [parent_end, child_end] = procpool::pipe<std::string>();
/// procpool::process child([&] { child_end.send("hello from " + std::to_string(getpid())); });
/// std::string greeting = parent_end.recv();
/// ```
///
/// Make the pipe before forking; afterwards each process uses one end. The
/// bytes travel through shared memory (two single-producer single-consumer
/// rings, one per direction), not through the kernel; a message of any size
/// can be sent, a message larger than the buffer is streamed through it.
///
/// ## Who uses an end
///
/// A process becomes the *user* of an end the first time it calls `send`,
/// `recv` (any variant) or `poll` on it; until then nobody uses it. One
/// process, and in it one thread, uses an end at a time: the two ends may be
/// used by two threads of one process, or by two processes. An end may pass to
/// another process (a child forked later, say) as long as the process that
/// used it before stops using it.
///
/// ## When the other end goes away
///
/// The other end is gone when its user called `close()` (or destroyed it), or
/// when its user process ended in any way (`exit`, `_exit`, a signal, even
/// while it waits as a zombie to be reaped). Messages it sent before are still
/// delivered; after them, `recv` throws `channel_closed` naming the end and
/// the process, within about 10 ms of the death, and never blocks forever.
/// `send` throws `channel_closed` as well, as soon as the peer closed its end,
/// and within about 10 ms of its death (a message sent in between is lost, as
/// any message the peer never read). No signal is raised (no SIGPIPE).
///
/// An end that no process has used yet counts as present: a process waiting
/// for a peer that dies before it ever touched its end waits for good. A child
/// that should be watched from the start can call `poll()` on its end first.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "codec.hpp"
#include "detail/channel.hpp"
#include "errors.hpp"

namespace procpool {

/// Default size, in bytes, of the buffer of each direction of a pipe.
inline constexpr std::size_t default_pipe_buffer = 256 * 1024;

template <class T>
class connection;

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

/// One end of a pipe made by `pipe<T>()`: sends and receives values of type `T`.
///
/// Move-only. Destroying it closes it (see `close`).
///
/// **Thread safety:** one thread uses an end at a time; the two ends of a pipe
/// may be used by two threads at once.
/// **Fork safety:** made before a fork, it works in the child; one process uses
/// an end at a time (see the file comment).
template <class T>
class connection {
  static_assert(is_sendable_v<T>,
                "procpool::connection<T>: T cannot be sent between processes; see codec.hpp "
                "for the types that can, and for how a type of yours opts in");

 public:
  /// The type of the values carried.
  using value_type = T;

  /// An empty connection, as a moved-from one: every call but `close()` throws `channel_closed`.
  connection() noexcept = default;
  /// Takes over an end; the moved-from connection is empty.
  connection(connection&&) noexcept = default;
  /// Takes over an end; the moved-from connection is empty.
  connection& operator=(connection&&) noexcept = default;
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;
  /// Closes the connection (see `close`).
  ~connection() = default;

  /// Sends `value` to the other end. Returns once the message is in the
  /// buffer; waits for room while the buffer is full.
  ///
  /// **Throws:** `channel_closed` when this end is closed, or the other end
  /// is closed or its process has exited; whatever encoding `T` throws.
  void send(const T& value);

  /// Receives the next value, waiting as long as needed.
  ///
  /// **Throws:** `channel_closed` when this end is closed, or when no message
  /// is left and the other end is closed or its process has exited;
  /// `decode_error` for bytes that do not decode as a `T` (the message is
  /// dropped, the connection stays usable).
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
  [[nodiscard]] std::optional<T> recv_until(std::chrono::steady_clock::time_point deadline);

  /// True when `recv()` would not block now: a message has begun to arrive,
  /// or the other end is gone (`recv` then throws). Like Python's `poll()`.
  ///
  /// **Throws:** `channel_closed` when this end is closed.
  [[nodiscard]] bool poll();

  /// Waits up to `timeout` for `poll()` to become true and returns it.
  ///
  /// **Throws:** `channel_closed` when this end is closed.
  template <class Rep, class Period>
  [[nodiscard]] bool poll(const std::chrono::duration<Rep, Period>& timeout);

  /// Closes this end. In the process that uses the end (see the file comment),
  /// the other end then sees it closed: its `recv` delivers what was sent and
  /// then throws `channel_closed`, its `send` throws. In another process, as
  /// in the parent after it forked the child that uses this end, it only
  /// releases this process's handle, like closing an inherited descriptor.
  /// Closing twice, or closing a moved-from connection, does nothing.
  void close() noexcept { end_.close(); }

  /// True when this object holds no end: closed, moved from or default-constructed.
  [[nodiscard]] bool closed() const noexcept { return end_.closed(); }

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
  connection(std::shared_ptr<detail::pipe_mapping> mapping, int end) noexcept
      : end_(std::move(mapping), end) {}
  std::optional<T> receive(const char* op, bool block,
                           std::optional<std::chrono::steady_clock::time_point> deadline);

  detail::pipe_end end_;
  writer encoded_;  // reused: once grown, sending allocates nothing
};

// ---------------------------------------------------------------------------

template <class T>
std::pair<connection<T>, connection<T>> pipe(std::size_t buffer_bytes) {
  auto mapping = std::make_shared<detail::pipe_mapping>(buffer_bytes);
  return {connection<T>(mapping, 0), connection<T>(mapping, 1)};
}

template <class T>
void connection<T>::send(const T& value) {
  if constexpr (detail::contiguous_payload<T>::value) {
    // The codec's encoding, written straight from the container's storage.
    const std::uint64_t count = value.size();
    end_.send(&count, sizeof count, value.data(), value.size() * sizeof(typename T::value_type));
  } else {
    end_.require_open("send");
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
  void stream(std::size_t size, pipe_source& source) {
    this->out.emplace(read_contiguous<T>(size, source));
  }
};

}  // namespace detail

template <class T>
std::optional<T> connection<T>::receive(
    const char* op, bool block, std::optional<std::chrono::steady_clock::time_point> deadline) {
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
std::optional<T> connection<T>::recv_until(std::chrono::steady_clock::time_point deadline) {
  return receive("recv_until", true, deadline);
}

template <class T>
bool connection<T>::poll() {
  return end_.poll(false, std::nullopt);
}

template <class T>
template <class Rep, class Period>
bool connection<T>::poll(const std::chrono::duration<Rep, Period>& timeout) {
  auto ns = detail::to_timeout(timeout);
  if (ns.count() == 0) return end_.poll(false, std::nullopt);
  return end_.poll(true, detail::deadline_after(ns));
}

}  // namespace procpool
