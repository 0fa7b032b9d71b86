// clang-format off: the table below is laid out by hand (ReflowComments would merge its rows).
/// @file
/// Serialization of the values a pool sends between processes: `encode` and
/// `decode`, the `writer` and `reader` they work on, and the customization
/// point for types procpool cannot send on its own.
///
/// Sent types need no annotation in the common cases: arithmetic types and
/// enums; `std::string` (and `std::string_view`, encoded as a string),
/// `std::vector`, `std::array`, `std::deque`, `std::list`, `std::pair`,
/// `std::tuple`, `std::optional`, `std::variant`, `std::monostate`, the
/// standard maps and sets, `std::complex`, `std::chrono::duration`,
/// `std::chrono::time_point` and `std::filesystem::path`; and aggregates
/// (structs with public fields and no constructors) of those, field by field
/// through Boost.PFR, nested to any depth, recursive ones
/// (`struct node { std::vector<node> children; }`) included.
///
/// A type is encoded by the first rule that applies:
/// 1. its own `procpool_encode`/`procpool_decode`, found by argument-dependent
///    lookup (see `type_tag`);
/// 2. the built-in rules for the standard types above;
/// 3. its object bytes, by one `memcpy`, for a trivially copyable aggregate
///    whose fields are all sent that way (and for contiguous runs of them);
/// 4. field by field, in declaration order, for any other aggregate.
/// Anything else — raw pointers, references, unions, `std::function`, smart
/// pointers, classes with private state — is refused at compile time by a
/// `static_assert` that says why and how to opt in.
///
/// Limits: aggregates with base classes or C array fields cannot be reflected
/// by Boost.PFR, and are refused with a sentence saying so; give them
/// `procpool_encode`/`procpool_decode`, or use a field for the base and
/// `std::array` for the array. Bit-fields cannot be reflected either (Boost.PFR's
/// own compile error says so). Reference fields are refused (a const reference
/// field only when every field after it can be value-initialized: the check
/// has to go through aggregate initialization). Enums need a fixed underlying
/// type (every `enum class` has one) so that every decoded value is valid;
/// their values are not checked against the enumerators.
///
/// ## Wire format
///
/// Every process that reads a buffer runs the same binary as the one that
/// wrote it, so numbers are in the machine's native byte order and layout.
/// (*n* is a count, u64 and u32 are unsigned integers of 8 and 4 bytes.)
///
/// | type                               | bytes                                              |
/// |------------------------------------|----------------------------------------------------|
/// | `bool`                             | 1 byte, 0 or 1                                     |
/// | other arithmetic types, enums      | the object's `sizeof(T)` bytes                     |
/// | trivially sendable aggregates      | the object's `sizeof(T)` bytes, padding included   |
/// | `std::basic_string`, `string_view` | u64 length *n*, then *n* characters                |
/// | `std::filesystem::path`            | its `native()` string, as a `std::string`          |
/// | `std::vector<T>`                   | u64 *n*, then *n* elements (one block when `T` is  |
/// |                                    | trivially sendable)                                |
/// | `std::vector<bool>`                | u64 *n*, then ⌈*n*/8⌉ bytes: element *i* is bit    |
/// |                                    | *i* % 8 (least significant first) of byte *i* / 8; |
/// |                                    | unused bits are 0                                  |
/// | `std::array<T, N>`                 | *N* elements, no count                             |
/// | `std::deque`, `std::list`          | u64 *n*, then the elements                         |
/// | maps, multimaps                    | u64 *n*, then key, value, key, value... in         |
/// |                                    | iteration order                                    |
/// | sets, multisets                    | u64 *n*, then the keys in iteration order          |
/// | `std::pair`, `std::tuple`          | the members in order                               |
/// | `std::optional<T>`                 | u8 tag: 0 (empty), or 1 followed by the value      |
/// | `std::variant<T...>`               | u32 index of the alternative, then its value       |
/// | `std::monostate`, `std::tuple<>`   | nothing                                            |
/// | `std::complex<T>`                  | its `sizeof` bytes (real, then imaginary part)     |
/// | `duration`, `time_point`           | `count()`, `time_since_epoch()`                    |
/// | other aggregates                   | the fields in declaration order                    |
/// | types with `procpool_encode`       | whatever it writes                                 |
///
/// Decoding trusts no byte. Every read is checked against what remains and a
/// shortfall throws `decode_error` naming the offset and what was expected.
/// A count is checked against the bytes that remain divided by the smallest
/// encoding of one element before anything is reserved, so a corrupt count
/// fails at once instead of allocating. Elements whose encoding is empty
/// (`std::monostate`, `std::tuple<>`, `std::array<T, 0>`, or user types whose
/// `procpool_encode` writes nothing) cannot be bounded that way: a reader
/// accepts at most `reader::max_empty_elements` of them in all. A `bool` byte
/// other than 0 or 1, an optional tag other than 0 or 1, a variant index out
/// of range and a duplicate key in a map or set without duplicates (or a
/// `std::vector<bool>` with stray bits) are rejected too.
// clang-format on
#pragma once

#include <cxxabi.h>

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include "errors.hpp"

namespace procpool {

namespace detail {
class writer_sink;
struct writer_streams;
}  // namespace detail

/// Names the type to decode in a `procpool_decode` overload.
///
/// A type procpool cannot send on its own opts in with two functions in its
/// own namespace (or as hidden friends), found by argument-dependent lookup:
///
/// ```cpp
/// namespace shop {
/// class money {
///  public:
///   money(std::int64_t cents, std::string currency);
///   // ...
///  private:
///   friend void procpool_encode(procpool::writer& out, const money& m) {
///     procpool::encode(out, m.cents_);
///     procpool::encode(out, m.currency_);
///   }
///   friend money procpool_decode(procpool::reader& in, procpool::type_tag<money>) {
///     auto cents = procpool::decode<std::int64_t>(in);
///     return money(cents, procpool::decode<std::string>(in));
///   }
///   std::int64_t cents_;
///   std::string currency_;
/// };
/// }  // namespace shop
/// ```
///
/// `procpool_decode` must return the type itself and should throw
/// `decode_error` (for instance `decode_error(in.offset(), "...")`) for bytes
/// it rejects. For a type whose namespace you do not own, declare the two
/// functions in namespace `procpool`: `writer` and `type_tag` make them
/// visible to the lookup. These take precedence over every built-in rule.
/// `procpool_encode` may run more than once for the same value (a result
/// longer than a pool's ring is sized first, then written), and must write
/// the same bytes each time.
/// They serve their exact type only: a `procpool_encode` that takes
/// `const money&` (or `money`), or a template more specialized than
/// `const T&`, is used for `money`; one that would need a conversion (from a
/// class derived from `money`, or from a type that converts to it) is not.
template <class T>
struct type_tag {};

/// Appends encoded bytes to a growable buffer it owns, or in place into
/// memory it is given until that runs out (`write_in_place`).
///
/// Reusable: `clear()` keeps the capacity, so once the buffer has grown to the
/// size of the largest message, encoding allocates nothing.
///
/// **Thread safety:** none; one thread uses a writer at a time.
class writer {
 public:
  /// An empty writer; the first write allocates.
  writer() noexcept = default;
  /// An empty writer with room for `capacity` bytes.
  explicit writer(std::size_t capacity) { reserve(capacity); }
  /// An empty writer that reuses the storage of `storage` (its content is discarded).
  explicit writer(std::vector<std::byte> storage) : buf_(std::move(storage)) {
    buf_.resize(buf_.capacity());
    own();
  }
  /// A copy of the bytes written (not of the spare capacity), in a buffer of its own.
  writer(const writer& other)
      : buf_(other.data(), other.data() + other.size_),
        data_(buf_.data()),
        capacity_(buf_.size()),
        size_(other.size_) {}
  /// Takes the buffer (or the memory it writes in place); `other` is left
  /// empty, with no capacity.
  writer(writer&& other) noexcept
      : buf_(std::move(other.buf_)),
        data_(std::exchange(other.data_, nullptr)),
        capacity_(std::exchange(other.capacity_, 0)),
        size_(std::exchange(other.size_, 0)),
        in_place_(std::exchange(other.in_place_, false)),
        bounded_(std::exchange(other.bounded_, false)),
        overflowed_(std::exchange(other.overflowed_, false)),
        sink_(std::exchange(other.sink_, nullptr)),
        sent_(std::exchange(other.sent_, 0)),
        staged_(std::exchange(other.staged_, false)) {}
  /// Copies the bytes written, reusing this writer's buffer where it is large enough.
  writer& operator=(const writer& other) {
    if (this != &other) {
      clear();
      write(other.data(), other.size_);
    }
    return *this;
  }
  /// Takes the buffer (or the memory it writes in place); `other` is left
  /// empty, with no capacity.
  writer& operator=(writer&& other) noexcept {
    buf_ = std::move(other.buf_);
    data_ = std::exchange(other.data_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
    size_ = std::exchange(other.size_, 0);
    in_place_ = std::exchange(other.in_place_, false);
    bounded_ = std::exchange(other.bounded_, false);
    overflowed_ = std::exchange(other.overflowed_, false);
    sink_ = std::exchange(other.sink_, nullptr);
    sent_ = std::exchange(other.sent_, 0);
    staged_ = std::exchange(other.staged_, false);
    return *this;
  }
  ~writer() = default;

  /// Appends `n` bytes from `data`.
  void write(const void* data, std::size_t n) {
    if (n == 0) return;
    if (n > capacity_ - size_) {
      write_long(data, n);
      return;
    }
    std::memcpy(data_ + size_, data, n);
    size_ += n;
  }

  /// Returns room for at least `n` more bytes after the end; `commit(k)` then
  /// appends the first `k <= n` of them. Other calls in between invalidate it.
  std::byte* prepare(std::size_t n) {
    if (n > capacity_ - size_) grow(n);
    return data_ + size_;
  }

  /// Appends `n` bytes written into the room returned by `prepare`.
  void commit(std::size_t n) noexcept {
    assert(n <= capacity_ - size_);
    size_ += n;
  }

  /// Makes room for `capacity` bytes in all without reallocating.
  void reserve(std::size_t capacity) {
    if (capacity > capacity_) grow(capacity - size_);
  }

  /// Cuts the content to `n` bytes, or extends it with zero bytes to `n`.
  void resize(std::size_t n) {
    if (n > size()) {
      std::size_t k = n - size();
      std::memset(prepare(k), 0, k);
      commit(k);
    } else {
      cut(n);
    }
    overflowed_ = false;
  }

  /// Cuts the content back to `n <= size()` bytes, leaving `overflowed()`
  /// as it is (`resize` clears it).
  void cut(std::size_t n) noexcept {
    assert(n <= size() && n >= sent_);
    size_ = n - sent_;
  }

  /// Forgets the content and keeps the capacity (and where it writes).
  void clear() noexcept {
    size_ = 0;
    overflowed_ = false;
  }

  /// From now on writes into the `size` bytes at `memory`, which it does not
  /// own and which must outlive this use, starting empty: the bytes go where
  /// they are needed with no copy. When they run out, it goes on in its own
  /// buffer, with what was written copied there (`in_place()` turns false);
  /// or, with `spill` false, a write that does not fit throws `full` and
  /// writes nothing more (`overflowed()` turns true) until it is cut back
  /// with `resize` or `clear`, or let out with `allow_spill`.
  void write_in_place(std::byte* memory, std::size_t size, bool spill = true) noexcept {
    data_ = memory;
    capacity_ = size;
    size_ = 0;
    in_place_ = true;
    bounded_ = !spill;
    overflowed_ = false;
  }
  /// What a write that does not fit throws, writing in place with no way
  /// out (see `write_in_place`). Not a `std::exception`: an encoder that
  /// catches those lets it through.
  struct full {};
  /// Whether it writes in place with no way out (see `write_in_place`).
  bool bounded() const noexcept { return bounded_; }
  /// Whether a write did not fit since it was last cut back (see `write_in_place`).
  bool overflowed() const noexcept { return overflowed_; }
  /// Lets a writer bounded by `write_in_place` go on in its own buffer
  /// when its memory runs out.
  void allow_spill() noexcept {
    bounded_ = false;
    overflowed_ = false;
  }
  /// How many more bytes it takes before it has to grow (or, bounded, before it is full).
  std::size_t spare() const noexcept { return capacity_ - size_; }
  /// Whether it still writes into the memory given to `write_in_place`.
  bool in_place() const noexcept { return in_place_; }
  /// Goes back to its own buffer, starting empty (after `write_in_place`).
  void write_in_own() noexcept {
    own();
    size_ = 0;
  }
  /// Goes back to its own buffer with the content written in place copied
  /// there (nothing changes when it does not write in place).
  void keep_in_own() {
    if (!in_place_) return;
    bounded_ = false;
    grow(0);
  }

  /// The bytes written so far (`size()` of them).
  std::byte* data() noexcept { return data_; }
  /// The bytes written so far (`size()` of them).
  const std::byte* data() const noexcept { return data_; }
  /// How many bytes were written since construction or the last `clear()`.
  std::size_t size() const noexcept { return sent_ + size_; }
  /// How many bytes fit before the buffer has to grow.
  std::size_t capacity() const noexcept { return capacity_; }
  /// Whether nothing was written.
  bool empty() const noexcept { return size_ == 0; }

  /// Hands over the buffer holding exactly the bytes written, without a copy
  /// (with one, when it writes in place); the writer is left empty, with no
  /// capacity.
  std::vector<std::byte> release() {
    if (in_place_) {
      std::vector<std::byte> out(data_, data_ + size_);
      *this = writer();
      return out;
    }
    buf_.resize(size_);
    size_ = 0;
    data_ = nullptr;
    capacity_ = 0;
    return std::move(buf_);
  }

 private:
  friend struct detail::writer_streams;
  void grow(std::size_t n);
  void write_long(const void* data, std::size_t n);
  void next_window(std::size_t n);
  void own() noexcept {
    data_ = buf_.data();
    capacity_ = buf_.size();
    in_place_ = false;
    bounded_ = false;
    overflowed_ = false;
  }

  std::vector<std::byte> buf_;  // all of it is capacity
  std::byte* data_ = nullptr;   // where it writes: buf_'s bytes, or memory given to write_in_place
  std::size_t capacity_ = 0;    // bytes at data_
  std::size_t size_ = 0;        // the first size_ bytes at data_ are the content
  bool in_place_ = false;
  bool bounded_ = false;     // in place, and a write that does not fit throws `full`
  bool overflowed_ = false;  // bounded, and a write did not fit
  // In a stream (see `detail::writer_streams`): where the bytes go as each
  // window of memory fills, and how many went there already.
  detail::writer_sink* sink_ = nullptr;
  std::size_t sent_ = 0;
  bool staged_ = false;  // the window is `buf_`: a `prepare` longer than any the sink gives
};

namespace detail {
/// Where a streamed `reader` gets its bytes: a message that passes through a
/// ring smaller than itself, read as it arrives.
class reader_source {
 public:
  /// Bytes of the message in one piece.
  struct piece {
    const std::byte* data;
    std::size_t size;
  };
  /// The bytes from the message's offset `from` on, once at least `want` of
  /// them (fewer when fewer remain, or when more than the source holds at
  /// once are asked for) have arrived; at least one while any remain. The
  /// bytes before `from` are given up: the writer may reuse their space.
  /// Throws `cut` when the bytes stop coming (the writer died).
  virtual piece next(std::size_t from, std::size_t want) = 0;
  /// What `next` throws when the bytes stop coming: no `std::exception`, so
  /// that a decoder catching those lets it through.
  struct cut {};
  /// A piece asked for whole and larger than the source holds at once, copied.
  std::vector<std::byte> stage;

 protected:
  reader_source() = default;
  reader_source(const reader_source&) = default;
  reader_source& operator=(const reader_source&) = default;
  ~reader_source() = default;
};
}  // namespace detail

/// Reads encoded bytes from a contiguous buffer it does not own, or from a
/// message that arrives in pieces (a streamed reader, which the pools use for
/// a message larger than the ring it passes through).
///
/// Every read is checked: asking for more than remains throws `decode_error`
/// naming the offset and what was expected ("expected 8 bytes for double,
/// 3 remain"); nothing is ever read out of bounds.
///
/// The bytes of a streamed reader are read in place as they arrive, and a
/// read waits for them. The pointer `take` returns there is valid until the
/// reader is next read from (over a buffer, for as long as the buffer); `read`
/// and `take_some` copy big values out piece by piece, with no copy between.
/// A copy of a streamed reader must not be read from: both would consume
/// the one message.
///
/// **Thread safety:** none; one thread uses a reader at a time.
class reader {
 public:
  /// How many elements with an empty encoding (such as `std::monostate`) one
  /// reader decodes at most, in all containers together; more throws
  /// `decode_error`. It bounds what a corrupt count can make a reader allocate.
  static constexpr std::size_t max_empty_elements = std::size_t{1} << 20;

  /// A reader of no bytes.
  reader() noexcept = default;
  /// A reader of the `size` bytes at `data`, which must outlive it.
  reader(const std::byte* data, std::size_t size) noexcept
      : data_(data), size_(size), total_(size) {}
  /// A reader of the bytes of `bytes`, which must outlive it.
  explicit reader(const std::vector<std::byte>& bytes) noexcept
      : reader(bytes.data(), bytes.size()) {}
  /// A streamed reader of a message of `size` bytes that `source` gives in
  /// pieces; `source` must outlive it.
  reader(detail::reader_source& source, std::size_t size) noexcept : total_(size), src_(&source) {}

  /// Consumes `n` bytes and returns where they start (see the class's note on
  /// how long they stay there).
  /// **Throws:** `decode_error` if fewer than `n` remain.
  const std::byte* take(std::size_t n) {
    if (n > size_ - pos_) return take_more(n, {});
    const std::byte* p = data_ + pos_;
    pos_ += n;
    return p;
  }

  /// Consumes `n` bytes and returns where they start; `what` names them in the
  /// error. **Throws:** `decode_error` if fewer than `n` remain.
  const std::byte* take(std::size_t n, std::string_view what) {
    if (n > size_ - pos_) return take_more(n, what);
    return take(n);
  }

  /// Consumes up to `n` bytes of those at hand, at least one while any remain
  /// and `n` is not zero, and returns where they start; `n` becomes how many
  /// it took. For a big value copied out piece by piece.
  const std::byte* take_some(std::size_t& n) {
    if (pos_ == size_ && n != 0 && remaining() != 0) refill(1);
    n = std::min(n, size_ - pos_);
    const std::byte* p = data_ + pos_;
    pos_ += n;
    return p;
  }

  /// Returns where the next `n` bytes start, without consuming them.
  /// **Throws:** `decode_error` if fewer than `n` remain.
  const std::byte* peek(std::size_t n) {
    if (n > size_ - pos_) hold(n, {});
    return data_ + pos_;
  }

  /// Copies the next `n` bytes to `out`.
  /// **Throws:** `decode_error` if fewer than `n` remain.
  void read(void* out, std::size_t n) {
    if (n > size_ - pos_) return read_more(static_cast<std::byte*>(out), n);
    if (n != 0) std::memcpy(out, data_ + pos_, n);
    pos_ += n;
  }

  /// Counts `n` more elements that were decoded from no bytes at all against
  /// the reader's allowance (`max_empty_elements`).
  /// **Throws:** `decode_error` once the allowance is spent.
  void consume_empty(std::uint64_t n);

  /// Offset of the next byte to read from the start of the buffer or message.
  std::size_t offset() const noexcept { return base_ + pos_; }
  /// How many bytes remain to be read.
  std::size_t remaining() const noexcept { return total_ - base_ - pos_; }
  /// Whether every byte was read.
  bool at_end() const noexcept { return remaining() == 0; }
  /// How many of the remaining bytes are at hand: readable in place at
  /// `here()` without waiting (all of them, over a buffer).
  std::size_t at_hand() const noexcept { return size_ - pos_; }
  /// Where the bytes at hand start.
  const std::byte* here() const noexcept { return data_ + pos_; }
  /// The whole buffer (the piece at hand, for a streamed reader).
  const std::byte* data() const noexcept { return data_; }
  /// Size of the whole buffer (of the piece at hand, for a streamed reader).
  std::size_t size() const noexcept { return size_; }
  /// How many more elements with an empty encoding this reader accepts.
  std::size_t empty_allowance() const noexcept { return empty_left_; }

 private:
  [[noreturn]] void fail_short(std::size_t n, std::string_view what) const;
  const std::byte* take_more(std::size_t n, std::string_view what) {
    hold(n, what);
    return take(n);
  }
  void read_more(std::byte* out, std::size_t n);
  /// Makes the next `n` bytes the piece at hand (or its start).
  void hold(std::size_t n, std::string_view what);
  /// The next piece from the source, from the next byte on.
  void refill(std::size_t want);

  const std::byte* data_ = nullptr;  // the bytes at hand: a buffer, or a piece of a message
  std::size_t size_ = 0;
  std::size_t pos_ = 0;
  std::size_t base_ = 0;                  // offset in the message of data_[0]
  std::size_t total_ = 0;                 // the buffer's or message's size
  detail::reader_source* src_ = nullptr;  // null over a buffer
  bool staged_ = false;                   // the bytes at hand are a copy in src_->stage
  std::size_t empty_left_ = max_empty_elements;
};

/// Appends the encoding of `value` to `out`.
///
/// Refused at compile time, with a sentence saying why and how to opt in, for
/// a type procpool cannot send (see `is_encodable_v`).
/// **Throws:** `std::bad_alloc`; `std::bad_variant_access` for a variant that
/// is valueless by exception; whatever a `procpool_encode` throws.
template <class T>
void encode(writer& out, const T& value);

/// Decodes one `T` from `in`, consuming exactly its bytes.
///
/// Refused at compile time for a type procpool cannot decode (see
/// `is_decodable_v`). **Throws:** `decode_error` if the bytes are not a valid
/// encoding of a `T`.
template <class T>
T decode(reader& in);

/// The encoding of `value`, in a new buffer.
template <class T>
std::vector<std::byte> encode(const T& value);

/// Decodes a `T` that must fill the `size` bytes at `data` exactly.
/// **Throws:** `decode_error` if they are not a valid encoding of a `T`, or if
/// bytes remain after it.
template <class T>
T decode(const std::byte* data, std::size_t size);

/// Decodes a `T` that must fill `bytes` exactly.
/// **Throws:** `decode_error` as `decode(data, size)`.
template <class T>
T decode(const std::vector<std::byte>& bytes);

}  // namespace procpool

#include "detail/codec_impl.hpp"

namespace procpool {

/// Whether procpool can encode a `T` (by the rules at the top of this header).
template <class T>
inline constexpr bool is_encodable_v =
    detail::analysis_t<false, T, detail::type_list<>>::why == detail::refusal::none;

/// Whether procpool can decode a `T`. Unlike encoding, this excludes views
/// (`std::string_view`: decode a `std::string`), enums without a fixed
/// underlying type, and types with a `procpool_encode` but no `procpool_decode`.
template <class T>
inline constexpr bool is_decodable_v =
    detail::analysis_t<true, T, detail::type_list<>>::why == detail::refusal::none;

/// Whether a `T` can be sent to another process: both encoded and decoded.
template <class T>
inline constexpr bool is_sendable_v = is_encodable_v<T>&& is_decodable_v<T>;

namespace detail {

/// Whether the encoding of a `T` is exactly its `sizeof(T)` object bytes, so a
/// run of them can be copied in one block (arithmetic types but `bool`, enums
/// with a fixed underlying type, trivially copyable aggregates of those,
/// `std::array`s of those...). Every bit pattern of such bytes is a valid `T`.
template <class T>
inline constexpr bool is_trivially_sendable_v =
    !std::is_reference_v<T> && codec_trivial<std::remove_cv_t<T>>();

}  // namespace detail

namespace detail {

/// Where a writer in a stream puts its bytes (see `writer_streams`): memory
/// it hands out a window at a time, each sent on once written.
class writer_sink {
 public:
  /// Memory for the next bytes, from where the last window's bytes `done`
  /// end: at least `want` bytes when the sink can ever give that many at
  /// once, else as many as it can (at least one). It may wait for room, and
  /// throws when no more bytes may come. Asked again before `done`, it
  /// gives the same place.
  virtual std::pair<std::byte*, std::size_t> window(std::size_t want) = 0;
  /// The first `n` bytes of the last window are written: they go on.
  virtual void done(std::size_t n) = 0;
  /// True for a sink that throws the bytes away (a writer that only counts
  /// them): a long write then copies nothing.
  bool counts_only = false;

 protected:
  writer_sink() = default;
  writer_sink(const writer_sink&) = default;
  writer_sink& operator=(const writer_sink&) = default;
  ~writer_sink() = default;
};

/// Turns a writer into a stream and back: while it streams, every window it
/// fills goes to the sink, and it writes on in the next, so a message longer
/// than any memory at hand (a result longer than a ring) is written once,
/// where it goes. `size()` counts every byte since `start`; `data()` is the
/// current window only, and cutting back stops at its start.
struct writer_streams {
  /// Starts `w`, empty, writing through `sink`.
  static void start(writer& w, writer_sink& sink) {
    w.own();
    w.sink_ = &sink;
    w.sent_ = 0;
    w.size_ = 0;
    w.staged_ = false;
    auto [p, n] = sink.window(1);
    w.data_ = p;
    w.capacity_ = n;
    w.in_place_ = true;
  }
  /// Ends the stream: bytes still staged go to the sink (in windows,
  /// `done`), then `w` goes back to its own buffer, empty. Returns how many
  /// bytes were written in all, and how many of them are in the last
  /// window, not yet `done`: the caller sends them on (or not).
  static std::pair<std::size_t, std::size_t> stop(writer& w) {
    if (w.staged_) w.next_window(0);
    std::pair<std::size_t, std::size_t> r{w.size(), w.size_};
    w.sink_ = nullptr;
    w.sent_ = 0;
    w.write_in_own();
    return r;
  }
  /// Forgets the stream after a failure: `w` goes back to its own buffer.
  static void abandon(writer& w) noexcept {
    w.sink_ = nullptr;
    w.sent_ = 0;
    w.staged_ = false;
    w.write_in_own();
  }
};

}  // namespace detail

inline void writer::write_long(const void* data, std::size_t n) {
  if (!sink_) {
    grow(n);
    std::memcpy(data_ + size_, data, n);
    size_ += n;
    return;
  }
  if (sink_->counts_only && !staged_) {
    sent_ += n;
    return;
  }
  // Window by window: no staging, however long.
  auto p = static_cast<const std::byte*>(data);
  for (;;) {
    std::size_t k = std::min(n, capacity_ - size_);
    if (k != 0) std::memcpy(data_ + size_, p, k);
    size_ += k;
    p += k;
    n -= k;
    if (n == 0) return;
    next_window(1);
  }
}

inline void writer::next_window(std::size_t n) {
  if (staged_) {
    // Staged bytes go out through the sink's windows, then it writes there again.
    staged_ = false;
    const std::byte* p = data_;
    std::size_t left = size_;
    size_ = 0;
    while (left > 0) {
      auto [q, room] = sink_->window(left);
      std::size_t k = std::min(left, room);
      std::memcpy(q, p, k);
      sink_->done(k);
      sent_ += k;
      p += k;
      left -= k;
    }
  } else if (size_ > 0) {
    sink_->done(size_);
    sent_ += size_;
    size_ = 0;
  }
  if (n == 0) return;
  auto [q, room] = sink_->window(n);
  if (room >= n) {
    data_ = q;
    capacity_ = room;
    return;
  }
  // A `prepare` longer than any window: written in `buf_` first.
  if (buf_.size() < n) {
    buf_.clear();
    buf_.resize(n);
  }
  data_ = buf_.data();
  capacity_ = buf_.size();
  staged_ = true;
}

inline void writer::grow(std::size_t n) {
  if (sink_) {
    next_window(n);
    return;
  }
  if (bounded_) {
    overflowed_ = true;
    throw full{};
  }
  constexpr std::size_t limit = std::numeric_limits<std::size_t>::max() / 2;
  if (n > limit || size_ > limit - n) throw std::length_error("procpool::writer: buffer too large");
  // Out of place, it doubles; from a place, it takes what the content needs
  // (the place may have been far larger than what was written in it).
  std::size_t capacity =
      std::max({size_ + n, 2 * (in_place_ ? size_ : capacity_), std::size_t{256}});
  if (in_place_) {
    // Out of the memory given: the content moves into a buffer of its own.
    if (buf_.size() < capacity) {
      buf_.clear();
      buf_.resize(capacity);
    }
    if (size_ > 0) std::memcpy(buf_.data(), data_, size_);
  } else {
    buf_.resize(size_);  // only the content moves to the new block
    buf_.reserve(capacity);
    buf_.resize(capacity);
  }
  own();
}

inline void reader::fail_short(std::size_t n, std::string_view what) const {
  throw decode_error(
      offset(), what.empty()
                    ? fmt::format("expected {} bytes, {} remain", n, remaining())
                    : fmt::format("expected {} bytes for {}, {} remain", n, what, remaining()));
}

inline void reader::refill(std::size_t want) {
  auto piece = src_->next(base_ + pos_, want);
  // A source's word is checked like a buffer's bytes: a piece of nothing
  // would have the reader ask forever, and bytes past the message's end
  // are not the message's.
  if (piece.size == 0 || piece.data == nullptr)
    throw decode_error(offset(), fmt::format("the message's source gave no bytes at offset {} "
                                             "with {} to come",
                                             offset(), remaining()));
  base_ += pos_;
  data_ = piece.data;
  size_ = std::min(piece.size, total_ - base_);
  pos_ = 0;
  staged_ = false;
}

inline void reader::hold(std::size_t n, std::string_view what) {
  if (n > remaining()) fail_short(n, what);
  // Over a buffer everything is at hand: only a streamed reader gets here.
  // A staged piece's source is past its end already: what is left of it is
  // copied on, not asked for again.
  if (!staged_) {
    refill(n);
    if (n <= size_ - pos_) return;
  }
  // More than the source holds at once, wanted whole: copied.
  std::vector<std::byte> stage(n);
  const std::size_t start = offset();
  for (std::size_t done = 0; done < n;) {
    if (pos_ == size_) refill(n - done);
    std::size_t k = std::min(n - done, size_ - pos_);
    std::memcpy(stage.data() + done, data_ + pos_, k);
    pos_ += k;
    done += k;
  }
  src_->stage.swap(stage);
  data_ = src_->stage.data();
  size_ = n;
  pos_ = 0;
  base_ = start;
  staged_ = true;
}

inline void reader::read_more(std::byte* out, std::size_t n) {
  if (n > remaining()) fail_short(n, {});
  for (;;) {
    std::size_t k = std::min(n, size_ - pos_);
    if (k != 0) std::memcpy(out, data_ + pos_, k);
    pos_ += k;
    out += k;
    n -= k;
    if (n == 0) return;
    refill(n);
  }
}

inline void reader::consume_empty(std::uint64_t n) {
  if (n > empty_left_)
    throw decode_error(offset(),
                       fmt::format("more than {} elements with an empty encoding (such as "
                                   "std::monostate) in one buffer",
                                   max_empty_elements));
  empty_left_ -= detail::int_cast<std::size_t>(n);
}

template <class T>
void encode(writer& out, const T& value) {
  if constexpr (detail::verify<false, T>()) detail::codec<std::remove_cv_t<T>>::encode(out, value);
}

template <class T>
T decode(reader& in) {
  if constexpr (detail::verify<true, T>())
    return detail::codec<std::remove_cv_t<T>>::decode(in);
  else
    std::abort();  // not reached: verify() has failed the build
}

template <class T>
std::vector<std::byte> encode(const T& value) {
  writer out;
  encode(out, value);
  return out.release();
}

template <class T>
T decode(const std::byte* data, std::size_t size) {
  reader in(data, size);
  T value = decode<T>(in);
  if (!in.at_end()) detail::throw_trailing<T>(in);
  return value;
}

template <class T>
T decode(const std::vector<std::byte>& bytes) {
  return decode<T>(bytes.data(), bytes.size());
}

// ---------------------------------------------------------------------------
// Exception objects: the registry of exception codecs a worker looks the
// thrown type up in (see `task_error::original`).

namespace detail {

/// Encodes the exception being handled, whose type the entry was made for.
/// Called inside a `catch` block only.
using exception_encoder = void (*)(writer&);

/// The exception codecs of this program, by the mangled name of the type.
/// Filled before `main` by the types the program names in `original<T>()`,
/// `rethrow_as<T>()` or `register_exception<T>()`; read by the workers.
struct exception_registry {
  std::mutex lock;
  std::unordered_map<std::string, exception_encoder> encoders;
};

inline exception_registry& exception_codecs() {
  static exception_registry registry;
  return registry;
}

/// Adds `T`'s codec to the registry; returns true (so that a variable can hold the call).
template <class T>
bool add_exception_codec() {
  static_assert(std::is_class_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T>,
                "procpool: an exception type to send back is a class type, named without const "
                "or volatile.");
  static_assert(is_sendable_v<T>,
                "procpool: this exception type cannot be sent back from a worker process; give "
                "it procpool_encode/procpool_decode (see codec.hpp) to get it back with "
                "task_error::original<T>().");
  auto& r = exception_codecs();
  std::lock_guard<std::mutex> guard(r.lock);
  r.encoders[typeid(T).name()] = [](writer& out) {
    try {
      throw;
    } catch (const T& e) {
      encode(out, e);
    }
  };
  return true;
}

/// What procpool's own code reads of a `task_error`: the encoded object.
struct exception_access {
  static const exception_object* original(const task_error& e) noexcept {
    return e.original_.get();
  }
};

/// Registers `T` before `main` in every process made from the program, once
/// anything names it.
template <class T>
inline const bool exception_codec_registered = add_exception_codec<T>();

/// The exception being handled, encoded by its registered codec; empty when
/// its type has none, or the codec threw. Called inside a `catch` block only.
inline std::optional<exception_object> encode_current_exception_object() noexcept {
  try {
    const std::type_info* type = abi::__cxa_current_exception_type();
    if (type == nullptr) return std::nullopt;
    exception_encoder encoder = nullptr;
    {
      auto& r = exception_codecs();
      std::lock_guard<std::mutex> guard(r.lock);
      auto it = r.encoders.find(type->name());
      if (it == r.encoders.end()) return std::nullopt;
      encoder = it->second;
    }
    writer out;
    encoder(out);
    return exception_object{type->name(), out.release()};
  } catch (...) {
    return std::nullopt;  // the codec threw: the type name and message still go back
  }
}

}  // namespace detail

/// Registers `T`'s codec now, in this process and in the pools it makes from
/// now on, so that a worker can send a thrown `T` back whole
/// (`task_error::original<T>()`). A pool's workers are forked from a copy of
/// the program made with the pool: register before making it. Naming
/// `original<T>()` or `rethrow_as<T>()` does this already, before `main`;
/// call it for a type that is caught by another program (an MPI rank that
/// names it nowhere else).
/// **Thread safety:** safe from any thread.
template <class T>
void register_exception() {
  detail::add_exception_codec<T>();
}

template <class T>
std::optional<T> task_error::original() const {
  (void)detail::exception_codec_registered<T>;
  if (!original_ || original_->key != typeid(T).name()) return std::nullopt;
  return decode<T>(original_->bytes);
}

template <class... T>
void task_error::rethrow_as() const {
  (void)std::initializer_list<int>{(
      [&] {
        if (auto e = original<T>()) throw std::move(*e);
      }(),
      0)...};
}

}  // namespace procpool
