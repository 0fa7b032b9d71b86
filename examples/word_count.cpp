// Map-reduce: count the words of a folder of text files.
//
// map    = count the words of one file, in a worker process;
// reduce = add the per-file counts together, in this process.
//
// The Python this mirrors:
//
//     with Pool() as pool:
//         total = Counter()
//         for counts in pool.imap(count_words, paths):
//             total.update(counts)
//
// The example writes its own input: a few MB of text drawn from a fixed
// vocabulary, in a fresh temporary folder that it removes at the end. It
// checks the pool's answer against a serial count and exits with 1 when
// they differ.
#include <fmt/format.h>
#include <procpool/pool.hpp>

#include <stdlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace fs = std::filesystem;
using word_counts = std::map<std::string, std::size_t>;

namespace {

// The map step: the number of times each word occurs in the file at `path`.
word_counts count_words(const std::string& path) {
  word_counts counts;
  std::ifstream in(path);
  for (std::string word; in >> word;) ++counts[word];
  return counts;
}

// The reduce step: adds `part` into `total`.
void add_counts(word_counts& total, const word_counts& part) {
  for (const auto& [word, n] : part) total[word] += n;
}

// A fresh, empty folder under the system's temporary folder, removed with its
// contents when this object goes out of scope.
class temporary_folder {
 public:
  temporary_folder() {
    std::string pattern = (fs::temp_directory_path() / "procpool-word-count-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      throw fs::filesystem_error("mkdtemp", pattern,
                                 std::error_code(errno, std::generic_category()));
    path_ = pattern;
  }
  ~temporary_folder() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  temporary_folder(const temporary_folder&) = delete;
  temporary_folder& operator=(const temporary_folder&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Writes `files` files of about `bytes_per_file` bytes each into `folder`.
// Words are drawn by a fixed pseudo-random sequence, favouring the start of
// the vocabulary, so every run writes the same text.
std::vector<std::string> write_corpus(const fs::path& folder, int files,
                                      std::size_t bytes_per_file) {
  static constexpr std::array<const char*, 40> vocabulary{
      "the", "of",   "and",   "to",  "in",      "a",      "is",     "that",   "for",   "it",
      "as",  "was",  "with",  "be",  "by",      "on",     "not",    "he",     "this",  "are",
      "or",  "his",  "from",  "at",  "which",   "but",    "have",   "an",     "had",   "they",
      "you", "were", "their", "one", "process", "worker", "memory", "signal", "queue", "pool"};
  std::uint64_t state = 0x9E3779B97F4A7C15;  // xorshift64: the same words on every machine
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  std::vector<std::string> paths;
  for (int f = 0; f < files; ++f) {
    std::string path = (folder / fmt::format("part-{:02}.txt", f)).string();
    std::string text;
    while (text.size() < bytes_per_file) {
      // The smaller of two draws: early words come up far more often.
      auto pick = std::min(next() % vocabulary.size(), next() % vocabulary.size());
      text += vocabulary[pick];
      text += text.size() % 72 < 8 ? '\n' : ' ';
    }
    std::ofstream(path) << text;
    paths.push_back(path);
  }
  return paths;
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

int main() {
  temporary_folder folder;
  std::vector<std::string> paths = write_corpus(folder.path(), 24, 128 * 1024);

  procpool::pool pool(count_words);

  auto t0 = std::chrono::steady_clock::now();
  word_counts serial;
  for (const std::string& path : paths) add_counts(serial, count_words(path));
  double serial_ms = milliseconds_since(t0);

  auto t1 = std::chrono::steady_clock::now();
  word_counts pooled;
  // imap hands over each file's counts as they arrive, in input order, so the
  // reduce step overlaps the map step and no more than a few results are held.
  for (const word_counts& part : pool.imap(paths)) add_counts(pooled, part);
  double pooled_ms = milliseconds_since(t1);

  // The five most frequent words, most frequent first.
  std::vector<std::pair<std::string, std::size_t>> ranked(pooled.begin(), pooled.end());
  std::partial_sort(ranked.begin(), ranked.begin() + 5, ranked.end(),
                    [](const auto& a, const auto& b) {
                      return a.second != b.second ? a.second > b.second : a.first < b.first;
                    });
  std::size_t words = 0;
  for (const auto& [word, n] : pooled) words += n;

  fmt::print("{} files, {} words, {} different\n", paths.size(), words, pooled.size());
  for (std::size_t i = 0; i < 5; ++i)
    fmt::print("  {:<8} {:>7}\n", ranked[i].first, ranked[i].second);
  fmt::print("serial loop         {:8.1f} ms\n", serial_ms);
  fmt::print("pool of {} workers   {:8.1f} ms  ({:.2f}x)\n", pool.workers(), pooled_ms,
             serial_ms / pooled_ms);

  if (pooled != serial) {
    fmt::print("wrong: the pool's counts differ from the serial counts\n");
    return 1;
  }
}
