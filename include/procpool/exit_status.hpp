/// @file
/// `exit_status`: how a process ended — exited with a code, or killed by a signal.
#pragma once

#include <fmt/format.h>
#include <sys/wait.h>

#include <csignal>
#include <cstring>
#include <string>

namespace procpool {

/// How a child process ended: it exited with a code, or a signal killed it.
///
/// Returned by `process::join()` and carried by `worker_died`. A value type:
/// cheap to copy, comparable, printable with fmt (`{}`) or `to_string()`.
class exit_status {
 public:
  /// A process that exited normally with `code` (0 to 255).
  static constexpr exit_status exited(int code) noexcept { return exit_status(code, 0, false); }
  /// A process that a signal ended; `core_dumped` when it left a core.
  static constexpr exit_status killed(int signal, bool core_dumped = false) noexcept {
    return exit_status(0, signal, core_dumped);
  }
  /// Decodes a status word from `waitpid`.
  static constexpr exit_status from_wait_status(int status) noexcept {
    if (WIFSIGNALED(status)) return killed(WTERMSIG(status), WCOREDUMP(status));
    return exited(WEXITSTATUS(status));
  }

  /// True when the process exited normally (by `exit`, `_exit` or returning from `main`).
  constexpr bool is_exited() const noexcept { return signal_ == 0; }
  /// True when a signal ended the process.
  constexpr bool is_signaled() const noexcept { return signal_ != 0; }
  /// True when the process exited with code 0.
  constexpr bool success() const noexcept { return signal_ == 0 && code_ == 0; }
  /// The exit code; 0 when a signal ended the process.
  constexpr int code() const noexcept { return code_; }
  /// The signal that ended the process; 0 when it exited normally.
  constexpr int signal() const noexcept { return signal_; }
  /// True when the kernel wrote a core dump for the signal.
  constexpr bool core_dumped() const noexcept { return core_dumped_; }

  /// "exited with code 3", "killed by signal 9 (SIGKILL)".
  std::string to_string() const {
    if (is_exited()) return fmt::format("exited with code {}", code_);
    const char* abbrev = ::sigabbrev_np(signal_);
    return fmt::format("killed by signal {} (SIG{}){}", signal_, abbrev ? abbrev : "?",
                       core_dumped_ ? ", core dumped" : "");
  }

  /// Equal when both exited with the same code or were killed by the same signal.
  friend constexpr bool operator==(exit_status a, exit_status b) noexcept {
    return a.code_ == b.code_ && a.signal_ == b.signal_;
  }
  /// Not `==`.
  friend constexpr bool operator!=(exit_status a, exit_status b) noexcept { return !(a == b); }

 private:
  constexpr exit_status(int code, int signal, bool core) noexcept
      : code_(code), signal_(signal), core_dumped_(core) {}
  int code_ = 0;
  int signal_ = 0;
  bool core_dumped_ = false;
};

}  // namespace procpool

/// @cond
/// Formats an `exit_status` as its `to_string()`.
template <>
struct fmt::formatter<procpool::exit_status> : fmt::formatter<std::string> {
  template <class Context>
  auto format(const procpool::exit_status& s, Context& ctx) const {
    return fmt::formatter<std::string>::format(s.to_string(), ctx);
  }
};
/// @endcond
