// libFuzzer target: arbitrary bytes as a rank pattern in JSON (PEFT's form, bare or inside an
// adapter_config.json), read as read_rank_pattern_json reads a file. Build and run with
// tests/fuzz/run_fuzzers.sh; seeds in tests/fuzz/corpus/rank_pattern_json_fuzz.
//
// Must never crash, leak or trip a sanitizer. Invalid JSON and invalid patterns are refused
// (nlohmann's parse errors, std::invalid_argument from the reader); any other exception escapes
// and libFuzzer reports it. A pattern that reads must survive a round trip through
// to_peft_json unchanged.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "adalora/io/rank_pattern_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto j = nlohmann::ordered_json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  adalora::rank_pattern p;
  try {
    // What read_rank_pattern_json does with a parsed file.
    p = j.is_object() && j.contains("rank_pattern") ? adalora::rank_pattern_from_peft_json(j["rank_pattern"])
                                                    : adalora::rank_pattern_from_peft_json(j);
  } catch (const std::invalid_argument&) {
    return 0;
  }
  const auto again = adalora::rank_pattern_from_peft_json(adalora::to_peft_json(p));
  if (!(again == p)) {
    std::fprintf(stderr, "fuzz: a rank pattern changed in a JSON round trip\n");
    std::abort();
  }
  (void)adalora::to_loralib_json(p).dump();
  return 0;
}
