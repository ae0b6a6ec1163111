#pragma once
// smoothed_sensitivity's update of 16 float elements at once, written with GCC/Clang vector
// extensions (the compiler lowers them to AVX2, SSE2, NEON, ... for the target it builds for;
// no intrinsics, no run-time dispatch). The generic block in score_kernels.hpp, which g++
// vectorises by itself, spends about half of its time on shuffles it chooses badly (four
// cross-lane permutes to split the interleaved state {Ī, Ū}, four more to put it back) and on
// reductions it does not vectorise; this one is what lets the allocator's step run near the
// memory bandwidth on one core (issue 5).
//
// The trick: within a group of eight elements, work in the order [0 1 4 5 2 3 6 7]. That is the
// order in which in-lane shuffles split the state (two `shufps`) and interleave it again (two
// `unpck`); the parameters and gradients follow with one 64-bit permute each. Every element is
// computed exactly as smoothed_sensitivity::update computes it (same operations, same order,
// no FMA under -ffp-contract=off), so the results are bit-identical; the sums keep eight lanes,
// lane l taking elements l, l + 8, ... in order, as the generic path does.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ADALORA_SENSITIVITY_SIMD 1
#else
#define ADALORA_SENSITIVITY_SIMD 0
#endif

namespace adalora::detail {

#if ADALORA_SENSITIVITY_SIMD

using v8f = float __attribute__((vector_size(32)));
using v4d = double __attribute__((vector_size(32)));
using v8i = std::int32_t __attribute__((vector_size(32)));
using v4l = std::int64_t __attribute__((vector_size(32)));

/// Elements [At, At + 4) of x in double. Spelled element by element: g++ 12 lowers
/// __builtin_convertvector from 4 floats to 4 doubles through memory, two elements at a time.
/// (Vectors are passed by reference throughout: by value their ABI depends on -mavx.)
template <int At>
[[gnu::always_inline]] inline void widen(const v8f& x, v4d& out) noexcept {
  out = v4d{static_cast<double>(x[At]), static_cast<double>(x[At + 1]),
            static_cast<double>(x[At + 2]), static_cast<double>(x[At + 3])};
}

/// The running sums of a run: eight lanes held as lanes (0, 1, 4, 5) and (2, 3, 6, 7), and the
/// smallest score so far. The scores were all finite and >= 0 iff the minimum is >= 0 and the
/// lane sums are finite (a NaN or an infinity reaches its lane's sum): two `min`s per eight
/// scores instead of four compares and four `and`s.
struct sensitivity_lanes {
  v4d low{0, 0, 0, 0};
  v4d high{0, 0, 0, 0};
  v4d min{0, 0, 0, 0};

  /// The eight lanes in their natural order, for the generic path to continue with.
  void unpack(double (&lane)[8]) const noexcept {
    lane[0] = low[0], lane[1] = low[1], lane[4] = low[2], lane[5] = low[3];
    lane[2] = high[0], lane[3] = high[1], lane[6] = high[2], lane[7] = high[3];
  }
  bool all_ok() const noexcept {
    constexpr double max = std::numeric_limits<double>::max();
    bool ok = true;
    for (int i = 0; i < 4; ++i)
      ok &= min[i] >= 0.0 && std::abs(low[i]) <= max && std::abs(high[i]) <= max;
    return ok;
  }
};

/// Adds the scores of one group of eight, given in the order [0 1 4 5] and [2 3 6 7], to the
/// lanes and the minimum, and (Store) stores them in their natural order.
template <bool Store>
[[gnu::always_inline]] inline void sensitivity_take(const v4d& s_low, const v4d& s_high,
                                                    double* __restrict out,
                                                    sensitivity_lanes& acc) noexcept {
  acc.low += s_low;
  acc.high += s_high;
  const v4d m = s_low < s_high ? s_low : s_high;
  acc.min = m < acc.min ? m : acc.min;
  if constexpr (Store) {
    const v4d first = __builtin_shufflevector(s_low, s_high, 0, 1, 4, 5);
    const v4d second = __builtin_shufflevector(s_low, s_high, 2, 3, 6, 7);
    std::memcpy(out, &first, sizeof first);
    std::memcpy(out + 4, &second, sizeof second);
  }
}

/// Eight scores computed elsewhere (the element-wise path), in their natural order, taken into
/// the lanes as sensitivity_take takes the vector path's.
[[gnu::always_inline]] inline void sensitivity_take_scalar(const double* __restrict s,
                                                           sensitivity_lanes& acc) noexcept {
  v4d first, second;
  std::memcpy(&first, s, sizeof first);
  std::memcpy(&second, s + 4, sizeof second);
  const v4d low = __builtin_shufflevector(first, second, 0, 1, 4, 5);
  const v4d high = __builtin_shufflevector(first, second, 2, 3, 6, 7);
  sensitivity_take<false>(low, high, nullptr, acc);
}

/// smoothed_sensitivity::update of 16 contiguous float elements (parameters p, gradients g,
/// interleaved state st), the scores of the first eight taken into acc0 and of the last eight
/// into acc1 as sensitivity_take says (and stored to out[0, 16) with Store). Returns false, having written nothing, if some |p·g| is
/// not finite (a NaN or infinite parameter or gradient, or a product beyond float's range): the
/// caller then takes the element-wise path for the block.
template <bool Store>
[[gnu::always_inline]] inline bool sensitivity_block(const smoothed_sensitivity::coefficient_set<float>& c,
                                                     const float* __restrict p,
                                                     const float* __restrict g,
                                                     float* __restrict st, double* __restrict out,
                                                     sensitivity_lanes& acc0,
                                                     sensitivity_lanes& acc1) noexcept {
  constexpr float max = std::numeric_limits<float>::max();
  const v8i magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                         0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  v8f ema[2], unc[2];
  v8i ok = {-1, -1, -1, -1, -1, -1, -1, -1};
  for (int h = 0; h < 2; ++h) {
    v8f pv, gv, first, second;
    std::memcpy(&pv, p + 8 * h, sizeof pv);
    std::memcpy(&gv, g + 8 * h, sizeof gv);
    std::memcpy(&first, st + 16 * h, sizeof first);
    std::memcpy(&second, st + 16 * h + 8, sizeof second);
    // Elements in the order [0 1 4 5 2 3 6 7].
    const v8f pp = __builtin_shufflevector(pv, pv, 0, 1, 4, 5, 2, 3, 6, 7);
    const v8f gg = __builtin_shufflevector(gv, gv, 0, 1, 4, 5, 2, 3, 6, 7);
    const v8f old_ema = __builtin_shufflevector(first, second, 0, 2, 8, 10, 4, 6, 12, 14);
    const v8f old_unc = __builtin_shufflevector(first, second, 1, 3, 9, 11, 5, 7, 13, 15);
    const v8f ipt = reinterpret_cast<v8f>(reinterpret_cast<v8i>(pp * gg) & magnitude);
    ok &= ipt <= max;  // false for NaN and infinity
    const v8f e = c.b1 * old_ema + c.c1 * ipt;
    const v8f deviation = reinterpret_cast<v8f>(reinterpret_cast<v8i>(ipt - e) & magnitude);
    const v8f u = c.b2 * old_unc + c.c2 * deviation;
    const v8i fits = u <= max;
    ema[h] = fits ? e : old_ema;
    unc[h] = fits ? u : old_unc;
  }
  std::int64_t all[4];
  std::memcpy(all, &ok, sizeof all);
  if ((all[0] & all[1] & all[2] & all[3]) != -1) return false;

  for (int h = 0; h < 2; ++h) {
    const v8f first = __builtin_shufflevector(ema[h], unc[h], 0, 8, 1, 9, 4, 12, 5, 13);
    const v8f second = __builtin_shufflevector(ema[h], unc[h], 2, 10, 3, 11, 6, 14, 7, 15);
    std::memcpy(st + 16 * h, &first, sizeof first);
    std::memcpy(st + 16 * h + 8, &second, sizeof second);
    // Ī·Ū in double, exact for floats, as smoothed_sensitivity::update returns it.
    v4d e_low, e_high, u_low, u_high;
    widen<0>(ema[h], e_low);
    widen<4>(ema[h], e_high);
    widen<0>(unc[h], u_low);
    widen<4>(unc[h], u_high);
    const v4d s_low = e_low * u_low;
    const v4d s_high = e_high * u_high;
    sensitivity_take<Store>(s_low, s_high, out + 8 * h, h == 0 ? acc0 : acc1);
  }
  return true;
}

#endif  // ADALORA_SENSITIVITY_SIMD

}  // namespace adalora::detail
