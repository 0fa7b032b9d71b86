// The dispatcher both engines share (detail/dispatch/dispatcher.hpp): how
// chunks are cut from calls in turn, what becomes of chunks whose call is
// over, how every field of an answer is checked before a byte of it is
// decoded, and how stopping ends every call. Driven directly, without
// workers or ranks, so each rule is seen alone; the engines' own tests
// (pool_hostile_test, tests/mpi) show the same rules end to end.
#include <procpool/detail/calls/map_calls.hpp>
#include <procpool/detail/dispatch/chunk_queue.hpp>
#include <procpool/detail/dispatch/dispatcher.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "support/support.hpp"

namespace pd = procpool::detail;

namespace {

/// A call of `n` items, one int each, cut `per_chunk` at a time, whose
/// results are ints; `window` chunks at most unanswered.
class test_call final : public pd::call_state {
 public:
  test_call(std::size_t n, std::size_t per_chunk, std::size_t window = 1000)
      : n_(n), per_chunk_(per_chunk), window_(window) {}

  bool next_chunk(procpool::writer& out, pd::frame_refs*, std::size_t max_count,
                  std::uint64_t& first, std::uint32_t& count, std::uint64_t& handler) override {
    if (throw_on_cut) throw std::runtime_error("the input's iterator broke");
    if (next_ >= n_) {
      input_done = true;
      return false;
    }
    if (in_flight >= window_) return false;
    std::size_t k = std::min({per_chunk_, max_count, n_ - next_});
    for (std::size_t i = 0; i < k; ++i) procpool::encode(out, int(next_ + i));
    first = next_;
    count = static_cast<std::uint32_t>(k);
    handler = 42;
    next_ += k;
    if (next_ >= n_) input_done = true;
    return true;
  }
  void on_results(std::uint64_t first, std::uint32_t count, procpool::reader& in) override {
    for (std::uint32_t k = 0; k < count; ++k)
      results.emplace_back(first + k, procpool::decode<int>(in));
  }
  bool is_range() const noexcept override { return range; }

  std::vector<std::pair<std::uint64_t, int>> results;
  bool throw_on_cut = false;
  bool range = false;

 private:
  std::size_t n_, per_chunk_, window_, next_ = 0;
};

/// An answer to chunk `c`: a header and a body.
struct answer {
  pd::result_header h;
  procpool::writer body;
};

answer honest(const pd::chunk& c) {
  answer a{pd::result_header{c.call_id, c.first, c.count, pd::frame_kind::results}, {}};
  for (std::uint32_t k = 0; k < c.count; ++k) procpool::encode(a.body, int(c.first + k) * 10);
  return a;
}

std::exception_ptr failure(std::uint64_t index, std::string type, std::string message,
                           procpool::reader&) {
  return std::make_exception_ptr(
      procpool::task_error(index, 1, std::move(type), std::move(message)));
}

std::exception_ptr lie(const std::string& why) {
  return std::make_exception_ptr(procpool::error("lie: " + why));
}

pd::delivery deliver(pd::chunk& c, answer& a) {
  procpool::reader in(a.body.data(), a.body.size());
  return pd::dispatcher::deliver(c, a.h, in, failure, lie);
}

/// A call of `n` items, `per_chunk` a chunk, started on `d`; and its first chunk.
std::pair<std::shared_ptr<test_call>, pd::chunk> first_chunk(pd::dispatcher& d, std::size_t n,
                                                             std::size_t per_chunk) {
  auto call = std::make_shared<test_call>(n, per_chunk);
  d.start(call);
  pd::chunk c;
  REQUIRE(d.next_chunk(c));
  return {call, std::move(c)};
}

std::string what_of(const pd::call_state& call) {
  try {
    call.rethrow_if_failed();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("chunks are cut from the queued calls in turn, a full window lets the next go",
          "[dispatcher]") {
  pd::dispatcher d;
  auto a = std::make_shared<test_call>(10, 2, /*window=*/1);
  auto b = std::make_shared<test_call>(10, 3);
  d.start(a);
  d.start(b);
  CHECK(a->id != b->id);
  pd::chunk c1, c2, c3;
  REQUIRE(d.next_chunk(c1));
  CHECK(c1.call == a);
  CHECK(c1.count == 2);
  // a's window is full: b goes next, though a was first in the queue.
  REQUIRE(d.next_chunk(c2));
  CHECK(c2.call == b);
  REQUIRE(d.next_chunk(c3));
  CHECK(c3.call == b);
  CHECK(c3.first == 3);
  CHECK(a->in_flight == 1);
  CHECK(b->in_flight == 2);
  // The frame: a task header naming the call, then the items.
  pd::task_header h;
  REQUIRE(c2.bytes.size() == sizeof h + 3 * sizeof(int));
  std::memcpy(&h, c2.bytes.data(), sizeof h);
  CHECK(h.kind == pd::frame_kind::task);
  CHECK(h.call == b->id);
  CHECK(h.count == 3);
  CHECK(h.handler == 42);
}

TEST_CASE("a length prefix is written before the header when asked", "[dispatcher]") {
  pd::dispatcher d(sizeof(std::uint64_t));
  auto [a, c] = first_chunk(d, 1, 1);
  std::uint64_t size = 0;
  std::memcpy(&size, c.bytes.data(), sizeof size);
  CHECK(size == c.bytes.size() - sizeof size);
}

TEST_CASE("an exception that escapes cutting a call ends that call alone", "[dispatcher]") {
  pd::dispatcher d;
  auto bad = std::make_shared<test_call>(5, 1);
  auto good = std::make_shared<test_call>(5, 5);
  bad->throw_on_cut = true;
  d.start(bad);
  d.start(good);
  pd::chunk c;
  REQUIRE(d.next_chunk(c));
  CHECK(c.call == good);
  CHECK(bad->finished());
  CHECK(what_of(*bad) == "the input's iterator broke");
  // Never asked again.
  bad->throw_on_cut = false;
  CHECK_FALSE(d.next_chunk(c));
}

TEST_CASE("a chunk sent again after its call is over is dropped, and counted out", "[dispatcher]") {
  pd::dispatcher d;
  auto [a, c] = first_chunk(d, 4, 2);
  d.resend(c);
  ++a->in_flight;  // the copy, as the engines count it
  a->cancelled = true;
  pd::chunk next;
  CHECK_FALSE(d.next_chunk(next));
  CHECK(a->in_flight == 1);  // the original, still out
  d.settle(c);
  CHECK(a->finished());
}

TEST_CASE("items before a call's failing item still run, those after it do not", "[dispatcher]") {
  pd::chunk before, after;
  auto a = std::make_shared<test_call>(10, 2);
  before.call = after.call = a;
  before.first = 2;
  after.first = 6;
  a->fail(4, std::make_exception_ptr(std::runtime_error("item 4")));
  CHECK(pd::dispatcher::still_needed(before));
  CHECK_FALSE(pd::dispatcher::still_needed(after));
}

TEST_CASE("every field of an answer is checked against its chunk", "[dispatcher]") {
  pd::dispatcher d;
  auto [a, c] = first_chunk(d, 4, 4);
  auto h = pd::result_header{c.call_id, c.first, c.count, pd::frame_kind::results};
  std::size_t size = sizeof h + 4 * sizeof(int);
  CHECK(pd::dispatcher::check_answer(c, h, size).empty());

  auto bad = h;
  bad.call += 1;
  CHECK_THAT(pd::dispatcher::check_answer(c, bad, size), Catch::Contains("for call"));
  bad = h;
  bad.first = 1;
  CHECK_THAT(pd::dispatcher::check_answer(c, bad, size), Catch::Contains("from item 1"));
  bad = h;
  bad.count = 3;  // a whole chunk's results, or an error/skip before the end
  CHECK_THAT(pd::dispatcher::check_answer(c, bad, size), Catch::Contains("3 results"));
  bad = h;
  bad.kind = pd::frame_kind::skipped;  // skipped with every result is a lie
  CHECK_FALSE(pd::dispatcher::check_answer(c, bad, size).empty());
  bad.count = 2;
  CHECK(pd::dispatcher::check_answer(c, bad, size).empty());
  bad = h;
  bad.kind = static_cast<pd::frame_kind>(77);
  CHECK_THAT(pd::dispatcher::check_answer(c, bad, size), Catch::Contains("kind 77"));
}

TEST_CASE("an honest answer reaches its call, a cancelled call takes nothing", "[dispatcher]") {
  pd::dispatcher d;
  auto [a, c] = first_chunk(d, 3, 3);
  auto ans = honest(c);
  auto r = deliver(c, ans);
  CHECK(r.lie.empty());
  CHECK_FALSE(r.failed_now);
  REQUIRE(a->results.size() == 3);
  CHECK(a->results[2].second == 20);

  auto [b, cb] = first_chunk(d, 3, 3);
  b->cancelled = true;
  auto ansb = honest(cb);
  CHECK(deliver(cb, ansb).lie.empty());
  CHECK(b->results.empty());
}

TEST_CASE("an error answer fails its call at the item it names", "[dispatcher]") {
  pd::dispatcher d;
  auto [a, c] = first_chunk(d, 4, 4);
  answer ans{pd::result_header{c.call_id, 0, 2, pd::frame_kind::error}, {}};
  procpool::encode(ans.body, 0);
  procpool::encode(ans.body, 10);
  procpool::encode(ans.body, std::uint64_t(2));
  procpool::encode(ans.body, std::string("std::runtime_error"));
  procpool::encode(ans.body, std::string("boom"));
  auto r = deliver(c, ans);
  CHECK(r.lie.empty());
  CHECK(r.failed_now);
  CHECK(a->results.size() == 2);
  CHECK(a->error_index() == 2);
  CHECK_THAT(what_of(*a), Catch::Contains("boom"));
}

TEST_CASE("answers that cannot be true are named and fail their call", "[dispatcher]") {
  pd::dispatcher d;
  SECTION("an error for an item other than the one after the results") {
    auto [a, c] = first_chunk(d, 4, 4);
    answer ans{pd::result_header{c.call_id, 0, 1, pd::frame_kind::error}, {}};
    procpool::encode(ans.body, 0);
    procpool::encode(ans.body, std::uint64_t(3));  // item 1 is the one after the results
    procpool::encode(ans.body, std::string("t"));
    procpool::encode(ans.body, std::string("m"));
    auto r = deliver(c, ans);
    CHECK_THAT(r.lie, Catch::Contains("an error for item 3 after results up to item 1"));
    CHECK(a->error_index() == 0);
    CHECK_THAT(what_of(*a), Catch::StartsWith("lie: "));
  }
  SECTION("an error with no results for an item other than the chunk's first") {
    auto [a, c] = first_chunk(d, 4, 4);
    answer ans{pd::result_header{c.call_id, 0, 0, pd::frame_kind::error}, {}};
    procpool::encode(ans.body, std::uint64_t(9));
    auto r = deliver(c, ans);
    CHECK_THAT(r.lie, Catch::Contains("an error for item 9 in a chunk from item 0"));
  }
  SECTION("an error past the results is a lie unless gaps are allowed, and never past the chunk") {
    for (bool gaps : {false, true}) {
      auto [a, c] = first_chunk(d, 6, 6);
      answer ans{pd::result_header{c.call_id, 0, 1, pd::frame_kind::error}, {}};
      procpool::encode(ans.body, 0);
      procpool::encode(ans.body, std::uint64_t(4));  // items 1 to 3 ran; their results were lost
      procpool::encode(ans.body, std::string("procpool::worker_died"));
      procpool::encode(ans.body, std::string("signal 9"));
      procpool::reader in(ans.body.data(), ans.body.size());
      auto r = pd::dispatcher::deliver(c, ans.h, in, failure, lie, gaps);
      CHECK(r.lie.empty() == gaps);
      CHECK(a->error_index() == (gaps ? 4u : 0u));

      auto [b, cb] = first_chunk(d, 6, 6);
      answer past{pd::result_header{cb.call_id, cb.first, 0, pd::frame_kind::error}, {}};
      procpool::encode(past.body, cb.first + 6);  // beyond the chunk: never true
      procpool::reader in2(past.body.data(), past.body.size());
      CHECK_FALSE(pd::dispatcher::deliver(cb, past.h, in2, failure, lie, gaps).lie.empty());
    }
  }
  SECTION("bytes past the end of the answer") {
    auto [a, c] = first_chunk(d, 2, 2);
    auto ans = honest(c);
    procpool::encode(ans.body, std::uint64_t(12345));
    auto r = deliver(c, ans);
    CHECK_THAT(r.lie, Catch::Contains("8 bytes past the end"));
    CHECK(a->failed());
  }
  SECTION("results that do not decode fail the call with a decode_error, not a lie") {
    auto [a, c] = first_chunk(d, 2, 2);
    answer ans{pd::result_header{c.call_id, 0, 2, pd::frame_kind::results}, {}};
    procpool::encode(ans.body, 1);  // one int where two were promised
    auto r = deliver(c, ans);
    CHECK(r.lie.empty());
    CHECK(r.failed_now);
    CHECK_THROWS_AS(a->rethrow_if_failed(), procpool::decode_error);
  }
}

TEST_CASE("join ends the open ranges, stopping ends every pending call", "[dispatcher]") {
  pd::dispatcher d;
  auto range = std::make_shared<test_call>(10, 1);
  range->range = true;
  auto plain = std::make_shared<test_call>(10, 1);
  d.start(range);
  d.start(plain);
  pd::chunk c;
  REQUIRE(d.next_chunk(c));
  std::vector<pd::call_state*> told;
  d.end_calls(true, std::make_exception_ptr(procpool::pool_closed("join")),
              [&](pd::call_state& call) { told.push_back(&call); });
  CHECK(range->aborted());
  CHECK_FALSE(plain->aborted());
  REQUIRE(told.size() == 1);
  CHECK(told[0] == range.get());
  CHECK(d.work_queued());
  d.stop(std::make_exception_ptr(procpool::pool_closed("terminate")));
  CHECK(plain->aborted());
  CHECK_THROWS_AS(plain->rethrow_if_failed(), procpool::pool_closed);
  CHECK_FALSE(d.work_queued());
}

// ---------------------------------------------------------------------------
// run_items: what a worker does with a chunk. Items whose encoding is their
// bytes (std::int64_t) take a loop of their own; the same cases run over
// items that are encoded one by one (std::string), and must come out alike.

namespace {

/// Plain bytes, but with an encoding of its own (the value shifted by
/// 1000): the worker's loop for plain items must not copy it as bytes.
struct shifted {
  std::int64_t v = 0;
  friend void procpool_encode(procpool::writer& out, const shifted& n) {
    procpool::encode(out, n.v + 1000);
  }
  friend shifted procpool_decode(procpool::reader& in, procpool::type_tag<shifted>) {
    return shifted{procpool::decode<std::int64_t>(in) - 1000};
  }
};
static_assert(std::is_trivially_copyable_v<shifted>);
static_assert(!pd::is_trivially_sendable_v<shifted>);

int value_of(std::int64_t v) {
  return static_cast<int>(v);
}
int value_of(const std::string& s) {
  return std::stoi(s);
}
int value_of(const shifted& n) {
  return static_cast<int>(n.v);
}
template <class T>
T item_of(int v) {
  if constexpr (std::is_same_v<T, std::string>)
    return std::to_string(v);
  else if constexpr (std::is_same_v<T, shifted>)
    return shifted{v};
  else
    return T(v);
}

/// Doubles its item; throws at the item whose value is `throw_at`.
struct doubler {
  int throw_at = -1;
  template <class T>
  T operator()(const T& x) const {
    int v = value_of(x);
    if (v == throw_at) throw std::out_of_range("no double for " + std::to_string(v));
    return item_of<T>(2 * v);
  }
};

/// What run_items answered: its header, its results, the failure it encoded.
struct ran {
  pd::result_header h{};
  std::vector<int> results;
  std::uint64_t failed_at = 0;
  std::string type, message;
  std::vector<std::uint64_t> seen;  // the indices `before` was asked about
};

/// Runs a chunk of `count` items from item 100 of call 7, whose frame holds
/// `values` (and `junk` bytes after them); `before` refuses `stop_at`.
template <class T>
ran run_chunk_of(const std::vector<int>& values, std::uint32_t count, doubler f,
                 std::uint64_t stop_at = ~std::uint64_t(0), std::size_t junk = 0) {
  procpool::writer frame;
  for (int v : values) procpool::encode(frame, item_of<T>(v));
  for (std::size_t i = 0; i < junk; ++i) procpool::encode(frame, std::uint8_t(0xAB));
  procpool::reader in(frame.data(), frame.size());
  procpool::writer out;
  out.write("head", 4);  // what the caller put before the results
  ran r;
  r.h = pd::run_items<T, pd::invoke_one>(f, in, 7, 100, count, out, [&](std::uint64_t i) {
    r.seen.push_back(i);
    return i != stop_at;
  });
  procpool::reader back(out.data() + 4, out.size() - 4);
  REQUIRE(std::memcmp(out.data(), "head", 4) == 0);
  for (std::uint32_t k = 0; k < r.h.count; ++k)
    r.results.push_back(value_of(procpool::decode<T>(back)));
  if (r.h.kind == pd::frame_kind::error) {
    r.failed_at = procpool::decode<std::uint64_t>(back);
    r.type = procpool::decode<std::string>(back);
    r.message = procpool::decode<std::string>(back);
    pd::decode_original(back);
  }
  CHECK(back.at_end());
  CHECK(r.h.call == 7);
  CHECK(r.h.first == 100);
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("a chunk's items run in order and their results follow the header",
                   "[dispatcher][run_items]", std::int64_t, std::string, shifted) {
  auto r = run_chunk_of<TestType>({0, 1, 2, 3, 4}, 5, doubler{});
  CHECK(r.h.kind == pd::frame_kind::results);
  CHECK(r.h.count == 5);
  CHECK(r.results == std::vector<int>{0, 2, 4, 6, 8});
  CHECK(r.seen == std::vector<std::uint64_t>{100, 101, 102, 103, 104});
}

TEMPLATE_TEST_CASE("an item that throws ends its chunk and keeps the results before it",
                   "[dispatcher][run_items]", std::int64_t, std::string, shifted) {
  for (int at = 0; at < 5; ++at) {
    auto r = run_chunk_of<TestType>({0, 1, 2, 3, 4}, 5, doubler{at});
    CHECK(r.h.kind == pd::frame_kind::error);
    CHECK(r.h.count == std::uint32_t(at));
    CHECK(r.results.size() == std::size_t(at));
    CHECK(r.failed_at == std::uint64_t(100 + at));
    CHECK(r.type == "std::out_of_range");
    CHECK(r.message == "no double for " + std::to_string(at));
    CHECK(r.seen.size() == std::size_t(at + 1));  // nothing asked after the failure
  }
}

TEMPLATE_TEST_CASE("a cancelled item stops its chunk with the results before it",
                   "[dispatcher][run_items]", std::int64_t, std::string, shifted) {
  for (std::uint64_t at = 100; at < 105; ++at) {
    auto r = run_chunk_of<TestType>({0, 1, 2, 3, 4}, 5, doubler{}, at);
    CHECK(r.h.kind == pd::frame_kind::skipped);
    CHECK(r.h.count == at - 100);
    CHECK(r.results.size() == at - 100);
    CHECK(r.seen.back() == at);
  }
}

TEMPLATE_TEST_CASE("a frame that claims more items than it holds fails at the first one missing",
                   "[dispatcher][run_items]", std::int64_t, std::string, shifted) {
  // Three whole items, then three bytes of a fourth, where five were claimed.
  auto r = run_chunk_of<TestType>({5, 6, 7}, 5, doubler{}, ~std::uint64_t(0), 3);
  CHECK(r.h.kind == pd::frame_kind::error);
  CHECK(r.h.count == 3);
  CHECK(r.results == std::vector<int>{10, 12, 14});
  CHECK(r.failed_at == 103);
  CHECK(r.type == "procpool::decode_error");
  // A frame with no item at all, where one was claimed.
  auto none = run_chunk_of<TestType>({}, 1, doubler{});
  CHECK(none.h.kind == pd::frame_kind::error);
  CHECK(none.h.count == 0);
  CHECK(none.failed_at == 100);
}

namespace {

constexpr std::size_t block_edge = pd::frame_refs::min_bytes;

/// A result of `n` elements made from `n`: strings or arrays of doubles.
template <class R>
R sized(std::size_t n) {
  R r(n, typename R::value_type{});
  for (std::size_t i = 0; i < n; ++i)
    r[i] = static_cast<typename R::value_type>('a' + (i + n) % 26);
  return r;
}

/// Returns `sized<R>(n)` by value; throws at the item `throw_at`.
template <class R>
struct make_sized {
  std::size_t throw_at = ~std::size_t(0);
  R operator()(std::uint64_t n) const {
    if (n == throw_at) throw std::length_error("no result of " + std::to_string(n));
    return sized<R>(n);
  }
};

/// The frame run_items makes of `sizes` with `f`, once copied whole into
/// its own bytes and once with big results left as blocks, assembled.
struct both_frames {
  pd::result_header plain_h{}, blocks_h{};
  std::vector<std::byte> plain, assembled;
  std::size_t own = 0;     // the blocks frame's own bytes
  std::size_t listed = 0;  // its blocks
  bool own_holds_a_block = false;
};

template <class F>
both_frames run_both(const std::vector<std::uint64_t>& sizes, F f,
                     std::uint64_t stop_at = ~std::uint64_t(0)) {
  procpool::writer frame;
  for (auto n : sizes) procpool::encode(frame, n);
  auto count = static_cast<std::uint32_t>(sizes.size());
  auto before = [&](std::uint64_t i) { return i != stop_at; };
  both_frames b;
  {
    procpool::reader in(frame.data(), frame.size());
    procpool::writer out;
    out.write("head", 4);
    b.plain_h = pd::run_items<std::uint64_t, pd::invoke_one>(f, in, 7, 100, count, out, before);
    b.plain.assign(out.data(), out.data() + out.size());
  }
  procpool::reader in(frame.data(), frame.size());
  // Written in place at first, as a worker writes into its result ring.
  std::vector<std::byte> room(64);
  procpool::writer out;
  out.write_in_place(room.data(), room.size());
  out.write("head", 4);
  pd::answer_blocks blocks;
  b.blocks_h =
      pd::run_items<std::uint64_t, pd::invoke_one>(f, in, 7, 100, count, out, before, &blocks);
  REQUIRE(std::memcmp(out.data(), "head", 4) == 0);
  b.own = out.size();
  b.listed = blocks.refs().count;
  if (b.listed > 0) CHECK_FALSE(out.in_place());  // blocks go between its bytes: not in the ring
  for (const auto& r : blocks.refs()) {
    CHECK(r.size >= block_edge);
    // Where the function's value is, not in the answer's own bytes.
    if (r.data >= out.data() && r.data < out.data() + out.size()) b.own_holds_a_block = true;
  }
  std::size_t total = out.size() + blocks.refs().bytes;
  pd::copy_frame_out(out.data(), out.size(), blocks.refs(), 0, total,
                     [&](const std::byte* data, std::size_t n) {
                       b.assembled.insert(b.assembled.end(), data, data + n);
                     });
  // From any offset, in pieces of any size: the same bytes.
  for (std::size_t from : {std::size_t(1), std::size_t(4), total / 3, total - 1}) {
    if (from >= total) continue;
    std::vector<std::byte> tail;
    pd::copy_frame_out(
        out.data(), out.size(), blocks.refs(), from, total - from,
        [&](const std::byte* data, std::size_t n) { tail.insert(tail.end(), data, data + n); });
    CHECK(std::equal(tail.begin(), tail.end(), b.assembled.begin() + std::ptrdiff_t(from),
                     b.assembled.end()));
  }
  return b;
}

}  // namespace

TEMPLATE_TEST_CASE(
    "big results returned by value go out from the values, and the answer is byte for byte the "
    "copied one",
    "[dispatcher][run_items]", std::string, std::vector<double>) {
  using R = TestType;
  constexpr std::uint64_t e = block_edge / sizeof(typename R::value_type);
  make_sized<R> f;

  SECTION("small, edge and big results mixed, more big ones than a chunk lists") {
    std::vector<std::uint64_t> sizes{3, e - 1, e, 0, 5 * e, e + 1, 1, 2 * e, 7 * e, e, 4};
    auto b = run_both(sizes, f);
    CHECK(b.plain_h.kind == pd::frame_kind::results);
    CHECK(b.blocks_h.count == sizes.size());
    CHECK(b.listed == pd::frame_refs::capacity);
    CHECK_FALSE(b.own_holds_a_block);
    CHECK(b.assembled == b.plain);
    // The four listed (e, 5e, e+1, 2e) are not in the own bytes.
    CHECK(b.own + (e + 5 * e + e + 1 + 2 * e) * sizeof(typename R::value_type) == b.plain.size());
  }
  SECTION("an item that throws after blocks: the error follows them, the failing result is cut") {
    make_sized<R> failing{3 * e};
    auto b = run_both({2 * e, 1, e, 3 * e, 4}, failing);
    CHECK(b.blocks_h.kind == pd::frame_kind::error);
    CHECK(b.blocks_h.count == 3);
    CHECK(b.listed == 2);
    CHECK(b.assembled == b.plain);
  }
  SECTION("a cancelled chunk after blocks") {
    auto b = run_both({2 * e, 1, e, 3 * e}, f, 102);
    CHECK(b.blocks_h.kind == pd::frame_kind::skipped);
    CHECK(b.blocks_h.count == 2);
    CHECK(b.listed == 1);
    CHECK(b.assembled == b.plain);
  }
  SECTION("no big result: nothing listed, the answer stays in place") {
    auto b = run_both({1, 2, e - 1}, f);
    CHECK(b.listed == 0);
    CHECK(b.assembled == b.plain);
  }
  SECTION("a result returned by reference is copied: its value may not outlive the call") {
    static const R kept = sized<R>(3 * e);
    auto by_ref = [](std::uint64_t) -> const R& { return kept; };
    auto b = run_both({1, 2}, by_ref);
    CHECK(b.listed == 0);
    CHECK(b.assembled == b.plain);
  }
}

namespace {

/// Plays a worker's result ring for `run_items`: `out` writes in place with
/// no way out; each part sent is kept, and `out` starts again with `room`
/// bytes, or with `most` when more room is asked for.
struct kept_parts final : pd::answer_parts {
  std::size_t room, most;
  std::vector<std::byte> memory;
  std::vector<std::vector<std::byte>> sent;
  int more_asked = 0;
  int alone = 0;          // results sent alone (longer than `most`)
  bool answered = false;  // the last went alone: the chunk's answer with it
  int staged = 0;         // windows shorter than a `prepare` wanted
  kept_parts(std::size_t r, std::size_t m) : room(r), most(m), memory(m) {}
  void start(procpool::writer& out, std::size_t size) {
    out.write_in_place(memory.data(), size, false);
    pd::result_header placeholder{};
    out.write(&placeholder, sizeof placeholder);
  }
  bool flush(procpool::writer& out, const pd::result_header& h) override {
    if (h.count > 0) {
      CHECK(h.kind == pd::frame_kind::part);
      CHECK(out.size() <= out.capacity());
      pd::patch_result_header(out, h);
      sent.emplace_back(out.data(), out.data() + out.size());
      start(out, room);
    } else {
      if (out.capacity() >= most) return false;
      ++more_asked;
      start(out, most);
    }
    return true;
  }
  /// Windows of `room` bytes (or of what a `prepare` wants, up to `most`),
  /// each appended to the frame when done.
  struct window_sink final : pd::writer_sink {
    std::size_t room, most;
    std::vector<std::byte> memory;
    std::vector<std::byte> frame;
    int* short_windows;
    window_sink(std::size_t r, std::size_t m, bool count, int* shorts)
        : room(r), most(m), short_windows(shorts) {
      counts_only = count;
    }
    std::pair<std::byte*, std::size_t> window(std::size_t want) override {
      std::size_t n = want <= most ? std::max(want, room) : room;
      if (n < want) ++*short_windows;  // the writer stages what it prepares
      memory.resize(n);
      return {memory.data(), n};
    }
    void done(std::size_t n) override {
      frame.insert(frame.end(), memory.begin(), memory.begin() + static_cast<std::ptrdiff_t>(n));
    }
  };
  bool send_alone(procpool::writer& out, const pd::result_header& h, result_encoder e) override {
    CHECK(h.count == 1);
    CHECK(out.size() == sizeof h);  // nothing before it in its frame
    procpool::writer sizer;
    window_sink counter(64, most, true, &staged);
    pd::writer_streams::start(sizer, counter);
    e.encode(sizer, e.value);
    std::size_t size = pd::writer_streams::stop(sizer).first;
    if (sizeof h + size <= most) return false;
    ++alone;
    procpool::writer stream;
    window_sink sink(room, most, false, &staged);
    pd::writer_streams::start(stream, sink);
    stream.write(&h, sizeof h);
    e.encode(stream, e.value);
    auto [written, last] = pd::writer_streams::stop(stream);
    CHECK(written == sizeof h + size);
    sink.done(last);
    CHECK(sink.frame.size() == written);
    sent.push_back(std::move(sink.frame));
    answered = h.kind != pd::frame_kind::part;
    start(out, room);
    return true;
  }
};

/// Careless: its encoder catches everything, `writer::full` included.
struct careless {
  std::string s;
  friend void procpool_encode(procpool::writer& out, const careless& c) {
    try {
      procpool::encode(out, c.s);
    } catch (...) {
    }
  }
  friend careless procpool_decode(procpool::reader& in, procpool::type_tag<careless>) {
    return careless{procpool::decode<std::string>(in)};
  }
  bool operator==(const careless& o) const { return s == o.s; }
};

/// Its encoder writes `n` bytes and then throws, when `n` is large: the
/// result of the item cannot be sent, however much room there is.
struct careless_thrower {
  std::uint64_t n;
  friend void procpool_encode(procpool::writer& out, const careless_thrower& c) {
    procpool::encode(out, std::string(c.n, 'z'));
    if (c.n > 1000) throw std::length_error("too long to send");
  }
  friend careless_thrower procpool_decode(procpool::reader& in,
                                          procpool::type_tag<careless_thrower>) {
    return careless_thrower{procpool::decode<std::string>(in).size()};
  }
  bool operator==(const careless_thrower& o) const { return n == o.n; }
};

/// The frames of a chunk answered in parts, read back.
template <class R>
struct parted {
  std::vector<pd::result_header> headers;  // the parts', then the last frame's
  std::vector<R> results;
  std::uint64_t failed_at = ~std::uint64_t(0);
};

template <class R>
void read_frame(parted<R>& p, const std::byte* data, std::size_t size, bool last) {
  procpool::reader in(data, size);
  pd::result_header h;
  in.read(&h, sizeof h);
  p.headers.push_back(h);
  for (std::uint32_t k = 0; k < h.count; ++k) p.results.push_back(procpool::decode<R>(in));
  if (last && h.kind == pd::frame_kind::error) {
    p.failed_at = procpool::decode<std::uint64_t>(in);
    procpool::decode<std::string>(in);
    procpool::decode<std::string>(in);
    pd::decode_original(in);
  }
  CHECK(in.at_end());
}

/// Runs items through `f` from item 100 of call 7, in `room` bytes of a
/// ring of `most`; checks what every frame claims, and reads them back.
template <class Item, class F>
parted<std::decay_t<std::invoke_result_t<F&, Item&>>> run_parted(
    const std::vector<Item>& items, F f, std::size_t room, std::size_t most,
    std::uint64_t stop_at = ~std::uint64_t(0), int* more_asked = nullptr, int* alone = nullptr,
    int* staged = nullptr) {
  using R = std::decay_t<std::invoke_result_t<F&, Item&>>;
  procpool::writer frame;
  for (const auto& x : items) procpool::encode(frame, x);
  procpool::reader in(frame.data(), frame.size());
  kept_parts parts(room, most);
  procpool::writer out;
  parts.start(out, room);
  auto h = pd::run_items<Item, pd::invoke_one>(
      f, in, 7, 100, static_cast<std::uint32_t>(items.size()), out,
      [&](std::uint64_t i) { return i != stop_at; }, nullptr, &parts);
  pd::patch_result_header(out, h);
  parted<R> p;
  for (std::size_t i = 0; i < parts.sent.size(); ++i)
    read_frame(p, parts.sent[i].data(), parts.sent[i].size(),
               parts.answered && i + 1 == parts.sent.size());
  if (!parts.answered) read_frame(p, out.data(), out.size(), true);
  std::uint64_t next = 100;
  for (std::size_t i = 0; i < p.headers.size(); ++i) {
    const auto& ph = p.headers[i];
    CHECK(ph.call == 7);
    CHECK(ph.first == next);  // each frame goes on where the one before it ended
    next += ph.count;
    if (i + 1 < p.headers.size()) CHECK(ph.count > 0);  // a part is never empty
  }
  if (more_asked) *more_asked = parts.more_asked;
  if (alone) *alone = parts.alone;
  if (staged) *staged = parts.staged;
  return p;
}

}  // namespace

TEST_CASE("a chunk whose answer outgrows its room goes out in parts, each result written once",
          "[dispatcher][run_items]") {
  SECTION("plain results: the loop with no encoder per item goes on in each room") {
    std::vector<std::uint32_t> xs(1000);
    std::iota(xs.begin(), xs.end(), 5u);
    auto f = [](std::uint32_t x) { return std::uint64_t(x) * 3; };
    auto p = run_parted(xs, f, 256, 4096);
    REQUIRE(p.results.size() == xs.size());
    for (std::size_t k = 0; k < xs.size(); ++k) REQUIRE(p.results[k] == std::uint64_t(xs[k]) * 3);
    // 29 results of 8 bytes fit after a 24-byte header in 256 bytes.
    CHECK(p.headers.size() == (xs.size() + 28) / 29);
    CHECK(p.headers.back().kind == pd::frame_kind::results);
    for (std::size_t i = 0; i + 1 < p.headers.size(); ++i)
      CHECK(p.headers[i].kind == pd::frame_kind::part);
  }
  SECTION("strings: one larger than the room gets more room, one larger than that goes alone") {
    std::vector<std::uint64_t> sizes{10, 300, 50, 2000, 5, 9000, 7, 400, 3};
    auto f = [](std::uint64_t n) { return std::string(n, char('a' + n % 26)); };
    int more = 0, alone = 0;
    auto p = run_parted(sizes, f, 512, 4096, ~std::uint64_t(0), &more, &alone);
    REQUIRE(p.results.size() == sizes.size());
    for (std::size_t k = 0; k < sizes.size(); ++k) REQUIRE(p.results[k] == f(sizes[k]));
    CHECK(more >= 2);   // for 2000 and for 9000
    CHECK(alone == 1);  // 9000, in a part of its own
    bool found = false;
    for (const auto& h : p.headers)
      if (h.first == 105) {
        CHECK(h.count == 1);
        CHECK(h.kind == pd::frame_kind::part);
        found = true;
      }
    CHECK(found);
    CHECK(p.headers.back().kind == pd::frame_kind::results);
  }
  SECTION("results longer than any room go alone, each once, wherever they fall in the chunk") {
    // Lists of strings: not a block, and longer than the 4 KiB "ring".
    using list = std::vector<std::string>;
    auto f = [](std::uint64_t n) {
      list l;
      for (std::uint64_t k = 0; k < n; ++k) l.push_back(std::string(k % 300, char('a' + k % 26)));
      return l;
    };
    for (const std::vector<std::uint64_t>& sizes : {std::vector<std::uint64_t>{200},
                                                    {1, 200},
                                                    {200, 1},
                                                    {200, 300, 2, 250},
                                                    {3, 150, 4, 5, 400}}) {
      int alone = 0;
      auto p = run_parted(sizes, f, 512, 4096, ~std::uint64_t(0), nullptr, &alone);
      REQUIRE(p.results.size() == sizes.size());
      for (std::size_t k = 0; k < sizes.size(); ++k) REQUIRE(p.results[k] == f(sizes[k]));
      CHECK(alone == static_cast<int>(std::count_if(sizes.begin(), sizes.end(),
                                                    [](std::uint64_t n) { return n > 100; })));
      // The chunk's last frame answers it: a part only before it.
      CHECK(p.headers.back().kind == pd::frame_kind::results);
      for (std::size_t i = 0; i + 1 < p.headers.size(); ++i)
        CHECK(p.headers[i].kind == pd::frame_kind::part);
    }
  }
  SECTION("a big array returned by reference goes alone: its encoder's long write is not staged") {
    static const std::vector<double> kept(3000, 2.5);  // 24 KB
    auto by_ref = [](std::uint64_t) -> const std::vector<double>& { return kept; };
    int alone = 0, staged = -1;
    auto p = run_parted(std::vector<std::uint64_t>{1, 2, 3}, by_ref, 512, 4096, ~std::uint64_t(0),
                        nullptr, &alone, &staged);
    REQUIRE(p.results.size() == 3);
    for (const auto& r : p.results) CHECK(r == kept);
    CHECK(alone == 3);
    CHECK(staged == 0);
  }
  SECTION("an item whose result cannot even be sized fails with its own error") {
    std::vector<std::uint64_t> sizes{10, 9000, 20};
    auto f = [](std::uint64_t n) { return careless_thrower{n}; };
    auto p = run_parted(sizes, f, 512, 4096);
    CHECK(p.results.size() == 1);
    CHECK(p.headers.back().kind == pd::frame_kind::error);
    CHECK(p.failed_at == 101);
  }
  SECTION("an item that throws after parts: the last frame is the error, naming it") {
    std::vector<std::uint64_t> sizes(40, 100);
    sizes[33] = 0;
    auto f = [](std::uint64_t n) {
      if (n == 0) throw std::invalid_argument("empty");
      return std::string(n, 'x');
    };
    auto p = run_parted(sizes, f, 512, 4096);
    CHECK(p.headers.size() > 2);
    CHECK(p.headers.back().kind == pd::frame_kind::error);
    CHECK(p.results.size() == 33);
    CHECK(p.failed_at == 133);
  }
  SECTION("a cancellation after parts") {
    std::vector<std::uint32_t> xs(500, 1u);
    auto p = run_parted(
        xs, [](std::uint32_t x) { return std::uint64_t(x); }, 128, 1024, 450);
    CHECK(p.headers.back().kind == pd::frame_kind::skipped);
    CHECK(p.results.size() == 350);
  }
  SECTION("an encoder that catches writer::full still gets its result whole") {
    std::vector<std::uint64_t> sizes{100, 200, 300, 150, 250, 1000, 60};
    auto f = [](std::uint64_t n) { return careless{std::string(n, char('0' + n % 10))}; };
    auto p = run_parted(sizes, f, 400, 2048);
    REQUIRE(p.results.size() == sizes.size());
    for (std::size_t k = 0; k < sizes.size(); ++k) REQUIRE(p.results[k] == f(sizes[k]));
    CHECK(p.headers.size() > 2);
  }
}

TEST_CASE("an answer's parts are checked like any answer: none empty, none the whole chunk",
          "[dispatcher]") {
  pd::chunk c;
  c.call_id = 3;
  c.first = 40;
  c.count = 10;
  auto part = [](std::uint64_t first, std::uint32_t count) {
    return pd::result_header{3, first, count, pd::frame_kind::part};
  };
  constexpr std::size_t size = sizeof(pd::result_header) + 64;
  CHECK(pd::dispatcher::check_answer(c, part(40, 4), size, true).empty());
  CHECK(pd::dispatcher::check_answer(c, part(40, 9), size, true).empty());
  CHECK_FALSE(pd::dispatcher::check_answer(c, part(40, 0), size, true).empty());
  CHECK_FALSE(pd::dispatcher::check_answer(c, part(40, 10), size, true).empty());
  CHECK_FALSE(pd::dispatcher::check_answer(c, part(41, 4), size, true).empty());
  // An engine that sends no parts (MPI) takes none.
  CHECK_FALSE(pd::dispatcher::check_answer(c, part(40, 4), size).empty());
}

namespace {

struct test_handlers {
  template <class F, class Item, class Invoke>
  static std::uint64_t id() noexcept {
    return 42;
  }
};

/// A `map` call over `items` as a pool makes one, `per_chunk` items a chunk.
template <class Item>
auto map_call_over(const std::vector<Item>& items, std::vector<int>& out, std::size_t per_chunk) {
  using F = int (*)(const Item&);
  using It = typename std::vector<Item>::const_iterator;
  return std::make_shared<pd::map_call<F, test_handlers, Item, pd::invoke_one, It, It, int>>(
      items.begin(), items.end(), nullptr, items.size(), per_chunk, std::size_t(1) << 30,
      out.data(), pd::progress_reporter(false, {}, items.size()));
}

/// The items of a task frame that starts at `frame` (after a length prefix).
template <class Item>
std::vector<Item> items_of(const std::byte* frame, std::size_t size) {
  procpool::reader in(frame + 8, size - 8);
  pd::task_header h;
  in.read(&h, sizeof h);
  std::vector<Item> items;
  for (std::uint32_t k = 0; k < h.count; ++k) items.push_back(procpool::decode<Item>(in));
  CHECK(in.at_end());
  return items;
}

}  // namespace

TEST_CASE("a chunk encoded in a ring's room ends before the item that does not fit",
          "[dispatcher]") {
  // Items that are encoded one by one (no blocks): lists of strings.
  using Item = std::vector<std::string>;
  std::vector<Item> items;
  for (std::size_t k = 0; k < 30; ++k)
    items.push_back(Item(k % 5 + 1, std::string(20 + 3 * k, char('a' + k % 26))));
  items[20] = Item(40, std::string(100, 'z'));  // about 4 KiB, more than the rooms below
  std::vector<int> out(items.size());
  pd::dispatcher d(8, true);
  auto call = map_call_over(items, out, 10);
  d.start(call);
  REQUIRE(call->places_chunks());
  std::vector<std::byte> ring(1024);
  std::size_t next = 0;
  int cut_short = 0;
  while (next < 20) {
    pd::chunk c;
    REQUIRE(d.next_chunk(c, ~std::size_t(0), ring.data(), ring.size(), true));
    CHECK(c.first == next);
    CHECK(c.count >= 1);
    // Encoded in the room, kept nowhere, and no larger than the room.
    REQUIRE(c.placed > 0);
    CHECK(c.placed <= ring.size());
    CHECK(c.bytes.empty());
    std::uint64_t length;
    std::memcpy(&length, ring.data(), sizeof length);
    CHECK(length + 8 == c.placed);
    auto got = items_of<Item>(ring.data(), c.placed);
    REQUIRE(got.size() == c.count);
    for (std::size_t k = 0; k < got.size(); ++k) REQUIRE(got[k] == items[next + k]);
    cut_short += c.count < 10 && next + c.count < 20;
    next += c.count;
    d.settle(c);
  }
  CHECK(cut_short > 0);
  CHECK(next == 20);
  // Item 20 does not fit the room: with more room to come, nothing now...
  pd::chunk c;
  CHECK_FALSE(d.next_chunk(c, ~std::size_t(0), ring.data(), ring.size(), true));
  CHECK(d.wanted_room());
  // ... and in a room as large as it gets, a frame of its own buffer.
  REQUIRE(d.next_chunk(c, ~std::size_t(0), ring.data(), ring.size(), false));
  CHECK_FALSE(d.wanted_room());
  CHECK(c.first == 20);
  CHECK(c.placed == 0);
  REQUIRE(c.bytes.size() > ring.size());
  auto got = items_of<Item>(c.bytes.data(), c.bytes.size());
  REQUIRE(got.size() == c.count);
  for (std::size_t k = 0; k < got.size(); ++k) REQUIRE(got[k] == items[20 + k]);
  next = 20 + c.count;
  d.settle(c);
  // In a larger room, whole chunks again.
  std::vector<std::byte> big(1 << 20);
  while (next < items.size()) {
    pd::chunk e;
    REQUIRE(d.next_chunk(e, ~std::size_t(0), big.data(), big.size(), true));
    CHECK(e.first == next);
    CHECK(e.placed > 0);
    CHECK(e.count == std::min<std::size_t>(10, items.size() - next));
    next += e.count;
    d.settle(e);
  }
}

TEST_CASE("a kept frame sent again after parts of its answer came reads past the items answered",
          "[dispatcher]") {
  // Strings of 16 KiB and more stay in the input as blocks between the
  // frame's own bytes.
  std::vector<std::string> items;
  for (std::size_t k = 0; k < 6; ++k)
    items.push_back(std::string(k % 2 ? 20 : pd::frame_refs::min_bytes + k, char('a' + k)));
  std::vector<int> out(items.size());
  pd::dispatcher d(8, true);
  auto call = map_call_over(items, out, 6);
  d.start(call);
  pd::chunk c;
  REQUIRE(d.next_chunk(c));
  REQUIRE(c.count == 6);
  REQUIRE_FALSE(c.blocks.empty());
  auto whole = [](const pd::chunk& k) {
    std::vector<std::byte> f;
    k.copy_out(0, k.size(),
               [&](const std::byte* p, std::size_t n) { f.insert(f.end(), p, p + n); });
    return f;
  };
  auto before = whole(c);
  for (std::uint64_t answered : {2u, 5u}) {
    CAPTURE(answered);
    // What the engine does with a part: the chunk goes on past it.
    c.count -= static_cast<std::uint32_t>(answered - c.skip);
    c.first = answered;
    c.skip = answered;
    d.resend(std::move(c));
    c = pd::chunk{};
    REQUIRE(d.next_chunk(c));
    auto f = whole(c);
    std::uint64_t length;
    std::memcpy(&length, f.data(), sizeof length);
    CHECK(length + 8 == f.size());
    procpool::reader in(f.data() + 8, f.size() - 8);
    pd::task_header h;
    in.read(&h, sizeof h);
    CHECK(h.kind == pd::frame_kind::task_rest);
    CHECK(h.first == answered);
    CHECK(h.count == 6 - answered);
    CHECK(procpool::decode<std::uint64_t>(in) == answered);
    for (std::size_t k = 0; k < items.size(); ++k)
      REQUIRE(procpool::decode<std::string>(in) == items[k]);
    CHECK(in.at_end());
    // The items' bytes are the frame's first ones, after the count.
    CHECK(std::equal(before.begin() + 8 + sizeof h, before.end(),
                     f.begin() + 8 + sizeof h + sizeof(std::uint64_t), f.end()));
  }
}

TEST_CASE("an item whose encoder catches writer::full is not cut in half", "[dispatcher]") {
  std::vector<careless> items;
  for (std::size_t k = 0; k < 12; ++k) items.push_back(careless{std::string(150 + k, 'q')});
  std::vector<int> out(items.size());
  pd::dispatcher d(8, true);
  auto call = map_call_over(items, out, 12);
  d.start(call);
  std::vector<std::byte> ring(700);
  std::size_t next = 0;
  while (next < items.size()) {
    pd::chunk c;
    REQUIRE(d.next_chunk(c, ~std::size_t(0), ring.data(), ring.size(), true));
    REQUIRE(c.placed > 0);
    auto got = items_of<careless>(ring.data(), c.placed);
    REQUIRE(got.size() == c.count);
    for (std::size_t k = 0; k < got.size(); ++k) REQUIRE(got[k] == items[next + k]);
    CHECK(c.count < items.size());
    next += c.count;
    d.settle(c);
  }
}

TEST_CASE("a worker's queue of chunks stays in order through growth and reuse",
          "[dispatcher][chunk_queue]") {
  // Elements that own memory, so that one popped but not freed, or moved
  // twice, shows up.
  pd::chunk_queue<std::shared_ptr<int>> q;
  std::vector<std::weak_ptr<int>> popped;
  int next_in = 0, next_out = 0;
  auto push = [&] { q.emplace_back() = std::make_shared<int>(next_in++); };
  auto pop = [&] {
    REQUIRE_FALSE(q.empty());
    REQUIRE(*q.front() == next_out);
    popped.push_back(q.front());
    q.pop_front();
    CHECK(popped.back().expired());  // freed at once, not when the slot is reused
    ++next_out;
  };
  // Steady states of every depth from 1 to 300, each crossing the vector's
  // capacity many times: what is popped comes out in the order pushed.
  for (int depth = 1; depth <= 300; depth += 37) {
    while (int(q.size()) < depth) push();
    for (int i = 0; i < 1000; ++i) {
      push();
      pop();
      REQUIRE(int(q.size()) == depth);
      REQUIRE(*q.back() == next_in - 1);
      for (std::size_t k = 0; k < q.size(); k += 17) REQUIRE(*q[k] == next_out + int(k));
    }
    int expect = next_out;
    for (auto& p : q) REQUIRE(*p == expect++);
    CHECK(expect == next_in);
  }
  while (!q.empty()) pop();
  CHECK(q.size() == 0);
  CHECK(q.begin() == q.end());
  push();
  q.clear();
  CHECK(q.empty());
}
