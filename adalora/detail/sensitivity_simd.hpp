#pragma once
// smoothed_sensitivity's update of eight float elements at once, written with GCC/Clang vector
// extensions (vector_ext.hpp). It is the body of smoothed_sensitivity::update_block, the metric's
// block hook (importance/metric.hpp): nothing else calls it. The generic block in
// score_kernels.hpp, which g++ vectorises by itself, spends most of its time on cross-lane
// shuffles it chooses badly; this one is what lets the allocator's step run near the memory
// bandwidth on one core (docs/algorithm.md §13).
//
// Layout: the state {Ī, Ū} of elements 0..7 is interleaved over 16 floats. Loading its quarters
// as [0..3 | 8..11] and [4..7 | 12..15] lets two in-lane shuffles (`shufps`) split it into Ī and
// Ū in the elements' natural order, and two (`unpck`) interleave it again, stored as 128-bit
// halves: the parameters, gradients and scores need no shuffle at all. (On x86 most shuffles
// share one execution port, which makes them the scarce resource of this loop.)
//
// Every element is computed exactly as smoothed_sensitivity::update computes it (same
// operations, same order, no FMA under -ffp-contract=off), so state and scores are bit-identical.
// The allocator calls the hook only with finite parameters and gradients.

#include <cstring>
#include <limits>

#include "adalora/detail/vector_ext.hpp"

#define ADALORA_SENSITIVITY_SIMD ADALORA_VECTOR_EXTENSIONS

namespace adalora::detail {

#if ADALORA_SENSITIVITY_SIMD

/// Elements [At, At + 4) of x in double. Spelled element by element: g++ 12 lowers
/// __builtin_convertvector from floats to doubles through memory.
template <int At>
[[gnu::always_inline]] inline void widen(const v8f& x, v4d& out) noexcept {
  out = v4d{static_cast<double>(x[At]), static_cast<double>(x[At + 1]),
            static_cast<double>(x[At + 2]), static_cast<double>(x[At + 3])};
}

/// smoothed_sensitivity::update of eight contiguous float elements (parameters p, gradients g,
/// interleaved state st; all finite) with coefficients β1, 1 − β1, β2, 1 − β2: their scores
/// Ī·Ū in double to scores[0, 8).
[[gnu::always_inline]] inline void sensitivity_update(float beta1, float one_minus_beta1,
                                                      float beta2, float one_minus_beta2,
                                                      const float* __restrict p,
                                                      const float* __restrict g,
                                                      float* __restrict st,
                                                      double* __restrict scores) noexcept {
  const v8i magnitude = v8i{} + 0x7fffffff;
  const v8f max = v8f{} + std::numeric_limits<float>::max();
  // Plain broadcasts, which the compiler hoists out of the caller's loop (v8f{} + x would be an
  // addition 0 + x per call: it is not x for x = −0).
  const v8f b1{beta1, beta1, beta1, beta1, beta1, beta1, beta1, beta1};
  const v8f c1{one_minus_beta1, one_minus_beta1, one_minus_beta1, one_minus_beta1,
               one_minus_beta1, one_minus_beta1, one_minus_beta1, one_minus_beta1};
  const v8f b2{beta2, beta2, beta2, beta2, beta2, beta2, beta2, beta2};
  const v8f c2{one_minus_beta2, one_minus_beta2, one_minus_beta2, one_minus_beta2,
               one_minus_beta2, one_minus_beta2, one_minus_beta2, one_minus_beta2};
  v8f w, dw;
  v4f q0, q1, q2, q3;
  std::memcpy(&w, p, sizeof w);
  std::memcpy(&dw, g, sizeof dw);
  std::memcpy(&q0, st, sizeof q0);
  std::memcpy(&q1, st + 4, sizeof q1);
  std::memcpy(&q2, st + 8, sizeof q2);
  std::memcpy(&q3, st + 12, sizeof q3);
  const v8f a = __builtin_shufflevector(q0, q2, 0, 1, 2, 3, 4, 5, 6, 7);  // Ī0 Ū0 Ī1 Ū1 | Ī4 Ū4 Ī5 Ū5
  const v8f b = __builtin_shufflevector(q1, q3, 0, 1, 2, 3, 4, 5, 6, 7);  // Ī2 Ū2 Ī3 Ū3 | Ī6 Ū6 Ī7 Ū7
  const v8f old_ema = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14);
  const v8f old_unc = __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);

  const v8f ipt = reinterpret_cast<v8f>(reinterpret_cast<v8i>(w * dw) & magnitude);
  const v8f e = b1 * old_ema + c1 * ipt;
  const v8f deviation = reinterpret_cast<v8f>(reinterpret_cast<v8i>(ipt - e) & magnitude);
  const v8f u = b2 * old_unc + c2 * deviation;
  // update()'s guard for a product beyond float's range: that element keeps its state.
  const v8i fits = u <= max;
  const v8f ema = fits ? e : old_ema;
  const v8f unc = fits ? u : old_unc;

  const v8f even = __builtin_shufflevector(ema, unc, 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f odd = __builtin_shufflevector(ema, unc, 2, 10, 3, 11, 6, 14, 7, 15);
  const v4f h0 = __builtin_shufflevector(even, even, 0, 1, 2, 3);
  const v4f h1 = __builtin_shufflevector(odd, odd, 0, 1, 2, 3);
  const v4f h2 = __builtin_shufflevector(even, even, 4, 5, 6, 7);
  const v4f h3 = __builtin_shufflevector(odd, odd, 4, 5, 6, 7);
  std::memcpy(st, &h0, sizeof h0);
  std::memcpy(st + 4, &h1, sizeof h1);
  std::memcpy(st + 8, &h2, sizeof h2);
  std::memcpy(st + 12, &h3, sizeof h3);

  // Ī·Ū in double, exact for floats, as smoothed_sensitivity::update returns it.
  v4d e_low, e_high, u_low, u_high;
  widen<0>(ema, e_low);
  widen<4>(ema, e_high);
  widen<0>(unc, u_low);
  widen<4>(unc, u_high);
  const v4d s_low = e_low * u_low, s_high = e_high * u_high;
  std::memcpy(scores, &s_low, sizeof s_low);
  std::memcpy(scores + 4, &s_high, sizeof s_high);
}

#endif  // ADALORA_SENSITIVITY_SIMD

}  // namespace adalora::detail
