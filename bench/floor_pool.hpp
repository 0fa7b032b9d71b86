// The floor: the least a fork + shared-memory process pool can do to map a
// function over trivially copyable items, to measure procpool against. No
// encoding and no safety: a worker that crashes or hangs hangs the caller,
// nothing times out, and nothing is checked but what the benchmark checks.
//
// Shared memory, one anonymous MAP_SHARED mapping made before the fork:
//   control  the claim word, the done counter, the wake-up words, the call's
//            parameters, each on its own cache line
//   input    capacity items of In: the parent copies a call's input here
//   output   capacity items of Out: the workers write the results here
//
// A call: one memcpy of the input in; the parent publishes the call in the
// claim word (chunk count in the high 32 bits, next chunk index in the low
// 32) and bumps the generation word; the workers take chunk indices with
// fetch_add and compute f(input[i]) into output[i]; the worker that finishes
// the last chunk wakes the parent; one memcpy of the results out. The parent
// computes nothing, as procpool's parent does not.
//
// Waiting: the parent spins for up to 20 µs on the done counter, then sleeps
// on it (procpool's parent does the same). An idle worker spins for up to
// 2 µs on the generation word, then sleeps on it; procpool's workers spin
// as long (pool_options::worker_spin). Those 2 µs cost an idle worker almost
// nothing and let a call that follows the last one at once (a loop of round
// trips) find its worker awake: on this kind of VM a futex wake-up costs
// several microseconds, and a floor that paid one per round trip would not
// be the least a pool can do. A futex wake is made only when a call needs
// more workers than are awake.
#pragma once

#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace floor_bench {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// A pool of `workers` forked processes mapping `F` over `In` items, at most
/// `capacity` items per call. Neither copyable nor movable.
template <class F, class In>
class pool {
 public:
  using Out = std::invoke_result_t<F&, const In&>;
  static_assert(std::is_trivially_copyable_v<In> && std::is_trivially_copyable_v<Out>,
                "the floor copies items as bytes: In and Out must be trivially copyable");

  pool(F f, unsigned workers, std::size_t capacity) : f_(f), capacity_(capacity) {
    bytes_ = sizeof(control) + capacity * (sizeof(In) + sizeof(Out));
    void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    ctl_ = new (p) control{};
    in_ = reinterpret_cast<In*>(static_cast<char*>(p) + sizeof(control));
    out_ = reinterpret_cast<Out*>(in_ + capacity);
    std::fflush(nullptr);
    for (unsigned w = 0; w < workers; ++w) {
      pid_t pid = ::fork();
      if (pid < 0) throw std::system_error(errno, std::generic_category(), "fork");
      if (pid == 0) serve();  // never returns
      pids_.push_back(pid);
    }
  }
  ~pool() {
    ctl_->stop.store(1);
    ctl_->generation.fetch_add(1);
    futex(&ctl_->generation, FUTEX_WAKE, INT_MAX);
    for (pid_t pid : pids_)
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    ::munmap(ctl_, bytes_);
  }
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;

  /// f over `in`, into a new vector; `chunk` 0 is Python's ceil(n / (4 * workers)).
  std::vector<Out> map(const std::vector<In>& in, std::size_t chunk = 0) {
    std::vector<Out> out(in.size());
    run(in.data(), in.size(), out.data(), chunk);
    return out;
  }
  /// f over `in`, into `out`, resized to `in.size()` (no allocation once it is).
  void map_into(const std::vector<In>& in, std::vector<Out>& out, std::size_t chunk = 0) {
    out.resize(in.size());
    run(in.data(), in.size(), out.data(), chunk);
  }
  /// f(x) on one worker: a round trip.
  Out call(const In& x) {
    Out y{};
    run(&x, 1, &y, 1);
    return y;
  }
  /// The workers' process ids.
  const std::vector<pid_t>& pids() const { return pids_; }
  /// How many workers there are.
  std::uint32_t workers() const { return static_cast<std::uint32_t>(pids_.size()); }

 private:
  static constexpr std::chrono::microseconds parent_spin{20}, worker_spin{2};

  struct control {
    alignas(64) std::atomic<std::uint64_t> claim{0};  // chunks << 32 | next chunk index
    alignas(64) std::atomic<std::uint32_t> done{0};   // chunks finished in this call
    std::atomic<std::uint32_t> parent_asleep{0};
    alignas(64) std::atomic<std::uint32_t> generation{0};  // bumped for each call
    std::atomic<std::uint32_t> workers_asleep{0};
    std::atomic<std::uint32_t> stop{0};
    alignas(64) std::size_t n = 0, chunk = 1;  // written only while no call runs
  };

  static long futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t value) {
    return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, value, nullptr, nullptr,
                     0);
  }

  void run(const In* in, std::size_t n, Out* out, std::size_t chunk) {
    if (n > capacity_) throw std::length_error("floor_bench::pool: more items than its capacity");
    if (n == 0) return;
    std::size_t parts = 4 * std::size_t(workers());
    if (chunk == 0) chunk = std::max<std::size_t>(1, (n + parts - 1) / parts);
    auto chunks = static_cast<std::uint32_t>((n + chunk - 1) / chunk);
    std::memcpy(static_cast<void*>(in_), in, n * sizeof(In));
    ctl_->n = n;
    ctl_->chunk = chunk;
    ctl_->done.store(0, std::memory_order_relaxed);
    ctl_->claim.store(std::uint64_t(chunks) << 32, std::memory_order_release);
    // A worker not yet asleep sees the new generation before it sleeps: wake
    // only as many sleepers as the chunks need beyond the workers awake.
    ctl_->generation.fetch_add(1);
    std::uint32_t awake = workers() - ctl_->workers_asleep.load();
    std::uint32_t wanted = std::min(chunks, workers());
    if (wanted > awake) futex(&ctl_->generation, FUTEX_WAKE, wanted - awake);
    auto finished = [&] { return ctl_->done.load(std::memory_order_acquire) == chunks; };
    auto spin_end = std::chrono::steady_clock::now() + parent_spin;
    for (unsigned i = 1; !finished(); ++i) {
      cpu_relax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() >= spin_end) {
        ctl_->parent_asleep.store(1);
        for (std::uint32_t d; (d = ctl_->done.load()) != chunks;) futex(&ctl_->done, FUTEX_WAIT, d);
        ctl_->parent_asleep.store(0);
      }
    }
    std::memcpy(static_cast<void*>(out), out_, n * sizeof(Out));
  }

  [[noreturn]] void serve() {
    std::uint32_t seen = ctl_->generation.load();
    for (;;) {
      // A claim whose index is below its chunk count belongs to the current
      // call, which cannot end before that chunk is done: n and chunk hold.
      for (;;) {
        std::uint64_t c = ctl_->claim.fetch_add(1, std::memory_order_acq_rel);
        auto index = static_cast<std::uint32_t>(c), chunks = static_cast<std::uint32_t>(c >> 32);
        if (index >= chunks) break;
        std::size_t b = index * ctl_->chunk, e = std::min(ctl_->n, b + ctl_->chunk);
        for (std::size_t i = b; i < e; ++i) out_[i] = f_(in_[i]);
        if (ctl_->done.fetch_add(1) + 1 == chunks && ctl_->parent_asleep.load())
          futex(&ctl_->done, FUTEX_WAKE, 1);
      }
      auto spin_end = std::chrono::steady_clock::now() + worker_spin;
      for (unsigned i = 1; ctl_->generation.load(std::memory_order_relaxed) == seen; ++i) {
        cpu_relax();
        if (i % 8 == 0 && std::chrono::steady_clock::now() >= spin_end) break;
      }
      ctl_->workers_asleep.fetch_add(1);
      if (ctl_->generation.load() == seen && !ctl_->stop.load())
        futex(&ctl_->generation, FUTEX_WAIT, seen);
      ctl_->workers_asleep.fetch_sub(1);
      if (ctl_->stop.load()) ::_exit(0);
      seen = ctl_->generation.load();
    }
  }

  F f_;
  std::size_t capacity_, bytes_ = 0;
  control* ctl_ = nullptr;
  In* in_ = nullptr;
  Out* out_ = nullptr;
  std::vector<pid_t> pids_;
};

/// `pool p(f, ...)` for a lambda `f` of one argument: In is that argument's type.
template <class M>
struct argument_of;
template <class C, class R, class A>
struct argument_of<R (C::*)(A) const> {
  using type = std::decay_t<A>;
};
template <class F>
pool(F, unsigned, std::size_t) -> pool<F, typename argument_of<decltype(&F::operator())>::type>;

}  // namespace floor_bench
