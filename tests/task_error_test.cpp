// The original exception of a failed task: `task_error::original<T>()` gives
// back the object a worker's function threw, when its type's codec is
// registered, and `rethrow_as<T...>()` throws it as itself. Cases for every
// way that can go wrong: another type, an encoder that throws in the worker,
// a type the worker does not know, a frame whose object is bad bytes.
#include <procpool/executor.hpp>
#include <procpool/pool.hpp>
#include <support/support.hpp>

#include <catch2/catch.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Matchers::Contains;

namespace original_test {

/// An exception with state beyond its message, sendable through its own codec.
class parse_error : public std::runtime_error {
 public:
  parse_error(std::string what, int line) : std::runtime_error(std::move(what)), line_(line) {}
  int line() const noexcept { return line_; }

  friend void procpool_encode(procpool::writer& out, const parse_error& e) {
    procpool::encode(out, std::string(e.what()));
    procpool::encode(out, e.line_);
  }
  friend parse_error procpool_decode(procpool::reader& in, procpool::type_tag<parse_error>) {
    auto what = procpool::decode<std::string>(in);
    int line = procpool::decode<int>(in);
    return parse_error(std::move(what), line);
  }

 private:
  int line_;
};

/// A second sendable exception type.
struct io_error : std::runtime_error {
  explicit io_error(std::string what) : std::runtime_error(std::move(what)) {}
  friend void procpool_encode(procpool::writer& out, const io_error& e) {
    procpool::encode(out, std::string(e.what()));
  }
  friend io_error procpool_decode(procpool::reader& in, procpool::type_tag<io_error>) {
    return io_error(procpool::decode<std::string>(in));
  }
};

/// An exception whose encoder throws (in the worker, where it is encoded).
struct unencodable : std::runtime_error {
  unencodable() : std::runtime_error("cannot be encoded") {}
  friend void procpool_encode(procpool::writer&, const unencodable&) {
    throw std::logic_error("unencodable's encoder throws");
  }
  friend unencodable procpool_decode(procpool::reader&, procpool::type_tag<unencodable>) {
    return unencodable();
  }
};

/// Registered only where a test adds it (never named in original<T>()).
struct late_error : std::runtime_error {
  explicit late_error(std::string what) : std::runtime_error(std::move(what)) {}
  friend void procpool_encode(procpool::writer& out, const late_error& e) {
    procpool::encode(out, std::string(e.what()));
  }
  friend late_error procpool_decode(procpool::reader& in, procpool::type_tag<late_error>) {
    return late_error(procpool::decode<std::string>(in));
  }
};

int parse(int x) {
  if (x == 3) throw parse_error("bad token", 42);
  if (x == 4) throw io_error("disk gone");
  if (x == 5) throw unencodable();
  if (x == 6) throw std::out_of_range("plain");
  return x;
}

template <class Call>
procpool::task_error caught(Call&& call) {
  try {
    call();
  } catch (const procpool::task_error& e) {
    return e;
  }
  FAIL("no task_error was raised");
  throw std::logic_error("unreachable");
}

}  // namespace original_test

using namespace original_test;

TEST_CASE("original<T>() gives back the object a worker threw", "[pool][original]") {
  procpool::pool p(parse, 2);
  auto e = caught([&] { (void)p.map(std::vector<int>{1, 2, 3, 1}); });
  CHECK(e.index() == 2);
  CHECK(e.type_name() == "original_test::parse_error");
  CHECK(e.message() == "bad token");
  auto original = e.original<parse_error>();
  REQUIRE(original);
  CHECK(original->line() == 42);
  CHECK(std::string(original->what()) == "bad token");
  // Another type: empty, whether registered or not.
  CHECK_FALSE(e.original<io_error>());
  CHECK_FALSE(e.original<std::string>());
  // The pool goes on.
  CHECK(p.map(std::vector<int>{1, 2}) == std::vector<int>{1, 2});
}

TEST_CASE("rethrow_as throws the original as itself, or returns", "[pool][original]") {
  procpool::pool p(parse, 2);
  auto e = caught([&] { (void)p.map(std::vector<int>{4}); });
  CHECK_THROWS_AS((e.rethrow_as<parse_error, io_error>()), io_error);
  try {
    e.rethrow_as<io_error>();
    FAIL("rethrow_as returned");
  } catch (const io_error& io) {
    CHECK(std::string(io.what()) == "disk gone");
  }
  CHECK_NOTHROW(e.rethrow_as<parse_error>());
  CHECK_NOTHROW(e.rethrow_as<>());
}

TEST_CASE("a task's error keeps its original: submit, imap, the executor", "[pool][original]") {
  procpool::pool p(parse, 2);
  auto f = p.submit(3);
  auto e = caught([&] { (void)f.get(); });
  CHECK_THAT(e.what(), Contains("a task failed"));
  REQUIRE(e.original<parse_error>());
  CHECK(e.original<parse_error>()->line() == 42);

  auto e2 = caught([&] {
    for (int r : p.imap(std::vector<int>{1, 4})) (void)r;
  });
  CHECK(e2.original<io_error>());

  procpool::executor ex(1);
  auto e3 = caught([&] { (void)ex.submit(&parse, 3).get(); });
  CHECK(e3.original<parse_error>()->line() == 42);
}

TEST_CASE("an exception whose encoder throws in the worker keeps its name and message",
          "[pool][original]") {
  procpool::pool p(parse, 1);
  auto e = caught([&] { (void)p.map(std::vector<int>{1, 5}); });
  CHECK(e.index() == 1);
  CHECK(e.type_name() == "original_test::unencodable");
  CHECK(e.message() == "cannot be encoded");
  CHECK_FALSE(e.original<unencodable>());
  CHECK(p.map(std::vector<int>{7}) == std::vector<int>{7});
}

TEST_CASE("a type without a codec gives no original, and its name and message still come",
          "[pool][original]") {
  procpool::pool p(parse, 1);
  auto e = caught([&] { (void)p.map(std::vector<int>{6}); });
  CHECK(e.type_name() == "std::out_of_range");
  CHECK(e.message() == "plain");
  CHECK_FALSE(e.original<parse_error>());
}

TEST_CASE("a type registered on one side only", "[pool][original]") {
  SECTION("registered in the worker alone: the parent asking for another type gets nothing") {
    procpool::pool p(
        [](int) -> int {
          procpool::register_exception<late_error>();
          throw late_error("late");
        },
        1);
    auto e = caught([&] { (void)p.map(std::vector<int>{1}); });
    CHECK(e.type_name() == "original_test::late_error");
    CHECK_FALSE(e.original<parse_error>());
  }
  SECTION("not known in the worker: no original, nothing else lost") {
    procpool::pool p(
        [](int) -> int {
          // The worker forgets the codec (a worker built without it).
          auto& r = procpool::detail::exception_codecs();
          r.encoders.erase(typeid(parse_error).name());
          throw parse_error("unknown here", 1);
        },
        1);
    auto e = caught([&] { (void)p.map(std::vector<int>{1}); });
    CHECK(e.message() == "unknown here");
    CHECK_FALSE(e.original<parse_error>());
  }
}

TEST_CASE("original<T>() refuses bytes that are not a T", "[original]") {
  auto object = std::make_shared<procpool::detail::exception_object>();
  object->key = typeid(parse_error).name();
  object->bytes = procpool::encode(std::string("short"));  // no line follows
  procpool::task_error e(0, 1, "original_test::parse_error", "m", object);
  CHECK_THROWS_AS(e.original<parse_error>(), procpool::decode_error);
  // Bytes past the end of the object.
  auto bytes = procpool::encode(std::string("x"));
  auto line = procpool::encode(7);
  bytes.insert(bytes.end(), line.begin(), line.end());
  bytes.push_back(std::byte{1});
  object->bytes = bytes;
  CHECK_THROWS_AS(e.original<parse_error>(), procpool::decode_error);
}

TEST_CASE("original<T>() works from a forked child's own pool", "[pool][original][fork]") {
  pid_t child = procpool_test::spawn([] {
    procpool::pool p(parse, 1);
    try {
      (void)p.map(std::vector<int>{3});
    } catch (const procpool::task_error& e) {
      auto o = e.original<parse_error>();
      return o && o->line() == 42 ? 0 : 1;
    }
    return 2;
  });
  CHECK(procpool_test::reap(child) == procpool::exit_status::exited(0));
}
