// A metric's block hook (update_block, importance/metric.hpp requirements 6 and 7) changes the
// speed of the allocator's step, never its results: a user metric with the hook gives, bit for
// bit, the state, triplet scores, masks, thresholds and non-finite counts of the same metric
// without it (the allocator's generic element loop). In float and double; for state sizes 0, 1
// and 2; with and without update_block_keeps_non_finite_state (the NaN/infinity test made before
// the hook, or alongside it with a rescore); on runs shorter than a block and with tails, B rows
// of widths that are and are not multiples of 4 (the column kernel), strided (column-major)
// views, NaN, infinities, products beyond the type's range and sums that overflow (which the
// cheap finiteness tests report as non-finite); with one and two threads. Also: which types the
// concept takes for a hook and which it refuses.

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/rank_allocator.hpp"
#include "tests/allocator_fixtures.hpp"

namespace {

using adalora::index_t;
using adalora::tensor_role;

template <class T>
bool finite(T x) {
  return x - x == T(0);
}

// ---- the metrics: each one without the hook, with it, and with it and the declaration ----------

/// Fisher saliency w²·EMA(g²) with an overflow guard (an EMA beyond T's range keeps its old
/// value), scored in double. state_size 1.
struct fisher {
  static constexpr std::size_t state_size = 1;
  static constexpr bool scores_may_overflow = true;  // w² · F in double may pass DBL_MAX in double

  template <class T>
  double update(tensor_role, T p, T g, std::span<T, 1> s) const {
    const T f = static_cast<T>(0.9) * s[0] + static_cast<T>(1.0 - 0.9) * (g * g);
    s[0] = f <= std::numeric_limits<T>::max() ? f : s[0];
    return score(tensor_role::A, p, std::span<const T, 1>(s.data(), 1));
  }
  template <class T>
  double score(tensor_role, T p, std::span<const T, 1> s) const {
    // w · (w · F): never ∞ · 0 (a huge w with F = 0 scores 0; beyond double it is +inf).
    const double w = static_cast<double>(p);
    return w * (w * static_cast<double>(s[0]));
  }
};
/// The hook as a plain loop over the block (what g++ vectorises for a one-value state). It also
/// keeps the state of an element with a NaN or infinite param or grad, so that the declaration
/// below is true.
struct fisher_hook : fisher {
  template <class T>
  void update_block(tensor_role role, std::span<const T, 8> p, std::span<const T, 8> g,
                    std::span<T, 8> s, std::span<double, 8> out) const {
    for (std::size_t l = 0; l < 8; ++l) {
      const T f = static_cast<T>(0.9) * s[l] + static_cast<T>(1.0 - 0.9) * (g[l] * g[l]);
      const bool keep = f <= std::numeric_limits<T>::max() && finite(p[l]);
      s[l] = keep ? f : s[l];
      out[l] = score(role, p[l], std::span<const T, 1>(&s[l], 1));
    }
  }
};
struct fisher_hook_keeps : fisher_hook {
  static constexpr bool update_block_keeps_non_finite_state = true;
};

/// AdaLoRA's smoothed sensitivity (state {Ī, Ū}), as in smoothed_sensitivity.hpp. state_size 2.
struct sensitivity2 {
  static constexpr std::size_t state_size = 2;
  static constexpr bool scores_may_overflow = true;

  template <class T>
  double update(tensor_role, T p, T g, std::span<T, 2> s) const {
    const T b = static_cast<T>(0.85), c = static_cast<T>(1.0 - 0.85);
    const T ipt = std::abs(p * g);
    const T ema = b * s[0] + c * ipt;
    const T unc = b * s[1] + c * std::abs(ipt - ema);
    const bool fits = unc <= std::numeric_limits<T>::max();
    s[0] = fits ? ema : s[0];
    s[1] = fits ? unc : s[1];
    return static_cast<double>(s[0]) * static_cast<double>(s[1]);
  }
  template <class T>
  double score(tensor_role, T, std::span<const T, 2> s) const {
    return static_cast<double>(s[0]) * static_cast<double>(s[1]);
  }
};
/// The hook as a loop over the block's elements on their interleaved state: the guard keeps the
/// state of non-finite elements, as update()'s does.
struct sensitivity2_hook : sensitivity2 {
  template <class T>
  void update_block(tensor_role role, std::span<const T, 8> p, std::span<const T, 8> g,
                    std::span<T, 16> s, std::span<double, 8> out) const {
    for (std::size_t l = 0; l < 8; ++l) out[l] = update(role, p[l], g[l], std::span<T, 2>(&s[2 * l], 2));
  }
};
struct sensitivity2_hook_keeps : sensitivity2_hook {
  static constexpr bool update_block_keeps_non_finite_state = true;
};

/// |w| for every element, no state (state_size 0; magnitude.hpp's parameter_magnitude).
struct abs_param {
  static constexpr std::size_t state_size = 0;
  template <class T>
  T update(tensor_role, T p, T, std::span<T, 0>) const {
    return std::abs(p);
  }
  template <class T>
  T score(tensor_role, T p, std::span<const T, 0>) const {
    return std::abs(p);
  }
};
struct abs_param_hook : abs_param {
  template <class T>
  void update_block(tensor_role, std::span<const T, 8> p, std::span<const T, 8>, std::span<T, 0>,
                    std::span<double, 8> out) const {
    for (std::size_t l = 0; l < 8; ++l) out[l] = static_cast<double>(std::abs(p[l]));
  }
};
struct abs_param_hook_keeps : abs_param_hook {  // no state: nothing to keep
  static constexpr bool update_block_keeps_non_finite_state = true;
};

static_assert(!adalora::detail::has_update_block<fisher, float>);
static_assert(adalora::detail::has_update_block<fisher_hook, float>);
static_assert(adalora::detail::has_update_block<fisher_hook, double>);
static_assert(adalora::detail::has_update_block<sensitivity2_hook_keeps, double>);
static_assert(adalora::detail::has_update_block<abs_param_hook, double>);
static_assert(adalora::detail::block_keeps_non_finite_state<fisher_hook_keeps>);
static_assert(!adalora::detail::block_keeps_non_finite_state<fisher_hook>);

// ---- what the concept takes for a hook ---------------------------------------------------------

struct hook_for_float_only : fisher {
  void update_block(tensor_role, std::span<const float, 8>, std::span<const float, 8>,
                    std::span<float, 8>, std::span<double, 8>) const {}
};
struct hook_wrong_state_extent : fisher {
  void update_block(tensor_role, std::span<const float, 8>, std::span<const float, 8>,
                    std::span<float, 16>, std::span<double, 8>) const {}
};
struct hook_not_const : fisher {
  void update_block(tensor_role, std::span<const float, 8>, std::span<const float, 8>,
                    std::span<float, 8>, std::span<double, 8>) {}
};
struct hook_scores_in_float : fisher {
  void update_block(tensor_role, std::span<const float, 8>, std::span<const float, 8>,
                    std::span<float, 8>, std::span<float, 8>) const {}
};
struct hook_returns_a_value : fisher {
  bool update_block(tensor_role, std::span<const float, 8>, std::span<const float, 8>,
                    std::span<float, 8>, std::span<double, 8>) const {
    return true;
  }
};
// A hook for some element types only is a hook: the others take the generic path.
static_assert(adalora::ImportanceMetric<hook_for_float_only, float>);
static_assert(adalora::ImportanceMetric<hook_for_float_only, double>);
static_assert(!adalora::detail::has_update_block<hook_for_float_only, double>);
// A member named update_block that is not the hook is refused, rather than silently not used.
static_assert(!adalora::ImportanceMetric<hook_wrong_state_extent, float>);
static_assert(!adalora::ImportanceMetric<hook_not_const, float>);
static_assert(!adalora::ImportanceMetric<hook_scores_in_float, float>);
static_assert(!adalora::ImportanceMetric<hook_returns_a_value, float>);

// ---- the runs ----------------------------------------------------------------------------------


using fixtures::every_step;
using fixtures::storage;

/// Values of a model in training; with `hostile`, about one value in 200 is NaN, ±infinity, a
/// pair whose product overflows T, or a pair whose sum overflows T (finite values that the
/// allocator's cheap finiteness tests report as non-finite).
template <class T>
void fill(std::vector<storage<T>>& s, std::mt19937& rng, bool hostile) {
  std::normal_distribution<double> w(0.0, 0.05), dw(0.0, 1e-3);
  std::uniform_int_distribution<int> pick(0, 199);
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr T big = std::numeric_limits<T>::max() / 2 * T(1.5);  // big + big overflows
  const T huge_p = static_cast<T>(std::sqrt(static_cast<double>(std::numeric_limits<T>::max())) * 4);
  for (auto& a : s)
    for (auto [x, dx] : {std::pair{&a.A, &a.gA}, std::pair{&a.E, &a.gE}, std::pair{&a.B, &a.gB}})
      for (std::size_t i = 0; i < x->size(); ++i) {
        (*x)[i] = static_cast<T>(w(rng));
        (*dx)[i] = static_cast<T>(dw(rng));
        if (!hostile) continue;
        switch (pick(rng)) {
          case 0: (*x)[i] = std::numeric_limits<T>::quiet_NaN(); break;
          case 1: (*dx)[i] = -inf; break;
          case 2: (*x)[i] = huge_p, (*dx)[i] = -huge_p; break;  // |p·g| beyond T
          case 3: (*dx)[i] = std::numeric_limits<T>::quiet_NaN(); break;
          case 4: (*x)[i] = inf; break;
          case 5: (*x)[i] = big, (*dx)[i] = big; break;  // p + g beyond T
          default: break;
        }
      }
}

/// Everything a step leaves behind, as bits.
struct record {
  std::vector<std::uint64_t> state, scores;
  std::vector<std::uint8_t> kept;
  std::int64_t non_finite = 0;
  std::uint64_t threshold = 0;
  bool operator==(const record&) const = default;
};

template <class T, class Metric>
std::vector<record> run(bool col_major, bool hostile, unsigned threads) {
  // in: runs below, at and around the 8-element groups, the 64-element chunks and the
  // 256-element sum blocks; r (the width of B's rows): multiples of 4 (the column kernel, 8 and
  // 12 in registers) and not; out: below and across a 256-row block and its 24-group chunks.
  const std::vector<adalora::adapter_shape> shapes = {
      {"a", 300, 257, 8}, {"b", 16, 33, 16}, {"c", 17, 19, 24}, {"d", 520, 40, 12},
      {"e", 15, 263, 36}, {"f", 31, 7, 5},   {"g", 1, 1, 3},    {"h", 200, 260, 20},
      {"i", 40, 9, 8},    {"j", 33, 300, 1}, {"k", 20, 13, 12}, {"l", 9, 11, 4},
      {"m", 24, 301, 12}, {"n", 8, 5, 20},   {"o", 64, 70, 8},  {"p", 129, 2, 4}};
  std::int64_t b0 = 0;
  for (const auto& s : shapes) b0 += s.rank;
  std::vector<storage<T>> data;
  for (const auto& sh : shapes) data.emplace_back(sh, col_major);
  adalora::allocator_options options;
  options.threads = threads;
  adalora::rank_allocator<T, Metric, every_step> alloc(shapes, every_step{b0}, Metric{}, options);
  std::mt19937 rng(2024);
  std::vector<record> out;
  for (std::int64_t t = 0; t < 3; ++t) {
    fill(data, rng, hostile);
    std::vector<adalora::adapter_tensors<T>> views;
    for (auto& a : data) views.push_back(a.tensors());
    const auto& r = alloc.step(t, views);
    const auto s = alloc.resumable();
    record rec;
    for (T x : s.metric_state) rec.state.push_back(std::bit_cast<std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>(x));
    for (double x : s.scores) rec.scores.push_back(std::bit_cast<std::uint64_t>(x));
    rec.kept.assign(s.kept.begin(), s.kept.end());
    rec.non_finite = r.non_finite;
    rec.threshold = std::bit_cast<std::uint64_t>(r.threshold);
    out.push_back(std::move(rec));
  }
  return out;
}

template <class T, class Plain, class Hooked>
void check_same_results(const char* name) {
  for (bool col_major : {false, true})
    for (bool hostile : {false, true})
      for (unsigned threads : {1u, 2u}) {
        if (threads == 2 && (col_major || !hostile)) continue;  // two threads: one run is enough
        INFO(name << (sizeof(T) == 4 ? ", float" : ", double") << (col_major ? ", column-major" : ", row-major")
                  << (hostile ? ", with NaN, infinities and overflows" : "") << ", threads " << threads);
        const auto want = run<T, Plain>(col_major, hostile, threads);
        const auto got = run<T, Hooked>(col_major, hostile, threads);
        REQUIRE(want.size() == got.size());
        for (std::size_t t = 0; t < want.size(); ++t) {
          INFO("step " << t);
          CHECK(got[t].state == want[t].state);
          CHECK(got[t].scores == want[t].scores);
          CHECK(got[t].kept == want[t].kept);
          CHECK(got[t].non_finite == want[t].non_finite);
          CHECK(got[t].threshold == want[t].threshold);
          if (hostile) CHECK(want[t].non_finite > 0);
        }
      }
}

}  // namespace

TEMPLATE_TEST_CASE("a metric's block hook gives the results of the generic loop bit for bit",
                   "[allocator][kernels][hook]", float, double) {
  using T = TestType;
  check_same_results<T, fisher, fisher_hook>("fisher (state 1), hook tested before");
  check_same_results<T, fisher, fisher_hook_keeps>("fisher (state 1), hook keeps non-finite state");
  check_same_results<T, sensitivity2, sensitivity2_hook>("sensitivity (state 2), hook tested before");
  check_same_results<T, sensitivity2, sensitivity2_hook_keeps>("sensitivity (state 2), hook keeps non-finite state");
  check_same_results<T, abs_param, abs_param_hook>("|w| (no state), hook tested before");
  check_same_results<T, abs_param, abs_param_hook_keeps>("|w| (no state), hook keeps non-finite state");
}
