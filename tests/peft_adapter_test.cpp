// PEFT-compatible adapter files: export (resized to the rank pattern), import (r = kept,
// r_init = init_r), round trips with identical outputs, files laid out as PEFT writes them, and
// clear errors for files that do not fit.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
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
  REQUIRE(config["target_modules"] == nlohmann::json({"dense", "query", "value"}));
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
    REQUIRE(m.adapter.r_init() == 6);  // scaling / (ranknum + 1e-5) unchanged (SPEC §7)
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
