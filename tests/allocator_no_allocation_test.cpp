// The allocator's per-step path makes no heap allocation: the testing kit's counting global
// operator new replaces the default one in this test binary.

#include <catch2/catch.hpp>

#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/testing/allocation_counter.hpp"

ADALORA_TESTING_COUNT_ALLOCATIONS();

using adalora::testing::allocation_counter;

TEMPLATE_TEST_CASE("rank_allocator::step never allocates, in any phase", "[allocator][alloc]",
                   float, double) {
  const adalora::index_t in = 7, out = 5, r = 4;
  std::vector<TestType> A(r * in, TestType(0.5)), E(r, TestType(0.25)), B(out * r, TestType(2));
  std::vector<TestType> gA(A.size()), gE(E.size()), gB(B.size());
  for (std::size_t i = 0; i < gA.size(); ++i) gA[i] = TestType(0.01) * TestType(i % 7 + 1);
  for (std::size_t i = 0; i < gE.size(); ++i) gE[i] = TestType(0.1) * TestType(i + 1);
  for (std::size_t i = 0; i < gB.size(); ++i) gB[i] = TestType(0.02) * TestType(i % 5 + 1);
  std::vector<adalora::adapter_tensors<TestType>> views(
      2, {{adalora::make_matrix_view(A.data(), r, in), adalora::vector_view<TestType>(E.data(), r),
           adalora::make_matrix_view(B.data(), out, r)},
          {adalora::make_matrix_view<const TestType>(gA.data(), r, in),
           adalora::vector_view<const TestType>(gE.data(), r),
           adalora::make_matrix_view<const TestType>(gB.data(), out, r)}});
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    for (auto ties : {adalora::tie_policy::prune_all_ties, adalora::tie_policy::exact_budget}) {
      adalora::rank_allocator<TestType> alloc(
          {{"a", in, out, r}, {"b", in, out, r}},
          adalora::cubic_schedule({.initial_budget = 2 * r, .target_budget = 3, .total_step = 40,
                                   .tinit = 3, .tfinal = 8, .delta_t = 2}),
          {}, {.final_phase = semantics, .ties = ties});
      REQUIRE(allocation_counter::wired());
      const auto before = allocation_counter::count();
      int masks = 0;
      for (std::int64_t t = 0; t < 45; ++t) {
        const auto& res = alloc.step(t, views);
        masks += res.action != adalora::mask_action::none ? 1 : 0;
      }
      REQUIRE(allocation_counter::count() == before);
      REQUIRE(masks > 10);  // warm-up, reduction and final phases were all exercised
    }
  }
}
