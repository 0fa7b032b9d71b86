// Chaos run: many maps on one pool whose function, chosen at random per item
// from a printed seed, returns, throws, aborts, SIGKILLs itself, exits, hangs
// past the task timeout, allocates until its memory limit stops it, or lies:
// writes a hostile result frame into its own result ring. Between maps, at
// random, a forked child uses the pool (it must be refused there, and its
// copy's teardown must leave the parent's workers alone), a one-worker
// pool loses its worker while fork or pidfd_open is refused (it must get a
// replacement once they work again), and exceptions escape calls on the
// parent's side (an input iterator that throws mid-map, a loop over an imap
// range left by an exception while its chunks are out): nothing of those
// calls may stay in the pool.
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
#include <support/support.hpp>

#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <dirent.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
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

namespace procpool::detail {

/// The run's view of the engine's rings (declared by detail/engine/fork_engine.hpp).
struct engine_probe {
  static ring_control* result_ring(engine& e, std::size_t i) { return e.workers_[i].result; }
  /// The result ring's bytes when they are mirrored, else null (see `ring_writer`).
  static std::byte* result_bytes(engine& e, std::size_t i) { return e.workers_[i].result_bytes; }
  static eventcount* doorbell(engine& e) { return &e.shared_->doorbell; }
};

}  // namespace procpool::detail

namespace {

namespace pd = procpool::detail;

enum fault : int { none, throws, aborts, sigkill, exits, hangs, oom, lies, fault_kinds };
const char* const fault_names[] = {"none",    "throw", "abort",         "SIGKILL",
                                   "exit(5)", "hang",  "out of memory", "lie"};

/// What the workers need to lie, in memory shared with them.
struct lie_table {
  pd::ring_control* result[2] = {};
  std::byte* result_bytes[2] = {};
  pd::eventcount* doorbell = nullptr;
};
lie_table* liars = nullptr;

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

/// Children and grandchildren of this process (the pools' fork servers and
/// their workers), and how many of them are zombies.
std::pair<std::size_t, std::size_t> children() {
  struct entry {
    pid_t pid, ppid;
    char state;
  };
  std::vector<entry> all_processes;
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
    all_processes.push_back({static_cast<pid_t>(std::atoi(e->d_name)), ppid, state});
  }
  ::closedir(d);
  pid_t self = ::getpid();
  std::vector<pid_t> mine;
  for (auto& p : all_processes)
    if (p.ppid == self) mine.push_back(p.pid);
  std::size_t all = 0, zombies = 0;
  for (auto& p : all_processes) {
    bool child = p.ppid == self;
    bool grandchild = std::find(mine.begin(), mine.end(), p.ppid) != mine.end();
    if (!child && !grandchild) continue;
    ++all;
    if (p.state == 'Z') ++zombies;
  }
  return {all, zombies};
}

long rss_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

/// In a worker: writes a result frame that lies (which lie: from `seed`)
/// into its own result ring, then waits to be killed for it.
[[noreturn]] void lie(int seed) {
  const std::string& name = pd::current_process_name();
  std::size_t me = std::stoul(name.substr(name.rfind('-') + 1)) - 1;
  procpool::writer body;
  pd::result_header h{0, 0, 1, pd::frame_kind::results};
  switch (seed % 4) {
    case 0:
      body.write("abc", 3);  // shorter than a header
      break;
    case 1:
      h.count = 1u << 20;  // a count no chunk has
      body.write(&h, sizeof h);
      break;
    case 2:
      h.kind = static_cast<pd::frame_kind>(99);
      body.write(&h, sizeof h);
      break;
    default:
      h.call = ~std::uint64_t(0);  // a call never sent
      body.write(&h, sizeof h);
      procpool::encode(body, 0);
      break;
  }
  pd::ring_writer out(liars->result[me], liars->doorbell, liars->result_bytes[me]);
  out.write_message(body.data(), body.size(), [] { return true; });
  for (;;) ::pause();  // its own writer would write over the lie
}

/// Thrown by the parent's own code in the middle of a call.
struct escape : std::runtime_error {
  escape() : std::runtime_error("escaped from the caller's code") {}
};

int run_item(const item& it) {
  switch (it.kind) {
    case lies:
      lie(it.value);
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
  // The pool as pool<F> builds it (engine and call front), so that the run
  // can tell lying workers where their result rings are.
  int (*function)(const item&) = run_item;
  pd::engine_config config;
  config.workers = options.workers;
  config.initializer = options.initializer;
  config.task_timeout = options.task_timeout;
  config.function = &function;
  void* table =
      ::mmap(nullptr, sizeof(lie_table), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (table == MAP_FAILED) return 3;
  liars = new (table) lie_table();
  auto engine = std::make_shared<pd::engine>(std::move(config));
  pd::call_front<int (*)(const item&), pd::local_handlers> p(engine, 0, false, {});
  for (unsigned i = 0; i < options.workers; ++i) {
    liars->result[i] = pd::engine_probe::result_ring(*engine, i);
    liars->result_bytes[i] = pd::engine_probe::result_bytes(*engine, i);
  }
  liars->doorbell = pd::engine_probe::doorbell(*engine);

  // A one-worker pool whose worker dies while fork or pidfd_open is refused.
  procpool::pool_options solo_options;
  solo_options.workers = 1;
  procpool::pool solo(
      +[](int x) {
        if (x < 0) ::raise(SIGKILL);
        return x;
      },
      solo_options);
  std::size_t forked_uses = 0, refused_respawns = 0, escapes = 0;

  std::signal(SIGALRM, on_watchdog);
  std::mt19937_64 rng(seed);
  std::map<int, std::size_t> injected;
  std::size_t wrong = 0, leaks = 0, ok_maps = 0, failed_maps = 0;
  static const char* refused_call = nullptr;
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
    if (rng() % 8 == 0) {
      // A forked child uses the pool: refused there; its copy torn down there
      // leaves the parent's workers as they were.
      ++forked_uses;
      auto pids = engine->pids();
      pid_t child = ::fork();
      if (child == 0) {
        int code = 0;
        try {
          (void)p.map<pd::invoke_one>(items, "map");
          code = 1;
        } catch (const procpool::error& e) {
          if (std::string(e.what()).find("used in pid") == std::string::npos) code = 2;
        }
        engine->terminate();
        engine.reset();
        ::_exit(code);
      }
      int status = 0;
      ::waitpid(child, &status, 0);
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        report(fmt::format("a forked child's use of the pool: status {:#x}", status));
      if (engine->pids() != pids) report("a forked child's teardown changed the parent's workers");
    }
    if (rng() % 10 == 0) {
      // The one-worker pool's worker dies while replacements are refused.
      ++refused_respawns;
      refused_call = rng() % 2 ? "fork" : "pidfd_open";
      pd::sys::fault_hook = [](const char* call) {
        return std::strcmp(call, refused_call) == 0 ? EAGAIN : 0;
      };
      bool died = false, refused = false;
      try {
        (void)solo.map(std::vector<int>{-1});
      } catch (const procpool::worker_died&) {
        died = true;
      } catch (const std::exception&) {
      }
      try {
        (void)solo.map(std::vector<int>{1});
      } catch (const std::system_error&) {
        refused = true;
      } catch (const std::exception&) {
      }
      pd::sys::fault_hook = nullptr;
      if (!died || !refused)
        report(fmt::format("refused {}: died {}, refused {}", refused_call, died, refused));
      if (solo.map(std::vector<int>{1, 2, 3}) != std::vector<int>{1, 2, 3})
        report("the one-worker pool did not recover");
    }
    if (rng() % 6 == 0) {
      // Exceptions escape calls on the parent's side; the map below, on the
      // same pool, must then come back exactly right.
      ++escapes;
      std::vector<item> clean(1 + rng() % 200);
      for (auto& c : clean) c = item{static_cast<int>(rng() % 100000), none};
      std::size_t at = rng() % clean.size();
      procpool_test::computed_range input(clean.size(), [&](std::size_t i) -> const item& {
        if (i == at) throw escape();
        return clean[i];
      });
      try {
        (void)p.map<pd::invoke_one>(input, "map");
        report("an input that threw went unnoticed");
      } catch (const escape&) {
      } catch (const std::exception& e) {
        report(fmt::format("an input that threw raised {}", e.what()));
      }
      try {
        std::size_t seen = 0;
        for (int r : p.imap<true>(clean)) {
          if (r != clean[seen].value * 2 + 1) report(fmt::format("imap result {} is {}", seen, r));
          if (++seen > at) throw escape();
        }
        report("an imap loop ran past its escape");
      } catch (const escape&) {
      } catch (const std::exception& e) {
        report(fmt::format("an imap loop left by an exception raised {}", e.what()));
      }
    }
    try {
      auto r = p.map<pd::invoke_one>(items, "map");
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
    } catch (const procpool::error& e) {
      ++failed_maps;
      // A lie fails its call once the chunk it lied about was resent and lied about again.
      if (lowest_kind != lies ||
          std::string(e.what()).find("bad result frame") == std::string::npos)
        report(fmt::format("procpool::error {}", e.what()));
    } catch (const std::exception& e) {
      ++failed_maps;
      report(fmt::format("unexpected exception {}", e.what()));
    }
    ::alarm(0);

    if (m == 10) rss_start = rss_kib();
    if (m % 50 == 49 || m + 1 == maps) {
      auto [all, zombies] = children();
      auto now_fds = open_fds();
      // Each pool's workers, and its fork server.
      if (zombies != 0 || all != options.workers + solo_options.workers + 2 || now_fds != fds) {
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
  engine->join();
  solo.join();
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
  fmt::print(
      "chaos: {} uses from forked children, {} deaths while respawn was refused, {} calls left "
      "by exceptions twice each\n",
      forked_uses, refused_respawns, escapes);
  fmt::print("chaos: wrong results: {}, hangs: 0, leaks: {}, parent RSS growth: {} KiB\n", wrong,
             leaks, rss_growth);
  return wrong == 0 && leaks == 0 ? 0 : 1;
}
