// The one seam for system calls: retries EINTR, names the failed call in a
// std::system_error, opens every descriptor with O_CLOEXEC, and lets tests
// inject failures.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <system_error>
#include <utility>

namespace procpool::detail::sys {

/// Test hook: when set, it is asked before each wrapped call with the call's
/// name; a non-zero answer makes the call fail with that errno without running.
/// Set only by tests, from one thread, while no pool runs.
inline int (*fault_hook)(const char* call) = nullptr;

/// Throws `std::system_error` for `err`, naming the failed `call`.
[[noreturn]] inline void throw_errno(const char* call, int err = errno) {
  throw std::system_error(err, std::generic_category(), call);
}

/// Runs `f` again while it fails with EINTR; returns its last result.
template <class F>
auto retry(F f) {
  for (;;) {
    auto r = f();
    if (!(r == -1 && errno == EINTR)) return r;
  }
}

/// Returns true when the fault hook makes `call` fail (errno is set then).
inline bool injected(const char* call) {
  if (fault_hook == nullptr) return false;
  int err = fault_hook(call);
  if (err == 0) return false;
  errno = err;
  return true;
}

/// Runs `f` with EINTR retried and the fault hook consulted; throws for `call` on -1.
template <class F>
auto checked(const char* call, F f) {
  if (injected(call)) throw_errno(call);
  auto r = retry(f);
  if (r == -1) throw_errno(call);
  return r;
}

/// A file descriptor owned by one object: closed by the destructor, movable, not copyable.
class unique_fd {
 public:
  unique_fd() noexcept = default;
  /// Takes ownership of `fd` (-1 for none).
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }

  /// The descriptor, still owned; -1 when empty.
  int get() const noexcept { return fd_; }
  /// True when a descriptor is held.
  explicit operator bool() const noexcept { return fd_ >= 0; }
  /// Gives up ownership and returns the descriptor.
  int release() noexcept { return std::exchange(fd_, -1); }
  /// Closes the held descriptor (errors are ignored: the fd is gone either way) and holds `fd`.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// `pipe2(O_CLOEXEC)`: returns {read end, write end}.
inline std::pair<unique_fd, unique_fd> make_pipe(int flags = 0) {
  int fds[2];
  checked("pipe2", [&] { return ::pipe2(fds, O_CLOEXEC | flags); });
  return {unique_fd(fds[0]), unique_fd(fds[1])};
}

/// `socketpair(AF_UNIX, type | SOCK_CLOEXEC)`: two connected sockets.
inline std::pair<unique_fd, unique_fd> socket_pair(int type) {
  int fds[2];
  checked("socketpair", [&] { return ::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds); });
  return {unique_fd(fds[0]), unique_fd(fds[1])};
}

/// `pidfd_open`: a descriptor that polls readable when `pid` exits. Returns an
/// empty fd where the kernel lacks pidfd (ENOSYS) so callers fall back to polling.
inline unique_fd pidfd_open(pid_t pid) {
  if (injected("pidfd_open")) throw_errno("pidfd_open");
  long fd = ::syscall(SYS_pidfd_open, pid, 0);  // pidfds are always close-on-exec
  if (fd < 0) {
    if (errno == ENOSYS || errno == EPERM) return unique_fd();
    throw_errno("pidfd_open");
  }
  return unique_fd(static_cast<int>(fd));
}

/// `waitpid`, EINTR retried. Returns the pid reaped, or 0 with WNOHANG and no change.
inline pid_t waitpid(pid_t pid, int* status, int options) {
  return checked("waitpid", [&] { return ::waitpid(pid, status, options); });
}

/// `poll`, EINTR retried with the same timeout. Returns the number of ready fds.
inline int poll(pollfd* fds, nfds_t n, int timeout_ms) {
  return checked("poll", [&] { return ::poll(fds, n, timeout_ms); });
}

/// `waitid`, EINTR retried. With WNOHANG and no change, `info->si_pid` stays 0.
inline int waitid(idtype_t type, id_t id, siginfo_t* info, int options) {
  return checked("waitid", [&] { return ::waitid(type, id, info, options); });
}

/// `kill`; returns false when the process no longer exists (ESRCH).
inline bool kill(pid_t pid, int sig) {
  if (injected("kill")) throw_errno("kill");
  if (::kill(pid, sig) == 0) return true;
  if (errno == ESRCH) return false;
  throw_errno("kill");
}

/// `kill(-group, sig)`: signals every process of process group `group`;
/// returns false when the group has no process left (ESRCH).
inline bool kill_group(pid_t group, int sig) {
  return kill(-group, sig);
}

/// `setpgid(pid, group)`: moves process `pid` (0: this one) into process group
/// `group` (0: a new group led by `pid`).
inline void setpgid(pid_t pid, pid_t group) {
  checked("setpgid", [&] { return ::setpgid(pid, group); });
}

/// `fork`, with nothing else: see detail/fork.hpp for the hygiene around it.
inline pid_t fork() {
  return checked("fork", [] { return ::fork(); });
}

/// `write` of the whole buffer, EINTR and short writes retried.
inline void write_all(int fd, const void* data, std::size_t size) {
  auto p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = checked("write", [&] { return ::write(fd, p, size); });
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

/// `read`, EINTR retried; returns the bytes read (0 at end of file).
inline std::size_t read_some(int fd, void* data, std::size_t size) {
  return static_cast<std::size_t>(checked("read", [&] { return ::read(fd, data, size); }));
}

/// Number of threads in this process, read from /proc/self/task (1 when unreadable).
inline std::size_t thread_count() noexcept {
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return 1;
  std::size_t n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n == 0 ? 1 : n;
}

}  // namespace procpool::detail::sys
