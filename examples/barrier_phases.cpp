// Processes moving through phases in lockstep: heat spreading along a row of
// eight cells. Each of four processes computes two cells of the next row from
// the current one; nobody may start a phase before every cell of the previous
// one is written, so all of them meet at a barrier after each phase.
//
// The Python this mirrors:
//
//     def work(rank, rows, barrier):
//         for phase in range(1, 5):
//             ...compute cells 2*rank and 2*rank+1 of row `phase`...
//             barrier.wait()
//             if rank == 0:
//                 print(...)
//
//     barrier = Barrier(4)
#include <fmt/format.h>
#include <procpool/process.hpp>
#include <procpool/shared.hpp>
#include <procpool/sync.hpp>

#include <cstddef>
#include <list>
#include <string>

constexpr std::size_t cells = 8;
constexpr std::size_t workers = 4;
constexpr std::size_t phases = 4;

int main() {
  // Row p of the table is the state after phase p; row 0 is the start: hot in the middle.
  procpool::shared_array<double> rows(cells * (phases + 1));
  rows[3] = 100;
  rows[4] = 100;
  procpool::barrier barrier(workers);  // Python's Barrier(4)

  auto print_row = [&](std::size_t phase) {
    std::string line;
    for (std::size_t i = 0; i < cells; ++i) {
      line += fmt::format("{:6.1f}", rows[phase * cells + i]);
    }
    fmt::print("phase {}:{}\n", phase, line);
  };
  print_row(0);

  auto work = [&](std::size_t rank) {
    for (std::size_t phase = 1; phase <= phases; ++phase) {
      const double* before = &rows[(phase - 1) * cells];
      double* after = &rows[phase * cells];
      // This process's two cells: each becomes the mean of itself and its neighbours.
      for (std::size_t i = 2 * rank; i < 2 * rank + 2; ++i) {
        double left = i > 0 ? before[i - 1] : 0.0;
        double right = i + 1 < cells ? before[i + 1] : 0.0;
        after[i] = (left + before[i] + right) / 3;
      }
      // Wait until all four have written their cells of this phase.
      barrier.arrive_and_wait();
      if (rank == 0) print_row(phase);  // the row is complete: one process prints it
    }
  };

  std::list<procpool::process> team;
  for (std::size_t rank = 0; rank < workers; ++rank) team.emplace_back(work, rank);
  for (auto& p : team) p.join();
}
