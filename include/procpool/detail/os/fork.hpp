// Fork hygiene: flush buffered output before forking, warn once
// when forking a threaded parent, end children with _exit, die with the parent.
#pragma once

#include <fmt/format.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <pthread.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <iostream>
#include <string>

#include "sys.hpp"

namespace procpool::detail {

/// Name of this process as `current_process()` reports it: "main" until a
/// `process` or pool worker sets its own in the child.
inline std::string& current_process_name() {
  static std::string name = "main";
  return name;
}

/// True once the threaded-fork warning has been printed by this process.
inline std::atomic<bool> warned_threaded_fork{false};

/// Threads that may run while forking without a warning: the forking thread,
/// plus helper threads of a runtime whose state children never touch (an MPI
/// library's progress threads; see `mpi::session`).
inline std::atomic<std::size_t> fork_safe_threads{1};

/// The pid of this process, as `this_pid()` last learnt it.
inline std::atomic<pid_t> cached_pid{0};

/// Learns this process's pid again (an `atfork` child handler, so every child
/// forked through `fork()` learns its own at once).
inline void refresh_cached_pid() noexcept {
  cached_pid.store(::getpid(), std::memory_order_relaxed);
}

/// This process's pid without a system call on every use: cached, and
/// refreshed in each child that `fork()` (ours or the user's) makes, through
/// a `pthread_atfork` handler installed on first use. Only a child made by a
/// raw `clone` system call, which skips the handlers, would see its parent's.
inline pid_t this_pid() noexcept {
  static const bool installed = [] {
    ::pthread_atfork(nullptr, nullptr, refresh_cached_pid);
    refresh_cached_pid();
    return true;
  }();
  (void)installed;
  return cached_pid.load(std::memory_order_relaxed);
}

/// Flushes C stdio and the standard C++ streams, so buffered text is written
/// once by its writer rather than once more by each child that inherits it.
inline void flush_standard_streams() noexcept {
  std::fflush(nullptr);
  // Under sync_with_stdio(false) the C++ streams keep buffers of their own.
  try {
    std::cout.flush();
    std::clog.flush();
  } catch (...) {
  }
}

/// `fork()` with procpool's hygiene: flushes output first, and warns once on
/// stderr when other threads run (only the calling thread survives in the
/// child; locks they hold stay locked there forever). Returns 0 in the child.
inline pid_t fork_process() {
  flush_standard_streams();
  std::size_t threads = sys::thread_count();
  if (threads > fork_safe_threads.load(std::memory_order_relaxed) &&
      !warned_threaded_fork.exchange(true)) {
    fmt::print(stderr,
               "procpool: warning: forking a process that runs {} threads; only the forking "
               "thread exists in the child, and locks held by the others (malloc's included) "
               "may stay locked there. Create pools and processes before starting threads.\n",
               threads);
    std::fflush(stderr);
  }
  return sys::fork();
}

/// Ends a forked child: flushes what the child wrote, then `_exit`, so the
/// parent's `atexit` handlers and static destructors never run twice.
[[noreturn]] inline void exit_child(int code) noexcept {
  flush_standard_streams();
  ::_exit(code);
}

/// In a child: asks the kernel to send `sig` when the parent dies, then checks
/// that `parent` is still the parent (it may have died before the request);
/// exits at once if not.
inline void die_with_parent(pid_t parent, int sig = SIGKILL) noexcept {
  if (::prctl(PR_SET_PDEATHSIG, sig) != 0 || ::getppid() != parent) ::_exit(128 + sig);
}

/// In a worker: keep up to `bytes` of freed memory for the next items rather
/// than give it back to the kernel, and serve blocks up to `bytes` (at most
/// glibc's ceiling, 32 MiB on 64-bit) from the heap rather than from fresh
/// mappings. Without it glibc maps every big item (an 8 MiB vector) afresh
/// and the kernel zeroes each of its 4 KiB pages on first touch, the worker's
/// main cost on big items. 0 leaves the allocator's defaults; a no-op outside
/// glibc.
inline void keep_freed_memory(std::size_t bytes) noexcept {
#if defined(__GLIBC__)
  if (bytes == 0) return;
  constexpr std::size_t ceiling = std::size_t(4) * 1024 * 1024 * sizeof(long);
  auto clamp = [](std::size_t v) { return static_cast<int>(std::min<std::size_t>(v, 1u << 30)); };
  ::mallopt(M_MMAP_THRESHOLD, clamp(std::min(bytes, ceiling)));
  ::mallopt(M_TRIM_THRESHOLD, clamp(bytes));
#else
  (void)bytes;
#endif
}

}  // namespace procpool::detail
