#pragma once
// The rank allocator: after each optimizer step, update importance, follow the budget schedule,
// and zero the singular values of the least important triplets across all adapters.

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/adapter_set.hpp"
#include "adalora/adapter_shape.hpp"
#include "adalora/budget_schedule.hpp"
#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/detail/scoring_pass.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// What happens from T − tfinal on (docs/algorithm.md §7).
enum class final_phase_rule : std::uint8_t {
  /// PEFT (default): at the first step t >= T − tfinal, mask to the target budget with frozen
  /// scores (no importance update), store the bool pattern and reset the importance state; at
  /// every later step zero E where the stored pattern says pruned.
  peft,
  /// loralib: importance is frozen from T − tfinal on; at every step t > T − tfinal the scores
  /// are recomputed from the frozen state and E is re-masked to the target budget (at exactly
  /// T − tfinal only if the schedule masks there). Same triplets as PEFT, given the same state.
  loralib,
};

/// How the threshold treats scores equal to it (docs/algorithm.md §6).
enum class tie_policy : std::uint8_t {
  /// The references: prune every triplet whose score is <= the k-th smallest, so ties at the
  /// threshold prune more than k and keep fewer than `budget` (never more).
  prune_all_ties,
  /// Keep exactly `budget` triplets: order by (score, then adapter order and index), prune the
  /// k first. Deterministic; not offered by either reference.
  exact_budget,
};

/// What a step does with elements whose parameter or gradient is NaN or infinite. Whatever the
/// policy, such values never reach the scores or the threshold, and step_result::non_finite
/// counts them.
enum class non_finite_policy : std::uint8_t {
  /// (default) Those elements' importance state stays as it was and they are scored from it; the
  /// rest of the step goes on. Costs nothing extra: it is checked in the same pass.
  ignore_elements,
  /// Like a mixed-precision GradScaler: if any element is non-finite, the step changes nothing
  /// (no importance update, no mask, the step number is still consumed) and reports skipped.
  /// Costs one extra read of the parameters and gradients per step.
  skip_step,
  /// Throw std::domain_error naming the adapter and tensor; the allocator is left unchanged
  /// (the step may be retried). Costs one extra read, like skip_step.
  throw_error,
};

struct allocator_options {
  final_phase_rule final_phase = final_phase_rule::peft;
  tie_policy ties = tie_policy::prune_all_ties;
  non_finite_policy non_finite = non_finite_policy::ignore_elements;
  /// Threads that step() uses, the caller's included (>= 1). Results do not depend on it: every
  /// sum is formed in a fixed order whatever thread runs it. Idle threads sleep, never spin.
  unsigned threads = 1;
  /// For growth (docs/growth.md): the schedule's budget may exceed the adapters' current total
  /// rank. Such a step keeps every triplet and reports the difference as step_result::missing,
  /// for a growth policy to add. Off, such a budget is a broken schedule and step() throws.
  bool rank_can_grow = false;
};

/// What the step did to E.
enum class mask_action : std::uint8_t {
  none,       ///< E untouched
  threshold,  ///< scores computed, threshold selected, E zeroed where score <= threshold
  pattern,    ///< PEFT final phase: E zeroed where the stored pattern says pruned
};

/// The outcome of one step. The `kept` span points into the allocator and stays valid until the
/// next call to step().
template <class T>
struct step_result {
  std::int64_t step = -1;
  std::int64_t budget = 0;          ///< the schedule's budget at this step, in triplets
  bool mask_due = false;            ///< the schedule's mask flag at this step
  bool importance_updated = false;  ///< true iff step < T − tfinal
  bool forced = false;              ///< PEFT's force mask at T − tfinal
  mask_action action = mask_action::none;
  bool skipped = false;             ///< non_finite_policy::skip_step skipped this step
  double threshold = 0;             ///< the k-th smallest triplet score (action == threshold;
                                    ///< +inf if that score is beyond double's range)
  std::int64_t prune_count = 0;     ///< triplets asked to prune, initial budget − budget
  std::span<const index_t> kept;    ///< kept triplets per adapter under the current pattern
  index_t kept_total = 0;
  std::int64_t non_finite = 0;      ///< elements with a NaN/infinite parameter or gradient
  std::int64_t missing = 0;         ///< before the final phase: budget − total rank where the
                                    ///< budget is above it (for growth to add)
};

/// Global top-b rank allocation across adapters (paper Alg. 1; PEFT RankAllocator and
/// AdaLoraModel.update_and_allocate, loralib RankAllocator.update_and_mask).
///
/// Call step(t, adapters) once per optimizer step, after optimizer.step() and before the
/// gradients are cleared, with t counting from 0 (docs/algorithm.md §3). Per step, in this order:
///  1. if t < T − tfinal: every element's importance state is updated by the metric;
///  2. the schedule gives (budget, mask);
///  3. if a mask is due: triplet scores S_i = s(E_i) + (mean_j s(A_ij) + mean_j s(B_ji)) over
///     all adapters, k = b0 − budget, threshold = the k-th smallest S, E_i = 0 where S_i <= it
///     (A and B are never touched: masking is soft until the final phase).
///
/// How a step is split (for scale-out, see communicator.hpp): one pass over memory updates the
/// state and forms three partial sums per triplet (s(E_i), Σ_j s(A_ij), Σ_j s(B_ji)); the
/// communicator sums them across processes; scores, threshold and mask follow from the sums
/// alone, identically on every process. Sums are formed in double in a fixed order (eight lanes
/// along a row of A; B in blocks of rows combined in block order), so results are the same for
/// every thread count. The pass, the layout of its sums and their combination into triplet
/// scores live in detail/scoring_pass.hpp; this class decides what each step does.
///
/// Scores are ranked in double. Where the float score fits a float, it is first rounded to T
/// exactly as the references round it (E + (mean A + mean B) in T), so f32 mask decisions follow
/// torch's; only scores beyond T's range (which torch would turn into inf) keep their double.
/// In double, a score or sum beyond double's range is +inf, as torch's float64 score is, and
/// ranks above every finite score (the state stays finite; see smoothed_sensitivity).
///
/// Guarantees: all memory is allocated at construction, so step() never allocates; adapters of
/// any shapes and initial ranks (including rank 0); the caller's tensors are only viewed, and
/// only E is written. Thread safety: one allocator must not be used by two threads at once;
/// distinct allocators are independent (each owns its worker threads).
template <class T, class Metric = smoothed_sensitivity, class Schedule = cubic_schedule,
          class Comm = single_process>
class rank_allocator {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adalora::rank_allocator: the element type must be float or double");
  static_assert(check_importance_metric<Metric, T>());
  static_assert(check_budget_schedule<Schedule>());
  static_assert(check_communicator<Comm>());

  using pass_type = detail::scoring_pass<T, Metric>;

 public:
  /// Scores are summed in blocks of this many elements along a row of A or a column of B (one
  /// L1-sized scratch row), and the block sums are added in block order afterwards: the fixed
  /// reduction tree that makes results independent of threads and of sharding.
  static constexpr index_t sum_block = score_sum_block;

 public:
  using element_type = T;
  using metric_type = Metric;
  using schedule_type = Schedule;

  /// Throws std::invalid_argument for bad shapes, empty or repeated names, a schedule whose
  /// initial budget is not the sum of the ranks, or options out of range (an enumerator value
  /// it does not know, 0 threads); std::runtime_error if a worker thread cannot be started.
  rank_allocator(std::vector<adapter_shape> shapes, Schedule schedule, Metric metric = {},
                 allocator_options options = {}, Comm comm = {})
      : shapes_(std::move(shapes)),
        schedule_(std::move(schedule)),
        metric_(std::move(metric)),
        options_(options),
        comm_(std::move(comm)) {
    constexpr const char* where = "rank_allocator";
    ADALORA_REQUIRE(!shapes_.empty(), where, "needs at least one adapter, got none");
    validate_options(options_);
    validate_names(shapes_);
    std::int64_t b0 = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      adapter_shape& s = shapes_[a];
      ADALORA_REQUIRE(s.in_features >= 1 && s.out_features >= 1, where, "adapter ", a, " ('",
                      s.name, "') needs in_features >= 1 and out_features >= 1, got ",
                      s.in_features, " and ", s.out_features);
      ADALORA_REQUIRE(s.rank >= 0, where, "adapter ", a, " ('", s.name,
                      "') needs rank >= 0, got ", s.rank);
      resolve_shard(a, s);
      ADALORA_REQUIRE(s.rank <= std::numeric_limits<std::int64_t>::max() - b0, where,
                      "the adapters' ranks add up to more than 2^63 - 1");
      b0 += s.rank;
      // Sizes follow from the caller's shapes: one that does not fit is an error, not a wrap.
      ADALORA_REQUIRE(pass_.add(s), where, "adapter ", a, " ('", s.name,
                      "'): the allocator's size for in_features ", s.in_features,
                      ", out_features ", s.out_features, ", rank ", s.rank,
                      " does not fit in memory");
    }
    if (schedule_.initial_budget() == budget_from_adapters) {
      if constexpr (detail::has_with_initial_budget<Schedule>) {
        ADALORA_REQUIRE(b0 >= 1, where, "the adapters' ranks add up to 0: there is no rank to "
                        "allocate (the schedule's initial budget must be >= 1)");
        schedule_ = schedule_.with_initial_budget(b0);
      }
    }
    ADALORA_REQUIRE(schedule_.initial_budget() == b0, where,
                    "the schedule's initial budget must equal the sum of the adapters' ranks, ",
                    b0, ", got ", schedule_.initial_budget(),
                    detail::has_with_initial_budget<Schedule>
                        ? " (leave it at budget_from_adapters to have it set)"
                        : " (a schedule with `with_initial_budget(b0)` can have it set)");

    for (const adapter_shape& s : shapes_) initial_ranks_.push_back(s.rank);
    const auto n = static_cast<std::size_t>(b0);
    state_.assign(pass_.states().size(), T(0));
    scores_.assign(n, 0.0);
    select_.assign(n, 0.0);
    if (options_.ties == tie_policy::exact_budget) order_.assign(n, 0);
    kept_mask_.assign(n, 1);
    kept_.resize(shapes_.size());
    for (std::size_t a = 0; a < shapes_.size(); ++a) kept_[a] = shapes_[a].rank;
    result_.kept = kept_;
    result_.kept_total = static_cast<index_t>(b0);
    pass_.finish(options_.threads, where);  // the partial sums, the task plan, the threads
  }

  /// The allocator of an adapter_set's adapters (their shapes, read off the views). A template
  /// only so that `{}` as the first argument still means "no shapes", not an empty set.
  template <std::same_as<adapter_set<T>> Set>
  rank_allocator(const Set& adapters, Schedule schedule, Metric metric = {},
                 allocator_options options = {}, Comm comm = {})
      : rank_allocator(std::vector<adapter_shape>(adapters.shapes().begin(), adapters.shapes().end()),
                       std::move(schedule), std::move(metric), options, std::move(comm)) {}

  /// Runs one allocator step; see the class comment. Throws std::invalid_argument on a step
  /// that does not increase or on views that do not match the adapters' shapes, and (with
  /// non_finite_policy::throw_error) std::domain_error on a NaN/infinite parameter or gradient;
  /// the allocator is unchanged then. Throws std::domain_error if the metric itself returns a
  /// non-finite or negative score for finite input (a broken metric).
  const step_result<T>& step(std::int64_t t, std::span<const adapter_tensors<T>> adapters) {
    constexpr const char* where = "rank_allocator::step";
    ADALORA_REQUIRE(t >= 0, where, "step must be >= 0, got ", t);
    ADALORA_REQUIRE(t > last_step_, where, "step must increase from call to call, got ", t,
                    " after ", last_step_);
    check_views(adapters);
    const budget_decision decision = schedule_.at(t);
    ADALORA_REQUIRE(decision.budget >= 0 && (options_.rank_can_grow || decision.budget <= initial_budget()),
                    where, "the schedule returned budget ", decision.budget, " at step ", t,
                    "; it must be in [0, ", initial_budget(), "] (its initial budget",
                    options_.rank_can_grow ? ")" : "; allocator_options::rank_can_grow allows more)");
    const step_plan plan = plan_step(t, decision);

    // Policies that must not change anything on bad input look before they touch anything.
    const std::int64_t non_finite =
        options_.non_finite == non_finite_policy::ignore_elements ? 0 : check_pass(adapters, t);
    step_result<T>& r = start_result(t, decision, non_finite);
    if (non_finite > 0 && options_.non_finite == non_finite_policy::skip_step) {
      r.skipped = true;
      return r;
    }

    // The state update (or frozen scores) and the partial sums, in one pass over memory.
    r.importance_updated = plan.pass == plan_pass::update;
    r.forced = plan.forced;
    if (plan.pass != plan_pass::none) r.non_finite = score_pass(adapters, plan.pass, t);

    // The mask: sums over processes, triplet scores, threshold, E zeroed where pruned.
    if (plan.mask == mask_action::threshold) {
      comm_.all_reduce_sum(pass_.partials());
      detail::combine_triplet_scores<T>(pass_.sums(), pass_.partials(), scores_);
      select_threshold(decision.budget);
    }
    if (plan.mask != mask_action::none) apply_pattern(adapters);
    r.action = plan.mask;

    // PEFT's force mask keeps its pattern and resets the importance state.
    if (plan.forced) {
      reset_state();
      force_masked_ = true;
    }
    return r;
  }

  /// step() on an adapter_set's views.
  const step_result<T>& step(std::int64_t t, const adapter_set<T>& adapters) {
    return step(t, adapters.tensors());
  }

  /// Convenience overload for a std::vector of adapter_tensors.
  const step_result<T>& step(std::int64_t t, const std::vector<adapter_tensors<T>>& adapters) {
    return step(t, std::span<const adapter_tensors<T>>(adapters));
  }

  // ---- inspection ------------------------------------------------------------------------------

  std::span<const adapter_shape> shapes() const noexcept { return shapes_; }
  std::size_t num_adapters() const noexcept { return shapes_.size(); }
  /// The schedule's initial budget b0: the adapters' total rank at construction (the
  /// constructor made sure the two are equal).
  std::int64_t initial_budget() const noexcept { return schedule_.initial_budget(); }
  /// The adapters' ranks at construction (they add up to initial_budget()); shapes() has the
  /// ranks now. Checkpoints keep both, to rebuild this allocator and reshape it.
  std::span<const index_t> initial_ranks() const noexcept { return initial_ranks_; }
  /// The adapters' total rank now: b0 until compact() or change_rank() changes it.
  std::int64_t total_rank() const noexcept {
    return static_cast<std::int64_t>(pass_.sums().triplets());
  }
  const Schedule& schedule() const noexcept { return schedule_; }
  const Metric& metric() const noexcept { return metric_; }
  const allocator_options& options() const noexcept { return options_; }
  /// The last step passed to step(), or −1 before the first.
  std::int64_t last_step() const noexcept { return last_step_; }
  /// The result of the last step (also before the first: no mask, full ranks).
  const step_result<T>& last_result() const noexcept { return result_; }

  /// Triplet scores of the last mask event, all adapters concatenated in order.
  std::span<const double> triplet_scores() const noexcept { return scores_; }
  /// Triplet scores of adapter `a` at the last mask event.
  std::span<const double> triplet_scores(std::size_t a) const {
    check_adapter_index(a, "rank_allocator::triplet_scores");
    return std::span<const double>(scores_).subspan(first_triplet(a), triplet_count(a));
  }
  /// 1 where adapter `a`'s triplet is kept by the current pattern, 0 where pruned.
  std::span<const std::uint8_t> kept_mask(std::size_t a) const {
    check_adapter_index(a, "rank_allocator::kept_mask");
    return std::span<const std::uint8_t>(kept_mask_).subspan(first_triplet(a), triplet_count(a));
  }
  /// The current pattern with the adapters' names (allocates; not for the per-step path).
  rank_pattern pattern() const {
    rank_pattern p;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      auto m = kept_mask(a);
      p.add(shapes_[a].name, std::vector<bool>(m.begin(), m.end()));
    }
    return p;
  }

  /// The metric's state of one tensor of adapter `a`: state_size values per element, elements
  /// in row-major order of the tensor (A: r × in, E: r, B: out × r).
  std::span<const T> state(std::size_t a, tensor_role role) const {
    check_adapter_index(a, "rank_allocator::state");
    return std::span<const T>(state_).subspan(pass_.states().begin(a, role),
                                              pass_.states().count(a, role));
  }
  /// Zeroes the importance state (PEFT reset_ipt); the pattern is kept.
  void reset_state() noexcept { std::fill(state_.begin(), state_.end(), T(0)); }

  // ---- rank that changes physically (docs/compaction.md, docs/growth.md) ----------------------
  //
  // The allocator decides and updates itself; the caller applies the returned rank_change to
  // every tensor with a triplet axis (parameters, gradients, optimizer state), with
  // adapter_set::compact or the functions of rank_change.hpp, before the next step() (which
  // checks the views' shapes). Changes allocate; step() still never does. One process only: a
  // sharded or multi-process allocator refuses them (every process would have to change its
  // shards at once, which the communicator cannot order).

  /// True once the pattern cannot change any more: PEFT's force mask at T − tfinal has happened,
  /// or (loralib) a mask from the frozen importance, which every later mask repeats.
  bool pattern_final() const {
    if (options_.final_phase == final_phase_rule::peft) return force_masked_;
    for (std::int64_t t = std::max<std::int64_t>(schedule_.final_phase_start(), 0); t <= last_step_; ++t)
      if (schedule_.at(t).mask) return true;
    return false;
  }

  /// Drops the pruned triplets, once pattern_final(): the allocator continues with the kept
  /// ones (its state, scores and mask gathered) and returns, per adapter, the map from kept
  /// triplet to old index. Exact: every later step does to the kept triplets what it would have
  /// done to them uncompacted (PEFT re-applies a pattern that now prunes nothing; loralib's
  /// frozen scores still keep every one of them). Throws std::invalid_argument before the
  /// pattern is final (a pruned triplet could still come back) and, like change_rank, when
  /// sharded; the allocator is then unchanged.
  rank_change compact() {
    ADALORA_REQUIRE(pattern_final(), "rank_allocator::compact",
                    "the pattern is not final yet (last step ", last_step_, "; it is from the ",
                    options_.final_phase == final_phase_rule::peft ? "force mask at step "
                                                                     : "first mask at or after step ",
                    schedule_.final_phase_start(), " on): a pruned triplet could still come back");
    rank_change change;
    for (std::size_t a = 0; a < shapes_.size(); ++a) change.push_back(triplet_map::keeping(kept_mask(a)));
    change_rank(change);
    return change;
  }

  /// Appends add[a] new triplets to adapter a (kept, with zero importance state and score) and
  /// returns the change. Only before the final phase: from T − tfinal the pattern is fixed.
  rank_change grow(std::span<const index_t> add) {
    constexpr const char* where = "rank_allocator::grow";
    ADALORA_REQUIRE(add.size() == shapes_.size(), where, "needs one count per adapter, ",
                    shapes_.size(), ", got ", add.size());
    rank_change change;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      ADALORA_REQUIRE(add[a] >= 0, where, "adapter ", a, " ('", shapes_[a].name,
                      "'): the count to add must be >= 0, got ", add[a]);
      change.push_back(triplet_map::appending(shapes_[a].rank, add[a]));
    }
    change_rank(change);
    return change;
  }

  /// Any change of rank: adapter a's triplets become change[a] (old ones kept in order, new ones
  /// appended with zero state and score, kept by the pattern). Dropping a triplet that the
  /// pattern keeps, or before the pattern is final, departs from AdaLoRA (that triplet could have
  /// mattered or come back): that is growth's business (docs/growth.md). All-or-nothing: throws
  /// std::invalid_argument for maps that do not fit the adapters, for new triplets from the final
  /// phase on, or for a sharded or multi-process allocator, and leaves the allocator unchanged.
  void change_rank(const rank_change& change) {
    constexpr const char* where = "rank_allocator::change_rank";
    ADALORA_REQUIRE((std::is_same_v<Comm, single_process>), where,
                    "the rank of a multi-process allocator cannot change: every process would "
                    "have to change its shards at once (docs/scale_out.md)");
    ADALORA_REQUIRE(change.size() == shapes_.size(), where, "needs one map per adapter, ",
                    shapes_.size(), ", got ", change.size());
    bool adds = false;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const adapter_shape& s = shapes_[a];
      ADALORA_REQUIRE(detail::holds_whole(s), where, "adapter ", a, " ('", s.name, "') is sharded; a sharded adapter's "
                      "rank cannot change (docs/scale_out.md)");
      ADALORA_REQUIRE(change[a].old_rank == s.rank, where, "adapter ", a, " ('", s.name,
                      "'): the map's old rank must be its rank ", s.rank, ", got ", change[a].old_rank);
      detail::check_triplet_map(change[a], false, where);
      adds = adds || change[a].added() > 0;
    }
    ADALORA_REQUIRE(!adds || last_step_ + 1 < schedule_.final_phase_start(), where,
                    "no triplet can be added from the final phase on (step ",
                    schedule_.final_phase_start(), "): the pattern is fixed there");
    rebuild(change);
  }

  // ---- resuming (checkpoints) ------------------------------------------------------------------

  /// Everything step() depends on besides the constructor's arguments. Together with those
  /// arguments it determines every later step bit for bit.
  struct resumable_state {
    std::int64_t last_step;
    bool force_masked;                    ///< PEFT's force mask at T − tfinal has happened
    std::span<const T> metric_state;      ///< all adapters, A then E then B, see state()
    std::span<const std::uint8_t> kept;   ///< per triplet, 1 kept / 0 pruned
    std::span<const double> scores;       ///< triplet scores of the last mask event
    const step_result<T>* last;           ///< the last result (its kept span is recomputed)
  };
  resumable_state resumable() const noexcept {
    return {last_step_, force_masked_, state_, kept_mask_, scores_, &result_};
  }
  /// Restores a resumable_state taken from an allocator constructed with the same arguments.
  /// All-or-nothing: every size and value is validated first, and std::invalid_argument leaves
  /// this allocator unchanged.
  void restore(const resumable_state& s) {
    constexpr const char* where = "rank_allocator::restore";
    ADALORA_REQUIRE(s.last_step >= -1, where, "last_step must be >= -1, got ", s.last_step);
    ADALORA_REQUIRE(s.metric_state.size() == state_.size(), where, "metric state must have ",
                    state_.size(), " values, got ", s.metric_state.size());
    ADALORA_REQUIRE(s.kept.size() == kept_mask_.size(), where, "kept mask must have ",
                    kept_mask_.size(), " entries, got ", s.kept.size());
    ADALORA_REQUIRE(s.scores.size() == scores_.size(), where, "scores must have ",
                    scores_.size(), " entries, got ", s.scores.size());
    for (std::size_t i = 0; i < s.kept.size(); ++i)
      ADALORA_REQUIRE(s.kept[i] <= 1, where, "kept mask entries must be 0 or 1, got ",
                      int(s.kept[i]), " at ", i);
    ADALORA_REQUIRE(s.last != nullptr, where, "the last step's result is missing");
    std::copy(s.metric_state.begin(), s.metric_state.end(), state_.begin());
    std::copy(s.kept.begin(), s.kept.end(), kept_mask_.begin());
    std::copy(s.scores.begin(), s.scores.end(), scores_.begin());
    last_step_ = s.last_step;
    force_masked_ = s.force_masked;
    result_ = *s.last;
    recount_kept();
  }

 private:
  using pass_mode = detail::pass_mode;

  /// What a step does, decided from the step number and the schedule alone (docs/algorithm.md §7).
  enum class plan_pass : std::uint8_t { none, update, frozen };
  struct step_plan {
    plan_pass pass;     // the pass over memory: importance update, frozen scores, or none
    mask_action mask;   // threshold (scores, threshold, mask), pattern (the stored one), none
    bool forced;        // PEFT's force mask at T − tfinal: the state is reset after it
  };
  step_plan plan_step(std::int64_t t, const budget_decision& decision) const noexcept {
    const mask_action due = decision.mask ? mask_action::threshold : mask_action::none;
    if (t < schedule_.final_phase_start()) return {plan_pass::update, due, false};
    if (options_.final_phase == final_phase_rule::peft)
      // PEFT masks once with frozen scores at T − tfinal (also when that step is not a multiple
      // of deltaT), keeps the pattern, and resets the importance state; later steps re-apply it.
      return force_masked_ ? step_plan{plan_pass::none, mask_action::pattern, false}
                           : step_plan{plan_pass::frozen, mask_action::threshold, true};
    // loralib: frozen importance, re-masked to the target budget wherever the schedule masks.
    return {due == mask_action::none ? plan_pass::none : plan_pass::frozen, due, false};
  }

  /// Resets the result for step t, before anything else of the step is done.
  step_result<T>& start_result(std::int64_t t, const budget_decision& decision, std::int64_t non_finite) {
    step_result<T>& r = result_;
    r.step = t;
    r.budget = decision.budget;
    r.mask_due = decision.mask;
    r.importance_updated = false;
    r.forced = false;
    r.skipped = false;
    r.action = mask_action::none;
    r.threshold = 0;
    r.prune_count = 0;
    r.non_finite = non_finite;
    // Rank can only be added before the final phase, so only there is any missing.
    r.missing = t < schedule_.final_phase_start() ? std::max<std::int64_t>(0, decision.budget - total_rank()) : 0;
    last_step_ = t;
    return r;
  }

  /// The look-before-touching pass of skip_step and throw_error: counts the NaN/infinite
  /// parameters and gradients, and throws for throw_error (nothing changed yet).
  std::int64_t check_pass(std::span<const adapter_tensors<T>> adapters, std::int64_t t) {
    const auto found = pass_.run(pass_mode::check, metric_, adapters, state_);
    if (found.non_finite > 0 && options_.non_finite == non_finite_policy::throw_error)
      throw std::domain_error(detail::concat(
          "adalora::rank_allocator::step: ", found.non_finite,
          " parameter or gradient values are NaN or infinite at step ", t, " (first in ",
          describe(found.first_non_finite), "); nothing was changed (non_finite_policy::throw_error)"));
    return found.non_finite;
  }

  /// The pass that updates the state (or scores from it, frozen) and forms the partial sums.
  /// Returns the number of NaN/infinite parameters and gradients.
  std::int64_t score_pass(std::span<const adapter_tensors<T>> adapters, plan_pass which, std::int64_t t) {
    const pass_mode mode = which == plan_pass::update ? pass_mode::update : pass_mode::frozen;
    if constexpr (detail::has_begin_step<Metric>)
      if (mode == pass_mode::update) metric_.begin_step(t);
    const auto found = pass_.run(mode, metric_, adapters, state_);
    if (found.bad_score)
      throw std::domain_error(detail::concat(
          "adalora::rank_allocator::step: the importance metric returned a negative or "
          "non-finite score for finite input in ", describe(found.first_bad_score), " at step ",
          t, "; a metric's scores must be finite and >= 0"));
    return found.non_finite;
  }

  /// "adapter 3 ('name'), tensor B", written into a fixed buffer: no allocation on the step's
  /// path.
  const char* describe(const typename pass_type::site& where) {
    const char* tensor = where.role == tensor_role::A ? "A" : where.role == tensor_role::E ? "E" : "B";
    const std::string& name = shapes_[where.adapter].name;
    std::snprintf(describe_buffer_, sizeof describe_buffer_, "adapter %zu ('%.*s'), tensor %s",
                  where.adapter, static_cast<int>(std::min<std::size_t>(name.size(), 160)),
                  name.c_str(), tensor);
    return describe_buffer_;
  }

  /// The threshold over the triplet scores (ties as options_.ties says) and the kept mask.
  void select_threshold(std::int64_t budget) {
    const std::size_t n = scores_.size();
    // Triplets above the budget are pruned; none where the rank is at or below it (after
    // compaction, or while a rising budget waits for growth).
    const std::int64_t over = total_rank() - budget;
    const auto k = static_cast<std::size_t>(over > 0 ? over : 0);
    step_result<T>& r = result_;
    r.prune_count = static_cast<std::int64_t>(k);
    if (k == 0) {
      // Nothing to prune (a user schedule at full budget): every triplet kept, E untouched.
      // torch.kthvalue would raise here (peft#2337); docs/algorithm.md §6: a port may define it so.
      r.threshold = -std::numeric_limits<double>::infinity();
      std::fill(kept_mask_.begin(), kept_mask_.end(), std::uint8_t{1});
    } else {
      // Every enumerator is handled (-Wswitch names a new one); the constructor refused others.
      switch (options_.ties) {
        case tie_policy::prune_all_ties:
          std::copy(scores_.begin(), scores_.end(), select_.begin());
          std::nth_element(select_.begin(), select_.begin() + static_cast<std::ptrdiff_t>(k - 1),
                           select_.end());
          r.threshold = select_[k - 1];
          for (std::size_t i = 0; i < n; ++i) kept_mask_[i] = scores_[i] > r.threshold ? 1 : 0;
          break;
        case tie_policy::exact_budget: {
          std::iota(order_.begin(), order_.end(), std::size_t{0});
          // Pruning order: lower score first; among equal scores the later triplet first, so
          // that adapter order then index decides deterministically which tied triplets stay.
          auto prune_before = [this](std::size_t x, std::size_t y) {
            return scores_[x] < scores_[y] || (scores_[x] == scores_[y] && x > y);
          };
          std::nth_element(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k - 1),
                           order_.end(), prune_before);
          r.threshold = scores_[order_[k - 1]];
          std::fill(kept_mask_.begin(), kept_mask_.end(), std::uint8_t{1});
          for (std::size_t i = 0; i < k; ++i) kept_mask_[order_[i]] = 0;
          break;
        }
      }
    }
  }

  /// Enumerators come from users' config files as integers: a value this allocator does not
  /// know is refused here, so that no branch on them below ever sees one.
  static void validate_options(const allocator_options& o) {
    constexpr const char* where = "rank_allocator";
    ADALORA_REQUIRE(o.final_phase == final_phase_rule::peft || o.final_phase == final_phase_rule::loralib, where,
                    "options.final_phase must be final_phase_rule::peft or final_phase_rule::loralib, got ",
                    static_cast<int>(o.final_phase));
    ADALORA_REQUIRE(o.ties == tie_policy::prune_all_ties || o.ties == tie_policy::exact_budget,
                    where, "options.ties must be tie_policy::prune_all_ties or "
                    "tie_policy::exact_budget, got ", static_cast<int>(o.ties));
    ADALORA_REQUIRE(o.non_finite == non_finite_policy::ignore_elements ||
                        o.non_finite == non_finite_policy::skip_step ||
                        o.non_finite == non_finite_policy::throw_error,
                    where, "options.non_finite must be non_finite_policy::ignore_elements, "
                    "skip_step or throw_error, got ", static_cast<int>(o.non_finite));
    ADALORA_REQUIRE(o.threads >= 1, where, "options.threads must be >= 1, got ", o.threads);
  }

  /// An empty or repeated name would only be refused by pattern(), after the training run.
  static void validate_names(const std::vector<adapter_shape>& shapes) {
    if (const std::string problem = detail::adapter_name_problem(shapes); !problem.empty())
      throw std::invalid_argument(detail::concat(
          "adalora::rank_allocator: ", problem,
          "; names key the rank pattern and must be non-empty and unique"));
  }

  /// Fills in the shard's "-1 = to the end" counts and validates it against the shape.
  static void resolve_shard(std::size_t a, adapter_shape& s) {
    constexpr const char* where = "rank_allocator";
    adapter_shard& h = s.shard;
    auto resolve = [&](index_t& begin, index_t& count, index_t total, const char* what) {
      const bool begin_ok = begin >= 0 && begin <= total;
      if (begin_ok && count < 0) count = total - begin;
      ADALORA_REQUIRE(begin_ok && count >= 0 && count <= total - begin, where, "adapter ", a,
                      " ('", s.name, "'): shard ", what, " [", begin, ", ",
                      static_cast<long double>(begin) + static_cast<long double>(count),
                      ") must lie within [0, ", total, "]");
    };
    resolve(h.triplet_begin, h.triplet_count, s.rank, "triplets");
    resolve(h.in_begin, h.in_count, s.in_features, "in columns");
    resolve(h.out_begin, h.out_count, s.out_features, "out rows");
    ADALORA_REQUIRE(h.in_begin % sum_block == 0 && h.out_begin % sum_block == 0, where,
                    "adapter ", a, " ('", s.name, "'): shard in_begin and out_begin must be "
                    "multiples of ", sum_block, " (so that sums are formed over the same blocks "
                    "as in one process), got ", h.in_begin, " and ", h.out_begin);
  }

  std::size_t first_triplet(std::size_t a) const noexcept { return pass_.sums().first_triplet(a); }
  std::size_t triplet_count(std::size_t a) const noexcept { return pass_.sums().rank(a); }
  void check_adapter_index(std::size_t a, const char* where) const {
    ADALORA_REQUIRE(a < shapes_.size(), where, "adapter index must be < ", shapes_.size(),
                    ", got ", a);
  }

  void check_views(std::span<const adapter_tensors<T>> adapters) const {
    constexpr const char* where = "rank_allocator::step";
    ADALORA_REQUIRE(adapters.size() == shapes_.size(), where, "expected ", shapes_.size(),
                    " adapters (as constructed), got ", adapters.size());
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const adapter_shape& s = shapes_[a];
      const detail::local_dims& d = pass_.states().local(a);
      const svd_adapter_ref<T>& p = adapters[a].params;
      ADALORA_REQUIRE(p.A.rows() == d.r && p.A.cols() == d.in, where, "adapter ", a, " ('",
                      s.name, "'): A must be ", d.r, " x ", d.in, ", got ", p.A.rows(), " x ",
                      p.A.cols());
      ADALORA_REQUIRE(p.E.size() == d.r, where, "adapter ", a, " ('", s.name,
                      "'): E must have size ", d.r, ", got ", p.E.size());
      ADALORA_REQUIRE(p.B.rows() == d.out && p.B.cols() == d.r, where, "adapter ", a, " ('",
                      s.name, "'): B must be ", d.out, " x ", d.r, ", got ", p.B.rows(), " x ",
                      p.B.cols());
      check_same_shapes(p, adapters[a].grads, where);
      // An empty view may have null data (an empty std::vector's, or a shard that holds no
      // columns of A); a non-empty one may not.
      const auto& g = adapters[a].grads;
      const bool data_ok = (p.A.data() || p.A.size() == 0) && (p.E.data() || p.E.size() == 0) &&
                           (p.B.data() || p.B.size() == 0) && (g.A.data() || g.A.size() == 0) &&
                           (g.E.data() || g.E.size() == 0) && (g.B.data() || g.B.size() == 0);
      ADALORA_REQUIRE(data_ok, where, "adapter ", a, " ('", s.name,
                      "'): a non-empty view has null data");
    }
  }

  /// The kept counts per adapter and in all, from the mask (after a restore or a rank change).
  void recount_kept() noexcept {
    index_t total = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const auto m = kept_mask(a);
      kept_[a] = static_cast<index_t>(std::count(m.begin(), m.end(), std::uint8_t{1}));
      total += kept_[a];
    }
    result_.kept = kept_;
    result_.kept_total = total;
  }

  /// Lays the allocator out for the ranks of `change` and gathers what it keeps per triplet.
  /// Everything is built aside first, so a throw (memory, threads) leaves it unchanged.
  void rebuild(const rank_change& change) {
    constexpr const char* where = "rank_allocator::change_rank";
    std::vector<adapter_shape> shapes = shapes_;
    pass_type pass;
    for (std::size_t a = 0; a < shapes.size(); ++a) {
      adapter_shape& s = shapes[a];
      s.rank = change[a].new_rank();
      s.shard.triplet_count = s.rank;
      ADALORA_REQUIRE(pass.add(s), where, "adapter ", a, " ('", s.name,
                      "'): the allocator's size for rank ", s.rank, " does not fit in memory");
    }
    const std::size_t n = pass.sums().triplets();
    std::vector<T> state(pass.states().size(), T(0));
    std::vector<double> scores(n, 0.0);
    std::vector<std::uint8_t> kept(n, 1);
    for (std::size_t a = 0; a < shapes.size(); ++a) {
      const triplet_map& m = change[a];
      const auto K = static_cast<std::size_t>(Metric::state_size);
      const auto in = static_cast<std::size_t>(shapes[a].in_features);
      const auto out = static_cast<std::size_t>(shapes[a].out_features);
      auto gather_state = [&](tensor_role role, std::size_t outer, std::size_t group) {
        gather_groups<T>(std::span<const T>(state_).subspan(pass_.states().begin(a, role)),
                         std::span<T>(state).subspan(pass.states().begin(a, role)), outer, m, group,
                         T(0));
      };
      gather_state(tensor_role::A, 1, in * K);
      gather_state(tensor_role::E, 1, K);
      gather_state(tensor_role::B, out, K);
      gather_groups<double>(std::span<const double>(scores_).subspan(first_triplet(a)),
                            std::span<double>(scores).subspan(pass.sums().first_triplet(a)), 1, m,
                            1, 0.0);
      gather_groups<std::uint8_t>(std::span<const std::uint8_t>(kept_mask_).subspan(first_triplet(a)),
                                  std::span<std::uint8_t>(kept).subspan(pass.sums().first_triplet(a)),
                                  1, m, 1, std::uint8_t{1});
    }
    std::vector<double> select(n, 0.0);
    std::vector<std::size_t> order(options_.ties == tie_policy::exact_budget ? n : 0, 0);
    pass.finish(options_.threads, where);
    // Nothing below throws.
    shapes_ = std::move(shapes);
    pass_ = std::move(pass);
    state_ = std::move(state);
    scores_ = std::move(scores);
    kept_mask_ = std::move(kept);
    select_ = std::move(select);
    order_ = std::move(order);
    recount_kept();
  }

  /// Per-triplet groups of `group` values, `outer` times over: to's triplet i of each outer
  /// index is from's triplet m.source[i], or `fill` for a new one.
  template <class V>
  static void gather_groups(std::span<const V> from, std::span<V> to, std::size_t outer,
                            const triplet_map& m, std::size_t group, V fill) {
    const auto r0 = static_cast<std::size_t>(m.old_rank), r1 = static_cast<std::size_t>(m.new_rank());
    for (std::size_t o = 0; o < outer; ++o)
      for (std::size_t i = 0; i < r1; ++i) {
        V* d = to.data() + (o * r1 + i) * group;
        const index_t s = m.source[i];
        if (s == new_triplet)
          std::fill(d, d + group, fill);
        else
          std::copy_n(from.data() + (o * r0 + static_cast<std::size_t>(s)) * group, group, d);
      }
  }

  /// E_i = 0 where the current pattern prunes triplet i (for the E entries this process holds);
  /// recounts kept per adapter (over all its triplets: every process knows the whole pattern).
  void apply_pattern(std::span<const adapter_tensors<T>> adapters) {
    index_t total = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const vector_view<T>& e = adapters[a].params.E;
      const std::uint8_t* keep = kept_mask_.data() + first_triplet(a);
      const index_t tb = shapes_[a].shard.triplet_begin;
      for (index_t i = 0; i < e.size(); ++i)
        if (!keep[tb + i]) e[i] = T(0);
      index_t kept = 0;
      for (std::size_t i = 0; i < triplet_count(a); ++i) kept += keep[i] ? 1 : 0;
      kept_[a] = kept;
      total += kept;
    }
    result_.kept_total = total;
  }

  std::vector<adapter_shape> shapes_;
  Schedule schedule_;
  Metric metric_;
  allocator_options options_;
  Comm comm_;

  pass_type pass_;                           // the pass over memory and its partial sums
  std::vector<T> state_;                     // the metric's, laid out as pass_.states() says
  std::vector<double> scores_;               // per triplet, last mask event
  std::vector<double> select_;               // scratch for nth_element
  std::vector<std::size_t> order_;           // scratch for exact_budget
  std::vector<std::uint8_t> kept_mask_;      // per triplet: 1 kept, 0 pruned
  std::vector<index_t> kept_;                // per adapter
  char describe_buffer_[256] = {};
  step_result<T> result_;
  std::vector<index_t> initial_ranks_;       // per adapter, at construction
  std::int64_t last_step_ = -1;
  bool force_masked_ = false;
};

}  // namespace adalora
