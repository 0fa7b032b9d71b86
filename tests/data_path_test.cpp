// The pool's data path: big arrays and strings among a map's items go into
// the rings straight from the caller's input, not through a copy the chunk
// keeps; what that must never break.
//
// The input's big blocks live in pages that are unmapped when the input is
// destroyed (`unmapped_allocator`), so a frame that read its input after the
// call ended would crash the test rather than read stale memory quietly.
#include <procpool/pool.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <deque>
#include <fstream>
#include <iterator>
#include <list>
#include <new>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using procpool::map_options;
using procpool::pool;
using procpool::pool_options;

namespace pd = procpool::detail;

namespace {

/// Set in the test's own process: every allocation of `unmapped_allocator`
/// is then in pages of its own, made inaccessible when freed (and kept so:
/// no later mapping reuses the addresses), so that reading freed memory
/// faults. Workers clear it (in the pool's initializer) and allocate
/// as usual: their items are decoded fast, so that each is given many frames.
bool unmapping = false;

template <class T>
struct unmapped_allocator {
  using value_type = T;
  unmapped_allocator() = default;
  template <class U>
  unmapped_allocator(const unmapped_allocator<U>&) noexcept {}  // NOLINT: rebinding converts
  static std::size_t rounded(std::size_t n) {
    std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    return (n * sizeof(T) + page - 1) / page * page;
  }
  T* allocate(std::size_t n) {
    if (!unmapping) return std::allocator<T>().allocate(n);
    void* p =
        ::mmap(nullptr, rounded(n), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (!unmapping)
      std::allocator<T>().deallocate(p, n);
    else
      ::mmap(p, rounded(n), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1,
             0);
  }
  template <class U>
  bool operator==(const unmapped_allocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const unmapped_allocator<U>&) const noexcept {
    return false;
  }
};

/// Turns `unmapping` on for a test's life; its pools' workers turn it off.
struct unmapping_scope {
  unmapping_scope() { unmapping = true; }
  ~unmapping_scope() { unmapping = false; }
  unmapping_scope(const unmapping_scope&) = delete;
  unmapping_scope& operator=(const unmapping_scope&) = delete;
};

using bytes = std::vector<char, unmapped_allocator<char>>;

/// Items left in the input, two to a ring of 64 KiB: at least
/// `frame_refs::min_bytes`.
constexpr std::size_t item_bytes = pd::frame_refs::min_bytes + 4096;

bytes pattern(std::size_t size, unsigned seed) {
  bytes v(size);
  for (std::size_t i = 0; i < size; ++i) v[i] = static_cast<char>(i * 131 + seed * 7 + 1);
  return v;
}

std::uint64_t checksum(const char* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * 1099511628211ull;
  return h ^ n;
}

/// Options for a pool of 2 workers with rings of `ring` bytes whose workers
/// allocate as usual (see `unmapping`).
pool_options small_rings(std::size_t ring = 64 * 1024) {
  pool_options o;
  o.initializer = [] { unmapping = false; };
  o.workers = 2;
  o.ring_bytes = ring;
  return o;
}

/// `small_rings()` whose progress callback, once `stop` is set, throws
/// "enough" (once: it clears `stop`), ending the map it reports on.
pool_options stopping_rings(bool& stop) {
  pool_options o = small_rings();
  o.on_progress = [&stop](const procpool::progress_info&) {
    if (stop) {
      stop = false;
      throw std::runtime_error("enough");
    }
  };
  return o;
}

/// What the cheap functions below return for `v`.
std::uint64_t cheap(const bytes& v) {
  return std::uint64_t(v.size()) + std::uint64_t(v[7]);
}

/// Maps `n` fresh items through `p` (a pool of `cheap`) and checks them: the
/// pool still works after what a test did to it.
template <class Pool>
void still_maps(Pool& p, std::size_t n, std::size_t size) {
  std::vector<bytes> again;
  for (unsigned k = 0; k < n; ++k) again.push_back(pattern(size + k, k + 30));
  auto r = p.map(again, map_options{1});
  for (std::size_t k = 0; k < again.size(); ++k) REQUIRE(r[k] == cheap(again[k]));
}

}  // namespace

namespace money_ns {
/// A type whose vectors have an encoding of their own (each element negated).
struct money {
  long cents;
};
inline void procpool_encode(procpool::writer& out, const std::vector<money>& v) {
  procpool::encode(out, std::uint64_t(v.size()));
  for (const money& m : v) procpool::encode(out, -m.cents);
}
inline std::vector<money> procpool_decode(procpool::reader& in,
                                          procpool::type_tag<std::vector<money>>) {
  auto n = procpool::decode<std::uint64_t>(in);
  std::vector<money> v;
  for (std::uint64_t k = 0; k < n; ++k) v.push_back(money{-procpool::decode<long>(in)});
  return v;
}
}  // namespace money_ns

// What may be sent from where it lies: arrays of trivially sendable elements
// and strings, encoded by procpool; never a type with an encoding of its own.
static_assert(pd::bulk_codec<std::vector<double>>());
static_assert(pd::bulk_codec<std::string>());
static_assert(pd::bulk_codec<bytes>());
static_assert(!pd::bulk_codec<std::vector<bool>>());
static_assert(!pd::bulk_codec<std::vector<std::string>>());
static_assert(!pd::bulk_codec<std::vector<money_ns::money>>());
static_assert(!pd::bulk_codec<int>());

TEST_CASE("a frame's pieces come out in order from any offset", "[data_path]") {
  pd::chunk c;
  std::string own = "0123456789";
  c.bytes.write(own.data(), own.size());
  std::string b1 = "ABCDEFG", b2 = "xy", b3 = "LMNOP";
  auto as_bytes = [](const std::string& s) { return reinterpret_cast<const std::byte*>(s.data()); };
  c.blocks.add(0, as_bytes(b1), b1.size());  // before any own byte
  c.blocks.add(4, as_bytes(b2), b2.size());
  c.blocks.add(4, as_bytes(b3), b3.size());  // two blocks back to back
  std::string whole = b1 + "0123" + b2 + b3 + "456789";
  REQUIRE(c.size() == whole.size());
  for (std::size_t from = 0; from <= whole.size(); ++from) {
    for (std::size_t n = 0; from + n <= whole.size(); ++n) {
      std::string got;
      c.copy_out(from, n, [&](const std::byte* p, std::size_t k) {
        REQUIRE(k > 0);
        got.append(reinterpret_cast<const char*>(p), k);
      });
      REQUIRE(got == whole.substr(from, n));
    }
  }
  c.blocks.add(10, as_bytes(b1), b1.size());  // after the last own byte
  whole += b1;
  c.own_blocks();
  REQUIRE(c.blocks.empty());
  REQUIRE(c.size() == whole.size());
  REQUIRE(std::string(reinterpret_cast<const char*>(c.bytes.data()), c.bytes.size()) == whole);
}

TEST_CASE("big arrays and strings among the items arrive whole, at every size around the cut",
          "[data_path]") {
  pool_options o;
  o.workers = 2;
  o.ring_bytes = 64 * 1024;  // frames bigger than the ring go out in pieces
  constexpr std::size_t edge = pd::frame_refs::min_bytes;

  SECTION("arrays of doubles, sizes either side of the smallest block left in place") {
    pool p([](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); },
           o);
    std::vector<std::vector<double>> in;
    for (std::size_t n : {std::size_t(0), edge / 8 - 1, edge / 8, edge / 8 + 1, std::size_t(1),
                          std::size_t(1) << 17, edge / 8, std::size_t(3)}) {
      std::vector<double> v(n);
      std::iota(v.begin(), v.end(), double(in.size()));
      in.push_back(std::move(v));
    }
    for (std::size_t chunk : {1, 3, 8}) {
      auto r = p.map(in, map_options{chunk});
      REQUIRE(r.size() == in.size());
      for (std::size_t k = 0; k < in.size(); ++k)
        REQUIRE(r[k] == std::accumulate(in[k].begin(), in[k].end(), 0.0));
    }
  }

  SECTION("arrays around the ring's size stream through it from the input, there and back") {
    pool p([](const std::vector<double>& v) { return v; }, o);
    constexpr std::size_t ring = 64 * 1024 / sizeof(double);
    std::vector<std::vector<double>> in;
    for (std::size_t n : {ring - 1, ring, ring + 1, edge / 8, 3 * ring + 5, ring - 3, 7 * ring}) {
      std::vector<double> v(n);
      std::iota(v.begin(), v.end(), double(n));
      in.push_back(std::move(v));
    }
    for (std::size_t chunk : {1, 2, 7}) REQUIRE(p.map(in, map_options{chunk}) == in);
  }

  SECTION("strings, more big ones in a chunk than it leaves in place") {
    pool_options roomy = o;
    roomy.ring_bytes = std::size_t(1) << 20;  // 12 of these items make one chunk
    pool p([](const std::string& s) { return checksum(s.data(), s.size()); }, roomy);
    std::vector<std::string> in;
    for (std::size_t k = 0; k < 24; ++k) {
      std::size_t n = k % 3 == 0 ? edge + k : k % 3 == 1 ? edge - 1 : 3 * edge;
      std::string s(n, '\0');
      for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i + k) % 26);
      in.push_back(std::move(s));
    }
    // 12 items to a chunk: more blocks than a chunk holds, the rest copied.
    auto r = p.map(in, map_options{12});
    for (std::size_t k = 0; k < in.size(); ++k)
      REQUIRE(r[k] == checksum(in[k].data(), in[k].size()));
  }

  SECTION("a contiguous array of numbers, cut in chunks of many kilobytes") {
    pool p([](std::int32_t x) { return std::int64_t(x) * 3; }, o);
    std::vector<std::int32_t> in(300000);
    std::iota(in.begin(), in.end(), -1000);
    for (std::size_t chunk : {std::size_t(0), std::size_t(5000), std::size_t(100000)}) {
      auto r = p.map(in, map_options{chunk});
      REQUIRE(r.size() == in.size());
      for (std::size_t k = 0; k < in.size(); ++k) REQUIRE(r[k] == std::int64_t(in[k]) * 3);
    }
  }

  SECTION("from a list, and from a range that yields each item by value") {
    pool p([](const std::vector<char>& v) { return checksum(v.data(), v.size()); }, o);
    std::list<std::vector<char>> listed;
    for (unsigned k = 0; k < 6; ++k) {
      auto b = pattern(edge * (k + 1), k);
      listed.emplace_back(b.begin(), b.end());
    }
    auto r = p.map(listed, map_options{2});
    std::size_t k = 0;
    for (const auto& v : listed) REQUIRE(r[k++] == checksum(v.data(), v.size()));

    // A range whose iterator yields each item by value: nothing of it
    // outlives the expression that read it, so nothing is left in place.
    auto make = [](std::size_t i) {
      auto b = pattern(2 * edge, static_cast<unsigned>(i));
      return std::vector<char>(b.begin(), b.end());
    };
    procpool_test::computed_range fresh(6, make);
    auto f = p.map(fresh, map_options{3});
    REQUIRE(f.size() == 6);
    for (std::size_t i = 0; i < 6; ++i) {
      auto v = make(i);
      REQUIRE(f[i] == checksum(v.data(), v.size()));
    }
  }

  SECTION("a type whose arrays have an encoding of their own keeps it") {
    pool p(
        [](const std::vector<money_ns::money>& v) {
          long sum = 0;
          for (auto m : v) sum += m.cents;
          return sum;
        },
        o);
    std::vector<std::vector<money_ns::money>> in(3, std::vector<money_ns::money>(4 * edge));
    for (std::size_t k = 0; k < in.size(); ++k)
      for (std::size_t i = 0; i < in[k].size(); ++i) in[k][i].cents = long(i % 100) + long(k);
    auto r = p.map(in);
    for (std::size_t k = 0; k < in.size(); ++k) {
      long sum = 0;
      for (auto m : in[k]) sum += m.cents;
      REQUIRE(r[k] == sum);
    }
  }
}

TEST_CASE("a map that ends early reads nothing of its input once it returned", "[data_path]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  pool_options o = small_rings();
  bool stop = false;
  o.on_progress = [&](const procpool::progress_info&) {
    if (stop) throw std::runtime_error("enough");
  };
  // Cheap items, so that each worker is given many frames at once (see
  // `engine::queue_depth`) and the ring fills.
  pool p(cheap, o);
  for (int round = 0; round < 5; ++round) {
    {
      // Items of 20 KiB, left in the input, through rings of 64 KiB. (Whether
      // a frame is still partly out when the call ends depends on timing:
      // the next test makes sure of one.)
      std::vector<bytes> in;
      for (unsigned k = 0; k < 400; ++k) in.push_back(pattern(item_bytes, k));
      stop = true;
      REQUIRE_THROWS_WITH(p.map(in, map_options{1}), "enough");
      stop = false;
      // `in` is unmapped here: a frame still reading it would fault.
    }
    still_maps(p, 5, std::size_t(1) << 19);
  }
}

TEST_CASE("a frame partly in its ring when its map ends goes on from a copy and not from the input",
          "[data_path]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  procpool::semaphore gate(0);
  // Items that fit the ring, and items three times its size, which stream
  // through it from the input.
  for (std::size_t size : {item_bytes, std::size_t(3 * 64 * 1024 + 5)})
    for (int round = 0; round < 3; ++round) {
      CAPTURE(size, round);
      bool stop = false;
      pool_options o = stopping_rings(stop);
      pool p(
          [&gate](const bytes& v) {
            if (v[0] == 'T') gate.acquire();
            return cheap(v);
          },
          o);
      // A task of 50 KiB holds the first worker. Its frame stays in that
      // worker's ring while it runs, so the map's frame queued behind it fits
      // only in part; the map ends (its callback throws) when the other
      // worker's first result arrives.
      bytes hold = pattern(50 * 1024, 99);
      hold[0] = 'T';
      auto held = p.submit(hold);
      {
        std::vector<bytes> in;
        for (unsigned k = 0; k < 8; ++k) in.push_back(pattern(size, k));
        stop = true;
        REQUIRE_THROWS_WITH(p.map(in, map_options{1}), "enough");
        // `in` is unmapped here: the rest of the frame must come from elsewhere.
      }
      gate.release();
      REQUIRE(held.get() == cheap(hold));
      still_maps(p, 6, size);
    }
}

TEST_CASE("an input that throws after items left in place fails its map and only its map",
          "[data_path]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  pool p(cheap, small_rings());
  for (int when : {0, 1, 5}) {
    std::vector<bytes> in;
    for (unsigned k = 0; k < 8; ++k) in.push_back(pattern(item_bytes, k));
    // Each item by reference into `in` (so it is left in place), until item `when`.
    procpool_test::computed_range throwing(in.size(), [&in, when](std::size_t i) -> const bytes& {
      if (static_cast<int>(i) == when) throw std::runtime_error("the input broke");
      return in[i];
    });
    REQUIRE_THROWS_WITH(p.map(throwing, map_options{2}), "the input broke");
  }
  still_maps(p, 6, item_bytes);
}

TEST_CASE("two threads map items left in place, one ending early, the other unharmed",
          "[data_path][threads]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  std::atomic<std::thread::id> victim{};
  pool_options o = small_rings();
  o.on_progress = [&](const procpool::progress_info&) {
    if (std::this_thread::get_id() == victim.load()) throw std::runtime_error("enough");
  };
  pool p(cheap, o);
  for (int round = 0; round < 3; ++round) {
    std::thread ender([&] {
      victim = std::this_thread::get_id();
      std::vector<bytes> in;
      for (unsigned k = 0; k < 200; ++k) in.push_back(pattern(item_bytes, k));
      try {
        p.map(in, map_options{1});
      } catch (const std::runtime_error&) {
      }
    });
    std::vector<bytes> mine;
    for (unsigned k = 0; k < 200; ++k) mine.push_back(pattern(item_bytes + 8, k + 7));
    auto r = p.map(mine, map_options{1});
    ender.join();
    for (std::size_t k = 0; k < mine.size(); ++k) REQUIRE(r[k] == cheap(mine[k]));
  }
}

TEST_CASE("a map whose item fails reads nothing of its input once it threw", "[data_path]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  pool_options o = small_rings();
  pool p(
      [](const bytes& v) {
        if (v[0] == 'X') throw std::runtime_error("bad item");
        return cheap(v);
      },
      o);
  for (int round = 0; round < 5; ++round) {
    std::vector<bytes> in;
    for (unsigned k = 0; k < 400; ++k) in.push_back(pattern(item_bytes, k));
    in[200][0] = 'X';
    REQUIRE_THROWS_AS(p.map(in, map_options{1}), procpool::task_error);
  }
  still_maps(p, 4, std::size_t(1) << 20);
}

TEST_CASE("a map_async whose future is dropped early leaves the pool right", "[data_path]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  pool_options o = small_rings();
  pool p([](const bytes& v) { return checksum(v.data(), v.size()); }, o);
  for (int round = 0; round < 3; ++round) {
    {
      std::vector<bytes> in;
      for (unsigned k = 0; k < 64; ++k) in.push_back(pattern(item_bytes, k));
      auto f = p.map_async(in, map_options{1});
      // The future owns a copy of the input; it goes with the future.
    }
    std::vector<bytes> again;
    for (unsigned k = 0; k < 3; ++k) again.push_back(pattern(std::size_t(1) << 18, k + 20));
    auto r = p.map_async(again).get();
    for (std::size_t k = 0; k < again.size(); ++k)
      REQUIRE(r[k] == checksum(again[k].data(), again[k].size()));
  }
}

TEST_CASE("chunks taken back for an idle worker are sent again from the input, whole",
          "[data_path][sched]") {
  unmapping_scope scope;  // first: every `bytes` goes before it
  // Item 0 waits until every other item ran. With chunk 1, the items queued
  // behind it in its worker's ring are taken back and sent again to the
  // other worker: from the caller's input, whose blocks must arrive whole.
  constexpr unsigned n = 10;
  procpool::semaphore ran(0);
  pool_options o;
  o.initializer = [] { unmapping = false; };
  o.workers = 2;
  o.ring_bytes = 256 * 1024;
  pool p(
      [&](const bytes& v) {
        if (v[0] != 'S') {
          ran.release();
        } else {
          for (unsigned i = 1; i < n; ++i)
            if (!ran.try_acquire_for(std::chrono::seconds(20))) return std::uint64_t(0);
        }
        return checksum(v.data(), v.size());
      },
      o);
  for (int round = 0; round < 3; ++round) {
    std::vector<bytes> in;
    for (unsigned k = 0; k < n; ++k) in.push_back(pattern(40 * 1024 + k, k + round));
    in[0][0] = 'S';
    auto r = p.map(in, map_options{1});
    for (std::size_t k = 0; k < n; ++k) REQUIRE(r[k] == checksum(in[k].data(), in[k].size()));
  }
}

TEST_CASE("plain items in long chunks: the item that throws or ends its worker is the one named",
          "[data_path]") {
  // Items and results copied as bytes (int64) run without the codec per
  // item; each item still publishes its index before it runs, so a failure
  // anywhere in a chunk of 5,000 names its own item, and the results before
  // it are not lost.
  pool_options o;
  o.workers = 2;
  o.chunk_size = 5000;
  std::vector<std::int64_t> in(10000);
  std::iota(in.begin(), in.end(), std::int64_t{0});
  for (std::int64_t bad : {std::int64_t{0}, std::int64_t{4999}, std::int64_t{5000},
                           std::int64_t{7777}, std::int64_t{9999}}) {
    CAPTURE(bad);
    pool thrower(
        [bad](std::int64_t x) -> std::int64_t {
          if (x == bad) throw std::domain_error("no square for " + std::to_string(x));
          return x * x;
        },
        o);
    try {
      (void)thrower.map(in);
      FAIL("map did not throw");
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == std::size_t(bad));
      CHECK(e.type_name() == "std::domain_error");
      CHECK(e.message() == "no square for " + std::to_string(bad));
    }
    // imap hands over every result before the failing item, in order.
    std::vector<std::int64_t> seen;
    try {
      for (std::int64_t r : thrower.imap(in)) seen.push_back(r);
      FAIL("imap did not throw");
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == std::size_t(bad));
    }
    REQUIRE(seen.size() == std::size_t(bad));
    for (std::size_t i = 0; i < seen.size(); ++i) REQUIRE(seen[i] == std::int64_t(i * i));

    pool killer(
        [bad](std::int64_t x) -> std::int64_t {
          if (x == bad) ::raise(SIGKILL);
          return x * x;
        },
        o);
    try {
      (void)killer.map(in);
      FAIL("map did not throw");
    } catch (const procpool::worker_died& e) {
      CHECK(e.index() == std::optional<std::size_t>(std::size_t(bad)));
      CHECK(e.status() == procpool::exit_status::killed(SIGKILL));
    }
  }
}

namespace {
/// Default constructions of `counted` in this process.
std::size_t counted_made = 0;

/// A result that counts its default constructions: `map` must not make a
/// slot for every result before the first one arrives.
struct counted {
  std::int64_t v;
  counted() : v(-1) { ++counted_made; }
  explicit counted(std::int64_t x) : v(x) {}
  friend void procpool_encode(procpool::writer& out, const counted& c) {
    procpool::encode(out, c.v);
  }
  friend counted procpool_decode(procpool::reader& in, procpool::type_tag<counted>) {
    return counted{procpool::decode<std::int64_t>(in)};
  }
};
}  // namespace

TEST_CASE("map makes each result's slot when its chunk arrives, not all before the first",
          "[data_path]") {
  // Far more items than can be in flight (2 workers × 256 frames × 10
  // items): however late the first report comes, most chunks are not back.
  constexpr std::size_t n = 100000;
  std::vector<std::int64_t> in(n);
  std::iota(in.begin(), in.end(), std::int64_t{0});
  std::size_t made_at_first = 0;
  bool first = true;
  pool_options o;
  o.workers = 2;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (first && info.done > 0) {
      made_at_first = counted_made;
      first = false;
    }
  };
  pool p([](std::int64_t x) { return counted{x * 3}; }, o);
  counted_made = 0;
  auto r = p.map(in, map_options{10});
  REQUIRE(r.size() == n);
  for (std::size_t k = 0; k < n; ++k) REQUIRE(r[k].v == std::int64_t(k) * 3);
  REQUIRE_FALSE(first);
  // Before its results arrive, no slot of the 5,000th chunk on is made.
  CHECK(made_at_first < n / 2);
  CHECK(counted_made <= n);  // once each at most

  first = true;
  counted_made = 0;
  auto fut = p.map_async(in, map_options{10});
  auto ra = fut.get();
  REQUIRE(ra.size() == n);
  for (std::size_t k = 0; k < n; ++k) REQUIRE(ra[k].v == std::int64_t(k) * 3);
  CHECK(counted_made <= n);
}

namespace {
/// Options for 2 workers whose progress callback releases `gate` once
/// `after` results are in (`released` says whether it did).
pool_options release_after(procpool::semaphore& gate, bool& released, std::size_t after) {
  pool_options o;
  o.workers = 2;
  o.on_progress = [&gate, &released, after](const procpool::progress_info& info) {
    if (!released && info.done >= after) {
      released = true;
      gate.release();
    }
  };
  return o;
}
}  // namespace

namespace {
std::string text_of(int x) {
  return std::string(std::size_t(x % 50), char('a' + x % 26));
}
std::int64_t triple_of(int x) {
  return std::int64_t(x) * 3;
}

/// Item 0 holds its worker until 40 later results are in: the vector of
/// results is then made past a slot still waiting for its result. Results
/// are `make(x)`.
template <class Result>
void results_past_a_gap(Result (*make)(int)) {
  procpool::semaphore gate(0);
  bool released = false;
  pool p(
      [&gate, make](int x) {
        if (x == 0) gate.acquire();
        return make(x);
      },
      release_after(gate, released, 40));
  std::vector<int> in(100);
  std::iota(in.begin(), in.end(), 0);
  auto r = p.map(in, map_options{1});
  REQUIRE(released);
  REQUIRE(r.size() == in.size());
  for (int x : in) REQUIRE(r[std::size_t(x)] == make(x));
}
}  // namespace

TEST_CASE("results that arrive ahead of an earlier chunk's land in place when it comes",
          "[data_path]") {
  results_past_a_gap(text_of);    // decoded one by one
  results_past_a_gap(triple_of);  // plain: appended from the ring when they come in order
}

TEST_CASE(
    "an answer left in its ring while an earlier chunk runs is taken in time even if that "
    "chunk waits for it",
    "[data_path]") {
  // Chunks of 40 000 plain results (320 KB): an answer that comes before
  // chunk 0's is left in its ring for a moment rather than making the
  // slots of chunk 0 first. Chunk 0 waits until two later chunks' results
  // are in: the answers left must be taken all the same.
  procpool::semaphore gate(0);
  bool released = false;
  pool p(
      [&gate](int x) {
        if (x == 0) gate.acquire();
        return std::int64_t(x) * 3;
      },
      release_after(gate, released, 80000));
  std::vector<int> in(200000);
  std::iota(in.begin(), in.end(), 0);
  for (int round = 0; round < 3; ++round) {
    released = round > 0;
    if (round > 0) gate.release();  // item 0 passes at once from now on
    auto r = p.map(in, map_options{40000});
    REQUIRE(released);
    REQUIRE(r.size() == in.size());
    std::size_t bad = 0;
    for (int x : in) bad += r[std::size_t(x)] != std::int64_t(x) * 3;
    REQUIRE(bad == 0);
  }
}

TEST_CASE("a map that fails after results past a gap arrived leaves the pool right",
          "[data_path]") {
  procpool::semaphore gate(0);
  bool released = false;
  pool_options o = release_after(gate, released, 20);
  pool p(
      [&gate](int x) -> std::string {
        if (x == 0) {
          gate.acquire();
          throw std::runtime_error("zero");
        }
        return std::to_string(x);
      },
      o);
  std::vector<int> in(60);
  std::iota(in.begin(), in.end(), 0);
  REQUIRE_THROWS_AS(p.map(in, map_options{1}), procpool::task_error);
  in[0] = 1;
  auto r = p.map(in, map_options{1});
  for (std::size_t k = 0; k < in.size(); ++k) REQUIRE(r[k] == std::to_string(in[k]));
}

namespace {
/// Whether the 2 MiB-aligned part of [p, p + n) lies in a mapping advised
/// into transparent huge pages (`hg` in its /proc/self/smaps VmFlags).
bool advised_huge(const void* p, std::size_t n) {
  constexpr std::uintptr_t huge = std::uintptr_t(2) << 20;
  auto begin = (reinterpret_cast<std::uintptr_t>(p) + huge - 1) & ~(huge - 1);
  REQUIRE(begin + huge <= reinterpret_cast<std::uintptr_t>(p) + n);  // a part to advise
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= begin && begin < hi;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0)
      return (line + " ").find(" hg ") != std::string::npos;
  }
  return false;
}
}  // namespace

TEST_CASE("a map's big result vector and its big decoded arrays are advised into huge pages",
          "[data_path]") {
  if (::access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK) != 0) {
    WARN("this kernel has no transparent huge pages: nothing to check");
    return;
  }
  pool_options o;
  o.workers = 2;
  // 8 MiB of results: the vector map returns is reserved and advised.
  pool squares([](std::int32_t x) { return std::int64_t(x) * x; }, o);
  std::vector<std::int32_t> in(std::size_t(1) << 20);
  std::iota(in.begin(), in.end(), 0);
  auto r = squares.map(in);
  REQUIRE(r.size() == in.size());
  CHECK(r.back() == std::int64_t(in.back()) * in.back());
  CHECK(advised_huge(r.data(), r.size() * sizeof(r[0])));
  auto ra = squares.map_async(in).get();
  CHECK(advised_huge(ra.data(), ra.size() * sizeof(ra[0])));

  // An 8 MiB array decoded in the parent.
  pool same([](const std::vector<char>& v) { return v; }, o);
  std::vector<std::vector<char>> big(2, std::vector<char>(std::size_t(8) << 20, 'x'));
  auto rb = same.map(big);
  REQUIRE(rb == big);
  CHECK(advised_huge(rb[0].data(), rb[0].size()));
}

namespace {

using plain = std::vector<std::uint64_t, unmapped_allocator<std::uint64_t>>;

/// True when this process maps a pool's mirrored rings.
bool maps_mirrored_rings() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find("procpool-rings") != std::string::npos) return true;
  return false;
}

/// Maps `n` numbers through `p` (a pool of `x * 3`) with `chunk` items per
/// chunk and checks every result.
template <class Pool>
void triples(Pool& p, std::size_t n, std::size_t chunk, std::uint64_t seed) {
  std::vector<std::uint64_t> in(n);
  std::iota(in.begin(), in.end(), seed);
  auto r = p.map(in, map_options{chunk});
  REQUIRE(r.size() == n);
  std::size_t bad = 0;
  for (std::size_t k = 0; k < n; ++k) bad += r[k] != in[k] * 3;
  REQUIRE(bad == 0);
}

}  // namespace

TEST_CASE(
    "plain items go from a contiguous input, and a frame partly out when its map ends goes on "
    "from a copy",
    "[data_path]") {
  unmapping_scope scope;  // first: every `plain` goes before it
  constexpr std::uint64_t hold = ~std::uint64_t(0);
  procpool::semaphore gate(0);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    bool stop = false;
    pool_options o = stopping_rings(stop);
    pool p(
        [&gate](std::uint64_t x) {
          if (x == hold) gate.acquire();
          return x * 3;
        },
        o);
    // Short chunks first: the pool then gives each worker many frames at
    // once (see `engine::queue_depth`). The first worker holds a task; the
    // map's frames to it (chunks of half a ring, read from the input) fill
    // its ring, the last in part. The map ends when the other worker's
    // first results arrive.
    triples(p, 100000, 100, 1);
    auto held = p.submit(hold);
    {
      plain in(200000);
      std::iota(in.begin(), in.end(), std::uint64_t(round) * 1000);
      stop = true;
      REQUIRE_THROWS_WITH(p.map(in), "enough");
      // `in` is unmapped here: the rest of a frame must come from elsewhere.
    }
    gate.release();
    REQUIRE(held.get() == hold * 3);
    triples(p, 100000, 0, 7);
    triples(p, 1000, 1, 9);
  }
}

TEST_CASE("a pool's rings are mirrored, and work the same where the kernel refuses the mirror",
          "[data_path]") {
  // Small rings, many chunks of results that are not a whole fraction of
  // the ring: frames cross the rings' ends in both directions. First with
  // descriptors refused (as when they are exhausted) for a pool of one
  // worker, then given back: the next pool maps the mirror again.
  for (bool refuse : {true, false}) {
    CAPTURE(refuse);
    static int asked;
    asked = 0;
    if (refuse)
      pd::sys::fault_hook = [](const char* call) {
        if (std::strcmp(call, "memfd_create") != 0) return 0;
        ++asked;
        return EMFILE;
      };
    pool_options o = small_rings(16 * 1024);
    o.workers = refuse ? 1 : 2;
    std::optional<pool<std::uint64_t (*)(std::uint64_t)>> p;
    try {
      p.emplace([](std::uint64_t x) { return x * 3; }, o);
    } catch (...) {
      pd::sys::fault_hook = nullptr;
      throw;
    }
    pd::sys::fault_hook = nullptr;
    CHECK(maps_mirrored_rings() == !refuse);
    if (refuse) CHECK(asked == 1);
    for (std::size_t chunk : {0, 1, 7, 333, 1021}) {
      CAPTURE(chunk);
      triples(*p, 20011, chunk, chunk);
    }
    p.reset();
    CHECK_FALSE(maps_mirrored_rings());  // unmapped with the pool
  }
}

// ---------------------------------------------------------------------------
// Frames longer than the ring: read as they come, decoded piece by piece.

namespace {

/// Runs `body` with a pool made from `o`, its rings mirrored or (`refuse`,
/// the kernel refusing the memfd) not.
template <class F, class Body>
void with_rings(bool refuse, F f, pool_options o, Body&& body) {
  if (refuse)
    pd::sys::fault_hook = [](const char* call) {
      return std::strcmp(call, "memfd_create") == 0 ? EMFILE : 0;
    };
  std::optional<pool<F>> p;
  try {
    p.emplace(f, o);
  } catch (...) {
    pd::sys::fault_hook = nullptr;
    throw;
  }
  pd::sys::fault_hook = nullptr;
  REQUIRE(maps_mirrored_rings() == !refuse);
  body(*p);
}

std::string text(std::size_t n, std::size_t seed) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + seed) % 26);
  return s;
}

/// Sends `Signal` to the worker that made it while the pool decodes it,
/// as many times as `signals_left` says (a count in the test's process:
/// only the pool's side decodes one), and says which worker in
/// `signalled_pid`: its answer, longer than the ring, stops coming there.
std::atomic<int> signals_left{0};
std::atomic<pid_t> signalled_pid{0};
/// What a decoder that catches everything made of a cut answer.
constexpr const char* swallowed = "swallowed";

template <int Signal, bool Swallow = false>
struct signalled_answer {
  std::int64_t pid = 0;
  std::string body;
  friend void procpool_encode(procpool::writer& out, const signalled_answer& a) {
    procpool::encode(out, a.pid);
    procpool::encode(out, a.body);
  }
  friend signalled_answer procpool_decode(procpool::reader& in,
                                          procpool::type_tag<signalled_answer>) {
    signalled_answer a;
    a.pid = procpool::decode<std::int64_t>(in);
    if (signals_left.fetch_sub(1) > 0) {
      ::kill(static_cast<pid_t>(a.pid), Signal);
      signalled_pid = static_cast<pid_t>(a.pid);
    }
    if constexpr (Swallow) {
      try {
        a.body = procpool::decode<std::string>(in);
      } catch (...) {  // what a careless decoder does
        a.body = swallowed;
      }
    } else {
      a.body = procpool::decode<std::string>(in);
    }
    return a;
  }
};

template <int Signal, bool Swallow = false>
signalled_answer<Signal, Swallow> long_answer(std::uint32_t k) {
  return {::getpid(), text(300 * 1024 + k, k)};
}

}  // namespace

TEST_CASE("items and answers longer than the ring stream through it, mirrored or not",
          "[data_path]") {
  for (bool refuse : {false, true}) {
    CAPTURE(refuse);
    pool_options o = small_rings(16 * 1024);
    std::vector<std::string> in;
    for (std::size_t n : {std::size_t(1), std::size_t(16 * 1024 - 40), std::size_t(16 * 1024),
                          std::size_t(16 * 1024 + 1), std::size_t(100000), std::size_t(0),
                          std::size_t(1) << 20, std::size_t(33333)})
      in.push_back(text(n, in.size()));
    with_rings(
        refuse, [](const std::string& s) { return s + "!"; }, o,
        [&](auto& p) {
          std::vector<std::string> want;
          for (auto& s : in) want.push_back(s + "!");
          for (std::size_t chunk : {1, 2, 5}) {
            CAPTURE(chunk);
            REQUIRE(p.map(in, map_options{chunk}) == want);
            std::vector<std::string> ordered;
            for (auto&& r : p.imap(in, map_options{chunk})) ordered.push_back(std::move(r));
            REQUIRE(ordered == want);
            std::vector<int> seen(in.size());
            for (auto&& [k, r] : p.imap_unordered(in, map_options{chunk})) {
              REQUIRE(r == want[k]);
              ++seen[k];
            }
            REQUIRE(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(in.size()));
          }
          REQUIRE(p.submit(in[6]).get() == want[6]);
        });
    // Items encoded one by one (lists of strings), a chunk of them longer
    // than the ring's room: cut before the item that does not fit; one
    // item longer than the whole ring goes from a buffer of its own.
    with_rings(
        refuse,
        [](const std::vector<std::string>& v) {
          std::size_t n = 0;
          for (auto& s : v) n = n * 31 + s.size() + std::size_t(s.empty() ? 0 : s[0]);
          return n;
        },
        o,
        [&](auto& p) {
          std::vector<std::vector<std::string>> lists;
          for (std::size_t k = 0; k < 60; ++k) {
            std::size_t strings = k == 17 ? 200 : k % 7 + 1;  // item 17: 40 KiB
            std::vector<std::string> v;
            for (std::size_t i = 0; i < strings; ++i) v.push_back(text(200 + 37 * (k % 11), k + i));
            lists.push_back(std::move(v));
          }
          std::vector<std::size_t> want;
          for (auto& v : lists) {
            std::size_t n = 0;
            for (auto& s : v) n = n * 31 + s.size() + std::size_t(s.empty() ? 0 : s[0]);
            want.push_back(n);
          }
          for (std::size_t chunk : {1, 7, 60}) {
            CAPTURE(chunk);
            REQUIRE(p.map(lists, map_options{chunk}) == want);
          }
        });
    // Arrays of numbers (read in pieces into their storage), and a chunk
    // of plain results longer than the ring.
    with_rings(
        refuse, [](const std::vector<double>& v) { return v; }, o,
        [&](auto& p) {
          std::vector<std::vector<double>> arrays;
          for (std::size_t n : {std::size_t(2047), std::size_t(2048), std::size_t(50001)}) {
            std::vector<double> v(n);
            std::iota(v.begin(), v.end(), double(n));
            arrays.push_back(std::move(v));
          }
          REQUIRE(p.map(arrays, map_options{2}) == arrays);
        });
    with_rings(
        refuse, [](std::uint32_t x) { return std::uint64_t(x) * 5; }, o,
        [&](auto& p) {
          std::vector<std::uint32_t> xs(100003);
          std::iota(xs.begin(), xs.end(), 11u);
          for (std::size_t chunk : {std::size_t(30001), xs.size()}) {
            auto r = p.map(xs, map_options{chunk});
            REQUIRE(r.size() == xs.size());
            std::size_t bad = 0;
            for (std::size_t k = 0; k < xs.size(); ++k) bad += r[k] != std::uint64_t(xs[k]) * 5;
            REQUIRE(bad == 0);
          }
        });
  }
}

namespace {

/// Lists of strings: `n` strings, seeded by `k`. Not a block (no single
/// array of bytes), so a list longer than the ring is encoded into it.
std::vector<std::string> strings_of(std::uint32_t n, std::uint32_t k) {
  std::vector<std::string> v;
  for (std::uint32_t i = 0; i < n; ++i) v.push_back(text(100 + (i * 37 + k) % 900, i + k));
  return v;
}

/// Whether each encoding of a `witness` was the last one of its value and
/// went straight into the ring's memory: the worker records, in memory it
/// shares with the test, how the writer it was encoded with stood at its end.
struct witness_log {
  std::atomic<int> in_place{0}, in_own{0};
};
witness_log* witnesses = nullptr;

struct witness {
  std::vector<std::string> strings;
  friend void procpool_encode(procpool::writer& out, const witness& w) {
    procpool::encode(out, w.strings);
    (out.in_place() ? witnesses->in_place : witnesses->in_own).fetch_add(1);
  }
  friend witness procpool_decode(procpool::reader& in, procpool::type_tag<witness>) {
    return witness{procpool::decode<std::vector<std::string>>(in)};
  }
};

/// Its encoding is `Step` bytes longer (or shorter) every time the process
/// encodes one: a customization that breaks the rule that the same value is
/// written as the same bytes.
template <int Step>
struct drifting {
  std::uint32_t n = 0;
  friend void procpool_encode(procpool::writer& out, const drifting& d) {
    static std::uint64_t calls = 0;
    const auto drift = static_cast<std::int64_t>(calls++ % 64) * Step;
    procpool::encode(out, std::string(static_cast<std::size_t>(d.n + drift), 'd'));
  }
  friend drifting procpool_decode(procpool::reader& in, procpool::type_tag<drifting>) {
    return drifting{static_cast<std::uint32_t>(procpool::decode<std::string>(in).size())};
  }
};
using growing = drifting<1>;
using shrinking = drifting<-1>;

/// Throws the second time the process encodes one of its values.
struct fickle {
  std::uint32_t n = 0;
  friend void procpool_encode(procpool::writer& out, const fickle& f) {
    static std::uint64_t calls = 0;
    procpool::encode(out, std::string(f.n, 'f'));
    if (f.n > 20000 && calls++ % 2 == 1) throw std::runtime_error("changed its mind");
  }
  friend fickle procpool_decode(procpool::reader& in, procpool::type_tag<fickle>) {
    return fickle{static_cast<std::uint32_t>(procpool::decode<std::string>(in).size())};
  }
};

}  // namespace

TEST_CASE(
    "results longer than the ring that are not one array are encoded once, straight into it, "
    "wherever they fall in a chunk",
    "[data_path]") {
  // Item k: a list of strings 20 rings long every third item, short otherwise.
  auto lists = [](std::uint32_t k) { return strings_of(k % 3 == 1 ? 600 : k % 5 + 1, k); };
  std::vector<std::uint32_t> in(20);
  std::iota(in.begin(), in.end(), 0u);
  std::vector<std::vector<std::string>> want;
  for (auto k : in) want.push_back(lists(k));
  for (bool refuse : {false, true}) {
    CAPTURE(refuse);
    with_rings(refuse, lists, small_rings(16 * 1024), [&](auto& p) {
      for (std::size_t chunk : {1, 2, 3, 20}) {
        CAPTURE(chunk);
        REQUIRE(p.map(in, map_options{chunk}) == want);
        std::size_t k = 0;
        for (auto&& r : p.imap(in, map_options{chunk})) REQUIRE(r == want[k++]);
        REQUIRE(k == in.size());
        std::vector<int> seen(in.size());
        for (auto&& [i, r] :
             p.imap_unordered(std::list<std::uint32_t>(in.begin(), in.end()), map_options{chunk})) {
          REQUIRE(r == want[i]);
          ++seen[i];
        }
        REQUIRE(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(in.size()));
      }
      REQUIRE(p.submit(4u).get() == want[4]);
    });
  }
  SECTION("the one encoding that counts is the one in the ring") {
    void* mem = ::mmap(nullptr, sizeof(witness_log), PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    witnesses = new (mem) witness_log();
    static const witness kept{strings_of(400, 9)};  // 200 KB, made before the fork
    pool p([](std::uint32_t) { return kept; }, small_rings(16 * 1024));
    // One chunk, which starts in an empty ring: each result is sized (by a
    // writer that only counts), then written once where the pool reads it,
    // never in a buffer of the worker's; the encodings that ran out of room
    // did not finish.
    for (int round = 0; round < 3; ++round) {
      witnesses->in_place = 0;
      witnesses->in_own = 0;
      auto r = p.map(std::vector<std::uint32_t>(8), map_options{8});
      for (const auto& w : r) REQUIRE(w.strings == kept.strings);
      CHECK(witnesses->in_place.load() == 16);
      CHECK(witnesses->in_own.load() == 0);
    }
    ::munmap(mem, sizeof(witness_log));
  }
}

TEST_CASE(
    "long results streamed alone: two threads at once, and terminate while a worker waits "
    "in the middle of one",
    "[data_path][hostile]") {
  auto lists = [](std::uint32_t k) { return strings_of(k % 2 == 0 ? 500 : 3, k); };
  SECTION("two threads map such results through one pool; each gets its own, whole") {
    pool p(lists, small_rings(16 * 1024));
    auto run = [&p, &lists](std::uint32_t from, bool& ok) {
      std::vector<std::uint32_t> in(12);
      std::iota(in.begin(), in.end(), from);
      ok = true;
      for (std::size_t chunk : {1, 5}) {
        auto r = p.map(in, map_options{chunk});
        for (std::size_t k = 0; k < in.size(); ++k) ok = ok && r[k] == lists(in[k]);
      }
    };
    bool a = false, b = false;
    std::thread other([&] { run(100, b); });
    run(0, a);
    other.join();
    CHECK(a);
    CHECK(b);
  }
  SECTION("terminate while a worker waits for room in the middle of one: no hang") {
    pool_options o = small_rings(16 * 1024);
    o.workers = 1;
    pool p(lists, o);
    pid_t worker = p.pids().at(0);
    std::vector<std::uint32_t> in{0, 2, 4, 6};
    auto range = p.imap(in, map_options{1});
    auto it = range.begin();
    REQUIRE(*it == lists(0));
    // Nobody reads the range's answers now: the worker sleeps on its full
    // ring in the middle of a 250 KB result.
    procpool_test::wait_until_sleeping(worker);
    std::thread t([&p] { p.terminate(); });
    t.join();
    REQUIRE_THROWS_AS(++it, procpool::pool_closed);
    using namespace std::chrono_literals;
    CHECK(procpool_test::gone_within(worker, 5000ms));
  }
}

TEST_CASE(
    "an encoder that writes other bytes when its long result is sent than when it was sized "
    "ends its worker, fails its call naming the item, and the pool goes on",
    "[data_path][reliability]") {
  pool_options o = small_rings(16 * 1024);
  o.workers = 1;
  // The map of `in` fails for item `index`: its worker exited with code 70.
  // With `may_refuse`, the frame's first bytes, published before the rest
  // was written, may already contradict the length it declared: the pool
  // then refuses what it read (`decode_error`) before it learns of the exit.
  auto fails_at = [](auto& p, std::vector<std::uint32_t> in, std::size_t chunk, std::size_t index,
                     bool may_refuse) {
    try {
      (void)p.map(in, map_options{chunk});
      FAIL("no error");
    } catch (const procpool::worker_died& e) {
      CHECK(e.index() == std::optional<std::size_t>(index));
      CHECK(e.status().is_exited());
      CHECK(e.status().code() == 70);
    } catch (const procpool::decode_error&) {
      CHECK(may_refuse);
    }
  };
  SECTION("longer every time") {
    pool p([](std::uint32_t k) { return growing{k}; }, o);
    // Short results fit: encoded once each, whatever their length.
    auto small = p.map(std::vector<std::uint32_t>{5, 6, 7}, map_options{1});
    REQUIRE(small.size() == 3);
    fails_at(p, {1, 2, 100000, 3}, 1, 2, true);
    fails_at(p, {100000}, 1, 0, true);
    REQUIRE(p.map(std::vector<std::uint32_t>{1, 2}, map_options{1}).size() == 2);
  }
  SECTION("shorter every time") {
    pool p([](std::uint32_t k) { return shrinking{k}; }, o);
    fails_at(p, {100, 100000, 100}, 3, 1, true);
    auto r = p.map(std::vector<std::uint32_t>{1000, 2000}, map_options{1});
    CHECK(r.size() == 2);
  }
  SECTION("throwing the second time") {
    pool p([](std::uint32_t k) { return fickle{k}; }, o);
    fails_at(p, {1, 30000, 2}, 3, 1, false);
    auto r = p.map(std::vector<std::uint32_t>{1, 2}, map_options{1});
    CHECK(r[1].n == 2);
  }
}

TEST_CASE(
    "a worker that dies while its long answer streams: the chunk runs again, its results "
    "are taken once",
    "[data_path][reliability]") {
  pool_options o = small_rings(16 * 1024);
  std::vector<std::uint32_t> in(6);
  std::iota(in.begin(), in.end(), 0u);
  pool p(&long_answer<SIGKILL>, o);
  auto check = [&](const signalled_answer<SIGKILL>& a, std::uint32_t k) {
    REQUIRE(a.body == text(300 * 1024 + k, k));
  };

  SECTION("map") {
    signals_left = 2;
    auto r = p.map(in, map_options{1});
    REQUIRE(signals_left <= 0);
    for (std::uint32_t k = 0; k < in.size(); ++k) check(r[k], k);
  }
  SECTION("imap, in order") {
    signals_left = 2;
    std::uint32_t k = 0;
    for (auto&& a : p.imap(in, map_options{2})) check(a, k++);
    REQUIRE(k == in.size());
  }
  SECTION("imap_unordered: no result twice") {
    signals_left = 2;
    std::vector<int> seen(in.size());
    for (auto&& [k, a] : p.imap_unordered(in, map_options{3})) {
      check(a, static_cast<std::uint32_t>(k));
      ++seen[k];
    }
    REQUIRE(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(in.size()));
  }
  SECTION("a task") {
    signals_left = 1;
    check(p.submit(4u).get(), 4);
  }
  SECTION("a chunk whose answer is cut every time is charged with the death") {
    signals_left = 1000;
    REQUIRE_THROWS_AS(p.map(std::vector<std::uint32_t>{1}), procpool::worker_died);
    signals_left = 0;
  }
  // The pool goes on with fresh workers.
  signals_left = 0;
  auto r = p.map(in, map_options{1});
  for (std::uint32_t k = 0; k < in.size(); ++k) check(r[k], k);
}

TEST_CASE(
    "a worker killed while its big results go out from the values it made: the chunk runs "
    "again, once",
    "[data_path][reliability]") {
  // How many results the workers made, in memory they share with the test.
  void* mem = ::mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* made = new (mem) std::atomic<int>(0);
  pool_options o = small_rings(16 * 1024);
  o.workers = 1;
  // Strings returned by value, each twenty rings long: they go into the
  // ring from the string itself, as the pool makes room.
  auto big = [](std::uint32_t k) { return text(300 * 1024 + 7 * k, k); };
  pool p(
      [made, big](std::uint32_t k) {
        std::string s = big(k);
        made->fetch_add(1);
        return s;
      },
      o);
  std::vector<std::uint32_t> in(7);
  std::iota(in.begin(), in.end(), 0u);
  for (int chunk : {1, 3}) {
    CAPTURE(chunk);
    made->store(0);
    pid_t victim = p.pids().at(0);
    auto range = p.imap(in, map_options{std::size_t(chunk)});
    auto it = range.begin();
    REQUIRE(*it == big(0));
    // Nobody reads a range's answers but its reader, who waits here: once
    // the worker made a result of a later chunk, it sleeps in the middle of
    // that chunk's answer, on a full ring.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (made->load() <= chunk && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
    REQUIRE(made->load() > chunk);
    procpool_test::wait_until_sleeping(victim);
    REQUIRE(::kill(victim, SIGKILL) == 0);
    std::uint32_t k = 1;
    for (++it; it != range.end(); ++it) {
      REQUIRE(*it == big(k));
      ++k;
    }
    REQUIRE(k == in.size());
    auto pids = p.pids();
    CHECK(std::find(pids.begin(), pids.end(), victim) == pids.end());
  }
  ::munmap(mem, sizeof(std::atomic<int>));
}

namespace {

/// How many times each item ran, in memory the workers share with the test.
struct parts_table {
  std::atomic<int> runs[20000];
};
parts_table* parts_shared = nullptr;
/// The worker the parts test kills, and when: after the pool decoded that
/// many results (a count in the test's process, where they are decoded).
std::atomic<pid_t> parts_victim{0};
std::atomic<int> parts_decodes_left{-1};

/// Seven times its item. Decoding it in the pool holds the pool there (it
/// reads no ring meanwhile) as the workers run on, so that the worker that
/// sent it is killed with results it ran still unsent.
struct septuple {
  std::uint64_t v = 0;
  friend void procpool_encode(procpool::writer& out, const septuple& s) {
    procpool::encode(out, s.v);
  }
  friend septuple procpool_decode(procpool::reader& in, procpool::type_tag<septuple>) {
    septuple s{procpool::decode<std::uint64_t>(in)};
    if (parts_decodes_left.fetch_sub(1) == 1) {
      // It waits for room in its full ring, between two items (its last
      // results in its own buffer).
      procpool_test::wait_until_sleeping(parts_victim);
      ::kill(parts_victim, SIGKILL);
    }
    return s;
  }
};

septuple counted_seven(std::uint32_t x) {
  parts_shared->runs[x].fetch_add(1);
  return septuple{std::uint64_t(x) * 7};
}

}  // namespace

TEST_CASE(
    "a worker killed after parts of its chunk's answer came: only the rest runs again, and "
    "no result is taken twice",
    "[data_path][reliability]") {
  void* mem = ::mmap(nullptr, sizeof(parts_table), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  parts_shared = new (mem) parts_table();
  // One chunk of 20000 results: ten rings' worth, which go out in parts as
  // the pool reads them.
  pool_options o = small_rings(16 * 1024);
  o.workers = 1;
  pool p(&counted_seven, o);
  constexpr std::size_t n = 20000;
  auto arm = [&] {
    for (auto& r : parts_shared->runs) r.store(0);
    parts_victim = p.pids().at(0);
    parts_decodes_left = 10000;
  };
  auto check_runs = [&] {
    REQUIRE(parts_decodes_left < 0);  // it was killed
    auto pids = p.pids();
    CHECK(std::find(pids.begin(), pids.end(), parts_victim.load()) == pids.end());
    // The results taken before the kill (items 0 to 9999, in order) are not
    // run again; of the rest, some ran twice (ran, then lost with it).
    std::size_t twice = 0;
    for (std::size_t x = 0; x < n; ++x) {
      int r = parts_shared->runs[x].load();
      REQUIRE(r >= 1);
      REQUIRE(r <= (x < 10000 ? 1 : 2));
      twice += r == 2;
    }
    CHECK(twice >= 1);
  };
  auto map_of = [&](auto in) {
    std::iota(in.begin(), in.end(), 0u);
    arm();
    auto r = p.map(in, map_options{n});
    check_runs();
    for (std::size_t x = 0; x < n; ++x) REQUIRE(r[x].v == x * 7);
  };

  SECTION("its frame kept (items sent from the input): the rest of it is read past") {
    map_of(std::vector<std::uint32_t>(n));
  }
  SECTION("its frame encoded again from the input: from the first item not answered") {
    map_of(std::deque<std::uint32_t>(n));
  }
  SECTION("an input read once, its frame kept; imap_unordered yields each result once") {
    std::list<std::uint32_t> in(n);
    std::iota(in.begin(), in.end(), 0u);
    arm();
    std::vector<int> seen(n);
    for (auto&& [k, s] : p.imap_unordered(in, map_options{n})) {
      REQUIRE(s.v == k * 7);
      ++seen[k];
    }
    check_runs();
    REQUIRE(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(n));
  }
  parts_decodes_left = -1;
  ::munmap(mem, sizeof(parts_table));
}

TEST_CASE("a decoder that catches the end of a cut answer does not make its results count",
          "[data_path][reliability][hostile]") {
  pool_options o = small_rings(16 * 1024);
  pool p(&long_answer<SIGKILL, true>, o);
  signals_left = 1;
  std::vector<std::uint32_t> in{0, 1, 2};
  std::vector<signalled_answer<SIGKILL, true>> r;
  REQUIRE_THROWS_AS(r = p.map(in, map_options{1}), procpool::error);
  signals_left = 0;
  r = p.map(in, map_options{1});
  for (std::uint32_t k = 0; k < in.size(); ++k) REQUIRE(r[k].body == text(300 * 1024 + k, k));
}

TEST_CASE(
    "a failing item in a chunk longer than the ring: the rest of it is skipped as it "
    "comes, and the pool goes on",
    "[data_path]") {
  pool_options o = small_rings(16 * 1024);
  pool p(
      [](const std::string& s) {
        if (s.front() == '!') throw std::runtime_error("refused " + std::to_string(s.size()));
        return s.size();
      },
      o);
  std::vector<std::string> in;
  for (std::size_t k = 0; k < 7; ++k) in.push_back(text(100000 + k, k));
  in[1].front() = '!';
  for (std::size_t chunk : {1, 3, 7}) {
    CAPTURE(chunk);
    try {
      (void)p.map(in, map_options{chunk});
      FAIL("the map did not fail");
    } catch (const procpool::task_error& e) {
      REQUIRE(e.index() == 1);
      REQUIRE(std::string(e.what()).find("refused 100001") != std::string::npos);
    }
    in[1].front() = 'x';
    auto sizes = p.map(in, map_options{chunk});
    for (std::size_t k = 0; k < in.size(); ++k) REQUIRE(sizes[k] == 100000 + k);
    in[1].front() = '!';
  }
}

namespace {

/// Waits until the worker the decoder stopped is seen stopped; its pid.
pid_t wait_for_stopped_worker() {
  using namespace std::chrono_literals;
  auto start = std::chrono::steady_clock::now();
  for (;;) {
    pid_t pid = signalled_pid.load();
    if (pid != 0 && procpool_test::process_state(pid) == 'T') return pid;
    if (std::chrono::steady_clock::now() - start > 20s) return 0;
    std::this_thread::sleep_for(1ms);  // polling a state no event tells of
  }
}

}  // namespace

TEST_CASE("a worker stopped while its long answer streams gives way to terminate and to close",
          "[data_path][hostile]") {
  pool_options o = small_rings(16 * 1024);
  pool p(&long_answer<SIGSTOP>, o);
  signals_left = 1;
  signalled_pid = 0;
  pid_t stopped = 0;
  std::vector<std::uint32_t> in{0, 1, 2, 3};
  struct beside {
    std::thread t;
    ~beside() { t.join(); }
  };
  // Runs `act` on another thread once the worker is seen stopped.
  auto once_stopped = [&stopped](auto act) {
    return beside{std::thread([&stopped, act] {
      stopped = wait_for_stopped_worker();
      act();
    })};
  };

  SECTION("terminate from another thread ends the wait, and the worker") {
    auto other = once_stopped([&p] { p.terminate(); });
    REQUIRE_THROWS_AS(p.map(in, map_options{1}), procpool::pool_closed);
  }
  SECTION("in a pool closed meanwhile it is killed after stop_grace, and its chunk runs again") {
    std::vector<signalled_answer<SIGSTOP>> r;
    {
      auto other = once_stopped([&p] { p.close(); });  // stop_grace from here
      r = p.map(in, map_options{1});
    }
    for (std::uint32_t k = 0; k < in.size(); ++k) REQUIRE(r[k].body == text(300 * 1024 + k, k));
  }
  REQUIRE(stopped != 0);
  using namespace std::chrono_literals;
  CHECK(procpool_test::gone_within(stopped, 5000ms));
}
