// A message read from a ring as it arrives, for one that is longer than the
// ring (or cut by the end of a ring that is not mirrored): decoded in place,
// piece by piece, with no buffer to gather it in first.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../codec.hpp"
#include "ring.hpp"

namespace procpool::detail {

/// The source of a streamed `reader` over the next message of `ring`, whose
/// length (`size`, its bytes after the length) was consumed already.
/// `wait(ready)` is called when the bytes asked for have not arrived: it
/// returns once `ready()` may be true, or throws `reader_source::cut` when
/// they will not come.
template <class Wait>
class ring_message final : public reader_source {
 public:
  ring_message(ring_reader& ring, std::size_t size, Wait wait)
      : ring_(ring), size_(size), wait_(std::move(wait)) {}

  piece next(std::size_t from, std::size_t want) override {
    give_up_to(from);
    std::size_t left = size_ - from;
    want = std::min({want, left, ring_.capacity()});
    if (want == 0) return {nullptr, 0};
    while (ring_.available(want) < want) wait([&] { return ring_.available(want) >= want; });
    std::size_t n = 0;
    const std::byte* p = ring_.contiguous(n);
    return {p, std::min(n, left)};
  }

  /// Consumes the rest of the message from offset `from` on (what a reader
  /// stopped at), waiting for it, and frees its space.
  void finish(std::size_t from) {
    give_up_to(from);
    while (done_ < size_) {
      std::size_t n = std::min(ring_.available(), size_ - done_);
      if (n == 0) {
        wait([&] { return ring_.available() > 0; });
        continue;
      }
      ring_.skip(n);
      done_ += n;
      ring_.release();
    }
  }

  /// Whether the bytes stopped coming (`wait` threw): once true, what was
  /// read of the message is not all of it, whatever a decoder made of that.
  bool was_cut() const noexcept { return cut_; }

 private:
  template <class Ready>
  void wait(Ready&& ready) {
    if (cut_) throw cut{};
    try {
      wait_(ready);
    } catch (...) {
      cut_ = true;
      throw;
    }
  }

  void give_up_to(std::size_t from) {
    if (from < done_ || from > size_)  // a copy of the reader went back
      throw decode_error(from, fmt::format("bytes from offset {} of a streamed message were "
                                           "given up already (at {})",
                                           from, done_));
    if (from == done_) return;
    ring_.skip(from - done_);
    done_ = from;
    ring_.release();  // the writer waits for this space to write the rest
  }

  ring_reader& ring_;
  std::size_t size_;
  std::size_t done_ = 0;  // bytes of the message skipped in the ring
  Wait wait_;
  bool cut_ = false;
};

}  // namespace procpool::detail
