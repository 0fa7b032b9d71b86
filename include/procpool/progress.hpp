/// @file
/// Progress of long maps: a one-line bar on a terminal, or a callback.
///
/// - `procpool::progress_info`: how far a map has come, passed to
///   `pool_options::on_progress` (items done, items in all, time elapsed,
///   rate and time left).
/// - `procpool::format_progress(info, width)`: the one-line bar the pool draws,
///   for a callback that draws its own.
///
/// ```cpp
/// procpool::pool_options o;
/// o.on_progress = [](const procpool::progress_info& p) {
///   std::fprintf(stderr, "\r%s", procpool::format_progress(p).c_str());
/// };
/// ```
///
/// Both are defined with the calls layer that reports them
/// (detail/calls/progress_reporter.hpp); this is the header to include.
#pragma once

#include "detail/calls/progress_reporter.hpp"
