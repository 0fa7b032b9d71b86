// Two processes talk through a pipe: the parent sends "ping", the child
// answers "pong", back and forth.
//
// The Python this mirrors:
//
//     def child(conn):
//         while (msg := conn.recv()) != "bye":
//             conn.send(msg.replace("ping", "pong"))
//         conn.send("bye")
//
//     parent_end, child_end = Pipe()
//     p = Process(target=child, args=(child_end,))
//     p.start()
//     for i in range(1, 4):
//         parent_end.send(f"ping {i}")
//         print("parent got:", parent_end.recv())
//     parent_end.send("bye")
//     print("parent got:", parent_end.recv())
//     p.join()
//
// `pipe<T>()` returns two connected ends. Make the pipe before starting the
// child: the child inherits both ends and uses one, the parent uses the other.
// Only the parent prints, so the output is the same on every run.
#include <fmt/format.h>
#include <procpool/pipe.hpp>
#include <procpool/process.hpp>

#include <string>

int main() {
  auto [parent_end, child_end] = procpool::pipe<std::string>();

  // The child answers every "ping N" with "pong N" until it is told "bye".
  procpool::process child([&child_end = child_end] {
    for (;;) {
      std::string message = child_end.recv();  // waits for the parent
      if (message == "bye") break;
      child_end.send("pong" + message.substr(4));
    }
    child_end.send("bye");
  });

  for (int i = 1; i <= 3; ++i) {
    std::string ping = fmt::format("ping {}", i);
    parent_end.send(ping);
    fmt::print("parent sent: {:<8} parent got: {}\n", ping, parent_end.recv());
  }
  parent_end.send("bye");
  fmt::print("parent sent: {:<8} parent got: {}\n", "bye", parent_end.recv());

  fmt::print("child {}\n", child.join().to_string());  // child exited with code 0

  // The child is gone now. Asking for another message does not hang: recv
  // notices that the process at the other end has ended and throws.
  try {
    (void)parent_end.recv();
  } catch (const procpool::channel_closed&) {
    fmt::print("recv after the child ended: channel_closed\n");
  }
}
