// Every timed member of every procpool type, called with every kind of
// timeout a user may hold: nanoseconds to seconds, float seconds, durations
// of double milliseconds, huge ones, and time points of the steady and the
// system clock. Includes only the umbrella header, as a user does, so that
// two helpers of the same name in different headers cannot go unnoticed.
//
// Each call is made twice: once where it must time out (short timeouts, so
// the test stays fast) and once where it must succeed at once (long ones,
// which must neither overflow nor wait).
#include <procpool/procpool.hpp>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

using namespace std::chrono_literals;

namespace {

using steady_tp = std::chrono::steady_clock::time_point;
using system_tp = std::chrono::system_clock::time_point;

/// Calls `f` with timeouts of every unit that expire within a millisecond.
template <class F>
void short_timeouts(F&& f) {
  f(std::chrono::nanoseconds(1));
  f(std::chrono::microseconds(1));
  f(std::chrono::milliseconds(1));
  f(std::chrono::seconds(0));
  f(std::chrono::duration<float>(0.001f));
  f(std::chrono::duration<double, std::milli>(0.5));
  f(std::chrono::milliseconds(-5));  // already expired
}

/// Calls `f` with timeouts of every unit that a call succeeding at once never reaches.
template <class F>
void long_timeouts(F&& f) {
  f(std::chrono::nanoseconds(30'000'000'000));
  f(std::chrono::microseconds(30'000'000));
  f(std::chrono::milliseconds(30'000));
  f(std::chrono::seconds(30));
  f(std::chrono::minutes(1));
  f(std::chrono::duration<float>(30.0f));
  f(std::chrono::duration<double, std::milli>(30'000.0));
  f(std::chrono::nanoseconds::max());
  f(std::chrono::seconds::max());
  f(std::chrono::duration<float>(1e30f));
}

/// Calls `f` with steady-clock deadlines within a millisecond from now, or past.
template <class F>
void short_steady_deadlines(F&& f) {
  f(std::chrono::steady_clock::now() + 1ms);
  f(std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::steady_clock::now()));
  f(steady_tp::min());
}

/// Calls `f` with steady- and system-clock deadlines within a millisecond from now, or past.
template <class F>
void short_deadlines(F&& f) {
  short_steady_deadlines(f);
  f(std::chrono::system_clock::now() + 1ms);
  f(std::chrono::system_clock::now() - 1h);
}

/// Calls `f` with steady-clock deadlines a call succeeding at once never reaches.
template <class F>
void long_steady_deadlines(F&& f) {
  f(std::chrono::steady_clock::now() + 30s);
  f(std::chrono::time_point_cast<std::chrono::seconds>(std::chrono::steady_clock::now() + 30s));
  f(steady_tp::max());
}

/// Calls `f` with steady- and system-clock deadlines a call succeeding at once never reaches.
template <class F>
void long_deadlines(F&& f) {
  long_steady_deadlines(f);
  f(std::chrono::system_clock::now() + 30s);
  f(std::chrono::time_point_cast<std::chrono::seconds>(std::chrono::system_clock::now() + 30s));
  f(std::chrono::time_point<std::chrono::system_clock, std::chrono::duration<double>>(
      std::chrono::system_clock::now() + 30s));
  f(system_tp::max());
}

/// Holds a lock from another thread until destroyed, so that this thread's
/// attempts to take it time out.
template <class Lock>
class held_elsewhere {
 public:
  explicit held_elsewhere(Lock& m) : m_(m), t_([this] { run(); }) {
    std::unique_lock<std::mutex> lk(mx_);
    cv_.wait(lk, [&] { return held_; });
  }
  ~held_elsewhere() {
    {
      std::lock_guard<std::mutex> lk(mx_);
      release_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  void run() {
    std::unique_lock<Lock> hold(m_);
    std::unique_lock<std::mutex> lk(mx_);
    held_ = true;
    cv_.notify_all();
    cv_.wait(lk, [&] { return release_; });
  }
  Lock& m_;
  std::mutex mx_;
  std::condition_variable cv_;
  bool held_ = false;
  bool release_ = false;
  std::thread t_;
};

template <class Lock>
void check_timed_lock() {
  Lock m;
  {
    held_elsewhere<Lock> other(m);
    short_timeouts([&](auto d) { CHECK_FALSE(m.try_lock_for(d)); });
    short_deadlines([&](auto tp) { CHECK_FALSE(m.try_lock_until(tp)); });
  }
  long_timeouts([&](auto d) {
    REQUIRE(m.try_lock_for(d));
    m.unlock();
  });
  long_deadlines([&](auto tp) {
    REQUIRE(m.try_lock_until(tp));
    m.unlock();
  });
}

}  // namespace

TEMPLATE_TEST_CASE("lock: every timeout type and clock", "[timed]", procpool::mutex,
                   procpool::recursive_mutex) {
  check_timed_lock<TestType>();
}

TEST_CASE("semaphore: every timeout type and clock", "[timed]") {
  procpool::semaphore s(0);
  short_timeouts([&](auto d) { CHECK_FALSE(s.try_acquire_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(s.try_acquire_until(tp)); });
  long_timeouts([&](auto d) {
    s.release();
    CHECK(s.try_acquire_for(d));
  });
  long_deadlines([&](auto tp) {
    s.release();
    CHECK(s.try_acquire_until(tp));
  });
  CHECK(s.value() == 0);
}

TEST_CASE("bounded_semaphore: every timeout type and clock", "[timed]") {
  procpool::bounded_semaphore s(0, 1);
  short_timeouts([&](auto d) { CHECK_FALSE(s.try_acquire_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(s.try_acquire_until(tp)); });
  long_timeouts([&](auto d) {
    s.release();
    CHECK(s.try_acquire_for(d));
  });
  long_deadlines([&](auto tp) {
    s.release();
    CHECK(s.try_acquire_until(tp));
  });
}

TEST_CASE("condition: every timeout type and clock", "[timed]") {
  procpool::condition cv;
  {
    procpool::mutex m;
    std::unique_lock<procpool::mutex> hold(m);
    short_timeouts([&](auto d) {
      CHECK(cv.wait_for(hold, d) == std::cv_status::timeout);
      CHECK(cv.wait_for(m, d) == std::cv_status::timeout);
      CHECK_FALSE(cv.wait_for(hold, d, [] { return false; }));
    });
    short_deadlines([&](auto tp) {
      CHECK(cv.wait_until(hold, tp) == std::cv_status::timeout);
      CHECK_FALSE(cv.wait_until(hold, tp, [] { return false; }));
    });
    // A true predicate returns at once, whatever the timeout.
    long_timeouts([&](auto d) { CHECK(cv.wait_for(hold, d, [] { return true; })); });
    long_deadlines([&](auto tp) { CHECK(cv.wait_until(hold, tp, [] { return true; })); });
    CHECK(hold.owns_lock());
    CHECK(m.locked());
  }
  {
    procpool::recursive_mutex rm;
    std::unique_lock<procpool::recursive_mutex> hold(rm);
    short_timeouts([&](auto d) { CHECK(cv.wait_for(hold, d) == std::cv_status::timeout); });
    short_deadlines([&](auto tp) { CHECK(cv.wait_until(rm, tp) == std::cv_status::timeout); });
    long_timeouts([&](auto d) { CHECK(cv.wait_for(rm, d, [] { return true; })); });
    long_deadlines([&](auto tp) { CHECK(cv.wait_until(hold, tp, [] { return true; })); });
    CHECK(rm.locked());
  }
}

TEST_CASE("event: every timeout type and clock", "[timed]") {
  procpool::event e;
  short_timeouts([&](auto d) { CHECK_FALSE(e.wait_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(e.wait_until(tp)); });
  e.set();
  long_timeouts([&](auto d) { CHECK(e.wait_for(d)); });
  long_deadlines([&](auto tp) { CHECK(e.wait_until(tp)); });
}

TEST_CASE("barrier: every timeout type and clock", "[timed]") {
  procpool::barrier two(2);  // alone: every arrival times out and is withdrawn
  short_timeouts([&](auto d) { CHECK_FALSE(two.arrive_and_wait_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(two.arrive_and_wait_until(tp)); });
  CHECK(two.waiting() == 0);
  CHECK_FALSE(two.broken());
  procpool::barrier one(1);  // completes at once
  long_timeouts([&](auto d) { CHECK(one.arrive_and_wait_for(d)); });
  long_deadlines([&](auto tp) { CHECK(one.arrive_and_wait_until(tp)); });
}

TEST_CASE("queue: every timeout type and clock", "[timed]") {
  procpool::queue<int> q(64);
  short_timeouts([&](auto d) { CHECK_FALSE(q.pop_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(q.pop_until(tp)); });
  long_timeouts([&](auto d) {
    REQUIRE(q.push_for(7, d));
    CHECK(q.pop_for(d) == 7);
  });
  long_deadlines([&](auto tp) {
    REQUIRE(q.push_until(8, tp));
    CHECK(q.pop_until(tp) == 8);
  });
  // Full: pushes time out.
  while (q.try_push(1)) {
  }
  short_timeouts([&](auto d) { CHECK_FALSE(q.push_for(2, d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(q.push_until(2, tp)); });
}

TEST_CASE("queue: join_for and join_until with every timeout type", "[timed]") {
  procpool::queue<int> q(256);
  q.push(1);
  short_timeouts([&](auto d) { CHECK_FALSE(q.join_for(d)); });
  short_deadlines([&](auto tp) { CHECK_FALSE(q.join_until(tp)); });
  CHECK(q.pop() == 1);
  q.task_done();
  long_timeouts([&](auto d) { CHECK(q.join_for(d)); });
  long_deadlines([&](auto tp) { CHECK(q.join_until(tp)); });
}

TEST_CASE("pipe: every timeout type and clock", "[timed]") {
  auto [a, b] = procpool::pipe<std::string>();
  short_timeouts([&, &b = b](auto d) {
    CHECK_FALSE(b.poll(d));
    CHECK_FALSE(b.recv_for(d));
  });
  short_deadlines([&, &b = b](auto tp) { CHECK_FALSE(b.recv_until(tp)); });
  long_timeouts([&, &a = a, &b = b](auto d) {
    a.send("x");
    CHECK(b.poll(d));
    CHECK(b.recv_for(d) == std::string("x"));
  });
  long_deadlines([&, &a = a, &b = b](auto tp) {
    a.send("y");
    CHECK(b.recv_until(tp) == std::string("y"));
  });
}

TEST_CASE("future: every timeout type", "[timed]") {
  procpool::pool p([](int x) { return x * 2; }, 1);
  procpool::event go;
  procpool::pool slow(
      [&go](int x) {
        go.wait();
        return x;
      },
      1);
  auto pending = slow.submit(1);
  short_timeouts([&](auto d) {
    CHECK_FALSE(pending.wait_for(d));
    CHECK_FALSE(pending.get_for(d));
  });
  go.set();
  CHECK(pending.get() == 1);
  long_timeouts([&](auto d) {
    auto f = p.submit(21);
    CHECK(f.wait_for(d));
    CHECK(f.get_for(d) == 42);
  });
}

TEST_CASE("process: every timeout type", "[timed]") {
  procpool::event go;
  procpool::process child([&go] { go.wait(); });
  short_timeouts([&](auto d) { CHECK_FALSE(child.join_for(d)); });
  go.set();
  long_timeouts([&](auto d) {
    auto st = child.join_for(d);
    REQUIRE(st);
    CHECK(st->success());
  });
}
