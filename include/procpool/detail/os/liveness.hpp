// Is a given process, or a given thread of a process, still running? For
// waiters that must notice a peer that died (the barrier, the ends of a
// pipe). A pid alone cannot say: a dead child stays a zombie, still "there"
// to kill(pid, 0), until its parent reaps it, and pids are reused (pid_max is
// often 32768). So a thread is known by its pid, its thread id and its start
// time, read from /proc; a process, where one atomic word must name it, by a
// process token (its pid and the low bits of its start time).
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../int_cast.hpp"

namespace procpool::detail {

/// One thread of one process, told apart from later threads that reuse its ids.
struct thread_identity {
  pid_t pid = 0;                 ///< process (thread group) id
  pid_t tid = 0;                 ///< thread id; equal to `pid` for the main thread
  std::uint64_t start_time = 0;  ///< clock ticks after boot when it started; 0 if unknown

  friend bool operator==(const thread_identity& a, const thread_identity& b) noexcept {
    return a.pid == b.pid && a.tid == b.tid && a.start_time == b.start_time;
  }
};

/// What /proc says of a thread.
struct proc_thread_state {
  bool readable = false;         ///< the stat file was read and parsed
  char state = '?';              ///< R, S, D, T, Z (zombie), X (dead), ...
  std::uint64_t start_time = 0;  ///< field 22 of stat
};

/// Reads `/proc/<pid>/task/<tid>/stat`. Not readable when the thread is gone
/// (or /proc is missing).
inline proc_thread_state read_proc_thread(pid_t pid, pid_t tid) noexcept {
  proc_thread_state out;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/task/%d/stat", int_cast<int>(pid), int_cast<int>(tid));
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[1024];
  ssize_t n;
  do {
    n = ::read(fd, buf, sizeof buf - 1);
  } while (n < 0 && errno == EINTR);
  ::close(fd);
  if (n <= 0) return out;
  buf[n] = '\0';
  // "pid (comm) S ppid ...": comm may hold spaces and parentheses; it ends at the last ')'.
  char* p = std::strrchr(buf, ')');
  if (p == nullptr || p[1] != ' ' || p[2] == '\0') return out;
  out.state = p[2];
  p += 3;
  // Fields 4 to 21 follow, then the start time (field 22).
  for (int field = 4; field < 22; ++field) {
    p = std::strchr(p + 1, ' ');
    if (p == nullptr) return out;
  }
  out.start_time = std::strtoull(p + 1, nullptr, 10);
  out.readable = true;
  return out;
}

/// The calling thread's identity.
inline thread_identity current_thread_identity() noexcept {
  thread_identity id;
  id.pid = ::getpid();
  id.tid = static_cast<pid_t>(::syscall(SYS_gettid));
  auto st = read_proc_thread(id.pid, id.tid);
  if (st.readable) id.start_time = st.start_time;
  return id;
}

/// The calling thread's identity, read once per thread and cached (a forked
/// child, whose thread id differs, reads its own).
inline const thread_identity& this_thread_identity() noexcept {
  thread_local thread_identity cached;
  auto tid = static_cast<pid_t>(::syscall(SYS_gettid));
  if (cached.tid != tid) cached = current_thread_identity();
  return cached;
}

/// The identity of the main thread of process `pid`, as far as /proc tells
/// (start time 0 when it is already gone).
inline thread_identity process_identity(pid_t pid) noexcept {
  thread_identity id{pid, pid, 0};
  auto st = read_proc_thread(pid, pid);
  if (st.readable) id.start_time = st.start_time;
  return id;
}

/// True while the thread `id` runs: false once it ended, even while its
/// process waits as a zombie to be reaped, and false when its ids now belong
/// to a later thread. Without /proc, falls back to `tgkill(pid, tid, 0)`.
inline bool still_running(const thread_identity& id) noexcept {
  auto st = read_proc_thread(id.pid, id.tid);
  if (st.readable) {
    if (st.state == 'Z' || st.state == 'X' || st.state == 'x') return false;
    return id.start_time == 0 || st.start_time == id.start_time;
  }
  // Its entry is gone: the thread ended, unless /proc itself is missing.
  if (::access("/proc/self/stat", R_OK) == 0) return false;
  if (::syscall(SYS_tgkill, id.pid, id.tid, 0) == 0) return true;
  return errno != ESRCH;
}

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

}  // namespace procpool::detail
