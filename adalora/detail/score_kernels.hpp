#pragma once
// The element loops of the rank allocator's single pass over memory: the metric's update (or
// frozen score) of a run of elements, and the fixed-order sums of their scores.
//
// Why the loops look the way they do (each point was measured on the benchmarks of issue 5):
//  * The common case, a contiguous run of finite values, goes through blocks of a compile-time
//    width on __restrict pointers. g++ at -O2 (Bazel's -c opt) only vectorises loops of known
//    trip count that need no runtime alias check (its "very cheap" cost model); a loop over n
//    elements through a metric call on possibly aliasing pointers stays scalar even at -O3.
//  * Each block is tested for NaN/infinity (an OR of exponent tests on values about to be read
//    anyway) before its update, instead of separate passes over the parameters and gradients.
//  * The metric is copied into a local when that is cheap, so that the compiler can see that
//    stores to the state do not change its coefficients.
// Numerics are those of the plain loop: the same metric calls on the same values, the same
// summation order. Only the speed differs.

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

#include "adalora/detail/prefetch.hpp"
#include "adalora/detail/sensitivity_simd.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"

// The fixed-width loops must stay loops until the vectoriser sees them: g++ -O3 fully unrolls
// small constant trip counts first ("cunrolli"), and the unrolled straight-line code then stays
// scalar. And the block functions must be inlined into the run loop (g++ declines for size).
#if defined(__GNUC__) && !defined(__clang__)
#define ADALORA_VECTOR_LOOP _Pragma("GCC unroll 1")
#else
#define ADALORA_VECTOR_LOOP
#endif
#if defined(__GNUC__)
#define ADALORA_INLINE [[gnu::always_inline]] inline
#define ADALORA_INLINE_LAMBDA __attribute__((always_inline))
#else
#define ADALORA_INLINE inline
#define ADALORA_INLINE_LAMBDA
#endif

namespace adalora::detail {

/// What a pass over the elements does: update the state and score (before the final phase),
/// score from the frozen state, or only count non-finite parameters and gradients.
enum class score_pass : std::uint8_t { update, frozen, check };

/// Elements per block of the vectorised loop: two AVX vectors of float, four of double.
inline constexpr index_t vector_block = 16;

template <class T>
bool is_non_finite(T x) noexcept {
  using bits_t = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr auto exponent = static_cast<bits_t>(sizeof(T) == 4 ? 0x7f800000ull : 0x7ff0000000000000ull);
  return (std::bit_cast<bits_t>(x) & exponent) == exponent;
}

/// The metric as the vectorised loop uses it: a copy when trivially copyable and small.
template <class Metric>
using metric_local = std::conditional_t<
    std::is_trivially_copyable_v<Metric> && sizeof(Metric) <= 256, const Metric, const Metric&>;

/// One element, every case handled: a non-finite parameter or gradient leaves the state alone
/// and the element is scored from it (0 for a non-finite parameter). Returns 1 for such an
/// element, else 0; the score goes to out.
template <score_pass Mode, class T, class Metric>
std::int64_t score_one(const Metric& m, tensor_role role, T x, T dx, T* st, double& out) {
  constexpr std::size_t K = Metric::state_size;
  const bool ok = !is_non_finite(x) && (Mode == score_pass::frozen || !is_non_finite(dx));
  if constexpr (Mode == score_pass::update) {
    if (ok) {
      out = static_cast<double>(m.update(role, x, dx, std::span<T, K>(st, K)));
      return 0;
    }
  }
  if constexpr (Mode != score_pass::check)
    out = is_non_finite(x) ? 0.0 : static_cast<double>(m.score(role, x, std::span<const T, K>(st, K)));
  return ok ? 0 : 1;
}

/// score_one for n elements (strides sp and sg): returns how many had a non-finite parameter or
/// gradient. The path for blocks with such values, for tails and for strided runs.
template <score_pass Mode, class T, class Metric>
std::int64_t score_each(const Metric& m, tensor_role role, const T* p, index_t sp, const T* g,
                        index_t sg, T* st, index_t n, double* out) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  std::int64_t bad = 0;
  for (index_t l = 0; l < n; ++l) bad += score_one<Mode>(m, role, p[l * sp], g[l * sg], st + l * K, out[l]);
  return bad;
}

/// vector_block finite elements of a contiguous run: no test, no branch, so it vectorises.
template <score_pass Mode, class T, class Metric>
ADALORA_INLINE void score_block(const Metric& m, tensor_role role, const T* __restrict p, const T* __restrict g,
                 T* __restrict st, double* __restrict out) {
  constexpr std::size_t K = Metric::state_size;
  ADALORA_VECTOR_LOOP
  for (index_t l = 0; l < vector_block; ++l) {
    // The metric sees a copy of the element's state: through a span of st itself g++ loses the
    // __restrict and must assume that a state store may change the next parameter.
    T s[K > 0 ? K : 1];
    T* e = st + l * static_cast<index_t>(K);
    for (std::size_t k = 0; k < K; ++k) s[k] = e[k];
    if constexpr (Mode == score_pass::update) {
      out[l] = static_cast<double>(m.update(role, p[l], g[l], std::span<T, K>(s, K)));
      for (std::size_t k = 0; k < K; ++k) e[k] = s[k];
    } else {
      out[l] = static_cast<double>(m.score(role, p[l], std::span<const T, K>(s, K)));
    }
  }
}

/// True iff the vector_block parameters (and, unless frozen, gradients) are all finite:
/// x − x is +0 for a finite x and NaN otherwise. (A test on the bits, as is_non_finite does,
/// stays scalar: g++ finds no vector type for the bit_cast.)
template <score_pass Mode, class T>
ADALORA_INLINE bool block_finite(const T* __restrict p, const T* __restrict g) noexcept {
  unsigned any = 0;
  ADALORA_VECTOR_LOOP
  for (index_t l = 0; l < vector_block; ++l) {
    any |= static_cast<unsigned>(p[l] - p[l] != T(0));
    if constexpr (Mode != score_pass::frozen) any |= static_cast<unsigned>(g[l] - g[l] != T(0));
  }
  return any == 0;
}

/// True where the hand-vectorised block of sensitivity_simd.hpp applies: the default metric, in
/// float, updating.
template <score_pass Mode, class T, class Metric>
inline constexpr bool uses_sensitivity_simd = ADALORA_SENSITIVITY_SIMD && Mode == score_pass::update &&
                                              std::is_same_v<Metric, smoothed_sensitivity> &&
                                              std::is_same_v<T, float>;

/// Where a run's scores go: summed (a row of A: only the sum is kept) or stored (E and B).
enum class score_sink : std::uint8_t { sum, store };

/// What a run of elements gave: elements with a non-finite parameter or gradient (see
/// score_one), the sum of the scores (score_sink::sum), and whether every score was finite and
/// >= 0 (a metric's contract).
struct run_summary {
  std::int64_t non_finite = 0;
  double sum = 0;
  bool valid = true;
};

/// 1 iff x is not finite and >= 0 (NaN fails both compares), or with MayOverflow (a metric whose
/// scores may exceed double's range, see metric.hpp) iff x is not >= 0: +inf is then a score
/// beyond double. Combined with a non-short-circuit & so that loops over it vectorise; &&
/// compiles to a branch per element.
template <bool MayOverflow = false>
ADALORA_INLINE unsigned invalid_score(double x) noexcept {
  if constexpr (MayOverflow)
    return static_cast<unsigned>(x >= 0.0) ^ 1u;
  else
    return (static_cast<unsigned>(x >= 0.0) & static_cast<unsigned>(x <= std::numeric_limits<double>::max())) ^ 1u;
}

#if ADALORA_SENSITIVITY_SIMD
/// For a run of n elements that sensitivity_group updated while some |w·∇w| was not finite:
/// each element's score as score_one gives it (0 for a non-finite parameter, else Ī·Ū from the
/// state, which the update left alone for a non-finite parameter or gradient), passed in order
/// to take(element, score). Returns the number of elements with a non-finite parameter or
/// gradient.
template <class Take>
std::int64_t rescore(const smoothed_sensitivity& m, tensor_role role, const float* p, const float* g,
                     const float* st, index_t n, Take&& take) {
  constexpr auto K = static_cast<index_t>(smoothed_sensitivity::state_size);
  std::int64_t bad = 0;
  for (index_t e = 0; e < n; ++e) {
    const bool p_bad = is_non_finite(p[e]);
    bad += p_bad || is_non_finite(g[e]) ? 1 : 0;
    take(e, p_bad ? 0.0 : m.score(role, p[e], std::span<const float, 2>(st + e * K, 2)));
  }
  return bad;
}
#endif

/// Scores n elements (parameters p and gradients g with strides sp and sg, their state st, K
/// values each). Sink::store writes the scores to out[0, n); Sink::sum adds them up in a fixed
/// order (eight interleaved lanes over the full groups of eight, the rest in order, then a fixed
/// tree: the same on every machine and for every thread count) without writing them anywhere. In check mode it
/// only counts non-finite elements. One pass: each block of vector_block elements is checked,
/// updated, summed and validated while it is in registers. A sum of valid scores beyond
/// double's range is +inf (never NaN: the scores are >= 0).
template <score_pass Mode, score_sink Sink, class T, class Metric>
run_summary score_run(const Metric& metric, tensor_role role, const T* p, index_t sp, const T* g,
                      index_t sg, T* st, index_t n, double* out) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  constexpr bool scores = Mode != score_pass::check;
  constexpr bool may_overflow = scores_may_overflow<Metric>;
  metric_local<Metric> m = metric;
  run_summary r;
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double tail = 0;
  unsigned invalid = 0;
  double block[vector_block];
  index_t j = 0;
#if ADALORA_SENSITIVITY_SIMD
  // The default metric in float, updating: the hand-vectorised groups (sensitivity_simd.hpp).
  if constexpr (uses_sensitivity_simd<Mode, T, Metric>) {
    if (sp == 1 && sg == 1) {
      constexpr bool store = Sink == score_sink::store;
      const sensitivity_coefficients c(metric.template coefficients<float>());
      sensitivity_lanes acc;
      for (; j + 8 <= n; j += 8) sensitivity_group<store>(c, p + j, g + j, st + j * K, store ? out + j : nullptr, acc);
      if (acc.inputs_finite()) {
        acc.unpack(lane);
        invalid |= acc.scores_ok() ? 0u : 1u;
      } else {
        r.non_finite += rescore(metric, role, p, g, st, j, [&](index_t e, double x) {
          lane[e % 8] += x;
          invalid |= invalid_score(x);
          if constexpr (store) out[e] = x;
        });
      }
    }
  }
#endif
  if (sp == 1 && sg == 1) {
    for (; j + vector_block <= n; j += vector_block) {
      double* o = Sink == score_sink::store ? out + j : block;
      prefetch_ahead<vector_block>(p + j, Mode == score_pass::frozen ? nullptr : g + j,
                                   st + j * K, Mode == score_pass::check ? 0 : K);
      if (block_finite<Mode>(p + j, g + j)) {
        if constexpr (scores) score_block<Mode>(m, role, p + j, g + j, st + j * K, o);
      } else {
        r.non_finite += score_each<Mode>(m, role, p + j, 1, g + j, 1, st + j * K, vector_block, o);
      }
      if constexpr (scores) {
        ADALORA_VECTOR_LOOP
        for (index_t l = 0; l < vector_block; ++l) invalid |= invalid_score<may_overflow>(o[l]);
        if constexpr (Sink == score_sink::sum)
          for (index_t h = 0; h < vector_block; h += 8)
            for (index_t l = 0; l < 8; ++l) lane[l] += o[h + l];
      }
    }
  }
  // The rest (and strided runs) one element at a time, in groups of eight for the sum's order.
  while (j < n) {
    const index_t c = n - j < 8 ? n - j : 8;
    double* o = Sink == score_sink::store ? out + j : block;
    r.non_finite += score_each<Mode>(m, role, p + j * sp, sp, g + j * sg, sg, st + j * K, c, o);
    if constexpr (scores) {
      for (index_t l = 0; l < c; ++l) invalid |= invalid_score<may_overflow>(o[l]);
      if constexpr (Sink == score_sink::sum) {
        if (c == 8)
          for (index_t l = 0; l < 8; ++l) lane[l] += o[l];
        else
          for (index_t l = 0; l < c; ++l) tail += o[l];
      }
    }
    j += c;
  }
  r.sum = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) + tail;
  r.valid = invalid == 0;
  return r;
}

/// The widest rows score_columns takes (its lanes live on the stack).
inline constexpr index_t max_column_kernel_width = 256;

#if ADALORA_SENSITIVITY_SIMD
/// smoothed_sensitivity's update of `rows` contiguous rows of `width` float elements (rows of B,
/// one per output feature, one element per triplet; width a multiple of 4, at most
/// max_column_kernel_width), adding each column's scores to col[i] in row order: the same sums
/// as adding row after row, without writing the scores anywhere. Used where
/// uses_sensitivity_simd holds.
///
/// The column sums live in width / 4 vectors of four ("quads"); the eight scores of each group
/// go to two consecutive quads, cyclically, so that every column is one chain of additions in
/// row order whatever the width. For 8 and 12 columns (r = 8, 12: the common ranks) the quads
/// stay in registers.
inline run_summary score_columns(const smoothed_sensitivity& metric, const float* p,
                                 const float* g, float* st, index_t rows, index_t width,
                                 double* col) {
  constexpr index_t K = smoothed_sensitivity::state_size;
  const sensitivity_coefficients c(metric.coefficients<float>());
  const index_t quads = width / 4;
  const index_t n = rows * width, groups = n / 8;
  v4d sum[max_column_kernel_width / 4];
  for (index_t q = 0; q < quads; ++q) std::memcpy(&sum[q], col + 4 * q, sizeof sum[q]);
  v4d min{0, 0, 0, 0};
  v8i finite = v8i{} - 1;
  auto group = [&](index_t k, v4d& first, v4d& second) ADALORA_INLINE_LAMBDA {
    v4d s_low, s_high;
    sensitivity_update(c, p + 8 * k, g + 8 * k, st + 8 * k * K, finite, s_low, s_high);
    sensitivity_take(first, min, s_low);
    sensitivity_take(second, min, s_high);
  };
  index_t k = 0;
  if (quads == 2) {
    v4d s0 = sum[0], s1 = sum[1];
    for (; k < groups; ++k) group(k, s0, s1);
    sum[0] = s0, sum[1] = s1;
  } else if (quads == 3) {  // three groups make two rows
    v4d s0 = sum[0], s1 = sum[1], s2 = sum[2];
    for (; k + 3 <= groups; k += 3) group(k, s0, s1), group(k + 1, s2, s0), group(k + 2, s1, s2);
    sum[0] = s0, sum[1] = s1, sum[2] = s2;
  }
  // Other widths, and what the loops above left, through the quads in memory. Half-group h
  // (four elements) belongs to quad h mod quads.
  auto next = [quads](index_t x) { return x + 1 == quads ? 0 : x + 1; };
  index_t q = 2 * k % quads;
  for (; k < groups; ++k) {
    const index_t q1 = next(q);
    group(k, sum[q], sum[q1]);
    q = next(q1);
  }
  run_summary r;
  if (n % 8 != 0) {  // four elements left: the end of the last row
    double s[4];
    r.non_finite = score_each<score_pass::update>(metric, tensor_role::B, p + 8 * k, 1, g + 8 * k, 1,
                                                  st + 8 * k * K, 4, s);
    sensitivity_take(sum[q], min, v4d{s[0], s[1], s[2], s[3]});
  }
  if (!all_lanes(finite)) {  // col still holds the sums before this call
    unsigned invalid = 0;
    r.non_finite = rescore(metric, tensor_role::B, p, g, st, n, [&](index_t e, double x) {
      col[e % width] += x;
      invalid |= invalid_score(x);
    });
    r.valid = invalid == 0;
    return r;
  }
  bool ok = nonnegative(min);
  for (index_t i = 0; i < quads; ++i) {
    std::memcpy(col + 4 * i, &sum[i], sizeof sum[i]);
    ok &= finite_lanes(sum[i]);
  }
  r.valid = ok;
  return r;
}
#endif

/// col[i] += s[i] for i < n, in blocks of fixed width (vectorised at -O2 too).
inline void add_scores(double* __restrict col, const double* __restrict s, index_t n) noexcept {
  index_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (index_t l = 0; l < 4; ++l) col[i + l] += s[i + l];
  for (; i < n; ++i) col[i] += s[i];
}

}  // namespace adalora::detail
