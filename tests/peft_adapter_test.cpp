// PEFT-compatible adapter files: export (resized to the rank pattern), import (r = kept,
// r_init = init_r), round trips with identical outputs, files laid out as PEFT writes them, and
// clear errors for files that do not fit.

#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "adalora/io/peft_adapter.hpp"
#include "adalora/io/safetensors.hpp"
#include "adalora/svd_adapter.hpp"

namespace {

namespace fs = std::filesystem;
using adalora::index_t;

fs::path temp_dir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const fs::path dir = fs::path(tmp ? tmp : fs::temp_directory_path().string()) / name;
  fs::remove_all(dir);
  return dir;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

template <class T>
std::vector<T> run_forward(const adalora::svd_adapter<T>& a, const std::vector<T>& x, index_t n) {
  std::vector<T> y(static_cast<std::size_t>(n * a.out_features()), T(0));
  adalora::adapter_workspace<T> ws;
  adalora::adapter_forward<T>(a.params(), a.scale(),
                              adalora::make_matrix_view<const T>(x.data(), n, a.in_features()),
                              adalora::make_matrix_view(y.data(), n, a.out_features()), ws);
  return y;
}

/// Three trained-looking adapters of rank 6 (E != 0), a pattern that keeps 3, 0 and 6 triplets.
template <class T>
struct trained_set {
  std::vector<std::string> names = {"model.encoder.layer.0.attention.query",
                                    "model.encoder.layer.0.attention.value",
                                    "model.encoder.layer.1.output.dense"};
  std::vector<adalora::svd_adapter<T>> adapters;
  adalora::rank_pattern pattern;
  adalora::peft_adalora_config config;

  trained_set() {
    std::mt19937_64 rng(3);
    std::normal_distribution<T> normal(T(0), T(1));
    const index_t shapes[3][2] = {{10, 7}, {10, 7}, {7, 12}};
    for (int l = 0; l < 3; ++l) {
      adapters.emplace_back(shapes[l][0], shapes[l][1], 6, /*alpha=*/16.0);
      auto p = adapters.back().params();
      for (index_t i = 0; i < p.A.size(); ++i) p.A.data()[i] = normal(rng) * T(0.3);
      for (index_t i = 0; i < p.E.size(); ++i) p.E.data()[i] = normal(rng);
      for (index_t i = 0; i < p.B.size(); ++i) p.B.data()[i] = normal(rng) * T(0.3);
    }
    pattern.add(names[0], {true, false, true, true, false, false});
    pattern.add(names[1], std::vector<bool>(6, false));
    pattern.add(names[2], std::vector<bool>(6, true));
    for (int l = 0; l < 3; ++l) adapters[std::size_t(l)].mask(pattern.entries()[std::size_t(l)].kept);
    config.init_r = 6;
    config.target_r = 3;
    config.tinit = 5;
    config.tfinal = 10;
    config.delta_t = 2;
    config.total_step = 50;
    config.lora_alpha = 16;
    config.orth_reg_weight = 0.1;
    config.pattern = pattern;
  }

  std::vector<adalora::peft_module_ref<T>> refs() const {
    std::vector<adalora::peft_module_ref<T>> r;
    for (std::size_t l = 0; l < adapters.size(); ++l) r.push_back({names[l], adapters[l].params()});
    return r;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("PEFT export, then import: resized adapters give the masked ones' outputs "
                   "exactly", "[peft]", float, double) {
  using T = TestType;
  const trained_set<T> set;
  const fs::path dir = temp_dir(std::string("peft_round_trip_") + (sizeof(T) == 4 ? "f32" : "f64"));
  // float is stored losslessly as F32 (PEFT's dtype); double needs F64 to be bit-exact.
  adalora::peft_save_options options;
  options.dtype = adalora::st_dtype_of<T>();
  adalora::save_peft_adapter<T>(dir, set.config, set.refs(), options);

  // The files say what PEFT's say.
  const auto file = adalora::safetensors_file::read(dir / adalora::peft_weights_file);
  REQUIRE(file.metadata().at("format") == "pt");
  REQUIRE(file.tensors().size() == 9);
  const std::string q = "base_model.model.model.encoder.layer.0.attention.query";
  REQUIRE(file.at(q + ".lora_A").shape == std::vector<std::int64_t>{3, 10});
  REQUIRE(file.at(q + ".lora_E").shape == std::vector<std::int64_t>{3, 1});
  REQUIRE(file.at(q + ".lora_B").shape == std::vector<std::int64_t>{7, 3});
  const std::string v = "base_model.model.model.encoder.layer.0.attention.value";
  REQUIRE(file.at(v + ".lora_A").shape == std::vector<std::int64_t>{0, 10});
  REQUIRE(file.at(v + ".lora_B").shape == std::vector<std::int64_t>{7, 0});
  const auto config = nlohmann::json::parse(slurp(dir / adalora::peft_config_file));
  REQUIRE(config["peft_type"] == "ADALORA");
  REQUIRE(config["init_r"] == 6);
  REQUIRE(config["deltaT"] == 2);
  REQUIRE(config["lora_alpha"] == 16);
  REQUIRE(config["lora_alpha"].is_number_integer());
  // One expression that PEFT matches in full against module paths: exactly these three.
  REQUIRE(config["target_modules"] ==
          "model\\.encoder\\.layer\\.0\\.attention\\.query|"
          "model\\.encoder\\.layer\\.0\\.attention\\.value|"
          "model\\.encoder\\.layer\\.1\\.output\\.dense");
  REQUIRE(config["rank_pattern"]["model.encoder.layer.0.attention.query.lora_E"] ==
          nlohmann::json({true, false, true, true, false, false}));
  REQUIRE(config["inference_mode"] == true);

  const auto loaded = adalora::load_peft_adapter<T>(dir);
  REQUIRE(loaded.modules.size() == 3);
  REQUIRE(loaded.ignored_tensors.empty());
  REQUIRE(loaded.config.pattern == set.pattern);
  REQUIRE(loaded.config.total_step == 50);
  REQUIRE(loaded.config.orth_reg_weight == 0.1);
  std::mt19937_64 rng(5);
  std::normal_distribution<T> normal(T(0), T(1));
  for (std::size_t l = 0; l < 3; ++l) {
    const auto& m = loaded.modules[l];
    REQUIRE(m.name == set.names[l]);
    REQUIRE(m.adapter.rank() == set.pattern.entries()[l].kept_count());
    REQUIRE(m.adapter.r_init() == 6);  // scaling / (ranknum + 1e-5) unchanged (docs/algorithm.md §7)
    const index_t n = 5;
    std::vector<T> x(static_cast<std::size_t>(n * m.adapter.in_features()));
    for (auto& e : x) e = normal(rng);
    REQUIRE(run_forward(m.adapter, x, n) == run_forward(set.adapters[l], x, n));  // bit for bit
    // Merging gives the same weights too.
    std::vector<T> w1(static_cast<std::size_t>(m.adapter.out_features() * m.adapter.in_features()), T(0.5));
    std::vector<T> w2 = w1;
    m.adapter.merge(adalora::make_matrix_view(w1.data(), m.adapter.out_features(), m.adapter.in_features()));
    set.adapters[l].merge(adalora::make_matrix_view(w2.data(), m.adapter.out_features(), m.adapter.in_features()));
    REQUIRE(w1 == w2);
  }

  // Exporting what was imported writes the same bytes again.
  const fs::path again = temp_dir(std::string("peft_round_trip_again_") + (sizeof(T) == 4 ? "f32" : "f64"));
  adalora::save_peft_adapter<T>(again, loaded, options);
  REQUIRE(slurp(again / adalora::peft_weights_file) == slurp(dir / adalora::peft_weights_file));
  REQUIRE(slurp(again / adalora::peft_config_file) == slurp(dir / adalora::peft_config_file));
}

TEST_CASE("PEFT import: an adapter laid out as PEFT saves it (tests/make_peft_fixture.py)",
          "[peft]") {
  const fs::path dir = "tests/data/peft_adalora";
  const auto loaded = adalora::load_peft_adapter<float>(dir);
  // Modules in rank_pattern order (PEFT sorts the config's keys).
  REQUIRE(loaded.modules.size() == 3);
  REQUIRE(loaded.modules[0].name == "model.layers.0.mlp.down_proj");
  REQUIRE(loaded.modules[0].adapter.rank() == 0);
  REQUIRE(loaded.modules[1].name == "model.layers.0.self_attn.q_proj");
  REQUIRE(loaded.modules[1].adapter.rank() == 2);
  REQUIRE(loaded.modules[2].adapter.rank() == 4);
  // bias="lora_only" made PEFT save the modules' biases: tolerated, reported, not imported.
  REQUIRE(loaded.ignored_tensors.size() == 3);
  REQUIRE(loaded.ignored_tensors[0] == "base_model.model.model.layers.0.mlp.down_proj.bias");
  const auto& c = loaded.config;
  REQUIRE(c.init_r == 4);
  REQUIRE(c.target_r == 2);
  REQUIRE(c.delta_t == 10);
  REQUIRE(c.tinit == 10);
  REQUIRE(c.tfinal == 20);
  REQUIRE(c.total_step == 100);
  REQUIRE(c.lora_alpha == 32);
  REQUIRE(c.base_model_name_or_path == "tiny-test-model");
  REQUIRE(c.target_modules == std::vector<std::string>{"q_proj", "down_proj"});
  REQUIRE(c.other["task_type"] == "CAUSAL_LM");   // kept for writing back
  REQUIRE(c.other["megatron_core"] == "megatron.core");

  // Outputs equal torch's for PEFT's formula on the full masked adapter.
  std::ifstream in(dir / "expected_forward.json");
  const auto expected = nlohmann::json::parse(in);
  for (const auto& m : loaded.modules) {
    const auto& e = expected["modules"][m.name];
    std::vector<float> x;
    for (const auto& row : e["x"])
      for (const auto& v : row) x.push_back(v.get<float>());
    const index_t n = static_cast<index_t>(e["x"].size());
    const auto y = run_forward(m.adapter, x, n);
    std::size_t k = 0;
    for (const auto& row : e["y"])
      for (const auto& v : row) {
        const float want = v.get<float>();
        INFO(m.name << " element " << k << ": torch " << want << ", adalora " << y[k]);
        REQUIRE(std::fabs(y[k] - want) <= 1e-6f * (1.0f + std::fabs(want)));
        ++k;
      }
    REQUIRE(k == y.size());
  }

  // Written back, the unmodelled PEFT fields survive.
  const fs::path out = temp_dir("peft_fixture_rewritten");
  adalora::save_peft_adapter<float>(out, loaded);
  const auto rewritten = adalora::read_peft_config(out / adalora::peft_config_file);
  REQUIRE(rewritten.other["task_type"] == "CAUSAL_LM");
  REQUIRE(rewritten.other["bias"] == "lora_only");
  REQUIRE(rewritten.pattern == c.pattern);
}

TEST_CASE("PEFT import: a file saved at full rank with a rank pattern is resized on load, as "
          "PEFT's load does", "[peft]") {
  trained_set<float> set;
  // Save without a pattern (full rank), then put the pattern into the config afterwards.
  auto config = set.config;
  config.pattern.reset();
  const auto w = adalora::peft_safetensors<float>(config, set.refs());
  const adalora::safetensors_file file(w.serialize(), "full_rank.safetensors");
  const auto loaded = adalora::peft_adapter_from<float>(file, set.config);
  REQUIRE(loaded.modules[0].adapter.rank() == 3);
  REQUIRE(loaded.modules[1].adapter.rank() == 0);
  std::vector<float> x(20, 0.25f);
  REQUIRE(run_forward(loaded.modules[0].adapter, x, 2) == run_forward(set.adapters[0], x, 2));
}

TEST_CASE("PEFT files that do not fit are refused with the file, module and reason", "[peft]") {
  trained_set<float> set;
  const auto good = adalora::peft_safetensors<float>(set.config, set.refs()).serialize();
  const adalora::safetensors_file file(good, "adapter_model.safetensors");

  SECTION("config") {
    REQUIRE_THROWS_WITH(adalora::peft_config_from_json(nlohmann::json{{"peft_type", "LORA"}}),
                        Catch::Contains("\"peft_type\": \"ADALORA\"") && Catch::Contains("LORA"));
    REQUIRE_THROWS_WITH(
        adalora::peft_config_from_json(nlohmann::json{{"peft_type", "ADALORA"}, {"init_r", "x"}}),
        Catch::Contains("init_r") && Catch::Contains("integer"));
    REQUIRE_THROWS_WITH(adalora::peft_config_from_json(nlohmann::json{
                            {"peft_type", "ADALORA"}, {"init_r", 4}, {"rank_pattern", {{"m.lora_E", {true}}}}}),
                        Catch::Contains("'m.lora_E'") && Catch::Contains("init_r = 4"));
    REQUIRE_THROWS_WITH(adalora::peft_config_from_json(nlohmann::json{
                            {"peft_type", "ADALORA"}, {"rank_pattern", {{"m.lora_E", 3}}}}),
                        Catch::Contains("rank_pattern") && Catch::Contains("kept count"));
    REQUIRE_THROWS_AS(adalora::read_peft_config("no/such/adapter_config.json"), std::runtime_error);
  }
  SECTION("pattern and tensors disagree") {
    auto c = set.config;
    adalora::rank_pattern p;
    p.add(set.names[0], {true, true, false, false, false, false});  // keeps 2, file has 3
    p.add(set.names[1], std::vector<bool>(6, false));
    p.add(set.names[2], std::vector<bool>(6, true));
    c.pattern = p;
    REQUIRE_THROWS_WITH(adalora::peft_adapter_from<float>(file, c),
                        Catch::Contains("adapter_model.safetensors") &&
                            Catch::Contains(set.names[0]) && Catch::Contains("has rank 3") &&
                            Catch::Contains("keeps 2"));
    p.add("model.missing", std::vector<bool>(6, true));
    c.pattern = p;
    REQUIRE_THROWS_WITH(adalora::peft_adapter_from<float>(file, c),
                        Catch::Contains("no tensors for module 'model.missing'"));
    c.pattern.reset();  // without a pattern every module must have init_r
    REQUIRE_THROWS_WITH(adalora::peft_adapter_from<float>(file, c),
                        Catch::Contains("no rank_pattern entry") && Catch::Contains("init_r = 6"));
  }
  SECTION("a tensor missing or of the wrong shape") {
    adalora::safetensors_writer w;
    std::vector<float> a(3 * 10), b(7 * 2), e(3);
    w.add<float>("base_model.model.m.lora_A", adalora::make_matrix_view<const float>(a.data(), 3, 10));
    w.add<float>("base_model.model.m.lora_E", adalora::vector_view<const float>(e.data(), 3), {3, 1});
    adalora::peft_adalora_config c;
    c.init_r = 3;
    c.total_step = 10;
    REQUIRE_THROWS_WITH(adalora::peft_adapter_from<float>(adalora::safetensors_file(w.serialize(), "f"), c),
                        Catch::Contains("module 'm' has no lora_B"));
    w.add<float>("base_model.model.m.lora_B", adalora::make_matrix_view<const float>(b.data(), 7, 2));
    REQUIRE_THROWS_WITH(adalora::peft_adapter_from<float>(adalora::safetensors_file(w.serialize(), "f"), c),
                        Catch::Contains("disagree on the rank") && Catch::Contains("(7, 2)"));
  }
  SECTION("export") {
    auto refs = set.refs();
    auto c = set.config;
    c.total_step = 0;
    REQUIRE_THROWS_WITH(adalora::peft_safetensors<float>(c, refs), Catch::Contains("total_step"));
    c = set.config;
    c.tinit = 45;
    REQUIRE_THROWS_WITH(adalora::peft_safetensors<float>(c, refs), Catch::Contains("tinit"));
    c = set.config;
    refs[1].name = refs[0].name;
    REQUIRE_THROWS_WITH(adalora::peft_safetensors<float>(c, refs), Catch::Contains("unique"));
    refs = set.refs();
    refs.pop_back();
    REQUIRE_THROWS_WITH(adalora::peft_safetensors<float>(c, refs),
                        Catch::Contains("names no module being saved"));
    refs = set.refs();
    c.pattern.reset();
    c.init_r = 5;
    REQUIRE_THROWS_WITH(adalora::peft_safetensors<float>(c, refs),
                        Catch::Contains("has rank 6") && Catch::Contains("init_r = 5"));
  }
}

namespace {

/// Python's re.fullmatch(pattern, text) for the patterns without groups, classes or
/// quantifiers: alternatives joined by '|', each a sequence of literal characters or "\c"
/// (a literal c). Any other metacharacter fails the test, so that the writer cannot drift into
/// syntax this model does not cover (tests/check_peft_export.py uses Python's own re).
bool fullmatch_literal_alternatives(const std::string& pattern, const std::string& text) {
  std::vector<std::string> alternatives(1);
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      REQUIRE(i + 1 < pattern.size());
      const char next = pattern[++i];
      REQUIRE_FALSE(std::isalnum(static_cast<unsigned char>(next)));  // \d, \w, ... are not literals
      alternatives.back() += next;
    } else if (c == '|') {
      alternatives.emplace_back();
    } else {
      REQUIRE(std::string(".^$*+?{}[]()").find(c) == std::string::npos);
      alternatives.back() += c;
    }
  }
  return std::find(alternatives.begin(), alternatives.end(), text) != alternatives.end();
}

/// PEFT's check_target_module_exists: a string is matched in full as a regular expression
/// (re.fullmatch), a list by equality or by "." + name at the end of the path.
bool peft_targets(const nlohmann::json& target_modules, const std::string& path) {
  if (target_modules.is_string())
    return fullmatch_literal_alternatives(target_modules.get<std::string>(), path);
  for (const auto& t : target_modules) {
    const std::string name = t.get<std::string>();
    if (path == name) return true;
    if (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
        path[path.size() - name.size() - 1] == '.')
      return true;
  }
  return false;
}

/// What PEFT's loaded SVDLinear adds for x: ((x·(A⊙E)ᵀ)·Bᵀ) · scaling / (ranknum + 1e-5), with
/// scaling = lora_alpha if > 0 else the module's rank (PEFT's update_layer re-run by the resize)
/// and ranknum = init_r (copied back by resize_modules_by_rank_pattern). Computed here from the
/// file's tensors in double, independently of adalora's adapter code.
std::vector<double> peft_forward(const adalora::safetensors_file& file, const std::string& module,
                                 double alpha, std::int64_t init_r, const std::vector<double>& x,
                                 index_t n) {
  const std::string key = "base_model.model." + module;
  const auto A = file.values<double>(key + ".lora_A");
  const auto E = file.values<double>(key + ".lora_E");
  const auto B = file.values<double>(key + ".lora_B");
  const index_t k = static_cast<index_t>(E.size());
  const index_t in = file.at(key + ".lora_A").shape[1];
  const index_t out = file.at(key + ".lora_B").shape[0];
  const double scaling = alpha > 0 ? alpha : static_cast<double>(k);
  const double ranknum = static_cast<double>(init_r) + 1e-5;
  std::vector<double> y(static_cast<std::size_t>(n * out), 0.0);
  for (index_t i = 0; i < n; ++i)
    for (index_t o = 0; o < out; ++o) {
      double sum = 0;
      for (index_t j = 0; j < k; ++j) {
        double h = 0;
        for (index_t c = 0; c < in; ++c) h += x[std::size_t(i * in + c)] * A[std::size_t(j * in + c)] * E[std::size_t(j)];
        sum += h * B[std::size_t(o * k + j)];
      }
      y[std::size_t(i * out + o)] = sum * scaling / ranknum;
    }
  return y;
}

fs::path write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

}  // namespace

TEST_CASE("PEFT's lora_alpha = 0 rule: an export loads in PEFT with adalora's outputs, and PEFT's "
          "files are read with PEFT's rule", "[peft]") {
  // Adapters trained with alpha = 0 (scaling = init_r = 6), masked to 3, 0 and 6 kept triplets.
  trained_set<double> set;
  for (auto& a : set.adapters) {
    adalora::svd_adapter<double> zero_alpha(a.in_features(), a.out_features(), 6, /*alpha=*/0.0);
    adalora::resize_adapter<double>(a.params(), std::vector<bool>(6, true), zero_alpha.params());
    a = std::move(zero_alpha);
  }
  set.config.lora_alpha = 0;
  adalora::peft_save_options options;
  options.dtype = adalora::st_dtype::F64;
  const fs::path dir = temp_dir("peft_alpha0");
  adalora::save_peft_adapter<double>(dir, set.config, set.refs(), options);

  // Written as init_r: PEFT's rule would otherwise scale the module that kept 3 of 6 by 3.
  const auto json = nlohmann::json::parse(slurp(dir / adalora::peft_config_file));
  REQUIRE(json["lora_alpha"] == 6);
  REQUIRE(adalora::peft_alpha_for(set.config) == 6);
  const auto file = adalora::safetensors_file::read(dir / adalora::peft_weights_file);
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal(0.0, 1.0);
  const index_t n = 3;
  for (std::size_t l = 0; l < set.adapters.size(); ++l) {
    std::vector<double> x(static_cast<std::size_t>(n * set.adapters[l].in_features()));
    for (auto& v : x) v = normal(rng);
    const auto ours = run_forward(set.adapters[l], x, n);
    const auto peft = peft_forward(file, set.names[l], json["lora_alpha"].get<double>(), 6, x, n);
    REQUIRE(peft.size() == ours.size());
    for (std::size_t i = 0; i < ours.size(); ++i)
      REQUIRE(std::fabs(peft[i] - ours[i]) <= 1e-12 * (1 + std::fabs(ours[i])));
  }
  // adalora reads its own export back to the same outputs, bit for bit.
  const auto loaded = adalora::load_peft_adapter<double>(dir);
  std::vector<double> x(static_cast<std::size_t>(n * 10), 0.5);
  REQUIRE(run_forward(loaded.modules[0].adapter, x, n) == run_forward(set.adapters[0], x, n));

  // A file PEFT wrote with lora_alpha = 0: each resized module is scaled by its kept rank.
  auto peft_json = json;
  peft_json["lora_alpha"] = 0;
  write_text(dir / adalora::peft_config_file, peft_json.dump(2) + "\n");
  const auto from_peft = adalora::load_peft_adapter<double>(dir);
  REQUIRE(from_peft.config.lora_alpha == 0);
  const auto& q = from_peft.modules[0];
  REQUIRE(q.adapter.rank() == 3);
  REQUIRE(q.adapter.scale().scaling() == 3.0);
  REQUIRE(q.adapter.r_init() == 6);
  REQUIRE(from_peft.modules[2].adapter.scale().scaling() == 6.0);  // kept all 6
  {
    std::vector<double> xq(static_cast<std::size_t>(n * 10));
    for (auto& v : xq) v = normal(rng);
    const auto ours = run_forward(q.adapter, xq, n);
    const auto peft = peft_forward(file, q.name, 0.0, 6, xq, n);
    for (std::size_t i = 0; i < ours.size(); ++i)
      REQUIRE(std::fabs(peft[i] - ours[i]) <= 1e-12 * (1 + std::fabs(ours[i])));
  }
  // Written back, PEFT's file keeps lora_alpha = 0, so PEFT computes the same again.
  const fs::path again = temp_dir("peft_alpha0_again");
  adalora::save_peft_adapter<double>(again, from_peft, options);
  REQUIRE(nlohmann::json::parse(slurp(again / adalora::peft_config_file))["lora_alpha"] == 0);
  REQUIRE(slurp(again / adalora::peft_weights_file) == slurp(dir / adalora::peft_weights_file));

  // Adapters built here with alpha = 0 and resized (scaling init_r) get init_r written instead.
  adalora::peft_adapter<double> built{set.config, {}, {}};
  for (std::size_t l = 0; l < set.adapters.size(); ++l)
    built.modules.push_back({set.names[l], set.adapters[l].resized(set.pattern.entries()[l].kept)});
  const fs::path third = temp_dir("peft_alpha0_built");
  adalora::save_peft_adapter<double>(third, built, options);
  REQUIRE(nlohmann::json::parse(slurp(third / adalora::peft_config_file))["lora_alpha"] == 6);

  // A module whose scale no single lora_alpha reproduces is refused, not written wrong.
  built.modules[0].adapter = adalora::svd_adapter<double>(10, 7, 3, adalora::adapter_scale<double>(5.0, 6));
  REQUIRE_THROWS_WITH(adalora::save_peft_adapter<double>(temp_dir("peft_alpha_misfit"), built, options),
                      Catch::Contains(set.names[0]) && Catch::Contains("one lora_alpha"));
}

TEST_CASE("PEFT's target matching wraps exactly the saved modules on a model whose other layers "
          "share their names", "[peft]") {
  // A 12-layer model; adapters on three matrices of layers 0 and 10 only.
  std::vector<std::string> model_modules;
  for (int l = 0; l < 12; ++l)
    for (const char* m : {"attention.query", "attention.value", "output.dense", "intermediate.dense"})
      model_modules.push_back("model.encoder.layer." + std::to_string(l) + "." + m);
  model_modules.push_back("classifier.dense");
  model_modules.push_back("");  // the root module, which named_modules() also lists
  const std::vector<std::string> saved = {"model.encoder.layer.0.attention.query",
                                          "model.encoder.layer.10.attention.value",
                                          "model.encoder.layer.1.output.dense"};
  adalora::peft_adalora_config c;
  c.init_r = 2;
  c.total_step = 10;
  const auto json = adalora::to_peft_config_json(c, saved);
  REQUIRE(json["target_modules"].is_string());
  std::vector<std::string> wrapped;
  for (const auto& m : model_modules)
    if (peft_targets(json["target_modules"], m)) wrapped.push_back(m);
  std::vector<std::string> want = saved;
  std::sort(want.begin(), want.end());
  std::sort(wrapped.begin(), wrapped.end());
  REQUIRE(wrapped == want);
  // The last components (what adalora used to write) would wrap 49 modules instead of 3.
  std::size_t by_name = 0;
  for (const auto& m : model_modules)
    if (peft_targets(nlohmann::json({"query", "value", "dense"}), m)) ++by_name;
  REQUIRE(by_name == 12 * 4 + 1);
  // Characters that are special in a regular expression are escaped.
  REQUIRE(adalora::to_peft_config_json(c, {"a+b.c[0]"})["target_modules"] == "a\\+b\\.c\\[0\\]");
  REQUIRE(peft_targets(adalora::to_peft_config_json(c, {"a+b.c[0]"})["target_modules"], "a+b.c[0]"));
  REQUIRE_FALSE(peft_targets(adalora::to_peft_config_json(c, {"a+b.c[0]"})["target_modules"], "aab.c0"));
  // No modules: an empty list, not an expression that matches the root module.
  REQUIRE(adalora::to_peft_config_json(c, {})["target_modules"] == nlohmann::json::array());
  // A config's own target_modules, list or expression, is written as it was read.
  const auto regex_config = adalora::peft_config_from_json(
      nlohmann::json{{"peft_type", "ADALORA"}, {"target_modules", ".*\\.(q|v)_proj"}});
  REQUIRE(regex_config.target_modules_regex == std::optional<std::string>(".*\\.(q|v)_proj"));
  auto rc = regex_config;
  rc.total_step = 10;
  REQUIRE(adalora::to_peft_config_json(rc, saved)["target_modules"] == ".*\\.(q|v)_proj");
  c.target_modules = {"query"};
  REQUIRE(adalora::to_peft_config_json(c, saved)["target_modules"] == nlohmann::json({"query"}));
}

TEST_CASE("PEFT config: a rank pattern of more than ten layers reads back equal to the "
          "allocator's, whatever the order", "[peft]") {
  adalora::rank_pattern model_order;
  for (int l = 0; l < 12; ++l)
    model_order.add("layers." + std::to_string(l) + ".fc", {l % 2 == 0, l % 3 == 0});
  adalora::peft_adalora_config c;
  c.init_r = 2;
  c.total_step = 10;
  c.pattern = model_order;
  const fs::path dir = temp_dir("peft_order");
  const auto path = write_text(dir / "adapter_config.json", adalora::to_peft_config_json(c).dump(2));
  const auto read = adalora::read_peft_config(path);
  REQUIRE(read.pattern->entries()[2].name == "layers.10.fc");  // the file is sorted, as PEFT's
  REQUIRE(*read.pattern == model_order);                       // equality ignores the order
  // A file in model order keeps its order.
  nlohmann::ordered_json ordered = {{"peft_type", "ADALORA"}, {"init_r", 2}};
  ordered["rank_pattern"] = adalora::to_peft_json(model_order);
  const auto path2 = write_text(dir / "ordered.json", ordered.dump());
  const auto read2 = adalora::read_peft_config(path2);
  for (std::size_t l = 0; l < 12; ++l)
    REQUIRE(read2.pattern->entries()[l].name == model_order.entries()[l].name);
  // Equality still sees a different flag or a missing entry.
  adalora::rank_pattern other;
  for (int l = 11; l >= 0; --l)
    other.add("layers." + std::to_string(l) + ".fc", {l % 2 == 0, l == 11 || l % 3 == 0});
  REQUIRE_FALSE(other == model_order);
}

TEST_CASE("hostile adapter_config.json: deep nesting, numbers beyond int64, duplicate keys and "
          "what is not a regular file are refused clearly", "[peft][hostile]") {
  const fs::path dir = temp_dir("peft_hostile");
  SECTION("a field nested 70,000 deep, in a file and in a value built in memory") {
    for (const char* field : {"task_type", "peft_type", "init_r", "target_modules"}) {
      INFO(field);
      const std::string deep = std::string(70000, '[') + std::string(70000, ']');
      const std::string head = std::string(field) == "peft_type" ? "{" : "{\"peft_type\": \"ADALORA\", ";
      const std::string text = head + "\"" + field + "\": " + deep + "}";
      REQUIRE_THROWS_WITH(adalora::read_peft_config(write_text(dir / "deep.json", text)),
                          Catch::Contains("deep.json") && Catch::Contains("levels deep"));
      nlohmann::json value = nlohmann::json::array();
      for (int i = 0; i < 70000; ++i) {
        nlohmann::json outer = nlohmann::json::array();
        outer.push_back(std::move(value));
        value = std::move(outer);
      }
      nlohmann::json j = {{"peft_type", "ADALORA"}};
      j[field] = std::move(value);  // replaces peft_type itself for that field
      REQUIRE_THROWS_WITH(adalora::peft_config_from_json(j), Catch::Contains("levels deep"));
    }
    // Within the limit, a nested unknown field is kept.
    const auto ok = adalora::peft_config_from_json(nlohmann::json::parse(
        R"({"peft_type": "ADALORA", "loftq_config": {"a": [[1, 2], [3]]}})"));
    REQUIRE(ok.other["loftq_config"]["a"][0][1] == 2);
  }
  SECTION("integers beyond int64, or not integers, are refused before any conversion") {
    for (const char* bad : {R"("init_r": 1e300)", R"("total_step": 1e19)",
                            R"("total_step": 18446744073709551615)", R"("tinit": -9.3e18)",
                            R"("deltaT": 9223372036854775808)", R"("init_r": 2.5)",
                            R"("init_r": true)"}) {
      INFO(bad);
      const auto j = nlohmann::json::parse(std::string("{\"peft_type\": \"ADALORA\", ") + bad + "}");
      REQUIRE_THROWS_WITH(adalora::peft_config_from_json(j), Catch::Contains("must be an integer"));
    }
    const auto j = nlohmann::json::parse(
        R"({"peft_type": "ADALORA", "init_r": 4.0, "total_step": 9223372036854775807, "tinit": -0.0})");
    const auto c = adalora::peft_config_from_json(j);
    REQUIRE(c.init_r == 4);
    REQUIRE(c.total_step == 9223372036854775807);
    REQUIRE_THROWS_WITH(adalora::peft_config_from_json(nlohmann::json::parse(
                            R"({"peft_type": "ADALORA", "lora_alpha": -1})")),
                        Catch::Contains("lora_alpha"));
  }
  SECTION("a duplicate key is refused, not resolved to its last value") {
    const auto path = write_text(dir / "dup.json", R"({"peft_type": "ADALORA", "init_r": 4, "init_r": 8})");
    REQUIRE_THROWS_WITH(adalora::read_peft_config(path),
                        Catch::Contains("dup.json") && Catch::Contains("\"init_r\" appears twice"));
  }
  SECTION("a directory, a FIFO, a device") {
    fs::create_directories(dir / "a_directory");
    REQUIRE_THROWS_WITH(adalora::read_peft_config(dir / "a_directory"),
                        Catch::Contains("a_directory") && Catch::Contains("is a directory"));
    const fs::path fifo = dir / "fifo";
    fs::remove(fifo);
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    REQUIRE_THROWS_WITH(adalora::read_peft_config(fifo), Catch::Contains("FIFO"));
    REQUIRE_THROWS_WITH(adalora::read_peft_config("/dev/zero"), Catch::Contains("character device"));
    REQUIRE_THROWS_AS(adalora::load_peft_adapter<float>(dir / "a_directory"), std::runtime_error);
  }
}
