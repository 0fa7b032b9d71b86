// The chunks one worker holds, in the order they were sent: a FIFO over a
// vector that keeps its memory. A pool sends and settles a chunk per few
// hundred nanoseconds when chunks are short; `std::deque` allocated a node
// every few of them and freed it again, which took a noticeable share of
// the parent's time.
#pragma once

#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace procpool::detail {

/// A FIFO of `T` that allocates only when it holds more than ever before.
/// Appending may move the elements (references to them are not kept across
/// an `emplace_back`); iterators are the vector's (random access).
template <class T>
class chunk_queue {
 public:
  using iterator = typename std::vector<T>::iterator;
  using const_iterator = typename std::vector<T>::const_iterator;

  /// Appends a default-constructed element and returns it.
  T& emplace_back() {
    // Full: slide the live elements down when at least as many were
    // popped (each is then moved once per pop, amortized), else grow.
    if (items_.size() == items_.capacity() && head_ > 0 && head_ >= size()) compact();
    return items_.emplace_back();
  }
  /// Removes the back element (which must exist).
  void pop_back() noexcept {
    items_.pop_back();
    if (items_.size() == head_) clear();
  }
  /// Removes the front element (which must exist). Its resources are freed now.
  void pop_front() noexcept {
    // Checked here, not on the class: a chunk nested in a class being
    // defined is complete only once that class is.
    static_assert(std::is_nothrow_move_assignable_v<T> &&
                      std::is_nothrow_default_constructible_v<T> &&
                      std::is_nothrow_destructible_v<T>,
                  "chunk_queue moves and resets its elements where nothing may throw");
    // Made again in place: assigning a temporary built on the stack read
    // it back in wide loads before its narrow stores had landed, a stall
    // that was a sixth of the parent's time at a hundred items per chunk.
    T* slot = &items_[head_];
    slot->~T();
    ::new (static_cast<void*>(slot)) T();
    if (++head_ == items_.size()) clear();
  }
  /// Removes every element; the memory stays.
  void clear() noexcept {
    items_.clear();
    head_ = 0;
  }

  T& front() noexcept { return items_[head_]; }
  const T& front() const noexcept { return items_[head_]; }
  T& back() noexcept { return items_.back(); }
  const T& back() const noexcept { return items_.back(); }
  T& operator[](std::size_t i) noexcept { return items_[head_ + i]; }
  const T& operator[](std::size_t i) const noexcept { return items_[head_ + i]; }
  std::size_t size() const noexcept { return items_.size() - head_; }
  bool empty() const noexcept { return items_.size() == head_; }

  iterator begin() noexcept { return items_.begin() + static_cast<std::ptrdiff_t>(head_); }
  iterator end() noexcept { return items_.end(); }
  const_iterator begin() const noexcept {
    return items_.begin() + static_cast<std::ptrdiff_t>(head_);
  }
  const_iterator end() const noexcept { return items_.end(); }

 private:
  /// Moves the live elements to the front, making room without allocating.
  void compact() noexcept {
    std::size_t n = size();
    for (std::size_t i = 0; i < n; ++i) items_[i] = std::move(items_[head_ + i]);
    items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(n), items_.end());
    head_ = 0;
  }

  std::vector<T> items_;
  std::size_t head_ = 0;  // elements before it were popped
};

}  // namespace procpool::detail
