#pragma once
// Budget schedules for growth (docs/growth.md): policies like cubic_schedule, for a total rank
// that stays where it started while a rank_redistributor moves it between adapters, or that
// rises. Same phases as the built-in schedules: warm-up up to tinit without masking, masks at
// absolute multiples of delta_t in between (so that triplet scores exist when rank moves), the
// target budget at every step of the final phase.

#include <cstdint>

#include "adalora/budget_schedule.hpp"
#include "adalora/config.hpp"

namespace adalora {

namespace detail {

inline void validate_growth_phases(const schedule_options& o, const char* who) {
  ADALORA_REQUIRE(o.total_step > 0, who, "total_step must be > 0, got ", o.total_step);
  ADALORA_REQUIRE(o.tinit >= 0 && o.tfinal >= 0, who, "tinit and tfinal must be >= 0, got ",
                  o.tinit, " and ", o.tfinal);
  ADALORA_REQUIRE(o.delta_t >= 1, who, "delta_t must be >= 1, got ", o.delta_t);
  ADALORA_REQUIRE(o.tinit < o.total_step - o.tfinal, who, "tinit must be < total_step - tfinal = ",
                  o.total_step - o.tfinal, ", got ", o.tinit);
  ADALORA_REQUIRE(o.initial_budget == budget_from_adapters ||
                      (o.initial_budget >= 0 && o.initial_budget <= max_exact_budget),
                  who, "initial_budget must be in [0, 2^53] (or budget_from_adapters), got ",
                  o.initial_budget);
}

}  // namespace detail

/// The phases of a constant_total_schedule (schedule_options without a target budget).
struct constant_total_options {
  std::int64_t initial_budget = budget_from_adapters;
  std::int64_t total_step;
  std::int64_t tinit = 0;
  std::int64_t tfinal = 0;
  std::int64_t delta_t = 1;
};

/// The total rank stays b0 at every step. With a rank_redistributor, rank moves between
/// adapters at a constant total.
class constant_total_schedule {
 public:
  explicit constant_total_schedule(const constant_total_options& o)
      : o_{o.initial_budget, o.initial_budget, o.total_step, o.tinit, o.tfinal, o.delta_t} {
    detail::validate_growth_phases(o_, "constant_total_schedule");
  }
  constant_total_schedule with_initial_budget(std::int64_t b0) const {
    return constant_total_schedule({b0, o_.total_step, o_.tinit, o_.tfinal, o_.delta_t});
  }

  std::int64_t initial_budget() const noexcept { return o_.initial_budget; }
  std::int64_t target_budget() const noexcept { return o_.initial_budget; }
  std::int64_t final_phase_start() const noexcept { return adalora::final_phase_start(o_); }
  const schedule_options& options() const noexcept { return o_; }

  budget_decision at(std::int64_t t) const {
    require_set(o_, t, "constant_total_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    return {o_.initial_budget, t > o_.total_step - o_.tfinal || t % o_.delta_t == 0};
  }

  static void require_set(const schedule_options& o, std::int64_t t, const char* who) {
    ADALORA_REQUIRE(t >= 0, who, "t must be >= 0, got ", t);
    ADALORA_REQUIRE(o.initial_budget != budget_from_adapters, who,
                    "the initial budget is not set yet: give the schedule to a rank_allocator");
  }

 private:
  schedule_options o_;
};

/// A budget that rises linearly from b0 to bT >= b0 over the reduction phase (the mirror of
/// linear_schedule): budget = int(b0 + (bT - b0) * (t - tinit) / (T - tfinal - tinit)). The
/// allocator needs allocator_options::rank_can_grow; it keeps every triplet while the budget is
/// above the total rank and reports the difference (step_result::missing), which a
/// rank_redistributor adds where its growth policy says.
class rising_schedule {
 public:
  explicit rising_schedule(const schedule_options& o) : o_(o) {
    constexpr const char* who = "rising_schedule";
    detail::validate_growth_phases(o_, who);
    ADALORA_REQUIRE(o_.target_budget >= 0 && o_.target_budget <= detail::max_exact_budget, who,
                    "target_budget must be in [0, 2^53], got ", o_.target_budget);
    ADALORA_REQUIRE(o_.initial_budget == budget_from_adapters || o_.target_budget >= o_.initial_budget,
                    who, "target_budget must be >= initial_budget = ", o_.initial_budget,
                    " (a budget that falls is cubic_schedule's), got ", o_.target_budget);
  }
  rising_schedule with_initial_budget(std::int64_t b0) const {
    schedule_options o = o_;
    o.initial_budget = b0;
    return rising_schedule(o);
  }

  std::int64_t initial_budget() const noexcept { return o_.initial_budget; }
  std::int64_t target_budget() const noexcept { return o_.target_budget; }
  std::int64_t final_phase_start() const noexcept { return adalora::final_phase_start(o_); }
  const schedule_options& options() const noexcept { return o_; }

  budget_decision at(std::int64_t t) const {
    constant_total_schedule::require_set(o_, t, "rising_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    if (t > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    const double progress = static_cast<double>(t - o_.tinit) /
                            static_cast<double>(o_.total_step - o_.tfinal - o_.tinit);
    const double b = static_cast<double>(o_.initial_budget) +
                     static_cast<double>(o_.target_budget - o_.initial_budget) * progress;
    return {static_cast<std::int64_t>(b), t % o_.delta_t == 0};
  }

 private:
  schedule_options o_;
};

static_assert(check_budget_schedule<constant_total_schedule>());
static_assert(check_budget_schedule<rising_schedule>());

}  // namespace adalora
