// The pool's scheduling is work-conserving: no worker stays idle while a
// chunk waits unstarted in another worker's ring.
//
// Each case makes one task wait (with a generous bound) for others to have
// run. A scheduler that queues those others behind the waiting task, in the
// same worker, makes it time out: the task then reports failure, so the case
// fails on its results, never on a timing.
#include <procpool/pool.hpp>
#include <procpool/sync.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/support.hpp"

namespace {

using namespace std::chrono_literals;

// How long a waiting task waits for the others before it reports them missing.
constexpr auto bound = 20s;

}  // namespace

TEST_CASE("two submits on two workers run at once", "[pool][sched]") {
  procpool::semaphore started(0);
  procpool::pool p(
      [&](int k) {
        if (k == 0) return started.try_acquire_for(bound) ? 1 : -1;  // waits for task 1
        started.release();
        return 1;
      },
      2u);
  p.map(std::vector<int>{1, 1});  // both workers up; `started` back to 2 units
  while (started.try_acquire()) {
  }
  auto a = p.submit(0);
  auto b = p.submit(1);
  CHECK(b.get() == 1);
  CHECK(a.get() == 1);
}

TEST_CASE("one chunk per worker before any worker gets a second", "[pool][sched]") {
  // Four items, chunk 1, four workers: item 0 waits until the three others ran.
  procpool::semaphore ran(0);
  procpool::pool_options o;
  o.workers = 4;
  o.chunk_size = 1;
  procpool::pool p(
      [&](int k) {
        if (k != 0) {
          ran.release();
          return k;
        }
        for (int i = 0; i < 3; ++i)
          if (!ran.try_acquire_for(bound)) return -1;
        return 0;
      },
      o);
  CHECK(p.map(std::vector<int>{0, 1, 2, 3}) == std::vector<int>{0, 1, 2, 3});
}

TEST_CASE("an idle worker takes over a chunk queued behind a long one", "[pool][sched]") {
  // Item 0 runs long (it waits for all four others); with two workers and
  // chunk 1 the second item of worker 1's ring waits behind it unless it is
  // taken back and given to the worker that went idle.
  procpool::semaphore ran(0);
  procpool::pool_options o;
  o.workers = 2;
  o.chunk_size = 1;
  procpool::pool p(
      [&](int k) {
        if (k != 0) {
          ran.release();
          return k;
        }
        for (int i = 0; i < 4; ++i)
          if (!ran.try_acquire_for(bound)) return -1;
        return 0;
      },
      o);
  for (int round = 0; round < 3; ++round)
    CHECK(p.map(std::vector<int>{0, 1, 2, 3, 4}) == std::vector<int>{0, 1, 2, 3, 4});
  // The same through imap and imap_unordered.
  std::vector<int> got;
  for (int r : p.imap(std::vector<int>{0, 1, 2, 3, 4})) got.push_back(r);
  CHECK(got == std::vector<int>{0, 1, 2, 3, 4});
}

TEST_CASE("a task queued behind one that never ends is answered by the idle worker",
          "[pool][sched]") {
  // The frame taken back stays in the stuck worker's ring, unanswered for
  // good: the task must not wait for that copy (before: it did, forever).
  procpool::pool p(
      [](int x) {
        if (x < 0) procpool_test::block_forever();
        return x;
      },
      2u);
  auto stuck = p.submit(-1);
  CHECK_FALSE(stuck.wait_for(10ms));  // running, in worker 1
  auto first = p.submit(4);           // worker 2
  auto second = p.submit(5);          // behind the stuck one, then taken back
  auto a = first.get_for(bound);
  auto b = second.get_for(bound);
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK(*a == 4);
  CHECK(*b == 5);
  CHECK(p.map(std::vector<int>{1, 2, 3}) == std::vector<int>{1, 2, 3});
  p.terminate();
  CHECK_THROWS_AS(stuck.get(), procpool::pool_closed);
}

TEST_CASE("a chunk taken back runs exactly once, whatever the race", "[pool][sched]") {
  // Many short maps where the last chunks are often taken back: every result
  // arrives once and in place.
  procpool::pool_options o;
  o.workers = 3;
  o.chunk_size = 1;
  procpool::pool p([](int x) { return x * 3; }, o);
  std::vector<int> in(50);
  for (int i = 0; i < 50; ++i) in[static_cast<std::size_t>(i)] = i;
  std::vector<int> want(50);
  for (int i = 0; i < 50; ++i) want[static_cast<std::size_t>(i)] = 3 * i;
  for (int round = 0; round < 200; ++round) REQUIRE(p.map(in) == want);
}

TEST_CASE("a worker that dies holding a chunk taken back loses nothing", "[pool][sched]") {
  // Item 0 waits for the others, then kills its worker; the others' chunks,
  // some taken back from that worker, all complete, and item 0's death is
  // reported for item 0.
  procpool::semaphore ran(0);
  procpool::pool_options o;
  o.workers = 2;
  o.chunk_size = 1;
  procpool::pool p(
      [&](int k) {
        if (k != 0) {
          ran.release();
          return k;
        }
        for (int i = 0; i < 4; ++i)
          if (!ran.try_acquire_for(bound)) return -1;
        ::raise(SIGKILL);
        return 0;
      },
      o);
  try {
    p.map(std::vector<int>{0, 1, 2, 3, 4});
    FAIL("worker_died expected");
  } catch (const procpool::worker_died& e) {
    CHECK(e.index() == std::optional<std::size_t>(0));
  }
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{1, 2});
}

namespace {

/// Item `k` as a string, as long as `k` is (plus its digits): encoded
/// items, not a contiguous run of numbers, so that chunks are encoded
/// straight into the rings and kept nowhere.
std::string text(int k) {
  return std::to_string(k) + std::string(k < 0 ? 0 : static_cast<std::size_t>(k % 97), 'x');
}

int number(const std::string& s) {
  return std::stoi(s);
}

/// Two workers, one item per chunk.
procpool::pool_options two_workers_chunk_1() {
  procpool::pool_options o;
  o.workers = 2;
  o.chunk_size = 1;
  return o;
}

/// Short chunks make the pool give each worker many at once. Item `slow`
/// then waits until every item after it ran: those queued behind it in its
/// worker's ring must all be taken back, not only the next one. Items are
/// `make(k)`, read back by `read`; one that arrives changed answers -2.
template <class Item>
void stuck_queue_taken_over(Item (*make)(int), int (*read)(const Item&)) {
  constexpr int n = 3000;
  constexpr int slow = 1000;
  procpool::semaphore ran(0);
  procpool::pool p(
      [&](const Item& item) {
        int k = read(item);
        if (!(item == make(k))) return -2;
        if (k < 0) return k;  // the warm-up: short items, many per worker
        if (k > slow) ran.release();
        if (k != slow) return k;
        for (int i = slow + 1; i < n; ++i)
          if (!ran.try_acquire_for(bound)) return -1;
        return k;
      },
      two_workers_chunk_1());
  std::vector<Item> warm;
  std::vector<int> warm_want;
  for (int i = 0; i < 20000; ++i) {
    warm.push_back(make(-1 - i));
    warm_want.push_back(-1 - i);
  }
  CHECK(p.map(warm) == warm_want);
  std::vector<Item> xs;
  std::vector<int> want;
  for (int i = 0; i < n; ++i) {
    xs.push_back(make(i));
    want.push_back(i);
  }
  for (int round = 0; round < 2; ++round) CHECK(p.map(xs) == want);
}

int same(int k) {
  return k;
}
int same_read(const int& k) {
  return k;
}

}  // namespace

TEST_CASE("the deep queue of a worker stuck on a slow item is taken over by the idle one",
          "[pool][sched]") {
  // Numbers in a contiguous input: the chunks taken back are read from it again.
  stuck_queue_taken_over<int>(same, same_read);
}

TEST_CASE("chunks of encoded items taken back from a stuck worker are encoded again, whole",
          "[pool][sched]") {
  // Strings: the frames queued behind the slow item were written straight
  // into its worker's ring and kept nowhere else, so the idle worker gets
  // them encoded again from the input.
  stuck_queue_taken_over<std::string>(text, number);
}

TEST_CASE("a worker that dies with encoded chunks queued loses none of them", "[pool][sched]") {
  // Item 0 waits until every other item ran, then kills its worker. The
  // chunks queued behind it were written straight into its ring: they are
  // taken back or sent again after the death, encoded again from the input,
  // and only item 0 is charged.
  constexpr int n = 400;
  procpool::semaphore ran(0);
  procpool::pool p(
      [&](const std::string& s) {
        int k = number(s);
        if (s != text(k)) return -2;
        if (k < 0) return k;
        if (k != 0) {
          ran.release();
          return k;
        }
        for (int i = 1; i < n; ++i)
          if (!ran.try_acquire_for(bound)) return -1;
        ::raise(SIGKILL);
        return 0;
      },
      two_workers_chunk_1());
  std::vector<std::string> warm;
  for (int i = 0; i < 5000; ++i) warm.push_back(text(-1 - i));
  p.map(warm);
  std::vector<std::string> xs;
  for (int i = 0; i < n; ++i) xs.push_back(text(i));
  try {
    p.map(xs);
    FAIL("worker_died expected");
  } catch (const procpool::worker_died& e) {
    CHECK(e.index() == std::optional<std::size_t>(0));
  }
  xs.erase(xs.begin());
  std::vector<int> want;
  for (int i = 1; i < n; ++i) want.push_back(i);
  CHECK(p.map(xs) == want);
}

namespace {

/// An item with an encoding of its own that throws when an item is encoded
/// a second time while `flaky_refuses`: the parent encodes an item once when
/// it cuts its chunk, and again only when that chunk, kept nowhere, is sent
/// again.
struct flaky {
  int v = 0;
};
constexpr int flaky_items = 10;
int flaky_encodes[flaky_items] = {};  // the parent's counts (it alone encodes)
bool flaky_refuses = false;
void procpool_encode(procpool::writer& out, const flaky& f) {
  if (++flaky_encodes[f.v] > 1 && flaky_refuses)
    throw std::runtime_error("flaky's encoder refused item " + std::to_string(f.v));
  procpool::encode(out, f.v);
}
flaky procpool_decode(procpool::reader& in, procpool::type_tag<flaky>) {
  return flaky{procpool::decode<int>(in)};
}

}  // namespace

TEST_CASE("an encoder that throws when a chunk is encoded again fails the map at that chunk",
          "[pool][sched]") {
  // Item 0 waits for the others (a bounded wait: they may never run); the
  // chunks queued behind it are taken back for the idle worker and encoded
  // again, and the encoder now throws. The map fails with the encoder's
  // error, the pool goes on.
  constexpr int n = flaky_items;
  procpool::semaphore ran(0);
  procpool::pool p(
      [&](const flaky& f) {
        if (f.v != 0) {
          ran.release();
          return f.v;
        }
        for (int i = 1; i < n; ++i)
          if (!ran.try_acquire_for(2s)) break;
        return 0;
      },
      two_workers_chunk_1());
  std::vector<flaky> in;
  for (int i = 0; i < n; ++i) in.push_back(flaky{i});
  flaky_refuses = true;
  bool failed = false;
  try {
    p.map(in, procpool::map_options{1});
  } catch (const std::runtime_error& e) {
    failed = std::string(e.what()).find("flaky's encoder refused") != std::string::npos;
  }
  flaky_refuses = false;
  CHECK(failed);
  int again = 0;
  for (int c : flaky_encodes) again += c > 1;
  CHECK(again > 0);  // a chunk was encoded again
  std::vector<int> want(n);
  for (int i = 0; i < n; ++i) want[std::size_t(i)] = i;
  CHECK(p.map(in) == want);
}
