// What C++20 adds to the pool's surface: designated initializers for
// pool_options and views as inputs. Built in every mode; the cases exist
// only when compiled as C++20 (the cxx20 presets), and hold none in C++17.
#include <procpool/pool.hpp>

#include <catch2/catch.hpp>
#include <vector>

#if __cplusplus >= 202002L
#include <ranges>

using namespace std::chrono_literals;

// GCC 12 warns when a designated initializer leaves members out (GCC 13
// does not); leaving them at their defaults is the point here.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif

TEST_CASE("pool_options take designated initializers", "[pool][cxx20]") {
  procpool::pool p([](int x) { return x + 1; },
                   {.workers = 2, .chunk_size = 3, .task_timeout = 5s});
  CHECK(p.workers() == 2);
  CHECK(p.map(std::vector<int>{1, 2, 3}) == std::vector<int>{2, 3, 4});
}

// clang 14 cannot compile the <ranges> of libstdc++ 12 (its concepts need
// clang 15), so the views case is left out for that pair alone.
#if !(defined(__clang__) && __clang_major__ < 15 && defined(__GLIBCXX__))
TEST_CASE("views are inputs: iota, transform, filter", "[pool][cxx20]") {
  procpool::pool p([](int x) { return x * x; }, 2u);
  CHECK(p.map(std::views::iota(1, 6)) == std::vector<int>{1, 4, 9, 16, 25});
  auto odd = std::views::iota(0, 10) | std::views::filter([](int x) { return x % 2 == 1; });
  CHECK(p.map(odd) == std::vector<int>{1, 9, 25, 49, 81});
  long sum = 0;
  for (int v : p.imap(std::views::iota(0) | std::views::take(1000))) sum += v;
  CHECK(sum == 332833500);
}
#endif
#endif
