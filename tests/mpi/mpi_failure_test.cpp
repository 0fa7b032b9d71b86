// mpi::pool under attack at rank 0: exceptions while rank 0 encodes items or
// takes in results, a range left half read when the pool joins, pools of
// different functions of one type, an initializer that fails on one rank, a
// second pool after close(). Run under mpirun (2 and 3 ranks) and alone, like
// mpi_test: every rank runs every case and constructs the same pools in the
// same order; only rank 0 asserts on calls.
#define CATCH_CONFIG_RUNNER
#define CATCH_CONFIG_NO_POSIX_SIGNALS
#include <catch2/catch.hpp>
#include <procpool/mpi.hpp>

#include <chrono>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

int world_rank = 0;
int world_size = 1;

// A result whose decoder (run at rank 0 only) throws a plain exception for 7.
struct touchy {
  int value;
  friend void procpool_encode(procpool::writer& out, const touchy& t) {
    procpool::encode(out, t.value);
  }
  friend touchy procpool_decode(procpool::reader& in, procpool::type_tag<touchy>) {
    int v = procpool::decode<int>(in);
    if (v == 7) throw std::runtime_error("touchy: 7 will not be read");
    return {v};
  }
};

// An item whose encoder (run at rank 0 only) throws for negative values.
struct unsendable {
  int value;
  friend void procpool_encode(procpool::writer& out, const unsendable& u) {
    if (u.value < 0) throw std::invalid_argument("unsendable: " + std::to_string(u.value));
    procpool::encode(out, u.value);
  }
  friend unsendable procpool_decode(procpool::reader& in, procpool::type_tag<unsendable>) {
    return {procpool::decode<int>(in)};
  }
};

std::vector<int> iota(int n, int from = 0) {
  std::vector<int> xs(static_cast<std::size_t>(n));
  std::iota(xs.begin(), xs.end(), from);
  return xs;
}

int square(int x) {
  return x * x;
}
int negate(int x) {
  return -x;
}

}  // namespace

TEST_CASE("a result decoder that throws fails that call only; the pool goes on", "[mpi]") {
  procpool::mpi::pool_options o;
  o.chunk_size = 3;  // chunks of other items are still out when item 7's fails
  procpool::mpi::pool p([](int x) { return touchy{x}; }, o);
  if (!p.is_root()) return;
  auto xs = iota(300);
  for (int round = 0; round < 3; ++round) {
    try {
      (void)p.map(xs);
      FAIL("map did not throw");
    } catch (const procpool::decode_error& e) {
      CHECK(std::string(e.what()).find("touchy: 7") != std::string::npos);
      CHECK(std::string(e.what()).find("std::runtime_error") != std::string::npos);
    }
  }
  std::vector<int> fine = iota(200, 10);
  auto out = p.map(fine);
  REQUIRE(out.size() == fine.size());
  for (std::size_t i = 0; i < fine.size(); ++i) CHECK(out[i].value == fine[i]);
  CHECK_THROWS_AS(p.submit(7).get(), procpool::decode_error);
  CHECK(p.submit(8).get().value == 8);
  // imap: the results before the bad one, then the error.
  std::size_t yielded = 0;
  CHECK_THROWS_AS(
      [&] {
        for (auto t : p.imap(xs)) {
          REQUIRE(t.value == int(yielded));
          ++yielded;
        }
      }(),
      procpool::decode_error);
  CHECK(yielded <= 7);
  CHECK(p.map(fine).size() == fine.size());
  p.join();
}

TEST_CASE("an on_progress that throws ends that call with its exception; the pool goes on",
          "[mpi]") {
  procpool::mpi::pool_options o;
  o.chunk_size = 5;
  bool armed = true;
  o.on_progress = [&](const procpool::progress_info& info) {
    if (armed && info.done >= 20) {
      armed = false;
      throw std::logic_error("enough progress");
    }
  };
  procpool::mpi::pool p([](int x) { return 2 * x; }, o);
  if (!p.is_root()) return;
  auto xs = iota(4000);
  // The callback throws at a report mid-way or at the last one: either way
  // while rank 0 takes in a result.
  CHECK_THROWS_WITH(p.map(xs), "enough progress");
  for (int round = 0; round < 3; ++round) {
    auto out = p.map(xs);
    REQUIRE(out.size() == xs.size());
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) wrong += out[i] != 2 * xs[i];
    CHECK(wrong == 0);
  }
  p.join();
}

TEST_CASE("an item whose encoding throws fails that call; nothing of it stays in the pool",
          "[mpi]") {
  procpool::mpi::pool_options o;
  o.chunk_size = 4;
  procpool::mpi::pool p([](const unsendable& u) { return u.value + 1; }, o);
  if (!p.is_root()) return;
  for (int round = 0; round < 2; ++round) {
    std::vector<unsendable> bad;
    for (int i = 0; i < 60; ++i) bad.push_back({i == 37 ? -1 : i});
    CHECK_THROWS_WITH(p.map(bad), "unsendable: -1");
  }
  std::vector<unsendable> good;
  for (int i = 0; i < 60; ++i) good.push_back({i});
  auto out = p.map(good);
  REQUIRE(out.size() == good.size());
  for (std::size_t i = 0; i < good.size(); ++i) CHECK(out[i] == int(i) + 1);
  CHECK_THROWS_WITH(p.submit(unsendable{-4}).get(), "unsendable: -4");
  CHECK(p.submit(unsendable{4}).get() == 5);
  // imap: the results of the chunks before the one that cannot be cut, then the error.
  std::vector<unsendable> late;
  for (int i = 0; i < 60; ++i) late.push_back({i == 50 ? -1 : i});
  std::size_t yielded = 0;
  CHECK_THROWS_WITH(
      [&] {
        for (int r : p.imap(late)) {
          REQUIRE(r == int(yielded) + 1);
          ++yielded;
        }
      }(),
      "unsendable: -1");
  CHECK(yielded <= 50);
  CHECK(p.map(good).size() == good.size());
  p.join();
}

TEST_CASE("join() with a half-read imap range returns; the range then ends with pool_closed",
          "[mpi]") {
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  procpool::mpi::pool p([](int x) { return x + 1; }, o);
  if (!p.is_root()) return;
  auto xs = iota(20000);
  auto range = p.imap(xs);
  auto it = range.begin();
  CHECK(*it == 1);
  ++it;
  CHECK(*it == 2);
  p.join();  // the window is full: the rest can never be sent
  std::size_t more = 0;
  CHECK_THROWS_AS(
      [&] {
        for (++it; it != range.end(); ++it) ++more;
      }(),
      procpool::pool_closed);
  CHECK(more < xs.size() - 2);
  CHECK_THROWS_AS(p.map(xs), procpool::pool_closed);
}

TEST_CASE("the same holds when the pool is destroyed with a half-read range", "[mpi]") {
  std::optional<procpool::mpi::pool<int (*)(int)>> p;
  procpool::mpi::pool_options o;
  o.chunk_size = 1;  // a window of a few items: most of the input is never sent
  p.emplace(&square, o);
  if (!p->is_root()) return;
  auto xs = iota(20000);
  auto range = p->imap(xs);
  CHECK(*range.begin() == 0);
  p.reset();
  CHECK_THROWS_AS(
      [&] {
        for (auto it = range.begin(); it != range.end(); ++it) {
        }
      }(),
      procpool::pool_closed);
}

TEST_CASE("pools of two functions of one type on different ranks are refused at rank 0", "[mpi]") {
  if (world_size == 1) return;
  if (world_rank == 0) {
    CHECK_THROWS_WITH(procpool::mpi::pool(&square),
                      Catch::Contains("different function") && Catch::Contains("another function"));
  } else {
    procpool::mpi::pool p(&negate);  // serves until rank 0 gives up
    CHECK_FALSE(p.is_root());
  }
  // The same function on every rank is fine.
  procpool::mpi::pool q(&square);
  if (!q.is_root()) return;
  CHECK(q.map(std::vector<int>{1, 2, 3}) == std::vector<int>{1, 4, 9});
}

TEST_CASE("an initializer that fails on the last rank fails the very first call", "[mpi]") {
  if (world_size == 1) return;  // alone, the constructor throws (mpi_test)
  procpool::mpi::pool_options o;
  // It takes a while, then throws: rank 0 must not run calls before it knows.
  o.initializer = [] {
    if (world_rank != world_size - 1) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    throw std::runtime_error("no licence on the last rank");
  };
  procpool::mpi::pool p([](int x) { return x; }, o);
  if (!p.is_root()) return;
  auto last = "rank " + std::to_string(world_size - 1);
  CHECK_THROWS_WITH(p.submit(1).get(),
                    Catch::Contains(last) && Catch::Contains("no licence on the last rank"));
  CHECK_THROWS_WITH(p.map(std::vector<int>{1, 2}), Catch::Contains("no licence"));
}

TEST_CASE("a closed pool lets the next one be made; it is joined first", "[mpi]") {
  auto times10 = [](int x) { return x * 10; };
  procpool::mpi::pool p([](int x) { return x - 1; });
  if (p.is_root()) {
    auto f = p.submit(10);
    p.close();
    procpool::mpi::pool q(times10);
    CHECK(f.get() == 9);
    CHECK(q.map(std::vector<int>{1, 2}) == std::vector<int>{10, 20});
    CHECK_THROWS_AS(p.submit(1), procpool::pool_closed);
  } else {
    procpool::mpi::pool q(times10);  // its constructor serves after p's
  }
}

int main(int argc, char** argv) {
  procpool::mpi::session mpi(argc, argv);
  world_rank = mpi.rank();
  world_size = mpi.size();
  Catch::Session session;
  int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  if (world_rank != 0) session.configData().reporterName = "compact";
  return session.run();
}
