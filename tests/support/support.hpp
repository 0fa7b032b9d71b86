// Helpers shared by the test programs: counting this process's descriptors and
// children (for the no-leak, no-zombie checks), a one-byte go signal, and
// reading a whole file (fuzz corpora). Usable without Catch2's main: the
// fuzz programs include it too.
#pragma once

#include <procpool/codec.hpp>
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/os/liveness.hpp>
#include <procpool/detail/os/sys.hpp>
#include <procpool/errors.hpp>
#include <procpool/exit_status.hpp>

#include <catch2/catch.hpp>

#include <dirent.h>
#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// Defined in builds under AddressSanitizer or ThreadSanitizer, whose
// allocators and address-space reservations some tests cannot reason about.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PROCPOOL_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PROCPOOL_TEST_SANITIZED 1
#endif
#endif

namespace procpool_test {

/// Forks a child that runs `f()` and exits with what it returns (97 if it throws).
template <class F>
pid_t spawn(F f) {
  pid_t pid = procpool::detail::fork_process();
  if (pid == 0) {
    int code = 97;
    try {
      code = f();
    } catch (...) {
    }
    procpool::detail::exit_child(code);
  }
  return pid;
}

/// Waits for child `pid` and returns how it ended.
inline procpool::exit_status reap(pid_t pid) {
  int status = 0;
  procpool::detail::sys::waitpid(pid, &status, 0);
  return procpool::exit_status::from_wait_status(status);
}

/// Reaps every child in `pids`; true when all exited with code 0.
inline bool all_succeeded(const std::vector<pid_t>& pids) {
  bool ok = true;
  for (pid_t pid : pids) {
    auto st = reap(pid);
    if (!st.success()) {
      UNSCOPED_INFO("child " << pid << " " << st.to_string());
      ok = false;
    }
  }
  return ok;
}

/// Open descriptors of this process (the directory stream's own excluded).
inline std::size_t open_fd_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
    if (n > 0) --n;
  }
  return n;
}

/// The parent pid of process `pid`, from /proc (0 when it cannot be read).
inline pid_t parent_of(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return 0;
  char buf[512];
  std::size_t len = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[len] = '\0';
  const char* p = std::strrchr(buf, ')');
  int ppid = 0;
  if (p == nullptr || std::sscanf(p + 2, "%*c %d", &ppid) != 1) return 0;
  return static_cast<pid_t>(ppid);
}

/// Minor page faults process `pid` has taken so far, from /proc (field 10 of
/// its stat line); -1 when it cannot be read.
inline long minor_faults(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return -1;
  char buf[1024];
  std::size_t len = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[len] = '\0';
  const char* p = std::strrchr(buf, ')');
  long faults = -1;
  // After the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt.
  if (p == nullptr || std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %ld", &faults) != 1)
    return -1;
  return faults;
}

/// Children of this process that exist, zombies included.
inline std::size_t child_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      char* end = nullptr;
      long pid = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0') continue;
      if (parent_of(static_cast<pid_t>(pid)) == ::getpid()) ++n;
    }
    ::closedir(d);
  }
  return n;
}

/// True when this process has no child left to reap (no zombies, none running).
inline bool no_children_left() {
  int status = 0;
  return ::waitpid(-1, &status, WNOHANG) == -1 && errno == ECHILD;
}

/// The bytes of the file at `path` (empty if it cannot be read).
inline std::vector<std::byte> read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  if (!chars.empty()) std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

/// State letter of process `pid` from /proc ('R', 'S', 'Z', …); '?' when gone.
inline char process_state(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return '?';
  char buf[512];
  std::size_t len = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[len] = '\0';
  const char* p = std::strrchr(buf, ')');
  return p != nullptr && p[1] == ' ' ? p[2] : '?';
}

/// Waits until process `pid` (not necessarily a child of ours) has ended, at
/// most `limit`; true when it has (or never existed).
inline bool gone_within(pid_t pid, std::chrono::milliseconds limit) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return errno == ESRCH;
  pollfd p{fd, POLLIN, 0};
  int r = ::poll(&p, 1, static_cast<int>(limit.count()));
  ::close(fd);
  return r == 1;
}

/// Reads exactly `size` bytes from `fd`; false if the writers close first.
inline bool read_exactly(int fd, void* data, std::size_t size) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    std::size_t n = procpool::detail::sys::read_some(fd, p, size);
    if (n == 0) return false;
    p += n;
    size -= n;
  }
  return true;
}

/// Shared mappings of this process ('s' in the permissions of /proc/self/maps):
/// a leaked pool, queue or shared value shows up as one more. Private mappings
/// are left out, since malloc and the sanitizers add and drop those at will.
inline std::size_t shared_mapping_count() {
  std::ifstream maps("/proc/self/maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) {
    auto space = line.find(' ');
    if (space != std::string::npos && space + 4 < line.size() && line[space + 4] == 's') ++n;
  }
  return n;
}

/// Entries in /dev/shm (named shared memory); 0 when it is not mounted.
inline std::size_t dev_shm_entries() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
  }
  return n;
}

/// A one-byte signal from one process to another through an OS pipe: made
/// before a fork, `give()` on one side releases `await()` on the other.
struct go_signal {
  std::pair<procpool::detail::sys::unique_fd, procpool::detail::sys::unique_fd> fds =
      procpool::detail::sys::make_pipe();
  /// Releases one `await()`.
  void give() { procpool::detail::sys::write_all(fds.second.get(), "g", 1); }
  /// Blocks until `give()`; false when every writer closed first.
  bool await() {
    char c;
    return procpool::detail::sys::read_some(fds.first.get(), &c, 1) == 1;
  }
};

/// Runs `body` with descriptor `fd` (1 or 2) sent to a temporary file;
/// returns what was written to it.
template <class Body>
std::string capture(int fd, Body body) {
  std::fflush(nullptr);
  char path[] = "/tmp/procpool-capture-XXXXXX";
  int file = ::mkstemp(path);
  if (file < 0) throw std::runtime_error("mkstemp failed");
  ::unlink(path);
  int saved = ::dup(fd);
  ::dup2(file, fd);
  body();
  std::fflush(nullptr);
  ::dup2(saved, fd);
  ::close(saved);
  std::string out;
  ::lseek(file, 0, SEEK_SET);
  char buf[4096];
  for (ssize_t n; (n = ::read(file, buf, sizeof buf)) > 0;)
    out.append(buf, static_cast<std::size_t>(n));
  ::close(file);
  return out;
}

/// What `body` writes to stderr.
template <class Body>
std::string capture_stderr(Body body) {
  return capture(2, body);
}

/// What `body` writes to stdout.
template <class Body>
std::string capture_stdout(Body body) {
  return capture(1, body);
}

/// Blocks the calling process until a signal kills it.
[[noreturn]] inline void block_forever() {
  for (;;) ::pause();
}

/// Waits (in the caller) until process `pid` sleeps, for at most 10 s.
inline void wait_until_sleeping(pid_t pid) {
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end) {
    auto st = procpool::detail::read_proc_thread(pid, pid);
    if (st.readable && st.state == 'S') return;
    std::this_thread::yield();
  }
}

/// A sized forward range of `n` values, the i-th computed by `at(i)` each
/// time an iterator is dereferenced: an input that throws at some item, calls
/// back into the pool it feeds, or counts its reads.
template <class At>
class computed_range {
 public:
  computed_range(std::size_t n, At at) : n_(n), at_(std::move(at)) {}
  class iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using reference = std::invoke_result_t<const At&, std::size_t>;
    using value_type = std::decay_t<reference>;
    using difference_type = std::ptrdiff_t;
    using pointer = const value_type*;
    iterator() = default;
    iterator(const computed_range* r, std::size_t i) : r_(r), i_(i) {}
    reference operator*() const { return r_->at_(i_); }
    iterator& operator++() {
      ++i_;
      return *this;
    }
    iterator operator++(int) {
      auto old = *this;
      ++i_;
      return old;
    }
    bool operator==(const iterator& o) const { return i_ == o.i_; }
    bool operator!=(const iterator& o) const { return i_ != o.i_; }

   private:
    const computed_range* r_ = nullptr;
    std::size_t i_ = 0;
  };
  iterator begin() const { return {this, 0}; }
  iterator end() const { return {this, n_}; }
  std::size_t size() const { return n_; }

 private:
  std::size_t n_;
  At at_;
};

/// A result whose decoding (in the parent) throws a plain std::runtime_error
/// for 13: a decoder that fails partway through a call's results.
struct touchy {
  int v;
};
inline void procpool_encode(procpool::writer& out, const touchy& t) {
  procpool::encode(out, t.v);
}
inline touchy procpool_decode(procpool::reader& in, procpool::type_tag<touchy>) {
  int v = procpool::decode<int>(in);
  if (v == 13) throw std::runtime_error("13 is unlucky");
  return {v};
}

/// True when `use()`, run in a forked copy of the process that made a pool,
/// throws `procpool::error` naming both pids: the maker's and this one's.
template <class Use>
bool refused_in_fork(Use&& use) {
  pid_t maker = ::getppid(), me = ::getpid();
  try {
    use();
  } catch (const procpool::error& e) {
    std::string what = e.what();
    return what.find("pid " + std::to_string(maker)) != std::string::npos &&
           what.find("pid " + std::to_string(me)) != std::string::npos;
  } catch (...) {
  }
  return false;
}

}  // namespace procpool_test
