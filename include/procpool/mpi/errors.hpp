/// @file
/// The exceptions of `mpi::pool` (see mpi.hpp), beside those of `procpool::pool`.
#pragma once

// Only MPI's C interface is used; keep the deprecated C++ bindings out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <fmt/format.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>

#include "../errors.hpp"

namespace procpool::mpi {

/// An MPI call returned an error (the pool's communicator reports errors
/// instead of aborting). Names the call and MPI's description of the error.
class mpi_error : public procpool::error {
 public:
  /// `call` (e.g. "MPI_Isend") returned `code`.
  mpi_error(const char* call, int code) : error(describe(call, code)), code_(code) {}
  /// The MPI error code.
  int code() const noexcept { return code_; }

 private:
  static std::string describe(const char* call, int code) {
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    return fmt::format("{} failed: {}", call,
                       length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                  : fmt::format("MPI error {}", code));
  }
  int code_;
};

/// The function threw on a serving rank. A `procpool::task_error` that also
/// names the rank and its host.
class task_error : public procpool::task_error {
 public:
  /// Item `index` failed on `rank` (process `pid` on `host`) with an exception
  /// of type `type_name` whose `what()` was `message`.
  task_error(std::size_t index, int rank, pid_t pid, std::string host, std::string type_name,
             std::string message,
             std::shared_ptr<const procpool::detail::exception_object> original = {})
      : procpool::task_error(fmt::format("item {} failed on rank {} (pid {} on {}): {}: {}", index,
                                         rank, pid, host, type_name, message),
                             index, pid, type_name, message, std::move(original)),
        rank_(rank),
        host_(std::move(host)) {}
  /// The rank that ran the item.
  int rank() const noexcept { return rank_; }
  /// The host the rank runs on, as `MPI_Get_processor_name` says.
  const std::string& host() const noexcept { return host_; }

 private:
  int rank_;
  std::string host_;
};

/// A serving rank was given up: it held chunks and answered nothing for
/// `pool_options::rank_timeout` (it died, hangs, or is cut off). The pool goes
/// on with the other ranks; the call that had items on it raises this.
class rank_failed : public procpool::error {
 public:
  /// `rank` (process `pid` on `host`) held items from `index` on and was silent for `silence`.
  rank_failed(int rank, pid_t pid, std::string host, std::size_t index,
              std::chrono::nanoseconds silence)
      : error(fmt::format("rank {} (pid {} on {}) answered nothing for {:.1f} s while running "
                          "items from {} on; it was given up and the pool goes on without it",
                          rank, pid, host, std::chrono::duration<double>(silence).count(), index)),
        rank_(rank),
        pid_(pid),
        host_(std::move(host)),
        index_(index) {}
  /// The rank given up.
  int rank() const noexcept { return rank_; }
  /// Its process id on its host.
  pid_t pid() const noexcept { return pid_; }
  /// Its host.
  const std::string& host() const noexcept { return host_; }
  /// First item of the call's earliest chunk it held.
  std::size_t index() const noexcept { return index_; }

 private:
  int rank_;
  pid_t pid_;
  std::string host_;
  std::size_t index_;
};

}  // namespace procpool::mpi
