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
#else
#define ADALORA_INLINE inline
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

/// 1 iff x is not finite and >= 0 (NaN fails both compares). Combined with a non-short-circuit
/// & so that loops over it vectorise; && compiles to a branch per element.
ADALORA_INLINE unsigned invalid_score(double x) noexcept {
  return (static_cast<unsigned>(x >= 0.0) & static_cast<unsigned>(x <= std::numeric_limits<double>::max())) ^ 1u;
}

/// Scores n elements (parameters p and gradients g with strides sp and sg, their state st, K
/// values each). Sink::store writes the scores to out[0, n); Sink::sum adds them up in a fixed
/// order (eight interleaved lanes over the full groups of eight, the rest in order, then a fixed
/// tree: the same on every machine and for every thread count) without writing them anywhere. In check mode it
/// only counts non-finite elements. One pass: each block of vector_block elements is checked,
/// updated, summed and validated while it is in registers.
template <score_pass Mode, score_sink Sink, class T, class Metric>
run_summary score_run(const Metric& metric, tensor_role role, const T* p, index_t sp, const T* g,
                      index_t sg, T* st, index_t n, double* out) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  constexpr bool scores = Mode != score_pass::check;
  metric_local<Metric> m = metric;
  run_summary r;
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double tail = 0;
  unsigned invalid = 0;
  double block[vector_block];
  index_t j = 0;
#if ADALORA_SENSITIVITY_SIMD
  // The default metric in float, updating: the hand-vectorised block (sensitivity_simd.hpp).
  if constexpr (uses_sensitivity_simd<Mode, T, Metric>) {
    if (sp == 1 && sg == 1) {
      constexpr bool store = Sink == score_sink::store;
      const auto& c = metric.template coefficients<float>();
      sensitivity_lanes acc;
      for (; j + vector_block <= n; j += vector_block) {
        double* o = store ? out + j : block;
        if (sensitivity_block<store>(c, p + j, g + j, st + j * K, o, acc, acc)) continue;
        r.non_finite += score_each<Mode>(m, role, p + j, 1, g + j, 1, st + j * K, vector_block, o);
        sensitivity_take_scalar(o, acc);
        sensitivity_take_scalar(o + 8, acc);
      }
      acc.unpack(lane);
      invalid |= acc.all_ok() ? 0u : 1u;
    }
  }
#endif
  if (sp == 1 && sg == 1) {
    for (; j + vector_block <= n; j += vector_block) {
      double* o = Sink == score_sink::store ? out + j : block;
      if (block_finite<Mode>(p + j, g + j)) {
        if constexpr (scores) score_block<Mode>(m, role, p + j, g + j, st + j * K, o);
      } else {
        r.non_finite += score_each<Mode>(m, role, p + j, 1, g + j, 1, st + j * K, vector_block, o);
      }
      if constexpr (scores) {
        ADALORA_VECTOR_LOOP
        for (index_t l = 0; l < vector_block; ++l) invalid |= invalid_score(o[l]);
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
      for (index_t l = 0; l < c; ++l) invalid |= invalid_score(o[l]);
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
/// smoothed_sensitivity's update of `rows` contiguous rows of `width` float elements (width a
/// multiple of 8, at most max_column_kernel_width: rows of B, one per output feature, one
/// element per triplet), adding each column's scores to col[i] in row order: the same sums as
/// adding row after row, without writing the scores anywhere. Used where
/// uses_sensitivity_simd holds.
inline run_summary score_columns(const smoothed_sensitivity& metric, const float* p,
                                 const float* g, float* st, index_t rows, index_t width,
                                 double* col) {
  constexpr index_t K = smoothed_sensitivity::state_size;
  const auto& c = metric.coefficients<float>();
  const index_t groups = width / 8;  // eight columns each; group q of a row sums into acc[q]
  sensitivity_lanes acc[max_column_kernel_width / 8];
  for (index_t q = 0; q < groups; ++q) {  // the lanes start from col, in their order
    const double* c0 = col + 8 * q;
    acc[q].low = v4d{c0[0], c0[1], c0[4], c0[5]};
    acc[q].high = v4d{c0[2], c0[3], c0[6], c0[7]};
  }
  run_summary r;
  double scores[vector_block];
  const index_t n = rows * width;
  index_t k = 0, q = 0;  // element k starts group q of its row
  auto next = [groups](index_t x) { return x + 1 == groups ? 0 : x + 1; };
  for (; k + vector_block <= n; k += vector_block) {
    const index_t q1 = next(q);
    if (!sensitivity_block<false>(c, p + k, g + k, st + k * K, nullptr, acc[q], acc[q1])) {
      r.non_finite += score_each<score_pass::update>(metric, tensor_role::B, p + k, 1, g + k, 1,
                                                     st + k * K, vector_block, scores);
      sensitivity_take_scalar(scores, acc[q]);
      sensitivity_take_scalar(scores + 8, acc[q1]);
    }
    q = next(q1);
  }
  if (k < n) {  // one group of eight left (an odd number of rows of width 8·odd)
    r.non_finite += score_each<score_pass::update>(metric, tensor_role::B, p + k, 1, g + k, 1,
                                                   st + k * K, 8, scores);
    sensitivity_take_scalar(scores, acc[q]);
  }
  bool ok = true;
  for (index_t g8 = 0; g8 < groups; ++g8) {
    double lane[8];
    acc[g8].unpack(lane);
    for (index_t l = 0; l < 8; ++l) col[8 * g8 + l] = lane[l];
    ok &= acc[g8].all_ok();
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
