// mpi::pool's costs on this machine, for the cost model of docs/scale-out.md.
// Run it with 1, 2, 3 ranks (scripts/bench-mpi does, beside mpi4py.futures on
// the same cases: mpi4py_ref.py); rank 0 prints one line per case. With
// --quick every case runs at a tiny size and only the results are checked
// (ctest does that in every build).
//
//   round trip   submit(x).get(), one item: the latency of one chunk
//   bandwidth    map over 8 MiB items returned whole: bytes moved per second
//   tiny items   map over 10^6 ints: the per-item cost when chunks are large
//   primes       primes below 10^7 in blocks of 10^5: real work, vs serial
#include <fmt/format.h>
#include <procpool/mpi.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

std::uint64_t count_primes(std::pair<std::uint64_t, std::uint64_t> block) {
  auto [lo, hi] = block;
  std::vector<bool> composite(hi - lo, false);
  for (std::uint64_t p = 2; p * p < hi; ++p)
    for (std::uint64_t m = std::max(p * p, (lo + p - 1) / p * p); m < hi; m += p)
      composite[m - lo] = true;
  std::uint64_t n = 0;
  for (std::uint64_t x = std::max<std::uint64_t>(lo, 2); x < hi; ++x) n += !composite[x - lo];
  return n;
}

[[noreturn]] void invalid(const std::string& what) {
  fmt::print(stderr, "mpi_bench: wrong result: {}\n", what);
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::session mpi(argc, argv);
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  int ranks = mpi.size();
  auto line = [&](const char* name, const std::string& figure) {
    if (!quick) fmt::print("{:>2} ranks  {:<12} {}\n", ranks, name, figure);
  };

  {  // round trip
    procpool::mpi::pool p([](int x) { return x + 1; });
    if (p.is_root()) {
      int n = quick ? 10 : 2000;
      std::vector<double> us;
      for (int i = 0; i < n; ++i) {
        auto t = clock_type::now();
        if (p.submit(i).get() != i + 1) invalid("round trip");
        us.push_back(seconds_since(t) * 1e6);
      }
      std::sort(us.begin(), us.end());
      line("round trip",
           fmt::format("median {:.1f} us, p90 {:.1f} us, p99 {:.1f} us", us[us.size() / 2],
                       us[us.size() * 9 / 10], us[us.size() * 99 / 100]));
    }
  }
  {  // bandwidth
    procpool::mpi::pool p([](const std::vector<char>& v) { return v; });
    if (p.is_root()) {
      std::size_t size = quick ? 1024 : std::size_t(8) << 20;
      std::vector<std::vector<char>> items(quick ? 2 : 32, std::vector<char>(size, 'x'));
      (void)p.map(std::vector<std::vector<char>>(2, items[0]));  // warm up
      auto t = clock_type::now();
      auto out = p.map(items);
      double s = seconds_since(t);
      if (out != items) invalid("bandwidth");
      double gib = double(items.size() * size) / double(1 << 30);
      line("bandwidth", fmt::format("{:.3f} GiB/s each way ({} items of {} MiB)", gib / s,
                                    items.size(), size >> 20));
    }
  }
  {  // tiny items
    procpool::mpi::pool p([](std::uint32_t x) { return x * 2u; });
    if (p.is_root()) {
      std::vector<std::uint32_t> xs(quick ? 1000 : 1'000'000);
      std::iota(xs.begin(), xs.end(), 0u);
      auto t = clock_type::now();
      auto out = p.map(xs);
      double s = seconds_since(t);
      for (std::size_t i = 0; i < xs.size(); ++i)
        if (out[i] != xs[i] * 2u) invalid("tiny items");
      line("tiny items",
           fmt::format("{:.1f} ns/item over {} ints", s * 1e9 / double(xs.size()), xs.size()));
    }
  }
  {  // primes
    procpool::mpi::pool p(count_primes);
    if (p.is_root()) {
      std::uint64_t limit = quick ? 100'000 : 10'000'000;
      std::vector<std::pair<std::uint64_t, std::uint64_t>> blocks;
      for (std::uint64_t lo = 0; lo < limit; lo += limit / 100)
        blocks.emplace_back(lo, lo + limit / 100);
      auto t = clock_type::now();
      std::uint64_t serial = 0;
      for (auto& b : blocks) serial += count_primes(b);
      double serial_s = seconds_since(t);
      t = clock_type::now();
      auto counts = p.map(blocks);
      double s = seconds_since(t);
      std::uint64_t total = std::accumulate(counts.begin(), counts.end(), std::uint64_t(0));
      if (total != serial || (!quick && total != 664579)) invalid("primes");
      line("primes", fmt::format("{:.3f} s (serial at rank 0: {:.3f} s, speed-up {:.2f}x)", s,
                                 serial_s, serial_s / s));
    }
  }
}
