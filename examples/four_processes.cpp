// Four processes, each given a number, print a line each.
//
// The Python this mirrors:
//
//     def worker(num):
//         print(f"Process {num} gave a number: {num * 10}")
//
//     processes = [Process(target=worker, args=(i,)) for i in range(1, 5)]
//     for p in processes: p.start()
//     for p in processes: p.join()
//
// The processes run at once, so the lines come in any order; each is printed
// whole by one write and flushed when its process ends, never twice.
#include <fmt/format.h>
#include <procpool/process.hpp>

#include <vector>

void worker(int num) {
  fmt::print("Process {} gave a number: {}\n", num, num * 10);
}

int main() {
  std::vector<procpool::process> processes;
  for (int i = 1; i <= 4; ++i) processes.emplace_back(worker, i);  // each starts here
  for (auto& p : processes) p.join();
}
