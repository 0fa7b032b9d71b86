// A pool, an executor, their futures and ranges used by many threads at
// once: every call kind mixed over eight threads while workers die, waits on
// two pools in opposite orders, ranges dropped while another thread drives,
// and terminate() from one thread while the others are in calls. Run under
// ThreadSanitizer too (the tsan preset).
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <support/support.hpp>

#include <signal.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using namespace std::chrono_literals;
using procpool::pool;

namespace threads_test {

int triple(int x) {
  if (x == -9) ::raise(SIGKILL);
  return 3 * x;
}

int add(int a, int b) {
  return a + b;
}

std::vector<int> iota_from(int first, std::size_t n) {
  std::vector<int> xs(n);
  std::iota(xs.begin(), xs.end(), first);
  return xs;
}

}  // namespace threads_test

using namespace threads_test;

TEST_CASE("eight threads mixing every call kind on one pool, with workers dying meanwhile",
          "[threads]") {
  pool p(triple, 3u);
  std::atomic<int> wrong{0}, deaths{0}, unexpected{0};
  std::vector<std::string> errors(8);
  auto run = [&](int t) {
    for (int k = 0; k < 40; ++k) {
      int base = t * 100000 + k * 100;
      try {
        switch ((t + k) % 8) {
          case 0: {  // map
            auto xs = iota_from(base, 37);
            auto r = p.map(xs);
            for (std::size_t i = 0; i < xs.size(); ++i) wrong += r[i] != 3 * xs[i];
            break;
          }
          case 1: {  // imap, read to the end
            auto xs = iota_from(base, 23);
            std::size_t i = 0;
            for (int v : p.imap(xs)) wrong += v != 3 * xs[i++];
            wrong += i != xs.size();
            break;
          }
          case 2: {  // imap_unordered: every index once
            auto xs = iota_from(base, 19);
            std::vector<int> seen(xs.size(), 0);
            for (auto [i, v] : p.imap_unordered(xs)) {
              wrong += v != 3 * xs[i];
              ++seen[i];
            }
            wrong += std::count(seen.begin(), seen.end(), 1) != std::ptrdiff_t(xs.size());
            break;
          }
          case 3: {  // submit, then get
            auto f = p.submit(base);
            wrong += f.get() != 3 * base;
            break;
          }
          case 4: {  // several futures, waited on together, then as_completed
            std::vector<procpool::future<int>> fs;
            for (int i = 0; i < 5; ++i) fs.push_back(p.submit(base + i));
            auto r = procpool::wait(fs, procpool::return_when::all_completed, 60s);
            wrong += r.done.size() != 5;
            int sum = 0;
            for (auto& f : procpool::as_completed(fs)) sum += f.get();
            wrong += sum != 3 * (5 * base + 10);
            break;
          }
          case 5: {  // a range dropped after one result; its input freed at once
            auto xs = std::make_unique<std::vector<int>>(iota_from(base, 500));
            {
              auto range = p.imap(*xs, procpool::map_options{7});
              auto it = range.begin();
              wrong += *it != 3 * base;
            }
            xs.reset();  // nothing may read it now (AddressSanitizer would see it)
            break;
          }
          case 6: {  // a worker killed mid-map: worker_died for this call only
            auto xs = iota_from(base, 10);
            xs[4] = -9;
            try {
              (void)p.map(xs);
              ++unexpected;
            } catch (const procpool::worker_died& e) {
              ++deaths;
              wrong += e.index() != std::optional<std::size_t>(4);
            }
            break;
          }
          case 7: {  // futures cancelled or dropped unwaited, and one polled
            auto a = p.submit(base);
            auto b = p.submit(base + 1);
            (void)b.cancel();  // true or false: either way it is settled
            while (!a.wait_for(1ms)) {
            }
            wrong += a.get() != 3 * base;
            break;
          }
        }
      } catch (const std::exception& e) {
        ++unexpected;
        errors[std::size_t(t)] = e.what();
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) threads.emplace_back(run, t);
  for (auto& t : threads) t.join();
  for (auto& e : errors) INFO(e);
  CHECK(wrong == 0);
  CHECK(unexpected == 0);
  CHECK(deaths == 40);  // every thread's case 6, five times each
  CHECK(p.map(iota_from(0, 10)) == std::vector<int>{0, 3, 6, 9, 12, 15, 18, 21, 24, 27});
}

TEST_CASE("eight threads sharing an executor: submit, starmap and map, all answered", "[threads]") {
  procpool::executor ex(2);
  std::atomic<int> wrong{0};
  auto run = [&](int t) {
    for (int k = 0; k < 30; ++k) {
      int base = t * 1000 + k;
      wrong += ex.submit(&add, base, 1).get() != base + 1;
      std::vector<std::tuple<int, int>> pairs{{base, 2}, {base, 3}};
      auto r = ex.starmap(&add, pairs);
      wrong += r != std::vector<int>{base + 2, base + 3};
      auto m = ex.map(&triple, std::vector<int>{base, base + 1});
      wrong += m != std::vector<int>{3 * base, 3 * base + 3};
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) threads.emplace_back(run, t);
  for (auto& t : threads) t.join();
  CHECK(wrong == 0);
}

TEST_CASE("executor::shutdown from a second thread while the first waits on its futures",
          "[threads]") {
  procpool::executor ex(2);
  std::vector<procpool::future<int>> fs;
  for (int i = 0; i < 20; ++i) fs.push_back(ex.submit(&add, i, 1));
  std::atomic<int> sum{0};
  std::thread waiter([&] {
    for (auto& f : fs) sum += f.get();
  });
  std::thread stopper([&] { ex.shutdown(true); });  // waits for the work, then stops
  stopper.join();
  waiter.join();
  CHECK(sum == 210);  // 1 + 2 + ... + 20
  CHECK_THROWS_AS(ex.submit(&add, 1, 1), procpool::pool_closed);
}

TEST_CASE("two threads waiting on futures of two pools, in opposite orders, never deadlock",
          "[threads]") {
  pool a(triple, 1u);
  pool b(triple, 1u);
  std::atomic<int> wrong{0};
  auto run = [&](bool a_first) {
    for (int k = 0; k < 100; ++k) {
      std::vector<procpool::future<int>> fs;
      fs.push_back(a_first ? a.submit(k) : b.submit(k));
      fs.push_back(a_first ? b.submit(k + 1) : a.submit(k + 1));
      auto r = procpool::wait(fs, procpool::return_when::all_completed, 60s);
      wrong += r.done.size() != 2;
      wrong += fs[0].get() != 3 * k;
      wrong += fs[1].get() != 3 * (k + 1);
    }
  };
  std::thread one(run, true);
  std::thread two(run, false);
  one.join();
  two.join();
  CHECK(wrong == 0);
}

TEST_CASE("terminate from one thread while seven are in calls: every call ends, none hangs",
          "[threads]") {
  procpool_test::go_signal running;
  pool p(
      [&](int x) {
        if (x % 2 == 0) {  // every call has such an item: none ends by itself
          running.give();
          procpool_test::block_forever();
        }
        return x;
      },
      2u);
  std::atomic<int> closed{0}, other{0};
  auto run = [&](int t) {
    try {
      switch (t % 3) {
        case 0:
          (void)p.map(iota_from(t * 10, 10));
          break;
        case 1:
          (void)p.submit(t * 10).get();
          break;
        case 2:
          for (int v : p.imap(iota_from(t * 10, 10))) (void)v;
          break;
      }
      ++other;
    } catch (const procpool::pool_closed&) {
      ++closed;
    } catch (...) {
      ++other;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 7; ++t) threads.emplace_back(run, t);
  running.await();
  p.terminate();
  for (auto& t : threads) t.join();
  CHECK(closed == 7);
  CHECK(other == 0);
  CHECK_THROWS_AS(p.submit(1), procpool::pool_closed);
}
