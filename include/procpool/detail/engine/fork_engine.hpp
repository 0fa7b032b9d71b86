// The machinery behind pool<F> and executor: worker processes, their rings,
// chunk frames, the parent's send/collect loop, and the failure contract.
//
// Shared layout (one anonymous mapping, made before the first fork):
//   engine_shared            doorbell the parent sleeps on, cancellation words
//   per worker: worker_slot  item running now, when it started
//               task ring    parent -> worker, chunk frames
//               result ring  worker -> parent, one result frame per chunk
//
// Frames (dispatch/frame.hpp) are ring messages: a u64 length, then the
// frame. A task frame's `handler` is the address of a function template
// instantiated by the parent for the chunk's item type and the pool's
// function. Workers are forks of the parent, so that address names the same
// code in them. The worker answers every task frame with exactly one result
// frame (results, error, skipped or revoked), so the parent's bookkeeping of
// the chunks in flight stays exact. Calls, chunks and the checks on answers
// are the dispatcher's (dispatch/dispatcher.hpp); this file is the transport:
// workers, rings, deaths, timeouts. A worker claims each frame
// (worker_slot::claim) before it runs it; the parent may revoke a frame not
// yet claimed and give its chunk to an idle worker.
//
// Workers are forked by the pool's fork server (os/fork_server.hpp), a copy
// of the program made with the pool, never by the parent: first workers and
// replacements are the same image, and the parent may run threads. Whichever
// call the user makes (map, imap iteration, future::get) drives sending and
// collecting for every call in flight.
#pragma once

#include <fmt/format.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../calls/calls.hpp"
#include "../dispatch/chunk_queue.hpp"
#include "../dispatch/dispatcher.hpp"
#include "../dispatch/frame.hpp"
#include "../int_cast.hpp"
#include "../os/clock.hpp"
#include "../os/fork.hpp"
#include "../os/fork_server.hpp"
#include "../os/liveness.hpp"
#include "../os/sys.hpp"
#include "../os/type_name.hpp"
#include "../transport/futex.hpp"
#include "../transport/ring.hpp"
#include "../transport/ring_stream.hpp"
#include "../transport/shm.hpp"
#include "../transport/wait.hpp"

namespace procpool::detail {

/// The high bit of `worker_slot::claim`: the parent took back the frame it names.
inline constexpr std::uint64_t revoked_bit = std::uint64_t(1) << 63;

struct worker_context;

/// Test access to an engine's internals: declared here, defined only by
/// tests and fuzz targets that play a hostile worker.
struct engine_probe;

/// Runs one chunk in a worker: decodes items from `in`, calls the function,
/// encodes results into `out` after the result header the caller wrote.
using chunk_handler = void (*)(worker_context&, reader& in, std::uint64_t first,
                               std::uint32_t count, writer& out);

/// The part of the mapping every process sees.
struct engine_shared {
  alignas(cache_line) eventcount doorbell;  // workers ring it; the parent sleeps on it
  alignas(cache_line) std::atomic<std::uint64_t> cancel_call{0};
  std::atomic<std::uint64_t> cancel_from{no_item};  // items of cancel_call from here are skipped
  std::atomic<std::uint32_t> track_start_times{0};  // workers stamp each item (task_timeout)
};

/// One worker's control block in shared memory.
struct worker_slot {
  alignas(cache_line) std::atomic<std::uint64_t> current{no_item};  // item index running now
  std::atomic<std::uint64_t> current_call{0};
  std::atomic<std::int64_t> started_ns{0};  // steady clock, when `current` started
  // The sequence number of the next task frame the worker may start. The
  // worker claims frame s by moving it from s to s + 1; the parent takes frame
  // s back (to give it to an idle worker) by moving it from s to
  // s | revoked_bit. Whoever moves first wins, so a chunk runs exactly once.
  // Taking s back takes every frame sent after it too: the parent writes
  // `revoke_end`, the first frame not taken, before it moves `claim`, and a
  // worker that finds s taken answers every frame before `revoke_end` unrun.
  alignas(cache_line) std::atomic<std::uint64_t> claim{0};
  std::atomic<std::uint64_t> revoke_end{0};
  // How long the worker takes over one chunk, in nanoseconds, as it measures
  // it: between the ends of two chunks when the second was waiting in its
  // ring (it did not wait for it); rises at once to a longer chunk, falls by
  // 1/8 per chunk. A hint for `engine::queue_depth`, which clamps it.
  std::atomic<std::int64_t> chunk_ns{0};
  // Set while the worker writes an answer that did not fit its result ring
  // at once: the parent reading such an answer as it comes knows that the
  // bytes it misses are on their way. Found clear with bytes missing, the
  // answer was a lie (its length claims more than was ever written).
  std::atomic<std::uint32_t> answering{0};
};

/// What a worker process knows about itself.
struct worker_context {
  engine_shared* shared;
  worker_slot* slot;
  void* function;  // the pool's F, at the same address as in the parent
  std::uint64_t call = 0;
  bool stamp_times = false;
  answer_blocks* blocks = nullptr;  // where a chunk's big results stay (see `run_items`)
  answer_parts* parts = nullptr;    // where the results so far go when the ring's room runs out
  std::uint64_t skip = 0;           // items before the chunk's first in its frame (`task_rest`)

  /// Called by handlers before each item, with the context's fields copied
  /// (a handler's loop keeps them in registers instead of reading them again
  /// after every result it writes, bytes that for all the compiler knows may
  /// overwrite them): publishes the item, and says whether the call was
  /// cancelled from this item on (the handler then stops).
  struct item_gate {
    engine_shared* shared;
    worker_slot* slot;
    std::uint64_t call;
    bool stamp_times;
    bool operator()(std::uint64_t index) const noexcept {
      if (shared->cancel_call.load(std::memory_order_relaxed) == call &&
          index >= shared->cancel_from.load(std::memory_order_relaxed))
        return false;
      if (stamp_times)
        slot->started_ns.store(steady::now().time_since_epoch().count(), std::memory_order_relaxed);
      slot->current.store(index, std::memory_order_release);
      return true;
    }
  };
};

/// Thrown inside a handler to report that the call was cancelled mid-chunk.
struct chunk_cancelled {
  std::uint32_t done;
};

/// The generic handler: items of type `Item`, function called through `Invoke`.
/// `Invoke::call(F&, Item&&)` returns the result to encode.
template <class F, class Item, class Invoke>
void run_chunk(worker_context& ctx, reader& in, std::uint64_t first, std::uint32_t count,
               writer& out) {
  F& f = *static_cast<F*>(ctx.function);
  const worker_context::item_gate gate{ctx.shared, ctx.slot, ctx.call, ctx.stamp_times};
  // A chunk sent again after parts of its answer came: the items answered
  // are read and dropped.
  try {
    for (std::uint64_t k = 0; k < ctx.skip; ++k) (void)decode<Item>(in);
  } catch (...) {
    out.allow_spill();
    encode_current_failure(out, first);
    patch_result_header(out, result_header{ctx.call, first, 0, frame_kind::error});
    return;
  }
  patch_result_header(out, run_items<Item, Invoke>(f, in, ctx.call, first, count, out, gate,
                                                   ctx.blocks, ctx.parts));
}

/// Handler tokens for forked workers: the address of the handler, the same
/// in every fork of the parent.
struct local_handlers {
  template <class F, class Item, class Invoke>
  static std::uint64_t id() noexcept {
    return reinterpret_cast<std::uint64_t>(&run_chunk<F, Item, Invoke>);
  }
};

/// What the engine needs to know to run workers.
struct engine_config {
  unsigned workers = 1;
  std::size_t ring_bytes = 1 << 20;
  std::function<void()> initializer;
  std::size_t max_tasks_per_child = 0;
  std::chrono::nanoseconds task_timeout{0};
  void* function = nullptr;  // passed to handlers in the workers
  wait_policy parent_wait{std::chrono::microseconds(20), std::chrono::milliseconds(10)};
  // An idle worker spins briefly (pool_options::worker_spin) before it sleeps.
  wait_policy worker_wait{std::chrono::microseconds(2), std::chrono::milliseconds(50)};
  std::size_t worker_keep_memory = std::size_t(64) << 20;  // pool_options::worker_keep_memory
  std::chrono::milliseconds stop_grace{1000};
};

/// Worker processes, their rings, and the parent's side of the protocol.
class engine final : public driver {
 public:
  explicit engine(engine_config config);
  ~engine() override;
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  /// Registers a call and queues it for sending.
  void start(const std::shared_ptr<call_state>& call) override;
  void send_now() override;
  /// Sends and collects until `done()` or `deadline`; false on timeout.
  /// Worker deaths and timeouts found on the way are charged to the calls they hit.
  bool drive_until(function_ref<bool()> done, std::optional<steady::time_point> deadline) override;
  /// The user gave up on `call`: stop sending it, skip its queued items.
  void cancel(call_state& call) noexcept override;
  void cancel_unsent(const std::exception_ptr& e) noexcept override {
    if (!owned()) return;
    dispatch_.cancel_unsent(e);
    take_back_unstarted(e);
  }
  /// The call is over for its user: cancels what is left of it and, unless
  /// collection is under way, drops it from the queues at once.
  void end_call(call_state& call) noexcept override;
  /// Asks the thread driving the pool to stop it (as `terminate`) at its next
  /// step, where that is safe: from another thread, or from a callback.
  void request_stop() noexcept;

  /// No more calls; work in flight still completes. Safe from any thread.
  void close() noexcept { closed_ = true; }
  /// True after close(), terminate() or join().
  bool closed() const noexcept { return closed_; }
  /// Finishes the work in flight, then stops every worker: stop frames, a
  /// bounded wait, SIGTERM, SIGKILL. Every child is reaped.
  void join();
  /// Stops every worker now (SIGTERM, a bounded wait, SIGKILL) and reaps them.
  void terminate() noexcept;

  /// Number of worker processes.
  unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()); }
  /// Pids of the workers running now (0 for a slot being replaced). Reaps and
  /// replaces workers that died since the last call first.
  std::vector<pid_t> pids();
  /// The chunk size the engine can carry without streaming, in bytes.
  std::size_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  /// Number of workers.
  unsigned parallelism() const noexcept override { return size(); }
  /// Throws if the pool can run no more calls (initializer failure).
  void check_usable(const char* operation) const override;

 protected:
  bool idle() const noexcept override;
  void wake_sleepers() noexcept override { shared_->doorbell.notify(); }

 private:
  friend struct engine_probe;
  /// A chunk as the fork engine carries it.
  struct chunk : detail::chunk {
    std::size_t sent = 0;   // bytes of it in the worker's ring
    std::uint64_t seq = 0;  // the frame's number in its worker's ring (see worker_slot::claim)
    bool revoked = false;   // taken back: its worker answers it with `revoked`, unrun
  };
  struct worker {
    pid_t pid = 0;
    sys::unique_fd pidfd;
    worker_slot* slot = nullptr;
    ring_control* task = nullptr;
    ring_control* result = nullptr;
    std::byte* task_bytes = nullptr;    // the rings' bytes when mirrored (`engine::rings_`),
    std::byte* result_bytes = nullptr;  // else null: they follow their controls
    ring_writer to;
    bool placed = false;  // frames encoded straight into `to` since it was last published
    ring_reader from;
    chunk_queue<chunk> inflight;    // in the order sent
    std::size_t items_sent = 0;     // toward max_tasks_per_child
    std::uint64_t frames_sent = 0;  // task frames put in the ring since the worker started
    // A frame it was streaming was cut off (it died, or the pool stops):
    // nothing more is read from its ring.
    bool frame_cut = false;
    // Its next answer, whole in its ring, is left there for now (`hold_back`)
    // since then; not held: the epoch.
    steady::time_point held_since{};
    bool holding = false;  // held at the last look: not worth waking for
    bool timed_out = false;
    std::uint64_t timed_out_item = no_item;
    std::size_t frames = 0;              // frames taken from this worker
    std::string bad_frame;               // why its last frame was refused; empty if none
    steady::time_point stopped_since{};  // when it was first seen stopped (SIGSTOP)
  };

  /// Chunks every worker gets before any gets more: one each, then a second
  /// each, so that no worker waits while another holds two.
  static constexpr std::size_t base_inflight = 2;
  /// Most chunks queued in one worker's ring (`queue_depth`): chunks of a
  /// few hundred nanoseconds need that many for `queue_target`'s work, and
  /// each wake-up of a worker that went to sleep then hands it that many.
  static constexpr std::size_t max_inflight = 256;
  /// Work a worker is given ahead when its chunks are short: enough to cover
  /// the time it takes to wake, so that it runs a batch of frames per wake-up
  /// rather than one, and little enough that a slow item surprising the
  /// estimate holds back no more than this behind it.
  static constexpr std::chrono::nanoseconds queue_target{std::chrono::microseconds(50)};
  /// Longest an answer that came early is left in its ring (`hold_back`).
  static constexpr std::chrono::nanoseconds max_hold{std::chrono::microseconds(200)};
  /// No honest result frame is this large; a larger length prefix is a lie.
  static constexpr std::uint64_t max_frame_bytes = std::uint64_t(1) << 40;

  void spawn(std::size_t w);
  static void worker_entry(void* self, std::uint32_t w, pid_t server);
  [[noreturn]] void worker_main(std::size_t w, pid_t server);
  void server_lost(const error& e) noexcept;
  bool worker_exited(worker& w, bool block);
  bool pump();
  /// Puts what fits of the worker's unsent chunks in its ring, unpublished
  /// (`pump` publishes once per worker).
  bool send_pending(worker& w);
  /// Chunks each worker may hold: `base_inflight`, or more when chunks are
  /// known to be short (`worker_slot::chunk_ns`), up to `max_inflight`.
  std::size_t queue_depth() const noexcept;
  bool fill(worker& w, std::size_t up_to);
  bool take_back_for_idle();
  /// Takes back the frames of `w` from `inflight[k]`, the next it would
  /// claim, through the last whose bytes are all in its ring: it answers
  /// them unrun. Returns the end of the frames taken, `k` when none was (it
  /// claimed frame `k` meanwhile). The caller settles their chunks.
  std::size_t revoke_from(worker& w, std::size_t k);
  /// A chunk taken back goes out again when its call still needs it.
  void send_again(chunk& t);
  /// `cancel_unsent` for the chunks in workers' rings: of the chunks no
  /// worker started, those past the first `base_inflight` a worker holds
  /// (a short-chunk estimate may have queued many) end with `e` when they
  /// are all that is left of a task nothing came back for; the others go
  /// out again.
  void take_back_unstarted(const std::exception_ptr& e) noexcept;
  bool can_take_back() const;
  static bool still_needed(const chunk& c) noexcept { return dispatcher::still_needed(c); }
  /// Takes the answers in the worker's ring. `may_drop` false: the worker
  /// died (a bad frame is not acted on, and a frame not all there is left).
  bool receive(worker& w, bool may_drop = true);
  /// Whether the worker's next frame can be read: all of it is in its ring,
  /// or it is longer than the ring (and is read as it comes).
  bool frame_ready(worker& w, std::size_t avail) noexcept;
  /// Reads a frame longer than the ring (or cut by a ring's end) as its
  /// worker writes it; its length is the next thing in the ring.
  void stream_frame(worker& w, std::size_t size);
  /// Hands the frame `in` reads from (a whole one) to its call.
  void handle_frame(worker& w, reader& in);
  /// Whether the answer `frame` (whole, in the ring) is better left there
  /// for now: it came before an earlier chunk's of its call, which taking
  /// it would make slots for, only for that chunk to write them again. It
  /// is held at most `max_hold`, while its worker has room for more, and
  /// only while that earlier chunk is not behind it in the same ring.
  bool hold_back(worker& w, const std::byte* frame);
  std::string check_header(const worker& w, const result_header& h, std::size_t size) const;
  void drop_worker(std::size_t w);
  void finish_chunk(worker& w);
  bool check_health(bool force);
  void on_death(std::size_t w, exit_status status);
  bool retire_if_due(std::size_t w);
  bool any_ready();
  bool sleep_until_ready(std::optional<steady::time_point> deadline);
  void reap_all(std::chrono::milliseconds grace, bool send_stop) noexcept;
  bool wait_exit(worker& w, std::optional<std::chrono::milliseconds> timeout,
                 exit_status* status = nullptr) noexcept;
  bool reap_if_exited(std::size_t w);
  void reap_exited();
  void kill_worker(const worker& w, int sig) noexcept;
  bool respawn_missing();
  bool owned() const noexcept { return this_pid() == parent_; }
  void check_owner(const char* operation) const;
  /// Reaps and replaces workers that died since it last looked. `often`: a
  /// call starting, which looks at most once a millisecond (a poll of every
  /// pidfd would be half a round trip); a death in between is found by the
  /// call's own health checks.
  void refresh_workers(const char* operation, bool often = false);
  void release_foreign() noexcept;
  void release_call(const std::shared_ptr<call_state>& call) noexcept;
  void forget(call_state& call) noexcept;
  void end_calls(bool ranges_only) noexcept;

  engine_config config_;
  pid_t parent_ = 0;
  shared_mapping mapping_;
  mirrored_mapping rings_;  // the rings' bytes, mapped twice in a row; empty where refused
  engine_shared* shared_ = nullptr;
  std::size_t ring_capacity_ = 0;
  std::size_t chunk_bytes_ = 0;
  std::vector<worker> workers_;
  fork_server server_;  // forks and reaps the workers
  // Frames in the rings follow their length, and are put there from their pieces.
  dispatcher dispatch_{sizeof(std::uint64_t), true};
  steady::time_point next_health_check_{};
  steady::time_point next_refresh_{};  // a call's start looks for dead workers from then
  std::exception_ptr broken_;
  std::atomic<bool> closed_{false};
  std::atomic<bool> stop_requested_{false};
  bool driving_ = false;               // inside drive_until: the queues are being walked
  std::atomic<unsigned> sleepers_{0};  // threads asleep in drive_until, the pool released
  bool stopped_ = false;
};

// ---------------------------------------------------------------------------

/// Bytes of one ring in the engine's mapping: its control, and its bytes
/// unless those are `mirrored` (mapped apart).
inline std::size_t ring_part(std::size_t ring_capacity, bool mirrored) {
  return mirrored ? align_up(sizeof(ring_control), cache_line)
                  : ring_control::bytes_needed(ring_capacity);
}

/// Bytes of a worker's part of the engine's mapping: its slot and two rings.
inline std::size_t slot_bytes(std::size_t ring_capacity, bool mirrored) {
  return align_up(sizeof(worker_slot), cache_line) + 2 * ring_part(ring_capacity, mirrored);
}

inline engine::engine(engine_config config) : config_(std::move(config)), parent_(::getpid()) {
  if (config_.workers == 0) throw error("a pool needs at least one worker; 0 were asked for");
  ring_capacity_ = ring_capacity_for(config_.ring_bytes);
  // Two chunks in flight per worker fit the ring without streaming.
  chunk_bytes_ = ring_capacity_ / 2 - sizeof(task_header) - 2 * sizeof(std::uint64_t);
  std::size_t header = align_up(sizeof(engine_shared), cache_line);
  // The rings' bytes mapped twice in a row, so that no frame is ever cut at
  // a ring's end: each is read in place and copied in one piece, whatever
  // its position. Where the kernel refuses (no memfd, a page larger than a
  // ring), the bytes follow their controls and frames across the end are
  // gathered: slower, not different.
  try {
    rings_ = mirrored_mapping(2 * std::size_t(config_.workers), ring_capacity_);
  } catch (const std::system_error&) {
    // Left empty: the rings' bytes go in the one mapping below.
  }
  bool mirrored = static_cast<bool>(rings_);
  std::size_t slot = slot_bytes(ring_capacity_, mirrored);
  mapping_ = shared_mapping(header + config_.workers * slot);
  auto* base = static_cast<std::byte*>(mapping_.data());
  shared_ = new (base) engine_shared();
  shared_->track_start_times.store(config_.task_timeout.count() > 0 ? 1 : 0);
  workers_.resize(config_.workers);
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    std::byte* p = base + header + i * slot;
    auto& w = workers_[i];
    w.slot = new (p) worker_slot();
    p += align_up(sizeof(worker_slot), cache_line);
    w.task = ring_control::create(p, ring_capacity_);
    p += ring_part(ring_capacity_, mirrored);
    w.result = ring_control::create(p, ring_capacity_);
    if (mirrored) {
      w.task_bytes = rings_.area(2 * i);
      w.result_bytes = rings_.area(2 * i + 1);
    }
  }
  try {
    // The server is a copy of this process as it is now, slots and rings
    // included: every worker it forks starts from that image.
    server_ = fork_server(&engine::worker_entry, this);
    for (std::size_t i = 0; i < workers_.size(); ++i) spawn(i);
  } catch (...) {
    terminate();
    throw;
  }
}

inline engine::~engine() {
  stop_helper(true);
  if (stopped_) return;
  if (!owned()) {
    // A copy in a forked child (or in a worker that called exit()): the
    // workers are not its own; it lets go of its descriptors and no more.
    release_foreign();
    return;
  }
  try {
    join();
  } catch (...) {
    terminate();
  }
}

inline void engine::spawn(std::size_t i) {
  auto& w = workers_[i];
  w.task->reset();
  w.result->reset();
  new (&w.task->readable) eventcount();
  new (&w.task->writable) eventcount();
  new (&w.result->readable) eventcount();
  new (&w.result->writable) eventcount();
  w.slot->current.store(no_item);
  w.slot->claim.store(0);
  w.slot->revoke_end.store(0);
  w.frames_sent = 0;
  w.to = ring_writer(w.task, nullptr, w.task_bytes);
  w.placed = false;
  w.from = ring_reader(w.result, nullptr, w.result_bytes);
  w.slot->chunk_ns.store(0);
  w.slot->answering.store(0);
  w.frame_cut = false;
  w.held_since = {};
  w.holding = false;
  w.timed_out = false;
  w.items_sent = 0;
  w.frames = 0;
  w.bad_frame.clear();
  w.stopped_since = {};
  pid_t pid = 0;
  try {
    pid = server_.spawn(static_cast<std::uint32_t>(i));
  } catch (const error& e) {
    server_lost(e);
    throw;
  }
  try {
    w.pidfd = sys::pidfd_open(pid);
  } catch (...) {
    // No descriptor to watch it by (EMFILE): the worker must not run unwatched.
    w.pid = pid;
    kill_worker(w, SIGKILL);
    wait_exit(w, std::nullopt);
    w.pid = 0;
    throw;
  }
  w.pid = pid;
}

inline void engine::worker_entry(void* self, std::uint32_t i, pid_t server) {
  // In the server's child, in a process group of its own (so that the
  // worker's own children are signalled with it), with SIGINT and SIGTERM at
  // their default actions: terminate() stops a worker even when the parent
  // handles SIGTERM itself, and the parent learns of it as worker_died. An
  // initializer may change this.
  static_cast<engine*>(self)->worker_main(i, server);
}

inline void engine::server_lost(const error& e) noexcept {
  // Its workers died with it (PR_SET_PDEATHSIG), and no other can be forked.
  if (!broken_) broken_ = std::make_exception_ptr(e);
  closed_ = true;
}

inline bool engine::worker_exited(worker& w, bool block) {
  try {
    return server_.exited(w.pid, block);
  } catch (const error& e) {
    server_lost(e);
    kill_worker(w, SIGKILL);  // it dies with the server; this makes sure
    return true;
  }
}

/// Where a fork worker's answer goes when it outgrows the result ring's
/// free room (see `answer_parts`): out in parts, each result written once,
/// straight into the ring. `Alive` says whether the parent is still there.
template <class Alive>
struct ring_parts final : answer_parts {
  static constexpr std::size_t prefix = sizeof(std::uint64_t);
  ring_writer* out;
  worker_slot* slot;
  Alive* alive;
  const wait_policy* policy;
  bool answered = false;  // the chunk's last frame went alone (see `send_alone`)
  ring_parts(ring_writer* o, worker_slot* ws, Alive* a, const wait_policy* p)
      : out(o), slot(ws), alive(a), policy(p) {}

  bool flush(writer& w, const result_header& h) override {
    // The result that did not fit ran: a death from here is no item's.
    slot->current.store(no_item, std::memory_order_release);
    std::size_t had = w.capacity();
    if (h.count > 0) {
      patch_result_header(w, h);
      std::uint64_t length = w.size();
      std::memcpy(out->room(), &length, prefix);
      out->advance(prefix + w.size());
      out->publish();
    }
    // It never waits for the parent here: with room enough freed
    // meanwhile it goes on there; without (the parent is behind), the
    // rest of the chunk goes into its own buffer, as it is computed.
    std::size_t room = out->free_space_now();
    std::size_t enough = std::max(out->capacity() / 16, std::size_t(1024));
    if (h.count == 0 && room <= had + prefix) return false;  // no more room than it had
    restart(w, room, h.count > 0 && room < prefix + enough);
    return true;
  }

  // `w` starts the next frame: in the ring's `room` (it cannot grow
  // there), or, with `own` or too little room, in its own buffer.
  void restart(writer& w, std::size_t room, bool own) {
    if (own || room <= prefix + sizeof(result_header))
      w.write_in_own();
    else
      w.write_in_place(out->room() + prefix, room - prefix, false);
    result_header placeholder{};
    w.write(&placeholder, sizeof placeholder);
  }

  // A result longer than the ring is sized by a writer that only counts,
  // then written through `frame_sink` straight into the ring as the
  // parent reads it: the one copy of its bytes.
  struct counting_sink final : writer_sink {
    std::vector<std::byte> scratch;
    counting_sink() { counts_only = true; }
    std::pair<std::byte*, std::size_t> window(std::size_t want) override {
      if (scratch.size() < want || scratch.empty())
        scratch.resize(std::max(want, std::size_t(4096)));
      return {scratch.data(), scratch.size()};
    }
    void done(std::size_t) override {}
  };
  struct frame_sink final : writer_sink {
    ring_parts* parts;
    std::size_t left;      // bytes of the frame not yet published
    std::size_t held = 0;  // its last bytes, written, held back until it is checked
    struct too_long {};
    frame_sink(ring_parts* p, std::size_t total) : parts(p), left(total) {}
    std::pair<std::byte*, std::size_t> window(std::size_t want) override {
      if (held != 0 || left == 0) throw too_long{};
      ring_writer& o = *parts->out;
      // At least an eighth of the ring (or what is left) at a time, and at
      // most a quarter: the parent reads one window while the next is
      // written, and no window is so small that its wake-up costs more
      // than its bytes.
      std::size_t need = std::min({std::max(want, o.capacity() / 8), left, o.capacity()});
      parts->wait_for_room(need);
      std::size_t piece = std::max(o.capacity() / 4, need);
      return {o.room(), std::min({o.free_space(), left, piece})};
    }
    void done(std::size_t n) override {
      if (n == left) {  // the last bytes: published once the length is checked
        held = n;
        return;
      }
      parts->out->advance(n);
      left -= n;
      parts->out->publish();
    }
  };
  counting_sink counter;
  writer sizer;
  writer stream;

  bool send_alone(writer& w, const result_header& h, result_encoder e) override {
    writer_streams::start(sizer, counter);
    try {
      e.encode(sizer, e.value);
    } catch (...) {
      writer_streams::abandon(sizer);
      throw;
    }
    const std::size_t size = writer_streams::stop(sizer).first;
    const std::size_t total = prefix + sizeof h + size;
    if (total <= out->capacity()) return false;  // it fits the ring: no stream
    frame_sink sink(this, total);
    std::string broken;
    // The item ran and its result could be sized: a death from here
    // (killed while it waits for room, say) is no item's, and the chunk
    // runs again from this item.
    slot->current.store(no_item, std::memory_order_release);
    slot->answering.store(1, std::memory_order_relaxed);
    try {
      writer_streams::start(stream, sink);
      const std::uint64_t length = sizeof h + size;
      stream.write(&length, sizeof length);
      stream.write(&h, sizeof h);
      e.encode(stream, e.value);
      auto [written, last] = writer_streams::stop(stream);
      if (written != total)
        broken =
            fmt::format("wrote {} bytes, {} when it was sized", written - prefix - sizeof h, size);
      else
        sink.held += last;
    } catch (const typename frame_sink::too_long&) {
      broken = fmt::format("wrote more than the {} bytes it wrote when it was sized", size);
    } catch (...) {
      auto [type, message] = describe_current_exception();
      broken = fmt::format("threw {} ({}), which it did not when it was sized", type, message);
    }
    if (!broken.empty()) {
      // Most of the frame is out, and its length is wrong: no answer can
      // be trusted. The worker dies; the chunk runs again from this item
      // (an encoder that breaks every time fails the call with
      // `worker_died` for it once the chunk found its worker dead three
      // times).
      writer_streams::abandon(stream);
      fmt::print(stderr,
                 "procpool: worker {}: the encoder of the result of item {} {}: an encoder "
                 "must write the same bytes for the same value; the worker exits\n",
                 ::getpid(), h.first, broken);
      exit_child(70);
    }
    out->advance(sink.held);
    out->publish();
    slot->answering.store(0, std::memory_order_release);
    answered = h.kind != frame_kind::part;
    // It waited for the parent all along: it waits for a little more room
    // (when the ring is full), to go on in the ring and not in a buffer.
    if (!answered) wait_for_room(prefix + sizeof(result_header) + 256);
    restart(w, out->free_space_now(), false);
    return true;
  }

  // Waits until the ring has `n` bytes free; the worker exits when the
  // parent is gone.
  void wait_for_room(std::size_t n) {
    if (out->free_space() < n && wait_for_condition(
                                     out->writable(), [&] { return out->free_space() >= n; },
                                     std::nullopt, *alive, *policy) != wait_status::ready)
      exit_child(0);
  }
};

inline void engine::worker_main(std::size_t i, pid_t server) {
  try {
    die_with_parent(server);
    // The pidfds of its siblings are the parent's business, not this
    // worker's: every worker holds the same descriptors, whenever forked.
    for (auto& sibling : workers_) sibling.pidfd.reset();
    current_process_name() = fmt::format("pool-worker-{}", i + 1);
    keep_freed_memory(config_.worker_keep_memory);

    auto& w = workers_[i];
    worker_context ctx{shared_, w.slot, config_.function};
    ctx.stamp_times = shared_->track_start_times.load() != 0;
    ring_reader in(w.task, &shared_->doorbell, w.task_bytes);
    ring_writer out(w.result, &shared_->doorbell, w.result_bytes);
    auto parent_alive = [server] { return ::getppid() == server; };
    writer result;
    answer_blocks blocks;
    ctx.blocks = &blocks;
    ring_parts<decltype(parent_alive)> parts(&out, w.slot, &parent_alive, &config_.worker_wait);
    if (config_.initializer) {
      try {
        config_.initializer();
      } catch (...) {
        auto [type, message] = describe_current_exception();
        result_header h{0, 0, 0, frame_kind::init_failed};
        result.write(&h, sizeof h);
        encode(result, type);
        encode(result, message);
        w.slot->answering.store(1, std::memory_order_relaxed);
        out.write_message(result.data(), result.size(), parent_alive, config_.worker_wait);
        w.slot->answering.store(0, std::memory_order_release);
        exit_child(1);
      }
    }
    // A task frame longer than the ring (or cut by its end, when it is not
    // mirrored) is decoded as it comes; this waits for its next bytes.
    auto wait = [&](auto&& ready) {
      if (wait_for_condition(w.task->readable, ready, std::nullopt, parent_alive,
                             config_.worker_wait) != wait_status::ready)
        exit_child(0);  // the parent is gone
    };
    std::optional<ring_message<decltype(wait)>> stream;
    std::uint64_t seq = 0;            // task frames taken from the ring so far
    std::uint64_t revoked_until = 0;  // frames before this were taken back
    // For `worker_slot::chunk_ns`: when the last chunk run ended (none: zero).
    std::int64_t last_end = 0;
    std::int64_t chunk_ns = 0;
    for (;;) {
      // A frame already waiting: the time until its answer is its own.
      bool waiting = in.available() >= sizeof(std::uint64_t);
      if (!waiting) last_end = 0;
      auto st = wait_for_condition(
          w.task->readable, [&] { return in.available() >= sizeof(std::uint64_t); }, std::nullopt,
          parent_alive, config_.worker_wait);
      if (st != wait_status::ready) exit_child(0);  // the parent is gone
      std::size_t size = *in.next_message_size();
      std::size_t total = sizeof(std::uint64_t) + size;
      // A frame that fits the ring is read in place once all of it is there.
      const std::byte* frame = nullptr;
      if (total <= in.capacity()) {
        wait([&] { return in.available(total) >= total; });
        frame = in.peek(total);
      }
      reader items;
      stream.reset();
      if (frame) {
        items = reader(frame + sizeof(std::uint64_t), size);
      } else {
        std::uint64_t length;
        in.get(&length, sizeof length);
        stream.emplace(in, size, wait);
        items = reader(*stream, size);
      }
      task_header h;
      if (size < sizeof h) exit_child(70);
      items.read(&h, sizeof h);
      if (h.kind == frame_kind::stop) exit_child(0);
      std::uint64_t skip = 0;  // items before `first` (a chunk sent again after parts)
      if (h.kind == frame_kind::task_rest) {
        if (size < sizeof h + sizeof skip) exit_child(70);
        items.read(&skip, sizeof skip);
      }
      // The answer is written straight into the result ring when that is
      // mirrored and has room for more than a header: it is then copied
      // nowhere. When it outgrows the room, the results so far go out as a
      // part and the rest goes on in the room freed meanwhile
      // (`ring_parts`); with too little freed, or no room at first, the
      // writer goes on in its own buffer, and that goes into the ring as a
      // message after the chunk.
      result.write_in_own();
      ctx.parts = nullptr;
      if (out.mirrored()) {
        std::size_t room = out.free_space();
        if (room > sizeof(std::uint64_t) + sizeof(result_header)) {
          result.write_in_place(out.room() + sizeof(std::uint64_t), room - sizeof(std::uint64_t),
                                false);
          ctx.parts = &parts;
        }
      }
      std::uint64_t expected = seq;
      bool run = false;
      if (seq >= revoked_until) {
        run = w.slot->claim.compare_exchange_strong(expected, seq + 1, std::memory_order_acq_rel);
        if (!run)
          revoked_until = std::max(seq + 1, w.slot->revoke_end.load(std::memory_order_acquire));
      }
      blocks.clear();
      if (run) {
        result_header placeholder{};
        result.write(&placeholder, sizeof placeholder);
        ctx.call = h.call;
        ctx.skip = skip;
        reinterpret_cast<chunk_handler>(h.handler)(ctx, items, h.first, h.count, result);
        w.slot->current.store(no_item, std::memory_order_release);
      } else {
        // The parent took this chunk back for an idle worker: answer it unrun.
        w.slot->claim.store(seq + 1, std::memory_order_release);
        result_header r{h.call, h.first, 0, frame_kind::revoked};
        result.write(&r, sizeof r);
      }
      ++seq;
      // The answer: its own bytes, and the big results kept between them.
      std::size_t answer = result.size() + blocks.refs().bytes;
      if (stream) {
        // What the chunk did not read of its frame (it stopped early, or it
        // was taken back) is skipped as it comes.
        stream->finish(items.offset());
      } else {
        in.skip(total);
        // The answer, when it fits now, is published at once on the same
        // doorbell, which wakes the parent for the freed space as well.
        if (result.in_place() || out.free_space() >= sizeof(std::uint64_t) + answer)
          in.release_quietly();
        else
          in.release();
      }
      if (std::exchange(parts.answered, false)) {
        // Its last result went alone, and with it the answer.
      } else if (result.in_place()) {
        std::uint64_t length = result.size();
        std::memcpy(out.room(), &length, sizeof length);
        out.advance(sizeof length + result.size());
        out.publish();
      } else {
        w.slot->answering.store(1, std::memory_order_relaxed);
        bool written = true;
        if (blocks.refs().empty()) {
          written =
              out.write_message(result.data(), result.size(), parent_alive, config_.worker_wait);
        } else {
          // Each block goes from the value it is in straight into the ring.
          std::uint64_t length = answer;
          written = out.write_stream(&length, sizeof length, parent_alive, config_.worker_wait);
          copy_frame_out(result.data(), result.size(), blocks.refs(), 0, answer,
                         [&](const std::byte* data, std::size_t n) {
                           written = written &&
                                     out.write_stream(data, n, parent_alive, config_.worker_wait);
                         });
          blocks.clear();
        }
        if (!written) exit_child(0);
        // After its last byte was published (and so seen with it).
        w.slot->answering.store(0, std::memory_order_release);
      }
      if (run) {
        std::int64_t end = steady::now().time_since_epoch().count();
        if (last_end != 0) {
          std::int64_t took = end - last_end;
          chunk_ns = took > chunk_ns ? took : chunk_ns + (took - chunk_ns) / 8;
          w.slot->chunk_ns.store(chunk_ns, std::memory_order_relaxed);
        }
        last_end = end;
      } else {
        last_end = 0;
      }
    }
  } catch (...) {
    auto [type, message] = describe_current_exception();
    fmt::print(stderr, "procpool: worker {} failed: {}: {}\n", ::getpid(), type, message);
    exit_child(70);
  }
}

inline void engine::check_usable(const char* operation) const {
  check_owner(operation);
  if (broken_) std::rethrow_exception(broken_);
  if (closed_) throw pool_closed(operation);
}

inline void engine::start(const std::shared_ptr<call_state>& call) {
  refresh_workers("a call", true);
  if (stopped_) throw pool_closed("a call");
  dispatch_.start(call);
}

inline void engine::end_call(call_state& call) noexcept {
  if (!call.finished()) cancel(call);
  if (!driving_) forget(call);
  // The call's input may go with it: a frame not yet all in its ring stops
  // reading from there. (Its answer, unrun, is dropped when it comes.)
  if (call.in_flight == 0) return;  // none of its frames is out
  for (auto& w : workers_) {
    for (auto& c : w.inflight) {
      if (c.call.get() != &call || c.sent == c.size() || c.blocks.empty()) continue;
      try {
        c.own_blocks();
      } catch (...) {
        // No memory for the copy: the frame cannot be finished, so its
        // worker, which may be reading it, goes (and is replaced).
        kill_worker(w, SIGKILL);
        c.blocks.clear();
        c.sent = c.size();
      }
    }
  }
}

inline void engine::forget(call_state& call) noexcept {
  // Chunks already in a worker's ring stay counted until their answers come
  // (they are dropped then); nothing queued here survives.
  dispatch_.forget(call);
}

inline void engine::request_stop() noexcept {
  stop_requested_ = true;
  shared_->doorbell.notify();
}

inline void engine::cancel(call_state& call) noexcept {
  if (!owned()) return;  // the workers are another process's
  call.cancelled = true;
  shared_->cancel_from.store(0, std::memory_order_relaxed);
  shared_->cancel_call.store(call.id, std::memory_order_release);
}

inline void engine::release_call(const std::shared_ptr<call_state>& call) noexcept {
  if (call->failed() && !call->cancelled) {
    // Later items of a failed call are skipped by the workers.
    shared_->cancel_from.store(call->error_index() + 1, std::memory_order_relaxed);
    shared_->cancel_call.store(call->id, std::memory_order_release);
  }
}

/// Marks the queues as being walked for the life of the object.
struct driving {
  bool& flag;
  bool was;
  explicit driving(bool& f) : flag(f), was(f) { flag = true; }
  ~driving() { flag = was; }
  driving(const driving&) = delete;
  driving& operator=(const driving&) = delete;
};

inline void engine::send_now() {
  if (stopped_ || broken_ || !owned()) return;
  driving in_drive(driving_);
  if (pump()) {
    note_progress();
    if (sleepers_ > 0) shared_->doorbell.notify();
  }
}

inline bool engine::drive_until(function_ref<bool()> done,
                                std::optional<steady::time_point> deadline) {
  check_owner("waiting for results");
  while (!done()) {
    if (stop_requested_.exchange(false)) {
      // terminate() from another thread or from a callback: stop here, where
      // no queue is being walked.
      terminate();
      if (done()) break;
      throw pool_closed::while_pending("terminate");
    }
    if (stopped_) throw pool_closed::while_pending("terminate, join or the destructor");
    if (broken_) std::rethrow_exception(broken_);
    {
      driving in_drive(driving_);
      bool progress = pump();
      if (progress) {
        note_progress();
        // What this thread collected may be what another one sleeps for.
        if (sleepers_ > 0) shared_->doorbell.notify();
      }
      if (check_health(false)) {
        note_progress();
        continue;
      }
      if (progress) continue;
    }
    if (done()) break;
    if (!sleep_until_ready(deadline)) return done();
  }
  return true;
}

inline bool engine::sleep_until_ready(std::optional<steady::time_point> deadline) {
  auto ready = [&] { return stop_requested_.load() || any_ready(); };
  // A short spin first, holding the pool: an answer due within microseconds
  // is taken without a futex round trip. Not on the helper thread: nobody
  // waits on it, and its spin would keep a user's thread out.
  if (config_.parent_wait.spin.count() > 0 && !on_helper_thread()) {
    auto spin_end = steady::now() + config_.parent_wait.spin;
    for (unsigned i = 1;; ++i) {
      cpu_relax();
      if (ready()) return true;
      if (i % 64 == 0 && steady::now() >= spin_end) break;
    }
  }
  auto key = shared_->doorbell.prepare();
  if (ready()) {
    shared_->doorbell.cancel();
    return true;
  }
  auto slice = config_.parent_wait.slice;
  if (deadline) {
    auto now = steady::now();
    if (*deadline <= now) {
      shared_->doorbell.cancel();
      return false;
    }
    if (*deadline - now < slice)
      slice = std::chrono::duration_cast<std::chrono::nanoseconds>(*deadline - now);
  }
  // An answer left in its ring (`hold_back`) is taken when its time is up,
  // whatever else happens by then.
  for (auto& w : workers_)
    if (w.holding && w.pid != 0) slice = std::min(slice, max_hold);
  // Asleep, the thread lets others use the pool: they may start calls,
  // collect this thread's answers (and ring the doorbell for it), or stop
  // the pool, which this thread then finds at the top of its loop.
  ++sleepers_;
  {
    released others_may_enter(*this);
    shared_->doorbell.wait(key, slice);
  }
  --sleepers_;
  return !deadline || steady::now() < *deadline || ready();
}

inline bool engine::idle() const noexcept {
  if (stopped_ || broken_ || !owned()) return true;
  // A range's chunks, and a range whose window is full, wait for its
  // reader, not for the helper: a reader stepping through results one at a
  // time would otherwise wake the helper at every step.
  for (auto& w : workers_) {
    if (w.pid == 0) continue;
    for (auto& c : w.inflight)
      if (awaits_collection(c)) return false;
  }
  return !dispatch_.work_queued(true);
}

inline bool engine::any_ready() {
  for (auto& w : workers_) {
    if (w.pid == 0) continue;
    // Bytes short of a message's length prefix are not worth waking for: a
    // worker that wrote a few and fell silent would keep the caller spinning
    // past its deadline.
    if (frame_ready(w, w.from.refresh())) return true;
    // Chunks go into the ring in order: one is unsent when the last is.
    if (!w.inflight.empty() && w.inflight.back().sent < w.inflight.back().size() &&
        w.to.free_space() > 0)
      return true;
  }
  return can_take_back();
}

inline bool engine::can_take_back() const {
  // An idle worker, and a chunk waiting behind one its worker has started.
  bool idle = false;
  for (auto& w : workers_)
    if (w.pid != 0 && w.inflight.empty() && !w.frame_cut &&
        !(config_.max_tasks_per_child && w.items_sent >= config_.max_tasks_per_child))
      idle = true;
  if (!idle || dispatch_.resending()) return false;
  for (auto& w : workers_) {
    if (w.pid == 0 || w.inflight.size() < 2 || w.inflight.front().revoked) continue;
    const chunk& c = w.inflight[1];
    if (!c.revoked && c.sent == c.size() && w.slot->claim.load(std::memory_order_acquire) == c.seq)
      return true;
  }
  return false;
}

inline std::size_t engine::queue_depth() const noexcept {
  // The slowest worker's estimate (written by the worker: any value only
  // moves the depth between its bounds).
  std::int64_t ns = 0;
  for (const auto& w : workers_)
    if (w.pid != 0) ns = std::max(ns, w.slot->chunk_ns.load(std::memory_order_relaxed));
  if (ns <= 0) return base_inflight;
  auto n = static_cast<std::size_t>(queue_target.count() / ns);
  return std::clamp(n, base_inflight, max_inflight);
}

inline bool engine::pump() {
  bool progress = false;
  for (auto& w : workers_)
    if (w.pid != 0) progress |= receive(w);
  // Work-conserving: first one chunk for every worker that has none, then a
  // second for each, so no worker waits while another holds two. Lowest-
  // numbered workers first: back-to-back small tasks then go to a worker that
  // is still awake instead of waking a sleeping one each time.
  for (std::size_t up_to = 1; up_to <= base_inflight; ++up_to)
    for (auto& w : workers_)
      if (w.pid != 0) progress |= fill(w, up_to);
  // With nothing left to make, an idle worker takes over a chunk that waits
  // behind a long one in a busy worker's ring.
  if (take_back_for_idle()) {
    for (auto& w : workers_)
      if (w.pid != 0) progress |= fill(w, 1);
    progress = true;
  }
  // Short chunks: each worker gets more, one at a time and each put in its
  // ring before the next is cut, so that no more than one chunk waits
  // outside the ring. The worker is woken once for all of them. None goes
  // behind chunks taken back: their worker is stuck on a long one.
  std::size_t depth = queue_depth();
  for (auto& w : workers_) {
    if (w.pid == 0) continue;
    bool put = send_pending(w);
    while (!w.inflight.empty() && w.inflight.size() < depth && !w.inflight.back().revoked &&
           w.inflight.back().sent == w.inflight.back().size() && fill(w, w.inflight.size() + 1)) {
      put |= send_pending(w);
      progress = true;
    }
    put |= std::exchange(w.placed, false);  // frames encoded in place by `fill`
    if (put) {
      w.to.publish();
      progress = true;
    }
  }
  return progress;
}

inline bool engine::take_back_for_idle() {
  if (dispatch_.resending()) return false;
  std::size_t idle = 0;
  for (auto& w : workers_)
    if (w.pid != 0 && w.inflight.empty() && !w.frame_cut &&
        !(config_.max_tasks_per_child && w.items_sent >= config_.max_tasks_per_child))
      ++idle;
  if (idle == 0) return false;
  bool took = false;
  for (auto& w : workers_) {
    if (idle == 0) break;
    if (w.pid == 0 || w.inflight.size() < 2 || w.inflight.front().revoked) continue;
    // The chunks after the running one (the worker claimed that one, not
    // the next), and only with their bytes all in the ring: the worker reads
    // past them either way.
    chunk& c = w.inflight[1];
    if (c.revoked || c.sent != c.size() || !c.call || !still_needed(c)) continue;
    std::size_t end = revoke_from(w, 1);
    if (end == 1) continue;
    // The same frames go to other workers, and their calls now wait for
    // those copies alone: the frames left here are answered (unrun) only
    // when their worker gets to them, which may be never (its running item
    // may not end).
    for (std::size_t k = 1; k < end; ++k) send_again(w.inflight[k]);
    --idle;
    took = true;
  }
  return took;
}

inline std::size_t engine::revoke_from(worker& w, std::size_t k) {
  std::size_t end = k;
  while (end < w.inflight.size() && !w.inflight[end].revoked &&
         w.inflight[end].sent == w.inflight[end].size())
    ++end;
  if (end == k) return k;
  w.slot->revoke_end.store(w.inflight[end - 1].seq + 1, std::memory_order_release);
  std::uint64_t expected = w.inflight[k].seq;
  if (!w.slot->claim.compare_exchange_strong(expected, w.inflight[k].seq | revoked_bit,
                                             std::memory_order_acq_rel))
    return k;
  for (std::size_t i = k; i < end; ++i) {
    chunk& t = w.inflight[i];
    t.revoked = true;
    w.items_sent -= std::min<std::size_t>(w.items_sent, t.count);
  }
  return end;
}

inline void engine::send_again(chunk& t) {
  if (!t.call) return;
  if (still_needed(t)) {
    detail::chunk copy = t;
    dispatch_.resend(std::move(copy));
  } else {
    --t.call->in_flight;  // nobody waits for it: over
  }
  t.call.reset();
}

inline void engine::take_back_unstarted(const std::exception_ptr& e) noexcept {
  for (auto& w : workers_) {
    if (w.pid == 0 || w.inflight.size() <= base_inflight || w.inflight.front().revoked) continue;
    // The next frame it would claim; those before it ran or run now.
    std::uint64_t next = w.slot->claim.load(std::memory_order_acquire);
    std::size_t k = 0;
    while (k < w.inflight.size() && w.inflight[k].seq != next) ++k;
    // A task no worker started, of which nothing else is out or came back.
    auto unstarted_task = [](const chunk& t) {
      const call_state* call = t.call.get();
      return call && !call->is_range() && !call->finished() && !call->answered &&
             call->input_done && call->in_flight == 1;
    };
    bool any = false;
    for (std::size_t i = std::max(k, base_inflight); i < w.inflight.size() && !any; ++i)
      any = !w.inflight[i].revoked && unstarted_task(w.inflight[i]);
    if (!any) continue;  // nothing to cancel here: the frames stay where they are
    std::size_t end = revoke_from(w, k);
    for (std::size_t i = k; i < end; ++i) {
      chunk& t = w.inflight[i];
      // Those within the first two it held were sent, as a worker holds
      // two however long its chunks: they run (elsewhere, or here again).
      if (i >= base_inflight && unstarted_task(t)) {
        call_state* call = t.call.get();
        call->abort(e);  // (before its last chunk is counted off: a finished call takes no abort)
        --call->in_flight;
        call->cancelled_unsent = true;
        dispatch_.forget(*call);
        t.call.reset();
      } else {
        try {
          send_again(t);
        } catch (...) {
          // No memory to queue it again: its call ends, rather than wait
          // for an answer that will not come.
          t.call->abort(std::current_exception());
          --t.call->in_flight;
          t.call.reset();
        }
      }
    }
  }
}

inline bool engine::fill(worker& w, std::size_t up_to) {
  bool made = false;
  while (w.inflight.size() < std::min(up_to, max_inflight)) {
    if (config_.max_tasks_per_child && w.items_sent >= config_.max_tasks_per_child) break;
    std::size_t max_count = ~std::size_t(0);
    if (config_.max_tasks_per_child) max_count = config_.max_tasks_per_child - w.items_sent;
    // Where the frame would go when every chunk before it is in the ring:
    // a mirrored ring's free room is one piece, and a chunk whose call can
    // encode it again is encoded straight there (`chunk::placed`).
    std::byte* room = nullptr;
    std::size_t room_size = 0;
    if (w.to.mirrored() &&
        (w.inflight.empty() || w.inflight.back().sent == w.inflight.back().size())) {
      // (The reader's position read again only when a chunk waited for
      // room: it is a cache miss while the worker reads.)
      room_size = std::min(dispatch_.wanted_room() ? w.to.free_space_now() : w.to.free_space(),
                           ring_capacity_);
      room = w.to.room();
    }
    // Made in its place in the queue, not moved there.
    chunk& c = w.inflight.emplace_back();
    bool got = false;
    try {
      // The room grows as the worker reads the frames before it.
      got = dispatch_.next_chunk(c, max_count, room, room_size, room_size < ring_capacity_);
    } catch (...) {
      w.inflight.pop_back();
      throw;
    }
    if (!got) {
      w.inflight.pop_back();
      break;
    }
    if (c.placed > 0) {
      w.to.advance(c.placed);
      c.sent = c.size();
      w.placed = true;
    }
    w.items_sent += c.count;
    c.seq = w.frames_sent++;
    made = true;
  }
  return made;
}

inline bool engine::send_pending(worker& w) {
  bool sent = false;
  // Chunks go into the ring in order, so the unsent ones are the last few:
  // start there rather than walk a deep queue at every call.
  auto it = w.inflight.end();
  while (it != w.inflight.begin() && std::prev(it)->sent != std::prev(it)->size()) --it;
  for (; it != w.inflight.end(); ++it) {
    chunk& c = *it;
    // The worker writes the ring's read position: never trust it past the capacity.
    std::size_t n = std::min({c.size() - c.sent, w.to.free_space(), ring_capacity_});
    if (n == 0) break;
    c.copy_out(c.sent, n, [&](const std::byte* data, std::size_t k) { w.to.put(data, k); });
    c.sent += n;
    sent = true;
    if (c.sent < c.size()) break;
  }
  return sent;
}

inline bool engine::frame_ready(worker& w, std::size_t avail) noexcept {
  if (w.frame_cut || w.holding || avail < sizeof(std::uint64_t)) return false;
  auto size = w.from.next_message_size();
  // A frame that fits the ring is read once it is all there (its worker
  // writes all of it at once, or as fast as it is read); a longer one, and
  // a length that is a lie, at once.
  return !size || *size > ring_capacity_ - sizeof(std::uint64_t) ||
         *size <= avail - sizeof(std::uint64_t);
}

inline bool engine::receive(worker& w, bool may_drop) {
  // The worker's bytes are hostile input: its ring positions, every length
  // and every header field are checked before anything is read by them.
  bool got = false;
  // Frames read in place free their space once, after the last: each
  // release is a store the worker reads and an atomic read-modify-write.
  bool skipped = false;
  w.holding = false;
  while (w.bad_frame.empty() && !w.frame_cut) {
    // The worker's position is read again only when what is known of it
    // runs short: each read of it is a cache miss while the worker writes.
    std::size_t avail = w.from.available();
    if (avail > ring_capacity_) {
      w.bad_frame =
          fmt::format("its result ring claims {} unread bytes in {}", avail, ring_capacity_);
      break;
    }
    auto size = w.from.next_message_size();
    if (!size) break;
    if (*size < sizeof(result_header) || *size > max_frame_bytes) {
      w.bad_frame = fmt::format("a frame of {} bytes", *size);
      break;
    }
    std::size_t total = sizeof(std::uint64_t) + *size;
    if (avail < total) avail = w.from.refresh();
    if (avail >= total) {
      if (const std::byte* p = w.from.peek(total)) {
        if (may_drop && hold_back(w, p + sizeof(std::uint64_t))) {
          w.holding = true;
          break;
        }
        w.held_since = {};
        reader in(p + sizeof(std::uint64_t), *size);
        handle_frame(w, in);
        if (!w.bad_frame.empty()) break;
        w.from.skip(total);
        skipped = true;
        got = true;
        continue;
      }
    } else if (total <= ring_capacity_ || !may_drop) {
      // It fits: it is read once all of it is there. (Without `may_drop`
      // the worker is dead: what is not there now never comes.) A frame
      // that fits is published whole, or in pieces while `answering` is
      // set (see `worker_slot`): found clear, the missing bytes never come.
      if (may_drop && w.slot->answering.load(std::memory_order_acquire) == 0 &&
          w.from.refresh() < total)
        w.bad_frame = fmt::format("a frame of {} bytes, cut short", *size);
      break;
    }
    // Longer than the ring, or cut by the end of a ring not mirrored.
    if (std::exchange(skipped, false)) w.from.release();
    stream_frame(w, *size);
    got = true;
  }
  if (skipped) w.from.release();
  if (!w.bad_frame.empty() && may_drop) {
    drop_worker(static_cast<std::size_t>(&w - workers_.data()));
    return true;
  }
  return got;
}

inline void engine::stream_frame(worker& w, std::size_t size) {
  // The worker had encoded all of this answer before it wrote its first
  // byte: the rest comes as fast as the ring is read, unless the worker
  // stops. This waits for it, holding the pool (the other workers' answers
  // wait in their rings), and gives up when it died or the pool stops.
  std::string lie;
  auto wait = [this, &w, &lie, size](auto&& ready) {
    // Its worker writes the answer's last byte before it clears `answering`:
    // found clear, a byte that is not there yet never comes.
    if (w.slot->answering.load(std::memory_order_acquire) == 0 && !ready()) {
      lie = fmt::format("an answer of {} bytes that ended early", size);
      throw reader_source::cut{};
    }
    auto keep_waiting = [&] {
      if (stop_requested_.load() || w.from.corrupt()) return false;
      if (w.pidfd) {
        pollfd pfd{w.pidfd.get(), POLLIN, 0};
        if (sys::poll(&pfd, 1, 0) > 0) return false;
      } else if (worker_exited(w, false)) {
        return false;
      }
      if (closed_) {
        // As `check_health` does: a worker stopped (SIGSTOP) in a closed pool
        // is given `stop_grace` to be continued, then killed.
        auto state = read_proc_thread(w.pid, w.pid);
        if (state.readable && (state.state == 'T' || state.state == 't')) {
          auto now = steady::now();
          if (w.stopped_since == steady::time_point{})
            w.stopped_since = now;
          else if (now - w.stopped_since > config_.stop_grace)
            kill_worker(w, SIGKILL);
        } else {
          w.stopped_since = {};
        }
      }
      return true;
    };
    if (wait_for_condition(shared_->doorbell, ready, std::nullopt, keep_waiting,
                           config_.parent_wait) != wait_status::ready)
      throw reader_source::cut{};
  };
  std::uint64_t length;
  w.from.get(&length, sizeof length);
  ring_message<decltype(wait)> source(w.from, size, wait);
  reader in(source, size);
  std::shared_ptr<call_state> call;
  std::uint64_t first = 0;
  if (!w.inflight.empty()) {
    call = w.inflight.front().call;
    first = w.inflight.front().first;
  }
  try {
    handle_frame(w, in);
    // A decoder that caught the cut (a `catch (...)` of the user's) made
    // the call take results that never came whole.
    if (source.was_cut()) {
      if (call && !call->cancelled)
        call->fail(first, std::make_exception_ptr(error(fmt::format(
                              "worker {} stopped sending the answer from item {}, and a decoder "
                              "caught what ended the reading: the results cannot be trusted",
                              w.pid, first))));
      throw reader_source::cut{};
    }
    if (w.bad_frame.empty()) source.finish(in.offset());
  } catch (const reader_source::cut&) {
    // It does not finish this frame: dead, or the pool stops. Its chunks go
    // elsewhere once it is reaped.
    w.frame_cut = true;
    if (!lie.empty())
      w.bad_frame = std::move(lie);
    else if (w.from.corrupt())
      w.bad_frame = "a result ring that claims more unread bytes than it holds";
    else
      kill_worker(w, SIGKILL);
  }
}

inline bool engine::hold_back(worker& w, const std::byte* frame) {
  result_header h;
  std::memcpy(&h, frame, sizeof h);
  if (h.kind != frame_kind::results || w.inflight.empty()) return false;
  const chunk& c = w.inflight.front();
  if (h.call != c.call_id || h.first != c.first || !c.call || c.call->cancelled ||
      !c.call->ahead_of_gap(c.first))
    return false;
  // Not when its worker may soon want the space: a worker waiting for room
  // is a worker stalled.
  if (w.from.available() > ring_capacity_ / 2) return false;
  auto now = steady::now();
  if (w.held_since == steady::time_point{}) w.held_since = now;
  if (now - w.held_since > max_hold) return false;
  // An earlier chunk of the call behind it in this ring (sent again here)
  // comes only after it.
  for (const chunk& later : w.inflight)
    if (&later != &c && later.call == c.call && later.first < c.first) return false;
  return true;
}

inline std::string engine::check_header(const worker& w, const result_header& h,
                                        std::size_t size) const {
  switch (h.kind) {
    case frame_kind::results:
    case frame_kind::part:
    case frame_kind::error:
    case frame_kind::skipped:
    case frame_kind::revoked:
      break;
    case frame_kind::init_failed:
      // Only a worker's first word, and about no chunk.
      if (w.frames != 0 || h.call != 0 || h.first != 0 || h.count != 0)
        return "an initializer failure after it had begun serving";
      return {};
    default:
      return fmt::format("a frame of unknown kind {}", static_cast<std::uint32_t>(h.kind));
  }
  if (size > max_frame_bytes) return fmt::format("a frame of {} bytes", size);
  if (w.inflight.empty()) return "an answer while it owed none";
  const chunk& c = w.inflight.front();
  // (A part may come sooner: the worker runs the items of a frame longer
  // than its ring as they come.)
  if (c.sent != c.size() && h.kind != frame_kind::part)
    return "an answer to a chunk it had not yet been sent whole";
  // A chunk taken back is answered unrun, and only such a chunk is.
  if ((h.kind == frame_kind::revoked) != c.revoked) {
    if (h.call != c.call_id || h.first != c.first)
      return dispatcher::check_answer(c, h, size, true);
    return c.revoked ? "results for a chunk taken back from it" : "a chunk given back unasked";
  }
  if (h.kind == frame_kind::revoked)
    return h.call == c.call_id && h.first == c.first && h.count == 0 && size == sizeof h
               ? std::string()
               : "a chunk given back with results";
  return dispatcher::check_answer(c, h, size, true);
}

inline void engine::handle_frame(worker& w, reader& in) {
  const std::size_t size = in.remaining();
  result_header h;
  if (size < sizeof h) {
    w.bad_frame = fmt::format("a frame of {} bytes, shorter than a header", size);
    return;
  }
  in.read(&h, sizeof h);
  if (std::string why = check_header(w, h, size); !why.empty()) {
    w.bad_frame = std::move(why);
    return;
  }
  ++w.frames;
  if (h.kind == frame_kind::init_failed) {
    std::string type, message;
    try {
      type = decode<std::string>(in);
      message = decode<std::string>(in);
    } catch (const decode_error& e) {
      w.bad_frame = fmt::format("an initializer failure that does not decode ({})", e.what());
      return;
    }
    broken_ = std::make_exception_ptr(error(
        fmt::format("the pool's initializer failed in worker {}: {}: {}; the pool cannot run tasks",
                    w.pid, type, message)));
    closed_ = true;
    return;
  }
  if (h.kind == frame_kind::revoked) {
    finish_chunk(w);  // its copy runs elsewhere
    return;
  }
  auto& c = w.inflight.front();
  pid_t pid = w.pid;
  auto lie = [pid](const std::string& reason) {
    return std::make_exception_ptr(error(fmt::format(
        "worker {} sent a bad result frame ({}); it was killed and replaced", pid, reason)));
  };
  auto d = dispatcher::deliver(
      c, h, in,
      [pid](std::uint64_t index, std::string type, std::string message, reader& rest) {
        auto original = decode_original(rest);
        return std::make_exception_ptr(
            task_error(index, pid, std::move(type), std::move(message), std::move(original)));
      },
      lie);
  if (!d.lie.empty()) {
    w.bad_frame = std::move(d.lie);
    return;
  }
  if (h.kind == frame_kind::part) {
    // The chunk goes on: what is left of it is what its next frames answer,
    // and what is sent again if its worker dies.
    if (!c.call->cancelled && d.failed_now) release_call(c.call);
    c.first += h.count;
    c.count -= h.count;
    c.skip += h.count;
    return;
  }
  // Workers skip the rest of a call that this frame failed.
  if (!c.call->cancelled && (h.kind == frame_kind::error || d.failed_now)) release_call(c.call);
  finish_chunk(w);
}

inline void engine::drop_worker(std::size_t i) {
  // A worker that sent a bad frame is not trusted with another byte: killed,
  // reaped, replaced; on_death settles its chunks.
  auto& w = workers_[i];
  kill_worker(w, SIGKILL);
  exit_status status = exit_status::killed(SIGKILL);
  wait_exit(w, std::nullopt, &status);
  on_death(i, status);
}

inline void engine::finish_chunk(worker& w) {
  dispatch_.settle(w.inflight.front());
  w.inflight.pop_front();
}

inline bool engine::check_health(bool force) {
  auto now = steady::now();
  if (!force && now < next_health_check_) return false;
  next_health_check_ = now + std::chrono::milliseconds(5);
  // A replacement forked now waits for chunks: that is a change too.
  bool changed = respawn_missing();
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    auto& w = workers_[i];
    if (w.pid == 0) continue;
    if (config_.task_timeout.count() > 0 && !w.timed_out) {
      auto current = w.slot->current.load(std::memory_order_acquire);
      if (current != no_item) {
        auto started = steady::time_point(
            steady::duration(w.slot->started_ns.load(std::memory_order_relaxed)));
        if (now - started > config_.task_timeout &&
            current == w.slot->current.load(std::memory_order_acquire)) {
          w.timed_out = true;
          w.timed_out_item = current;
          kill_worker(w, SIGKILL);
        }
      }
    }
    if (closed_ && !w.inflight.empty()) {
      // Once the pool is closed, a worker stopped (SIGSTOP) with work in
      // hand is given `stop_grace` to be continued, then killed: join and
      // the destructor wait only for work that can finish.
      auto state = read_proc_thread(w.pid, w.pid);
      if (state.readable && (state.state == 'T' || state.state == 't')) {
        if (w.stopped_since == steady::time_point{}) {
          w.stopped_since = now;
        } else if (now - w.stopped_since > config_.stop_grace) {
          kill_worker(w, SIGKILL);
          w.stopped_since = {};
        }
      } else {
        w.stopped_since = {};
      }
    }
    if (reap_if_exited(i)) {
      changed = true;
    } else if (retire_if_due(i)) {
      changed = true;  // a fresh worker waits for chunks
    }
  }
  return changed;
}

inline bool engine::reap_if_exited(std::size_t i) {
  auto& w = workers_[i];
  // A timed-out worker was sent SIGKILL: wait for it.
  if (!worker_exited(w, w.timed_out)) return false;
  exit_status status = exit_status::killed(SIGKILL);
  wait_exit(w, std::nullopt, &status);  // kills what is left of its group, reaps it
  on_death(i, status);
  return true;
}

inline void engine::reap_exited() {
  // One poll over the pidfds says which workers ended; only those are waited for.
  pollfd fds[64];
  for (std::size_t base = 0; base < workers_.size(); base += 64) {
    std::size_t n = std::min<std::size_t>(64, workers_.size() - base);
    bool any = false;
    for (std::size_t k = 0; k < n; ++k) {
      auto& w = workers_[base + k];
      fds[k] = pollfd{w.pid != 0 && w.pidfd ? w.pidfd.get() : -1, POLLIN, 0};
      any |= w.pid != 0 && !w.pidfd;  // no pidfd on this kernel: ask waitid
    }
    int ready = sys::poll(fds, int_cast<nfds_t>(n), 0);
    if (ready == 0 && !any) continue;
    for (std::size_t k = 0; k < n; ++k) {
      auto& w = workers_[base + k];
      if (w.pid == 0) continue;
      if ((fds[k].revents & POLLIN) || !w.pidfd) reap_if_exited(base + k);
    }
  }
}

inline void engine::kill_worker(const worker& w, int sig) noexcept {
  if (w.pid <= 0) return;
  try {
    // The worker and whatever it started, in its group; the worker alone if
    // the group is gone already.
    if (!sys::kill_group(w.pid, sig)) sys::kill(w.pid, sig);
  } catch (const std::system_error&) {
    // EPERM: not ours to signal any more. Nothing else can be done here.
  }
}

inline void engine::on_death(std::size_t i, exit_status status) {
  auto& w = workers_[i];
  pid_t pid = w.pid;
  // Results the worker finished before it died still count (not those of a
  // worker that lied: nothing more is read from it).
  if (!w.frame_cut && w.bad_frame.empty()) receive(w, false);
  w.pid = 0;
  w.pidfd.reset();
  auto current = w.slot->current.load(std::memory_order_acquire);
  bool first_chunk = true;
  while (!w.inflight.empty()) {
    chunk c = std::move(w.inflight.front());
    w.inflight.pop_front();
    if (c.revoked) {  // its copy runs elsewhere
      dispatch_.settle(c);
      continue;
    }
    bool ran =
        first_chunk && current != no_item && current >= c.first && current < c.first + c.count;
    if (first_chunk && !w.bad_frame.empty()) {
      // The chunk its bad frame claimed to answer: another worker runs it
      // once; a second lie about it fails its call.
      if (still_needed(c) && c.bad_frames++ == 0) {
        dispatch_.resend(std::move(c));
        first_chunk = false;
        continue;
      }
      if (!c.call->cancelled) {
        c.call->fail(c.first, std::make_exception_ptr(error(fmt::format(
                                  "worker {} sent a bad result frame ({}); it was killed and "
                                  "replaced",
                                  pid, w.bad_frame))));
        release_call(c.call);
      }
    } else if (first_chunk && w.timed_out) {
      c.call->fail(w.timed_out_item, std::make_exception_ptr(timeout_error(w.timed_out_item, pid,
                                                                           config_.task_timeout)));
      release_call(c.call);
    } else if (ran) {
      c.call->fail(current, std::make_exception_ptr(worker_died(pid, status, current)));
      release_call(c.call);
    } else if (still_needed(c)) {
      // The worker died between items: this chunk never ran, or its results
      // were lost on the way; another worker runs it. A chunk that keeps
      // finding its worker dead is charged with the death.
      if (++c.retries < 3) {
        dispatch_.resend(std::move(c));
        first_chunk = false;
        continue;
      }
      c.call->fail(c.first, std::make_exception_ptr(worker_died(pid, status, c.first)));
      release_call(c.call);
    }
    dispatch_.settle(c);
    first_chunk = false;
  }
  if (!broken_ && !stopped_) {
    try {
      spawn(i);
    } catch (const std::system_error&) {
      // fork failed (process limit, memory): the slot stays empty and the
      // next health check tries again, raising the error to the caller then.
    }
  }
}

inline bool engine::retire_if_due(std::size_t i) {
  auto& w = workers_[i];
  if (config_.max_tasks_per_child == 0 || w.items_sent < config_.max_tasks_per_child ||
      !w.inflight.empty() || w.frame_cut)
    return false;
  // The worker did its share: stop it, reap it, start a fresh one.
  std::vector<std::byte> frame(sizeof(std::uint64_t) + sizeof(task_header));
  std::uint64_t size = sizeof(task_header);
  task_header h{0, 0, 0, 0, frame_kind::stop};
  std::memcpy(frame.data(), &size, sizeof size);
  std::memcpy(frame.data() + sizeof size, &h, sizeof h);
  if (w.to.free_space() >= frame.size()) {
    w.to.put(frame.data(), frame.size());
    w.to.publish();
  } else {
    kill_worker(w, SIGKILL);
  }
  if (!wait_exit(w, config_.stop_grace)) {
    kill_worker(w, SIGKILL);
    wait_exit(w, std::nullopt);
  }
  w.pid = 0;
  w.pidfd.reset();
  if (!broken_ && !stopped_) spawn(i);
  return true;
}

inline bool engine::wait_exit(worker& w, std::optional<std::chrono::milliseconds> timeout,
                              exit_status* status) noexcept {
  auto deadline =
      (timeout ? deadline_after(*timeout) : std::nullopt).value_or(steady::time_point::max());
  for (;;) {
    try {
      // Seen exited but not reaped: while it is a zombie its pid names its
      // group and no other, so what is left of the group is killed now.
      if (worker_exited(w, !timeout)) {
        kill_worker(w, SIGKILL);
        if (server_.running()) {
          int raw = server_.reap(w.pid);
          if (status) *status = exit_status::from_wait_status(raw);
        }
        return true;
      }
    } catch (const error& e) {
      server_lost(e);  // the worker died with it
      return true;
    } catch (const std::system_error& e) {
      // ECHILD: reaped by someone else (SIGCHLD ignored); its group goes all
      // the same. Another error leaves it to the caller's next step.
      if (e.code().value() == ECHILD || !timeout) {
        kill_worker(w, SIGKILL);
        return true;
      }
    }
    auto left = deadline - steady::now();
    if (left <= steady::duration::zero()) return false;
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
    if (w.pidfd) {
      pollfd pfd{w.pidfd.get(), POLLIN, 0};
      try {
        sys::poll(&pfd, 1, static_cast<int>(std::min<long long>(ms, 100)));
      } catch (const std::system_error&) {
        ::usleep(1000);
      }
    } else {
      ::usleep(1000);  // no pidfd on this kernel: poll the child's state every millisecond
    }
  }
}

inline bool engine::respawn_missing() {
  if (broken_ || stopped_) return false;
  std::exception_ptr refused;
  bool any_alive = false;
  bool spawned = false;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].pid == 0) {
      try {
        spawn(i);
        spawned = true;
      } catch (const std::system_error&) {
        refused = std::current_exception();
        continue;
      }
    }
    any_alive = true;
  }
  // While some worker lives the calls go on with it, and the empty slots are
  // tried again at the next health check; with none, nothing can progress.
  if (refused && !any_alive) std::rethrow_exception(refused);
  return spawned;
}

inline void engine::check_owner(const char* operation) const {
  if (owned()) return;
  throw error(fmt::format(
      "{}: a pool made by pid {} used in pid {}; a pool belongs to the process that made it "
      "(make a new one in this process)",
      operation, parent_, this_pid()));
}

inline void engine::refresh_workers(const char* operation, bool often) {
  check_owner(operation);
  if (stopped_) return;
  if (often) {
    auto now = steady::now();
    if (now < next_refresh_) return;
    next_refresh_ = now + std::chrono::milliseconds(1);
  }
  // Workers that died since the last call (say, while the pool was idle)
  // are reaped and replaced now: no zombie outlives the next call.
  reap_exited();
  respawn_missing();
}

inline void engine::release_foreign() noexcept {
  stopped_ = true;
  closed_ = true;
  server_.release();
  for (auto& w : workers_) {
    w.pidfd.reset();
    w.pid = 0;
  }
}

inline std::vector<pid_t> engine::pids() {
  if (owned() && !stopped_) {
    try {
      refresh_workers("pids");
    } catch (const std::system_error&) {
      // No replacement can be forked now: its slot shows 0.
    }
  }
  std::vector<pid_t> out;
  for (auto& w : workers_) out.push_back(w.pid);
  return out;
}

inline void engine::join() {
  check_owner("join");
  if (stopped_) return;
  closed_ = true;
  // Open ranges advance only while read, and their reader is the thread now
  // joining: they end here. Futures and chunks in flight can finish: wait for
  // them, unless the pool is broken and nothing is worth waiting for.
  end_calls(true);
  if (!broken_) {
    try {
      drive([&] {
        if (dispatch_.work_queued()) return false;
        for (auto& w : workers_)
          if (!w.inflight.empty()) return false;
        return true;
      });
    } catch (...) {
      terminate();
      throw;
    }
  }
  reap_all(config_.stop_grace, true);
}

// Ends, with pool_closed, every call still pending (or only the open ranges).
inline void engine::end_calls(bool ranges_only) noexcept {
  dispatch_.end_calls(ranges_only,
                      std::make_exception_ptr(pool_closed::while_pending(
                          ranges_only ? "join or the destructor, with the range open"
                                      : "terminate, join or the destructor")),
                      [&](call_state& call) { cancel(call); });
}

inline void engine::terminate() noexcept {
  if (stopped_) return;
  closed_ = true;
  reap_all(config_.stop_grace, false);
}

inline void engine::reap_all(std::chrono::milliseconds grace, bool send_stop) noexcept {
  if (!owned()) {
    // Not this process's workers: no stop frames, signals or waits.
    release_foreign();
    return;
  }
  stopped_ = true;
  std::uint64_t size = sizeof(task_header);
  task_header h{0, 0, 0, 0, frame_kind::stop};
  for (auto& w : workers_) {
    if (w.pid == 0) continue;
    if (send_stop && w.to.free_space() >= sizeof size + sizeof h) {
      w.to.put(&size, sizeof size);
      w.to.put(&h, sizeof h);
      w.to.publish();
    } else {
      kill_worker(w, SIGTERM);
    }
  }
  auto deadline = deadline_after(grace).value_or(steady::time_point::max());
  for (auto& w : workers_) {
    if (w.pid == 0) continue;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now());
    if (!wait_exit(w, std::max(left, std::chrono::milliseconds(0)))) {
      kill_worker(w, SIGTERM);
      if (!wait_exit(w, std::chrono::milliseconds(100))) {
        kill_worker(w, SIGKILL);
        wait_exit(w, std::nullopt);
      }
    }
    w.pid = 0;
    w.pidfd.reset();
  }
  server_.stop(grace);
  // Calls still waiting for answers get none: every pending call, sent or
  // not, ends with pool_closed.
  end_calls(false);
  for (auto& w : workers_) {
    for (auto& c : w.inflight) dispatch_.settle(c);
    w.inflight.clear();
  }
  dispatch_.stop(
      std::make_exception_ptr(pool_closed::while_pending("terminate, join or the destructor")));
}

}  // namespace procpool::detail
