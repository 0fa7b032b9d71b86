// A queue of a type that cannot cross processes: one sentence names the
// queue, the next error why the type cannot be sent.
// expect: procpool::queue<T>: T cannot be sent between processes
// also: procpool cannot send raw pointers
#include <procpool/queue.hpp>

int main() {
  procpool::queue<int*> q;
}
