#pragma once
// The rank allocator: after each optimizer step, update importance, follow the budget schedule,
// and zero the singular values of the least important triplets across all adapters.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// One adapted weight as the allocator sees it. `name` is the module path used in rank patterns
/// (PEFT writes "<name>.lora_E" keys); `rank` is the initial rank r.
struct adapter_shape {
  std::string name;
  index_t in_features = 0;
  index_t out_features = 0;
  index_t rank = 0;
};

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

struct allocator_options {
  final_phase semantics = final_phase::peft;
  tie_policy ties = tie_policy::prune_all_ties;
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
  T threshold = T(0);               ///< the k-th smallest triplet score (action == threshold)
  std::int64_t k = 0;               ///< triplets asked to prune, initial budget − budget
  std::span<const index_t> kept;    ///< kept triplets per adapter under the current pattern
  index_t kept_total = 0;
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
/// Guarantees: all memory is allocated at construction, so step() never allocates; adapters of
/// any shapes and initial ranks (including rank 0); the caller's tensors are only viewed.
/// Thread safety: a rank_allocator is not shared between threads while step() runs; distinct
/// allocators are independent.
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
  static constexpr index_t scratch_chunk = 512;  // elements scored per inner loop (2-4 KiB)

 public:
  using element_type = T;
  using metric_type = Metric;
  using schedule_type = Schedule;

  rank_allocator(std::vector<adapter_shape> shapes, Schedule schedule, Metric metric = {},
                 allocator_options options = {}, Comm comm = {})
      : shapes_(std::move(shapes)),
        schedule_(std::move(schedule)),
        metric_(std::move(metric)),
        options_(options),
        comm_(std::move(comm)) {
    constexpr const char* where = "rank_allocator";
    ADALORA_REQUIRE(!shapes_.empty(), where, "needs at least one adapter, got none");
    std::int64_t b0 = 0;
    std::size_t elements = 0;
    triplet_offset_.reserve(shapes_.size() + 1);
    state_offset_.reserve(shapes_.size() + 1);
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const adapter_shape& s = shapes_[a];
      ADALORA_REQUIRE(s.in_features >= 1 && s.out_features >= 1, where, "adapter ", a, " ('",
                      s.name, "') needs in_features >= 1 and out_features >= 1, got ",
                      s.in_features, " and ", s.out_features);
      ADALORA_REQUIRE(s.rank >= 0, where, "adapter ", a, " ('", s.name,
                      "') needs rank >= 0, got ", s.rank);
      triplet_offset_.push_back(static_cast<std::size_t>(b0));
      state_offset_.push_back(elements);
      b0 += s.rank;
      elements += static_cast<std::size_t>(s.rank * (s.in_features + 1 + s.out_features));
    }
    triplet_offset_.push_back(static_cast<std::size_t>(b0));
    state_offset_.push_back(elements);
    ADALORA_REQUIRE(schedule_.initial_budget() == b0, where,
                    "the schedule's initial budget must equal the sum of the adapters' ranks, ",
                    b0, ", got ", schedule_.initial_budget());

    const auto n = static_cast<std::size_t>(b0);
    state_.assign(elements * K, T(0));
    partials_.assign(3 * n, 0.0);
    scratch_.assign(static_cast<std::size_t>(scratch_chunk), T(0));
    scores_.assign(n, T(0));
    select_.assign(n, T(0));
    if (options_.ties == tie_policy::exact_budget) order_.assign(n, 0);
    kept_mask_.assign(n, 1);
    kept_.resize(shapes_.size());
    for (std::size_t a = 0; a < shapes_.size(); ++a) kept_[a] = shapes_[a].rank;
    result_.kept = kept_;
    result_.kept_total = static_cast<index_t>(b0);
  }

  /// Runs one allocator step; see the class comment. Throws std::invalid_argument on a step
  /// that does not increase or on views that do not match the adapters' shapes (nothing is
  /// changed then), and std::domain_error on a non-finite importance score.
  const step_result<T>& step(std::int64_t t, std::span<const adapter_tensors<T>> adapters) {
    constexpr const char* where = "rank_allocator::step";
    ADALORA_REQUIRE(t >= 0, where, "step must be >= 0, got ", t);
    ADALORA_REQUIRE(t > last_step_, where, "step must increase from call to call, got ", t,
                    " after ", last_step_);
    check_views(adapters);

    const std::int64_t final_start = schedule_.final_phase_start();
    const bool update = t < final_start;
    if constexpr (detail::has_begin_step<Metric>)
      if (update) metric_.begin_step(t);

    const budget_decision decision = schedule_.at(t);
    ADALORA_REQUIRE(decision.budget >= 0 && decision.budget <= initial_budget(), where,
                    "the schedule returned budget ", decision.budget, " at step ", t,
                    "; it must be in [0, ", initial_budget(), "]");

    step_result<T>& r = result_;
    r.step = t;
    r.budget = decision.budget;
    r.mask_due = decision.mask;
    r.importance_updated = update;
    r.forced = false;
    r.action = mask_action::none;
    r.threshold = T(0);
    r.k = 0;

    if (options_.semantics == final_phase::peft && t >= final_start) {
      if (!force_masked_) {
        // PEFT masks once with frozen scores at T − tfinal (also when that step is not a
        // multiple of deltaT), keeps the pattern, and resets the importance state.
        r.forced = true;
        importance_pass<true>(adapters);
        mask_to_budget(adapters, decision.budget);
        reset_state();
        force_masked_ = true;
      } else {
        apply_pattern(adapters);
        r.action = mask_action::pattern;
      }
    } else if (update) {
      importance_pass<false>(adapters);
      if (decision.mask) mask_to_budget(adapters, decision.budget);
    } else if (decision.mask) {  // loralib, frozen importance
      importance_pass<true>(adapters);
      mask_to_budget(adapters, decision.budget);
    }
    last_step_ = t;
    return r;
  }

  /// Convenience overload for a braced list or a std::vector of adapter_tensors.
  const step_result<T>& step(std::int64_t t, const std::vector<adapter_tensors<T>>& adapters) {
    return step(t, std::span<const adapter_tensors<T>>(adapters));
  }

  // ---- inspection ------------------------------------------------------------------------------

  std::span<const adapter_shape> shapes() const noexcept { return shapes_; }
  std::size_t num_adapters() const noexcept { return shapes_.size(); }
  std::int64_t initial_budget() const noexcept {
    return static_cast<std::int64_t>(triplet_offset_.back());
  }
  const Schedule& schedule() const noexcept { return schedule_; }
  const Metric& metric() const noexcept { return metric_; }
  const allocator_options& options() const noexcept { return options_; }
  /// The last step passed to step(), or −1 before the first.
  std::int64_t last_step() const noexcept { return last_step_; }
  /// The result of the last step (also before the first: no mask, full ranks).
  const step_result<T>& last_result() const noexcept { return result_; }

  /// Triplet scores of the last mask event, all adapters concatenated in order.
  std::span<const T> triplet_scores() const noexcept { return scores_; }
  /// Triplet scores of adapter `a` at the last mask event.
  std::span<const T> triplet_scores(std::size_t a) const {
    check_adapter_index(a, "rank_allocator::triplet_scores");
    return std::span<const T>(scores_).subspan(triplet_offset_[a], triplet_count(a));
  }
  /// 1 where adapter `a`'s triplet is kept by the current pattern, 0 where pruned.
  std::span<const std::uint8_t> kept_mask(std::size_t a) const {
    check_adapter_index(a, "rank_allocator::kept_mask");
    return std::span<const std::uint8_t>(kept_mask_).subspan(triplet_offset_[a], triplet_count(a));
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

 private:
  std::size_t triplet_count(std::size_t a) const noexcept {
    return triplet_offset_[a + 1] - triplet_offset_[a];
  }
  std::size_t state_begin(std::size_t a, tensor_role role) const noexcept {
    const adapter_shape& s = shapes_[a];
    const auto r = static_cast<std::size_t>(s.rank);
    std::size_t off = state_offset_[a];
    if (role == tensor_role::A) return off;
    off += r * static_cast<std::size_t>(s.in_features);
    if (role == tensor_role::E) return off;
    return off + r;
  }
  std::size_t state_count(std::size_t a, tensor_role role) const noexcept {
    const adapter_shape& s = shapes_[a];
    const auto r = static_cast<std::size_t>(s.rank);
    switch (role) {
      case tensor_role::A: return r * static_cast<std::size_t>(s.in_features);
      case tensor_role::E: return r;
      default: return r * static_cast<std::size_t>(s.out_features);
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
      const svd_adapter_ref<T>& p = adapters[a].params;
      ADALORA_REQUIRE(p.A.rows() == s.rank && p.A.cols() == s.in_features, where, "adapter ", a,
                      " ('", s.name, "'): A must be ", s.rank, " x ", s.in_features, ", got ",
                      p.A.rows(), " x ", p.A.cols());
      ADALORA_REQUIRE(p.E.size() == s.rank, where, "adapter ", a, " ('", s.name,
                      "'): E must have size ", s.rank, ", got ", p.E.size());
      ADALORA_REQUIRE(p.B.rows() == s.out_features && p.B.cols() == s.rank, where, "adapter ",
                      a, " ('", s.name, "'): B must be ", s.out_features, " x ", s.rank, ", got ",
                      p.B.rows(), " x ", p.B.cols());
      check_same_shapes(p, adapters[a].grads, where);
    }
  }

  [[noreturn]] void throw_non_finite(std::size_t a, tensor_role role) const {
    const char* tensor = role == tensor_role::A ? "A" : role == tensor_role::E ? "E" : "B";
    throw std::domain_error(detail::concat(
        "adalora::rank_allocator::step: non-finite importance score in adapter ", a, " ('",
        shapes_[a].name, "'), tensor ", tensor, " at step ", result_.step,
        ": a parameter or gradient is NaN or infinite; that adapter's importance state is no "
        "longer meaningful (call reset_state() to start it again)"));
  }
  static bool finite(double x) noexcept { return std::abs(x) <= std::numeric_limits<double>::max(); }

  /// Scores n consecutive elements of one row (params p, grads g, their state st) into out:
  /// metric.update() when importance moves on, metric.score() when it is frozen (g unused).
  /// The unit-stride case is split out so that the compiler can vectorise it.
  template <bool Frozen>
  void score_run(tensor_role role, const T* p, index_t sp, const T* g, index_t sg, T* st,
                 index_t n, T* out) const {
    auto one = [&](index_t j, T x, T dx) {
      if constexpr (Frozen)
        out[j] = metric_.score(role, x, std::span<const T, K>(st + static_cast<std::size_t>(j) * K, K));
      else
        out[j] = metric_.update(role, x, dx, std::span<T, K>(st + static_cast<std::size_t>(j) * K, K));
    };
    if (sp == 1 && (Frozen || sg == 1)) {
      for (index_t j = 0; j < n; ++j) one(j, p[j], Frozen ? T(0) : g[j]);
    } else {
      for (index_t j = 0; j < n; ++j) one(j, p[j * sp], Frozen ? T(0) : g[j * sg]);
    }
  }

  /// Sum of n scores in double, in a fixed order (eight interleaved lanes, then a fixed tree):
  /// vectorisable, and the same on every machine and for every thread count.
  static double sum_scores(const T* s, index_t n) noexcept {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    index_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(s[j + l]);
    double tail = 0;
    for (; j < n; ++j) tail += static_cast<double>(s[j]);
    return (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) + tail;
  }

  /// One pass over every element: advances the importance state (or, Frozen, reads it) and
  /// forms the three partial sums of every triplet (s(E_i), Σ_j s(A_ij), Σ_j s(B_ji)) in the
  /// same pass over memory. Scores go through a small scratch row that stays in L1 cache.
  template <bool Frozen>
  void importance_pass(std::span<const adapter_tensors<T>> adapters) {
    const std::size_t b0 = scores_.size();
    T* scratch = scratch_.data();
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const adapter_shape& s = shapes_[a];
      const svd_adapter_ref<T>& p = adapters[a].params;
      const svd_adapter_ref<const T>& g = adapters[a].grads;
      double* pe = partials_.data() + triplet_offset_[a];
      double* pa = pe + b0;
      double* pb = pa + b0;
      T* stA = state_.data() + state_begin(a, tensor_role::A) * K;
      T* stE = state_.data() + state_begin(a, tensor_role::E) * K;
      T* stB = state_.data() + state_begin(a, tensor_role::B) * K;
      const index_t r = s.rank, in = s.in_features, out = s.out_features;

      double check = 0.0;  // non-finite iff some score is
      for (index_t i = 0; i < r; ++i) {
        double row = 0.0;
        for (index_t j0 = 0; j0 < in; j0 += scratch_chunk) {
          const index_t n = std::min(scratch_chunk, in - j0);
          score_run<Frozen>(tensor_role::A, &p.A(i, j0), p.A.col_stride(), &g.A(i, j0),
                            g.A.col_stride(), stA + static_cast<std::size_t>(i * in + j0) * K, n,
                            scratch);
          row += sum_scores(scratch, n);
        }
        pa[i] = row;
        check += row;
      }
      if (!finite(check)) throw_non_finite(a, tensor_role::A);

      if (r > 0) {
        score_run<Frozen>(tensor_role::E, p.E.data(), p.E.stride(), g.E.data(), g.E.stride(), stE,
                          r, scratch);
        check = 0.0;
        for (index_t i = 0; i < r; ++i) {
          pe[i] = static_cast<double>(scratch[i]);
          check += pe[i];
        }
        if (!finite(check)) throw_non_finite(a, tensor_role::E);
      }

      std::fill(pb, pb + r, 0.0);
      for (index_t j = 0; j < out; ++j) {
        for (index_t i0 = 0; i0 < r; i0 += scratch_chunk) {
          const index_t n = std::min(scratch_chunk, r - i0);
          score_run<Frozen>(tensor_role::B, &p.B(j, i0), p.B.col_stride(), &g.B(j, i0),
                            g.B.col_stride(), stB + static_cast<std::size_t>(j * r + i0) * K, n,
                            scratch);
          for (index_t i = 0; i < n; ++i) pb[i0 + i] += static_cast<double>(scratch[i]);
        }
      }
      check = 0.0;
      for (index_t i = 0; i < r; ++i) check += pb[i];
      if (!finite(check)) throw_non_finite(a, tensor_role::B);
    }
  }

  /// Triplet scores from the (all-reduced) partial sums, threshold, and the mask on E.
  void mask_to_budget(std::span<const adapter_tensors<T>> adapters, std::int64_t budget) {
    comm_.all_reduce_sum(partials_);
    const std::size_t n = scores_.size();
    // S = s(E) + (mean over in of s(A_i.) + mean over out of s(B_.i)), each mean rounded to T,
    // in the references' association (PEFT _combine_ipt then E + that).
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const double in = static_cast<double>(shapes_[a].in_features);
      const double out = static_cast<double>(shapes_[a].out_features);
      for (std::size_t i = triplet_offset_[a]; i < triplet_offset_[a + 1]; ++i) {
        const T e = static_cast<T>(partials_[i]);
        const T mean_a = static_cast<T>(partials_[n + i] / in);
        const T mean_b = static_cast<T>(partials_[2 * n + i] / out);
        scores_[i] = e + (mean_a + mean_b);
      }
    }

    const auto k = static_cast<std::size_t>(initial_budget() - budget);
    step_result<T>& r = result_;
    r.action = mask_action::threshold;
    r.k = static_cast<std::int64_t>(k);
    if (k == 0) {
      // Nothing to prune (a user schedule at full budget): every triplet kept, E untouched.
      // torch.kthvalue would raise here (peft#2337); SPEC §6 lets a port define it this way.
      r.threshold = -std::numeric_limits<T>::infinity();
      std::fill(kept_mask_.begin(), kept_mask_.end(), std::uint8_t{1});
    } else if (options_.ties == tie_policy::prune_all_ties) {
      std::copy(scores_.begin(), scores_.end(), select_.begin());
      std::nth_element(select_.begin(), select_.begin() + static_cast<std::ptrdiff_t>(k - 1),
                       select_.end());
      r.threshold = select_[k - 1];
      for (std::size_t i = 0; i < n; ++i) kept_mask_[i] = scores_[i] > r.threshold ? 1 : 0;
    } else {
      std::iota(order_.begin(), order_.end(), std::size_t{0});
      // Pruning order: lower score first; among equal scores the later triplet first, so that
      // adapter order then index decides deterministically which tied triplets stay.
      auto prune_before = [this](std::size_t x, std::size_t y) {
        return scores_[x] < scores_[y] || (scores_[x] == scores_[y] && x > y);
      };
      std::nth_element(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k - 1),
                       order_.end(), prune_before);
      r.threshold = scores_[order_[k - 1]];
      std::fill(kept_mask_.begin(), kept_mask_.end(), std::uint8_t{1});
      for (std::size_t i = 0; i < k; ++i) kept_mask_[order_[i]] = 0;
    }
    apply_pattern(adapters);
  }

  /// E_i = 0 where the current pattern prunes triplet i; recounts kept per adapter.
  void apply_pattern(std::span<const adapter_tensors<T>> adapters) {
    index_t total = 0;
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      const vector_view<T>& e = adapters[a].params.E;
      const std::uint8_t* keep = kept_mask_.data() + triplet_offset_[a];
      index_t kept = 0;
      for (index_t i = 0; i < e.size(); ++i) {
        if (keep[i]) ++kept;
        else e[i] = T(0);
      }
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

  std::vector<std::size_t> triplet_offset_;  // first triplet of each adapter; back() = b0
  std::vector<std::size_t> state_offset_;    // first element of each adapter (A, E, B in turn)
  std::vector<T> state_;                     // K values per element
  std::vector<double> partials_;             // s(E_i) for all i, then Σ s(A_i.), then Σ s(B_.i)
  std::vector<T> scratch_;                   // scores of one row chunk (stays in L1)
  std::vector<T> scores_;                    // per triplet, last mask event
  std::vector<T> select_;                    // scratch for nth_element
  std::vector<std::size_t> order_;           // scratch for exact_budget
  std::vector<std::uint8_t> kept_mask_;      // per triplet: 1 kept, 0 pruned
  std::vector<index_t> kept_;                // per adapter
  step_result<T> result_;
  std::int64_t last_step_ = -1;
  bool force_masked_ = false;
};

}  // namespace adalora
