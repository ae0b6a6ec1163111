#pragma once
// Growth: rank that goes where importance asks for it (docs/growth.md).
//
// AdaLoRA only removes rank: an adapter that starts below what it needs never recovers. Here a
// rank_redistributor moves triplets during training: at a move it drops the weakest triplets
// (by the allocator's triplet scores) and appends new ones where a growth policy says, and the
// caller initialises them with an init policy that leaves the function where it was (E = 0).
// Successors of AdaLoRA grow rank in this spirit (IncreLoRA, ElaLoRA).
//
// Three policies, each replaceable:
//   where   a growth policy:  std::vector<index_t> policy(const growth_view&, index_t count)
//   how     an init policy:   init(svd_adapter_ref<T> params, const triplet_map&, std::mt19937_64&)
//   when    the budget schedule (growth_schedule.hpp) and redistribution_options.
//
//   adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::constant_total_schedule>
//       allocator(adapters, adalora::constant_total_schedule({.total_step = T, ...}));
//   adalora::rank_redistributor mover({.interval = 20, .moves = 2});
//   ... allocator.step(t, adapters);
//   if (auto change = mover.step(t, allocator))
//     for (std::size_t a = 0; a < change->size(); ++a) {
//       layer[a].change_rank((*change)[a]);                    // svd_adapter: params and grads
//       init(layer[a].params(), (*change)[a], rng);            // new triplets: E = 0
//       adapters.replace(a, layer[a].params(), layer[a].grads());
//       // and the optimizer's state for A, E, B: remap_* with fill 0
//     }

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

// ---- how: new triplets ---------------------------------------------------------------------------

/// The default init policy: E = 0 for every new triplet, so that the adapter's output does not
/// change; its row of A and column of B are drawn N(0, init_std²) (the references' init) and,
/// with `orthogonal`, projected off the span of the adapter's other rows of A (columns of B) and
/// rescaled to the norm they were drawn with, so that a new triplet starts in a direction the
/// adapter does not have yet. Where there is no room left (rank >= in or out) the draw is kept.
struct zero_singular_value_init {
  double init_std = 0.02;
  bool orthogonal = true;

  template <class T>
  void operator()(const svd_adapter_ref<T>& params, const triplet_map& m, std::mt19937_64& rng) const {
    constexpr const char* where = "zero_singular_value_init";
    ADALORA_REQUIRE(std::isfinite(init_std) && init_std >= 0, where,
                    "init_std must be finite and >= 0, got ", init_std);
    ADALORA_REQUIRE(params.rank() == m.new_rank(), where, "the parameters must have the map's new rank ",
                    m.new_rank(), ", got ", params.rank());
    params.check_shapes(where, "params");
    std::normal_distribution<double> normal(0.0, init_std);
    for (index_t i = 0; i < m.new_rank(); ++i) {
      if (m.source[static_cast<std::size_t>(i)] != new_triplet) continue;
      params.E[i] = T(0);
      draw(params.A.row(i), params.A, true, i, normal, rng);
      draw(params.B.col(i), params.B, false, i, normal, rng);
    }
  }

 private:
  /// Draws `v` (row i of A, or column i of B) and, with `orthogonal`, projects it off the other
  /// rows (columns) drawn or kept so far: an orthonormal basis of them by Gram–Schmidt, twice.
  template <class T, class Dist>
  void draw(vector_view<T> v, const matrix_view<T>& whole, bool rows, index_t i, Dist& normal,
            std::mt19937_64& rng) const {
    const auto n = static_cast<std::size_t>(v.size());
    std::vector<double> x(n);
    for (double& e : x) e = normal(rng);
    const double drawn = norm(x);
    if (orthogonal && drawn > 0) {
      std::vector<std::vector<double>> basis;
      const index_t others = rows ? whole.rows() : whole.cols();
      for (index_t j = 0; j < others && basis.size() < n; ++j) {
        if (j == i) continue;
        const vector_view<T> u = rows ? whole.row(j) : whole.col(j);
        std::vector<double> b(n);
        for (std::size_t k = 0; k < n; ++k) b[k] = static_cast<double>(u[static_cast<index_t>(k)]);
        if (orthonormalize(b, basis)) basis.push_back(std::move(b));
      }
      std::vector<double> projected = x;
      if (orthonormalize(projected, basis)) {
        const double scale = drawn / norm(projected);
        for (std::size_t k = 0; k < n; ++k) x[k] = projected[k] * scale;
      }
    }
    for (std::size_t k = 0; k < n; ++k) v[static_cast<index_t>(k)] = static_cast<T>(x[k]);
  }

  static double norm(const std::vector<double>& x) {
    double s = 0;
    for (double e : x) s += e * e;
    return std::sqrt(s);
  }
  /// Removes from x its components along the orthonormal `basis` (twice, for accuracy) and
  /// normalises it; false (x unusable) where almost nothing is left.
  static bool orthonormalize(std::vector<double>& x, const std::vector<std::vector<double>>& basis) {
    const double before = norm(x);
    if (before == 0) return false;
    for (int pass = 0; pass < 2; ++pass)
      for (const auto& b : basis) {
        double d = 0;
        for (std::size_t k = 0; k < x.size(); ++k) d += b[k] * x[k];
        for (std::size_t k = 0; k < x.size(); ++k) x[k] -= d * b[k];
      }
    const double after = norm(x);
    if (!(after > 1e-6 * before)) return false;
    for (double& e : x) e /= after;
    return true;
  }
};

// ---- where: growth policies ----------------------------------------------------------------------

/// What a growth policy sees at a move: the adapters (current ranks), the triplet scores of the
/// allocator's last mask and its kept mask, per adapter, after the move's drops.
struct growth_view {
  std::span<const adapter_shape> shapes;
  std::vector<std::vector<double>> scores;       ///< per adapter, per remaining triplet
  std::vector<std::vector<std::uint8_t>> kept;   ///< per adapter, per remaining triplet
};

/// Adds rank where an adapter is saturated: where even its weakest kept triplet scores high, the
/// adapter is using all the rank it has. Adapters are ranked by that weakest score (highest
/// first; an adapter with no kept triplet comes last, ties by adapter order) and receive one
/// triplet each in that order, round after round, at most `per_adapter` each and never above
/// `max_rank` (-1: min(in, out)). Returns fewer than `count` where every adapter is capped.
struct saturation_growth {
  index_t per_adapter = 1;
  index_t max_rank = -1;

  std::vector<index_t> operator()(const growth_view& v, index_t count) const {
    constexpr const char* where = "saturation_growth";
    ADALORA_REQUIRE(per_adapter >= 1, where, "per_adapter must be >= 1, got ", per_adapter);
    ADALORA_REQUIRE(count >= 0, where, "count must be >= 0, got ", count);
    const std::size_t n = v.shapes.size();
    // Scores are >= 0, so -inf (no kept triplet) ranks last.
    std::vector<double> weakest(n, -std::numeric_limits<double>::infinity());
    for (std::size_t a = 0; a < n; ++a) {
      bool any = false;
      double w = std::numeric_limits<double>::infinity();
      for (std::size_t i = 0; i < v.scores[a].size(); ++i)
        if (v.kept[a][i]) any = true, w = std::min(w, v.scores[a][i]);
      if (any) weakest[a] = w;
    }
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t x, std::size_t y) { return weakest[x] > weakest[y]; });
    std::vector<index_t> add(n, 0);
    for (index_t round = 0; round < per_adapter && count > 0; ++round)
      for (std::size_t a : order) {
        if (count == 0) break;
        const adapter_shape& s = v.shapes[a];
        const index_t cap = max_rank >= 0 ? max_rank : std::min(s.in_features, s.out_features);
        if (static_cast<index_t>(v.scores[a].size()) + add[a] >= cap) continue;
        ++add[a];
        --count;
      }
    return add;
  }
};

// ---- when: the redistributor ---------------------------------------------------------------------

struct redistribution_options {
  std::int64_t start = 0;     ///< no move before this step
  std::int64_t stop = -1;     ///< no move at or after this step; -1: the schedule's final phase
  std::int64_t interval = 10; ///< steps between moves; a move waits for the allocator's next mask
  index_t moves = 1;          ///< triplets dropped and added per move (the total stays)
  index_t min_rank = 0;       ///< no adapter is dropped below this rank
};

/// Moves rank between adapters during training, after the allocator's step. At a move (due every
/// `interval` steps from `start`, taken at the first step with fresh triplet scores, i.e. a mask
/// step of the schedule) it drops the `moves` lowest-scoring triplets, except those added at the
/// previous move (a new triplet starts at E = 0 and scores nothing until it has trained), adds as
/// many plus the budget's missing rank (step_result::missing, a rising schedule) where the policy
/// says, applies the change to the allocator and returns it for the caller to apply to its
/// tensors (new triplets' parameters by an init policy; gradients and optimizer state with 0).
template <class Policy = saturation_growth>
class rank_redistributor {
 public:
  explicit rank_redistributor(redistribution_options o, Policy policy = {})
      : o_(o), policy_(std::move(policy)) {
    constexpr const char* where = "rank_redistributor";
    ADALORA_REQUIRE(o_.start >= 0, where, "start must be >= 0, got ", o_.start);
    ADALORA_REQUIRE(o_.stop >= -1, where, "stop must be >= 0 (or -1), got ", o_.stop);
    ADALORA_REQUIRE(o_.interval >= 1, where, "interval must be >= 1, got ", o_.interval);
    ADALORA_REQUIRE(o_.moves >= 0, where, "moves must be >= 0, got ", o_.moves);
    ADALORA_REQUIRE(o_.min_rank >= 0, where, "min_rank must be >= 0, got ", o_.min_rank);
    next_ = o_.start;
  }

  const redistribution_options& options() const noexcept { return o_; }
  const Policy& policy() const noexcept { return policy_; }

  /// What step() depends on besides the options, the policy and the allocator: save it with the
  /// allocator's checkpoint (io/checkpoint.hpp does not hold it) to resume a run bit for bit.
  struct resumable_state {
    std::int64_t next_move = 0;                      ///< no move before this step
    std::vector<std::vector<std::uint8_t>> young;    ///< per adapter and triplet: added at the last move
    friend bool operator==(const resumable_state&, const resumable_state&) = default;
  };
  resumable_state resumable() const { return {next_, young_}; }
  /// Throws std::invalid_argument for a next move before `start` or young flags other than 0/1;
  /// young flags whose sizes do not match the allocator's ranks at the next move are reset there.
  void restore(const resumable_state& s) {
    ADALORA_REQUIRE(s.next_move >= o_.start, "rank_redistributor::restore",
                    "next_move must be >= start = ", o_.start, ", got ", s.next_move);
    for (const auto& v : s.young)
      for (std::uint8_t f : v)
        ADALORA_REQUIRE(f <= 1, "rank_redistributor::restore", "young flags must be 0 or 1, got ", int(f));
    next_ = s.next_move;
    young_ = s.young;
  }

  /// Call right after allocator.step(t, ...). Returns the change it applied to the allocator,
  /// or nothing when no move is due (or the scores are not fresh yet).
  template <class Allocator>
  std::optional<rank_change> step(std::int64_t t, Allocator& allocator) {
    const auto& r = allocator.last_result();
    const std::int64_t stop = o_.stop >= 0 ? o_.stop : allocator.schedule().final_phase_start();
    // Growth is refused from the final phase on: the last step that may add is stop − 2 + 1.
    if (t < next_ || t + 1 >= stop || r.step != t || r.action != mask_action::threshold) return {};
    next_ = t + o_.interval;

    const auto shapes = allocator.shapes();
    const std::size_t n = shapes.size();
    if (young_.size() != n) young_.assign(n, {});
    for (std::size_t a = 0; a < n; ++a)
      if (young_[a].size() != static_cast<std::size_t>(shapes[a].rank))
        young_[a].assign(static_cast<std::size_t>(shapes[a].rank), 0);  // changed elsewhere

    // Drops: the `moves` lowest scores among triplets that may go (ties: the later one first).
    struct candidate {
      double score;
      std::size_t adapter;
      index_t index;
    };
    std::vector<candidate> candidates;
    for (std::size_t a = 0; a < n; ++a) {
      const auto s = allocator.triplet_scores(a);
      for (std::size_t i = 0; i < s.size(); ++i)
        if (!young_[a][i]) candidates.push_back({s[i], a, static_cast<index_t>(i)});
    }
    std::stable_sort(candidates.begin(), candidates.end(), [](const candidate& x, const candidate& y) {
      return x.score < y.score ||
             (x.score == y.score && (x.adapter > y.adapter || (x.adapter == y.adapter && x.index > y.index)));
    });
    std::vector<std::vector<std::uint8_t>> keep(n);
    std::vector<index_t> rank(n);
    for (std::size_t a = 0; a < n; ++a) {
      keep[a].assign(static_cast<std::size_t>(shapes[a].rank), 1);
      rank[a] = shapes[a].rank;
    }
    index_t dropped = 0;
    std::vector<candidate> dropped_order;  // weakest first
    for (const candidate& c : candidates) {
      if (dropped == o_.moves) break;
      if (rank[c.adapter] <= o_.min_rank) continue;
      keep[c.adapter][static_cast<std::size_t>(c.index)] = 0;
      dropped_order.push_back(c);
      --rank[c.adapter];
      ++dropped;
    }

    // Adds: as many as dropped, plus what a rising budget asks for, where the policy says.
    growth_view view{shapes, std::vector<std::vector<double>>(n), std::vector<std::vector<std::uint8_t>>(n)};
    for (std::size_t a = 0; a < n; ++a) {
      const auto s = allocator.triplet_scores(a);
      const auto k = allocator.kept_mask(a);
      for (std::size_t i = 0; i < keep[a].size(); ++i)
        if (keep[a][i]) view.scores[a].push_back(s[i]), view.kept[a].push_back(k[i]);
    }
    // A rising budget reaches its target only in the final phase, where nothing can be added:
    // the last move before `stop` also adds what the schedule's target still misses.
    std::int64_t missing = r.missing;
    if (last_move(stop, allocator.schedule()))
      missing = std::max(missing, allocator.schedule().target_budget() - allocator.total_rank());
    const std::vector<index_t> add = policy_(view, dropped + static_cast<index_t>(missing));
    ADALORA_REQUIRE(add.size() == n, "rank_redistributor::step", "the growth policy must return one "
                    "count per adapter, ", n, ", got ", add.size());

    // An adapter that would lose and gain at once keeps its own triplets instead: the policy's
    // count for it is net of its drops (re-kept strongest first, so the weakest still go).
    std::vector<index_t> grow = add;
    for (std::size_t a = 0; a < n; ++a) {
      ADALORA_REQUIRE(add[a] >= 0, "rank_redistributor::step", "the growth policy returned ",
                      add[a], " for adapter ", a, "; counts must be >= 0");
      for (auto c = dropped_order.rbegin(); c != dropped_order.rend() && grow[a] > 0; ++c)
        if (c->adapter == a && !keep[a][static_cast<std::size_t>(c->index)]) {
          keep[a][static_cast<std::size_t>(c->index)] = 1;
          --grow[a];
        }
    }
    rank_change change(n);
    for (std::size_t a = 0; a < n; ++a) {
      change[a] = triplet_map::keeping(keep[a]);
      change[a].source.insert(change[a].source.end(), static_cast<std::size_t>(grow[a]), new_triplet);
    }
    bool moved = false;
    for (const triplet_map& m : change) moved = moved || !m.identity();
    if (!moved) return {};
    allocator.change_rank(change);
    for (std::size_t a = 0; a < n; ++a) {
      young_[a].assign(static_cast<std::size_t>(change[a].new_rank()), 0);
      for (std::size_t i = 0; i < change[a].source.size(); ++i)
        young_[a][i] = change[a].source[i] == new_triplet ? 1 : 0;
    }
    return change;
  }

 private:
  /// True when no later step before `stop` can move (none from next_ on masks).
  template <class Schedule>
  bool last_move(std::int64_t stop, const Schedule& schedule) const {
    for (std::int64_t u = next_; u + 1 < stop; ++u)
      if (schedule.at(u).mask) return false;
    return true;
  }

  redistribution_options o_;
  Policy policy_;
  std::int64_t next_ = 0;
  std::vector<std::vector<std::uint8_t>> young_;  // per adapter: added at the last move
};

}  // namespace adalora
