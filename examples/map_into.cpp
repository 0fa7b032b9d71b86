// map_into: the results of a map written into memory the caller keeps.
//
// A program that maps over a new batch of the same size again and again (the
// frames of a video, the rows of a table read in blocks) can keep one result
// buffer: map_into resizes a vector only when the batch size changes, so the
// maps after the first touch no fresh memory. It also writes into a span, an
// array, through a pointer, or through any output iterator.
//
// Python has no counterpart: Pool.map always builds a new list.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <procpool/pool.hpp>

#include <array>
#include <cstdint>
#include <list>
#include <numeric>
#include <stdexcept>
#include <vector>

int main() {
  // A frame's pixel brightness, squared: a stand-in for real per-item work.
  procpool::pool energy([](std::uint8_t pixel) { return std::uint32_t(pixel) * pixel; }, 2);

  std::vector<std::uint8_t> frame(640 * 480);
  std::vector<std::uint32_t> out;  // kept across frames
  const std::uint32_t* first_buffer = nullptr;
  for (int k = 0; k < 3; ++k) {
    for (std::size_t i = 0; i < frame.size(); ++i)
      frame[i] = std::uint8_t(i * std::size_t(k + 1) % 251);
    energy.map_into(frame, out);
    if (k == 0) first_buffer = out.data();
    std::uint64_t total = std::accumulate(out.begin(), out.end(), std::uint64_t(0));
    fmt::print("frame {}: {} results, total energy {}, same buffer: {}\n", k, out.size(), total,
               out.data() == first_buffer);
  }

  // Into an array with room to spare: returns a pointer past the last result.
  std::array<std::uint32_t, 6> room{};
  auto* end = energy.map_into(std::vector<std::uint8_t>{1, 2, 3, 4}, room);
  fmt::print("array: {} written: {}\n", end - room.data(), room);

  // Through an output iterator: the results are appended in input order.
  std::list<std::uint32_t> appended{0};
  energy.map_into(std::vector<std::uint8_t>{5, 6}, std::back_inserter(appended));
  fmt::print("list: {}\n", appended);

  // Too little room is refused before any item runs.
  std::array<std::uint32_t, 2> small{};
  try {
    energy.map_into(std::vector<std::uint8_t>{1, 2, 3}, small);
  } catch (const std::length_error& e) {
    fmt::print("refused: {}\n", e.what());
  }
}
