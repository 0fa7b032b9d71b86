/// @file
/// The exception hierarchy: one base, `procpool::error`, and narrow subclasses
/// that carry what a caller needs to act (item index, pid, signal, sizes).
///
/// Every exception type of procpool is declared here, whatever header raises
/// it (the pool's, the channels', the segments', the barrier's), so a caller
/// can catch any of them with this header alone; the MPI engine's own errors
/// stay with it, in mpi.hpp. Failures of system calls are
/// `std::system_error` naming the call, not `procpool::error`.
#pragma once

#include <fmt/format.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "exit_status.hpp"

namespace procpool {

/// Base of every exception procpool throws, apart from `std::system_error` for
/// failed system calls and `std::bad_alloc`.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
/// An exception object as a worker encoded it: the mangled name of its type
/// (`typeid(T).name()`) and its bytes, as `encode` wrote them.
struct exception_object {
  std::string key;
  std::vector<std::byte> bytes;
};
struct exception_access;
}  // namespace detail

/// The function of a pool threw while running an item in a worker.
///
/// Raised by `map` and friends for the lowest failing index of the call (the
/// rest of the call is cancelled), and by `future::get` for `submit`.
///
/// It keeps the thrown exception's type name and `what()`, and, when the
/// worker knew how to encode the thrown type, the object itself: see
/// `original<T>()`, `rethrow_as<T...>()` and `register_exception<T>()`.
class task_error : public error {
 public:
  /// An error for item `index`, raised in worker `pid` as an exception of
  /// type `type_name` whose `what()` was `message`; `original` is the
  /// exception object as the worker encoded it, if it could.
  task_error(std::size_t index, pid_t pid, std::string type_name, std::string message,
             std::shared_ptr<const detail::exception_object> original = {})
      : error(fmt::format("item {} failed in worker {}: {}: {}", index, pid, type_name, message)),
        index_(index),
        pid_(pid),
        type_name_(std::move(type_name)),
        message_(std::move(message)),
        original_(std::move(original)) {}

  /// The error of a task given to `submit` (or `executor::submit`), which is
  /// no item of a call: the message names a task, and `index()` is 0.
  static task_error in_task(pid_t pid, std::string type_name, std::string message,
                            std::shared_ptr<const detail::exception_object> original = {}) {
    auto what = fmt::format("a task failed in worker {}: {}: {}", pid, type_name, message);
    return task_error(what, 0, pid, std::move(type_name), std::move(message), std::move(original));
  }
  /// This error, worded as the error of a task given to `submit` (see `in_task`).
  task_error as_task() const { return in_task(pid_, type_name_, message_, original_); }

  /// The exception object the function threw, when it was of type `T`
  /// exactly and the worker could encode it; empty otherwise (another type,
  /// a type the worker did not know, or an encoder that threw in the worker).
  ///
  /// Naming `original<T>()` (or `rethrow_as<T>()`) anywhere in the program
  /// registers `T`'s codec at program start, in every process made from the
  /// program: forked workers, and MPI ranks, which run the same binary. `T`
  /// must be sendable (codec.hpp): an exception class usually needs its own
  /// `procpool_encode`/`procpool_decode`. Defined in codec.hpp, which every
  /// pool header includes.
  /// **Throws:** `decode_error` when the bytes do not decode as a `T`.
  template <class T>
  std::optional<T> original() const;
  /// Throws the original exception as itself when it is one of `T...` (the
  /// first that matches), so that `catch (const T&)` catches it; returns
  /// otherwise. Registers each `T` as `original<T>()` does.
  template <class... T>
  void rethrow_as() const;

  /// Index of the failing item in the input of the call (0 for `submit`).
  std::size_t index() const noexcept { return index_; }
  /// Pid of the worker that ran the item.
  pid_t pid() const noexcept { return pid_; }
  /// Demangled type name of the exception the function threw, e.g. `std::invalid_argument`.
  const std::string& type_name() const noexcept { return type_name_; }
  /// The `what()` of the exception the function threw.
  const std::string& message() const noexcept { return message_; }

 protected:
  /// For subclasses that word the message themselves (`mpi::task_error`).
  task_error(const std::string& what, std::size_t index, pid_t pid, std::string type_name,
             std::string message, std::shared_ptr<const detail::exception_object> original = {})
      : error(what),
        index_(index),
        pid_(pid),
        type_name_(std::move(type_name)),
        message_(std::move(message)),
        original_(std::move(original)) {}

 private:
  friend struct detail::exception_access;
  std::size_t index_;
  pid_t pid_;
  std::string type_name_;
  std::string message_;
  std::shared_ptr<const detail::exception_object> original_;
};

/// A task was cancelled before it was sent to a worker (`future::cancel`,
/// `executor::shutdown(..., true)`): it never ran. Python's `CancelledError`.
class task_cancelled : public error {
 public:
  /// `how` says what cancelled it, e.g. "future::cancel".
  explicit task_cancelled(const char* how)
      : error(fmt::format("the task was cancelled ({}) before it was sent to a worker; it never "
                          "ran",
                          how)) {}
};

/// A worker process died — killed by a signal, `exit()`, `abort()`, the
/// out-of-memory killer — while the call needed it.
///
/// Names the item the worker was running, if any. The pool has already
/// replaced the worker and stays usable.
class worker_died : public error {
 public:
  /// Worker `pid` ended with `status` while running item `index` (none when idle).
  worker_died(pid_t pid, exit_status status, std::optional<std::size_t> index)
      : error(index ? fmt::format("worker {} {} while running item {}", pid, status, *index)
                    : fmt::format("worker {} {} while idle", pid, status)),
        pid_(pid),
        status_(status),
        index_(index) {}

  /// Worker `pid` ended with `status` while running a task given to `submit`:
  /// the message names a task, and `index()` is 0.
  static worker_died in_task(pid_t pid, exit_status status) {
    return worker_died(fmt::format("worker {} {} while running a task", pid, status), pid, status);
  }

  /// Pid of the worker that died.
  pid_t pid() const noexcept { return pid_; }
  /// How it ended: its exit code or the signal that killed it.
  exit_status status() const noexcept { return status_; }
  /// Index of the item it was running, in the input of the call (0 for a
  /// task given to `submit`). Empty when the worker was idle: it died between
  /// chunks, or before it started the chunk charged with its death (a chunk
  /// whose worker died three times before running it).
  std::optional<std::size_t> index() const noexcept { return index_; }

 private:
  worker_died(const std::string& what, pid_t pid, exit_status status)
      : error(what), pid_(pid), status_(status), index_(0) {}

  pid_t pid_;
  exit_status status_;
  std::optional<std::size_t> index_;
};

/// An item ran longer than `pool_options::task_timeout`; the worker running it
/// was killed and replaced.
class timeout_error : public error {
 public:
  /// Item `index` ran past `timeout` in worker `pid`.
  timeout_error(std::size_t index, pid_t pid, std::chrono::nanoseconds timeout)
      : error(fmt::format("item {} ran past the task timeout of {} ms in worker {}; the worker "
                          "was killed and replaced",
                          index, std::chrono::duration<double, std::milli>(timeout).count(), pid)),
        index_(index),
        pid_(pid),
        timeout_(timeout) {}

  /// A task given to `submit` ran past `timeout` in worker `pid`: the message
  /// names a task, and `index()` is 0.
  static timeout_error in_task(pid_t pid, std::chrono::nanoseconds timeout) {
    return timeout_error(
        fmt::format("a task ran past the task timeout of {} ms in worker {}; the worker was "
                    "killed and replaced",
                    std::chrono::duration<double, std::milli>(timeout).count(), pid),
        pid, timeout);
  }

  /// Index of the item that timed out, in the input of the call.
  std::size_t index() const noexcept { return index_; }
  /// Pid of the worker that ran it (now killed).
  pid_t pid() const noexcept { return pid_; }
  /// The timeout that was exceeded.
  std::chrono::nanoseconds timeout() const noexcept { return timeout_; }

 private:
  timeout_error(const std::string& what, pid_t pid, std::chrono::nanoseconds timeout)
      : error(what), index_(0), pid_(pid), timeout_(timeout) {}

  std::size_t index_;
  pid_t pid_;
  std::chrono::nanoseconds timeout_;
};

/// Bytes could not be decoded as the expected type: truncated, oversized or corrupted input.
class decode_error : public error {
 public:
  /// Decoding failed at byte `offset`; `what` says what was expected there.
  decode_error(std::size_t offset, const std::string& what)
      : error(fmt::format("decode error at byte {}: {}", offset, what)), offset_(offset) {}

  /// Offset in the encoded buffer where decoding failed.
  std::size_t offset() const noexcept { return offset_; }

 private:
  std::size_t offset_;
};

/// A pool was used after `close()`, `terminate()` or `join()`.
class pool_closed : public error {
 public:
  /// `operation` names what was attempted, e.g. "map".
  explicit pool_closed(const char* operation)
      : error(fmt::format("{} called on a pool that was closed", operation)) {}

  /// For a call, future or range that was pending when the pool stopped
  /// (`terminate`, `join`, the destructor): `how` says what stopped it.
  static pool_closed while_pending(const char* how) {
    return pool_closed(fmt::format("the pool was stopped ({}) before this call finished", how),
                       true);
  }

 private:
  pool_closed(const std::string& what, bool) : error(what) {}
};

/// The other end of a `connection` or `queue` is gone: closed, or its process died.
class channel_closed : public error {
 public:
  using error::error;
};

/// The shared state of a `connection` or `queue` holds values no correct
/// process writes (positions or lengths beyond its capacity): memory was
/// overwritten. Nothing outside the channel was read or written; the channel
/// stays unusable, and each later call throws this again.
class channel_corrupted : public error {
 public:
  using error::error;
};

/// A message is larger than a bounded channel could ever hold.
class message_too_large : public error {
 public:
  /// A message of `size` bytes was offered to a channel of `capacity` bytes.
  message_too_large(std::size_t size, std::size_t capacity)
      : error(
            fmt::format("a message of {} bytes cannot fit a channel of {} bytes", size, capacity)),
        size_(size),
        capacity_(capacity) {}
  /// As above, with `advice` (how to size the channel) appended to the message.
  message_too_large(std::size_t size, std::size_t capacity, const std::string& advice)
      : error(fmt::format("a message of {} bytes cannot fit a channel of {} bytes; {}", size,
                          capacity, advice)),
        size_(size),
        capacity_(capacity) {}

  /// Encoded size of the message.
  std::size_t size() const noexcept { return size_; }
  /// Capacity of the channel.
  std::size_t capacity() const noexcept { return capacity_; }

 private:
  std::size_t size_;
  std::size_t capacity_;
};

/// A named shared memory segment could not be made or opened: the name is
/// invalid, or the segment was never initialized by its creator. Base of the
/// narrower segment errors below.
class segment_error : public error {
 public:
  /// An error about the segment `name` (without leading slash), described by `message`.
  segment_error(std::string name, const std::string& message)
      : error(message), name_(std::move(name)) {}
  /// The segment's name, as given.
  const std::string& name() const noexcept { return name_; }

 private:
  std::string name_;
};

/// `open_only` of a name that no segment has.
class segment_not_found : public segment_error {
 public:
  using segment_error::segment_error;
};

/// `create_only` of a name that a segment already has.
class segment_exists : public segment_error {
 public:
  using segment_error::segment_error;
};

/// The segment exists but holds something else: another kind of object, or
/// elements of another type, size or alignment, or another number of them.
class segment_mismatch : public segment_error {
 public:
  using segment_error::segment_error;
};

/// The segment exists but cannot be trusted: it belongs to another user, or
/// its permissions let other users read or write it (wider than `0600`). It
/// is refused before a byte of it is read; nothing else is checked.
class segment_permission_error : public segment_error {
 public:
  using segment_error::segment_error;
};

/// A `barrier` can no longer complete a phase: `abort()` was called, or a
/// participant died before arriving. Raised by every waiter of the barrier and
/// by every later call; a broken barrier stays broken.
class broken_barrier : public error {
 public:
  /// Why the barrier broke.
  enum class reason {
    aborted,           ///< someone called `abort()`
    participant_died,  ///< a participant ended (or was killed) before arriving
    action_failed,     ///< the barrier's action threw (in the participant that ran it)
    reset,             ///< `reset()` was called while this participant waited
  };

  /// The barrier broke for `why`; `pid` and `tid` name the participant that
  /// died (0 otherwise; `tid` is 0 when the process died inside a barrier call).
  broken_barrier(reason why, pid_t pid, pid_t tid)
      : error(message(why, pid, tid)), why_(why), pid_(pid), tid_(tid) {}

  /// Why the barrier broke.
  reason why() const noexcept { return why_; }
  /// Process id of the participant that died; 0 for the other reasons.
  pid_t pid() const noexcept { return pid_; }
  /// Thread id of the participant that died (equal to `pid()` for a process's
  /// main thread); 0 when aborted or when the process died inside a barrier call.
  pid_t tid() const noexcept { return tid_; }

 private:
  static std::string message(reason why, pid_t pid, pid_t tid) {
    if (why == reason::aborted) return "barrier broken: abort() was called";
    if (why == reason::action_failed) return "barrier broken: its action threw an exception";
    if (why == reason::reset) return "barrier broken: reset() was called while waiting";
    if (tid == 0) return fmt::format("barrier broken: process {} died inside a barrier call", pid);
    if (tid == pid) {
      return fmt::format("barrier broken: participant process {} ended before arriving", pid);
    }
    return fmt::format("barrier broken: participant thread {} of process {} ended before arriving",
                       tid, pid);
  }
  reason why_;
  pid_t pid_;
  pid_t tid_;
};

}  // namespace procpool
