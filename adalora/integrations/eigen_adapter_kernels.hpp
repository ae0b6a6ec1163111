#pragma once
// eigen_adapter_forward / eigen_adapter_backward: adapter_forward / adapter_backward
// (svd_adapter.hpp) with the same arguments, checks, exceptions and add-into semantics. At
// r <= 16 with row-major batch tensors the products run on the register-blocked kernels of
// eigen_thin_products.hpp (Eigen's packet math; Eigen's GEMM wastes most of its blocks there),
// otherwise on Eigen's GEMM (eigen_dense.hpp). Agreement with the portable functions, not bit
// parity: see eigen_kernels.hpp.

#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <utility>

#include "adalora/config.hpp"
#include "adalora/integrations/eigen_dense.hpp"
#include "adalora/integrations/eigen_thin_products.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {
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
  // scaling / rn folded into h: one factor instead of two roundings.
  const T c = s.scaling() / s.rn();
  const dense<T> yo = output(y, y_direct, yd, base + y_at);
  if (thin) {  // h = c · x · (A ⊙ E)ᵀ, y += h · Bᵀ
    T* h = base + h_at;
    T* bt = base + bt_at;
    transpose_into(bd, bt);
    eigen_thin::dots(xd.data, xd.outer, n, ae, r, in, c, h);
    eigen_thin::combine(yo.data, yo.outer, n, h, bt, r, out);
  } else {  // the same on Eigen's GEMM, h column-major (see "Thin results" above)
    const dense<T> h{base + h_at, n, r, n, false};
    std::fill(h.data, h.data + n * r, T(0));
    gemm_add<T>(h, c, xd, dense<const T>{ae, r, in, in, true}.transposed());
    gemm_add<T>(yo, T(1), h, bd.transposed());
  }
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

  // dBᵀ (r × out, row-major; on the GEMM path dB, out × r, column-major: the same memory order)
  // and d(A ⊙ E) (r × in) are formed in scratch and added into grads at the end.
  T* gb = base + gb_at;
  T* dae = base + dae_at;
  std::fill(gb, gb + r * out, T(0));
  std::fill(dae, dae + r * in, T(0));
  const dense<T> dxo = want_dx ? output(dx, dx_direct, dxd, base + dx_at) : dense<T>{};

  if (thin) {
    namespace et = eigen_thin;
    T* h = base + h_at;  // c · h and dh of the current block of rows
    T* dh = base + dh_at;
    T* bt = base + bt_at;
    transpose_into(bd, bt);
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
      et::outer(dyb, dyd.outer, m, h, r, out, gb);     // dBᵀ += (c · h)ᵀ · dy
      et::outer(xb, xd.outer, m, dh, r, in, dae);      // d(A ⊙ E) += dhᵀ · x
      if (want_dx)  // dx += dh · (A ⊙ E)
        et::combine(dxo.data + i0 * dxo.outer, dxo.outer, m, dh, ae, r, in);
    }
  } else {
    // The same on Eigen's GEMM, the thin results column-major (see "Thin results" above).
    // h = x · (A ⊙ E)ᵀ (the forward's intermediate, recomputed)
    const dense<T> h{base + h_at, n, r, n, false};
    std::fill(h.data, h.data + n * r, T(0));
    gemm_add<T>(h, T(1), xd, aed.transposed());
    // dB = c · dyᵀ · h
    gemm_add<T>(dense<T>{gb, out, r, out, false}, c, dyd.transposed(), h);
    // dh = c · dy · B
    const dense<T> dh{base + dh_at, n, r, n, false};
    std::fill(dh.data, dh.data + n * r, T(0));
    gemm_add<T>(dh, c, dyd, bd);
    // d(A ⊙ E) = dhᵀ · x
    gemm_add<T>(dense<T>{dae, r, in, in > 0 ? in : 1, true}, T(1), dense<const T>(dh).transposed(),
                xd);
    // dx += dh · (A ⊙ E)
    if (want_dx) gemm_add<T>(dxo, T(1), dh, aed);
  }
  add_transposed(grads.B, gb);
  detail::svd::add_scaled_rows(p, dae, grads);
  if (want_dx && !dx_direct) add_rows(dx, dxo.data);
}

}  // namespace detail::eigen_kernels

/// adapter_forward on Eigen's GEMM: y += ((x · (A ⊙ E)ᵀ) · Bᵀ) · scaling / rn, ADDED INTO y.
/// Same arguments, shape checks, exceptions and workspace rule as adapter_forward
/// (svd_adapter.hpp); scaling / rn is applied as one factor to x · (A ⊙ E)ᵀ. Agrees with
/// adapter_forward to the tolerance stated in tests/eigen_kernels_test.cpp, not bit for bit.
template <class T>
void eigen_adapter_forward(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
                           const adapter_scale<T>& scale,
                           std::type_identity_t<matrix_view<const T>> x,
                           std::type_identity_t<matrix_view<T>> y, adapter_workspace<T>& ws) {
  detail::eigen_kernels::forward_impl(adapter, scale, x, y, ws, "eigen_adapter_forward");
}

/// adapter_backward on Eigen's GEMM: with c = scaling / rn and h = x · (A ⊙ E)ᵀ, dh = c·dy·B,
///   dB += c·dyᵀ·h,   dA += (dhᵀ·x) ⊙ E,   dE_i += Σ_j (dhᵀ·x)(i, j)·A(i, j),   dx += dh·(A ⊙ E),
/// ADDED INTO grads and (unless dx is a default-constructed view) dx. Same arguments, checks and
/// workspace rule as adapter_backward; agrees with it to the stated tolerance.
template <class T>
void eigen_adapter_backward(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
                            const adapter_scale<T>& scale,
                            std::type_identity_t<matrix_view<const T>> x,
                            std::type_identity_t<matrix_view<const T>> dy,
                            const std::type_identity_t<svd_adapter_ref<T>>& grads,
                            adapter_workspace<T>& ws,
                            std::type_identity_t<matrix_view<T>> dx = {}) {
  detail::eigen_kernels::backward_impl(adapter, scale, x, dy, grads, ws, dx,
                                       "eigen_adapter_backward");
}

}  // namespace adalora
