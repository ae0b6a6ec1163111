#pragma once
// The SVD adapter of AdaLoRA over views: forward, backward, delta weight, merge/unmerge, masking
// and resize to the kept ranks, plus a small owning class for users who want us to hold the
// tensors.
//
//   y += ((x · (A ⊙ E)ᵀ) · Bᵀ) · scaling / (r_init + 1e-5)
//
// with A (r × in), E (r), B (out × r) as in svd_adapter_ref.hpp (PEFT layer.py SVDLinear.forward,
// loralib adalora.py SVDLinear.forward).
//
// Conventions shared by every function in this header:
//  * Outputs are ADDED INTO (y +=, grad +=, dx +=), like torch accumulating .grad, so several
//    adapters or a base layer can write into one buffer. The exceptions say so: delta_weight()
//    overwrites its output, merge() adds ΔW and unmerge() subtracts it.
//  * Views may have any strides (row-major, column-major, transposed, blocks). Outputs must not
//    overlap inputs.
//  * Every shape is checked and a mismatch throws std::invalid_argument naming the function, the
//    argument, the expected and the given extents; nothing is written before the checks pass.
//  * Arithmetic is done in T in the order of the references: A ⊙ E first, the two products left
//    to right with sequential dot products, then `* scaling` and `/ rn` as two roundings. Compiled
//    without FMA contraction (-ffp-contract=off, as .bazelrc does), forward, delta weight and
//    merge/unmerge reproduce the torch 1.13 goldens bit for bit in float and double.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <random>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

// This header's internals, nested so that generic helper names cannot collide with other headers'.
/// A bool per singular value, true where the triplet is kept (a PEFT rank_pattern entry):
/// std::vector<bool>, std::array<bool, N>, std::span<const bool>, ...
template <class M>
concept keep_mask = std::ranges::random_access_range<const M> && std::ranges::sized_range<const M> &&
                    std::convertible_to<std::ranges::range_reference_t<const M>, bool>;

namespace detail::svd {

template <class V>
void check_view(const matrix_view<V>& v, const char* where, const char* argument) {
  ADALORA_REQUIRE(v.rows() >= 0 && v.cols() >= 0, where, argument, " must have extents >= 0, got ",
                  v.rows(), " x ", v.cols());
  ADALORA_REQUIRE(v.data() != nullptr || v.size() == 0, where, argument,
                  " has null data for a non-empty ", v.rows(), " x ", v.cols(), " view");
}

template <class V>
void check_view(const vector_view<V>& v, const char* where, const char* argument) {
  ADALORA_REQUIRE(v.size() >= 0, where, argument, " must have size >= 0, got ", v.size());
  ADALORA_REQUIRE(v.data() != nullptr || v.size() == 0, where, argument,
                  " has null data for a non-empty vector of size ", v.size());
}

template <class V>
void check_shape(const matrix_view<V>& v, index_t rows, index_t cols, const char* where,
                 const char* argument, const char* what) {
  check_view(v, where, argument);
  ADALORA_REQUIRE(v.rows() == rows && v.cols() == cols, where, argument, " must be ", rows, " x ",
                  cols, " (", what, "), got ", v.rows(), " x ", v.cols());
}

template <class V>
void check_adapter(const svd_adapter_ref<V>& p, const char* where, const char* argument) {
  p.check_shapes(where, argument);
  check_view(p.A, where, argument);
  check_view(p.E, where, argument);
  check_view(p.B, where, argument);
}

/// Two roundings, in this order, as `t * scaling / (ranknum + 1e-5)` does in torch.
template <class T>
T apply_scale(T t, T scaling, T rn) noexcept {
  const T scaled = t * scaling;
  return scaled / rn;
}

}  // namespace detail::svd

/// The scalar factors of one adapter (PEFT AdaLoraLayer.update_layer, loralib SVDLinear):
///   scaling = alpha > 0 ? alpha : r_init            (as T),
///   rn      = T(r_init) + T(1e-5)                   (in T: float gives 8.000009536743164 for 8).
/// r_init is the rank the adapter was created with; it never changes, also not after pruning or
/// resize, so a resized adapter produces exactly the output of its masked twin (PEFT
/// resize_modules_by_rank_pattern copies the old ranknum back). One deliberate difference: with
/// alpha = 0 PEFT's resize re-runs update_layer, which sets scaling to the KEPT rank while ranknum
/// stays r_init, so its resized adapter differs from the masked one by kept / r_init; here
/// scaling stays r_init, as PEFT's own comment there ("The scaling is exactly as the previous")
/// intends. adalora/io/peft_adapter.hpp translates between the two rules when it writes or
/// reads PEFT's files (it writes lora_alpha = r_init in place of 0).
/// Throws std::invalid_argument unless alpha is finite and >= 0 and r_init >= 0.
template <class T>
class adapter_scale {
  static_assert(std::is_floating_point_v<T> && !std::is_const_v<T>,
                "adalora::adapter_scale<T>: T must be a non-const floating-point type");

 public:
  adapter_scale(double alpha, index_t r_init) : alpha_(alpha), r_init_(r_init) {
    ADALORA_REQUIRE(std::isfinite(alpha) && alpha >= 0, "adapter_scale",
                    "alpha must be finite and >= 0, got ", alpha);
    ADALORA_REQUIRE(r_init >= 0, "adapter_scale", "r_init must be >= 0, got ", r_init);
    // torch multiplies by the Python number cast to the tensor dtype; alpha = 0 means "use r".
    scaling_ = alpha > 0 ? static_cast<T>(alpha) : static_cast<T>(r_init);
    // ranknum is a tensor of the parameter dtype and `+ 1e-5` is computed in that dtype.
    rn_ = static_cast<T>(r_init) + static_cast<T>(1e-5);
  }

  double alpha() const noexcept { return alpha_; }
  index_t r_init() const noexcept { return r_init_; }
  T scaling() const noexcept { return scaling_; }
  T rn() const noexcept { return rn_; }

 private:
  double alpha_;
  index_t r_init_;
  T scaling_;
  T rn_;
};

/// Scratch memory for adapter_forward / adapter_backward, so that those calls do not allocate:
/// it grows on the first call that needs more (or on reserve()) and is reused afterwards.
template <class T>
class adapter_workspace {
  static_assert(std::is_floating_point_v<T> && !std::is_const_v<T>,
                "adalora::adapter_workspace<T>: T must be a non-const floating-point type");

 public:
  /// Elements adapter_forward needs for a batch of n rows.
  static std::size_t forward_size(index_t n, index_t in, index_t r) noexcept {
    return static_cast<std::size_t>(r * in + n * r);
  }
  /// Elements adapter_backward needs for a batch of n rows.
  static std::size_t backward_size(index_t n, index_t in, index_t out, index_t r) noexcept {
    return static_cast<std::size_t>(r * in + 2 * n * r + n * out + std::max({out * r, r * in, in}));
  }

  /// Preallocates for batches of up to `batch` rows, for forward and backward.
  void reserve(index_t batch, index_t in, index_t out, index_t r) {
    ADALORA_REQUIRE(batch >= 0 && in >= 0 && out >= 0 && r >= 0, "adapter_workspace::reserve",
                    "batch, in, out and r must be >= 0, got ", batch, ", ", in, ", ", out, ", ", r);
    scratch(backward_size(batch, in, out, r));
  }

  std::size_t capacity() const noexcept { return buffer_.size(); }

  /// At least n elements of scratch (contents unspecified); allocates only when n > capacity().
  T* scratch(std::size_t n) {
    if (buffer_.size() < n) buffer_.resize(n);
    return buffer_.data();
  }

 private:
  std::vector<T> buffer_;
};

namespace detail::svd {

// ae(i, j) = A(i, j) * E[i], row-major r × in: the `lora_A * lora_E` tensor of the references.
template <class T>
void scaled_rows(const svd_adapter_ref<const T>& p, T* ae) noexcept {
  const index_t r = p.rank(), in = p.in_features();
  for (index_t i = 0; i < r; ++i) {
    const T e = p.E[i];
    for (index_t j = 0; j < in; ++j) ae[i * in + j] = p.A(i, j) * e;
  }
}

// From dae = d(A ⊙ E) (r × in, row-major): dA(i, j) += dae(i, j) · E_i and
// dE_i += Σ_j dae(i, j) · A(i, j), sequential in j.
template <class T>
void add_scaled_rows(const svd_adapter_ref<const T>& p, const T* dae,
                     const svd_adapter_ref<T>& grads) noexcept {
  const index_t r = p.rank(), in = p.in_features();
  for (index_t i = 0; i < r; ++i) {
    const T e = p.E[i];
    T de = 0;
    for (index_t j = 0; j < in; ++j) {
      grads.A(i, j) += dae[i * in + j] * e;
      de += dae[i * in + j] * p.A(i, j);
    }
    grads.E[i] += de;
  }
}

// h(k, i) = Σ_j x(k, j) · ae(i, j), sequential in j (how the reference BLAS summed).
template <class T>
void project_down(const matrix_view<const T>& x, const T* ae, index_t r, T* h) noexcept {
  const index_t n = x.rows(), in = x.cols();
  for (index_t k = 0; k < n; ++k)
    for (index_t i = 0; i < r; ++i) {
      T acc = 0;
      for (index_t j = 0; j < in; ++j) acc += x(k, j) * ae[i * in + j];
      h[k * r + i] = acc;
    }
}

template <class T>
void forward_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                  const matrix_view<const T>& x, const matrix_view<T>& y, adapter_workspace<T>& ws,
                  const char* where) {
  check_adapter(p, where, "adapter");
  const index_t in = p.in_features(), out = p.out_features(), r = p.rank();
  check_view(x, where, "x");
  ADALORA_REQUIRE(x.cols() == in, where, "x must have in_features = ", in, " columns, got ",
                  x.rows(), " x ", x.cols());
  const index_t n = x.rows();
  check_shape(y, n, out, where, "y", "x.rows() x out_features");

  T* ae = ws.scratch(adapter_workspace<T>::forward_size(n, in, r));
  T* h = ae + r * in;
  scaled_rows(p, ae);
  project_down(x, ae, r, h);
  const T scaling = s.scaling(), rn = s.rn();
  for (index_t k = 0; k < n; ++k)
    for (index_t o = 0; o < out; ++o) {
      T acc = 0;
      for (index_t i = 0; i < r; ++i) acc += h[k * r + i] * p.B(o, i);
      y(k, o) += apply_scale(acc, scaling, rn);
    }
}

template <class T>
void backward_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                   const matrix_view<const T>& x, const matrix_view<const T>& dy,
                   const svd_adapter_ref<T>& grads, adapter_workspace<T>& ws,
                   const matrix_view<T>& dx, const char* where) {
  check_adapter(p, where, "adapter");
  check_same_shapes(p, grads, where);
  check_adapter(grads, where, "grads");
  const index_t in = p.in_features(), out = p.out_features(), r = p.rank();
  check_view(x, where, "x");
  ADALORA_REQUIRE(x.cols() == in, where, "x must have in_features = ", in, " columns, got ",
                  x.rows(), " x ", x.cols());
  const index_t n = x.rows();
  check_shape(dy, n, out, where, "dy", "x.rows() x out_features");
  // A default-constructed (null, empty) dx means "the input gradient is not needed".
  const bool want_dx = !(dx.data() == nullptr && dx.size() == 0);
  if (want_dx) check_shape(dx, n, in, where, "dx", "x.rows() x in_features");

  T* ae = ws.scratch(adapter_workspace<T>::backward_size(n, in, out, r));
  T* h = ae + r * in;    // n × r, the forward's x · (A ⊙ E)ᵀ
  T* dt = h + n * r;     // n × out, gradient of the product before the scale
  T* dh = dt + n * out;  // n × r
  T* acc = dh + n * r;   // max(out·r, r·in, in): one product, summed before it is added
  scaled_rows(p, ae);
  project_down(x, ae, r, h);

  // Autograd of `t * scaling / rn`: DivBackward (dy / rn) then MulBackward (* scaling).
  const T scaling = s.scaling(), rn = s.rn();
  for (index_t k = 0; k < n; ++k)
    for (index_t o = 0; o < out; ++o) {
      const T divided = dy(k, o) / rn;
      dt[k * out + o] = divided * scaling;
    }

  // The products below run over the batch in the outer loop, so that x, dt and h are read once,
  // row by row. Each entry still sums its terms sequentially in k: the same roundings as a dot
  // product. A product is completed in `acc` before it is added to the user's gradient, the
  // order of torch's `grad = grad + new`.

  // dB(o, i) += Σ_k dt(k, o) · h(k, i).
  std::fill(acc, acc + out * r, T(0));
  for (index_t k = 0; k < n; ++k)
    for (index_t o = 0; o < out; ++o) {
      const T g = dt[k * out + o];
      for (index_t i = 0; i < r; ++i) acc[o * r + i] += g * h[k * r + i];
    }
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < r; ++i) grads.B(o, i) += acc[o * r + i];

  // dh(k, i) = Σ_o dt(k, o) · B(o, i), reading B row by row.
  std::fill(dh, dh + n * r, T(0));
  for (index_t k = 0; k < n; ++k)
    for (index_t o = 0; o < out; ++o) {
      const T g = dt[k * out + o];
      for (index_t i = 0; i < r; ++i) dh[k * r + i] += g * p.B(o, i);
    }

  // d(A ⊙ E)(i, j) = Σ_k dh(k, i) · x(k, j); then dA = d(A⊙E) · E_i and dE_i = Σ_j d(A⊙E) · A.
  std::fill(acc, acc + r * in, T(0));
  for (index_t k = 0; k < n; ++k)
    for (index_t i = 0; i < r; ++i) {
      const T g = dh[k * r + i];
      for (index_t j = 0; j < in; ++j) acc[i * in + j] += g * x(k, j);
    }
  add_scaled_rows(p, acc, grads);

  if (!want_dx) return;
  // dx(k, j) += Σ_i dh(k, i) · ae(i, j).
  for (index_t k = 0; k < n; ++k) {
    std::fill(acc, acc + in, T(0));
    for (index_t i = 0; i < r; ++i) {
      const T g = dh[k * r + i];
      for (index_t j = 0; j < in; ++j) acc[j] += g * ae[i * in + j];
    }
    for (index_t j = 0; j < in; ++j) dx(k, j) += acc[j];
  }
}

// ΔW(o, j) = (Σ_i B(o, i) · (A(i, j) · E_i)) · scaling / rn, sequential in i as torch's mm.
// Computed per entry so that delta/merge/unmerge need no scratch; A's column walk touches only r
// cache lines, which stay resident across j.
template <class T>
T delta_entry(const svd_adapter_ref<const T>& p, T scaling, T rn, index_t o, index_t j) noexcept {
  T acc = 0;
  for (index_t i = 0; i < p.rank(); ++i) acc += p.B(o, i) * (p.A(i, j) * p.E[i]);
  return apply_scale(acc, scaling, rn);
}

template <class T>
void check_weight(const svd_adapter_ref<const T>& p, const matrix_view<T>& W, const char* where,
                  const char* argument) {
  check_adapter(p, where, "adapter");
  check_shape(W, p.out_features(), p.in_features(), where, argument,
              "out_features x in_features; pass W.transposed() for fan_in_fan_out storage");
}

template <class T>
void delta_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                const matrix_view<T>& out, const char* where) {
  check_weight(p, out, where, "out");
  const T scaling = s.scaling(), rn = s.rn();
  for (index_t o = 0; o < p.out_features(); ++o)
    for (index_t j = 0; j < p.in_features(); ++j) out(o, j) = delta_entry(p, scaling, rn, o, j);
}

template <class T>
void unmerge_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                  const matrix_view<T>& W, const char* where) {
  check_weight(p, W, where, "W");
  const T scaling = s.scaling(), rn = s.rn();
  for (index_t o = 0; o < p.out_features(); ++o)
    for (index_t j = 0; j < p.in_features(); ++j) W(o, j) -= delta_entry(p, scaling, rn, o, j);
}

template <class T>
void merge_impl(const svd_adapter_ref<const T>& p, const adapter_scale<T>& s,
                const matrix_view<T>& W, bool safe_merge, const char* where) {
  check_weight(p, W, where, "W");
  const T scaling = s.scaling(), rn = s.rn();
  const index_t out = p.out_features(), in = p.in_features();
  if (safe_merge) {
    // PEFT safe_merge checks the merged weights, which catches a non-finite ΔW as well as an
    // overflow of W + ΔW. Checking in a first pass (and recomputing, deterministically, in the
    // second) leaves W untouched on failure without allocating a copy of it.
    for (index_t o = 0; o < out; ++o)
      for (index_t j = 0; j < in; ++j) {
        const T d = delta_entry(p, scaling, rn, o, j);
        const T merged = W(o, j) + d;
        ADALORA_REQUIRE(std::isfinite(merged), where,
                        "safe merge found a non-finite merged weight W(", o, ", ", j,
                        ") = ", merged, " (W = ", W(o, j), ", delta = ", d,
                        "); the adapter seems broken, W is unchanged");
      }
  }
  for (index_t o = 0; o < out; ++o)
    for (index_t j = 0; j < in; ++j) W(o, j) += delta_entry(p, scaling, rn, o, j);
}

template <class M>
index_t count_kept(const M& mask) {
  index_t kept = 0;
  for (index_t i = 0; i < static_cast<index_t>(std::ranges::size(mask)); ++i)
    if (static_cast<bool>(std::ranges::begin(mask)[i])) ++kept;
  return kept;
}

template <class M>
void check_mask(const M& mask, index_t r, const char* where) {
  const auto size = static_cast<index_t>(std::ranges::size(mask));
  ADALORA_REQUIRE(size == r, where, "mask must have one entry per singular value (rank = ", r,
                  "), got ", size, " entries");
}

template <class T, class M>
void resize_impl(const svd_adapter_ref<const T>& src, const M& mask, const svd_adapter_ref<T>& dst,
                 const char* where) {
  check_adapter(src, where, "src");
  check_mask(mask, src.rank(), where);
  check_adapter(dst, where, "dst");
  const index_t kept = count_kept(mask), in = src.in_features(), out = src.out_features();
  ADALORA_REQUIRE(dst.rank() == kept, where, "dst must have rank = kept entries of mask = ", kept,
                  ", got rank ", dst.rank());
  check_shape(dst.A, kept, in, where, "dst.A", "kept x in_features");
  check_shape(dst.B, out, kept, where, "dst.B", "out_features x kept");
  index_t d = 0;
  for (index_t i = 0; i < src.rank(); ++i) {
    if (!static_cast<bool>(std::ranges::begin(mask)[i])) continue;
    for (index_t j = 0; j < in; ++j) dst.A(d, j) = src.A(i, j);
    dst.E[d] = src.E[i];
    for (index_t o = 0; o < out; ++o) dst.B(o, d) = src.B(o, i);
    ++d;
  }
}

}  // namespace detail::svd

/// Adapter forward, ADDED INTO y (n × out) for a batch x (n × in):
///   y += ((x · (A ⊙ E)ᵀ) · Bᵀ) · scaling / rn
/// (PEFT layer.py SVDLinear.forward, loralib adalora.py SVDLinear.forward; dropout is the
/// caller's: pass the dropped-out x). The base layer's x · Wᵀ + b is not included. Uses `ws` for
/// the r × in and n × r intermediates; allocates only when ws is too small.
template <class T>
void adapter_forward(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
                     const adapter_scale<T>& scale, std::type_identity_t<matrix_view<const T>> x,
                     std::type_identity_t<matrix_view<T>> y, adapter_workspace<T>& ws) {
  detail::svd::forward_impl(adapter, scale, x, y, ws, "adapter_forward");
}

/// Adapter backward from dy (n × out), ADDED INTO grads (like torch accumulating .grad) and,
/// unless dx is a default-constructed view, into dx (n × in). With c = scaling / rn applied as
/// torch's autograd does (dy / rn, then * scaling), h = x · (A ⊙ E)ᵀ, dh = (c·dy) · B:
///   dB += (c·dy)ᵀ · h,   dA += (dhᵀ · x) ⊙ E,   dE_i += Σ_j (dhᵀ · x)(i, j) · A(i, j),
///   dx += dh · (A ⊙ E).
/// The base weight's contribution to dx (dy · W) is not included. Uses `ws` for scratch.
template <class T>
void adapter_backward(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
                      const adapter_scale<T>& scale,
                      std::type_identity_t<matrix_view<const T>> x,
                      std::type_identity_t<matrix_view<const T>> dy,
                      const std::type_identity_t<svd_adapter_ref<T>>& grads,
                      adapter_workspace<T>& ws, std::type_identity_t<matrix_view<T>> dx = {}) {
  detail::svd::backward_impl(adapter, scale, x, dy, grads, ws, dx, "adapter_backward");
}

/// Writes (overwrites) ΔW = (B · (A ⊙ E)) · scaling / rn into `out` (out_features × in_features;
/// pass a transposed view for fan_in_fan_out storage). PEFT SVDLinear.get_delta_weight, loralib
/// SVDLinear.train()/eval(). `out` must not overlap the adapter's tensors.
template <class T>
void delta_weight(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
                  const adapter_scale<T>& scale, std::type_identity_t<matrix_view<T>> out) {
  detail::svd::delta_impl(adapter, scale, out, "delta_weight");
}

/// W += ΔW for a base weight W (out_features × in_features, any layout; fan_in_fan_out users
/// pass W.transposed()). PEFT SVDLinear.merge. With safe_merge (PEFT's safe_merge) every merged
/// value is checked to be finite first and std::invalid_argument is thrown, W unchanged, if one
/// is not. Allocates nothing. Not bit-reversible: unmerge(merge(W)) may differ from W in the
/// last bit (golden max_abs_diff_unmerged_vs_original_W).
template <class T>
void merge(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
           const adapter_scale<T>& scale, std::type_identity_t<matrix_view<T>> W,
           bool safe_merge = false) {
  detail::svd::merge_impl(adapter, scale, W, safe_merge, "merge");
}

/// W -= ΔW (PEFT SVDLinear.unmerge, loralib SVDLinear.train()); same layout rules as merge().
template <class T>
void unmerge(const std::type_identity_t<svd_adapter_ref<const T>>& adapter,
             const adapter_scale<T>& scale, std::type_identity_t<matrix_view<T>> W) {
  detail::svd::unmerge_impl(adapter, scale, W, "unmerge");
}

/// Number of true entries of a rank mask (PEFT: sum(rank_pattern[name])).
template <keep_mask M>
index_t kept_rank(const M& mask) {
  return detail::svd::count_kept(mask);
}

/// E_i = 0 where mask[i] is false (PEFT `lora_E.masked_fill_(~mask, 0.0)`,
/// RankAllocator.mask_using_rank_pattern); A and B are left alone. Returns the kept count.
template <class T, keep_mask M>
index_t mask_singular_values(vector_view<T> E, const M& mask) {
  static_assert(!std::is_const_v<T>,
                "adalora::mask_singular_values: E must be a view of mutable elements");
  detail::svd::check_view(E, "mask_singular_values", "E");
  detail::svd::check_mask(mask, E.size(), "mask_singular_values");
  for (index_t i = 0; i < E.size(); ++i)
    if (!static_cast<bool>(std::ranges::begin(mask)[i])) E[i] = T(0);
  return detail::svd::count_kept(mask);
}

/// Copies the kept triplets of `src` into `dst` (PEFT resize_state_dict_by_rank_pattern /
/// resize_modules_by_rank_pattern): the true rows of A, entries of E and columns of B, in order.
/// dst must be (kept × in), (kept), (out × kept); kept = 0 is allowed. Keep using the ORIGINAL
/// adapter_scale (r_init) with dst so that its output equals the masked src's.
template <class T, keep_mask M>
void resize_adapter(const std::type_identity_t<svd_adapter_ref<const T>>& src, const M& mask,
                    const svd_adapter_ref<T>& dst) {
  static_assert(!std::is_const_v<T>, "adalora::resize_adapter: dst must be a mutable adapter");
  detail::svd::resize_impl(src, mask, dst, "resize_adapter");
}

/// An adapter that owns its tensors and gradients (row-major std::vector storage) for users who
/// do not keep them in a framework of their own. A (r × in), E (r), B (out × r) as in
/// svd_adapter_ref; scaling / (r_init + 1e-5) as in adapter_scale. Forward and backward ADD INTO
/// their outputs; the gradients accumulate until zero_grad().
template <class T>
class svd_adapter {
  static_assert(std::is_floating_point_v<T> && !std::is_const_v<T>,
                "adalora::svd_adapter<T>: T must be a non-const floating-point type");

 public:
  /// A fresh adapter of rank r (r_init = r), all tensors zero; call initialize() for the
  /// references' random init. Throws unless in, out, r >= 0 and alpha is finite and >= 0.
  svd_adapter(index_t in_features, index_t out_features, index_t r, double alpha)
      : svd_adapter(in_features, out_features, r, adapter_scale<T>(alpha, r)) {}

  /// An adapter of rank r that keeps another adapter's scale (r_init): a resized or loaded one.
  svd_adapter(index_t in_features, index_t out_features, index_t r, const adapter_scale<T>& scale)
      : in_(in_features), out_(out_features), r_(r), scale_(scale) {
    ADALORA_REQUIRE(in_features >= 0 && out_features >= 0 && r >= 0, "svd_adapter",
                    "in_features, out_features and r must be >= 0, got ", in_features, ", ",
                    out_features, ", ", r);
    // Guard the products below against signed overflow.
    constexpr index_t limit = index_t{1} << 40;
    ADALORA_REQUIRE(in_features < limit && out_features < limit && r < limit &&
                        (r == 0 || std::max(in_features, out_features) < limit / r),
                    "svd_adapter", "the tensors of a ", out_features, " x ", in_features,
                    " adapter of rank ", r, " are too large");
    const auto na = static_cast<std::size_t>(r * in_features);
    const auto nb = static_cast<std::size_t>(out_features * r);
    const auto ne = static_cast<std::size_t>(r);
    A_.assign(na, T(0));
    dA_.assign(na, T(0));
    E_.assign(ne, T(0));
    dE_.assign(ne, T(0));
    B_.assign(nb, T(0));
    dB_.assign(nb, T(0));
  }

  index_t in_features() const noexcept { return in_; }
  index_t out_features() const noexcept { return out_; }
  index_t rank() const noexcept { return r_; }
  index_t r_init() const noexcept { return scale_.r_init(); }
  double alpha() const noexcept { return scale_.alpha(); }
  const adapter_scale<T>& scale() const noexcept { return scale_; }

  svd_adapter_ref<T> params() noexcept { return make_ref(A_, E_, B_); }
  svd_adapter_ref<const T> params() const noexcept { return make_cref(A_, E_, B_); }
  svd_adapter_ref<T> grads() noexcept { return make_ref(dA_, dE_, dB_); }
  svd_adapter_ref<const T> grads() const noexcept { return make_cref(dA_, dE_, dB_); }

  /// The references' init (PEFT reset_lora_parameters, loralib SVDLinear.reset_parameters):
  /// E = 0, then A ~ N(0, 0.02), then B ~ N(0, 0.02), drawn row-major from `rng` (the stream is
  /// not torch's). The adapter is an identity (ΔW = 0) afterwards. Gradients are zeroed.
  void initialize(std::mt19937_64& rng) {
    std::normal_distribution<T> normal(T(0), T(0.02));
    std::fill(E_.begin(), E_.end(), T(0));
    for (auto& a : A_) a = normal(rng);
    for (auto& b : B_) b = normal(rng);
    zero_grad();
  }

  /// y += adapter(x); see adapter_forward. Uses (and grows once) the adapter's own workspace.
  void forward(matrix_view<const T> x, matrix_view<T> y) {
    detail::svd::forward_impl(params_c(), scale_, x, y, ws_, "svd_adapter::forward");
  }

  /// grads() += gradients from dy, dx += input gradient unless dx is default-constructed; see
  /// adapter_backward.
  void backward(matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx = {}) {
    detail::svd::backward_impl(params_c(), scale_, x, dy, grads(), ws_, dx,
                               "svd_adapter::backward");
  }

  void zero_grad() noexcept {
    std::fill(dA_.begin(), dA_.end(), T(0));
    std::fill(dE_.begin(), dE_.end(), T(0));
    std::fill(dB_.begin(), dB_.end(), T(0));
  }

  /// Overwrites `out` with ΔW; see delta_weight().
  void delta_weight(matrix_view<T> out) const {
    detail::svd::delta_impl(params(), scale_, out, "svd_adapter::delta_weight");
  }
  /// W += ΔW; see merge().
  void merge(matrix_view<T> W, bool safe_merge = false) const {
    detail::svd::merge_impl(params(), scale_, W, safe_merge, "svd_adapter::merge");
  }
  /// W -= ΔW; see unmerge().
  void unmerge(matrix_view<T> W) const {
    detail::svd::unmerge_impl(params(), scale_, W, "svd_adapter::unmerge");
  }

  /// Zeroes E where mask is false; returns the kept count. See mask_singular_values().
  template <keep_mask M>
  index_t mask(const M& keep) {
    detail::svd::check_mask(keep, r_, "svd_adapter::mask");
    return mask_singular_values(vector_view<T>(E_.data(), r_), keep);
  }

  /// A new adapter with only the kept triplets, the same alpha and r_init (so its output equals
  /// this adapter's after mask(mask)) and zero gradients. PEFT resize_modules_by_rank_pattern.
  template <keep_mask M>
  svd_adapter resized(const M& keep) const {
    detail::svd::check_mask(keep, r_, "svd_adapter::resized");
    svd_adapter result(in_, out_, detail::svd::count_kept(keep), scale_);
    detail::svd::resize_impl(params(), keep, result.params(), "svd_adapter::resized");
    return result;
  }

  /// Becomes resized(mask).
  template <keep_mask M>
  void resize(const M& keep) {
    *this = resized(keep);
  }

  /// Applies a change of rank (rank_allocator::compact, ::grow; rank_change.hpp) to the
  /// parameters and gradients; new triplets start at zero (initialise them with a growth init
  /// policy). Dropping triplets happens in place, so views taken before stay valid at the new
  /// rank's extents; growth keeps the memory too while the rank fits reserve_rank(). r_init
  /// (the scale) never changes, so the output equals the masked adapter's.
  void change_rank(const triplet_map& m) {
    constexpr const char* where = "svd_adapter::change_rank";
    detail::check_triplet_map(m, false, where);
    ADALORA_REQUIRE(m.old_rank == r_, where, "the map's old rank must be the adapter's rank ", r_,
                    ", got ", m.old_rank);
    if (m.added() == 0) {
      compact(params(), m);
      compact(grads(), m);
      set_rank(m.new_rank());
      return;
    }
    // Growth moves elements to higher indices: remap from a copy of the old values.
    const svd_adapter before = *this;
    set_rank(m.new_rank());
    remap(before.params(), m, params());
    remap(before.grads(), m, grads());
  }

  /// Reserves memory for rank `capacity`, so that growth up to it keeps the tensors where they
  /// are (and the views an adapter_set holds of them valid, at the old extents).
  void reserve_rank(index_t capacity) {
    ADALORA_REQUIRE(capacity >= 0 && (capacity == 0 || std::max(in_, out_) < (index_t{1} << 40) / capacity),
                    "svd_adapter::reserve_rank", "capacity must be >= 0 and its tensors must fit, got ",
                    capacity);
    const auto c = static_cast<std::size_t>(capacity);
    for (std::vector<T>* v : {&A_, &dA_}) v->reserve(c * static_cast<std::size_t>(in_));
    for (std::vector<T>* v : {&E_, &dE_}) v->reserve(c);
    for (std::vector<T>* v : {&B_, &dB_}) v->reserve(c * static_cast<std::size_t>(out_));
  }

 private:
  svd_adapter_ref<T> make_ref(std::vector<T>& a, std::vector<T>& e, std::vector<T>& b) noexcept {
    return {matrix_view<T>(a.data(), r_, in_, in_, 1), vector_view<T>(e.data(), r_),
            matrix_view<T>(b.data(), out_, r_, r_, 1)};
  }
  svd_adapter_ref<const T> make_cref(const std::vector<T>& a, const std::vector<T>& e,
                                     const std::vector<T>& b) const noexcept {
    return {matrix_view<const T>(a.data(), r_, in_, in_, 1), vector_view<const T>(e.data(), r_),
            matrix_view<const T>(b.data(), out_, r_, r_, 1)};
  }
  svd_adapter_ref<const T> params_c() const noexcept { return params(); }

  void set_rank(index_t r) {
    const auto n = static_cast<std::size_t>(r);
    for (std::vector<T>* v : {&A_, &dA_}) v->resize(n * static_cast<std::size_t>(in_), T(0));
    for (std::vector<T>* v : {&E_, &dE_}) v->resize(n, T(0));
    for (std::vector<T>* v : {&B_, &dB_}) v->resize(n * static_cast<std::size_t>(out_), T(0));
    r_ = r;
  }

  index_t in_;
  index_t out_;
  index_t r_;
  adapter_scale<T> scale_;
  std::vector<T> A_, E_, B_;
  std::vector<T> dA_, dE_, dB_;
  adapter_workspace<T> ws_;
};

}  // namespace adalora
