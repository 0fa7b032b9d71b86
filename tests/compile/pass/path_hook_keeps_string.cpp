// Hooks for std::filesystem::path declared in namespace procpool, as the guide
// says for a type of another library, serve paths only: std::string, which
// converts to a path, stays sendable by the built-in rule.
#include <procpool/pool.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace procpool {
inline void procpool_encode(writer& out, const std::filesystem::path& p) {
  encode(out, p.string());
}
inline std::filesystem::path procpool_decode(reader& in, type_tag<std::filesystem::path>) {
  return std::filesystem::path(decode<std::string>(in));
}
}  // namespace procpool

static_assert(procpool::is_sendable_v<std::filesystem::path>);
static_assert(procpool::is_sendable_v<std::string>);
static_assert(procpool::is_sendable_v<std::vector<std::string>>);
static_assert(procpool::is_sendable_v<std::map<std::string, int>>);

void run() {
  procpool::pool p([](const std::string& s) { return std::filesystem::path(s); });
  std::vector<std::filesystem::path> paths = p.map(std::vector<std::string>{"/a", "/b"});
  static_cast<void>(paths);
}
