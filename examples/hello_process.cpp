// A function run in a separate process, then joined.
//
// The Python this mirrors:
//
//     def task():
//         print("This is running in a separate process.")
//
//     p = Process(target=task)
//     p.start()
//     p.join()
//     print("Main process completed.")
//
// A procpool::process starts at construction (no separate start()), and its
// destructor joins it like std::jthread; join() also says how it ended.
#include <fmt/format.h>
#include <procpool/process.hpp>

void task() {
  fmt::print("This is running in a separate process.\n");
}

int main() {
  procpool::process p(task);
  procpool::exit_status status = p.join();  // "exited with code 0"
  fmt::print("Main process completed.\n");
  return status.success() ? 0 : 1;
}
