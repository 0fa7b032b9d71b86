// mpi::pool at the edges of a job, one case per run (each needs its own
// mpirun line; tests/mpi/CMakeLists.txt gives them):
//
//   eager       (--mca btl tcp,self) results of 1 MiB, above TCP's eager
//               limit, and a rank that hangs after sending one: rank_timeout
//               still fires, and the pool goes on with the other rank.
//   slow        a live but slow rank is given up; the pool is joined and the
//               next pool is made and used at once (over the ranks left); the
//               job then ends normally once the slow rank is done.
//   root_death  (--enable-recovery) rank 0 dies while the others serve: they
//               notice and leave.
//   outlive     the pool outlives the session at rank 0: the session says so
//               and joins it, and the job ends.
//   progress    progress = true draws the bar through mpirun's terminal.
//
// Each prints "<case>: ok" (once, at rank 0, or per rank for root_death)
// when every check held, and exits 1 otherwise.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>
#include <procpool/mpi.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

int world_rank = 0;

std::vector<int> iota(int n) {
  std::vector<int> xs(static_cast<std::size_t>(n));
  std::iota(xs.begin(), xs.end(), 0);
  return xs;
}

int plus_one(int x) {
  return x + 1;
}

int fail(const std::string& why) {
  fmt::print("FAILED on rank {}: {}\n", world_rank, why);
  std::fflush(stdout);
  return 1;
}

int eager(procpool::mpi::session& mpi) {
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  o.rank_timeout = std::chrono::seconds(1);
  procpool::mpi::pool p(
      [](int x) {
        if (x == 1)
          for (;;) ::pause();  // hangs, after its rank sent item 0's megabyte
        return std::vector<char>(std::size_t(1) << 20, char(x));
      },
      o);
  if (!p.is_root()) return 0;
  auto start = std::chrono::steady_clock::now();
  try {
    (void)p.map(iota(12));
    return fail("map returned although a rank hangs");
  } catch (const procpool::mpi::rank_failed& e) {
    fmt::print("rank_failed: {}\n", e.what());
    if (e.index() > 1) return fail("rank_failed names an item the rank did not hold");
  }
  auto waited = std::chrono::steady_clock::now() - start;
  if (waited > std::chrono::seconds(20)) return fail("rank_timeout fired too late");
  // The other rank serves on, megabyte results included.
  std::vector<int> xs{0, 2, 3, 4, 5, 6, 7, 8};
  auto out = p.map(xs);
  for (std::size_t i = 0; i < xs.size(); ++i)
    if (out[i].size() != (std::size_t(1) << 20) || out[i][100] != char(xs[i]))
      return fail("a megabyte result came back wrong");
  fmt::print("eager: ok\n");
  std::fflush(stdout);
  mpi.abort(0);  // the hung rank never leaves its item
}

int slow() {
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  o.rank_timeout = std::chrono::seconds(1);
  procpool::mpi::pool p(
      [](int x) {
        if (x == 5) std::this_thread::sleep_for(std::chrono::seconds(3));  // slow, not dead
        return std::vector<char>(std::size_t(64) << 10, char(x));          // above eager limits
      },
      o);
  if (p.is_root()) {
    try {
      (void)p.map(iota(40));
      return fail("map returned although a rank was silent past rank_timeout");
    } catch (const procpool::mpi::rank_failed& e) {
      fmt::print("rank_failed: {}\n", e.what());
    }
    p.join();
  }
  // The next pool is made at once, over the ranks left; the slow rank, done
  // with its item later, learns it was given up and serves no more pools.
  procpool::mpi::pool q(&plus_one);
  if (q.is_root()) {
    auto xs = iota(1000);
    auto out = q.map(xs);
    for (std::size_t i = 0; i < xs.size(); ++i)
      if (out[i] != xs[i] + 1) return fail("the next pool returned a wrong result");
    q.join();
  }
  procpool::mpi::pool r(&plus_one);  // and the one after
  if (!r.is_root()) return 0;
  if (r.submit(41).get() != 42) return fail("the third pool returned a wrong result");
  fmt::print("slow: ok\n");
  return 0;
}

int root_death() {
  try {
    procpool::mpi::pool p(&plus_one);
    if (p.is_root()) {
      if (p.submit(1).get() != 2) return fail("submit returned a wrong result");
      std::fflush(stdout);
      ::raise(SIGKILL);
    }
    return fail("the serving rank returned from the constructor although rank 0 died");
  } catch (const procpool::error& e) {
    fmt::print("left: {}\n", e.what());
    std::fflush(stdout);
    std::_Exit(0);  // MPI_Finalize would wait for rank 0
  }
}

int progress() {
  procpool::mpi::pool_options o;
  o.progress = true;
  o.chunk_size = 10;
  procpool::mpi::pool p(&plus_one, o);
  if (!p.is_root()) return 0;
  auto out = p.map(iota(3000));
  if (out.size() != 3000) return fail("map returned too few results");
  fmt::print("progress: ok\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "outlive") {
    // The pool is made inside the session's lifetime but outlives it.
    std::optional<procpool::mpi::pool<int (*)(int)>> p;
    {
      procpool::mpi::session mpi(argc, argv);
      world_rank = mpi.rank();
      p.emplace(&plus_one);
      if (p->is_root() && p->map(iota(100)).back() != 100) return fail("map returned wrong");
    }
    if (p->is_root()) fmt::print("outlive: ok\n");
    return 0;
  }
  procpool::mpi::session mpi(argc, argv);
  world_rank = mpi.rank();
  if (mode == "eager") return eager(mpi);
  if (mode == "slow") return slow();
  if (mode == "root_death") return root_death();
  if (mode == "progress") return progress();
  return fail("unknown mode " + mode);
}
