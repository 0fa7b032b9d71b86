/// @file
/// Values and arrays in shared memory: `shared_value<T>` and `shared_array<T>`
/// — Python's `multiprocessing.Value`, `Array` and `shared_memory.SharedMemory`.
///
/// Anonymous ones (made without a name) are shared with every process forked
/// after them: the copy a child inherits maps the same memory. Named ones
/// (made with `create_only`, `open_only` or `open_or_create` and a name) are
/// POSIX shared memory objects under `/dev/shm` that unrelated processes open
/// by name; the name stays until someone calls `remove()`.
///
/// Only trivially copyable types can live there: the bytes are all another
/// process sees, so a type holding pointers or heap memory (`std::string`,
/// `std::vector`, `std::unique_ptr`) or process-local handles would hand it
/// addresses and handles that mean nothing in its address space.
///
/// ```cpp
/// procpool::shared_value<long> hits;   // 0, shared with children forked from now on
/// hits.fetch_add(1);                   // atomic, in any process
/// procpool::shared_array<double> v(1000);
/// v[17] = 2.5;                         // plain memory: synchronize as with threads
/// ```
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#if __has_include(<span>)
#include <span>
#endif

#include "detail/int_cast.hpp"
#include "detail/os/type_name.hpp"
#include "detail/sync/segment.hpp"
#include "detail/sync/value_cell.hpp"
#include "errors.hpp"

namespace procpool {

/// Tag: make a new named segment; fail if the name exists.
struct create_only_t {
  explicit create_only_t() = default;
};
/// Tag: open an existing named segment; fail if the name does not exist.
struct open_only_t {
  explicit open_only_t() = default;
};
/// Tag: open the named segment if it exists, else make it.
struct open_or_create_t {
  explicit open_or_create_t() = default;
};
/// Selects the constructor that makes a new named segment.
inline constexpr create_only_t create_only{};
/// Selects the constructor that opens an existing named segment.
inline constexpr open_only_t open_only{};
/// Selects the constructor that opens a named segment or makes it.
inline constexpr open_or_create_t open_or_create{};

/// A value of type `T` in shared memory, with atomic operations — Python's
/// `multiprocessing.Value`.
///
/// `load`, `store`, `exchange`, `compare_exchange` and the `fetch_` operations
/// are atomic. Where `std::atomic<T>` is lock-free (`is_always_lock_free`:
/// integers, pointers-sized structs, `double`, ...) they are lock-free atomics
/// on the shared memory; otherwise each takes an internal robust lock.
/// `with(f)` runs `f(T&)` on the value under that internal lock, for updates
/// that one atomic operation cannot express; `with` calls exclude each other,
/// but not the atomic operations, so pick one style per value.
///
/// A process killed in the middle of any operation leaves the previous value
/// or the new one, never a mix, and never a wedged lock.
///
/// **Thread safety:** every member but assignment may be called concurrently
/// from any thread of any process sharing the value.
///
/// **Fork safety:** anonymous values are shared with children forked after
/// construction; the creating process destroys the shared state when the
/// object dies, so keep it alive while children use it.
template <class T>
class shared_value {
  static_assert(std::is_trivially_copyable_v<T>,
                "shared_value<T> needs a trivially copyable T: other processes see only its "
                "bytes, so a type that owns heap memory or holds pointers (std::string, "
                "std::vector, std::unique_ptr, ...) would give them addresses that are "
                "meaningless in their own memory");
  static_assert(!std::is_pointer_v<T> && !std::is_member_pointer_v<T>,
                "shared_value<T> cannot hold a pointer: an address in one process means nothing "
                "in another; store an index or an offset instead");
  static_assert(std::is_copy_constructible_v<T> && std::is_copy_assignable_v<T>,
                "shared_value<T> needs a copy-constructible and copy-assignable T");
  static_assert(alignof(T) <= 4096, "shared_value<T> supports alignments up to 4096 bytes");

 public:
  /// The type of the value.
  using value_type = T;
  /// True when the atomic operations are lock-free for `T`.
  static constexpr bool is_always_lock_free = std::atomic<T>::is_always_lock_free;

  /// An anonymous value, value-initialized (`T{}`: zero for numbers).
  /// **Throws:** `std::system_error` when the memory cannot be mapped.
  shared_value();
  /// An anonymous value holding `initial`.
  /// **Throws:** `std::system_error` when the memory cannot be mapped.
  explicit shared_value(const T& initial);
  /// Makes the named segment `name` holding `initial`.
  /// **Throws:** `segment_exists` when the name is taken; `segment_error` for an
  /// invalid name; `std::system_error` naming the call and the segment otherwise.
  shared_value(create_only_t, std::string_view name, const T& initial = T());
  /// Opens the named segment `name`.
  /// **Throws:** `segment_not_found` when there is none; `segment_mismatch`
  /// when it does not hold a `shared_value<T>` (another type, size or kind of
  /// object); `segment_permission_error` when it belongs to another user or
  /// others may read or write it; `segment_error` when its creator never
  /// finished making it.
  shared_value(open_only_t, std::string_view name);
  /// Opens the named segment `name`, or makes it holding `initial` if there is none.
  /// **Throws:** as the `create_only` and `open_only` constructors.
  shared_value(open_or_create_t, std::string_view name, const T& initial = T());
  /// Takes over `other`'s mapping; `other` is left empty (only destruction and assignment).
  shared_value(shared_value&& other) noexcept;
  /// Releases this mapping and takes over `other`'s.
  shared_value& operator=(shared_value&& other) noexcept;
  shared_value(const shared_value&) = delete;
  shared_value& operator=(const shared_value&) = delete;
  /// Unmaps the value. An anonymous value is destroyed in the process that made
  /// it; a named segment is never removed here (see `remove()`).
  ~shared_value();

  /// The value now.
  T load() const;
  /// Replaces the value by `v`.
  void store(const T& v);
  /// Replaces the value by `v`; returns the previous one.
  T exchange(const T& v);
  /// If the value equals `expected` (bitwise), replaces it by `desired` and
  /// returns true; otherwise loads it into `expected` and returns false.
  bool compare_exchange(T& expected, const T& desired);
  /// Adds `d` (arithmetic `T`; integers wrap around); returns the previous value.
  T fetch_add(const T& d);
  /// Subtracts `d` (arithmetic `T`; integers wrap around); returns the previous value.
  T fetch_sub(const T& d);
  /// Bitwise-ands `v` in (integral `T`); returns the previous value.
  T fetch_and(const T& v);
  /// Bitwise-ors `v` in (integral `T`); returns the previous value.
  T fetch_or(const T& v);
  /// Bitwise-xors `v` in (integral `T`); returns the previous value.
  T fetch_xor(const T& v);
  /// Calls `f(T&)` on a copy of the value under the internal lock, then stores
  /// the copy; returns what `f` returns. If `f` throws, the value is unchanged.
  /// A process killed inside `f` leaves the value unchanged, and the next
  /// caller proceeds normally.
  template <class F>
  auto with(F&& f);

  /// The segment's name (without leading slash); empty for an anonymous value.
  const std::string& name() const noexcept { return segment_.name(); }
  /// Removes the name of this named segment, so that no one can open it
  /// any more; processes that have it open keep using it. Returns false when the
  /// name was already gone, or for an anonymous value.
  bool remove() const;
  /// Removes the named segment `name`; false when there was none.
  /// **Throws:** `segment_error` for an invalid name.
  static bool remove(std::string_view name);

 private:
  using cell = detail::value_cell<T>;
  static detail::segment_shape shape();
  void build(const T& initial);
  void attach() noexcept;

  detail::segment segment_;
  cell* cell_ = nullptr;
};

/// A fixed-size array of `T` in shared memory — Python's
/// `multiprocessing.Array` and `shared_memory.SharedMemory`. Contiguous,
/// span-like: `data()`, `size()`, `operator[]`, `begin()`/`end()`.
///
/// The elements are plain memory: like a `std::vector` shared by threads, the
/// processes must synchronize (a `procpool::mutex`, a `barrier` between
/// phases, or disjoint index ranges per process).
///
/// **Thread safety:** as a `std::span`: the handle may be used concurrently; the
/// elements follow the usual rules of data races.
///
/// **Fork safety:** anonymous arrays are shared with children forked after
/// construction.
template <class T>
class shared_array {
  static_assert(std::is_trivially_copyable_v<T>,
                "shared_array<T> needs a trivially copyable T: other processes see only its "
                "bytes, so a type that owns heap memory or holds pointers (std::string, "
                "std::vector, std::unique_ptr, ...) would give them addresses that are "
                "meaningless in their own memory");
  static_assert(!std::is_pointer_v<T> && !std::is_member_pointer_v<T>,
                "shared_array<T> cannot hold pointers: an address in one process means nothing "
                "in another; store indices or offsets instead");
  static_assert(alignof(T) <= 4096, "shared_array<T> supports alignments up to 4096 bytes");

 public:
  /// The element type.
  using value_type = T;
  /// The type of sizes and indices.
  using size_type = std::size_t;
  /// A reference to an element.
  using reference = T&;
  /// A read-only reference to an element.
  using const_reference = const T&;
  /// A pointer to an element.
  using pointer = T*;
  /// An iterator: a pointer, the elements being contiguous.
  using iterator = T*;
  /// A read-only iterator.
  using const_iterator = const T*;

  /// An anonymous array of `n` value-initialized elements (zero for numbers).
  /// **Throws:** `std::system_error` when the memory cannot be mapped.
  explicit shared_array(std::size_t n);
  /// An anonymous array of `n` copies of `value`.
  shared_array(std::size_t n, const T& value);
  /// Makes the named segment `name` with `n` value-initialized elements.
  /// **Throws:** `segment_exists` when the name is taken; `segment_error` for
  /// an invalid name; `std::system_error` naming the call and the segment otherwise.
  shared_array(create_only_t, std::string_view name, std::size_t n);
  /// Opens the named segment `name`, whatever its number of elements.
  /// **Throws:** `segment_not_found`; `segment_mismatch` when it does not hold
  /// `T`s; `segment_permission_error` when it belongs to another user or
  /// others may read or write it; `segment_error` when its creator never
  /// finished making it.
  shared_array(open_only_t, std::string_view name);
  /// Opens the named segment `name`, or makes it with `n` value-initialized elements.
  /// **Throws:** `segment_mismatch` when it exists with another element type or
  /// another number of elements; otherwise as the two constructors above.
  shared_array(open_or_create_t, std::string_view name, std::size_t n);
  /// Takes over `other`'s mapping; `other` is left empty.
  shared_array(shared_array&& other) noexcept;
  /// Releases this mapping and takes over `other`'s.
  shared_array& operator=(shared_array&& other) noexcept;
  shared_array(const shared_array&) = delete;
  shared_array& operator=(const shared_array&) = delete;
  /// Unmaps the array; a named segment is never removed here (see `remove()`).
  ~shared_array() = default;

  /// First element.
  T* data() const noexcept { return data_; }
  /// Number of elements.
  std::size_t size() const noexcept { return size_; }
  /// True when there are no elements.
  bool empty() const noexcept { return size_ == 0; }
  /// Element `i`; `i < size()` is the caller's to ensure.
  T& operator[](std::size_t i) const noexcept { return data_[i]; }
  /// Iterator to the first element.
  T* begin() const noexcept { return data_; }
  /// Iterator past the last element.
  T* end() const noexcept { return data_ + size_; }
#if defined(__cpp_lib_span) && __cpp_lib_span >= 202002L
  /// The elements as a `std::span` (C++20).
  operator std::span<T>() const noexcept {
    return {data_, size_};
  }
#endif

  /// The segment's name (without leading slash); empty for an anonymous array.
  const std::string& name() const noexcept {
    return segment_.name();
  }
  /// Removes the name of this named segment; processes that have it open keep
  /// using it. False when the name was already gone, or for an anonymous array.
  bool remove() const;
  /// Removes the named segment `name`; false when there was none.
  /// **Throws:** `segment_error` for an invalid name.
  static bool remove(std::string_view name);

 private:
  static detail::segment_shape shape();
  void fill(const T* value);

  detail::segment segment_;
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// ---------------------------------------------------------------------------

namespace detail {

/// Runs `f`, turning a `segment_failure` into the public exception for it.
template <class F>
auto with_segment_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const segment_failure& e) {
    switch (e.problem) {
      case segment_problem::not_found:
        throw segment_not_found(e.name, e.message);
      case segment_problem::already_exists:
        throw segment_exists(e.name, e.message);
      case segment_problem::mismatch:
        throw segment_mismatch(e.name, e.message);
      case segment_problem::not_trusted:
        throw segment_permission_error(e.name, e.message);
      default:
        throw segment_error(e.name, e.message);
    }
  }
}

inline constexpr std::uint32_t shared_value_magic = 0x56535050;  // "PPSV"
inline constexpr std::uint32_t shared_array_magic = 0x41535050;  // "PPSA"

}  // namespace detail

// shared_value ---------------------------------------------------------------

template <class T>
detail::segment_shape shared_value<T>::shape() {
  return detail::segment_shape{detail::shared_value_magic,
                               is_always_lock_free ? 1u : 0u,
                               sizeof(T),
                               alignof(T),
                               sizeof(cell),
                               0,
                               alignof(cell),
                               detail::type_hash<T>(),
                               "shared_value<" + detail::type_name<T>() + ">"};
}

template <class T>
void shared_value<T>::build(const T& initial) {
  try {
    cell_ = ::new (segment_.payload()) cell(initial);
  } catch (...) {
    segment_.abandon();
    throw;
  }
  segment_.publish();
}

template <class T>
void shared_value<T>::attach() noexcept {
  cell_ = std::launder(static_cast<cell*>(segment_.payload()));
}

template <class T>
shared_value<T>::shared_value() : shared_value(T()) {}

template <class T>
shared_value<T>::shared_value(const T& initial)
    : segment_(detail::with_segment_errors([] { return detail::segment::anonymous(shape(), 1); })) {
  build(initial);
}

template <class T>
shared_value<T>::shared_value(create_only_t, std::string_view name, const T& initial)
    : segment_(
          detail::with_segment_errors([&] { return detail::segment::create(name, shape(), 1); })) {
  build(initial);
}

template <class T>
shared_value<T>::shared_value(open_only_t, std::string_view name)
    : segment_(
          detail::with_segment_errors([&] { return detail::segment::open(name, shape(), 1); })) {
  attach();
}

template <class T>
shared_value<T>::shared_value(open_or_create_t, std::string_view name, const T& initial) {
  bool created = false;
  segment_ = detail::with_segment_errors(
      [&] { return detail::segment::open_or_create(name, shape(), 1, created); });
  if (created) {
    build(initial);
  } else {
    attach();
  }
}

template <class T>
shared_value<T>::shared_value(shared_value&& other) noexcept
    : segment_(std::move(other.segment_)), cell_(std::exchange(other.cell_, nullptr)) {}

template <class T>
shared_value<T>& shared_value<T>::operator=(shared_value&& other) noexcept {
  if (this != &other) {
    if (cell_ != nullptr && segment_.owns_objects()) cell_->~cell();
    segment_ = std::move(other.segment_);
    cell_ = std::exchange(other.cell_, nullptr);
  }
  return *this;
}

template <class T>
shared_value<T>::~shared_value() {
  if (cell_ != nullptr && segment_.owns_objects()) cell_->~cell();
}

template <class T>
T shared_value<T>::load() const {
  return cell_->load();
}
template <class T>
void shared_value<T>::store(const T& v) {
  cell_->store(v);
}
template <class T>
T shared_value<T>::exchange(const T& v) {
  return cell_->exchange(v);
}
template <class T>
bool shared_value<T>::compare_exchange(T& expected, const T& desired) {
  return cell_->compare_exchange(expected, desired);
}
template <class T>
T shared_value<T>::fetch_add(const T& d) {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "fetch_add needs an arithmetic T other than bool");
  return cell_->fetch_add(d);
}
template <class T>
T shared_value<T>::fetch_sub(const T& d) {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "fetch_sub needs an arithmetic T other than bool");
  return cell_->fetch_sub(d);
}
template <class T>
T shared_value<T>::fetch_and(const T& v) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>,
                "fetch_and needs an integral T other than bool");
  return cell_->fetch_and(v);
}
template <class T>
T shared_value<T>::fetch_or(const T& v) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>,
                "fetch_or needs an integral T other than bool");
  return cell_->fetch_or(v);
}
template <class T>
T shared_value<T>::fetch_xor(const T& v) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>,
                "fetch_xor needs an integral T other than bool");
  return cell_->fetch_xor(v);
}
template <class T>
template <class F>
auto shared_value<T>::with(F&& f) {
  static_assert(std::is_invocable_v<F&, T&>, "with(f) needs f callable as f(T&)");
  return cell_->with(f);
}

template <class T>
bool shared_value<T>::remove() const {
  return !segment_.name().empty() && detail::segment::remove(segment_.name());
}
template <class T>
bool shared_value<T>::remove(std::string_view name) {
  return detail::with_segment_errors([&] { return detail::segment::remove(name); });
}

// shared_array ---------------------------------------------------------------

template <class T>
detail::segment_shape shared_array<T>::shape() {
  return detail::segment_shape{detail::shared_array_magic,
                               0u,
                               sizeof(T),
                               alignof(T),
                               0,
                               sizeof(T),
                               alignof(T),
                               detail::type_hash<T>(),
                               "shared_array<" + detail::type_name<T>() + ">"};
}

// Constructs the elements of a fresh segment (copies of `*value`, or
// value-initialized when null) and publishes it.
template <class T>
void shared_array<T>::fill(const T* value) {
  T* p = static_cast<T*>(segment_.payload());
  size_ = detail::int_cast<std::size_t>(segment_.count());
  try {
    if (value != nullptr) {
      std::uninitialized_fill_n(p, size_, *value);
    } else {
      std::uninitialized_value_construct_n(p, size_);
    }
  } catch (...) {
    segment_.abandon();
    throw;
  }
  data_ = std::launder(p);
  segment_.publish();
}

template <class T>
shared_array<T>::shared_array(std::size_t n)
    : segment_(
          detail::with_segment_errors([&] { return detail::segment::anonymous(shape(), n); })) {
  fill(nullptr);
}

template <class T>
shared_array<T>::shared_array(std::size_t n, const T& value)
    : segment_(
          detail::with_segment_errors([&] { return detail::segment::anonymous(shape(), n); })) {
  fill(&value);
}

template <class T>
shared_array<T>::shared_array(create_only_t, std::string_view name, std::size_t n)
    : segment_(
          detail::with_segment_errors([&] { return detail::segment::create(name, shape(), n); })) {
  fill(nullptr);
}

template <class T>
shared_array<T>::shared_array(open_only_t, std::string_view name)
    : segment_(detail::with_segment_errors(
          [&] { return detail::segment::open(name, shape(), std::nullopt); })),
      data_(std::launder(static_cast<T*>(segment_.payload()))),
      size_(detail::int_cast<std::size_t>(segment_.count())) {}

template <class T>
shared_array<T>::shared_array(open_or_create_t, std::string_view name, std::size_t n) {
  bool created = false;
  segment_ = detail::with_segment_errors(
      [&] { return detail::segment::open_or_create(name, shape(), n, created); });
  if (created) {
    fill(nullptr);
  } else {
    data_ = std::launder(static_cast<T*>(segment_.payload()));
    size_ = detail::int_cast<std::size_t>(segment_.count());
  }
}

template <class T>
shared_array<T>::shared_array(shared_array&& other) noexcept
    : segment_(std::move(other.segment_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

template <class T>
shared_array<T>& shared_array<T>::operator=(shared_array&& other) noexcept {
  if (this != &other) {
    segment_ = std::move(other.segment_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

template <class T>
bool shared_array<T>::remove() const {
  return !segment_.name().empty() && detail::segment::remove(segment_.name());
}
template <class T>
bool shared_array<T>::remove(std::string_view name) {
  return detail::with_segment_errors([&] { return detail::segment::remove(name); });
}

}  // namespace procpool
