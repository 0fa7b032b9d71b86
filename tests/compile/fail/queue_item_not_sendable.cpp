// One check, one sentence per role, for every sent type: a queue's item type.
// expect: procpool::queue<T>: T cannot be sent between processes
// also: procpool cannot send raw pointers
#include <procpool/detail/calls/call_checks.hpp>

static_assert(procpool::detail::check_sendable<procpool::detail::sent_as::queue_item, int*>());

int main() {}
