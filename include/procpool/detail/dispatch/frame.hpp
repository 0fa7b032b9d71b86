// The frames both engines speak, and the code that runs a chunk's items.
//
// A task frame is a task_header followed by the chunk's items, encoded back
// to back; its `handler` is a token naming the code that runs the chunk (see
// calls/calls.hpp, `Handlers`). Whoever runs it answers with one result
// frame (a fork worker may send `part` frames first, each with the next
// results, when its answer outgrows its ring's room): a result_header, then
// `count` encoded results, then, for an
// error frame, the failing item's index, the exception's type name and
// message, the exception object if the worker could encode it (a bool, then
// an `exception_object`), and whatever the engine adds (MPI: the pid that
// ran it). The fork
// engine carries frames in shared-memory rings, the MPI engine in messages.
#pragma once

#include <cxxabi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../codec.hpp"
#include "../../errors.hpp"
#include "../calls/calls.hpp"
#include "../os/type_name.hpp"

namespace procpool::detail {

/// What a frame is.
enum class frame_kind : std::uint32_t {
  task = 1,         // to a worker or rank: a chunk to run
  stop = 2,         // to a worker or rank: stop serving
  results = 3,      // back: `count` encoded results
  error = 4,        // back: `count` results, then index, type name, message
  skipped = 5,      // back: chunk cancelled; `count` results done before it was
  init_failed = 6,  // back (fork): the initializer threw: type name, message
  revoked = 7,      // back (fork): the parent took this chunk back before it started
  bye = 8,          // back (MPI): the rank stopped; it sends nothing more
  members = 9,      // to a rank (MPI): the ranks given up, `count` of them, follow
  part = 10,        // back (fork): `count` results, the chunk's next; more frames answer the rest
  task_rest = 11,   // to a worker (fork): a task whose items, after a u64 count of items
                    // answered already (read and dropped), begin before `first`
};

/// The head of a frame sent to a worker or rank.
struct task_header {
  std::uint64_t handler;  // token of the code that runs the chunk
  std::uint64_t call;
  std::uint64_t first;
  std::uint32_t count;
  frame_kind kind;
};

/// Writes a task header at `at`, field by field: a header built on the stack
/// and copied whole was read back (16 bytes at once) before its narrower
/// stores had left the store buffer, a stall in every chunk the parent cut.
inline void write_task_header(std::byte* at, std::uint64_t handler, std::uint64_t call,
                              std::uint64_t first, std::uint32_t count, frame_kind kind) noexcept {
  std::memcpy(at + offsetof(task_header, handler), &handler, sizeof handler);
  std::memcpy(at + offsetof(task_header, call), &call, sizeof call);
  std::memcpy(at + offsetof(task_header, first), &first, sizeof first);
  std::memcpy(at + offsetof(task_header, count), &count, sizeof count);
  std::memcpy(at + offsetof(task_header, kind), &kind, sizeof kind);
}

/// The head of a frame sent back.
struct result_header {
  std::uint64_t call;
  std::uint64_t first;
  std::uint32_t count;  // results that follow
  frame_kind kind;
};

/// Writes the result header at the front of `out` (space reserved by the caller).
inline void patch_result_header(writer& out, const result_header& h) noexcept {
  std::memcpy(out.data(), &h, sizeof h);
}

/// The type name and message of the exception being handled.
inline std::pair<std::string, std::string> describe_current_exception() {
  std::string type = "unknown exception";
  if (auto* t = abi::__cxa_current_exception_type()) type = demangle(t->name());
  try {
    throw;
  } catch (const std::exception& e) {
    return {type, e.what()};
  } catch (...) {
    return {type, "(not derived from std::exception)"};
  }
}

/// Appends an error's tail to a result frame: the failing index, the type
/// name and message, and the exception object (`std::optional`: present
/// when its type's codec is registered, see `task_error::original`).
inline void encode_failure_tail(writer& out, std::uint64_t index, const std::string& type,
                                const std::string& message, const exception_object* original) {
  encode(out, index);
  encode(out, type);
  encode(out, message);
  encode(out, original != nullptr);
  if (original != nullptr) encode(out, *original);
}

/// Appends the tail of the exception being handled (`encode_failure_tail`).
/// Called inside a `catch` block only.
inline void encode_current_failure(writer& out, std::uint64_t index) {
  auto [type, message] = describe_current_exception();
  auto original = encode_current_exception_object();
  encode_failure_tail(out, index, type, message, original ? &*original : nullptr);
}

/// Reads the exception object that follows an error tail's message (see
/// `encode_failure_tail`); null when the worker sent none.
/// **Throws:** `decode_error` for bytes that are not such an object.
inline std::shared_ptr<const exception_object> decode_original(reader& in) {
  if (!decode<bool>(in)) return nullptr;
  return std::make_shared<const exception_object>(decode<exception_object>(in));
}

/// The big results of an answer that stay in the values its worker made,
/// instead of being copied into the answer's own bytes: the answer goes out
/// from its bytes and from those values, each copied once, into the ring.
/// The mirror of `frame_refs` in task frames, for answers: `run_items`
/// lists a result here when it is an array of plain values or a string of at
/// least `frame_refs::min_bytes` (the function returned it by value), and
/// keeps the value until `clear()`.
class answer_blocks {
 public:
  answer_blocks() { kept_.reserve(frame_refs::capacity); }

  /// The blocks listed, in the answer's order.
  const frame_refs& refs() const noexcept { return refs_; }
  /// Whether a result of `size` bytes would be listed (there is room in the list).
  bool takes(std::size_t size) const noexcept { return refs_.takes(size); }

  /// Keeps `value` and lists its bytes as the block after its count, which
  /// it appends to `out`. `out` stops writing in place first: the bytes
  /// after a block are not where they would be in a contiguous answer.
  /// **Throws:** what allocating does; nothing is listed then.
  template <class R>
  void keep(writer& out, R&& value) {
    auto kept = std::make_shared<std::decay_t<R>>(std::forward<R>(value));
    auto [data, size] = bulk_bytes(*kept);
    out.keep_in_own();
    write_count(out, kept->size());
    kept_.push_back(std::move(kept));  // reserved: does not throw
    refs_.add(out.size(), data, size);
  }

  /// Forgets the blocks and frees the values they were in.
  void clear() noexcept {
    refs_.clear();
    kept_.clear();
  }

 private:
  frame_refs refs_;
  std::vector<std::shared_ptr<void>> kept_;
};

/// Where a worker sends the results of a chunk so far when its answer
/// outgrows the memory it is written in (a fork worker's: the free room of
/// its result ring, `writer::write_in_place` with no way out), so that
/// every result is written once, straight into the ring.
class answer_parts {
 public:
  /// With results in `h` (a `part`, its header still to be written at the
  /// front of `out`): sends them as a frame of their own, then starts `out`
  /// again, empty, in the room left, or in a buffer of its own when little
  /// is left. With none: starts `out` again in more room than it had, when
  /// there is more now. After either, `out` holds a placeholder for the
  /// next frame's header. False, and `out` unchanged, when there is no
  /// more room now. It does not wait for room: the worker goes on with its
  /// items.
  virtual bool flush(writer& out, const result_header& h) = 0;

  /// How to encode one result, whatever its type: `encode(out, value)`.
  struct result_encoder {
    const void* value;
    void (*encode)(writer& out, const void* value);

    template <class R>
    static result_encoder of(const R& r) noexcept {
      return {std::addressof(r),
              [](writer& out, const void* v) { procpool::encode(out, *static_cast<const R*>(v)); }};
    }
  };

  /// A result that does not fit the most room there is now, with nothing
  /// before it in its frame (`out` holds only the placeholder for the
  /// header): when it is longer than the most room there can ever be, sends
  /// it as a frame of its own (`h`: its index, one result, and the kind),
  /// encoded once, straight where it goes (it is sized first, then streamed
  /// as room is made), and starts `out` again as `flush` does. False, with
  /// nothing sent and `out` unchanged, for a result that would fit. It throws
  /// what sizing the result throws, with nothing sent.
  virtual bool send_alone(writer& out, const result_header& h, result_encoder e) = 0;

 protected:
  answer_parts() = default;
  answer_parts(const answer_parts&) = default;
  answer_parts& operator=(const answer_parts&) = default;
  ~answer_parts() = default;
};

/// Runs the `count` items of a chunk, from item `first` of call `call`:
/// decodes each from `in`, calls `f` through `Invoke`, encodes the result
/// into `out`. `before(index)` runs before each item and stops the chunk
/// (a `skipped` answer) by returning false. An exception from an item (its
/// decoding, the call, the result's encoding) ends the chunk: the results
/// before it stay, a result it half-encoded is cut off, and its index, type
/// and message follow (an `error` answer). Returns the answer's header;
/// the caller reserved its place at the front of `out`.
///
/// Items and results whose encoding is their object bytes (numbers, plain
/// structs of them) take a loop with no per-item encoding: the results go
/// straight into room made once for the chunk. What an item sees is the same:
/// `before` runs before it, and an exception keeps the results before it.
///
/// With `blocks`, a big array or string the function returns by value is
/// kept there rather than copied into `out` (see `answer_blocks`): the
/// answer is then `out` with those blocks between its bytes.
///
/// With `parts`, `out` may be memory that cannot grow (it throws
/// `writer::full`): when a result does not fit, the results before it go
/// out as a `part` (`answer_parts::flush`) and it is encoded again in the
/// room made; the header returned is then the last frame's, from its first
/// item. A result that does not fit the most room there is now goes on in
/// the writer's own buffer, with the rest of the chunk; one longer than the
/// most room there can be goes alone (`answer_parts::send_alone`), and the
/// chunk's next results start a frame again (none, when it was the last:
/// the chunk's answer is then sent).
template <class Item, class Invoke, class F, class Before>
result_header run_items(F& f, reader& in, std::uint64_t call, std::uint64_t first,
                        std::uint32_t count, writer& out, Before&& before,
                        answer_blocks* blocks = nullptr, answer_parts* parts = nullptr) {
  result_header h{call, first, 0, frame_kind::results};  // the frame being written
  std::uint32_t done = 0;                                // items run, in every frame
  std::size_t mark = out.size();
  using R =
      std::remove_cv_t<std::remove_reference_t<decltype(Invoke::call(f, std::declval<Item&>()))>>;
  // `out` is full: the frame's results so far go out and it starts again;
  // with none, it starts again in more room; with no more room to be had,
  // it goes on in its own buffer.
  auto make_room = [&] {
    result_header sent = h;
    if (h.count > 0) sent.kind = frame_kind::part;
    if (parts && parts->flush(out, sent)) {
      h.first += h.count;
      h.count = 0;
      mark = out.size();
    } else {
      out.allow_spill();
    }
  };
  try {
    if constexpr (is_trivially_sendable_v<Item> && is_trivially_sendable_v<R> &&
                  std::is_default_constructible_v<Item>) {
      // Items short of `count` (a lying frame) are left to the loop below,
      // whose decoding fails on the first of them.
      // Items of a streamed chunk beyond those at hand take that loop too.
      std::size_t n = std::min<std::size_t>(count, in.at_hand() / sizeof(Item));
      while (done < n) {
        std::size_t m = n - done;
        if (out.bounded()) m = std::min(m, out.spare() / sizeof(R));
        if (m == 0) {
          make_room();
          continue;
        }
        const std::byte* src = in.here();
        std::byte* dst = out.prepare(m * sizeof(R));
        // Counted in a local, not in `h`: the result bytes written through
        // `dst` may alias anything in memory, `h` included, which kept the
        // count going back to memory at every item.
        std::size_t k = 0;
        const std::uint64_t at = first + done;
        bool stopped = false;
        try {
          for (; k < m; ++k) {
            if (!before(at + k)) {
              stopped = true;
              break;
            }
            Item item;
            std::memcpy(static_cast<void*>(&item), src + k * sizeof(Item), sizeof(Item));
            auto&& r = Invoke::call(f, item);
            std::memcpy(dst + k * sizeof(R), std::addressof(r), sizeof(R));
          }
        } catch (...) {
          h.count += static_cast<std::uint32_t>(k);
          done += static_cast<std::uint32_t>(k);
          out.commit(k * sizeof(R));
          mark = out.size();
          in.take(k * sizeof(Item));
          throw;
        }
        h.count += static_cast<std::uint32_t>(k);
        done += static_cast<std::uint32_t>(k);
        out.commit(k * sizeof(R));
        in.take(k * sizeof(Item));
        if (stopped) {
          h.kind = frame_kind::skipped;
          return h;
        }
      }
    }
    for (; done < count; ++done) {
      if (!before(first + done)) {
        h.kind = frame_kind::skipped;
        break;
      }
      mark = out.size();
      auto item = decode<Item>(in);
      decltype(auto) r = Invoke::call(f, item);
      if constexpr (bulk_codec<R>() &&
                    !std::is_reference_v<decltype(Invoke::call(f, std::declval<Item&>()))>) {
        if (blocks && blocks->takes(bulk_bytes(r).second)) {
          blocks->keep(out, std::move(r));
          ++h.count;
          continue;
        }
      }
      (void)blocks;
      bool alone = false;
      for (;;) {
        try {
          encode(out, r);
          if (!out.overflowed()) break;  // (an encoder that caught `full` wrote a part of it)
        } catch (const writer::full&) {
        }
        out.resize(mark);
        if (parts && h.count == 0 && out.bounded()) {
          // Alone in its frame and still too long: more room, or a frame
          // of its own when it is longer than any room can be.
          if (parts->flush(out, h)) {
            mark = out.size();
            continue;
          }
          const result_header one{call, h.first, 1,
                                  done + 1 == count ? frame_kind::results : frame_kind::part};
          if (parts->send_alone(out, one, answer_parts::result_encoder::of(r))) {
            alone = true;
            break;
          }
        }
        make_room();
      }
      if (alone) {
        h.first += 1;
        mark = out.size();
      } else {
        ++h.count;
      }
    }
  } catch (...) {
    h.kind = frame_kind::error;
    out.resize(mark);
    out.allow_spill();  // the failure is written whole, wherever that is
    encode_current_failure(out, first + done);
  }
  return h;
}

/// Hands a result frame to its call: the results it carries, then, for an
/// error frame, the failure `failure(index, type, message)` makes from the
/// failing index, type name and message that follow (anything after them is
/// left in `in` for the caller). A frame that cannot be decoded fails the call
/// at its first item, whatever the decoder threw: a `decode_error` as it is,
/// anything else as a `decode_error` naming its type and `what()`. Never
/// throws, but for `reader_source::cut` from a streamed reader whose bytes
/// stopped coming (results it delivered before are delivered again by the
/// chunk's next answer). A cancelled call takes nothing.
template <class MakeFailure>
void deliver_frame(call_state& call, const result_header& h, reader& in, MakeFailure&& failure) {
  if (call.cancelled) return;
  try {
    try {
      if (h.count > 0) call.on_results(h.first, h.count, in);
      if (h.kind == frame_kind::error) {
        auto index = decode<std::uint64_t>(in);
        auto type = decode<std::string>(in);
        auto message = decode<std::string>(in);
        call.fail(index, failure(index, std::move(type), std::move(message)));
      }
    } catch (const decode_error&) {
      call.fail(h.first, std::current_exception());
    } catch (const reader_source::cut&) {
      throw;
    } catch (...) {
      auto [type, message] = describe_current_exception();
      call.fail(h.first, std::make_exception_ptr(decode_error(
                             in.offset(), fmt::format("the results of items {} to {} could not be "
                                                      "decoded: the decoder threw {}: {}",
                                                      h.first, h.first + h.count, type, message))));
    }
  } catch (const reader_source::cut&) {
    throw;
  } catch (...) {
    // Not even the failure could be made (out of memory): the call ends anyway.
    call.abort(std::current_exception());
  }
}

}  // namespace procpool::detail
