// Touches every public template of procpool, so that compiling this file
// instantiates them: the "warnings" test compiles it (with every example) under
// the warnings users turn on, headers included with -I as a vendored copy is.
// It is compiled, never run.
#include <procpool/procpool.hpp>

#include <array>
#include <chrono>
#include <complex>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace public_api {

enum class color : std::uint8_t { red, green };
enum class flag : bool { off, on };

struct point {
  double x;
  double y;
};

// A struct with an optional field: vendored headers once gave pages of
// -Wconversion warnings for it.
struct reading {
  std::string sensor;
  std::optional<double> value;
  std::optional<point> where;
  std::vector<std::optional<std::int16_t>> history;
  color tint;
  flag state;
};

struct everything {
  bool b;
  char c;
  signed char sc;
  unsigned char uc;
  short s;
  unsigned short us;
  int i;
  unsigned u;
  long l;
  unsigned long ul;
  long long ll;
  unsigned long long ull;
  float f;
  double d;
  long double ld;
  wchar_t wc;
  char16_t c16;
  char32_t c32;
  std::string text;
  std::wstring wide;
  std::u16string text16;
  std::vector<int> numbers;
  std::vector<bool> bits;
  std::vector<std::string> words;
  std::array<point, 2> corners;
  // Not std::array<std::string, N>: g++ 12 crashes (an internal compiler error)
  // when Boost.PFR counts the fields of an aggregate holding one.
  std::deque<int> queue;
  std::list<std::string> list;
  std::map<std::string, int> map;
  std::multimap<int, int> multimap;
  std::unordered_map<int, std::string> hashed;
  std::unordered_multimap<int, int> hashed_multi;
  std::set<int> set;
  std::multiset<int> multiset;
  std::unordered_set<std::string> hashed_set;
  std::unordered_multiset<int> hashed_multiset;
  std::pair<int, std::string> pair;
  std::tuple<int, double, std::string> tuple;
  std::tuple<> nothing;
  std::optional<std::string> maybe;
  std::variant<std::monostate, int, std::string> either;
  std::complex<double> z;
  std::chrono::milliseconds span;
  std::chrono::system_clock::time_point when;
  std::filesystem::path path;
  reading nested;
};

// A class with private state, opted in through hidden friends.
class money {
 public:
  money(std::int64_t cents, std::string currency) : cents_(cents), currency_(std::move(currency)) {}

 private:
  friend void procpool_encode(procpool::writer& out, const money& m) {
    procpool::encode(out, m.cents_);
    procpool::encode(out, m.currency_);
  }
  friend money procpool_decode(procpool::reader& in, procpool::type_tag<money>) {
    auto cents = procpool::decode<std::int64_t>(in);
    return money(cents, procpool::decode<std::string>(in));
  }
  std::int64_t cents_;
  std::string currency_;
};

template <class T>
void round_trip(const T& value) {
  static_assert(procpool::is_sendable_v<T>);
  procpool::writer out;
  procpool::encode(out, value);
  procpool::reader in(out.data(), out.size());
  T copy = procpool::decode<T>(in);
  static_cast<void>(copy);
  std::vector<std::byte> bytes = procpool::encode(value);
  T again = procpool::decode<T>(bytes);
  static_cast<void>(again);
  T third = procpool::decode<T>(bytes.data(), bytes.size());
  static_cast<void>(third);
}

int square(int x) {
  return x * x;
}
int add(int a, int b) {
  return a + b;
}
void log_it(const std::string&) {}

void codec() {
  round_trip(everything{});
  round_trip(reading{});
  round_trip(money(1, "EUR"));
  round_trip(std::vector<reading>{});
  round_trip(std::map<std::string, std::vector<std::optional<reading>>>{});
  round_trip(std::vector<money>{});
  procpool::writer out(64);
  procpool::encode(out, std::string_view("view"));
  procpool::encode(out, std::vector<point>(3));
  out.reserve(128);
  out.resize(3);
  out.clear();
  std::vector<std::byte> released = out.release();
  procpool::writer reused(std::move(released));
  procpool::reader in(reused.data(), reused.size());
  static_cast<void>(in.remaining());
  static_cast<void>(in.at_end());
}

void pools() {
  procpool::pool_options options;
  options.workers = 2;
  options.chunk_size = 3;
  options.task_timeout = std::chrono::seconds(1);
#if __cplusplus > 201703L
  // Designated initializers must not warn under -Wextra (missing-field-initializers).
  procpool::pool_options designated{.workers = 2, .chunk_size = 10};
  procpool::pool_options one_field{.workers = 4};
  static_cast<void>(designated);
  static_cast<void>(one_field);
#endif
  procpool::pool p([](int x) { return x * 2; }, options);
  std::vector<int> items{1, 2, 3};
  std::vector<int> doubled = p.map(items);
  std::vector<int> from_list = p.map({1, 2, 3});
  std::array<int, 3> fixed{1, 2, 3};
  std::vector<int> from_array = p.map(fixed);
  for (int r : p.imap(items)) static_cast<void>(r);
  for (int r : p.imap(std::vector<int>{4, 5})) static_cast<void>(r);
  for (int r : p.imap({6, 7})) static_cast<void>(r);
  for (auto& [index, r] : p.imap_unordered(items)) static_cast<void>(index + std::size_t(r));
  for (auto& [index, r] : p.imap_unordered({1, 2})) static_cast<void>(index + std::size_t(r));
  procpool::future<int> f = p.submit(4);
  static_cast<void>(f.ready());
  static_cast<void>(f.wait_for(std::chrono::milliseconds(1)));
  static_cast<void>(f.get_for(std::chrono::microseconds(1)));
  static_cast<void>(f.get());
  static_cast<void>(f.valid());
  static_cast<void>(p.workers());
  static_cast<void>(p.pids());

  procpool::pool pairs([](int a, const std::string& b) { return b.size() + std::size_t(a); });
  std::vector<std::pair<int, std::string>> args{{1, "a"}};
  std::vector<std::size_t> sizes = pairs.starmap(args);
  std::vector<std::size_t> sizes2 = pairs.starmap({std::tuple<int, std::string>(1, "b")});
  auto g = pairs.submit(1, std::string("x"));
  static_cast<void>(g.get());

  procpool::pool quiet([](const reading& r) { log_it(r.sensor); });
  quiet.map(std::vector<reading>(2));
  procpool::future<void> done = quiet.submit(reading{});
  done.get();

  procpool::pool lists([](const std::vector<int>& v) { return v.size(); });
  auto from_braced = lists.submit({1, 2, 3});
  static_cast<void>(from_braced.get());

  procpool::executor ex(2);
  auto e1 = ex.submit(&square, 3);
  auto e2 = ex.submit(&add, 1, 2);
  auto e3 = ex.submit([](int x) { return x + 1; }, 1);
  static_cast<void>(e1.get() + e2.get() + e3.get());
  std::vector<int> squares = ex.map(&square, items);
  std::vector<int> squares2 = ex.map(&square, {1, 2, 3});
  static_cast<void>(doubled.size() + from_list.size() + from_array.size() + sizes.size() +
                    sizes2.size() + squares.size() + squares2.size());
  ex.close();
  ex.join();
  p.close();
  p.join();
  p.terminate();
}

// The timed members of the locks (try_lock_for, try_lock_until) and waits
// until a system_clock time are left out until they compile with
// procpool.hpp included (two deadline helpers clash).
template <class Lock>
void lock(Lock& m) {
  static_cast<void>(m.try_lock());
  std::lock_guard<Lock> guard(m);
  static_cast<void>(m.owner_died());
}

void sharing() {
  using namespace std::chrono;
  procpool::mutex m;
  lock(m);
  procpool::recursive_mutex rm;
  lock(rm);
  procpool::semaphore sem(1);
  static_cast<void>(sem.try_acquire_for(milliseconds(1)));
  static_cast<void>(sem.try_acquire_until(steady_clock::now()));
  sem.release();
  procpool::event ev;
  static_cast<void>(ev.wait_for(microseconds(1)));
  static_cast<void>(ev.wait_until(steady_clock::now()));
  procpool::barrier bar(1);
  static_cast<void>(bar.arrive_and_wait_for(seconds(1)));
  static_cast<void>(bar.arrive_and_wait_until(steady_clock::now()));

  procpool::shared_value<long> counter;
  counter.store(counter.load() + 1);
  static_cast<void>(counter.fetch_add(1));
  static_cast<void>(counter.with([](long& n) { return ++n; }));
  procpool::shared_value<point> where(point{1, 2});
  static_cast<void>(where.exchange(point{3, 4}));
  procpool::shared_array<double> values(8, 0.5);
  for (double& d : values) d += 1;
  procpool::shared_array<point> points(4);
  static_cast<void>(points[0].x);

  procpool::queue<reading> q;
  q.push(reading{});
  static_cast<void>(q.try_push(reading{}));
  static_cast<void>(q.push_for(reading{}, milliseconds(1)));
  static_cast<void>(q.push_until(reading{}, steady_clock::now()));
  static_cast<void>(q.pop());
  static_cast<void>(q.try_pop());
  static_cast<void>(q.pop_for(duration<double>(0.1)));
  static_cast<void>(q.pop_until(steady_clock::now()));
  q.close();

  auto [a, b] = procpool::pipe<std::vector<double>>();
  a.send({1.0, 2.0});
  static_cast<void>(b.recv());
  static_cast<void>(b.try_recv());
  static_cast<void>(b.recv_for(milliseconds(1)));
  static_cast<void>(b.recv_until(steady_clock::now()));
  static_cast<void>(b.poll());
  static_cast<void>(b.poll(microseconds(5)));
  auto [c, d] = procpool::pipe<money>(4096);
  c.send(money(5, "USD"));
  static_cast<void>(d.recv());

  procpool::process child([](int n) { static_cast<void>(n); }, 3);
  static_cast<void>(child.join_for(milliseconds(10)));
  static_cast<void>(child.alive());
  procpool::exit_status status = child.join();
  static_cast<void>(status.to_string());
  static_cast<void>(fmt::format("{}", status));
  static_cast<void>(procpool::cpu_count());
  static_cast<void>(procpool::current_process());
}

}  // namespace public_api
