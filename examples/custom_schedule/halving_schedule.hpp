#pragma once
// A user-defined budget schedule for adalora's rank allocator: the prunable budget halves every
// `half_life` steps.
//
// This header is the part to copy: one small class that satisfies adalora::BudgetSchedule
// (adalora/budget_schedule.hpp, docs/budget_schedules.md). main.cpp drives a rank_allocator with
// it; halving_schedule_test.cpp is its unit test, with the schedule conformance kit.

#include <cstdint>

#include "adalora/budget_schedule.hpp"
#include "adalora/config.hpp"

namespace example {

/// Exponential decay of the budget in whole halvings, with AdaLoRA's three phases (b0 = initial
/// budget, bT = target, F = total_step - tfinal):
///
///     t <= tinit:        {b0, no mask}                                      warm-up
///     tinit < t < F:     {bT + ((b0 - bT) >> (t - tinit) / half_life),      reduction
///                         mask when t % delta_t == 0}
///     t == F:            {bT, mask when t % delta_t == 0}
///     t > F:             {bT, mask}                                         final phase
///
/// Why halvings: the cubic schedule prunes fastest at the start of the reduction phase; this one
/// removes half of what is still prunable per half-life, so the last triplets (the contested
/// ones) get more steps of importance estimates before they go. Integer shifts, so the budgets
/// are exact on every platform. Guarantees: budgets in [bT, b0], non-increasing, bT from F on.
class halving_schedule {
 public:
  struct options {
    std::int64_t initial_budget = adalora::budget_from_adapters;  ///< b0; the allocator sets it
    std::int64_t target_budget = 0;                               ///< bT
    std::int64_t total_step = 0;                                  ///< T
    std::int64_t tinit = 0;                                       ///< warm-up steps
    std::int64_t tfinal = 0;                                      ///< final phase steps
    std::int64_t half_life = 1;                                   ///< steps per halving
    std::int64_t delta_t = 1;                                     ///< mask interval
  };

  explicit halving_schedule(const options& o) : o_(o) {
    // Checked once, here: at(t) is called at every step and must not throw.
    constexpr const char* who = "example::halving_schedule";
    ADALORA_REQUIRE(o.half_life >= 1, who, "half_life must be >= 1, got ", o.half_life);
    ADALORA_REQUIRE(o.delta_t >= 1, who, "delta_t must be >= 1, got ", o.delta_t);
    ADALORA_REQUIRE(o.tinit >= 0 && o.tfinal >= 0, who, "tinit and tfinal must be >= 0, got ",
                    o.tinit, " and ", o.tfinal);
    ADALORA_REQUIRE(o.tinit < o.total_step - o.tfinal, who,
                    "tinit must be < total_step - tfinal (a reduction phase), got tinit = ",
                    o.tinit, ", total_step - tfinal = ", o.total_step - o.tfinal);
    ADALORA_REQUIRE(o.target_budget >= 0, who, "target_budget must be >= 0, got ", o.target_budget);
    ADALORA_REQUIRE(
        o.initial_budget == adalora::budget_from_adapters || o.initial_budget > o.target_budget,
        who, "initial_budget must be > target_budget = ", o.target_budget,
        " (or budget_from_adapters), got ", o.initial_budget);
  }

  /// The optional hook: the allocator calls it with the sum of its adapters' ranks when
  /// initial_budget is left at budget_from_adapters.
  halving_schedule with_initial_budget(std::int64_t b0) const {
    options o = o_;
    o.initial_budget = b0;
    return halving_schedule(o);
  }

  adalora::budget_decision at(std::int64_t t) const {
    const std::int64_t b0 = o_.initial_budget, bt = o_.target_budget, f = final_phase_start();
    if (t <= o_.tinit) return {b0, false};
    if (t > f) return {bt, true};
    const bool mask = t % o_.delta_t == 0;
    if (t == f) return {bt, mask};  // the reduction ends exactly on the target
    const std::int64_t halvings = (t - o_.tinit) / o_.half_life;
    return {bt + (halvings >= 63 ? 0 : (b0 - bt) >> halvings), mask};
  }
  std::int64_t initial_budget() const { return o_.initial_budget; }
  std::int64_t target_budget() const { return o_.target_budget; }
  std::int64_t final_phase_start() const { return o_.total_step - o_.tfinal; }

  const options& opts() const noexcept { return o_; }

 private:
  options o_;
};

// Checked where it is defined, so that a wrong signature fails here, naming the member, and not
// deep inside rank_allocator.
static_assert(adalora::check_budget_schedule<halving_schedule>());

}  // namespace example
