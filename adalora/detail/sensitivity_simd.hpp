#pragma once
// smoothed_sensitivity's update of eight float elements at once, written with GCC/Clang vector
// extensions (the compiler lowers them to AVX2, SSE2, NEON, ... for the target it builds for;
// no intrinsics, no run-time dispatch). The generic block in score_kernels.hpp, which g++
// vectorises by itself, spends most of its time on cross-lane shuffles it chooses badly and on
// reductions it does not vectorise; this one is what lets the allocator's step run near the
// memory bandwidth on one core (issue 5).
//
// Layout: the state {Ī, Ū} of elements 0..7 is interleaved over 16 floats. Loading its quarters
// as [0..3 | 8..11] and [4..7 | 12..15] lets two in-lane shuffles (`shufps`) split it into Ī and
// Ū in the elements' natural order, and two (`unpck`) interleave it again, stored as 128-bit
// halves: the parameters, gradients and scores need no shuffle at all. (On x86 most shuffles
// share one execution port, which makes them the scarce resource of this loop.)
//
// Every element is computed exactly as smoothed_sensitivity::update computes it (same
// operations, same order, no FMA under -ffp-contract=off), so the state is bit-identical; the
// sums keep eight lanes, lane l taking elements l, l + 8, ... in order, as the generic path does.
//
// Non-finite inputs are not tested per group: for a NaN or infinite parameter or gradient,
// |w·∇w| is NaN or infinite, the update's own overflow guard then keeps the element's state, and
// only the score differs from score_one's (0 for a non-finite parameter) and the element goes
// uncounted. The lanes remember whether any |w·∇w| was not finite; the caller then rescores the
// run from the state (rescore in score_kernels.hpp), which the rare case can afford.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "adalora/detail/prefetch.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ADALORA_SENSITIVITY_SIMD 1
#else
#define ADALORA_SENSITIVITY_SIMD 0
#endif

namespace adalora::detail {

#if ADALORA_SENSITIVITY_SIMD

using v4f = float __attribute__((vector_size(16)));
using v8f = float __attribute__((vector_size(32)));
using v4d = double __attribute__((vector_size(32)));
using v8i = std::int32_t __attribute__((vector_size(32)));

// Vectors are passed by reference throughout: by value their ABI depends on -mavx (-Wpsabi).

/// Elements [At, At + 4) of x in double. Spelled element by element: g++ 12 lowers
/// __builtin_convertvector from floats to doubles through memory.
template <int At>
[[gnu::always_inline]] inline void widen(const v8f& x, v4d& out) noexcept {
  out = v4d{static_cast<double>(x[At]), static_cast<double>(x[At + 1]),
            static_cast<double>(x[At + 2]), static_cast<double>(x[At + 3])};
}

/// β1, 1 − β1, β2, 1 − β2 broadcast once per run (a reference to the metric's scalars would be
/// reloaded after every state store, which may alias them as far as the compiler knows).
struct sensitivity_coefficients {
  v8f b1, c1, b2, c2;
  explicit sensitivity_coefficients(const smoothed_sensitivity::coefficient_set<float>& c) noexcept
      : b1(v8f{} + c.b1), c1(v8f{} + c.c1), b2(v8f{} + c.b2), c2(v8f{} + c.c2) {}
};

/// True iff every lane of m is set (the lanes are all-ones or zero).
[[gnu::always_inline]] inline bool all_lanes(const v8i& m) noexcept {
  bool all = true;
  for (int i = 0; i < 8; ++i) all &= m[i] != 0;
  return all;
}

/// True iff every lane of min is >= 0 (false for NaN).
[[gnu::always_inline]] inline bool nonnegative(const v4d& min) noexcept {
  bool ok = true;
  for (int i = 0; i < 4; ++i) ok &= min[i] >= 0.0;
  return ok;
}

/// True iff every lane of s is finite.
[[gnu::always_inline]] inline bool finite_lanes(const v4d& s) noexcept {
  bool ok = true;
  for (int i = 0; i < 4; ++i) ok &= std::abs(s[i]) <= std::numeric_limits<double>::max();
  return ok;
}

/// The running sums of a run: lanes 0..3 in `low` and 4..7 in `high`, the smallest score so far,
/// and whether every |w·∇w| was finite. The scores were all finite and >= 0 iff the minimum is
/// >= 0 and the lane sums are finite (a NaN or an infinity reaches its lane's sum).
struct sensitivity_lanes {
  v4d low{0, 0, 0, 0};
  v4d high{0, 0, 0, 0};
  v4d min{0, 0, 0, 0};
  v8i finite{-1, -1, -1, -1, -1, -1, -1, -1};

  void unpack(double* lane) const noexcept {
    std::memcpy(lane, &low, sizeof low);
    std::memcpy(lane + 4, &high, sizeof high);
  }
  bool inputs_finite() const noexcept { return all_lanes(finite); }
  bool scores_ok() const noexcept { return nonnegative(min) && finite_lanes(low) && finite_lanes(high); }
};

/// smoothed_sensitivity::update of eight contiguous float elements (parameters p, gradients g,
/// interleaved state st): their scores in s_low (elements 0..3) and s_high (4..7), in double.
/// `finite` keeps, per lane, whether every |w·∇w| so far was finite.
[[gnu::always_inline]] inline void sensitivity_update(const sensitivity_coefficients& c,
                                                      const float* __restrict p,
                                                      const float* __restrict g,
                                                      float* __restrict st, v8i& finite,
                                                      v4d& s_low, v4d& s_high) noexcept {
  const v8i magnitude = v8i{} + 0x7fffffff;
  const v8f max = v8f{} + std::numeric_limits<float>::max();
  prefetch_ahead<8>(p, g, st, 2);
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
  finite &= ipt <= max;  // false for NaN and infinity
  const v8f e = c.b1 * old_ema + c.c1 * ipt;
  const v8f deviation = reinterpret_cast<v8f>(reinterpret_cast<v8i>(ipt - e) & magnitude);
  const v8f u = c.b2 * old_unc + c.c2 * deviation;
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
  s_low = e_low * u_low;
  s_high = e_high * u_high;
}

/// Adds four scores to a running sum and keeps the smallest score so far (NaN is not taken:
/// it reaches the sum).
[[gnu::always_inline]] inline void sensitivity_take(v4d& sum, v4d& min, const v4d& s) noexcept {
  sum += s;
  min = s < min ? s : min;
}

/// sensitivity_update of eight elements into the lanes of a run (and, with Store, their scores
/// written to out[0, 8)).
template <bool Store>
[[gnu::always_inline]] inline void sensitivity_group(const sensitivity_coefficients& c,
                                                     const float* p, const float* g, float* st,
                                                     double* __restrict out,
                                                     sensitivity_lanes& acc) noexcept {
  v4d s_low, s_high;
  sensitivity_update(c, p, g, st, acc.finite, s_low, s_high);
  sensitivity_take(acc.low, acc.min, s_low);
  sensitivity_take(acc.high, acc.min, s_high);
  if constexpr (Store) {
    std::memcpy(out, &s_low, sizeof s_low);
    std::memcpy(out + 4, &s_high, sizeof s_high);
  }
}

#endif  // ADALORA_SENSITIVITY_SIMD

}  // namespace adalora::detail
