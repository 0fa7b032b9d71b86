// The calls a pool runs, whatever runs their chunks: `map_call` (map and
// starmap over a sized range, results into a vector), `imap_call` (imap and
// imap_unordered: lazy input, a bounded window of results) and `submit_call`
// (one task). Each cuts its input into chunks and takes their results back
// through the `call_state` interface (call_state.hpp). The fork engine
// (engine/fork_engine.hpp) and the MPI engine (mpi.hpp) run the chunks.
//
// A chunk names the code that runs it by a 64-bit token from a `Handlers`
// policy: `Handlers::id<F, Item, Invoke>()`. Forked workers share the
// parent's code addresses, so the local pool's token is the address of
// `run_chunk<F, Item, Invoke>`; MPI ranks are separate programs, so theirs is
// a registered hash of the handler's type name.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>
#if __has_include(<version>)
#include <version>
#endif

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "call_state.hpp"
#include "progress_reporter.hpp"

namespace procpool::detail {

/// Calls the pool's function on one item.
struct invoke_one {
  template <class F, class Item>
  static decltype(auto) call(F& f, Item& item) {
    if constexpr (std::is_void_v<std::invoke_result_t<F&, Item&>>) {
      std::invoke(f, item);
      return std::monostate{};
    } else {
      return std::invoke(f, item);
    }
  }
};

/// Calls the pool's function with the elements of a tuple item as arguments.
struct invoke_apply {
  template <class F, class Tuple>
  static decltype(auto) call(F& f, Tuple& args) {
    using R = decltype(std::apply(f, args));
    if constexpr (std::is_void_v<R>) {
      std::apply(f, args);
      return std::monostate{};
    } else {
      return std::apply(f, args);
    }
  }
};

template <class F, class Item, class Invoke>
using call_result_t = decltype(Invoke::call(std::declval<F&>(), std::declval<Item&>()));

/// True when `Range` has `std::data` and `std::size` giving contiguous items of `Item`.
template <class Range, class Item, class = void>
struct is_contiguous_of : std::false_type {};
template <class Range, class Item>
struct is_contiguous_of<Range, Item,
                        std::void_t<decltype(std::data(std::declval<const Range&>())),
                                    decltype(std::size(std::declval<const Range&>()))>>
    : std::is_same<std::remove_cv_t<
                       std::remove_pointer_t<decltype(std::data(std::declval<const Range&>()))>>,
                   Item> {};

/// True when `Out` is a range whose elements are `R`s it lets write into,
/// contiguous: `std::data` gives an `R*` (a std::span<R>, a std::array, an array).
template <class Out, class R, class = void>
struct is_writable_contiguous_of : std::false_type {};
template <class Out, class R>
struct is_writable_contiguous_of<Out, R,
                                 std::void_t<decltype(std::data(std::declval<Out&>())),
                                             decltype(std::size(std::declval<Out&>()))>>
    : std::is_same<decltype(std::data(std::declval<Out&>())), R*> {};

/// True when `It` is an iterator over contiguous, writable `R`s: a pointer,
/// a `std::vector<R>`'s iterator, or (in C++20) any contiguous iterator.
template <class It, class R>
constexpr bool is_contiguous_iterator_of_v = [] {
  if constexpr (std::is_same_v<It, R*>) {
    return true;
  } else if constexpr (!std::is_same_v<R, bool> &&
                       std::is_same_v<It, typename std::vector<R>::iterator>) {
    return true;
  } else {
#if defined(__cpp_lib_concepts) && __cpp_lib_concepts >= 202002L
    if constexpr (std::contiguous_iterator<It>)
      return std::is_same_v<std::iter_value_t<It>, R> &&
             std::is_same_v<std::iter_reference_t<It>, R&>;
    else
      return false;
#else
    return false;
#endif
  }
}();

template <class Range, class = void>
struct has_size : std::false_type {};
template <class Range>
struct has_size<Range, std::void_t<decltype(std::size(std::declval<const Range&>()))>>
    : std::true_type {};

template <class It>
constexpr bool is_forward_iterator_v =
    std::is_base_of_v<std::forward_iterator_tag,
                      typename std::iterator_traits<It>::iterator_category>;

/// Encodes up to `limit` items from [it, end) into `out`, stopping early when
/// the chunk passes `max_bytes` (after at least one item), or before an item
/// that does not fit a bounded `out` (see `writer::write_in_place`), which
/// is then left `overflowed()` and `it` at that item. Returns the count.
/// When reading or encoding an item throws (the input's iterator, the item's
/// `procpool_encode`), the items before it stay encoded, the failing one is
/// cut off, and `failure` holds the exception: the input ends there.
///
/// With `refs`, an item that is a big array or string in the input itself
/// (the iterator yields a reference to it) is left there: only its count is
/// written, and its bytes are listed in `refs`. The caller guarantees that
/// the input outlives the chunk's sending, or copies the blocks in first.
/// A block of any size is left there: one larger than the ring streams
/// through it in pieces straight from the input (64 items of 8 MiB, warm
/// calls: a median of 0.35 s each against 0.46 s copied into the chunk).
template <class Item, class It, class End>
std::size_t encode_items(writer& out, frame_refs* refs, It& it, const End& end, std::size_t limit,
                         std::size_t max_bytes, std::exception_ptr& failure) {
  std::size_t start = out.size();
  std::size_t mark = start;
  std::size_t k = 0;
  std::size_t referred = refs ? refs->bytes : 0;
  try {
    while (k < limit && it != end) {
      bool left = false;
      using Ref = decltype(*it);
      if constexpr (bulk_codec<Item>() && std::is_lvalue_reference_v<Ref> &&
                    std::is_same_v<std::remove_cv_t<std::remove_reference_t<Ref>>, Item>) {
        if (refs && !refs->full()) {
          const Item& item = *it;
          auto [data, size] = bulk_bytes(item);
          if (refs->takes(size)) {
            write_count(out, item.size());
            refs->add(out.size(), data, size);
            left = true;
          }
        }
      }
      if (!left) encode<Item>(out, *it);  // a proxy (std::vector<bool>'s) converts to the item
      if (out.overflowed()) throw writer::full{};  // an encoder caught it: the item is not whole
      ++k;
      mark = out.size();
      ++it;
      std::size_t bytes = out.size() - start + (refs ? refs->bytes - referred : 0);
      if (bytes >= max_bytes) break;
    }
  } catch (const writer::full&) {
    // Bounded by the room it writes in (see `dispatcher::next_chunk`): the
    // chunk ends before the item that did not fit, which the next begins
    // with; `out` stays marked as overflowed.
    out.cut(mark);
  } catch (...) {
    out.resize(mark);
    failure = std::current_exception();
  }
  return k;
}

/// Where `map` keeps a result of type `R` until the call ends: `R` itself,
/// `std::optional<R>` when `R` has no default constructor (the slots exist
/// before the results do), `unsigned char` for `bool` (`std::vector<bool>`
/// has no element to write into).
template <class R>
using result_slot_t =
    std::conditional_t<std::is_same_v<R, bool>, unsigned char,
                       std::conditional_t<std::is_default_constructible_v<R>, R, std::optional<R>>>;

/// The results kept in `slots` (see `result_slot_t`), moved into a vector of `R`.
template <class R>
std::vector<R> take_results(std::vector<result_slot_t<R>>& slots) {
  if constexpr (std::is_same_v<result_slot_t<R>, R>) {
    return std::move(slots);
  } else if constexpr (std::is_same_v<R, bool>) {
    return std::vector<bool>(slots.begin(), slots.end());
  } else {
    std::vector<R> out;
    out.reserve(slots.size());
    for (auto& r : slots) out.push_back(std::move(*r));
    return out;
  }
}

/// Decodes `count` results of type `R` into `dest[0..count)` (slots of type
/// `Slot`, which an `R` is assigned to): one copy when they are trivially
/// sendable and kept as they are.
template <class R, class Slot>
void decode_results(reader& in, Slot* dest, std::size_t count) {
  if constexpr (std::is_same_v<R, Slot> && is_trivially_sendable_v<R>) {
    if (count > in.remaining() / sizeof(R))
      throw decode_error(in.offset(),
                         fmt::format("expected {} results of {} bytes, {} bytes remain", count,
                                     sizeof(R), in.remaining()));
    in.read(static_cast<void*>(dest), count * sizeof(R));
  } else {
    for (std::size_t k = 0; k < count; ++k) dest[k] = decode<R>(in);
  }
}

/// Appends `count` results of type `R` to `v` straight from `in`, when they
/// are trivially sendable, kept as they are, and lie aligned for `R` there:
/// the slots are made by the copy, with no value-initialization first. False
/// (nothing read) otherwise. `v` has the capacity for them: it does not move.
/// **Throws:** `decode_error` when fewer bytes than the results remain.
template <class R, class Slot>
bool append_results(reader& in, std::vector<Slot>& v, std::size_t count) {
  if constexpr (std::is_same_v<R, Slot> && is_trivially_sendable_v<R> && !std::is_same_v<R, bool>) {
    const std::byte* p = in.here();
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(R) != 0) return false;
    if (count > in.remaining() / sizeof(R))
      throw decode_error(in.offset(),
                         fmt::format("expected {} results of {} bytes, {} bytes remain", count,
                                     sizeof(R), in.remaining()));
    if (count > in.at_hand() / sizeof(R)) return false;  // a streamed answer, still coming
    assert(v.capacity() - v.size() >= count);
    // The bytes are `count` objects of a trivially copyable type, copied
    // there by the worker and aligned: read in place, as a shared mapping's are.
    const R* first = reinterpret_cast<const R*>(in.take(count * sizeof(R)));
    v.insert(v.end(), first, first + count);
    return true;
  } else {
    (void)in, (void)v, (void)count;
    return false;
  }
}

/// Items per chunk whose results of type `R` fit in `chunk_bytes`, when
/// their size is known (trivially sendable results): a chunk's answer then
/// fits the ring as its frame does, and is read in place, not gathered.
template <class R>
constexpr std::size_t result_limit_for(std::size_t chunk_bytes) noexcept {
  if constexpr (is_trivially_sendable_v<R> && sizeof(R) > 1)
    return std::max<std::size_t>(1, chunk_bytes / sizeof(R));
  else
    return ~std::size_t(0);
}

/// Where a `map` that returns a new vector keeps its results: a vector with
/// room reserved for every one and none made yet. Each chunk's slots are made
/// (value-initialized) as its results arrive, just before they are written,
/// in cache: no pass over the whole vector before the first result.
template <class Slot>
struct growing_slots {
  using element_type = Slot;
  std::vector<Slot>* slots;
};

template <class T>
struct is_growing_slots : std::false_type {};
template <class Slot>
struct is_growing_slots<growing_slots<Slot>> : std::true_type {};

/// Reserves `n` slots in `v` (advised into huge pages when they are many
/// bytes) and returns them to be made as results arrive (`growing_slots`).
template <class Slot>
growing_slots<Slot> reserve_slots(std::vector<Slot>& v, std::size_t n) {
  reserve_for_decode(v, n);
  return {&v};
}

/// One `map` or `starmap` call over a sized range, result `i` written into
/// `out[i]` (a `Slot` that a result is assigned to) as its chunk comes back.
/// With `grow`, `out` is `grow->data()`, its capacity at least `n`, and the
/// slots up to each chunk's end are made when its results arrive.
template <class F, class Handlers, class Item, class Invoke, class It, class End, class Slot>
class map_call : public call_state {
 public:
  map_call(It begin, End end, const Item* contiguous, std::size_t n, std::size_t chunk,
           std::size_t chunk_bytes, Slot* out, progress_reporter progress,
           std::vector<Slot>* grow = nullptr)
      : begin_(begin),
        it_(begin),
        end_(end),
        contiguous_(contiguous),
        n_(n),
        chunk_(chunk),
        chunk_bytes_(chunk_bytes),
        out_(out),
        grow_(grow),
        progress_(std::move(progress)) {
    input_done = n == 0;
    if constexpr (!std::is_same_v<Slot, bool>)  // bits are kept as bytes: never grown
      assert(!grow || (grow->capacity() >= n && out == grow->data()));
  }

  bool next_chunk(writer& out, frame_refs* refs, std::size_t max_count, std::uint64_t& first,
                  std::uint32_t& count, std::uint64_t& handler) override {
    if (next_ >= n_) {
      input_done = true;
      return false;
    }
    std::size_t limit = std::min(
        {chunk_, max_count, n_ - next_, std::size_t(UINT32_MAX), result_limit(chunk_bytes_)});
    std::size_t k;
    std::exception_ptr failure;
    // The input stays put until the call ends (the caller's range, or the
    // vector a map_async owns), and a chunk still going out when it ends
    // copies its blocks first (`chunk::own_blocks`): big blocks are sent from it.
    if constexpr (is_trivially_sendable_v<Item>) {
      if (contiguous_) {
        k = std::min(limit, std::max<std::size_t>(1, chunk_bytes_ / sizeof(Item)));
        const auto* data = reinterpret_cast<const std::byte*>(contiguous_ + next_);
        std::size_t size = k * sizeof(Item);
        // The whole run is left in the input, whatever its size: it then
        // goes into the ring in one copy, and a chunk sent again reads it
        // there again.
        if (refs && !refs->full())
          refs->add(out.size(), data, size);
        else
          out.write(data, size);
      } else {
        k = encode_items<Item>(out, refs, it_, end_, limit, chunk_bytes_, failure);
      }
    } else {
      k = encode_items<Item>(out, refs, it_, end_, limit, chunk_bytes_, failure);
    }
    if (failure) {
      // The items before the failing one still run: the lowest failing index wins.
      fail(next_ + k, std::move(failure));
      input_done = true;
    }
    if (k == 0) return false;  // (or its first item did not fit the room given)
    first = next_;
    count = static_cast<std::uint32_t>(k);
    handler = Handlers::template id<F, Item, Invoke>();
    next_ += k;
    if (next_ >= n_) input_done = true;
    return true;
  }

  /// A random-access input is read again at any item (a chunk sent again
  /// then needs no copy of its bytes); the input stays put until the call
  /// ends (the caller's range, or the vector a map_async owns). Plain items
  /// lying contiguous there go from the input as blocks: nothing to place.
  bool places_chunks() const noexcept override {
    if constexpr (is_trivially_sendable_v<Item>)
      if (contiguous_) return false;
    return random_access;
  }

  void reencode(std::uint64_t first, std::uint32_t count, writer& out, frame_refs* refs) override {
    if constexpr (random_access) {
      // (Never a contiguous run of plain items: those are blocks, not placed.)
      if (first + count > n_) throw error("a chunk to encode again lies past the input's end");
      It it = begin_ + static_cast<typename std::iterator_traits<It>::difference_type>(first);
      std::exception_ptr failure;
      std::size_t k = encode_items<Item>(out, refs, it, end_, count, ~std::size_t(0), failure);
      if (failure) std::rethrow_exception(failure);
      if (k != count)
        throw error(
            fmt::format("the input ended at item {} while items {} to {} were encoded "
                        "again",
                        first + k, first, first + count - 1));
    } else {
      call_state::reencode(first, count, out, refs);
    }
  }

  bool ahead_of_gap(std::uint64_t first) const noexcept override {
    // Only a gap worth a wake-up: making a few kilobytes of slots costs
    // less than leaving the answer and coming back for it.
    constexpr std::size_t worth = std::size_t(256) << 10;
    if constexpr (std::is_default_constructible_v<Slot>)
      return grow_ && first > grow_->size() && (first - grow_->size()) * sizeof(Slot) >= worth;
    else
      return false;
  }

  void on_results(std::uint64_t first, std::uint32_t count, reader& in) override {
    // Within the capacity reserved: `out_` stays valid. (The dispatcher
    // checked that the chunk lies within the call's items.)
    if constexpr (std::is_default_constructible_v<Slot>) {  // slots that can grow (`result_slot_t`)
      if (grow_ && first + count > grow_->size()) {
        // The results are appended: made by the copy itself, with no
        // value-initialization before it. Only the slots of earlier chunks
        // whose results are still to come are made first (value-initialized):
        // holding this answer back until they came would stall its worker.
        if (first > grow_->size()) grow_->resize(first);
        if (first == grow_->size() &&
            append_results<call_result_t<F, Item, Invoke>>(in, *grow_, count)) {
          done_ += count;
          return;
        }
        grow_->resize(first + count);
      }
    }
    decode_results<call_result_t<F, Item, Invoke>>(in, out_ + first, count);
    done_ += count;
  }

  /// True once every item's result arrived.
  bool complete() const noexcept { return done_ == n_; }

  static constexpr bool random_access =
      std::is_base_of_v<std::random_access_iterator_tag,
                        typename std::iterator_traits<It>::iterator_category>;

  /// Items per chunk whose results fit a chunk's bytes (see `result_limit_for`).
  static constexpr std::size_t result_limit(std::size_t chunk_bytes) noexcept {
    return result_limit_for<call_result_t<F, Item, Invoke>>(chunk_bytes);
  }

  /// Reports progress to the user's callback or bar (called by the waiting
  /// caller, outside the driver's collection, so the callback may throw).
  void report_progress() override {
    if (done_ == reported_) return;
    // Called again at every turn of the caller's wait (at least every
    // slice): a count held back now is reported once its tenth of a second
    // is over, even if no result comes after it.
    if (progress_.update(done_, done_ == n_)) reported_ = done_;
  }

 private:
  It begin_;
  It it_;
  End end_;
  const Item* contiguous_;
  std::size_t n_;
  std::size_t next_ = 0;
  std::size_t done_ = 0;
  std::size_t reported_ = 0;
  std::size_t chunk_;
  std::size_t chunk_bytes_;
  Slot* out_;
  std::vector<Slot>* grow_;
  progress_reporter progress_;
};

/// What a `map_async` call owns: its input, read into a vector when the call
/// is made (as Python's `map_async` makes a list of it), and its results.
template <class Item, class Slot>
struct map_async_storage {
  explicit map_async_storage(std::vector<Item> input) : items(std::move(input)) {
    reserve_slots(slots, items.size());
  }
  std::vector<Item> items;
  std::vector<Slot> slots;
};

/// One `map_async` or `starmap_async` call: a `map_call` over the input it
/// owns, whose future's result is the vector of results.
template <class F, class Handlers, class Item, class Invoke, class Result>
class map_async_call final
    : private map_async_storage<Item, result_slot_t<Result>>,
      public map_call<F, Handlers, Item, Invoke, typename std::vector<Item>::const_iterator,
                      typename std::vector<Item>::const_iterator, result_slot_t<Result>> {
  using Slot = result_slot_t<Result>;
  using storage = map_async_storage<Item, Slot>;
  using base = map_call<F, Handlers, Item, Invoke, typename std::vector<Item>::const_iterator,
                        typename std::vector<Item>::const_iterator, Slot>;

 public:
  /// What the future yields: every result in input order (nothing for a void function).
  using value_type = std::conditional_t<std::is_same_v<Result, std::monostate>, std::monostate,
                                        std::vector<Result>>;

  map_async_call(std::vector<Item> input, std::size_t chunk, std::size_t chunk_bytes,
                 progress_reporter progress)
      : storage(std::move(input)),
        base(storage::items.cbegin(), storage::items.cend(), data_of(storage::items),
             storage::items.size(), chunk, chunk_bytes, storage::slots.data(), std::move(progress),
             &(storage::slots)) {
    if (storage::items.empty()) result.emplace();
  }

  void on_results(std::uint64_t first, std::uint32_t count, reader& in) override {
    base::on_results(first, count, in);
    if (!base::complete()) return;
    if constexpr (std::is_same_v<Result, std::monostate>) {
      result.emplace();
    } else {
      result.emplace(take_results<Result>(storage::slots));
    }
    std::vector<Item>().swap(storage::items);  // the input is no longer needed
  }

  /// The results once every one arrived; empty before, or when the call failed.
  std::optional<value_type> result;

 private:
  static const Item* data_of(const std::vector<Item>& v) noexcept {
    if constexpr (std::is_same_v<Item, bool>)
      return nullptr;  // std::vector<bool> has no contiguous items
    else
      return v.data();
  }
};

/// Where the items of an `imap` come from: the range, owned or referred to, and a position.
template <class Range>
struct range_source {
  using stored = std::conditional_t<std::is_lvalue_reference_v<Range>, Range,
                                    std::remove_cv_t<std::remove_reference_t<Range>>>;
  explicit range_source(Range&& r)
      : range(std::forward<Range>(r)), it(std::begin(range)), end(std::end(range)) {}
  stored range;
  decltype(std::begin(std::declval<stored&>())) it;
  decltype(std::end(std::declval<stored&>())) end;
};

/// The shared part of `imap` and `imap_unordered`: results as they come.
template <class R>
class imap_state : public call_state {
 public:
  /// Moves the next result out (the pair's index is the item's); false at the end.
  virtual bool next(std::pair<std::size_t, R>& out) = 0;
  bool is_range() const noexcept override { return true; }
};

/// One `imap` / `imap_unordered` call: lazy input, a bounded window of results.
template <class F, class Handlers, class Item, class Invoke, class Range, class R, bool Ordered>
class imap_call final : public imap_state<R> {
 public:
  imap_call(Range&& r, std::size_t chunk, bool grow, std::size_t chunk_bytes, std::size_t window,
            std::weak_ptr<driver> e, progress_reporter progress)
      : source_(std::forward<Range>(r)),
        chunk_(chunk),
        grow_(grow),
        chunk_bytes_(chunk_bytes),
        window_(window),
        driver_(std::move(e)),
        progress_(std::move(progress)) {}

  bool next_chunk(writer& out, frame_refs*, std::size_t max_count, std::uint64_t& first,
                  std::uint32_t& count, std::uint64_t& handler) override {
    // Each item is copied: the input may be read once, or change between reads.
    if (source_.it == source_.end) {
      this->input_done = true;
      return false;
    }
    if (sent_ - yielded_ >= window_) return false;  // the reader is behind: wait for it
    std::size_t limit =
        std::min({chunk_, max_count, std::size_t(UINT32_MAX), result_limit_for<R>(chunk_bytes_)});
    std::exception_ptr failure;
    std::size_t k =
        encode_items<Item>(out, nullptr, source_.it, source_.end, limit, chunk_bytes_, failure);
    if (failure) {
      // The results before the failing input are still yielded, then its error.
      this->fail(sent_ + k, std::move(failure));
      this->input_done = true;
      if (k == 0) return false;
    }
    first = sent_;
    count = static_cast<std::uint32_t>(k);
    handler = Handlers::template id<F, Item, Invoke>();
    sent_ += k;
    if (grow_ && chunk_ < 4096) chunk_ *= 2;  // unknown length: start small, grow
    if (!this->input_done && source_.it == source_.end) this->input_done = true;
    return true;
  }

  void on_results(std::uint64_t first, std::uint32_t count, reader& in) override {
    // A chunk's results are yielded all or none: an answer cut off midway
    // (its worker died while it streamed) comes again whole from elsewhere.
    std::size_t before = ready_.size();
    std::uint32_t k = 0;
    try {
      for (; k < count; ++k) {
        std::size_t index = first + k;
        if constexpr (Ordered) {
          std::size_t slot = index - yielded_;
          if (window_results_.size() <= slot) window_results_.resize(slot + 1);
          window_results_[slot] = decode<R>(in);
        } else {
          ready_.emplace_back(index, decode<R>(in));
        }
      }
    } catch (...) {
      if constexpr (Ordered) {
        for (std::uint32_t j = 0; j < k; ++j) window_results_[first + j - yielded_].reset();
      } else {
        ready_.erase(ready_.begin() + static_cast<std::ptrdiff_t>(before), ready_.end());
      }
      throw;
    }
    done_ += count;
  }

  bool next(std::pair<std::size_t, R>& out) override {
    auto e = driver_.lock();
    for (;;) {
      if (this->aborted()) this->rethrow_if_failed();
      if constexpr (Ordered) {
        if (this->failed() && this->error_index() == yielded_) this->rethrow_if_failed();
        if (!window_results_.empty() && window_results_.front()) {
          out.first = yielded_++;
          out.second = std::move(*window_results_.front());
          window_results_.pop_front();
          progress_.update(yielded_, false);
          return true;
        }
      } else {
        if (!ready_.empty()) {
          out = std::move(ready_.front());
          ready_.pop_front();
          ++yielded_;
          progress_.update(yielded_, false);
          return true;
        }
        this->rethrow_if_failed();
      }
      // Nothing more will arrive once nothing is in flight and the input is
      // spent or the call failed (a failed call sends no more chunks).
      if (this->in_flight == 0 && (this->input_done || this->failed())) {
        this->rethrow_if_failed();
        if (yielded_ == sent_) {
          progress_.update(done_, true);
          return false;
        }
        throw error(fmt::format("imap: {} results were sent for but never arrived",
                                sent_ - yielded_));  // a bug, never a wait
      }
      if (!e) throw pool_closed("imap iteration");
      // Drive until something changes for this call. A failure past the next
      // index to yield is not such a change: the results before it still
      // come (only items after the failing one are cancelled), so waiting
      // for them must pump the driver rather than return at once.
      std::size_t before = done_;
      try {
        e->drive([&] {
          if (done_ != before || this->aborted()) return true;
          if (this->in_flight == 0 && (this->input_done || this->failed())) return true;
          if (!this->failed()) return false;
          if constexpr (Ordered) return this->error_index() == yielded_;
          return true;
        });
      } catch (...) {
        // Something outside this call broke the wait (the pool was stopped, a
        // system call failed): the range ends with it.
        this->abort(std::current_exception());
        e->cancel(*this);
        throw;
      }
    }
  }

 private:
  range_source<Range> source_;
  std::size_t chunk_;
  bool grow_;
  std::size_t chunk_bytes_;
  std::size_t window_;
  std::weak_ptr<driver> driver_;
  progress_reporter progress_;
  std::size_t sent_ = 0;
  std::size_t yielded_ = 0;
  std::size_t done_ = 0;
  std::deque<std::optional<R>> window_results_;
  std::deque<std::pair<std::size_t, R>> ready_;
};

/// One submitted task: one item, called through `Invoke`.
template <class F, class Handlers, class Args, class Invoke, class R>
class submit_call final : public call_state {
 public:
  explicit submit_call(Args args, std::shared_ptr<task_batch> batch = nullptr)
      : args_(std::move(args)), batch_(std::move(batch)) {
    if (batch_) batch_->added();
  }
  /// Counts the task in its batch's progress once it is over; until then,
  /// offers the batch's held-back count again (see `task_batch::refresh`).
  void report_progress() override {
    if (!batch_) return;
    if (finished()) {
      batch_->finished();
      batch_.reset();
    } else {
      batch_->refresh();
    }
  }
  bool next_chunk(writer& out, frame_refs*, std::size_t, std::uint64_t& first, std::uint32_t& count,
                  std::uint64_t& handler) override {
    input_done = true;
    std::size_t mark = out.size();
    try {
      encode(out, args_);
    } catch (...) {
      out.resize(mark);
      fail(0, std::current_exception());
      return false;
    }
    first = 0;
    count = 1;
    handler = Handlers::template id<F, Args, Invoke>();
    return true;
  }
  void on_results(std::uint64_t, std::uint32_t, reader& in) override { result = decode<R>(in); }
  std::optional<R> result;

 private:
  Args args_;
  std::shared_ptr<task_batch> batch_;  // null without progress
};

}  // namespace procpool::detail
