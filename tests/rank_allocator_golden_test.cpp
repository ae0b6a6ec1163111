// Replays tests/data/allocator_main.json (the reference implementations' full run: 5 layers,
// r = 8 -> target_r = 4, T = 60, tinit = tfinal = 10, deltaT = 5) through rank_allocator, for
// PEFT's and loralib's final-phase semantics, in float and double.
//
// Tolerances (docs/algorithm.md §4, §12):
//  - budgets, k, mask flags, kept counts, which E entries are zero, the rank pattern, and every
//    parameter value: exact. SGD replays exactly by construction (int·2^-16 values, lr = 2^-6),
//    and masking only writes zeros.
//  - EMA state: bit-exact (== on every element): (1 − β) is rounded from double once and the
//    build uses -ffp-contract=off, exactly the references' roundings.
//  - triplet scores and thresholds: relative 1e-12 (f64) and 1e-5 (f32), because the means over
//    a row/column are sums in another order than torch's reduction.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/rank_allocator.hpp"
#include "tests/golden.hpp"

namespace {

using adalora::index_t;

const nlohmann::json& golden_main() {
  static const nlohmann::json j = golden::load("allocator_main.json");
  return j;
}

template <class T>
struct layer_tensors {
  golden::matrix<T> A, B, gA, gB;
  std::vector<T> E, gE;
};

template <class T>
adalora::matrix_view<T> view(golden::matrix<T>& m) {
  return adalora::make_matrix_view(m.data.data(), m.rows, m.cols);
}

template <class T>
bool rel_close(double actual, double expected, double tol) {
  return std::abs(actual - expected) <= tol * std::abs(expected);
}

template <class T>
constexpr double score_tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

template <class T>
void replay(adalora::final_phase_rule semantics) {
  const nlohmann::json& g = golden_main();
  const auto& cfg = g["config"];
  const double scale = cfg["value_scale"].get<double>();
  const T lr = static_cast<T>(cfg["lr"].get<double>());
  const std::string key = std::string(semantics == adalora::final_phase_rule::peft ? "peft" : "loralib") +
                          (std::is_same_v<T, float> ? "_f32" : "_f64");
  const auto& expected = g["expected"][key];

  std::vector<adalora::adapter_shape> shapes;
  std::vector<layer_tensors<T>> layers;
  for (std::size_t l = 0; l < g["layers"].size(); ++l) {
    const auto& L = g["layers"][l];
    shapes.push_back({L["name"].get<std::string>(), L["in"].get<index_t>(),
                      L["out"].get<index_t>(), L["r"].get<index_t>()});
    const auto& init = g["inputs"]["init"][l];
    layer_tensors<T> t;
    t.A = golden::to_matrix<T>(init["A_int"], scale);
    t.B = golden::to_matrix<T>(init["B_int"], scale);
    t.E = golden::to_vector<T>(init["E_int"], scale);
    t.gA = t.A;
    t.gB = t.B;
    t.gE = t.E;
    layers.push_back(std::move(t));
  }

  adalora::cubic_schedule schedule({.initial_budget = cfg["init_bgt"].get<std::int64_t>(),
                                    .target_budget = cfg["target_bgt"].get<std::int64_t>(),
                                    .total_step = cfg["total_step"].get<std::int64_t>(),
                                    .tinit = cfg["tinit"].get<std::int64_t>(),
                                    .tfinal = cfg["tfinal"].get<std::int64_t>(),
                                    .delta_t = cfg["deltaT"].get<std::int64_t>()});
  adalora::rank_allocator<T> alloc(
      shapes, schedule,
      adalora::smoothed_sensitivity({.beta1 = cfg["beta1"].get<double>(),
                                     .beta2 = cfg["beta2"].get<double>()}),
      {.final_phase = semantics});

  std::vector<adalora::adapter_tensors<T>> views;
  for (auto& t : layers)
    views.push_back({{view(t.A), adalora::vector_view<T>(t.E.data(), static_cast<index_t>(t.E.size())), view(t.B)},
                     {view(t.gA), adalora::vector_view<const T>(t.gE.data(), static_cast<index_t>(t.gE.size())), view(t.gB)}});

  const auto T_total = cfg["total_step"].get<std::int64_t>();
  for (std::int64_t t = 0; t < T_total; ++t) {
    INFO(key << " step " << t);
    const auto& grads = g["inputs"]["grads"][static_cast<std::size_t>(t)];
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto& L = layers[l];
      auto gA = golden::to_matrix<T>(grads[l]["A_int"], scale);
      auto gB = golden::to_matrix<T>(grads[l]["B_int"], scale);
      auto gE = golden::to_vector<T>(grads[l]["E_int"], scale);
      // Copy into the buffers the views point at (the views stay valid).
      std::copy(gA.data.begin(), gA.data.end(), L.gA.data.begin());
      std::copy(gB.data.begin(), gB.data.end(), L.gB.data.begin());
      std::copy(gE.begin(), gE.end(), L.gE.begin());
      for (std::size_t i = 0; i < L.A.data.size(); ++i) L.A.data[i] = L.A.data[i] - lr * L.gA.data[i];
      for (std::size_t i = 0; i < L.B.data.size(); ++i) L.B.data[i] = L.B.data[i] - lr * L.gB.data[i];
      for (std::size_t i = 0; i < L.E.size(); ++i) L.E[i] = L.E[i] - lr * L.gE[i];
    }

    const auto& r = alloc.step(t, views);
    const auto& ex = expected["steps"][static_cast<std::size_t>(t)];
    REQUIRE(r.budget == ex["budget"].get<std::int64_t>());
    REQUIRE(r.mask_due == ex["mask_ind"].get<bool>());
    REQUIRE(r.importance_updated == ex["ipt_updated"].get<bool>());
    const auto& applied = ex["mask_applied"];
    if (applied.is_string()) {
      REQUIRE(applied.get<std::string>() == "rank_pattern");
      REQUIRE(r.action == adalora::mask_action::pattern);
    } else if (applied.get<bool>()) {
      REQUIRE(r.action == adalora::mask_action::threshold);
      REQUIRE(r.prune_count == ex["k"].get<std::int64_t>());
      REQUIRE(rel_close<T>(r.threshold, ex["threshold"].get<double>(), score_tol<T>()));
      const auto expected_scores = ex["triplet_scores"].get<std::vector<double>>();
      const auto scores = alloc.triplet_scores();
      REQUIRE(scores.size() == expected_scores.size());
      for (std::size_t i = 0; i < scores.size(); ++i)
        REQUIRE(rel_close<T>(scores[i], expected_scores[i], score_tol<T>()));
      if (ex.contains("force_mask")) REQUIRE(r.forced == ex["force_mask"].get<bool>());
    } else {
      REQUIRE(r.action == adalora::mask_action::none);
    }
    if (ex.contains("kept")) {
      const auto kept = ex["kept"].get<std::vector<index_t>>();
      REQUIRE(std::vector<index_t>(r.kept.begin(), r.kept.end()) == kept);
      REQUIRE(r.kept_total == ex["kept_total"].get<index_t>());
    }
    // E after the call, exactly (zeros where pruned, untouched elsewhere).
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto E_after = golden::to_vector<T>(ex["E_after"][l]);
      REQUIRE(layers[l].E == E_after);
      index_t nonzero = 0;
      for (T e : layers[l].E) nonzero += e != T(0) ? 1 : 0;
      REQUIRE(nonzero == ex["nonzero_E"][l].get<index_t>());
    }

    // Elementwise state, bit-exact, where the file has snapshots (f64).
    if (expected.contains("snapshots") && expected["snapshots"].contains(std::to_string(t))) {
      const auto& snap = expected["snapshots"][std::to_string(t)];
      for (std::size_t l = 0; l < layers.size(); ++l) {
        const auto& per = snap[shapes[l].name];
        const std::pair<const char*, adalora::tensor_role> roles[] = {
            {"A", adalora::tensor_role::A}, {"E", adalora::tensor_role::E}, {"B", adalora::tensor_role::B}};
        for (const auto& [name, role] : roles) {
          const auto state = alloc.state(l, role);
          if (per[name].is_null()) {
            // PEFT reset_ipt at T - tfinal: the references drop the state; ours is zero.
            for (T v : state) REQUIRE(v == T(0));
            continue;
          }
          std::vector<double> ema, unc, score;
          for (const auto& row : per[name]["exp_avg_ipt"])
            for (const auto& v : row) ema.push_back(v.template get<double>());
          for (const auto& row : per[name]["exp_avg_unc"])
            for (const auto& v : row) unc.push_back(v.template get<double>());
          for (const auto& row : per[name]["score"])
            for (const auto& v : row) score.push_back(v.template get<double>());
          REQUIRE(state.size() == 2 * ema.size());
          for (std::size_t i = 0; i < ema.size(); ++i) {
            REQUIRE(state[2 * i] == static_cast<T>(ema[i]));
            REQUIRE(state[2 * i + 1] == static_cast<T>(unc[i]));
            REQUIRE(state[2 * i] * state[2 * i + 1] == static_cast<T>(score[i]));
          }
        }
      }
    }
  }

  // Final rank pattern and parameters.
  const auto pattern = alloc.pattern();
  const auto& expected_pattern = expected["rank_pattern"];
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& entry = pattern.at(shapes[l].name);
    if (semantics == adalora::final_phase_rule::peft) {
      const auto bools = expected_pattern[shapes[l].name + ".lora_E.default"].get<std::vector<bool>>();
      REQUIRE(entry.kept == bools);
    } else {
      REQUIRE(entry.kept_count() == expected_pattern[shapes[l].name + ".lora_E"].get<index_t>());
    }
    const auto& fp = expected["final_params"][l];
    REQUIRE(layers[l].A.data == golden::to_matrix<T>(fp["A"]).data);
    REQUIRE(layers[l].B.data == golden::to_matrix<T>(fp["B"]).data);
    REQUIRE(layers[l].E == golden::to_vector<T>(fp["E"]));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("allocator replays the PEFT reference run exactly", "[allocator][golden]",
                   float, double) {
  replay<TestType>(adalora::final_phase_rule::peft);
}

TEMPLATE_TEST_CASE("allocator replays the loralib reference run exactly", "[allocator][golden]",
                   float, double) {
  replay<TestType>(adalora::final_phase_rule::loralib);
}
