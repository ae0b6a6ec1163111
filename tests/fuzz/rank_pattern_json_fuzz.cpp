// libFuzzer target: arbitrary bytes as a rank pattern in JSON (PEFT's form, bare or inside an
// adapter_config.json), read exactly as read_rank_pattern_json reads a file's text. Build and run
// with tests/fuzz/run_fuzzers.sh; seeds in tests/fuzz/corpus/rank_pattern_json_fuzz (deeply
// nested documents, duplicate keys and huge numbers among them).
//
// Must never crash, leak or trip a sanitizer. Invalid JSON (too deep, a duplicate key) and
// invalid patterns are refused with std::invalid_argument; any other exception escapes and
// libFuzzer reports it. A pattern that reads must survive a round trip through to_peft_json
// unchanged, and its JSON forms must serialise.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string_view>

#include "adalora/io/rank_pattern_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  adalora::rank_pattern p;
  try {
    p = adalora::detail::rank_pattern_io::from_text(text, "fuzz");
  } catch (const std::invalid_argument&) {
    return 0;
  }
  const auto again = adalora::detail::rank_pattern_io::from_text(adalora::to_peft_json(p).dump(2), "fuzz round trip");
  if (!(again == p)) {
    std::fprintf(stderr, "fuzz: a rank pattern changed in a JSON round trip\n");
    std::abort();
  }
  (void)adalora::to_loralib_json(p).dump();
  return 0;
}
