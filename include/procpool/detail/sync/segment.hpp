// The memory behind shared_value and shared_array: an anonymous mapping
// (inherited across fork) or a named POSIX shared memory object that unrelated
// processes open by name, both starting with a small header that says what the
// segment holds, so that an open with the wrong type or size is caught.
//
// Creating a named segment: shm_open(O_EXCL), size it, map it, write the header,
// let the caller construct the payload, then publish (state = ready, futex
// wake). An opener waits, boundedly, for the size and then for the ready state,
// so it never reads a half-built segment.
#pragma once

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <typeinfo>
#include <utility>

#include "../int_cast.hpp"
#include "../os/clock.hpp"
#include "../os/sys.hpp"
#include "../transport/futex.hpp"
#include "../transport/shm.hpp"

namespace procpool::detail {

/// What went wrong with a named segment, for the public layer to turn into its exception types.
enum class segment_problem {
  invalid_name,
  not_found,
  already_exists,
  mismatch,
  not_initialized,
  not_trusted
};

/// Thrown by this layer only, and caught by shared.hpp, which rethrows the
/// matching public exception (the public types live in the public header).
struct segment_failure {
  segment_problem problem;
  std::string name;
  std::string message;
};

/// The value of `segment_header::state` once the segment is ready to use.
inline constexpr std::uint32_t segment_ready = 0x59444552;  // "READY" in little-endian bytes
/// Bumped whenever the layout of segments changes.
inline constexpr std::uint32_t segment_version = 1;
/// The permissions procpool gives the named segments it makes: the user's alone.
inline constexpr mode_t segment_mode = 0600;
/// How long an opener waits for a creator that is still building the segment.
inline constexpr std::chrono::seconds segment_init_timeout{2};

/// First bytes of every segment.
struct segment_header {
  std::atomic<std::uint32_t> state;  ///< 0 while being built, `segment_ready` after
  std::uint32_t magic;               ///< which kind of object (shared_value, shared_array)
  std::uint32_t version;             ///< `segment_version`
  std::uint32_t flags;               ///< layout choices, e.g. lock-free storage
  std::uint64_t elem_size;           ///< sizeof(T)
  std::uint64_t elem_align;          ///< alignof(T)
  std::uint64_t count;               ///< number of elements
  std::uint64_t payload_offset;      ///< where the payload starts
  std::uint64_t payload_size;        ///< bytes of payload
  std::uint64_t type_hash;           ///< `type_hash<T>()`: tells apart types of one size
};

/// What a segment holds: `fixed_size + count * per_element` bytes of payload,
/// aligned to `payload_align`, described by the other fields.
struct segment_shape {
  std::uint32_t magic;
  std::uint32_t flags;
  std::uint64_t elem_size;
  std::uint64_t elem_align;
  std::size_t fixed_size;
  std::size_t per_element;
  std::size_t payload_align;
  std::uint64_t type_hash;
  std::string what;  ///< the user's type, for messages: "shared_value<long>"

  std::size_t payload_offset() const noexcept {
    return align_up(sizeof(segment_header), std::max(cache_line, payload_align));
  }
  /// Payload bytes for `count` elements; empty when that overflows.
  std::optional<std::size_t> payload_size(std::uint64_t count) const noexcept {
    if (per_element != 0 &&
        count > (std::numeric_limits<std::size_t>::max() / 2 - fixed_size) / per_element) {
      return std::nullopt;
    }
    return fixed_size + int_cast<std::size_t>(count) * per_element;
  }
};

/// A tag for `T` that is the same in every program built with an Itanium-ABI
/// compiler (GCC, Clang): FNV-1a of its mangled name.
template <class T>
std::uint64_t type_hash() noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const char* p = typeid(T).name(); *p != '\0'; ++p) {
    h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ull;
  }
  return h;
}

/// An anonymous or named segment mapped into this process. Movable, not copyable.
class segment {
 public:
  segment() = default;
  segment(segment&& o) noexcept
      : anonymous_(std::move(o.anonymous_)),
        named_(std::move(o.named_)),
        base_(std::exchange(o.base_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        name_(std::move(o.name_)),
        creator_(std::exchange(o.creator_, 0)) {}
  segment& operator=(segment&& o) noexcept {
    if (this != &o) {
      anonymous_ = std::move(o.anonymous_);
      named_ = std::move(o.named_);
      base_ = std::exchange(o.base_, nullptr);
      size_ = std::exchange(o.size_, 0);
      name_ = std::move(o.name_);
      creator_ = std::exchange(o.creator_, 0);
    }
    return *this;
  }
  segment(const segment&) = delete;
  segment& operator=(const segment&) = delete;

  /// A fresh anonymous segment for `count` elements (header written, not yet published).
  static segment anonymous(const segment_shape& shape, std::uint64_t count);
  /// Creates the named segment `name`; `already_exists` when it is there.
  static segment create(std::string_view name, const segment_shape& shape, std::uint64_t count);
  /// Opens the named segment `name`, waits until it is ready, checks it holds
  /// `shape` (and `count` elements when given).
  static segment open(std::string_view name, const segment_shape& shape,
                      std::optional<std::uint64_t> count);
  /// Opens `name` if it exists, else creates it; `created` says which.
  static segment open_or_create(std::string_view name, const segment_shape& shape,
                                std::uint64_t count, bool& created);
  /// Unlinks the name `name`; false when there was no such segment.
  static bool remove(std::string_view name);

  /// Marks a segment made here as ready for openers (after its payload is built).
  void publish() noexcept {
    header().state.store(segment_ready, std::memory_order_release);
    futex_wake(&header().state);
  }
  /// Unlinks the name of a segment created here whose payload could not be built.
  void abandon() noexcept {
    if (!name_.empty()) boost::interprocess::shared_memory_object::remove(name_.c_str());
  }

  segment_header& header() const noexcept { return *static_cast<segment_header*>(base_); }
  void* payload() const noexcept {
    return static_cast<char*>(base_) + int_cast<std::size_t>(header().payload_offset);
  }
  std::uint64_t count() const noexcept { return header().count; }
  /// The name without the leading slash; empty for an anonymous segment.
  const std::string& name() const noexcept { return name_; }
  /// True when this process made this anonymous segment: it alone destroys the
  /// objects in it. Named segments outlive their processes and are never destroyed.
  bool owns_objects() const noexcept { return creator_ != 0 && creator_ == ::getpid(); }
  /// True while it maps something (false after a move).
  explicit operator bool() const noexcept { return base_ != nullptr; }

  /// Checks `name` and returns it without a leading slash.
  static std::string checked_name(std::string_view name);

 private:
  void write_header(const segment_shape& shape, std::uint64_t count, std::size_t payload) {
    auto& h = header();
    h.magic = shape.magic;
    h.version = segment_version;
    h.flags = shape.flags;
    h.elem_size = shape.elem_size;
    h.elem_align = shape.elem_align;
    h.count = count;
    h.payload_offset = shape.payload_offset();
    h.payload_size = payload;
    h.type_hash = shape.type_hash;
  }
  void check_shape(const segment_shape& shape, std::optional<std::uint64_t> count) const;
  static void check_owner(int fd, const std::string& name);
  static std::size_t total_size(const segment_shape& shape, std::uint64_t count,
                                std::string_view name);
  [[noreturn]] static void fail_boost(const boost::interprocess::interprocess_exception& e,
                                      const char* call, const std::string& name);

  shared_mapping anonymous_;
  boost::interprocess::mapped_region named_;
  void* base_ = nullptr;
  std::size_t size_ = 0;
  std::string name_;
  pid_t creator_ = 0;
};

// ---------------------------------------------------------------------------

inline std::string segment::checked_name(std::string_view name) {
  std::string_view n = name;
  if (!n.empty() && n.front() == '/') n.remove_prefix(1);
  if (n.empty() || n.size() > 240 || n.find('/') != std::string_view::npos || n == "." ||
      n == ".." || n.find('\0') != std::string_view::npos) {
    throw segment_failure{segment_problem::invalid_name, std::string(name),
                          fmt::format("invalid shared memory segment name '{}': use 1 to 240 "
                                      "characters without '/' (one leading '/' is allowed)",
                                      name)};
  }
  return std::string(n);
}

inline std::size_t segment::total_size(const segment_shape& shape, std::uint64_t count,
                                       std::string_view name) {
  auto payload = shape.payload_size(count);
  if (!payload) {
    throw segment_failure{
        segment_problem::mismatch, std::string(name),
        fmt::format("{} elements of {} bytes do not fit in memory", count, shape.elem_size)};
  }
  return shape.payload_offset() + *payload;
}

inline void segment::fail_boost(const boost::interprocess::interprocess_exception& e,
                                const char* call, const std::string& name) {
  int err = e.get_native_error();
  if (err == ENOENT) {
    throw segment_failure{segment_problem::not_found, name,
                          fmt::format("shared memory segment '{}' does not exist", name)};
  }
  if (err == EEXIST) {
    throw segment_failure{segment_problem::already_exists, name,
                          fmt::format("shared memory segment '{}' already exists", name)};
  }
  if (err == 0) err = EINVAL;
  throw std::system_error(err, std::generic_category(), fmt::format("{} /{}", call, name));
}

inline segment segment::anonymous(const segment_shape& shape, std::uint64_t count) {
  segment s;
  std::size_t total = total_size(shape, count, "anonymous");
  std::size_t payload = *shape.payload_size(count);
  s.anonymous_ = shared_mapping(total);
  s.base_ = s.anonymous_.data();
  s.size_ = s.anonymous_.size();
  s.creator_ = ::getpid();
  s.write_header(shape, count, payload);
  return s;
}

inline segment segment::create(std::string_view name, const segment_shape& shape,
                               std::uint64_t count) {
  namespace bip = boost::interprocess;
  segment s;
  s.name_ = checked_name(name);
  std::size_t total = total_size(shape, count, s.name_);
  std::size_t payload = *shape.payload_size(count);
  if (sys::injected("shm_open")) sys::throw_errno("shm_open");
  try {
    bip::shared_memory_object shm(bip::create_only, s.name_.c_str(), bip::read_write,
                                  bip::permissions(segment_mode));
    // The name exists from here on: unlink it again if the rest fails.
    try {
      shm.truncate(static_cast<bip::offset_t>(total));
    } catch (const bip::interprocess_exception& e) {
      s.abandon();
      fail_boost(e, "posix_fallocate", s.name_);
    }
    try {
      s.named_ = bip::mapped_region(shm, bip::read_write);
    } catch (const bip::interprocess_exception& e) {
      s.abandon();
      fail_boost(e, "mmap", s.name_);
    }
  } catch (const bip::interprocess_exception& e) {
    fail_boost(e, "shm_open", s.name_);
  }
  s.base_ = s.named_.get_address();
  s.size_ = s.named_.get_size();
  s.write_header(shape, count, payload);
  return s;
}

inline segment segment::open(std::string_view name, const segment_shape& shape,
                             std::optional<std::uint64_t> count) {
  namespace bip = boost::interprocess;
  segment s;
  s.name_ = checked_name(name);
  // A few seconds: always within the clock's range, so the deadline is never empty.
  const steady::time_point deadline =
      deadline_after(segment_init_timeout).value_or(steady::time_point::max());
  auto not_initialized = [&] {
    return segment_failure{
        segment_problem::not_initialized, s.name_,
        fmt::format("shared memory segment '{}' was not initialized within {} s: it was not made "
                    "by procpool, or its creator died while making it",
                    s.name_, segment_init_timeout.count())};
  };
  if (sys::injected("shm_open")) sys::throw_errno("shm_open");
  try {
    bip::shared_memory_object shm(bip::open_only, s.name_.c_str(), bip::read_write);
    // Before reading a byte of it: a segment another user made first (or
    // opened wide) could feed us values and read what we write.
    check_owner(shm.get_mapping_handle().handle, s.name_);
    // A creator that just made the name may not have sized it yet.
    for (;;) {
      bip::offset_t size = 0;
      if (shm.get_size(size) && size >= static_cast<bip::offset_t>(sizeof(segment_header))) break;
      if (steady::now() >= deadline) throw not_initialized();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    try {
      s.named_ = bip::mapped_region(shm, bip::read_write);
    } catch (const bip::interprocess_exception& e) {
      fail_boost(e, "mmap", s.name_);
    }
  } catch (const bip::interprocess_exception& e) {
    fail_boost(e, "shm_open", s.name_);
  }
  s.base_ = s.named_.get_address();
  s.size_ = s.named_.get_size();
  for (;;) {
    auto state = s.header().state.load(std::memory_order_acquire);
    if (state == segment_ready) break;
    if (state != 0) {
      throw segment_failure{
          segment_problem::mismatch, s.name_,
          fmt::format("shared memory segment '{}' was not made by procpool (as a {})", s.name_,
                      shape.what)};
    }
    auto left = deadline - steady::now();
    if (left <= steady::duration::zero()) throw not_initialized();
    futex_wait(&s.header().state, 0,
               std::min<std::chrono::nanoseconds>(left, std::chrono::milliseconds(10)));
  }
  s.check_shape(shape, count);
  return s;
}

inline segment segment::open_or_create(std::string_view name, const segment_shape& shape,
                                       std::uint64_t count, bool& created) {
  // Another process may create or remove the name between our two attempts; a
  // few rounds settle it.
  for (int attempt = 0;; ++attempt) {
    try {
      segment s = create(name, shape, count);
      created = true;
      return s;
    } catch (const segment_failure& f) {
      if (f.problem != segment_problem::already_exists) throw;
    }
    try {
      segment s = open(name, shape, count);
      created = false;
      return s;
    } catch (const segment_failure& f) {
      if (f.problem != segment_problem::not_found || attempt >= 16) throw;
    }
  }
}

inline bool segment::remove(std::string_view name) {
  return boost::interprocess::shared_memory_object::remove(checked_name(name).c_str());
}

// Refuses a segment this user does not own, or that others may read or
// write: the name may have been taken first by someone else, on purpose.
inline void segment::check_owner(int fd, const std::string& name) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) sys::throw_errno(fmt::format("fstat /{}", name).c_str());
  uid_t me = ::geteuid();
  mode_t mode = st.st_mode & 07777;
  if (st.st_uid != me) {
    throw segment_failure{
        segment_problem::not_trusted, name,
        fmt::format("shared memory segment '{}' belongs to user {} (mode {:04o}), not to this "
                    "user ({}): another user may have made it first to feed or read this "
                    "program's data; it is not opened. Remove /dev/shm/{} or use another name",
                    name, st.st_uid, mode, me, name)};
  }
  if ((mode & ~segment_mode) != 0) {
    throw segment_failure{
        segment_problem::not_trusted, name,
        fmt::format("shared memory segment '{}' has mode {:04o}, wider than the {:04o} procpool "
                    "makes: other users may read or write it; it is not opened. Remove "
                    "/dev/shm/{} or chmod it to {:04o}",
                    name, mode, segment_mode, name, segment_mode)};
  }
}

inline void segment::check_shape(const segment_shape& shape,
                                 std::optional<std::uint64_t> count) const {
  const auto& h = header();
  auto fail = [&](const std::string& why) {
    throw segment_failure{
        segment_problem::mismatch, name_,
        fmt::format("shared memory segment '{}' does not hold a {}: {}", name_, shape.what, why)};
  };
  if (h.magic != shape.magic || h.version != segment_version) {
    fail(
        fmt::format("it holds another kind of object (magic {:#x} version {}, expected magic "
                    "{:#x} version {})",
                    h.magic, h.version, shape.magic, segment_version));
  }
  if (h.elem_size != shape.elem_size || h.elem_align != shape.elem_align ||
      h.flags != shape.flags) {
    fail(fmt::format(
        "its elements are {} bytes with alignment {} (layout flags {:#x}), expected "
        "{} bytes with alignment {} (layout flags {:#x})",
        h.elem_size, h.elem_align, h.flags, shape.elem_size, shape.elem_align, shape.flags));
  }
  if (h.type_hash != shape.type_hash) {
    fail(fmt::format("its elements are of another type of the same size ({} bytes)", h.elem_size));
  }
  if (count && h.count != *count) {
    fail(fmt::format("it holds {} elements, expected {}", h.count, *count));
  }
  auto payload = shape.payload_size(h.count);
  if (!payload || h.payload_offset != shape.payload_offset() || h.payload_size != *payload ||
      size_ < h.payload_offset + h.payload_size) {
    fail(fmt::format("its header says {} elements in {} bytes at offset {}, but it maps {} bytes",
                     h.count, h.payload_size, h.payload_offset, size_));
  }
}

}  // namespace procpool::detail
