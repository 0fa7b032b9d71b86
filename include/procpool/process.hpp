/// @file
/// `process`: a callable running in a forked child process, joined by its
/// destructor — Python's `multiprocessing.Process` for C++. Also
/// `current_process()`, `cpu_count()` and `exit_process()`.
#pragma once

#include <fmt/format.h>
#include <poll.h>
#include <sched.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "detail/os/clock.hpp"
#include "detail/os/fork.hpp"
#include "detail/os/sys.hpp"
#include "detail/os/type_name.hpp"
#include "exit_status.hpp"

namespace procpool {

namespace detail {

/// Counter behind the default names "process-1", "process-2", … (per parent).
inline std::atomic<unsigned> process_counter{0};

/// Runs `f(args...)` as the body of a forked child and never returns: exit
/// code 0 when it returns, 1 (after a line on stderr naming the exception's
/// type and `what()`) when it throws.
template <class F, class... Args>
[[noreturn]] void run_child(const std::string& name, F& f, Args&... args) noexcept {
  try {
    std::invoke(f, args...);
  } catch (const std::exception& e) {
    fmt::print(stderr,
               "procpool: process '{}' (pid {}) ended by an uncaught exception of type {}: {}\n",
               name, ::getpid(), demangle(typeid(e).name()), e.what());
    exit_child(1);
  } catch (...) {
    fmt::print(stderr,
               "procpool: process '{}' (pid {}) ended by an uncaught exception of unknown "
               "type\n",
               name, ::getpid());
    exit_child(1);
  }
  exit_child(0);
}

/// Parses a cgroup v2 `cpu.max` line ("max 100000" or "150000 100000") into a
/// CPU limit, rounded up; nullopt when unlimited or unreadable.
inline std::optional<unsigned> parse_cpu_max(const std::string& line) {
  std::istringstream in(line);
  std::string quota;
  long long period = 0;
  if (!(in >> quota >> period) || quota == "max" || period <= 0) return std::nullopt;
  char* end = nullptr;
  long long q = std::strtoll(quota.c_str(), &end, 10);
  if (end == quota.c_str() || *end != '\0' || q <= 0) return std::nullopt;
  return static_cast<unsigned>(std::max(1LL, (q + period - 1) / period));
}

/// Reads the first line of a file; empty when it cannot be read.
inline std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

/// The tightest CPU quota set on this process's cgroup or its ancestors
/// (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
inline std::optional<unsigned> cgroup_cpu_limit() {
  std::optional<unsigned> limit;
  auto tighten = [&](std::optional<unsigned> l) {
    if (l && (!limit || *l < *limit)) limit = l;
  };
  std::ifstream cgroups("/proc/self/cgroup");
  std::string entry;
  while (std::getline(cgroups, entry)) {
    // "hierarchy-id:controllers:path"
    auto first = entry.find(':');
    auto second = entry.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    std::string controllers = entry.substr(first + 1, second - first - 1);
    std::string path = entry.substr(second + 1);
    if (controllers.empty()) {  // cgroup v2: walk from our group up to the root
      for (;;) {
        tighten(parse_cpu_max(read_first_line("/sys/fs/cgroup" + path + "/cpu.max")));
        if (path.empty() || path == "/") break;
        path = path.substr(0, path.find_last_of('/'));
      }
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {  // cgroup v1
      for (const char* mount : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
        for (const std::string& dir : {std::string(mount) + path, std::string(mount)}) {
          std::string quota = read_first_line(dir + "/cpu.cfs_quota_us");
          std::string period = read_first_line(dir + "/cpu.cfs_period_us");
          if (!quota.empty() && !period.empty()) tighten(parse_cpu_max(quota + " " + period));
        }
      }
    }
  }
  return limit;
}

}  // namespace detail

/// How a `process` is started: its name and whether it dies with its parent.
struct process_options {
  /// Name reported by `name()` and, in the child, by `current_process()`;
  /// empty means "process-N", N counting the processes this parent started.
  std::string name{};
  /// When true the child is killed (SIGKILL) as soon as the process that
  /// started it dies, so no orphan outlives a crashed parent.
  bool die_with_parent = false;
};

/// A callable running in a child process forked at construction.
///
/// `process p(f, args...)` forks at once; the child runs `f(args...)` on its
/// own copy of this process's memory (arguments are not serialized: the child
/// sees them as they were at the fork) and exits with code 0, or with code 1
/// after printing the type and `what()` of an exception that escaped `f`.
/// `join()` waits and returns how the child ended. Like `std::jthread`, the
/// destructor joins a child that has not been joined; move-only.
///
/// Example:
/// @code
///   procpool::process p([](int n) { fmt::print("child got {}\n", n); }, 42);
///   procpool::exit_status s = p.join();  // s.success()
/// @endcode
class process {
 public:
  /// An empty `process` that owns no child.
  process() noexcept = default;

  /// Forks a child that runs `f(args...)`. Throws `std::system_error` if
  /// `fork` fails (nothing is started then).
  template <class F, class... Args,
            class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, process_options> &&
                                     !std::is_same_v<std::decay_t<F>, process>>>
  explicit process(F&& f, Args&&... args) : process(process_options{}, f, args...) {}

  /// Forks a child that runs `f(args...)`, named and started as `options` says.
  template <class F, class... Args>
  process(process_options options, F&& f, Args&&... args) {
    static_assert(std::is_invocable_v<F&, Args&...>,
                  "procpool::process: the callable cannot be called with these arguments");
    name_ = options.name.empty()
                ? fmt::format("process-{}", detail::process_counter.fetch_add(1) + 1)
                : std::move(options.name);
    pid_t parent = ::getpid();
    pid_t pid = detail::fork_process();
    if (pid == 0) {
      if (options.die_with_parent) detail::die_with_parent(parent);
      detail::current_process_name() = name_;
      detail::run_child(name_, f, args...);
    }
    pid_ = pid;
    try {
      pidfd_ = detail::sys::pidfd_open(pid_);
    } catch (...) {
      // Without a pidfd, join_for polls; the child is running either way.
    }
  }

  /// Takes `o`'s child; `o` becomes empty.
  process(process&& o) noexcept
      : pid_(std::exchange(o.pid_, -1)),
        pidfd_(std::move(o.pidfd_)),
        status_(std::exchange(o.status_, std::nullopt)),
        name_(std::move(o.name_)) {}

  /// Joins the child this `process` owns (if any), then takes `o`'s.
  process& operator=(process&& o) noexcept {
    if (this != &o) {
      join_noexcept();
      pid_ = std::exchange(o.pid_, -1);
      pidfd_ = std::move(o.pidfd_);
      status_ = std::exchange(o.status_, std::nullopt);
      name_ = std::move(o.name_);
    }
    return *this;
  }

  /// Not copyable: one object owns a child.
  process(const process&) = delete;
  /// Not copyable: one object owns a child.
  process& operator=(const process&) = delete;

  /// Waits for the child to end if it has not been joined.
  ~process() { join_noexcept(); }

  /// Waits until the child ends and returns how it ended. Calling it again
  /// returns the same status. Throws `std::logic_error` on an empty `process`.
  exit_status join() {
    require_child("join");
    if (!status_) {
      int status = 0;
      detail::sys::waitpid(pid_, &status, 0);
      reaped(status);
    }
    return *status_;
  }

  /// Waits at most `timeout` for the child to end; returns how it ended, or
  /// nullopt if it still runs.
  template <class Rep, class Period>
  std::optional<exit_status> join_for(std::chrono::duration<Rep, Period> timeout) {
    require_child("join_for");
    auto deadline = detail::deadline_after(timeout);  // empty: beyond the clock, wait as join()
    if (!deadline) return join();
    auto pause = std::chrono::microseconds(50);
    while (!status_ && !try_reap()) {
      auto left = *deadline - std::chrono::steady_clock::now();
      if (left <= left.zero()) return std::nullopt;
      if (pidfd_) {
        pollfd p{pidfd_.get(), POLLIN, 0};
        auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
        detail::sys::poll(&p, 1, static_cast<int>(std::min<long long>(ms, 1 << 30)));
      } else {  // no pidfd (old kernel): poll waitpid with a growing pause
        std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(pause, left));
        pause = std::min(pause * 2, std::chrono::microseconds(10'000));
      }
    }
    return status_;
  }

  /// True while the child runs. When it has ended, reaps it (so `join()`
  /// returns at once) and returns false. False for an empty `process`.
  bool alive() {
    if (pid_ <= 0 || status_) return false;
    return !try_reap();
  }

  /// Sends SIGTERM to the child, if it has not been reaped yet. The child's
  /// handlers may catch it; `kill()` cannot be caught.
  void terminate() { signal(SIGTERM); }

  /// Sends SIGKILL to the child, if it has not been reaped yet.
  void kill() { signal(SIGKILL); }

  /// Sends signal `sig` to the child, if it has not been reaped yet (until
  /// then its pid cannot be reused, so the signal never reaches a stranger).
  void signal(int sig) {
    require_child("signal");
    if (!status_) detail::sys::kill(pid_, sig);
  }

  /// Pid of the child; -1 for an empty `process`. Still valid after `join()`.
  pid_t pid() const noexcept { return pid_; }

  /// Name given in `process_options`, or "process-N".
  const std::string& name() const noexcept { return name_; }

  /// How the child ended, once it has been reaped by `join`, `join_for` or
  /// `alive`; nullopt before that (Python's `exitcode`).
  std::optional<exit_status> status() const noexcept { return status_; }

  /// True when this `process` owns a child that has not been reaped.
  bool joinable() const noexcept { return pid_ > 0 && !status_; }

  /// True when this `process` owns a child, reaped or not.
  explicit operator bool() const noexcept { return pid_ > 0; }

 private:
  void require_child(const char* what) const {
    if (pid_ <= 0)
      throw std::logic_error(fmt::format("procpool::process::{}: this process is empty", what));
  }

  void reaped(int status) {
    status_ = exit_status::from_wait_status(status);
    pidfd_.reset();
  }

  bool try_reap() {
    int status = 0;
    if (detail::sys::waitpid(pid_, &status, WNOHANG) == 0) return false;
    reaped(status);
    return true;
  }

  void join_noexcept() noexcept {
    if (!joinable()) return;
    try {
      join();
    } catch (...) {
      // waitpid can only fail here if someone else reaped the child.
    }
  }

  pid_t pid_ = -1;
  detail::sys::unique_fd pidfd_;
  std::optional<exit_status> status_;
  std::string name_;
};

/// The calling process as procpool sees it: its pid and name ("main" in the
/// process that started the program, the `process` or pool worker name in a child).
struct process_info {
  /// `getpid()`.
  pid_t pid;
  /// "main", the name given to `process`, or "process-N".
  std::string name{};
};

/// The calling process: its pid and name (Python's `current_process()`).
inline process_info current_process() {
  return {::getpid(), detail::current_process_name()};
}

/// CPUs this process may use: the CPUs of its affinity mask, lowered to its
/// cgroup CPU quota (rounded up) when one is set — what a container or
/// `taskset` allows, not what the machine has. The environment variable
/// `PROCPOOL_CPU_COUNT`, when a positive integer, overrides both. At least 1.
inline unsigned cpu_count() {
  if (const char* env = std::getenv("PROCPOOL_CPU_COUNT")) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0) return static_cast<unsigned>(n);
  }
  unsigned n = 0;
  for (std::size_t cpus = 1024; cpus <= (std::size_t{1} << 20) && n == 0; cpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (set == nullptr) break;
    std::size_t size = CPU_ALLOC_SIZE(cpus);
    int rc = ::sched_getaffinity(0, size, set);
    int err = errno;
    if (rc == 0) n = static_cast<unsigned>(CPU_COUNT_S(size, set));
    CPU_FREE(set);
    if (rc != 0 && err != EINVAL) break;  // EINVAL: the mask is larger; try again
  }
  if (n == 0) {
    long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    n = online > 0 ? static_cast<unsigned>(online) : 1;
  }
  if (auto quota = detail::cgroup_cpu_limit()) n = std::min(n, *quota);
  return std::max(n, 1U);
}

/// Ends the calling child process with exit code `code`, after flushing C and
/// C++ standard output, without running the parent's `atexit` handlers or
/// static destructors (which the child inherited). Use it in place of
/// `std::exit` inside a `process` or a pool task you mean to end its process.
[[noreturn]] inline void exit_process(int code) noexcept {
  detail::exit_child(code);
}

}  // namespace procpool
