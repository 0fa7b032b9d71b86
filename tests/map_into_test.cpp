// `pool::map_into`: the results of a map written into memory the caller owns
// (a vector, an array, a span, a pointer, an iterator, any output iterator),
// and what happens to that memory when the call is refused (too small, a
// closed pool, a forked child) or fails (an item throws, a worker dies).
// Also `map` of functions returning `bool` or a type without a default
// constructor, fixed with it.
#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <list>
#include <new>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>
#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#define MAP_INTO_TEST_SPAN 1
#endif

using Catch::Matchers::Contains;
using procpool::exit_status;
using procpool::map_options;
using procpool::pool;
using procpool::pool_options;

namespace map_into_test {

using procpool_test::touchy;  // a result whose decoder throws for 13

/// The function most tests map: int -> int64, never `untouched`, distinct per item.
std::int64_t scaled(int x) {
  return std::int64_t(x) * 3000017 - 11;
}

/// What no result of `scaled` is: marks output the call must not write.
constexpr std::int64_t untouched = -777;

std::vector<int> iota_vector(std::size_t n, int from = 0) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), from);
  return v;
}

template <class Range>
std::vector<std::int64_t> serial(const Range& xs) {
  std::vector<std::int64_t> r;
  for (int x : xs) r.push_back(scaled(x));
  return r;
}

/// Index of the first element where `got` and `want` differ, or their common
/// length when one is a prefix of the other; `npos` when equal.
template <class A, class B>
std::size_t first_mismatch(const A& got, const B& want) {
  auto g = std::begin(got);
  auto w = std::begin(want);
  std::size_t i = 0;
  for (; g != std::end(got) && w != std::end(want); ++g, ++w, ++i)
    if (!(*g == *w)) return i;
  if (g != std::end(got) || w != std::end(want)) return i;
  return static_cast<std::size_t>(-1);
}
constexpr std::size_t npos = static_cast<std::size_t>(-1);

/// A counter that every process forked after it shares: counts the items
/// the workers actually run.
class shared_counter {
 public:
  shared_counter() {
    mem_ = ::mmap(nullptr, sizeof(std::atomic<long>), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    count_ = new (mem_) std::atomic<long>(0);
  }
  ~shared_counter() { ::munmap(mem_, sizeof(std::atomic<long>)); }
  shared_counter(const shared_counter&) = delete;
  shared_counter& operator=(const shared_counter&) = delete;
  std::atomic<long>* get() const { return count_; }
  long value() const { return count_->load(); }

 private:
  void* mem_ = nullptr;
  std::atomic<long>* count_ = nullptr;
};

/// A result with no default constructor, sent by its own codec.
class tagged {
 public:
  explicit tagged(int v) : v_(v), label_("item-" + std::to_string(v)) {}
  int value() const { return v_; }
  const std::string& label() const { return label_; }
  bool operator==(const tagged& o) const { return v_ == o.v_ && label_ == o.label_; }

 private:
  int v_;
  std::string label_;
};
inline void procpool_encode(procpool::writer& out, const tagged& t) {
  procpool::encode(out, t.value());
}
inline tagged procpool_decode(procpool::reader& in, procpool::type_tag<tagged>) {
  return tagged(procpool::decode<int>(in));
}

/// The string `texts` maps `x` to; item 500 is 3 MiB, more than a ring holds.
std::string text_of(int x) {
  if (x == 500) return std::string(std::size_t(3) << 20, 'z') + "!";
  return std::string(static_cast<std::size_t>(x % 37), static_cast<char>('a' + x % 26)) + "#" +
         std::to_string(x);
}

bool is_prime(int x) {
  if (x < 2) return false;
  for (int d = 2; d * d <= x; ++d)
    if (x % d == 0) return false;
  return true;
}

/// A single-pass range of 0 .. n-1 with no size: an input iterator only.
class counting_input {
 public:
  explicit counting_input(int n) : n_(n) {}
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    using pointer = const int*;
    using reference = int;
    iterator() = default;
    iterator(int i, int n) : i_(i), n_(n) {}
    int operator*() const { return i_; }
    iterator& operator++() {
      ++i_;
      return *this;
    }
    void operator++(int) { ++i_; }
    bool operator==(const iterator& o) const { return done() == o.done(); }
    bool operator!=(const iterator& o) const { return !(*this == o); }

   private:
    bool done() const { return i_ >= n_; }
    int i_ = 0;
    int n_ = 0;
  };
  iterator begin() const { return {0, n_}; }
  iterator end() const { return {}; }

 private:
  int n_;
};

/// The ints of a stream, read once: `std::istream_iterator` as a range.
struct istream_ints {
  std::istream* in;
  std::istream_iterator<int> begin() const { return std::istream_iterator<int>(*in); }
  std::istream_iterator<int> end() const { return {}; }
};

}  // namespace map_into_test

using namespace map_into_test;

// ---------------------------------------------------------------------------
// Every kind of output.

TEST_CASE("starmap_into passes each tuple's elements as arguments, into every output kind",
          "[map_into]") {
  pool p(
      [](int a, int b) {
        if (a == 1234) throw std::domain_error("no 1234");
        return std::int64_t(a) * b - 1;
      },
      2u);
  std::vector<std::tuple<int, int>> pairs;
  std::vector<std::int64_t> want;
  for (int i = 0; i < 5000; ++i) {
    int a = i == 1234 ? 1235 : i;  // no failing pair in the good input
    pairs.emplace_back(a, 3 - i);
    want.push_back(std::int64_t(a) * (3 - i) - 1);
  }
  std::vector<std::int64_t> out(7, 0);
  auto end = p.starmap_into(pairs, out, map_options{7});
  CHECK(end == out.end());
  CHECK(out == want);
  std::vector<std::int64_t> raw(pairs.size());
  CHECK(p.starmap_into(pairs, raw.data()) == raw.data() + raw.size());
  CHECK(raw == want);
  std::list<std::int64_t> l;
  p.starmap_into(pairs, std::back_inserter(l));
  CHECK(std::vector<std::int64_t>(l.begin(), l.end()) == want);

  pairs[1234] = std::tuple<int, int>(1234, 1);
  pairs[4000] = std::tuple<int, int>(1234, 2);
  try {
    p.starmap_into(pairs, out, map_options{10});
    FAIL("starmap_into did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 1234);  // the lowest failing pair
    CHECK(e.message() == "no 1234");
  }
  pairs[1234] = std::tuple<int, int>(1235, 3 - 1234);
  pairs[4000] = std::tuple<int, int>(4000, 3 - 4000);
  p.starmap_into(pairs, out);
  CHECK(out == want);  // the pool goes on
}

TEST_CASE("map_into resizes a vector to the input's size whatever size it had", "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(10, -3);
  std::size_t before = GENERATE(0u, 3u, 10u, 100u);
  CAPTURE(before);
  std::vector<std::int64_t> out(before, untouched);
  auto end = p.map_into(xs, out);
  CHECK(out.size() == xs.size());
  CHECK(out == serial(xs));
  CHECK(end == out.end());
}

TEST_CASE("map_into into a vector of the same size keeps its memory call after call",
          "[map_into]") {
  pool p(scaled, 2u);
  std::vector<std::int64_t> out;
  p.map_into(iota_vector(5000), out);
  REQUIRE(out == serial(iota_vector(5000)));
  const std::int64_t* memory = out.data();
  auto capacity = out.capacity();
  for (int round = 1; round <= 5; ++round) {
    auto xs = iota_vector(5000, round * 10000);
    auto end = p.map_into(xs, out);
    CAPTURE(round);
    CHECK(out.data() == memory);
    CHECK(out.capacity() == capacity);
    CHECK(end == out.end());
    CHECK(first_mismatch(out, serial(xs)) == npos);
  }
}

TEST_CASE("map_into fills a std::array of exactly the input's size and returns its end",
          "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(16, 100);
  std::array<std::int64_t, 16> out;
  out.fill(untouched);
  std::int64_t* end = p.map_into(xs, out);
  CHECK(end == out.data() + out.size());
  CHECK(first_mismatch(out, serial(xs)) == npos);
}

TEST_CASE("map_into into a bigger std::array writes the first items and leaves the rest",
          "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(5, 7);
  std::array<std::int64_t, 12> out;
  out.fill(untouched);
  std::int64_t* end = p.map_into(xs, out);
  REQUIRE(end == out.data() + 5);
  auto want = serial(xs);
  for (std::size_t i = 0; i < 5; ++i) CHECK(out[i] == want[i]);
  for (std::size_t i = 5; i < out.size(); ++i) CHECK(out[i] == untouched);
}

TEST_CASE("map_into writes into a C array, through a pointer or as a range", "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(6, 40);
  auto want = serial(xs);
  std::int64_t buf[10];
  std::fill(std::begin(buf), std::end(buf), untouched);

  SECTION("through a pointer to its middle") {
    std::int64_t* end = p.map_into(xs, &buf[2]);
    CHECK(end == buf + 8);
    CHECK(buf[0] == untouched);
    CHECK(buf[1] == untouched);
    for (std::size_t i = 0; i < 6; ++i) CHECK(buf[2 + i] == want[i]);
    CHECK(buf[8] == untouched);
    CHECK(buf[9] == untouched);
  }
  SECTION("as a range with room for more") {
    std::int64_t* end = p.map_into(xs, buf);
    CHECK(end == buf + 6);
    for (std::size_t i = 0; i < 6; ++i) CHECK(buf[i] == want[i]);
    for (std::size_t i = 6; i < 10; ++i) CHECK(buf[i] == untouched);
  }
}

TEST_CASE("map_into through a vector iterator at an offset writes only that window", "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(9, -4);
  auto want = serial(xs);
  std::vector<std::int64_t> big(20, untouched);
  const std::int64_t* memory = big.data();
  auto end = p.map_into(xs, big.begin() + 5);
  CHECK(end == big.begin() + 14);
  CHECK(big.size() == 20);
  CHECK(big.data() == memory);
  for (std::size_t i = 0; i < 5; ++i) CHECK(big[i] == untouched);
  for (std::size_t i = 0; i < 9; ++i) CHECK(big[5 + i] == want[i]);
  for (std::size_t i = 14; i < 20; ++i) CHECK(big[i] == untouched);
}

TEST_CASE("map_into appends through back_inserter after what a list or a deque held",
          "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(1000, 3);
  std::vector<std::int64_t> want{untouched, 1, 2};
  auto results = serial(xs);
  want.insert(want.end(), results.begin(), results.end());

  std::list<std::int64_t> l{untouched, 1, 2};
  p.map_into(xs, std::back_inserter(l));
  CHECK(l.size() == want.size());
  CHECK(first_mismatch(l, want) == npos);

  std::deque<std::int64_t> d{untouched, 1, 2};
  p.map_into(xs, std::back_inserter(d), map_options{7});
  CHECK(d.size() == want.size());
  CHECK(first_mismatch(d, want) == npos);
}

TEST_CASE("map_into assigns through a list's own iterator and returns the position after the last",
          "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(4, 11);
  auto want = serial(xs);
  std::list<std::int64_t> l(6, untouched);
  auto end = p.map_into(xs, l.begin());
  CHECK(std::distance(l.begin(), end) == 4);
  std::vector<std::int64_t> got(l.begin(), l.end());
  CHECK(got == std::vector<std::int64_t>{want[0], want[1], want[2], want[3], untouched, untouched});
}

TEST_CASE("map_into writes through an ostream_iterator in input order", "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(300, -150);
  std::ostringstream os;
  p.map_into(xs, std::ostream_iterator<std::int64_t>(os, " "), map_options{7});
  std::ostringstream want;
  for (int x : xs) want << scaled(x) << ' ';
  CHECK(os.str() == want.str());
}

#ifdef MAP_INTO_TEST_SPAN
TEST_CASE("map_into into a std::span writes its window of a larger vector", "[map_into]") {
  pool p(scaled, 2u);
  auto xs = iota_vector(7, 20);
  auto want = serial(xs);
  std::vector<std::int64_t> big(12, untouched);
  std::span<std::int64_t> window(big.data() + 2, 8);
  std::int64_t* end = p.map_into(xs, window);
  CHECK(end == big.data() + 9);
  CHECK(big[0] == untouched);
  CHECK(big[1] == untouched);
  for (std::size_t i = 0; i < 7; ++i) CHECK(big[2 + i] == want[i]);
  for (std::size_t i = 9; i < 12; ++i) CHECK(big[i] == untouched);

  std::array<std::int64_t, 7> exact;
  exact.fill(untouched);
  std::span<std::int64_t, 7> fixed(exact);
  CHECK(p.map_into(xs, fixed) == exact.data() + 7);
  CHECK(first_mismatch(exact, want) == npos);
}
#endif

// ---------------------------------------------------------------------------
// Too little room: refused before anything runs.

TEST_CASE("an output range too small throws length_error naming both sizes before any item runs",
          "[map_into]") {
  shared_counter runs;
  std::atomic<long>* count = runs.get();
  pool p(
      [count](int x) {
        count->fetch_add(1);
        return scaled(x);
      },
      2u);
  std::size_t items = GENERATE(38u, 4242u);
  CAPTURE(items);
  auto xs = iota_vector(items);
  std::string n = std::to_string(items);

  std::array<std::int64_t, 37> arr;
  arr.fill(untouched);
  try {
    p.map_into(xs, arr);
    FAIL("map_into into a std::array of 37 did not throw");
  } catch (const std::length_error& e) {
    CHECK_THAT(e.what(), Contains("37") && Contains(n));
  }
  CHECK(std::all_of(arr.begin(), arr.end(), [](std::int64_t v) { return v == untouched; }));

  std::int64_t c_array[37];
  std::fill(std::begin(c_array), std::end(c_array), untouched);
  try {
    p.map_into(xs, c_array, map_options{1});
    FAIL("map_into into a C array of 37 did not throw");
  } catch (const std::length_error& e) {
    CHECK_THAT(e.what(), Contains("37") && Contains(n));
  }
  CHECK(std::all_of(std::begin(c_array), std::end(c_array),
                    [](std::int64_t v) { return v == untouched; }));

#ifdef MAP_INTO_TEST_SPAN
  std::vector<std::int64_t> backing(40, untouched);
  try {
    p.map_into(xs, std::span<std::int64_t>(backing.data() + 3, 37));
    FAIL("map_into into a span of 37 did not throw");
  } catch (const std::length_error& e) {
    CHECK_THAT(e.what(), Contains("37") && Contains(n));
  }
  CHECK(std::all_of(backing.begin(), backing.end(), [](std::int64_t v) { return v == untouched; }));
#endif

  // Nothing was sent: no worker ran an item.
  CHECK(runs.value() == 0);
  // The pool works, and runs exactly what it is given.
  auto fits = iota_vector(37, 1);
  CHECK(p.map_into(fits, arr) == arr.data() + 37);
  CHECK(first_mismatch(arr, serial(fits)) == npos);
  CHECK(runs.value() == 37);
}

// ---------------------------------------------------------------------------
// An empty input.

TEST_CASE("map_into of an empty input writes nothing into any kind of output", "[map_into]") {
  shared_counter runs;
  std::atomic<long>* count = runs.get();
  pool p(
      [count](int x) {
        count->fetch_add(1);
        return scaled(x);
      },
      2u);
  std::vector<int> none;
  std::list<int> no_list;

  std::vector<std::int64_t> v(5, untouched);
  auto v_end = p.map_into(none, v);  // before v.end(): the call resizes v
  CHECK(v.empty());
  CHECK(v_end == v.end());

  std::array<std::int64_t, 3> arr{untouched, untouched, untouched};
  CHECK(p.map_into(none, arr) == arr.data());
  CHECK(arr == std::array<std::int64_t, 3>{untouched, untouched, untouched});

  std::array<std::int64_t, 0> zero{};
  CHECK(p.map_into(no_list, zero) == zero.data());

  std::int64_t c_array[2] = {untouched, untouched};
  CHECK(p.map_into(none, c_array) == c_array);
  CHECK(p.map_into(none, &c_array[1]) == &c_array[1]);
  CHECK(c_array[0] == untouched);
  CHECK(c_array[1] == untouched);

  std::vector<std::int64_t> presized(4, untouched);
  CHECK(p.map_into(none, presized.begin() + 2) == presized.begin() + 2);
  CHECK(presized == std::vector<std::int64_t>(4, untouched));
  std::vector<std::int64_t> empty_vec;
  CHECK(p.map_into(none, empty_vec.begin()) == empty_vec.begin());
  CHECK(p.map_into(none, empty_vec.end()) == empty_vec.end());

  std::list<std::int64_t> l{untouched};
  p.map_into(no_list, std::back_inserter(l));
  CHECK(l == std::list<std::int64_t>{untouched});
  CHECK(p.map_into(none, l.begin()) == l.begin());
  CHECK(l == std::list<std::int64_t>{untouched});

  std::deque<std::int64_t> d;
  p.map_into(none, std::back_inserter(d));
  CHECK(d.empty());

  std::ostringstream os;
  p.map_into(none, std::ostream_iterator<std::int64_t>(os, " "));
  CHECK(os.str().empty());

  std::istringstream nothing("");
  std::vector<std::int64_t> from_stream(2, untouched);
  p.map_into(istream_ints{&nothing}, from_stream);
  CHECK(from_stream.empty());

#ifdef MAP_INTO_TEST_SPAN
  std::span<std::int64_t> empty_span;
  CHECK(p.map_into(none, empty_span) == empty_span.data());
  std::span<std::int64_t> some(presized);
  CHECK(p.map_into(none, some) == presized.data());
  CHECK(presized == std::vector<std::int64_t>(4, untouched));
#endif

  CHECK(runs.value() == 0);
  std::vector<std::int64_t> after;
  p.map_into(iota_vector(3), after);
  CHECK(after == serial(iota_vector(3)));
}

// ---------------------------------------------------------------------------
// Chunk sizes.

TEST_CASE("map_into gives all 10007 results in order with chunks of 1, 7, 1000, 0 or SIZE_MAX",
          "[map_into]") {
  pool p(scaled, 2u);
  std::size_t chunk = GENERATE(std::size_t(1), std::size_t(7), std::size_t(1000), std::size_t(0),
                               static_cast<std::size_t>(-1));
  CAPTURE(chunk);
  auto xs = iota_vector(10007, -5000);
  auto want = serial(xs);

  std::vector<std::int64_t> v;
  p.map_into(xs, v, map_options{chunk});
  CHECK(v.size() == want.size());
  CHECK(first_mismatch(v, want) == npos);

  std::vector<std::int64_t> raw(xs.size() + 1, untouched);
  CHECK(p.map_into(xs, raw.data(), map_options{chunk}) == raw.data() + xs.size());
  CHECK(raw.back() == untouched);
  raw.pop_back();
  CHECK(first_mismatch(raw, want) == npos);

  std::deque<std::int64_t> d;
  p.map_into(xs, std::back_inserter(d), map_options{chunk});
  CHECK(first_mismatch(d, want) == npos);
}

TEST_CASE("map_into over its own input vector maps each item in place", "[map_into]") {
  pool p([](int x) { return 2 * x + 1; }, 2u);
  std::size_t chunk = GENERATE(1u, 7u, 1000u, 0u);
  CAPTURE(chunk);
  auto v = iota_vector(10007);
  const int* memory = v.data();
  p.map_into(v, v, map_options{chunk});
  CHECK(v.data() == memory);
  std::size_t bad = npos;
  for (std::size_t i = 0; i < v.size() && bad == npos; ++i)
    if (v[i] != 2 * static_cast<int>(i) + 1) bad = i;
  CHECK(bad == npos);
}

// ---------------------------------------------------------------------------
// Failures during the call.

TEST_CASE("an item that throws fails map_into with task_error at the lowest failing index",
          "[map_into]") {
  pool p(
      [](int x) {
        if (x == 3001 || x == 7777) throw std::domain_error("no " + std::to_string(x));
        return scaled(x);
      },
      2u);
  std::size_t chunk = GENERATE(1u, 7u, 1000u);
  CAPTURE(chunk);
  auto xs = iota_vector(10007);
  auto want = serial(xs);

  SECTION("into a vector of the same size: what arrived is in place, the rest as it was") {
    std::vector<std::int64_t> out(xs.size(), untouched);
    try {
      p.map_into(xs, out, map_options{chunk});
      FAIL("map_into did not throw");
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == 3001);
      CHECK(e.message() == "no 3001");
      CHECK(e.type_name() == "std::domain_error");
    }
    REQUIRE(out.size() == xs.size());
    CHECK(out[3001] == untouched);
    CHECK(out[7777] == untouched);
    std::size_t bad = npos;
    for (std::size_t i = 0; i < out.size() && bad == npos; ++i)
      if (out[i] != untouched && out[i] != want[i]) bad = i;
    CHECK(bad == npos);
  }
  SECTION("through back_inserter: nothing is appended") {
    std::list<std::int64_t> l{untouched};
    try {
      p.map_into(xs, std::back_inserter(l), map_options{chunk});
      FAIL("map_into did not throw");
    } catch (const procpool::task_error& e) {
      CHECK(e.index() == 3001);
    }
    CHECK(l == std::list<std::int64_t>{untouched});
  }
  // The pool works after.
  auto ok = iota_vector(3000);
  std::vector<std::int64_t> after;
  p.map_into(ok, after, map_options{chunk});
  CHECK(first_mismatch(after, serial(ok)) == npos);
}

TEST_CASE("a worker killed during map_into raises worker_died naming the item, the pool goes on",
          "[map_into]") {
  int how = GENERATE(1, 2);
  CAPTURE(how);
  pool_options o;
  o.workers = 2;
  o.chunk_size = 4;
  pool p(
      [how](int x) {
        if (x == 42) {
          if (how == 1) ::raise(SIGKILL);
          ::_exit(3);
        }
        return scaled(x);
      },
      o);
  auto old = p.pids();
  auto xs = iota_vector(100);
  auto want = serial(xs);
  std::vector<std::int64_t> out(xs.size(), untouched);
  try {
    p.map_into(xs, out);
    FAIL("map_into did not throw");
  } catch (const procpool::worker_died& e) {
    CHECK(e.index() == std::optional<std::size_t>(42));
    CHECK(e.status() == (how == 1 ? exit_status::killed(SIGKILL) : exit_status::exited(3)));
    CHECK(std::find(old.begin(), old.end(), e.pid()) != old.end());
  }
  REQUIRE(out.size() == xs.size());
  CHECK(out[42] == untouched);
  std::size_t bad = npos;
  for (std::size_t i = 0; i < out.size() && bad == npos; ++i)
    if (out[i] != untouched && out[i] != want[i]) bad = i;
  CHECK(bad == npos);

  // The pool works after: the same vector, then items up to the fatal one.
  auto ok = iota_vector(42);
  p.map_into(ok, out);
  CHECK(out == serial(ok));
  std::list<std::int64_t> l;
  p.map_into(ok, std::back_inserter(l));
  CHECK(first_mismatch(l, serial(ok)) == npos);
  CHECK(p.pids().size() == 2);
}

TEST_CASE("a result that cannot be decoded fails map_into with decode_error, the pool goes on",
          "[map_into]") {
  pool p([](int x) { return touchy{x}; }, 2u);
  auto xs = iota_vector(40);
  std::vector<touchy> v(xs.size(), touchy{-1});
  try {
    p.map_into(xs, v, map_options{4});
    FAIL("map_into did not throw");
  } catch (const procpool::decode_error& e) {
    CHECK_THAT(e.what(), Contains("13 is unlucky"));
  }
  REQUIRE(v.size() == xs.size());
  std::size_t bad = npos;
  for (std::size_t i = 0; i < v.size() && bad == npos; ++i)
    if (v[i].v != -1 && v[i].v != xs[i]) bad = i;
  CHECK(bad == npos);
  CHECK(v[13].v == -1);

  std::list<touchy> l;
  CHECK_THROWS_AS(p.map_into(xs, std::back_inserter(l)), procpool::decode_error);
  CHECK(l.empty());

  auto ok = iota_vector(13);
  p.map_into(ok, v);
  REQUIRE(v.size() == 13);
  CHECK(v[12].v == 12);
}

TEST_CASE("an on_progress exception ends map_into, no late result lands in its output",
          "[map_into]") {
  std::atomic<bool> armed{true};
  pool_options o;
  o.workers = 2;
  o.chunk_size = 7;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (armed && info.done > 0) {
      armed = false;
      throw std::out_of_range("enough");
    }
  };
  pool p(scaled, o);
  auto xs = iota_vector(50000);
  auto want = serial(xs);
  std::vector<std::int64_t> out(xs.size(), untouched);
  std::vector<std::int64_t> raw(xs.size(), untouched);
  SECTION("into a vector") {
    REQUIRE_THROWS_AS(p.map_into(xs, out), std::out_of_range);
  }
  SECTION("through a pointer") {
    REQUIRE_THROWS_AS(p.map_into(xs, raw.data()), std::out_of_range);
  }
  REQUIRE_FALSE(armed);
  auto out_then = out;
  auto raw_then = raw;
  std::size_t bad = npos;
  for (std::size_t i = 0; i < xs.size() && bad == npos; ++i)
    if ((out[i] != untouched && out[i] != want[i]) || (raw[i] != untouched && raw[i] != want[i]))
      bad = i;
  CHECK(bad == npos);
  // More calls drive the pool: a chunk of the ended call that came back now
  // must not land in its old output.
  for (int round = 0; round < 3; ++round) {
    std::vector<std::int64_t> other;
    p.map_into(iota_vector(20000, round), other);
    CHECK(first_mismatch(other, serial(iota_vector(20000, round))) == npos);
  }
  CHECK(out == out_then);
  CHECK(raw == raw_then);
}

TEST_CASE("terminate from inside on_progress ends map_into with pool_closed", "[map_into]") {
  pool<std::int64_t (*)(int)>* self = nullptr;
  pool_options o;
  o.workers = 2;
  o.chunk_size = 5;
  o.on_progress = [&](const procpool::progress_info&) {
    if (self) self->terminate();
  };
  pool<std::int64_t (*)(int)> p(scaled, o);
  self = &p;
  auto xs = iota_vector(1000);
  auto want = serial(xs);
  std::vector<std::int64_t> out(xs.size(), untouched);
  REQUIRE_THROWS_AS(p.map_into(xs, out), procpool::pool_closed);
  std::size_t bad = npos;
  for (std::size_t i = 0; i < out.size() && bad == npos; ++i)
    if (out[i] != untouched && out[i] != want[i]) bad = i;
  CHECK(bad == npos);
  std::list<std::int64_t> l;
  REQUIRE_THROWS_AS(p.map_into(xs, std::back_inserter(l)), procpool::pool_closed);
  CHECK(l.empty());
  CHECK(p.pids() == std::vector<pid_t>{0, 0});
}

// ---------------------------------------------------------------------------
// Results that are not plain numbers.

TEST_CASE("map_into decodes string results into a vector of strings and into a list",
          "[map_into]") {
  pool p(text_of, 2u);
  auto xs = iota_vector(1200);
  std::vector<std::string> want;
  for (int x : xs) want.push_back(text_of(x));

  // A vector of the same size with other strings in it: each is replaced.
  std::vector<std::string> v(xs.size(), std::string(100, '?'));
  auto end = p.map_into(xs, v, map_options{7});
  CHECK(end == v.end());
  CHECK(v.size() == want.size());
  CHECK(first_mismatch(v, want) == npos);
  CHECK(v[500].size() == (std::size_t(3) << 20) + 1);

  std::list<std::string> l{"before"};
  p.map_into(xs, std::back_inserter(l));
  REQUIRE(l.size() == want.size() + 1);
  CHECK(l.front() == "before");
  l.pop_front();
  CHECK(first_mismatch(l, want) == npos);
}

TEST_CASE("map and map_into handle a result type with no default constructor", "[map_into]") {
  pool p([](int x) { return tagged(x * 3); }, 2u);
  auto xs = iota_vector(2000, -1000);
  std::vector<tagged> want;
  for (int x : xs) want.emplace_back(x * 3);

  SECTION("map returns a vector of them") {
    std::vector<tagged> r = p.map(xs, map_options{7});
    CHECK(r.size() == want.size());
    CHECK(first_mismatch(r, want) == npos);
    CHECK(r[0].label() == "item--3000");
  }
  SECTION("map_into appends through back_inserter into a vector and a list") {
    std::vector<tagged> v{tagged(1)};
    p.map_into(xs, std::back_inserter(v));
    REQUIRE(v.size() == want.size() + 1);
    CHECK(v[0] == tagged(1));
    v.erase(v.begin());
    CHECK(first_mismatch(v, want) == npos);

    std::list<tagged> l;
    p.map_into(xs, std::back_inserter(l), map_options{1});
    CHECK(first_mismatch(l, want) == npos);
  }
  SECTION("map_into assigns into an array or a vector of constructed ones") {
    std::array<tagged, 4> arr{tagged(0), tagged(0), tagged(0), tagged(0)};
    auto few = iota_vector(3, 5);
    CHECK(p.map_into(few, arr) == arr.data() + 3);
    CHECK(arr == std::array<tagged, 4>{tagged(15), tagged(18), tagged(21), tagged(0)});

    std::vector<tagged> filled(xs.size() + 2, tagged(-1));
    CHECK(p.map_into(xs, filled.begin() + 1) == filled.end() - 1);
    CHECK(filled.front() == tagged(-1));
    CHECK(filled.back() == tagged(-1));
    CHECK(first_mismatch(std::vector<tagged>(filled.begin() + 1, filled.end() - 1), want) == npos);
  }
}

TEST_CASE("map and map_into of a function returning bool give the right bools", "[map_into]") {
  pool p(is_prime, 2u);
  auto xs = iota_vector(10007);
  std::vector<bool> want;
  for (int x : xs) want.push_back(is_prime(x));

  SECTION("map returns a std::vector<bool>") {
    std::vector<bool> r = p.map(xs, map_options{7});
    CHECK(r.size() == want.size());
    CHECK(r == want);
    CHECK(p.map(std::vector<int>{2, 4, 97, 100}) == std::vector<bool>{true, false, true, false});
  }
  SECTION("map_into appends through back_inserter into a std::vector<bool>") {
    std::vector<bool> v{true};
    p.map_into(xs, std::back_inserter(v));
    REQUIRE(v.size() == want.size() + 1);
    CHECK(bool(v.front()));
    v.erase(v.begin());
    CHECK(v == want);
  }
  SECTION("map_into writes into a std::array<bool> and a bool pointer") {
    std::array<bool, 6> arr{true, true, true, true, true, true};
    auto few = std::vector<int>{0, 1, 2, 3, 4};
    CHECK(p.map_into(few, arr) == arr.data() + 5);
    CHECK(arr == std::array<bool, 6>{false, false, true, true, false, true});
    bool raw[3] = {true, true, true};
    CHECK(p.map_into(std::vector<int>{8, 9}, &raw[0]) == raw + 2);
    CHECK(!raw[0]);
    CHECK(!raw[1]);
    CHECK(raw[2]);
  }
  SECTION("map_into resizes a std::vector<bool> and fills it, reused at another size") {
    std::vector<bool> v(3, true);
    auto end = p.map_into(xs, v, map_options{7});
    CHECK(end == v.end());
    CHECK(v == want);
    p.map_into(std::vector<int>{97, 100}, v);
    CHECK(v == std::vector<bool>{true, false});
  }
}

// ---------------------------------------------------------------------------
// Kinds of input.

TEST_CASE("map_into reads lists, deques, C arrays and single-pass ranges", "[map_into]") {
  pool p(scaled, 2u);
  std::vector<std::int64_t> out;

  std::list<int> l;
  for (int i = 0; i < 3000; ++i) l.push_back(i * 7 - 100);
  p.map_into(l, out, map_options{7});
  CHECK(first_mismatch(out, serial(l)) == npos);

  std::deque<int> d(l.begin(), l.end());
  std::list<std::int64_t> into_list;
  p.map_into(d, std::back_inserter(into_list));
  CHECK(first_mismatch(into_list, serial(d)) == npos);

  int c_array[5] = {5, -4, 3, -2, 1};
  std::array<std::int64_t, 5> arr{};
  p.map_into(c_array, arr);
  CHECK(first_mismatch(arr, serial(c_array)) == npos);

  const std::vector<int> constant = iota_vector(50, 9);
  p.map_into(constant, out);
  CHECK(out == serial(constant));
  p.map_into(iota_vector(60, 2), out);  // a temporary input
  CHECK(out == serial(iota_vector(60, 2)));

  p.map_into(counting_input(2500), out, map_options{7});
  CHECK(out.size() == 2500);
  CHECK(first_mismatch(out, serial(iota_vector(2500))) == npos);

  std::istringstream text("4 8 15 16 23 42");
  std::deque<std::int64_t> from_stream;
  p.map_into(istream_ints{&text}, std::back_inserter(from_stream));
  CHECK(first_mismatch(from_stream, serial(std::vector<int>{4, 8, 15, 16, 23, 42})) == npos);
}

TEST_CASE("a std::vector<bool> input sends bools, whatever its iterators give", "[map_into]") {
  pool p([](bool b) { return b ? 1 : 0; }, 2u);
  std::vector<bool> bits;
  for (int i = 0; i < 1000; ++i) bits.push_back(i % 3 == 0);
  std::vector<int> want;
  for (bool b : bits) want.push_back(b ? 1 : 0);
  CHECK(p.map(bits, map_options{7}) == want);  // a non-const vector: proxies to bits
  const std::vector<bool>& constant = bits;
  CHECK(p.map(constant) == want);
  std::vector<int> out;
  p.map_into(bits, out);
  CHECK(out == want);
  std::vector<int> lazy;
  for (auto [i, r] : p.imap_unordered(bits)) {
    if (lazy.size() <= i) lazy.resize(i + 1);
    lazy[i] = r;
  }
  CHECK(lazy == want);
}

// ---------------------------------------------------------------------------
// Threads, a closed pool, a forked child.

TEST_CASE("two threads map_into on one pool at once and each gets its own results", "[map_into]") {
  pool p(scaled, 2u);
  constexpr int rounds = 5;
  constexpr std::size_t n = 20000;
  std::array<int, 2> wrong{};
  std::array<int, 2> thrown{};
  auto work = [&](int t) {
    std::vector<std::int64_t> mine;
    for (int r = 0; r < rounds; ++r) {
      auto xs = iota_vector(n, t * 1000000 + r * 50000);
      try {
        p.map_into(xs, mine, map_options{t == 0 ? std::size_t(7) : std::size_t(0)});
        if (first_mismatch(mine, serial(xs)) != npos) ++wrong[std::size_t(t)];
      } catch (...) {
        ++thrown[std::size_t(t)];
      }
    }
  };
  std::thread a(work, 0);
  std::thread b(work, 1);
  a.join();
  b.join();
  CHECK(wrong == std::array<int, 2>{0, 0});
  CHECK(thrown == std::array<int, 2>{0, 0});
}

TEST_CASE("map_into on a closed or terminated pool throws pool_closed and touches no output",
          "[map_into]") {
  pool p(scaled, 2u);
  bool terminate = GENERATE(false, true);
  CAPTURE(terminate);
  auto xs = iota_vector(10);
  std::vector<std::int64_t> warm;
  p.map_into(xs, warm);
  REQUIRE(warm == serial(xs));
  if (terminate)
    p.terminate();
  else
    p.close();

  std::vector<std::int64_t> v{untouched, 1, 2};
  const std::int64_t* memory = v.data();
  CHECK_THROWS_AS(p.map_into(xs, v), procpool::pool_closed);
  CHECK_THROWS_WITH(p.map_into(xs, v), Contains("map_into"));
  CHECK(v == std::vector<std::int64_t>{untouched, 1, 2});
  CHECK(v.data() == memory);

  std::vector<std::int64_t> empty_vec;
  CHECK_THROWS_AS(p.map_into(xs, empty_vec), procpool::pool_closed);
  CHECK(empty_vec.empty());

  std::array<std::int64_t, 10> arr;
  arr.fill(untouched);
  CHECK_THROWS_AS(p.map_into(xs, arr), procpool::pool_closed);
  CHECK_THROWS_AS(p.map_into(xs, arr.data()), procpool::pool_closed);
  CHECK(std::all_of(arr.begin(), arr.end(), [](std::int64_t x) { return x == untouched; }));

  std::list<std::int64_t> l{untouched};
  CHECK_THROWS_AS(p.map_into(xs, std::back_inserter(l)), procpool::pool_closed);
  CHECK(l == std::list<std::int64_t>{untouched});

  // An empty input is refused too; a too-small output is refused either way.
  CHECK_THROWS_AS(p.map_into(std::vector<int>{}, v), procpool::pool_closed);
  std::array<std::int64_t, 2> small{untouched, untouched};
  CHECK_THROWS(p.map_into(xs, small));
  CHECK(small == std::array<std::int64_t, 2>{untouched, untouched});
}

TEST_CASE("map_into from a forked child throws there, leaving its output, the parent's is right",
          "[map_into][fork]") {
  pool p(scaled, 2u);
  auto pids = p.pids();
  auto xs = iota_vector(10000);
  std::vector<std::int64_t> v(3, untouched);
  std::array<std::int64_t, 4> arr{untouched, untouched, untouched, untouched};
  std::list<std::int64_t> l{untouched};

  procpool::process child([&] {
    // Each use must throw procpool::error naming both pids and leave its
    // output as it was; bit k of the exit code says use k did not.
    auto foreign = [](auto&& use) { return procpool_test::refused_in_fork(use); };
    int code = 0;
    if (!foreign([&] { p.map_into(xs, v); })) code |= 1;
    if (v != std::vector<std::int64_t>(3, untouched)) code |= 2;
    if (!foreign([&] { p.map_into(iota_vector(4), arr); })) code |= 4;
    if (!foreign([&] { p.map_into(xs, arr.data()); })) code |= 8;
    if (!std::all_of(arr.begin(), arr.end(), [](std::int64_t x) { return x == untouched; }))
      code |= 16;
    if (!foreign([&] { p.map_into(xs, std::back_inserter(l)); })) code |= 32;
    if (l != std::list<std::int64_t>{untouched}) code |= 64;
    procpool::exit_process(code);
  });
  // Meanwhile the parent maps: every result must be its own.
  std::vector<std::int64_t> mine;
  p.map_into(xs, mine, map_options{7});
  CHECK(first_mismatch(mine, serial(xs)) == npos);
  CHECK(child.join() == exit_status::exited(0));
  CHECK(p.pids() == pids);
  p.map_into(iota_vector(100, 5), mine);
  CHECK(mine == serial(iota_vector(100, 5)));
}

// ---------------------------------------------------------------------------
// Size and progress.

TEST_CASE("a million-item map_into into a reused vector is right twice in a row", "[map_into]") {
  pool p(scaled, 2u);
  std::vector<std::int64_t> out;
  auto first = iota_vector(1000000);
  p.map_into(first, out);
  REQUIRE(out.size() == first.size());
  CHECK(first_mismatch(out, serial(first)) == npos);
  const std::int64_t* memory = out.data();

  auto second = iota_vector(1000000, -400000);
  auto end = p.map_into(second, out);
  CHECK(end == out.end());
  CHECK(out.data() == memory);
  CHECK(first_mismatch(out, serial(second)) == npos);
}

TEST_CASE("map_into reports its progress to on_progress up to every item", "[map_into]") {
  std::size_t calls = 0;
  procpool::progress_info last;
  pool_options o;
  o.workers = 2;
  o.on_progress = [&](const procpool::progress_info& info) {
    ++calls;
    last = info;
  };
  pool p(scaled, o);
  std::vector<std::int64_t> out;
  p.map_into(iota_vector(5000), out, map_options{7});
  CHECK(calls >= 1);
  CHECK(last.done == 5000);
  CHECK(last.total == 5000);
  CHECK(out == serial(iota_vector(5000)));
}
