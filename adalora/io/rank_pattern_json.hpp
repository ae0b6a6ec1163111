#pragma once
// Rank patterns as JSON, in the forms the reference implementations write (SPEC §7):
//   PEFT    (adapter_config.json "rank_pattern"):  {"<name>.lora_E": [true, false, ...], ...}
//           during training the keys also carry the adapter name: "<name>.lora_E.default";
//   loralib (rank_pattern.json):                    {"<name>.lora_E": <kept count>, ...}.
// Depends on nlohmann/json (Debian nlohmann-json3-dev); the core never includes this header.

#include <nlohmann/json.hpp>

#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/rank_pattern.hpp"

namespace adalora {

/// PEFT's form, keys "<name>.lora_E" in the pattern's order.
inline nlohmann::ordered_json to_peft_json(const rank_pattern& p) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& e : p.entries()) j[e.name + ".lora_E"] = e.kept;
  return j;
}

/// loralib's form, keys "<name>.lora_E", values the kept counts.
inline nlohmann::ordered_json to_loralib_json(const rank_pattern& p) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& e : p.entries()) j[e.name + ".lora_E"] = e.kept_count();
  return j;
}

/// Reads PEFT's form (keys "<name>.lora_E" or "<name>.lora_E.<adapter>", values bool lists).
/// loralib's counts say how many but not which triplets were kept, so they are refused.
template <class Json>
rank_pattern rank_pattern_from_peft_json(const Json& j) {
  constexpr const char* where = "rank_pattern_from_peft_json";
  ADALORA_REQUIRE(j.is_object(), where, "expected a JSON object {\"<name>.lora_E\": [bool, ...]}, got ",
                  j.type_name());
  rank_pattern p;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto pos = key.rfind(".lora_E");
    ADALORA_REQUIRE(pos != std::string::npos && pos > 0 &&
                        (pos + 7 == key.size() || key[pos + 7] == '.'),
                    where, "key '", key, "' must be \"<name>.lora_E\" or \"<name>.lora_E.<adapter>\"");
    const auto& v = it.value();
    ADALORA_REQUIRE(!v.is_number(), where, "key '", key,
                    "' holds a kept count (loralib's form), which does not say which triplets "
                    "were kept; a list of booleans (PEFT's form) is needed");
    ADALORA_REQUIRE(v.is_array(), where, "key '", key, "' must hold a list of booleans, got ",
                    v.type_name());
    std::vector<bool> kept;
    kept.reserve(v.size());
    for (const auto& b : v) {
      ADALORA_REQUIRE(b.is_boolean(), where, "key '", key,
                      "' must hold only booleans, found ", b.type_name());
      kept.push_back(b.template get<bool>());
    }
    p.add(key.substr(0, pos), std::move(kept));
  }
  return p;
}

/// Writes PEFT's form to `path` (pretty-printed).
inline void write_rank_pattern_json(const rank_pattern& p, const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("adalora::write_rank_pattern_json: cannot open '" + path + "'");
  out << to_peft_json(p).dump(2) << '\n';
  if (!out) throw std::runtime_error("adalora::write_rank_pattern_json: write to '" + path + "' failed");
}

/// Reads PEFT's form from `path`: either the bare pattern object or a whole adapter_config.json
/// (then its "rank_pattern" member is used).
inline rank_pattern read_rank_pattern_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("adalora::read_rank_pattern_json: cannot open '" + path + "'");
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("adalora::read_rank_pattern_json: '" + path +
                                "' is not valid JSON: " + e.what());
  }
  if (j.is_object() && j.contains("rank_pattern")) return rank_pattern_from_peft_json(j["rank_pattern"]);
  return rank_pattern_from_peft_json(j);
}

}  // namespace adalora
