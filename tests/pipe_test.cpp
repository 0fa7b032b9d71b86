// pipe<T> and connection<T>: round trips of every kind of value across a fork,
// a message far larger than the buffer, ping-pong, and every way the other end
// can go away — closed, exited, killed — with recv and send failing promptly.
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/os/liveness.hpp>
#include <procpool/detail/os/sys.hpp>
#include <procpool/exit_status.hpp>
#include <procpool/pipe.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <dirent.h>
#include <signal.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::channel_closed;
using procpool::exit_status;
using clock_type = std::chrono::steady_clock;

using procpool_test::wait_until_sleeping;

namespace {

using procpool_test::child_count;
using procpool_test::go_signal;
using procpool_test::open_fd_count;
using procpool_test::reap;
using procpool_test::spawn;

struct point {
  int x;
  double y;
  std::string label;
  std::vector<int> tags;
  bool operator==(const point& o) const {
    return x == o.x && y == o.y && label == o.label && tags == o.tags;
  }
};

/// Sends each value to a child that echoes it back until the pipe closes;
/// true when every echo equals what was sent and the child ended cleanly.
template <class T>
bool echo_round_trips(const std::vector<T>& values) {
  auto [a, b] = procpool::pipe<T>();
  pid_t child = spawn([&b = b] {
    for (;;) {
      T v;
      try {
        v = b.recv();
      } catch (const channel_closed&) {
        return 0;
      }
      b.send(v);
    }
  });
  bool ok = true;
  for (const T& v : values) {
    a.send(v);
    if (!(a.recv() == v)) ok = false;
  }
  a.close();
  return reap(child).success() && ok;
}

}  // namespace

TEST_CASE("values of every kind make round trips through a pipe", "[pipe][fork]") {
  CHECK(echo_round_trips<int>({0, 1, -1, 42, 2147483647}));
  CHECK(echo_round_trips<std::string>({"", "a", std::string(5000, 'x'), "héllo\0there"}));
  CHECK(echo_round_trips<std::vector<double>>({{}, {1.5}, std::vector<double>(100000, 2.25)}));
  CHECK(echo_round_trips<point>(
      {{1, 2.5, "one", {1, 2, 3}}, {0, 0, "", {}}, {-7, 1e300, std::string(300, 'p'), {9}}}));
}

TEST_CASE("a 10 MiB message crosses a 4 KiB pipe in both directions", "[pipe][fork]") {
  constexpr std::size_t size = 10u << 20;
  auto make = [](std::uint32_t seed) {
    std::vector<std::uint32_t> v(size / 4);
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] = static_cast<std::uint32_t>(i * 2654435761u) ^ seed;
    return v;
  };
  auto [a, b] = procpool::pipe<std::vector<std::uint32_t>>(4096);
  pid_t child = spawn([&b = b, &make] {
    auto got = b.recv();
    if (got != make(1)) return 1;
    b.send(make(2));
    return 0;
  });
  a.send(make(1));
  auto got = a.recv();
  CHECK(got.size() == size / 4);
  CHECK(got == make(2));
  CHECK(reap(child) == exit_status::exited(0));
}

TEST_CASE("large messages of every shape stream through a small pipe", "[pipe][fork]") {
  // Strings and vectors of plain elements stream straight into the new
  // container; anything else is put together first, then decoded.
  std::string text(1 << 20, 'q');
  for (std::size_t i = 0; i < text.size(); i += 7) text[i] = static_cast<char>('a' + i % 26);
  std::vector<std::string> words(20000);
  for (std::size_t i = 0; i < words.size(); ++i) words[i] = std::string(i % 50, 'w');
  std::vector<point> points(5000, point{1, 2.0, "three", {4, 5}});

  auto [a, b] = procpool::pipe<std::string>(4096);
  auto [c, d] = procpool::pipe<std::vector<std::string>>(4096);
  auto [e, f] = procpool::pipe<std::vector<point>>(4096);
  pid_t child = spawn([&, &b = b, &d = d, &f = f] {
    b.send(b.recv());
    d.send(d.recv());
    f.send(f.recv());
    return 0;
  });
  // One round trip at a time: with both directions far smaller than a
  // message, a second send before the first echo is read would wait forever.
  a.send(text);
  CHECK(a.recv() == text);
  c.send(words);
  CHECK(c.recv() == words);
  e.send(points);
  CHECK(e.recv() == points);
  CHECK(reap(child).success());
}

TEST_CASE("a message that does not decode throws decode_error and is dropped", "[pipe]") {
  using procpool::detail::connection_core;
  auto mapping = std::make_shared<procpool::detail::pipe_mapping>(4096);
  connection_core sender(mapping, 0), receiver(mapping, 1);
  // A thread sends, as messages larger than the ring wait for the reader.
  std::thread t([&] {
    // A count of 5000 four-byte elements, but 4999 elements' worth of bytes.
    std::uint64_t count = 5000;
    std::vector<std::uint32_t> body(4999, 7);
    sender.send(&count, sizeof count, body.data(), body.size() * 4);
    // A string of 1000 characters that holds 10: fits the ring, decoded in place.
    std::uint64_t length = 1000;
    sender.send(&length, sizeof length, "0123456789", 10);
    // Then good messages of both kinds.
    std::vector<std::uint32_t> good(6000, 9);
    count = good.size();
    sender.send(&count, sizeof count, good.data(), good.size() * 4);
    length = 3;
    sender.send(&length, sizeof length, "abc", 3);
  });
  std::optional<std::vector<std::uint32_t>> numbers;
  std::optional<std::string> text;
  auto receive_numbers = [&] {
    receiver.receive("recv", true, std::nullopt,
                     procpool::detail::decode_streamed<std::vector<std::uint32_t>>{{numbers}});
  };
  auto receive_text = [&] {
    receiver.receive("recv", true, std::nullopt, procpool::detail::decode_whole<std::string>{text});
  };
  CHECK_THROWS_AS(receive_numbers(), procpool::decode_error);
  CHECK_THROWS_AS(receive_text(), procpool::decode_error);
  receive_numbers();
  CHECK(numbers == std::vector<std::uint32_t>(6000, 9));
  receive_text();
  CHECK(text == "abc");
  t.join();
}

TEST_CASE("parent and child ping-pong 10000 times", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<std::uint64_t>();
  pid_t child = spawn([&b = b] {
    for (;;) {
      std::uint64_t v = b.recv();
      if (v == 0) return 0;
      b.send(v + 1);
    }
  });
  std::uint64_t wrong = 0;
  for (std::uint64_t i = 1; i <= 10000; ++i) {
    a.send(2 * i);
    if (a.recv() != 2 * i + 1) ++wrong;
  }
  a.send(0);
  CHECK(wrong == 0);
  CHECK(reap(child).success());
}

TEST_CASE("recv on a pipe whose peer ends while we wait throws channel_closed promptly",
          "[pipe][fork]") {
  // The child notes when it ends, on the clock every process shares.
  procpool::detail::shared_mapping shared(sizeof(std::atomic<std::int64_t>));
  auto* ended_at = new (shared.data()) std::atomic<std::int64_t>(0);
  auto [a, b] = procpool::pipe<int>();
  pid_t parent = ::getpid();
  int how = GENERATE(0, 1, 2);
  CAPTURE(how);  // 0: _exit, 1: SIGKILL, 2: close() then _exit
  pid_t child = spawn([&, &b = b] {
    b.send(7);  // this process now uses end b
    wait_until_sleeping(parent);
    ended_at->store(clock_type::now().time_since_epoch().count());
    if (how == 1) ::raise(SIGKILL);
    if (how == 2) b.close();
    ::_exit(0);  // no destructor runs
    return 0;
  });
  CHECK(a.recv() == 7);  // sent before the end: still delivered
  std::string what;
  try {
    (void)a.recv();
  } catch (const channel_closed& e) {
    what = e.what();
  }
  auto latency = clock_type::now().time_since_epoch() - clock_type::duration(ended_at->load());
  INFO(what);
  CHECK_THAT(what, Catch::Contains(std::to_string(child)));
  CHECK_THAT(what, Catch::Contains(how == 2 ? "closed by process" : "has exited"));
  double latency_ms = std::chrono::duration<double, std::milli>(latency).count();
  CHECK(latency_ms < 2000);  // about 10 ms expected; generous for a loaded machine
  CHECK(reap(child) == (how == 1 ? exit_status::killed(SIGKILL) : exit_status::exited(0)));
  // Later calls keep failing the same way.
  CHECK_THROWS_AS(a.recv(), channel_closed);
  CHECK_THROWS_AS(a.try_recv(), channel_closed);
  CHECK_THROWS_AS(a.send(1), channel_closed);
  CHECK(a.poll());  // recv would not block: it throws
}

TEST_CASE("a peer that closed its end: messages drain, then recv and send throw", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  go_signal may_exit;
  pid_t child = spawn([&, &b = b] {
    for (int i = 1; i <= 3; ++i) b.send(i);
    b.close();
    b.close();  // twice: nothing happens
    may_exit.await();
    return 0;
  });
  CHECK(a.recv() == 1);
  CHECK(a.recv() == 2);
  CHECK(a.recv() == 3);
  CHECK_THROWS_WITH(a.recv(), Catch::Contains("closed by process " + std::to_string(child)));
  CHECK_THROWS_AS(a.send(4), channel_closed);
  CHECK_THROWS_AS(a.recv_for(10ms), channel_closed);
  may_exit.give();
  CHECK(reap(child).success());
}

TEST_CASE("send to a peer that has exited throws channel_closed", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  pid_t child = spawn([&b = b] {
    (void)b.poll();  // this process now uses end b
    return 0;
  });
  REQUIRE(reap(child).success());
  // The exit is noticed within one liveness slice; keep sending until then
  // (the buffer fills long before, and a full buffer notices at once).
  auto end = clock_type::now() + 10s;
  bool thrown = false;
  int sent = 0;
  while (!thrown && clock_type::now() < end) {
    try {
      a.send(sent);
      ++sent;
    } catch (const channel_closed& e) {
      thrown = true;
      CHECK_THAT(e.what(), Catch::Contains("has exited"));
    }
  }
  CHECK(thrown);
}

TEST_CASE("a killed child's end is seen gone even before it is reaped", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  go_signal never;
  pid_t child = spawn([&, &b = b] {
    b.send(1);
    never.await();
    return 0;
  });
  CHECK(a.recv() == 1);
  ::kill(child, SIGKILL);  // a zombie until reaped below: kill(pid, 0) still succeeds
  CHECK_THROWS_AS(a.recv(), channel_closed);
  CHECK(reap(child) == exit_status::killed(SIGKILL));
}

TEST_CASE("recv_for, try_recv and poll time out on a silent live peer", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  go_signal speak, may_exit;
  pid_t child = spawn([&, &b = b] {
    (void)b.poll();
    speak.await();
    b.send(99);
    may_exit.await();
    return 0;
  });
  auto start = clock_type::now();
  CHECK_FALSE(a.recv_for(50ms));
  CHECK(clock_type::now() - start >= 45ms);
  CHECK_FALSE(a.poll(30ms));
  CHECK_FALSE(a.poll());
  CHECK_FALSE(a.try_recv());
  CHECK_FALSE(a.recv_until(clock_type::now() + 10ms));
  CHECK_FALSE(a.recv_for(0s));
  speak.give();
  CHECK(a.poll(30s));
  CHECK(a.recv_for(30s) == 99);
  may_exit.give();
  CHECK(reap(child).success());
}

TEST_CASE("the maker may close the child's end after forking, as with descriptors",
          "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  pid_t child = spawn([&b = b] {
    for (;;) b.send(b.recv() * 2);
    return 0;
  });
  b.close();  // the parent's handle only: the child keeps using its end
  CHECK(b.closed());
  for (int i = 1; i <= 100; ++i) {
    a.send(i);
    REQUIRE(a.recv() == 2 * i);
  }
  a.close();  // the child's recv throws, so it exits with 97
  CHECK(reap(child) == exit_status::exited(97));
}

TEST_CASE("an end used by the parent can pass to a child it forks later", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  b.send(1);
  CHECK(a.recv() == 1);
  pid_t child = spawn([&b = b] {
    if (b.recv() != 10) return 1;
    b.send(2);
    return 0;
  });
  // The parent used b, so its own copy would keep b open for a: it lets go,
  // as it would close a descriptor it handed to the child. Before the child
  // can finish (it waits for the 10), so the child is the end's last user.
  b.close();
  a.send(10);
  CHECK(a.recv() == 2);
  CHECK(reap(child).success());
  CHECK_THROWS_WITH(a.recv(), Catch::Contains("has exited"));
}

TEST_CASE("both ends in one process: threads, close, move", "[pipe]") {
  SECTION("two threads, one per end") {
    auto [a, b] = procpool::pipe<std::string>(4096);
    std::thread t([&b = b] {
      for (int i = 0; i < 2000; ++i) b.send(std::string(static_cast<std::size_t>(i), 'z'));
    });
    int bad = 0;
    for (int i = 0; i < 2000; ++i)
      if (a.recv() != std::string(static_cast<std::size_t>(i), 'z')) ++bad;
    t.join();
    CHECK(bad == 0);
  }
  SECTION("one thread: send, then recv on the other end; close") {
    auto [a, b] = procpool::pipe<int>();
    a.send(5);
    CHECK(b.poll());
    CHECK(b.recv() == 5);
    b.close();  // this process used b: closed for a too
    CHECK_THROWS_WITH(a.recv(), Catch::Contains("closed by process"));
    CHECK_THROWS_AS(b.send(1), channel_closed);
  }
  SECTION("moved ends") {
    auto [a, b] = procpool::pipe<int>();
    procpool::connection<int> c = std::move(a);
    CHECK(a.closed());
    CHECK_THROWS_WITH(a.send(1), Catch::Contains("moved-from"));
    c.send(3);
    CHECK(b.recv() == 3);
    procpool::connection<int> d;
    CHECK(d.closed());
    d = std::move(b);
    d.send(4);
    CHECK(c.recv() == 4);
    a.close();  // closing a moved-from connection does nothing
  }
  SECTION("spinning waits deliver as well") {
    auto [a, b] = procpool::pipe<int>();
    a.set_spin(1ms);
    b.set_spin(0ns);
    CHECK(a.spin() == 1ms);
    std::thread t([&b = b] {
      for (int i = 0; i < 1000; ++i) b.send(b.recv() + 1);
    });
    int bad = 0;
    for (int i = 0; i < 1000; ++i) {
      a.send(i);
      if (a.recv() != i + 1) ++bad;
    }
    t.join();
    CHECK(bad == 0);
  }
}

TEST_CASE("pipes leave no descriptor, mapping or child behind", "[pipe][fork]") {
  auto fds = open_fd_count();
  auto children = child_count();
  for (int round = 0; round < 5; ++round) {
    auto [a, b] = procpool::pipe<int>();
    pid_t child = spawn([&b = b] {
      b.send(b.recv() + 1);
      return 0;
    });
    a.send(round);
    CHECK(a.recv() == round + 1);
    CHECK(reap(child).success());
  }
  CHECK(open_fd_count() == fds);
  CHECK(child_count() == children);
}

// ---------------------------------------------------------------------------
// Sharing an end between processes (one at a time) and closing inherited copies

TEST_CASE("an end used in turn by two processes loses nothing: A, then B, then A", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  SECTION("sending") {
    b.send(1);
    pid_t child = spawn([&b = b] {
      b.send(2);
      return 0;
    });
    REQUIRE(reap(child).success());
    b.send(3);
    CHECK(a.recv() == 1);
    CHECK(a.recv() == 2);
    CHECK(a.recv() == 3);
    CHECK_FALSE(a.poll());
  }
  SECTION("receiving") {
    for (int i = 1; i <= 3; ++i) a.send(i);
    CHECK(b.recv() == 1);
    pid_t child = spawn([&b = b] { return b.recv() == 2 ? 0 : 1; });
    REQUIRE(reap(child).success());
    CHECK(b.recv() == 3);
    CHECK_FALSE(b.poll());
  }
  SECTION("streamed messages larger than the buffer, both ways") {
    auto [c, d] = procpool::pipe<std::string>(4096);
    std::string big(20000, 'x');
    pid_t helper = spawn([&, &c = c] {
      // Reads what the parent, then the middle child, then the parent sent on d.
      for (int i = 0; i < 3; ++i)
        if (c.recv() != big + std::to_string(i)) return 1;
      return 0;
    });
    d.send(big + "0");
    pid_t middle = spawn([&, &d = d] {
      d.send(big + "1");
      return 0;
    });
    CHECK(reap(middle).success());
    d.send(big + "2");
    CHECK(reap(helper).success());
  }
}

TEST_CASE("many writers share one end under a lock (CPython _TestBarrier.test_thousand)",
          "[pipe][fork]") {
  constexpr int writers = 5, passes = 200;
  auto [reader, writer] = procpool::pipe<int>();
  procpool::mutex lock;
  procpool::barrier round(writers);
  std::vector<pid_t> pids;
  for (int w = 0; w < writers; ++w)
    pids.push_back(spawn([&, &writer = writer] {
      for (int i = 0; i < passes; ++i) {
        round.arrive_and_wait();
        std::lock_guard<procpool::mutex> hold(lock);
        writer.send(i);
      }
      return 0;
    }));
  int wrong = 0;
  for (int i = 0; i < passes; ++i)
    for (int w = 0; w < writers; ++w)
      if (reader.recv() != i) ++wrong;
  CHECK(wrong == 0);
  CHECK(procpool_test::all_succeeded(pids));
}

TEST_CASE("writers that come and go one after another: every message, then closed",
          "[pipe][fork]") {
  // Each writer sends under the lock and ends at once, often before the next
  // one has even started: the end stays open while any process holds it.
  constexpr int writers = 6, each = 50;
  auto [reader, writer] = procpool::pipe<int>();
  procpool::mutex lock;
  go_signal parent_closed;  // the writers start once the parent let go of its copy
  std::vector<pid_t> pids;
  for (int w = 0; w < writers; ++w)
    pids.push_back(spawn([&, w, &writer = writer] {
      if (w == 0 && !parent_closed.await()) return 1;
      for (int i = 0; i < each; ++i) {
        std::lock_guard<procpool::mutex> hold(lock);
        writer.send(w * 1000 + i);
      }
      return 0;
    }));
  writer.close();  // the parent's copy: the children hold theirs
  parent_closed.give();
  std::vector<int> next(writers, 0);
  int wrong = 0, got = 0;
  std::string end;
  try {
    for (;;) {
      int v = reader.recv();
      int w = v / 1000;
      if (w < 0 || w >= writers || v % 1000 != next[static_cast<std::size_t>(w)]++) ++wrong;
      ++got;
    }
  } catch (const channel_closed& e) {
    end = e.what();
  }
  CHECK(got == writers * each);
  CHECK(wrong == 0);
  CHECK_THAT(end, Catch::Contains("has exited"));
  CHECK(procpool_test::all_succeeded(pids));
}

TEST_CASE("a child closing its inherited copy of an end leaves it open for the parent",
          "[pipe][fork]") {
  // Python's idiom: each process closes the end it does not use.
  auto [a, b] = procpool::pipe<int>();
  go_signal closed, may_exit;
  pid_t child = spawn([&, &a = a, &b = b] {
    a.close();  // nobody has used a yet: this closes the child's copy only
    closed.give();
    int v = b.recv();
    b.send(v + 1);
    may_exit.await();
    return 0;
  });
  b.close();  // the parent's copy of the child's end, before the child used it
  REQUIRE(closed.await());
  a.send(41);
  CHECK(a.recv() == 42);
  may_exit.give();
  CHECK(reap(child).success());
  CHECK_THROWS_WITH(a.recv(), Catch::Contains("has exited"));
}

TEST_CASE("a child that closes both inherited ends and exits leaves the pipe to the parent",
          "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  pid_t child = spawn([&a = a, &b = b] {
    a.close();
    b.close();
    return 0;
  });
  REQUIRE(reap(child).success());
  a.send(7);
  CHECK(b.recv() == 7);
  b.send(8);
  CHECK(a.recv() == 8);
}

TEST_CASE("a one-way pipe carries values one way only (CPython _TestConnection.test_duplex_false)",
          "[pipe][fork]") {
  auto [reader, writer] = procpool::pipe<std::string>(procpool::one_way);
  CHECK(reader.readable());
  CHECK_FALSE(reader.writable());
  CHECK(writer.writable());
  CHECK_FALSE(writer.readable());
  go_signal closed;  // the parent lets go of its writer before the child can exit
  pid_t child = spawn([&reader = reader, &writer = writer, &closed] {
    reader.close();
    if (!closed.await()) return 1;
    writer.send("hello");
    writer.send(std::string(100000, 'w'));  // larger than nothing: streams as usual
    return 0;
  });
  writer.close();
  closed.give();
  CHECK(reader.recv() == "hello");
  CHECK(reader.recv() == std::string(100000, 'w'));
  CHECK(reap(child).success());
  CHECK_THROWS_WITH(reader.recv(), Catch::Contains("has exited"));
  CHECK_THROWS_WITH(reader.send("back"), Catch::Contains("one-way pipe"));

  auto [r2, w2] = procpool::pipe<int>(procpool::one_way, 4096);
  CHECK_THROWS_AS(w2.recv(), procpool::error);
  CHECK_THROWS_AS(w2.poll(), procpool::error);
  CHECK_THROWS_AS(w2.try_recv(), procpool::error);
  CHECK_THROWS_AS(r2.send(1), procpool::error);
  w2.send(3);
  CHECK(r2.recv() == 3);
  procpool::connection<int> moved = std::move(w2);
  CHECK(moved.writable());
  CHECK_FALSE(w2.writable());
}

TEST_CASE("shutdown closes an end for every process that holds it", "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  go_signal shut, may_exit;
  pid_t child = spawn([&, &b = b] {
    b.send(1);
    shut.await();
    try {
      b.send(2);  // the parent shut this end down: closed for the child too
    } catch (const channel_closed&) {
      may_exit.await();
      return 0;
    }
    return 1;
  });
  CHECK(a.recv() == 1);
  b.shutdown();  // the parent's copy, but for everyone
  CHECK(b.closed());
  shut.give();
  CHECK_THROWS_WITH(a.recv(), Catch::Contains("closed by process " + std::to_string(::getpid())));
  may_exit.give();
  CHECK(reap(child).success());
}

TEST_CASE("an end inherited by a grandchild stays open until the grandchild lets go",
          "[pipe][fork]") {
  auto [a, b] = procpool::pipe<int>();
  go_signal may_exit;
  pid_t child = spawn([&, &a = a, &b = b] {
    a.close();
    b.send(1);
    pid_t grandchild = spawn([&b = b] {
      b.send(2);
      return 0;
    });
    b.close();  // the child's copy; the grandchild holds its own
    may_exit.await();
    return procpool_test::reap(grandchild).success() ? 0 : 1;
  });
  b.close();
  CHECK(a.recv_for(30s) == 1);
  CHECK(a.recv_for(30s) == 2);
  may_exit.give();
  CHECK(reap(child).success());
  CHECK_THROWS_AS(a.recv(), channel_closed);
}

TEST_CASE("an empty message whose header wraps is not delivered again to the next user",
          "[pipe][fork]") {
  using procpool::detail::connection_core;
  auto mapping = std::make_shared<procpool::detail::pipe_mapping>(4096);
  connection_core sender(mapping, 0), receiver(mapping, 1);
  std::size_t got = 99;
  auto take = [&got](const std::byte*, std::size_t size) { got = size; };
  // 8 + 4084 bytes end 4 bytes short of the ring's end: the next header wraps.
  std::vector<char> body(4084, 'b');
  sender.send(body.data(), body.size());
  REQUIRE(receiver.receive("recv", true, std::nullopt, take));
  REQUIRE(got == 4084);
  sender.send(nullptr, 0);
  REQUIRE(receiver.receive("recv", true, std::nullopt, take));
  REQUIRE(got == 0);
  sender.send("x", 1);
  // Another process takes the end over: it starts from what was released.
  pid_t child = spawn([&] {
    std::size_t size = 99;
    receiver.receive("recv", true, std::nullopt,
                     [&size](const std::byte*, std::size_t n) { size = n; });
    return size == 1 ? 0 : 1;
  });
  CHECK(reap(child).success());
}
