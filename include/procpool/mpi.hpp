/// @file
/// `mpi::pool<F>`: the same `map`, `imap`, `imap_unordered`, `starmap` and
/// `submit` as `procpool::pool`, over the ranks of an MPI job instead of forked
/// workers — for work that outgrows one machine.
///
/// Optional: include it only where MPI is installed (it includes `<mpi.h>`);
/// the rest of procpool never depends on MPI. Link with `MPI::MPI_CXX`.
///
/// The program is SPMD: every rank runs it, and every rank constructs the same
/// pools in the same order. Rank 0 dispatches; on every other rank the
/// constructor serves chunks until rank 0's pool is joined, then returns.
///
/// ```cpp
/// int main(int argc, char** argv) {
///   procpool::mpi::session mpi(argc, argv);
///   procpool::mpi::pool p([](int x) { return x * x; });  // ranks 1.. serve here
///   if (!p.is_root()) return 0;                           // their share is done
///   std::vector<int> squares = p.map(std::vector<int>{1, 2, 3});
/// }
/// ```
///
/// Run with `mpirun -n 4 ./program` (three serving ranks). See docs/scale-out.md.
#pragma once

#include "mpi/errors.hpp"
#include "mpi/pool.hpp"
#include "mpi/session.hpp"
