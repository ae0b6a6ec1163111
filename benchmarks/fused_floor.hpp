#pragma once
// A minimal fused importance pass, written only to show what one pass over memory reaches on
// this machine: the yardstick for the allocator's step, not a second implementation of it.
//
// It keeps the allocator's data layout and numerics: state interleaved {Ī, Ū} per element (K = 2),
// the f32 EMAs in the references' order (no FMA under -ffp-contract=off), the score Ī·Ū in
// double, the triplet partial sums Σ_j s(A_ij) per row of A, s(E_i), Σ_j s(B_ji) per column of B
// in double in a fixed order, and a non-finite check of every p and g. What it does differently:
//  * the element loop runs in blocks of a compile-time width W = 16 on __restrict pointers, with
//    the metric's coefficients in locals. g++ -O2 (Bazel's -c opt) only vectorizes loops whose
//    trip count is known and that need no runtime alias check (its "very cheap" cost model); a
//    loop over n elements through a metric call on aliasing pointers stays scalar there;
//  * the score is summed in registers (W double lanes) as it is produced: no scratch row written
//    and read back, no second and third pass over it;
//  * the non-finite check is folded into the same block (an OR of exponent tests on the values
//    already loaded), instead of two passes over p and g before the update;
//  * B (out × r, row-major) is walked as ONE flat run of out·r elements per block of rows, its
//    column sums in lcm(r, W) vector lanes, instead of `out` separate runs of r elements (r = 8:
//    a loop of 8 iterations per call, dominated by call and check overhead).

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "adalora/matrix_view.hpp"
#include "adalora/rank_allocator.hpp"

namespace adalora_bench {

template <class T>
class fused_floor {
  static_assert(sizeof(T) == 4, "fused_floor: f32 only (the benchmarks' element type)");

 public:
  static constexpr adalora::index_t W = 16;          // elements per vectorized block
  static constexpr adalora::index_t row_block = 256;  // rows of B summed per column partial

  explicit fused_floor(const std::vector<adalora::adapter_shape>& shapes, double beta1 = 0.85,
                       double beta2 = 0.85)
      : shapes_(shapes),
        c_{static_cast<T>(beta1), static_cast<T>(1.0 - beta1), static_cast<T>(beta2),
           static_cast<T>(1.0 - beta2)} {
    std::size_t elements = 0, triplets = 0;
    for (const auto& s : shapes_) {
      offset_.push_back(elements);
      triplet_.push_back(triplets);
      elements += static_cast<std::size_t>(s.rank * (s.in_features + 1 + s.out_features));
      triplets += static_cast<std::size_t>(s.rank);
    }
    state_.assign(2 * elements, T(0));
    partials_.assign(3 * triplets, 0.0);
  }

  /// Adapters [first, last): the importance update and the three partial sums per triplet.
  /// Returns the number of blocks that held a non-finite p or g (those take the slow path).
  std::int64_t run(const std::vector<adalora::adapter_tensors<T>>& adapters, std::size_t first,
                   std::size_t last) noexcept {
    const std::size_t n = partials_.size() / 3;
    std::int64_t bad = 0;
    for (std::size_t a = first; a < last; ++a) {
      const auto& s = shapes_[a];
      const auto& p = adapters[a].params;
      const auto& g = adapters[a].grads;
      const index_t r = s.rank, in = s.in_features, out = s.out_features;
      T* st = state_.data() + 2 * offset_[a];
      double* pe = partials_.data() + triplet_[a];
      double* pa = pe + n;
      double* pb = pa + n;
      for (index_t i = 0; i < r; ++i)  // A: one contiguous run per row
        pa[i] = run_sum(&p.A(i, 0), &g.A(i, 0), st + 2 * i * in, in, bad);
      st += 2 * r * in;
      for (index_t i = 0; i < r; ++i) pe[i] = run_sum(&p.E[i], &g.E[i], st + 2 * i, 1, bad);
      st += 2 * r;
      std::fill(pb, pb + r, 0.0);  // B: flat runs of row_block rows, then per-column sums
      for (index_t j0 = 0; j0 < out; j0 += row_block) {
        const index_t rows = std::min(row_block, out - j0);
        run_columns(&p.B(j0, 0), &g.B(j0, 0), st + 2 * j0 * r, rows, r, pb, bad);
      }
    }
    return bad;
  }

  std::size_t adapters() const noexcept { return shapes_.size(); }

 private:
  using index_t = adalora::index_t;
  struct coefficients {
    T b1, c1, b2, c2;
  };

  static bool non_finite(T x) noexcept {
    return (std::bit_cast<std::uint32_t>(x) & 0x7f800000u) == 0x7f800000u;
  }

  /// One element, scalar: the slow path for tails and for blocks with a non-finite value
  /// (those keep their state and score from it, as non_finite_policy::ignore_elements does).
  static double one(const coefficients& c, T x, T dx, T* __restrict s) noexcept {
    if (non_finite(x) || non_finite(dx))
      return non_finite(x) ? 0.0 : static_cast<double>(s[0]) * static_cast<double>(s[1]);
    const T ipt = std::abs(x * dx);
    const T e = c.b1 * s[0] + c.c1 * ipt;
    const T u = c.b2 * s[1] + c.c2 * std::abs(ipt - e);
    s[0] = e;
    s[1] = u;
    return static_cast<double>(e) * static_cast<double>(u);
  }

  /// W elements; every loop has the compile-time trip count W and only __restrict pointers, so
  /// g++ -O2 vectorizes it. Returns false (and does nothing) if a value is non-finite.
  static bool block(const coefficients& c, const T* __restrict p, const T* __restrict g,
                    T* __restrict s, double* __restrict out) noexcept {
    std::uint32_t any = 0;
    for (index_t l = 0; l < W; ++l)
      any |= ((std::bit_cast<std::uint32_t>(p[l]) & 0x7f800000u) == 0x7f800000u) |
             ((std::bit_cast<std::uint32_t>(g[l]) & 0x7f800000u) == 0x7f800000u);
    if (any) return false;
    for (index_t l = 0; l < W; ++l) {
      const T ipt = std::abs(p[l] * g[l]);
      const T e = c.b1 * s[2 * l] + c.c1 * ipt;
      const T u = c.b2 * s[2 * l + 1] + c.c2 * std::abs(ipt - e);
      s[2 * l] = e;
      s[2 * l + 1] = u;
      out[l] = static_cast<double>(e) * static_cast<double>(u);
    }
    return true;
  }

  /// Σ of the scores of n contiguous elements: W double lanes, then a fixed tree.
  double run_sum(const T* __restrict p, const T* __restrict g, T* __restrict s, index_t n,
                 std::int64_t& bad) const noexcept {
    const coefficients c = c_;
    double lane[W] = {};
    double blk[W];
    index_t j = 0;
    for (; j + W <= n; j += W) {
      if (!block(c, p + j, g + j, s + 2 * j, blk)) {
        ++bad;
        for (index_t l = 0; l < W; ++l) blk[l] = one(c, p[j + l], g[j + l], s + 2 * (j + l));
      }
      for (index_t l = 0; l < W; ++l) lane[l] += blk[l];
    }
    double tail = 0;
    for (; j < n; ++j) tail += one(c, p[j], g[j], s + 2 * j);
    double sum = 0;
    for (index_t l = 0; l < W; l += 2) sum += lane[l] + lane[l + 1];
    return sum + tail;
  }

  /// rows × r contiguous elements of B, summed per column. Element k of the flat run belongs to
  /// column k mod r; with L = lcm(r, W) lanes, the W elements of a block land in W consecutive
  /// lanes (k mod L), so the column sums are W-wide vector adds too. The L lanes are folded into
  /// the r columns once per block of rows (a fixed order: the same for every thread count).
  void run_columns(const T* __restrict p, const T* __restrict g, T* __restrict s, index_t rows,
                   index_t r, double* __restrict sums, std::int64_t& bad) const noexcept {
    const coefficients c = c_;
    constexpr index_t max_lanes = 1024;
    // lcm(r, W) for W a power of two (r >= 1): r times what W's factor 2s r lacks.
    const index_t low = r & -r;  // largest power of two dividing r
    const index_t lanes = r * (W / std::min(low, W));
    if (lanes > max_lanes) {  // an odd large rank: one row at a time
      for (index_t j = 0; j < rows; ++j)
        for (index_t i = 0; i < r; ++i) sums[i] += one(c, p[j * r + i], g[j * r + i], s + 2 * (j * r + i));
      return;
    }
    double acc[max_lanes];
    std::fill(acc, acc + lanes, 0.0);
    const index_t total = rows * r;
    double blk[W];
    index_t k = 0;
    for (; k + W <= total; k += W) {
      if (!block(c, p + k, g + k, s + 2 * k, blk)) {
        ++bad;
        for (index_t l = 0; l < W; ++l) blk[l] = one(c, p[k + l], g[k + l], s + 2 * (k + l));
      }
      double* __restrict a = acc + k % lanes;
      for (index_t l = 0; l < W; ++l) a[l] += blk[l];
    }
    for (; k < total; ++k) acc[k % lanes] += one(c, p[k], g[k], s + 2 * k);
    for (index_t q = 0; q < lanes; ++q) sums[q % r] += acc[q];
  }

  std::vector<adalora::adapter_shape> shapes_;
  coefficients c_;
  std::vector<std::size_t> offset_, triplet_;
  std::vector<T> state_;  // {Ī, Ū} per element, as the allocator keeps it
  std::vector<double> partials_;
};

}  // namespace adalora_bench
