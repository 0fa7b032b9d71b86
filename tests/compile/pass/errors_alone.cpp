// errors.hpp alone declares every exception type procpool throws (the MPI
// engine's aside), so a caller catches any of them without the header that
// raises it.
#include <procpool/errors.hpp>

#include <type_traits>

template <class... E>
constexpr bool all_errors() {
  return (std::is_base_of_v<procpool::error, E> && ...);
}

static_assert(
    all_errors<procpool::task_error, procpool::worker_died, procpool::timeout_error,
               procpool::decode_error, procpool::pool_closed, procpool::channel_closed,
               procpool::channel_corrupted, procpool::message_too_large, procpool::segment_error,
               procpool::segment_not_found, procpool::segment_exists, procpool::segment_mismatch,
               procpool::segment_permission_error, procpool::broken_barrier>());

int main() {
  try {
    throw procpool::broken_barrier(procpool::broken_barrier::reason::aborted, 0, 0);
  } catch (const procpool::error&) {
  }
  try {
    throw procpool::segment_not_found("name", "no segment is named name");
  } catch (const procpool::segment_error&) {
  }
}
