// A real task: count the primes below a bound, first with a serial loop, then
// with a pool of worker processes, and compare.
//
// Each number is tested by dividing it by the primes up to its square root:
// CPU-bound work with no shared state, the kind a pool speeds up by about the
// number of cores. The range is cut into blocks, and the serial loop and the
// pool run the very same function over the very same blocks:
//
//     serial = sum(count_block(start) for start in starts)
//     pooled = sum(count for count in pool.imap_unordered(count_block, starts))
//
// Exits with 1 when the two counts differ or are not the known answer.
#include <fmt/format.h>
#include <procpool/pool.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace {

// An optimized build counts below 10^7; an unoptimized one (a Debug or
// sanitizer build, where NDEBUG is not defined) below 2 * 10^6, to stay quick.
#ifdef NDEBUG
constexpr std::uint32_t bound = 10'000'000;
constexpr std::uint32_t known_count = 664'579;
constexpr const char* build_kind = "optimized build";
#else
constexpr std::uint32_t bound = 2'000'000;
constexpr std::uint32_t known_count = 148'933;
constexpr const char* build_kind = "unoptimized build, so a smaller bound";
#endif
constexpr std::uint32_t block_size = 100'000;

// The primes whose square is below `bound`, by a small sieve: the divisors to try.
std::vector<std::uint32_t> small_primes() {
  std::uint32_t limit = 1;
  while (limit * limit < bound) ++limit;
  std::vector<bool> composite(limit + 1);
  std::vector<std::uint32_t> primes;
  for (std::uint32_t p = 2; p <= limit; ++p) {
    if (composite[p]) continue;
    primes.push_back(p);
    for (std::uint32_t m = p * p; m <= limit; m += p) composite[m] = true;
  }
  return primes;
}

bool is_prime(std::uint32_t n, const std::vector<std::uint32_t>& primes) {
  if (n < 2) return false;
  for (std::uint32_t p : primes) {
    if (p * p > n) break;
    if (n % p == 0) return false;
  }
  return true;
}

// The number of primes in [start, start + block_size), below `bound`.
std::uint32_t count_block(std::uint32_t start, const std::vector<std::uint32_t>& primes) {
  std::uint32_t end = std::min(start + block_size, bound);
  std::uint32_t count = 0;
  for (std::uint32_t n = start; n < end; ++n) count += is_prime(n, primes) ? 1u : 0u;
  return count;
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

int main() {
  std::vector<std::uint32_t> primes = small_primes();
  std::vector<std::uint32_t> starts;
  for (std::uint32_t s = 0; s < bound; s += block_size) starts.push_back(s);

  // The workers are forks of this process: `primes` is already in their
  // memory, so the lambda captures it by reference and nothing is copied.
  procpool::pool pool([&primes](std::uint32_t start) { return count_block(start, primes); });

  auto t0 = std::chrono::steady_clock::now();
  std::uint32_t serial = 0;
  for (std::uint32_t s : starts) serial += count_block(s, primes);
  double serial_ms = milliseconds_since(t0);

  // A sum does not care about order: take each block's count as soon as it
  // is done (Python's imap_unordered), as an (index, result) pair.
  auto t1 = std::chrono::steady_clock::now();
  std::uint32_t pooled = 0;
  for (const auto& [index, count] : pool.imap_unordered(starts)) pooled += count;
  double pooled_ms = milliseconds_since(t1);

  fmt::print("Primes below {} ({}), in {} blocks\n", bound, build_kind, starts.size());
  fmt::print("  serial loop         {:>7} primes {:8.1f} ms\n", serial, serial_ms);
  fmt::print("  pool of {} workers   {:>7} primes {:8.1f} ms  speed-up {:.2f}x\n", pool.workers(),
             pooled, pooled_ms, serial_ms / pooled_ms);

  if (serial != known_count || pooled != known_count) {
    fmt::print("wrong: expected {} primes\n", known_count);
    return 1;
  }
}
