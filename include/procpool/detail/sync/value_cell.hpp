// The shared bytes of a shared_value<T>: the value and a robust mutex for
// with(), laid out so that a process killed in the middle of any operation
// leaves the previous value or the new one, never a torn mix.
//
// Where std::atomic<T> is lock-free the value is a std::atomic<T> (lock-free
// atomics are address-free, so they work between processes); with() copies it
// out, runs the function on the copy and stores it back with one atomic store.
// Otherwise std::atomic<T> would take a lock from a table private to each
// process, so every operation takes the robust mutex instead, and writes go to
// the spare of two slots before one index flips.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "robust_mutex.hpp"

namespace procpool::detail {

/// Holds a robust mutex for a scope. A holder that died left nothing to
/// repair (every write is published by one final store), so the mutex is
/// simply marked consistent again.
class cell_lock {
 public:
  explicit cell_lock(robust_mutex& m) : m_(m) {
    m_.lock([] {});
  }
  cell_lock(const cell_lock&) = delete;
  cell_lock& operator=(const cell_lock&) = delete;
  ~cell_lock() { m_.unlock(); }

 private:
  robust_mutex& m_;
};

/// `a + b` or `a - b` for arithmetic `T`, wrapping for integers as std::atomic does.
template <class T>
T arithmetic_step(T a, T b, bool add) noexcept {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    U r = add ? static_cast<U>(static_cast<U>(a) + static_cast<U>(b))
              : static_cast<U>(static_cast<U>(a) - static_cast<U>(b));
    return static_cast<T>(r);
  } else {
    return add ? a + b : a - b;
  }
}

template <class T, bool LockFree = std::atomic<T>::is_always_lock_free>
struct value_cell;

/// Lock-free storage: a `std::atomic<T>`.
template <class T>
struct value_cell<T, true> {
  explicit value_cell(const T& initial) : value(initial) {}

  T load() noexcept { return value.load(); }
  void store(const T& v) noexcept { value.store(v); }
  T exchange(const T& v) noexcept { return value.exchange(v); }
  bool compare_exchange(T& expected, const T& desired) noexcept {
    return value.compare_exchange_strong(expected, desired);
  }
  /// Replaces the value by `op(old)`; returns the old value.
  template <class Op>
  T fetch_update(Op op) noexcept {
    T old = value.load();
    while (!value.compare_exchange_weak(old, op(old))) {
    }
    return old;
  }
  T fetch_add(const T& d) noexcept {
    if constexpr (std::is_integral_v<T>) {
      return value.fetch_add(d);
    } else {
      return fetch_update([&](T old) { return arithmetic_step(old, d, true); });
    }
  }
  T fetch_sub(const T& d) noexcept {
    if constexpr (std::is_integral_v<T>) {
      return value.fetch_sub(d);
    } else {
      return fetch_update([&](T old) { return arithmetic_step(old, d, false); });
    }
  }
  T fetch_and(const T& v) noexcept { return value.fetch_and(v); }
  T fetch_or(const T& v) noexcept { return value.fetch_or(v); }
  T fetch_xor(const T& v) noexcept { return value.fetch_xor(v); }
  /// Runs `f` on a copy under the mutex, then stores the copy (unless `f` threw).
  template <class F>
  auto with(F& f) {
    cell_lock lock(guard);
    T copy = value.load();
    if constexpr (std::is_void_v<std::invoke_result_t<F&, T&>>) {
      f(copy);
      value.store(copy);
    } else {
      auto r = f(copy);
      value.store(copy);
      return r;
    }
  }

  robust_mutex guard;
  std::atomic<T> value;
};

/// Locked storage: two slots and the index of the current one, all under the mutex.
template <class T>
struct value_cell<T, false> {
  explicit value_cell(const T& initial) : slots{initial, initial} {}

  T load() {
    cell_lock lock(guard);
    return slots[active];
  }
  void store(const T& v) {
    cell_lock lock(guard);
    publish(v);
  }
  T exchange(const T& v) {
    cell_lock lock(guard);
    T old = slots[active];
    publish(v);
    return old;
  }
  /// Compares object representations, as `std::atomic<T>::compare_exchange_strong` does.
  bool compare_exchange(T& expected, const T& desired) {
    cell_lock lock(guard);
    if (std::memcmp(&slots[active], &expected, sizeof(T)) == 0) {
      publish(desired);
      return true;
    }
    expected = slots[active];
    return false;
  }
  template <class Op>
  T fetch_update(Op op) {
    cell_lock lock(guard);
    T old = slots[active];
    publish(op(old));
    return old;
  }
  T fetch_add(const T& d) {
    return fetch_update([&](T old) { return arithmetic_step(old, d, true); });
  }
  T fetch_sub(const T& d) {
    return fetch_update([&](T old) { return arithmetic_step(old, d, false); });
  }
  T fetch_and(const T& v) {
    return fetch_update([&](T old) { return static_cast<T>(old & v); });
  }
  T fetch_or(const T& v) {
    return fetch_update([&](T old) { return static_cast<T>(old | v); });
  }
  T fetch_xor(const T& v) {
    return fetch_update([&](T old) { return static_cast<T>(old ^ v); });
  }
  template <class F>
  auto with(F& f) {
    cell_lock lock(guard);
    T copy = slots[active];
    if constexpr (std::is_void_v<std::invoke_result_t<F&, T&>>) {
      f(copy);
      publish(copy);
    } else {
      auto r = f(copy);
      publish(copy);
      return r;
    }
  }

  /// Writes the spare slot, then makes it the current one.
  void publish(const T& v) {
    std::uint32_t spare = active ^ 1u;
    slots[spare] = v;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    active = spare;
  }

  robust_mutex guard;
  std::uint32_t active = 0;
  T slots[2];
};

}  // namespace procpool::detail
