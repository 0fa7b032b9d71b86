// A pipe of a type that cannot cross processes: one sentence names the
// connection, the next error why the type cannot be sent.
// expect: procpool::connection<T>: T cannot be sent between processes
// also: procpool cannot send raw pointers
#include <procpool/pipe.hpp>

int main() {
  auto ends = procpool::pipe<int*>();
}
