// pool<F> beside what the machine allows: serial C++, a thread pool over the
// same data, the floor (floor_pool.hpp: a fork + shared-memory pool with no
// encoding and no safety, the least any such pool can do), memcpy, a futex
// and an OS pipe ping-pong between two processes.
// bench/python/pool_ref.py runs the same cases with Python's multiprocessing;
// scripts/bench runs both side by side and writes docs/benchmarks.md.
//
// Cases (each a separate measurement; run one per process when a case reads
// the process's peak RSS, as `imap` does):
//   tiny     map of n ints through x*x (int64 results), warm 2-worker pool;
//            the floor's map (floor: into a new vector, floor_into: into one
//            made once); procpool's map_into (procpool_into) into a vector
//            kept across calls; making a new vector<int64_t>(n) alone (what any
//            returned result vector costs)
//   chunks   the same map over 10^6 items with chunk sizes 1 .. 10^5, procpool
//            and the floor
//   cpu      200 tasks of 5 ms of computation, 1, 2 and 4 workers
//   latency  submit(x).get() round trip; the floor's call(x); futex and pipe
//            ping-pong
//   big      identity map over 64 items of 8 MiB; memcpy bandwidth; writing
//            into fresh pages
//   startup  pool construction + destruction with 1, 2, 4 workers; bare
//            fork + _exit + waitpid of as many children
//   imap     imap over a lazy input of n items; the parent's peak RSS
//   heavy    a few long tasks (sleeps of 100-400 ms) on 2 and 4 workers:
//            whether every idle worker gets work (the ideal is the
//            longest chain of tasks a perfect scheduler could not avoid)
//   async    1000 submits whose futures are kept, then procpool::wait for
//            all; the latency of a callback (future::then) while the
//            submitting thread sleeps on a condition variable
//
// Every result is checked; a wrong one fails the program (exit code 1).
//
// Usage: pool_bench [--quick] [--validate] [--json] [--items N] [--only IMPL,...]
//                   [--tag TAG] [CASE...]
//   --quick      fewer items and repetitions
//   --validate   the smallest sizes, one repetition, and no timings printed:
//                a correctness check (ctest runs it)
//   --json       one JSON object per line, for bench/run.py
//   --items N    the number of items for `imap` (default 10^7, 10^6 with --quick)
//   --only LIST  run only these implementations (procpool, procpool_into, floor, floor_into,
//                serial, threads, alloc, futex, pipe, memcpy, first_touch, fork, ...)
//   --tag TAG    append "@TAG" to every implementation's name (bench/run.py
//                marks a run under a different environment this way)
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <procpool/pool.hpp>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "floor_pool.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

[[noreturn]] void fail(const std::string& what) {
  std::fflush(stdout);
  fmt::print(stderr, "pool_bench: FAILED: {}\n", what);
  std::exit(1);
}

// ---------------------------------------------------------------------------
// Settings and output.

struct settings {
  bool quick = false;
  bool validate = false;
  bool json = false;
  long long imap_items = 0;       // 0: the default for the mode
  std::vector<std::string> only;  // implementations to run; empty: all
  std::string tag;                // appended to implementation names as "@tag"
  /// True when implementation `impl` is to run.
  bool wanted(const std::string& impl) const {
    return only.empty() || std::find(only.begin(), only.end(), impl) != only.end();
  }
  /// Repetitions of each measurement.
  int reps(int full) const { return validate ? 1 : quick ? std::max(1, full / 2) : full; }
  /// Seconds one sample should last at least (short calls are repeated within a sample).
  double sample_seconds() const { return validate ? 0 : quick ? 0.02 : 0.05; }
  /// Seconds of untimed calls before the samples of a measurement.
  double warm_seconds() const { return validate ? 0 : quick ? 0.05 : 0.1; }
  /// A call that lasts longer than this is warm after its first run, and gets
  /// at most three repetitions: its own length averages out the noise.
  static constexpr double long_call_seconds = 1.0;
};

settings opts;

/// One measured configuration: `samples` are seconds per call (or per round
/// trip), one per repetition; `extras` are other per-repetition figures.
struct record {
  std::string case_name;
  std::string impl;
  double x = 0;      // the parameter: items, chunk size, workers
  double items = 0;  // items per call
  std::vector<double> samples;
  std::vector<std::pair<std::string, std::vector<double>>> extras;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

void emit(const record& r) {
  std::string impl = opts.tag.empty() ? r.impl : r.impl + "@" + opts.tag;
  if (opts.validate && !opts.json) {
    // A correctness check claims nothing about speed: no timings.
    fmt::print("{:<8} {:<22} x={:<10.6g} results checked\n", r.case_name, impl, r.x);
    std::fflush(stdout);
    return;
  }
  if (opts.json) {
    auto list = [](const std::vector<double>& v) {
      std::string s = "[";
      for (std::size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{:.9g}", i ? ", " : "", v[i]);
      return s + "]";
    };
    std::string extras;
    for (auto& [name, values] : r.extras) extras += fmt::format(", \"{}\": {}", name, list(values));
    fmt::print(
        "{{\"case\": \"{}\", \"impl\": \"{}\", \"lang\": \"c++\", \"x\": {:.9g}, \"items\": "
        "{:.9g}, "
        "\"samples\": {}{}}}\n",
        r.case_name, impl, r.x, r.items, list(r.samples), extras);
  } else {
    double m = median(r.samples);
    std::string per_item =
        r.items > 0 ? fmt::format("  {:10.2f} ns/item", m / r.items * 1e9) : std::string();
    std::string extras;
    for (auto& [name, values] : r.extras)
      extras += fmt::format("  {}={:.4g}", name, median(values));
    fmt::print("{:<8} {:<22} x={:<10.6g} median {:12.6f} s{}{}\n", r.case_name, impl, r.x, m,
               per_item, extras);
  }
  std::fflush(stdout);
}

/// Times `call()` `reps` times, warm: first at least three calls and
/// `warm_seconds()` of calls, untimed (the pool's buffers and the process's
/// heap reach the sizes this call needs; the first call is reported as
/// `*first`). A sample then repeats the call until it lasted `sample_seconds()`
/// and records the time per call. `check()` runs after each sample, untimed.
/// A call whose third run still lasts longer than `long_call_seconds` is
/// warm then and gets at most three samples. (Judged after three runs, not
/// one: the first calls of `big` fault in memory the calls after them reuse,
/// and took 0.5 to 2 seconds each where a warm one takes a third of one.)
template <class Call, class Check>
std::vector<double> time_calls(int reps, Call&& call, Check&& check, double* first = nullptr) {
  auto start = clock_type::now();
  call();
  double last = seconds_since(start);
  if (first) *first = last;
  check();
  bool long_call = false;
  for (int calls = 1;
       !opts.validate && (calls < 3 || (!long_call && seconds_since(start) < opts.warm_seconds()));
       ++calls) {
    auto t = clock_type::now();
    call();
    last = seconds_since(t);
    long_call = last > settings::long_call_seconds;
  }
  check();
  if (long_call) reps = std::min(reps, 3);
  long inner = 1;
  if (opts.sample_seconds() > 0 && last > 0)
    inner = std::clamp<long>(static_cast<long>(opts.sample_seconds() / last), 1, 100000);
  std::vector<double> samples;
  for (int r = 0; r < reps; ++r) {
    auto t = clock_type::now();
    for (long i = 0; i < inner; ++i) call();
    samples.push_back(seconds_since(t) / static_cast<double>(inner));
    check();
  }
  return samples;
}

/// Peak resident set size of this process so far, in KiB.
double peak_rss_kib() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss);
}

/// Minor page faults of process `pid` so far (field 10 of /proc/PID/stat);
/// -1 when it cannot be read. A minor fault maps a page on its first touch.
double minor_faults(pid_t pid) {
  std::FILE* f = std::fopen(fmt::format("/proc/{}/stat", pid).c_str(), "r");
  if (!f) return -1;
  char buf[1024];
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // The command name, in parentheses, may hold spaces: fields count from its end.
  const char* p = std::strrchr(buf, ')');
  long long minflt = -1;
  if (!p || std::sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %lld", &minflt) != 1) return -1;
  return static_cast<double>(minflt);
}

/// Page faults one `call()` takes in this process and in `workers` (their sum).
struct fault_counts {
  double parent = 0, workers = 0;
};

template <class Call>
fault_counts count_faults(const std::vector<pid_t>& workers, Call&& call) {
  auto in_workers = [&] {
    double sum = 0;
    for (pid_t w : workers) sum += std::max(0.0, minor_faults(w));
    return sum;
  };
  double parent = minor_faults(::getpid()), children = in_workers();
  call();
  return {minor_faults(::getpid()) - parent, in_workers() - children};
}

// ---------------------------------------------------------------------------
// A thread pool to compare with: a fixed team of threads that splits [0, n)
// into chunks taken from a shared counter. The caller waits; the team works.

class thread_team {
 public:
  explicit thread_team(unsigned threads) {
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { serve(); });
  }
  ~thread_team() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : threads_) t.join();
  }
  thread_team(const thread_team&) = delete;
  thread_team& operator=(const thread_team&) = delete;

  /// Calls `body(begin, end)` over [0, n) in chunks of `chunk`; returns when all are done.
  template <class Body>
  void run(std::size_t n, std::size_t chunk, Body& body) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = [&body](std::size_t b, std::size_t e) { body(b, e); };
    n_ = n;
    chunk_ = std::max<std::size_t>(1, chunk);
    next_.store(0, std::memory_order_relaxed);
    active_ = threads_.size();
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return active_ == 0; });
  }

 private:
  void serve() {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      for (;;) {
        std::size_t b = next_.fetch_add(chunk_, std::memory_order_relaxed);
        if (b >= n_) break;
        job_(b, std::min(n_, b + chunk_));
      }
      lock.lock();
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::function<void(std::size_t, std::size_t)> job_;
  std::atomic<std::size_t> next_{0};
  std::size_t n_ = 0, chunk_ = 1, active_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

/// Python's default chunk size: ceil(n / (4 * workers)).
std::size_t default_chunk(std::size_t n, unsigned workers) {
  std::size_t parts = 4 * std::size_t(workers);
  return std::max<std::size_t>(1, (n + parts - 1) / parts);
}

// ---------------------------------------------------------------------------
// 1 and 2: tiny items.

std::int64_t square(int x) {
  return std::int64_t(x) * x;
}

std::vector<int> tiny_inputs(std::size_t n) {
  std::vector<int> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<int>(i) - static_cast<int>(n / 2);
  return v;
}

void check_squares(const char* who, const std::vector<int>& in,
                   const std::vector<std::int64_t>& out) {
  if (out.size() != in.size())
    fail(fmt::format("{}: {} results for {} items", who, out.size(), in.size()));
  for (std::size_t i = 0; i < in.size(); ++i)
    if (out[i] != square(in[i]))
      fail(fmt::format("{}: item {} ({}) gave {}, not {}", who, i, in[i], out[i], square(in[i])));
}

void bench_tiny() {
  std::vector<std::size_t> sizes = {10'000, 100'000, 1'000'000, 10'000'000};
  if (opts.quick) sizes = {10'000, 100'000, 1'000'000};
  if (opts.validate) sizes = {1'000, 100'000};
  int reps = opts.reps(7);
  constexpr unsigned workers = 2;
  auto sq = [](int x) { return square(x); };
  if (opts.wanted("procpool")) {
    // The pool forks before the team's threads exist.
    procpool::pool pool(sq, workers);
    for (std::size_t n : sizes) {
      auto in = tiny_inputs(n);
      std::vector<std::int64_t> out;
      auto check = [&] { check_squares("procpool map", in, out); };
      record r{"tiny", "procpool", double(n), double(n), {}, {}};
      r.samples = time_calls(
          reps, [&] { out = pool.map(in); }, check);
      // Where the time goes besides computing: pages mapped on first touch,
      // in the parent (the new result vector) and in the workers.
      auto faults = count_faults(pool.pids(), [&] { out = pool.map(in); });
      check();
      r.extras = {{"parent_faults", {faults.parent}}, {"worker_faults", {faults.workers}}};
      emit(r);
    }
  }
  if (opts.wanted("procpool_into")) {
    // map_into: the results written into one vector kept across calls, so a
    // repeated map maps no fresh page.
    procpool::pool pool(sq, workers);
    for (std::size_t n : sizes) {
      auto in = tiny_inputs(n);
      std::vector<std::int64_t> out;
      auto check = [&] { check_squares("procpool map_into", in, out); };
      record r{"tiny", "procpool_into", double(n), double(n), {}, {}};
      r.samples = time_calls(
          reps, [&] { pool.map_into(in, out); }, check);
      auto faults = count_faults(pool.pids(), [&] { pool.map_into(in, out); });
      check();
      r.extras = {{"parent_faults", {faults.parent}}, {"worker_faults", {faults.workers}}};
      emit(r);
    }
  }
  if (opts.wanted("floor") || opts.wanted("floor_into")) {
    // The floor (floor_pool.hpp): the same map with no encoding and no
    // safety, one memcpy in and one out. `floor` returns a new vector as
    // `pool.map` does; `floor_into` writes into one made once.
    floor_bench::pool floor(sq, workers, sizes.back());
    for (std::size_t n : sizes) {
      auto in = tiny_inputs(n);
      std::vector<std::int64_t> out;
      auto check = [&] { check_squares("floor map", in, out); };
      if (opts.wanted("floor")) {
        record r{"tiny", "floor", double(n), double(n), {}, {}};
        r.samples = time_calls(
            reps, [&] { out = floor.map(in); }, check);
        auto faults = count_faults(floor.pids(), [&] { out = floor.map(in); });
        check();
        r.extras = {{"parent_faults", {faults.parent}}, {"worker_faults", {faults.workers}}};
        emit(r);
      }
      if (opts.wanted("floor_into")) {
        out.clear();
        record r{"tiny", "floor_into", double(n), double(n), {}, {}};
        r.samples = time_calls(
            reps, [&] { floor.map_into(in, out); }, check);
        auto faults = count_faults(floor.pids(), [&] { floor.map_into(in, out); });
        check();
        r.extras = {{"parent_faults", {faults.parent}}, {"worker_faults", {faults.workers}}};
        emit(r);
      }
    }
  }
  if (opts.wanted("alloc")) {
    // What `map` pays before any item moves: a new std::vector<int64_t>(n),
    // zeroed, replacing the previous one as `out = pool.map(in)` does.
    for (std::size_t n : sizes) {
      std::vector<std::int64_t> v;
      auto make = [&] {
        v = std::vector<std::int64_t>(n);
        asm volatile("" : : "r"(v.data()) : "memory");
      };
      auto check = [&] {
        if (v.size() != n || (n > 0 && (v.front() != 0 || v.back() != 0)))
          fail("new vector: wrong size or not zeroed");
      };
      record r{"tiny", "alloc", double(n), double(n), {}, {}};
      r.samples = time_calls(reps, make, check);
      r.extras = {{"parent_faults", {count_faults({}, make).parent}}};
      emit(r);
    }
  }
  if (opts.wanted("serial")) {
    for (std::size_t n : sizes) {
      auto in = tiny_inputs(n);
      std::vector<std::int64_t> out(n);
      record r{"tiny", "serial", double(n), double(n), {}, {}};
      r.samples = time_calls(
          reps,
          [&] {
            for (std::size_t i = 0; i < n; ++i) out[i] = square(in[i]);
            // Keep the loop from being dropped as dead between calls.
            asm volatile("" : : "r"(out.data()) : "memory");
          },
          [&] { check_squares("serial", in, out); });
      emit(r);
    }
  }
  if (opts.wanted("threads")) {
    thread_team team(workers);
    for (std::size_t n : sizes) {
      auto in = tiny_inputs(n);
      std::vector<std::int64_t> out(n);
      auto body = [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) out[i] = square(in[i]);
      };
      record r{"tiny", "threads", double(n), double(n), {}, {}};
      r.samples = time_calls(
          reps, [&] { team.run(n, default_chunk(n, workers), body); },
          [&] { check_squares("thread team", in, out); });
      emit(r);
    }
  }
}

void bench_chunks() {
  std::size_t n = opts.validate ? 10'000 : opts.quick ? 100'000 : 1'000'000;
  std::vector<std::size_t> chunks = {1, 10, 100, 1'000, 10'000, 100'000};
  int reps = opts.reps(5);
  auto sq = [](int x) { return square(x); };
  auto in = tiny_inputs(n);
  if (opts.wanted("floor")) {
    floor_bench::pool floor(sq, 2, n);
    std::vector<std::int64_t> out;
    for (std::size_t c : chunks) {
      record r{"chunks", "floor", double(c), double(n), {}, {}};
      r.samples = time_calls(
          reps, [&] { out = floor.map(in, c); }, [&] { check_squares("floor map", in, out); });
      emit(r);
    }
  }
  for (std::size_t c : chunks) {
    if (!opts.wanted("procpool")) break;
    procpool::pool_options o;
    o.workers = 2;
    o.chunk_size = c;
    procpool::pool pool(sq, o);
    std::vector<std::int64_t> out;
    record r{"chunks", "procpool", double(c), double(n), {}, {}};
    r.samples = time_calls(
        reps, [&] { out = pool.map(in); }, [&] { check_squares("procpool map", in, out); });
    emit(r);
  }
}

// ---------------------------------------------------------------------------
// 3: CPU-bound tasks.

/// A fixed computation of `iterations` dependent steps; its result depends on every step.
std::uint64_t burn(std::uint64_t seed, std::uint64_t iterations) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::uint64_t i = 0; i < iterations; ++i) {
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x += i;
  }
  return x;
}

/// Iterations of `burn` that take `ms` milliseconds of CPU here: the fastest of
/// several timings, so a busy machine during calibration does not shrink the task.
std::uint64_t calibrate_burn(double ms) {
  constexpr std::uint64_t probe = 2'000'000;
  double best = 1e9;
  for (int i = 0; i < 15; ++i) {
    auto t = clock_type::now();
    volatile std::uint64_t sink = burn(static_cast<std::uint64_t>(i), probe);
    (void)sink;
    best = std::min(best, seconds_since(t));
  }
  return static_cast<std::uint64_t>(double(probe) * (ms / 1e3) / best);
}

void bench_cpu() {
  int tasks = opts.validate ? 8 : opts.quick ? 40 : 200;
  double task_ms = opts.validate ? 1 : 5;
  int reps = opts.reps(3);
  std::uint64_t iterations = calibrate_burn(task_ms);
  std::vector<int> seeds(static_cast<std::size_t>(tasks));
  for (int i = 0; i < tasks; ++i) seeds[static_cast<std::size_t>(i)] = i;

  std::vector<std::uint64_t> expected(seeds.size());
  record serial{"cpu", "serial", 1, double(tasks), {}, {{"task_ms", {task_ms}}}};
  for (int r = 0; r < reps; ++r) {
    auto t = clock_type::now();
    for (std::size_t i = 0; i < seeds.size(); ++i)
      expected[i] = burn(std::uint64_t(seeds[i]), iterations);
    serial.samples.push_back(seconds_since(t));
  }
  emit(serial);

  auto task = [iterations](int seed) { return burn(std::uint64_t(seed), iterations); };
  auto check = [&](const char* who, const std::vector<std::uint64_t>& got) {
    if (got != expected) fail(fmt::format("{}: CPU-bound results differ from the serial run", who));
  };
  for (unsigned w : {1u, 2u, 4u}) {
    if (!opts.wanted("procpool")) break;
    procpool::pool pool(task, w);
    if (pool.map(std::vector<int>{0, 1}) != std::vector<std::uint64_t>{expected[0], expected[1]})
      fail("procpool: wrong results in the warm-up");
    record r{"cpu", "procpool", double(w), double(tasks), {}, {}};
    for (int k = 0; k < reps; ++k) {
      auto t = clock_type::now();
      auto got = pool.map(seeds);
      r.samples.push_back(seconds_since(t));
      check("procpool map", got);
    }
    emit(r);
  }
  for (unsigned w : {1u, 2u, 4u}) {
    if (!opts.wanted("threads")) break;
    thread_team team(w);
    std::vector<std::uint64_t> got(seeds.size());
    auto body = [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) got[i] = burn(std::uint64_t(seeds[i]), iterations);
    };
    record r{"cpu", "threads", double(w), double(tasks), {}, {}};
    for (int k = 0; k < reps; ++k) {
      std::fill(got.begin(), got.end(), 0);
      auto t = clock_type::now();
      team.run(seeds.size(), default_chunk(seeds.size(), w), body);
      r.samples.push_back(seconds_since(t));
      check("thread team", got);
    }
    emit(r);
  }
}

// ---------------------------------------------------------------------------
// 4: round-trip latency.

struct latency_stats {
  double median = 0, p99 = 0;
};

/// Times `n` round trips (after n/10 of warm-up); `round_trip(i)` must return i + 1.
template <class F>
latency_stats time_round_trips(const char* who, int n, F&& round_trip) {
  for (int i = 0; i < n / 10 + 1; ++i)
    if (round_trip(i) != i + 1) fail(fmt::format("{}: wrong answer in warm-up", who));
  std::vector<double> s(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    auto t = clock_type::now();
    int back = round_trip(i);
    s[static_cast<std::size_t>(i)] = seconds_since(t);
    if (back != i + 1) fail(fmt::format("{}: sent {}, got {} back", who, i, back));
  }
  std::sort(s.begin(), s.end());
  return {s[s.size() / 2], s[std::min(s.size() - 1, s.size() * 99 / 100)]};
}

/// Forks a child that runs `f` and exits with its result (0 = success).
pid_t fork_child(const std::function<int()>& f) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) fail("fork failed");
  if (pid == 0) ::_exit(f());
  return pid;
}

void reap_child(pid_t pid, const char* who) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail(fmt::format("{}: child failed", who));
}

long futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t value) {
  return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, value, nullptr, nullptr,
                   0);
}

/// Two processes take turns on one shared word: the parent writes an odd
/// number and wakes the child, the child answers with the next even number.
/// Each side sleeps in the kernel while it waits: the cost of two wake-ups.
void bench_futex_ping_pong(int n, int reps) {
  void* mem = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) fail("mmap failed");
  auto* word = new (mem) std::atomic<std::uint32_t>(0);
  auto wait_for = [word](std::uint32_t want) {
    for (std::uint32_t v; (v = word->load(std::memory_order_acquire)) != want;)
      futex(word, FUTEX_WAIT, v);
  };
  constexpr std::uint32_t stop = 0xFFFFFFFFu;
  pid_t child = fork_child([&] {
    for (std::uint32_t k = 1;; k += 2) {
      std::uint32_t v;
      while ((v = word->load(std::memory_order_acquire)) != k) {
        if (v == stop) return 0;
        futex(word, FUTEX_WAIT, v);
      }
      word->store(k + 1, std::memory_order_release);
      futex(word, FUTEX_WAKE, 1);
    }
  });
  std::uint32_t k = 1;
  record r{"latency", "futex", 1, 1, {}, {{"p99", {}}}};
  for (int rep = 0; rep < reps; ++rep) {
    auto st = time_round_trips("futex ping-pong", n, [&](int i) {
      word->store(k, std::memory_order_release);
      futex(word, FUTEX_WAKE, 1);
      wait_for(k + 1);
      k += 2;
      return i + 1;  // the answer checked is the handshake: the child's k + 1 arrived
    });
    r.samples.push_back(st.median);
    r.extras[0].second.push_back(st.p99);
  }
  word->store(stop, std::memory_order_release);
  futex(word, FUTEX_WAKE, 1);
  reap_child(child, "futex ping-pong");
  ::munmap(mem, 4096);
  emit(r);
}

void read_exact(int fd, void* p, std::size_t n) {
  auto* b = static_cast<char*>(p);
  while (n > 0) {
    ssize_t k = ::read(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("pipe: read failed");
    b += k;
    n -= static_cast<std::size_t>(k);
  }
}

void write_exact(int fd, const void* p, std::size_t n) {
  auto* b = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t k = ::write(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("pipe: write failed");
    b += k;
    n -= static_cast<std::size_t>(k);
  }
}

/// An int there and its successor back through two OS pipes.
void bench_pipe_ping_pong(int n, int reps) {
  int there[2], back[2];
  if (::pipe2(there, O_CLOEXEC) != 0 || ::pipe2(back, O_CLOEXEC) != 0) fail("pipe2 failed");
  pid_t child = fork_child([&] {
    ::close(there[1]);
    ::close(back[0]);
    for (;;) {
      int v;
      read_exact(there[0], &v, sizeof v);
      if (v < 0) return 0;
      ++v;
      write_exact(back[1], &v, sizeof v);
    }
  });
  ::close(there[0]);
  ::close(back[1]);
  record r{"latency", "pipe", 1, 1, {}, {{"p99", {}}}};
  for (int rep = 0; rep < reps; ++rep) {
    auto st = time_round_trips("pipe ping-pong", n, [&](int i) {
      write_exact(there[1], &i, sizeof i);
      int v;
      read_exact(back[0], &v, sizeof v);
      return v;
    });
    r.samples.push_back(st.median);
    r.extras[0].second.push_back(st.p99);
  }
  int stop = -1;
  write_exact(there[1], &stop, sizeof stop);
  reap_child(child, "pipe ping-pong");
  ::close(there[1]);
  ::close(back[0]);
  emit(r);
}

void bench_latency() {
  int n = opts.validate ? 200 : opts.quick ? 2'000 : 20'000;
  int reps = opts.reps(5);
  if (opts.wanted("procpool")) {
    procpool::pool pool([](int x) { return x + 1; }, 2);
    record r{"latency", "procpool", 2, 1, {}, {{"p99", {}}}};
    for (int rep = 0; rep < reps; ++rep) {
      auto st = time_round_trips("procpool submit", n, [&](int i) { return pool.submit(i).get(); });
      r.samples.push_back(st.median);
      r.extras[0].second.push_back(st.p99);
    }
    emit(r);
  }
  if (opts.wanted("floor")) {
    floor_bench::pool floor([](int x) { return x + 1; }, 2, 1);
    record r{"latency", "floor", 2, 1, {}, {{"p99", {}}}};
    for (int rep = 0; rep < reps; ++rep) {
      auto st = time_round_trips("floor call", n, [&](int i) { return floor.call(i); });
      r.samples.push_back(st.median);
      r.extras[0].second.push_back(st.p99);
    }
    emit(r);
  }
  if (opts.wanted("futex")) bench_futex_ping_pong(n, reps);
  if (opts.wanted("pipe")) bench_pipe_ping_pong(n, reps);
}

// ---------------------------------------------------------------------------
// 5: big items.

/// Item `k` of the big case: its index in the first 8 bytes, then bytes that
/// depend on position and index.
std::vector<char> big_item(std::size_t size, std::size_t k) {
  std::vector<char> v(size);
  for (std::size_t i = 0; i < size; ++i)
    v[i] = static_cast<char>((i >> 12) * 31 + k * 7 + (i & 0xFF));
  std::memcpy(v.data(), &k, std::min(size, sizeof k));
  return v;
}

void bench_big() {
  std::size_t size = opts.validate ? (1u << 20) : (8u << 20);
  std::size_t count = opts.validate ? 4 : opts.quick ? 8 : 64;
  int reps = opts.reps(5);
  double bytes = double(size) * double(count);
  std::vector<std::vector<char>> items;
  for (std::size_t k = 0; k < count; ++k) items.push_back(big_item(size, k));
  auto checker = [&](const char* who, const std::vector<std::vector<char>>& got) {
    return [&items, &got, who] {
      if (got != items) fail(fmt::format("{}: the items came back changed", who));
    };
  };
  if (opts.wanted("procpool")) {
    procpool::pool pool([](const std::vector<char>& v) { return v; }, 2);
    std::vector<std::vector<char>> out;
    double first = 0;
    record r{"big", "procpool", double(size), double(count), {}, {}};
    // `out = map(...)`: the previous results are freed after the new ones are
    // made, as in a loop over batches.
    r.samples = time_calls(
        reps, [&] { out = pool.map(items); }, checker("procpool map", out), &first);
    auto faults = count_faults(pool.pids(), [&] { out = pool.map(items); });
    checker("procpool map", out)();
    r.extras = {{"bytes", {bytes}},
                {"first", {first}},
                {"parent_faults", {faults.parent}},
                {"worker_faults", {faults.workers}}};
    emit(r);
  }
  if (opts.wanted("memcpy")) {
    // The machine's copy bandwidth over the same data: every item into a
    // destination of its own whose pages are already mapped.
    std::vector<std::vector<char>> out(count, std::vector<char>(size, 1));
    record r{"big", "memcpy", double(size), double(count), {}, {{"bytes", {bytes}}}};
    r.samples = time_calls(
        reps,
        [&] {
          for (std::size_t i = 0; i < count; ++i) std::memcpy(out[i].data(), items[i].data(), size);
          asm volatile("" : : "r"(out.data()) : "memory");
        },
        checker("memcpy", out));
    emit(r);
  }
  if (opts.wanted("first_touch")) {
    // Writing into memory the kernel has not mapped yet: every 4 KiB page
    // faults on its first write and is zeroed. A result in new memory pays this.
    auto copy_into_new_pages = [&] {
      for (std::size_t i = 0; i < count; ++i) {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) fail("mmap failed");
        std::memcpy(p, items[i].data(), size);
        asm volatile("" : : "r"(p) : "memory");
        // Check the ends only: a full comparison would double the time measured.
        auto* q = static_cast<const char*>(p);
        if (std::memcmp(q, items[i].data(), 64) != 0 ||
            std::memcmp(q + size - 64, items[i].data() + size - 64, 64) != 0)
          fail("first touch: copy differs");
        ::munmap(p, size);
      }
    };
    record r{"big", "first_touch", double(size), double(count), {}, {}};
    r.samples = time_calls(reps, copy_into_new_pages, [] {});
    r.extras = {{"bytes", {bytes}},
                {"parent_faults", {count_faults({}, copy_into_new_pages).parent}}};
    emit(r);
  }
}

// ---------------------------------------------------------------------------
// 6: start-up.

void bench_startup() {
  int ops = opts.validate ? 2 : opts.quick ? 10 : 30;
  auto inc = [](int x) { return x + 1; };
  for (unsigned w : {1u, 2u, 4u}) {
    record plain{"startup", "procpool", double(w), 0, {}, {}};
    record first{"startup", "procpool_first", double(w), 0, {}, {}};
    // The floor: forking `w` children of this process that exit at once, and
    // reaping them. Interleaved with the pools, so both see the same machine.
    record floor{"startup", "fork", double(w), 0, {}, {}};
    for (int i = 0; i < ops; ++i) {
      auto t = clock_type::now();
      if (opts.wanted("procpool")) {
        { procpool::pool pool(inc, w); }
        plain.samples.push_back(seconds_since(t));
        t = clock_type::now();
        {
          procpool::pool pool(inc, w);
          if (pool.submit(41).get() != 42) fail("start-up: wrong first result");
        }
        first.samples.push_back(seconds_since(t));
      }
      if (opts.wanted("fork")) {
        t = clock_type::now();
        std::vector<pid_t> children;
        for (unsigned k = 0; k < w; ++k) children.push_back(fork_child([] { return 0; }));
        for (pid_t c : children) reap_child(c, "fork floor");
        floor.samples.push_back(seconds_since(t));
      }
    }
    for (auto* r : {&plain, &first, &floor})
      if (!r->samples.empty()) emit(*r);
  }
}

// ---------------------------------------------------------------------------
// 7: imap over a lazy input.

/// The numbers 0 .. n-1 made one at a time, as a Python generator would: an
/// input range with no size that can be read once.
class counting_input {
 public:
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    using pointer = const int*;
    using reference = const int&;
    iterator() = default;
    explicit iterator(long long i) : i_(i), value_(static_cast<int>(i)) {}
    reference operator*() const { return value_; }
    iterator& operator++() {
      value_ = static_cast<int>(++i_);
      return *this;
    }
    iterator operator++(int) {
      iterator old = *this;
      ++*this;
      return old;
    }
    friend bool operator==(const iterator& a, const iterator& b) { return a.i_ == b.i_; }
    friend bool operator!=(const iterator& a, const iterator& b) { return a.i_ != b.i_; }

   private:
    long long i_ = 0;
    int value_ = 0;
  };
  explicit counting_input(long long n) : n_(n) {}
  iterator begin() const { return iterator(0); }
  iterator end() const { return iterator(n_); }

 private:
  long long n_;
};

void bench_imap() {
  if (!opts.wanted("procpool")) return;
  long long n = opts.imap_items ? opts.imap_items
                : opts.validate ? 100'000
                : opts.quick    ? 1'000'000
                                : 10'000'000;
  if (n > (1ll << 31) - 1) fail("imap: at most 2^31 - 1 items (they are ints)");
  procpool::pool pool([](int x) { return square(x); }, 2);
  double base = peak_rss_kib();
  auto t = clock_type::now();
  long long k = 0;
  for (std::int64_t r : pool.imap(counting_input(n))) {
    if (r != std::int64_t(k) * k) fail(fmt::format("imap: item {} gave {}", k, r));
    ++k;
  }
  double s = seconds_since(t);
  if (k != n) fail(fmt::format("imap: {} results for {} items", k, n));
  emit({"imap",
        "procpool",
        double(n),
        double(n),
        {s},
        {{"peak_rss_kib", {peak_rss_kib()}}, {"base_rss_kib", {base}}}});
}

// ---------------------------------------------------------------------------
// 8: a few heavy tasks. Sleeping tasks, so that 4 workers on a 2-core machine
// still overlap: what is measured is the scheduling, not the CPU.

struct heavy_scenario {
  int id;
  const char* what;
  unsigned workers;
  std::size_t chunk;  // 0: submit each task on its own
  std::vector<int> ms;
  int ideal_ms;
};

std::vector<heavy_scenario> heavy_scenarios() {
  return {{1, "2 submits of 300 ms, 2 workers", 2, 0, {300, 300}, 300},
          {2, "map of 4 x 300 ms, chunk 1, 4 workers", 4, 1, {300, 300, 300, 300}, 300},
          {3, "map of 8 x 300 ms, chunk 2, 4 workers", 4, 2, std::vector<int>(8, 300), 600},
          {4,
           "map of 400 ms then 4 x 100 ms, chunk 1, 2 workers",
           2,
           1,
           {400, 100, 100, 100, 100},
           400}};
}

void bench_heavy() {
  // Durations are scaled down for quick and validation runs.
  double scale = opts.validate ? 0.02 : opts.quick ? 0.25 : 1.0;
  int reps = opts.reps(3);
  auto task = [](int us) {
    ::usleep(static_cast<useconds_t>(us));
    return us;
  };
  for (auto& s : heavy_scenarios()) {
    if (!opts.wanted("procpool")) break;
    std::vector<int> us;
    for (int m : s.ms) us.push_back(static_cast<int>(m * scale * 1000));
    procpool::pool_options o;
    o.workers = s.workers;
    o.chunk_size = s.chunk;
    procpool::pool pool(task, o);
    pool.map(std::vector<int>(s.workers, 0));  // every worker started and warm
    record r{"heavy",           "procpool", double(s.id),
             double(us.size()), {},         {{"ideal_s", {s.ideal_ms * scale / 1e3}}}};
    for (int k = 0; k < reps; ++k) {
      auto t = clock_type::now();
      std::vector<int> got;
      if (s.chunk == 0) {
        std::vector<procpool::future<int>> fs;
        for (int u : us) fs.push_back(pool.submit(u));
        for (auto& f : fs) got.push_back(f.get());
      } else {
        got = pool.map(us);
      }
      r.samples.push_back(seconds_since(t));
      if (got != us) fail(fmt::format("heavy {}: wrong results", s.id));
    }
    emit(r);
  }
}

// ---------------------------------------------------------------------------
// 9: asynchronous tasks: many submits, then one wait; callbacks.

void bench_async() {
  if (!opts.wanted("procpool")) return;
  constexpr int tasks = 1'000;
  // A callback's round trip passes the pool's helper thread: fewer of them.
  int n = opts.validate ? 50 : opts.quick ? 200 : 2'000;
  int reps = opts.reps(5);
  procpool::pool pool([](int x) { return x + 1; }, 2);

  // `tasks` submits whose futures are kept, then procpool::wait for all of
  // them; each result checked inside the timed call, as Python's get() is.
  std::vector<procpool::future<int>> futures;
  futures.reserve(tasks);
  auto burst = [&] {
    futures.clear();
    for (int i = 0; i < tasks; ++i) futures.push_back(pool.submit(i));
    procpool::wait(futures);
    for (int i = 0; i < tasks; ++i) {
      int v = futures[static_cast<std::size_t>(i)].get();
      if (v != i + 1) fail(fmt::format("async: submit({}) gave {}", i, v));
    }
  };
  record r{"async", "procpool", double(tasks), double(tasks), {}, {}};
  r.samples = time_calls(reps, burst, [] {});
  emit(r);

  // submit(x).then(callback), the caller asleep on a condition variable that
  // the callback notifies: from submit to the caller awake.
  std::mutex mutex;
  std::condition_variable woken;
  bool done = false;
  int got = 0;
  long inline_calls = 0, calls = 0;
  const auto caller = std::this_thread::get_id();
  auto round_trip = [&](int i) {
    done = false;
    auto f = pool.submit(i);
    f.then([&](const int& v) {
      std::lock_guard<std::mutex> lock(mutex);
      got = v;
      done = true;
      // A task over before then() runs its callback at once, here.
      if (std::this_thread::get_id() == caller) ++inline_calls;
      woken.notify_one();
    });
    std::unique_lock<std::mutex> lock(mutex);
    woken.wait(lock, [&] { return done; });
    ++calls;
    return got;
  };
  record cb{"async", "procpool_then", 2, 1, {}, {{"p99", {}}, {"inline_share", {}}}};
  for (int rep = 0; rep < reps; ++rep) {
    inline_calls = calls = 0;
    auto st = time_round_trips("procpool then", n, round_trip);
    cb.samples.push_back(st.median);
    cb.extras[0].second.push_back(st.p99);
    cb.extras[1].second.push_back(double(inline_calls) / double(calls));
  }
  emit(cb);
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage =
      "usage: pool_bench [--quick] [--validate] [--json] [--items N] [--only IMPL,...] [--tag "
      "TAG]\n"
      "                  [tiny|chunks|cpu|latency|big|startup|imap|heavy|async]...\n"
      "  --quick      fewer items and repetitions\n"
      "  --validate   smallest sizes, one repetition, no timings: a correctness check\n"
      "  --json       one JSON object per result line, for bench/run.py\n"
      "  --items N    items of the imap case\n"
      "  --only LIST  only these implementations (procpool, floor, floor_into, serial,\n"
      "               threads, alloc, futex, pipe, memcpy, first_touch, fork), comma-separated\n"
      "  --tag TAG    append @TAG to every implementation's name\n"
      "Every result is checked; a wrong one exits with status 1.\n";
  std::vector<std::string> cases;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      opts.quick = true;
    } else if (a == "--validate") {
      opts.validate = true;
    } else if (a == "--json") {
      opts.json = true;
    } else if (a == "--items" && i + 1 < argc) {
      opts.imap_items = std::atoll(argv[++i]);
    } else if (a == "--only" && i + 1 < argc) {
      std::string list = argv[++i];
      for (std::size_t b = 0, e; b <= list.size(); b = e + 1) {
        e = std::min(list.find(',', b), list.size());
        if (e > b) opts.only.push_back(list.substr(b, e - b));
      }
    } else if (a == "--tag" && i + 1 < argc) {
      opts.tag = argv[++i];
    } else if (a == "-h" || a == "--help") {
      fmt::print("{}", usage);
      return 0;
    } else if (!a.empty() && a[0] != '-') {
      cases.push_back(a);
    } else {
      fmt::print(stderr, "{}", usage);
      return 2;
    }
  }
  const std::vector<std::pair<std::string, void (*)()>> all = {
      {"tiny", bench_tiny},       {"chunks", bench_chunks}, {"cpu", bench_cpu},
      {"latency", bench_latency}, {"big", bench_big},       {"startup", bench_startup},
      {"imap", bench_imap},       {"heavy", bench_heavy},   {"async", bench_async}};
  if (cases.empty())
    for (auto& [name, fn] : all) cases.push_back(name);
  for (auto& c : cases) {
    auto it = std::find_if(all.begin(), all.end(), [&](auto& e) { return e.first == c; });
    if (it == all.end()) {
      fmt::print(stderr, "pool_bench: no case named '{}'\n", c);
      return 2;
    }
    try {
      it->second();
    } catch (const std::exception& e) {
      fail(fmt::format("{}: {}", c, e.what()));
    }
  }
  if (opts.validate && !opts.json) fmt::print("pool_bench: every result checked\n");
  return 0;
}
