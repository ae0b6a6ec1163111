#pragma once
// The rank allocator: after each optimizer step, update importance, follow the budget schedule,
// and zero the singular values of the least important triplets across all adapters.

#include <algorithm>
#include <bit>
#include <cmath>
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

#include "adalora/budget_schedule.hpp"
#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/detail/score_kernels.hpp"
#include "adalora/detail/task_pool.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// Which part of an adapter this process holds, for sharded training (see communicator.hpp).
/// The default is all of it. A process holds triplets [triplet_begin, triplet_begin +
/// triplet_count) (rows of A, entries of E, columns of B), columns [in_begin, in_begin +
/// in_count) of A and rows [out_begin, out_begin + out_count) of B; -1 means "to the end".
/// Slices of in/out must start at a multiple of rank_allocator's sum_block (256), so that every
/// sum is formed over the same blocks as in one process; triplet slices may start anywhere.
/// Exactly one process must contribute the score of each E entry (`scores_e`), also when E is
/// replicated on several. A process that holds none of an adapter sets triplet_count = 0.
struct adapter_shard {
  index_t triplet_begin = 0;
  index_t triplet_count = -1;
  index_t in_begin = 0;
  index_t in_count = -1;
  index_t out_begin = 0;
  index_t out_count = -1;
  bool scores_e = true;
};

/// One adapted weight as the allocator sees it. `name` is the module path used in rank patterns
/// (PEFT writes "<name>.lora_E" keys); `rank` is the initial rank r; in/out/rank are the WHOLE
/// adapter's even when this process holds a shard of it.
struct adapter_shape {
  std::string name;
  index_t in_features = 0;
  index_t out_features = 0;
  index_t rank = 0;
  adapter_shard shard = {};
};

namespace detail {

/// Why these adapters' names cannot key a rank pattern (PEFT's "<name>.lora_E"): "adapter 1 has
/// an empty name", or "adapters 0 and 2 have the same name 'q'" for the first repeat in adapter
/// order; "" when they can. The allocator's constructor and read_checkpoint_config refuse what
/// this names, so that the pattern never fails after a training run.
inline std::string adapter_name_problem(const std::vector<adapter_shape>& shapes) {
  for (std::size_t a = 0; a < shapes.size(); ++a)
    if (shapes[a].name.empty()) return concat("adapter ", a, " has an empty name");
  std::vector<std::size_t> by_name(shapes.size());
  std::iota(by_name.begin(), by_name.end(), std::size_t{0});
  // Stable: equal names stay in adapter order, so each name's first two are adjacent.
  std::stable_sort(by_name.begin(), by_name.end(),
                   [&](std::size_t x, std::size_t y) { return shapes[x].name < shapes[y].name; });
  // The first repeat in adapter order: the pair whose later index is smallest.
  std::size_t first = 0, second = shapes.size();
  for (std::size_t i = 1; i < by_name.size(); ++i)
    if (shapes[by_name[i]].name == shapes[by_name[i - 1]].name && by_name[i] < second)
      first = by_name[i - 1], second = by_name[i];
  if (second == shapes.size()) return {};
  return concat("adapters ", first, " and ", second, " have the same name '", shapes[second].name, "'");
}

}  // namespace detail

/// What happens from T − tfinal on (SPEC §7).
enum class final_phase : std::uint8_t {
  /// PEFT (default): at the first step t >= T − tfinal, mask to the target budget with frozen
  /// scores (no importance update), store the bool pattern and reset the importance state; at
  /// every later step zero E where the stored pattern says pruned.
  peft,
  /// loralib: importance is frozen from T − tfinal on; at every step t > T − tfinal the scores
  /// are recomputed from the frozen state and E is re-masked to the target budget (at exactly
  /// T − tfinal only if the schedule masks there). Same triplets as PEFT, given the same state.
  loralib,
};

/// How the threshold treats scores equal to it (SPEC §6).
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
  final_phase semantics = final_phase::peft;
  tie_policy ties = tie_policy::prune_all_ties;
  non_finite_policy non_finite = non_finite_policy::ignore_elements;
  /// Threads that step() uses, the caller's included (>= 1). Results do not depend on it: every
  /// sum is formed in a fixed order whatever thread runs it. Idle threads sleep, never spin.
  unsigned threads = 1;
};

/// The views the allocator needs of one adapter at a step: its parameters (after the optimizer
/// step; only E is written, to zero pruned singular values) and the gradients of that step.
template <class T>
struct adapter_tensors {
  svd_adapter_ref<T> params;
  svd_adapter_ref<const T> grads;
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
  std::int64_t k = 0;               ///< triplets asked to prune, initial budget − budget
  std::span<const index_t> kept;    ///< kept triplets per adapter under the current pattern
  index_t kept_total = 0;
  std::int64_t non_finite = 0;      ///< elements with a NaN/infinite parameter or gradient
};

/// Global top-b rank allocation across adapters (paper Alg. 1; PEFT RankAllocator and
/// AdaLoraModel.update_and_allocate, loralib RankAllocator.update_and_mask).
///
/// Call step(t, adapters) once per optimizer step, after optimizer.step() and before the
/// gradients are cleared, with t counting from 0 (SPEC §3). Per step, in this order:
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
/// every thread count.
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
  static_assert(BudgetSchedule<Schedule>,
                "adalora::rank_allocator: the schedule must provide `budget_decision at("
                "std::int64_t) const`, and `std::int64_t initial_budget() const`, "
                "`target_budget() const`, `final_phase_start() const` (see budget_schedule.hpp)");
  static_assert(Communicator<Comm>,
                "adalora::rank_allocator: the communicator must provide "
                "`void all_reduce_sum(std::span<double>)`");

  static constexpr std::size_t K = Metric::state_size;
  static constexpr index_t task_elements = 1 << 15;  // elements per task, for threads

 public:
  /// Scores are summed in blocks of this many elements along a row of A or a column of B (one
  /// L1-sized scratch row), and the block sums are added in block order afterwards: the fixed
  /// reduction tree that makes results independent of threads and of sharding.
  static constexpr index_t sum_block = 256;

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
    std::size_t elements = 0, a_blocks = 0, b_blocks = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      adapter_shape& s = shapes_[a];
      ADALORA_REQUIRE(s.in_features >= 1 && s.out_features >= 1, where, "adapter ", a, " ('",
                      s.name, "') needs in_features >= 1 and out_features >= 1, got ",
                      s.in_features, " and ", s.out_features);
      ADALORA_REQUIRE(s.rank >= 0, where, "adapter ", a, " ('", s.name,
                      "') needs rank >= 0, got ", s.rank);
      resolve_shard(a, s);
      const local_dims d{s.shard.triplet_count, s.shard.in_count, s.shard.out_count};
      layout_.push_back({static_cast<std::size_t>(b0), elements, a_blocks, b_blocks,
                         blocks_of(s.in_features), blocks_of(s.out_features), d});
      // Sizes follow from the caller's shapes: one that does not fit is an error, not a wrap.
      const auto size = [&](std::size_t x, std::size_t y, std::size_t z) {
        ADALORA_REQUIRE(y == 0 || x <= (std::numeric_limits<std::size_t>::max() - z) / y, where,
                        "adapter ", a, " ('", s.name, "'): the allocator's size for in_features ",
                        s.in_features, ", out_features ", s.out_features, ", rank ", s.rank,
                        " does not fit in memory");
        return x * y + z;
      };
      const auto r = static_cast<std::size_t>(s.rank);
      const std::size_t triplets = size(1, r, static_cast<std::size_t>(b0));
      ADALORA_REQUIRE(triplets <= static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()),
                      where, "the adapters' ranks add up to more than 2^63 - 1");
      b0 = static_cast<std::int64_t>(triplets);
      elements = size(static_cast<std::size_t>(d.r),
                      size(1, static_cast<std::size_t>(d.in), size(1, static_cast<std::size_t>(d.out), 1)),
                      elements);
      a_blocks = size(r, layout_[a].a_blocks, a_blocks);
      b_blocks = size(r, layout_[a].b_blocks, b_blocks);
      size(elements, K, size(1, a_blocks, size(1, b_blocks, static_cast<std::size_t>(b0))));
    }
    layout_.push_back({static_cast<std::size_t>(b0), elements, a_blocks, b_blocks, 0, 0, {}});
    ADALORA_REQUIRE(schedule_.initial_budget() == b0, where,
                    "the schedule's initial budget must equal the sum of the adapters' ranks, ",
                    b0, ", got ", schedule_.initial_budget());

    const auto n = static_cast<std::size_t>(b0);
    state_.assign(elements * K, T(0));
    // E scores, then A's block sums (r x blocks of in per adapter), then B's (blocks of out x r).
    partials_.assign(n + a_blocks + b_blocks, 0.0);
    scores_.assign(n, 0.0);
    select_.assign(n, 0.0);
    if (options_.ties == tie_policy::exact_budget) order_.assign(n, 0);
    kept_mask_.assign(n, 1);
    kept_.resize(shapes_.size());
    for (std::size_t a = 0; a < shapes_.size(); ++a) kept_[a] = shapes_[a].rank;
    result_.kept = kept_;
    result_.kept_total = static_cast<index_t>(b0);
    plan_tasks();
    if (options_.threads > 1) pool_ = std::make_unique<detail::task_pool>(options_.threads, where);
  }

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

    const std::int64_t final_start = schedule_.final_phase_start();
    const bool update = t < final_start;
    const budget_decision decision = schedule_.at(t);
    ADALORA_REQUIRE(decision.budget >= 0 && decision.budget <= initial_budget(), where,
                    "the schedule returned budget ", decision.budget, " at step ", t,
                    "; it must be in [0, ", initial_budget(), "]");

    // Policies that must not change anything on bad input look before they touch anything.
    std::int64_t non_finite = 0;
    if (options_.non_finite != non_finite_policy::ignore_elements) {
      non_finite = run_pass(adapters, pass::check);
      if (non_finite > 0 && options_.non_finite == non_finite_policy::throw_error)
        throw std::domain_error(detail::concat(
            "adalora::rank_allocator::step: ", non_finite,
            " parameter or gradient values are NaN or infinite at step ", t, " (first in ",
            first_non_finite_, "); nothing was changed (non_finite_policy::throw_error)"));
    }

    step_result<T>& r = result_;
    r.step = t;
    r.budget = decision.budget;
    r.mask_due = decision.mask;
    r.importance_updated = false;
    r.forced = false;
    r.skipped = false;
    r.action = mask_action::none;
    r.threshold = 0;
    r.k = 0;
    r.non_finite = non_finite;
    last_step_ = t;
    if (non_finite > 0 && options_.non_finite == non_finite_policy::skip_step) {
      r.skipped = true;
      return r;
    }

    if constexpr (detail::has_begin_step<Metric>)
      if (update) metric_.begin_step(t);
    r.importance_updated = update;

    if (options_.semantics == final_phase::peft && t >= final_start) {
      if (!force_masked_) {
        // PEFT masks once with frozen scores at T − tfinal (also when that step is not a
        // multiple of deltaT), keeps the pattern, and resets the importance state.
        r.forced = true;
        r.non_finite = run_pass(adapters, pass::frozen);
        mask_to_budget(adapters, decision.budget);
        reset_state();
        force_masked_ = true;
      } else {
        apply_pattern(adapters);
        r.action = mask_action::pattern;
      }
    } else if (update) {
      r.non_finite = run_pass(adapters, pass::update);
      if (decision.mask) mask_to_budget(adapters, decision.budget);
    } else if (decision.mask && options_.semantics == final_phase::loralib) {  // frozen importance
      r.non_finite = run_pass(adapters, pass::frozen);
      mask_to_budget(adapters, decision.budget);
    }
    return r;
  }

  /// Convenience overload for a std::vector of adapter_tensors.
  const step_result<T>& step(std::int64_t t, const std::vector<adapter_tensors<T>>& adapters) {
    return step(t, std::span<const adapter_tensors<T>>(adapters));
  }

  // ---- inspection ------------------------------------------------------------------------------

  std::span<const adapter_shape> shapes() const noexcept { return shapes_; }
  std::size_t num_adapters() const noexcept { return shapes_.size(); }
  std::int64_t initial_budget() const noexcept {
    return static_cast<std::int64_t>(layout_.back().triplet);
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
    return std::span<const double>(scores_).subspan(layout_[a].triplet, triplet_count(a));
  }
  /// 1 where adapter `a`'s triplet is kept by the current pattern, 0 where pruned.
  std::span<const std::uint8_t> kept_mask(std::size_t a) const {
    check_adapter_index(a, "rank_allocator::kept_mask");
    return std::span<const std::uint8_t>(kept_mask_).subspan(layout_[a].triplet, triplet_count(a));
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
    return std::span<const T>(state_).subspan(state_begin(a, role) * K, state_count(a, role) * K);
  }
  /// Zeroes the importance state (PEFT reset_ipt); the pattern is kept.
  void reset_state() noexcept { std::fill(state_.begin(), state_.end(), T(0)); }

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
    index_t total = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const auto m = kept_mask(a);
      kept_[a] = static_cast<index_t>(std::count(m.begin(), m.end(), std::uint8_t{1}));
      total += kept_[a];
    }
    result_.kept = kept_;
    result_.kept_total = total;
  }

 private:
  using pass = detail::score_pass;

  /// The extents of the part of an adapter this process holds.
  struct local_dims {
    index_t r = 0, in = 0, out = 0;
  };
  /// Where an adapter's data starts in the allocator's arrays.
  struct adapter_layout {
    std::size_t triplet;    // first (global) triplet; the sentinel's is b0
    std::size_t element;    // first local element (A, E, B in turn)
    std::size_t a_block;    // first of its r x a_blocks A block sums
    std::size_t b_block;    // first of its b_blocks x r B block sums
    std::size_t a_blocks;   // blocks of in_features
    std::size_t b_blocks;   // blocks of out_features
    local_dims local;
  };

  /// A unit of work: local rows [begin, end) of A or B of one adapter, or all of its local E.
  /// Tasks are planned once from the shapes alone.
  struct task {
    std::size_t adapter;
    tensor_role role;
    index_t begin, end;
  };

  /// Enumerators come from users' config files as integers: a value this allocator does not
  /// know is refused here, so that no branch on them below ever sees one.
  static void validate_options(const allocator_options& o) {
    constexpr const char* where = "rank_allocator";
    ADALORA_REQUIRE(o.semantics == final_phase::peft || o.semantics == final_phase::loralib, where,
                    "options.semantics must be final_phase::peft or final_phase::loralib, got ",
                    static_cast<int>(o.semantics));
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

  static std::size_t blocks_of(index_t n) noexcept {
    return static_cast<std::size_t>(n / sum_block + (n % sum_block != 0 ? 1 : 0));
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

  void plan_tasks() {
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const local_dims& d = layout_[a].local;
      if (d.r == 0) continue;
      if (d.in > 0) {
        const index_t a_rows = std::max<index_t>(1, task_elements / d.in);
        for (index_t i = 0; i < d.r; i += a_rows)
          tasks_.push_back({a, tensor_role::A, i, std::min(d.r, i + a_rows)});
      }
      tasks_.push_back({a, tensor_role::E, 0, d.r});
      // B tasks cover whole sum blocks (in the adapter's global row numbering).
      const index_t b_rows = std::max<index_t>(1, task_elements / (d.r * sum_block)) * sum_block;
      for (index_t j = 0; j < d.out; j += b_rows)
        tasks_.push_back({a, tensor_role::B, j, std::min(d.out, j + b_rows)});
    }
    task_non_finite_.assign(tasks_.size(), 0);
    task_bad_score_.assign(tasks_.size(), 0);
    // Each thread's home tasks: contiguous, with about equal element counts (see task_pool).
    std::vector<std::size_t> cumulative(tasks_.size() + 1, 0);
    for (std::size_t id = 0; id < tasks_.size(); ++id) {
      const task& tk = tasks_[id];
      const local_dims& d = layout_[tk.adapter].local;
      const index_t width = tk.role == tensor_role::A ? d.in : tk.role == tensor_role::B ? d.r : 1;
      cumulative[id + 1] = cumulative[id] + static_cast<std::size_t>((tk.end - tk.begin) * width);
    }
    const std::size_t threads = options_.threads;
    split_.assign(threads + 1, tasks_.size());
    split_[0] = 0;
    for (std::size_t k = 1; k < threads; ++k) {
      const std::size_t target = cumulative.back() / threads * k;
      // At most tasks_.size(), and non-decreasing in k as the targets are.
      split_[k] = static_cast<std::size_t>(
          std::lower_bound(cumulative.begin(), cumulative.end(), target) - cumulative.begin());
    }
  }

  std::size_t triplet_count(std::size_t a) const noexcept {
    return layout_[a + 1].triplet - layout_[a].triplet;
  }
  std::size_t state_begin(std::size_t a, tensor_role role) const noexcept {
    const local_dims& d = layout_[a].local;
    std::size_t off = layout_[a].element;
    if (role == tensor_role::A) return off;
    off += static_cast<std::size_t>(d.r * d.in);
    if (role == tensor_role::E) return off;
    return off + static_cast<std::size_t>(d.r);
  }
  std::size_t state_count(std::size_t a, tensor_role role) const noexcept {
    const local_dims& d = layout_[a].local;
    switch (role) {
      case tensor_role::A: return static_cast<std::size_t>(d.r * d.in);
      case tensor_role::E: return static_cast<std::size_t>(d.r);
      default: return static_cast<std::size_t>(d.r * d.out);
    }
  }
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
      const local_dims& d = layout_[a].local;
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

  struct pass_context {
    rank_allocator* self;
    std::span<const adapter_tensors<T>> adapters;
    pass mode;
  };

  static constexpr auto K_ = static_cast<index_t>(K);

  template <pass Mode, detail::score_sink Sink = detail::score_sink::store>
  detail::run_summary score(tensor_role role, const T* p, index_t sp, const T* g, index_t sg,
                            T* st, index_t n, double* out) const {
    return detail::score_run<Mode, Sink>(metric_, role, p, sp, g, sg, st, n, out);
  }

  template <pass Mode>
  void run_task(std::size_t id, std::span<const adapter_tensors<T>> adapters, double* scratch) {
    const task& tk = tasks_[id];
    const std::size_t a = tk.adapter;
    const adapter_layout& L = layout_[a];
    const adapter_shard& h = shapes_[a].shard;
    const svd_adapter_ref<T>& p = adapters[a].params;
    const svd_adapter_ref<const T>& g = adapters[a].grads;
    const std::size_t b0 = scores_.size();
    const index_t r = shapes_[a].rank;  // global: block sums are laid out per global triplet
    const index_t tb = h.triplet_begin;
    T* st = state_.data() + state_begin(a, tk.role) * K;
    std::int64_t bad = 0;
    bool scores_ok = true;

    if (tk.role == tensor_role::A) {
      // One sum per (triplet, block of sum_block columns), blocks in the global numbering.
      const index_t in = L.local.in;
      double* sums = partials_.data() + b0 + L.a_block;
      const std::size_t first_block = static_cast<std::size_t>(h.in_begin / sum_block);
      for (index_t i = tk.begin; i < tk.end; ++i) {
        double* row = sums + static_cast<std::size_t>(tb + i) * L.a_blocks + first_block;
        for (index_t j0 = 0; j0 < in; j0 += sum_block) {
          const index_t n = std::min(sum_block, in - j0);
          const detail::run_summary s =
              score<Mode, detail::score_sink::sum>(tensor_role::A, &p.A(i, j0), p.A.col_stride(),
                                                   &g.A(i, j0), g.A.col_stride(),
                                                   st + (i * in + j0) * K_, n, scratch);
          bad += s.non_finite;
          if constexpr (Mode != pass::check) {
            scores_ok &= s.valid;  // a sum beyond double's range is +inf: ranked, not an error
            row[j0 / sum_block] = s.sum;
          }
        }
      }
    } else if (tk.role == tensor_role::E) {
      for (index_t i0 = tk.begin; i0 < tk.end; i0 += sum_block) {
        const index_t n = std::min(sum_block, tk.end - i0);
        const detail::run_summary s = score<Mode>(tensor_role::E, &p.E[i0], p.E.stride(), &g.E[i0],
                                                  g.E.stride(), st + i0 * K_, n, scratch);
        bad += s.non_finite;
        if constexpr (Mode != pass::check) {
          scores_ok &= s.valid;
          if (h.scores_e)
            std::copy(scratch, scratch + n, partials_.data() + L.triplet + static_cast<std::size_t>(tb + i0));
        }
      }
    } else {
      // One sum per (block of sum_block rows, triplet): the rows of a block are added in order.
      const index_t lr = L.local.r;
      double* sums = partials_.data() + b0 + layout_.back().a_block + L.b_block;
      const bool flat = p.B.is_row_major_contiguous() && g.B.is_row_major_contiguous();
      // Where the rows are contiguous, several are scored as one flat run (r is often 8 or 16:
      // a run per row would be too short to vectorise), never across a block of rows. Runs of
      // a multiple of vector_block elements where the row width allows it.
      // Rows of width lr that make a multiple of vector_block elements (lr >= 1 here).
      const index_t step = detail::vector_block / std::gcd(lr, detail::vector_block);
      const index_t rows_per_run = !flat || lr > sum_block ? 1
                                   : step * lr <= sum_block ? sum_block / lr / step * step
                                                            : sum_block / lr;
      bool columns = false;
      if constexpr (detail::uses_sensitivity_simd<Mode, T, Metric>)
        columns = flat && lr % 4 == 0 && lr <= detail::max_column_kernel_width;
      for (index_t j = tk.begin; j < tk.end;) {
        const index_t global = h.out_begin + j;
        const auto block = static_cast<std::size_t>(global / sum_block);
        double* col = sums + block * static_cast<std::size_t>(r) + static_cast<std::size_t>(tb);
        const index_t block_end = (global / sum_block + 1) * sum_block;
        if constexpr (detail::uses_sensitivity_simd<Mode, T, Metric>) {
          if (columns) {  // the rows of the block in one run, summed in registers
            const index_t rows = std::min(tk.end - j, block_end - global);
            const detail::run_summary s =
                detail::score_columns(metric_, &p.B(j, 0), &g.B(j, 0), st + j * lr * K_, rows, lr, col);
            bad += s.non_finite;
            scores_ok &= s.valid;
            j += rows;
            continue;
          }
        }
        const index_t rows = std::min({rows_per_run, tk.end - j, block_end - global});
        for (index_t i0 = 0; i0 < lr; i0 += sum_block) {
          const index_t n = flat ? rows * lr : std::min(sum_block, lr - i0);
          // A flat run is contiguous even where a one-column view reports another col stride.
          const detail::run_summary s = score<Mode>(tensor_role::B, &p.B(j, i0), flat ? 1 : p.B.col_stride(),
                                                    &g.B(j, i0), flat ? 1 : g.B.col_stride(),
                                                    st + (j * lr + i0) * K_, n, scratch);
          bad += s.non_finite;
          if constexpr (Mode != pass::check) {
            const index_t width = flat ? lr : n;
            for (index_t q = 0; q < rows; ++q) detail::add_scores(col + i0, scratch + q * width, width);
            scores_ok &= s.valid;
          }
        }
        j += rows;
      }
    }
    task_non_finite_[id] = bad;
    task_bad_score_[id] = scores_ok ? 0 : 1;
  }

  static void run_task_entry(void* ctx, std::size_t id) {
    auto& c = *static_cast<pass_context*>(ctx);
    // Each task scores through its own L1-sized scratch row on the running thread's stack.
    double scratch[sum_block];
    switch (c.mode) {
      case pass::update: c.self->template run_task<pass::update>(id, c.adapters, scratch); break;
      case pass::frozen: c.self->template run_task<pass::frozen>(id, c.adapters, scratch); break;
      case pass::check: c.self->template run_task<pass::check>(id, c.adapters, scratch); break;
    }
  }

  /// One pass over every element (see the class comment). Returns the number of elements whose
  /// parameter or gradient is non-finite; the partial sums are left in partials_.
  std::int64_t run_pass(std::span<const adapter_tensors<T>> adapters, pass mode) {
    // Entries this process does not hold stay zero, so that the communicator's sum over
    // processes gives each block sum exactly (x + 0 = x: no rounding, whatever the order).
    if (mode != pass::check) std::fill(partials_.begin(), partials_.end(), 0.0);
    pass_context ctx{this, adapters, mode};
    first_non_finite_ = {};
    if (pool_)
      pool_->run(tasks_.size(), &run_task_entry, &ctx, split_);
    else
      for (std::size_t id = 0; id < tasks_.size(); ++id) run_task_entry(&ctx, id);

    std::int64_t bad = 0;
    for (std::size_t id = 0; id < tasks_.size(); ++id) {
      bad += task_non_finite_[id];
      if (task_non_finite_[id] > 0 && first_non_finite_.empty()) describe(tasks_[id]);
      if (task_bad_score_[id] && mode != pass::check)
        throw std::domain_error(detail::concat(
            "adalora::rank_allocator::step: the importance metric returned a negative or "
            "non-finite score for finite input in ", describe(tasks_[id]), " at step ",
            result_.step, "; a metric's scores must be finite and >= 0"));
    }
    return bad;
  }

  const char* describe(const task& tk) {
    // Written into a fixed buffer: no allocation on the step's path.
    const char* tensor = tk.role == tensor_role::A ? "A" : tk.role == tensor_role::E ? "E" : "B";
    const std::string& name = shapes_[tk.adapter].name;
    std::snprintf(describe_buffer_, sizeof describe_buffer_, "adapter %zu ('%.*s'), tensor %s",
                  tk.adapter, static_cast<int>(std::min<std::size_t>(name.size(), 160)),
                  name.c_str(), tensor);
    first_non_finite_ = std::string_view(describe_buffer_);
    return describe_buffer_;
  }

  /// Triplet scores from the (all-reduced) partial sums, threshold, and the mask on E.
  void mask_to_budget(std::span<const adapter_tensors<T>> adapters, std::int64_t budget) {
    comm_.all_reduce_sum(partials_);
    const std::size_t n = scores_.size();
    // S = s(E) + (mean over in of s(A_i.) + mean over out of s(B_.i)) in the references'
    // association (PEFT _combine_ipt, then E + that), each term rounded to T as torch rounds
    // it; beyond T's range the double value is kept (rounding is monotone, so order is kept).
    // Row and column sums add the block sums in block order: the same in any sharding.
    const double* a_sums = partials_.data() + n;
    const double* b_sums = a_sums + layout_.back().a_block;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const adapter_layout& L = layout_[a];
      const auto r = static_cast<std::size_t>(shapes_[a].rank);
      const double in = static_cast<double>(shapes_[a].in_features);
      const double out = static_cast<double>(shapes_[a].out_features);
      for (std::size_t i = 0; i < r; ++i) {
        double row = 0.0, col = 0.0;
        for (std::size_t b = 0; b < L.a_blocks; ++b) row += a_sums[L.a_block + i * L.a_blocks + b];
        for (std::size_t b = 0; b < L.b_blocks; ++b) col += b_sums[L.b_block + b * r + i];
        const double e = partials_[L.triplet + i], mean_a = row / in, mean_b = col / out;
        const T rounded = static_cast<T>(e) + (static_cast<T>(mean_a) + static_cast<T>(mean_b));
        scores_[L.triplet + i] = !detail::is_non_finite(rounded) ? static_cast<double>(rounded) : e + (mean_a + mean_b);
      }
    }

    const auto k = static_cast<std::size_t>(initial_budget() - budget);
    step_result<T>& r = result_;
    r.action = mask_action::threshold;
    r.k = static_cast<std::int64_t>(k);
    if (k == 0) {
      // Nothing to prune (a user schedule at full budget): every triplet kept, E untouched.
      // torch.kthvalue would raise here (peft#2337); SPEC §6 lets a port define it this way.
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
    apply_pattern(adapters);
  }

  /// E_i = 0 where the current pattern prunes triplet i (for the E entries this process holds);
  /// recounts kept per adapter (over all its triplets: every process knows the whole pattern).
  void apply_pattern(std::span<const adapter_tensors<T>> adapters) {
    index_t total = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const vector_view<T>& e = adapters[a].params.E;
      const std::uint8_t* keep = kept_mask_.data() + layout_[a].triplet;
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

  std::vector<adapter_layout> layout_;       // per adapter, plus a sentinel with the totals
  std::vector<T> state_;                     // K values per element
  std::vector<double> partials_;             // s(E_i), then A's and B's block sums
  std::vector<double> scores_;               // per triplet, last mask event
  std::vector<double> select_;               // scratch for nth_element
  std::vector<std::size_t> order_;           // scratch for exact_budget
  std::vector<std::uint8_t> kept_mask_;      // per triplet: 1 kept, 0 pruned
  std::vector<index_t> kept_;                // per adapter
  std::vector<task> tasks_;
  std::vector<std::int64_t> task_non_finite_;
  std::vector<std::uint8_t> task_bad_score_;
  std::vector<std::size_t> split_;           // first task of each thread's home range
  char describe_buffer_[256] = {};
  std::string_view first_non_finite_;
  std::unique_ptr<detail::task_pool> pool_;
  step_result<T> result_;
  std::int64_t last_step_ = -1;
  bool force_masked_ = false;
};

}  // namespace adalora
