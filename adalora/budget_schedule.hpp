#pragma once
// Budget schedules: how many triplets (singular values) the model may keep at step t, and whether
// step t is a mask event.
//
// Every schedule shares the reference implementations' three phases, in steps t >= 0, with
// T = total_step:
//   warm-up    t in [0, tinit]               budget b0, no masking (inclusive of tinit!)
//   reduction  t in (tinit, T - tfinal]      budget falls from b0 to bT; mask when t % delta_t == 0
//   final      t in (T - tfinal, inf)        budget bT, mask every step
// At t = T - tfinal the reduction formula gives exactly bT; PEFT force-masks there whatever
// delta_t says (SPEC §7), loralib only if t % delta_t == 0. Masking is decided on the ABSOLUTE
// step, not on t - tinit.
//
// The rank allocator prunes k = b0 - budget triplets at a mask event. The constructors' validation
// (tinit < T - tfinal, bT < b0) makes k >= 1 at T - tfinal and in the final phase. In the
// reduction phase the double arithmetic keeps budget < b0 as long as
// (T - tfinal - tinit) * b0 / (b0 - bT) stays far below 2^55 (any real training run); beyond
// that the cubic/linear formulas can round back to b0, exactly as the references do, so an
// allocator should treat k = 0 as "nothing to prune".

#include <cmath>
#include <concepts>
#include <cstdint>
#include <stdexcept>

#include "adalora/config.hpp"

namespace adalora {

/// What a schedule says about one step: the budget in triplets (singular values) and whether the
/// allocator should mask to it now.
struct budget_decision {
  std::int64_t budget;
  bool mask;

  friend constexpr bool operator==(const budget_decision&, const budget_decision&) = default;
};

/// A budget schedule. `at(t)` must be defined for every t >= 0; `final_phase_start()` is the step
/// T - tfinal at which PEFT force-masks, stores the rank pattern and freezes it.
template <class S>
concept BudgetSchedule = requires(const S& s, std::int64_t t) {
  { s.at(t) } -> std::same_as<budget_decision>;
  { s.initial_budget() } -> std::same_as<std::int64_t>;     // b0 = sum of the initial ranks
  { s.target_budget() } -> std::same_as<std::int64_t>;      // bT
  { s.final_phase_start() } -> std::same_as<std::int64_t>;  // T - tfinal
};

/// Hyperparameters shared by the built-in schedules (PEFT AdaLoraConfig / loralib RankAllocator
/// names in the comments). Designated-initialiser friendly:
///   adalora::cubic_schedule s{{.initial_budget = 40, .target_budget = 20, .total_step = 60,
///                              .tinit = 10, .tfinal = 10, .delta_t = 5}};
struct schedule_options {
  std::int64_t initial_budget;  // b0: PEFT init_bgt, loralib total_rank (sum of initial ranks)
  std::int64_t target_budget;   // bT: PEFT target_r * n_layers, loralib target_total_rank
  std::int64_t total_step;      // T: PEFT total_step, loralib total_step
  std::int64_t tinit = 0;       // PEFT tinit, loralib initial_warmup
  std::int64_t tfinal = 0;      // PEFT tfinal, loralib final_warmup (a duration, not a step)
  std::int64_t delta_t = 1;     // PEFT deltaT, loralib mask_interval
};

/// The three phases of every built-in schedule (see the header comment).
enum class schedule_phase { warm_up, reduction, final_phase };

/// The phase of step t >= 0 under `o`: warm-up [0, tinit], reduction (tinit, T - tfinal],
/// final (T - tfinal, inf). Assumes validated options (tinit < T - tfinal).
constexpr schedule_phase phase_at(const schedule_options& o, std::int64_t t) noexcept {
  if (t <= o.tinit) return schedule_phase::warm_up;
  if (t > o.total_step - o.tfinal) return schedule_phase::final_phase;
  return schedule_phase::reduction;
}

/// First step of the final phase's force-mask, T - tfinal (PEFT masks there regardless of delta_t).
constexpr std::int64_t final_phase_start(const schedule_options& o) noexcept {
  return o.total_step - o.tfinal;
}

namespace detail {

/// Budgets go through double in the reference formula; above 2^53 that is no longer exact.
inline constexpr std::int64_t max_exact_budget = std::int64_t{1} << 53;

/// Throws std::invalid_argument naming `who`, the argument, the expected and the given values.
inline void validate_schedule_options(const schedule_options& o, const char* who) {
  ADALORA_REQUIRE(o.total_step > 0, who, "total_step must be > 0, got ", o.total_step);
  ADALORA_REQUIRE(o.tinit >= 0, who, "tinit must be >= 0, got ", o.tinit);
  ADALORA_REQUIRE(o.tfinal >= 0, who, "tfinal must be >= 0, got ", o.tfinal);
  ADALORA_REQUIRE(o.delta_t >= 1, who, "delta_t must be >= 1, got ", o.delta_t);
  // PEFT PR #2341 (after issue #2337, where the force-mask at T - tfinal fell inside the warm-up
  // and asked torch.kthvalue for k = 0).
  ADALORA_REQUIRE(o.tinit < o.total_step - o.tfinal, who,
                  "tinit must be < total_step - tfinal (a budgeting phase is required), got tinit = ",
                  o.tinit, ", total_step - tfinal = ", o.total_step, " - ", o.tfinal, " = ",
                  o.total_step - o.tfinal);
  ADALORA_REQUIRE(o.initial_budget >= 1, who, "initial_budget must be >= 1, got ",
                  o.initial_budget);
  ADALORA_REQUIRE(o.initial_budget <= max_exact_budget, who, "initial_budget must be <= 2^53 = ",
                  max_exact_budget, " (exact in double), got ", o.initial_budget);
  ADALORA_REQUIRE(o.target_budget >= 0, who, "target_budget must be >= 0, got ", o.target_budget);
  // Nothing to prune: torch.kthvalue would be asked for k = b0 - bT < 1.
  ADALORA_REQUIRE(o.target_budget < o.initial_budget, who,
                  "target_budget must be < initial_budget = ", o.initial_budget, ", got ",
                  o.target_budget);
}

inline void require_step(std::int64_t t, const char* who) {
  ADALORA_REQUIRE(t >= 0, who, "t must be >= 0, got ", t);
}

/// The state and accessors common to the built-in schedules.
class schedule_base {
 public:
  const schedule_options& options() const noexcept { return o_; }
  std::int64_t initial_budget() const noexcept { return o_.initial_budget; }
  std::int64_t target_budget() const noexcept { return o_.target_budget; }
  std::int64_t final_phase_start() const noexcept { return adalora::final_phase_start(o_); }

 protected:
  schedule_base(const schedule_options& o, const char* who) : o_(o) {
    validate_schedule_options(o_, who);
  }
  // Warm-up and final phase are the same for every built-in schedule; the reduction phase masks
  // at absolute multiples of delta_t.
  bool mask_in_reduction(std::int64_t t) const noexcept { return t % o_.delta_t == 0; }
  /// (t - tinit) / (T - tfinal - tinit) as Python's true division of ints (exact for |x| < 2^53).
  double progress(std::int64_t t) const noexcept {
    return static_cast<double>(t - o_.tinit) /
           static_cast<double>(o_.total_step - o_.tfinal - o_.tinit);
  }

  schedule_options o_;
};

}  // namespace detail

/// The AdaLoRA cubic schedule (loralib RankAllocator.schedule_threshold, PEFT
/// RankAllocator.budget_schedule; bit-exact against both over every config in schedule.json):
///   t <= tinit:       {b0, false}
///   t >  T - tfinal:  {bT, true}
///   otherwise:        mul = 1 - (t - tinit) / (T - tfinal - tinit)         (double)
///                     {int(bT + (b0 - bT) * mul^3), t % delta_t == 0}       (truncation)
/// PEFT writes int((b0 - bT) * mul**3 + bT), loralib bT + (b0 - bT) * mul**3: the same double, as
/// IEEE addition commutes. mul**3 is CPython's pow(mul, 3.0), hence std::pow. Compile with
/// -ffp-contract=off: a fused multiply-add would round differently from the references.
/// Guarantees: bT <= budget <= b0, non-increasing in t, exactly bT from T - tfinal on.
class cubic_schedule : public detail::schedule_base {
 public:
  explicit cubic_schedule(const schedule_options& o) : schedule_base(o, "cubic_schedule") {}

  budget_decision at(std::int64_t t) const {
    detail::require_step(t, "cubic_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    if (t > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    const double mul = 1.0 - progress(t);
    const double b = static_cast<double>(o_.target_budget) +
                     static_cast<double>(o_.initial_budget - o_.target_budget) * std::pow(mul, 3.0);
    return {static_cast<std::int64_t>(b), mask_in_reduction(t)};
  }
};

/// A linear alternative (not in the references; same phases and masking as cubic_schedule):
///   reduction:  mul = 1 - (t - tinit) / (T - tfinal - tinit),  budget = int(bT + (b0 - bT) * mul)
/// It prunes more slowly at the start of the reduction phase than the cubic schedule and reaches
/// bT exactly at T - tfinal.
class linear_schedule : public detail::schedule_base {
 public:
  explicit linear_schedule(const schedule_options& o) : schedule_base(o, "linear_schedule") {}

  budget_decision at(std::int64_t t) const {
    detail::require_step(t, "linear_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    if (t > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    const double mul = 1.0 - progress(t);
    const double b = static_cast<double>(o_.target_budget) +
                     static_cast<double>(o_.initial_budget - o_.target_budget) * mul;
    return {static_cast<std::int64_t>(b), mask_in_reduction(t)};
  }
};

/// A step alternative (not in the references; same phases as cubic_schedule): b0 without masking
/// through the warm-up, then bT at once for the whole reduction phase, masking at absolute
/// multiples of delta_t; the final phase masks to bT every step. Useful to compare AdaLoRA's
/// gradual pruning with one-shot pruning to the same target.
class constant_schedule : public detail::schedule_base {
 public:
  explicit constant_schedule(const schedule_options& o) : schedule_base(o, "constant_schedule") {}

  budget_decision at(std::int64_t t) const {
    detail::require_step(t, "constant_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    if (t > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    return {o_.target_budget, mask_in_reduction(t)};
  }
};

static_assert(BudgetSchedule<cubic_schedule>);
static_assert(BudgetSchedule<linear_schedule>);
static_assert(BudgetSchedule<constant_schedule>);

}  // namespace adalora
