// The fork server: a single-threaded copy of the program, forked once when a
// pool is made, that forks every worker of that pool on request.
//
// Why: a worker forked by the parent is a copy of the parent as it is at that
// moment. Once the parent runs threads (the user's, or the pool's own), a fork
// from it copies locks other threads hold, and a replacement worker forked
// late is a different program from the first ones (globals changed since).
// Forking from the server instead gives every worker, first or replacement,
// the image of the program as it was when the pool was made, and leaves the
// parent free to run threads.
//
// Workers are the server's children, not the parent's. `clone(CLONE_PARENT)`
// would make them the parent's, but only through the raw system call, which
// skips glibc's child set-up: the thread's cached tid and its robust-futex
// list would stay the server's, so a robust process-shared lock taken by such
// a worker could not be recovered when it died. So the server waits for its
// children on the parent's behalf: it reaps one only when asked, which keeps
// an exited worker's pid (and so its process group) reserved until the
// parent has killed what is left of that group.
//
// Protocol: one SOCK_SEQPACKET socket pair; the parent sends a `request`, the
// server answers with one `reply`. The server exits when the socket closes or
// on `quit`, and dies with the parent (PR_SET_PDEATHSIG); its workers die with
// it. The parent's side consults the sys seam's fault hook under the names of
// the calls the server makes for it ("fork", "waitid", "waitpid"), so tests
// that refuse those calls reach the server's work too.
#pragma once

#include <fmt/format.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <string>
#include <system_error>
#include <utility>

#include "../../errors.hpp"
#include "../../exit_status.hpp"
#include "fork.hpp"
#include "sys.hpp"

namespace procpool::detail {

/// The parent's handle on a fork server.
class fork_server {
 public:
  /// What a forked child runs: `context` as given to the constructor, the
  /// slot asked for, and the server's pid (the child's parent). Never returns.
  using entry_fn = void (*)(void* context, std::uint32_t slot, pid_t server);

  /// No server.
  fork_server() noexcept = default;
  /// Forks the server now (with fork hygiene: streams flushed, the threaded
  /// fork warned of). `entry` runs in each child it forks later.
  fork_server(entry_fn entry, void* context);
  fork_server(fork_server&& o) noexcept { *this = std::move(o); }
  fork_server& operator=(fork_server&& o) noexcept {
    if (this != &o) {
      stop(std::chrono::milliseconds(1000));
      socket_ = std::move(o.socket_);
      pid_ = std::exchange(o.pid_, 0);
      ended_ = std::exchange(o.ended_, {});
      owner_ = o.owner_;
    }
    return *this;
  }
  fork_server(const fork_server&) = delete;
  fork_server& operator=(const fork_server&) = delete;
  ~fork_server() { stop(std::chrono::milliseconds(1000)); }

  /// The server's pid; 0 when there is none.
  pid_t pid() const noexcept { return pid_; }
  /// True while the server answers (it has not been seen to end).
  bool running() const noexcept { return pid_ != 0 && ended_.empty(); }

  /// Forks a child that runs `entry(context, slot, server pid)`, in a process
  /// group of its own. Throws `std::system_error` naming "fork" when the
  /// server's fork fails, `procpool::error` when the server is gone.
  pid_t spawn(std::uint32_t slot) {
    if (sys::injected("fork")) sys::throw_errno("fork");
    return ask({op::spawn, static_cast<std::int32_t>(slot), 0}, "fork").value;
  }

  /// True when child `pid` has exited (it stays a zombie until `reap`).
  /// With `block`, waits until it has.
  bool exited(pid_t pid, bool block) {
    if (sys::injected("waitid")) sys::throw_errno("waitid");
    return ask({op::exited, pid, block ? 1 : 0}, "waitid").value != 0;
  }

  /// Waits for child `pid` to end and reaps it; returns its wait status.
  int reap(pid_t pid) {
    if (sys::injected("waitpid")) sys::throw_errno("waitpid");
    return ask({op::reap, pid, 0}, "waitpid").value;
  }

  /// Asks the server to exit, waits up to `grace` for it, then kills it, and
  /// reaps it. Its children still alive die with it. Safe to call twice.
  void stop(std::chrono::milliseconds grace) noexcept;

  /// In a process that is not the owner (a forked copy): drops the socket and
  /// forgets the server, touching nothing else.
  void release() noexcept {
    socket_.reset();
    pid_ = 0;
  }

  /// Why the server stopped answering, as a sentence; empty while it runs.
  const std::string& ended() const noexcept { return ended_; }

 private:
  enum class op : std::int32_t { spawn = 1, exited = 2, reap = 3, quit = 4 };
  struct request {
    op what;
    std::int32_t arg;
    std::int32_t flag;
  };
  struct reply {
    std::int32_t value;
    std::int32_t err;  // errno of the server's call; 0 on success
  };

  reply ask(request r, const char* call);
  [[noreturn]] static void serve(int socket, entry_fn entry, void* context) noexcept;
  static bool send_all(int fd, const void* data, std::size_t size) noexcept;
  static bool receive(int fd, void* data, std::size_t size) noexcept;
  void note_end() noexcept;

  sys::unique_fd socket_;
  pid_t pid_ = 0;
  pid_t owner_ = 0;
  std::string ended_;
};

// ---------------------------------------------------------------------------

inline fork_server::fork_server(entry_fn entry, void* context) {
  auto [mine, theirs] = sys::socket_pair(SOCK_SEQPACKET);
  owner_ = ::getpid();
  sigset_t all, old;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_BLOCK, &all, &old);
  pid_t pid = 0;
  try {
    pid = fork_process();
  } catch (...) {
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    throw;
  }
  if (pid == 0) {
    mine.reset();
    die_with_parent(owner_);
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    serve(theirs.release(), entry, context);
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  pid_ = pid;
  socket_ = std::move(mine);
}

inline void fork_server::serve(int socket, entry_fn entry, void* context) noexcept {
  // The server's own system calls are made directly: faults are injected on
  // the parent's side of each request, and the server has no one to report
  // its errors to but the parent, in its replies.
  // Out of the parent's process group, so that a Ctrl-C or a signal to the
  // group reaches the parent, which decides, and not the server behind it.
  ::setpgid(0, 0);
  // Stopping the pool stops its workers even when the parent handles SIGINT
  // or SIGTERM itself: the children start with the default actions.
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  // Children must stay waitable, whatever the program did with SIGCHLD; they
  // get the program's own disposition back.
  struct sigaction program_chld {};
  struct sigaction default_chld {};
  default_chld.sa_handler = SIG_DFL;
  ::sigaction(SIGCHLD, &default_chld, &program_chld);
  // Faults are injected on the parent's side of each request.
  sys::fault_hook = nullptr;
  pid_t self = ::getpid();
  for (;;) {
    request r{};
    if (!receive(socket, &r, sizeof r)) ::_exit(0);  // the parent is gone or done
    reply out{0, 0};
    switch (r.what) {
      case op::spawn: {
        sigset_t all, old;
        ::sigfillset(&all);
        ::pthread_sigmask(SIG_BLOCK, &all, &old);
        pid_t pid = ::fork();
        if (pid == 0) {
          ::close(socket);
          ::setpgid(0, 0);
          ::sigaction(SIGCHLD, &program_chld, nullptr);
          ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
          entry(context, static_cast<std::uint32_t>(r.arg), self);
          ::_exit(70);  // entry does not return
        }
        int err = errno;
        ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
        if (pid < 0) {
          out.err = err;
        } else {
          ::setpgid(pid, pid);  // the child does it too: whichever runs first
          out.value = pid;
        }
        break;
      }
      case op::exited: {
        siginfo_t info{};
        int options = WEXITED | WNOWAIT | (r.flag ? 0 : WNOHANG);
        int rc = 0;
        do rc = ::waitid(P_PID, static_cast<id_t>(r.arg), &info, options);
        while (rc == -1 && errno == EINTR);
        if (rc == -1)
          out.err = errno;
        else
          out.value = info.si_pid == r.arg ? 1 : 0;
        break;
      }
      case op::reap: {
        int status = 0;
        pid_t rc = 0;
        do rc = ::waitpid(r.arg, &status, 0);
        while (rc == -1 && errno == EINTR);
        if (rc == -1)
          out.err = errno;
        else
          out.value = status;
        break;
      }
      case op::quit:
        ::_exit(0);
      default:
        out.err = EINVAL;
    }
    if (!send_all(socket, &out, sizeof out)) ::_exit(0);
  }
}

inline bool fork_server::send_all(int fd, const void* data, std::size_t size) noexcept {
  for (;;) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(size)) return true;
    if (n == -1 && errno == EINTR) continue;
    return false;
  }
}

inline bool fork_server::receive(int fd, void* data, std::size_t size) noexcept {
  for (;;) {
    ssize_t n = ::recv(fd, data, size, 0);
    if (n == static_cast<ssize_t>(size)) return true;
    if (n == -1 && errno == EINTR) continue;
    return false;  // end of stream, an error, or a message of the wrong size
  }
}

inline fork_server::reply fork_server::ask(request r, const char* call) {
  if (!running())
    throw error(fmt::format("{}: the pool's fork server {}; no worker can be started or reaped",
                            call, ended_.empty() ? std::string("is not running") : ended_));
  reply out{};
  if (!send_all(socket_.get(), &r, sizeof r) || !receive(socket_.get(), &out, sizeof out)) {
    note_end();
    throw error(fmt::format("{}: the pool's fork server {}; no worker can be started or reaped",
                            call, ended_));
  }
  if (out.err != 0) sys::throw_errno(call, out.err);
  return out;
}

inline void fork_server::note_end() noexcept {
  // It closed the socket: it ended, or is about to. Say how, when it can be
  // known (it is this process's child).
  int status = 0;
  pid_t rc = 0;
  for (int i = 0; i < 100 && rc == 0; ++i) {
    do rc = ::waitpid(pid_, &status, WNOHANG);
    while (rc == -1 && errno == EINTR);
    if (rc == 0) ::usleep(1000);
  }
  if (rc == pid_) {
    ended_ = fmt::format("(pid {}) {}", pid_, exit_status::from_wait_status(status));
    pid_ = -pid_;  // reaped: stop() must not wait for it again
  } else {
    ended_ = fmt::format("(pid {}) stopped answering", pid_);
  }
  socket_.reset();
}

inline void fork_server::stop(std::chrono::milliseconds grace) noexcept {
  if (pid_ == 0) return;
  if (pid_ < 0 || ::getpid() != owner_) {  // reaped already, or not this process's
    release();
    return;
  }
  if (socket_) {
    request r{op::quit, 0, 0};
    send_all(socket_.get(), &r, sizeof r);
    socket_.reset();
  }
  auto deadline = std::chrono::steady_clock::now() + grace;
  int status = 0;
  try {
    while (sys::waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() >= deadline) {
        sys::kill(pid_, SIGKILL);
        sys::waitpid(pid_, &status, 0);
        break;
      }
      ::usleep(500);  // it was asked to quit: the wait is a few turns
    }
  } catch (const std::system_error&) {
    // ECHILD: reaped already (SIGCHLD ignored by the program). A refused kill
    // or wait leaves it to die with this process (PR_SET_PDEATHSIG).
  }
  pid_ = 0;
}

}  // namespace procpool::detail
