// A serving rank dies (SIGKILL) while it runs an item. Two ways to run it:
//
//   mpirun -n 3 rank_death abort
//       Open MPI's default: the runtime ends the whole job and names the rank
//       and the signal (tests/mpi/expect_abort.cmake checks that, and that no
//       rank is left waiting).
//   mpirun --enable-recovery -n 3 rank_death recover
//       the job goes on; rank 0's pool gives the rank up after rank_timeout,
//       the call raises rank_failed naming it, and the pool goes on with the
//       other rank; after it is joined, the next pool is made over the ranks
//       left. Prints "recovered" when every check held (then ends the job
//       with MPI_Abort: MPI_Finalize would wait for the dead rank); exits 1
//       otherwise.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>
#include <procpool/mpi.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

int main(int argc, char** argv) {
  procpool::mpi::session mpi(argc, argv);
  bool recover = argc > 1 && std::strcmp(argv[1], "recover") == 0;
  procpool::mpi::pool_options o;
  o.chunk_size = 1;
  if (recover) o.rank_timeout = std::chrono::seconds(2);
  procpool::mpi::pool p(
      [](int x) {
        if (x < 0) ::raise(SIGKILL);
        return 2 * x;
      },
      o);
  auto next_f = [](int x) { return std::make_pair(x + 1, int(::getpid())); };
  if (!p.is_root()) {
    procpool::mpi::pool q(next_f, o);  // the next pool, made by the live ranks
    return 0;
  }

  std::vector<int> xs(200);
  std::iota(xs.begin(), xs.end(), 0);
  xs[60] = -1;
  try {
    (void)p.map(xs);
    fmt::print("map returned although a rank died\n");
    return 1;
  } catch (const procpool::mpi::rank_failed& e) {
    fmt::print("rank_failed: {}\n", e.what());
    if (e.rank() < 1 || e.rank() >= mpi.size() || e.index() > 60) return 1;
  }
  // The other rank serves on.
  xs[60] = 60;
  auto out = p.map(xs);
  for (std::size_t i = 0; i < xs.size(); ++i)
    if (out[i] != 2 * xs[i]) return 1;
  if (p.submit(21).get() != 42) return 1;
  p.join();
  // The next pool starts over the live ranks (the dead one cannot join a
  // collective call) and uses them all.
  procpool::mpi::pool q(next_f, o);
  if (q.serving_ranks() != unsigned(std::max(mpi.size() - 2, 1))) return 1;
  auto next = q.map(xs);
  for (std::size_t i = 0; i < xs.size(); ++i)
    if (next[i].first != xs[i] + 1) return 1;
  q.join();
  fmt::print("recovered\n");
  std::fflush(stdout);
  // MPI_Finalize waits for every rank, the dead one included, and may never
  // return (seen under AddressSanitizer): end the job instead.
  mpi.abort(0);
}
