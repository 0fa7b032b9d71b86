// Timeouts and deadlines, once for every blocking call of the library: any
// std::chrono duration (integer or floating-point, any unit, huge or negative)
// and any clock's time point become a deadline on the steady clock, or none
// (wait forever) when the deadline lies beyond what the clock can count.
//
// Waits measure time on the steady clock only: the system clock may jump, and
// a wait of 50 ms must not last an hour because an administrator set the date.
// A deadline given on another clock is turned into "what is left until then"
// once, when the call begins, as std::condition_variable::wait_until does.
#pragma once

#include <chrono>
#include <optional>
#include <type_traits>

namespace procpool::detail {

using steady = std::chrono::steady_clock;

/// `d` in nanoseconds, rounded up (so a wait never ends early), 0 for a
/// negative duration, saturated at `nanoseconds::max()` (never overflows,
/// whatever the representation of `d`).
template <class Rep, class Period>
constexpr std::chrono::nanoseconds to_timeout(
    const std::chrono::duration<Rep, Period>& d) noexcept {
  using std::chrono::nanoseconds;
  if (!(d > std::chrono::duration<Rep, Period>::zero())) return nanoseconds::zero();  // NaN too
  if (std::chrono::duration<long double, std::nano>(d).count() >=
      static_cast<long double>(nanoseconds::max().count())) {
    return nanoseconds::max();
  }
  return std::chrono::ceil<nanoseconds>(d);
}

/// The steady-clock deadline `d` from now; empty (no deadline: wait forever)
/// when it lies beyond the clock's range. A zero or negative `d` gives now:
/// the caller tries once and gives up.
template <class Rep, class Period>
std::optional<steady::time_point> deadline_after(
    const std::chrono::duration<Rep, Period>& d) noexcept {
  auto now = steady::now();
  auto ns = to_timeout(d);
  if (ns >= steady::time_point::max() - now) return std::nullopt;
  return now + std::chrono::duration_cast<steady::duration>(ns);
}

/// `tp` as a steady-clock deadline: itself (rounded up) when `Clock` is the
/// steady clock, otherwise now plus what is left until `tp` on `Clock`; empty
/// (no deadline) when that lies beyond the steady clock's range.
template <class Clock, class Duration>
std::optional<steady::time_point> to_steady(
    const std::chrono::time_point<Clock, Duration>& tp) noexcept {
  if constexpr (std::is_same_v<Clock, steady>) {
    if (tp.time_since_epoch() <= Duration::zero()) return steady::now();
    if (std::chrono::duration<long double, std::nano>(tp.time_since_epoch()).count() >=
        static_cast<long double>(steady::time_point::max().time_since_epoch().count())) {
      return std::nullopt;
    }
    return std::chrono::ceil<steady::duration>(tp);
  } else {
    auto now = Clock::now();
    if (tp <= now) return steady::now();  // also keeps `tp - now` from overflowing for min()
    return deadline_after(tp - now);
  }
}

}  // namespace procpool::detail
