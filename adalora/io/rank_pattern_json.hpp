#pragma once
// Rank patterns as JSON, in the forms the reference implementations write (docs/algorithm.md §7):
//   PEFT    (adapter_config.json "rank_pattern"):  {"<name>.lora_E": [true, false, ...], ...}
//           during training the keys also carry the adapter name: "<name>.lora_E.default";
//   loralib (rank_pattern.json):                    {"<name>.lora_E": <kept count>, ...}.
// Depends on nlohmann/json (Debian nlohmann-json3-dev); the core never includes this header.
//
// Files are read whole through read_regular_file (a directory, FIFO or device is refused before
// a byte is read) and parsed through parse_json_strictly (no nesting deeper than max_json_depth,
// no duplicate keys); values quoted in errors go through json_excerpt, so that a hostile value
// (nested 100,000 deep, megabytes long, not UTF-8) gives a short message and never a crash.
// Files are written atomically (write_file_atomically).

#include <nlohmann/json.hpp>

#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/io/file_io.hpp"
#include "adalora/io/json_limits.hpp"
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
/// loralib's counts say how many but not which triplets were kept, so they are refused. Two keys
/// for one module ("x.lora_E" and "x.lora_E.default") are refused.
template <class Json>
rank_pattern rank_pattern_from_peft_json(const Json& j) {
  constexpr const char* where = "rank_pattern_from_peft_json";
  ADALORA_REQUIRE(j.is_object(), where, "expected a JSON object {\"<name>.lora_E\": [bool, ...]}, got ",
                  json_excerpt(j));
  rank_pattern p;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    // Keys are quoted as JSON strings: bounded, and printable even when not UTF-8.
    const auto quoted = [&] { return json_excerpt(Json(key)); };
    const auto pos = key.rfind(".lora_E");
    ADALORA_REQUIRE(pos != std::string::npos && pos > 0 &&
                        (pos + 7 == key.size() || key[pos + 7] == '.'),
                    where, "key ", quoted(), " must be \"<name>.lora_E\" or \"<name>.lora_E.<adapter>\"");
    const auto& v = it.value();
    ADALORA_REQUIRE(!v.is_number(), where, "key ", quoted(), " holds a kept count (loralib's form, ",
                    json_excerpt(v), "), which does not say which triplets were kept; a list of "
                    "booleans (PEFT's form) is needed");
    ADALORA_REQUIRE(v.is_array(), where, "key ", quoted(), " must hold a list of booleans, got ",
                    json_excerpt(v));
    std::vector<bool> kept;
    kept.reserve(v.size());
    for (const auto& b : v) {
      ADALORA_REQUIRE(b.is_boolean(), where, "key ", quoted(), " must hold only booleans, found ",
                      json_excerpt(b));
      kept.push_back(b.template get<bool>());
    }
    std::string name = key.substr(0, pos);
    ADALORA_REQUIRE(p.find(name) == nullptr, where, "key ", quoted(), " names module ",
                    json_excerpt(Json(name)), " a second time");
    p.add(std::move(name), std::move(kept));
  }
  return p;
}

namespace detail::rank_pattern_io {

/// What read_rank_pattern_json does with a file's text; `source` names it in errors.
inline rank_pattern from_text(std::string_view text, const std::string& source) {
  const auto context = [&](const char* reason) {
    return std::invalid_argument(concat("adalora::read_rank_pattern_json: '", source, "': ", reason));
  };
  nlohmann::ordered_json j;
  try {
    j = parse_json_strictly<nlohmann::ordered_json>(text);
  } catch (const json_io::bad_json& e) {
    throw context(e.what());
  }
  try {
    if (j.is_object() && j.contains("rank_pattern")) return rank_pattern_from_peft_json(j["rank_pattern"]);
    return rank_pattern_from_peft_json(j);
  } catch (const std::invalid_argument& e) {
    throw context(e.what());
  }
}

}  // namespace detail::rank_pattern_io

/// Writes PEFT's form to `path` (pretty-printed), atomically: a failure leaves any previous file
/// at `path` as it was. Throws std::invalid_argument for a module name that is not UTF-8 (JSON
/// cannot hold it), std::runtime_error on an I/O error.
inline void write_rank_pattern_json(const rank_pattern& p, const std::string& path) {
  for (const auto& e : p.entries())
    detail::json_io::require_utf8("write_rank_pattern_json", "'" + path + "': module name", e.name);
  const std::string text = to_peft_json(p).dump(2) + '\n';
  write_file_for("write_rank_pattern_json", path, std::string_view(text));
}

/// Reads PEFT's form from `path`: either the bare pattern object or a whole adapter_config.json
/// (then its "rank_pattern" member is used). Throws std::runtime_error if the file cannot be
/// read (missing, not a regular file, too large for memory), std::invalid_argument if it is not
/// JSON, nests too deep, repeats a key or is not a valid pattern.
inline rank_pattern read_rank_pattern_json(const std::string& path) {
  const auto text = read_file_for<char>("read_rank_pattern_json", path);
  return detail::rank_pattern_io::from_text(std::string_view(text.data(), text.size()), path);
}

}  // namespace adalora
