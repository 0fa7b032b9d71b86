// The life of a call on a pool: what happens when it ends by an exception
// (the parent's encoding, the input's iterator, a result decoder, a progress
// callback), when the pool stops under it (terminate, join, the destructor),
// when it is entered again from a callback, and when a second thread uses it.
// Several cases are ports of CPython's _TestPool and test_concurrent_futures.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstddef>
#include <iterator>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using procpool::pool;
using procpool::pool_options;

namespace calls_test {

using procpool_test::touchy;  // a result whose decoder throws for 13

/// An item whose encoding throws for a negative value (the parent encodes items).
struct fragile {
  int v;
};
inline void procpool_encode(procpool::writer& out, const fragile& f) {
  if (f.v < 0) throw std::invalid_argument("cannot encode a negative fragile");
  procpool::encode(out, f.v);
}
inline fragile procpool_decode(procpool::reader& in, procpool::type_tag<fragile>) {
  return {procpool::decode<int>(in)};
}

struct say_when : std::runtime_error {
  say_when() : std::runtime_error("somebody said when") {}
};

/// CPython's exception_throwing_generator(total, when) as a single-pass C++
/// range: yields 0, 1, ... and throws `say_when` when it reaches `when` (from
/// `operator*`, or from `operator++` when `in_increment`).
class throwing_generator {
 public:
  throwing_generator(int total, int when, bool in_increment = false)
      : total_(total), when_(when), in_increment_(in_increment) {}
  struct sentinel {};
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    using pointer = const int*;
    using reference = int;
    iterator() = default;
    explicit iterator(const throwing_generator* g) : g_(g) {}
    int operator*() const {
      if (!g_->in_increment_ && i_ == g_->when_) throw say_when();
      return i_;
    }
    iterator& operator++() {
      ++i_;
      if (g_->in_increment_ && i_ == g_->when_) throw say_when();
      return *this;
    }
    void operator++(int) { ++*this; }
    bool operator==(const iterator& o) const { return done() == o.done(); }
    bool operator!=(const iterator& o) const { return !(*this == o); }

   private:
    bool done() const { return g_ == nullptr || i_ >= g_->total_; }
    const throwing_generator* g_ = nullptr;
    int i_ = 0;
  };
  iterator begin() const { return iterator(this); }
  iterator end() const { return iterator(); }

 private:
  int total_;
  int when_;
  bool in_increment_;
};

/// A sized forward range over 0 .. n-1 whose `operator*` throws at `when`.
auto throwing_forward(int n, int when) {
  return procpool_test::computed_range(static_cast<std::size_t>(n), [when](std::size_t i) {
    if (static_cast<int>(i) == when) throw say_when();
    return static_cast<int>(i);
  });
}

std::vector<int> iota_vector(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

/// Runs `body` in a forked child and requires it to exit with 0 within `limit`
/// (a hang is killed and reported, never waited for).
template <class Body>
void require_in_child_within(std::chrono::seconds limit, Body body) {
  pid_t pid = procpool_test::spawn(body);
  bool ended = procpool_test::gone_within(pid, limit);
  if (!ended) ::kill(pid, SIGKILL);
  auto status = procpool_test::reap(pid);
  INFO("child " << status.to_string());
  REQUIRE(ended);
  REQUIRE(status.success());
}

}  // namespace calls_test

using namespace calls_test;

// ---------------------------------------------------------------------------
// 1. An exception while the parent encodes fails that call, and only that call.

TEST_CASE("an item that cannot be encoded fails its map and leaves nothing behind", "[pool]") {
  pool p([](fragile f) { return f.v * 2; }, 2u);
  std::vector<fragile> bad{{1}, {-1}, {3}};
  REQUIRE_THROWS_AS(p.map(bad), std::invalid_argument);
  // A temporary input: a call left in the engine would read it after it is gone (ASan).
  REQUIRE_THROWS_AS(p.map(std::vector<fragile>{{4}, {5}, {-6}}), std::invalid_argument);
  REQUIRE(p.map(std::vector<fragile>{{7}}) == std::vector<int>{14});

  auto f = p.submit(fragile{-1});
  REQUIRE_THROWS_AS(f.get(), std::invalid_argument);
  REQUIRE(p.submit(fragile{21}).get() == 42);
  p.join();
}

TEST_CASE("an input iterator that throws fails its map, the next map works", "[pool]") {
  pool p([](int x) { return x + 1; }, 2u);
  REQUIRE_THROWS_AS(p.map(throwing_forward(100, 57)), say_when);
  // A single-pass input is read before the call starts: its error leaves nothing either.
  REQUIRE_THROWS_AS(p.map(throwing_generator(10, 4)), say_when);
  REQUIRE_THROWS_AS(p.map(throwing_generator(10, 4, true)), say_when);
  REQUIRE(p.map(iota_vector(5)) == std::vector<int>{1, 2, 3, 4, 5});
  p.join();
}

// ---------------------------------------------------------------------------
// 2. imap yields every result before the failing input position, then raises.
// CPython's test_imap_handle_iterable_exception: its pool loses the results of
// the failing chunk's good items (6 and 4 of 7); procpool yields all of them.

TEST_CASE("imap yields every result before an input error and then raises it", "[pool]") {
  pool_options o;
  o.workers = 2;
  struct shape {
    int total, when;
    std::size_t chunk;
    bool in_increment;
  };
  auto [total, when, chunk, in_increment] =
      GENERATE(values<shape>({{1, 0, 1, false},
                              {1, 0, 1, false},  // again: the pool is not left stuck
                              {10, 3, 1, false},
                              {20, 7, 2, false},
                              {20, 7, 4, false},
                              {20, 7, 4, true},
                              {20, 7, 0, false}}));
  o.chunk_size = chunk;
  pool p([](int x) { return x * x; }, o);
  CAPTURE(total, when, chunk, in_increment);
  auto results = p.imap(throwing_generator(total, when, in_increment));
  if (when == 0) {
    REQUIRE_THROWS_AS(results.begin(), say_when);
  } else {
    auto it = results.begin();
    for (int k = 0; k < when; ++k) {
      REQUIRE(it != results.end());
      REQUIRE(*it == k * k);
      if (k + 1 < when) ++it;
    }
    REQUIRE_THROWS_AS(++it, say_when);
  }
  REQUIRE(p.map(iota_vector(4)) == std::vector<int>{0, 1, 4, 9});
}

TEST_CASE("imap_unordered raises an input error after the results before it", "[pool]") {
  pool_options o;
  o.workers = 2;
  o.chunk_size = 2;
  pool p([](int x) { return x * x; }, o);
  auto run = [&] {
    for (auto [index, value] : p.imap_unordered(throwing_generator(20, 7))) {
      REQUIRE(index < 7);
      REQUIRE(value == static_cast<int>(index * index));
    }
  };
  REQUIRE_THROWS_AS(run(), say_when);
  REQUIRE(p.map(iota_vector(3)) == std::vector<int>{0, 1, 4});
}

// ---------------------------------------------------------------------------
// 3. Stopping the pool fails every pending future, sent or not.

TEST_CASE("terminate fails every pending future with pool_closed whether sent or not", "[pool]") {
  pool p(
      [](int x) {
        if (x >= 0) procpool_test::block_forever();
        return x;
      },
      1u);
  std::vector<procpool::future<int>> futures;
  for (int i = 0; i < 4; ++i) futures.push_back(p.submit(i));
  // Drive once: the first chunks go to the worker, the rest stay queued.
  REQUIRE_FALSE(futures[0].wait_for(50ms));
  p.terminate();
  for (auto& f : futures) {
    REQUIRE(f.wait_for(5s));
    REQUIRE(f.ready());
    REQUIRE_THROWS_AS(f.get(), procpool::pool_closed);
  }
  REQUIRE_THROWS_AS(p.submit(1), procpool::pool_closed);
}

TEST_CASE("join runs every queued future to the end", "[pool]") {
  pool p([](int x) { return x * 3; }, 1u);
  std::vector<procpool::future<int>> futures;
  for (int i = 0; i < 6; ++i) futures.push_back(p.submit(i));
  p.close();
  p.join();
  for (int i = 0; i < 6; ++i) {
    REQUIRE(futures[static_cast<std::size_t>(i)].ready());
    REQUIRE(futures[static_cast<std::size_t>(i)].get() == 3 * i);
  }
}

TEST_CASE("futures outliving a terminated executor fail with pool_closed", "[pool]") {
  std::vector<procpool::future<int>> futures;
  {
    procpool::executor ex(1);
    for (int i = 0; i < 3; ++i)
      futures.push_back(ex.submit(
          +[](int) -> int { procpool_test::block_forever(); }, i));
    ex.terminate();
  }
  for (auto& f : futures) REQUIRE_THROWS_AS(f.get(), procpool::pool_closed);
}

// ---------------------------------------------------------------------------
// 4. A result decoder that throws anything fails its call with decode_error.

TEST_CASE("a result decoder that throws fails the call with decode_error and the pool goes on",
          "[pool]") {
  pool p([](int x) { return touchy{x}; }, 2u);
  try {
    p.map(std::vector<int>{1, 2, 13, 4});
    FAIL("map returned");
  } catch (const procpool::decode_error& e) {
    std::string what = e.what();
    CHECK_THAT(what, Contains("std::runtime_error"));
    CHECK_THAT(what, Contains("13 is unlucky"));
  }
  auto r = p.map(std::vector<int>{5, 6});
  REQUIRE(r.size() == 2);
  REQUIRE(r[1].v == 6);
  REQUIRE_THROWS_AS(p.submit(13).get(), procpool::decode_error);
  REQUIRE(p.submit(14).get().v == 14);
  auto range = p.imap(std::vector<int>{1, 13, 2});
  auto it = range.begin();
  REQUIRE(it->v == 1);
  REQUIRE_THROWS_AS(++it, procpool::decode_error);
  p.join();
}

// ---------------------------------------------------------------------------
// 7. An exception escaping a running call cancels it on the way out.

TEST_CASE("an exception from on_progress cancels its map, the pool goes on", "[pool]") {
  std::atomic<bool> throw_now{true};
  std::vector<std::size_t> totals_after_throw;
  bool thrown = false;
  pool_options o;
  o.workers = 2;
  o.chunk_size = 10;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (thrown) totals_after_throw.push_back(info.total);
    if (throw_now.exchange(false)) {
      thrown = true;
      throw std::runtime_error("the progress display broke");
    }
  };
  pool p([](int x) { return x; }, o);
  {
    auto xs = iota_vector(1000);
    REQUIRE_THROWS_WITH(p.map(xs), "the progress display broke");
  }  // the input and the results are gone
  auto r = p.map(iota_vector(10));
  REQUIRE(r == iota_vector(10));
  p.join();
  // Only the second map reported progress after the first one threw.
  REQUIRE_FALSE(totals_after_throw.empty());
  for (auto t : totals_after_throw) REQUIRE(t == 10);
}

TEST_CASE("an exception from on_progress during imap ends the range, the pool goes on", "[pool]") {
  std::atomic<int> calls{0};
  pool_options o;
  o.workers = 2;
  o.chunk_size = 4;
  o.on_progress = [&](const procpool::progress_info&) {
    if (calls++ == 0) throw std::runtime_error("no more progress");
  };
  pool p([](int x) { return x; }, o);
  {
    auto range = p.imap(iota_vector(400));
    REQUIRE_THROWS_WITH(
        [&] {
          for (int v : range) (void)v;
        }(),
        "no more progress");
  }
  REQUIRE(p.map(iota_vector(3)) == iota_vector(3));
  p.join();
}

// ---------------------------------------------------------------------------
// 9. Calling the pool from a callback it runs is refused with a clear error.

TEST_CASE("map from inside on_progress is refused with a clear error", "[pool]") {
  pool<int (*)(int)>* self = nullptr;
  pool_options o;
  o.workers = 2;
  o.chunk_size = 5;
  o.on_progress = [&](const procpool::progress_info&) {
    if (self) self->map(std::vector<int>{1, 2});
  };
  pool<int (*)(int)> p(
      +[](int x) { return x; }, o);
  self = &p;
  REQUIRE_THROWS_WITH(p.map(iota_vector(100)), Contains("inside"));
  self = nullptr;
  REQUIRE(p.map(iota_vector(100)) == iota_vector(100));
}

TEST_CASE("the pool called from an input iterator it reads is refused with a clear error",
          "[pool]") {
  using pool_t = pool<int (*)(int)>;
  pool_t p(
      +[](int x) { return x; }, 2u);
  // An input whose iterator calls back into the pool it feeds.
  procpool_test::computed_range input(8, [&p](std::size_t i) {
    return i == 3 ? p.submit(static_cast<int>(i)).get() : static_cast<int>(i);
  });
  REQUIRE_THROWS_WITH(p.map(input), Contains("inside"));
  auto range = p.imap(input);
  REQUIRE_THROWS_WITH(
      [&] {
        for (int v : range) (void)v;
      }(),
      Contains("inside"));
  REQUIRE(p.map(iota_vector(4)) == iota_vector(4));
}

TEST_CASE("terminate from inside on_progress ends the map with pool_closed", "[pool]") {
  pool<int (*)(int)>* self = nullptr;
  pool_options o;
  o.workers = 2;
  o.chunk_size = 5;
  o.on_progress = [&](const procpool::progress_info&) {
    if (self) self->terminate();
  };
  pool<int (*)(int)> p(
      +[](int x) { return x; }, o);
  self = &p;
  REQUIRE_THROWS_AS(p.map(iota_vector(100)), procpool::pool_closed);
  REQUIRE_THROWS_AS(p.map(iota_vector(3)), procpool::pool_closed);
  REQUIRE(p.pids() == std::vector<pid_t>{0, 0});
}

// ---------------------------------------------------------------------------
// 10. Stopping a pool while an imap range is open does not wait for its reader.

TEST_CASE("join while an imap range is open ends the range", "[pool]") {
  require_in_child_within(20s, [] {
    pool p([](int x) { return x; }, 1u);
    auto range = p.imap(iota_vector(100000));
    auto it = range.begin();
    if (*it != 0) return 2;
    p.join();
    try {
      ++it;
      return 3;
    } catch (const procpool::pool_closed&) {
    }
    return 0;
  });
}

TEST_CASE("destroying a pool while an imap range is open ends the range", "[pool]") {
  require_in_child_within(20s, [] {
    auto f = [](int x) { return x; };
    auto p = std::make_unique<pool<decltype(f)>>(f, 1u);
    auto range = p->imap(iota_vector(100000));
    auto it = range.begin();
    if (*it != 0) return 2;
    auto unordered = p->imap_unordered(iota_vector(100000));
    unordered.begin();
    p.reset();
    try {
      ++it;
      return 3;
    } catch (const procpool::pool_closed&) {
    }
    return 0;
  });
}

// ---------------------------------------------------------------------------
// 14. Misuse: absurd worker counts, and two threads on one pool.

TEST_CASE("a negative or absurd worker count is refused with a clear error", "[pool]") {
  auto f = [](int x) { return x; };
  REQUIRE_THROWS_WITH(pool(f, -1), Contains("-1"));
  REQUIRE_THROWS_AS(pool(f, -1), procpool::error);
  REQUIRE_THROWS_AS(procpool::executor(-1), procpool::error);
  pool_options o;
  o.workers = 1000000;
  REQUIRE_THROWS_WITH(pool(f, o), Contains("1000000"));
  o.workers = static_cast<unsigned>(-2);
  REQUIRE_THROWS_AS(pool(f, o), procpool::error);
}

TEST_CASE("a second thread's calls are served while the first waits in a call", "[pool]") {
  procpool_test::go_signal started;
  procpool_test::go_signal release;
  pool p(
      [&](int x) {
        if (x == 0) {
          started.give();
          release.await();
        }
        return x;
      },
      2u);
  auto pending = p.submit(5);
  auto range = p.imap(std::vector<int>{7, 8});
  std::vector<std::string> seen;
  std::thread other([&] {
    started.await();
    // One worker holds item 0 until this thread is done; the other serves it.
    auto attempt = [&](auto&& what) {
      try {
        seen.push_back(what());
      } catch (const std::exception& e) {
        seen.push_back(e.what());
      }
    };
    attempt([&] { return std::to_string(p.map(std::vector<int>{1, 2}).at(1)); });
    attempt([&] { return std::to_string(p.submit(3).get()); });
    attempt([&] { return std::to_string(pending.get()); });
    attempt([&] { return std::string(pending.ready() ? "ready" : "not ready"); });
    attempt([&] {
      std::string out;
      for (int v : range) out += std::to_string(v);
      return out;
    });
    attempt([&] { return std::to_string(p.pids().size()); });
    release.give();
  });
  auto r = p.map(std::vector<int>{0});
  other.join();
  REQUIRE(r == std::vector<int>{0});
  CHECK(seen == std::vector<std::string>{"2", "3", "5", "ready", "78", "2"});
}

TEST_CASE("two threads mapping on one pool never get wrong results", "[pool]") {
  pool p([](int x) { return 3 * x + 1; }, 2u);
  std::atomic<int> wrong{0};
  std::atomic<int> refused{0};
  std::atomic<int> served{0};
  auto run = [&](int seed) {
    for (int k = 0; k < 200; ++k) {
      std::vector<int> xs(20);
      std::iota(xs.begin(), xs.end(), seed * 1000 + k);
      try {
        auto r = p.map(xs);
        ++served;
        for (std::size_t i = 0; i < xs.size(); ++i)
          if (r[i] != 3 * xs[i] + 1) {
            ++wrong;
            break;
          }
      } catch (const procpool::error&) {
        ++refused;
      }
    }
  };
  std::thread a(run, 1);
  std::thread b(run, 2);
  a.join();
  b.join();
  INFO("served " << served << ", refused " << refused);
  REQUIRE(wrong == 0);
  REQUIRE(served == 400);
}

TEST_CASE("terminate from another thread stops a pool that is busy in a call", "[pool]") {
  procpool_test::go_signal started;
  pool p(
      [&](int x) {
        if (x == 0) {
          started.give();
          procpool_test::block_forever();
        }
        return x;
      },
      1u);
  std::thread stopper([&] {
    started.await();
    p.terminate();
  });
  REQUIRE_THROWS_AS(p.map(std::vector<int>{0, 1}), procpool::pool_closed);
  stopper.join();
  REQUIRE(p.pids() == std::vector<pid_t>{0});
}

TEST_CASE("terminate from another thread fails a future being waited on", "[pool]") {
  procpool_test::go_signal started;
  pool p(
      [&](int x) {
        if (x == 0) {
          started.give();
          procpool_test::block_forever();
        }
        return x;
      },
      1u);
  auto running = p.submit(0);
  auto queued = p.submit(1);
  std::thread stopper([&] {
    started.await();
    p.terminate();
  });
  REQUIRE_THROWS_AS(running.get(), procpool::pool_closed);
  stopper.join();
  // The futures keep their ending.
  REQUIRE(running.ready());
  REQUIRE_THROWS_AS(running.get(), procpool::pool_closed);
  REQUIRE_THROWS_AS(queued.get(), procpool::pool_closed);
}

// ---------------------------------------------------------------------------
// Errors of submit name a task, not an item of a call.

TEST_CASE("the errors of a submitted task name a task and not item 0", "[pool]") {
  pool p(
      [](int x) {
        if (x == 1) throw std::domain_error("one");
        if (x == 2) ::raise(SIGKILL);
        return x;
      },
      1u);
  try {
    p.submit(1).get();
    FAIL("no error");
  } catch (const procpool::task_error& e) {
    std::string what = e.what();
    CHECK_THAT(what, Contains("task"));
    CHECK_THAT(what, !Contains("item"));
    CHECK(e.type_name() == "std::domain_error");
    CHECK(e.message() == "one");
  }
  try {
    p.submit(2).get();
    FAIL("no error");
  } catch (const procpool::worker_died& e) {
    std::string what = e.what();
    CHECK_THAT(what, Contains("task"));
    CHECK_THAT(what, !Contains("item"));
  }
  // A map still names its items.
  REQUIRE_THROWS_WITH(p.map(std::vector<int>{0, 1}), Contains("item 1"));
}
