// A pool under use its authors did not plan for: called from a forked child,
// destroyed by exit() in one of its own workers, left without workers while
// fork is refused, fed hostile result frames by a worker, and its workers
// stopped, orphaning children or dying while the pool is idle.
//
// Scenarios that may hang on a defect, or that change process-wide state
// (static pools, exit handlers), run in a harness process of their own that
// reports through its exit code; the test bounds its wait for it.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;
using procpool::pool;
using procpool::process;
using procpool_test::block_forever;

namespace pd = procpool::detail;

namespace procpool::detail {

/// The tests' view of an engine's internals (declared by detail/engine/fork_engine.hpp).
struct engine_probe {
  static ring_control* result_ring(engine& e, std::size_t i) { return e.workers_[i].result; }
  /// The result ring's bytes when they are mirrored, else null (see `ring_writer`).
  static std::byte* result_bytes(engine& e, std::size_t i) { return e.workers_[i].result_bytes; }
  static eventcount* doorbell(engine& e) { return &e.shared_->doorbell; }
  static std::uint64_t next_call_id(const engine& e) { return e.dispatch_.next_call_id(); }
  static worker_slot* slot(engine& e, std::size_t i) { return e.workers_[i].slot; }
  static std::size_t queue_depth(const engine& e) { return e.queue_depth(); }
  static constexpr std::size_t max_depth = engine::max_inflight;
};

}  // namespace procpool::detail

namespace {

/// Exit codes of the harnesses.
enum verdict : int { as_expected = 0, wrong = 1, no_error = 2 };

std::vector<int> iota_vector(int n, int from = 0) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), from);
  return v;
}

/// True while process `pid` runs (not a zombie, not gone).
bool running(pid_t pid) {
  char s = procpool_test::process_state(pid);
  return s != '?' && s != 'Z' && s != 'X';
}

/// Zombie children of this process.
std::size_t zombie_children(const std::vector<pid_t>& pids) {
  std::size_t n = 0;
  for (pid_t p : pids)
    if (procpool_test::process_state(p) == 'Z') ++n;
  return n;
}

/// Descriptors open in process `pid`.
std::size_t fd_count_of(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/fd";
  std::size_t n = 0;
  if (DIR* d = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

/// Waits until process `pid` is in state `state` (at most 10 s); true if it got there.
bool reaches_state(pid_t pid, char state) {
  auto end = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < end) {
    if (procpool_test::process_state(pid) == state) return true;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

/// Memory shared by the test and every process it forks, zeroed.
template <class T>
T* shared_block() {
  void* p = ::mmap(nullptr, sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  return new (p) T();
}

}  // namespace

// ---------------------------------------------------------------------------
// A pool belongs to the process that made it.

TEST_CASE("a pool called from a forked child throws there and the parent's calls stay right",
          "[hostile][fork]") {
  procpool_test::go_signal go;  // item -1 waits for it, so the child's copy of its call is open
  int go_fd = go.fds.first.get();
  pool p(
      [go_fd](int x) {
        if (x == -1) {
          char c;
          pd::sys::read_some(go_fd, &c, 1);
        }
        return x * 3;
      },
      2u);
  auto pids = p.pids();
  std::vector<int> xs = iota_vector(1000);
  auto pending = p.submit(-1);
  (void)pending.wait_for(0ms);  // sent; it cannot be answered before the go
  auto range = p.imap(iota_vector(100));

  process child([&] {
    // Each use must throw procpool::error naming both pids; bit k of the
    // exit code says use k did not.
    auto foreign = [](auto&& use) { return procpool_test::refused_in_fork(use); };
    int code = 0;
    if (!foreign([&] { (void)p.map(iota_vector(100)); })) code |= 1;
    if (!foreign([&] { (void)p.submit(1).get(); })) code |= 2;
    if (!foreign([&] { (void)pending.get(); })) code |= 4;
    if (!foreign([&] {
          for (int r : range) (void)r;
        }))
      code |= 8;
    if (!foreign([&] { p.join(); })) code |= 16;
    procpool::exit_process(code);
  });
  go.give();
  // Meanwhile the parent maps: every result must be its own.
  auto r = p.map(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) REQUIRE(r[i] == xs[i] * 3);
  CHECK(child.join() == exit_status::exited(0));
  auto got = pending.get_for(20s);
  REQUIRE(got.has_value());
  CHECK(*got == -3);
  int k = 0;
  for (int v : range) CHECK(v == 3 * k++);
  CHECK(k == 100);
  CHECK(p.pids() == pids);
  CHECK(p.map(std::vector<int>{5}) == std::vector<int>{15});
}

TEST_CASE("a pool's copy destroyed in a forked child stops none of the parent's workers",
          "[hostile][fork]") {
  std::optional<pool<int (*)(int)>> p;
  p.emplace(
      +[](int x) { return x + 1; }, 3u);
  auto pids = p->pids();
  auto pending = p->submit(41);
  (void)pending.wait_for(0ms);
  auto fds = procpool_test::open_fd_count();
  pid_t child = procpool_test::spawn([&] {
    // The child's copy: its destructor (and the future's) must release only
    // this process's own handles, and return at once.
    auto start = std::chrono::steady_clock::now();
    { auto f = std::move(pending); }
    p.reset();
    bool quick = std::chrono::steady_clock::now() - start < 500ms;
    return quick && procpool_test::open_fd_count() < fds ? 0 : 1;
  });
  bool ended = procpool_test::gone_within(child, 20s);
  if (!ended) ::kill(child, SIGKILL);
  REQUIRE(ended);
  CHECK(procpool_test::reap(child) == exit_status::exited(0));
  for (pid_t w : pids) CHECK(running(w));
  auto got = pending.get_for(20s);
  REQUIRE(got.has_value());
  CHECK(*got == 42);
  CHECK(p->map(iota_vector(50)) == iota_vector(50, 1));
  CHECK(p->pids() == pids);
}

TEST_CASE("an executor used from a forked child throws there", "[hostile][fork]") {
  procpool::executor ex(2);
  process child([&] {
    try {
      (void)ex
          .submit(
              +[](int x) { return x; }, 1)
          .get();
    } catch (const procpool::error& e) {
      procpool::exit_process(
          std::string(e.what()).find("used in pid") != std::string::npos ? as_expected : wrong);
    }
    procpool::exit_process(no_error);
  });
  CHECK(child.join() == exit_status::exited(as_expected));
  CHECK(ex.submit(
              +[](int x) { return x * 2; }, 4)
            .get() == 8);
}

namespace {

int exit_at_five(int x) {
  if (x == 5) std::exit(3);  // runs static destructors in the worker
  return x * 2;
}

/// A pool of static storage duration: std::exit in a worker destroys the
/// worker's copy of it.
pool<int (*)(int)>& static_pool() {
  static pool<int (*)(int)> p(exit_at_five, [] {
    procpool::pool_options o;
    o.workers = 2;
    o.chunk_size = 1;
    return o;
  }());
  return p;
}

}  // namespace

TEST_CASE("exit() in a worker of a static pool: worker_died, and the pool goes on",
          "[hostile][fork]") {
  process harness([] {
    auto& p = static_pool();
    for (int round = 0; round < 4; ++round) {
      try {
        (void)p.map(iota_vector(12));
        procpool::exit_process(no_error);
      } catch (const procpool::worker_died& e) {
        // The worker's exit status is its own exit code (3), whatever its
        // static destructors did to its copy of the pool.
        if (e.index() != std::optional<std::size_t>(5) || !e.status().is_exited())
          procpool::exit_process(wrong);
      }
      if (p.map(iota_vector(5, 6)) != std::vector<int>{12, 14, 16, 18, 20})
        procpool::exit_process(wrong);
    }
    procpool::exit_process(as_expected);
  });
  auto status = harness.join_for(60s);
  if (!status) harness.kill();
  REQUIRE(status.has_value());  // no hang
  CHECK(*status == exit_status::exited(as_expected));
}

// ---------------------------------------------------------------------------
// A lone worker replaced once resources return.

TEST_CASE("a one-worker pool whose replacement was refused gets a worker once fork works again",
          "[hostile]") {
  const char* refused_call = GENERATE("fork", "pidfd_open");
  INFO("refused: " << refused_call);
  static const char* refused;
  static bool refuse;
  refused = refused_call;
  refuse = false;
  pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        return x;
      },
      1u);
  procpool::detail::sys::fault_hook = [](const char* call) {
    return refuse && std::strcmp(call, refused) == 0 ? EMFILE : 0;
  };
  refuse = true;
  CHECK_THROWS_AS(p.map(std::vector<int>{-1}), procpool::worker_died);
  CHECK_THROWS_AS(p.map(std::vector<int>{1}), std::system_error);  // no worker, none forkable
  refuse = false;
  procpool::detail::sys::fault_hook = nullptr;
  auto f = p.submit(7);
  auto got = f.get_for(20s);
  REQUIRE(got.has_value());  // not a hang
  CHECK(*got == 7);
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{1, 2});
}

// ---------------------------------------------------------------------------
// Hostile result frames: a worker writes into its own result ring a frame
// that lies, then goes on as usual.

namespace {

/// What the test tells the workers, in memory they all share.
struct hostile_table {
  pd::ring_control* result[4] = {};
  std::byte* result_bytes[4] = {};
  pd::eventcount* doorbell = nullptr;
  std::uint64_t call = 0;         // id of the call under test
  std::atomic<int> lies_left{0};  // how many lies workers still tell
  std::atomic<pid_t> liar{0};     // the last worker that lied
  int kind = 0;                   // which lie (see `lie`)
};

enum lie_kind : int {
  count_past_chunk,  // results for 4096 more items than the chunk holds
  three_bytes,       // a frame shorter than a header
  other_call,        // a call id the parent never sent
  other_first,       // a first index outside the chunk
  unknown_kind,      // a frame kind that does not exist
  short_count,       // fewer results than the chunk's items, as if all were done
  trailing_bytes,    // the right header and a wrong result, then bytes nobody asked for
  error_elsewhere,   // an error frame naming an item outside the chunk
  huge_size,         // a length prefix near 2^64
  empty_part,        // a part of the answer with no result (more would follow, forever)
  whole_part,        // a part of the answer holding the whole chunk (more would follow)
  lie_kinds,
  partial_prefix,  // half a length prefix, then silence: a slow worker, not a liar
};
const char* const lie_names[] = {
    "count past the chunk",    "3-byte frame",          "another call id",
    "a first index elsewhere", "unknown kind",          "short count",
    "trailing bytes",          "error index elsewhere", "huge size",
    "an empty part",           "a part that is whole"};

hostile_table* table = nullptr;

/// This worker's index, from its name "pool-worker-N".
std::size_t my_worker_index() {
  const std::string& name = pd::current_process_name();
  return std::stoul(name.substr(name.rfind('-') + 1)) - 1;
}

/// In a worker running item `x` (its index: chunks of one item): writes one lie.
void lie(int x) {
  pd::result_header h{table->call, static_cast<std::uint64_t>(x), 1, pd::frame_kind::results};
  procpool::writer body;
  body.write(&h, sizeof h);
  switch (table->kind) {
    case count_past_chunk:
      h.count = 1 + 4096;
      body.clear();
      body.write(&h, sizeof h);
      for (int k = 0; k < 4097; ++k) procpool::encode(body, int(-1));
      break;
    case three_bytes:
      body.clear();
      body.write("abc", 3);
      break;
    case other_call:
      h.call += 1000;
      std::memcpy(body.data(), &h, sizeof h);
      procpool::encode(body, int(-1));
      break;
    case other_first:
      h.first += 1000;
      std::memcpy(body.data(), &h, sizeof h);
      procpool::encode(body, int(-1));
      break;
    case unknown_kind:
      h.kind = static_cast<pd::frame_kind>(77);
      std::memcpy(body.data(), &h, sizeof h);
      procpool::encode(body, int(-1));
      break;
    case short_count:
      h.count = 0;
      std::memcpy(body.data(), &h, sizeof h);
      break;
    case empty_part:
      h.count = 0;
      h.kind = pd::frame_kind::part;
      std::memcpy(body.data(), &h, sizeof h);
      break;
    case whole_part:
      h.kind = pd::frame_kind::part;
      std::memcpy(body.data(), &h, sizeof h);
      procpool::encode(body, x * x);
      break;
    case trailing_bytes:
      procpool::encode(body, int(-1));
      procpool::encode(body, std::uint64_t(12345));
      break;
    case error_elsewhere:
      h.kind = pd::frame_kind::error;
      h.count = 0;
      std::memcpy(body.data(), &h, sizeof h);
      procpool::encode(body, std::uint64_t(0));  // item 0: never in a chunk sent to a liar
      procpool::encode(body, std::string("std::runtime_error"));
      procpool::encode(body, std::string("made up"));
      procpool::encode(body, false);  // no exception object
      break;
    case partial_prefix: {
      pd::ring_writer out(table->result[my_worker_index()], table->doorbell,
                          table->result_bytes[my_worker_index()]);
      out.put("\x10\x00", 2);
      out.publish();
      return;
    }
    case huge_size: {
      pd::ring_writer out(table->result[my_worker_index()], table->doorbell,
                          table->result_bytes[my_worker_index()]);
      std::uint64_t size = ~std::uint64_t(0) - 4;
      out.put(&size, sizeof size);
      out.put(body.data(), body.size());
      out.publish();
      return;
    }
  }
  pd::ring_writer out(table->result[my_worker_index()], table->doorbell,
                      table->result_bytes[my_worker_index()]);
  out.write_message(body.data(), body.size(), [] { return true; });
}

int lying_square(int x) {
  if (x > 0 && table->lies_left.fetch_sub(1) > 0) {
    table->liar = ::getpid();
    lie(x);
    // Its own writer would write over the lie (it does not know of it):
    // the liar waits for the parent's verdict instead.
    block_forever();
  }
  return x * x;
}

/// A pool made of the engine and the call front, as pool<F> makes them, so
/// that the test can reach the engine's rings.
struct bare_pool {
  int (*f)(int) = lying_square;
  std::shared_ptr<pd::engine> engine;
  pd::call_front<int (*)(int), pd::local_handlers> calls;

  explicit bare_pool(unsigned workers) {
    pd::engine_config c;
    c.workers = workers;
    c.function = &f;
    engine = std::make_shared<pd::engine>(std::move(c));
    calls = pd::call_front<int (*)(int), pd::local_handlers>(engine, 1, false, {});
    for (unsigned i = 0; i < workers; ++i) {
      table->result[i] = pd::engine_probe::result_ring(*engine, i);
      table->result_bytes[i] = pd::engine_probe::result_bytes(*engine, i);
    }
    table->doorbell = pd::engine_probe::doorbell(*engine);
  }
  std::vector<int> map(const std::vector<int>& xs) {
    table->call = pd::engine_probe::next_call_id(*engine);
    return calls.map<pd::invoke_one>(xs, "map");
  }
  /// As `pool::terminate`: inside the engine's lock (its helper thread may
  /// be driving it), then the helper stopped.
  void terminate() {
    engine->enter();
    engine->terminate();
    engine->leave();
    engine->stop_helper();
  }
};

std::vector<int> squares(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i * i;
  return v;
}

}  // namespace

TEST_CASE("a worker that lies once in a result frame is replaced and its chunk resent",
          "[hostile]") {
  table = shared_block<hostile_table>();
  bare_pool p(2);
  for (int kind = 0; kind < lie_kinds; ++kind) {
    INFO("lie: " << lie_names[kind]);
    table->kind = kind;
    table->lies_left = 1;
    table->liar = 0;
    std::vector<int> got;
    try {
      got = p.map(iota_vector(8));
      CHECK(got == squares(8));
    } catch (const procpool::error& e) {
      // Bytes past the results are seen only once the results were taken:
      // that call fails, naming the worker, rather than being resent.
      CHECK(kind == trailing_bytes);
      CHECK_THAT(e.what(), Catch::Contains("worker " + std::to_string(table->liar.load())));
    }
    CHECK(table->liar != 0);
    CHECK_FALSE(running(table->liar));  // killed, and reaped
    auto now = p.engine->pids();
    CHECK(std::find(now.begin(), now.end(), table->liar.load()) == now.end());
    CHECK(std::count(now.begin(), now.end(), 0) == 0);
    CHECK(p.map(iota_vector(20)) == squares(20));
  }
}

TEST_CASE("a worker that keeps lying fails the call with an error naming it, the pool goes on",
          "[hostile]") {
  table = shared_block<hostile_table>();
  bare_pool p(1);
  for (int kind = 0; kind < lie_kinds; ++kind) {
    INFO("lie: " << lie_names[kind]);
    table->kind = kind;
    table->lies_left = 2;  // the first worker and the one the chunk is resent to
    table->liar = 0;
    try {
      (void)p.map(iota_vector(4));
      FAIL("the call returned although every answer for item 1 was a lie");
    } catch (const procpool::error& e) {
      std::string what = e.what();
      CHECK_THAT(what, Catch::Contains("worker " + std::to_string(table->liar.load())));
      CHECK_THAT(what, Catch::Contains("frame"));
    }
    table->lies_left = 0;
    CHECK(p.map(iota_vector(10)) == squares(10));
  }
}

TEST_CASE(
    "workers publish how long a chunk takes, and garbage there moves the queue depth only "
    "within its bounds",
    "[hostile]") {
  table = shared_block<hostile_table>();
  table->lies_left = 0;
  bare_pool p(2);
  // Chunks of one item, many queued: each worker times those it found waiting.
  CHECK(p.map(iota_vector(20000)) == squares(20000));
  std::int64_t published = 0;
  for (std::size_t i = 0; i < 2; ++i)
    published = std::max(
        published, pd::engine_probe::slot(*p.engine, i)->chunk_ns.load(std::memory_order_relaxed));
  CHECK(published > 0);
  // The slots are in memory the workers write: a worker may leave anything there.
  for (std::int64_t garbage :
       {std::numeric_limits<std::int64_t>::max(), std::numeric_limits<std::int64_t>::min(),
        std::int64_t(-1), std::int64_t(1), std::int64_t(0)}) {
    INFO("chunk_ns = " << garbage);
    for (std::size_t i = 0; i < 2; ++i)
      pd::engine_probe::slot(*p.engine, i)->chunk_ns.store(garbage);
    auto depth = pd::engine_probe::queue_depth(*p.engine);
    CHECK(depth >= 2);
    CHECK(depth <= pd::engine_probe::max_depth);
    CHECK(p.map(iota_vector(3000)) == squares(3000));
  }
}

TEST_CASE("garbage in the doorbell the workers ring costs at most a late wake-up, never a result",
          "[hostile]") {
  // The doorbell (an eventcount) is in memory every worker can write: its
  // epoch word, with the bit that says a waiter announced itself, and its
  // count of waiters. Whatever a worker leaves there, the parent either
  // wakes as usual or sleeps out its slice and looks again.
  table = shared_block<hostile_table>();
  table->lies_left = 0;
  bare_pool p(2);
  pd::eventcount* bell = pd::engine_probe::doorbell(*p.engine);
  const std::uint32_t words[] = {0u, 1u, 2u, 0x7FFFFFFFu, 0xFFFFFFFEu, 0xFFFFFFFFu};
  for (std::uint32_t seq : words) {
    for (std::uint32_t waiters : words) {
      INFO("seq = " << seq << ", waiters = " << waiters);
      bell->seq.store(seq);
      bell->waiters.store(waiters);
      CHECK(p.map(iota_vector(300)) == squares(300));
    }
  }
  // And scribbled on while maps run.
  std::atomic<bool> done{false};
  std::thread scribbler([&] {
    std::uint32_t x = 12345;
    while (!done.load()) {
      x = x * 1103515245u + 12345u;
      bell->seq.store(x);
      bell->waiters.store(x >> 7);
      std::this_thread::yield();
    }
  });
  for (int round = 0; round < 5; ++round) CHECK(p.map(iota_vector(2000)) == squares(2000));
  done = true;
  scribbler.join();
  CHECK(p.map(iota_vector(100)) == squares(100));
}

// ---------------------------------------------------------------------------
// Descriptor and process hygiene.

TEST_CASE("every worker holds the same descriptors: none of its siblings'", "[hostile][fork]") {
  auto [rd, wr] = pd::sys::make_pipe();
  int wfd = wr.get();
  procpool::pool_options o;
  o.workers = 4;
  o.initializer = [wfd] { pd::sys::write_all(wfd, "r", 1); };  // runs once the worker is set up
  pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        return x;
      },
      o);
  char ready[4];
  REQUIRE(procpool_test::read_exactly(rd.get(), ready, 4));
  auto counts = [&] {
    std::vector<std::size_t> n;
    for (pid_t w : p.pids()) n.push_back(fd_count_of(w));
    return n;
  };
  auto first = counts();
  INFO("descriptors per worker: " << Catch::Detail::stringify(first));
  CHECK(std::count(first.begin(), first.end(), first[0]) == 4);
  // A replacement, forked while its siblings run, holds no more.
  CHECK_THROWS_AS(p.map(std::vector<int>{1, -1, 2}), procpool::worker_died);
  REQUIRE(procpool_test::read_exactly(rd.get(), ready, 1));
  auto later = counts();
  INFO("after a replacement: " << Catch::Detail::stringify(later));
  CHECK(later == first);
}

TEST_CASE("a worker killed while the pool is idle is reaped and replaced at the next call",
          "[hostile][fork]") {
  pool p([](int x) { return x; }, 2u);
  auto pids = p.pids();
  REQUIRE(::kill(pids[0], SIGKILL) == 0);
  // Its pidfd is readable once every thread of it has ended (a sanitizer's
  // own thread may outlive the main one, which shows 'Z' first).
  REQUIRE(procpool_test::gone_within(pids[0], 10s));
  REQUIRE(reaches_state(pids[0], 'Z'));
  // Any call reaps it: here a map with nothing to do, then pids().
  CHECK(p.map(std::vector<int>{}).empty());
  CHECK(zombie_children(pids) == 0);
  auto now = p.pids();
  CHECK(now[0] != pids[0]);
  CHECK(now[0] != 0);
  CHECK(running(now[0]));
  CHECK(now[1] == pids[1]);

  REQUIRE(::kill(now[1], SIGKILL) == 0);
  REQUIRE(procpool_test::gone_within(now[1], 10s));
  REQUIRE(reaches_state(now[1], 'Z'));
  auto again = p.pids();
  CHECK(zombie_children({now[1]}) == 0);
  CHECK(again[1] != now[1]);
}

TEST_CASE("a dead worker's own children are killed with it", "[hostile][fork]") {
  enum how : int { dies, times_out, pool_destroyed };
  int mode = GENERATE(int(dies), int(times_out), int(pool_destroyed));
  INFO("mode " << mode);
  auto [rd, wr] = pd::sys::make_pipe();
  int wfd = wr.get();
  procpool::pool_options o;
  o.workers = 1;
  if (mode == times_out) o.task_timeout = 300ms;
  pid_t grandchild = 0;
  {
    pool p(
        [wfd, mode](int) -> int {
          pid_t c = ::fork();
          if (c == 0) block_forever();  // a child of the worker: not the pool's
          pd::sys::write_all(wfd, &c, sizeof c);
          if (mode == dies) ::raise(SIGKILL);
          block_forever();
        },
        o);
    auto f = p.submit(1);
    (void)f.wait_for(0ms);  // sent
    REQUIRE(procpool_test::read_exactly(rd.get(), &grandchild, sizeof grandchild));
    if (mode == pool_destroyed) {
      p.terminate();
    } else {
      CHECK_THROWS_AS(f.get(), procpool::error);
    }
  }
  bool gone = procpool_test::gone_within(grandchild, 2000ms);
  if (!gone) ::kill(grandchild, SIGKILL);
  CHECK(gone);
}

TEST_CASE("a stopped worker does not make the pool's destructor wait forever", "[hostile][fork]") {
  auto [rd, wr] = pd::sys::make_pipe();
  int wfd = wr.get();
  process harness([wfd] {
    pool p(
        [wfd](int x) {
          pid_t me = ::getpid();
          pd::sys::write_all(wfd, &me, sizeof me);
          ::raise(SIGSTOP);
          return x;
        },
        1u);
    auto f = p.submit(1);
    (void)f.wait_for(0ms);  // sent
    auto start = std::chrono::steady_clock::now();
    // Wait until the worker stopped, then leave: ~future, ~pool.
    for (;;) {
      auto pids = p.pids();
      if (pids[0] != 0 && procpool_test::process_state(pids[0]) == 'T') break;
      std::this_thread::sleep_for(1ms);
      if (std::chrono::steady_clock::now() - start > 10s) procpool::exit_process(wrong);
    }
    return;
  });
  wr.reset();
  pid_t worker = 0;
  REQUIRE(procpool_test::read_exactly(rd.get(), &worker, sizeof worker));
  auto status = harness.join_for(20s);
  if (!status) {
    harness.kill();
    ::kill(worker, SIGKILL);
  }
  REQUIRE(status.has_value());  // bounded
  CHECK(*status == exit_status::exited(0));
  CHECK(procpool_test::gone_within(worker, 1000ms));
}

TEST_CASE("the pool reaches waitpid and kill through the system-call seam", "[hostile]") {
  static int waits, kills;
  waits = kills = 0;
  pool p([](int) -> int { block_forever(); }, 2u);
  auto f = p.submit(1);
  (void)f.wait_for(0ms);
  pd::sys::fault_hook = [](const char* call) {
    if (std::strcmp(call, "waitpid") == 0 || std::strcmp(call, "waitid") == 0) ++waits;
    if (std::strcmp(call, "kill") == 0) ++kills;
    return 0;
  };
  p.terminate();
  pd::sys::fault_hook = nullptr;
  CHECK(waits >= 2);
  CHECK(kills >= 2);
}

TEST_CASE("a worker that writes half a length prefix and falls silent: a wait keeps its deadline",
          "[hostile]") {
  table = shared_block<hostile_table>();
  bare_pool p(1);
  table->kind = partial_prefix;
  table->lies_left = 1;
  table->call = pd::engine_probe::next_call_id(*p.engine);
  auto f = p.calls.submit<pd::invoke_one>(1);
  auto start = std::chrono::steady_clock::now();
  auto got = f.get_for(300ms);  // before: the two bytes kept it spinning, past any deadline
  auto took = std::chrono::steady_clock::now() - start;
  CHECK_FALSE(got.has_value());
  CHECK(took < 5s);
  p.terminate();  // the silent worker holds the task for good
}
