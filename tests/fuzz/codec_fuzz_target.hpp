// The codec fuzz target, shared by the libFuzzer program (codec_fuzz.cpp) and
// the corpus replay in tests/codec_test.cpp.
//
// An input is one selector byte, which picks the type to decode, followed by
// the bytes to decode as that type. Bytes that decode must re-encode to bytes
// that decode to an equal value; anything else aborts. Bytes that do not
// decode must throw procpool::decode_error and nothing else.
#pragma once

#include <procpool/codec.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace codec_fuzz {

/// A double compared bit for bit, so that NaN equals itself after a round trip.
struct exact_double {
  double value;
  friend bool operator==(const exact_double& a, const exact_double& b) {
    return std::memcmp(&a.value, &b.value, sizeof a.value) == 0;
  }
};

enum class color : std::uint8_t { red, green, blue };

/// Trivially sendable: goes by memcpy, alone and in vectors.
struct point {
  std::int32_t x;
  std::int32_t y;
  exact_double weight;
  friend bool operator==(const point& a, const point& b) {
    return a.x == b.x && a.y == b.y && a.weight == b.weight;
  }
};

using scalar = std::variant<std::monostate, bool, std::int64_t, std::string, std::vector<point>>;

/// Field by field: holds a bool, which is checked.
struct leaf {
  std::string name;
  std::optional<scalar> value;
  bool flag;
  color hue;
  std::array<std::uint8_t, 3> tag;
  friend bool operator==(const leaf& a, const leaf& b) {
    return std::tie(a.name, a.value, a.flag, a.hue, a.tag) ==
           std::tie(b.name, b.value, b.flag, b.hue, b.tag);
  }
};

/// A type with private state, sent through the customization point; its
/// decoder validates what it reads.
class money {
 public:
  money() = default;
  money(std::int64_t cents, std::string currency) : cents_(cents), currency_(std::move(currency)) {}
  friend bool operator==(const money& a, const money& b) {
    return a.cents_ == b.cents_ && a.currency_ == b.currency_;
  }

 private:
  friend void procpool_encode(procpool::writer& out, const money& m) {
    procpool::encode(out, m.cents_);
    procpool::encode(out, m.currency_);
  }
  friend money procpool_decode(procpool::reader& in, procpool::type_tag<money>) {
    auto cents = procpool::decode<std::int64_t>(in);
    std::size_t at = in.offset();
    auto currency = procpool::decode<std::string>(in);
    if (currency.size() != 3) throw procpool::decode_error(at, "a currency has 3 letters");
    return money(cents, std::move(currency));
  }

  std::int64_t cents_ = 0;
  std::string currency_ = "EUR";
};

/// A recursive aggregate: a tree.
struct tree {
  std::string label;
  std::vector<tree> children;
  friend bool operator==(const tree& a, const tree& b) {
    return a.label == b.label && a.children == b.children;
  }
};

/// Everything at once, nested.
struct document {
  std::vector<leaf> leaves;
  std::map<std::string, std::optional<scalar>> attributes;
  std::unordered_map<std::uint16_t, std::set<std::int32_t>> index;
  std::vector<bool> mask;
  std::deque<std::pair<std::int8_t, std::string>> log;
  std::list<money> prices;
  std::tuple<color, std::optional<bool>, std::chrono::milliseconds> header;
  std::multimap<std::int16_t, point> by_key;
  std::unordered_set<std::string> names;
  std::vector<std::monostate> blanks;
  tree outline;
  friend bool operator==(const document& a, const document& b) {
    return std::tie(a.leaves, a.attributes, a.index, a.mask, a.log, a.prices, a.header, a.by_key,
                    a.names, a.blanks,
                    a.outline) == std::tie(b.leaves, b.attributes, b.index, b.mask, b.log, b.prices,
                                           b.header, b.by_key, b.names, b.blanks, b.outline);
  }
};

using wide = std::variant<std::monostate, std::u16string, std::array<color, 2>, std::complex<float>,
                          std::chrono::nanoseconds>;
using sequences = std::tuple<std::optional<bool>, std::vector<bool>, std::deque<std::int8_t>,
                             std::list<std::string>>;
using multi = std::pair<std::unordered_multimap<std::int8_t, std::uint64_t>,
                        std::unordered_multiset<std::uint32_t>>;

/// The types an input can select, in selector order.
using selectable =
    std::tuple<document, std::vector<exact_double>, std::string,
               std::map<std::string, std::int32_t>, std::vector<std::vector<std::monostate>>, wide,
               sequences, multi, tree, std::vector<money>, std::multiset<std::int8_t>>;

inline constexpr std::size_t type_count = std::tuple_size_v<selectable>;

template <class T>
bool equal(const T& a, const T& b) {
  if constexpr (std::is_same_v<T, wide>) {
    // std::complex<float> may hold NaN: compare the encodings instead.
    return procpool::encode(a) == procpool::encode(b);
  } else {
    return a == b;
  }
}

/// The bytes of a buffer given to a streamed reader in pieces of at most
/// `piece` bytes (more when more are wanted), no more than `hold` at once:
/// as a ring smaller than the message gives them. Each piece is a copy of
/// its own, freed when the next is asked for, so that a decoder that reads
/// past a piece, or keeps a pointer into one it gave up, trips the sanitizers.
class piece_source final : public procpool::detail::reader_source {
 public:
  piece_source(const std::byte* data, std::size_t size, std::size_t piece, std::size_t hold)
      : data_(data), size_(size), piece_(piece), hold_(hold) {}
  piece next(std::size_t from, std::size_t want) override {
    if (from < from_ || from > size_) std::abort();  // a streamed reader never goes back
    from_ = from;
    ++pieces;
    std::size_t left = size_ - from;
    std::size_t n = std::min({left, hold_, std::max(want, piece_)});
    copy_ = std::make_unique<std::byte[]>(n + 1);
    if (n != 0) std::memcpy(copy_.get(), data_ + from, n);
    return {copy_.get(), n};
  }
  std::size_t pieces = 0;

 private:
  const std::byte* data_;
  std::size_t size_;
  std::size_t piece_;
  std::size_t hold_;
  std::size_t from_ = 0;
  std::unique_ptr<std::byte[]> copy_;
};

/// Where a streaming writer puts a value's bytes, a window of at most `most`
/// bytes at a time (`piece` when less is wanted), each a buffer of its own
/// freed when done, so that a write past a window trips the sanitizers; what
/// is done is gathered in `bytes`. Counting, it keeps nothing.
class piece_sink final : public procpool::detail::writer_sink {
 public:
  piece_sink(std::size_t piece, std::size_t most, bool count) : piece_(piece), most_(most) {
    counts_only = count;
  }
  std::pair<std::byte*, std::size_t> window(std::size_t want) override {
    n_ = std::min(std::max(want, piece_), most_);
    window_ = std::make_unique<std::byte[]>(n_);
    return {window_.get(), n_};
  }
  void done(std::size_t n) override {
    if (n > n_) std::abort();
    if (!counts_only) bytes.insert(bytes.end(), window_.get(), window_.get() + n);
  }
  std::vector<std::byte> bytes;

 private:
  std::size_t piece_, most_, n_ = 0;
  std::unique_ptr<std::byte[]> window_;
};

/// Encodes `value` through a writer that streams (windows of `piece` to
/// `most` bytes) and through one that only counts: both must give its
/// plain encoding, `want`.
template <class T>
void check_streamed(const T& value, const std::vector<std::byte>& want, std::size_t piece,
                    std::size_t most) {
  using procpool::detail::writer_streams;
  procpool::writer sizer;
  piece_sink counter(piece, most, true);
  writer_streams::start(sizer, counter);
  procpool::encode(sizer, value);
  if (writer_streams::stop(sizer).first != want.size()) std::abort();
  procpool::writer stream;
  piece_sink sink(piece, most, false);
  writer_streams::start(stream, sink);
  procpool::encode(stream, value);
  auto [written, last] = writer_streams::stop(stream);
  if (written != want.size() || last > want.size()) std::abort();
  if (sink.bytes.size() != written - last) std::abort();
  if (!std::equal(sink.bytes.begin(), sink.bytes.end(), want.begin())) std::abort();
}

/// Decodes `size` bytes as a `T`; on success checks the round trip and
/// returns true.
template <class T>
bool check(const std::byte* data, std::size_t size) {
  T first;
  // The same bytes given in pieces, as a message larger than its ring
  // comes: accepted or refused alike, to the same value.
  std::optional<T> piecewise;
  {
    piece_source source(data, size, 1 + size % 7, 1 + size % 61);
    procpool::reader in(source, size);
    try {
      T v = procpool::decode<T>(in);
      if (in.at_end()) piecewise = std::move(v);
    } catch (const procpool::decode_error&) {
    }
  }
  try {
    first = procpool::decode<T>(data, size);
  } catch (const procpool::decode_error&) {
    if (piecewise) std::abort();
    return false;  // rejected, as it should be
  }
  if (!piecewise || !equal(first, *piecewise)) std::abort();
  std::vector<std::byte> bytes = procpool::encode(first);
  T second;
  try {
    second = procpool::decode<T>(bytes);
  } catch (const procpool::decode_error&) {
    std::abort();  // a value's own encoding must decode
  }
  if (!equal(first, second)) std::abort();
  if (procpool::encode(second).size() != bytes.size()) std::abort();
  // Written as a result longer than a ring is: sized, then window by window.
  check_streamed(first, bytes, 1 + size % 13, 1 + size % 97);
  return true;
}

template <std::size_t... I>
bool dispatch(std::size_t which, const std::byte* data, std::size_t size,
              std::index_sequence<I...>) {
  bool accepted = false;
  ((which == I ? (accepted = check<std::tuple_element_t<I, selectable>>(data, size)) : false), ...);
  return accepted;
}

/// Runs one input: the first byte selects a type, the rest is decoded as one.
/// Returns whether it decoded; aborts if its round trip fails.
inline bool accepts(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return false;
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  return dispatch(data[0] % type_count, bytes + 1, size - 1,
                  std::make_index_sequence<type_count>{});
}

/// The body of LLVMFuzzerTestOneInput.
inline int one_input(const std::uint8_t* data, std::size_t size) {
  accepts(data, size);
  return 0;
}

template <class T, std::size_t... I>
constexpr std::size_t index_of(std::index_sequence<I...>) {
  std::size_t found = type_count;
  ((std::is_same_v<T, std::tuple_element_t<I, selectable>> ? found = I : 0), ...);
  return found;
}

/// One seed: a valid input for `one_input`.
template <class T>
std::vector<std::byte> seed(const T& value) {
  constexpr std::size_t index = index_of<T>(std::make_index_sequence<type_count>{});
  static_assert(index < type_count, "not a selectable type");
  std::vector<std::byte> bytes{std::byte{static_cast<unsigned char>(index)}};
  std::vector<std::byte> body = procpool::encode(value);
  bytes.insert(bytes.end(), body.begin(), body.end());
  return bytes;
}

/// The seed corpus in tests/fuzz/corpus/codec: file name and content.
inline std::vector<std::pair<std::string, std::vector<std::byte>>> seeds() {
  using namespace std::chrono_literals;
  std::vector<std::pair<std::string, std::vector<std::byte>>> out;
  auto add = [&](std::string name, std::vector<std::byte> bytes) {
    out.emplace_back(std::move(name), std::move(bytes));
  };

  leaf plain{"plain", std::nullopt, false, color::red, {0, 0, 0}};
  leaf full{"full",
            scalar{std::vector<point>{{1, -2, {0.5}}, {3, 4, {-1e300}}}},
            true,
            color::blue,
            {1, 2, 3}};
  leaf text{"text", scalar{std::string("hello")}, true, color::green, {9, 8, 7}};
  leaf number{"number", scalar{std::int64_t{-42}}, false, color::red, {255, 0, 1}};
  leaf blank{"", scalar{std::monostate{}}, true, color::blue, {0, 1, 0}};
  leaf yes{"yes", scalar{true}, false, color::green, {4, 4, 4}};

  document empty_doc{};
  document doc;
  doc.leaves = {plain, full, text, number, blank, yes};
  doc.attributes = {{"a", std::nullopt}, {"b", scalar{std::string("x")}}, {"c", scalar{false}}};
  doc.index = {{1, {1, 2, 3}}, {65535, {}}, {7, {-1}}};
  doc.mask = {true, false, true, true, false, false, true, false, true};
  doc.log = {{-1, "start"}, {2, ""}, {127, "end"}};
  doc.prices = {money(100, "EUR"), money(-5, "USD")};
  doc.header = {color::green, true, 1500ms};
  doc.by_key = {{1, {0, 0, {0.0}}}, {1, {1, 1, {1.0}}}, {-3, {5, 6, {7.0}}}};
  doc.names = {"ann", "bob", ""};
  doc.blanks = std::vector<std::monostate>(4);
  doc.outline = tree{"root", {tree{"a", {}}, tree{"b", {tree{"c", {}}}}}};

  add("document-empty", seed(empty_doc));
  add("document-full", seed(doc));
  document small;
  small.leaves = {full};
  small.outline.label = "only";
  add("document-one-leaf", seed(small));

  add("doubles-empty", seed(std::vector<exact_double>{}));
  add("doubles", seed(std::vector<exact_double>{{0.0}, {-0.0}, {1.5}, {1e-310}, {-2.25}}));
  add("string-empty", seed(std::string()));
  add("string", seed(std::string("procpool\0codec", 14)));
  add("map-empty", seed(std::map<std::string, std::int32_t>{}));
  add("map", seed(std::map<std::string, std::int32_t>{{"one", 1}, {"two", 2}, {"zz", -1}}));
  add("monostates", seed(std::vector<std::vector<std::monostate>>{{}, {{}, {}}, {{}}}));
  add("wide-empty", seed(wide{}));
  add("wide-u16", seed(wide{std::u16string(u"h\u00e9llo")}));
  add("wide-colors", seed(wide{std::array<color, 2>{color::blue, color::red}}));
  add("wide-complex", seed(wide{std::complex<float>(1.5f, -2.0f)}));
  add("wide-duration", seed(wide{std::chrono::nanoseconds(123456789)}));
  add("sequences-empty", seed(sequences{}));
  add("sequences", seed(sequences{false,
                                  {true, true, false, true, false, true, true, true, true, false},
                                  {1, -2, 3},
                                  {"x", "", "yz"}}));
  add("multi", seed(multi{{{1, 10}, {1, 11}, {-1, 0}}, {5, 5, 6}}));
  add("tree-leaf", seed(tree{"leaf", {}}));
  add("tree-deep", seed(tree{"1", {tree{"2", {tree{"3", {tree{"4", {}}}}}}, tree{"5", {}}}}));
  add("money", seed(std::vector<money>{money(1, "EUR"), money(-99, "JPY")}));
  add("multiset", seed(std::multiset<std::int8_t>{-1, -1, 0, 3, 3, 3}));
  return out;
}

}  // namespace codec_fuzz
