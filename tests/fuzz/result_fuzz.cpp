// libFuzzer target for the parent's side of the pool protocol: a worker that
// writes whatever the fuzzer says into its result ring. Run it with
// `scripts/fuzz --target result`.
//
// Each input makes a one-worker engine whose real worker never touches its
// rings (its initializer blocks), so the harness plays the worker: it writes frames into
// the worker's result ring (well-formed answers, answers with one field
// changed, raw messages, raw bytes with lying length prefixes) and lets the
// engine drive between writes. After every write the engine must refuse a
// bad frame by killing and replacing the worker, take a good one, and never
// read or write outside its buffers (ASan), hang, or throw anything but
// procpool::error. When the input ends, the harness answers honestly; the
// call must end (results or an error), and a second call, answered
// honestly, must return exactly the right results: the pool goes on.
//
// An input is two setup bytes (items 1..32, chunk size 1..4), then
// operations, one byte each (low 3 bits: which; the rest, an argument):
//
//   0 answer     an honest answer to the chunk the worker owes
//   1 mutate a   that answer with field a % 8 changed by the next 8 bytes:
//                kind, call, first, count, one result's bytes cut, bytes
//                appended, the length prefix (off by under 64 KiB), the kind
//                set to init_failed
//   2 message n  a length-prefixed message of the next n bytes
//   3 raw n      the next n bytes as they are, prefix or not
//   4 drive      the engine sends and collects once
//   5 error a    an error frame after a % 4 results, honest or not (a & 4)
//   6 skipped a  a "skipped" frame with a % 4 results
//   7 part a     a part of the answer: its first a % 4 results (none, or the
//                whole chunk: lies); the chunk goes on past an honest one
#include <procpool/detail/engine/fork_engine.hpp>
#include <procpool/errors.hpp>
#include <procpool/pool.hpp>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <system_error>
#include <vector>

namespace procpool::detail {

/// The harness's view of the engine (declared by detail/engine/fork_engine.hpp).
struct engine_probe {
  struct owed {
    std::uint64_t call, first;
    std::uint32_t count;
  };
  /// The chunk worker 0 owes an answer for, if it was sent whole.
  static bool front(engine& e, owed& out) {
    auto& w = e.workers_[0];
    if (w.pid == 0 || w.inflight.empty()) return false;
    auto& c = w.inflight.front();
    if (c.sent != c.size()) return false;
    out = {c.call_id, c.first, c.count};
    return true;
  }
  static ring_control* result_ring(engine& e) { return e.workers_[0].result; }
  /// The result ring's bytes when they are mirrored, else null (see `ring_writer`).
  static std::byte* result_bytes(engine& e) { return e.workers_[0].result_bytes; }
  static eventcount* doorbell(engine& e) { return &e.shared_->doorbell; }
  static bool alive(engine& e) { return e.workers_[0].pid != 0; }
};

}  // namespace procpool::detail

namespace {

namespace pd = procpool::detail;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "result_fuzz: %s\n", what);
  std::abort();
}

int never_runs(int x) {
  return x;
}

using map_t = pd::map_call<int (*)(int), pd::local_handlers, int, pd::invoke_one,
                           std::vector<int>::const_iterator, std::vector<int>::const_iterator, int>;

/// Reads the input front to back; zeros past its end.
struct input {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t at = 0;
  bool empty() const { return at >= size; }
  std::uint8_t byte() { return at < size ? data[at++] : 0; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v |= std::uint64_t(byte()) << (8 * k);
    return v;
  }
};

class harness {
 public:
  harness() {
    pd::engine_config c;
    c.workers = 1;
    c.ring_bytes = 4096;
    c.function = &f_;
    // The worker never touches its rings: the harness alone writes the
    // result ring, as a worker does (a ring has one writer). A worker that
    // ran would write its answer's header in place in the ring's free room,
    // over the frames the harness had put there.
    c.initializer = [] {
      for (;;) ::pause();
    };
    c.parent_wait = pd::wait_policy{std::chrono::nanoseconds(0), std::chrono::milliseconds(1)};
    c.stop_grace = std::chrono::milliseconds(50);
    engine_ = std::make_shared<pd::engine>(std::move(c));
  }
  ~harness() { engine_->terminate(); }

  /// Starts a map of `n` items in chunks of `chunk`.
  std::shared_ptr<map_t> start(std::size_t n, std::size_t chunk) {
    items_.resize(n);
    for (std::size_t i = 0; i < n; ++i) items_[i] = static_cast<int>(i) + 1;
    results_.assign(n, 0);
    auto call = std::make_shared<map_t>(items_.cbegin(), items_.cend(), items_.data(), n, chunk,
                                        engine_->chunk_bytes(), results_.data(),
                                        pd::progress_reporter(false, {}, n));
    engine_->start(call);
    return call;
  }

  /// Sends and collects once; false when the engine refused to go on.
  bool drive(const std::shared_ptr<map_t>& call) {
    try {
      engine_->drive_until([&] { return call->finished(); }, pd::steady::now());
      return true;
    } catch (const procpool::error&) {
      broken = true;  // the pool broke (a worker's word that its initializer failed)
      return false;
    } catch (const std::system_error&) {
      broken = true;  // no replacement could be forked
      return false;
    }
  }

  bool broken = false;

  /// The honest answer to the chunk owed, or nothing.
  bool honest(std::vector<std::byte>& frame, pd::result_header& h) {
    pd::engine_probe::owed o;
    if (!pd::engine_probe::front(*engine_, o)) return false;
    h = pd::result_header{o.call, o.first, o.count, pd::frame_kind::results};
    procpool::writer out;
    out.write(&h, sizeof h);
    for (std::uint32_t k = 0; k < o.count; ++k)
      procpool::encode(out, result_of(static_cast<std::size_t>(o.first + k)));
    frame.assign(out.data(), out.data() + out.size());
    return true;
  }

  /// Writes `bytes` into the result ring as they are, as far as they fit.
  void write_raw(const std::byte* bytes, std::size_t n) {
    if (!pd::engine_probe::alive(*engine_)) return;
    pd::ring_writer w(pd::engine_probe::result_ring(*engine_), pd::engine_probe::doorbell(*engine_),
                      pd::engine_probe::result_bytes(*engine_));
    n = std::min(n, w.free_space());
    w.put(bytes, n);
    w.publish();
  }

  /// Writes one length-prefixed message, if it fits whole.
  void write_message(const std::vector<std::byte>& body) {
    if (!pd::engine_probe::alive(*engine_)) return;
    pd::ring_writer w(pd::engine_probe::result_ring(*engine_), pd::engine_probe::doorbell(*engine_),
                      pd::engine_probe::result_bytes(*engine_));
    if (w.free_space() < body.size() + 8) return;
    std::uint64_t size = body.size();
    w.put(&size, sizeof size);
    w.put(body.data(), body.size());
    w.publish();
  }

  int result_of(std::size_t index) const { return items_[index] * 7; }
  const std::vector<int>& results() const { return results_; }

 private:
  int (*f_)(int) = never_runs;  // its worker blocks before any item
  std::shared_ptr<pd::engine> engine_;
  std::vector<int> items_;
  std::vector<int> results_;
};

/// Answers honestly until `call` ends; false if it never does.
bool finish(harness& h, const std::shared_ptr<map_t>& call) {
  for (int step = 0; step < 2000 && !call->finished(); ++step) {
    std::vector<std::byte> frame;
    pd::result_header hdr;
    if (h.honest(frame, hdr)) h.write_message(frame);
    if (!h.drive(call)) return true;  // broken: ends every call
  }
  return call->finished();
}

void run(input& in) {
  std::size_t n = 1 + in.byte() % 32;
  std::size_t chunk = 1 + in.byte() % 4;
  harness h;
  auto call = h.start(n, chunk);
  if (!h.drive(call)) return;
  int writes = 0;
  while (!in.empty() && writes < 12 && !call->finished()) {
    std::uint8_t op = in.byte();
    unsigned a = op >> 3;
    std::vector<std::byte> frame;
    pd::result_header hdr;
    switch (op & 7) {
      case 0:
        if (h.honest(frame, hdr)) h.write_message(frame);
        break;
      case 1: {
        std::uint64_t v = in.u64();
        if (!h.honest(frame, hdr)) break;
        switch (a % 8) {
          case 0:
            hdr.kind = static_cast<pd::frame_kind>(v & 0xffffffff);
            break;
          case 1:
            hdr.call += v;
            break;
          case 2:
            hdr.first += v;
            break;
          case 3:
            hdr.count = static_cast<std::uint32_t>(hdr.count + v);
            break;
          case 4:
            frame.resize(frame.size() - std::min<std::size_t>(frame.size() - sizeof hdr, v % 8));
            break;
          case 5:
            for (std::uint64_t k = 0; k < v % 16; ++k) frame.push_back(std::byte(k));
            break;
          case 6: {
            // A prefix that lies, by at most 64 KiB: the honest answers
            // written later fill a frame that promised more, and the engine
            // must refuse it once it is whole. (A promise of more than will
            // ever come is waited for like a slow worker: no oracle here.)
            std::uint64_t size = v % 65536;
            h.write_raw(reinterpret_cast<const std::byte*>(&size), sizeof size);
            h.write_raw(frame.data(), frame.size());
            ++writes;
            continue;
          }
          case 7:
            hdr = pd::result_header{v & 1, 0, 0, pd::frame_kind::init_failed};
            break;
        }
        if (a % 8 < 4 || a % 8 == 7) std::memcpy(frame.data(), &hdr, sizeof hdr);
        h.write_message(frame);
        ++writes;
        break;
      }
      case 2:
      case 3: {
        std::size_t len = in.byte();
        std::vector<std::byte> bytes;
        while (bytes.size() < len && !in.empty()) bytes.push_back(std::byte(in.byte()));
        if ((op & 7) == 2)
          h.write_message(bytes);
        else
          h.write_raw(bytes.data(), bytes.size());
        ++writes;
        break;
      }
      case 5:
      case 6: {
        if (!h.honest(frame, hdr)) break;
        std::uint32_t done = std::min<std::uint32_t>(a % 4, hdr.count);
        hdr.kind = (op & 7) == 5 ? pd::frame_kind::error : pd::frame_kind::skipped;
        hdr.count = done;
        frame.resize(sizeof hdr + done * sizeof(int));
        std::memcpy(frame.data(), &hdr, sizeof hdr);
        if ((op & 7) == 5) {
          procpool::writer tail;
          procpool::encode(tail, std::uint64_t(hdr.first + done + ((a & 4) ? 1 : 0)));
          procpool::encode(tail, std::string("std::runtime_error"));
          procpool::encode(tail, std::string("from the fuzzer"));
          procpool::encode(tail, false);  // no exception object
          frame.insert(frame.end(), tail.data(), tail.data() + tail.size());
        }
        h.write_message(frame);
        ++writes;
        break;
      }
      case 7: {
        if (!h.honest(frame, hdr)) break;
        std::uint32_t done = std::min<std::uint32_t>(a % 4, hdr.count);
        hdr.kind = pd::frame_kind::part;
        hdr.count = done;
        frame.resize(sizeof hdr + done * sizeof(int));
        std::memcpy(frame.data(), &hdr, sizeof hdr);
        h.write_message(frame);
        ++writes;
        break;
      }
      default:
        break;
    }
    if (!h.drive(call)) return;
  }
  if (!finish(h, call)) fail("a call never ended although every later answer was honest");
  if (h.broken) return;  // a broken pool refuses every call: nothing more to check
  // The pool goes on: a fresh call, answered honestly, returns exactly the right results.
  auto next = h.start(n, chunk);
  if (!finish(h, next)) fail("a second call never ended");
  if (h.broken) fail("the pool broke on honest answers");
  if (next->failed()) {
    try {
      next->rethrow_if_failed();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "result_fuzz: the second call failed at item %llu: %s\n",
                   static_cast<unsigned long long>(next->error_index()), e.what());
    }
    fail("a second call, answered honestly, failed");
  }
  for (std::size_t i = 0; i < n; ++i)
    if (h.results()[i] != h.result_of(i)) fail("a second call returned a wrong result");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  input in{data, size};
  run(in);
  return 0;
}
