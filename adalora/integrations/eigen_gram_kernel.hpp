#pragma once
// eigen_gram_kernel<T, Acc>: the orthogonality regularizer's Kernel policy on Eigen (see
// portable_gram_kernel in orthogonality.hpp for the contract). C = M·Mᵀ by Eigen's symmetric
// rank update (upper triangle: half the FLOPs of a GEMM), the gradient (C − I)·M by GEMM.
//     adalora::orthogonality_regularizer<float, adalora::eigen_gram_kernel<float>> orth;
// Agreement with the portable kernel, not bit parity: see eigen_kernels.hpp.
//
// Accumulation. eigen_gram_kernel<T> accumulates in T (float GEMM for float, the fast choice).
// C − I cancels near an orthonormal M, so in float the norm ||C − I|| then carries an absolute
// error of order sqrt(n)·ε_f32·||m_i||·||m_j|| (n = columns of M), ~1e-5 for n = 4096 and unit
// rows: fine for a regularizer, not for measuring tiny deviations. eigen_gram_kernel<float,
// double> converts each block of M to double and uses Eigen's double GEMM: the portable kernel's
// accuracy, at a third of the float speed here (still several times the portable kernel).

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "adalora/integrations/eigen_dense.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"

namespace adalora {
namespace detail::eigen_kernels {

/// Columns of M per block in eigen_gram_kernel: r × block values of Acc are at most 64 KiB (so
/// Eigen's rank update and GEMM allocate nothing), at least 16 columns.
template <class Acc>
constexpr index_t gram_block(index_t r) noexcept {
  const index_t by_bytes = static_cast<index_t>((64 * 1024) / sizeof(Acc)) / (r > 0 ? r : 1);
  return std::max<index_t>(16, std::min<index_t>(by_bytes, 4096));
}
/// An upper bound of r · gram_block(r) for every r <= max_rank (a smaller rank gets a longer
/// block, so the bound is not simply max_rank · gram_block(max_rank)).
template <class Acc>
constexpr index_t gram_panel_capacity(index_t max_rank) noexcept {
  return std::max<index_t>(static_cast<index_t>((64 * 1024) / sizeof(Acc)), 16 * max_rank);
}

}  // namespace detail::eigen_kernels

/// The orthogonality regularizer's Kernel policy on Eigen's GEMM (contract: portable_gram_kernel
/// in orthogonality.hpp). Acc is the accumulator: T (default; float GEMM for float) or a wider
/// type (eigen_gram_kernel<float, double>: M is converted block by block and the products run in
/// double, the portable kernel's accuracy). Blocks of columns of M go through
///   D += M_b·M_bᵀ        Eigen selfadjointView<Upper>().rankUpdate: half the FLOPs of a GEMM,
///   G_b += scale·D·M_b   GEMM, straight into the gradient when it has a unit stride,
/// with M_b mapped in place when Acc is T and M has a unit stride, packed (and converted)
/// otherwise. Not bit-identical with portable_gram_kernel; see the header comment.
template <class T, class Acc = T>
class eigen_gram_kernel {
  static_assert(std::is_floating_point_v<T> && std::is_floating_point_v<Acc>,
                "adalora::eigen_gram_kernel<T, Acc>: T and Acc must be floating-point types");
  static_assert(sizeof(Acc) >= sizeof(T),
                "adalora::eigen_gram_kernel<T, Acc>: Acc must be at least as wide as T");

 public:
  using accumulator_type = Acc;

  /// After reserve(max_rank), calls with r <= max_rank allocate nothing.
  void reserve(index_t max_rank) {
    const index_t r = max_rank > 0 ? max_rank : 0;
    const auto needed =
        static_cast<std::size_t>(2 * detail::eigen_kernels::gram_panel_capacity<Acc>(r));
    if (work_.size() < needed) work_.resize(needed);
  }

  Acc gram_minus_identity(matrix_view<const T> m, Acc* d) noexcept {
    namespace ek = detail::eigen_kernels;
    const index_t r = m.rows(), n = m.cols();
    if (r == 0) return Acc(0);
    using upper_map = Eigen::Map<Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
    upper_map dm(d, r, r);
    dm.template triangularView<Eigen::Upper>().setZero();
    const index_t block = ek::gram_block<Acc>(r);
    ek::dense<const T> whole;
    const bool direct = std::is_same_v<T, Acc> && ek::as_dense(m, whole);
    for (index_t k0 = 0; k0 < n; k0 += block) {
      const index_t kb = std::min(block, n - k0);
      ek::dense<const Acc> panel;
      if constexpr (std::is_same_v<T, Acc>) {
        if (direct) panel = whole.block(0, k0, r, kb);
        else panel = ek::pack(m.block(0, k0, r, kb), work_.data());
      } else {
        panel = ek::pack(m.block(0, k0, r, kb), work_.data());
      }
      ek::with_map(panel, [&](auto pm) {
        dm.template selfadjointView<Eigen::Upper>().rankUpdate(pm, Acc(1));
      });
    }
    return detail::finish_gram(d, r);  // the same finish as the portable kernel
  }

  void add_scaled_product(const Acc* d, Acc scale, matrix_view<const T> m,
                          matrix_view<T> g) noexcept {
    namespace ek = detail::eigen_kernels;
    const index_t r = m.rows(), n = m.cols();
    if (r == 0 || n == 0) return;
    const ek::dense<const Acc> dd{d, r, r, r, true};
    const index_t block = ek::gram_block<Acc>(r);
    ek::dense<const T> whole_m;
    ek::dense<T> whole_g;
    const bool direct_m = ek::as_dense(m, whole_m);
    const bool direct_g = ek::as_dense(g, whole_g);
    Acc* panel_buffer = work_.data();
    Acc* out_buffer = work_.data() + r * block;  // r · block <= gram_panel_capacity: see reserve
    for (index_t k0 = 0; k0 < n; k0 += block) {
      const index_t kb = std::min(block, n - k0);
      if constexpr (std::is_same_v<T, Acc>) {
        const ek::dense<const T> mb = direct_m ? whole_m.block(0, k0, r, kb)
                                               : ek::pack(m.block(0, k0, r, kb), panel_buffer);
        if (direct_g) {
          ek::gemm_add(whole_g.block(0, k0, r, kb), scale, dd, mb);
          continue;
        }
        const ek::dense<T> q{out_buffer, r, kb, kb, true};
        std::fill(out_buffer, out_buffer + r * kb, T(0));
        ek::gemm_add(q, scale, dd, mb);
        add_into(g.block(0, k0, r, kb), out_buffer, Acc(1));
      } else {
        const ek::dense<const Acc> mb = ek::pack(m.block(0, k0, r, kb), panel_buffer);
        const ek::dense<Acc> q{out_buffer, r, kb, kb, true};
        std::fill(out_buffer, out_buffer + r * kb, Acc(0));
        ek::gemm_add(q, Acc(1), dd, mb);
        add_into(g.block(0, k0, r, kb), out_buffer, scale);
      }
    }
  }

 private:
  /// g(i, k) = T(Acc(g(i, k)) + scale · q[i][k]), one rounding, along g's contiguous index.
  static void add_into(const matrix_view<T>& g, const Acc* q, Acc scale) noexcept {
    const index_t r = g.rows(), kb = g.cols();
    if (detail::rows_are_contiguous(g)) {
      for (index_t i = 0; i < r; ++i)
        for (index_t k = 0; k < kb; ++k)
          g(i, k) = static_cast<T>(static_cast<Acc>(g(i, k)) + scale * q[i * kb + k]);
    } else {
      for (index_t k = 0; k < kb; ++k)
        for (index_t i = 0; i < r; ++i)
          g(i, k) = static_cast<T>(static_cast<Acc>(g(i, k)) + scale * q[i * kb + k]);
    }
  }

  std::vector<Acc> work_;  // a packed block of M and a block of D·M: 2 · gram_panel_capacity
};

}  // namespace adalora
