#include <procpool/errors.hpp>

#include <catch2/catch.hpp>
#include <csignal>
#include <string>

using namespace procpool;

TEST_CASE("exit_status tells a code from a signal", "[errors]") {
  auto code = exit_status::exited(3);
  CHECK(code.is_exited());
  CHECK_FALSE(code.is_signaled());
  CHECK_FALSE(code.success());
  CHECK(code.code() == 3);
  CHECK(code.to_string() == "exited with code 3");
  CHECK(exit_status::exited(0).success());

  auto sig = exit_status::killed(SIGKILL);
  CHECK(sig.is_signaled());
  CHECK(sig.signal() == SIGKILL);
  CHECK(sig.to_string() == "killed by signal 9 (SIGKILL)");
  CHECK(fmt::format("{}", sig) == sig.to_string());
  CHECK(sig != code);
  CHECK(exit_status::from_wait_status(0) == exit_status::exited(0));
}

TEST_CASE("every error is a procpool::error with the fields named in its message", "[errors]") {
  task_error t(17, 1234, "std::invalid_argument", "bad value");
  CHECK(t.index() == 17);
  CHECK(t.pid() == 1234);
  CHECK(t.type_name() == "std::invalid_argument");
  CHECK(t.message() == "bad value");
  CHECK(std::string(t.what()) == "item 17 failed in worker 1234: std::invalid_argument: bad value");

  worker_died d(99, exit_status::killed(SIGSEGV), 5);
  CHECK(d.index() == std::optional<std::size_t>(5));
  CHECK(std::string(d.what()) == "worker 99 killed by signal 11 (SIGSEGV) while running item 5");
  worker_died idle(99, exit_status::exited(3), std::nullopt);
  CHECK(std::string(idle.what()) == "worker 99 exited with code 3 while idle");

  timeout_error to(4, 77, std::chrono::milliseconds(250));
  CHECK(to.timeout() == std::chrono::milliseconds(250));
  CHECK(std::string(to.what()).find("item 4 ran past the task timeout of 250 ms in worker 77") ==
        0);

  decode_error de(12, "expected 8 bytes for double, 3 remain");
  CHECK(de.offset() == 12);
  CHECK(std::string(de.what()) == "decode error at byte 12: expected 8 bytes for double, 3 remain");

  message_too_large big(100, 64);
  CHECK(big.size() == 100);
  CHECK(big.capacity() == 64);

  const error* base[] = {&t, &d, &to, &de, &big};
  for (auto* e : base) CHECK(dynamic_cast<const std::runtime_error*>(e) != nullptr);
  CHECK_THROWS_AS(throw pool_closed("map"), error);
}
