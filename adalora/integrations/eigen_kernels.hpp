#pragma once
// Eigen GEMM fast paths for the library's dense kernels. Opt-in, like eigen.hpp: the core never
// includes this header; depend on //adalora/integrations:eigen_kernels to use it.
//
//  * eigen_gram_kernel<T, Acc>: the Kernel policy of orthogonality_regularizer (see
//    portable_gram_kernel in orthogonality.hpp for the contract). C = M·Mᵀ by Eigen's symmetric
//    rank update (upper triangle: half the FLOPs of a GEMM), the gradient (C − I)·M by GEMM.
//        adalora::orthogonality_regularizer<float, adalora::eigen_gram_kernel<float>> orth;
//  * eigen_adapter_forward / eigen_adapter_backward: adapter_forward / adapter_backward
//    (svd_adapter.hpp) with the same arguments, checks, exceptions and add-into semantics. At
//    r <= 16 with row-major batch tensors the products run on the register-blocked kernels of
//    eigen_thin_products.hpp (Eigen's packet math; Eigen's GEMM wastes most of its blocks
//    there), otherwise on Eigen's GEMM.
//
// Agreement, not bit parity. The portable kernels reproduce torch bit for bit because they sum
// every dot product sequentially without FMA. Eigen's GEMM blocks the sums, keeps several partial
// sums per output and uses FMA where the target has it (its kernels use intrinsics, which
// -ffp-contract=off does not affect); it also folds scaling / rn into one factor. Results are
// therefore rounded differently, within a few units of the working precision times the length
// of the dot products: tests/eigen_kernels_test.cpp states and checks the tolerances. Use the
// portable path where bit parity with PEFT matters (golden replays), this one for speed.
//
// Accumulation. eigen_gram_kernel<T> accumulates in T (float GEMM for float, the fast choice).
// C − I cancels near an orthonormal M, so in float the norm ||C − I|| then carries an absolute
// error of order sqrt(n)·ε_f32·||m_i||·||m_j|| (n = columns of M), ~1e-5 for n = 4096 and unit
// rows: fine for a regularizer, not for measuring tiny deviations. eigen_gram_kernel<float,
// double> converts each block of M to double and uses Eigen's double GEMM: the portable kernel's
// accuracy, at a third of the float speed here (still several times the portable kernel).
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
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/integrations/eigen_thin_products.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {
namespace detail::eigen_kernels {

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

namespace detail::eigen_kernels {

/// Scratch layout of eigen_adapter_forward / eigen_adapter_backward inside an
/// adapter_workspace: the fixed intermediates, then room to pack each operand that lacks a unit
/// stride. Sizes depend only on the shapes and on which views need packing.
struct adapter_scratch {
  std::size_t total = 0;
  std::size_t take(std::size_t n) {
    const std::size_t at = total;
    total += n;
    return at;
  }
};


/// out(i, j) += t[i][j] for a view without a unit stride (t row-major).
template <class T>
void add_rows(const matrix_view<T>& out, const T* t) noexcept {
  const index_t r = out.rows(), c = out.cols();
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < c; ++j) out(i, j) += t[i * c + j];
}

/// b(o, j) += t[j · b.rows() + o]: a dBᵀ (r × out, row-major) or dB (out × r, column-major)
/// formed in scratch, added into the gradient view.
template <class T>
void add_transposed(const matrix_view<T>& b, const T* t) noexcept {
  const index_t out = b.rows(), r = b.cols();
  for (index_t o = 0; o < out; ++o)
    for (index_t j = 0; j < r; ++j) b(o, j) += t[j * out + o];
}

/// The dense form of an output view, or a zeroed scratch block to be added afterwards.
template <class T>
dense<T> output(const matrix_view<T>& v, bool direct, const dense<T>& mapped, T* scratch) {
  if (direct) return mapped;
  std::fill(scratch, scratch + v.rows() * v.cols(), T(0));
  return {scratch, v.rows(), v.cols(), v.cols() > 0 ? v.cols() : 1, true};
}

/// bt (r × rows of b, row-major) = bᵀ.
template <class T>
void transpose_into(const dense<const T>& b, T* bt) noexcept {
  for (index_t o = 0; o < b.rows; ++o)
    for (index_t j = 0; j < b.cols; ++j)
      bt[j * b.rows + o] = b.row_major ? b.data[o * b.outer + j] : b.data[o + j * b.outer];
}

/// True where eigen_thin_products.hpp takes the adapter: small rank, and every batch tensor
/// (x, y or dy and dx: `direct` when mapped in place) row-major.
template <class T>
bool thin_adapter(index_t r, std::initializer_list<std::pair<bool, bool>> direct_row_major) noexcept {
  if (r > eigen_thin::thin_rank_limit) return false;
  for (const auto& [direct, row_major] : direct_row_major)
    if (direct && !row_major) return false;
  return true;
}

// Thin results on Eigen's GEMM path. The adapter's products with r columns (h = x·(A⊙E)ᵀ,
// dh = dy·B and the product for dB) are formed column-major. Eigen's GEMM works column-major with
// register blocks of 24 rows by 4 columns (AVX, float); a row-major n × r result is computed as
// its transpose, which puts r in the 24-row dimension, mostly empty at small r. Column-major puts
// n there: at the DeBERTa query shape (768 × 768, 512 rows, r = 12) the GEMM backward went from
// ~1.3 to ~1.0 ms (the thin kernels, which now take that shape, ~0.85 ms; ~0.5 ms at r = 6
// against the GEMM's ~0.8).

template <class T>
void forward_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                  const matrix_view<const T>& x, const matrix_view<T>& y, adapter_workspace<T>& ws,
                  const char* where) {
  namespace sv = detail::svd;
  sv::check_adapter(p, where, "adapter");
  const index_t in = p.in_features(), out = p.out_features(), r = p.rank();
  sv::check_view(x, where, "x");
  ADALORA_REQUIRE(x.cols() == in, where, "x must have in_features = ", in, " columns, got ",
                  x.rows(), " x ", x.cols());
  const index_t n = x.rows();
  sv::check_shape(y, n, out, where, "y", "x.rows() x out_features");
  if (n == 0 || out == 0 || r == 0) return;  // y += 0

  dense<const T> xd, bd;
  dense<T> yd;
  const bool x_direct = as_dense(x, xd), b_direct = as_dense(matrix_view<const T>(p.B), bd),
             y_direct = as_dense(y, yd);
  const bool thin = thin_adapter<T>(r, {{x_direct, xd.row_major}, {y_direct, yd.row_major}});
  adapter_scratch lay;
  const std::size_t ae_at = lay.take(static_cast<std::size_t>(r * in));
  const std::size_t h_at = lay.take(static_cast<std::size_t>(n * r));
  const std::size_t bt_at = thin ? lay.take(static_cast<std::size_t>(out * r)) : 0;
  const std::size_t x_at = x_direct ? 0 : lay.take(static_cast<std::size_t>(n * in));
  const std::size_t b_at = b_direct ? 0 : lay.take(static_cast<std::size_t>(out * r));
  const std::size_t y_at = y_direct ? 0 : lay.take(static_cast<std::size_t>(n * out));
  T* base = ws.scratch(lay.total);

  T* ae = base + ae_at;
  detail::svd::scaled_rows(p, ae);
  if (!x_direct) xd = pack<T>(x, base + x_at);
  if (!b_direct) bd = pack<T>(matrix_view<const T>(p.B), base + b_at);
  if (thin) {  // h = c · x · (A ⊙ E)ᵀ, y += h · Bᵀ
    namespace et = eigen_thin;
    T* h = base + h_at;
    T* bt = base + bt_at;
    transpose_into(bd, bt);
    const dense<T> yo = output(y, y_direct, yd, base + y_at);
    et::dots(xd.data, xd.outer, n, ae, r, in, s.scaling() / s.rn(), h);
    et::combine(yo.data, yo.outer, n, h, bt, r, out);
    if (!y_direct) add_rows(y, yo.data);
    return;
  }
  // h = x · (A ⊙ E)ᵀ, with scaling / rn folded into it (one factor instead of two roundings).
  // Column-major (see "Thin results" above).
  const dense<T> h{base + h_at, n, r, n, false};
  std::fill(h.data, h.data + n * r, T(0));
  const T c = s.scaling() / s.rn();
  gemm_add<T>(h, c, xd, dense<const T>{ae, r, in, in, true}.transposed());
  // y += h · Bᵀ
  const dense<T> yo = output(y, y_direct, yd, base + y_at);
  gemm_add<T>(yo, T(1), h, bd.transposed());
  if (!y_direct) add_rows(y, yo.data);
}

template <class T>
void backward_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                   const matrix_view<const T>& x, const matrix_view<const T>& dy,
                   const svd_adapter_ref<T>& grads, adapter_workspace<T>& ws,
                   const matrix_view<T>& dx, const char* where) {
  namespace sv = detail::svd;
  sv::check_adapter(p, where, "adapter");
  check_same_shapes(p, grads, where);
  sv::check_adapter(grads, where, "grads");
  const index_t in = p.in_features(), out = p.out_features(), r = p.rank();
  sv::check_view(x, where, "x");
  ADALORA_REQUIRE(x.cols() == in, where, "x must have in_features = ", in, " columns, got ",
                  x.rows(), " x ", x.cols());
  const index_t n = x.rows();
  sv::check_shape(dy, n, out, where, "dy", "x.rows() x out_features");
  const bool want_dx = !(dx.data() == nullptr && dx.size() == 0);
  if (want_dx) sv::check_shape(dx, n, in, where, "dx", "x.rows() x in_features");
  if (n == 0 || r == 0) return;  // every product below is empty or zero

  dense<const T> xd, dyd, bd;
  dense<T> dxd;
  const bool x_direct = as_dense(x, xd), dy_direct = as_dense(dy, dyd),
             b_direct = as_dense(matrix_view<const T>(p.B), bd),
             dx_direct = !want_dx || as_dense(dx, dxd);
  const bool thin = thin_adapter<T>(
      r, {{x_direct, xd.row_major}, {dy_direct, dyd.row_major}, {dx_direct, !want_dx || dxd.row_major}});
  adapter_scratch lay;
  const std::size_t ae_at = lay.take(static_cast<std::size_t>(r * in));
  const std::size_t h_at = lay.take(static_cast<std::size_t>(n * r));
  const std::size_t dh_at = lay.take(static_cast<std::size_t>(n * r));
  const std::size_t dae_at = lay.take(static_cast<std::size_t>(r * in));
  const std::size_t gb_at = lay.take(static_cast<std::size_t>(out * r));
  const std::size_t bt_at = thin ? lay.take(static_cast<std::size_t>(out * r)) : 0;
  const std::size_t x_at = x_direct ? 0 : lay.take(static_cast<std::size_t>(n * in));
  const std::size_t dy_at = dy_direct ? 0 : lay.take(static_cast<std::size_t>(n * out));
  const std::size_t b_at = b_direct ? 0 : lay.take(static_cast<std::size_t>(out * r));
  const std::size_t dx_at = dx_direct ? 0 : lay.take(static_cast<std::size_t>(n * in));
  T* base = ws.scratch(lay.total);

  T* ae = base + ae_at;
  detail::svd::scaled_rows(p, ae);
  if (!x_direct) xd = pack<T>(x, base + x_at);
  if (!dy_direct) dyd = pack<T>(dy, base + dy_at);
  if (!b_direct) bd = pack<T>(matrix_view<const T>(p.B), base + b_at);
  const dense<const T> aed{ae, r, in, in, true};
  const T c = s.scaling() / s.rn();

  if (thin) {
    namespace et = eigen_thin;
    T* h = base + h_at;    // c · h and dh of the current block of rows
    T* dh = base + dh_at;
    T* gbt = base + gb_at;  // dBᵀ, r × out
    T* dae = base + dae_at;
    T* bt = base + bt_at;
    transpose_into(bd, bt);
    std::fill(gbt, gbt + r * out, T(0));
    std::fill(dae, dae + r * in, T(0));
    const dense<T> dxo = want_dx ? output(dx, dx_direct, dxd, base + dx_at) : dense<T>{};
    // Block by block of rows, so that each row of x and dy comes from memory once, for the dot
    // products, and from cache for the outer products (run over the whole batch, each product
    // read x and dy from memory again: at the DeBERTa shape ~10% of the backward, more of it at
    // half rank). Same bits as unblocked: every sum still runs over the rows in order.
    const index_t block = et::row_block<T>(in + out);
    for (index_t i0 = 0; i0 < n; i0 += block) {
      const index_t m = std::min(block, n - i0);
      const T* xb = xd.data + i0 * xd.outer;
      const T* dyb = dyd.data + i0 * dyd.outer;
      et::dots(xb, xd.outer, m, ae, r, in, c, h);      // c · h = c · x · (A ⊙ E)ᵀ
      et::dots(dyb, dyd.outer, m, bt, r, out, c, dh);  // dh = c · dy · B
      et::outer(dyb, dyd.outer, m, h, r, out, gbt);    // dBᵀ += (c · h)ᵀ · dy
      et::outer(xb, xd.outer, m, dh, r, in, dae);      // d(A ⊙ E) += dhᵀ · x
      if (want_dx)  // dx += dh · (A ⊙ E)
        et::combine(dxo.data + i0 * dxo.outer, dxo.outer, m, dh, ae, r, in);
    }
    add_transposed(grads.B, gbt);
    detail::svd::add_scaled_rows(p, dae, grads);
    if (want_dx && !dx_direct) add_rows(dx, dxo.data);
    return;
  }

  // h = x · (A ⊙ E)ᵀ (the forward's intermediate, recomputed). The thin results h, dh and the
  // product for dB are column-major (see "Thin results" above).
  const dense<T> h{base + h_at, n, r, n, false};
  std::fill(h.data, h.data + n * r, T(0));
  gemm_add<T>(h, T(1), xd, aed.transposed());

  // dB += c · dyᵀ · h
  const dense<T> gb{base + gb_at, out, r, out, false};
  std::fill(gb.data, gb.data + out * r, T(0));
  gemm_add<T>(gb, c, dyd.transposed(), h);
  add_transposed(grads.B, gb.data);

  // dh = c · dy · B
  const dense<T> dh{base + dh_at, n, r, n, false};
  std::fill(dh.data, dh.data + n * r, T(0));
  gemm_add<T>(dh, c, dyd, bd);

  // d(A ⊙ E) = dhᵀ · x
  T* dae = base + dae_at;
  std::fill(dae, dae + r * in, T(0));
  gemm_add<T>(dense<T>{dae, r, in, in > 0 ? in : 1, true}, T(1), dense<const T>(dh).transposed(), xd);
  detail::svd::add_scaled_rows(p, dae, grads);

  if (!want_dx) return;
  // dx += dh · (A ⊙ E)
  const dense<T> dxo = output(dx, dx_direct, dxd, base + dx_at);
  gemm_add<T>(dxo, T(1), dh, aed);
  if (!dx_direct) add_rows(dx, dxo.data);
}

}  // namespace detail::eigen_kernels

/// adapter_forward on Eigen's GEMM: y += ((x · (A ⊙ E)ᵀ) · Bᵀ) · scaling / rn, ADDED INTO y.
/// Same arguments, shape checks, exceptions and workspace rule as adapter_forward
/// (svd_adapter.hpp); scaling / rn is applied as one factor to x · (A ⊙ E)ᵀ. Agrees with
/// adapter_forward to the tolerance stated in tests/eigen_kernels_test.cpp, not bit for bit.
template <class T>
void eigen_adapter_forward(const detail::svd::nodeduce_t<svd_adapter_ref<const T>>& adapter,
                           const adapter_scale<T>& scale,
                           detail::svd::nodeduce_t<matrix_view<const T>> x,
                           detail::svd::nodeduce_t<matrix_view<T>> y, adapter_workspace<T>& ws) {
  detail::eigen_kernels::forward_impl(adapter, scale, x, y, ws, "eigen_adapter_forward");
}

/// adapter_backward on Eigen's GEMM: with c = scaling / rn and h = x · (A ⊙ E)ᵀ, dh = c·dy·B,
///   dB += c·dyᵀ·h,   dA += (dhᵀ·x) ⊙ E,   dE_i += Σ_j (dhᵀ·x)(i, j)·A(i, j),   dx += dh·(A ⊙ E),
/// ADDED INTO grads and (unless dx is a default-constructed view) dx. Same arguments, checks and
/// workspace rule as adapter_backward; agrees with it to the stated tolerance.
template <class T>
void eigen_adapter_backward(const detail::svd::nodeduce_t<svd_adapter_ref<const T>>& adapter,
                            const adapter_scale<T>& scale,
                            detail::svd::nodeduce_t<matrix_view<const T>> x,
                            detail::svd::nodeduce_t<matrix_view<const T>> dy,
                            const detail::svd::nodeduce_t<svd_adapter_ref<T>>& grads,
                            adapter_workspace<T>& ws,
                            detail::svd::nodeduce_t<matrix_view<T>> dx = {}) {
  detail::eigen_kernels::backward_impl(adapter, scale, x, dy, grads, ws, dx,
                                       "eigen_adapter_backward");
}

}  // namespace adalora
