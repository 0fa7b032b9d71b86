// Shared memory made before fork: an anonymous MAP_SHARED mapping through
// Boost.Interprocess. Children forked after it see the same bytes at the same
// address; it has no name, so nothing can leak in /dev/shm.
#pragma once

#include <fmt/format.h>
#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>

#include <cstddef>
#include <new>
#include <system_error>
#include <utility>

#include "../os/sys.hpp"

namespace procpool::detail {

/// An anonymous shared mapping of `size` bytes, zero-filled, owned by this
/// object (unmapped by its destructor in each process that holds it).
class shared_mapping {
 public:
  shared_mapping() = default;
  /// Maps `size` bytes. **Throws:** `std::system_error` naming mmap when the kernel refuses.
  explicit shared_mapping(std::size_t size) {
    if (sys::injected("mmap")) sys::throw_errno("mmap");
    try {
      region_ = boost::interprocess::anonymous_shared_memory(size);
    } catch (const boost::interprocess::interprocess_exception& e) {
      int err = e.get_native_error();
      if (err == 0) err = ENOMEM;
      throw std::system_error(err, std::generic_category(),
                              fmt::format("mmap of {} bytes of anonymous shared memory", size));
    }
  }
  shared_mapping(shared_mapping&&) noexcept = default;
  shared_mapping& operator=(shared_mapping&&) noexcept = default;

  /// First byte of the mapping (page aligned).
  void* data() const noexcept { return region_.get_address(); }
  /// Size in bytes.
  std::size_t size() const noexcept { return region_.get_size(); }

 private:
  boost::interprocess::mapped_region region_;
};

/// Rounds `n` up to a multiple of `align` (a power of two).
constexpr std::size_t align_up(std::size_t n, std::size_t align) noexcept {
  return (n + align - 1) & ~(align - 1);
}

/// Size of a destructive-interference cache line.
inline constexpr std::size_t cache_line = 64;

}  // namespace procpool::detail
