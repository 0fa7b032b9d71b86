// pool<F>: results, laziness, futures, and every failure of the contract
// provoked for real (throwing, dying, hanging workers, a dying parent).
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <malloc.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <list>
#include <map>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::pool;
using procpool::pool_options;

using procpool_test::block_forever;

namespace {

std::vector<int> iota_vector(int n, int from = 0) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), from);
  return v;
}

/// True while process `pid` exists (a reaped pid is gone).
bool is_alive(pid_t pid) {
  return ::kill(pid, 0) == 0;
}

struct point {
  int x;
  double y;
  std::string label;
};

}  // namespace

TEST_CASE("map returns results in input order for any range", "[pool]") {
  pool p([](int x) { return x * x; }, 2u);
  REQUIRE(p.workers() == 2);

  auto xs = iota_vector(10000);
  auto r = p.map(xs);
  REQUIRE(r.size() == xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) REQUIRE(r[i] == xs[i] * xs[i]);

  std::array<int, 5> arr{1, 2, 3, 4, 5};
  CHECK(p.map(arr) == std::vector<int>{1, 4, 9, 16, 25});
  std::list<int> lst{3, 1, 2};
  CHECK(p.map(lst) == std::vector<int>{9, 1, 4});
  CHECK(p.map(std::vector<int>{}).empty());
  std::set<int> s{5, 6};
  CHECK(p.map(s) == std::vector<int>{25, 36});
}

TEST_CASE("map carries strings, aggregates and captured state", "[pool]") {
  std::string suffix = "!";
  pool p(
      [suffix](const point& pt) {
        return pt.label + std::to_string(pt.x) + suffix + std::to_string(static_cast<int>(pt.y));
      },
      2u);
  std::vector<point> in{{1, 2.5, "a"}, {2, 3.5, "b"}, {3, 4.5, "c"}};
  CHECK(p.map(in) == std::vector<std::string>{"a1!2", "b2!3", "c3!4"});

  pool q([](int n) { return std::vector<int>(static_cast<std::size_t>(n), n); }, 2u);
  auto r = q.map(std::vector<int>{0, 1, 3});
  CHECK(r[0].empty());
  CHECK(r[2] == std::vector<int>{3, 3, 3});
}

TEST_CASE("chunk sizes from 1 up give the same results", "[pool]") {
  auto xs = iota_vector(1000);
  for (std::size_t chunk : {1u, 7u, 100u, 5000u}) {
    pool_options o;
    o.workers = 2;
    o.chunk_size = chunk;
    pool p([](int x) { return 3 * x + 1; }, o);
    auto r = p.map(xs);
    for (std::size_t i = 0; i < xs.size(); ++i) REQUIRE(r[i] == 3 * xs[i] + 1);
  }
}

TEST_CASE("items and results larger than the rings are streamed", "[pool]") {
  pool_options o;
  o.workers = 2;
  o.ring_bytes = 64 * 1024;
  pool p(
      [](const std::vector<char>& v) {
        std::vector<char> out(v.rbegin(), v.rend());
        return out;
      },
      o);
  std::vector<std::vector<char>> in;
  for (std::size_t size : {std::size_t(1), std::size_t(65535), std::size_t(65536),
                           std::size_t(65537), std::size_t(3) << 20}) {
    std::vector<char> v(size);
    for (std::size_t i = 0; i < size; ++i) v[i] = static_cast<char>(i * 31 + size);
    in.push_back(v);
  }
  auto r = p.map(in);
  REQUIRE(r.size() == in.size());
  for (std::size_t k = 0; k < in.size(); ++k)
    REQUIRE(r[k] == std::vector<char>(in[k].rbegin(), in[k].rend()));
}

TEST_CASE("starmap passes tuple elements as arguments", "[pool]") {
  pool p([](int a, const std::string& b) { return b + std::to_string(a); }, 2u);
  std::vector<std::tuple<int, std::string>> in{{1, "x"}, {2, "y"}};
  CHECK(p.starmap(in) == std::vector<std::string>{"x1", "y2"});
  std::vector<std::pair<int, std::string>> pairs{{3, "z"}};
  CHECK(p.starmap(pairs) == std::vector<std::string>{"z3"});
}

TEST_CASE("a function returning void maps for its effects", "[pool]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int fd = wr.get();
  pool p([fd](int x) { (void)::write(fd, &x, 1); }, 2u);
  p.map(std::vector<int>{1, 2, 3});
  char buf[8];
  REQUIRE(::read(rd.get(), buf, sizeof buf) == 3);
}

/// An endless input range that counts how many items were read from it.
struct counter {
  long* produced;
  struct iterator {
    using iterator_category = std::input_iterator_tag;
    using value_type = long;
    using difference_type = std::ptrdiff_t;
    using pointer = const long*;
    using reference = long;
    long* produced;
    long value;
    long operator*() const { return value; }
    iterator& operator++() {
      ++value;
      ++*produced;
      return *this;
    }
    bool operator!=(const iterator&) const { return true; }
    bool operator==(const iterator&) const { return false; }
  };
  iterator begin() const { return {produced, 0}; }
  iterator end() const { return {produced, -1}; }
};

TEST_CASE("imap yields in input order, lazily, from an endless source", "[pool]") {
  pool p([](long x) { return x * 2; }, 2u);
  auto r = p.imap(std::vector<long>{5, 6, 7});
  std::vector<long> got(r.begin(), r.end());
  CHECK(got == std::vector<long>{10, 12, 14});

  // An endless generator: only what is consumed (plus a bounded window) is read.
  long produced = 0;
  {
    long expect = 0;
    for (long v : p.imap(counter{&produced})) {
      REQUIRE(v == expect * 2);
      if (++expect == 20000) break;
    }
  }
  CHECK(produced >= 20000);
  CHECK(produced < 20000 + 200000);  // bounded read-ahead
  // The abandoned call does not disturb the next one.
  CHECK(p.map(std::vector<long>{1, 2}) == std::vector<long>{2, 4});
}

TEST_CASE("imap_unordered yields every index exactly once", "[pool]") {
  pool p([](int x) { return -x; }, 2u);
  std::map<std::size_t, int> seen;
  for (auto [index, value] : p.imap_unordered(iota_vector(5000))) {
    REQUIRE(seen.count(index) == 0);
    seen[index] = value;
  }
  REQUIRE(seen.size() == 5000);
  for (auto& [i, v] : seen) REQUIRE(v == -static_cast<int>(i));
}

TEST_CASE("submit returns futures that drive the pool", "[pool]") {
  pool p([](int a, int b) { return a * b; }, 2u);
  auto f1 = p.submit(6, 7);
  auto f2 = p.submit(2, 3);
  CHECK(f2.get() == 6);
  CHECK(f1.wait_for(10s));
  CHECK(f1.ready());
  CHECK(f1.get() == 42);
  CHECK_THROWS_AS(f1.get(), procpool::error);  // the result was moved out
  procpool::future<int> empty;
  CHECK_FALSE(empty.valid());
  CHECK_THROWS_AS(empty.get(), procpool::error);

  // A map in between does not lose a pending future's result.
  auto f3 = p.submit(5, 5);
  std::vector<std::tuple<int, int>> in{{1, 1}, {2, 2}};
  CHECK(p.starmap(in) == std::vector<int>{1, 4});
  auto r = f3.get_for(10s);
  REQUIRE(r);
  CHECK(*r == 25);
}

TEST_CASE("a future whose task blocks times out, and get_for says so", "[pool]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  int fd = rd.get();
  pool p(
      [fd](int) {
        char c;
        return static_cast<int>(::read(fd, &c, 1));
      },
      1u);
  auto f = p.submit(0);
  CHECK_FALSE(f.wait_for(50ms));
  CHECK_FALSE(f.get_for(10ms).has_value());
  char c = 'x';
  REQUIRE(::write(wr.get(), &c, 1) == 1);
  CHECK(f.get() == 1);
}

TEST_CASE("an exception in F raises task_error for the lowest failing index", "[pool][errors]") {
  pool_options o;
  o.workers = 2;
  o.chunk_size = 3;
  pool p(
      [](int x) {
        if (x % 100 == 57) throw std::invalid_argument("bad item " + std::to_string(x));
        return x;
      },
      o);
  auto xs = iota_vector(1000);
  try {
    (void)p.map(xs);
    FAIL("map did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 57);
    CHECK(e.type_name() == "std::invalid_argument");
    CHECK(e.message() == "bad item 57");
    auto pids = p.pids();
    CHECK(std::find(pids.begin(), pids.end(), e.pid()) != pids.end());
    CHECK(std::string(e.what()).find("item 57") != std::string::npos);
  }
  // The pool is usable afterwards, with the same workers.
  auto ok = p.map(iota_vector(50));
  CHECK(ok == iota_vector(50));

  // Futures carry the error too.
  auto f = p.submit(157);
  CHECK_THROWS_AS(f.get(), procpool::task_error);

  // And imap raises when iteration reaches the failing item, not before.
  std::vector<int> seen;
  try {
    for (int v : p.imap(iota_vector(200))) seen.push_back(v);
    FAIL("imap did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 57);
  }
  CHECK(seen == iota_vector(57));
}

TEST_CASE("imap waits for the results before a failure that arrives first", "[pool][errors]") {
  // Items 0 and 1 go to the first worker (two chunks in flight each) and
  // take a while; item 2 fails at once on the second. The failure reaches
  // the parent first, and imap must still yield items 0 and 1 (it used to
  // spin without collecting anything, forever). The sleep is the workload:
  // on a machine too slow for the failure to come first the test still holds.
  pool_options o;
  o.workers = 2;
  o.chunk_size = 1;
  pool p(
      [](int x) {
        if (x < 2) std::this_thread::sleep_for(200ms);
        if (x == 2) throw std::runtime_error("item two");
        return x;
      },
      o);
  for (int round = 0; round < 3; ++round) {
    std::vector<int> seen;
    try {
      for (int v : p.imap(iota_vector(10))) seen.push_back(v);
      FAIL("imap did not throw");
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == 2);
    }
    CHECK(seen == std::vector<int>{0, 1});
  }
}

TEST_CASE("a worker that dies raises worker_died naming the item, signal or code",
          "[pool][errors][fork]") {
  auto before_children = procpool_test::child_count();
  struct death {
    int how;
    procpool::exit_status expected;
  };
  std::vector<death> deaths{
      {1, procpool::exit_status::killed(SIGKILL)},
      {2, procpool::exit_status::killed(SIGABRT)},
      {3, procpool::exit_status::exited(3)},
      {4, procpool::exit_status::killed(SIGSEGV)},
  };
  for (auto& d : deaths) {
    pool_options o;
    o.workers = 2;
    o.chunk_size = 4;
    int how = d.how;
    pool p(
        [how](int x) {
          if (x == 42) {
            switch (how) {
              case 1:
                ::raise(SIGKILL);
                break;
              case 2:
                std::abort();
              case 3:
                std::exit(3);
              case 4:
                // The default action, as a stray pointer gets it (a sanitizer
                // would otherwise catch the signal and exit with a code).
                ::signal(SIGSEGV, SIG_DFL);
                ::raise(SIGSEGV);
                break;
            }
          }
          return x + 1;
        },
        o);
    auto old = p.pids();
    auto start = std::chrono::steady_clock::now();
    try {
      (void)p.map(iota_vector(100));
      FAIL("map did not throw");
    } catch (const procpool::worker_died& e) {
      auto elapsed = std::chrono::steady_clock::now() - start;
      CHECK(e.index() == std::optional<std::size_t>(42));
      CHECK(e.status() == d.expected);
      CHECK(std::find(old.begin(), old.end(), e.pid()) != old.end());
      // The contract is 100 ms; the bound here is loose for a loaded machine.
      CHECK(elapsed < 2s);
      // The dead worker was replaced.
      auto now = p.pids();
      CHECK(std::find(now.begin(), now.end(), e.pid()) == now.end());
    }
    auto r = p.map(iota_vector(41));
    CHECK(r == iota_vector(41, 1));
  }
  CHECK(procpool_test::child_count() == before_children);
}

TEST_CASE("a task past task_timeout raises timeout_error and its worker is replaced",
          "[pool][errors]") {
  pool_options o;
  o.workers = 2;
  o.chunk_size = 1;
  o.task_timeout = 200ms;
  pool p(
      [](int x) {
        if (x == 5) block_forever();
        return x;
      },
      o);
  auto old = p.pids();
  try {
    (void)p.map(iota_vector(10));
    FAIL("map did not throw");
  } catch (const procpool::timeout_error& e) {
    CHECK(e.index() == 5);
    CHECK(e.timeout() == 200ms);
    CHECK(std::find(old.begin(), old.end(), e.pid()) != old.end());
    CHECK_FALSE(is_alive(e.pid()));
  }
  // The pool goes on with a fresh worker (inputs past the one that blocks).
  CHECK(p.map(iota_vector(20, 6)) == iota_vector(20, 6));
}

TEST_CASE("worker_spin: zero and long spins give the same results, a negative one is refused",
          "[pool]") {
  auto f = [](int x) { return x * 2 + 1; };
  std::vector<int> xs(2000);
  for (int i = 0; i < 2000; ++i) xs[static_cast<std::size_t>(i)] = i - 1000;
  std::vector<int> want;
  for (int x : xs) want.push_back(f(x));
  for (auto spin : {std::chrono::nanoseconds(0), std::chrono::nanoseconds(200us)}) {
    procpool::pool_options o;
    o.workers = 2;
    o.worker_spin = spin;
    o.chunk_size = 3;
    procpool::pool p(f, o);
    CHECK(p.map(xs) == want);
    for (int i = 0; i < 50; ++i) CHECK(p.submit(i).get() == f(i));
  }
  procpool::pool_options bad;
  bad.workers = 1;
  bad.worker_spin = std::chrono::nanoseconds(-1);
  try {
    procpool::pool p(f, bad);
    FAIL("a negative worker_spin was accepted");
  } catch (const procpool::error& e) {
    CHECK(std::string(e.what()).find("worker_spin") != std::string::npos);
  }
}

#if defined(__GLIBC__) && \
    !defined(PROCPOOL_TEST_SANITIZED)  // a sanitizer's allocator has its own rules
TEST_CASE("worker_keep_memory: a worker decodes big items into memory it kept, not fresh pages",
          "[pool]") {
  // An 8 MiB item decoded into a new vector, and copied by the function, came
  // in fresh pages in the worker at every item: glibc maps blocks that size
  // afresh, or gives the heap's top back to the kernel once two are freed.
  // In a child, with the allocator as a fresh program has it (this test
  // program's earlier tests moved glibc's thresholds, and workers inherit them).
  procpool::process harness([] {
    ::mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    const std::size_t size = std::size_t(8) << 20;
    std::vector<std::vector<char>> items;
    for (std::size_t k = 0; k < 6; ++k) items.emplace_back(size, static_cast<char>('a' + k));
    auto copy = [](const std::vector<char>& v) { return std::vector<char>(v); };
    long faults[2] = {0, 0};
    for (int with_keep : {0, 1}) {
      pool_options o;
      o.workers = 1;
      o.chunk_size = 3;
      o.worker_keep_memory = with_keep ? std::size_t(64) << 20 : 0;
      pool p(copy, o);
      if (p.map(items) != items) procpool::exit_process(1);  // the first call grows the heap
      pid_t worker = p.pids().at(0);
      long before = procpool_test::minor_faults(worker);
      if (p.map(items) != items) procpool::exit_process(1);
      faults[with_keep] = procpool_test::minor_faults(worker) - before;
    }
    std::fprintf(stderr,
                 "worker page faults in a call: %ld with the allocator's defaults, %ld kept\n",
                 faults[0], faults[1]);
    // 6 items of 2,048 pages each, decoded and copied: 24,576 pages touched.
    if (faults[1] >= 600) procpool::exit_process(2);
    // Else this test could not tell the option from its absence.
    if (faults[0] < 6000) procpool::exit_process(3);
    // Any size is taken (clamped to what glibc accepts).
    pool_options huge;
    huge.workers = 1;
    huge.worker_keep_memory = std::numeric_limits<std::size_t>::max();
    pool h(copy, huge);
    if (h.map(items) != items) procpool::exit_process(4);
    procpool::exit_process(0);
  });
  CHECK(harness.join() == procpool::exit_status::exited(0));
}
#endif

TEST_CASE("max_tasks_per_child replaces workers without changing results", "[pool]") {
  pool_options o;
  o.workers = 2;
  o.max_tasks_per_child = 10;
  pool p([](int x) { return std::make_pair(x * 2, static_cast<int>(::getpid())); }, o);
  auto r = p.map(iota_vector(100));
  std::set<int> pids;
  for (std::size_t i = 0; i < r.size(); ++i) {
    REQUIRE(r[i].first == static_cast<int>(i) * 2);
    pids.insert(r[i].second);
  }
  CHECK(pids.size() >= 10);
  std::map<int, int> per_pid;
  for (auto& x : r) ++per_pid[x.second];
  for (auto& [pid, n] : per_pid) CHECK(n <= 10);
}

TEST_CASE("the initializer runs in every worker, a failing one is reported, not retried",
          "[pool]") {
  static int configured = 0;
  pool_options o;
  o.workers = 2;
  o.initializer = [] { configured = 7; };
  pool p([](int x) { return x + configured; }, o);
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{8, 9});

  pool_options bad;
  bad.workers = 2;
  bad.initializer = [] { throw std::runtime_error("no database"); };
  pool q([](int x) { return x; }, bad);
  try {
    (void)q.map(iota_vector(10));
    FAIL("map did not throw");
  } catch (const procpool::error& e) {
    CHECK(std::string(e.what()).find("initializer") != std::string::npos);
    CHECK(std::string(e.what()).find("no database") != std::string::npos);
  }
  CHECK_THROWS_AS(q.map(iota_vector(10)), procpool::error);
}

TEST_CASE("misuse fails loudly", "[pool]") {
  CHECK_THROWS_AS(pool([](int x) { return x; }, 0u), procpool::error);
  pool p([](int x) { return x; }, 1u);
  p.close();
  CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::pool_closed);
  CHECK_THROWS_AS(p.submit(1), procpool::pool_closed);
  p.join();
  CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::pool_closed);
}

TEST_CASE("progress reaches the total once, at the end", "[pool]") {
  std::vector<procpool::progress_info> reports;
  pool_options o;
  o.workers = 2;
  o.on_progress = [&](const procpool::progress_info& info) { reports.push_back(info); };
  pool p([](int x) { return x; }, o);
  (void)p.map(iota_vector(1000));
  REQUIRE_FALSE(reports.empty());
  CHECK(reports.back().done == 1000);
  CHECK(reports.back().total == 1000);
  for (std::size_t i = 1; i < reports.size(); ++i) CHECK(reports[i].done >= reports[i - 1].done);
  CHECK_THAT(procpool::format_progress({500, 1000, 1s}),
             Catch::Contains("500/1000") && Catch::Contains("ETA 0:01"));
  // At the end, the time it took instead of an estimate.
  auto last = procpool::format_progress({1000, 1000, 61s});
  CHECK_THAT(last, Catch::Contains("1000/1000") && Catch::Contains("in 1:01"));
  CHECK_THAT(last, !Catch::Contains("ETA"));
}

TEST_CASE("the count before a long last item is reported while it runs", "[pool]") {
  // Item 0 runs until the callback has seen every other item done. Those
  // finish within a tenth of a second of each other, so the last of their
  // counts is held back at first; it must still come while item 0 waits.
  procpool::semaphore gate(0);
  constexpr int n = 200;
  bool seen = false;
  pool_options o;
  o.workers = 2;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (!seen && info.done == n - 1) {
      seen = true;
      gate.release();
    }
  };
  pool p(
      [&gate](int x) {
        // Not forever: without the report, the map ends with a wrong result.
        if (x == 0 && !gate.try_acquire_for(20s)) return -1;
        return x;
      },
      o);
  for (int round = 0; round < 2; ++round) {
    seen = false;
    auto r = p.map(iota_vector(n), procpool::map_options{1});
    REQUIRE(seen);
    CHECK(r[0] == 0);
  }
}

TEST_CASE("no zombie, descriptor or mapping is left after any failure", "[pool][fork]") {
  auto fds = procpool_test::open_fd_count();
  auto children = procpool_test::child_count();
  auto maps = procpool_test::shared_mapping_count();
  for (int round = 0; round < 3; ++round) {
    pool_options o;
    o.workers = 2;
    o.task_timeout = 300ms;
    pool p(
        [](int x) {
          if (x == 1) throw std::runtime_error("x");
          if (x == 2) ::raise(SIGKILL);
          if (x == 3) block_forever();
          return x;
        },
        o);
    CHECK_THROWS_AS(p.map(std::vector<int>{0, 1}), procpool::task_error);
    CHECK_THROWS_AS(p.map(std::vector<int>{0, 2}), procpool::worker_died);
    CHECK_THROWS_AS(p.map(std::vector<int>{0, 3}), procpool::timeout_error);
    auto f = p.submit(0);
    (void)f;  // abandoned on purpose
  }
  CHECK(procpool_test::child_count() == children);
  CHECK(procpool_test::open_fd_count() == fds);
  CHECK(procpool_test::shared_mapping_count() == maps);
}

TEST_CASE("terminate stops workers that are busy", "[pool]") {
  auto children = procpool_test::child_count();
  {
    pool p([](int) { block_forever(); }, 2u);
    auto f = p.submit(0);
    CHECK_FALSE(f.wait_for(20ms));
    p.terminate();
    CHECK_THROWS_AS(f.get(), procpool::error);
    CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::pool_closed);
  }
  CHECK(procpool_test::child_count() == children);
}

TEST_CASE("when the parent is killed, every worker exits within a second", "[pool][fork]") {
  auto [rd, wr] = procpool::detail::sys::make_pipe();
  pid_t parent = ::fork();
  REQUIRE(parent >= 0);
  if (parent == 0) {
    // The parent-to-be-killed: a pool of four busy workers; it reports their pids.
    rd.reset();
    pool p([](int) { block_forever(); }, 4u);
    auto pids = p.pids();
    procpool::detail::sys::write_all(wr.get(), pids.data(), pids.size() * sizeof(pid_t));
    wr.reset();
    auto f = p.submit(0);
    (void)f.get();
    ::_exit(0);
  }
  wr.reset();
  std::vector<pid_t> workers(4);
  std::size_t got = 0;
  while (got < workers.size() * sizeof(pid_t)) {
    auto n =
        procpool::detail::sys::read_some(rd.get(), reinterpret_cast<char*>(workers.data()) + got,
                                         workers.size() * sizeof(pid_t) - got);
    REQUIRE(n > 0);
    got += n;
  }
  ::kill(parent, SIGKILL);
  int status;
  REQUIRE(::waitpid(parent, &status, 0) == parent);
  for (pid_t w : workers) CHECK(procpool_test::gone_within(w, 1000ms));
}
