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
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
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
  /// Finalizes MPI if this session initialized it; never throws.
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
  /// Run once on each serving rank before it serves. If it throws, the pool
  /// is unusable: every call at rank 0 raises `procpool::error` naming the rank
  /// and the exception.
  std::function<void()> initializer;
  /// Hierarchical mode: when set, each serving rank runs its chunks on a local
  /// `procpool::pool` with these options (`workers = 0`: every core of its
  /// host), so one map uses every core of every node. Run one serving rank per
  /// node then. When empty, a rank calls the function itself, one item at a time.
  std::optional<procpool::pool_options> local;
  /// A rank that holds chunks and answers nothing for this long is given up
  /// (`rank_failed`); its items are not run again. Zero waits forever, which is
  /// right under Open MPI's default, where a rank that dies ends the whole job.
  /// Set it above the longest time one chunk can take.
  std::chrono::nanoseconds rank_timeout{0};
  /// Draw a progress bar on stderr at rank 0 during `map`, `starmap` and `imap`.
  bool progress = false;
  /// Called at rank 0 with the progress of `map`, `starmap` and `imap`.
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
/// previous is joined (a second open pool at rank 0 is refused with an error).
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
/// `rank_failed`. The pool stays usable after both. A rank that dies is
/// otherwise handled by the MPI runtime: Open MPI ends the whole job, every
/// rank, and `mpirun` names the rank and its signal (docs/scale-out.md).
///
/// **Thread safety:** like `procpool::pool`: one thread uses a pool at a time,
/// and it is the thread that calls MPI. The pool runs no threads.
template <class F>
class pool {
 public:
  /// Makes the pool on every rank; on ranks other than 0, serves until rank
  /// 0's pool closes. Collective: every rank of `MPI_COMM_WORLD` must call it.
  /// **Throws:** `procpool::error` without a session, or when the ranks built
  /// pools of different functions; `mpi_error` when MPI fails.
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
  bool is_root() const noexcept { return rank_ == 0; }
  /// This process's rank.
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

  /// No more calls; work in flight still completes.
  void close() noexcept;
  /// Finishes the work in flight and tells every serving rank to return from
  /// its constructor. **Throws:** `mpi_error` when MPI fails.
  void join();

 private:
  void root_only(const char* operation) const {
    if (rank_ != 0)
      throw procpool::error(fmt::format(
          "mpi::pool::{} called on rank {}: only rank 0 dispatches; on this rank the pool's "
          "constructor has already served its share (check is_root())",
          operation, rank_));
  }

  F f_;
  pool_options options_;
  int rank_ = 0;
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
// Protocol, on a communicator duplicated from MPI_COMM_WORLD for each pool:
//   rank 0 -> rank r, tag `tag_task`:   task_header + encoded items, or a stop header
//   rank r -> rank 0, tag `tag_result`: result_header + encoded results; for an
//                                        error frame then index, type, message, pid
// A rank answers every task with exactly one result frame, in the order
// received (MPI does not reorder messages between two ranks on one tag), so
// rank 0's bookkeeping of the chunks each rank holds stays exact.
//
// Ranks are separate programs, so a chunk names its code by a hash of the
// handler's mangled type name, registered on every rank before main (the
// handler is instantiated wherever rank 0's code calls map, and every rank
// runs the same binary).

namespace procpool::mpi {

namespace detail {

using procpool::detail::frame_kind;
using procpool::detail::result_header;
using procpool::detail::task_header;
using steady = std::chrono::steady_clock;

inline constexpr int tag_task = 1;
inline constexpr int tag_result = 2;

/// Pools open at rank 0 now (constructed, not yet joined): at most one, since
/// the serving ranks serve one pool at a time, in construction order.
inline int open_pools = 0;

/// Throws `mpi_error` unless `code` is `MPI_SUCCESS`.
inline void check(int code, const char* call) {
  if (code != MPI_SUCCESS) throw mpi_error(call, code);
}

/// FNV-1a, 64 bits: a stable hash of a type name, the same on every rank.
inline std::uint64_t hash_name(const char* s) noexcept {
  std::uint64_t h = 14695981039346656037ull;
  for (; *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

template <class T>
std::uint64_t type_hash() noexcept {
  return hash_name(typeid(T).name());
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

/// What a rank knows while it serves one pool: the pool's function (as a
/// type hash, checked before a handler casts), and its local pool, if any.
class server_base {
 public:
  virtual ~server_base() = default;
  std::uint64_t function_type = 0;
  int rank = 0;
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
    if (!local_) {
      procpool::detail::worker_context ctx{&shared_, &slot_, f_, call, false};
      procpool::detail::run_chunk<F, Item, Invoke>(ctx, in, first, count, out);
      result_header h;
      std::memcpy(&h, out.data(), sizeof h);
      if (h.kind == frame_kind::error) encode(out, std::int64_t(::getpid()));
      return;
    }
    // Hierarchical: the local pool runs the chunk; imap keeps the results
    // before a failing item, as the fork engine's frames do.
    result_header h{call, first, 0, frame_kind::results};
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
    try {
      for (auto& r : local_->imap(items)) {
        encode(out, r);
        ++h.count;
        mark = out.size();
      }
    } catch (const procpool::task_error& e) {
      fail(out, mark, h, h.first + e.index(), e.type_name(), e.message(), e.pid());
    } catch (const procpool::worker_died& e) {
      fail(out, mark, h, h.first + e.index().value_or(h.count), "procpool::worker_died", e.what(),
           e.pid());
    } catch (const procpool::timeout_error& e) {
      fail(out, mark, h, h.first + e.index(), "procpool::timeout_error", e.what(), e.pid());
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
  procpool::detail::engine_shared shared_{};
  procpool::detail::worker_slot slot_{};
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

/// Receives the message `probe` found into `buffer`.
inline void receive_probed(MPI_Message& message, const MPI_Status& status,
                           std::vector<std::byte>& buffer) {
  int count = 0;
  check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
  buffer.resize(static_cast<std::size_t>(count));
  check(MPI_Mrecv(buffer.data(), count, MPI_BYTE, &message, MPI_STATUS_IGNORE), "MPI_Mrecv");
}

/// Waits for `request` to complete, politely.
inline void wait_request(MPI_Request& request) {
  backoff wait;
  for (;;) {
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    wait.pause();
  }
}

/// A serving rank's loop: run every task rank 0 sends until it sends stop.
/// `s` is null when the rank could not start (its chunks are refused with `unusable`).
inline void serve(MPI_Comm comm, server_base* s, const std::string& unusable) {
  std::vector<std::byte> in;
  procpool::writer out;
  std::vector<std::byte> sending;  // the result frame in flight
  MPI_Request request = MPI_REQUEST_NULL;
  backoff wait;
  for (;;) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    check(MPI_Improbe(0, tag_task, comm, &found, &message, &status), "MPI_Improbe");
    if (!found) {
      wait.pause();
      continue;
    }
    wait.reset();
    receive_probed(message, status, in);
    task_header h{};
    if (in.size() < sizeof h) continue;  // rank 0 never sends these
    std::memcpy(&h, in.data(), sizeof h);
    if (h.kind == frame_kind::stop) break;
    procpool::reader items(in.data() + sizeof h, in.size() - sizeof h);
    run_task(s, h, items, out, unusable);
    // One result in flight at a time: the next chunk runs while this one travels.
    wait_request(request);
    sending = out.release();
    out = procpool::writer();
    check(MPI_Isend(sending.data(), static_cast<int>(sending.size()), MPI_BYTE, 0, tag_result, comm,
                    &request),
          "MPI_Isend");
  }
  wait_request(request);
}

/// Who a rank is, as rank 0 learns it when the pool starts.
struct identity {
  std::int64_t pid = 0;
  std::uint64_t function_type = 0;
  char host[MPI_MAX_PROCESSOR_NAME + 1] = {};
};

struct rank_info {
  int rank = 0;
  pid_t pid = 0;
  std::string host;
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
  void cancel(procpool::detail::call_state& call) noexcept override { call.cancelled = true; }
  void check_usable(const char* operation) const override;
  std::size_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  unsigned parallelism() const noexcept override;

  void close() noexcept { closed_ = true; }
  /// Finishes the work in flight, sends stop to every rank, frees the communicator.
  void join();

 private:
  struct chunk {
    std::shared_ptr<procpool::detail::call_state> call;
    std::uint64_t call_id = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
    std::vector<std::byte> bytes;
    MPI_Request request = MPI_REQUEST_NULL;
  };
  struct rank_state {
    rank_info info;
    std::deque<chunk> inflight;
    steady::time_point last_heard{};
    bool lost = false;
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
  bool idle() const;
  void break_with(std::exception_ptr e) noexcept;
  void stop() noexcept;

  MPI_Comm comm_;
  std::vector<rank_state> ranks_;  // serving ranks (or rank 0 itself, alone)
  std::unique_ptr<server_base> self_;
  unsigned chunks_per_rank_;
  std::size_t chunk_bytes_;
  std::chrono::nanoseconds rank_timeout_;
  std::deque<std::shared_ptr<procpool::detail::call_state>> sending_;
  std::vector<chunk> abandoned_;  // sends to ranks given up, never waited for
  std::vector<std::byte> inbuf_;
  procpool::writer scratch_;
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
  for (auto& info : ranks) ranks_.push_back(rank_state{std::move(info), {}, {}, false});
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
  sending_.push_back(call);
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
  while (!done()) {
    if (broken_) std::rethrow_exception(broken_);
    if (pump()) {
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
  bool progress = receive();
  for (auto& r : ranks_) {
    if (r.lost) continue;
    progress |= fill(r);
  }
  if (rank_timeout_.count() > 0) progress |= check_silence();
  return progress;
}

inline bool engine::receive() {
  if (self_) return false;
  bool any = false;
  for (;;) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    check(MPI_Improbe(MPI_ANY_SOURCE, tag_result, comm_, &found, &message, &status), "MPI_Improbe");
    if (!found) return any;
    any = true;
    receive_probed(message, status, inbuf_);
    auto index = static_cast<std::size_t>(status.MPI_SOURCE - 1);
    if (index >= ranks_.size()) continue;
    handle_frame(ranks_[index], inbuf_.data(), inbuf_.size());
  }
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
    check(MPI_Isend(sent.bytes.data(), static_cast<int>(sent.bytes.size()), MPI_BYTE, r.info.rank,
                    tag_task, comm_, &sent.request),
          "MPI_Isend");
  }
  return made;
}

inline bool engine::make_chunk(chunk& c) {
  while (!sending_.empty()) {
    auto call = sending_.front();
    if (call->input_done || call->failed() || call->cancelled) {
      sending_.pop_front();
      continue;
    }
    scratch_.clear();
    scratch_.resize(sizeof(task_header));
    std::uint64_t handler = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
    if (!call->next_chunk(scratch_, ~std::size_t(0), first, count, handler)) {
      // This call can send nothing now (its window is full); let the next one go.
      if (sending_.size() > 1) {
        sending_.pop_front();
        sending_.push_back(call);
        if (sending_.front() != call) continue;
      }
      return false;
    }
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
  procpool::reader in(data + sizeof h, size - sizeof h);
  if (h.kind == frame_kind::init_failed) {
    auto type = decode<std::string>(in);
    auto message = decode<std::string>(in);
    break_with(std::make_exception_ptr(procpool::error(fmt::format(
        "rank {} (pid {} on {}) could not start serving: {}: {}; the pool cannot run tasks",
        r.info.rank, r.info.pid, r.info.host, type, message))));
    return;
  }
  if (r.lost) return;  // a late answer from a rank already given up
  r.last_heard = steady::now();
  if (r.inflight.empty() || r.inflight.front().call_id != h.call ||
      r.inflight.front().first != h.first) {
    break_with(std::make_exception_ptr(
        procpool::error(fmt::format("rank {} answered a chunk it was not sent (call {}, item {})",
                                    r.info.rank, h.call, h.first))));
    return;
  }
  if (!r.inflight.front().call) {  // its call was let go when the pool broke
    finish_chunk(r);
    return;
  }
  auto& call = *r.inflight.front().call;
  procpool::detail::deliver_frame(
      call, h, in, [&](std::uint64_t index, std::string type, std::string message) {
        auto pid = static_cast<pid_t>(decode<std::int64_t>(in));
        return std::make_exception_ptr(
            task_error(index, r.info.rank, pid, r.info.host, std::move(type), std::move(message)));
      });
  finish_chunk(r);
}

inline void engine::finish_chunk(rank_state& r) {
  chunk& c = r.inflight.front();
  // The rank answered, so it has the whole task: the send is complete or about to be.
  if (c.request != MPI_REQUEST_NULL) wait_request(c.request);
  if (c.call) --c.call->in_flight;
  r.inflight.pop_front();
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
  for (auto& call : sending_)
    if (!call->failed()) call->fail(0, e);
  sending_.clear();
}

inline bool engine::check_silence() {
  auto now = steady::now();
  bool changed = false;
  for (auto& r : ranks_) {
    if (r.lost || r.inflight.empty()) continue;
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

inline bool engine::idle() const {
  if (!sending_.empty()) return false;
  for (auto& r : ranks_)
    if (!r.inflight.empty()) return false;
  return true;
}

inline void engine::join() {
  if (stopped_) return;
  closed_ = true;
  if (!broken_) drive_until([&] { return idle(); }, std::nullopt);
  stop();
}

inline void engine::stop() noexcept {
  if (stopped_) return;
  stopped_ = true;
  closed_ = true;
  --open_pools;
  if (!self_) {
    // Answers still on their way are received and dropped, so no rank is left
    // blocked sending one; then every rank, given up or not, is told to stop.
    try {
      backoff wait;
      for (;;) {
        receive();
        bool busy = false;
        for (auto& r : ranks_) busy |= !r.lost && !r.inflight.empty();
        if (!busy) break;
        if (rank_timeout_.count() > 0) check_silence();
        wait.pause();
      }
    } catch (...) {
    }
    task_header h{0, 0, 0, 0, frame_kind::stop};
    std::vector<MPI_Request> stops;
    for (auto& r : ranks_) {
      MPI_Request request = MPI_REQUEST_NULL;
      if (MPI_Isend(&h, sizeof h, MPI_BYTE, r.info.rank, tag_task, comm_, &request) ==
          MPI_SUCCESS) {
        if (r.lost)
          MPI_Request_free(&request);
        else
          stops.push_back(request);
      }
    }
    for (auto& request : stops) {
      try {
        wait_request(request);
      } catch (...) {
      }
    }
    for (auto& c : abandoned_) {
      MPI_Cancel(&c.request);
      MPI_Request_free(&c.request);
    }
    abandoned_.clear();
  }
  // Calls still waiting for answers get none.
  for (auto& r : ranks_) {
    for (auto& c : r.inflight) {
      if (!c.call) continue;
      --c.call->in_flight;
      if (!c.call->failed()) c.call->fail(c.first, std::make_exception_ptr(pool_closed("a task")));
    }
    r.inflight.clear();
  }
  sending_.clear();
  MPI_Comm_free(&comm_);
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
  if (!owner_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
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
  if (detail::open_pools > 0)
    throw procpool::error(
        "an mpi::pool is already open: the serving ranks are inside its constructor, and serve "
        "one pool at a time, so close or join it (or let it go out of scope) before making "
        "the next");
  MPI_Comm comm = MPI_COMM_NULL;
  detail::check(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int size = 1;
  MPI_Comm_rank(comm, &rank_);
  MPI_Comm_size(comm, &size);

  detail::identity me;
  me.pid = ::getpid();
  me.function_type = detail::type_hash<F>();
  int length = 0;
  MPI_Get_processor_name(me.host, &length);
  std::vector<detail::identity> all(rank_ == 0 ? std::size_t(size) : 0);
  detail::check(MPI_Gather(&me, sizeof me, MPI_BYTE, all.data(), sizeof me, MPI_BYTE, 0, comm),
                "MPI_Gather");

  if (rank_ != 0) {
    std::unique_ptr<detail::server<F>> s;
    std::string unusable;
    try {
      s = std::make_unique<detail::server<F>>(f_, rank_, options_);
    } catch (...) {
      auto [type, message] = procpool::detail::describe_current_exception();
      unusable = fmt::format("rank {} could not start serving: {}: {}", rank_, type, message);
      procpool::writer out;
      out.resize(sizeof(detail::result_header));
      detail::result_header h{0, 0, 0, detail::frame_kind::init_failed};
      std::memcpy(out.data(), &h, sizeof h);
      encode(out, type);
      encode(out, message);
      MPI_Send(out.data(), static_cast<int>(out.size()), MPI_BYTE, 0, detail::tag_result, comm);
    }
    detail::serve(comm, s.get(), unusable);
    s.reset();
    MPI_Comm_free(&comm);
    return;
  }

  std::vector<detail::rank_info> ranks;
  std::unique_ptr<detail::server_base> self;
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    ranks.push_back({r, static_cast<pid_t>(id.pid), std::string(id.host)});
  }
  if (size == 1) {
    try {
      self = std::make_unique<detail::server<F>>(f_, 0, options_);
    } catch (...) {
      MPI_Comm_free(&comm);
      throw;
    }
    ranks.push_back({0, ::getpid(), std::string(me.host)});
  }
  engine_ = std::make_shared<detail::engine>(comm, std::move(ranks), options_, std::move(self));
  ++detail::open_pools;
  for (int r = 1; r < size; ++r) {
    if (all[std::size_t(r)].function_type != me.function_type) {
      engine_->join();  // lets every rank return from its constructor
      throw procpool::error(fmt::format(
          "rank {} constructed an mpi::pool of a different function than rank 0 ({}): every "
          "rank must construct the same pools in the same order",
          r, procpool::detail::type_name<F>()));
    }
  }
  serving_ = static_cast<unsigned>(std::max(size - 1, 1));
  calls_ = procpool::detail::call_front<F, detail::handlers>(
      engine_, options_.chunk_size, options_.progress, options_.on_progress);
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
