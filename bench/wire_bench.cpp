// Moving bytes between two processes: round-trip latency of procpool's pipe
// and queue beside the alternatives a program could use instead (an OS pipe,
// Boost.Interprocess's message_queue, a bare futex), and the throughput of
// large messages beside memcpy, all measured in one run on one machine.
//
// Every number sent is checked when it comes back, and every large message
// is checked on arrival: a wrong answer fails the benchmark (exit code 1).
//
// Usage: wire_bench [round trips per case, default 20000]
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>
#include <procpool/detail/os/fork.hpp>
#include <procpool/detail/os/sys.hpp>
#include <procpool/detail/transport/futex.hpp>
#include <procpool/detail/transport/shm.hpp>
#include <procpool/pipe.hpp>
#include <procpool/queue.hpp>

#include <algorithm>
#include <atomic>
#include <boost/interprocess/ipc/message_queue.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
namespace detail = procpool::detail;

[[noreturn]] void fail(const std::string& what) {
  fmt::print(stderr, "wire_bench: FAILED: {}\n", what);
  std::exit(1);
}

/// Forks a child running `f`; it exits 0, or 1 if `f` throws.
pid_t spawn(const std::function<void()>& f) {
  pid_t pid = detail::fork_process();
  if (pid == 0) {
    int code = 0;
    try {
      f();
    } catch (const std::exception& e) {
      fmt::print(stderr, "wire_bench: child: {}\n", e.what());
      code = 1;
    }
    detail::exit_child(code);
  }
  return pid;
}

void reap(pid_t pid, const char* what) {
  int status = 0;
  detail::sys::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail(fmt::format("{}: child failed", what));
}

struct latency {
  double median_us = 0, p99_us = 0;
};

/// Times `n` calls of `round_trip(i)` (after a warm-up) and returns the
/// median and 99th percentile. `round_trip` returns what came back for `i`;
/// anything but `i + 1` fails the benchmark.
template <class F>
latency measure(const char* name, int n, F&& round_trip) {
  for (int i = 0; i < n / 10; ++i)
    if (round_trip(i) != i + 1) fail(fmt::format("{}: wrong answer in warm-up", name));
  std::vector<double> us(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    auto start = clock_type::now();
    int back = round_trip(i);
    us[static_cast<std::size_t>(i)] =
        std::chrono::duration<double, std::micro>(clock_type::now() - start).count();
    if (back != i + 1) fail(fmt::format("{}: sent {}, got back {}", name, i, back));
  }
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 99 / 100]};
}

void print_latency(const char* name, latency l) {
  fmt::print("  {:<48} {:>9.2f} {:>9.2f}\n", name, l.median_us, l.p99_us);
}

/// Ends every echo server: a value no round trip sends.
constexpr int stop = -1;

latency bench_pipe(const char* name, int n, std::chrono::nanoseconds spin) {
  auto [a, b] = procpool::pipe<int>();
  a.set_spin(spin);
  b.set_spin(spin);
  pid_t child = spawn([&b = b] {
    for (int v; (v = b.recv()) != stop;) b.send(v + 1);
  });
  auto l = measure(name, n, [&a = a](int i) {
    a.send(i);
    return a.recv();
  });
  a.send(stop);
  reap(child, name);
  return l;
}

latency bench_queue(const char* name, int n) {
  procpool::queue<int> there(4096), back(4096);
  pid_t child = spawn([&] {
    for (int v; (v = there.pop()) != stop;) back.push(v + 1);
  });
  auto l = measure(name, n, [&](int i) {
    there.push(i);
    return back.pop();
  });
  there.push(stop);
  reap(child, name);
  return l;
}

latency bench_os_pipe(const char* name, int n) {
  auto [there_r, there_w] = detail::sys::make_pipe();
  auto [back_r, back_w] = detail::sys::make_pipe();
  auto read_int = [](int fd) {
    int v = 0;
    std::size_t got = 0;
    while (got < sizeof v) {
      std::size_t k = detail::sys::read_some(fd, reinterpret_cast<char*>(&v) + got, sizeof v - got);
      if (k == 0) fail("OS pipe: end of file");
      got += k;
    }
    return v;
  };
  // Plain descriptors: lambdas cannot capture structured bindings before C++20.
  int from_parent = there_r.get(), to_parent = back_w.get();
  int to_child = there_w.get(), from_child = back_r.get();
  pid_t child = spawn([&] {
    for (int v; (v = read_int(from_parent)) != stop;) {
      ++v;
      detail::sys::write_all(to_parent, &v, sizeof v);
    }
  });
  auto l = measure(name, n, [&](int i) {
    detail::sys::write_all(to_child, &i, sizeof i);
    return read_int(from_child);
  });
  detail::sys::write_all(to_child, &stop, sizeof stop);
  reap(child, name);
  return l;
}

latency bench_boost_mq(const char* name, int n) {
  namespace bip = boost::interprocess;
  std::string there_name = fmt::format("procpool_wire_bench_{}_there", ::getpid());
  std::string back_name = fmt::format("procpool_wire_bench_{}_back", ::getpid());
  bip::message_queue::remove(there_name.c_str());
  bip::message_queue::remove(back_name.c_str());
  latency l;
  {
    bip::message_queue there(bip::create_only, there_name.c_str(), 64, sizeof(int));
    bip::message_queue back(bip::create_only, back_name.c_str(), 64, sizeof(int));
    auto receive = [](bip::message_queue& q) {
      int v = 0;
      bip::message_queue::size_type size = 0;
      unsigned priority = 0;
      q.receive(&v, sizeof v, size, priority);
      if (size != sizeof v) fail("message_queue: short message");
      return v;
    };
    pid_t child = spawn([&] {
      for (int v; (v = receive(there)) != stop;) {
        ++v;
        back.send(&v, sizeof v, 0);
      }
    });
    l = measure(name, n, [&](int i) {
      there.send(&i, sizeof i, 0);
      return receive(back);
    });
    there.send(&stop, sizeof stop, 0);
    reap(child, name);
  }
  bip::message_queue::remove(there_name.c_str());
  bip::message_queue::remove(back_name.c_str());
  return l;
}

/// The floor under any blocking channel: one futex word; the parent stores
/// an odd number and wakes the child, which answers with the next even one.
latency bench_futex(const char* name, int n) {
  struct shared {
    std::atomic<std::uint32_t> word{0};
    std::atomic<std::uint32_t> stop{0};
  };
  detail::shared_mapping mapping(sizeof(shared));
  auto* s = new (mapping.data()) shared();
  auto wait_for = [s](std::uint32_t want) {
    for (std::uint32_t v; (v = s->word.load(std::memory_order_acquire)) != want;)
      detail::futex_wait(&s->word, v, std::nullopt);
  };
  pid_t child = spawn([&] {
    for (std::uint32_t k = 1;; k += 2) {
      wait_for(k);
      if (s->stop.load() != 0) return;
      s->word.store(k + 1, std::memory_order_release);
      detail::futex_wake(&s->word);
    }
  });
  std::uint32_t k = 1;
  auto l = measure(name, n, [&](int i) {
    s->word.store(k, std::memory_order_release);
    detail::futex_wake(&s->word);
    wait_for(k + 1);
    k += 2;
    return i + 1;  // what is checked is the handshake itself: wait_for returned
  });
  s->stop.store(1);
  s->word.store(k, std::memory_order_release);
  detail::futex_wake(&s->word);
  reap(child, name);
  return l;
}

/// The content of big message `seq`: 8-byte sequence number, then bytes
/// that depend on position and sequence.
void fill(std::vector<char>& m, std::uint64_t seq) {
  std::memcpy(m.data(), &seq, sizeof seq);
  for (std::size_t i = sizeof seq; i < m.size(); i += 4096) m[i] = static_cast<char>(seq * 7 + i);
  m.back() = static_cast<char>(seq);
}

bool check(const std::vector<char>& m, std::uint64_t seq, std::size_t size) {
  if (m.size() != size) return false;
  std::uint64_t got;
  std::memcpy(&got, m.data(), sizeof got);
  if (got != seq || m.back() != static_cast<char>(seq)) return false;
  for (std::size_t i = sizeof seq; i + 1 < m.size(); i += 4096)
    if (m[i] != static_cast<char>(seq * 7 + i)) return false;
  return true;
}

double gib_per_s(std::size_t bytes, clock_type::duration d) {
  return static_cast<double>(bytes) / (1024.0 * 1024 * 1024) /
         std::chrono::duration<double>(d).count();
}

/// One-way throughput of `count` messages of `size` bytes through a pipe.
double bench_big_messages(std::size_t size, int count) {
  auto [a, b] = procpool::pipe<std::vector<char>>();
  pid_t child = spawn([&b = b, size, count] {
    std::vector<char> m(size);
    for (int seq = 0; seq <= count; ++seq) {  // one more: the first warms up
      fill(m, static_cast<std::uint64_t>(seq));
      b.send(m);
    }
    (void)b.recv();  // wait for the receiver before exiting
  });
  if (!check(a.recv(), 0, size)) fail("pipe<vector<char>>: warm-up message damaged");
  auto start = clock_type::now();
  for (int seq = 1; seq <= count; ++seq)
    if (!check(a.recv(), static_cast<std::uint64_t>(seq), size))
      fail(fmt::format("pipe<vector<char>>: message {} damaged", seq));
  auto elapsed = clock_type::now() - start;
  a.send({});
  reap(child, "big messages");
  return gib_per_s(size * static_cast<std::size_t>(count), elapsed);
}

double bench_memcpy(std::size_t size, int count) {
  std::vector<char> from(size), to(size);
  fill(from, 1);
  std::memcpy(to.data(), from.data(), size);  // warm up, fault the pages in
  auto start = clock_type::now();
  for (int i = 0; i < count; ++i) {
    from[static_cast<std::size_t>(i) % size] ^= 1;  // the copies must really happen
    std::memcpy(to.data(), from.data(), size);
  }
  auto elapsed = clock_type::now() - start;
  if (std::memcmp(to.data(), from.data(), size) != 0) fail("memcpy: copy differs");
  return gib_per_s(size * static_cast<std::size_t>(count), elapsed);
}

}  // namespace

int main(int argc, char** argv) {
  int n = argc > 1 ? std::atoi(argv[1]) : 20000;
  if (n < 100) n = 100;
  using namespace std::chrono_literals;

  fmt::print("Round trip of an int between two processes ({} round trips each)\n", n);
  fmt::print("  {:<48} {:>9} {:>9}\n", "", "median µs", "p99 µs");
  print_latency("procpool::pipe<int>, blocking (spin 0)", bench_pipe("pipe, blocking", n, 0ns));
  print_latency("procpool::pipe<int>, default (spin 2 µs)", bench_pipe("pipe, default", n, 2us));
  print_latency("procpool::pipe<int>, both ends spinning", bench_pipe("pipe, spinning", n, 100ms));
  print_latency("procpool::queue<int>, one queue each way", bench_queue("queue", n));
  print_latency("OS pipe (pipe2), one each way", bench_os_pipe("OS pipe", n));
  print_latency("boost::interprocess::message_queue, one each way",
                bench_boost_mq("message_queue", n));
  print_latency("bare futex ping-pong (the floor for sleeping)", bench_futex("futex", n));

  constexpr std::size_t big = 8u << 20;
  constexpr int messages = 64;
  double pipe_bw = bench_big_messages(big, messages);
  double memcpy_bw = bench_memcpy(big, messages);
  fmt::print("\nOne-way throughput of 8 MiB messages ({} messages)\n", messages);
  fmt::print("  {:<48} {:>9}\n", "", "GiB/s");
  fmt::print("  {:<48} {:>9.2f}   ({:.0f}% of memcpy)\n", "procpool::pipe<std::vector<char>>",
             pipe_bw, 100 * pipe_bw / memcpy_bw);
  fmt::print("  {:<48} {:>9.2f}\n", "memcpy of 8 MiB in one process", memcpy_bw);
}
