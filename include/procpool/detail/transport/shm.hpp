// Shared memory made before fork: an anonymous MAP_SHARED mapping through
// Boost.Interprocess, and rings' bytes mapped twice in a row from a memfd.
// Children forked after either see the same bytes at the same address;
// neither has a name, so nothing can leak in /dev/shm.
#pragma once

#include <fmt/format.h>
#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
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

/// `count` areas of shared memory of `size` bytes each, each mapped twice in
/// a row, so that byte `size + k` of an area is its byte `k`: a ring's bytes
/// read or written across its end are one contiguous piece. Zero-filled,
/// unmapped by the destructor in each process that holds it.
class mirrored_mapping {
 public:
  /// No areas.
  mirrored_mapping() = default;
  /// Maps the areas; `size` must be a multiple of the page size.
  /// **Throws:** `std::system_error` naming the call the kernel refused
  /// (`memfd_create` where it is not available, `mmap` when out of memory).
  mirrored_mapping(std::size_t count, std::size_t size) : size_(size), count_(count) {
    if (count == 0) return;
    long page = ::sysconf(_SC_PAGESIZE);
    if (page <= 0 || size == 0 || size % static_cast<std::size_t>(page) != 0)
      throw std::system_error(EINVAL, std::generic_category(),
                              fmt::format("a mirrored ring of {} bytes", size));
    sys::unique_fd fd(
        sys::checked("memfd_create", [] { return ::memfd_create("procpool-rings", MFD_CLOEXEC); }));
    sys::checked("ftruncate",
                 [&] { return ::ftruncate(fd.get(), static_cast<off_t>(count * size)); });
    // One reservation for every area's two views, then each view laid over
    // its half: nothing else can be mapped in between.
    if (sys::injected("mmap")) sys::throw_errno("mmap");
    void* base = ::mmap(nullptr, 2 * count * size, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) sys::throw_errno("mmap");
    base_ = static_cast<std::byte*>(base);
    for (std::size_t i = 0; i < count; ++i)
      for (std::size_t half = 0; half < 2; ++half) {
        void* at = base_ + (2 * i + half) * size;
        void* got = ::mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd.get(),
                           static_cast<off_t>(i * size));
        if (got == MAP_FAILED) {
          int err = errno;
          release();
          throw std::system_error(err, std::generic_category(),
                                  fmt::format("mmap of {} bytes of a ring's memory", size));
        }
      }
  }
  mirrored_mapping(mirrored_mapping&& other) noexcept
      : base_(std::exchange(other.base_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        count_(std::exchange(other.count_, 0)) {}
  mirrored_mapping& operator=(mirrored_mapping&& other) noexcept {
    if (this != &other) {
      release();
      base_ = std::exchange(other.base_, nullptr);
      size_ = std::exchange(other.size_, 0);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  ~mirrored_mapping() { release(); }

  /// The first byte of area `i`, followed by `2 * size()` mapped bytes.
  std::byte* area(std::size_t i) const noexcept { return base_ + 2 * i * size_; }
  /// Bytes in an area.
  std::size_t size() const noexcept { return size_; }
  /// Whether any area is mapped.
  explicit operator bool() const noexcept { return base_ != nullptr; }

 private:
  void release() noexcept {
    if (base_) ::munmap(base_, 2 * count_ * size_);
    base_ = nullptr;
  }
  std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t count_ = 0;
};

/// Rounds `n` up to a multiple of `align` (a power of two).
constexpr std::size_t align_up(std::size_t n, std::size_t align) noexcept {
  return (n + align - 1) & ~(align - 1);
}

/// Size of a destructive-interference cache line.
inline constexpr std::size_t cache_line = 64;

}  // namespace procpool::detail
