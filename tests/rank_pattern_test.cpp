// Rank patterns: PEFT's bool lists, loralib's counts, and their JSON forms.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <type_traits>
#include <vector>
#include <fstream>
#include <string>

#include "adalora/io/rank_pattern_json.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter.hpp"
#include "tests/golden.hpp"

TEST_CASE("PEFT's rank pattern from the reference run reads back with names and flags",
          "[rank_pattern][golden]") {
  const auto g = golden::load("allocator_main.json");
  const auto& peft = g["expected"]["peft_f64"]["rank_pattern"];  // keys "<name>.lora_E.default"
  const adalora::rank_pattern p = adalora::rank_pattern_from_peft_json(peft);
  REQUIRE(p.size() == 5);
  const auto& loralib = g["expected"]["loralib_f64"]["rank_pattern"];
  for (const auto& [name, count] : p.counts())
    REQUIRE(count == loralib[name + ".lora_E"].get<adalora::index_t>());
  REQUIRE(p.at("layers.4").kept == std::vector<bool>(8, false));  // pruned to rank 0
  REQUIRE(p.total_kept() == g["checks"]["target_bgt"].get<adalora::index_t>());
  // Written back in PEFT's saved form: keys without the adapter suffix, same order and flags.
  const auto j = adalora::to_peft_json(p);
  REQUIRE(j.begin().key() == "layers.0.lora_E");
  REQUIRE(j["layers.3.lora_E"] == peft["layers.3.lora_E.default"]);
  REQUIRE(adalora::to_loralib_json(p)["layers.1.lora_E"] == loralib["layers.1.lora_E"]);
}

TEST_CASE("a rank pattern survives a JSON file round trip, also inside adapter_config.json",
          "[rank_pattern]") {
  adalora::rank_pattern p;
  p.add("model.q", {true, false, true});
  p.add("model.v", {});
  p.add("a.b.c", {false, false});
  const std::string path = std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
                           "/adalora_rank_pattern_test.json";
  adalora::write_rank_pattern_json(p, path);
  REQUIRE(adalora::read_rank_pattern_json(path) == p);

  nlohmann::ordered_json config = {{"peft_type", "ADALORA"}, {"rank_pattern", adalora::to_peft_json(p)}};
  std::ofstream(path) << config.dump();
  REQUIRE(adalora::read_rank_pattern_json(path) == p);
  std::remove(path.c_str());
}

TEST_CASE("malformed rank patterns are refused with the key and the reason", "[rank_pattern][errors]") {
  using nlohmann::json;
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json::array()),
                      Catch::Contains("rank_pattern_from_peft_json") && Catch::Contains("object"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", 3}}),
                      Catch::Contains("x.lora_E") && Catch::Contains("kept count"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_A", {true}}}),
                      Catch::Contains("x.lora_A"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", {true, 1}}}),
                      Catch::Contains("only booleans"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", "yes"}}),
                      Catch::Contains("list of booleans"));
  REQUIRE_THROWS_WITH(adalora::read_rank_pattern_json("/nonexistent/p.json"),
                      Catch::Contains("cannot open"));
  adalora::rank_pattern p;
  p.add("x", {true});
  REQUIRE_THROWS_WITH(p.add("x", {false}), Catch::Contains("already"));
  REQUIRE_THROWS_AS(p.at("y"), std::out_of_range);
}

TEMPLATE_TEST_CASE("adapters resized to the reference run's final pattern give the masked output",
                   "[rank_pattern][golden]", float, double) {
  // The end of PEFT's reference run: E already zero where the pattern prunes. Resizing each
  // adapter to its pattern entry (PEFT resize_state_dict_by_rank_pattern) keeps r_init in the
  // scale, so the output is the masked adapter's, exactly: dropping zero terms from a sequential
  // sum changes no rounding.
  const auto g = golden::load("allocator_main.json");
  const double alpha = g["config"]["lora_alpha"].get<double>();
  const auto& expected = g["expected"][std::is_same_v<TestType, float> ? "peft_f32" : "peft_f64"];
  const adalora::rank_pattern pattern =
      adalora::rank_pattern_from_peft_json(expected["rank_pattern"]);
  for (std::size_t l = 0; l < g["layers"].size(); ++l) {
    const auto& L = g["layers"][l];
    const auto in = L["in"].get<adalora::index_t>(), out = L["out"].get<adalora::index_t>(),
               r = L["r"].get<adalora::index_t>();
    adalora::svd_adapter<TestType> masked(in, out, r, alpha);
    const auto& fp = expected["final_params"][l];
    const auto A = golden::to_matrix<TestType>(fp["A"]);
    const auto B = golden::to_matrix<TestType>(fp["B"]);
    const auto E = golden::to_vector<TestType>(fp["E"]);
    std::copy(A.data.begin(), A.data.end(), masked.params().A.data());
    std::copy(B.data.begin(), B.data.end(), masked.params().B.data());
    std::copy(E.begin(), E.end(), masked.params().E.data());

    const auto& entry = pattern.at(L["name"].get<std::string>());
    adalora::svd_adapter<TestType> resized = masked.resized(entry.kept);
    REQUIRE(resized.rank() == entry.kept_count());
    REQUIRE(resized.r_init() == r);

    const adalora::index_t n = 3;
    std::vector<TestType> x(static_cast<std::size_t>(n * in));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = TestType(0.125) * TestType(int(i % 11) - 5);
    std::vector<TestType> y_masked(static_cast<std::size_t>(n * out), TestType(0)), y_resized = y_masked;
    masked.forward(adalora::make_matrix_view<const TestType>(x.data(), n, in),
                   adalora::make_matrix_view(y_masked.data(), n, out));
    resized.forward(adalora::make_matrix_view<const TestType>(x.data(), n, in),
                    adalora::make_matrix_view(y_resized.data(), n, out));
    REQUIRE(y_resized == y_masked);
  }
}
