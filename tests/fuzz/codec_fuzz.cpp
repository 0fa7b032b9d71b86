// libFuzzer target for the codec: see codec_fuzz_target.hpp. Run it with
// scripts/fuzz.
#include <cstddef>
#include <cstdint>

#include "codec_fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return codec_fuzz::one_input(data, size);
}
