// Processes do not share memory; threads do. A global variable changed in a
// child process is unchanged in the parent, but a shared_value is shared.
//
// The Python this mirrors:
//
//     plain = 0
//     def child(shared):
//         global plain
//         plain = 1           # the child's own copy
//         shared.value = 1    # shared memory
//
//     shared = Value("i", 0)
//     p = Process(target=child, args=(shared,)); p.start(); p.join()
//     print(plain, shared.value)   # 0 1
#include <fmt/format.h>
#include <procpool/process.hpp>
#include <procpool/shared.hpp>

#include <thread>

int plain = 0;  // an ordinary global: every process has a copy of its own

int main() {
  procpool::shared_value<int> shared;  // one int in shared memory, seen by every process

  // A forked child starts as a copy of this process. It changes its copies.
  procpool::process child([&] {
    plain = 1;        // changes the child's copy only
    shared.store(1);  // changes the one shared int
  });
  child.join();
  fmt::print("after a child process set both to 1:\n");
  fmt::print("  plain global: {}\n", plain);          // 0: the parent's copy is untouched
  fmt::print("  shared_value: {}\n", shared.load());  // 1

  // A thread runs in this same process, on this same memory.
  std::thread thread([] { plain = 2; });
  thread.join();
  fmt::print("after a thread set the global to 2:\n");
  fmt::print("  plain global: {}\n", plain);  // 2: threads share everything
}
