// queue<T>: FIFO order, exactly-once delivery with 4 producers and 4
// consumers, close semantics, the try and timed variants, oversized items,
// blocking on a full queue, and recovery from processes killed while they
// hold the queue's lock.
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/os/liveness.hpp>
#include <procpool/detail/os/sys.hpp>
#include <procpool/detail/transport/shm.hpp>
#include <procpool/exit_status.hpp>
#include <procpool/queue.hpp>

#include <signal.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <support/support.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::channel_closed;
using procpool::exit_status;
using procpool::detail::queue_stage;
using clock_type = std::chrono::steady_clock;

using procpool_test::reap;
using procpool_test::spawn;

using procpool_test::wait_until_sleeping;

namespace {

/// An item whose content is a function of its id, so any damage shows.
struct item {
  std::uint64_t id;
  std::string text;
  std::vector<std::uint32_t> numbers;
};

item make_item(std::uint64_t id) {
  item it{id, std::string(id % 37, static_cast<char>('a' + id % 26)), {}};
  for (std::uint64_t i = 0; i < id % 11; ++i)
    it.numbers.push_back(static_cast<std::uint32_t>(id * 31 + i));
  return it;
}

bool intact(const item& it) {
  item want = make_item(it.id);
  return it.text == want.text && it.numbers == want.numbers;
}

/// Test-only hook state of a child that stops inside the queue's lock.
queue_stage stop_at = queue_stage::push_locked;
int stop_signal_fd = -1;

void stop_inside_lock(queue_stage s) {
  if (s != stop_at) return;
  procpool::detail::sys::write_all(stop_signal_fd, "x", 1);
  for (;;) ::pause();  // the parent kills us here, lock held
}

/// Pops every item left; true when each is intact, ids strictly increase,
/// and no id repeats. `ids` receives them.
bool drain(procpool::queue<item>& q, std::vector<std::uint64_t>& ids) {
  bool ok = true;
  while (auto it = q.try_pop()) {
    if (!intact(*it)) ok = false;
    if (!ids.empty() && it->id <= ids.back()) ok = false;
    ids.push_back(it->id);
  }
  return ok;
}

}  // namespace

TEST_CASE("one producer, one consumer: items arrive in order, intact", "[queue][fork]") {
  procpool::queue<item> q(4096);  // small: the producer often waits for room
  constexpr std::uint64_t n = 20000;
  pid_t child = spawn([&] {
    for (std::uint64_t i = 0; i < n; ++i) q.push(make_item(i));
    return 0;
  });
  std::uint64_t wrong = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    item it = q.pop();
    if (it.id != i || !intact(it)) ++wrong;
  }
  CHECK(wrong == 0);
  CHECK(reap(child).success());
  CHECK(q.size_approx() == 0);
  CHECK_FALSE(q.try_pop());
}

TEST_CASE("4 producers and 4 consumers: each of 400000 items is consumed exactly once",
          "[queue][fork]") {
  constexpr int producers = 4, consumers = 4;
  constexpr std::uint64_t per_producer = 100000;
  constexpr std::uint64_t total = producers * per_producer;
  procpool::queue<std::uint64_t> q(64 * 1024);

  // Shared result area: one bit per item (set by the consumer that got it;
  // a bit found set already is a duplicate), and per consumer its counts.
  struct consumer_report {
    std::atomic<std::uint64_t> count, sum, duplicates, out_of_order, foreign;
  };
  constexpr std::size_t words = (total + 63) / 64;
  procpool::detail::shared_mapping shared(words * 8 + consumers * sizeof(consumer_report));
  auto* seen = static_cast<std::atomic<std::uint64_t>*>(shared.data());
  auto* reports = reinterpret_cast<consumer_report*>(static_cast<char*>(shared.data()) + words * 8);

  std::vector<pid_t> consumer_pids, producer_pids;
  for (int c = 0; c < consumers; ++c) {
    consumer_pids.push_back(spawn([&, c] {
      consumer_report& r = reports[c];
      std::uint64_t last[producers] = {};
      bool first[producers] = {true, true, true, true};
      for (;;) {
        std::uint64_t v;
        try {
          v = q.pop();
        } catch (const channel_closed&) {
          return 0;
        }
        std::uint64_t p = v >> 32, seq = v & 0xffffffffu;
        if (p >= producers || seq >= per_producer) {
          r.foreign.fetch_add(1);
          continue;
        }
        // One producer's items leave a FIFO queue in the order they entered.
        if (!first[p] && seq <= last[p]) r.out_of_order.fetch_add(1);
        first[p] = false;
        last[p] = seq;
        std::uint64_t index = p * per_producer + seq;
        std::uint64_t bit = std::uint64_t{1} << (index % 64);
        if (seen[index / 64].fetch_or(bit) & bit) r.duplicates.fetch_add(1);
        r.count.fetch_add(1);
        r.sum.fetch_add(index);
      }
    }));
  }
  for (int p = 0; p < producers; ++p) {
    producer_pids.push_back(spawn([&, p] {
      for (std::uint64_t seq = 0; seq < per_producer; ++seq) q.push((std::uint64_t(p) << 32) | seq);
      return 0;
    }));
  }
  for (pid_t pid : producer_pids) CHECK(reap(pid).success());
  q.close();  // consumers drain what is left, then their pop throws
  for (pid_t pid : consumer_pids) CHECK(reap(pid).success());

  std::uint64_t count = 0, sum = 0, duplicates = 0, out_of_order = 0, foreign = 0;
  for (int c = 0; c < consumers; ++c) {
    count += reports[c].count;
    sum += reports[c].sum;
    duplicates += reports[c].duplicates;
    out_of_order += reports[c].out_of_order;
    foreign += reports[c].foreign;
    CHECK(reports[c].count > 0);  // every consumer took part
  }
  std::uint64_t missing = 0;
  for (std::uint64_t i = 0; i < total; ++i)
    if (!(seen[i / 64].load() & (std::uint64_t{1} << (i % 64)))) ++missing;
  CHECK(count == total);
  CHECK(sum == total * (total - 1) / 2);
  CHECK(missing == 0);
  CHECK(duplicates == 0);
  CHECK(out_of_order == 0);
  CHECK(foreign == 0);
  CHECK(q.size_approx() == 0);
}

TEST_CASE("threads of one process share a queue: each item once", "[queue]") {
  procpool::queue<std::uint64_t> q(2048);
  constexpr std::uint64_t per_producer = 20000;
  std::vector<std::atomic<int>> seen(2 * per_producer);
  std::vector<std::thread> threads;
  for (std::uint64_t p = 0; p < 2; ++p)
    threads.emplace_back([&, p] {
      for (std::uint64_t i = 0; i < per_producer; ++i) q.push(p * per_producer + i);
    });
  std::atomic<std::uint64_t> popped{0};
  for (int c = 0; c < 2; ++c)
    threads.emplace_back([&] {
      try {
        for (;;) {
          seen.at(q.pop()).fetch_add(1);
          popped.fetch_add(1);
        }
      } catch (const channel_closed&) {
      }
    });
  threads[0].join();
  threads[1].join();
  q.close();
  threads[2].join();
  threads[3].join();
  int wrong = 0;
  for (auto& s : seen)
    if (s.load() != 1) ++wrong;
  CHECK(wrong == 0);
  CHECK(popped.load() == 2 * per_producer);
}

TEST_CASE("close: pushes throw, pops drain, then pop throws and the others return empty",
          "[queue]") {
  procpool::queue<int> q(1024);
  q.push(1);
  q.push(2);
  q.push(3);
  CHECK_FALSE(q.closed());
  q.close();
  q.close();  // twice: nothing more happens
  CHECK(q.closed());
  CHECK_THROWS_AS(q.push(4), channel_closed);
  CHECK_THROWS_AS(q.try_push(4), channel_closed);
  CHECK_THROWS_AS(q.push_for(4, 10ms), channel_closed);
  CHECK(q.size_approx() == 3);
  CHECK(q.pop() == 1);
  CHECK(q.try_pop() == 2);
  CHECK(q.pop_for(1s) == 3);
  CHECK_THROWS_WITH(q.pop(), Catch::Contains("closed and empty"));
  CHECK_FALSE(q.try_pop());
  auto start = clock_type::now();
  CHECK_FALSE(q.pop_for(10s));  // at once: nothing can arrive any more
  CHECK_FALSE(q.pop_until(clock_type::now() + 10s));
  CHECK(clock_type::now() - start < 5s);
}

TEST_CASE("close wakes a pop waiting on an empty queue and a push waiting on a full one",
          "[queue][fork]") {
  procpool::queue<int> q(64);
  SECTION("a waiting pop") {
    pid_t popper = spawn([&] {
      try {
        (void)q.pop();
      } catch (const channel_closed&) {
        return 0;
      }
      return 1;
    });
    wait_until_sleeping(popper);
    q.close();
    CHECK(reap(popper) == exit_status::exited(0));
  }
  SECTION("a waiting push") {
    while (q.try_push(7)) {
    }
    pid_t pusher = spawn([&] {
      try {
        q.push(8);
      } catch (const channel_closed&) {
        return 0;
      }
      return 1;
    });
    wait_until_sleeping(pusher);
    q.close();
    CHECK(reap(pusher) == exit_status::exited(0));
    CHECK(q.size_approx() == 5);  // the items pushed before the close stay (12 bytes each)
  }
}

TEST_CASE("try and timed variants", "[queue]") {
  procpool::queue<std::string> q(64);
  CHECK(q.capacity() == 64);
  CHECK_FALSE(q.try_pop());
  auto start = clock_type::now();
  CHECK_FALSE(q.pop_for(50ms));
  CHECK(clock_type::now() - start >= 45ms);
  CHECK_FALSE(q.pop_until(clock_type::now() + 10ms));
  CHECK_FALSE(q.pop_for(0s));

  // Each "xxxxxxxx" takes 8 (header) + 8 (length) + 8 (characters) = 24 bytes: two fit.
  CHECK(q.try_push("xxxxxxxx"));
  CHECK(q.push_for("yyyyyyyy", 1s));
  CHECK(q.size_approx() == 2);
  CHECK_FALSE(q.try_push("zzzzzzzz"));
  start = clock_type::now();
  CHECK_FALSE(q.push_for("zzzzzzzz", 50ms));
  CHECK(clock_type::now() - start >= 45ms);
  CHECK_FALSE(q.push_until("zzzzzzzz", clock_type::now() + 10ms));
  CHECK(q.try_pop() == "xxxxxxxx");
  CHECK(q.try_push("zzzzzzzz"));
  CHECK(q.pop_for(1s) == "yyyyyyyy");
  CHECK(q.pop() == "zzzzzzzz");

  procpool::queue<std::string> copy = q;  // a second handle to the same queue
  copy.push("via the copy");
  CHECK(q.pop() == "via the copy");
}

TEST_CASE("an item larger than the capacity throws message_too_large, never truncated", "[queue]") {
  procpool::queue<std::string> q(64);
  // A string of n characters encodes to 8 + n bytes, and a message adds 8.
  CHECK(q.try_push(std::string(48, 'a')));  // 64 bytes: exactly the capacity
  CHECK(q.pop() == std::string(48, 'a'));
  try {
    q.push(std::string(49, 'b'));
    FAIL("no exception");
  } catch (const procpool::message_too_large& e) {
    CHECK(e.size() == 57);
    CHECK(e.capacity() == 64);
  }
  CHECK_THROWS_AS(q.try_push(std::string(1000, 'c')), procpool::message_too_large);
  CHECK_THROWS_AS(q.push_for(std::string(1000, 'c'), 1s), procpool::message_too_large);
  q.push("still works");
  CHECK(q.pop() == "still works");
  CHECK_THROWS_AS(procpool::queue<int>(0), procpool::error);
  CHECK_THROWS_AS(procpool::queue<int>(15), procpool::error);
}

TEST_CASE("a push blocked on a full queue is released by a pop", "[queue][fork]") {
  procpool::queue<int> q(128);
  int n = 0;
  while (q.try_push(n)) ++n;
  REQUIRE(n == 10);  // 12 bytes each
  pid_t pusher = spawn([&] {
    q.push(1000);
    return 0;
  });
  wait_until_sleeping(pusher);
  CHECK(q.size_approx() == 10);
  CHECK(q.pop() == 0);
  CHECK(reap(pusher).success());
  std::vector<int> rest;
  while (auto v = q.try_pop()) rest.push_back(*v);
  CHECK(rest == std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9, 1000});
}

TEST_CASE("a process killed inside the queue's lock leaves the queue intact", "[queue][fork]") {
  // The child stops at a chosen point of a push or a pop while it holds the
  // lock, tells the parent, and is killed there. The queue must then hold
  // exactly the items it held before, plus the pushed one if the push had
  // committed, minus the popped one if the pop had committed.
  const queue_stage stages[] = {queue_stage::push_locked,    queue_stage::push_copied,
                                queue_stage::push_committed, queue_stage::pop_locked,
                                queue_stage::pop_copied,     queue_stage::pop_committed};
  procpool::queue<item> q(2048);
  std::mt19937 rng(12345);
  std::uint64_t next_id = 0;
  std::vector<std::uint64_t> expected;  // ids the queue holds, in order
  int broken = 0;
  for (int round = 0; round < 60; ++round) {
    queue_stage stage = stages[round % 6];
    bool pushing = round % 6 < 3;
    // A random fill moves the item's position around the ring; items take
    // at most 108 bytes, so with at most 12 held a push finds room.
    int fill = static_cast<int>(rng() % 8) + 1;
    for (int i = 0; i < fill && expected.size() < 12; ++i) {
      REQUIRE(q.try_push(make_item(next_id)));
      expected.push_back(next_id++);
    }
    auto [ready_read, ready_write] = procpool::detail::sys::make_pipe();
    std::uint64_t id = next_id++;
    pid_t child = spawn([&, fd = ready_write.get()] {
      stop_at = stage;
      stop_signal_fd = fd;
      procpool::detail::queue_test_hook = &stop_inside_lock;
      if (pushing) {
        q.push(make_item(id));
      } else {
        (void)q.pop();
      }
      return 1;  // not reached: the hook stops inside the lock
    });
    ready_write.reset();
    char c;
    REQUIRE(procpool::detail::sys::read_some(ready_read.get(), &c, 1) == 1);
    ::kill(child, SIGKILL);
    REQUIRE(reap(child) == exit_status::killed(SIGKILL));
    if (stage == queue_stage::push_committed) expected.push_back(id);
    if (stage == queue_stage::pop_committed) expected.erase(expected.begin());
    // Take out a few (the next lock repairs), check them, then go on.
    std::size_t take = rng() % 4 + (expected.size() > 12 ? 4 : 0);
    for (std::size_t i = 0; i < take && !expected.empty(); ++i) {
      auto it = q.try_pop();
      if (!it || it->id != expected.front() || !intact(*it)) ++broken;
      expected.erase(expected.begin());
    }
    // The count a killed holder left behind is mended by the next locker.
    if (take > 0 && q.size_approx() != expected.size()) ++broken;
  }
  CHECK(broken == 0);
  std::vector<std::uint64_t> ids;
  CHECK(drain(q, ids));
  CHECK(ids == expected);
  q.push(make_item(777));
  CHECK(q.pop().id == 777);
}

TEST_CASE("producers and consumers killed at random moments leave the queue intact",
          "[queue][fork]") {
  procpool::queue<item> q(4096);
  std::mt19937 rng(777);
  std::uint64_t base = 1'000'000;
  int broken = 0;
  for (int round = 0; round < 100; ++round) {
    bool consumer_round = round % 4 == 3;
    // A child pushes ids base, base+1, ... in a tight loop; the parent pops a
    // random number of them, then kills it wherever it happens to be.
    pid_t pusher = spawn([&] {
      for (std::uint64_t id = base;; ++id) q.push(make_item(id));
      return 0;
    });
    std::size_t take = rng() % 300;
    std::uint64_t last = base - 1;  // ids come in increasing order, from base on
    for (std::size_t i = 0; i < take; ++i) {
      item it = q.pop();
      if (!intact(it) || it.id <= last) ++broken;
      last = it.id;
    }
    pid_t popper = -1;
    if (consumer_round) {
      // ... and a consumer child pops alongside until it is killed too.
      popper = spawn([&] {
        for (;;) (void)q.pop();
        return 0;
      });
      for (int i = 0; i < 50; ++i) {
        if (auto it = q.pop_for(1s)) {
          if (!intact(*it) || it->id <= last) ++broken;
          last = it->id;
        }
      }
      ::kill(popper, SIGKILL);
    }
    ::kill(pusher, SIGKILL);
    CHECK(reap(pusher) == exit_status::killed(SIGKILL));
    if (popper > 0) CHECK(reap(popper) == exit_status::killed(SIGKILL));
    // What is left: intact, increasing, no duplicates, none already seen.
    std::vector<std::uint64_t> ids;
    if (!drain(q, ids)) ++broken;
    if (!ids.empty() && ids.front() <= last) ++broken;
    if (q.size_approx() != 0) ++broken;
    base += 1'000'000;
  }
  CHECK(broken == 0);
  q.push(make_item(1));
  CHECK(q.pop().id == 1);
}

// ---------------------------------------------------------------------------
// A peer that overwrites the queue's shared state

namespace {

using procpool::detail::queue_core;

/// Runs `corrupt` on a queue of 4096 bytes holding two messages, then
/// `use` in a child; the child exits 0 when `use` throws channel_corrupted,
/// 1 when it returns, 2 for any other exception. A read or write outside the
/// queue kills the child (or ASan reports it).
template <class Corrupt, class Use>
exit_status after_corruption(Corrupt corrupt, Use use) {
  queue_core core(4096);
  const char hello[] = "hello";
  REQUIRE(core.push(hello, sizeof hello, false, std::nullopt));
  REQUIRE(core.push(hello, sizeof hello, false, std::nullopt));
  corrupt(core.shared_block());
  return reap(spawn([&] {
    try {
      use(core);
    } catch (const procpool::channel_corrupted&) {
      return 0;
    } catch (...) {
      return 2;
    }
    return 1;
  }));
}

void pop_all(queue_core& core) {
  std::vector<std::byte> out;
  for (int i = 0; i < 4; ++i) (void)core.pop(out, false, std::nullopt);
}

void push_some(queue_core& core) {
  std::vector<std::byte> item(100, std::byte{7});
  for (int i = 0; i < 60; ++i) (void)core.push(item.data(), item.size(), false, std::nullopt);
}

void write_header(procpool::detail::queue_block& b, std::uint64_t size) {
  // The header of the oldest message, at the start of the data bytes (nothing popped yet).
  auto* data = reinterpret_cast<std::byte*>(&b) +
               procpool::detail::align_up(sizeof(procpool::detail::queue_block),
                                          procpool::detail::cache_line);
  std::memcpy(data, &size, sizeof size);
}

}  // namespace

TEST_CASE("a queue whose shared positions and lengths are overwritten raises channel_corrupted",
          "[queue][fork]") {
  using block = procpool::detail::queue_block;
  SECTION("a header of 64 MiB with a tail to match") {
    CHECK(after_corruption(
              [](block& b) {
                write_header(b, 64u << 20);
                b.tail.store(b.head.load() + 8 + (64u << 20));
              },
              pop_all) == exit_status::exited(0));
  }
  SECTION("a header longer than what is queued") {
    CHECK(after_corruption([](block& b) { write_header(b, 3000); }, pop_all) ==
          exit_status::exited(0));
  }
  SECTION("a head beyond the tail") {
    CHECK(after_corruption([](block& b) { b.head.store(b.tail.load() + 100); }, pop_all) ==
          exit_status::exited(0));
    CHECK(after_corruption([](block& b) { b.head.store(b.tail.load() + 100); }, push_some) ==
          exit_status::exited(0));
  }
  SECTION("a tail far beyond the capacity") {
    CHECK(after_corruption([](block& b) { b.tail.store(b.tail.load() + (1u << 30)); }, push_some) ==
          exit_status::exited(0));
  }
  SECTION("a capacity of 1 GiB") {
    auto grow = [](block& b) { b.capacity = 1u << 30; };
    // The capacity each process knows is its own: the queue goes on as before.
    CHECK(after_corruption(grow, pop_all) == exit_status::exited(1));
    CHECK(after_corruption(
              [&](block& b) {
                grow(b);
                b.tail.store(b.head.load() + (512u << 20));
              },
              push_some) == exit_status::exited(0));
  }
  SECTION("the queue stays corrupt, and safe, for every later call") {
    queue_core core(4096);
    const char hello[] = "hello";
    REQUIRE(core.push(hello, sizeof hello, false, std::nullopt));
    write_header(core.shared_block(), 1u << 20);
    std::vector<std::byte> out;
    for (int i = 0; i < 3; ++i) {
      CHECK_THROWS_AS(core.pop(out, false, std::nullopt), procpool::channel_corrupted);
      CHECK_THROWS_WITH(core.pop(out, true, std::nullopt), Catch::Contains("corrupt"));
    }
    core.close();  // still possible
    CHECK(core.closed());
  }
}

// ---------------------------------------------------------------------------
// Python's queue names: qsize, empty, full, maxsize, JoinableQueue

TEST_CASE("an item too large for the queue: the error says what capacity it needs", "[queue]") {
  procpool::queue<std::string> q(4096);
  std::string big(10000, 'b');  // encodes to 10008 bytes, needs 10016 in the queue
  CHECK_THROWS_WITH(q.push(big), Catch::Contains("at least 10016 bytes") &&
                                     Catch::Contains("queue<T>(capacity_bytes)") &&
                                     Catch::Contains("pipe"));
  procpool::queue<std::string> sized(10016);
  CHECK(sized.try_push(big));
  CHECK(sized.pop() == big);
}

TEST_CASE("size, empty and full follow pushes and pops (CPython _TestQueue.test_qsize)",
          "[queue]") {
  procpool::queue<int> q(1024, 3);
  CHECK(q.max_items() == 3);
  CHECK(q.size() == 0);
  CHECK(q.empty());
  CHECK_FALSE(q.full());
  q.push(5);
  CHECK(q.size() == 1);
  CHECK_FALSE(q.empty());
  q.push(6);
  CHECK(q.size() == 2);
  q.push(7);
  CHECK(q.size() == 3);
  CHECK(q.full());  // the item limit, with bytes to spare
  CHECK_FALSE(q.try_push(8));
  CHECK_FALSE(q.push_for(8, 20ms));
  CHECK(q.pop() == 5);
  CHECK(q.size() == 2);
  CHECK_FALSE(q.full());
  CHECK(q.try_push(8));
  CHECK(q.pop() == 6);
  CHECK(q.pop() == 7);
  CHECK(q.pop() == 8);
  CHECK(q.size() == 0);
  CHECK(q.empty());

  procpool::queue<int> bytes(36);  // three ints of 12 bytes: full by its bytes
  CHECK(bytes.max_items() == procpool::unlimited_items);
  for (int i = 0; i < 3; ++i) CHECK(bytes.try_push(i));
  CHECK(bytes.full());
  CHECK_THROWS_AS(procpool::queue<int>(1024, 0), procpool::error);
}

TEST_CASE("a push waiting on the item limit is released by a pop in another process",
          "[queue][fork]") {
  procpool::queue<int> q(64 * 1024, 2);
  q.push(1);
  q.push(2);
  pid_t pusher = spawn([&] {
    q.push(3);
    return 0;
  });
  wait_until_sleeping(pusher);
  CHECK(q.size() == 2);
  CHECK(q.pop() == 1);
  CHECK(reap(pusher).success());
  CHECK(q.pop() == 2);
  CHECK(q.pop() == 3);
}

TEST_CASE("items pushed before and after a fork come out in order (CPython test_fork)",
          "[queue][fork]") {
  procpool::queue<int> q;
  for (int i = 0; i < 10; ++i) q.push(i);
  pid_t child = spawn([&] {
    for (int i = 10; i < 20; ++i) q.push(i);
    return 0;
  });
  std::vector<int> got;
  for (int i = 0; i < 20; ++i) got.push_back(q.pop());
  std::vector<int> want(20);
  for (int i = 0; i < 20; ++i) want[static_cast<std::size_t>(i)] = i;
  CHECK(got == want);
  CHECK_FALSE(q.try_pop());
  CHECK(reap(child).success());
}

TEST_CASE("task_done and join across processes (CPython _TestQueue.test_task_done)",
          "[queue][fork]") {
  procpool::queue<int> q;
  CHECK(q.join_for(0s));  // nothing pushed: nothing unfinished
  constexpr int workers = 4, items = 10;
  // Each worker takes items until it gets -1, marking each one done, the -1 too.
  std::vector<pid_t> pids;
  for (int w = 0; w < workers; ++w)
    pids.push_back(spawn([&] {
      for (;;) {
        int v = q.pop();
        q.task_done();
        if (v < 0) return 0;
      }
    }));
  for (int i = 0; i < items; ++i) q.push(i);
  q.join();
  CHECK(q.unfinished() == 0);
  for (int w = 0; w < workers; ++w) q.push(-1);
  CHECK(q.join_for(30s));
  CHECK(procpool_test::all_succeeded(pids));
  CHECK(q.empty());
  CHECK_THROWS_WITH(q.task_done(), Catch::Contains("more times than items were pushed"));
}

TEST_CASE("join waits for the last task_done, join_for times out while items are unfinished",
          "[queue][fork]") {
  procpool::queue<int> q;
  q.push(1);
  q.push(2);
  CHECK(q.unfinished() == 2);
  CHECK(q.pop() == 1);
  q.task_done();
  CHECK(q.unfinished() == 1);
  auto start = clock_type::now();
  CHECK_FALSE(q.join_for(50ms));
  CHECK(clock_type::now() - start >= 45ms);
  CHECK_FALSE(q.join_until(clock_type::now() + 5ms));
  pid_t joiner = spawn([&] {
    q.join();
    return 0;
  });
  wait_until_sleeping(joiner);
  CHECK(q.pop() == 2);
  q.task_done();
  CHECK(reap(joiner).success());
  CHECK(q.join_for(0s));
}

TEST_CASE("a process killed inside a push or task_done leaves the unfinished count right",
          "[queue][fork]") {
  const queue_stage stages[] = {queue_stage::push_locked, queue_stage::push_copied,
                                queue_stage::push_committed, queue_stage::done_locked};
  procpool::queue<item> q(4096);
  std::size_t unfinished = 0;
  std::uint64_t next_id = 0;
  int broken = 0;
  for (int round = 0; round < 16; ++round) {
    queue_stage stage = stages[round % 4];
    q.push(make_item(next_id++));
    ++unfinished;
    auto [ready_read, ready_write] = procpool::detail::sys::make_pipe();
    pid_t child = spawn([&, fd = ready_write.get()] {
      stop_at = stage;
      stop_signal_fd = fd;
      procpool::detail::queue_test_hook = &stop_inside_lock;
      if (stage == queue_stage::done_locked)
        q.task_done();
      else
        q.push(make_item(next_id));
      return 1;
    });
    ready_write.reset();
    char c;
    REQUIRE(procpool::detail::sys::read_some(ready_read.get(), &c, 1) == 1);
    ::kill(child, SIGKILL);
    REQUIRE(reap(child) == exit_status::killed(SIGKILL));
    if (stage == queue_stage::push_committed) {
      ++unfinished;
      ++next_id;
    }
    if (q.unfinished() != unfinished) ++broken;
  }
  CHECK(broken == 0);
  std::vector<std::uint64_t> ids;
  CHECK(drain(q, ids));
  for (std::size_t i = 0; i < unfinished; ++i) q.task_done();
  CHECK(q.join_for(0s));
}

// ---------------------------------------------------------------------------
// The channel fuzz target, fed pseudo-random inputs in every build

#include "fuzz/channel_fuzz_target.hpp"

TEST_CASE("a hostile peer overwriting a queue's or a pipe's shared state: safe, never stuck",
          "[queue][pipe]") {
  std::mt19937 rng(20261129);
  for (int round = 0; round < 400; ++round) {
    std::vector<std::uint8_t> bytes(1 + rng() % 300);
    for (auto& b : bytes) b = static_cast<std::uint8_t>(rng());
    // Mostly operations, with hostile writes rarer than in uniform bytes.
    for (std::size_t i = 1; i < bytes.size(); ++i)
      if ((bytes[i] & 7) == 0 && rng() % 4 != 0) bytes[i] = static_cast<std::uint8_t>(bytes[i] | 1);
    bytes[0] = static_cast<std::uint8_t>(round);
    CAPTURE(round);
    CHECK(channel_fuzz::one_input(bytes.data(), bytes.size()) == 0);
  }
}
