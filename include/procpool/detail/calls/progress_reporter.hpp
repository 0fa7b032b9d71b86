// Progress of one call, as the calls layer reports it: `progress_reporter`
// draws a bar on a terminal or calls the user's callback, at most ten times a
// second. What it reports, `procpool::progress_info`, and the bar's format,
// `procpool::format_progress`, are public names (progress.hpp presents them)
// defined here, so that the calls layer needs no public header but the
// vocabulary ones.
#pragma once

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>

namespace procpool {

/// How far a map has come; passed to `pool_options::on_progress`.
struct progress_info {
  /// Items whose results have arrived.
  std::size_t done = 0;
  /// Items in the call; 0 when the input's length is not known (a lazy `imap`).
  std::size_t total = 0;
  /// Time since the call started.
  std::chrono::steady_clock::duration elapsed{};

  /// Items per second so far (0 before the first result).
  double rate() const noexcept {
    double s = std::chrono::duration<double>(elapsed).count();
    return s > 0 ? static_cast<double>(done) / s : 0.0;
  }
  /// Estimated time left, in seconds; negative when unknown.
  double eta_seconds() const noexcept {
    double r = rate();
    return total > 0 && r > 0 ? static_cast<double>(total - done) / r : -1.0;
  }
};

/// Formats a one-line bar for `info`: `[#####.....] 500/1000 50% 1.2k items/s ETA 0:01`;
/// once every item is done, the time taken instead of the estimate (`in 0:02`).
inline std::string format_progress(const progress_info& info, std::size_t width = 30) {
  auto human = [](double v) {
    if (v >= 1e6) return fmt::format("{:.1f}M", v / 1e6);
    if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
    return fmt::format("{:.0f}", v);
  };
  std::string line;
  if (info.total > 0) {
    std::size_t filled = info.done * width / info.total;
    line = fmt::format("[{:#<{}}{:.<{}}] {}/{} {:3}%", "", filled, "", width - filled, info.done,
                       info.total, info.done * 100 / info.total);
  } else {
    line = fmt::format("{} items", info.done);
  }
  line += fmt::format(" {} items/s", human(info.rate()));
  auto minutes_seconds = [](double seconds) {
    auto s = static_cast<long long>(seconds + 0.5);
    return fmt::format("{}:{:02}", s / 60, s % 60);
  };
  if (info.total > 0 && info.done >= info.total) {
    // Done: the time it took, as tqdm shows at the end.
    line += " in " + minutes_seconds(std::chrono::duration<double>(info.elapsed).count());
  } else if (double eta = info.eta_seconds(); eta >= 0) {
    line += " ETA " + minutes_seconds(eta);
  }
  return line;
}

namespace detail {

/// Reports progress of one call: to the callback when there is one, else as
/// a bar on stderr when stderr is a terminal. Redraws at most ten times a second.
class progress_reporter {
 public:
  progress_reporter(bool bar, std::function<void(const progress_info&)> callback, std::size_t total)
      : callback_(std::move(callback)),
        bar_(bar && !callback_ && ::isatty(STDERR_FILENO)),
        start_(std::chrono::steady_clock::now()),
        total_(total) {}

  /// True when something will be reported.
  bool active() const noexcept { return bar_ || callback_; }
  /// Changes the total (a batch of tasks that grows as tasks are submitted).
  void set_total(std::size_t total) noexcept { total_ = total; }

  /// `done` items have finished; `final` for the last report of the call.
  /// Returns false when the report was held back (one came less than a
  /// tenth of a second ago): the caller then offers the count again later,
  /// so that the last count before a long wait is shown during the wait.
  bool update(std::size_t done, bool final = false) {
    if (!active()) return true;
    auto now = std::chrono::steady_clock::now();
    if (!final && now - last_ < std::chrono::milliseconds(100)) return false;
    last_ = now;
    progress_info info{done, total_, now - start_};
    if (callback_) {
      callback_(info);
    } else {
      fmt::print(stderr, "\r{}\x1b[K{}", format_progress(info), final ? "\n" : "");
      std::fflush(stderr);
    }
    return true;
  }

 private:
  std::function<void(const progress_info&)> callback_;
  bool bar_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_{};
  std::size_t total_;
};

/// The progress of a batch of submitted tasks: the tasks submitted since the
/// pool last had none pending. Each batch is reported as one call: `done`
/// tasks over in `total` submitted, the last report once none is pending.
/// Used under the driver only.
class task_batch {
 public:
  task_batch(bool bar, std::function<void(const progress_info&)> callback)
      : bar_(bar), callback_(std::move(callback)) {}
  /// A task was submitted.
  void added() {
    if (pending_ == 0) {
      reporter_.emplace(bar_, callback_, 0);
      submitted_ = done_ = 0;
      held_ = false;
    }
    ++pending_;
    reporter_->set_total(++submitted_);
  }
  /// A task is over (its result, its error, or its cancel).
  void finished() {
    if (pending_ == 0) return;
    --pending_;
    ++done_;
    offer();
  }
  /// Offers again a count the reporter held back (one came less than a
  /// tenth of a second before it); called while tasks are pending, so that
  /// the count before a long last task is shown while it runs.
  void refresh() {
    if (held_ && pending_ > 0) offer();
  }

 private:
  void offer() { held_ = !reporter_->update(done_, pending_ == 0); }

  bool bar_;
  std::function<void(const progress_info&)> callback_;
  std::optional<progress_reporter> reporter_;
  std::size_t pending_ = 0, submitted_ = 0, done_ = 0;
  bool held_ = false;  // the last count was held back, not yet reported
};

}  // namespace detail
}  // namespace procpool
