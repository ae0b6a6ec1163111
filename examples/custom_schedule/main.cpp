// A custom budget schedule driving the rank allocator: halving_schedule (halving_schedule.hpp)
// prunes three adapters of rank 4 (b0 = 12, filled in by the allocator) down to 3 triplets.
//
// The loop is as small as a training loop gets: the singular values stay fixed and the
// allocator ranks them by magnitude (adalora::magnitude, the paper's |λ| ablation), so the
// triplets kept at each budget are known in advance: the largest |λ|. That makes the schedule's
// effect the only thing that moves, which is what an example of a schedule should show.
//
//   bazel run //examples/custom_schedule
//
// With your own schedule: replace example::halving_schedule below by it, and copy
// halving_schedule_test.cpp for its unit test.

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "examples/custom_schedule/halving_schedule.hpp"

namespace {

using adalora::index_t;

struct adapter_buffers {
  std::string name;
  std::vector<double> A, E, B, gA, gE, gB;
};

}  // namespace

int main() {
  // Three adapters (in 6, out 5, rank 4) with singular values of known magnitudes: the three
  // largest are q's 9 and 7 and k's 8, so the target of 3 must keep q 2, k 1, v 0.
  const index_t in = 6, out = 5, rank = 4;
  std::vector<adapter_buffers> layers = {{"q", {}, {9, 7, 2, 0.5}, {}, {}, {}, {}},
                                         {"k", {}, {8, 1, 0.7, 0.2}, {}, {}, {}, {}},
                                         {"v", {}, {3, 0.9, 0.6, 0.1}, {}, {}, {}, {}}};
  std::vector<adalora::adapter_shape> shapes;
  std::vector<adalora::adapter_tensors<double>> views;
  for (adapter_buffers& l : layers) {
    l.A.assign(static_cast<std::size_t>(rank * in), 0.1);
    l.B.assign(static_cast<std::size_t>(out * rank), 0.1);
    l.gA.assign(l.A.size(), 0.0);
    l.gE.assign(l.E.size(), 0.0);
    l.gB.assign(l.B.size(), 0.0);
    shapes.push_back({l.name, in, out, rank, {}});
    views.push_back({{adalora::make_matrix_view(l.A.data(), rank, in),
                      adalora::vector_view<double>(l.E.data(), rank),
                      adalora::make_matrix_view(l.B.data(), out, rank)},
                     {adalora::make_matrix_view<const double>(l.gA.data(), rank, in),
                      adalora::vector_view<const double>(l.gE.data(), rank),
                      adalora::make_matrix_view<const double>(l.gB.data(), out, rank)}});
  }

  // The schedule is the allocator's third template argument. Its initial budget is left at
  // budget_from_adapters: the allocator calls with_initial_budget(12).
  const example::halving_schedule schedule({.target_budget = 3,
                                            .total_step = 40,
                                            .tinit = 5,
                                            .tfinal = 10,
                                            .half_life = 5,
                                            .delta_t = 5});
  adalora::rank_allocator<double, adalora::magnitude, example::halving_schedule> allocator(
      shapes, schedule);
  std::printf(
      "halving_schedule: b0 = %lld (from the adapters), target %lld, final phase from "
      "step %lld\n",
      static_cast<long long>(allocator.initial_budget()),
      static_cast<long long>(schedule.target_budget()),
      static_cast<long long>(schedule.final_phase_start()));

  std::string budgets = std::to_string(allocator.initial_budget());
  bool kept_budget = true;
  for (std::int64_t t = 0; t < 45; ++t) {
    // ... forward, backward and optimizer step of a real model go here ...
    const auto& r = allocator.step(t, views);
    if (r.action != adalora::mask_action::threshold) continue;
    budgets += " -> " + std::to_string(r.budget);
    kept_budget = kept_budget && r.kept_total == r.budget;
    std::printf("step %2lld: budget %2lld, kept q %lld, k %lld, v %lld\n",
                static_cast<long long>(t), static_cast<long long>(r.budget),
                static_cast<long long>(r.kept[0]), static_cast<long long>(r.kept[1]),
                static_cast<long long>(r.kept[2]));
  }
  const auto& last = allocator.step(45, views);
  std::printf("budgets at the mask events: %s\n", budgets.c_str());
  if (!kept_budget || last.kept_total != 3) {
    std::printf("the allocator did not keep the scheduled budget\n");
    return 1;
  }
  std::printf("final ranks q=%lld k=%lld v=%lld\n", static_cast<long long>(last.kept[0]),
              static_cast<long long>(last.kept[1]), static_cast<long long>(last.kept[2]));
  return 0;
}
