// Items of imap that derive from another struct.
// expect: procpool: the items of this range cannot be sent to a worker process
// also: procpool cannot send a struct with a base class field by field
#include <procpool/pool.hpp>

#include <string>
#include <vector>

struct base {
  int id;
};
struct derived : base {
  std::string name;
};

void run() {
  procpool::pool p([](const derived& d) { return d.id; });
  for (int r : p.imap(std::vector<derived>(2))) static_cast<void>(r);
}
