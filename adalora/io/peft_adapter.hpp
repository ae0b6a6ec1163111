#pragma once
// Trained AdaLoRA adapters as PEFT's adapter files, and back (SPEC §7).
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
// at rank sum(pattern) and copies the OLD ranknum (= init_r) back, so scaling / (ranknum + 1e-5)
// is unchanged and the resized adapter computes exactly what the masked one did. Importing here
// does the same: each module becomes an svd_adapter<T> of rank `kept` whose adapter_scale keeps
// r_init = init_r.
//
// Depends on nlohmann/json; the core never includes this header.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
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
/// config.py; SPEC §9). JSON names are the members' names except delta_t -> "deltaT" and
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
  double lora_alpha = 8;         ///< scaling = lora_alpha (> 0) or init_r (0)
  double lora_dropout = 0;
  /// Module names PEFT matched (the last component of each module path). Left empty, the
  /// writer fills it from the module paths.
  std::vector<std::string> target_modules;
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

/// A JSON number as an integer: PEFT writes ints, but a float with an integral value is fine.
inline std::int64_t get_int(const nlohmann::json& j, const char* field, const std::string& file) {
  ADALORA_REQUIRE(j.is_number() && (!j.is_number_float() || std::floor(j.get<double>()) == j.get<double>()),
                  "read_peft_config", "'", file, "': \"", field, "\" must be an integer, got ",
                  j.dump());
  return j.is_number_float() ? static_cast<std::int64_t>(j.get<double>()) : j.get<std::int64_t>();
}

inline double get_number(const nlohmann::json& j, const char* field, const std::string& file) {
  ADALORA_REQUIRE(j.is_number(), "read_peft_config", "'", file, "': \"", field,
                  "\" must be a number, got ", j.dump());
  return j.get<double>();
}

/// lora_alpha is an int in PEFT's dataclass; write it as one when it is integral.
inline nlohmann::json number_json(double v) {
  if (std::floor(v) == v && std::fabs(v) < 9.0e15) return static_cast<std::int64_t>(v);
  return v;
}

/// The last component of a module path ("model.layers.0.q_proj" -> "q_proj").
inline std::string last_component(const std::string& path) {
  const auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

}  // namespace detail::peft

/// adapter_config.json's content for `config` (sorted keys, as PEFT writes it).
inline nlohmann::json to_peft_config_json(const peft_adalora_config& config,
                                          const std::vector<std::string>& module_paths = {}) {
  detail::peft::validate_config(config, "to_peft_config_json");
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
  j["lora_alpha"] = detail::peft::number_json(config.lora_alpha);
  j["lora_dropout"] = config.lora_dropout;
  std::vector<std::string> targets = config.target_modules;
  if (targets.empty()) {
    std::set<std::string> unique;
    for (const auto& p : module_paths) unique.insert(detail::peft::last_component(p));
    targets.assign(unique.begin(), unique.end());
  }
  j["target_modules"] = targets;
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

/// Reads adapter_config.json's content. Throws std::invalid_argument unless peft_type is
/// "ADALORA" and the AdaLoRA fields present have the right types; fields missing take PEFT's
/// defaults. Fields this struct does not model go to `other`.
inline peft_adalora_config peft_config_from_json(const nlohmann::json& j,
                                                 const std::string& file = "adapter_config.json") {
  constexpr const char* where = "read_peft_config";
  ADALORA_REQUIRE(j.is_object(), where, "'", file, "' must hold a JSON object, got ",
                  j.type_name());
  ADALORA_REQUIRE(j.contains("peft_type") && j["peft_type"] == "ADALORA", where, "'", file,
                  "' must have \"peft_type\": \"ADALORA\", got ",
                  j.contains("peft_type") ? j["peft_type"].dump() : std::string("none"));
  peft_adalora_config c;
  c.other = nlohmann::json::object();
  using detail::peft::get_int;
  using detail::peft::get_number;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
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
      c.base_model_name_or_path = v.is_string() ? v.get<std::string>() : std::string();
    else if (k == "target_modules") {
      // PEFT allows a list of names or one regex string.
      if (v.is_string()) {
        c.target_modules = {v.get<std::string>()};
      } else if (v.is_array()) {
        for (const auto& s : v) {
          ADALORA_REQUIRE(s.is_string(), where, "'", file,
                          "': \"target_modules\" must hold strings, got ", s.dump());
          c.target_modules.push_back(s.get<std::string>());
        }
      } else {
        ADALORA_REQUIRE(v.is_null(), where, "'", file,
                        "': \"target_modules\" must be a list, a string or null, got ",
                        v.dump());
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
      c.other[k] = v;
    }
  }
  ADALORA_REQUIRE(c.init_r >= 0, where, "'", file, "': init_r must be >= 0, got ", c.init_r);
  if (c.pattern)
    for (const auto& e : c.pattern->entries())
      ADALORA_REQUIRE(static_cast<std::int64_t>(e.kept.size()) == c.init_r, where, "'", file,
                      "': rank_pattern entry '", e.name, ".lora_E' must have init_r = ", c.init_r,
                      " flags, got ", e.kept.size());
  return c;
}

/// Reads adapter_config.json from a file.
inline peft_adalora_config read_peft_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("adalora::read_peft_config: cannot open '" + file.string() + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("adalora::read_peft_config: '" + file.string() +
                                "' is not valid JSON: " + e.what());
  }
  return peft_config_from_json(j, file.string());
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

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json as PEFT does (creating
/// `dir` if needed). See peft_safetensors() for what is checked.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adalora_config& config,
                       std::span<const peft_module_ref<T>> modules,
                       const peft_save_options& options = {}) {
  const safetensors_writer w = peft_safetensors<T>(config, modules, options);
  std::vector<std::string> paths;
  for (const auto& m : modules) paths.push_back(m.name);
  const nlohmann::json j = to_peft_config_json(config, paths);
  std::filesystem::create_directories(dir);
  w.write(dir / peft_weights_file);
  const auto config_path = dir / peft_config_file;
  std::ofstream out(config_path, std::ios::trunc);
  if (!out)
    throw std::runtime_error("adalora::save_peft_adapter: cannot open '" + config_path.string() + "'");
  out << j.dump(2) << '\n';
  if (!out)
    throw std::runtime_error("adalora::save_peft_adapter: write to '" + config_path.string() +
                             "' failed");
}

/// Same, for a vector of modules.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adalora_config& config,
                       const std::vector<peft_module_ref<T>>& modules,
                       const peft_save_options& options = {}) {
  save_peft_adapter<T>(dir, config, std::span<const peft_module_ref<T>>(modules), options);
}

/// Writes adapters that were imported (already resized) back out.
template <class T>
void save_peft_adapter(const std::filesystem::path& dir, const peft_adapter<T>& adapter,
                       const peft_save_options& options = {}) {
  std::vector<peft_module_ref<T>> refs;
  for (const auto& m : adapter.modules) refs.push_back({m.name, m.adapter.params()});
  save_peft_adapter<T>(dir, adapter.config, std::span<const peft_module_ref<T>>(refs), options);
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

  const adapter_scale<T> scale(c.lora_alpha, c.init_r);
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

    svd_adapter<T> a(in, out, k, scale);
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
