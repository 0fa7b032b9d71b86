// libFuzzer target for the queue's and the pipe's shared state under a
// hostile peer: see channel_fuzz_target.hpp. Run it with
// `scripts/fuzz --target channel`.
#include <cstddef>
#include <cstdint>

#include "channel_fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return channel_fuzz::one_input(data, size);
}
