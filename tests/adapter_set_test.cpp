// adapter_set: one named set of adapters for the regularizer and the allocator, shapes read off
// the views, and the initial budget derived from them. Whatever path a user takes (the set or
// the span-based overloads with hand-written shapes), the results are the same bits.

#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"

namespace {

using adalora::index_t;
using linear_allocator = adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::linear_schedule>;
using constant_allocator =
    adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::constant_schedule>;

/// Three adapters of different shapes and ranks, filled with a fixed random stream, with
/// gradients that are a fixed function of the step (so two copies evolve identically).
struct model {
  std::vector<adalora::svd_adapter<float>> layers;
  explicit model(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    layers.emplace_back(12, 8, 4, 4.0);
    layers.emplace_back(8, 16, 3, 3.0);
    layers.emplace_back(16, 5, 5, 5.0);
    for (auto& l : layers) {
      l.initialize(rng);
      auto e = l.params().E;
      for (index_t i = 0; i < e.size(); ++i) e[i] = 0.1f * float(i + 1);
    }
  }
  void fake_gradients(std::int64_t t) {
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto g = layers[l].grads();
      const float s = 0.01f * float(t + 1) / float(l + 1);
      for (index_t i = 0; i < g.A.size(); ++i) g.A.data()[i] = s * float((i * 7 + t) % 11) - 0.05f;
      for (index_t i = 0; i < g.E.size(); ++i) g.E.data()[i] = s * float((i * 3 + t) % 5);
      for (index_t i = 0; i < g.B.size(); ++i) g.B.data()[i] = s * float((i * 5 + t) % 13) - 0.02f;
    }
  }
  adalora::adapter_set<float> set() {
    adalora::adapter_set<float> s;
    for (std::size_t l = 0; l < layers.size(); ++l) s.add("m" + std::to_string(l), layers[l]);
    return s;
  }
};

adalora::schedule_options options_without_budget() {
  return {.target_budget = 5, .total_step = 40, .tinit = 5, .tfinal = 10, .delta_t = 3};
}

}  // namespace

TEST_CASE("adapter_set reads shapes and the total rank off the views", "[adapter_set]") {
  model m(1);
  const adalora::adapter_set<float> s = m.set();
  REQUIRE(s.size() == 3);
  REQUIRE(s.total_rank() == 4 + 3 + 5);
  REQUIRE(s.name(1) == "m1");
  const auto shapes = s.shapes();
  REQUIRE(shapes[0].in_features == 12);
  REQUIRE(shapes[0].out_features == 8);
  REQUIRE(shapes[0].rank == 4);
  REQUIRE(shapes[2].in_features == 16);
  REQUIRE(shapes[2].out_features == 5);
  REQUIRE(shapes[2].rank == 5);
  REQUIRE(shapes[1].shard.triplet_count == -1);  // the whole adapter
  // The views are the adapters' own memory, in the layouts both policies take.
  REQUIRE(s.params()[1].A.data() == m.layers[1].params().A.data());
  REQUIRE(s.grads()[2].B.data() == m.layers[2].grads().B.data());
  REQUIRE(s.tensors()[0].params.E.data() == m.layers[0].params().E.data());
  REQUIRE(s.tensors()[0].grads.E.data() == m.layers[0].grads().E.data());
}

TEST_CASE("adapter_set refuses what would fail later", "[adapter_set][errors]") {
  model m(2);
  adalora::adapter_set<float> s;
  REQUIRE_THROWS_WITH(s.add("", m.layers[0]),
                      Catch::Contains("adapter_set::add") && Catch::Contains("empty"));
  s.add("q", m.layers[0]);
  REQUIRE_THROWS_WITH(s.add("q", m.layers[1]),
                      Catch::Contains("'q'") && Catch::Contains("already adapter 0"));
  // Gradients of another shape than the parameters.
  REQUIRE_THROWS_WITH(s.add("v", m.layers[1].params(), m.layers[2].grads()),
                      Catch::Contains("adapter_set::add") && Catch::Contains("gradient of A"));
  // A views of another rank than E.
  auto p = m.layers[1].params();
  p.A = p.A.block(0, 0, 2, p.A.cols());
  REQUIRE_THROWS_WITH(s.add("v", p, m.layers[1].grads()), Catch::Contains("E.size() = 3"));
  REQUIRE(s.size() == 1);  // nothing half-added
  REQUIRE(s.total_rank() == 4);
}

TEST_CASE("the set and the span-based overloads give the same bits", "[adapter_set]") {
  model a(3), b(3);
  adalora::adapter_set<float> set = a.set();

  // By hand, as before the set existed: shapes, the initial budget and three vectors of views.
  std::vector<adalora::adapter_shape> shapes;
  std::vector<adalora::svd_adapter_ref<float>> params, grads;
  std::vector<adalora::adapter_tensors<float>> tensors;
  std::int64_t b0 = 0;
  for (std::size_t l = 0; l < b.layers.size(); ++l) {
    auto& x = b.layers[l];
    shapes.push_back({"m" + std::to_string(l), x.in_features(), x.out_features(), x.rank()});
    params.push_back(x.params());
    grads.push_back(x.grads());
    tensors.push_back({x.params(), x.grads()});
    b0 += x.rank();
  }
  adalora::schedule_options explicit_budget = options_without_budget();
  explicit_budget.initial_budget = b0;

  adalora::orthogonality_regularizer<float> orth_a({.weight = 0.1}), orth_b({.weight = 0.1});
  adalora::rank_allocator<float> alloc_a(set, adalora::cubic_schedule(options_without_budget()));
  adalora::rank_allocator<float> alloc_b(shapes, adalora::cubic_schedule(explicit_budget));
  REQUIRE(alloc_a.initial_budget() == b0);
  REQUIRE(alloc_a.schedule().initial_budget() == b0);

  for (std::int64_t t = 0; t < 40; ++t) {
    a.fake_gradients(t);
    b.fake_gradients(t);
    const float ra = orth_a.value_and_gradient(set);
    const float rb = orth_b.value_and_gradient(params, grads);
    REQUIRE(ra == rb);
    const auto& sa = alloc_a.step(t, set);
    const auto& sb = alloc_b.step(t, tensors);
    REQUIRE(sa.budget == sb.budget);
    REQUIRE(sa.kept_total == sb.kept_total);
    REQUIRE(sa.threshold == sb.threshold);
    for (std::size_t l = 0; l < a.layers.size(); ++l) {
      for (index_t i = 0; i < a.layers[l].rank(); ++i)
        REQUIRE(a.layers[l].params().E[i] == b.layers[l].params().E[i]);
      for (index_t i = 0; i < a.layers[l].grads().A.size(); ++i)
        REQUIRE(a.layers[l].grads().A.data()[i] == b.layers[l].grads().A.data()[i]);
    }
  }
  REQUIRE(alloc_a.last_result().kept_total == 5);
  REQUIRE(alloc_a.pattern() == alloc_b.pattern());
  REQUIRE(alloc_a.pattern().find("m2") != nullptr);
}

TEST_CASE("the initial budget comes from the adapters unless the schedule states it",
          "[adapter_set][schedule]") {
  model m(4);
  const adalora::adapter_set<float> set = m.set();

  SECTION("a schedule left at budget_from_adapters cannot be used alone") {
    const adalora::cubic_schedule s(options_without_budget());
    REQUIRE(s.initial_budget() == adalora::budget_from_adapters);
    REQUIRE_THROWS_WITH(s.at(0), Catch::Contains("cubic_schedule::at") &&
                                     Catch::Contains("initial budget is not set"));
    REQUIRE(s.with_initial_budget(12).at(0) == adalora::budget_decision{12, false});
  }
  SECTION("a stated budget is checked against the adapters") {
    adalora::schedule_options o = options_without_budget();
    o.initial_budget = 11;
    REQUIRE_THROWS_WITH(linear_allocator(set, adalora::linear_schedule(o)),
                        Catch::Contains("sum of the adapters' ranks, 12, got 11") &&
                            Catch::Contains("budget_from_adapters"));
  }
  SECTION("derived budgets are validated like stated ones") {
    adalora::schedule_options o = options_without_budget();
    o.target_budget = 12;  // nothing to prune at b0 = 12
    REQUIRE_THROWS_WITH(constant_allocator(set, adalora::constant_schedule(o)),
                        Catch::Contains("target_budget must be < initial_budget = 12"));
    std::vector<adalora::adapter_shape> empty_ranks = {{"a", 4, 4, 0}, {"b", 4, 4, 0}};
    REQUIRE_THROWS_WITH(adalora::rank_allocator<float>(
                            empty_ranks, adalora::cubic_schedule(options_without_budget())),
                        Catch::Contains("ranks add up to 0"));
  }
}
