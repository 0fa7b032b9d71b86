// A process-shared robust mutex that its holder may lock again, for
// procpool::recursive_mutex: robust_mutex.hpp's template with the recursive
// kind (see there for why recursion is glibc's, not ours).
#pragma once

#include "robust_mutex.hpp"

namespace procpool::detail {

/// A robust, recursive, process-shared mutex. Reports a dead holder as
/// `robust_mutex` does; the recursion count restarts at 1 for the new holder.
using robust_recursive_mutex = basic_robust_mutex<robust_kind::recursive>;

}  // namespace procpool::detail
