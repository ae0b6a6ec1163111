// libFuzzer target: arbitrary bytes as PEFT's adapter_config.json, parsed as adalora parses JSON
// files (parse_json_strictly) and read with peft_config_from_json. Build and run with
// tests/fuzz/run_fuzzers.sh; seeds in tests/fuzz/corpus/peft_config_fuzz (PEFT's own config,
// deeply nested documents, duplicate keys, NUL padding and numbers no integer holds among them).
//
// Must never crash, leak or trip a sanitizer (float-cast-overflow included: 1e300 as init_r).
// Invalid JSON and invalid configs are refused with std::invalid_argument; any other exception
// escapes and libFuzzer reports it. A config that reads and that to_peft_config_json accepts must
// read back from its written JSON with the same values, and writing that again must give the
// same JSON. (The writer may refuse, with std::invalid_argument, a config the reader accepts: a
// config saved for inference may lack total_step, which the writer requires.)

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#include "adalora/io/json_limits.hpp"
#include "adalora/io/peft_adapter.hpp"

namespace {

[[noreturn]] void broken(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "fuzz: %s%s%s\n", what, detail.empty() ? "" : ": ", detail.c_str());
  std::abort();
}

/// b was read from what a was written as. lora_alpha is written as peft_alpha_for(a) (init_r in
/// place of 0, so that PEFT's rule gives adalora's scaling).
bool same_values(const adalora::peft_adalora_config& a, const adalora::peft_adalora_config& b) {
  return a.init_r == b.init_r && a.target_r == b.target_r && a.tinit == b.tinit &&
         a.tfinal == b.tfinal && a.delta_t == b.delta_t && a.beta1 == b.beta1 &&
         a.beta2 == b.beta2 && a.orth_reg_weight == b.orth_reg_weight &&
         a.total_step == b.total_step && adalora::peft_alpha_for(a) == b.lora_alpha &&
         a.lora_dropout == b.lora_dropout && a.target_modules == b.target_modules &&
         a.target_modules_regex == b.target_modules_regex && a.pattern == b.pattern &&
         a.base_model_name_or_path == b.base_model_name_or_path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  adalora::peft_adalora_config config;
  try {
    config = adalora::peft_config_from_json(adalora::parse_json_strictly(text), "fuzz");
  } catch (const std::invalid_argument&) {
    return 0;
  }
  nlohmann::json written;
  try {
    written = adalora::to_peft_config_json(config);
  } catch (const std::invalid_argument&) {
    return 0;
  }
  adalora::peft_adalora_config again;
  try {
    again = adalora::peft_config_from_json(adalora::parse_json_strictly(written.dump(2)), "fuzz round trip");
  } catch (const std::invalid_argument& e) {
    broken("a written adapter_config.json does not read back", e.what());
  }
  if (!same_values(config, again)) broken("a PEFT config changed in a write/read round trip");
  if (adalora::to_peft_config_json(again) != written)
    broken("writing a PEFT config read back from its own JSON gives different JSON");
  return 0;
}
