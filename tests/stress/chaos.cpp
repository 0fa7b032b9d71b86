// Chaos run: many maps on one pool whose function, chosen at random per item
// from a printed seed, returns, throws, aborts, SIGKILLs itself, exits, hangs
// past the task timeout, or allocates until its memory limit stops it.
//
// For every map it checks that the call either returned exactly the right
// results or raised exactly the right error for the lowest faulty item; a
// watchdog fails the run if a call hangs. Periodically and at the end it
// checks that no zombie is left, the descriptor count is back at its
// baseline and the parent's memory has not grown past a bound.
//
//   stress_chaos                  1000 maps (the long form, scripts/chaos)
//   stress_chaos --short          60 maps (ctest)
//   stress_chaos --maps N --seed S
#include <procpool/pool.hpp>

#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <dirent.h>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
// A worker that calls exit() would run LeakSanitizer over its whole heap
// first, long enough to pass the task timeout and be reported as a hang.
// The parent's leaks are what the RSS check looks for here.
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
#endif
#endif

namespace {

enum fault : int { none, throws, aborts, sigkill, exits, hangs, oom, fault_kinds };
const char* const fault_names[] = {"none",    "throw", "abort",        "SIGKILL",
                                   "exit(5)", "hang",  "out of memory"};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool sanitized = true;  // address-space limits break the sanitizers' shadow memory
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif
#else
constexpr bool sanitized = false;
#endif

struct item {
  int value;
  int kind;
};

std::size_t count_dir(const char* path) {
  std::size_t n = 0;
  if (DIR* d = ::opendir(path)) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

std::size_t open_fds() {
  return count_dir("/proc/self/fd") - 1;
}  // minus opendir's own

/// Children of this process, and how many of them are zombies.
std::pair<std::size_t, std::size_t> children() {
  std::size_t all = 0, zombies = 0;
  pid_t self = ::getpid();
  DIR* d = ::opendir("/proc");
  if (!d) return {0, 0};
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream stat(std::string("/proc/") + e->d_name + "/stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(line.c_str() + close + 1, " %c %d", &state, &ppid) != 2) continue;
    if (ppid != self) continue;
    ++all;
    if (state == 'Z') ++zombies;
  }
  ::closedir(d);
  return {all, zombies};
}

long rss_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

int run_item(const item& it) {
  switch (it.kind) {
    case throws:
      throw std::domain_error("injected fault at " + std::to_string(it.value));
    case aborts:
      std::abort();
    case sigkill:
      ::raise(SIGKILL);
      break;
    case exits:
      std::exit(5);
    case hangs:
      for (;;) ::pause();
    case oom: {
      // Address space, not pages: untouched blocks reach the limit at once,
      // so the fault costs microseconds rather than racing the task timeout.
      std::vector<std::unique_ptr<char[]>> hog;
      for (;;) {
        hog.emplace_back(new char[std::size_t(16) << 20]);
        static_cast<volatile char*>(hog.back().get())[0] = 1;  // not optimized away
      }
    }
    default:
      break;
  }
  return it.value * 2 + 1;
}

void on_watchdog(int) {
  const char msg[] = "chaos: FAILED: a map did not return within the watchdog bound (hang)\n";
  (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
  ::_exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t maps = 1000;
  unsigned long seed = std::random_device{}();
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--short")
      maps = 60;
    else if (a == "--maps" && i + 1 < argc)
      maps = std::stoul(argv[++i]);
    else if (a == "--seed" && i + 1 < argc)
      seed = std::stoul(argv[++i]);
    else {
      fmt::print(stderr, "usage: {} [--short] [--maps N] [--seed S]\n", argv[0]);
      return 64;
    }
  }
  fmt::print("chaos: {} maps, seed {}{}\n", maps, seed,
             sanitized ? " (sanitized build: no out-of-memory faults)" : "");
  std::fflush(stdout);

  using namespace std::chrono_literals;
  procpool::pool_options options;
  options.workers = 2;
  options.task_timeout = 400ms;  // a margin for a loaded machine
  if (!sanitized) {
    options.initializer = [] {
      // Each worker may use 64 MiB of address space beyond what it has.
      rlimit limit{};
      ::getrlimit(RLIMIT_AS, &limit);
      std::ifstream status("/proc/self/status");
      long vm_kib = 0;
      for (std::string line; std::getline(status, line);)
        if (line.rfind("VmSize:", 0) == 0) vm_kib = std::strtol(line.c_str() + 7, nullptr, 10);
      limit.rlim_cur = static_cast<rlim_t>(vm_kib + 64 * 1024) * 1024;
      ::setrlimit(RLIMIT_AS, &limit);
    };
  }
  procpool::pool p(run_item, options);

  std::signal(SIGALRM, on_watchdog);
  std::mt19937_64 rng(seed);
  std::map<int, std::size_t> injected;
  std::size_t wrong = 0, leaks = 0, ok_maps = 0, failed_maps = 0;
  auto fds = open_fds();
  long rss_start = 0;

  for (std::size_t m = 0; m < maps; ++m) {
    std::size_t n = 1 + rng() % 200;
    std::vector<item> items(n);
    // Most maps carry a fault or two, some none at all.
    double fault_rate = (rng() % 4 == 0) ? 0.0 : 0.01 + (rng() % 100) / 2000.0;
    std::size_t lowest = n;
    int lowest_kind = none;
    for (std::size_t i = 0; i < n; ++i) {
      items[i].value = static_cast<int>(rng() % 100000);
      items[i].kind = none;
      if (std::uniform_real_distribution<double>(0, 1)(rng) < fault_rate) {
        int kind = 1 + static_cast<int>(rng() % (fault_kinds - 1));
        if (kind == oom && sanitized) kind = throws;
        items[i].kind = kind;
        ++injected[kind];
        if (lowest == n) {
          lowest = i;
          lowest_kind = kind;
        }
      }
    }
    auto report = [&](const std::string& what) {
      ++wrong;
      fmt::print("chaos: map {}: WRONG: {} (lowest fault: item {} {})\n", m, what, lowest,
                 lowest < n ? fault_names[lowest_kind] : "none");
    };
    ::alarm(60);
    try {
      auto r = p.map(items);
      ++ok_maps;
      if (lowest != n) report("returned although an item was faulty");
      for (std::size_t i = 0; i < n && lowest == n; ++i)
        if (r[i] != items[i].value * 2 + 1) {
          report(fmt::format("result {} is {}, not {}", i, r[i], items[i].value * 2 + 1));
          break;
        }
    } catch (const procpool::task_error& e) {
      ++failed_maps;
      bool expect_oom = lowest_kind == oom && e.type_name() == "std::bad_alloc";
      bool expect_throw = lowest_kind == throws && e.type_name() == "std::domain_error";
      if (e.index() != lowest || !(expect_oom || expect_throw))
        report(fmt::format("task_error {}", e.what()));
    } catch (const procpool::worker_died& e) {
      ++failed_maps;
      procpool::exit_status want = lowest_kind == aborts    ? procpool::exit_status::killed(SIGABRT)
                                   : lowest_kind == sigkill ? procpool::exit_status::killed(SIGKILL)
                                                            : procpool::exit_status::exited(5);
      bool kind_ok = lowest_kind == aborts || lowest_kind == sigkill || lowest_kind == exits ||
                     lowest_kind == oom;  // the kernel may kill a worker out of memory
      bool status_ok = lowest_kind == oom || e.status() == want;
      if (e.index() != std::optional<std::size_t>(lowest) || !kind_ok || !status_ok)
        report(fmt::format("worker_died {}", e.what()));
    } catch (const procpool::timeout_error& e) {
      ++failed_maps;
      if (e.index() != lowest || lowest_kind != hangs)
        report(fmt::format("timeout_error {}", e.what()));
    } catch (const std::exception& e) {
      ++failed_maps;
      report(fmt::format("unexpected exception {}", e.what()));
    }
    ::alarm(0);

    if (m == 10) rss_start = rss_kib();
    if (m % 50 == 49 || m + 1 == maps) {
      auto [all, zombies] = children();
      auto now_fds = open_fds();
      if (zombies != 0 || all != options.workers || now_fds != fds) {
        ++leaks;
        fmt::print("chaos: map {}: LEAK: {} children ({} zombies), {} fds (baseline {})\n", m, all,
                   zombies, now_fds, fds);
      }
    }
  }
  long rss_growth = rss_start ? rss_kib() - rss_start : 0;
  // ASan keeps freed memory in quarantine (and lets it grow to its limit)
  // before reusing it, so a sanitized parent's RSS grows without a leak.
  bool rss_ok = rss_growth < (sanitized ? 512 : 32) * 1024;
  if (!rss_ok) {
    ++leaks;
    fmt::print("chaos: LEAK: parent RSS grew by {} KiB\n", rss_growth);
  }
  p.join();
  auto [all, zombies] = children();
  if (all != 0) {
    ++leaks;
    fmt::print("chaos: LEAK: {} children ({} zombies) after join\n", all, zombies);
  }

  std::size_t faults = 0;
  std::string by_kind;
  for (int k = 1; k < fault_kinds; ++k) {
    faults += injected[k];
    by_kind += fmt::format("{}{} {}", k == 1 ? "" : ", ", injected[k], fault_names[k]);
  }
  fmt::print("chaos: seed {}: {} maps ({} returned, {} raised), {} faults injected ({})\n", seed,
             maps, ok_maps, failed_maps, faults, by_kind);
  fmt::print("chaos: wrong results: {}, hangs: 0, leaks: {}, parent RSS growth: {} KiB\n", wrong,
             leaks, rss_growth);
  return wrong == 0 && leaks == 0 ? 0 : 1;
}
