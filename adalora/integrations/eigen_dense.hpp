#pragma once
// What the Eigen kernels (eigen_gram_kernel.hpp, eigen_adapter_kernels.hpp) share: adalora views
// as dense operands that Eigen maps in place, packing for views without a unit stride, and a GEMM
// tiled so that Eigen never allocates.
//
// No allocation. Eigen's GEMM allocates its packing buffers on the heap when they exceed
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB); every product here is cut into tiles small enough that
// Eigen keeps them on the stack (see detail::eigen_kernels::tile_depth). Views with a unit stride
// (row- or column-major with any outer stride) are mapped without a copy; other views are packed
// into the kernel's or the adapter_workspace's scratch. So, as with the portable kernels, a call
// allocates nothing once the scratch has grown (eigen_gram_kernel::reserve, adapter_workspace).
// That holds for builds without -fopenmp: with OpenMP, Eigen may split a tile over its threads
// and allocate per-thread buffers (call Eigen::setNbThreads(1) to keep the guarantee). Threads
// are the caller's choice: run independent adapters or regularizer terms on your own threads.

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "adalora/matrix_view.hpp"

namespace adalora::detail::eigen_kernels {


/// Eigen's packet (SIMD vector) of T for the target (AVX: 8 floats, 4 doubles; SSE: 4, 2), and
/// its width, for the register-blocked kernels (eigen_thin_products.hpp, eigen_gram_kernel.hpp).
template <class T>
using packet = typename Eigen::internal::packet_traits<T>::type;
template <class T>
inline constexpr index_t lanes = Eigen::internal::unpacket_traits<packet<T>>::size;

/// Calls f(std::integral_constant<index_t, G>{}) for G = g, 1 <= g <= Max <= 8: the block sizes
/// are template arguments, since with run-time sizes g++ keeps the accumulators in memory.
template <index_t Max, class F>
void with_size(index_t g, F&& f) {
  static_assert(Max >= 1 && Max <= 8);
  switch (std::min(g, Max)) {
    case 1: f(std::integral_constant<index_t, 1>{}); break;
    case 2: if constexpr (Max >= 2) f(std::integral_constant<index_t, 2>{}); break;
    case 3: if constexpr (Max >= 3) f(std::integral_constant<index_t, 3>{}); break;
    case 4: if constexpr (Max >= 4) f(std::integral_constant<index_t, 4>{}); break;
    case 5: if constexpr (Max >= 5) f(std::integral_constant<index_t, 5>{}); break;
    case 6: if constexpr (Max >= 6) f(std::integral_constant<index_t, 6>{}); break;
    case 7: if constexpr (Max >= 7) f(std::integral_constant<index_t, 7>{}); break;
    default: if constexpr (Max >= 8) f(std::integral_constant<index_t, 8>{}); break;
  }
}

/// A matrix with one unit stride: what Eigen's GEMM reads and writes in place.
/// Element (i, j) is at data[i * outer + j] (row_major) or data[i + j * outer] (column-major).
template <class S>
struct dense {
  S* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t outer = 1;
  bool row_major = true;

  dense transposed() const noexcept { return {data, cols, rows, outer, !row_major}; }
  dense block(index_t i, index_t j, index_t nr, index_t nc) const noexcept {
    return {data + (row_major ? i * outer + j : i + j * outer), nr, nc, outer, row_major};
  }
  operator dense<const S>() const noexcept  // NOLINT: implicit, like matrix_view's
    requires(!std::is_const_v<S>)
  {
    return {data, rows, cols, outer, row_major};
  }
};

/// The dense form of a view when it has a unit stride (and a positive outer stride that does
/// not make rows or columns overlap); false otherwise, and the caller packs it.
template <class S>
bool as_dense(const matrix_view<S>& v, dense<S>& out) noexcept {
  const index_t r = v.rows(), c = v.cols();
  if (r == 0 || c == 0) {
    out = {v.data(), r, c, 1, true};
    return true;
  }
  if (c == 1 || v.col_stride() == 1) {
    const index_t outer = r == 1 ? c : v.row_stride();
    if (outer >= c) {
      out = {v.data(), r, c, outer, true};
      return true;
    }
  }
  if (r == 1 || v.row_stride() == 1) {
    const index_t outer = c == 1 ? r : v.col_stride();
    if (outer >= r) {
      out = {v.data(), r, c, outer, false};
      return true;
    }
  }
  return false;
}

/// Copies a view into `buffer` (row-major, rows × cols), converting to D.
template <class D, class S>
dense<D> pack(const matrix_view<S>& v, D* buffer) noexcept {
  const index_t r = v.rows(), c = v.cols();
  if (detail::rows_are_contiguous(v)) {
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < c; ++j) buffer[i * c + j] = static_cast<D>(v(i, j));
  } else {
    for (index_t j = 0; j < c; ++j)
      for (index_t i = 0; i < r; ++i) buffer[i * c + j] = static_cast<D>(v(i, j));
  }
  return {buffer, r, c, c > 0 ? c : 1, true};
}

template <class S, bool RowMajor>
using map_t = Eigen::Map<Eigen::Matrix<std::remove_const_t<S>, Eigen::Dynamic, Eigen::Dynamic,
                                       RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
                         Eigen::Unaligned, Eigen::OuterStride<>>;
template <class S, bool RowMajor>
using const_map_t =
    Eigen::Map<const Eigen::Matrix<std::remove_const_t<S>, Eigen::Dynamic, Eigen::Dynamic,
                                   RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

template <bool RowMajor, class S>
map_t<S, RowMajor> map(const dense<S>& d) noexcept {
  return {d.data, d.rows, d.cols, Eigen::OuterStride<>(d.outer)};
}
template <bool RowMajor, class S>
const_map_t<S, RowMajor> cmap(const dense<const S>& d) noexcept {
  return {d.data, d.rows, d.cols, Eigen::OuterStride<>(d.outer)};
}

/// Calls f(map) with the Eigen map of the storage order d has (one instantiation per order).
template <class S, class F>
void with_map(const dense<S>& d, F&& f) {
  if constexpr (std::is_const_v<S>) {
    if (d.row_major) f(cmap<true>(d));
    else f(cmap<false>(d));
  } else {
    if (d.row_major) f(map<true>(d));
    else f(map<false>(d));
  }
}

/// Tiling of gemm_add. Eigen packs a kc × mc block of the left factor and a kc × nc block of
/// the right one, on the stack when a block is at most EIGEN_STACK_ALLOCATION_LIMIT (128 KiB),
/// else with malloc. Tiles of depth <= tile_depth and with tile_depth · (rows or columns) · sizeof
/// <= tile_bytes (64 KiB) keep both blocks on the stack whatever blocking Eigen picks inside the
/// tile. A thin product (depth r = 8) gets correspondingly wide tiles, so that the cost of one
/// Eigen call stays small next to the work in it.
template <class S>
inline constexpr index_t tile_depth = static_cast<index_t>(512 / sizeof(S));  // 128 f32, 64 f64
inline constexpr std::size_t tile_bytes = 64 * 1024;

template <class S>
constexpr index_t tile_extent(index_t depth) noexcept {
  return std::max<index_t>(8, static_cast<index_t>(tile_bytes / sizeof(S)) / std::max<index_t>(depth, 1));
}

/// C += alpha · A · B over dense operands (C must not overlap A or B), tiled so that Eigen's GEMM
/// allocates nothing (see tile_depth).
template <class S>
void gemm_add(const dense<S>& C, S alpha, const dense<const S>& A, const dense<const S>& B) {
  const index_t m = C.rows, n = C.cols, k = A.cols;
  if (m == 0 || n == 0 || k == 0) return;
  const index_t kt = std::min(k, tile_depth<S>);
  const index_t mt = tile_extent<S>(kt), nt = mt;
  for (index_t j0 = 0; j0 < n; j0 += nt) {
    const index_t nb = std::min(nt, n - j0);
    for (index_t i0 = 0; i0 < m; i0 += mt) {
      const index_t mb = std::min(mt, m - i0);
      const dense<S> c = C.block(i0, j0, mb, nb);
      for (index_t k0 = 0; k0 < k; k0 += kt) {
        const index_t kb = std::min(kt, k - k0);
        with_map(c, [&](auto cm) {
          with_map(A.block(i0, k0, mb, kb), [&](auto am) {
            with_map(B.block(k0, j0, kb, nb), [&](auto bm) { cm.noalias() += (alpha * am) * bm; });
          });
        });
      }
    }
  }
}

}  // namespace adalora::detail::eigen_kernels
