#pragma once
// JSON from files, read defensively: every adalora reader of JSON (safetensors headers,
// adapter_config.json, rank patterns) parses through parse_json_strictly, and describes values
// in error messages through json_excerpt.
//
// Why: nlohmann/json parses and destroys iteratively, but dump(), copies and comparisons recurse
// once per level, so a 200 KB document nested 100,000 deep overflows the stack wherever a value
// is copied or printed. A limit on the depth, enforced while parsing (before such a document
// exists in memory), removes that whole class of crash; no file adalora reads nests more than
// a few levels. The same pass refuses duplicate keys, which nlohmann would silently resolve to
// the last one: a file that says two things about one key is refused, not half-read.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "adalora/config.hpp"

namespace adalora {

/// The deepest nesting of arrays and objects adalora accepts in a JSON file (a safetensors
/// header needs 3 levels, adapter_config.json 3 or 4).
inline constexpr std::size_t max_json_depth = 64;

namespace detail::json_io {

/// A JSON document that is refused: not JSON, too deep, or with a duplicate key. The message is
/// the reason only; callers put their function and file in front.
struct bad_json : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// The nesting depth of a value (a scalar is 0, [] is 1, [[1]] is 2), without recursion, so that
/// it is safe on any value a user built.
template <class Json>
std::size_t depth(const Json& root) {
  std::size_t deepest = 0;
  std::vector<std::pair<const Json*, std::size_t>> todo{{&root, 0}};
  while (!todo.empty()) {
    const auto [j, d] = todo.back();
    todo.pop_back();
    if (!j->is_structured()) continue;
    deepest = std::max(deepest, d + 1);
    for (const auto& child : *j) todo.push_back({&child, d + 1});
  }
  return deepest;
}

}  // namespace detail::json_io

/// Parses `text` as JSON, refusing documents nested deeper than max_json_depth and objects with
/// a duplicate key. Throws detail::json_io::bad_json (a std::invalid_argument) with the reason.
template <class Json = nlohmann::json>
Json parse_json_strictly(std::string_view text) {
  using detail::json_io::bad_json;
  // One set of keys per open object; arrays push an empty marker so that the stack depth is the
  // nesting depth.
  std::vector<std::set<std::string>> keys;
  const auto check = [&](int depth, typename Json::parse_event_t event, Json& parsed) {
    using event_t = typename Json::parse_event_t;
    switch (event) {
      case event_t::object_start:
      case event_t::array_start:
        if (static_cast<std::size_t>(depth) >= max_json_depth)
          throw bad_json(detail::concat("it nests arrays and objects more than ", max_json_depth,
                                        " levels deep"));
        keys.emplace_back();
        break;
      case event_t::object_end:
      case event_t::array_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.template get<std::string>()).second)
          throw bad_json(detail::concat("the key \"", parsed.template get<std::string>(),
                                        "\" appears twice in one object"));
        break;
      case event_t::value:
        break;
    }
    return true;
  };
  // nlohmann stops at a NUL as at the end of input, so "{...}\0{...}" would be read as its first
  // half; JSON text never holds a raw NUL.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos)
    throw bad_json(detail::concat("it is not valid JSON (a NUL byte at byte ", nul, ")"));
  try {
    return Json::parse(text.begin(), text.end(), check);
  } catch (const nlohmann::json::exception& e) {
    throw bad_json(detail::concat("it is not valid JSON (", e.what(), ")"));
  }
}

/// A short description of `value` for an error message: its JSON text up to `max_chars`
/// characters, or "an array/object nested N levels deep" when it is deeper than max_json_depth.
/// Never recurses past max_json_depth and never throws on invalid UTF-8 (replaced by U+FFFD).
template <class Json>
std::string json_excerpt(const Json& value, std::size_t max_chars = 120) {
  const std::size_t d = detail::json_io::depth(value);
  if (d > max_json_depth)
    return detail::concat(value.is_array() ? "an array" : "an object", " nested ", d, " levels deep");
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > max_chars) {
    std::size_t cut = max_chars;  // not inside a UTF-8 sequence: back off its continuation bytes
    while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
    text = text.substr(0, cut) + "... (" + std::to_string(text.size()) + " characters)";
  }
  return text;
}

namespace detail::json_io {

/// Throws std::invalid_argument "adalora::<where>: <what> <excerpt> is not valid UTF-8, which
/// JSON requires" unless `s` can be written as a JSON string (nlohmann's dump() would otherwise
/// fail later with its own type_error, far from the name or value that caused it).
inline void require_utf8(const char* where, const std::string& what, const std::string& s) {
  try {
    (void)nlohmann::json(s).dump();
  } catch (const nlohmann::json::type_error&) {
    throw std::invalid_argument(concat("adalora::", where, ": ", what, " ",
                                       json_excerpt(nlohmann::json(s)),
                                       " is not valid UTF-8, which JSON requires"));
  }
}

}  // namespace detail::json_io

}  // namespace adalora
