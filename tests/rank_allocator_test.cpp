// Behaviour of rank_allocator beyond the reference run: ties, zero ranks, validation, policies.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/magnitude.hpp"
#include "adalora/importance/sensitivity.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/rank_allocator.hpp"

namespace {

using adalora::index_t;

/// Row-major storage for one adapter's parameters and gradients.
template <class T>
struct adapter_storage {
  index_t in, out, r;
  std::vector<T> A, E, B, gA, gE, gB;
  adapter_storage(index_t in_, index_t out_, index_t r_)
      : in(in_), out(out_), r(r_),
        A(static_cast<std::size_t>(r_ * in_), T(1)), E(static_cast<std::size_t>(r_), T(1)),
        B(static_cast<std::size_t>(out_ * r_), T(1)), gA(A.size(), T(0)), gE(E.size(), T(0)),
        gB(B.size(), T(0)) {}
  adalora::adapter_tensors<T> tensors() {
    return {{adalora::make_matrix_view(A.data(), r, in), adalora::vector_view<T>(E.data(), r),
             adalora::make_matrix_view(B.data(), out, r)},
            {adalora::make_matrix_view<const T>(gA.data(), r, in),
             adalora::vector_view<const T>(gE.data(), r),
             adalora::make_matrix_view<const T>(gB.data(), out, r)}};
  }
};

/// A metric that breaks the contract: negative scores.
struct negative_metric {
  static constexpr std::size_t state_size = 0;
  double update(adalora::tensor_role, double p, double, std::span<double, 0>) const { return -p; }
  double score(adalora::tensor_role, double p, std::span<const double, 0>) const { return -p; }
};

/// A schedule that always masks to a fixed budget (a user-defined BudgetSchedule).
struct fixed_budget {
  std::int64_t b0, budget, final_start = 1'000'000;
  adalora::budget_decision at(std::int64_t) const { return {budget, true}; }
  std::int64_t initial_budget() const { return b0; }
  std::int64_t target_budget() const { return budget; }
  std::int64_t final_phase_start() const { return final_start; }
};
static_assert(adalora::BudgetSchedule<fixed_budget>);

template <class T>
std::vector<adalora::adapter_tensors<T>> tensors_of(std::vector<adapter_storage<T>>& s) {
  std::vector<adalora::adapter_tensors<T>> v;
  for (auto& a : s) v.push_back(a.tensors());
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("ties at the threshold: references prune them all, exact_budget keeps budget",
                   "[allocator][ties]", float, double) {
  // Two identical adapters (one an exact clone of the other) under |λ| importance: every score
  // appears twice, so at budget 3 (k = 5 of 8) the threshold value is shared by a pair.
  std::vector<adapter_storage<TestType>> s;
  s.emplace_back(3, 2, 4);
  s.emplace_back(3, 2, 4);
  for (auto& a : s) a.E = {TestType(4), TestType(3), TestType(2), TestType(1)};
  auto views = tensors_of(s);
  const std::vector<adalora::adapter_shape> shapes = {{"a", 3, 2, 4}, {"b", 3, 2, 4}};

  SECTION("prune_all_ties (PEFT and loralib)") {
    adalora::rank_allocator<TestType, adalora::magnitude, fixed_budget> alloc(
        shapes, fixed_budget{8, 3}, {}, {.ties = adalora::tie_policy::prune_all_ties});
    const auto& r = alloc.step(0, views);
    // Sorted scores 1,1,2,2,3,3,4,4; the 5th smallest is 3; everything <= 3 is pruned.
    REQUIRE(r.threshold == TestType(3));
    REQUIRE(r.kept_total == 2);  // fewer than the budget of 3, never more
    REQUIRE(s[0].E == std::vector<TestType>{4, 0, 0, 0});
    REQUIRE(s[1].E == std::vector<TestType>{4, 0, 0, 0});
  }
  SECTION("exact_budget keeps exactly budget, earlier adapters first among ties") {
    adalora::rank_allocator<TestType, adalora::magnitude, fixed_budget> alloc(
        shapes, fixed_budget{8, 3}, {}, {.ties = adalora::tie_policy::exact_budget});
    const auto& r = alloc.step(0, views);
    REQUIRE(r.kept_total == 3);
    REQUIRE(r.threshold == TestType(3));
    REQUIRE(s[0].E == std::vector<TestType>{4, 3, 0, 0});
    REQUIRE(s[1].E == std::vector<TestType>{4, 0, 0, 0});
  }
}

TEMPLATE_TEST_CASE("adapters of rank 0 and adapters pruned to rank 0 work", "[allocator]", float,
                   double) {
  std::vector<adapter_storage<TestType>> s;
  s.emplace_back(4, 3, 2);
  s.emplace_back(5, 2, 0);  // rank 0 from the start (PEFT allows r = 0 after resize)
  s.emplace_back(2, 6, 3);
  s[0].E = {TestType(5), TestType(6)};
  s[2].E = {TestType(0.5), TestType(0.25), TestType(0.125)};
  auto views = tensors_of(s);
  adalora::rank_allocator<TestType, adalora::magnitude, fixed_budget> alloc(
      {{"x", 4, 3, 2}, {"empty", 5, 2, 0}, {"y", 2, 6, 3}}, fixed_budget{5, 2});
  const auto& r = alloc.step(0, views);
  REQUIRE(std::vector<index_t>(r.kept.begin(), r.kept.end()) == std::vector<index_t>{2, 0, 0});
  REQUIRE(s[2].E == std::vector<TestType>{0, 0, 0});
  REQUIRE(alloc.pattern().at("empty").kept.empty());
  REQUIRE(alloc.pattern().at("y").kept_count() == 0);
}

TEMPLATE_TEST_CASE("a budget equal to the initial budget prunes nothing (k = 0, peft#2337)",
                   "[allocator]", float, double) {
  std::vector<adapter_storage<TestType>> s;
  s.emplace_back(2, 2, 2);
  auto views = tensors_of(s);
  adalora::rank_allocator<TestType, adalora::magnitude, fixed_budget> alloc({{"a", 2, 2, 2}},
                                                                           fixed_budget{2, 2});
  const auto& r = alloc.step(0, views);
  REQUIRE(r.prune_count == 0);
  REQUIRE(r.kept_total == 2);
  REQUIRE(r.threshold == -std::numeric_limits<TestType>::infinity());
  REQUIRE(s[0].E == std::vector<TestType>{1, 1});
}

TEMPLATE_TEST_CASE("triplet score is s(E) + (mean over in of s(A) + mean over out of s(B))",
                   "[allocator]", float, double) {
  // parameter_magnitude scores |w|; with A, E, B of known values the triplet scores follow.
  std::vector<adapter_storage<TestType>> s;
  s.emplace_back(2, 4, 2);
  auto& a = s[0];
  a.A = {1, 3, /**/ 2, 2};                          // row means 2 and 2
  a.E = {TestType(0.5), TestType(-1)};              // |E| 0.5 and 1
  a.B = {1, -4, /**/ 1, 0, /**/ 1, 0, /**/ 1, 0};   // column means 1 and 1
  auto views = tensors_of(s);
  adalora::rank_allocator<TestType, adalora::parameter_magnitude, fixed_budget> alloc(
      {{"a", 2, 4, 2}}, fixed_budget{2, 1});
  alloc.step(0, views);
  const auto scores = alloc.triplet_scores();
  REQUIRE(scores[0] == TestType(0.5 + (2.0 + 1.0)));
  REQUIRE(scores[1] == TestType(1.0 + (2.0 + 1.0)));
  REQUIRE(a.E[0] == TestType(0));     // the lower score is pruned
  REQUIRE(a.E[1] == TestType(-1));
  REQUIRE(a.A[0] == TestType(1));     // A and B untouched
  REQUIRE(a.B[1] == TestType(-4));
}

TEST_CASE("the allocator validates its construction and every step", "[allocator][errors]") {
  using alloc_t = adalora::rank_allocator<double, adalora::magnitude, fixed_budget>;
  REQUIRE_THROWS_WITH(alloc_t({}, fixed_budget{0, 0}),
                      Catch::Contains("rank_allocator") && Catch::Contains("at least one adapter"));
  REQUIRE_THROWS_WITH(alloc_t({{"a", 3, 3, 4}}, fixed_budget{5, 2}),
                      Catch::Contains("initial budget") && Catch::Contains("4") &&
                          Catch::Contains("5"));
  REQUIRE_THROWS_WITH(alloc_t({{"a", 0, 3, 4}}, fixed_budget{4, 2}),
                      Catch::Contains("in_features >= 1"));
  REQUIRE_THROWS_WITH(alloc_t({{"a", 3, 3, -1}}, fixed_budget{-1, 0}),
                      Catch::Contains("rank >= 0") && Catch::Contains("-1"));
  // Shapes whose sizes overflow are named (a wrapped size would allocate nonsense or index past
  // the end), and so are shards whose end overflows.
  constexpr adalora::index_t huge = std::numeric_limits<adalora::index_t>::max();
  REQUIRE_THROWS_WITH(alloc_t({{"big", huge, 2, std::int64_t{1} << 40}}, fixed_budget{0, 0}),
                      Catch::Contains("'big'") && Catch::Contains("does not fit in memory"));
  REQUIRE_THROWS_WITH(alloc_t({{"a", 3, 3, huge}, {"b", 3, 3, huge}}, fixed_budget{0, 0}),
                      Catch::Contains("does not fit in memory") || Catch::Contains("2^63 - 1"));
  adalora::adapter_shape far{"far", 512, 3, 4};
  far.shard.in_begin = 256;
  far.shard.in_count = huge;
  REQUIRE_THROWS_WITH(alloc_t({far}, fixed_budget{4, 2}),
                      Catch::Contains("'far'") && Catch::Contains("in columns") &&
                          Catch::Contains("must lie within [0, 512]"));

  std::vector<adapter_storage<double>> s;
  s.emplace_back(3, 2, 2);
  auto views = tensors_of(s);
  alloc_t alloc({{"a", 3, 2, 2}}, fixed_budget{2, 1});

  SECTION("wrong number of adapters") {
    std::vector<adalora::adapter_tensors<double>> none;
    REQUIRE_THROWS_WITH(alloc.step(0, none), Catch::Contains("expected 1 adapters") &&
                                                 Catch::Contains("got 0"));
  }
  SECTION("shape mismatch, nothing changed") {
    auto bad = views;
    bad[0].params.A = adalora::make_matrix_view(s[0].A.data(), 2, 2);
    REQUIRE_THROWS_WITH(alloc.step(0, bad), Catch::Contains("rank_allocator::step") &&
                                                Catch::Contains("A must be 2 x 3") &&
                                                Catch::Contains("got 2 x 2"));
    auto bad_grad = views;
    bad_grad[0].grads.B = adalora::make_matrix_view<const double>(s[0].gB.data(), 1, 2);
    REQUIRE_THROWS_WITH(alloc.step(0, bad_grad), Catch::Contains("gradient of B must be 2 x 2"));
    REQUIRE(alloc.last_step() == -1);
    REQUIRE(s[0].E == std::vector<double>{1, 1});
  }
  SECTION("steps must increase") {
    alloc.step(3, views);
    REQUIRE_THROWS_WITH(alloc.step(3, views), Catch::Contains("must increase") &&
                                                  Catch::Contains("got 3 after 3"));
    REQUIRE_THROWS_WITH(alloc.step(2, views), Catch::Contains("got 2 after 3"));
    REQUIRE_THROWS_WITH(alloc.step(-1, views), Catch::Contains(">= 0"));
  }
  SECTION("a schedule budget out of range") {
    adalora::rank_allocator<double, adalora::magnitude, fixed_budget> over(
        {{"a", 3, 2, 2}}, fixed_budget{2, 3});
    REQUIRE_THROWS_WITH(over.step(0, views), Catch::Contains("budget 3") &&
                                                 Catch::Contains("[0, 2]"));
  }
}

TEST_CASE("option values the allocator does not know are refused at construction",
          "[allocator][errors]") {
  // As from an int in a user's config file: every unknown value used to be taken as one of the
  // known ones (tie_policy(2) as exact_budget, without its scratch: a crash at the first mask).
  using alloc_t = adalora::rank_allocator<double, adalora::magnitude, fixed_budget>;
  const std::vector<adalora::adapter_shape> shapes = {{"a", 3, 2, 2}};
  REQUIRE_THROWS_AS(alloc_t(shapes, fixed_budget{2, 1}, {}, {.ties = static_cast<adalora::tie_policy>(2)}),
                    std::invalid_argument);
  REQUIRE_THROWS_WITH(alloc_t(shapes, fixed_budget{2, 1}, {}, {.ties = static_cast<adalora::tie_policy>(2)}),
                      Catch::Contains("rank_allocator") && Catch::Contains("options.ties") &&
                          Catch::Contains("got 2"));
  REQUIRE_THROWS_WITH(alloc_t(shapes, fixed_budget{2, 1}, {},
                              {.final_phase = static_cast<adalora::final_phase_rule>(2)}),
                      Catch::Contains("options.final_phase") && Catch::Contains("got 2"));
  REQUIRE_THROWS_WITH(alloc_t(shapes, fixed_budget{2, 1}, {},
                              {.non_finite = static_cast<adalora::non_finite_policy>(3)}),
                      Catch::Contains("options.non_finite") && Catch::Contains("got 3"));
  REQUIRE_THROWS_WITH(alloc_t(shapes, fixed_budget{2, 1}, {},
                              {.non_finite = static_cast<adalora::non_finite_policy>(255)}),
                      Catch::Contains("options.non_finite") && Catch::Contains("got 255"));
  // Every known value is accepted.
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib})
    for (auto ties : {adalora::tie_policy::prune_all_ties, adalora::tie_policy::exact_budget})
      for (auto non_finite : {adalora::non_finite_policy::ignore_elements, adalora::non_finite_policy::skip_step,
                              adalora::non_finite_policy::throw_error})
        REQUIRE_NOTHROW(alloc_t(shapes, fixed_budget{2, 1}, {},
                                {.final_phase = semantics, .ties = ties, .non_finite = non_finite}));
}

TEST_CASE("empty or duplicate adapter names are refused at construction", "[allocator][errors]") {
  // They key the rank pattern: pattern() would refuse them only after a whole training run.
  using alloc_t = adalora::rank_allocator<double, adalora::magnitude, fixed_budget>;
  REQUIRE_THROWS_AS(alloc_t({{"q", 3, 2, 2}, {"v", 3, 2, 2}, {"q", 4, 4, 1}}, fixed_budget{5, 1}),
                    std::invalid_argument);
  REQUIRE_THROWS_WITH(alloc_t({{"q", 3, 2, 2}, {"v", 3, 2, 2}, {"q", 4, 4, 1}}, fixed_budget{5, 1}),
                      Catch::Contains("rank_allocator") && Catch::Contains("adapters 0 and 2") &&
                          Catch::Contains("'q'"));
  REQUIRE_THROWS_WITH(alloc_t({{"x", 3, 2, 2}, {"b", 3, 2, 2}, {"a", 3, 2, 2}, {"b", 3, 2, 2}},
                              fixed_budget{8, 1}),
                      Catch::Contains("adapters 1 and 3") && Catch::Contains("'b'"));
  REQUIRE_THROWS_WITH(alloc_t({{"q", 3, 2, 2}, {"", 3, 2, 2}}, fixed_budget{4, 1}),
                      Catch::Contains("adapter 1") && Catch::Contains("empty name"));
}

TEMPLATE_TEST_CASE("non-finite parameters or gradients never reach the scores, under every policy",
                   "[allocator][errors]", float, double) {
  using T = TestType;
  std::vector<adapter_storage<T>> s;
  s.emplace_back(3, 2, 2);
  for (std::size_t i = 0; i < s[0].gA.size(); ++i) s[0].gA[i] = T(0.5);
  s[0].gB = {T(1), std::numeric_limits<T>::quiet_NaN(), T(1), std::numeric_limits<T>::infinity()};
  auto views = tensors_of(s);
  const std::vector<adalora::adapter_shape> shape = {{"layer.q", 3, 2, 2}};

  SECTION("ignore_elements (default): those elements keep their state, the step goes on") {
    adalora::rank_allocator<T, adalora::smoothed_sensitivity, fixed_budget> alloc(shape, fixed_budget{2, 1});
    const auto& r = alloc.step(0, views);
    REQUIRE(r.non_finite == 2);
    REQUIRE(r.action == adalora::mask_action::threshold);
    REQUIRE(std::isfinite(r.threshold));
    for (double v : alloc.triplet_scores()) REQUIRE(std::isfinite(v));
    const auto stB = alloc.state(0, adalora::tensor_role::B);  // B is 2 x 2, two state values each
    REQUIRE(stB[2 * 1] == T(0));                                  // the NaN element: untouched
    REQUIRE(stB[2 * 3] == T(0));                                  // the infinite one too
    REQUIRE(stB[2 * 0] > T(0));                                   // a finite one moved
  }
  SECTION("skip_step: nothing changes, the step is reported skipped") {
    adalora::rank_allocator<T, adalora::smoothed_sensitivity, fixed_budget> alloc(
        shape, fixed_budget{2, 1}, {}, {.non_finite = adalora::non_finite_policy::skip_step});
    const auto& r = alloc.step(0, views);
    REQUIRE(r.skipped);
    REQUIRE(r.non_finite == 2);
    REQUIRE(r.action == adalora::mask_action::none);
    REQUIRE(alloc.last_step() == 0);
    for (T v : alloc.state(0, adalora::tensor_role::A)) REQUIRE(v == T(0));
    REQUIRE(s[0].E == std::vector<T>{1, 1});
  }
  SECTION("throw_error: a clear exception, and the allocator is unchanged") {
    adalora::rank_allocator<T, adalora::smoothed_sensitivity, fixed_budget> alloc(
        shape, fixed_budget{2, 1}, {}, {.non_finite = adalora::non_finite_policy::throw_error});
    REQUIRE_THROWS_WITH(alloc.step(0, views), Catch::Contains("2 parameter or gradient values") &&
                                                  Catch::Contains("layer.q") &&
                                                  Catch::Contains("tensor B") &&
                                                  Catch::Contains("nothing was changed"));
    REQUIRE(alloc.last_step() == -1);
    for (T v : alloc.state(0, adalora::tensor_role::A)) REQUIRE(v == T(0));
    REQUIRE(s[0].E == std::vector<T>{1, 1});
    s[0].gB = {T(1), T(1), T(1), T(1)};
    REQUIRE_NOTHROW(alloc.step(0, views));  // the same step, now with finite gradients
  }
}

TEMPLATE_TEST_CASE("extreme but finite values do not overflow the scores", "[allocator]", float,
                   double) {
  // |w·∇w| = 1e30 squares to ~1e58 in the score Ī·Ū: beyond float, not beyond double. The
  // ranking must still see adapter "big" as more important than adapter "small".
  using T = TestType;
  std::vector<adapter_storage<T>> s;
  s.emplace_back(2, 2, 1);
  s.emplace_back(2, 2, 1);
  for (auto* v : {&s[0].A, &s[0].E, &s[0].B}) std::fill(v->begin(), v->end(), T(1e30));
  for (auto* v : {&s[0].gA, &s[0].gE, &s[0].gB, &s[1].gA, &s[1].gE, &s[1].gB})
    std::fill(v->begin(), v->end(), T(1));
  auto views = tensors_of(s);
  adalora::rank_allocator<T, adalora::smoothed_sensitivity, fixed_budget> alloc(
      {{"big", 2, 2, 1}, {"small", 2, 2, 1}}, fixed_budget{2, 1});
  const auto& r = alloc.step(0, views);
  REQUIRE(r.non_finite == 0);
  for (double v : alloc.triplet_scores()) REQUIRE(std::isfinite(v));
  REQUIRE(alloc.triplet_scores()[0] > 1e50);
  REQUIRE(std::vector<adalora::index_t>(r.kept.begin(), r.kept.end()) ==
          std::vector<adalora::index_t>{1, 0});
}

TEST_CASE("a score beyond double's range is +inf and ranks first; the step goes on",
          "[allocator][errors]") {
  // A = 1e100 and its gradient 1e100: |w·∇w| = 1e200 and Ī, Ū fit a double, Ī·Ū ≈ 1e398 does
  // not. As torch computes it in float64, that score is +inf: ranked above every finite score,
  // the state finite, no error (it used to be refused as a broken metric after the state moved).
  const auto policy = GENERATE(adalora::non_finite_policy::ignore_elements,
                               adalora::non_finite_policy::skip_step,
                               adalora::non_finite_policy::throw_error);
  const auto semantics = GENERATE(adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib);
  std::vector<adapter_storage<double>> s;
  s.emplace_back(3, 2, 2);
  s.emplace_back(3, 2, 1);
  for (auto* g : {&s[0].gA, &s[0].gE, &s[0].gB}) std::fill(g->begin(), g->end(), 0.5);
  for (auto* g : {&s[1].gA, &s[1].gE, &s[1].gB}) std::fill(g->begin(), g->end(), 0.25);
  std::fill(s[0].A.begin() + 3, s[0].A.end(), 1e100);  // row 1 of A: triplet 1 of "big"
  std::fill(s[0].gA.begin() + 3, s[0].gA.end(), 1e100);
  auto views = tensors_of(s);
  // Masks at every step to 2 of 3 triplets; the final phase from step 2 (frozen scores).
  adalora::rank_allocator<double, adalora::smoothed_sensitivity, fixed_budget> alloc(
      {{"big", 3, 2, 2}, {"small", 3, 2, 1}}, fixed_budget{3, 2, 2}, {},
      {.final_phase = semantics, .non_finite = policy});
  for (std::int64_t t = 0; t < 4; ++t) {
    const auto& r = alloc.step(t, views);
    REQUIRE(r.non_finite == 0);
    REQUIRE_FALSE(r.skipped);
    if (r.action == adalora::mask_action::threshold) {
      REQUIRE(alloc.triplet_scores()[1] == std::numeric_limits<double>::infinity());
      REQUIRE(std::isfinite(alloc.triplet_scores()[0]));
      REQUIRE(std::isfinite(alloc.triplet_scores()[2]));
      REQUIRE(r.threshold == alloc.triplet_scores()[2]);  // "small" ranks last
    }
    REQUIRE(alloc.kept_mask(0)[1] == 1);  // the +inf triplet is never pruned
    REQUIRE(r.kept_total == 2);
    for (double v : alloc.state(0, adalora::tensor_role::A)) REQUIRE(std::isfinite(v));
  }
  REQUIRE(alloc.last_step() == 3);
}

TEST_CASE("a sum of finite scores beyond double's range is +inf, not a broken metric",
          "[allocator][errors]") {
  // |w| = 1e308 twice in a row of A: each score is finite, their sum is not.
  std::vector<adapter_storage<double>> s;
  s.emplace_back(2, 2, 2);
  s[0].A = {1e308, 1e308, 1, 1};
  auto views = tensors_of(s);
  adalora::rank_allocator<double, adalora::parameter_magnitude, fixed_budget> alloc({{"a", 2, 2, 2}},
                                                                                    fixed_budget{2, 1});
  const auto& r = alloc.step(0, views);
  REQUIRE(alloc.triplet_scores()[0] == std::numeric_limits<double>::infinity());
  REQUIRE(alloc.triplet_scores()[1] == 1.0 + (1.0 + 1.0));
  REQUIRE(r.threshold == 3.0);
  REQUIRE(s[0].E == std::vector<double>{1, 0});
}

TEST_CASE("a product of finite values beyond float's range leaves that element's state as it was",
          "[allocator]") {
  // |w·∇w| = 1e60 does not fit a float; the reference would store inf for good.
  std::vector<adapter_storage<float>> s;
  s.emplace_back(2, 2, 1);
  std::fill(s[0].gA.begin(), s[0].gA.end(), 1.0f);
  std::fill(s[0].gB.begin(), s[0].gB.end(), 1.0f);
  s[0].A[1] = 1e30f;
  s[0].gA[1] = 1e30f;
  auto views = tensors_of(s);
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, fixed_budget> alloc({{"a", 2, 2, 1}},
                                                                                    fixed_budget{1, 0});
  for (std::int64_t t = 0; t < 3; ++t) REQUIRE_NOTHROW(alloc.step(t, views));
  const auto stA = alloc.state(0, adalora::tensor_role::A);
  REQUIRE(stA[2] == 0.0f);  // the overflowing element: untouched
  REQUIRE(stA[3] == 0.0f);
  REQUIRE(stA[0] > 0.0f);   // its neighbour moved
  REQUIRE(std::isfinite(alloc.triplet_scores()[0]));
}

TEST_CASE("a metric that breaks its contract is named, not ranked", "[allocator][errors]") {
  std::vector<adapter_storage<double>> s;
  s.emplace_back(3, 2, 2);
  auto views = tensors_of(s);
  adalora::rank_allocator<double, negative_metric, fixed_budget> alloc({{"m", 3, 2, 2}},
                                                                       fixed_budget{2, 1});
  REQUIRE_THROWS_WITH(alloc.step(0, views), Catch::Contains("negative or non-finite score") &&
                                                Catch::Contains("'m'"));
}

TEST_CASE("the communicator sums the partial triplet sums once per mask event", "[allocator]") {
  struct counting_comm {
    int* calls;
    std::size_t* size;
    void all_reduce_sum(std::span<double> v) {
      ++*calls;
      *size = v.size();
    }
  };
  int calls = 0;
  std::size_t size = 0;
  std::vector<adapter_storage<double>> s;
  s.emplace_back(3, 2, 2);
  s.emplace_back(4, 4, 3);
  auto views = tensors_of(s);
  adalora::cubic_schedule sched({.initial_budget = 5, .target_budget = 2, .total_step = 10,
                                 .tinit = 1, .tfinal = 2, .delta_t = 2});
  adalora::rank_allocator<double, adalora::sensitivity, adalora::cubic_schedule, counting_comm>
      alloc({{"a", 3, 2, 2}, {"b", 4, 4, 3}}, sched, {}, {}, counting_comm{&calls, &size});
  int masks = 0;
  for (std::int64_t t = 0; t < 10; ++t) {
    const auto& r = alloc.step(t, views);
    masks += r.action == adalora::mask_action::threshold ? 1 : 0;
  }
  REQUIRE(masks >= 2);
  REQUIRE(calls == masks);
  REQUIRE(size == 3 * 5);  // three partial sums per triplet, never parameters or state
}

TEMPLATE_TEST_CASE("results do not depend on the number of threads", "[allocator][threads]", float,
                   double) {
  // Shapes large enough that A and B are split into several tasks (32768 elements each).
  using T = TestType;
  const std::vector<adalora::adapter_shape> shapes = {{"wide", 8200, 3, 4}, {"tall", 5, 11000, 3}, {"small", 6, 4, 2}};
  auto make = [&] {
    std::vector<adapter_storage<T>> s;
    for (const auto& sh : shapes) s.emplace_back(sh.in_features, sh.out_features, sh.rank);
    return s;
  };
  auto run = [&](unsigned threads, adalora::final_phase_rule semantics) {
    auto s = make();
    auto views = tensors_of(s);
    adalora::rank_allocator<T> alloc(
        shapes,
        adalora::cubic_schedule({.initial_budget = 9, .target_budget = 4, .total_step = 10,
                                 .tinit = 1, .tfinal = 2, .delta_t = 2}),
        {}, {.final_phase = semantics, .threads = threads});
    std::vector<double> trace;
    std::uint64_t x = 12345;
    for (std::int64_t t = 0; t < 12; ++t) {  // warm-up, reduction and final phase
      for (auto& a : s)  // deterministic pseudo-random gradients
        for (auto* g : {&a.gA, &a.gE, &a.gB})
          for (auto& v : *g) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            v = T(double(x >> 40) / double(1 << 24) - 0.5);
          }
      const auto& r = alloc.step(t, views);
      trace.push_back(r.threshold);
      for (double v : alloc.triplet_scores()) trace.push_back(v);
      for (auto k : r.kept) trace.push_back(double(k));
    }
    for (std::size_t a = 0; a < shapes.size(); ++a)
      for (auto role : {adalora::tensor_role::A, adalora::tensor_role::E, adalora::tensor_role::B})
        for (T v : alloc.state(a, role)) trace.push_back(double(v));
    return trace;
  };
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    REQUIRE(run(3, semantics) == run(1, semantics));  // bit-identical, element for element
  }
  REQUIRE_THROWS_WITH(adalora::rank_allocator<T>(shapes,
                                                  adalora::cubic_schedule({.initial_budget = 9, .target_budget = 4,
                                                                           .total_step = 12}),
                                                  {}, {.threads = 0}),
                      Catch::Contains("threads must be >= 1"));
}

TEMPLATE_TEST_CASE("empty views may have null data: a shard that holds no columns of A",
                   "[allocator][sharding]", float, double) {
  using T = TestType;
  // This process holds every triplet and row of B, but none of A's 5 columns: A and its gradient
  // are 3 x 0, viewed from empty vectors whose data() is null.
  std::vector<T> E = {T(3), T(1), T(2)}, gE(3, T(0.5)), B(4 * 3, T(1)), gB(4 * 3, T(0.25));
  std::vector<T> A, gA;
  REQUIRE(A.data() == nullptr);
  const adalora::adapter_tensors<T> views{
      {adalora::make_matrix_view(A.data(), 3, 0), adalora::vector_view<T>(E.data(), 3),
       adalora::make_matrix_view(B.data(), 4, 3)},
      {adalora::make_matrix_view<const T>(gA.data(), 3, 0), adalora::vector_view<const T>(gE.data(), 3),
       adalora::make_matrix_view<const T>(gB.data(), 4, 3)}};
  adalora::adapter_shape shape{"a", 5, 4, 3};
  shape.shard.in_count = 0;
  adalora::rank_allocator<T, adalora::smoothed_sensitivity, fixed_budget> alloc({shape}, fixed_budget{3, 2});
  const auto& r = alloc.step(0, std::span<const adalora::adapter_tensors<T>>(&views, 1));
  REQUIRE(r.kept_total == 2);
  REQUIRE(E[1] == T(0));  // |E·∇E| is lowest for E = 1
  // A non-empty view with null data is still refused.
  const adalora::adapter_tensors<T> broken{
      {adalora::make_matrix_view(A.data(), 3, 0), adalora::vector_view<T>(nullptr, 3),
       adalora::make_matrix_view(B.data(), 4, 3)},
      views.grads};
  REQUIRE_THROWS_WITH(alloc.step(1, std::span<const adalora::adapter_tensors<T>>(&broken, 1)),
                      Catch::Contains("null data"));
}
