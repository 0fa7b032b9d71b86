// Counts the primes below 10^7 over the ranks of an MPI job: rank 0 cuts the
// range into blocks, the other ranks count the primes of each block, and with
// `--local` each rank also spreads its blocks over every core of its host.
//
//   mpirun -n 4 ./mpi_map            # rank 0 dispatches, ranks 1-3 count
//   mpirun -n 3 ./mpi_map --local    # hierarchical: ranks 1-2 each run a local pool
//   ./mpi_map                        # alone: rank 0 counts everything itself
#include <fmt/format.h>
#include <procpool/mpi.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

// The primes in [lo, hi), by a sieve of the block with the primes up to sqrt(hi).
std::uint64_t count_primes(std::pair<std::uint64_t, std::uint64_t> block) {
  auto [lo, hi] = block;
  std::vector<bool> composite(hi - lo, false);
  for (std::uint64_t p = 2; p * p < hi; ++p) {
    for (std::uint64_t m = std::max(p * p, (lo + p - 1) / p * p); m < hi; m += p)
      composite[m - lo] = true;
  }
  std::uint64_t n = 0;
  for (std::uint64_t x = std::max<std::uint64_t>(lo, 2); x < hi; ++x) n += !composite[x - lo];
  return n;
}

int main(int argc, char** argv) {
  procpool::mpi::session mpi(argc, argv);
  procpool::mpi::pool_options options;
  if (argc > 1 && std::strcmp(argv[1], "--local") == 0) options.local = procpool::pool_options{};
  procpool::mpi::pool p(count_primes, options);  // ranks other than 0 serve here
  if (!p.is_root()) return 0;

  const std::uint64_t limit = 10'000'000;
  const std::uint64_t block = 100'000;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> blocks;
  for (std::uint64_t lo = 0; lo < limit; lo += block) blocks.emplace_back(lo, lo + block);

  std::vector<std::uint64_t> counts = p.map(blocks);  // in the order of the blocks
  std::uint64_t total = std::accumulate(counts.begin(), counts.end(), std::uint64_t(0));
  fmt::print("{} primes below {}\n", total, limit);
  fmt::print(stderr, "({} blocks over {} serving rank(s){})\n", blocks.size(), p.serving_ranks(),
             options.local ? ", each with a local pool" : "");
}
