// What happens to a pool when its surroundings fail: the parent killed in the
// middle of a map, Ctrl-C delivered to the whole process group, and the
// kernel refusing processes, memory or descriptors while the pool starts.
//
// Each scenario runs in a child process of its own (a "harness"), so limits
// and signals never touch the test program; the harness reports what it saw
// through its exit code and a pipe.
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;
using procpool::pool;
using procpool::process;

using procpool_test::block_forever;

namespace {

/// Reads the pids a harness wrote, `count` of them.
std::vector<pid_t> read_pids(int fd, std::size_t count) {
  std::vector<pid_t> pids(count);
  REQUIRE(procpool_test::read_exactly(fd, pids.data(), count * sizeof(pid_t)));
  return pids;
}

/// Exit codes of the harnesses that report a verdict.
enum verdict : int { as_expected = 0, wrong = 1, no_error = 2 };

/// In a worker: writes its pid to `fd`, saying it is inside an item.
void report_running(int fd) {
  pid_t me = ::getpid();
  procpool::detail::sys::write_all(fd, &me, sizeof me);
}

/// Options for `workers` workers that take one item at a time.
procpool::pool_options one_item_per_chunk(unsigned workers) {
  procpool::pool_options o;
  o.workers = workers;
  o.chunk_size = 1;
  return o;
}

volatile std::sig_atomic_t interrupted = 0;
void note_interrupt(int) {
  interrupted = 1;
}

}  // namespace

TEST_CASE("a parent killed in the middle of a map leaves no worker and nothing in /dev/shm",
          "[reliability][fork]") {
  auto shm_before = procpool_test::dev_shm_entries();
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  process parent([wfd] {
    pool p(
        [](int x) {
          if (x >= 4) block_forever();  // the map is under way when the parent dies
          return x;
        },
        4u);
    auto pids = p.pids();
    procpool::detail::sys::write_all(wfd, pids.data(), pids.size() * sizeof(pid_t));
    (void)p.map(std::vector<int>(1000, 7));
  });
  wr.reset();
  auto workers = read_pids(rd.get(), 4);
  parent.kill();
  CHECK(parent.join() == exit_status::killed(SIGKILL));
  for (pid_t w : workers) CHECK(procpool_test::gone_within(w, 1000ms));
  CHECK(procpool_test::dev_shm_entries() == shm_before);
}

TEST_CASE("Ctrl-C to the process group: by default the program ends and its workers with it",
          "[reliability][fork]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  process harness([wfd] {
    ::setpgid(0, 0);  // a group of its own, as a shell gives a job
    pool p(
        [wfd](int) -> int {
          report_running(wfd);
          block_forever();
        },
        one_item_per_chunk(2));
    (void)p.map(std::vector<int>(10, 1));
  });
  wr.reset();
  auto workers = read_pids(rd.get(), 2);         // both workers are inside an item
  REQUIRE(::kill(-harness.pid(), SIGINT) == 0);  // what the terminal does on Ctrl-C
  CHECK(harness.join() == exit_status::killed(SIGINT));
  for (pid_t w : workers) CHECK(procpool_test::gone_within(w, 1000ms));
}

TEST_CASE("Ctrl-C to the process group: a program that handles SIGINT keeps its workers",
          "[reliability][fork]") {
  // Each worker leads a process group of its own (so that its own children
  // can be killed with it): the terminal's SIGINT reaches the program, which
  // decides what to do, and not the workers in the middle of their items.
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  auto [go_rd, go_wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  int go = go_rd.get();
  process harness([wfd, go] {
    ::setpgid(0, 0);
    struct sigaction sa {};
    sa.sa_handler = note_interrupt;
    ::sigaction(SIGINT, &sa, nullptr);
    pool p(
        [wfd, go](int x) {
          report_running(wfd);
          char c;
          procpool::detail::sys::read_some(go, &c, 1);
          return x;
        },
        one_item_per_chunk(2));
    try {
      auto r = p.map(std::vector<int>(10, 1));
      bool ok = interrupted && r == std::vector<int>(10, 1);
      procpool::exit_process(ok ? as_expected : wrong);
    } catch (const procpool::error&) {
      procpool::exit_process(wrong);
    }
  });
  wr.reset();
  go_rd.reset();
  auto workers = read_pids(rd.get(), 2);  // both workers are inside an item
  for (pid_t w : workers) CHECK(::getpgid(w) == w);
  REQUIRE(::kill(-harness.pid(), SIGINT) == 0);  // what the terminal does on Ctrl-C
  procpool::detail::sys::write_all(go_wr.get(), "gggggggggg", 10);
  auto status = harness.join_for(60s);
  if (!status) harness.kill();
  REQUIRE(status.has_value());  // no hang
  CHECK(*status == exit_status::exited(as_expected));
  for (pid_t w : workers) CHECK(procpool_test::gone_within(w, 1000ms));
}

TEST_CASE("fork refused while a pool starts: system_error, and no partial pool left running",
          "[reliability]") {
  auto children = procpool_test::child_count();
  auto fds = procpool_test::open_fd_count();
  // The third fork fails, as under RLIMIT_NPROC (which root is exempt from):
  // the fork server's and one worker's have succeeded.
  static int forks;
  forks = 0;
  procpool::detail::sys::fault_hook = [](const char* call) {
    return std::strcmp(call, "fork") == 0 && ++forks == 3 ? EAGAIN : 0;
  };
  try {
    pool p([](int x) { return x; }, 4u);
    procpool::detail::sys::fault_hook = nullptr;
    FAIL("the pool started although fork failed");
  } catch (const std::system_error& e) {
    procpool::detail::sys::fault_hook = nullptr;
    CHECK(e.code() == std::errc::resource_unavailable_try_again);
    CHECK_THAT(e.what(), Catch::Contains("fork"));
  }
  CHECK(forks == 3);
  CHECK(procpool_test::child_count() == children);  // the server and its worker were reaped
  CHECK(procpool_test::open_fd_count() == fds);
}

TEST_CASE("fork refused when a worker must be replaced: the call fails, the pool recovers",
          "[reliability]") {
  pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        return x;
      },
      2u);
  static bool refuse;
  refuse = true;
  procpool::detail::sys::fault_hook = [](const char* call) {
    return refuse && std::strcmp(call, "fork") == 0 ? EAGAIN : 0;
  };
  CHECK_THROWS_AS(p.map(std::vector<int>{1, -1, 2}), procpool::worker_died);
  // With one worker gone and none forkable, a map either completes on the
  // survivor or reports the refusal; it never hangs.
  std::vector<int> got;
  try {
    got = p.map(std::vector<int>{1, 2, 3});
    CHECK(got == std::vector<int>{1, 2, 3});
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::resource_unavailable_try_again);
    CHECK_THAT(e.what(), Catch::Contains("fork"));
  }
  refuse = false;
  procpool::detail::sys::fault_hook = nullptr;
  CHECK(p.map(std::vector<int>{4, 5, 6}) == std::vector<int>{4, 5, 6});
  CHECK(p.pids().size() == 2);
}

TEST_CASE("shared memory refused: system_error naming mmap and the size", "[reliability]") {
  auto children = procpool_test::child_count();
  procpool::pool_options o;
  o.workers = 2;
  o.ring_bytes = std::size_t(1) << 46;  // 64 TiB per ring: more than any machine maps
  try {
    pool p([](int x) { return x; }, o);
    FAIL("the pool started with 64 TiB rings");
  } catch (const std::system_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("mmap"));
    CHECK_THAT(e.what(), Catch::Contains("bytes"));
  } catch (const procpool::error& e) {
    CHECK_THAT(e.what(), Catch::Contains("ring"));  // refused before mapping
  }
  CHECK(procpool_test::child_count() == children);
}

// Sanitized builds skip the tests that set resource limits: ASan reserves
// terabytes of address space, and UBSan's type checks need free descriptors.
#ifndef PROCPOOL_TEST_SANITIZED
TEST_CASE("an address-space limit refuses the mapping with a clear error", "[reliability][fork]") {
  // Sanitizers reserve terabytes of shadow memory, so this runs in plain builds only.
  process harness([] {
    rlimit limit{};
    ::getrlimit(RLIMIT_AS, &limit);
    limit.rlim_cur = 1024L * 1024 * 1024;  // 1 GiB: far below 2 workers x 2 x 1 GiB rings
    ::setrlimit(RLIMIT_AS, &limit);
    procpool::pool_options o;
    o.workers = 2;
    o.ring_bytes = std::size_t(1) << 30;
    try {
      pool p([](int x) { return x; }, o);
    } catch (const std::system_error& e) {
      bool ok = e.code() == std::errc::not_enough_memory &&
                std::string(e.what()).find("mmap") != std::string::npos;
      procpool::exit_process(ok ? as_expected : wrong);
    }
    procpool::exit_process(no_error);
  });
  CHECK(harness.join() == exit_status::exited(as_expected));
}
#endif

#ifndef PROCPOOL_TEST_SANITIZED
TEST_CASE("a low descriptor limit: the pool fails to start cleanly, or starts and works",
          "[reliability][fork]") {
  process harness([] {
    auto children = procpool_test::child_count();
    auto open = procpool_test::open_fd_count();
    rlimit limit{};
    ::getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = open + 16;  // room for sixteen more descriptors, not one per worker
    ::setrlimit(RLIMIT_NOFILE, &limit);
    bool failed_cleanly = false;
    try {
      pool p([](int x) { return x * 3; }, 32u);
      if (p.map(std::vector<int>{1, 2, 3}) != std::vector<int>{3, 6, 9})
        procpool::exit_process(wrong);
    } catch (const std::system_error& e) {
      failed_cleanly = e.code() == std::errc::too_many_files_open;
    }
    // Either way nothing is left behind.
    bool clean = procpool_test::child_count() == children && procpool_test::open_fd_count() == open;
    procpool::exit_process(clean && failed_cleanly ? as_expected : clean ? no_error : wrong);
  });
  auto status = harness.join();
  // Each worker holds a pidfd in the parent: 32 cannot fit in 16.
  CHECK(status == exit_status::exited(as_expected));
}
#endif
