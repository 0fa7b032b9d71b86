/// @file
/// `mpi::pool<F>`: the same calls as `procpool::pool`, over the ranks of an
/// MPI job (see mpi.hpp for the whole picture).
#pragma once

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

#include "../detail/calls/call_checks.hpp"
#include "../detail/calls/call_front.hpp"
#include "../detail/engine/mpi_engine.hpp"
#include "../pool.hpp"
#include "errors.hpp"
#include "session.hpp"

namespace procpool::detail::mpi {
struct handlers;
}  // namespace procpool::detail::mpi

namespace procpool::mpi {

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
  /// Bytes of freed memory each serving rank keeps for its next items rather
  /// than returning them to the kernel, as `procpool::pool_options::
  /// worker_keep_memory` does for a worker (glibc only): big items are then
  /// decoded into pages the rank already has. Set when the rank starts
  /// serving, it stays set after the pool; 0 keeps the allocator's defaults.
  std::size_t keep_memory = std::size_t(64) << 20;
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
/// **Thread safety:** like `procpool::pool`: any number of threads may use a
/// pool; they take turns inside it, and only the thread inside calls MPI.
/// The pool runs a helper thread of its own only under `MPI_THREAD_MULTIPLE`
/// (see `map_async`).
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
    return calls_.template map<detail::invoke_one>(inputs, "map");
  }
  /// As `procpool::pool::map_into`: the results written into `out` (a
  /// vector, a span, a contiguous or any output iterator) as they arrive.
  template <class Range, class Out>
  auto map_into(Range&& inputs, Out&& out) {
    root_only("map_into");
    return calls_.template map_into<detail::invoke_one>(inputs, std::forward<Out>(out), "map_into",
                                                        0);
  }
  /// As `procpool::pool::starmap`: each item is a tuple of arguments.
  template <class Range>
  auto starmap(Range&& inputs) {
    root_only("starmap");
    return calls_.template map<detail::invoke_apply>(inputs, "starmap");
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
  /// As `procpool::pool::map_async`: a future of every result, callbacks
  /// when they are in. With `MPI_THREAD_MULTIPLE` the pool's helper thread
  /// moves the call along and runs the callbacks; otherwise the call moves
  /// while a thread of the caller's waits on the pool, and the callbacks run
  /// in that thread on its way out.
  template <class Range, class OnValue = detail::ignore_value, class OnError = detail::ignore_error>
  auto map_async(Range&& inputs, OnValue callback = {}, OnError error_callback = {}) {
    root_only("map_async");
    return calls_.template map_async<detail::invoke_one>(
        inputs, "map_async", 0, std::move(callback), std::move(error_callback));
  }
  /// As `procpool::pool::submit`: runs `f(args...)` on some rank.
  template <class... Args>
  auto submit(Args&&... args) {
    using Tuple = std::tuple<std::decay_t<Args>...>;
    if constexpr (detail::check_sendable<detail::sent_as::rank_argument, Tuple>()) {
      root_only("submit");
      return calls_.template submit<detail::invoke_apply>(Tuple(std::forward<Args>(args)...));
    }
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
  std::shared_ptr<detail::mpi::engine> engine_;
  detail::call_front<F, detail::mpi::handlers> calls_;
};

/// Deduces `mpi::pool<F>` from the callable.
template <class F>
pool(F) -> pool<F>;
/// Deduces `mpi::pool<F>` from the callable and options.
template <class F>
pool(F, pool_options) -> pool<F>;

}  // namespace procpool::mpi

namespace procpool::detail::mpi {

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
  server(F& f, int rank_number, const procpool::mpi::pool_options& options) : f_(&f) {
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
      // A result on its way keeps moving between items.
      auto h = run_items<Item, Invoke>(*f_, in, call, first, count, out, [&](std::uint64_t) {
        progress();
        return true;
      });
      if (h.kind == frame_kind::error) encode(out, std::int64_t(::getpid()));
      patch_result_header(out, h);
      return;
    }
    result_header h{call, first, 0, frame_kind::results};
    // Hierarchical: the local pool runs the chunk; imap keeps the results
    // before a failing item, as the fork engine's frames do.
    try {
      if constexpr (std::is_same_v<Invoke, invoke_apply>) {
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
      auto [type, message] = describe_current_exception();
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
      fail(out, mark, h, h.first + e.index(), e.type_name(), e.message(), e.pid(),
           exception_access::original(e));
    } catch (const procpool::worker_died& e) {
      auto index = h.first + e.index().value_or(h.count);
      fail(out, mark, h, index, "procpool::worker_died",
           procpool::worker_died(e.pid(), e.status(), index).what(), e.pid());
    } catch (const procpool::timeout_error& e) {
      auto index = h.first + e.index();
      fail(out, mark, h, index, "procpool::timeout_error",
           procpool::timeout_error(index, e.pid(), e.timeout()).what(), e.pid());
    } catch (...) {
      auto [type, message] = describe_current_exception();
      fail(out, mark, h, h.first + h.count, type, message, ::getpid());
    }
  }

  static void fail(procpool::writer& out, std::size_t mark, result_header& h, std::uint64_t index,
                   const std::string& type, const std::string& message, pid_t pid,
                   const exception_object* original = nullptr) {
    out.resize(mark);
    h.kind = frame_kind::error;
    encode_failure(out, index, type, message, pid, original);
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
                                 s.rank, type_name<F>()),
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

}  // namespace procpool::detail::mpi

namespace procpool::mpi {

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
  if (detail::mpi::job().excluded) return;  // given up by rank 0 in an earlier pool: serves no more
  if (detail::mpi::open_engine) {
    if (!detail::mpi::open_engine->closed())
      throw procpool::error(
          "an mpi::pool is already open: the serving ranks are inside its constructor, and serve "
          "one pool at a time, so join or close it (or let it go out of scope) before making "
          "the next");
    detail::mpi::open_engine->join();  // closed: its work finishes, its ranks move on
  }
  MPI_Comm comm = MPI_COMM_NULL;
  detail::mpi::check(MPI_Comm_dup(detail::mpi::base_comm(), &comm), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int size = 1;
  int peer = 0;
  MPI_Comm_rank(comm, &peer);
  MPI_Comm_size(comm, &size);
  root_ = peer == 0;

  detail::mpi::identity me;
  me.pid = ::getpid();
  me.world_rank = rank_;
  me.function_type = detail::mpi::type_hash<F>();
  me.function_id = detail::mpi::function_identity(f_);
  int length = 0;
  MPI_Get_processor_name(me.host, &length);
  std::unique_ptr<detail::mpi::server<F>> s;
  std::string unusable;
  if (!root_) {
    // The initializer runs before rank 0 learns who is ready, so a failure
    // anywhere fails every call from the first.
    try {
      s = std::make_unique<detail::mpi::server<F>>(f_, rank_, options_);
    } catch (...) {
      auto [type, message] = detail::describe_current_exception();
      unusable = fmt::format("rank {} could not start serving: {}: {}", rank_, type, message);
      me.init_failed = 1;
      std::snprintf(me.failure, sizeof me.failure, "%s: %s", type.c_str(), message.c_str());
    }
  }
  std::vector<detail::mpi::identity> all(root_ ? std::size_t(size) : 0);
  detail::mpi::identity root_id = me;
  try {
    detail::mpi::check(
        MPI_Gather(&me, sizeof me, MPI_BYTE, all.data(), sizeof me, MPI_BYTE, 0, comm),
        "MPI_Gather");
    detail::mpi::check(MPI_Bcast(&root_id, sizeof root_id, MPI_BYTE, 0, comm), "MPI_Bcast");
  } catch (...) {
    MPI_Comm_free(&comm);
    throw;
  }

  if (!root_) {
    detail::mpi::root_watch root{static_cast<pid_t>(root_id.pid), std::string(root_id.host), {}};
    detail::keep_freed_memory(options_.keep_memory);
    auto lost = detail::mpi::serve(comm, s.get(), unusable, root);
    s.reset();
    MPI_Comm_free(&comm);
    if (std::find(lost.begin(), lost.end(), peer) != lost.end())
      detail::mpi::job().excluded = true;
    else if (!lost.empty())
      detail::mpi::shrink(lost);
    return;
  }

  std::vector<detail::mpi::rank_info> ranks;
  std::unique_ptr<detail::mpi::server_base> self;
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    ranks.push_back({id.world_rank, r, static_cast<pid_t>(id.pid), std::string(id.host)});
  }
  if (size == 1) {
    try {
      self = std::make_unique<detail::mpi::server<F>>(f_, 0, options_);
    } catch (...) {
      MPI_Comm_free(&comm);
      throw;
    }
    ranks.push_back({rank_, 0, ::getpid(), std::string(me.host)});
  }
  detail::mpi::engine_options engine_options{options_.chunks_per_rank, options_.chunk_bytes,
                                             options_.rank_timeout};
  engine_ = std::make_shared<detail::mpi::engine>(comm, std::move(ranks), engine_options,
                                                  std::move(self));
  for (int r = 1; r < size; ++r) {
    const auto& id = all[std::size_t(r)];
    if (id.function_type != me.function_type || id.function_id != me.function_id) {
      engine_->join();  // lets every rank return from its constructor
      throw procpool::error(fmt::format(
          "rank {} constructed an mpi::pool of a different function than rank 0 ({}{}): every "
          "rank must construct the same pools, of the same functions, in the same order",
          id.world_rank, detail::type_name<F>(),
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
  // With `progress` and no callback, the bar is drawn through mpirun when
  // mpirun's stderr is a terminal (a rank's own stderr is a pipe to it).
  std::function<void(const progress_info&)> callback = options_.on_progress;
  if (!callback && options_.progress && !::isatty(STDERR_FILENO) &&
      detail::mpi::launcher_has_terminal())
    callback = detail::mpi::draw_progress;
  calls_ = detail::call_front<F, detail::mpi::handlers>(engine_, options_.chunk_size,
                                                        options_.progress, callback);
}

template <class F>
pool<F>::~pool() {
  if (!engine_) return;
  try {
    join();
  } catch (...) {
  }
}

template <class F>
void pool<F>::close() noexcept {
  if (engine_) engine_->close();
}

template <class F>
void pool<F>::join() {
  if (!engine_) return;
  {
    detail::scoped_use use(*engine_, "join");
    engine_->join();
  }
  engine_->stop_helper();  // after the callbacks of the calls that finished
}

}  // namespace procpool::mpi
