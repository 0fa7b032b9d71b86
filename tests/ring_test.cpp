// The SPSC byte ring under pipes and pools: messages around the ring's size
// and far beyond it across a fork, wrap-around, a reader whose writer died,
// and a two-thread stress run that ThreadSanitizer can check.
#include <procpool/codec.hpp>
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/os/liveness.hpp>
#include <procpool/detail/os/sys.hpp>
#include <procpool/detail/transport/ring.hpp>
#include <procpool/detail/transport/shm.hpp>
#include <procpool/exit_status.hpp>

#include <catch2/catch.hpp>

#include <support/support.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;
using procpool::detail::ring_control;
using procpool::detail::ring_reader;
using procpool::detail::ring_writer;
using procpool::detail::shared_mapping;
using procpool::detail::wait_status;

using procpool_test::reap;
using procpool_test::spawn;

namespace {

constexpr std::size_t ring_size = 4096;

/// A ring of `ring_size` bytes in a shared mapping, usable across fork: its
/// bytes after its control, or, `mirrored`, mapped twice in a row apart
/// from it (as a pool's rings are).
struct shared_ring {
  explicit shared_ring(bool mirrored = false) {
    if (mirrored) {
      mirror = procpool::detail::mirrored_mapping(1, ring_size);
      bytes = mirror.area(0);
    }
  }
  ring_writer writer() { return ring_writer(ring, nullptr, bytes); }
  ring_reader reader() { return ring_reader(ring, nullptr, bytes); }

  shared_mapping mapping{ring_control::bytes_needed(ring_size)};
  ring_control* ring = ring_control::create(mapping.data(), ring_size);
  procpool::detail::mirrored_mapping mirror;
  std::byte* bytes = nullptr;  // the mirrored bytes, or null
};

/// True while `pid` runs (false once it is a zombie).
bool running(pid_t pid) {
  return procpool::detail::process_alive(procpool::detail::make_process_token(pid, 0));
}

/// The content of message `seq` of `size` bytes: every byte depends on both.
std::vector<std::byte> make_message(std::uint64_t seq, std::size_t size) {
  std::vector<std::byte> m(size);
  for (std::size_t i = 0; i < size; ++i)
    m[i] = static_cast<std::byte>((seq * 131 + i * 7 + (i >> 8)) & 0xff);
  return m;
}

bool check_message(const std::vector<std::byte>& m, std::uint64_t seq, std::size_t size) {
  return m == make_message(seq, size);
}

/// The same for a message read into a `writer` (as workers read task frames).
bool check_message(const procpool::writer& m, std::uint64_t seq, std::size_t size) {
  return check_message(std::vector<std::byte>(m.data(), m.data() + m.size()), seq, size);
}

const std::vector<std::size_t> edge_sizes = {0,
                                             ring_size - 9,
                                             ring_size - 8,
                                             ring_size - 1,
                                             ring_size,
                                             ring_size + 1,
                                             10 * ring_size,
                                             0,
                                             1,
                                             7,
                                             8,
                                             9};

}  // namespace

TEST_CASE("messages around the ring's size cross a fork intact, child to parent", "[ring][fork]") {
  shared_ring s(GENERATE(false, true));
  constexpr int rounds = 3;  // each round starts at a different offset in the ring
  pid_t child = spawn([&] {
    auto w = s.writer();
    std::uint64_t seq = 0;
    for (int r = 0; r < rounds; ++r) {
      for (std::size_t size : edge_sizes) {
        auto m = make_message(seq++, size);
        if (!w.write_message(m.data(), m.size(), [] { return true; })) return 1;
      }
    }
    return 0;
  });
  auto rd = s.reader();
  std::vector<std::byte> got;
  std::uint64_t seq = 0;
  int bad = 0;
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t size : edge_sizes) {
      auto st = rd.read_message(got, std::nullopt, [&] { return running(child); });
      REQUIRE(st == wait_status::ready);
      if (!check_message(got, seq, size)) {
        UNSCOPED_INFO("message " << seq << " of " << size << " bytes arrived as " << got.size()
                                 << " bytes or with wrong content");
        ++bad;
      }
      ++seq;
    }
  }
  CHECK(bad == 0);
  CHECK(reap(child).success());
}

TEST_CASE("messages around the ring's size cross a fork intact, parent to child", "[ring][fork]") {
  shared_ring s(GENERATE(false, true));
  constexpr int rounds = 3;
  pid_t parent = ::getpid();
  pid_t child = spawn([&] {
    auto rd = s.reader();
    std::vector<std::byte> got;
    std::uint64_t seq = 0;
    for (int r = 0; r < rounds; ++r) {
      for (std::size_t size : edge_sizes) {
        if (rd.read_message(got, std::nullopt, [&] { return running(parent); }) !=
            wait_status::ready)
          return 1;
        if (!check_message(got, seq++, size)) return 2;
      }
    }
    return 0;
  });
  auto w = s.writer();
  std::uint64_t seq = 0;
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t size : edge_sizes) {
      auto m = make_message(seq++, size);
      REQUIRE(w.write_message(m.data(), m.size(), [&] { return running(child); }));
    }
  }
  CHECK(reap(child) == exit_status::exited(0));
}

TEST_CASE("a header published in pieces is seen whole by a waiting reader", "[ring]") {
  // The reader caches how far the writer got; a part of a header must not
  // stop it from seeing the rest once it is published.
  shared_ring s;
  auto w = s.writer();
  auto rd = s.reader();
  std::uint64_t header = 5;
  w.put(&header, 3);
  w.publish();
  REQUIRE(rd.available(1) == 3);
  REQUIRE_FALSE(rd.next_message_size());
  w.put(reinterpret_cast<const std::byte*>(&header) + 3, 5);
  w.put("hello", 5);
  w.publish();
  std::vector<std::byte> got;
  auto st = rd.read_message(got, std::chrono::steady_clock::now() + 10s, [] { return true; });
  REQUIRE(st == wait_status::ready);
  REQUIRE(got.size() == 5);
  CHECK(std::memcmp(got.data(), "hello", 5) == 0);
}

/// Writes and reads back messages of every size at every offset of the ring,
/// each read into `got` (reused from one message to the next).
template <class Buffer>
void wrap_messages(Buffer& got, bool mirrored) {
  shared_ring s(mirrored);
  auto w = s.writer();
  auto rd = s.reader();
  std::uint64_t written = 0, read = 0;
  int bad = 0;
  // Batches of up to 5 messages of 0 to ~1.5 KiB: positions cover every
  // offset of the ring, and headers and bodies wrap at every split.
  for (int batch = 0; batch < 20000; ++batch) {
    int n = 1 + batch % 5;
    std::vector<std::size_t> sizes;
    for (int i = 0; i < n; ++i) {
      std::size_t size = (written * 2654435761u) % 1500;
      auto m = make_message(written, size);
      if (w.free_space() < sizeof(std::uint64_t) + size) break;
      REQUIRE(w.write_message(m.data(), m.size(), [] { return true; }));
      sizes.push_back(size);
      ++written;
    }
    for (std::size_t size : sizes) {
      REQUIRE(rd.read_message(got, std::nullopt, [] { return true; }) == wait_status::ready);
      if (!check_message(got, read, size)) ++bad;
      ++read;
    }
  }
  CHECK(bad == 0);
  CHECK(read == written);
  CHECK(written > 40000);
  CHECK(s.ring->tail.load() > 1000 * ring_size);
}

TEST_CASE("many messages wrap around the ring intact, read into a vector or a reused writer",
          "[ring]") {
  bool mirrored = GENERATE(false, true);
  std::vector<std::byte> vector;
  wrap_messages(vector, mirrored);
  procpool::writer writer;  // as a worker gathers a task frame: not zeroed, shrinking and growing
  wrap_messages(writer, mirrored);
}

TEST_CASE("a reader waiting on a dead writer returns when keep_waiting says no", "[ring][fork]") {
  using clock = std::chrono::steady_clock;
  shared_ring s;
  std::vector<std::byte> got;
  auto rd = s.reader();

  SECTION("the writer exits before writing anything") {
    pid_t child = spawn([] { return 0; });
    auto start = clock::now();
    auto st = rd.read_message(got, std::nullopt, [&] { return running(child); });
    CHECK(st == wait_status::aborted);
    CHECK(clock::now() - start < 10s);
    CHECK(reap(child).success());
  }
  SECTION("the writer dies in the middle of a message") {
    pid_t child = spawn([&] {
      auto w = s.writer();
      std::uint64_t header = 100;
      w.put(&header, sizeof header);
      w.put("0123456789", 10);
      w.publish();
      return 0;
    });
    auto start = clock::now();
    auto st = rd.read_message(got, std::nullopt, [&] { return running(child); });
    CHECK(st == wait_status::aborted);
    CHECK(clock::now() - start < 10s);
    CHECK(reap(child).success());
  }
  SECTION("a deadline ends the wait for a message that never begins") {
    auto st = rd.read_message(got, clock::now() + 20ms, [] { return true; });
    CHECK(st == wait_status::timeout);
  }
}

TEST_CASE("two threads stream a million messages through a small ring", "[ring]") {
  // Writer and reader threads in one process: under ThreadSanitizer this
  // checks that every byte read was published with the ordering it needs.
  constexpr std::uint64_t count = 1'000'000;
  auto size_of = [](std::uint64_t seq) -> std::size_t {
    if (seq % 50'000 == 7) return 3 * ring_size + 5;  // now and then, one that streams
    return static_cast<std::size_t>((seq * 2654435761u) % 96);
  };
  auto fill = [](std::byte* p, std::uint64_t seq, std::size_t size) {
    for (std::size_t i = 0; i < size; ++i) p[i] = static_cast<std::byte>((seq + i * 13) & 0xff);
  };
  std::vector<std::byte> memory(ring_control::bytes_needed(ring_size) + 64);
  void* aligned = memory.data() + (64 - reinterpret_cast<std::uintptr_t>(memory.data()) % 64) % 64;
  ring_control* ring = ring_control::create(aligned, ring_size);

  std::uint64_t sent_sum = 0;
  std::thread writer([&] {
    ring_writer w(ring);
    std::vector<std::byte> m;
    for (std::uint64_t seq = 0; seq < count; ++seq) {
      m.resize(size_of(seq));
      fill(m.data(), seq, m.size());
      for (auto b : m) sent_sum += static_cast<std::uint64_t>(b);
      w.write_message(m.data(), m.size(), [] { return true; });
    }
  });
  ring_reader rd(ring);
  std::vector<std::byte> got, want;
  std::uint64_t received_sum = 0, bad = 0;
  for (std::uint64_t seq = 0; seq < count; ++seq) {
    if (rd.read_message(got, std::nullopt, [] { return true; }) != wait_status::ready) {
      ++bad;
      break;
    }
    want.resize(size_of(seq));
    fill(want.data(), seq, want.size());
    if (got != want) ++bad;
    for (auto b : got) received_sum += static_cast<std::uint64_t>(b);
  }
  writer.join();
  CHECK(bad == 0);
  CHECK(received_sum == sent_sum);
  CHECK(ring->head.load() == ring->tail.load());
}

// ---------------------------------------------------------------------------
// The eventcount under every ring's waits.

TEST_CASE("an eventcount wakes once per announced wait, not once per notification",
          "[ring][eventcount]") {
  procpool::detail::eventcount ec;
  auto seq = [&] { return ec.seq.load(); };
  std::uint32_t start = seq();
  ec.notify();  // nobody waits: nothing changes
  CHECK(seq() == start);

  std::uint32_t key = ec.prepare();
  CHECK(seq() == key);
  ec.notify();  // wakes the waiter: a new epoch
  std::uint32_t woken = seq();
  CHECK(woken != key);
  // The waiter has not run yet (it still counts as waiting): more
  // notifications before it announces itself again wake nobody.
  ec.notify();
  ec.notify();
  CHECK(seq() == woken);
  CHECK(ec.wait(key, std::chrono::nanoseconds(0)));  // returns at once: its epoch is over

  // Announced again, it is woken again.
  key = ec.prepare();
  CHECK(key == (woken | 1u));
  ec.notify();
  CHECK(seq() != key);
  CHECK(ec.wait(key, std::chrono::nanoseconds(0)));
  CHECK(ec.waiters.load() == 0);

  // A waiter that withdrew is not woken for.
  key = ec.prepare();
  ec.cancel();
  ec.notify();
  CHECK(seq() == key);
  // A later one is.
  std::uint32_t again = ec.prepare();
  ec.notify();
  CHECK(seq() != again);
  CHECK(ec.wait(again, std::nullopt));
}

TEST_CASE("no notification is lost between threads that wait and notify at once",
          "[ring][eventcount]") {
  // One thread counts up and notifies after each step; two threads each wait
  // for every value in turn. A lost wake-up leaves a waiter asleep: with no
  // timeout given, it would hang here, so each wait is bounded, and a wait
  // that had to time out counts as a failure.
  procpool::detail::eventcount ec;
  std::atomic<std::uint32_t> counter{0};
  constexpr std::uint32_t steps = 20000;
  std::atomic<int> timed_out{0};
  auto waiter = [&] {
    for (std::uint32_t want = 1; want <= steps; ++want) {
      for (;;) {
        if (counter.load(std::memory_order_acquire) >= want) break;
        std::uint32_t key = ec.prepare();
        if (counter.load(std::memory_order_acquire) >= want) {
          ec.cancel();
          break;
        }
        if (!ec.wait(key, std::chrono::seconds(10))) ++timed_out;
      }
    }
  };
  std::thread a(waiter), b(waiter);
  for (std::uint32_t i = 1; i <= steps; ++i) {
    if (i % 64 == 0) {
      // Now and then, both waiters announced (most of them asleep) before
      // the next step: the notification has someone to wake.
      auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (ec.waiters.load() < 2 && std::chrono::steady_clock::now() < give_up)
        std::this_thread::yield();
    }
    counter.store(i, std::memory_order_release);
    ec.notify();
  }
  a.join();
  b.join();
  CHECK(timed_out.load() == 0);
  CHECK(ec.waiters.load() == 0);
}

TEST_CASE("a mirrored mapping shows each area again right after it, across a fork",
          "[ring][fork]") {
  procpool::detail::mirrored_mapping m(3, ring_size);
  REQUIRE(m);
  REQUIRE(m.size() == ring_size);
  // The child writes each area through its second view; the parent reads
  // the first: the same bytes, and no area's bytes in another's.
  pid_t child = spawn([&] {
    for (std::size_t a = 0; a < 3; ++a)
      for (std::size_t k = 0; k < ring_size; ++k)
        m.area(a)[ring_size + k] = static_cast<std::byte>((a * 31 + k * 7) & 0xff);
    return 0;
  });
  REQUIRE(reap(child).success());
  int bad = 0;
  for (std::size_t a = 0; a < 3; ++a)
    for (std::size_t k = 0; k < ring_size; ++k)
      if (m.area(a)[k] != static_cast<std::byte>((a * 31 + k * 7) & 0xff)) ++bad;
  CHECK(bad == 0);
  // Written through the first view, seen through the second.
  m.area(1)[5] = std::byte{0xab};
  CHECK(m.area(1)[ring_size + 5] == std::byte{0xab});
  CHECK(m.area(0)[ring_size + 5] != std::byte{0xab});
}

TEST_CASE("a mirrored mapping refuses a size that is not whole pages, and its failures are clean",
          "[ring]") {
  CHECK_THROWS_AS(procpool::detail::mirrored_mapping(1, 1000), std::system_error);
  auto fds = procpool_test::open_fd_count();
  static const char* refuse;
  for (const char* call : {"memfd_create", "ftruncate", "mmap"}) {
    CAPTURE(call);
    refuse = call;
    procpool::detail::sys::fault_hook = [](const char* c) {
      return std::strcmp(c, refuse) == 0 ? ENOMEM : 0;
    };
    try {
      procpool::detail::mirrored_mapping m(2, ring_size);
      procpool::detail::sys::fault_hook = nullptr;
      FAIL("the mapping was made with " << call << " refused");
    } catch (const std::system_error& e) {
      procpool::detail::sys::fault_hook = nullptr;
      CHECK_THAT(e.what(), Catch::Contains(call));
    }
  }
  CHECK(procpool_test::open_fd_count() == fds);  // the memfd is closed on every path
}

TEST_CASE("through a mirrored ring every message up to its size is read in place, across its end",
          "[ring]") {
  shared_ring s(true);
  auto w = s.writer();
  auto rd = s.reader();
  std::uint64_t seq = 0;
  int across = 0, bad = 0;
  for (int round = 0; round < 3000; ++round) {
    // Sizes from 0 to the whole ring less the length: every split of
    // length and body at the ring's end comes up.
    std::size_t size = (seq * 2654435761u) % (ring_size - sizeof(std::uint64_t) + 1);
    auto m = make_message(seq, size);
    REQUIRE(w.write_message(m.data(), m.size(), [] { return true; }));
    REQUIRE(rd.next_message_size() == size);
    std::size_t total = sizeof(std::uint64_t) + size;
    std::size_t at = std::size_t(s.ring->head.load() % ring_size);
    if (at + total > ring_size) ++across;
    const std::byte* p = rd.peek(total);
    REQUIRE(p != nullptr);
    if (std::vector<std::byte>(p + sizeof(std::uint64_t), p + total) != m) ++bad;
    rd.skip(total);
    rd.release();
    ++seq;
  }
  CHECK(bad == 0);
  CHECK(across > 500);  // most messages this size cross the end
  // Without the mirror, a message across the end cannot be read in place.
  shared_ring plain;
  auto pw = plain.writer();
  auto pr = plain.reader();
  std::vector<std::byte> filler(ring_size / 2);
  REQUIRE(pw.write_message(filler.data(), filler.size(), [] { return true; }));
  REQUIRE(pr.read_message(filler, std::nullopt, [] { return true; }) == wait_status::ready);
  REQUIRE(pw.write_message(filler.data(), filler.size(), [] { return true; }));
  CHECK(pr.peek(sizeof(std::uint64_t) + filler.size()) == nullptr);
  CHECK_FALSE(pr.mirrored());
}
