// mpi::pool under mpirun (and alone). Every rank runs this program and every
// test case (SPMD): each case constructs the same pools in the same order;
// on serving ranks the constructor serves, and the case then checks what a
// serving rank can (calls there throw). Cases use no SECTIONs, which would
// run a case a different number of times on rank 0 than elsewhere.
#define CATCH_CONFIG_RUNNER
#define CATCH_CONFIG_NO_POSIX_SIGNALS
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>
#include <catch2/catch.hpp>
#include <procpool/mpi.hpp>
#include <procpool/pool.hpp>
#include <support/support.hpp>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

namespace {

int world_rank = 0;
int world_size = 1;
int serving() {
  return std::max(world_size - 1, 1);
}

struct sample {
  int id;
  std::string name;
  std::vector<double> values;
  bool operator==(const sample& o) const {
    return id == o.id && name == o.name && values == o.values;
  }
};

// A type whose decoding fails for one value, to corrupt a chunk on its way.
struct fragile {
  int value;
  friend void procpool_encode(procpool::writer& out, const fragile& f) {
    procpool::encode(out, f.value);
  }
  friend fragile procpool_decode(procpool::reader& in, procpool::type_tag<fragile>) {
    int v = procpool::decode<int>(in);
    if (v == 13) throw procpool::decode_error(in.offset(), "fragile: 13 is not allowed");
    return {v};
  }
};

template <class T>
std::vector<T> collect_unordered(std::vector<std::pair<std::size_t, T>> pairs, std::size_t n) {
  std::vector<std::optional<T>> slots(n);
  for (auto& [i, v] : pairs) {
    REQUIRE(i < n);
    REQUIRE_FALSE(slots[i].has_value());
    slots[i] = std::move(v);
  }
  std::vector<T> out;
  for (auto& s : slots) {
    REQUIRE(s.has_value());
    out.push_back(std::move(*s));
  }
  return out;
}

}  // namespace

TEST_CASE("every kind of call over ranks equals the local pool's, for ints", "[mpi]") {
  auto f = [](int x) { return x * 3 - 1; };
  procpool::mpi::pool p(f);
  if (!p.is_root()) {
    CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::error);
    return;
  }
  CHECK(p.serving_ranks() == unsigned(serving()));
  std::vector<int> xs(10007);
  std::iota(xs.begin(), xs.end(), -500);
  procpool::pool local(f, 2);
  auto expected = local.map(xs);
  CHECK(p.map(xs) == expected);

  std::vector<int> ordered;
  for (int r : p.imap(xs)) ordered.push_back(r);
  CHECK(ordered == expected);

  std::vector<std::pair<std::size_t, int>> pairs;
  for (auto& pr : p.imap_unordered(xs)) pairs.push_back(pr);
  CHECK(collect_unordered(pairs, xs.size()) == expected);

  auto future = p.submit(7);
  CHECK(future.get() == 20);
}

TEST_CASE("map_async and then over ranks: callbacks have run when get returns", "[mpi]") {
  auto f = [](int x) { return x * 3 - 1; };
  procpool::mpi::pool p(f);
  if (!p.is_root()) return;
  std::vector<int> xs(1000);
  std::iota(xs.begin(), xs.end(), -500);
  std::vector<int> seen;
  int task_value = 0;
  auto all = p.map_async(xs, [&](const std::vector<int>& r) { seen = r; });
  auto one = p.submit(7);
  one.then([&](const int& v) { task_value = v; });
  auto r = all.get();
  REQUIRE(r.size() == xs.size());
  CHECK(r.front() == -1501);
  CHECK(r.back() == 499 * 3 - 1);
  CHECK(one.get() == 20);
  CHECK(task_value == 20);
  CHECK(seen == r);
  std::exception_ptr error;
  auto bad = p.map_async(std::vector<int>{}, [&](const std::vector<int>& v) {
    if (!v.empty()) error = std::make_exception_ptr(std::logic_error("not empty"));
  });
  CHECK(bad.get().empty());
  CHECK_FALSE(error);
}

TEST_CASE("two threads share an mpi::pool: their calls take turns, each gets its own results",
          "[mpi][threads]") {
  // MPI is called only by the thread that holds the pool, which lets go
  // between polls: the other thread's calls go out meanwhile.
  procpool::mpi::pool p([](int x) { return x + 1; });
  if (!p.is_root()) return;
  std::atomic<int> wrong{0};
  auto run = [&](int base) {
    for (int k = 0; k < 20; ++k) {
      std::vector<int> xs(100);
      std::iota(xs.begin(), xs.end(), base + 100 * k);
      auto r = p.map(xs);
      for (std::size_t i = 0; i < xs.size(); ++i) wrong += r[i] != xs[i] + 1;
      auto f = p.submit(base + k);
      wrong += f.get() != base + k + 1;
    }
  };
  std::thread a(run, 0), b(run, 1000000);
  a.join();
  b.join();
  CHECK(wrong == 0);
}

TEST_CASE("strings, with one 8 MiB item among them, equal the local pool's", "[mpi]") {
  auto twice = [](const std::string& s) { return s + s; };
  procpool::mpi::pool p(twice);
  if (!p.is_root()) return;
  std::vector<std::string> words;
  for (int i = 0; i < 500; ++i)
    words.push_back(std::string(std::size_t(i % 37), char('a' + i % 26)));
  words.push_back(std::string(std::size_t(8) << 20, 'z'));
  procpool::pool local(twice, 2);
  CHECK(p.map(words) == local.map(words));
}

#if defined(__GLIBC__) && !defined(PROCPOOL_TEST_SANITIZED)
TEST_CASE("keep_memory: a serving rank decodes big items into memory it kept", "[mpi]") {
  // Each 4 MiB item is decoded and copied on its rank: 2,048 pages touched.
  // With the allocator as a fresh program has it, every item came in fresh
  // pages; kept, only the first few do.
  ::mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  static std::size_t ran = 0;
  ran = 0;
  auto copy = [](const std::vector<char>& v) {
    ++ran;
    return std::vector<char>(v);
  };
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  procpool::mpi::pool p(copy, o);
  if (!p.is_root()) {
    rusage after{};
    ::getrusage(RUSAGE_SELF, &after);
    long faults = after.ru_minflt - before.ru_minflt;
    INFO("items run here: " << ran << ", page faults: " << faults);
    // Measured: about 5,100 kept (the heap's first growth), 2,100 per item not.
    if (ran >= 8) CHECK(static_cast<std::size_t>(faults) < ran * 1024);
    return;
  }
  std::vector<std::vector<char>> items;
  for (std::size_t k = 0; k < 8; ++k) items.emplace_back(std::size_t(4) << 20, char('a' + k));
  for (int round = 0; round < 4; ++round) CHECK(p.map(items) == items);
}
#endif

TEST_CASE("aggregates field by field equal the local pool's", "[mpi]") {
  auto describe = [](const sample& s) {
    double sum = std::accumulate(s.values.begin(), s.values.end(), 0.0);
    return std::make_pair(s.name + "#" + std::to_string(s.id), sum);
  };
  procpool::mpi::pool p(describe);
  if (!p.is_root()) return;
  std::vector<sample> samples;
  for (int i = 0; i < 300; ++i)
    samples.push_back(
        {i, "s" + std::to_string(i), std::vector<double>(std::size_t(i % 11), 0.5 * i)});
  procpool::pool local(describe, 2);
  CHECK(p.map(samples) == local.map(samples));
}

TEST_CASE("starmap and submit with several arguments equal the local pool's", "[mpi]") {
  auto join3 = [](int a, const std::string& b, double c) {
    return std::to_string(a) + b + std::to_string(c);
  };
  procpool::mpi::pool p(join3);
  if (!p.is_root()) return;
  std::vector<std::tuple<int, std::string, double>> args;
  for (int i = 0; i < 200; ++i)
    args.emplace_back(i, std::string(std::size_t(i % 5), 'x'), i * 0.25);
  procpool::pool local(join3, 2);
  CHECK(p.starmap(args) == local.starmap(args));
  CHECK(p.submit(1, std::string("-"), 2.0).get() == "1-2.000000");
}

TEST_CASE("a function returning void runs on every item", "[mpi]") {
  procpool::mpi::pool p([](int x) {
    if (x < 0) throw std::domain_error("negative");
  });
  if (!p.is_root()) return;
  p.map(std::vector<int>(1000, 1));
  p.submit(3).get();
  std::vector<int> xs(100, 1);
  xs[42] = -1;
  CHECK_THROWS_AS(p.map(xs), procpool::task_error);
}

TEST_CASE("a second pool while one is open is refused at rank 0", "[mpi]") {
  procpool::mpi::pool p([](int x) { return x; });
  if (!p.is_root()) return;
  CHECK_THROWS_WITH(procpool::mpi::pool([](int x) { return x + 1; }),
                    Catch::Contains("already open"));
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{1, 2});
}

TEST_CASE("a million tiny items come back complete and in order", "[mpi]") {
  procpool::mpi::pool p([](std::uint32_t x) { return x ^ 0x5a5a5a5au; });
  if (!p.is_root()) return;
  std::vector<std::uint32_t> xs(1'000'000);
  std::iota(xs.begin(), xs.end(), 0u);
  auto out = p.map(xs);
  REQUIRE(out.size() == xs.size());
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) wrong += out[i] != (xs[i] ^ 0x5a5a5a5au);
  CHECK(wrong == 0);
  std::uint64_t n = 0;
  std::uint64_t sum = 0;
  for (auto r : p.imap(xs)) {
    sum += r ^ 0x5a5a5a5au;
    ++n;
  }
  CHECK(n == xs.size());
  CHECK(sum == std::uint64_t(999'999) * 1'000'000 / 2);
}

TEST_CASE("uneven work is balanced: every serving rank runs chunks, results stay in order",
          "[mpi]") {
  // Item i costs i % 7 units; some chunks are much heavier than others.
  auto work = [](int i) {
    volatile std::uint64_t x = 0;
    for (int k = 0; k < (i % 7) * 20000; ++k) x = x + std::uint64_t(k);
    return std::make_pair(i, world_rank);
  };
  procpool::mpi::pool_options o;
  o.chunk_size = 4;
  procpool::mpi::pool p(work, o);
  if (!p.is_root()) return;
  std::vector<int> xs(2000);
  std::iota(xs.begin(), xs.end(), 0);
  auto out = p.map(xs);
  std::set<int> ranks;
  for (std::size_t i = 0; i < out.size(); ++i) {
    REQUIRE(out[i].first == int(i));
    ranks.insert(out[i].second);
  }
  if (world_size == 1) {
    CHECK(ranks == std::set<int>{0});
  } else {
    CHECK(ranks.count(0) == 0);                          // rank 0 only dispatches
    CHECK(ranks.size() == std::size_t(world_size - 1));  // every serving rank took chunks
  }
}

TEST_CASE("work-conserving: as many chunks as serving ranks go one to each rank", "[mpi]") {
  // With two chunks allowed per rank, filling the lowest rank first would
  // give rank 1 two items while the last rank had none.
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  o.chunks_per_rank = 2;
  procpool::mpi::pool p([](int) { return world_rank; }, o);
  if (!p.is_root()) return;
  int serving = std::max(world_size - 1, 1);
  std::vector<int> xs(static_cast<std::size_t>(serving));
  auto out = p.map(xs);
  std::set<int> ranks(out.begin(), out.end());
  CHECK(ranks.size() == std::size_t(serving));
}

TEST_CASE("an exception on a rank raises mpi::task_error for the lowest failing item", "[mpi]") {
  procpool::mpi::pool p([](int x) {
    if (x % 1000 == 999) throw std::invalid_argument("no " + std::to_string(x));
    return x;
  });
  if (!p.is_root()) return;
  std::vector<int> xs(5000);
  std::iota(xs.begin(), xs.end(), 0);
  try {
    (void)p.map(xs);
    FAIL("map did not throw");
  } catch (const procpool::mpi::task_error& e) {
    CHECK(e.index() == 999);
    CHECK(e.type_name() == "std::invalid_argument");
    CHECK(e.message() == "no 999");
    if (world_size == 1) {
      CHECK(e.rank() == 0);
    } else {
      CHECK(e.rank() >= 1);  // a serving rank, never rank 0
      CHECK(e.rank() < world_size);
    }
    CHECK(std::string(e.what()).find("rank " + std::to_string(e.rank())) != std::string::npos);
  }
  // imap yields everything before the failing item, then raises.
  std::size_t yielded = 0;
  CHECK_THROWS_AS(
      [&] {
        for (int r : p.imap(xs)) {
          REQUIRE(r == int(yielded));
          ++yielded;
        }
      }(),
      procpool::task_error);
  CHECK(yielded == 999);
  CHECK_THROWS_AS(p.submit(1999).get(), procpool::mpi::task_error);
  // The pool stays usable.
  std::vector<int> fine(100, 1);
  CHECK(p.map(fine) == fine);
}

/// An exception with state, sent back whole from a rank.
class rank_parse_error : public std::runtime_error {
 public:
  rank_parse_error(std::string what, int line) : std::runtime_error(std::move(what)), line(line) {}
  int line;
  friend void procpool_encode(procpool::writer& out, const rank_parse_error& e) {
    procpool::encode(out, std::string(e.what()));
    procpool::encode(out, e.line);
  }
  friend rank_parse_error procpool_decode(procpool::reader& in,
                                          procpool::type_tag<rank_parse_error>) {
    auto what = procpool::decode<std::string>(in);
    return rank_parse_error(std::move(what), procpool::decode<int>(in));
  }
};

TEST_CASE("a rank's exception comes back as itself; a rank without its codec sends none", "[mpi]") {
  procpool::mpi::pool p([](int x) -> int {
    if (x == 7) throw rank_parse_error("line seven", 7);
    if (x == 8) {
      // A rank that does not know the type (as one built without it).
      procpool::detail::exception_codecs().encoders.erase(typeid(rank_parse_error).name());
      throw rank_parse_error("unknown on this rank", 8);
    }
    return x;
  });
  if (!p.is_root()) return;
  try {
    (void)p.map(std::vector<int>{1, 7});
    FAIL("map did not throw");
  } catch (const procpool::task_error& e) {
    auto o = e.original<rank_parse_error>();
    REQUIRE(o);
    CHECK(o->line == 7);
    CHECK_THROWS_AS(e.rethrow_as<rank_parse_error>(), rank_parse_error);
  }
  try {
    (void)p.submit(8).get();
    FAIL("get did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.message() == "unknown on this rank");
    CHECK_FALSE(e.original<rank_parse_error>());
  }
  // The codec is back for the next case on rank 0 (alone, rank 0 runs the items).
  procpool::register_exception<rank_parse_error>();
}

TEST_CASE("an item that cannot be decoded on the rank fails with decode_error's name", "[mpi]") {
  procpool::mpi::pool p([](const fragile& f) { return f.value * 2; });
  if (!p.is_root()) return;
  std::vector<fragile> xs;
  for (int i = 0; i < 40; ++i) xs.push_back({i});
  try {
    (void)p.map(xs);
    FAIL("map did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 13);
    CHECK(e.type_name() == "procpool::decode_error");
    CHECK(e.message().find("13 is not allowed") != std::string::npos);
  }
  xs.erase(xs.begin() + 13);
  CHECK(p.map(xs).size() == 39);
}

TEST_CASE("hierarchical mode runs each rank's chunks on a local pool", "[mpi]") {
  procpool::mpi::pool_options o;
  o.local = procpool::pool_options{};
  o.local->workers = 2;
  auto who = [](int x) {
    if (x == -1) throw std::runtime_error("minus one");
    if (x == -9) ::raise(SIGKILL);
    return std::make_tuple(x * x, int(::getpid()), int(::getppid()));
  };
  procpool::mpi::pool p(who, o);
  if (!p.is_root()) return;
  std::vector<int> xs(4000);
  std::iota(xs.begin(), xs.end(), 0);
  auto out = p.map(xs);
  std::set<int> workers;
  std::set<int> servers;  // the parents of the workers: one fork server per rank's pool
  for (std::size_t i = 0; i < out.size(); ++i) {
    REQUIRE(std::get<0>(out[i]) == int(i * i));
    workers.insert(std::get<1>(out[i]));
    servers.insert(std::get<2>(out[i]));
  }
  CHECK(servers.size() == std::size_t(serving()));     // every serving rank's local pool
  for (int r : servers) CHECK(workers.count(r) == 0);  // the function ran in the pools' workers
  CHECK(workers.size() > servers.size());

  xs[2500] = -1;
  try {
    (void)p.map(xs);
    FAIL("map did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 2500);
    CHECK(e.type_name() == "std::runtime_error");
    CHECK(e.message() == "minus one");
    CHECK(servers.count(e.pid()) == 0);  // names the local worker that ran it
  }
  // A local worker that dies is replaced by its rank's pool; rank 0 hears of it.
  xs[2500] = 2500;
  xs[3100] = -9;
  try {
    (void)p.map(xs);
    FAIL("map did not throw");
  } catch (const procpool::task_error& e) {
    CHECK(e.index() == 3100);
    CHECK(e.type_name() == "procpool::worker_died");
    CHECK(e.message().find("signal 9") != std::string::npos);
    // The message names the item as rank 0 knows it, not its place in the chunk.
    CHECK(e.message().find("item 3100") != std::string::npos);
  }
  auto [square, pid, ppid] = p.submit(12).get();
  CHECK(square == 144);
  CHECK(servers.count(ppid) == 1);
  CHECK(pid != ppid);
}

TEST_CASE("an initializer that throws on a serving rank makes every call fail, naming the rank",
          "[mpi]") {
  procpool::mpi::pool_options o;
  o.initializer = [] {
    if (world_rank == 1 || world_size == 1) throw std::runtime_error("no licence here");
  };
  if (world_size == 1) {
    CHECK_THROWS_WITH(procpool::mpi::pool([](int x) { return x; }, o),
                      Catch::Contains("no licence here"));
    return;
  }
  procpool::mpi::pool p([](int x) { return x; }, o);
  if (!p.is_root()) return;
  std::vector<int> xs(1000, 1);
  CHECK_THROWS_WITH(p.map(xs), Catch::Contains("rank 1") && Catch::Contains("no licence here"));
  CHECK_THROWS_WITH(p.map(xs), Catch::Contains("rank 1") && Catch::Contains("no licence here"));
}

TEST_CASE("ranks that build pools of different functions get a clear error at rank 0", "[mpi]") {
  if (world_size == 1) return;
  if (world_rank == 0) {
    CHECK_THROWS_WITH(procpool::mpi::pool([](int x) { return x + 1; }),
                      Catch::Contains("different function") && Catch::Contains("rank 1"));
  } else {
    procpool::mpi::pool p([](double x) { return x - 1; });  // serves until rank 0 gives up
    CHECK_FALSE(p.is_root());
  }
}

TEST_CASE("misuse: no chunks per rank, calls after close", "[mpi]") {
  procpool::mpi::pool_options o;
  o.chunks_per_rank = 0;
  CHECK_THROWS_WITH(procpool::mpi::pool([](int x) { return x; }, o),
                    Catch::Contains("chunks_per_rank"));
  procpool::mpi::pool p([](int x) { return x; });
  if (!p.is_root()) return;
  auto f = p.submit(4);
  p.close();
  CHECK(f.get() == 4);
  CHECK_THROWS_AS(p.map(std::vector<int>{1}), procpool::pool_closed);
  p.join();
}

int main(int argc, char** argv) {
  // With PROCPOOL_TEST_MPI_THREAD_MULTIPLE set, MPI is initialized here at
  // MPI_THREAD_MULTIPLE before the session: the pools' helper threads then
  // run, and every case runs with them.
  bool multiple = std::getenv("PROCPOOL_TEST_MPI_THREAD_MULTIPLE") != nullptr;
  if (multiple) {
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS ||
        provided != MPI_THREAD_MULTIPLE)
      return 3;
  }
  int rc = 0;
  {
    procpool::mpi::session mpi(argc, argv);
    world_rank = mpi.rank();
    world_size = mpi.size();
    Catch::Session session;
    rc = session.applyCommandLine(argc, argv);
    if (rc != 0) return rc;
    // Rank 0 reports; the others report only what fails.
    if (world_rank != 0) session.configData().reporterName = "compact";
    rc = session.run();
  }
  if (multiple) MPI_Finalize();
  return rc;
}
