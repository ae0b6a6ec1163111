#pragma once
// The adapter's products at small rank (r <= thin_rank_limit), register-blocked on Eigen's
// packet math (AVX, SSE, NEON, ... with FMA where the target has it), for
// eigen_adapter_kernels.hpp.
//
// Why not Eigen's GEMM there: every product of the adapter is thin (one of its dimensions is r),
// and Eigen's GEMM packs the large operand (x or dy: n × 768 at the DeBERTa shape) into its own
// layout for each product and then runs register blocks of 4 columns, mostly empty at r = 6:
// halving the rank from 12 to 6 saved only ~25% of the backward (adapter_pair benchmark). These kernels read the
// large operands in place, row-major, with register blocks sized for a thin r:
//   dots      H = scale · X · Wᵀ     blocks of 4 rows of X × 3 rows of W, along the rows  (h, dh)
//   outer     O += Hᵀ · X            blocks of 2 packets of X × 6 columns of H, over rows (dB, d(A⊙E))
//   combine   Y += H · W             per row of Y, up to 8 rows of W at a time          (y, dx)
// (X, Y: n rows of the batch; W, O: r × len, row-major; H: n × r, row-major.)
// Sums are blocked (one partial sum per packet lane), like Eigen's: agreement with the portable
// kernels within the tolerances of tests/eigen_kernels_test.cpp, not bit parity.

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>

#include "adalora/integrations/eigen_dense.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora::detail::eigen_thin {

/// The largest rank these kernels take; above it Eigen's GEMM is efficient.
inline constexpr index_t thin_rank_limit = 16;

/// Rows per block when several products run over the same rows of the batch (the backward):
/// the block's rows of two tensors of `width` columns in all take about 512 KB, well inside the
/// L2 caches of current cores (1-2 MB), so the products after the first read them from there.
/// A multiple of the dot products' 4-row register blocks, at least 4. (Measured at the DeBERTa
/// shape, 768 + 768 columns: blocks of 32 to 128 rows all gave the same ~10%; at 4096 + 4096,
/// 16 rows did, 64 did not.)
template <class T>
constexpr index_t row_block(index_t width) noexcept {
  constexpr index_t bytes = index_t{512} << 10;
  const index_t rows = bytes / (std::max<index_t>(width, 1) * static_cast<index_t>(sizeof(T)));
  return std::max<index_t>(rows / 4 * 4, 4);
}

using eigen_kernels::lanes;
using eigen_kernels::packet;
using eigen_kernels::with_size;

/// acc[i][j] += x_i[k, k + L) · w_j[k, k + L) lane by lane for k = k0, k0 + L, … < k1 (a multiple
/// of L from k0), x_i = x + i · ldx, w_j = w + j · ldw: each lane a sequential sum over k.
template <index_t MI, index_t CJ, class T>
inline void dot_packets(const T* x, index_t ldx, const T* w, index_t ldw, index_t k0, index_t k1,
                        packet<T> (&acc)[MI][CJ]) noexcept {
  using P = packet<T>;
  namespace ei = Eigen::internal;
  for (index_t k = k0; k < k1; k += lanes<T>) {
    P wk[CJ];
    for (index_t j = 0; j < CJ; ++j) wk[j] = ei::ploadu<P>(w + j * ldw + k);
    for (index_t i = 0; i < MI; ++i) {
      const P xk = ei::ploadu<P>(x + i * ldx + k);
      for (index_t j = 0; j < CJ; ++j) acc[i][j] = ei::pmadd(xk, wk[j], acc[i][j]);
    }
  }
}

/// h[i · r + j] = scale · Σ_k x_i[k] · w_j[k] for the MI rows x_i = x + i · ldx and the CJ rows
/// w_j = w + j · ldw, over len.
template <index_t MI, index_t CJ, class T>
void dot_block(const T* x, index_t ldx, const T* w, index_t ldw, index_t len, T scale, T* h,
               index_t r) noexcept {
  using P = packet<T>;
  namespace ei = Eigen::internal;
  constexpr index_t L = lanes<T>;
  const index_t body = len / L * L;
  P acc[MI][CJ];
  for (index_t i = 0; i < MI; ++i)
    for (index_t j = 0; j < CJ; ++j) acc[i][j] = ei::pset1<P>(T(0));
  dot_packets<MI, CJ>(x, ldx, w, ldw, 0, body, acc);
  for (index_t i = 0; i < MI; ++i)
    for (index_t j = 0; j < CJ; ++j) {
      T s = ei::predux(acc[i][j]);
      for (index_t k = body; k < len; ++k) s += x[i * ldx + k] * w[j * ldw + k];
      h[i * r + j] = scale * s;
    }
}

/// h (n × r, row-major) = scale · x · wᵀ, x: n rows of len (row stride ldx), w: r × len.
template <class T>
void dots(const T* x, index_t ldx, index_t n, const T* w, index_t r, index_t len, T scale,
          T* h) noexcept {
  constexpr index_t rows = 4, cols = 3;
  for (index_t i0 = 0; i0 < n; i0 += rows)
    with_size<rows>(n - i0, [&](auto mi) {
      for (index_t j0 = 0; j0 < r; j0 += cols)
        with_size<cols>(r - j0, [&](auto cj) {
          dot_block<decltype(mi)::value, decltype(cj)::value>(x + i0 * ldx, ldx, w + j0 * len, len,
                                                              len, scale, h + i0 * r + j0, r);
        });
    });
}

/// o[j · len + k] += Σ_i h[i · r + j0 + j] · x_i[k] for j < CJ and the U · L columns k from k0,
/// over the n rows x_i = x + i · ldx.
template <index_t U, index_t CJ, class T>
void outer_block(const T* x, index_t ldx, index_t n, const T* h, index_t r, index_t j0,
                 index_t k0, T* o, index_t len) noexcept {
  using P = packet<T>;
  namespace ei = Eigen::internal;
  constexpr index_t L = lanes<T>;
  P acc[U][CJ];
  for (index_t u = 0; u < U; ++u)
    for (index_t j = 0; j < CJ; ++j) acc[u][j] = ei::ploadu<P>(o + (j0 + j) * len + k0 + u * L);
  for (index_t i = 0; i < n; ++i) {
    P xi[U];
    for (index_t u = 0; u < U; ++u) xi[u] = ei::ploadu<P>(x + i * ldx + k0 + u * L);
    const T* hi = h + i * r + j0;
    for (index_t j = 0; j < CJ; ++j) {
      const P c = ei::pset1<P>(hi[j]);
      for (index_t u = 0; u < U; ++u) acc[u][j] = ei::pmadd(xi[u], c, acc[u][j]);
    }
  }
  for (index_t u = 0; u < U; ++u)
    for (index_t j = 0; j < CJ; ++j) ei::pstoreu(o + (j0 + j) * len + k0 + u * L, acc[u][j]);
}

/// o (r × len, row-major) += hᵀ · x, x: n rows of len (row stride ldx), h: n × r.
template <class T>
void outer(const T* x, index_t ldx, index_t n, const T* h, index_t r, index_t len, T* o) noexcept {
  constexpr index_t L = lanes<T>, cols = 6;
  index_t k0 = 0;
  auto columns = [&](auto u) {
    constexpr index_t U = decltype(u)::value;
    for (index_t j0 = 0; j0 < r; j0 += cols)
      with_size<cols>(r - j0, [&](auto cj) {
        outer_block<U, decltype(cj)::value>(x, ldx, n, h, r, j0, k0, o, len);
      });
  };
  for (; k0 + 2 * L <= len; k0 += 2 * L) columns(std::integral_constant<index_t, 2>{});
  for (; k0 + L <= len; k0 += L) columns(std::integral_constant<index_t, 1>{});
  for (; k0 < len; ++k0)  // the last len % L columns
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < r; ++j) o[j * len + k0] += h[i * r + j] * x[i * ldx + k0];
}

/// y_i += Σ_j h[i · r + j] · w_j for the n rows y_i = y + i · ldy, w: r × len.
template <class T>
void combine(T* y, index_t ldy, index_t n, const T* h, const T* w, index_t r, index_t len) noexcept {
  using P = packet<T>;
  namespace ei = Eigen::internal;
  constexpr index_t L = lanes<T>, group = 8;
  const index_t body = len / L * L;
  for (index_t i = 0; i < n; ++i)
    for (index_t j0 = 0; j0 < r; j0 += group)
      with_size<group>(r - j0, [&](auto g) {
        constexpr index_t G = decltype(g)::value;
        T* yi = y + i * ldy;
        const T* hi = h + i * r + j0;
        const T* wj = w + j0 * len;
        P c[G];
        for (index_t j = 0; j < G; ++j) c[j] = ei::pset1<P>(hi[j]);
        for (index_t k = 0; k < body; k += L) {
          P acc = ei::ploadu<P>(yi + k);
          for (index_t j = 0; j < G; ++j) acc = ei::pmadd(c[j], ei::ploadu<P>(wj + j * len + k), acc);
          ei::pstoreu(yi + k, acc);
        }
        for (index_t k = body; k < len; ++k) {
          T s = yi[k];
          for (index_t j = 0; j < G; ++j) s += hi[j] * wj[j * len + k];
          yi[k] = s;
        }
      });
}

}  // namespace adalora::detail::eigen_thin
