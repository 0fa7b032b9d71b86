// process: exit codes and signals reported exactly, exceptions in the child,
// terminate/kill/join_for, no zombie and no leaked descriptor in any state,
// stdio flushed before the fork, the threaded-fork warning, moved-from
// objects, current_process() and cpu_count().
#include <procpool/process.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <catch2/catch.hpp>
#include <support/support.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;
using procpool::process;
using procpool::process_options;

namespace {

/// Blocks the calling process until a signal ends it.
[[noreturn]] void sleep_forever() {
  for (;;) ::pause();
}

using procpool_test::capture_stderr;
using procpool_test::capture_stdout;

}  // namespace

TEST_CASE("exit codes are reported exactly", "[process]") {
  for (int code : {0, 1, 3, 42, 255}) {
    process p([code] { procpool::exit_process(code); });
    exit_status s = p.join();
    CHECK(s.is_exited());
    CHECK(s.code() == code);
    CHECK(s.success() == (code == 0));
    CHECK(s == exit_status::exited(code));
  }
  process ok([] {});
  CHECK(ok.join() == exit_status::exited(0));
  CHECK(ok.join().to_string() == "exited with code 0");  // join again: same answer
}

TEST_CASE("signals are reported exactly", "[process]") {
  for (int sig : {SIGKILL, SIGTERM, SIGSEGV, SIGABRT, SIGUSR1}) {
    process p([sig] {
      ::signal(sig, SIG_DFL);
      ::raise(sig);
      sleep_forever();
    });
    exit_status s = p.join();
    CHECK(s.is_signaled());
    CHECK(s.signal() == sig);
    CHECK(s.code() == 0);
    CHECK_FALSE(s.success());
  }
  process p([] { ::raise(SIGKILL); });
  CHECK(p.join().to_string() == "killed by signal 9 (SIGKILL)");
  CHECK(fmt::format("{}", p.join()) == "killed by signal 9 (SIGKILL)");
}

TEST_CASE("arguments are passed to the callable in the child", "[process]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  std::vector<int> big(10000, 7);
  process p(
      [wfd](int a, const std::string& b, const std::vector<int>& v) {
        std::string msg =
            fmt::format("{} {} {}", a, b, v.size() + static_cast<std::size_t>(v[9999]));
        procpool::detail::sys::write_all(wfd, msg.data(), msg.size());
      },
      5, std::string("five"), big);
  wr.reset();
  CHECK(p.join().success());
  char buf[64] = {};
  std::size_t n = procpool::detail::sys::read_some(rd.get(), buf, sizeof buf);
  CHECK(std::string(buf, n) == "5 five 10007");
}

TEST_CASE("an exception escaping the child's callable becomes exit code 1 and a message",
          "[process]") {
  std::string err = capture_stderr([] {
    process p(process_options{"parser", false},
              [] { throw std::invalid_argument("bad header in input.csv"); });
    CHECK(p.join() == exit_status::exited(1));
    process q([] { throw 42; });
    CHECK(q.join() == exit_status::exited(1));
  });
  CHECK_THAT(err, Catch::Contains("process 'parser'"));
  CHECK_THAT(err, Catch::Contains("std::invalid_argument"));
  CHECK_THAT(err, Catch::Contains("bad header in input.csv"));
  CHECK_THAT(err, Catch::Contains("unknown type"));
}

TEST_CASE("terminate and kill end a running child and say how", "[process]") {
  process a([] { sleep_forever(); });
  CHECK(a.alive());
  a.terminate();
  CHECK(a.join() == exit_status::killed(SIGTERM));
  CHECK_FALSE(a.alive());

  procpool_test::go_signal ignoring;
  process b([&ignoring] {
    ::signal(SIGTERM, SIG_IGN);  // terminate() can be ignored, kill() cannot
    ignoring.give();
    sleep_forever();
  });
  REQUIRE(ignoring.await());
  b.terminate();
  CHECK_FALSE(b.join_for(50ms).has_value());
  CHECK(b.alive());
  b.kill();
  CHECK(b.join() == exit_status::killed(SIGKILL));

  // Signalling a reaped child is a no-op, never a signal to a reused pid.
  b.kill();
  b.terminate();
  CHECK(b.join() == exit_status::killed(SIGKILL));
}

TEST_CASE("join_for times out on a running child and returns the status once it ends",
          "[process]") {
  procpool_test::go_signal go;
  process p([&go] {
    go.await();
    procpool::exit_process(9);
  });
  auto start = std::chrono::steady_clock::now();
  CHECK_FALSE(p.join_for(100ms).has_value());
  CHECK(std::chrono::steady_clock::now() - start >= 100ms);
  CHECK_FALSE(p.join_for(0ms).has_value());
  CHECK_FALSE(p.status().has_value());
  go.give();
  auto s = p.join_for(60s);
  REQUIRE(s.has_value());
  CHECK(*s == exit_status::exited(9));
  CHECK(p.status() == s);
  CHECK_FALSE(p.joinable());
  CHECK(p.join_for(0ms) == s);
}

TEST_CASE("alive() reaps an ended child so no zombie stays", "[process]") {
  procpool_test::go_signal go;
  process p([&go] { go.await(); });
  CHECK(p.alive());
  go.give();
  REQUIRE(p.join_for(60s).has_value());
  CHECK(procpool_test::process_state(p.pid()) == '?');  // reaped: gone from /proc
  CHECK_FALSE(p.alive());
}

TEST_CASE("no zombie and no leaked descriptor after processes in every state", "[process]") {
  auto fds = procpool_test::open_fd_count();
  auto children = procpool_test::child_count();
  {
    process finished([] {});
    REQUIRE(finished.join().success());
    process running([] {});  // destroyed unjoined: the destructor joins
    process exited_unreaped([] {});
    process killed([] { sleep_forever(); });
    killed.kill();
    process empty;
    process moved_from([] {});
    process moved_to(std::move(moved_from));
    process assigned([] {});
    assigned = process([] { procpool::exit_process(4); });
    CHECK(assigned.join() == exit_status::exited(4));
    std::vector<process> many;
    for (int i = 0; i < 20; ++i) many.emplace_back([] {});
  }
  CHECK(procpool_test::child_count() == children);
  CHECK(procpool_test::open_fd_count() == fds);
}

TEST_CASE("text buffered before the fork is printed once, by the parent", "[process]") {
  // The parent's stdout is a file here, so stdio buffers fully: without the
  // flush before fork the child would inherit "before" and print it again.
  std::string out = capture_stdout([] {
    std::printf("before;");
    std::cout << "c++ before;";
    process p([] { std::printf("child;"); });
    REQUIRE(p.join().success());
    std::printf("after;");
  });
  CHECK(out == "before;c++ before;child;after;");
}

TEST_CASE("forking a parent that runs other threads warns once on stderr", "[process]") {
  std::mutex m;
  std::condition_variable cv;
  bool stop = false;
  std::thread helper([&] {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return stop; });
  });
  procpool::detail::warned_threaded_fork = false;
  std::string err = capture_stderr([] {
    process a([] {});
    process b([] {});
    a.join();
    b.join();
  });
  {
    std::lock_guard lock(m);
    stop = true;
  }
  cv.notify_all();
  helper.join();
  CHECK_THAT(err, Catch::Contains("warning: forking a process that runs"));
  CHECK(err.find("warning") == err.rfind("warning"));  // once, not per fork
}

TEST_CASE("a moved-from process is inert", "[process]") {
  process a([] { procpool::exit_process(6); });
  pid_t pid = a.pid();
  process b(std::move(a));
  CHECK(b.pid() == pid);
  CHECK(a.pid() == -1);  // NOLINT(bugprone-use-after-move): the state is specified
  CHECK_FALSE(a);
  CHECK_FALSE(a.joinable());
  CHECK_FALSE(a.alive());
  CHECK_FALSE(a.status().has_value());
  CHECK_THROWS_AS(a.join(), std::logic_error);
  CHECK_THROWS_AS(a.kill(), std::logic_error);
  CHECK(b.join() == exit_status::exited(6));
  process empty;
  CHECK_THROWS_WITH(empty.join_for(1ms), Catch::Contains("empty"));
}

TEST_CASE("names: given, defaulted, and seen by current_process() in the child", "[process]") {
  CHECK(procpool::current_process().name == "main");
  CHECK(procpool::current_process().pid == ::getpid());
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  auto report = [wfd] {
    auto me = procpool::current_process();
    std::string msg = fmt::format("{}:{};", me.name, me.pid);
    procpool::detail::sys::write_all(wfd, msg.data(), msg.size());
  };
  process named(process_options{"loader", false}, report);
  REQUIRE(named.join().success());
  process unnamed(report);
  REQUIRE(unnamed.join().success());
  wr.reset();
  std::string got;
  char buf[256];
  for (std::size_t n; (n = procpool::detail::sys::read_some(rd.get(), buf, sizeof buf)) > 0;)
    got.append(buf, n);
  CHECK(named.name() == "loader");
  CHECK_THAT(unnamed.name(), Catch::StartsWith("process-"));
  CHECK(got == fmt::format("loader:{};{}:{};", named.pid(), unnamed.name(), unnamed.pid()));
}

TEST_CASE("die_with_parent: the child goes when the process that started it dies", "[process]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int wfd = wr.get();
  // A middle process starts a grandchild that dies with it, reports its pid,
  // then is killed; the grandchild must go too.
  process middle([wfd] {
    process grandchild(process_options{"orphan", true}, [] { sleep_forever(); });
    pid_t pid = grandchild.pid();
    procpool::detail::sys::write_all(wfd, &pid, sizeof pid);
    sleep_forever();
  });
  wr.reset();
  pid_t grandchild = 0;
  REQUIRE(procpool::detail::sys::read_some(rd.get(), &grandchild, sizeof grandchild) ==
          sizeof grandchild);
  auto fd = procpool::detail::sys::pidfd_open(grandchild);
  middle.kill();
  CHECK(middle.join() == exit_status::killed(SIGKILL));
  // The grandchild was re-parented to init (or a subreaper), which reaps it;
  // wait on its pidfd for it to end.
  REQUIRE(fd);
  pollfd p{fd.get(), POLLIN, 0};
  CHECK(procpool::detail::sys::poll(&p, 1, 60'000) == 1);
}

TEST_CASE("fork failure is a system_error naming the call, and starts nothing", "[process]") {
  auto children = procpool_test::child_count();
  procpool::detail::sys::fault_hook = [](const char* call) {
    return std::string(call) == "fork" ? EAGAIN : 0;
  };
  try {
    process p([] {});
    procpool::detail::sys::fault_hook = nullptr;
    FAIL("fork did not fail");
  } catch (const std::system_error& e) {
    procpool::detail::sys::fault_hook = nullptr;
    CHECK(e.code() == std::errc::resource_unavailable_try_again);
    CHECK_THAT(e.what(), Catch::Contains("fork"));
  }
  CHECK(procpool_test::child_count() == children);
}

TEST_CASE("cpu_count honours the affinity mask, the cgroup quota and the override", "[process]") {
  unsigned n = procpool::cpu_count();
  CHECK(n >= 1);
  CHECK(n <= std::thread::hardware_concurrency());

  // Affinity: a child pinned to one CPU counts one.
  process pinned([] {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (::sched_setaffinity(0, sizeof set, &set) != 0) procpool::exit_process(2);
    procpool::exit_process(procpool::cpu_count() == 1 ? 0 : 1);
  });
  CHECK(pinned.join() == exit_status::exited(0));

  // The environment override wins; nonsense is ignored.
  process overridden([] {
    ::setenv("PROCPOOL_CPU_COUNT", "13", 1);
    bool ok = procpool::cpu_count() == 13;
    ::setenv("PROCPOOL_CPU_COUNT", "zero", 1);
    ok = ok && procpool::cpu_count() >= 1 && procpool::cpu_count() != 13;
    procpool::exit_process(ok ? 0 : 1);
  });
  CHECK(overridden.join() == exit_status::exited(0));

  // cgroup v2 cpu.max lines, rounded up.
  using procpool::detail::parse_cpu_max;
  CHECK(parse_cpu_max("max 100000") == std::nullopt);
  CHECK(parse_cpu_max("150000 100000") == 2u);
  CHECK(parse_cpu_max("100000 100000") == 1u);
  CHECK(parse_cpu_max("50000 100000") == 1u);
  CHECK(parse_cpu_max("400000 100000") == 4u);
  CHECK(parse_cpu_max("") == std::nullopt);
  CHECK(parse_cpu_max("garbage") == std::nullopt);
  CHECK(parse_cpu_max("-1 100000") == std::nullopt);
}
