// The MPI engine: rank 0's side of an mpi::pool (dispatching chunks to the
// serving ranks and collecting their answers), and the serving ranks' loop.
// Calls, chunks and the checks on answers are the dispatcher's
// (dispatch/dispatcher.hpp), as in the fork engine; this file is the
// transport: messages, ranks, silence, teardown. mpi/pool.hpp adds what
// runs a chunk on a rank (it may use a local procpool::pool).
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

#pragma once

// <mpi.h> comes with mpi/errors.hpp, which keeps MPI's C++ bindings out.
#include <dlfcn.h>
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

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../../mpi/errors.hpp"
#include "../calls/calls.hpp"
#include "../dispatch/dispatcher.hpp"
#include "../dispatch/frame.hpp"
#include "../os/clock.hpp"
#include "../os/fork.hpp"
#include "../os/sys.hpp"
#include "../os/type_name.hpp"

namespace procpool::detail::mpi {

inline constexpr int tag_task = 1;
inline constexpr int tag_result = 2;
inline constexpr int tag_shrink = 3;

class engine;

/// The pool open at rank 0 now (constructed, not yet joined), if any: at
/// most one, since the serving ranks serve one pool at a time.
inline engine* open_engine = nullptr;

/// Throws `mpi_error` unless `code` is `MPI_SUCCESS`.
inline void check(int code, const char* call) {
  if (code != MPI_SUCCESS) throw procpool::mpi::mpi_error(call, code);
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
  procpool::writer bytes;  // not zeroed before MPI fills it

  /// Room for `count` bytes, which the receive then fills.
  std::byte* room(int count) {
    auto n = static_cast<std::size_t>(std::max(count, 0));
    bytes.clear();
    std::byte* p = bytes.prepare(n);
    bytes.commit(n);
    return p;
  }
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
  try {
    return !sys::kill(pid, 0);
  } catch (const std::system_error&) {
    return false;  // EPERM: it exists, as another user's process
  }
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
    if (MPI_Imrecv(p.room(count), count, MPI_BYTE, &message, &p.request) != MPI_SUCCESS) break;
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
      if (h.kind == frame_kind::bye) {
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
/// name, message and object (`encode_failure_tail`), and the pid of the
/// process that ran the item.
inline void encode_failure(procpool::writer& out, std::uint64_t index, const std::string& type,
                           const std::string& message, pid_t pid,
                           const exception_object* original = nullptr) {
  encode_failure_tail(out, index, type, message, original);
  encode(out, std::int64_t(pid));
}

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
  procpool::writer in;             // the task frame received (its buffer reused, not zeroed)
  procpool::writer out;            // the next result frame, in the buffer of the one before last
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
        in.clear();
        std::byte* into = in.prepare(static_cast<std::size_t>(count));
        in.commit(static_cast<std::size_t>(count));
        MPI_Request receive = MPI_REQUEST_NULL;
        check(MPI_Imrecv(into, count, MPI_BYTE, &message, &receive), "MPI_Imrecv");
        try {
          wait_request(receive, &root);
        } catch (...) {
          job().parked.push_back(in.release());  // the receive may still write it
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
    std::vector<std::byte> sent = std::move(sending);
    sending = out.release();
    out = procpool::writer(std::move(sent));  // grown once, not for every chunk
    check(MPI_Isend(sending.data(), static_cast<int>(sending.size()), MPI_BYTE, 0, tag_result, comm,
                    &request),
          "MPI_Isend");
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
  }
  wait_request(request, &root);
  result_header bye{0, 0, 0, frame_kind::bye};
  sending.resize(sizeof bye);
  std::memcpy(sending.data(), &bye, sizeof bye);
  check(MPI_Isend(sending.data(), static_cast<int>(sending.size()), MPI_BYTE, 0, tag_result, comm,
                  &request),
        "MPI_Isend");
  wait_request(request, &root);
  for (;;) {
    task_header h = next_message();
    if (h.kind != frame_kind::members) continue;
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
/// What the engine needs to know of an mpi::pool's options.
struct engine_options {
  unsigned chunks_per_rank = 2;
  std::size_t chunk_bytes = std::size_t(16) << 20;
  std::chrono::nanoseconds rank_timeout{0};
};

class engine final : public driver {
 public:
  engine(MPI_Comm comm, std::vector<rank_info> ranks, const engine_options& options,
         std::unique_ptr<server_base> self);
  ~engine() override;
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  void start(const std::shared_ptr<call_state>& call) override;
  void send_now() override {
    if (broken_ || stopped_) return;
    try {
      if (pump()) note_progress();
    } catch (...) {
      break_with(std::current_exception());  // as drive_until does
      throw;
    }
  }
  bool drive_until(function_ref<bool()> done, std::optional<steady::time_point> deadline) override;
  /// The user gave up on `call`: nothing more is sent for it, and its late
  /// answers are dropped.
  void cancel(call_state& call) noexcept override { call.cancelled = true; }
  void cancel_unsent(const std::exception_ptr& e) noexcept override { dispatch_.cancel_unsent(e); }
  /// The call is over for its user: cancels what is left of it and, unless
  /// collection is under way, drops it from the queues at once.
  void end_call(call_state& call) noexcept override {
    if (!call.finished()) cancel(call);
    if (!driving_) dispatch_.forget(call);
  }
  void check_usable(const char* operation) const override;
  std::size_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  unsigned parallelism() const noexcept override;

 protected:
  bool idle() const noexcept override {
    if (stopped_ || broken_) return true;
    // A range's chunks wait for its reader, not for the helper.
    for (auto& r : ranks_)
      if (!r.lost)
        for (auto& c : r.inflight)
          if (awaits_collection(c)) return false;
    return !dispatch_.work_queued(true);
  }
  bool helper_allowed() const noexcept override { return thread_multiple_; }

 public:
  void close() noexcept { closed_ = true; }
  bool closed() const noexcept { return closed_; }
  /// Finishes the work that can finish, fails the calls that cannot (an
  /// `imap` whose reader is behind) with `pool_closed`, then stops.
  void join();
  /// Stops every rank and leaves the communicator quiet (or buried); never throws.
  void stop() noexcept;
  /// Refuses every call from now on with `e`, failing the calls in flight.
  void break_with(std::exception_ptr e) noexcept;

 private:
  /// A chunk as the MPI engine carries it: with the request of its send.
  struct chunk : detail::chunk {
    MPI_Request request = MPI_REQUEST_NULL;
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
  bool fill(rank_state& r, unsigned up_to);
  void run_here(rank_state& r);
  void handle_frame(rank_state& r, const std::byte* data, std::size_t size);
  void finish_chunk(rank_state& r);
  bool check_silence();
  void give_up(rank_state& r, steady::duration silence);
  bool in_flight() const noexcept;
  void teardown();

  MPI_Comm comm_;
  std::vector<rank_state> ranks_;  // serving ranks (or rank 0 itself, alone)
  std::unique_ptr<server_base> self_;
  unsigned chunks_per_rank_;
  std::size_t chunk_bytes_;
  std::chrono::nanoseconds rank_timeout_;
  dispatcher dispatch_;
  std::vector<chunk> abandoned_;  // sends to ranks given up, still to complete
  procpool::writer spare_;        // a receive buffer to reuse
  steady::time_point last_pump_ = steady::now();
  std::exception_ptr broken_;
  bool closed_ = false;
  bool stopped_ = false;
  bool driving_ = false;          // inside pump: the queues are being walked
  bool thread_multiple_ = false;  // MPI allows calls from any thread at once: a helper may run
};

inline engine::engine(MPI_Comm comm, std::vector<rank_info> ranks, const engine_options& options,
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
  int level = MPI_THREAD_SINGLE;
  thread_multiple_ = MPI_Query_thread(&level) == MPI_SUCCESS && level == MPI_THREAD_MULTIPLE;
}

inline engine::~engine() {
  stop_helper(true);
  if (stopped_) return;
  try {
    join();
  } catch (...) {
    stop();
  }
}

inline void engine::start(const std::shared_ptr<call_state>& call) {
  dispatch_.start(call);
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

inline bool engine::drive_until(function_ref<bool()> done,
                                std::optional<steady::time_point> deadline) {
  backoff wait;
  // The predicate is the caller's (it may report progress, and the user's
  // callback may throw): what it throws is that call's, never the engine's.
  while (!done()) {
    if (broken_) std::rethrow_exception(broken_);
    // Another thread may have joined or stopped the pool while this one let
    // go of it (below): its communicator is gone, and nothing more will come.
    if (stopped_) throw pool_closed::while_pending("join, terminate or the destructor");
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
      note_progress();
      wait.reset();
      continue;
    }
    if (done()) break;
    if (deadline && steady::now() >= *deadline) return done();
    // Other threads may use the pool meanwhile (MPI is called only by the
    // thread that holds it).
    released others_may_enter(*this);
    wait.pause();
  }
  return true;
}

inline bool engine::pump() {
  // The user's code runs inside (input iterators, encoders, decoders): a
  // call it ends is forgotten later, not while the queues are walked.
  struct driving {
    bool& flag;
    bool was;
    explicit driving(bool& f) : flag(f), was(f) { flag = true; }
    ~driving() { flag = was; }
  } in_drive(driving_);
  // Silence counts only while rank 0 listens: a large answer moves only as
  // both sides call MPI, so time rank 0 spent away (in the caller's code
  // between calls) is not held against a rank.
  auto now = steady::now();
  if (now - last_pump_ > std::chrono::milliseconds(50))
    for (auto& r : ranks_) r.last_heard += now - last_pump_;
  last_pump_ = now;
  bool progress = receive();
  // Work-conserving: one chunk for every rank that has none, then a second
  // for each, and so on, so no rank waits while another holds several.
  for (unsigned up_to = 1; up_to <= chunks_per_rank_; ++up_to)
    for (auto& r : ranks_)
      if (!r.lost) progress |= fill(r, up_to);
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
    check(MPI_Imrecv(p.room(count), count, MPI_BYTE, &message, &p.request), "MPI_Imrecv");
    auto& r = ranks_.at(index);
    r.receiving.push_back(std::move(p));
    r.last_heard = now;  // it is answering
  }
  for (auto& r : ranks_) {
    while (!r.receiving.empty()) {
      int done = 0;
      check(MPI_Test(&r.receiving.front().request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done) break;
      procpool::writer bytes = std::move(r.receiving.front().bytes);
      r.receiving.pop_front();
      any = true;
      r.last_heard = steady::now();
      handle_frame(r, bytes.data(), bytes.size());
      spare_ = std::move(bytes);
    }
  }
  return any;
}

inline bool engine::fill(rank_state& r, unsigned up_to) {
  bool made = false;
  while (r.inflight.size() < std::min(up_to, chunks_per_rank_)) {
    chunk c;
    if (!dispatch_.next_chunk(c)) break;
    made = true;
    if (c.bytes.size() > std::size_t(INT_MAX)) {
      // One item alone is over MPI's count limit: that item fails, nothing is sent.
      c.call->fail(c.first, std::make_exception_ptr(message_too_large(c.bytes.size(), INT_MAX)));
      dispatch_.settle(c);
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
  auto refuse = [&](const std::string& lie) {
    // Every rank runs the same program: an answer that cannot be true means
    // memory went bad somewhere, and no later answer can be trusted. The
    // rank is given up too, so that stopping the pool waits for nothing more
    // from it (its late messages are drained, and it serves no later pool).
    break_with(std::make_exception_ptr(procpool::error(fmt::format(
        "rank {} sent a bad result frame ({}); the pool cannot run tasks", r.info.rank, lie))));
    if (!r.lost) give_up(r, steady::duration::zero());
  };
  if (size < sizeof h) return refuse(fmt::format("{} bytes, shorter than a header", size));
  std::memcpy(&h, data, sizeof h);
  if (h.kind == frame_kind::bye) {
    r.said_bye = true;
    return;
  }
  if (r.lost) return;  // a late answer from a rank already given up
  if (r.inflight.empty()) return refuse("an answer while it owed none");
  chunk& c = r.inflight.front();
  if (auto lie = dispatcher::check_answer(c, h, size); !lie.empty()) return refuse(lie);
  if (!c.call) {  // given up already (the pool broke): only its buffer is left
    finish_chunk(r);
    return;
  }
  procpool::reader in(data + sizeof h, size - sizeof h);
  const rank_info& who = r.info;
  auto d = dispatcher::deliver(
      c, h, in,
      [&](std::uint64_t index, std::string type, std::string message, procpool::reader& rest) {
        auto original = decode_original(rest);
        auto pid = static_cast<pid_t>(decode<std::int64_t>(rest));
        return std::make_exception_ptr(
            procpool::mpi::task_error(index, who.rank, pid, who.host, std::move(type),
                                      std::move(message), std::move(original)));
      },
      [&](const std::string& lie) {
        return std::make_exception_ptr(
            procpool::error(fmt::format("rank {} sent a bad result frame ({})", who.rank, lie)));
      },
      /*gaps=*/true);
  if (!d.lie.empty()) return refuse(d.lie);
  finish_chunk(r);
}

inline void engine::finish_chunk(rank_state& r) {
  chunk& c = r.inflight.front();
  // The rank answered, so it has the whole task: the send is complete or about to be.
  if (c.request != MPI_REQUEST_NULL) wait_request(c.request);
  dispatch_.settle(c);
  r.inflight.pop_front();
}

inline void engine::break_with(std::exception_ptr e) noexcept {
  if (!broken_) broken_ = e;
  closed_ = true;
  // The calls end at once (a map's frame may unwind and free what its call
  // writes into); their chunks stay until their ranks answer, and the
  // answers are dropped.
  dispatch_.end_calls(false, e, [](call_state&) {});
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
      if (dispatcher::still_needed(c))
        c.call->fail(c.first, std::make_exception_ptr(procpool::mpi::rank_failed(
                                  r.info.rank, r.info.pid, r.info.host, c.first,
                                  std::chrono::duration_cast<std::chrono::nanoseconds>(silence))));
      --c.call->in_flight;
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
  // Open ranges advance only while read, and their reader is the thread now
  // joining: they end here. Futures and chunks in flight can finish.
  dispatch_.end_calls(true,
                      std::make_exception_ptr(pool_closed::while_pending(
                          "join or the destructor, with the range open")),
                      [&](call_state& call) { cancel(call); });
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
  task_header members_h{0, 0, 0, static_cast<std::uint32_t>(lost.size()), frame_kind::members};
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
  for (auto& c : abandoned_) b.buffers.push_back(c.bytes.release());
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
  dispatch_.stop(
      std::make_exception_ptr(pool_closed::while_pending("terminate, join or the destructor")));
  for (auto& r : ranks_) {
    for (auto& c : r.inflight) {
      if (!c.call) continue;
      --c.call->in_flight;
      c.call.reset();
    }
  }
}

}  // namespace procpool::detail::mpi
