// Tests of codec.hpp: round trips of every supported type, the compile-time
// refusals, and decoding of truncated, oversized and corrupted input.
#include <procpool/codec.hpp>
#include <support/support.hpp>

#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bitset>
#include <catch2/catch.hpp>
#include <chrono>
#include <cinttypes>
#include <complex>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <new>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "fuzz/codec_fuzz_target.hpp"

// ---------------------------------------------------------------------------
// Allocation tracking: the largest single allocation and the number of
// allocations since the last reset, so tests can check that corrupt counts
// allocate nothing big and that a warm writer allocates nothing at all.

namespace {
std::atomic<std::size_t> largest_allocation{0};
std::atomic<std::size_t> allocation_count{0};

void reset_allocation_stats() {
  largest_allocation = 0;
  allocation_count = 0;
}
}  // namespace

namespace {
void* counted_allocation(std::size_t size) noexcept {
  ++allocation_count;
  std::size_t seen = largest_allocation.load(std::memory_order_relaxed);
  while (size > seen && !largest_allocation.compare_exchange_weak(seen, size)) {
  }
  return std::malloc(size == 0 ? 1 : size);
}
}  // namespace

// Every replaceable form but the aligned ones, which keep their defaults. Out
// of line, so that the optimizer does not pair malloc'd blocks with operator
// delete and warn about a mismatch that is not there.
[[gnu::noinline]] void* operator new(std::size_t size) {
  if (void* p = counted_allocation(size)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new[](std::size_t size) {
  if (void* p = counted_allocation(size)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return counted_allocation(size);
}
[[gnu::noinline]] void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return counted_allocation(size);
}
[[gnu::noinline]] void operator delete(void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

namespace {

using procpool::decode;
using procpool::decode_error;
using procpool::encode;
using procpool::reader;
using procpool::writer;
using procpool::detail::is_trivially_sendable_v;

// ---------------------------------------------------------------------------
// Test types.

enum class level : std::int16_t { low = -1, mid = 0, high = 1 };
enum small : std::uint8_t { small_a, small_b };
enum unfixed { unfixed_a, unfixed_b };
enum class flag : bool { off, on };

struct vec3 {
  double x, y, z;
  bool operator==(const vec3& o) const { return x == o.x && y == o.y && z == o.z; }
};

struct padded {  // trivially copyable with padding between the fields
  std::uint8_t a;
  std::uint64_t b;
  bool operator==(const padded& o) const { return a == o.a && b == o.b; }
};

struct empty {
  bool operator==(const empty&) const { return true; }
};

struct with_bool {
  int n;
  bool b;
  bool operator==(const with_bool& o) const { return n == o.n && b == o.b; }
};

struct with_const {
  const int id;
  std::string name;
  bool operator==(const with_const& o) const { return id == o.id && name == o.name; }
};

struct particle {
  vec3 position;
  std::array<float, 2> spin;
  level energy;
  std::chrono::microseconds age;
  bool operator==(const particle& o) const {
    return position == o.position && spin == o.spin && energy == o.energy && age == o.age;
  }
};

using payload = std::variant<std::monostate, std::int32_t, std::string, std::vector<vec3>>;

struct entry {
  std::string key;
  std::map<std::string, std::optional<payload>> attributes;
  std::vector<bool> mask;
  bool operator==(const entry& o) const {
    return key == o.key && attributes == o.attributes && mask == o.mask;
  }
};

struct record {  // struct containing vector<struct with map<string, optional<variant<...>>>>
  std::uint64_t id;
  std::vector<entry> entries;
  std::optional<particle> best;
  std::tuple<std::string, level, std::set<int>> extra;
  std::unordered_map<std::string, std::vector<std::pair<int, std::string>>> groups;
  bool operator==(const record& o) const {
    return std::tie(id, entries, best, extra, groups) ==
           std::tie(o.id, o.entries, o.best, o.extra, o.groups);
  }
};

struct node {  // recursive through a vector
  int value;
  std::vector<node> children;
  bool operator==(const node& o) const { return value == o.value && children == o.children; }
};

// A class with private state, through hidden friends found by argument-dependent lookup.
class account {
 public:
  account() = default;
  account(std::string owner, std::int64_t balance) : owner_(std::move(owner)), balance_(balance) {}
  bool operator==(const account& o) const { return owner_ == o.owner_ && balance_ == o.balance_; }

 private:
  friend void procpool_encode(writer& out, const account& a) {
    encode(out, a.owner_);
    encode(out, a.balance_);
  }
  friend account procpool_decode(reader& in, procpool::type_tag<account>) {
    auto owner = decode<std::string>(in);
    auto balance = decode<std::int64_t>(in);
    if (balance < -1000) throw decode_error(in.offset(), "overdrawn");
    return account(std::move(owner), balance);
  }

  std::string owner_;
  std::int64_t balance_ = 0;
};

// An aggregate that also has a customization point: the customization wins.
struct celsius {
  double degrees;
};
void procpool_encode(writer& out, const celsius& c) {
  const auto tenths = static_cast<std::int16_t>(c.degrees * 10);
  encode(out, tenths);
}
celsius procpool_decode(reader& in, procpool::type_tag<celsius>) {
  return celsius{decode<std::int16_t>(in) / 10.0};
}

// Half a customization: encode only.
struct write_only {
  int n;
};
void procpool_encode(writer& out, const write_only& w) {
  encode(out, w.n);
}

// A customization that writes nothing.
struct nothing {
  bool operator==(const nothing&) const { return true; }
};
void procpool_encode(writer&, const nothing&) {}
nothing procpool_decode(reader&, procpool::type_tag<nothing>) {
  return {};
}

// Copying it throws, which can leave a variant valueless.
struct fragile {
  fragile() = default;
  fragile(const fragile&) { throw std::runtime_error("copy"); }
  fragile& operator=(const fragile&) = default;
  friend bool operator==(const fragile&, const fragile&) { return true; }
};
void procpool_encode(writer&, const fragile&) {}
fragile procpool_decode(reader&, procpool::type_tag<fragile>) {
  return {};
}

}  // namespace

// A type from a namespace we do not own, customized in namespace procpool.
namespace procpool {
template <std::size_t N>
void procpool_encode(writer& out, const std::bitset<N>& b) {
  encode(out, b.to_string());
}
template <std::size_t N>
std::bitset<N> procpool_decode(reader& in, type_tag<std::bitset<N>>) {
  const std::size_t at = in.offset();
  auto text = decode<std::string>(in);
  if (text.size() != N || text.find_first_not_of("01") != std::string::npos)
    throw decode_error(at, "not a bitset");
  return std::bitset<N>(text);
}
}  // namespace procpool

// A type of a library we do not own that converts from std::string (as
// std::filesystem::path does), customized in namespace procpool as the guide
// says. Its hooks must not capture the types that convert to it.
namespace vendor {
struct label {
  label(std::string t) : text(std::move(t)) {}  // NOLINT: implicit on purpose
  std::string text;
};
}  // namespace vendor
namespace procpool {
inline void procpool_encode(writer& out, const vendor::label& l) {
  encode(out, std::string("label:") + l.text);
}
inline vendor::label procpool_decode(reader& in, type_tag<vendor::label>) {
  std::string text = decode<std::string>(in);
  if (text.rfind("label:", 0) != 0) throw decode_error(in.offset(), "not a label");
  return vendor::label(text.substr(6));
}
}  // namespace procpool

namespace {
// Derives from a class with hooks: the base's hooks would slice it.
struct audited_account : account {
  std::string auditor;
};
}  // namespace

namespace {

// ---------------------------------------------------------------------------
// Random values of any supported type.

using rng_t = std::mt19937_64;

template <class T>
struct is_std_array : std::false_type {};
template <class E, std::size_t N>
struct is_std_array<std::array<E, N>> : std::true_type {};

template <class T>
void randomize(T& v, rng_t& rng, int depth);

template <class T>
T random_value(rng_t& rng, int depth = 0) {
  if constexpr (std::is_same_v<T, with_const>) {
    return with_const{static_cast<int>(rng()), random_value<std::string>(rng, depth + 1)};
  } else {
    T v{};
    randomize(v, rng, depth);
    return v;
  }
}

std::size_t random_size(rng_t& rng, int depth) {
  const std::size_t limit = depth > 3 ? 1 : 6;
  return rng() % (limit + 1);
}

template <class T>
struct rtag {};

template <class T>
void randomize(T& v, rng_t& rng, int depth) {
  if constexpr (std::is_same_v<T, bool>) {
    v = rng() & 1;
  } else if constexpr (std::is_integral_v<T>) {
    v = static_cast<T>(rng());
  } else if constexpr (std::is_floating_point_v<T>) {
    std::uniform_real_distribution<double> d(-1e6, 1e6);
    v = static_cast<T>(d(rng));
  } else if constexpr (std::is_enum_v<T>) {
    v = static_cast<T>(rng() % 2);
  } else if constexpr (std::is_same_v<T, std::string>) {
    v.resize(random_size(rng, depth) * 3);
    for (char& c : v) c = static_cast<char>(rng());
  } else if constexpr (std::is_same_v<T, std::u32string>) {
    v.resize(random_size(rng, depth));
    for (char32_t& c : v) c = static_cast<char32_t>(rng() % 0x10FFFF);
  } else if constexpr (is_std_array<T>::value) {
    for (auto& e : v) randomize(e, rng, depth + 1);
  } else if constexpr (std::is_same_v<T, std::vector<bool>>) {
    v.resize(random_size(rng, depth) * 5);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = rng() & 1;
  } else if constexpr (std::is_same_v<T, std::monostate> || std::is_same_v<T, empty> ||
                       std::is_same_v<T, std::tuple<>>) {
  } else if constexpr (std::is_same_v<T, account>) {
    v = account(random_value<std::string>(rng, depth + 1), static_cast<std::int64_t>(rng() % 5000));
  } else if constexpr (std::is_same_v<T, node>) {
    v.value = static_cast<int>(rng());
    if (depth < 3)
      for (std::size_t i = random_size(rng, depth); i > 0; --i)
        v.children.push_back(random_value<node>(rng, depth + 1));
  } else {
    randomize(v, rng, depth, rtag<T>{});
  }
}

template <class T>
void randomize(T& v, rng_t& rng, int depth, rtag<T>) {
  // aggregates, field by field
  static_assert(std::is_aggregate_v<T>);
  boost::pfr::for_each_field(v, [&](auto& f) { randomize(f, rng, depth + 1); });
}
template <class E, class A>
void randomize(std::vector<E, A>& v, rng_t& rng, int depth, rtag<std::vector<E, A>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    v.push_back(random_value<E>(rng, depth + 1));
}
template <class E>
void randomize(std::deque<E>& v, rng_t& rng, int depth, rtag<std::deque<E>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    v.push_back(random_value<E>(rng, depth + 1));
}
template <class E>
void randomize(std::list<E>& v, rng_t& rng, int depth, rtag<std::list<E>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    v.push_back(random_value<E>(rng, depth + 1));
}
template <class M>
void randomize_associative(M& m, rng_t& rng, int depth) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    m.insert(random_value<typename M::value_type>(rng, depth + 1));
}
template <class K, class V>
void randomize(std::map<K, V>& m, rng_t& rng, int depth, rtag<std::map<K, V>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    m.emplace(random_value<K>(rng, depth + 1), random_value<V>(rng, depth + 1));
}
template <class K, class V>
void randomize(std::multimap<K, V>& m, rng_t& rng, int depth, rtag<std::multimap<K, V>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    m.emplace(random_value<K>(rng, depth + 1), random_value<V>(rng, depth + 1));
}
template <class K, class V>
void randomize(std::unordered_map<K, V>& m, rng_t& rng, int depth, rtag<std::unordered_map<K, V>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    m.emplace(random_value<K>(rng, depth + 1), random_value<V>(rng, depth + 1));
}
template <class K, class V>
void randomize(std::unordered_multimap<K, V>& m, rng_t& rng, int depth,
               rtag<std::unordered_multimap<K, V>>) {
  for (std::size_t i = random_size(rng, depth); i > 0; --i)
    m.emplace(random_value<K>(rng, depth + 1), random_value<V>(rng, depth + 1));
}
template <class K>
void randomize(std::set<K>& m, rng_t& rng, int depth, rtag<std::set<K>>) {
  randomize_associative(m, rng, depth);
}
template <class K>
void randomize(std::multiset<K>& m, rng_t& rng, int depth, rtag<std::multiset<K>>) {
  randomize_associative(m, rng, depth);
}
template <class K>
void randomize(std::unordered_set<K>& m, rng_t& rng, int depth, rtag<std::unordered_set<K>>) {
  randomize_associative(m, rng, depth);
}
template <class K>
void randomize(std::unordered_multiset<K>& m, rng_t& rng, int depth,
               rtag<std::unordered_multiset<K>>) {
  randomize_associative(m, rng, depth);
}
template <class A, class B>
void randomize(std::pair<A, B>& p, rng_t& rng, int depth, rtag<std::pair<A, B>>) {
  randomize(p.first, rng, depth + 1);
  randomize(p.second, rng, depth + 1);
}
template <class... Ts>
void randomize(std::tuple<Ts...>& t, rng_t& rng, int depth, rtag<std::tuple<Ts...>>) {
  std::apply([&](auto&... e) { (randomize(e, rng, depth + 1), ...); }, t);
}
template <class E>
void randomize(std::optional<E>& o, rng_t& rng, int depth, rtag<std::optional<E>>) {
  if (rng() % 3 != 0) o = random_value<E>(rng, depth + 1);
}
template <class... Ts>
void randomize(std::variant<Ts...>& v, rng_t& rng, int depth, rtag<std::variant<Ts...>>) {
  const std::size_t which = rng() % sizeof...(Ts);
  std::size_t i = 0;
  ((i++ == which ? (v = random_value<Ts>(rng, depth + 1), 0) : 0), ...);
}
template <class R, class P>
void randomize(std::chrono::duration<R, P>& d, rng_t& rng, int depth,
               rtag<std::chrono::duration<R, P>>) {
  d = std::chrono::duration<R, P>(random_value<R>(rng, depth + 1));
}
template <class C, class D>
void randomize(std::chrono::time_point<C, D>& t, rng_t& rng, int depth,
               rtag<std::chrono::time_point<C, D>>) {
  t = std::chrono::time_point<C, D>(random_value<D>(rng, depth + 1));
}
template <class F>
void randomize(std::complex<F>& c, rng_t& rng, int depth, rtag<std::complex<F>>) {
  c = {random_value<F>(rng, depth + 1), random_value<F>(rng, depth + 1)};
}

// ---------------------------------------------------------------------------
// Helpers.

template <class T, class = void>
struct comparable : std::false_type {};
template <class T>
struct comparable<T, std::void_t<decltype(std::declval<const T&>() == std::declval<const T&>())>>
    : std::true_type {};

using codec_fuzz::piece_source;

template <class T>
T round_trip(const T& value) {
  std::vector<std::byte> bytes = encode(value);
  // The same bytes, written after others into a reused writer, read by a reader.
  writer out;
  encode(out, std::string("prefix"));
  encode(out, value);
  encode(out, std::uint8_t{0xAB});
  REQUIRE(out.size() == 14 + bytes.size() + 1);
  REQUIRE(std::equal(bytes.begin(), bytes.end(), out.data() + 14));
  reader in(out.data(), out.size());
  REQUIRE(decode<std::string>(in) == "prefix");
  T again = decode<T>(in);
  REQUIRE(in.offset() == 14 + bytes.size());
  REQUIRE(decode<std::uint8_t>(in) == 0xAB);
  REQUIRE(in.at_end());
  REQUIRE(encode(again).size() == bytes.size());
  // The same bytes coming in pieces, as a message longer than its ring does.
  struct shape {
    std::size_t piece, hold;
  };
  for (shape sh : {shape{1, 1}, shape{3, 64}, shape{7, std::size_t(1) << 20}, shape{4096, 4096}}) {
    bool slow = sh.piece < 4096;
    if (slow && out.size() > (std::size_t(1) << 20)) continue;  // too slow a byte at a time
    INFO("pieces of " << sh.piece << " bytes, " << sh.hold << " at most at once");
    piece_source source(out.data(), out.size(), sh.piece, sh.hold);
    reader streamed(source, out.size());
    REQUIRE(decode<std::string>(streamed) == "prefix");
    T piecewise = decode<T>(streamed);
    REQUIRE(streamed.offset() == 14 + bytes.size());
    REQUIRE(decode<std::uint8_t>(streamed) == 0xAB);
    REQUIRE(streamed.at_end());
    REQUIRE(encode(piecewise).size() == bytes.size());
    if constexpr (comparable<T>::value) REQUIRE(piecewise == again);
  }
  return decode<T>(bytes);
}

std::vector<std::byte> bytes_of(std::initializer_list<unsigned> list) {
  std::vector<std::byte> out;
  for (unsigned b : list) out.push_back(std::byte(b));
  return out;
}

template <class T>
void append_raw(std::vector<std::byte>& out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

template <class T>
std::string decode_failure(const std::vector<std::byte>& bytes) {
  try {
    decode<T>(bytes);
  } catch (const decode_error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

// ---------------------------------------------------------------------------
// Compile-time properties.

// What goes by one memcpy.
static_assert(is_trivially_sendable_v<int>);
static_assert(is_trivially_sendable_v<double>);
static_assert(is_trivially_sendable_v<char>);
static_assert(is_trivially_sendable_v<std::byte>);
static_assert(is_trivially_sendable_v<level>);
static_assert(is_trivially_sendable_v<vec3>);
static_assert(is_trivially_sendable_v<padded>);
static_assert(is_trivially_sendable_v<empty>);
static_assert(is_trivially_sendable_v<particle>);
static_assert(is_trivially_sendable_v<std::array<vec3, 4>>);
static_assert(is_trivially_sendable_v<std::chrono::nanoseconds>);
static_assert(is_trivially_sendable_v<std::complex<double>>);
static_assert(is_trivially_sendable_v<const int>);
static_assert(!is_trivially_sendable_v<bool>);  // only 0 and 1 are valid
static_assert(!is_trivially_sendable_v<flag>);  // an enum over bool, likewise
static_assert(!is_trivially_sendable_v<with_bool>);
static_assert(!is_trivially_sendable_v<std::array<int, 0>>);
static_assert(!is_trivially_sendable_v<std::monostate>);
static_assert(!is_trivially_sendable_v<std::string>);
static_assert(!is_trivially_sendable_v<std::vector<int>>);
static_assert(!is_trivially_sendable_v<celsius>);  // its customization decides
static_assert(!is_trivially_sendable_v<int*>);
static_assert(!is_trivially_sendable_v<int&>);
static_assert(!is_trivially_sendable_v<unfixed>);

// What can be sent at all.
static_assert(procpool::is_sendable_v<int>);
static_assert(procpool::is_sendable_v<record>);
static_assert(procpool::is_sendable_v<node>);
static_assert(procpool::is_sendable_v<account>);
static_assert(procpool::is_sendable_v<celsius>);
static_assert(procpool::is_sendable_v<with_const>);
static_assert(procpool::is_sendable_v<std::bitset<12>>);
static_assert(procpool::is_sendable_v<codec_fuzz::document>);
static_assert(!procpool::is_sendable_v<int*>);
static_assert(!procpool::is_sendable_v<const char*>);
static_assert(!procpool::is_sendable_v<int&>);
static_assert(!procpool::is_sendable_v<void>);
static_assert(!procpool::is_sendable_v<int[3]>);
static_assert(!procpool::is_sendable_v<void (*)()>);
static_assert(!procpool::is_sendable_v<int vec3::*>);
static_assert(!procpool::is_sendable_v<std::function<void()>>);
static_assert(!procpool::is_sendable_v<std::unique_ptr<int>>);
static_assert(!procpool::is_sendable_v<std::shared_ptr<vec3>>);
static_assert(!procpool::is_sendable_v<std::reference_wrapper<int>>);
static_assert(!procpool::is_sendable_v<std::vector<int*>>);
static_assert(!procpool::is_sendable_v<std::map<std::string, std::unique_ptr<int>>>);
static_assert(!procpool::is_sendable_v<std::optional<std::variant<int, double*>>>);
static_assert(!procpool::is_sendable_v<std::tuple<int, std::shared_ptr<int>>>);
static_assert(!procpool::is_sendable_v<std::vector<std::function<int(int)>>>);

namespace {
union number {
  int i;
  float f;
};
class opaque {
 public:
  explicit opaque(int v) : v_(v) {}
  int value() const { return v_; }

 private:
  int v_;
};
struct holds_pointer {
  int n;
  std::vector<std::pair<std::string, const vec3*>> refs;
};
struct holds_union {
  std::optional<number> n;
};
struct lvalue_reference_field {
  int& n;
  double d;
};
struct const_reference_field {
  int n;
  const std::string& name;
};
struct rvalue_reference_field {
  std::string&& name;
  std::vector<int> values;
};
struct default_member_initializers {
  int n = 1;
  const std::string name = "x";
  bool operator==(const default_member_initializers& o) const { return n == o.n && name == o.name; }
};
}  // namespace

static_assert(!procpool::is_sendable_v<lvalue_reference_field>);
static_assert(!procpool::is_sendable_v<const_reference_field>);
static_assert(!procpool::is_sendable_v<rvalue_reference_field>);
static_assert(procpool::is_sendable_v<default_member_initializers>);

static_assert(!procpool::is_sendable_v<number>);
static_assert(!procpool::is_sendable_v<opaque>);
static_assert(!procpool::is_sendable_v<holds_pointer>);
static_assert(!procpool::is_sendable_v<holds_union>);
inline auto a_lambda = [](int x) { return x; };
static_assert(!procpool::is_sendable_v<decltype(a_lambda)>);

// Encodable but not decodable.
static_assert(procpool::is_encodable_v<std::string_view>);
static_assert(!procpool::is_decodable_v<std::string_view>);
static_assert(!procpool::is_sendable_v<std::vector<std::string_view>>);
static_assert(procpool::is_encodable_v<unfixed>);
static_assert(!procpool::is_decodable_v<unfixed>);
static_assert(procpool::is_encodable_v<write_only>);
static_assert(!procpool::is_decodable_v<write_only>);

// Smallest encodings, which bound counts before anything is reserved.
static_assert(procpool::detail::codec_min_size<int>() == 4);
static_assert(procpool::detail::codec_min_size<std::string>() == 8);
static_assert(procpool::detail::codec_min_size<std::pair<bool, std::optional<int>>>() == 2);
static_assert(procpool::detail::codec_min_size<std::monostate>() == 0);
static_assert(procpool::detail::codec_min_size<std::array<std::monostate, 8>>() == 0);
static_assert(procpool::detail::codec_min_size<entry>() == 24);
static_assert(procpool::detail::codec_min_size<node>() == 12);
static_assert(procpool::detail::codec_min_size<account>() == 0);  // unknown: bounded like empty

// ---------------------------------------------------------------------------
// Round trips.

TEMPLATE_TEST_CASE(
    "random values of every supported type round-trip", "[codec]", bool, char, signed char,
    unsigned char, std::int8_t, std::uint8_t, std::int16_t, std::uint16_t, std::int32_t,
    std::uint32_t, std::int64_t, std::uint64_t, float, double, long double, char16_t, char32_t,
    wchar_t, std::byte, level, small, flag, std::string, std::u32string, std::vector<int>,
    std::vector<double>, std::vector<bool>, std::vector<std::string>, std::vector<vec3>,
    std::vector<std::vector<std::uint8_t>>, (std::array<int, 5>), (std::array<std::string, 3>),
    (std::array<bool, 9>), (std::array<int, 0>), (std::pair<int, std::string>),
    (std::tuple<int, double, std::string>), std::tuple<>, std::optional<int>,
    std::optional<std::string>, (std::variant<int, std::string, std::monostate>), std::monostate,
    (std::map<std::string, int>), (std::multimap<int, std::string>),
    (std::unordered_map<int, std::vector<int>>), (std::unordered_multimap<std::string, int>),
    std::set<std::string>, std::multiset<int>, std::unordered_set<int>,
    std::unordered_multiset<std::string>, std::chrono::nanoseconds, std::chrono::duration<double>,
    std::chrono::system_clock::time_point, std::chrono::steady_clock::time_point,
    std::complex<double>, std::deque<std::string>, std::list<vec3>, vec3, padded, empty, with_bool,
    particle, entry, record, node, account, with_const) {
  rng_t rng(20240601);
  SECTION("the default value") {
    if constexpr (std::is_default_constructible_v<TestType>) {
      TestType value{};
      CHECK(round_trip(value) == value);
    }
  }
  SECTION("random values") {
    for (int i = 0; i < 100; ++i) {
      TestType value = random_value<TestType>(rng);
      CHECK(round_trip(value) == value);
    }
  }
  SECTION("trivially sendable types encode as their object bytes") {
    if constexpr (is_trivially_sendable_v<TestType>) {
      TestType value = random_value<TestType>(rng);
      std::vector<std::byte> bytes = encode(value);
      REQUIRE(bytes.size() == sizeof(TestType));
      CHECK(std::memcmp(bytes.data(), &value, sizeof value) == 0);
    }
  }
}

TEST_CASE("a std::string_view encodes as a std::string", "[codec]") {
  std::string_view view = "hello, world";
  CHECK(encode(view) == encode(std::string(view)));
  CHECK(decode<std::string>(encode(view)) == view);
  std::map<std::string_view, int> by_view{{"a", 1}, {"b", 2}};
  CHECK((decode<std::map<std::string, int>>(encode(by_view)) ==
         std::map<std::string, int>{{"a", 1}, {"b", 2}}));
}

TEST_CASE("an enum without a fixed underlying type encodes as its integer", "[codec]") {
  CHECK(decode<int>(encode(unfixed_b)) == 1);
}

TEST_CASE("a nested aggregate round-trips", "[codec]") {
  entry e1{"first",
           {{"none", std::nullopt},
            {"empty", payload{}},
            {"number", payload{42}},
            {"text", payload{std::string("text")}},
            {"points", payload{std::vector<vec3>{{1, 2, 3}, {4, 5, 6}}}}},
           {true, false, true}};
  entry e2{"", {}, {}};
  record r{7,
           {e1, e2, e1},
           particle{{0.5, -0.5, 1e300}, {1.0f, -1.0f}, level::high, std::chrono::microseconds(9)},
           {"extra", level::low, {3, 1, 2}},
           {{"g", {{1, "one"}, {2, "two"}}}, {"h", {}}}};
  CHECK(round_trip(r) == r);
  std::vector<record> many(50, r);
  CHECK(round_trip(many) == many);
}

TEST_CASE("aggregates with const fields and default member initializers round-trip", "[codec]") {
  default_member_initializers d{5, "five"};
  CHECK(round_trip(d) == d);
  with_const c{3, "three"};
  CHECK(round_trip(c) == c);
}

TEST_CASE("a recursive aggregate round-trips", "[codec]") {
  node tree{1, {node{2, {}}, node{3, {node{4, {}}, node{5, {}}}}}};
  CHECK(round_trip(tree) == tree);
  node deep{0, {}};
  for (int i = 1; i < 200; ++i) deep = node{i, {deep}};
  CHECK(round_trip(deep) == deep);
}

TEST_CASE("huge values round-trip as one block", "[codec]") {
  SECTION("a vector of 10^6 doubles is its count and its bytes") {
    std::vector<double> v(1000000);
    rng_t rng(1);
    for (double& d : v) d = std::uniform_real_distribution<double>(-1, 1)(rng);
    std::vector<std::byte> bytes = encode(v);
    REQUIRE(bytes.size() == 8 + 8 * v.size());
    std::uint64_t count;
    std::memcpy(&count, bytes.data(), 8);
    CHECK(count == v.size());
    CHECK(std::memcmp(bytes.data() + 8, v.data(), 8 * v.size()) == 0);
    CHECK(decode<std::vector<double>>(bytes) == v);
  }
  SECTION("a string of 1 MiB") {
    std::string s(1 << 20, '\0');
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(i * 7);
    std::vector<std::byte> bytes = encode(s);
    REQUIRE(bytes.size() == 8 + s.size());
    CHECK(decode<std::string>(bytes) == s);
  }
  SECTION("a vector of 10^5 trivially copyable aggregates") {
    std::vector<particle> v(100000);
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] = particle{{double(i), 0, 0}, {0, 1}, level::mid, std::chrono::microseconds(i)};
    std::vector<std::byte> bytes = encode(v);
    REQUIRE(bytes.size() == 8 + sizeof(particle) * v.size());
    CHECK(decode<std::vector<particle>>(bytes) == v);
  }
}

TEST_CASE("bool vectors are packed eight to a byte", "[codec]") {
  std::vector<bool> v{true, false, false, true, true, false, true, false, true};
  std::vector<std::byte> bytes = encode(v);
  REQUIRE(bytes.size() == 8 + 2);
  CHECK(bytes[8] == std::byte{0b01011001});
  CHECK(bytes[9] == std::byte{0b1});
}

// ---------------------------------------------------------------------------
// The customization point.

TEST_CASE("a class with private members is sent through its customization point", "[codec]") {
  account a("ann", 250);
  CHECK(round_trip(a) == a);
  std::vector<account> many{a, account("bob", -3), account()};
  CHECK(round_trip(many) == many);
  std::map<std::string, std::optional<account>> by_name{{"a", a}, {"none", std::nullopt}};
  CHECK(round_trip(by_name) == by_name);

  SECTION("its decoder's own errors come through") {
    std::vector<std::byte> bytes = encode(account("eve", -5000));
    CHECK_THROWS_WITH(decode<account>(bytes), Catch::Contains("overdrawn"));
  }
}

TEST_CASE("a customization point takes precedence over the built-in rules", "[codec]") {
  std::vector<std::byte> bytes = encode(celsius{21.5});
  CHECK(bytes.size() == 2);  // its tenths as int16, not its 8 bytes
  CHECK(decode<celsius>(bytes).degrees == 21.5);
  std::vector<celsius> temps{{1.0}, {-2.5}};
  CHECK(encode(temps).size() == 8 + 2 * 2);
}

TEST_CASE("a type from another namespace is customized in namespace procpool", "[codec]") {
  std::bitset<12> b(0b101100111000);
  CHECK(round_trip(b) == b);
  std::vector<std::byte> bad = encode(std::string("10x010101010"));
  CHECK_THROWS_AS(decode<std::bitset<12>>(bad), decode_error);
}

TEST_CASE("a customization point matches its exact type only", "[codec]") {
  STATIC_REQUIRE(procpool::is_sendable_v<std::string>);
  STATIC_REQUIRE(procpool::is_sendable_v<vendor::label>);
  STATIC_REQUIRE(procpool::is_sendable_v<std::vector<std::string>>);
  // A std::string still goes as a string: a u64 length and its characters.
  const std::vector<std::byte> text = encode(std::string("abc"));
  CHECK(text.size() == 8 + 3);
  CHECK(decode<std::string>(text) == "abc");
  // The label goes through its hook.
  const std::vector<std::byte> label = encode(vendor::label("abc"));
  CHECK(label.size() == 8 + 9);
  CHECK(decode<vendor::label>(label).text == "abc");
  CHECK_THROWS_AS(decode<vendor::label>(text), decode_error);
  // A class derived from one with hooks is not sliced through the base's hooks.
  STATIC_REQUIRE(!procpool::is_encodable_v<audited_account>);
  STATIC_REQUIRE(procpool::is_sendable_v<account>);
}

TEST_CASE("a std::filesystem::path is sendable as its native string", "[codec]") {
  STATIC_REQUIRE(procpool::is_sendable_v<std::filesystem::path>);
  for (const std::filesystem::path& p :
       {std::filesystem::path(), std::filesystem::path("/tmp/a b/\xc3\xbc.txt"),
        std::filesystem::path("relative/../x"), std::filesystem::path(std::string(5000, 'p'))}) {
    const std::vector<std::byte> bytes = encode(p);
    CHECK(bytes == encode(p.native()));
    CHECK(decode<std::filesystem::path>(bytes) == p);
    CHECK(decode<std::filesystem::path>(bytes).native() == p.native());
  }
  std::map<std::filesystem::path, std::vector<std::filesystem::path>> tree{{"/a", {"/a/b", "/a/c"}},
                                                                           {"/d", {}}};
  CHECK(round_trip(tree) == tree);
}

TEST_CASE("a customization that writes nothing is bounded like empty elements", "[codec]") {
  std::vector<nothing> v(1000);
  CHECK(round_trip(v) == v);
  std::vector<std::byte> bytes;
  append_raw(bytes, std::uint64_t{1} << 60);
  CHECK_THROWS_AS(decode<std::vector<nothing>>(bytes), decode_error);
}

TEST_CASE("an encode-only customization encodes", "[codec]") {
  CHECK(decode<int>(encode(write_only{5})) == 5);
}

// ---------------------------------------------------------------------------
// Decoding trusts no byte.

TEST_CASE("every truncation of a valid buffer throws decode_error", "[codec]") {
  rng_t rng(99);
  auto check_all_truncations = [](const std::vector<std::byte>& bytes, auto type) {
    using T = typename decltype(type)::type;
    REQUIRE_NOTHROW(decode<T>(bytes));
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      // Copy the prefix so that reading past it would be caught by sanitizers.
      std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + static_cast<long>(n));
      CHECK_THROWS_AS(decode<T>(prefix.data(), prefix.size()), decode_error);
    }
  };
  for (int i = 0; i < 5; ++i) {
    record r = random_value<record>(rng);
    r.entries.push_back(random_value<entry>(rng));
    check_all_truncations(encode(r), procpool::detail::tid<record>{});
  }
  // A streamed message that ends short: the same, whatever the pieces.
  record r = random_value<record>(rng);
  std::vector<std::byte> bytes = encode(r);
  for (std::size_t n = 0; n < bytes.size(); n += 1 + n / 8) {
    std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + static_cast<long>(n));
    piece_source source(prefix.data(), prefix.size(), 5, 16);
    reader streamed(source, prefix.size());
    CHECK_THROWS_AS(decode<record>(streamed), decode_error);
  }
  for (const auto& [name, bytes] : codec_fuzz::seeds()) {
    INFO(name);
    if (name == "document-full")
      check_all_truncations(std::vector<std::byte>(bytes.begin() + 1, bytes.end()),
                            procpool::detail::tid<codec_fuzz::document>{});
  }
}

TEST_CASE("corrupt counts throw at once without allocating", "[codec]") {
  const std::uint64_t huge = std::uint64_t{1} << 60;
  auto with_count = [](std::uint64_t count, std::size_t tail) {
    std::vector<std::byte> bytes;
    append_raw(bytes, count);
    bytes.resize(bytes.size() + tail, std::byte{1});
    return bytes;
  };
  auto check_rejected = [](auto type, const std::vector<std::byte>& bytes) {
    using T = typename decltype(type)::type;
    const auto start = std::chrono::steady_clock::now();
    reset_allocation_stats();
    bool threw = false;
    try {
      decode<T>(bytes);
    } catch (const decode_error&) {
      threw = true;
    }
    const std::size_t largest = largest_allocation;
    CHECK(threw);
    CHECK(largest < 4096);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(500));
  };
  using procpool::detail::tid;
  check_rejected(tid<std::vector<int>>{}, with_count(huge, 4));
  check_rejected(tid<std::vector<int>>{}, with_count(3, 11));
  check_rejected(tid<std::vector<double>>{}, with_count(std::uint64_t(-1), 8));
  check_rejected(tid<std::string>{}, with_count(huge, 3));
  check_rejected(tid<std::u32string>{}, with_count(2, 7));
  check_rejected(tid<std::vector<bool>>{}, with_count(std::uint64_t(-1), 8));
  check_rejected(tid<std::vector<bool>>{}, with_count(65, 8));
  check_rejected(tid<std::vector<std::string>>{}, with_count(huge, 16));
  check_rejected(tid<std::map<int, int>>{}, with_count(huge, 16));
  check_rejected(tid<std::unordered_map<int, std::string>>{}, with_count(huge, 16));
  check_rejected(tid<std::unordered_set<std::uint64_t>>{}, with_count(3, 16));
  check_rejected(tid<std::deque<int>>{}, with_count(huge, 16));
  check_rejected(tid<std::list<int>>{}, with_count(huge, 16));
  check_rejected(tid<std::vector<std::monostate>>{}, with_count(huge, 0));
  check_rejected(tid<std::vector<std::tuple<>>>{}, with_count(huge, 3));
  check_rejected(tid<std::vector<std::array<int, 0>>>{}, with_count(huge, 3));
  check_rejected(tid<std::vector<account>>{}, with_count(huge, 3));
  check_rejected(tid<std::vector<record>>{}, with_count(huge, 64));
  // A count that fits what remains, inside a count that does not.
  std::vector<std::byte> nested;
  append_raw(nested, std::uint64_t{1});
  append_raw(nested, huge);
  check_rejected(tid<std::vector<std::vector<int>>>{}, nested);
}

TEST_CASE("elements with an empty encoding are bounded per buffer", "[codec]") {
  std::vector<std::monostate> ok(1000);
  CHECK(round_trip(ok) == ok);
  std::vector<std::monostate> too_many(reader::max_empty_elements + 1);
  CHECK_THROWS_WITH(decode<std::vector<std::monostate>>(encode(too_many)),
                    Catch::Contains("empty encoding"));
  // The allowance is shared by all the containers of one buffer.
  std::vector<std::vector<std::monostate>> split(
      3, std::vector<std::monostate>(reader::max_empty_elements / 2));
  CHECK_THROWS_AS(decode<std::vector<std::vector<std::monostate>>>(encode(split)), decode_error);
  std::vector<std::byte> bytes = encode(std::array<std::monostate, 4>{});
  CHECK(bytes.empty());
}

TEST_CASE("bytes after the value are rejected by a whole-buffer decode", "[codec]") {
  std::vector<std::byte> bytes = encode(std::int32_t{5});
  bytes.push_back(std::byte{0});
  CHECK(decode_failure<std::int32_t>(bytes) ==
        "decode error at byte 4: expected the end of the buffer after int, 1 bytes remain");
  reader in(bytes);
  CHECK(decode<std::int32_t>(in) == 5);  // a reader stops where the value ends
  CHECK(in.remaining() == 1);
  bytes = encode(record{});
  bytes.push_back(std::byte{0});
  CHECK_THROWS_AS(decode<record>(bytes), decode_error);
}

TEST_CASE("invalid tags and values are rejected", "[codec]") {
  SECTION("a bool other than 0 or 1") {
    CHECK(decode<bool>(bytes_of({1})));
    CHECK_FALSE(decode<bool>(bytes_of({0})));
    CHECK(decode_failure<bool>(bytes_of({2})) == "decode error at byte 0: invalid byte 2 for bool");
    CHECK_THROWS_AS(decode<with_bool>(bytes_of({1, 0, 0, 0, 255})), decode_error);
    CHECK_THROWS_AS(decode<flag>(bytes_of({7})), decode_error);
    CHECK_THROWS_AS((decode<std::array<bool, 2>>(bytes_of({1, 3}))), decode_error);
  }
  SECTION("an optional tag other than 0 or 1") {
    CHECK(decode<std::optional<std::uint8_t>>(bytes_of({0})) == std::nullopt);
    CHECK(decode<std::optional<std::uint8_t>>(bytes_of({1, 9})) == 9);
    CHECK_THAT(decode_failure<std::optional<std::uint8_t>>(bytes_of({2, 9})),
               Catch::Contains("at byte 0: invalid tag 2 for std::optional<unsigned char>"));
  }
  SECTION("a variant index out of range") {
    using V = std::variant<std::uint8_t, std::string, std::monostate>;
    std::vector<std::byte> bytes;
    append_raw(bytes, std::uint32_t{2});
    CHECK(std::holds_alternative<std::monostate>(decode<V>(bytes)));
    for (std::uint32_t index : {3u, 4u, 0xFFFFFFFFu}) {
      bytes.clear();
      append_raw(bytes, index);
      bytes.push_back(std::byte{0});
      CHECK_THAT(decode_failure<V>(bytes), Catch::Contains("invalid alternative index"));
    }
  }
  SECTION("a duplicate key") {
    std::vector<std::byte> bytes;
    append_raw(bytes, std::uint64_t{2});
    append_raw(bytes, std::int32_t{7});
    append_raw(bytes, std::int32_t{7});
    CHECK_THAT(decode_failure<std::set<std::int32_t>>(bytes), Catch::Contains("at byte 12"));
    CHECK_THROWS_AS(decode<std::unordered_set<std::int32_t>>(bytes), decode_error);
    CHECK(decode<std::multiset<std::int32_t>>(bytes).size() == 2);
    CHECK(decode<std::unordered_multiset<std::int32_t>>(bytes).size() == 2);
    // As a map of int16 to int16, the same bytes hold the pair (7, 0) twice.
    CHECK_THROWS_AS((decode<std::map<std::int16_t, std::int16_t>>(bytes)), decode_error);
    CHECK((decode<std::multimap<std::int16_t, std::int16_t>>(bytes).size() == 2));
  }
  SECTION("stray bits after the last element of a bool vector") {
    std::vector<std::byte> bytes;
    append_raw(bytes, std::uint64_t{3});
    bytes.push_back(std::byte{0b1101});
    CHECK_THROWS_WITH(decode<std::vector<bool>>(bytes), Catch::Contains("unused bits"));
  }
}

TEST_CASE("decode errors name the offset and what was expected", "[codec]") {
  std::vector<std::byte> bytes = encode(1.5);
  CHECK(decode_failure<double>(std::vector<std::byte>(bytes.begin(), bytes.begin() + 3)) ==
        "decode error at byte 0: expected 8 bytes for double, 3 remain");
  bytes = encode(std::pair<std::int32_t, double>(1, 2.0));
  bytes.resize(7);
  try {
    decode<std::pair<std::int32_t, double>>(bytes);
    FAIL("no error");
  } catch (const decode_error& e) {
    CHECK(e.offset() == 4);
    CHECK_THAT(e.what(), Catch::Contains("expected 8 bytes for double, 3 remain"));
  }
  CHECK_THAT(decode_failure<std::vector<std::string>>(bytes_of({1, 2})),
             Catch::Contains("expected 8 bytes for the length of std::vector<std::string"));
  CHECK_THAT(decode_failure<std::vector<std::int32_t>>(encode(std::uint64_t{5})),
             Catch::Contains("of 5 elements needs at least 4 bytes per element, 0 bytes remain"));
}

// ---------------------------------------------------------------------------
// writer and reader.

TEST_CASE("a writer grows, clears, and hands over its buffer", "[codec]") {
  writer out;
  CHECK(out.empty());
  out.write("abc", 3);
  CHECK(out.size() == 3);
  const std::size_t capacity = out.capacity();
  CHECK(capacity >= 3);
  out.clear();
  CHECK(out.empty());
  CHECK(out.capacity() == capacity);

  std::byte* room = out.prepare(10);
  std::memcpy(room, "0123456789", 10);
  out.commit(4);
  CHECK(std::string(reinterpret_cast<const char*>(out.data()), out.size()) == "0123");
  out.resize(2);
  out.resize(5);
  CHECK(std::string(reinterpret_cast<const char*>(out.data()), out.size()) ==
        std::string("01\0\0\0", 5));

  out.clear();
  encode(out, std::uint16_t{0x0102});
  std::vector<std::byte> bytes = out.release();
  CHECK(bytes.size() == 2);
  CHECK(out.size() == 0);
  CHECK(out.capacity() == 0);

  writer reused(std::move(bytes));
  CHECK(reused.empty());
  CHECK(reused.capacity() >= 2);
  writer sized(1000);
  CHECK(sized.capacity() >= 1000);
}

TEST_CASE("a writer writes in place while the memory given lasts, then in its own buffer",
          "[codec]") {
  std::vector<std::byte> memory(64, std::byte{0xee});
  writer out;
  out.write("old", 3);
  out.write_in_place(memory.data() + 8, 32);  // starts empty, over the given bytes
  CHECK(out.in_place());
  CHECK(out.empty());
  CHECK(out.capacity() == 32);
  encode(out, std::uint32_t{7});
  out.write("0123456789", 10);
  CHECK(out.data() == memory.data() + 8);
  CHECK(out.size() == 14);
  CHECK(std::memcmp(memory.data() + 12, "0123456789", 10) == 0);
  CHECK(memory[7] == std::byte{0xee});  // nothing written before the memory given
  out.clear();
  out.write("abcdefghijklmnopqrstuvwxyz012345", 32);  // exactly fills it
  CHECK(out.in_place());
  CHECK(memory[40] == std::byte{0xee});  // nor after it
  out.write("!", 1);  // one byte more: on in its own buffer, what was written copied
  CHECK_FALSE(out.in_place());
  CHECK(out.data() != memory.data() + 8);
  CHECK(out.size() == 33);
  CHECK(std::memcmp(out.data(), "abcdefghijklmnopqrstuvwxyz012345!", 33) == 0);
  CHECK(memory[40] == std::byte{0xee});

  // A copy or a release of a writer in place owns its bytes; a move takes the place.
  out.write_in_place(memory.data(), 16);
  out.write("xy", 2);
  writer copy = out;
  CHECK_FALSE(copy.in_place());
  CHECK(copy.data() != memory.data());
  CHECK(std::memcmp(copy.data(), "xy", 2) == 0);
  writer moved = std::move(out);
  CHECK(moved.in_place());
  CHECK(moved.data() == memory.data());
  CHECK(out.empty());
  CHECK_FALSE(out.in_place());
  auto bytes = moved.release();
  CHECK(bytes.size() == 2);
  CHECK(bytes.data() != memory.data());
  CHECK(std::memcmp(bytes.data(), "xy", 2) == 0);
  CHECK(moved.empty());
  CHECK_FALSE(moved.in_place());

  // Back to its own buffer, empty; a reserve beyond the place moves out of it.
  writer w(256);
  w.write_in_place(memory.data(), 16);
  w.write("ab", 2);
  w.write_in_own();
  CHECK_FALSE(w.in_place());
  CHECK(w.empty());
  CHECK(w.capacity() >= 256);
  w.write_in_place(memory.data(), 16);
  w.write("cd", 2);
  w.reserve(100);
  CHECK_FALSE(w.in_place());
  CHECK(std::memcmp(w.data(), "cd", 2) == 0);
  // Kept in its own buffer: the content copied, sized by the content, not the place.
  std::vector<std::byte> big(1 << 20);
  w.write_in_place(big.data(), big.size());
  w.write("fgh", 3);
  w.keep_in_own();
  CHECK_FALSE(w.in_place());
  CHECK(w.size() == 3);
  CHECK(std::memcmp(w.data(), "fgh", 3) == 0);
  CHECK(w.capacity() < big.size());
  w.keep_in_own();  // nothing changes out of place
  CHECK(w.size() == 3);
  // Zero bytes given: the first write moves out at once.
  w.write_in_place(memory.data(), 0);
  w.write("e", 1);
  CHECK_FALSE(w.in_place());
  CHECK(*w.data() == std::byte{'e'});
}

TEST_CASE(
    "a writer in place with no way out throws full, writes nothing past the memory, and "
    "goes on once cut back",
    "[codec]") {
  std::vector<std::byte> memory(64, std::byte{0xee});
  writer out;
  out.write_in_place(memory.data() + 8, 16, false);
  CHECK(out.bounded());
  CHECK(out.spare() == 16);
  out.write("0123456789", 10);
  CHECK(out.spare() == 6);
  CHECK_THROWS_AS(out.write("abcdefg", 7), writer::full);  // one byte too many
  CHECK(out.overflowed());
  CHECK(out.in_place());
  CHECK(out.size() == 10);  // nothing of it written
  CHECK(memory[24] == std::byte{0xee});
  // A string whose count fits and whose bytes do not: the count is there,
  // the writer says it overflowed.
  CHECK_THROWS_AS(encode(out, std::string(40, 'x')), writer::full);
  CHECK(out.overflowed());
  CHECK(memory[24] == std::byte{0xee});
  // `full` is no std::exception: an encoder catching those lets it through.
  bool through = false;
  try {
    try {
      out.prepare(100);
    } catch (const std::exception&) {
    }
  } catch (const writer::full&) {
    through = true;
  }
  CHECK(through);
  // Cut back, it takes what fits again.
  out.resize(10);
  CHECK_FALSE(out.overflowed());
  out.write("abcdef", 6);
  CHECK(out.size() == 16);
  CHECK(std::memcmp(memory.data() + 8, "0123456789abcdef", 16) == 0);
  out.clear();
  CHECK_FALSE(out.overflowed());
  CHECK(out.spare() == 16);
  // Let out, it goes on in its own buffer as an unbounded writer does.
  out.write("ab", 2);
  CHECK_THROWS_AS(out.write(memory.data(), 20), writer::full);
  out.resize(2);
  out.allow_spill();
  CHECK_FALSE(out.bounded());
  out.write("cdefghijklmnopqrstuvwxyz", 24);
  CHECK_FALSE(out.in_place());
  CHECK(std::memcmp(out.data(), "abcdefghijklmnopqrstuvwxyz", 26) == 0);
  // Kept in its own buffer on purpose: no throw, the content copied.
  out.write_in_place(memory.data(), 8, false);
  out.write("xyz", 3);
  out.keep_in_own();
  CHECK_FALSE(out.in_place());
  CHECK_FALSE(out.bounded());
  out.write("0123456789", 10);
  CHECK(std::memcmp(out.data(), "xyz0123456789", 13) == 0);
  // A move takes the bound along; the moved-from writer is unbounded.
  out.write_in_place(memory.data(), 8, false);
  writer moved = std::move(out);
  CHECK(moved.bounded());
  CHECK_FALSE(out.bounded());
  CHECK_THROWS_AS(moved.write(memory.data(), 9), writer::full);
  // Back to its own buffer: unbounded.
  moved.write_in_own();
  CHECK_FALSE(moved.bounded());
  CHECK_FALSE(moved.overflowed());
  moved.write(memory.data(), 40);
  CHECK(moved.size() == 40);
}

namespace {

/// A sink for a streaming writer: windows of at most `most` bytes (of
/// `piece` when less is wanted), each appended to `bytes` when done; a
/// window after `limit` bytes throws.
struct test_sink final : procpool::detail::writer_sink {
  std::size_t piece, most, limit;
  std::vector<std::byte> memory, bytes;
  int windows = 0, shorter = 0;
  test_sink(std::size_t p, std::size_t m, std::size_t l = ~std::size_t(0), bool count = false)
      : piece(p), most(m), limit(l) {
    counts_only = count;
  }
  std::pair<std::byte*, std::size_t> window(std::size_t want) override {
    if (bytes.size() >= limit) throw std::length_error("past the limit");
    ++windows;
    std::size_t n = std::min(std::max(want, piece), most);
    if (n < want) ++shorter;
    memory.assign(n, std::byte{0xee});
    return {memory.data(), n};
  }
  void done(std::size_t n) override {
    REQUIRE(n <= memory.size());
    if (!counts_only)
      bytes.insert(bytes.end(), memory.begin(), memory.begin() + static_cast<std::ptrdiff_t>(n));
  }
};

template <class T>
std::vector<std::byte> encoded(const T& value) {
  writer w;
  encode(w, value);
  return {w.data(), w.data() + w.size()};
}

}  // namespace

TEST_CASE(
    "a streaming writer writes a value longer than any memory it gets once, window by window, "
    "and a counting one sizes it",
    "[codec]") {
  using procpool::detail::writer_streams;
  std::vector<std::string> strings;
  for (int k = 0; k < 500; ++k)
    strings.push_back(std::string(std::size_t(k) * 7 % 400, 'a' + k % 26));
  const std::vector<double> doubles(5000, 1.25);  // one long write of 40000 bytes
  const std::vector<bool> bits(100000, true);     // one `prepare` of 12500 bytes
  auto check = [](const auto& value) {
    const auto want = encoded(value);
    // Sized: the same count, and long writes are not copied anywhere.
    writer sizer;
    test_sink counter(256, 1 << 20, ~std::size_t(0), true);
    writer_streams::start(sizer, counter);
    encode(sizer, value);
    CHECK(sizer.size() == want.size());
    CHECK(writer_streams::stop(sizer).first == want.size());
    CHECK(counter.memory.size() < 20000);  // (the bits' `prepare` is the largest)
    CHECK(counter.shorter == 0);
    // Streamed in windows of 512 bytes, at most 4096: the same bytes.
    writer stream;
    test_sink sink(512, 4096);
    writer_streams::start(stream, sink);
    encode(stream, value);
    CHECK(stream.size() == want.size());
    auto [written, last] = writer_streams::stop(stream);
    CHECK(written == want.size());
    CHECK(last <= 4096);
    CHECK(sink.bytes.size() == written - last);  // the last window waits for the caller
    sink.done(last);
    CHECK(sink.bytes == want);
    CHECK(sink.windows > static_cast<int>(want.size() / 4096));
    // Back to its own buffer, the writer writes as any writer.
    CHECK_FALSE(stream.in_place());
    CHECK(stream.size() == 0);
    stream.write("abc", 3);
    CHECK(stream.size() == 3);
    return sink.shorter;
  };
  CHECK(check(strings) == 0);
  CHECK(check(doubles) == 0);  // the long write goes window by window
  CHECK(check(bits) > 0);      // the long `prepare` is staged, then copied out window by window
  {
    // Counting, a long write copies nothing: a few windows for 40000 bytes.
    writer sizer;
    test_sink counter(256, 1 << 20, ~std::size_t(0), true);
    writer_streams::start(sizer, counter);
    encode(sizer, doubles);
    CHECK(writer_streams::stop(sizer).first == encoded(doubles).size());
    CHECK(counter.windows <= 2);
    CHECK(counter.memory.size() == 256);
  }
  SECTION("cut back within its window, and grown with zeros") {
    writer w;
    test_sink sink(16, 16);
    writer_streams::start(w, sink);
    w.write("0123456789abcdefXYZ", 19);  // a window went: 16 bytes
    CHECK(w.size() == 19);
    w.cut(17);
    w.resize(20);
    auto [written, last] = writer_streams::stop(w);
    CHECK(written == 20);
    sink.done(last);
    CHECK(std::memcmp(sink.bytes.data(), "0123456789abcdefX\0\0\0", 20) == 0);
  }
  SECTION("a sink that refuses more bytes stops the encoder, and the writer is given up") {
    writer w;
    test_sink sink(64, 64, 128);
    writer_streams::start(w, sink);
    CHECK_THROWS_AS(encode(w, strings), std::length_error);
    CHECK(sink.bytes.size() == 128);
    writer_streams::abandon(w);
    CHECK_FALSE(w.in_place());
    w.write("ok", 2);
    CHECK(w.size() == 2);
  }
}

TEST_CASE("a writer's copy holds its bytes, not its spare room, a moved-from one is empty",
          "[codec]") {
  writer big(1 << 20);
  big.write("abcdef", 6);
  writer copy = big;
  CHECK(copy.size() == 6);
  CHECK(copy.capacity() < big.capacity());  // 6 bytes copied, not a megabyte
  CHECK(std::memcmp(copy.data(), "abcdef", 6) == 0);
  writer assigned(64);
  assigned.write("zz", 2);
  assigned = big;
  CHECK(std::string(reinterpret_cast<const char*>(assigned.data()), assigned.size()) == "abcdef");
  writer& self = assigned;
  assigned = self;
  CHECK(assigned.size() == 6);

  writer moved = std::move(big);
  CHECK(moved.size() == 6);
  // NOLINTNEXTLINE(bugprone-use-after-move): a moved-from writer is empty, not stale
  CHECK(big.size() == 0);
  CHECK(big.capacity() == 0);
  big.write("x", 1);  // and usable
  CHECK(big.size() == 1);
  writer target(128);
  target.write("old", 3);
  target = std::move(moved);
  CHECK(target.size() == 6);
  CHECK(moved.size() == 0);
  CHECK(std::memcmp(target.data(), "abcdef", 6) == 0);
}

TEST_CASE("a warm writer and a reader allocate nothing per item", "[codec]") {
  writer out;
  for (int round = 0; round < 2; ++round) {
    out.clear();
    reset_allocation_stats();
    for (int i = 0; i < 1000; ++i) {
      encode(out, i);
      encode(out, vec3{1, 2, 3});
      encode(out, std::optional<double>(i));
      encode(out, std::string_view("short"));
    }
    if (round == 1) CHECK(allocation_count == 0);
  }
  reader in(out.data(), out.size());
  reset_allocation_stats();
  for (int i = 0; i < 1000; ++i) {
    CHECK(decode<int>(in) == i);
    decode<vec3>(in);
    decode<std::optional<double>>(in);
    decode<std::string>(in);  // short enough for the small string buffer
  }
  CHECK(allocation_count == 0);
  CHECK(in.at_end());
}

TEST_CASE("a reader checks every read", "[codec]") {
  const std::vector<std::byte> bytes = bytes_of({1, 2, 3, 4, 5});
  reader in(bytes);
  CHECK(in.size() == 5);
  CHECK(in.data() == bytes.data());
  CHECK(in.take(2) == bytes.data());
  CHECK(in.offset() == 2);
  CHECK(in.remaining() == 3);
  std::byte b[2];
  in.read(b, 2);
  CHECK(b[1] == std::byte{4});
  CHECK_THROWS_WITH(in.take(2), "decode error at byte 4: expected 2 bytes, 1 remain");
  CHECK_THROWS_WITH(in.take(9, "a header"),
                    "decode error at byte 4: expected 9 bytes for a header, 1 remain");
  CHECK(in.offset() == 4);
  in.take(1);
  CHECK(in.at_end());
  CHECK(in.empty_allowance() == reader::max_empty_elements);
  in.consume_empty(10);
  CHECK(in.empty_allowance() == reader::max_empty_elements - 10);
  CHECK_THROWS_AS(in.consume_empty(reader::max_empty_elements), decode_error);
  reader none;
  CHECK_THROWS_AS(decode<std::uint8_t>(none), decode_error);
}

namespace {

/// The kernel's transparent huge page mode: "always", "madvise" or "never"
/// (empty when it has none).
std::string thp_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all;
  std::getline(f, all);
  auto open = all.find('['), close = all.find(']');
  return open == std::string::npos || close == std::string::npos
             ? std::string()
             : all.substr(open + 1, close - open - 1);
}

/// KiB of huge pages backing the mapping that holds `p`, from /proc/self/smaps.
long huge_kib_at(const void* p) {
  auto at = reinterpret_cast<std::uintptr_t>(p);
  std::ifstream f("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(f, line)) {
    std::uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR, &lo, &hi) ==
        2) {  // a mapping's first line
      inside = lo <= at && at < hi;
      continue;
    }
    long kib = 0;
    if (inside && std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kib) == 1) return kib;
  }
  return 0;
}

/// How often the kernel wanted a huge page on a fault and fell back to small
/// ones (no huge page free, or none its memory cgroup allowed).
long thp_fallbacks() {
  std::ifstream f("/proc/vmstat");
  std::string name;
  long value = 0;
  long total = 0;
  while (f >> name >> value)
    if (name == "thp_fault_fallback" || name == "thp_fault_fallback_charge") total += value;
  return total;
}

}  // namespace

TEST_CASE("a big decoded array or string asks for huge pages", "[codec]") {
  std::string mode = thp_mode();
  if (mode != "madvise" && mode != "always") {
    WARN("transparent huge pages are '" << mode << "' here: nothing to ask for");
    return;
  }
  // In a child whose allocator maps every block of 1 MiB or more afresh (as
  // glibc does for a program's first big blocks): the test's earlier
  // allocations cannot hand the decode pages already backed.
  constexpr std::size_t big = std::size_t(8) << 20;
  pid_t child = procpool_test::spawn([&] {
#if defined(__GLIBC__) && !PROCPOOL_TEST_SANITIZED
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
    std::vector<char> bytes(big, 'x');
    std::string text(big, 'y');
    procpool::writer w;
    procpool::encode(w, bytes);
    procpool::encode(w, text);
    procpool::encode(w, std::vector<double>(big / 8, 1.5));
    long fallbacks = thp_fallbacks();
    procpool::reader r(w.data(), w.size());
    auto v = procpool::decode<std::vector<char>>(r);
    auto s = procpool::decode<std::string>(r);
    auto d = procpool::decode<std::vector<double>>(r);
    if (v != bytes || s != text || d != std::vector<double>(big / 8, 1.5)) return 2;
    // Each holds at least two aligned 2 MiB spans; the kernel backed them
    // with huge pages, or counted the fault it could not (memory too
    // fragmented). The middle is looked at: madvise splits the mapping,
    // and its first bytes stay unadvised.
    bool fell_back = thp_fallbacks() > fallbacks;
    for (const void* p : {static_cast<const void*>(v.data()), static_cast<const void*>(s.data()),
                          static_cast<const void*>(d.data())})
      if (huge_kib_at(static_cast<const char*>(p) + big / 2) < 2048 && !fell_back) return 1;
    return 0;
  });
  INFO("mode " << mode << "; exit code 1: not in huge pages, 2: decoded wrong, 97: threw");
  REQUIRE(procpool_test::reap(child) == procpool::exit_status::exited(0));
}

TEST_CASE("a valueless variant cannot be encoded", "[codec]") {
  std::variant<int, fragile> v;
  fragile f;
  try {
    v.emplace<1>(f);
  } catch (const std::runtime_error&) {
  }
  REQUIRE(v.valueless_by_exception());
  writer out;
  CHECK_THROWS_AS(encode(out, v), std::bad_variant_access);
  v = 7;
  CHECK(std::get<int>(round_trip(v)) == 7);
  reader nothing_left;
  CHECK_NOTHROW(decode<fragile>(nothing_left));
}

// ---------------------------------------------------------------------------
// The fuzz corpus, replayed through the fuzz target in every build.

namespace {

std::filesystem::path corpus_dir() {
  return std::filesystem::path(__FILE__).parent_path() / "fuzz" / "corpus" / "codec";
}

using procpool_test::read_file;

}  // namespace

TEST_CASE("the codec fuzz corpus replays cleanly", "[codec]") {
  const std::filesystem::path dir = corpus_dir();
  REQUIRE(std::filesystem::is_directory(dir));
  std::map<std::string, std::vector<std::byte>> expected;
  for (auto& [name, bytes] : codec_fuzz::seeds()) expected[name] = bytes;

  std::size_t files = 0;
  for (const auto& file : std::filesystem::directory_iterator(dir)) {
    INFO(file.path().filename().string());
    const std::vector<std::byte> bytes = read_file(file.path());
    const auto* data = reinterpret_cast<const std::uint8_t*>(bytes.data());
    CHECK(codec_fuzz::one_input(data, bytes.size()) == 0);
    ++files;
    // Seeds are valid encodings of today's wire format.
    auto seed = expected.find(file.path().filename().string());
    if (seed != expected.end()) {
      CHECK(codec_fuzz::accepts(data, bytes.size()));
      CHECK(seed->second == bytes);  // else regenerate: codec_test "[.generate-corpus]"
    }
  }
  CHECK(files >= expected.size());
}

TEST_CASE("write the codec fuzz seed corpus", "[.generate-corpus]") {
  const std::filesystem::path dir = corpus_dir();
  std::filesystem::create_directories(dir);
  for (auto& [name, bytes] : codec_fuzz::seeds()) {
    std::ofstream file(dir / name, std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<long>(bytes.size()));
    REQUIRE(file.good());
  }
}

// ---------------------------------------------------------------------------
// Unsendable types fail the build with a sentence, at the call of encode or
// decode, and with nothing else. The check compiles a small file with the
// compiler that built this test.

TEST_CASE("unsendable types fail to compile with a readable sentence", "[codec]") {
  const std::filesystem::path include =
      std::filesystem::path(__FILE__).parent_path().parent_path() / "include";
#if defined(__clang__)
  const std::string compiler = "clang++";
#else
  const std::string compiler = "g++";
#endif
  const std::string standard = __cplusplus > 201703L ? "-std=c++20" : "-std=c++17";
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("procpool-codec-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::filesystem::path source = dir / "unsendable.cpp";
  {
    std::ofstream out(source);
    out << R"(#include <procpool/codec.hpp>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>
struct holds_pointer { int n; std::vector<double*> values; };
union number { int i; float f; };
class opaque { public: explicit opaque(int v) : v_(v) {} private: int v_; };
enum unfixed { a, b };
struct encode_only { int n; };
struct with_reference { int n; const std::string& name; };
struct with_c_array { int id; double values[4]; };
struct base { int id; };
struct derived : base { std::string name; };
void procpool_encode(procpool::writer&, const encode_only&);
void check(procpool::writer& w, procpool::reader& r) {
  procpool::encode(w, 1);
  (void)procpool::decode<std::vector<int>>(r);
#ifndef ONLY_VALID
  int* p = nullptr;
  procpool::encode(w, p);
  procpool::encode(w, holds_pointer{});
  procpool::encode(w, std::function<void()>{});
  procpool::encode(w, std::make_unique<int>(1));
  procpool::encode(w, number{});
  procpool::encode(w, opaque(1));
  procpool::encode(w, "literal");
  (void)procpool::decode<const char*>(r);
  (void)procpool::decode<int&>(r);
  (void)procpool::decode<unfixed>(r);
  (void)procpool::decode<std::string_view>(r);
  (void)procpool::decode<encode_only>(r);
  (void)procpool::decode<with_reference>(r);
  procpool::encode(w, with_c_array{});
  (void)procpool::decode<std::vector<derived>>(r);
#endif
}
)";
  }
  const std::vector<std::string> sentences = {
      "procpool cannot send raw pointers: the address means nothing in another process.",
      "procpool cannot send functions or callable objects such as std::function",
      "procpool cannot send std::unique_ptr, std::shared_ptr or std::weak_ptr",
      "procpool cannot send unions: it cannot know which member is active.",
      "procpool does not know how to send this class",
      "procpool cannot send C arrays",
      "use std::array<T, N>",
      "procpool cannot send a struct with a base class field by field",
      "procpool cannot send a C string (char pointer)",
      "procpool cannot send references",
      "procpool cannot decode an enum without a fixed underlying type",
      "procpool cannot decode std::string_view",
      "this type defines procpool_encode but no procpool_decode",
  };
  // The pointer, reference and C array sentences come twice.
  const std::size_t expected_errors = 15;

  auto compile = [&](const std::string& flags, const std::string& log) {
    const std::string command = compiler + " " + standard + " -fsyntax-only " + flags + " -I'" +
                                include.string() + "' '" + source.string() + "' 2>'" +
                                (dir / log).string() + "'";
    const int status = std::system(command.c_str());
    std::stringstream text;
    text << std::ifstream(dir / log).rdbuf();
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1, text.str());
  };

  auto [valid_status, valid_log] = compile("-DONLY_VALID", "valid.log");
  INFO(valid_log);
  REQUIRE(valid_status == 0);  // the harness works: the failures below are the checks

  auto [status, log] = compile("", "errors.log");
  INFO(log);
  CHECK(status != 0);
  for (const std::string& sentence : sentences) CHECK_THAT(log, Catch::Contains(sentence));
  std::size_t errors = 0;
  std::istringstream lines(log);
  for (std::string line; std::getline(lines, line);)
    if (line.find("error:") != std::string::npos) ++errors;
  CHECK(errors == expected_errors);  // no cascade from deeper templates
  CHECK_THAT(log, !Catch::Contains("Boost.PFR"));
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------------------
// Speed of one small item: run by hand in a release build,
//   codec_test "[.bench]"

TEST_CASE("encoding and decoding an int takes a few nanoseconds", "[.bench]") {
  constexpr int n = 10000000;
  writer out(n * sizeof(int));
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) encode(out, i);
  auto middle = std::chrono::steady_clock::now();
  reader in(out.data(), out.size());
  long long sum = 0;
  for (int i = 0; i < n; ++i) sum += decode<int>(in);
  auto end = std::chrono::steady_clock::now();
  const double encode_ns = std::chrono::duration<double, std::nano>(middle - start).count() / n;
  const double decode_ns = std::chrono::duration<double, std::nano>(end - middle).count() / n;
  WARN("encode int: " << encode_ns << " ns, decode int: " << decode_ns << " ns (sum " << sum
                      << ")");
  CHECK(sum == static_cast<long long>(n) * (n - 1) / 2);
}

// ---------------------------------------------------------------------------
// A streamed reader: the bytes of a message come in pieces.

TEST_CASE("a streamed reader gives each read its bytes whatever the pieces", "[codec]") {
  std::vector<std::byte> bytes(1000);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::byte(i * 7 + 1);
  auto expect = [&](const std::byte* p, std::size_t at, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) REQUIRE(p[i] == bytes[at + i]);
  };
  for (std::size_t hold : {std::size_t(1), std::size_t(5), std::size_t(64), std::size_t(4096)}) {
    INFO("at most " << hold << " bytes at once");
    piece_source source(bytes.data(), bytes.size(), 3, hold);
    reader in(source, bytes.size());
    REQUIRE(in.remaining() == 1000);
    REQUIRE(in.at_hand() == 0);  // nothing asked for yet
    // More than the source holds at once, wanted whole: a copy, then the
    // rest of it read from that copy, and reads across its end.
    expect(in.take(100), 0, 100);
    expect(in.peek(10), 100, 10);
    REQUIRE(in.offset() == 100);
    expect(in.take(7), 100, 7);
    std::byte out[300];
    in.read(out, 300);
    expect(out, 107, 300);
    REQUIRE(in.offset() == 407);
    // Piece by piece: never more than asked, at least one byte each time.
    std::size_t at = 407;
    while (at < 900) {
      std::size_t n = 900 - at;
      const std::byte* p = in.take_some(n);
      REQUIRE(n >= 1);
      REQUIRE(n <= 900 - at);
      expect(p, at, n);
      at += n;
    }
    REQUIRE(in.remaining() == 100);
    // Asking for more than remains throws, naming the offset, and takes nothing.
    REQUIRE_THROWS_AS(in.take(101), decode_error);
    REQUIRE(in.offset() == 900);
    expect(in.take(100), 900, 100);
    REQUIRE(in.at_end());
    std::size_t none = 5;
    in.take_some(none);
    REQUIRE(none == 0);
  }
}

TEST_CASE("a streamed reader fetches big values in pieces, not byte by byte", "[codec]") {
  std::string big(100000, 'x');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  std::vector<std::uint8_t> blob(big.begin(), big.end());
  std::vector<double> numbers(5000);
  std::iota(numbers.begin(), numbers.end(), 0.5);
  writer out;
  encode(out, big);
  encode(out, blob);
  encode(out, numbers);
  // A ring of 4 KiB: each value arrives in pieces of what it holds, and
  // none is gathered first (the pieces asked for are about 4 KiB each).
  piece_source source(out.data(), out.size(), 4096, 4096);
  reader in(source, out.size());
  REQUIRE(decode<std::string>(in) == big);
  REQUIRE(decode<std::vector<std::uint8_t>>(in) == blob);
  REQUIRE(decode<std::vector<double>>(in) == numbers);
  REQUIRE(in.at_end());
  REQUIRE(source.pieces <= out.size() / 4096 + 8);
  REQUIRE(source.stage.empty());  // nothing was gathered whole
}

TEST_CASE("a streamed reader refuses a source that gives nothing or too much", "[codec]") {
  struct bad_source final : procpool::detail::reader_source {
    std::vector<std::byte> bytes;
    std::size_t give;  // bytes per piece, whatever is left of the message
    piece next(std::size_t from, std::size_t) override { return {bytes.data() + from, give}; }
  };
  std::vector<std::byte> encoded = encode(std::string(100, 'x'));
  SECTION("a piece of nothing is a decode_error, not a wait forever") {
    bad_source source;
    source.bytes = encoded;
    source.give = 0;
    reader in(source, encoded.size());
    REQUIRE_THROWS_AS(decode<std::string>(in), decode_error);
  }
  SECTION("bytes past the message's end are not read") {
    bad_source source;
    source.bytes = encoded;
    source.bytes.resize(encoded.size() + 64, std::byte{'y'});
    source.give = source.bytes.size();       // claims the trailing bytes too
    reader in(source, encoded.size() - 10);  // the message is cut before its end
    REQUIRE_THROWS_AS(decode<std::string>(in), decode_error);
    REQUIRE(in.at_hand() <= in.remaining());
  }
}
