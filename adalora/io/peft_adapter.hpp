#pragma once
// Trained AdaLoRA adapters as PEFT's adapter files, and back (docs/algorithm.md §7).
//
// What PEFT writes for AdaLoRA (PeftModel.save_pretrained with safe serialization):
//   adapter_model.safetensors  per adapted module, with the adapter name stripped from the keys,
//       base_model.model.<module path>.lora_A   (kept, in)    F32 (the model's dtype)
//       base_model.model.<module path>.lora_E   (kept, 1)
//       base_model.model.<module path>.lora_B   (out, kept)
//     already resized to the rank pattern (get_peft_model_state_dict ->
//     resize_state_dict_by_rank_pattern keeps the True rows of A and E and the True columns of B);
//     a module with no kept triplet has kept = 0. `ranknum` is not stored. Metadata
//     {"format": "pt"}.
//   adapter_config.json  AdaLoraConfig as JSON (sorted keys): peft_type "ADALORA", init_r,
//     target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step, lora_alpha,
//     target_modules, ..., and rank_pattern {"<module path>.lora_E": [bool × init_r]} (null if no
//     mask has happened yet).
// On load PEFT builds every module at init_r, then resize_modules_by_rank_pattern re-creates it
// at rank sum(pattern) and copies the OLD ranknum (= init_r) back (when the kept rank is > 0),
// so the denominator ranknum + 1e-5 is unchanged. The re-creation also recomputes
// scaling = lora_alpha if lora_alpha > 0 else r with r the KEPT rank, so with lora_alpha = 0 a
// resized module computes kept / init_r of what its masked twin did. Therefore:
//   * exporting writes the lora_alpha that makes PEFT's rule give adalora's scaling: lora_alpha
//     itself when > 0, init_r when 0 (adalora's rule for 0 is scaling = init_r, also after
//     resize); see peft_alpha_for();
//   * importing applies PEFT's rule: with lora_alpha = 0 a module of the rank_pattern gets
//     scaling = its kept rank, any other scaling = init_r; ranknum stays init_r. Each module
//     becomes an svd_adapter<T> of rank `kept` whose adapter_scale keeps r_init = init_r, and
//     it computes what PEFT's loaded module computes;
//   * target_modules, unless the config names its own, is written as one regular expression
//     that PEFT matches in full against each module path (re.fullmatch) and that matches
//     exactly the saved modules, so that PEFT wraps no other layer that shares their names.
//
// Depends on nlohmann/json; the core never includes this header.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/io/file_io.hpp"
#include "adalora/io/json_limits.hpp"
#include "adalora/io/rank_pattern_json.hpp"
#include "adalora/io/safetensors.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// The file names PEFT uses inside an adapter directory.
inline constexpr const char* peft_weights_file = "adapter_model.safetensors";
inline constexpr const char* peft_config_file = "adapter_config.json";
/// The prefix PeftModel puts before every module path in the state dict.
inline constexpr std::string_view peft_key_prefix = "base_model.model.";

/// PEFT's AdaLoraConfig, the fields that describe an AdaLoRA run (names and defaults as in PEFT's
/// config.py; docs/algorithm.md §9). JSON names are the members' names except delta_t -> "deltaT" and
/// pattern -> "rank_pattern".
struct peft_adalora_config {
  std::int64_t init_r = 12;      ///< initial rank of every module
  std::int64_t target_r = 8;     ///< target AVERAGE rank: the final budget is target_r · modules
  std::int64_t tinit = 0;        ///< warm-up steps
  std::int64_t tfinal = 0;       ///< length of the final phase
  std::int64_t delta_t = 1;      ///< "deltaT": mask every delta_t steps
  double beta1 = 0.85;           ///< sensitivity EMA
  double beta2 = 0.85;           ///< uncertainty EMA
  double orth_reg_weight = 0.5;  ///< regularizer weight
  std::int64_t total_step = 0;   ///< T; PEFT requires > 0
  /// adalora's rule: scaling = lora_alpha (> 0) or init_r (0), for every module, resized or
  /// not. PEFT's rule differs for 0 after a resize (see the header comment); the writer and the
  /// reader translate.
  double lora_alpha = 8;
  double lora_dropout = 0;
  /// PEFT's "target_modules" as a list of names (PEFT matches a module whose path equals a name
  /// or ends with "." + name). Left empty (and target_modules_regex unset), the writer writes a
  /// regular expression that matches exactly the saved modules' paths.
  std::vector<std::string> target_modules;
  /// PEFT's other form of "target_modules": one regular expression a module path must match in
  /// full. Set when a config that has it is read; written instead of target_modules.
  std::optional<std::string> target_modules_regex;
  /// "rank_pattern": the kept flags of every module (names are module paths, without
  /// ".lora_E"); absent (JSON null) before the first mask event.
  std::optional<rank_pattern> pattern;
  std::string base_model_name_or_path;
  /// Every other field of a config that was read (task_type, bias, fan_in_fan_out, revision,
  /// ...). Written back unchanged, so a PEFT config survives a read/write round trip.
  nlohmann::json other = nlohmann::json::object();
};

/// One adapted module, for export: its module path and a view of its FULL-rank (init_r)
/// parameters, masked or not, or of an adapter already resized to the pattern.
template <class T>
struct peft_module_ref {
  std::string name;
  svd_adapter_ref<const T> params;
};

/// One imported module: its module path and an adapter of rank `kept` with r_init = init_r.
template <class T>
struct peft_module {
  std::string name;
  svd_adapter<T> adapter;
};

/// Adapters read from (or to be written as) PEFT's files.
template <class T>
struct peft_adapter {
  peft_adalora_config config;
  std::vector<peft_module<T>> modules;
  /// Tensors of the file that are not lora_A / lora_B / lora_E of a module (PEFT also saves
  /// biases with bias="all"/"lora_only" and modules_to_save weights); they are not imported.
  std::vector<std::string> ignored_tensors;

  /// The module with this path, or nullptr.
  const peft_module<T>* find(std::string_view name) const noexcept {
    for (const auto& m : modules)
      if (m.name == name) return &m;
    return nullptr;
  }
};

/// Options of save_peft_adapter.
struct peft_save_options {
  /// How tensors are stored. PEFT stores the model's dtype; F32 is what it writes for a float32
  /// model and what the issue asks for. F64 keeps double adapters bit-exact.
  st_dtype dtype = st_dtype::F32;
  /// Written as "__metadata__"; PEFT (through torch) writes {"format": "pt"}.
  std::vector<std::pair<std::string, std::string>> metadata = {{"format", "pt"}};
};

namespace detail::peft {

inline void validate_config(const peft_adalora_config& c, const char* where) {
  ADALORA_REQUIRE(c.init_r >= 0, where, "init_r must be >= 0, got ", c.init_r);
  ADALORA_REQUIRE(c.target_r >= 0, where, "target_r must be >= 0, got ", c.target_r);
  ADALORA_REQUIRE(c.total_step > 0, where,
                  "total_step must be > 0 (PEFT's AdaLoraConfig refuses anything else), got ",
                  c.total_step);
  ADALORA_REQUIRE(c.tinit >= 0 && c.tfinal >= 0, where, "tinit and tfinal must be >= 0, got ",
                  c.tinit, " and ", c.tfinal);
  ADALORA_REQUIRE(c.tinit < c.total_step - c.tfinal, where,
                  "tinit must be < total_step - tfinal (PEFT refuses a config with no budgeting "
                  "phase), got tinit = ", c.tinit, ", total_step = ", c.total_step,
                  ", tfinal = ", c.tfinal);
  ADALORA_REQUIRE(c.delta_t >= 1, where, "deltaT must be >= 1, got ", c.delta_t);
  ADALORA_REQUIRE(std::isfinite(c.orth_reg_weight) && c.orth_reg_weight >= 0, where,
                  "orth_reg_weight must be finite and >= 0, got ", c.orth_reg_weight);
  ADALORA_REQUIRE(std::isfinite(c.lora_alpha) && c.lora_alpha >= 0, where,
                  "lora_alpha must be finite and >= 0, got ", c.lora_alpha);
  ADALORA_REQUIRE(c.beta1 > 0 && c.beta1 < 1 && c.beta2 > 0 && c.beta2 < 1, where,
                  "beta1 and beta2 must be in (0, 1), got ", c.beta1, " and ", c.beta2);
  if (c.pattern)
    for (const auto& e : c.pattern->entries())
      ADALORA_REQUIRE(static_cast<std::int64_t>(e.kept.size()) == c.init_r, where,
                      "rank_pattern entry '", e.name, "' must have init_r = ", c.init_r,
                      " flags, got ", e.kept.size());
}

/// A JSON number as an int64: PEFT writes ints, but a float with an integral value is fine.
/// The range is checked before converting (a double beyond int64 would be undefined behaviour).
template <class Json>
std::int64_t get_int(const Json& j, const char* field, const std::string& file) {
  auto refuse = [&](const char* why) {
    throw std::invalid_argument(detail::concat("adalora::read_peft_config: '", file, "': \"", field,
                                               "\" must be ", why, ", got ", json_excerpt(j)));
  };
  if (j.is_number_integer() && !j.is_number_unsigned()) return j.template get<std::int64_t>();
  if (j.is_number_unsigned()) {
    const auto u = j.template get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      refuse("an integer in the range of a 64-bit signed integer");
    return static_cast<std::int64_t>(u);
  }
  if (!j.is_number_float()) refuse("an integer");
  const double d = j.template get<double>();
  if (!std::isfinite(d) || std::floor(d) != d) refuse("an integer");
  // [-2^63, 2^63): both bounds are exact doubles.
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0))
    refuse("an integer in the range of a 64-bit signed integer");
  return static_cast<std::int64_t>(d);
}

template <class Json>
double get_number(const Json& j, const char* field, const std::string& file) {
  ADALORA_REQUIRE(j.is_number(), "read_peft_config", "'", file, "': \"", field,
                  "\" must be a number, got ", json_excerpt(j));
  return j.template get<double>();
}

/// lora_alpha is an int in PEFT's dataclass; write it as one when it is integral.
inline nlohmann::json number_json(double v) {
  if (std::floor(v) == v && std::fabs(v) < 9.0e15) return static_cast<std::int64_t>(v);
  return v;
}

/// A regular expression that Python's re.fullmatch (PEFT's test for a string target_modules)
/// matches against exactly these module paths: the paths, every character that is not a
/// letter, digit or '_' escaped with a backslash (a literal in Python's syntax), joined by '|'.
inline std::string exact_paths_regex(const std::vector<std::string>& paths) {
  std::string re;
  for (std::size_t i = 0; i < paths.size(); ++i) {
    if (i) re += '|';
    for (const char ch : paths[i]) {
      const auto u = static_cast<unsigned char>(ch);
      const bool plain = (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') ||
                         (u >= '0' && u <= '9') || u == '_' || u >= 0x80;
      if (!plain) re += '\\';
      re += ch;
    }
  }
  return re;
}

/// adapter_config.json's content, with `alpha` written as lora_alpha.
inline nlohmann::json config_json(const peft_adalora_config& config,
                                  const std::vector<std::string>& module_paths, double alpha) {
  nlohmann::json j = config.other.is_object() ? config.other : nlohmann::json::object();
  j["peft_type"] = "ADALORA";
  j["init_r"] = config.init_r;
  j["target_r"] = config.target_r;
  j["tinit"] = config.tinit;
  j["tfinal"] = config.tfinal;
  j["deltaT"] = config.delta_t;
  j["beta1"] = config.beta1;
  j["beta2"] = config.beta2;
  j["orth_reg_weight"] = config.orth_reg_weight;
  j["total_step"] = config.total_step;
  j["lora_alpha"] = number_json(alpha);
  j["lora_dropout"] = config.lora_dropout;
  if (config.target_modules_regex)
    j["target_modules"] = *config.target_modules_regex;
  else if (!config.target_modules.empty())
    j["target_modules"] = config.target_modules;
  else if (!module_paths.empty())
    j["target_modules"] = exact_paths_regex(module_paths);
  else  // an empty expression would match the model's root module ("")
    j["target_modules"] = nlohmann::json::array();
  if (config.pattern) {
    nlohmann::json rp = nlohmann::json::object();
    for (const auto& e : config.pattern->entries()) rp[e.name + ".lora_E"] = e.kept;
    j["rank_pattern"] = rp;
  } else {
    j["rank_pattern"] = nullptr;
  }
  j["base_model_name_or_path"] = config.base_model_name_or_path.empty()
                                     ? nlohmann::json(nullptr)
                                     : nlohmann::json(config.base_model_name_or_path);
  // PEFT's defaults for the LoRA fields AdaLoRA inherits, unless the config that was read had
  // its own; a saved adapter is for inference.
  const std::pair<const char*, nlohmann::json> defaults[] = {
      {"bias", "none"},          {"fan_in_fan_out", false},   {"init_lora_weights", true},
      {"inference_mode", true},  {"modules_to_save", nullptr}, {"task_type", nullptr},
      {"layers_to_transform", nullptr}, {"layers_pattern", nullptr}, {"revision", nullptr}};
  for (const auto& [key, value] : defaults)
    if (!j.contains(key)) j[key] = value;
  return j;
}

/// The scale PEFT gives a module after loading (see the header comment): lora_alpha if > 0;
/// otherwise its kept rank if the rank_pattern resizes it (`kept` >= 0), init_r if not (-1).
template <class T>
adapter_scale<T> peft_loaded_scale(double lora_alpha, std::int64_t init_r, std::int64_t kept) {
  if (lora_alpha > 0 || kept < 0) return adapter_scale<T>(lora_alpha, init_r);
  // A module resized to rank 0 adds nothing whatever its scale.
  return adapter_scale<T>(static_cast<double>(kept), init_r);
}

}  // namespace detail::peft

/// The lora_alpha to write into adapter_config.json so that PEFT, applying its own rule on load,
/// gives every module the scaling adalora gives it under `config`: config.lora_alpha when > 0,
/// init_r when 0 (PEFT would otherwise scale a module resized to k kept triplets by k / init_r).
inline double peft_alpha_for(const peft_adalora_config& config) {
  return config.lora_alpha > 0 ? config.lora_alpha : static_cast<double>(config.init_r);
}

/// adapter_config.json's content for `config` (sorted keys, as PEFT writes it), for the
/// modules `module_paths`. lora_alpha is written as peft_alpha_for(config); target_modules as
/// the config has it, or else a regular expression that matches exactly `module_paths`.
inline nlohmann::json to_peft_config_json(const peft_adalora_config& config,
                                          const std::vector<std::string>& module_paths = {}) {
  detail::peft::validate_config(config, "to_peft_config_json");
  return detail::peft::config_json(config, module_paths, peft_alpha_for(config));
}

/// Reads adapter_config.json's content. Throws std::invalid_argument unless peft_type is
/// "ADALORA" and the AdaLoRA fields present have the right types and ranges; fields missing take
/// PEFT's defaults. Fields this struct does not model go to `other`. Json is nlohmann::json or
/// nlohmann::ordered_json; with ordered_json (what read_peft_config parses) the rank_pattern
/// keeps the file's order. A value nested deeper than max_json_depth is refused.
template <class Json>
peft_adalora_config peft_config_from_json(const Json& j,
                                          const std::string& file = "adapter_config.json") {
  constexpr const char* where = "read_peft_config";
  // Deeper values would overflow the stack where they are copied or printed.
  const std::size_t depth = detail::json_io::depth(j);
  ADALORA_REQUIRE(depth <= max_json_depth, where, "'", file, "' nests arrays and objects ", depth,
                  " levels deep, more than the ", max_json_depth, " adalora reads");
  ADALORA_REQUIRE(j.is_object(), where, "'", file, "' must hold a JSON object, got ",
                  j.type_name());
  const auto peft_type = j.find("peft_type");
  ADALORA_REQUIRE(peft_type != j.end() && *peft_type == "ADALORA", where, "'", file,
                  "' must have \"peft_type\": \"ADALORA\", got ",
                  peft_type != j.end() ? json_excerpt(*peft_type) : std::string("none"));
  peft_adalora_config c;
  c.other = nlohmann::json::object();
  using detail::peft::get_int;
  using detail::peft::get_number;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    if (k == "peft_type") continue;
    if (k == "init_r") c.init_r = get_int(v, "init_r", file);
    else if (k == "target_r") c.target_r = get_int(v, "target_r", file);
    else if (k == "tinit") c.tinit = get_int(v, "tinit", file);
    else if (k == "tfinal") c.tfinal = get_int(v, "tfinal", file);
    else if (k == "deltaT") c.delta_t = get_int(v, "deltaT", file);
    else if (k == "total_step") c.total_step = v.is_null() ? 0 : get_int(v, "total_step", file);
    else if (k == "beta1") c.beta1 = get_number(v, "beta1", file);
    else if (k == "beta2") c.beta2 = get_number(v, "beta2", file);
    else if (k == "orth_reg_weight") c.orth_reg_weight = get_number(v, "orth_reg_weight", file);
    else if (k == "lora_alpha") c.lora_alpha = get_number(v, "lora_alpha", file);
    else if (k == "lora_dropout") c.lora_dropout = get_number(v, "lora_dropout", file);
    else if (k == "base_model_name_or_path")
      c.base_model_name_or_path = v.is_string() ? v.template get<std::string>() : std::string();
    else if (k == "target_modules") {
      // PEFT allows a list of names or one regular expression.
      if (v.is_string()) {
        c.target_modules_regex = v.template get<std::string>();
      } else if (v.is_array()) {
        for (const auto& s : v) {
          ADALORA_REQUIRE(s.is_string(), where, "'", file,
                          "': \"target_modules\" must hold strings, got ", json_excerpt(s));
          c.target_modules.push_back(s.template get<std::string>());
        }
      } else {
        ADALORA_REQUIRE(v.is_null(), where, "'", file,
                        "': \"target_modules\" must be a list, a string or null, got ",
                        json_excerpt(v));
      }
    } else if (k == "rank_pattern") {
      if (!v.is_null()) {
        try {
          c.pattern = rank_pattern_from_peft_json(v);
        } catch (const std::invalid_argument& e) {
          throw std::invalid_argument(std::string("adalora::read_peft_config: '") + file +
                                      "': \"rank_pattern\": " + e.what());
        }
      }
    } else {
      c.other[k] = nlohmann::json(v);
    }
  }
  ADALORA_REQUIRE(c.init_r >= 0, where, "'", file, "': init_r must be >= 0, got ", c.init_r);
  ADALORA_REQUIRE(std::isfinite(c.lora_alpha) && c.lora_alpha >= 0, where, "'", file,
                  "': lora_alpha must be finite and >= 0, got ", c.lora_alpha);
  if (c.pattern)
    for (const auto& e : c.pattern->entries())
      ADALORA_REQUIRE(static_cast<std::int64_t>(e.kept.size()) == c.init_r, where, "'", file,
                      "': rank_pattern entry '", e.name, ".lora_E' must have init_r = ", c.init_r,
                      " flags, got ", e.kept.size());
  return c;
}

/// The largest adapter_config.json read_peft_config reads (PEFT's are a few KB).
inline constexpr std::uint64_t max_peft_config_bytes = std::uint64_t{64} << 20;

/// Reads adapter_config.json from a file (a regular file of at most max_peft_config_bytes).
/// Throws std::runtime_error if it cannot be read, std::invalid_argument if it is not an
/// AdaLoRA config (see peft_config_from_json), not JSON, nested too deep or has a duplicate key.
inline peft_adalora_config read_peft_config(const std::filesystem::path& file) {
  const std::string name = file.string();
  const auto text = read_file_for<char>("read_peft_config", name, max_peft_config_bytes);
  nlohmann::ordered_json j;
  try {
    j = parse_json_strictly<nlohmann::ordered_json>(std::string_view(text.data(), text.size()));
  } catch (const detail::json_io::bad_json& e) {
    throw std::invalid_argument("adalora::read_peft_config: '" + name + "': " + e.what());
  }
  return peft_config_from_json(j, name);
}

/// The safetensors content PEFT would save for `modules` under `config` (see the header
/// comment). A module listed in config.pattern is resized to its kept triplets unless it already
/// has rank sum(pattern); any other module must have rank init_r. Throws std::invalid_argument
/// for a bad config, duplicate or empty module names, a pattern entry with no module, or shapes
/// that do not fit.
template <class T>
safetensors_writer peft_safetensors(const peft_adalora_config& config,
                                    std::span<const peft_module_ref<T>> modules,
                                    const peft_save_options& options = {}) {
  static_assert(std::is_floating_point_v<T>, "adalora::peft_safetensors: T must be float or double");
  constexpr const char* where = "save_peft_adapter";
  detail::peft::validate_config(config, where);
  std::set<std::string> names;
  for (const auto& m : modules) {
    ADALORA_REQUIRE(!m.name.empty() && names.insert(m.name).second, where,
                    "module names must be non-empty and unique, got '", m.name, "'");
    m.params.check_shapes(where, m.name.c_str());
  }
  if (config.pattern)
    for (const auto& e : config.pattern->entries())
      ADALORA_REQUIRE(names.count(e.name), where, "rank_pattern entry '", e.name,
                      "' names no module being saved");

  safetensors_writer w;
  for (const auto& [key, value] : options.metadata) w.set_metadata(key, value);
  for (const auto& m : modules) {
    const rank_pattern::entry* e = config.pattern ? config.pattern->find(m.name) : nullptr;
    const index_t r = m.params.rank();
    const std::string prefix = std::string(peft_key_prefix) + m.name;
    auto add = [&](const svd_adapter_ref<const T>& p) {
      w.add<T>(prefix + ".lora_A", p.A, options.dtype);
      w.add<T>(prefix + ".lora_B", p.B, options.dtype);
      w.add<T>(prefix + ".lora_E", p.E, {p.rank(), 1}, options.dtype);
    };
    if (e == nullptr || r != static_cast<index_t>(e->kept.size())) {
      // Not in the pattern (full rank), or already resized to it.
      if (e == nullptr)
        ADALORA_REQUIRE(r == config.init_r, where, "module '", m.name, "' has rank ", r,
                        " and no rank_pattern entry, so it must have init_r = ", config.init_r);
      else
        ADALORA_REQUIRE(r == e->kept_count(), where, "module '", m.name, "' has rank ", r,
                        "; expected init_r = ", e->kept.size(), " (to be resized) or the kept "
                        "count ", e->kept_count(), " of its rank_pattern entry (already resized)");
      add(m.params);
      continue;
    }
    // Resize: the True rows of A and E, the True columns of B (resize_state_dict_by_rank_pattern).
    const index_t kept = e->kept_count();
    svd_adapter<T> resized(m.params.in_features(), m.params.out_features(), kept,
                           adapter_scale<T>(config.lora_alpha, config.init_r));
    resize_adapter<T>(m.params, e->kept, resized.params());
    add(resized.params());
  }
  return w;
}

namespace detail::peft {

/// Writes both files, with `alpha` as the config's lora_alpha. Each file is replaced atomically.
template <class T>
void write_files(const std::filesystem::path& dir, const peft_adalora_config& config,
                 std::span<const peft_module_ref<T>> modules, const peft_save_options& options,
                 double alpha) {
  constexpr const char* where = "adalora::save_peft_adapter: '";
  const safetensors_writer w = peft_safetensors<T>(config, modules, options);
  std::vector<std::string> paths;
  for (const auto& m : modules) paths.push_back(m.name);
  std::string text;
  try {
    text = config_json(config, paths, alpha).dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(detail::concat(where, dir.string(), "': the config cannot be written "
                                               "as JSON (", e.what(), "); are all its strings UTF-8?"));
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    throw std::runtime_error(detail::concat(where, dir.string(), "': cannot create the directory (",
                                            ec.message(), ")"));
  w.write(dir / peft_weights_file);
  write_file_for("save_peft_adapter", (dir / peft_config_file).string(), std::string_view(text));
}

/// The lora_alpha under which PEFT's rule gives every module of an imported (or user-built)
/// adapter the scale it has: the config's own value if that works (a PEFT file read back), else
/// adalora's translation peft_alpha_for(). Throws std::invalid_argument if neither does.
template <class T>
double alpha_for_modules(const peft_adapter<T>& adapter) {
  const peft_adalora_config& c = adapter.config;
  const peft_module<T>* misfit = nullptr;
  for (const double alpha : {c.lora_alpha, peft_alpha_for(c)}) {
    misfit = nullptr;
    for (const auto& m : adapter.modules) {
      if (m.adapter.rank() == 0) continue;  // adds nothing, whatever its scale
      const rank_pattern::entry* e = c.pattern ? c.pattern->find(m.name) : nullptr;
      const auto peft = peft_loaded_scale<T>(alpha, c.init_r, e ? e->kept_count() : -1);
      if (peft.scaling() != m.adapter.scale().scaling() || peft.rn() != m.adapter.scale().rn()) {
        misfit = &m;
        break;
      }
    }
    if (misfit == nullptr) return alpha;
  }
  throw std::invalid_argument(detail::concat(
      "adalora::save_peft_adapter: module '", misfit->name, "' has scaling ",
      misfit->adapter.scale().scaling(), " and r_init ", misfit->adapter.r_init(),
      ", which PEFT cannot reproduce with one lora_alpha for all modules and init_r = ", c.init_r,
      " (PEFT gives every module scaling = lora_alpha, or with lora_alpha = 0 its kept rank, and "
      "ranknum = init_r)"));
}

}  // namespace detail::peft

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json as PEFT does (creating
/// `dir` if needed), each replaced atomically. lora_alpha is written as peft_alpha_for(config),
/// so that PEFT computes what these adapters compute under adalora's rule. See
/// peft_safetensors() for what is checked.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adalora_config& config,
                       std::span<const peft_module_ref<T>> modules,
                       const peft_save_options& options = {}) {
  detail::peft::write_files<T>(dir, config, modules, options, peft_alpha_for(config));
}

/// Same, for a vector of modules.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adalora_config& config,
                       const std::vector<peft_module_ref<T>>& modules,
                       const peft_save_options& options = {}) {
  save_peft_adapter<T>(dir, config, std::span<const peft_module_ref<T>>(modules), options);
}

/// Writes adapters that were imported (already resized) back out. Each module keeps the scale
/// it has: lora_alpha is written so that PEFT's rule reproduces it (for a file PEFT wrote, its
/// own lora_alpha; see detail::peft::alpha_for_modules).
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adapter<T>& adapter,
                       const peft_save_options& options = {}) {
  std::vector<peft_module_ref<T>> refs;
  for (const auto& m : adapter.modules) refs.push_back({m.name, m.adapter.params()});
  detail::peft::write_files<T>(dir, adapter.config, std::span<const peft_module_ref<T>>(refs),
                               options, detail::peft::alpha_for_modules(adapter));
}

/// Builds adapters from a parsed adapter_model.safetensors and its config (see the header
/// comment). Modules come in rank_pattern order, then the others in key order. A module's
/// tensors must be A (k × in), B (out × k) and E (k × 1, or k) with the same k; with a
/// rank_pattern entry k must be its kept count (a file resized as PEFT saves it) or init_r (a
/// file that was not resized: it is resized here, as PEFT's load does); without one, k must be
/// init_r. Throws std::invalid_argument naming the file, the module and the tensor otherwise.
template <class T>
peft_adapter<T> peft_adapter_from(const safetensors_file& file, peft_adalora_config config) {
  static_assert(std::is_floating_point_v<T>, "adalora::load_peft_adapter: T must be float or double");
  constexpr const char* where = "load_peft_adapter";
  peft_adapter<T> result{std::move(config), {}, {}};
  const peft_adalora_config& c = result.config;

  // Module paths, from the keys "<prefix><path>.lora_{A,B,E}".
  std::vector<std::string> paths;
  std::set<std::string> seen;
  for (const auto& t : file.tensors()) {
    const std::string& key = t.name;
    bool is_adapter_tensor = false;
    for (const char* suffix : {".lora_A", ".lora_B", ".lora_E"}) {
      const std::string_view s(suffix);
      if (key.size() > s.size() && key.compare(key.size() - s.size(), s.size(), s) == 0) {
        std::string path = key.substr(0, key.size() - s.size());
        if (path.rfind(peft_key_prefix, 0) == 0) path = path.substr(peft_key_prefix.size());
        if (!path.empty() && seen.insert(path).second) paths.push_back(path);
        is_adapter_tensor = !path.empty();
      }
    }
    if (!is_adapter_tensor) result.ignored_tensors.push_back(key);
  }
  std::sort(paths.begin(), paths.end());
  std::vector<std::string> ordered;
  if (c.pattern) {
    for (const auto& e : c.pattern->entries()) {
      ADALORA_REQUIRE(seen.count(e.name), where, "'", file.source(), "' has no tensors for module '",
                      e.name, "' of the rank_pattern (expected keys ", peft_key_prefix, e.name,
                      ".lora_A/.lora_B/.lora_E)");
      ordered.push_back(e.name);
    }
  }
  for (const auto& p : paths)
    if (std::find(ordered.begin(), ordered.end(), p) == ordered.end()) ordered.push_back(p);

  for (const auto& path : ordered) {
    auto tensor = [&](const char* suffix) -> const st_tensor_info& {
      for (const std::string& key :
           {std::string(peft_key_prefix) + path + suffix, path + suffix})
        if (const st_tensor_info* t = file.find(key)) return *t;
      throw std::invalid_argument(detail::concat("adalora::", where, ": '", file.source(),
                                                 "': module '", path, "' has no ", suffix + 1,
                                                 " tensor (expected key ", peft_key_prefix, path,
                                                 suffix, ")"));
    };
    const st_tensor_info& A = tensor(".lora_A");
    const st_tensor_info& B = tensor(".lora_B");
    const st_tensor_info& E = tensor(".lora_E");
    auto shape_str = [](const st_tensor_info& t) {
      std::string s = "(";
      for (std::size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
      return s + ")";
    };
    ADALORA_REQUIRE(A.shape.size() == 2, where, "'", file.source(), "': ", A.name,
                    " must be 2-D (kept, in), got shape ", shape_str(A));
    ADALORA_REQUIRE(B.shape.size() == 2, where, "'", file.source(), "': ", B.name,
                    " must be 2-D (out, kept), got shape ", shape_str(B));
    ADALORA_REQUIRE(E.shape.size() == 1 || (E.shape.size() == 2 && E.shape[1] == 1), where, "'",
                    file.source(), "': ", E.name, " must be (kept, 1), got shape ", shape_str(E));
    const std::int64_t k = A.shape[0], in = A.shape[1], out = B.shape[0];
    ADALORA_REQUIRE(B.shape[1] == k && E.shape[0] == k, where, "'", file.source(), "': module '",
                    path, "' tensors disagree on the rank: lora_A ", shape_str(A), ", lora_B ",
                    shape_str(B), ", lora_E ", shape_str(E));
    const rank_pattern::entry* e = c.pattern ? c.pattern->find(path) : nullptr;
    const bool resize_here = e != nullptr && k == c.init_r && e->kept_count() != k;
    if (e != nullptr)
      ADALORA_REQUIRE(k == e->kept_count() || k == c.init_r, where, "'", file.source(),
                      "': module '", path, "' has rank ", k, ", but its rank_pattern keeps ",
                      e->kept_count(), " of init_r = ", c.init_r);
    else
      ADALORA_REQUIRE(k == c.init_r, where, "'", file.source(), "': module '", path,
                      "' has rank ", k, " and no rank_pattern entry, so it must have init_r = ",
                      c.init_r);

    // PEFT's rule (see the header comment): with lora_alpha = 0 a module of the rank_pattern is
    // scaled by its kept rank.
    svd_adapter<T> a(in, out, k,
                     detail::peft::peft_loaded_scale<T>(c.lora_alpha, c.init_r,
                                                        e != nullptr ? e->kept_count() : -1));
    auto p = a.params();
    file.copy_values<T>(A.name, std::span<T>(p.A.data(), static_cast<std::size_t>(p.A.size())));
    file.copy_values<T>(B.name, std::span<T>(p.B.data(), static_cast<std::size_t>(p.B.size())));
    file.copy_values<T>(E.name, std::span<T>(p.E.data(), static_cast<std::size_t>(p.E.size())));
    if (resize_here) a.resize(e->kept);
    result.modules.push_back({path, std::move(a)});
  }
  return result;
}

/// Reads `dir`/adapter_model.safetensors and `dir`/adapter_config.json (PEFT's or ours) into
/// adapters for inference or merge. See peft_adapter_from() for what is accepted.
template <class T>
peft_adapter<T> load_peft_adapter(const std::filesystem::path& dir) {
  peft_adalora_config config = read_peft_config(dir / peft_config_file);
  const safetensors_file file = safetensors_file::read(dir / peft_weights_file);
  return peft_adapter_from<T>(file, std::move(config));
}

}  // namespace adalora
