/// @file
/// `mpi::pool<F>`: the same `map`, `imap`, `imap_unordered`, `starmap` and
/// `submit` as `procpool::pool`, over the ranks of an MPI job instead of forked
/// workers — for work that outgrows one machine.
///
/// Optional: include it only where MPI is installed (it includes `<mpi.h>`);
/// the rest of procpool never depends on MPI. Link with `MPI::MPI_CXX`.
///
/// The program is SPMD: every rank runs it, and every rank constructs the same
/// pools in the same order. Rank 0 dispatches; on every other rank the
/// constructor serves chunks until rank 0's pool is joined, then returns.
///
/// ```cpp
/// int main(int argc, char** argv) {
///   procpool::mpi::session mpi(argc, argv);
///   procpool::mpi::pool p([](int x) { return x * x; });  // ranks 1.. serve here
///   if (!p.is_root()) return 0;                           // their share is done
///   std::vector<int> squares = p.map(std::vector<int>{1, 2, 3});
/// }
/// ```
///
/// Run with `mpirun -n 4 ./program` (three serving ranks). See docs/scale-out.md.
#pragma once

// Only MPI's C interface is used; keep the deprecated C++ bindings out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <dlfcn.h>
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "pool.hpp"

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
             std::string message)
      : procpool::task_error(fmt::format("item {} failed on rank {} (pid {} on {}): {}: {}", index,
                                         rank, pid, host, type_name, message),
                             index, pid, type_name, message),
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

/// How an `mpi::pool` runs. A plain aggregate, like `procpool::pool_options`.
struct pool_options {
  /// Items per chunk sent to a rank; 0 means `ceil(n / (4 * serving ranks))`, as
  /// Python's default. A chunk should carry far more work than one round trip
  /// of the network costs (see docs/scale-out.md).
  std::size_t chunk_size = 0;
  /// Chunks a rank holds at once: the one it runs plus the ones queued behind
  /// it, so it never waits for rank 0 between chunks. At least 1.
  unsigned chunks_per_rank = 2;
  /// A chunk is cut short when its items pass this many bytes (it always has
  /// at least one item). One message must stay under 2 GiB, MPI's count limit.
  std::size_t chunk_bytes = std::size_t(16) << 20;
  /// Run once on each serving rank before it serves, inside the pool's
  /// constructor. If it throws, the pool is unusable: every call at rank 0,
  /// from the first, raises `procpool::error` naming the rank and the exception.
  std::function<void()> initializer;
  /// Hierarchical mode: when set, each serving rank runs its chunks on a local
  /// `procpool::pool` with these options (`workers = 0`: every core of its
  /// host), so one map uses every core of every node. Run one serving rank per
  /// node then. When empty, a rank calls the function itself, one item at a time.
  std::optional<procpool::pool_options> local;
  /// A rank that holds chunks and answers nothing for this long is given up
  /// (`rank_failed`); its items are not run again. Zero waits forever, which is
  /// right under Open MPI's default, where a rank that dies ends the whole job.
  /// Set it above the longest time one chunk can take. A rank given up
  /// serves no later pool: they are made over the ranks left.
  std::chrono::nanoseconds rank_timeout{0};
  /// Draw a progress bar on stderr at rank 0 during `map`, `starmap` and
  /// `imap`: when rank 0's stderr is a terminal, or `mpirun`'s is (a local
  /// rank 0, whose stderr is a pipe to `mpirun`). Otherwise use `on_progress`.
  bool progress = false;
  /// Called at rank 0 with the progress of `map`, `starmap` and `imap`. If it
  /// throws, the call it reports on ends with that exception.
  std::function<void(const progress_info&)> on_progress;
};

namespace detail {
class engine;
struct handlers;
}  // namespace detail

/// A pool over the ranks of an MPI job: rank 0 dispatches chunks of items to
/// the other ranks, which run `F` on them and send the results back. Load
/// balancing is dynamic (a rank gets its next chunk when it returns one) and
/// results come back in input order.
///
/// **SPMD:** every rank constructs the pool with its own `f`. On rank 0 the
/// constructor returns at once and the pool is used as a `procpool::pool`. On
/// every other rank the constructor serves until rank 0's pool is joined
/// (`join()` or its destructor), then returns; `is_root()` is false there and
/// the calls throw. So one pool is open at a time: make the next one after the
/// previous is joined or closed (a closed one is joined by the next
/// constructor; a second open pool at rank 0 is refused with an error).
///
/// **Same function everywhere:** rank 0 checks that every rank made its pool
/// of the same function: the same type, and for a function pointer the same
/// function (its offset in the file that holds it). Two objects of one type
/// (a `std::function`, a lambda with different captures) cannot be told
/// apart: compute captures the same way on every rank.
/// With a single rank (the program started without `mpirun`) rank 0 runs every
/// chunk itself, which is handy for debugging.
///
/// Items and results travel with procpool's codec (`codec.hpp`) over MPI
/// point-to-point messages on a communicator of the pool's own, so the pool
/// never meets the program's other MPI traffic.
///
/// **Failure contract:** an exception in `f` on any rank raises
/// `mpi::task_error` (a `procpool::task_error`) for the lowest failing index,
/// naming the rank; a rank given up after `rank_timeout` raises
/// `rank_failed`. The pool stays usable after both, and after an exception
/// from a result's decoder, an item's encoder or `on_progress` at rank 0
/// (that call alone raises it). A rank that dies is
/// otherwise handled by the MPI runtime: Open MPI ends the whole job, every
/// rank, and `mpirun` names the rank and its signal (docs/scale-out.md).
///
/// **Thread safety:** like `procpool::pool`: one thread uses a pool at a time,
/// and it is the thread that calls MPI. The pool runs no threads.
template <class F>
class pool {
 public:
  /// Makes the pool on every rank; on ranks other than 0, serves until rank
  /// 0's pool closes. Collective: every rank of `MPI_COMM_WORLD` (but those
  /// given up by an earlier pool, where it returns at once) must call it.
  /// **Throws:** `procpool::error` without a session, when another pool is
  /// open and not closed, when the ranks built pools of different functions,
  /// or on a serving rank when rank 0 is gone; `mpi_error` when MPI fails.
  explicit pool(F f) : pool(std::move(f), pool_options{}) {}
  /// As above, with `options`.
  pool(F f, pool_options options);
  /// At rank 0: finishes the work in flight and stops the serving ranks
  /// (see `join`); never throws.
  ~pool();
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;

  /// True on rank 0, the rank that dispatches; false on serving ranks, whose
  /// constructor has already done their share.
  bool is_root() const noexcept { return root_; }
  /// This process's rank in `MPI_COMM_WORLD`.
  int rank() const noexcept { return rank_; }
  /// Number of ranks that run chunks (all but rank 0; 1 when running alone).
  unsigned serving_ranks() const noexcept { return serving_; }

  /// As `procpool::pool::map`: results in input order.
  /// **Throws:** `mpi::task_error`, `rank_failed`, `pool_closed`, `mpi_error`;
  /// `procpool::error` on a serving rank.
  template <class Range>
  auto map(Range&& inputs) {
    root_only("map");
    return calls_.template map<procpool::detail::invoke_one>(inputs, "map");
  }
  /// As `procpool::pool::starmap`: each item is a tuple of arguments.
  template <class Range>
  auto starmap(Range&& inputs) {
    root_only("starmap");
    return calls_.template map<procpool::detail::invoke_apply>(inputs, "starmap");
  }
  /// As `procpool::pool::imap`: a lazy range of results in input order, with
  /// a bounded window of chunks in flight.
  template <class Range>
  auto imap(Range&& inputs) {
    root_only("imap");
    return calls_.template imap<true>(std::forward<Range>(inputs));
  }
  /// As `procpool::pool::imap_unordered`: `(index, result)` pairs as they arrive.
  template <class Range>
  auto imap_unordered(Range&& inputs) {
    root_only("imap_unordered");
    return calls_.template imap<false>(std::forward<Range>(inputs));
  }
  /// As `procpool::pool::submit`: runs `f(args...)` on some rank.
  template <class... Args>
  auto submit(Args&&... args) {
    using Tuple = std::tuple<std::decay_t<Args>...>;
    static_assert(is_sendable_v<Tuple>,
                  "procpool: an argument of submit cannot be sent to another rank; see "
                  "codec.hpp for the types procpool can send and how to make a type sendable.");
    root_only("submit");
    return calls_.template submit<procpool::detail::invoke_apply>(
        Tuple(std::forward<Args>(args)...));
  }

  /// No more calls; work in flight still completes (by `join()`, the
  /// destructor, or the next pool's constructor, which joins a closed pool).
  void close() noexcept;
  /// Finishes the work in flight and tells every serving rank to return from
  /// its constructor. An `imap` range whose reader is behind cannot finish:
  /// it yields what has arrived, then raises `pool_closed`; so do futures and
  /// ranges of calls never sent. **Throws:** `mpi_error` when MPI fails.
  void join();

 private:
  void root_only(const char* operation) const {
    if (!root_)
      throw procpool::error(fmt::format(
          "mpi::pool::{} called on rank {}: only rank 0 dispatches; on this rank the pool's "
          "constructor has already served its share (check is_root())",
          operation, rank_));
  }

  F f_;
  pool_options options_;
  int rank_ = 0;
  bool root_ = false;
  unsigned serving_ = 0;
  std::shared_ptr<detail::engine> engine_;
  procpool::detail::call_front<F, detail::handlers> calls_;
};

/// Deduces `mpi::pool<F>` from the callable.
template <class F>
pool(F) -> pool<F>;
/// Deduces `mpi::pool<F>` from the callable and options.
template <class F>
pool(F, pool_options) -> pool<F>;

}  // namespace procpool::mpi

// ---------------------------------------------------------------------------
// Implementation.
//
// Protocol, on a communicator duplicated for each pool from the job's base
// communicator (MPI_COMM_WORLD, or the ranks left after some were given up):
//   rank 0 -> rank r, tag `tag_task`:   task_header + encoded items; a stop
//                                        header; then a `members` header and
//                                        the ranks given up during the pool
//   rank r -> rank 0, tag `tag_result`: result_header + encoded results (for
//                                        an error frame then index, type,
//                                        message, pid); a `bye` header last
// A rank answers every task with exactly one result frame, in the order
// received (MPI does not reorder messages between two ranks on one tag), so
// rank 0's bookkeeping of the chunks each rank holds stays exact.
//
// Nothing blocks on one rank: rank 0 matches a result with MPI_Improbe and
// receives it with MPI_Imrecv, tested in the loop that enforces rank_timeout
// (a result above the transport's eager limit arrives only as fast as its
// sender makes MPI progress); a serving rank tests its result send between
// items, and watches rank 0 while it waits.
//
// Teardown leaves the communicator quiet: after `stop`, every rank finishes
// its last send and says `bye`; rank 0 then sends the list of ranks it gave
// up. A communicator that a given-up rank may still send on is not freed but
// kept and drained (the "graveyard"), so its late messages never meet a later
// pool; the ranks not given up make the job's next base communicator without
// the given-up ones (MPI_Comm_create_group, collective over the members only).
//
// Ranks are separate programs, so a chunk names its code by a hash of the
// handler's mangled type name, registered on every rank before main (the
// handler is instantiated wherever rank 0's code calls map, and every rank
// runs the same binary). The pool's function is checked equal on every rank
// when the pool is made: its type, and for a function pointer its offset in
// the binary or library that holds it.

namespace procpool::mpi {

namespace detail {

using procpool::detail::frame_kind;
using procpool::detail::result_header;
using procpool::detail::task_header;
using steady = std::chrono::steady_clock;

inline constexpr int tag_task = 1;
inline constexpr int tag_result = 2;
inline constexpr int tag_shrink = 3;
/// rank r -> 0: the last frame a serving rank sends on a pool's communicator.
inline constexpr frame_kind kind_bye = static_cast<frame_kind>(100);
/// 0 -> rank r, after `stop`: the ranks (of the pool's communicator) given up.
inline constexpr frame_kind kind_members = static_cast<frame_kind>(101);

class engine;

/// The pool open at rank 0 now (constructed, not yet joined), if any: at
/// most one, since the serving ranks serve one pool at a time.
inline engine* open_engine = nullptr;

/// Throws `mpi_error` unless `code` is `MPI_SUCCESS`.
inline void check(int code, const char* call) {
  if (code != MPI_SUCCESS) throw mpi_error(call, code);
}

/// FNV-1a, 64 bits: a stable hash of a name, the same on every rank.
inline std::uint64_t hash_name(const char* s) noexcept {
  std::uint64_t h = 14695981039346656037ull;
  for (; *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

template <class T>
std::uint64_t type_hash() noexcept {
  return hash_name(typeid(T).name());
}

/// Which function a pool runs, beyond its type: for a function pointer, the
/// file that holds the function (its base name) and the function's offset in
/// it, the same on every rank that runs the same binary. 0 when the callable
/// carries no such identity (a lambda's type is its identity; a
/// `std::function` or two objects of one type cannot be told apart).
template <class F>
std::uint64_t function_identity(const F& f) noexcept {
  if constexpr (std::is_pointer_v<F> && std::is_function_v<std::remove_pointer_t<F>>) {
    static_assert(sizeof(F) == sizeof(void*), "procpool: a function pointer the size of a pointer");
    void* address = nullptr;
    std::memcpy(&address, &f, sizeof address);
    Dl_info info{};
    if (address == nullptr || ::dladdr(address, &info) == 0 || info.dli_fname == nullptr)
      return 1;  // not in any loaded file: compared by type only
    const char* file = std::strrchr(info.dli_fname, '/');
    file = file ? file + 1 : info.dli_fname;
    auto offset = reinterpret_cast<std::uintptr_t>(address) -
                  reinterpret_cast<std::uintptr_t>(info.dli_fbase);
    return hash_name(file) ^ (std::uint64_t(offset) * 0x9e3779b97f4a7c15ull) ^ 2;
  } else {
    (void)f;
    return 0;
  }
}

/// Waiting without burning a core: polls for up to 200 µs (an answer that is
/// on its way arrives in that time), then sleeps that double from 20 µs up to
/// a millisecond. Serving ranks and rank 0 poll MPI this way, so ranks
/// oversubscribed on one host leave the cores to the ranks that work.
class backoff {
 public:
  void reset() noexcept { started_ = false; }
  void pause() {
    auto now = steady::now();
    if (!started_) {
      started_ = true;
      since_ = now;
      sleep_ = std::chrono::microseconds(0);
    }
    if (now - since_ < std::chrono::microseconds(200)) return;
    sleep_ = std::min(std::max(2 * sleep_, std::chrono::microseconds(20)),
                      std::chrono::microseconds(1000));
    std::this_thread::sleep_for(sleep_);
  }

 private:
  bool started_ = false;
  steady::time_point since_{};
  std::chrono::microseconds sleep_{0};
};

/// A message being received (MPI_Imrecv): its request and the buffer it fills.
struct pending_receive {
  MPI_Request request = MPI_REQUEST_NULL;
  std::vector<std::byte> bytes;
};

struct rank_info {
  int rank = 0;  ///< in MPI_COMM_WORLD, as users know it
  int peer = 0;  ///< in the pool's communicator
  pid_t pid = 0;
  std::string host;
};

/// True when process `pid` on `host` is known to be gone: it ran on this host
/// and no longer exists. A process on another host cannot be checked.
inline bool known_gone(pid_t pid, const std::string& host) noexcept {
  char here[MPI_MAX_PROCESSOR_NAME + 1] = {};
  int length = 0;
  if (MPI_Get_processor_name(here, &length) != MPI_SUCCESS) return false;
  if (host != std::string(here, static_cast<std::size_t>(length))) return false;
  return ::kill(pid, 0) != 0 && errno == ESRCH;
}

/// A pool's communicator that a rank given up may still send on: kept, never
/// freed, and drained until every rank it waits for has said bye.
struct buried {
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<MPI_Request> sends;
  std::vector<std::vector<std::byte>> buffers;  // what the sends read
  std::vector<pending_receive> receives;
  std::vector<rank_info> owing;  // ranks that have not said bye
  std::chrono::nanoseconds patience{0};
};

/// What the job knows across pools, on each rank.
struct job_state {
  MPI_Comm base = MPI_COMM_NULL;  ///< the ranks pools are made over; null: MPI_COMM_WORLD
  bool excluded = false;          ///< rank 0 gave this rank up: it serves no more pools
  std::vector<buried> graveyard;  ///< rank 0: communicators given-up ranks may still send on
  std::vector<std::vector<std::byte>> parked;  ///< buffers of sends left behind, never freed
};

inline job_state& job() {
  static job_state state;
  return state;
}

inline MPI_Comm base_comm() noexcept {
  return job().base == MPI_COMM_NULL ? MPI_COMM_WORLD : job().base;
}

/// Receives and drops what has arrived on `b`, notes byes; true once it is quiet.
inline bool drain(buried& b) noexcept {
  for (;;) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    if (MPI_Improbe(MPI_ANY_SOURCE, tag_result, b.comm, &found, &message, &status) != MPI_SUCCESS ||
        !found)
      break;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    pending_receive p;
    p.bytes.resize(static_cast<std::size_t>(std::max(count, 0)));
    if (MPI_Imrecv(p.bytes.data(), count, MPI_BYTE, &message, &p.request) != MPI_SUCCESS) break;
    b.receives.push_back(std::move(p));
  }
  for (std::size_t k = 0; k < b.receives.size();) {
    int done = 0;
    MPI_Status status;
    if (MPI_Test(&b.receives[k].request, &done, &status) != MPI_SUCCESS || !done) {
      ++k;
      continue;
    }
    result_header h{};
    if (b.receives[k].bytes.size() >= sizeof h) {
      std::memcpy(&h, b.receives[k].bytes.data(), sizeof h);
      if (h.kind == kind_bye) {
        b.owing.erase(
            std::remove_if(b.owing.begin(), b.owing.end(),
                           [&](const rank_info& r) { return r.peer == status.MPI_SOURCE; }),
            b.owing.end());
      }
    }
    b.receives.erase(b.receives.begin() + static_cast<std::ptrdiff_t>(k));
  }
  for (std::size_t k = 0; k < b.sends.size();) {
    int done = 0;
    if (MPI_Test(&b.sends[k], &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done)
      b.sends.erase(b.sends.begin() + static_cast<std::ptrdiff_t>(k));
    else
      ++k;
  }
  return b.owing.empty() && b.receives.empty() && b.sends.empty();
}

/// Drains every buried communicator once; frees those that have gone quiet.
inline void drain_graveyard() noexcept {
  auto& g = job().graveyard;
  for (std::size_t k = 0; k < g.size();) {
    if (drain(g[k])) {
      MPI_Comm_free(&g[k].comm);
      g.erase(g.begin() + static_cast<std::ptrdiff_t>(k));
    } else {
      ++k;
    }
  }
}

/// Before MPI_Finalize: waits for the ranks given up to say bye (a slow rank
/// that finishes is then let go cleanly), says so on stderr when one takes
/// longer than its pool's `rank_timeout`, and stops waiting when every rank
/// still owed is known dead, or after ten times that long.
inline void settle_graveyard() noexcept {
  auto& g = job().graveyard;
  if (g.empty()) return;
  auto start = steady::now();
  std::chrono::nanoseconds patience = std::chrono::seconds(1);
  for (auto& b : g) patience = std::max(patience, b.patience);
  bool warned = false;
  while (!g.empty()) {
    drain_graveyard();
    if (g.empty()) break;
    bool all_gone = true;
    for (auto& b : g)
      for (auto& r : b.owing) all_gone &= known_gone(r.pid, r.host);
    auto waited = steady::now() - start;
    if (!warned && (all_gone || waited > patience)) {
      warned = true;
      for (auto& b : g)
        for (auto& r : b.owing)
          std::fprintf(stderr,
                       "procpool: rank %d (pid %d on %s) was given up by an mpi::pool and has not "
                       "answered since; MPI_Finalize waits for every rank and may never return: "
                       "end such a job with session::abort(code)\n",
                       r.rank, r.pid, r.host.c_str());
      std::fflush(stderr);
    }
    if (all_gone || waited > 10 * patience) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

/// Makes the job's next base communicator: the current one without the
/// ranks `lost` (ranks of the base, which every pool's communicator
/// duplicates). Collective over the ranks that stay, only.
inline void shrink(const std::vector<int>& lost) {
  MPI_Comm base = base_comm();
  MPI_Group all = MPI_GROUP_NULL;
  MPI_Group stay = MPI_GROUP_NULL;
  check(MPI_Comm_group(base, &all), "MPI_Comm_group");
  int rc = MPI_Group_excl(all, static_cast<int>(lost.size()), lost.data(), &stay);
  MPI_Group_free(&all);
  check(rc, "MPI_Group_excl");
  MPI_Comm next = MPI_COMM_NULL;
  rc = MPI_Comm_create_group(base, stay, tag_shrink, &next);
  MPI_Group_free(&stay);
  check(rc, "MPI_Comm_create_group");
  MPI_Comm_set_errhandler(next, MPI_ERRORS_RETURN);
  if (job().base != MPI_COMM_NULL) MPI_Comm_free(&job().base);
  job().base = next;
}

/// What a rank knows while it serves one pool: the pool's function (as a
/// type hash, checked before a handler casts), and the result send in flight,
/// which it keeps progressing between items.
class server_base {
 public:
  virtual ~server_base() = default;
  std::uint64_t function_type = 0;
  int rank = 0;
  MPI_Request* pending = nullptr;

  /// Lets a result on its way make progress: a message above the transport's
  /// eager limit moves only while its sender calls MPI.
  void progress() noexcept {
    if (pending == nullptr || *pending == MPI_REQUEST_NULL) return;
    int done = 0;
    MPI_Test(pending, &done, MPI_STATUS_IGNORE);
  }
};

/// Runs one chunk on a rank: decodes `count` items from `in`, writes the
/// result frame (after the header space the caller reserved) into `out`.
using remote_fn = void (*)(server_base&, std::uint64_t call, procpool::reader& in,
                           std::uint64_t first, std::uint32_t count, procpool::writer& out);

struct handler_entry {
  remote_fn run;
  std::string name;
};

inline std::unordered_map<std::uint64_t, handler_entry>& registry() {
  static std::unordered_map<std::uint64_t, handler_entry> handlers;
  return handlers;
}

/// Called before main for every handler the program instantiates.
inline std::uint64_t register_handler(const char* name, remote_fn run) {
  std::uint64_t id = hash_name(name);
  auto [it, inserted] = registry().emplace(id, handler_entry{run, name});
  if (!inserted && it->second.name != name) it->second.run = nullptr;  // a collision: refuse both
  return id;
}

/// Writes an error frame's payload: the failing index, the exception's type
/// name and message, and the pid of the process that ran the item.
inline void encode_failure(procpool::writer& out, std::uint64_t index, const std::string& type,
                           const std::string& message, pid_t pid) {
  encode(out, index);
  encode(out, type);
  encode(out, message);
  encode(out, std::int64_t(pid));
}

/// A starmap item on its way through a rank's local pool: the argument tuple,
/// marked so the local function applies it.
template <class Tuple>
struct applied {
  Tuple args;
};

template <class Tuple>
void procpool_encode(procpool::writer& out, const applied<Tuple>& a) {
  encode(out, a.args);
}

template <class Tuple>
applied<Tuple> procpool_decode(procpool::reader& in, procpool::type_tag<applied<Tuple>>) {
  return {decode<Tuple>(in)};
}

/// The function a rank's local pool runs: the rank's `F`, called on an item,
/// or applied to the arguments of a starmap item.
template <class F>
struct local_function {
  F* f;
  template <class Item>
  decltype(auto) operator()(Item& item) const {
    return std::invoke(*f, item);
  }
  template <class Tuple>
  decltype(auto) operator()(applied<Tuple>& a) const {
    return std::apply(*f, a.args);
  }
};

/// A rank's state for a pool of `F`.
template <class F>
class server final : public server_base {
 public:
  server(F& f, int rank_number, const pool_options& options) : f_(&f) {
    function_type = type_hash<F>();
    rank = rank_number;
    if (options.initializer) options.initializer();
    if (options.local) local_.emplace(local_function<F>{&f}, *options.local);
  }

  /// Runs a chunk with items of `Item`, called through `Invoke`.
  template <class Item, class Invoke>
  void run(std::uint64_t call, procpool::reader& in, std::uint64_t first, std::uint32_t count,
           procpool::writer& out) {
    result_header h{call, first, 0, frame_kind::results};
    if (!local_) {
      std::size_t mark = out.size();
      try {
        for (; h.count < count; ++h.count) {
          progress();
          mark = out.size();
          auto item = decode<Item>(in);
          encode(out, Invoke::call(*f_, item));
        }
      } catch (...) {
        // Results before the failing item stay; a half-encoded one is cut off.
        out.resize(mark);
        h.kind = frame_kind::error;
        auto [type, message] = procpool::detail::describe_current_exception();
        encode_failure(out, first + h.count, type, message, ::getpid());
      }
      std::memcpy(out.data(), &h, sizeof h);
      return;
    }
    // Hierarchical: the local pool runs the chunk; imap keeps the results
    // before a failing item, as the fork engine's frames do.
    try {
      if constexpr (std::is_same_v<Invoke, procpool::detail::invoke_apply>) {
        std::vector<applied<Item>> items;
        items.reserve(count);
        for (std::uint32_t k = 0; k < count; ++k) items.push_back({decode<Item>(in)});
        run_local(items, h, out);
      } else {
        std::vector<Item> items;
        items.reserve(count);
        for (std::uint32_t k = 0; k < count; ++k) items.push_back(decode<Item>(in));
        run_local(items, h, out);
      }
    } catch (...) {
      // Decoding failed on this rank (the local pool's errors are caught in run_local).
      h.kind = frame_kind::error;
      auto [type, message] = procpool::detail::describe_current_exception();
      encode_failure(out, first + h.count, type, message, ::getpid());
    }
    std::memcpy(out.data(), &h, sizeof h);
  }

 private:
  template <class Items>
  void run_local(Items& items, result_header& h, procpool::writer& out) {
    std::size_t mark = out.size();
    // The local pool's errors name chunk-local indices; rank 0 hears global ones.
    try {
      for (auto& r : local_->imap(items)) {
        progress();
        encode(out, r);
        ++h.count;
        mark = out.size();
      }
    } catch (const procpool::task_error& e) {
      fail(out, mark, h, h.first + e.index(), e.type_name(), e.message(), e.pid());
    } catch (const procpool::worker_died& e) {
      auto index = h.first + e.index().value_or(h.count);
      fail(out, mark, h, index, "procpool::worker_died",
           procpool::worker_died(e.pid(), e.status(), index).what(), e.pid());
    } catch (const procpool::timeout_error& e) {
      auto index = h.first + e.index();
      fail(out, mark, h, index, "procpool::timeout_error",
           procpool::timeout_error(index, e.pid(), e.timeout()).what(), e.pid());
    } catch (...) {
      auto [type, message] = procpool::detail::describe_current_exception();
      fail(out, mark, h, h.first + h.count, type, message, ::getpid());
    }
  }

  static void fail(procpool::writer& out, std::size_t mark, result_header& h, std::uint64_t index,
                   const std::string& type, const std::string& message, pid_t pid) {
    out.resize(mark);
    h.kind = frame_kind::error;
    encode_failure(out, index, type, message, pid);
  }

  F* f_;
  std::optional<procpool::pool<local_function<F>>> local_;
};

/// The handler for chunks of `Item` called through `Invoke` on a pool of `F`.
template <class F, class Item, class Invoke>
struct remote_handler {
  static void run(server_base& s, std::uint64_t call, procpool::reader& in, std::uint64_t first,
                  std::uint32_t count, procpool::writer& out) {
    if (s.function_type != type_hash<F>()) {
      result_header h{call, first, 0, frame_kind::error};
      encode_failure(out, first, "procpool::error",
                     fmt::format("rank {} serves a pool of a different function than rank 0 "
                                 "sent work for ({}): every rank must construct the same pools "
                                 "in the same order",
                                 s.rank, procpool::detail::type_name<F>()),
                     ::getpid());
      std::memcpy(out.data(), &h, sizeof h);
      return;
    }
    static_cast<server<F>&>(s).template run<Item, Invoke>(call, in, first, count, out);
  }
  static inline const std::uint64_t id = register_handler(typeid(remote_handler).name(), &run);
};

/// Handler tokens for MPI ranks: registered hashes of type names.
struct handlers {
  template <class F, class Item, class Invoke>
  static std::uint64_t id() noexcept {
    return remote_handler<F, Item, Invoke>::id;
  }
};

/// Runs the chunk of task frame `h` (items in `in`) on `s`; writes the result frame into `out`.
inline void run_task(server_base* s, const task_header& h, procpool::reader& in,
                     procpool::writer& out, const std::string& unusable) {
  out.clear();
  out.resize(sizeof(result_header));
  auto refuse = [&](const std::string& message) {
    out.resize(sizeof(result_header));
    result_header r{h.call, h.first, 0, frame_kind::error};
    std::memcpy(out.data(), &r, sizeof r);
    encode_failure(out, h.first, "procpool::error", message, ::getpid());
  };
  if (s == nullptr) return refuse(unusable);
  auto it = registry().find(h.handler);
  if (it == registry().end() || it->second.run == nullptr) {
    return refuse(fmt::format(
        "rank {} has no code for the chunk rank 0 sent (handler {:#x}); every rank must run the "
        "same program",
        s->rank, h.handler));
  }
  it->second.run(*s, h.call, in, h.first, h.count, out);
  if (out.size() > std::size_t(INT_MAX)) {
    std::size_t size = out.size();
    refuse(
        fmt::format("the results of items {} to {} take {} bytes, more than one MPI message "
                    "can carry ({}); use a smaller chunk_size",
                    h.first, h.first + h.count - 1, size, INT_MAX));
  }
}

/// A serving rank's view of rank 0: while the rank waits, it checks now and
/// then that rank 0 still exists (possible when both run on one host), so a
/// rank whose rank 0 died (`mpirun --enable-recovery`) leaves instead of
/// waiting forever.
struct root_watch {
  pid_t pid = 0;
  std::string host;
  steady::time_point next{};

  void check() {
    auto now = steady::now();
    if (now < next) return;
    next = now + std::chrono::milliseconds(50);
    if (known_gone(pid, host))
      throw procpool::error(fmt::format(
          "rank 0 (pid {} on {}) is gone: this rank stops serving its mpi::pool; end the job "
          "(nothing more can come)",
          pid, host));
  }
};

/// Waits for `request` to complete, politely; on a serving rank, watching rank 0.
inline void wait_request(MPI_Request& request, root_watch* root = nullptr) {
  backoff wait;
  for (;;) {
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    if (root) root->check();
    wait.pause();
  }
}

/// A serving rank's loop: runs every task rank 0 sends until it sends stop,
/// says bye, and returns the ranks rank 0 gave up during the pool. `s` is
/// null when the rank could not start (its chunks are refused with `unusable`).
inline std::vector<int> serve(MPI_Comm comm, server_base* s, const std::string& unusable,
                              root_watch& root) {
  std::vector<std::byte> in;
  procpool::writer out;
  std::vector<std::byte> sending;  // the result frame in flight
  MPI_Request request = MPI_REQUEST_NULL;
  if (s) s->pending = &request;
  // If this rank leaves by an exception (rank 0 gone, MPI failed), a send may
  // still read its buffer: that buffer is parked, never freed.
  struct park_on_unwind {
    MPI_Request& request;
    std::vector<std::byte>& sending;
    server_base* s;
    ~park_on_unwind() {
      if (s) s->pending = nullptr;
      if (request != MPI_REQUEST_NULL) job().parked.push_back(std::move(sending));
    }
  } guard{request, sending, s};

  backoff wait;
  auto next_message = [&]() -> task_header {
    for (;;) {
      int found = 0;
      MPI_Message message;
      MPI_Status status;
      check(MPI_Improbe(0, tag_task, comm, &found, &message, &status), "MPI_Improbe");
      if (found) {
        int count = 0;
        check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
        in.resize(static_cast<std::size_t>(count));
        MPI_Request receive = MPI_REQUEST_NULL;
        check(MPI_Imrecv(in.data(), count, MPI_BYTE, &message, &receive), "MPI_Imrecv");
        try {
          wait_request(receive, &root);
        } catch (...) {
          job().parked.push_back(std::move(in));  // the receive may still write it
          throw;
        }
        wait.reset();
        task_header h{};
        if (in.size() >= sizeof h) std::memcpy(&h, in.data(), sizeof h);
        return h;  // a frame shorter than a header (rank 0 never sends one) has kind 0
      }
      if (request != MPI_REQUEST_NULL) {
        int done = 0;
        check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      }
      root.check();
      wait.pause();
    }
  };

  for (;;) {
    task_header h = next_message();
    if (h.kind == frame_kind::stop) break;
    if (h.kind != frame_kind::task) continue;
    procpool::reader items(in.data() + sizeof h, in.size() - sizeof h);
    run_task(s, h, items, out, unusable);
    // One result in flight at a time: the next chunk runs while this one
    // travels (tested between items, so a large one keeps moving).
    wait_request(request, &root);
    sending = out.release();
    out = procpool::writer();
    check(MPI_Isend(sending.data(), static_cast<int>(sending.size()), MPI_BYTE, 0, tag_result, comm,
                    &request),
          "MPI_Isend");
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
  }
  wait_request(request, &root);
  result_header bye{0, 0, 0, kind_bye};
  sending.resize(sizeof bye);
  std::memcpy(sending.data(), &bye, sizeof bye);
  check(MPI_Isend(sending.data(), static_cast<int>(sending.size()), MPI_BYTE, 0, tag_result, comm,
                  &request),
        "MPI_Isend");
  wait_request(request, &root);
  for (;;) {
    task_header h = next_message();
    if (h.kind != kind_members) continue;
    procpool::reader rest(in.data() + sizeof h, in.size() - sizeof h);
    std::vector<int> lost(h.count);
    for (auto& r : lost) r = decode<std::int32_t>(rest);
    return lost;
  }
}

/// Who a rank is, as rank 0 learns it when the pool starts.
struct identity {
  std::int64_t pid = 0;
  std::int32_t world_rank = 0;
  std::int32_t init_failed = 0;
  std::uint64_t function_type = 0;
  std::uint64_t function_id = 0;
  char host[MPI_MAX_PROCESSOR_NAME + 1] = {};
  char failure[512] = {};  // the initializer's exception, type and message
};

/// Rank 0's side: dispatches chunks to the serving ranks and collects results.
class engine final : public procpool::detail::driver {
 public:
  engine(MPI_Comm comm, std::vector<rank_info> ranks, const pool_options& options,
         std::unique_ptr<server_base> self);
  ~engine() override;
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  void start(const std::shared_ptr<procpool::detail::call_state>& call) override;
  bool drive_until(procpool::detail::function_ref<bool()> done,
                   std::optional<steady::time_point> deadline) override;
  void cancel(procpool::detail::call_state& call) noexcept override { release(call, no_item, {}); }
  void check_usable(const char* operation) const override;
  std::size_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  unsigned parallelism() const noexcept override;

  void close() noexcept { closed_ = true; }
  bool closed() const noexcept { return closed_; }
  /// Finishes the work that can finish, fails the calls that cannot (an
  /// `imap` whose reader is behind) with `pool_closed`, then stops.
  void join();
  /// Stops every rank and leaves the communicator quiet (or buried); never throws.
  void stop() noexcept;
  /// Refuses every call from now on with `e`, failing the calls in flight.
  void break_with(std::exception_ptr e) noexcept;
  /// Set by the wrapped progress callback when it throws (tells its exception
  /// from a result decoder's).
  const std::shared_ptr<bool>& callback_threw() const noexcept { return callback_threw_; }

 private:
  static constexpr std::uint64_t no_item = procpool::detail::no_item;
  struct chunk {
    std::shared_ptr<procpool::detail::call_state> call;
    std::uint64_t call_id = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
    std::vector<std::byte> bytes;
    MPI_Request request = MPI_REQUEST_NULL;
  };
  struct queued {
    std::shared_ptr<procpool::detail::call_state> call;
    std::uint64_t next = 0;  // first item of the call's next chunk
  };
  struct rank_state {
    rank_info info;
    std::deque<chunk> inflight;
    std::deque<pending_receive> receiving;
    steady::time_point last_heard{};
    bool lost = false;
    bool said_bye = false;
  };

  bool pump();
  bool receive();
  bool fill(rank_state& r);
  bool make_chunk(chunk& c);
  void run_here(rank_state& r);
  void handle_frame(rank_state& r, const std::byte* data, std::size_t size);
  void finish_chunk(rank_state& r);
  bool check_silence();
  void give_up(rank_state& r, steady::duration silence);
  bool in_flight() const noexcept;
  void release(procpool::detail::call_state& call, std::uint64_t index,
               std::exception_ptr e) noexcept;
  void teardown();

  MPI_Comm comm_;
  std::vector<rank_state> ranks_;  // serving ranks (or rank 0 itself, alone)
  std::unique_ptr<server_base> self_;
  unsigned chunks_per_rank_;
  std::size_t chunk_bytes_;
  std::chrono::nanoseconds rank_timeout_;
  std::deque<queued> sending_;
  std::vector<chunk> abandoned_;  // sends to ranks given up, still to complete
  std::vector<std::byte> spare_;  // a receive buffer to reuse
  procpool::writer scratch_;
  std::shared_ptr<bool> callback_threw_ = std::make_shared<bool>(false);
  steady::time_point last_pump_ = steady::now();
  std::uint64_t next_call_id_ = 1;
  std::exception_ptr broken_;
  bool closed_ = false;
  bool stopped_ = false;
};

inline engine::engine(MPI_Comm comm, std::vector<rank_info> ranks, const pool_options& options,
                      std::unique_ptr<server_base> self)
    : comm_(comm),
      self_(std::move(self)),
      chunks_per_rank_(options.chunks_per_rank),
      chunk_bytes_(options.chunk_bytes),
      rank_timeout_(options.rank_timeout) {
  for (auto& info : ranks) {
    rank_state r;
    r.info = std::move(info);
    ranks_.push_back(std::move(r));
  }
  open_engine = this;
}

inline engine::~engine() {
  if (stopped_) return;
  try {
    join();
  } catch (...) {
    stop();
  }
}

inline void engine::start(const std::shared_ptr<procpool::detail::call_state>& call) {
  call->id = next_call_id_++;
  sending_.push_back(queued{call, 0});
}

inline void engine::check_usable(const char* operation) const {
  if (broken_) std::rethrow_exception(broken_);
  if (closed_) throw pool_closed(operation);
}

inline unsigned engine::parallelism() const noexcept {
  unsigned n = 0;
  for (auto& r : ranks_) n += r.lost ? 0 : 1;
  return std::max(n, 1u);
}

inline bool engine::drive_until(procpool::detail::function_ref<bool()> done,
                                std::optional<steady::time_point> deadline) {
  backoff wait;
  // The predicate is the caller's (it may report progress, and the user's
  // callback may throw): what it throws is that call's, never the engine's.
  while (!done()) {
    if (broken_) std::rethrow_exception(broken_);
    bool progress = false;
    try {
      progress = pump();
    } catch (...) {
      // What escapes here belongs to no one call (MPI failed, memory ran
      // out): every call is let go before the callers' frames unwind, so
      // nothing in the engine points at their inputs or results, and later
      // calls are refused.
      break_with(std::current_exception());
      throw;
    }
    if (progress) {
      wait.reset();
      continue;
    }
    if (done()) break;
    if (deadline && steady::now() >= *deadline) return done();
    wait.pause();
  }
  return true;
}

inline bool engine::pump() {
  // Silence counts only while rank 0 listens: a large answer moves only as
  // both sides call MPI, so time rank 0 spent away (in the caller's code
  // between calls) is not held against a rank.
  auto now = steady::now();
  if (now - last_pump_ > std::chrono::milliseconds(50))
    for (auto& r : ranks_) r.last_heard += now - last_pump_;
  last_pump_ = now;
  bool progress = receive();
  for (auto& r : ranks_) {
    if (r.lost) continue;
    progress |= fill(r);
  }
  if (rank_timeout_.count() > 0) progress |= check_silence();
  if (!job().graveyard.empty()) drain_graveyard();
  return progress;
}

inline bool engine::receive() {
  if (self_) return false;
  bool any = false;
  auto now = steady::now();
  // Match every message that has arrived and start receiving it; a large one
  // completes as its sender makes progress, never blocking this loop.
  for (;;) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    check(MPI_Improbe(MPI_ANY_SOURCE, tag_result, comm_, &found, &message, &status), "MPI_Improbe");
    if (!found) break;
    any = true;
    int count = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
    auto index = static_cast<std::size_t>(status.MPI_SOURCE - 1);
    pending_receive p;
    p.bytes = std::move(spare_);
    p.bytes.resize(static_cast<std::size_t>(count));
    check(MPI_Imrecv(p.bytes.data(), count, MPI_BYTE, &message, &p.request), "MPI_Imrecv");
    auto& r = ranks_.at(index);
    r.receiving.push_back(std::move(p));
    r.last_heard = now;  // it is answering
  }
  for (auto& r : ranks_) {
    while (!r.receiving.empty()) {
      int done = 0;
      check(MPI_Test(&r.receiving.front().request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done) break;
      std::vector<std::byte> bytes = std::move(r.receiving.front().bytes);
      r.receiving.pop_front();
      any = true;
      r.last_heard = steady::now();
      handle_frame(r, bytes.data(), bytes.size());
      spare_ = std::move(bytes);
    }
  }
  return any;
}

inline bool engine::fill(rank_state& r) {
  bool made = false;
  while (r.inflight.size() < chunks_per_rank_) {
    chunk c;
    if (!make_chunk(c)) break;
    made = true;
    if (c.bytes.size() > std::size_t(INT_MAX)) {
      // One item alone is over MPI's count limit: that item fails, nothing is sent.
      --c.call->in_flight;
      c.call->fail(c.first, std::make_exception_ptr(message_too_large(c.bytes.size(), INT_MAX)));
      continue;
    }
    if (r.inflight.empty()) r.last_heard = steady::now();
    r.inflight.push_back(std::move(c));
    if (self_) {
      run_here(r);
      continue;
    }
    auto& sent = r.inflight.back();
    check(MPI_Isend(sent.bytes.data(), static_cast<int>(sent.bytes.size()), MPI_BYTE, r.info.peer,
                    tag_task, comm_, &sent.request),
          "MPI_Isend");
  }
  return made;
}

inline bool engine::make_chunk(chunk& c) {
  while (!sending_.empty()) {
    auto call = sending_.front().call;
    if (call->input_done || call->failed() || call->cancelled) {
      sending_.pop_front();
      continue;
    }
    scratch_.clear();
    scratch_.resize(sizeof(task_header));
    std::uint64_t handler = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
    bool made = false;
    try {
      made = call->next_chunk(scratch_, ~std::size_t(0), first, count, handler);
    } catch (...) {
      // The input's iterator or an item's encoding threw: the call fails (at
      // the first item of the chunk being cut) and leaves the queue, so
      // nothing of its input is read again. Its chunks out still come back.
      std::uint64_t at = sending_.front().next;
      sending_.pop_front();
      call->fail(at, std::current_exception());
      continue;
    }
    if (!made) {
      // This call can send nothing now (its window is full); let the next one go.
      if (sending_.size() > 1) {
        auto q = std::move(sending_.front());
        sending_.pop_front();
        sending_.push_back(std::move(q));
        if (sending_.front().call != call) continue;
      }
      return false;
    }
    sending_.front().next = first + count;
    task_header h{handler, call->id, first, count, frame_kind::task};
    std::memcpy(scratch_.data(), &h, sizeof h);
    c.bytes = scratch_.release();
    c.call = call;
    c.call_id = call->id;
    c.first = first;
    c.count = count;
    ++call->in_flight;
    return true;
  }
  return false;
}

inline void engine::run_here(rank_state& r) {
  chunk& c = r.inflight.back();
  task_header h;
  std::memcpy(&h, c.bytes.data(), sizeof h);
  procpool::reader items(c.bytes.data() + sizeof h, c.bytes.size() - sizeof h);
  procpool::writer out;
  run_task(self_.get(), h, items, out, {});
  handle_frame(r, out.data(), out.size());
}

inline void engine::handle_frame(rank_state& r, const std::byte* data, std::size_t size) {
  result_header h;
  if (size < sizeof h) {
    break_with(std::make_exception_ptr(procpool::error(fmt::format(
        "rank {} sent a frame of {} bytes, shorter than a header", r.info.rank, size))));
    return;
  }
  std::memcpy(&h, data, sizeof h);
  if (h.kind == kind_bye) {
    r.said_bye = true;
    return;
  }
  if (r.lost) return;  // a late answer from a rank already given up
  procpool::reader in(data + sizeof h, size - sizeof h);
  if (r.inflight.empty() || r.inflight.front().call_id != h.call ||
      r.inflight.front().first != h.first) {
    break_with(std::make_exception_ptr(
        procpool::error(fmt::format("rank {} answered a chunk it was not sent (call {}, item {})",
                                    r.info.rank, h.call, h.first))));
    return;
  }
  if (!r.inflight.front().call) {  // its call was let go (cancelled, failed, or the pool broke)
    finish_chunk(r);
    return;
  }
  auto call = r.inflight.front().call;
  *callback_threw_ = false;
  try {
    procpool::detail::deliver_frame(
        *call, h, in, [&](std::uint64_t index, std::string type, std::string message) {
          auto pid = static_cast<pid_t>(decode<std::int64_t>(in));
          return std::make_exception_ptr(task_error(index, r.info.rank, pid, r.info.host,
                                                    std::move(type), std::move(message)));
        });
  } catch (...) {
    // A result's decoder threw something other than decode_error, or the
    // progress callback threw. The frame is consumed; the call ends with that
    // error (a decoder's as a decode_error naming it) and leaves the engine,
    // whose other calls go on.
    auto e = std::current_exception();
    if (!*callback_threw_) {
      auto [type, message] = procpool::detail::describe_current_exception();
      e = std::make_exception_ptr(decode_error(
          0, fmt::format("the results of items {} to {} from rank {} could not be decoded: {}: {}",
                         h.first, h.first + std::max<std::uint32_t>(h.count, 1) - 1, r.info.rank,
                         type, message)));
    }
    finish_chunk(r);
    release(*call, h.first, e);
    return;
  }
  finish_chunk(r);
}

inline void engine::finish_chunk(rank_state& r) {
  chunk& c = r.inflight.front();
  // The rank answered, so it has the whole task: the send is complete or about to be.
  if (c.request != MPI_REQUEST_NULL) wait_request(c.request);
  if (c.call) --c.call->in_flight;
  r.inflight.pop_front();
}

inline void engine::release(procpool::detail::call_state& call, std::uint64_t index,
                            std::exception_ptr e) noexcept {
  if (e) call.fail(index, std::move(e));
  call.cancelled = true;
  for (auto& r : ranks_) {
    for (auto& c : r.inflight) {
      if (c.call.get() != &call) continue;
      --call.in_flight;
      c.call.reset();  // its answer is dropped when it comes
    }
  }
  sending_.erase(std::remove_if(sending_.begin(), sending_.end(),
                                [&](const queued& q) { return q.call.get() == &call; }),
                 sending_.end());
}

inline void engine::break_with(std::exception_ptr e) noexcept {
  if (!broken_) broken_ = e;
  closed_ = true;
  // The calls are let go at once (a map's frame may unwind and free what its
  // call writes into); the chunks stay, call-less, until their ranks answer.
  for (auto& r : ranks_) {
    for (auto& c : r.inflight) {
      if (!c.call) continue;
      --c.call->in_flight;
      c.call->fail(c.first, e);
      c.call.reset();
    }
  }
  for (auto& q : sending_)
    if (!q.call->failed()) q.call->fail(q.next, e);
  sending_.clear();
}

inline bool engine::check_silence() {
  auto now = steady::now();
  bool changed = false;
  for (auto& r : ranks_) {
    if (r.lost || (r.inflight.empty() && r.receiving.empty())) continue;
    if (now - r.last_heard > rank_timeout_) {
      give_up(r, now - r.last_heard);
      changed = true;
    }
  }
  return changed;
}

inline void engine::give_up(rank_state& r, steady::duration silence) {
  r.lost = true;
  for (auto& c : r.inflight) {
    if (c.call) {
      --c.call->in_flight;
      c.call->fail(c.first, std::make_exception_ptr(rank_failed(
                                r.info.rank, r.info.pid, r.info.host, c.first,
                                std::chrono::duration_cast<std::chrono::nanoseconds>(silence))));
      c.call.reset();
    }
    if (c.request != MPI_REQUEST_NULL) abandoned_.push_back(std::move(c));
  }
  r.inflight.clear();
  bool any = false;
  for (auto& other : ranks_) any |= !other.lost;
  if (!any) {
    break_with(std::make_exception_ptr(procpool::error(
        "every serving rank was given up (no answer within rank_timeout); the pool cannot run "
        "tasks")));
  }
}

inline bool engine::in_flight() const noexcept {
  for (auto& r : ranks_)
    if (!r.lost && !r.inflight.empty()) return true;
  return false;
}

inline void engine::join() {
  if (stopped_) return;
  closed_ = true;
  try {
    // Send and collect until nothing is in flight and nothing more can be
    // sent: what is left then (an imap whose reader is behind) cannot finish
    // and fails with pool_closed in stop().
    backoff wait;
    while (!broken_) {
      bool progress = pump();
      if (!progress && !in_flight()) break;
      if (progress)
        wait.reset();
      else
        wait.pause();
    }
  } catch (...) {
    break_with(std::current_exception());
    stop();
    throw;
  }
  stop();
}

inline void engine::teardown() {
  backoff wait;
  // Answers still on their way from the ranks not given up are received
  // (dropped when their call is gone), so no rank is left sending one.
  for (;;) {
    receive();
    if (!in_flight()) break;
    if (rank_timeout_.count() > 0) check_silence();
    wait.pause();
  }
  // Stop: each rank finishes its last send and says bye.
  std::vector<std::vector<std::byte>> buffers;
  std::vector<MPI_Request> requests;
  auto send_all = [&](std::vector<std::byte> frame) {
    buffers.push_back(std::move(frame));
    auto& bytes = buffers.back();
    for (auto& r : ranks_) {
      MPI_Request request = MPI_REQUEST_NULL;
      check(MPI_Isend(bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, r.info.peer, tag_task,
                      comm_, &request),
            "MPI_Isend");
      requests.push_back(request);
    }
  };
  std::vector<std::byte> stop_frame(sizeof(task_header));
  task_header stop_h{0, 0, 0, 0, frame_kind::stop};
  std::memcpy(stop_frame.data(), &stop_h, sizeof stop_h);
  send_all(std::move(stop_frame));
  auto since = steady::now();
  for (auto& r : ranks_) r.last_heard = std::max(r.last_heard, since);
  wait.reset();
  for (;;) {
    receive();
    bool waiting = false;
    auto now = steady::now();
    for (auto& r : ranks_) {
      if (r.lost || r.said_bye) continue;
      if (rank_timeout_.count() > 0 && now - r.last_heard > rank_timeout_) {
        give_up(r, now - r.last_heard);  // it never answers stop: given up too
        continue;
      }
      waiting = true;
    }
    if (!waiting) break;
    wait.pause();
  }
  // Members: the ranks given up, which every rank now knows. The others make
  // the job's next base communicator without them.
  std::vector<int> lost;
  for (auto& r : ranks_)
    if (r.lost) lost.push_back(r.info.peer);
  procpool::writer members;
  members.resize(sizeof(task_header));
  task_header members_h{0, 0, 0, static_cast<std::uint32_t>(lost.size()), kind_members};
  std::memcpy(members.data(), &members_h, sizeof members_h);
  for (std::int32_t peer : lost) encode(members, peer);
  send_all(members.release());
  for (std::size_t k = 0; k < ranks_.size(); ++k) {
    if (ranks_[k].lost) continue;
    wait_request(requests[k]);
    wait_request(requests[ranks_.size() + k]);
  }
  // Quiet, or buried: a rank given up may still send (its late answers, its bye).
  buried b;
  b.comm = comm_;
  b.patience = rank_timeout_;
  for (auto& request : requests)
    if (request != MPI_REQUEST_NULL) b.sends.push_back(request);
  for (auto& c : abandoned_) b.sends.push_back(c.request);
  for (auto& r : ranks_) {
    if (!r.lost) continue;
    for (auto& p : r.receiving) b.receives.push_back(std::move(p));
    r.receiving.clear();
    if (!r.said_bye) b.owing.push_back(r.info);
  }
  abandoned_.erase(std::remove_if(abandoned_.begin(), abandoned_.end(),
                                  [](const chunk& c) { return c.request == MPI_REQUEST_NULL; }),
                   abandoned_.end());
  for (auto& c : abandoned_) b.buffers.push_back(std::move(c.bytes));
  abandoned_.clear();
  for (auto& bytes : buffers) b.buffers.push_back(std::move(bytes));
  comm_ = MPI_COMM_NULL;
  if (drain(b))
    MPI_Comm_free(&b.comm);
  else
    job().graveyard.push_back(std::move(b));
  if (!lost.empty()) shrink(lost);
}

inline void engine::stop() noexcept {
  if (stopped_) return;
  stopped_ = true;
  closed_ = true;
  if (open_engine == this) open_engine = nullptr;
  if (!self_) {
    try {
      teardown();
    } catch (...) {
      // MPI failed while stopping: the communicator is left as it is.
    }
  } else if (comm_ != MPI_COMM_NULL) {
    MPI_Comm_free(&comm_);
  }
  // Calls still waiting for answers, or that could not be sent, get none.
  for (auto& r : ranks_) {
    for (auto& c : r.inflight) {
      if (!c.call) continue;
      --c.call->in_flight;
      if (!c.call->failed()) c.call->fail(c.first, std::make_exception_ptr(pool_closed("a task")));
      c.call.reset();
    }
  }
  for (auto& q : sending_)
    if (!q.call->failed()) q.call->fail(q.next, std::make_exception_ptr(pool_closed("a task")));
  sending_.clear();
}

}  // namespace detail

inline session::session(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
    owner_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  // The MPI library's own threads, started by now, are safe to fork around.
  procpool::detail::fork_safe_threads.store(
      std::max<std::size_t>(1, procpool::detail::sys::thread_count()));
}

inline session::~session() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (detail::open_engine) {
    // The serving ranks are inside that pool's constructor and would never
    // reach MPI_Finalize: the pool is joined here, and the user told.
    std::fprintf(stderr,
                 "procpool: the mpi::session ends while an mpi::pool is still open on rank 0; the "
                 "pool is joined now, so that MPI_Finalize can return (make every pool inside the "
                 "session's lifetime, and join it or let it go out of scope first)\n");
    std::fflush(stderr);
    auto* e = detail::open_engine;
    try {
      e->join();
    } catch (...) {
      e->stop();
    }
  }
  detail::settle_graveyard();
  if (detail::job().base != MPI_COMM_NULL) MPI_Comm_free(&detail::job().base);
  if (owner_) MPI_Finalize();
}

inline std::string session::host() const {
  char name[MPI_MAX_PROCESSOR_NAME + 1] = {};
  int length = 0;
  detail::check(MPI_Get_processor_name(name, &length), "MPI_Get_processor_name");
  return std::string(name, static_cast<std::size_t>(length));
}

inline void session::abort(int code) const noexcept {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

namespace detail {

/// True when the launcher's stderr (mpirun's, the parent of a local rank) is
/// a terminal, although this rank's is a pipe to it.
inline bool launcher_has_terminal() noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/fd/2", ::getppid());
  char target[256] = {};
  auto n = ::readlink(path, target, sizeof target - 1);
  if (n <= 0) return false;
  return std::strncmp(target, "/dev/pts/", 9) == 0 || std::strncmp(target, "/dev/tty", 8) == 0;
}

/// Draws the progress bar, as `progress_reporter` does on a terminal.
inline void draw_progress(const progress_info& info) {
  bool last = info.total > 0 && info.done >= info.total;
  fmt::print(stderr, "\r{}\x1b[K{}", format_progress(info), last ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace detail

template <class F>
pool<F>::pool(F f, pool_options options) : f_(std::move(f)), options_(std::move(options)) {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    throw procpool::error(
        "mpi::pool needs MPI to be running: make a procpool::mpi::session first, on every rank");
  if (options_.chunks_per_rank == 0)
    throw procpool::error("mpi::pool_options::chunks_per_rank must be at least 1; it is 0");
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  if (detail::job().excluded) return;  // given up by rank 0 in an earlier pool: serves no more
  if (detail::open_engine) {
    if (!detail::open_engine->closed())
      throw procpool::error(
          "an mpi::pool is already open: the serving ranks are inside its constructor, and serve "
          "one pool at a time, so join or close it (or let it go out of scope) before making "
          "the next");
    detail::open_engine->join();  // closed: its work finishes, its ranks move on
  }
  MPI_Comm comm = MPI_COMM_NULL;
  detail::check(MPI_Comm_dup(detail::base_comm(), &comm), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int size = 1;
  int peer = 0;
  MPI_Comm_rank(comm, &peer);
  MPI_Comm_size(comm, &size);
  root_ = peer == 0;

  detail::identity me;
  me.pid = ::getpid();
  me.world_rank = rank_;
  me.function_type = detail::type_hash<F>();
  me.function_id = detail::function_identity(f_);
  int length = 0;
  MPI_Get_processor_name(me.host, &length);
  std::unique_ptr<detail::server<F>> s;
  std::string unusable;
  if (!root_) {
    // The initializer runs before rank 0 learns who is ready, so a failure
    // anywhere fails every call from the first.
    try {
      s = std::make_unique<detail::server<F>>(f_, rank_, options_);
    } catch (...) {
      auto [type, message] = procpool::detail::describe_current_exception();
      unusable = fmt::format("rank {} could not start serving: {}: {}", rank_, type, message);
      me.init_failed = 1;
      std::snprintf(me.failure, sizeof me.failure, "%s: %s", type.c_str(), message.c_str());
    }
  }
  std::vector<detail::identity> all(root_ ? std::size_t(size) : 0);
  detail::identity root_id = me;
  try {
    detail::check(MPI_Gather(&me, sizeof me, MPI_BYTE, all.data(), sizeof me, MPI_BYTE, 0, comm),
                  "MPI_Gather");
    detail::check(MPI_Bcast(&root_id, sizeof root_id, MPI_BYTE, 0, comm), "MPI_Bcast");
  } catch (...) {
    MPI_Comm_free(&comm);
    throw;
  }

  if (!root_) {
    detail::root_watch root{static_cast<pid_t>(root_id.pid), std::string(root_id.host), {}};
    auto lost = detail::serve(comm, s.get(), unusable, root);
    s.reset();
    MPI_Comm_free(&comm);
    if (std::find(lost.begin(), lost.end(), peer) != lost.end())
      detail::job().excluded = true;
    else if (!lost.empty())
      detail::shrink(lost);
    return;
  }

  std::vector<detail::rank_info> ranks;
  std::unique_ptr<detail::server_base> self;
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    ranks.push_back({id.world_rank, r, static_cast<pid_t>(id.pid), std::string(id.host)});
  }
  if (size == 1) {
    try {
      self = std::make_unique<detail::server<F>>(f_, 0, options_);
    } catch (...) {
      MPI_Comm_free(&comm);
      throw;
    }
    ranks.push_back({rank_, 0, ::getpid(), std::string(me.host)});
  }
  engine_ = std::make_shared<detail::engine>(comm, std::move(ranks), options_, std::move(self));
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    if (id.function_type != me.function_type || id.function_id != me.function_id) {
      engine_->join();  // lets every rank return from its constructor
      throw procpool::error(fmt::format(
          "rank {} constructed an mpi::pool of a different function than rank 0 ({}{}): every "
          "rank must construct the same pools, of the same functions, in the same order",
          id.world_rank, procpool::detail::type_name<F>(),
          id.function_type == me.function_type ? ", the same type but another function" : ""));
    }
  }
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    if (!id.init_failed) continue;
    engine_->break_with(std::make_exception_ptr(procpool::error(
        fmt::format("rank {} (pid {} on {}) could not start serving: {}; the pool cannot run tasks",
                    id.world_rank, id.pid, id.host, id.failure))));
    break;
  }
  serving_ = static_cast<unsigned>(std::max(size - 1, 1));
  // The progress callback is wrapped so that an exception it throws is told
  // apart from a result decoder's; with `progress` and no callback, the bar is
  // drawn through mpirun when mpirun's stderr is a terminal (a rank's own
  // stderr is a pipe to it).
  std::function<void(const progress_info&)> callback = options_.on_progress;
  if (!callback && options_.progress && !::isatty(STDERR_FILENO) && detail::launcher_has_terminal())
    callback = detail::draw_progress;
  if (callback) {
    callback = [callback, threw = engine_->callback_threw()](const progress_info& info) {
      try {
        callback(info);
      } catch (...) {
        *threw = true;
        throw;
      }
    };
  }
  calls_ = procpool::detail::call_front<F, detail::handlers>(engine_, options_.chunk_size,
                                                             options_.progress, callback);
}

template <class F>
pool<F>::~pool() {
  if (!engine_) return;
  try {
    engine_->join();
  } catch (...) {
  }
}

template <class F>
void pool<F>::close() noexcept {
  if (engine_) engine_->close();
}

template <class F>
void pool<F>::join() {
  if (engine_) engine_->join();
}

}  // namespace procpool::mpi
