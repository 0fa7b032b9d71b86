// libFuzzer target for the shared-memory transport's framing: see
// frame_fuzz_target.hpp. Run it with `scripts/fuzz --target frame`.
//
// Built with FRAME_FUZZ_SEEDS_MAIN (the frame_fuzz_seeds program) it writes
// or checks the seed corpus instead:
//
//   frame_fuzz_seeds --write tests/fuzz/corpus/frame
//   frame_fuzz_seeds --check tests/fuzz/corpus/frame
#include <cstddef>
#include <cstdint>

#include "../support/support.hpp"
#include "frame_fuzz_target.hpp"

#ifndef FRAME_FUZZ_SEEDS_MAIN

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return frame_fuzz::one_input(data, size);
}

#else

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using procpool_test::read_file;

}  // namespace

// --write DIR writes the seeds; --check DIR runs each seed through the target
// and fails if a file is missing or differs from seeds().
int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[1], "--write") != 0 && std::strcmp(argv[1], "--check") != 0)) {
    std::fprintf(stderr, "usage: %s --write|--check DIR\n", argv[0]);
    return 2;
  }
  const bool write = std::strcmp(argv[1], "--write") == 0;
  const std::filesystem::path dir = argv[2];
  int status = 0;
  if (write) std::filesystem::create_directories(dir);
  for (const auto& [name, bytes] : frame_fuzz::seeds()) {
    frame_fuzz::one_input(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    if (write) {
      std::ofstream file(dir / name, std::ios::binary | std::ios::trunc);
      file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<long>(bytes.size()));
      if (!file.good()) {
        std::fprintf(stderr, "cannot write %s\n", (dir / name).c_str());
        status = 1;
      }
    } else if (read_file(dir / name) != bytes) {
      std::fprintf(stderr, "%s is missing or out of date: run %s --write %s\n",
                   (dir / name).c_str(), argv[0], dir.c_str());
      status = 1;
    }
  }
  return status;
}

#endif
