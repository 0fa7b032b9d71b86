// The dispatcher: what both engines do with calls and chunks, whatever
// carries the chunks (shared-memory rings to forked workers, or MPI messages
// to ranks).
//
//   calls        registered by start(), each with an id; queued while they
//                have input to cut; remembered (weakly) until they are over,
//                so that stopping the pool can end every one of them
//   chunks       cut from the queued calls in turn (a call whose window is
//                full lets the next one go), or taken from the resend queue
//                first (chunks whose worker died before running them)
//   answers      checked against the chunk they claim to answer, every field,
//                before a byte of them is decoded; then handed to the call
//   closing      join ends the open ranges; terminate and the destructor end
//                every call still pending with pool_closed
//
// The engine owns the transport: who runs a chunk, when it is sent, what a
// dead or silent worker means. It tells the dispatcher only what the
// dispatcher cannot see: that a chunk goes back in the queue, or is settled.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../calls/calls.hpp"
#include "frame.hpp"

namespace procpool::detail {

/// A chunk of a call on its way: made by the dispatcher, carried by an
/// engine, answered once. Engines extend it with what their transport needs.
struct chunk {
  std::shared_ptr<call_state> call;
  std::uint64_t call_id = 0;
  std::uint64_t first = 0;
  std::uint32_t count = 0;
  std::uint64_t handler = 0;  // token of the code that runs it (see task_header)
  writer bytes;               // the frame: the engine's prefix, a task_header, the items
  frame_refs blocks;          // the frame's blocks left in the call's input, between `bytes`
  std::size_t placed = 0;     // or: the frame's bytes, encoded straight into a ring, kept nowhere
  std::uint64_t skip = 0;     // items of `bytes` before `first`, answered already (`part`)
  unsigned retries = 0;       // times it was sent again after its worker died
  unsigned bad_frames = 0;    // answers to it that were lies

  /// Bytes in the whole frame: its own and its blocks', or those it placed.
  std::size_t size() const noexcept { return bytes.size() + blocks.bytes + placed; }

  /// Hands `sink(data, n)` the frame's bytes from `from` on, in order, in as
  /// many pieces as they lie in, until `sink` has taken `n` of them.
  template <class Sink>
  void copy_out(std::size_t from, std::size_t n, Sink&& sink) const {
    copy_frame_out(bytes.data(), bytes.size(), blocks, from, n, std::forward<Sink>(sink));
  }

  /// Copies the frame's blocks into its own bytes: the frame no longer reads
  /// the call's input (which its call's end may free while the frame still
  /// goes out).
  void own_blocks() {
    if (blocks.empty()) return;
    writer whole(size());
    copy_out(0, size(), [&](const std::byte* data, std::size_t n) { whole.write(data, n); });
    bytes = std::move(whole);
    blocks.clear();
  }
};

/// True when a chunk out needs someone to collect it though nobody reads it:
/// its call is a task or a `map_async`. A range's chunks wait for the range's
/// reader, who collects them (the helper thread does not wake for them).
inline bool awaits_collection(const chunk& c) noexcept {
  return c.call && !c.call->is_range();
}

/// What became of an answer handed to its call (`dispatcher::deliver`).
struct delivery {
  std::string lie;          // why the answer cannot be true; empty if it can
  bool failed_now = false;  // the answer made its call fail
};

/// Calls, the chunks cut from them, and the checks on their answers.
class dispatcher {
 public:
  /// `prefix` bytes come before each task frame's header in `chunk::bytes`
  /// (the fork engine's ring messages start with their length). With
  /// `blocks`, the engine sends a frame from its pieces (`chunk::copy_out`),
  /// and calls may leave big blocks in their input (`chunk::blocks`).
  explicit dispatcher(std::size_t prefix = 0, bool blocks = false) noexcept
      : prefix_(prefix), blocks_(blocks) {}

  /// Registers a call: gives it an id and queues it for cutting.
  void start(const std::shared_ptr<call_state>& call) {
    if (live_.size() >= prune_live_at_) {
      // Forget calls that are over; amortized, so that many pending futures
      // cost O(1) each.
      live_.erase(std::remove_if(live_.begin(), live_.end(),
                                 [](const std::weak_ptr<call_state>& c) {
                                   auto p = c.lock();
                                   return !p || p->finished();
                                 }),
                  live_.end());
      prune_live_at_ = std::max<std::size_t>(64, 2 * live_.size());
    }
    live_.push_back(call);
    call->id = next_call_id_++;
    sending_.push_back(call);
  }

  /// The id the next call will get.
  std::uint64_t next_call_id() const noexcept { return next_call_id_; }

  /// True while a chunk's items can still change its call's outcome: the call
  /// goes on, or failed at a later item (the lowest failing index wins, so
  /// items before it must still run).
  static bool still_needed(const chunk& c) noexcept {
    return !c.call->cancelled && (!c.call->failed() || c.first < c.call->error_index());
  }

  /// Makes the next chunk to send into `c`, of at most `max_count` items: a
  /// chunk to run again first, then the queued calls in turn. False when
  /// nothing can be sent now (no input left, or every window is full).
  ///
  /// With `room` (`room_size` bytes where the frame would go next in the
  /// ring, contiguous), a chunk of a call that can encode it again
  /// (`call_state::places_chunks`) is encoded straight there when it has no
  /// blocks: its bytes are then kept nowhere (`chunk::placed`), and a resend
  /// encodes them again. The caller counts them into the ring. Such a chunk
  /// ends before an item that does not fit the room (the next chunk begins
  /// with it); when its first item does not fit, the call waits for more
  /// room if `room_grows` (the worker has yet to read what is in its ring),
  /// and otherwise (an item larger than the ring) makes the chunk in a
  /// buffer of its own, which goes through the ring in pieces.
  bool next_chunk(chunk& c, std::size_t max_count = ~std::size_t(0), std::byte* room = nullptr,
                  std::size_t room_size = 0, bool room_grows = false) {
    wanted_room_ = false;
    while (!resend_.empty()) {
      c = std::move(resend_.front());
      resend_.pop_front();
      if (!still_needed(c)) {
        --c.call->in_flight;  // its call is over: never run it again
        continue;
      }
      if (c.placed > 0 && !encode_again(c)) continue;
      // Parts of its answer came: the rest runs, from the frame kept.
      if (c.skip > 0) resume_after_parts(c);
      return true;
    }
    // Each queued call is asked at most once: when every one is blocked
    // (full windows), there is nothing to send now.
    for (std::size_t tries = sending_.size(); tries > 0 && !sending_.empty(); --tries) {
      auto call = sending_.front();
      if (call->input_done || call->failed() || call->cancelled) {
        sending_.pop_front();
        continue;
      }
      // Encoded straight into the buffer the chunk keeps (one a settled
      // chunk left, when there is one).
      if (building_.capacity() == 0 && !spare_.empty()) {
        building_ = std::move(spare_.back());
        spare_.pop_back();
        spare_bytes_ -= building_.capacity();
      }
      bool placing = room && room_size > prefix_ + sizeof(task_header) && call->places_chunks();
      std::uint64_t handler = 0;
      std::uint64_t first = 0;
      std::uint32_t count = 0;
      auto cut = [&](bool in_room) {
        if (in_room)
          building_.write_in_place(room, room_size, false);
        else
          building_.write_in_own();
        building_.resize(prefix_ + sizeof(task_header));
        // Listed straight into the chunk: a list built aside and copied was
        // read back in wide loads before its narrow stores had landed.
        c.blocks.clear();
        return call->next_chunk(building_, blocks_ ? &c.blocks : nullptr, max_count, first, count,
                                handler);
      };
      bool made = false;
      try {
        made = cut(placing);
        // Its first item does not fit the room, and no more will come.
        if (!made && placing && building_.overflowed()) {
          if (room_grows)
            wanted_room_ = true;
          else
            made = cut(false);
        }
      } catch (...) {
        // The call cuts its chunks catching what its input throws; what
        // escapes that (an iterator's comparison, memory) ends the call,
        // and nothing of its input is read again.
        sending_.pop_front();
        call->abort(std::current_exception());
        continue;
      }
      if (!made) {
        sending_.pop_front();
        // Input spent, or it failed (an item could not be read or encoded):
        // done sending. Otherwise its window is full: the next call goes first.
        if (!call->input_done && !call->failed()) sending_.push_back(call);
        continue;
      }
      write_task_header(building_.data() + prefix_, handler, call->id, first, count,
                        frame_kind::task);
      if (prefix_ == sizeof(std::uint64_t)) {
        std::uint64_t size = building_.size() - prefix_ + c.blocks.bytes;
        std::memcpy(building_.data(), &size, sizeof size);
      }
      // Every field set (not `c = chunk{}`: zeroing a whole chunk first
      // was a seventh of this function's time at ten items per chunk).
      if (building_.in_place() && c.blocks.empty()) {
        c.placed = building_.size();
        c.bytes.clear();
        building_.write_in_own();
      } else {
        // Its blocks go into the ring after its own bytes: those are copied
        // out of the room into a buffer of the chunk's own.
        building_.keep_in_own();
        c.placed = 0;
        c.bytes = std::move(building_);
        building_ = writer();
      }
      c.retries = 0;
      c.bad_frames = 0;
      c.skip = 0;
      c.call_id = call->id;
      c.first = first;
      c.count = count;
      c.handler = handler;
      ++call->in_flight;
      call->dispatched = true;
      c.call = std::move(call);  // moved, not copied: one atomic count less per chunk
      return true;
    }
    building_.write_in_own();  // nothing of it stays pointed at a ring
    return false;
  }

  /// Encodes the frame of `c`, whose bytes were placed in a ring and kept
  /// nowhere, again into a buffer of its own, for a resend. False when its
  /// input cannot give its items again: its call then fails, and `c` is
  /// settled.
  bool encode_again(chunk& c) noexcept {
    auto& call = *c.call;
    try {
      writer out;
      out.resize(prefix_ + sizeof(task_header));
      c.blocks.clear();
      call.reencode(c.first, c.count, out, blocks_ ? &c.blocks : nullptr);
      write_task_header(out.data() + prefix_, c.handler, c.call_id, c.first, c.count,
                        frame_kind::task);
      if (prefix_ == sizeof(std::uint64_t)) {
        std::uint64_t size = out.size() - prefix_ + c.blocks.bytes;
        std::memcpy(out.data(), &size, sizeof size);
      }
      c.bytes = std::move(out);
      c.placed = 0;
      c.skip = 0;
      return true;
    } catch (...) {
      call.fail(c.first, std::current_exception());
      c.placed = 0;
      c.blocks.clear();
      --call.in_flight;
      return false;
    }
  }

  /// True when the last `next_chunk` left a call waiting for more room.
  bool wanted_room() const noexcept { return wanted_room_; }

  /// Makes the kept frame of `c`, of which parts of the answer came (its
  /// `first` moved past them), a `task_rest` frame: the count of items
  /// answered (`chunk::skip`) goes after the header, and the worker reads
  /// past those items. A frame that is one already has its count changed.
  void resume_after_parts(chunk& c) {
    std::size_t head = prefix_ + sizeof(task_header);
    std::uint64_t skip = c.skip;
    frame_kind kind;
    std::memcpy(&kind, c.bytes.data() + prefix_ + offsetof(task_header, kind), sizeof kind);
    if (kind != frame_kind::task_rest) {
      writer out(c.bytes.size() + sizeof skip);
      out.write(c.bytes.data(), head);
      out.write(&skip, sizeof skip);
      out.write(c.bytes.data() + head, c.bytes.size() - head);
      c.bytes = std::move(out);
      c.blocks.shift(sizeof skip);
      if (prefix_ == sizeof(std::uint64_t)) {
        std::uint64_t size = c.bytes.size() - prefix_ + c.blocks.bytes;
        std::memcpy(c.bytes.data(), &size, sizeof size);
      }
    }
    std::memcpy(c.bytes.data() + head, &skip, sizeof skip);
    write_task_header(c.bytes.data() + prefix_, c.handler, c.call_id, c.first, c.count,
                      frame_kind::task_rest);
  }

  /// Queues a chunk to be sent again (its worker died before running it, or
  /// it was taken back for an idle worker); it stays counted in its call's
  /// `in_flight`.
  void resend(chunk c) { resend_.push_back(std::move(c)); }
  /// True when chunks wait to be sent again.
  bool resending() const noexcept { return !resend_.empty(); }

  /// The chunk is answered or given up: its call no longer waits for it. Its
  /// buffer is kept for a later chunk.
  void settle(chunk& c) noexcept {
    if (c.call) --c.call->in_flight;
    // Enough to keep every chunk of a deep queue in buffers already
    // allocated, bounded in bytes so that big chunks are not hoarded.
    std::size_t capacity = c.bytes.capacity();
    if (capacity > 0 && spare_.size() < max_spare && spare_bytes_ + capacity <= max_spare_bytes) {
      c.bytes.clear();
      spare_bytes_ += capacity;
      spare_.push_back(std::move(c.bytes));
    }
  }

  /// Checks what an answer's header claims against the chunk `c` it answers
  /// (`size`: the whole answer, header included). Returns why it cannot be
  /// true, or an empty string. Engine-specific kinds (revoked, bye) are the
  /// engine's to check first.
  static std::string check_answer(const chunk& c, const result_header& h, std::size_t size,
                                  bool parts = false) {
    if (h.call != c.call_id)
      return fmt::format("an answer for call {} where call {} was due", h.call, c.call_id);
    if (h.first != c.first)
      return fmt::format("an answer from item {} where item {} was due", h.first, c.first);
    switch (h.kind) {
      case frame_kind::results:
      case frame_kind::error:
      case frame_kind::skipped:
        break;
      case frame_kind::part:
        if (parts) break;
        [[fallthrough]];
      default:
        return fmt::format("an answer of kind {}", static_cast<std::uint32_t>(h.kind));
    }
    // A whole chunk's results, or fewer before an error or a cancellation;
    // a part, at least one and not all (the rest follow).
    bool count_ok = h.kind == frame_kind::results ? h.count == c.count
                    : h.kind == frame_kind::part  ? h.count > 0 && h.count < c.count
                                                  : h.count < c.count;
    if (!count_ok) return fmt::format("{} results for a chunk of {} items", h.count, c.count);
    if (size < sizeof h) return fmt::format("an answer of {} bytes", size);
    return {};
  }

  /// Hands the answer `h` (its body in `in`) to the call of chunk `c`, whose
  /// header `check_answer` passed. `failure(index, type, message, in)` makes
  /// the error of a failed item (reading what the engine appends from `in`);
  /// `lie(reason)` the error that fails the call when the answer turns out
  /// false (an error for an item other than the one after the results, bytes
  /// past its end). The results of a cancelled call are dropped. Throws only
  /// what `deliver_frame` lets through (a streamed answer cut off).
  ///
  /// With `gaps`, an error may name a later item of the chunk than the one
  /// after the results: the items between ran without failing, but their
  /// results were lost (an MPI rank in hierarchical mode, whose local worker
  /// died holding them). Without it, the error must follow the results.
  template <class MakeFailure, class MakeLie>
  static delivery deliver(chunk& c, const result_header& h, reader& in, MakeFailure&& failure,
                          MakeLie&& lie, bool gaps = false) {
    delivery d;
    auto& call = *c.call;
    call.answered = true;
    // Where the failing item of an error answer may be: right after the
    // results, or (with gaps) anywhere after them within the chunk.
    auto in_place = [&](std::uint64_t index) {
      std::uint64_t next = h.first + h.count;
      return gaps ? index >= next && index - c.first < c.count : index == next;
    };
    if (h.kind == frame_kind::error && h.count == 0) {
      // No results: the failing item is checked before anything is delivered.
      std::uint64_t index = no_item;
      if (in.remaining() >= sizeof index) {
        reader look(in.peek(sizeof index), sizeof index);
        index = decode<std::uint64_t>(look);
      }
      if (!in_place(index)) {
        d.lie = fmt::format("an error for item {} in a chunk from item {}", index, h.first);
        return d;
      }
    }
    bool failed_before = call.failed();
    bool error_decoded = false;
    deliver_frame(call, h, in, [&](std::uint64_t index, std::string type, std::string message) {
      error_decoded = true;
      if (!in_place(index)) {
        // Results came before it: the failing item is the one after them.
        d.lie = fmt::format("an error for item {} after results up to item {}", index,
                            h.first + h.count);
        return lie(d.lie);
      }
      return failure(index, std::move(type), std::move(message), in);
    });
    d.failed_now = call.failed() && !failed_before;
    // Every byte of the frame must have been asked for (a frame that did not
    // decode failed its call already, and its rest is not looked at).
    if (d.lie.empty() && !call.cancelled && in.remaining() != 0 &&
        (h.kind == frame_kind::error ? error_decoded : !d.failed_now))
      d.lie = fmt::format("{} bytes past the end of its answer", in.remaining());
    if (!d.lie.empty()) {
      // The frame's results were taken already: its call fails rather than
      // taking them again from elsewhere.
      call.fail(h.first, lie(d.lie));
      d.failed_now = true;
    }
    return d;
  }

  /// Drops what is queued of `call` (it is over for its user); its chunks
  /// already sent stay counted until answered.
  void forget(call_state& call) noexcept {
    sending_.erase(
        std::remove_if(sending_.begin(), sending_.end(),
                       [&](const std::shared_ptr<call_state>& c) { return c.get() == &call; }),
        sending_.end());
    for (auto it = resend_.begin(); it != resend_.end();) {
      if (it->call.get() == &call) {
        --call.in_flight;
        it = resend_.erase(it);
      } else {
        ++it;
      }
    }
  }

  /// True while some queued call has input to cut, or some chunk to send
  /// again still matters: what `join` waits for, beside the chunks out.
  /// `tasks_only`: ranges, which wait for their reader, do not count.
  bool work_queued(bool tasks_only = false) const noexcept {
    for (auto& c : sending_)
      if (!c->input_done && !c->failed() && !c->cancelled && !(tasks_only && c->is_range()))
        return true;
    for (auto& c : resend_)
      if (still_needed(c)) return true;
    return false;
  }

  /// Ends with `e` every call still pending (only the open ranges when
  /// `ranges_only`), calling `cancelled(call)` for each so the engine can
  /// tell its workers. Their chunks out are dropped when answered.
  template <class OnEnd>
  void end_calls(bool ranges_only, const std::exception_ptr& e, OnEnd&& on_end) noexcept {
    for (auto& weak : live_) {
      auto call = weak.lock();
      if (!call || call->finished() || (ranges_only && !call->is_range())) continue;
      call->abort(e);
      on_end(*call);
    }
  }

  /// Ends with `e` every task (a call that is no range) of which nothing was
  /// cut yet, and drops it from the queue: it never runs.
  void cancel_unsent(const std::exception_ptr& e) noexcept {
    for (auto& weak : live_) {
      auto call = weak.lock();
      if (!call || call->finished() || call->dispatched || call->is_range()) continue;
      call->abort(e);
      call->cancelled_unsent = true;
      forget(*call);
    }
  }

  /// The engine stopped: every call still pending ends with `e`, and the
  /// queues are emptied (chunks out are the engine's to settle).
  void stop(const std::exception_ptr& e) noexcept {
    end_calls(false, e, [](call_state&) {});
    for (auto& c : resend_) --c.call->in_flight;
    resend_.clear();
    sending_.clear();
    live_.clear();
  }

 private:
  std::size_t prefix_;
  bool blocks_;
  std::deque<std::shared_ptr<call_state>> sending_;  // calls with chunks still to cut
  std::deque<chunk> resend_;                         // chunks to send again
  std::vector<std::weak_ptr<call_state>> live_;      // every call started and not yet over
  std::size_t prune_live_at_ = 64;
  std::uint64_t next_call_id_ = 1;
  // As many as the chunks a pool keeps out (up to 256 per worker), so that
  // short chunks reuse their buffers instead of freeing and allocating one
  // each; the bytes' bound below keeps big ones from being hoarded.
  static constexpr std::size_t max_spare = 4096;
  static constexpr std::size_t max_spare_bytes = std::size_t(8) << 20;
  std::vector<writer> spare_;  // buffers of settled chunks
  std::size_t spare_bytes_ = 0;
  writer building_;  // the next chunk's frame, while it is cut
  bool wanted_room_ = false;
};

}  // namespace procpool::detail
