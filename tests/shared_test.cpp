// shared.hpp: shared_value<T> and shared_array<T>, anonymous (inherited across
// fork) and named (opened by name), with exact totals under contention, values
// that survive a process killed mid-update, and every error of named segments
// provoked for real. Named segments are checked not to outlive the tests in /dev/shm.
//
// Children never use Catch2: they report through their exit code (0 = good).
#include <procpool/detail/os/fork.hpp>
#include <procpool/shared.hpp>
#include <procpool/sync.hpp>
#include <support/support.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <numeric>
#if __has_include(<span>)
#include <span>
#endif
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using procpool::exit_status;

namespace {

using procpool_test::all_succeeded;
using procpool_test::block_forever;
using procpool_test::go_signal;
using procpool_test::no_children_left;
using procpool_test::open_fd_count;
using procpool_test::reap;
using procpool_test::spawn;

/// Prefix of every segment name this test program makes.
std::string name_prefix() {
  return "procpool-shared-test-" + std::to_string(::getpid()) + "-";
}

/// A segment name no other test (or concurrent test process) uses.
std::string unique_name(const char* what) {
  static int counter = 0;
  return name_prefix() + what + "-" + std::to_string(++counter);
}

/// Names in /dev/shm made by this test program.
std::vector<std::string> our_segments() {
  std::vector<std::string> out;
  if (DIR* d = ::opendir("/dev/shm")) {
    std::string prefix = name_prefix();
    while (dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) out.emplace_back(e->d_name);
    }
    ::closedir(d);
  }
  return out;
}

bool segment_exists(const std::string& name) {
  return ::access(("/dev/shm/" + name).c_str(), F_OK) == 0;
}

/// Removes the named segment at the end of a scope, whatever happens in between.
struct remove_at_exit {
  std::string name;
  ~remove_at_exit() { procpool::shared_value<int>::remove(name); }
};

/// Too large for a lock-free std::atomic: exercises the locked storage.
struct triple {
  long a, b, c;
};
static_assert(!procpool::shared_value<triple>::is_always_lock_free);
static_assert(procpool::shared_value<long>::is_always_lock_free);

int global_counter = 0;  // an ordinary global: each process has its own

constexpr int workers = 4;

}  // namespace

// ---------------------------------------------------------------------------
// Anonymous values and arrays

TEST_CASE("shared_value: exact totals from 4 processes", "[shared][fork]") {
  constexpr long per_child = 100000;
  procpool::shared_value<long> count;       // lock-free fetch_add
  procpool::shared_value<double> sum(0.5);  // lock-free compare-exchange loop
  procpool::shared_value<triple> three;     // locked storage, updated with with()
  procpool::shared_value<unsigned> bits;    // fetch_or
  procpool::event go;
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&, i] {
      go.wait();
      for (long k = 0; k < per_child; ++k) {
        count.fetch_add(1);
        if (k % 10 == 0) sum.fetch_add(1.0);
        if (k % 100 == 0) {
          three.with([](triple& t) {
            ++t.a;
            t.b += 2;
            t.c = t.a + t.b;
          });
        }
      }
      bits.fetch_or(1u << i);
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  REQUIRE(count.load() == workers * per_child);
  REQUIRE(sum.load() == 0.5 + workers * per_child / 10);
  triple t = three.load();
  REQUIRE(t.a == workers * per_child / 100);
  REQUIRE(t.b == 2 * t.a);
  REQUIRE(t.c == t.a + t.b);
  REQUIRE(bits.load() == 0xfu);
}

TEST_CASE("shared_value: atomic operations", "[shared]") {
  procpool::shared_value<int> v(10);
  REQUIRE(v.load() == 10);
  REQUIRE(v.exchange(20) == 10);
  int expected = 5;
  REQUIRE_FALSE(v.compare_exchange(expected, 30));
  REQUIRE(expected == 20);
  REQUIRE(v.compare_exchange(expected, 30));
  REQUIRE(v.fetch_sub(5) == 30);
  REQUIRE(v.fetch_and(0x0f) == 25);
  REQUIRE(v.fetch_xor(0x3) == 9);
  REQUIRE(v.load() == 10);
  REQUIRE(v.with([](int& x) { return x++ * 2; }) == 20);
  REQUIRE(v.load() == 11);
  REQUIRE_THROWS_AS(v.with([](int& x) {
    x = 99;
    throw std::runtime_error("no");
  }),
                    std::runtime_error);
  REQUIRE(v.load() == 11);  // f threw: unchanged

  procpool::shared_value<triple> t(triple{1, 2, 3});
  triple want{1, 2, 3};
  REQUIRE(t.compare_exchange(want, triple{4, 5, 6}));
  REQUIRE(t.exchange(triple{7, 8, 9}).c == 6);
  REQUIRE(t.load().b == 8);
  t.store(triple{0, 0, 1});
  REQUIRE(t.load().c == 1);

  procpool::shared_value<long double> ld(1.5L);  // not lock-free on x86-64
  REQUIRE(ld.fetch_add(1.0L) == 1.5L);
  REQUIRE(ld.load() == 2.5L);

  procpool::shared_value<unsigned char> wrap(250);
  wrap.fetch_add(10);
  REQUIRE(wrap.load() == 4);  // integers wrap around, as std::atomic's do
}

TEST_CASE("memory is separate, shared_value is shared", "[shared][fork]") {
  global_counter = 0;
  procpool::shared_value<int> shared;
  pid_t kid = spawn([&] {
    global_counter = 42;  // changes the child's own copy only
    shared.store(42);
    return 0;
  });
  REQUIRE(reap(kid) == exit_status::exited(0));
  REQUIRE(global_counter == 0);
  REQUIRE(shared.load() == 42);
}

TEST_CASE("a process killed inside with() leaves the value whole and the lock free",
          "[shared][fork]") {
  procpool::shared_value<long> lf(7);
  procpool::shared_value<triple> locked(triple{1, 1, 1});
  for (int round = 0; round < 20; ++round) {
    go_signal inside;
    pid_t victim = spawn([&] {
      lf.with([&](long& x) {
        x = -1;  // never stored: the process dies first
        locked.with([&](triple& t) {
          t = triple{-1, -1, -1};
          inside.give();
          block_forever();
        });
      });
      return 0;
    });
    REQUIRE(inside.await());
    ::kill(victim, SIGKILL);
    REQUIRE(reap(victim).is_signaled());
    REQUIRE(lf.load() == 7 + round);
    REQUIRE(locked.load().a == 1 + round);
    lf.with([](long& x) { ++x; });  // the internal lock is usable
    locked.with([](triple& t) { ++t.a; });
  }
}

TEST_CASE("shared_array: contiguous, zeroed, shared with children", "[shared][fork]") {
  procpool::shared_array<int> a(1000);
  REQUIRE(a.size() == 1000);
  REQUIRE_FALSE(a.empty());
  REQUIRE(a.end() - a.begin() == 1000);
  REQUIRE(a.data() == &a[0]);
  REQUIRE(std::all_of(a.begin(), a.end(), [](int x) { return x == 0; }));
  REQUIRE(reinterpret_cast<std::uintptr_t>(a.data()) % alignof(int) == 0);

  // Each child fills its own quarter.
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&, i] {
      for (std::size_t k = static_cast<std::size_t>(i) * 250; k < (i + 1) * 250u; ++k) {
        a[k] = static_cast<int>(k);
      }
      return 0;
    }));
  }
  REQUIRE(all_succeeded(kids));
  std::vector<int> want(1000);
  std::iota(want.begin(), want.end(), 0);
  REQUIRE(std::equal(a.begin(), a.end(), want.begin(), want.end()));

  procpool::shared_array<double> filled(5, 2.5);
  REQUIRE(std::accumulate(filled.begin(), filled.end(), 0.0) == 12.5);
  procpool::shared_array<char> none(0);
  REQUIRE(none.empty());
  REQUIRE(none.begin() == none.end());

#if defined(__cpp_lib_span) && __cpp_lib_span >= 202002L
  std::span<double> view = filled;
  REQUIRE(view.size() == 5);
  REQUIRE(view.data() == filled.data());
#endif

  struct alignas(64) line {
    long x;
  };
  procpool::shared_array<line> lines(3);
  REQUIRE(reinterpret_cast<std::uintptr_t>(lines.data()) % 64 == 0);
}

TEST_CASE("shared_value and shared_array move, and unmap when destroyed", "[shared]") {
  auto maps = procpool_test::shared_mapping_count();
  auto fds = open_fd_count();
  {
    procpool::shared_value<int> a(5);
    procpool::shared_value<int> b(std::move(a));
    REQUIRE(b.load() == 5);
    procpool::shared_value<int> c(6);
    c = std::move(b);
    REQUIRE(c.load() == 5);
    procpool::shared_array<int> x(10, 1);
    procpool::shared_array<int> y(std::move(x));
    REQUIRE(x.size() == 0);  // NOLINT: moved-from is empty
    REQUIRE(y.size() == 10);
    REQUIRE(y[9] == 1);
    for (int i = 0; i < 100; ++i) procpool::shared_value<long> temp(i);
  }
  REQUIRE(procpool_test::shared_mapping_count() == maps);
  REQUIRE(open_fd_count() == fds);
}

TEST_CASE("shared_value between threads", "[shared]") {
  procpool::shared_value<long> n;
  procpool::shared_value<triple> t;
  auto work = [&] {
    for (int i = 0; i < 20000; ++i) {
      n.fetch_add(1);
      if (i % 10 == 0) t.with([](triple& x) { ++x.a; });
    }
  };
  std::thread th(work);
  work();
  th.join();
  REQUIRE(n.load() == 40000);
  REQUIRE(t.load().a == 4000);
}

// ---------------------------------------------------------------------------
// Named segments

TEST_CASE("named segments: create, open by name in another process, remove", "[shared][fork]") {
  auto fds = open_fd_count();
  std::string vname = unique_name("value");
  std::string aname = unique_name("array");
  {
    procpool::shared_value<long> v(procpool::create_only, vname, 5);
    procpool::shared_array<int> a(procpool::create_only, aname, 100);
    REQUIRE(v.name() == vname);
    REQUIRE(segment_exists(vname));
    REQUIRE(segment_exists(aname));
    // Named segments are private to the user who made them.
    struct stat st {};
    REQUIRE(::stat(("/dev/shm/" + vname).c_str(), &st) == 0);
    REQUIRE((st.st_mode & 0777) == 0600);

    // A child that opens them by name, not through the inherited objects.
    pid_t kid = spawn([&] {
      procpool::shared_value<long> mine(procpool::open_only, vname);
      procpool::shared_array<int> arr(procpool::open_only, "/" + aname);  // leading slash is fine
      if (arr.size() != 100) return 1;
      for (int i = 0; i < 1000; ++i) mine.fetch_add(1);
      arr[99] = 7;
      return 0;
    });
    REQUIRE(reap(kid) == exit_status::exited(0));
    REQUIRE(v.load() == 1005);
    REQUIRE(a[99] == 7);

    // A second handle in this process sees the same memory.
    procpool::shared_value<long> again(procpool::open_only, vname);
    again.store(-3);
    REQUIRE(v.load() == -3);

    REQUIRE(v.remove());
    REQUIRE_FALSE(segment_exists(vname));
    REQUIRE(v.load() == -3);  // still mapped
    REQUIRE_FALSE(v.remove());
    REQUIRE(procpool::shared_array<int>::remove(aname));
    REQUIRE_FALSE(procpool::shared_array<int>::remove(aname));
    REQUIRE_THROWS_AS(procpool::shared_value<long>(procpool::open_only, vname),
                      procpool::segment_not_found);
  }
  REQUIRE(open_fd_count() == fds);
  REQUIRE(our_segments().empty());
}

TEST_CASE("named segments: open of a missing name, create of a taken one", "[shared]") {
  std::string name = unique_name("missing");
  try {
    procpool::shared_value<int> v(procpool::open_only, name);
    FAIL("opened a segment that does not exist");
  } catch (const procpool::segment_not_found& e) {
    CHECK(e.name() == name);
    CHECK_THAT(e.what(), Catch::Contains(name) && Catch::Contains("does not exist"));
  }
  REQUIRE_THROWS_AS(procpool::shared_array<int>(procpool::open_only, name),
                    procpool::segment_not_found);
  REQUIRE_FALSE(segment_exists(name));

  procpool::shared_value<int> first(procpool::create_only, name, 1);
  remove_at_exit cleanup{name};
  try {
    procpool::shared_value<int> second(procpool::create_only, name, 2);
    FAIL("created a segment twice");
  } catch (const procpool::segment_exists& e) {
    CHECK_THAT(e.what(), Catch::Contains(name) && Catch::Contains("already exists"));
  }
  REQUIRE(first.load() == 1);  // untouched by the failed create

  for (const char* bad : {"", "/", "a/b", "..", "/x/"}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(procpool::shared_value<int>(procpool::create_only, bad),
                      procpool::segment_error);
  }
  REQUIRE_THROWS_AS(procpool::shared_value<int>::remove("a/b"), procpool::segment_error);
}

TEST_CASE("named segments: open_or_create makes it once, then opens it", "[shared][fork]") {
  std::string name = unique_name("ooc");
  remove_at_exit cleanup{name};
  procpool::shared_value<int> a(procpool::open_or_create, name, 11);
  procpool::shared_value<int> b(procpool::open_or_create, name, 22);  // opens: 22 is ignored
  REQUIRE(b.load() == 11);
  b.store(12);
  REQUIRE(a.load() == 12);

  // Four processes race to open_or_create a fresh name; exactly one creates it.
  std::string raced = unique_name("race");
  remove_at_exit cleanup2{raced};
  procpool::event go;
  std::vector<pid_t> kids;
  for (int i = 0; i < workers; ++i) {
    kids.push_back(spawn([&] {
      go.wait();
      procpool::shared_value<long> total(procpool::open_or_create, raced);
      for (int k = 0; k < 1000; ++k) total.fetch_add(1);
      return 0;
    }));
  }
  go.set();
  REQUIRE(all_succeeded(kids));
  procpool::shared_value<long> total(procpool::open_only, raced);
  REQUIRE(total.load() == workers * 1000);
}

TEST_CASE("named segments: a type, size or kind mismatch is reported", "[shared]") {
  std::string name = unique_name("mismatch");
  remove_at_exit cleanup{name};
  procpool::shared_value<int> v(procpool::create_only, name, 1);

  try {
    procpool::shared_value<long> wrong(procpool::open_only, name);
    FAIL("opened a shared_value<int> as a shared_value<long>");
  } catch (const procpool::segment_mismatch& e) {
    CHECK_THAT(e.what(),
               Catch::Contains(name) && Catch::Contains("4 bytes") && Catch::Contains("8 bytes"));
  }
  REQUIRE_THROWS_AS(procpool::shared_value<triple>(procpool::open_or_create, name),
                    procpool::segment_mismatch);
  REQUIRE_THROWS_WITH(procpool::shared_array<int>(procpool::open_only, name),
                      Catch::Contains("another kind of object"));

  std::string aname = unique_name("mismatch-array");
  remove_at_exit cleanup2{aname};
  procpool::shared_array<int> a(procpool::create_only, aname, 10);
  REQUIRE_THROWS_WITH(procpool::shared_array<int>(procpool::open_or_create, aname, 20),
                      Catch::Contains("holds 10 elements, expected 20"));
  // Same size and alignment, another type: told apart by the type tag.
  REQUIRE_THROWS_WITH(procpool::shared_array<float>(procpool::open_only, aname),
                      Catch::Contains("another type"));
  REQUIRE_THROWS_AS(procpool::shared_value<unsigned>(procpool::open_only, name),
                    procpool::segment_mismatch);
}

TEST_CASE("named segments: a segment not made by procpool is refused", "[shared]") {
  std::string name = unique_name("foreign");
  int fd = ::shm_open(("/" + name).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  remove_at_exit cleanup{name};
  std::array<unsigned char, 4096> junk;
  junk.fill(0xab);
  REQUIRE(::write(fd, junk.data(), junk.size()) == static_cast<ssize_t>(junk.size()));
  ::close(fd);
  REQUIRE_THROWS_WITH(procpool::shared_value<int>(procpool::open_only, name),
                      Catch::Contains("not made by procpool"));
}

TEST_CASE("named segments: one made first by another user, or opened wide, is refused",
          "[shared]") {
  // Another user (here 65534, "nobody") made the name first, world-readable and
  // writable, so as to read what this program writes or feed it values.
  bool as_root = ::geteuid() == 0;
  std::string name = unique_name("foreign-owner");
  { procpool::shared_value<long> planted(procpool::create_only, name, 666); }
  remove_at_exit cleanup{name};
  std::string path = "/dev/shm/" + name;
  REQUIRE(::chmod(path.c_str(), 0666) == 0);
  auto refused = [&](const char* why) {
    CAPTURE(why);
    REQUIRE_THROWS_AS(procpool::shared_value<long>(procpool::open_only, name),
                      procpool::segment_permission_error);
    REQUIRE_THROWS_AS(procpool::shared_value<long>(procpool::open_or_create, name, 1),
                      procpool::segment_permission_error);
    REQUIRE_THROWS_AS(procpool::shared_array<long>(procpool::open_only, name),
                      procpool::segment_permission_error);
  };
  // Ours, but others may read and write it.
  refused("mode 0666");
  REQUIRE_THROWS_WITH(procpool::shared_value<long>(procpool::open_only, name),
                      Catch::Contains(name) && Catch::Contains("0666"));
  REQUIRE(::chmod(path.c_str(), 0620) == 0);
  refused("mode 0620");
  REQUIRE(::chmod(path.c_str(), 0600) == 0);
  {
    procpool::shared_value<long> ours(procpool::open_only, name);  // 0600 and ours: fine
    REQUIRE(ours.load() == 666);
  }
  if (as_root) {
    REQUIRE(::chown(path.c_str(), 65534, 65534) == 0);
    refused("owned by user 65534, mode 0600");
    REQUIRE_THROWS_WITH(procpool::shared_value<long>(procpool::open_or_create, name, 1),
                        Catch::Contains("65534") && Catch::Contains(name));
    REQUIRE(::chmod(path.c_str(), 0666) == 0);
    refused("owned by user 65534, mode 0666");
  } else {
    WARN("not root: the case of a segment owned by another user is not run");
  }
  // Still the planted segment, untouched by any of the refused opens.
  REQUIRE(::chown(path.c_str(), ::geteuid(), ::getegid()) == 0);
  REQUIRE(::chmod(path.c_str(), 0600) == 0);
  procpool::shared_value<long> check(procpool::open_only, name);
  REQUIRE(check.load() == 666);
}

TEST_CASE("named segments: a creator that never finished is reported, not waited for forever",
          "[shared]") {
  std::string name = unique_name("unfinished");
  // What a creator killed between sizing the segment and publishing it leaves behind.
  int fd = ::shm_open(("/" + name).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  remove_at_exit cleanup{name};
  REQUIRE(::ftruncate(fd, 4096) == 0);
  ::close(fd);
  auto start = std::chrono::steady_clock::now();
  REQUIRE_THROWS_WITH(procpool::shared_value<int>(procpool::open_only, name),
                      Catch::Contains("not initialized") && Catch::Contains(name));
  auto took = std::chrono::steady_clock::now() - start;
  CHECK(took >= procpool::detail::segment_init_timeout);
  CHECK(took < procpool::detail::segment_init_timeout + 5s);
}

TEST_CASE("named segments leave nothing behind in /dev/shm", "[shared]") {
  REQUIRE(our_segments().empty());
  REQUIRE(no_children_left());
}
