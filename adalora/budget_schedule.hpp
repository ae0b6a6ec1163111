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
// delta_t says (docs/algorithm.md §7), loralib only if t % delta_t == 0. Masking is decided on the ABSOLUTE
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
#include <type_traits>

#include "adalora/config.hpp"

namespace adalora {

/// What a schedule says about one step: the budget in triplets (singular values) and whether the
/// allocator should mask to it now.
struct budget_decision {
  std::int64_t budget;
  bool mask;

  friend constexpr bool operator==(const budget_decision&, const budget_decision&) = default;
};

namespace detail {
template <class S>
concept has_budget_at = requires(const S& s, std::int64_t t) {
  { s.at(t) } -> std::same_as<budget_decision>;
};
template <class S>
concept has_initial_budget = requires(const S& s) {
  { s.initial_budget() } -> std::same_as<std::int64_t>;
};
template <class S>
concept has_target_budget = requires(const S& s) {
  { s.target_budget() } -> std::same_as<std::int64_t>;
};
template <class S>
concept has_final_phase_start = requires(const S& s) {
  { s.final_phase_start() } -> std::same_as<std::int64_t>;
};
template <class S>
concept has_with_initial_budget = requires(const S& s, std::int64_t b0) {
  { s.with_initial_budget(b0) } -> std::same_as<S>;
};

// Whether S declares a member named with_initial_budget, whatever its kind or signature: the
// lookup in a class derived from S and from a class that declares the name is ambiguous exactly
// then. A final S cannot be derived from; a callable or addressable member is seen instead.
struct with_initial_budget_probe {
  void with_initial_budget();
};
template <class S>
struct with_initial_budget_lookup : S, with_initial_budget_probe {};
template <class S>
concept with_initial_budget_ambiguous =
    !requires { &with_initial_budget_lookup<S>::with_initial_budget; };
template <class S>
concept with_initial_budget_reachable =
    requires { &S::with_initial_budget; } ||
    requires(S& s, std::int64_t b0) { s.with_initial_budget(b0); };
template <class S>
concept declares_with_initial_budget =
    std::is_class_v<S> && ((!std::is_final_v<S> && with_initial_budget_ambiguous<S>) ||
                           (std::is_final_v<S> && with_initial_budget_reachable<S>));

/// The optional hook is either absent or right: a misspelt signature would otherwise be ignored
/// silently, and the allocator would then refuse budget_from_adapters at run time.
template <class S>
concept with_initial_budget_absent_or_valid =
    !declares_with_initial_budget<S> ||
    (has_with_initial_budget<S> && std::is_move_assignable_v<S>);
}  // namespace detail

/// A budget schedule: how many triplets the model keeps at step t, and whether t is a mask event.
/// Requirements, for a schedule type S (all members callable on a const S):
///  1. `budget_decision at(std::int64_t t) const`, defined for every t >= 0 and a function of t
///     alone (an allocator resumed from a checkpoint asks for t > 0 first); the budget is in
///     [0, initial_budget()].
///  2. `std::int64_t initial_budget() const`: b0, the sum of the adapters' initial ranks.
///  3. `std::int64_t target_budget() const`: bT, the budget of the final phase.
///  4. `std::int64_t final_phase_start() const`: T - tfinal, the step at which PEFT force-masks,
///     stores the rank pattern and freezes it; at(t) gives {bT, mask} for every t after it.
/// Optional: `S with_initial_budget(std::int64_t b0) const`, the same schedule for initial budget
/// b0 (S must then be move-assignable). A schedule that has it may report
/// initial_budget() == budget_from_adapters, and the rank allocator then gives it the sum of its
/// adapters' ranks (PEFT derives init_bgt the same way). A member of that name with another
/// signature is an error, not ignored.
/// check_budget_schedule<S>() names the first requirement S misses; adalora/testing/
/// schedule_conformance.hpp checks the behaviour (docs/budget_schedules.md).
template <class S>
concept BudgetSchedule = detail::has_budget_at<S> && detail::has_initial_budget<S> &&
                         detail::has_target_budget<S> && detail::has_final_phase_start<S> &&
                         detail::with_initial_budget_absent_or_valid<S>;

/// Names every requirement a schedule type misses, at compile time, one static_assert each. Call
/// it where a schedule is first used (the rank allocator and the testing kit do).
template <class S>
consteval bool check_budget_schedule() {
  static_assert(detail::has_budget_at<S>,
                "adalora: a budget schedule needs the member function `adalora::budget_decision "
                "at(std::int64_t t) const` returning the budget (in triplets) at step t and "
                "whether the allocator masks to it at t");
  static_assert(detail::has_initial_budget<S>,
                "adalora: a budget schedule needs the member function `std::int64_t "
                "initial_budget() const` returning b0, the sum of the adapters' initial ranks");
  static_assert(detail::has_target_budget<S>,
                "adalora: a budget schedule needs the member function `std::int64_t "
                "target_budget() const` returning bT, the budget of the final phase");
  static_assert(detail::has_final_phase_start<S>,
                "adalora: a budget schedule needs the member function `std::int64_t "
                "final_phase_start() const` returning T - tfinal, the first step of the final "
                "phase's mask");
  static_assert(detail::with_initial_budget_absent_or_valid<S>,
                "adalora: a budget schedule's optional with_initial_budget must be `S "
                "with_initial_budget(std::int64_t b0) const` returning the schedule's own type S "
                "(and S move-assignable): the rank allocator calls it to set b0 = the sum of the "
                "adapters' ranks; remove or rename the member if it means something else");
  return true;
}

/// schedule_options::initial_budget's default: the rank allocator fills in the sum of its
/// adapters' ranks (see with_initial_budget below).
inline constexpr std::int64_t budget_from_adapters = -1;

/// Hyperparameters shared by the built-in schedules (PEFT AdaLoraConfig / loralib RankAllocator
/// names in the comments). Designated-initialiser friendly:
///   adalora::cubic_schedule s{{.target_budget = 20, .total_step = 60, .tinit = 10,
///                              .tfinal = 10, .delta_t = 5}};
/// leaves initial_budget to the allocator; set it to have it checked against the adapters.
struct schedule_options {
  std::int64_t initial_budget = budget_from_adapters;  // b0: PEFT init_bgt, loralib total_rank
                                                       // (sum of the initial ranks)
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
  ADALORA_REQUIRE(o.target_budget >= 0, who, "target_budget must be >= 0, got ", o.target_budget);
  if (o.initial_budget == budget_from_adapters) return;  // checked when the allocator sets it
  ADALORA_REQUIRE(o.initial_budget >= 1, who, "initial_budget must be >= 1 (or budget_from_adapters), got ",
                  o.initial_budget);
  ADALORA_REQUIRE(o.initial_budget <= max_exact_budget, who, "initial_budget must be <= 2^53 = ",
                  max_exact_budget, " (exact in double), got ", o.initial_budget);
  // Nothing to prune: torch.kthvalue would be asked for k = b0 - bT < 1.
  ADALORA_REQUIRE(o.target_budget < o.initial_budget, who,
                  "target_budget must be < initial_budget = ", o.initial_budget, ", got ",
                  o.target_budget);
}


/// The state and accessors common to the built-in schedules.
class schedule_base {
 public:
  const schedule_options& options() const noexcept { return o_; }
  std::int64_t initial_budget() const noexcept { return o_.initial_budget; }
  std::int64_t target_budget() const noexcept { return o_.target_budget; }
  std::int64_t final_phase_start() const noexcept { return adalora::final_phase_start(o_); }

 protected:
  /// The schedule S with options o_ but initial budget b0 (validated as at construction).
  template <class S>
  S rebuilt(std::int64_t b0) const {
    schedule_options o = o_;
    o.initial_budget = b0;
    return S(o);
  }
  void require_step(std::int64_t t, const char* who) const {
    ADALORA_REQUIRE(t >= 0, who, "t must be >= 0, got ", t);
    ADALORA_REQUIRE(o_.initial_budget != budget_from_adapters, who,
                    "the initial budget is not set yet: give the schedule to a rank_allocator "
                    "(it sets the sum of the adapters' ranks) or set options.initial_budget");
  }

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
  cubic_schedule with_initial_budget(std::int64_t b0) const { return rebuilt<cubic_schedule>(b0); }

  budget_decision at(std::int64_t t) const {
    require_step(t, "cubic_schedule::at");
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
  linear_schedule with_initial_budget(std::int64_t b0) const { return rebuilt<linear_schedule>(b0); }

  budget_decision at(std::int64_t t) const {
    require_step(t, "linear_schedule::at");
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
  constant_schedule with_initial_budget(std::int64_t b0) const { return rebuilt<constant_schedule>(b0); }

  budget_decision at(std::int64_t t) const {
    require_step(t, "constant_schedule::at");
    if (t <= o_.tinit) return {o_.initial_budget, false};
    if (t > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    return {o_.target_budget, mask_in_reduction(t)};
  }
};

static_assert(check_budget_schedule<cubic_schedule>());
static_assert(check_budget_schedule<linear_schedule>());
static_assert(check_budget_schedule<constant_schedule>());

}  // namespace adalora
