/// @file
/// `mpi::session`: MPI initialized for the life of an object (see mpi.hpp).
#pragma once

#include "../detail/engine/mpi_engine.hpp"
#include "errors.hpp"

namespace procpool::mpi {

/// Initializes MPI for the life of the object (`MPI_Init_thread`) and
/// finalizes it at the end (`MPI_Finalize`). Make one at the top of `main`,
/// before any `mpi::pool`, on every rank.
///
/// When MPI was already initialized (by the program or another library) the
/// session uses it and leaves finalizing to whoever initialized it.
///
/// **Fork safety:** MPI libraries start helper threads (Open MPI runs two or
/// three). They never touch what a forked worker uses, so the session tells
/// procpool's fork check to count them as expected: a local pool in
/// hierarchical mode forks without the threaded-fork warning.
class session {
 public:
  /// Initializes MPI without command-line arguments.
  /// **Throws:** `mpi_error` if MPI cannot be initialized.
  session() : session(nullptr, nullptr) {}
  /// Initializes MPI with `main`'s arguments (MPI may read and remove its own).
  session(int& argc, char**& argv) : session(&argc, &argv) {}
  /// Finalizes MPI if this session initialized it; never throws. A pool
  /// still open at rank 0 is joined first (with a note on stderr: the
  /// serving ranks would otherwise never reach `MPI_Finalize`), and the late
  /// answers of ranks given up are waited for, for a while (see
  /// docs/scale-out.md).
  ~session();
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  /// This process's rank in `MPI_COMM_WORLD`.
  int rank() const noexcept { return rank_; }
  /// Number of ranks in `MPI_COMM_WORLD`.
  int size() const noexcept { return size_; }
  /// The name of this rank's host (`MPI_Get_processor_name`).
  std::string host() const;
  /// Ends every rank of the job now with `code` (`MPI_Abort`); for a rank
  /// that cannot go on, where returning would leave the others waiting.
  [[noreturn]] void abort(int code) const noexcept;

 private:
  session(int* argc, char*** argv);
  bool owner_ = false;
  int rank_ = 0;
  int size_ = 1;
};

inline session::session(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    detail::mpi::check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided),
                       "MPI_Init_thread");
    owner_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  // The MPI library's own threads, started by now, are safe to fork around.
  detail::fork_safe_threads.store(std::max<std::size_t>(1, detail::sys::thread_count()));
}

inline session::~session() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (detail::mpi::open_engine) {
    // The serving ranks are inside that pool's constructor and would never
    // reach MPI_Finalize: the pool is joined here, and the user told.
    std::fprintf(stderr,
                 "procpool: the mpi::session ends while an mpi::pool is still open on rank 0; the "
                 "pool is joined now, so that MPI_Finalize can return (make every pool inside the "
                 "session's lifetime, and join it or let it go out of scope first)\n");
    std::fflush(stderr);
    auto* e = detail::mpi::open_engine;
    try {
      e->join();
    } catch (...) {
      e->stop();
    }
  }
  detail::mpi::settle_graveyard();
  if (detail::mpi::job().base != MPI_COMM_NULL) MPI_Comm_free(&detail::mpi::job().base);
  if (owner_) MPI_Finalize();
}

inline std::string session::host() const {
  char name[MPI_MAX_PROCESSOR_NAME + 1] = {};
  int length = 0;
  detail::mpi::check(MPI_Get_processor_name(name, &length), "MPI_Get_processor_name");
  return std::string(name, static_cast<std::size_t>(length));
}

inline void session::abort(int code) const noexcept {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace procpool::mpi
