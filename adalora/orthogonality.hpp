#pragma once
// The orthogonality regularizer of AdaLoRA over a set of SVD adapters: value and analytic gradient.
//
// For every adapter the regularizer looks at two r × r Gram matrices,
//     C(A) = A·Aᵀ   (A = lora_A, r × in: its rows should be orthonormal)
//     C(B) = Bᵀ·B   (B = lora_B, out × r: its columns should be orthonormal)
// and at f(M) = ||C(M) − I||_F. E (the singular values) does not enter. All r rows/columns count,
// including those of masked (pruned) triplets, as in both references.
//
// Both C(A) and C(B) are "M·Mᵀ with M = the r vectors as rows" (M = A, or M = Bᵀ, which is just a
// transposed view of B), so one kernel serves both and the gradients are
//     ∇_M f  = 2 (C − I) M / f          ∇_M f² = 4 (C − I) M          (C symmetric)
// i.e. ∇_A f = 2 (C − I) A / f and ∇_B f = 2 B (C − I) / f.
//
// The Gram products are a policy, the Kernel parameter of orthogonality_regularizer<T, Kernel>,
// so that a GEMM-class implementation (adalora/integrations/eigen_gram_kernel.hpp) can replace
// the portable one without the core depending on it. Requirements (the GramKernel concept), for a
// kernel type K and element type T, with Acc = K::accumulator_type:
//  1. `using accumulator_type = Acc;`: a cv-unqualified floating-point type in which the Gram
//     matrix and the gradient are accumulated (double for float input keeps C − I accurate where
//     it cancels; see detail::orth_accumulator_t).
//  2. K is default-constructible: the regularizer holds one kernel by value.
//  3. `void reserve(index_t max_rank)`: grows the kernel's scratch; afterwards calls with
//     r <= max_rank must allocate nothing (the regularizer's per-step no-allocation guarantee).
//  4. `Acc gram_minus_identity(matrix_view<const T> m, Acc* d) noexcept`: m is r × n with any
//     strides (row-major A, or the transposed view of a row-major B); writes D = m·mᵀ − I into d
//     (r × r, row-major, all r² entries, symmetric) and returns ||D||²_F. d has room for r²
//     values. finish_gram_minus_identity does the "− I, mirror, norm" part from an upper
//     triangle.
//  5. `void add_scaled_product(const Acc* d, Acc scale, matrix_view<const T> m,
//                              matrix_view<T> g) noexcept`: g (r × n like m, not overlapping it)
//     += scale · D · m, each element updated as T(Acc(g) + scale·(D·m)(i, k)), one rounding.
//  6. Both calls in 4 and 5 are noexcept: the regularizer validates every input before it writes
//     anything, and a kernel that threw halfway would leave the gradients half-updated.
// The regularizer calls check_gram_kernel<K, T>(), which names each signature requirement a
// kernel misses in its own static_assert. The behaviour (values, symmetry, no allocation after
// reserve) the compiler cannot check: docs/orthogonality_kernels.md says how to write a kernel
// and test it against portable_gram_kernel.

#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "adalora/adapter_set.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// Which regularizer to compute over the N = 2·(number of adapters) matrices M (every lora_A and
/// every lora_B), with f(M) = ||C(M) − I||_F.
enum class orthogonality_form {
  /// R = w · (1/N) · Σ_M f(M), the Frobenius norm NOT squared, averaged over the matrices: what
  /// the reference code computes (loralib compute_orth_regu; PEFT AdaLoraModel.forward, which
  /// adds it to outputs.loss). See docs/algorithm.md §8.
  reference_mean,
  /// R = w · Σ_M f(M)², squared and summed (no mean): the paper's regularizer
  /// R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F summed over the adapted weights with weight γ
  /// (Zhang et al., "AdaLoRA", ICLR 2023, training objective of §3.1; P = B, Q = A). Smooth
  /// everywhere, unlike the unsquared norm; its scale does not depend on the number of adapters.
  paper_squared,
};

/// How the reference_mean form associates w, the sum S = Σ f(M) and N. Both are computed in the
/// element type, as the references do, so they can differ in the last bit (golden
/// orth_reg_f32.json: 1.6622413 vs 1.6622412 for w = 0.1). Ignored by paper_squared.
enum class orthogonality_association {
  peft,  ///< w · (S / N): PEFT AdaLoraModel.forward, `orth_reg_weight * (regu_loss / num_param)`
  loralib,  ///< (w · S) / N: loralib compute_orth_regu, `regu_weight * regu_loss / num_param`
};

/// Options of orthogonality_regularizer; validated when the regularizer is constructed.
struct orthogonality_options {
  /// w >= 0 and finite (PEFT raises for orth_reg_weight < 0). Default 0.5 is PEFT's
  /// orth_reg_weight; loralib's compute_orth_regu defaults to 0.1.
  double weight = 0.5;
  orthogonality_form form = orthogonality_form::reference_mean;
  orthogonality_association association = orthogonality_association::peft;
};

namespace detail {

/// Accumulator of the kernels: double for float and double (long double stays long double).
/// Why: C − I cancels (C ≈ I near a solution) and the Gram dot products run over in/out, which is
/// thousands of terms; float accumulation would lose ~log2(n) bits exactly where the regularizer
/// is small. Products of two floats are exact in double, so for f32 inputs the norm comes out
/// correctly rounded in practice, and it is rounded to the element type once, at the end.
template <class T>
using orth_accumulator_t =
    std::conditional_t<(std::numeric_limits<T>::digits > std::numeric_limits<double>::digits), T,
                       double>;

inline void validate_orthogonality_options(const orthogonality_options& o, const char* where) {
  ADALORA_REQUIRE(std::isfinite(o.weight) && o.weight >= 0, where,
                  "weight must be finite and >= 0, got ", o.weight);
  ADALORA_REQUIRE(
      o.form == orthogonality_form::reference_mean || o.form == orthogonality_form::paper_squared,
      where, "form must be reference_mean or paper_squared, got ", static_cast<int>(o.form));
  ADALORA_REQUIRE(o.association == orthogonality_association::peft ||
                      o.association == orthogonality_association::loralib,
                  where, "association must be peft or loralib, got ",
                  static_cast<int>(o.association));
}

/// The last step of the reference_mean form, in T exactly as torch evaluates it on a 0-d tensor
/// (the Python float w and int N become T before the one multiplication and one division).
template <class T>
T finish_reference_mean(T sum, std::size_t count, double weight,
                        orthogonality_association association) noexcept {
  const T w = static_cast<T>(weight);
  const T n = static_cast<T>(count);
  return association == orthogonality_association::loralib ? (w * sum) / n : w * (sum / n);
}

/// The finish every Gram kernel shares, on the r × r Gram C = M·Mᵀ of which the upper triangle
/// is filled: D = C − I in place, the lower triangle mirrored (the contract asks for all r²
/// entries), and ||D||_F² formed from the upper triangle in a fixed order.
template <class Acc>
Acc finish_gram(Acc* d, index_t r) noexcept {
  Acc diagonal = 0;
  Acc off_diagonal = 0;
  for (index_t i = 0; i < r; ++i) {
    d[i * r + i] -= 1;
    diagonal += d[i * r + i] * d[i * r + i];
    for (index_t j = i + 1; j < r; ++j) {
      d[j * r + i] = d[i * r + j];
      off_diagonal += d[i * r + j] * d[i * r + j];
    }
  }
  return diagonal + 2 * off_diagonal;
}

}  // namespace detail

/// For writers of a Gram kernel (requirement 4): given the upper triangle (j >= i) of the r × r
/// Gram C = M·Mᵀ in d (row-major), forms D = C − I in place, mirrors it into the lower triangle
/// and returns ||D||²_F, summed in the built-in kernels' order. A kernel whose Gram entries are
/// the same bits as the portable kernel's then returns the same norm, bit for bit.
template <class Acc>
Acc finish_gram_minus_identity(Acc* d, index_t r) noexcept {
  return detail::finish_gram(d, r);
}

namespace detail {
template <class K>
concept gram_has_accumulator = requires { typename K::accumulator_type; } &&
                               std::floating_point<typename K::accumulator_type> &&
                               !std::is_const_v<typename K::accumulator_type> &&
                               !std::is_volatile_v<typename K::accumulator_type>;
template <class K>
concept gram_has_reserve = requires(K& kernel, index_t max_rank) { kernel.reserve(max_rank); };
template <class K, class T>
concept gram_has_gram_minus_identity =
    gram_has_accumulator<K> &&
    requires(K& kernel, matrix_view<const T> m, typename K::accumulator_type* d) {
      { kernel.gram_minus_identity(m, d) } -> std::same_as<typename K::accumulator_type>;
    };
template <class K, class T>
concept gram_has_add_scaled_product =
    gram_has_accumulator<K> &&
    requires(K& kernel, const typename K::accumulator_type* d, typename K::accumulator_type scale,
             matrix_view<const T> m, matrix_view<T> g) {
      kernel.add_scaled_product(d, scale, m, g);
    };
template <class K, class T>
concept gram_calls_noexcept =
    gram_has_gram_minus_identity<K, T> && gram_has_add_scaled_product<K, T> &&
    requires(K& kernel, matrix_view<const T> m, matrix_view<T> g,
             typename K::accumulator_type* d, const typename K::accumulator_type* cd,
             typename K::accumulator_type scale) {
      { kernel.gram_minus_identity(m, d) } noexcept;
      { kernel.add_scaled_product(cd, scale, m, g) } noexcept;
    };
}  // namespace detail

/// K computes the regularizer's Gram products for elements of type T; see the requirements at
/// the top of this header.
template <class K, class T>
concept GramKernel = detail::gram_has_accumulator<K> && std::default_initializable<K> &&
                     detail::gram_has_reserve<K> && detail::gram_has_gram_minus_identity<K, T> &&
                     detail::gram_has_add_scaled_product<K, T> && detail::gram_calls_noexcept<K, T>;

/// Names each requirement a Gram kernel misses, at compile time (requirements 4 to 6 are only
/// checked once accumulator_type exists, since they are written in terms of it).
template <class K, class T>
consteval bool check_gram_kernel() {
  static_assert(detail::gram_has_accumulator<K>,
                "adalora: a Gram kernel needs `using accumulator_type = Acc;`, a cv-unqualified "
                "floating-point type in which it accumulates the Gram matrix and the gradient "
                "(e.g. double for float input, as portable_gram_kernel)");
  static_assert(std::default_initializable<K>,
                "adalora: a Gram kernel must be default-constructible (orthogonality_regularizer "
                "holds one by value)");
  static_assert(detail::gram_has_reserve<K>,
                "adalora: a Gram kernel needs the member function `void reserve(adalora::index_t "
                "max_rank)`, after which calls with r <= max_rank allocate nothing");
  if constexpr (detail::gram_has_accumulator<K>) {
    static_assert(detail::gram_has_gram_minus_identity<K, T>,
                  "adalora: a Gram kernel needs the member function `Acc gram_minus_identity("
                  "adalora::matrix_view<const T> m, Acc* d) noexcept` (Acc = accumulator_type) "
                  "that writes D = m * m^T - I (r x r, row-major, all r*r entries) into d and "
                  "returns its squared Frobenius norm as Acc");
    static_assert(detail::gram_has_add_scaled_product<K, T>,
                  "adalora: a Gram kernel needs the member function `void add_scaled_product("
                  "const Acc* d, Acc scale, adalora::matrix_view<const T> m, "
                  "adalora::matrix_view<T> g) noexcept` (Acc = accumulator_type) that adds "
                  "scale * D * m into g");
    if constexpr (detail::gram_has_gram_minus_identity<K, T> &&
                  detail::gram_has_add_scaled_product<K, T>)
      static_assert(detail::gram_calls_noexcept<K, T>,
                    "adalora: a Gram kernel's gram_minus_identity and add_scaled_product must be "
                    "noexcept (the regularizer validates every input before it writes; a kernel "
                    "that threw halfway would leave the gradients half-updated)");
  }
  return true;
}

/// The portable (standard-library only) kernel of the regularizer, and the reference for the
/// GramKernel requirements at the top of this header.
///
/// How this one is fast without reassociating sums (it must give the same bits everywhere, so
/// no -ffast-math-style reductions): blocks of `block` columns of m are packed, converted to Acc,
/// into a k-major panel P[k][i] (a transposed copy for a row-major A, a plain copy for a
/// row-major B), whatever the strides. Then every update runs along a contiguous index of
/// independent outputs, which the compiler vectorizes:
///   Gram:      D[i][j] += P[k][i]·P[k][j] for j >= i (upper triangle: half the FLOPs),
///   gradient:  Q[k][i] += D[j][i]·P[k][j] (D symmetric, so row j of D is column j),
/// four k (resp. four columns of Q) per pass over D to cut its loads and stores. Each output
/// still sums its terms one at a time in index order, exactly as the naive dot product would.
template <class T>
class portable_gram_kernel {
 public:
  using accumulator_type = detail::orth_accumulator_t<T>;
  /// Columns of m per packed panel: 2 · block · r accumulators of workspace.
  static constexpr index_t block = 64;

  void reserve(index_t max_rank) {
    const auto needed = static_cast<std::size_t>(2 * block * (max_rank > 0 ? max_rank : 0));
    if (work_.size() < needed) work_.resize(needed);
  }

  accumulator_type gram_minus_identity(matrix_view<const T> m, accumulator_type* d) noexcept {
    using acc = accumulator_type;
    const index_t r = m.rows();
    const index_t n = m.cols();
    acc* panel = work_.data();
    for (index_t i = 0; i < r; ++i)
      for (index_t j = i; j < r; ++j) d[i * r + j] = 0;
    for (index_t k0 = 0; k0 < n; k0 += block) {
      const index_t kb = n - k0 < block ? n - k0 : block;
      pack(m, k0, kb, panel);
      index_t k = 0;
      for (; k + 4 <= kb; k += 4) {
        const acc* p0 = panel + k * r;
        const acc* p1 = p0 + r;
        const acc* p2 = p1 + r;
        const acc* p3 = p2 + r;
        for (index_t i = 0; i < r; ++i) {
          const acc a0 = p0[i], a1 = p1[i], a2 = p2[i], a3 = p3[i];
          acc* di = d + i * r;
          for (index_t j = i; j < r; ++j) {
            acc s = di[j];
            s += a0 * p0[j];
            s += a1 * p1[j];
            s += a2 * p2[j];
            s += a3 * p3[j];
            di[j] = s;
          }
        }
      }
      for (; k < kb; ++k) {
        const acc* p0 = panel + k * r;
        for (index_t i = 0; i < r; ++i) {
          const acc a0 = p0[i];
          acc* di = d + i * r;
          for (index_t j = i; j < r; ++j) di[j] += a0 * p0[j];
        }
      }
    }
    return detail::finish_gram(d, r);
  }

  void add_scaled_product(const accumulator_type* d, accumulator_type scale, matrix_view<const T> m,
                          matrix_view<T> g) noexcept {
    using acc = accumulator_type;
    const index_t r = m.rows();
    const index_t n = m.cols();
    acc* panel = work_.data();
    acc* out = panel + block * r;  // Q[k][i] = (D·m)(i, k0 + k)
    for (index_t k0 = 0; k0 < n; k0 += block) {
      const index_t kb = n - k0 < block ? n - k0 : block;
      pack(m, k0, kb, panel);
      for (index_t x = 0; x < kb * r; ++x) out[x] = 0;
      index_t k = 0;
      for (; k + 4 <= kb; k += 4) {
        acc* q0 = out + k * r;
        acc* q1 = q0 + r;
        acc* q2 = q1 + r;
        acc* q3 = q2 + r;
        const acc* p = panel + k * r;
        for (index_t j = 0; j < r; ++j) {
          const acc b0 = p[j], b1 = p[r + j], b2 = p[2 * r + j], b3 = p[3 * r + j];
          const acc* dj = d + j * r;
          for (index_t i = 0; i < r; ++i) {
            const acc dji = dj[i];
            q0[i] += dji * b0;
            q1[i] += dji * b1;
            q2[i] += dji * b2;
            q3[i] += dji * b3;
          }
        }
      }
      for (; k < kb; ++k) {
        acc* q0 = out + k * r;
        const acc* p = panel + k * r;
        for (index_t j = 0; j < r; ++j) {
          const acc b0 = p[j];
          const acc* dj = d + j * r;
          for (index_t i = 0; i < r; ++i) q0[i] += dj[i] * b0;
        }
      }
      // Unpack along whichever index of g is contiguous.
      if (detail::rows_are_contiguous(g)) {
        for (index_t i = 0; i < r; ++i)
          for (index_t kk = 0; kk < kb; ++kk) {
            T& gik = g(i, k0 + kk);
            gik = static_cast<T>(static_cast<acc>(gik) + scale * out[kk * r + i]);
          }
      } else {
        for (index_t kk = 0; kk < kb; ++kk)
          for (index_t i = 0; i < r; ++i) {
            T& gik = g(i, k0 + kk);
            gik = static_cast<T>(static_cast<acc>(gik) + scale * out[kk * r + i]);
          }
      }
    }
  }

 private:
  /// panel[k][i] = Acc(m(i, k0 + k)) for k < kb, reading m along its contiguous index.
  static void pack(const matrix_view<const T>& m, index_t k0, index_t kb,
                   accumulator_type* panel) noexcept {
    const index_t r = m.rows();
    if (detail::rows_are_contiguous(m)) {
      for (index_t i = 0; i < r; ++i)
        for (index_t k = 0; k < kb; ++k)
          panel[k * r + i] = static_cast<accumulator_type>(m(i, k0 + k));
    } else {
      for (index_t k = 0; k < kb; ++k)
        for (index_t i = 0; i < r; ++i)
          panel[k * r + i] = static_cast<accumulator_type>(m(i, k0 + k));
    }
  }

  std::vector<accumulator_type> work_;
};

/// The references' reduction of per-matrix norms to the regularizer value:
///     S = Σ norms[i] summed in T in the given order (loralib/PEFT: `regu_loss += norm`),
///     R = w · (S / N) (PEFT) or (w · S) / N (loralib), in T, N = norms.size().
/// Given the same per-matrix norms it reproduces the references' totals bit for bit (golden
/// orth_reg_*.json). A sum of non-negative terms has no cancellation (relative error <= (N−1)·u),
/// so mirroring the references here costs no meaningful accuracy. Throws std::invalid_argument
/// for an empty `norms` (the mean over zero matrices is undefined) or a bad weight.
template <class T>
T orthogonality_mean_from_norms(std::span<const T> norms, double weight,
                                orthogonality_association association) {
  constexpr const char* where = "orthogonality_mean_from_norms";
  detail::validate_orthogonality_options({weight, orthogonality_form::reference_mean, association},
                                         where);
  ADALORA_REQUIRE(!norms.empty(), where,
                  "norms must hold at least one value (the mean over zero matrices is "
                  "undefined), got 0");
  T sum = 0;
  for (const T x : norms) sum += x;
  return detail::finish_reference_mean(sum, norms.size(), weight, association);
}

/// AdaLoRA's orthogonality regularizer over a set of adapters, with its analytic gradient.
///
///   reference_mean (default):  R = w · (1/N) · Σ_M ||C(M) − I||_F
///                              (loralib compute_orth_regu, PEFT AdaLoraModel.forward;
///                              docs/algorithm.md §8)
///   paper_squared:             R = w · Σ_M ||C(M) − I||²_F
///                              (the paper's form; docs/algorithm.md §11)
/// over every M in {A_k, B_k}, C(A) = A·Aᵀ, C(B) = Bᵀ·B, N = 2·(number of adapters).
///
/// Guarantees:
///  * The per-step calls allocate nothing once the scratch (D, r × r, and the kernel's panels,
///    2·64·r) has grown to the largest rank seen, or after reserve(); one regularizer per thread.
///  * Gradients are ADDED into the grads views (torch's `.grad` accumulation):
///        grad_A += w/N · 2 (C − I) A / f,   grad_B += w/N · 2 B (C − I) / f     (reference_mean)
///        grad_A += w · 4 (C − I) A,         grad_B += w · 4 B (C − I)           (paper_squared)
///    grads.E is neither read, written nor checked. grads must not overlap params.
///  * Where f = 0 (C = I exactly) the unsquared norm has no gradient; this class uses 0 there, a
///    valid subgradient (f's minimum), so an exactly orthonormal A or B yields no NaN.
///  * Every input is validated before anything is written (no partial update on error).
///  * Rank-0 adapters contribute f = 0 and, as in the references, still count in N.
///  * Values: per-matrix norms accumulate in Kernel::accumulator_type (double for float and
///    double; see detail::orth_accumulator_t for why) and are rounded to T once; their sum and
///    the weight/mean are then done in T in the references' order (orthogonality_mean_from_norms),
///    so the two associations reproduce the references' last-bit difference. Gradients are
///    computed in the accumulator type too and rounded once when added. Non-finite parameters
///    give non-finite results (not checked).
template <class T, class Kernel = portable_gram_kernel<T>>
class orthogonality_regularizer {
  static_assert(std::is_floating_point_v<T> && !std::is_const_v<T>,
                "adalora::orthogonality_regularizer<T>: T must be a cv-unqualified floating-point "
                "type (float or double)");

  static_assert(check_gram_kernel<Kernel, T>());

 public:
  using value_type = T;
  using kernel_type = Kernel;
  using accumulator_type = typename Kernel::accumulator_type;

  /// Throws std::invalid_argument for a negative or non-finite weight or an unknown enumerator.
  explicit orthogonality_regularizer(const orthogonality_options& options = {})
      : options_(options) {
    detail::validate_orthogonality_options(options_, "orthogonality_regularizer");
  }

  const orthogonality_options& options() const noexcept { return options_; }

  /// Grows the scratch for adapters of rank up to `max_rank`, so that even the first call
  /// allocates nothing.
  void reserve(index_t max_rank) {
    ADALORA_REQUIRE(max_rank >= 0, "orthogonality_regularizer::reserve",
                    "max_rank must be >= 0, got ", max_rank);
    grow(max_rank);
  }

  /// R for `params`. If `norms` is non-empty it must have 2·params.size() elements and receives
  /// the per-matrix ||C − I||_F (unsquared, whatever the form) in the order A_0, B_0, A_1, B_1, …
  /// (the references' parameter order). Throws std::invalid_argument for an empty set, an adapter
  /// whose A/B do not have E.size() rows/columns, or a wrongly sized `norms`.
  T value(std::span<const svd_adapter_ref<const T>> params, std::span<T> norms = {}) {
    return run<const T>("orthogonality_regularizer::value", params, nullptr, norms);
  }
  /// Same, for mutable views of the parameters.
  T value(std::span<const svd_adapter_ref<T>> params, std::span<T> norms = {}) {
    return run<T>("orthogonality_regularizer::value", params, nullptr, norms);
  }

  /// R as value() does, and adds ∂R/∂A, ∂R/∂B into grads[k].A, grads[k].B (see the class
  /// comment). Also throws when grads.size() != params.size() or a gradient's shape differs
  /// from its parameter's.
  T value_and_gradient(std::span<const svd_adapter_ref<const T>> params,
                       std::span<const svd_adapter_ref<T>> grads, std::span<T> norms = {}) {
    return run<const T>("orthogonality_regularizer::value_and_gradient", params, &grads, norms);
  }
  /// Same, for mutable views of the parameters.
  T value_and_gradient(std::span<const svd_adapter_ref<T>> params,
                       std::span<const svd_adapter_ref<T>> grads, std::span<T> norms = {}) {
    return run<T>("orthogonality_regularizer::value_and_gradient", params, &grads, norms);
  }

  /// R of an adapter_set's adapters, and (value_and_gradient) its gradient added into theirs.
  T value(const adapter_set<T>& adapters, std::span<T> norms = {}) {
    return value(adapters.params(), norms);
  }
  T value_and_gradient(const adapter_set<T>& adapters, std::span<T> norms = {}) {
    return value_and_gradient(adapters.params(), adapters.grads(), norms);
  }

 private:
  using acc_t = accumulator_type;

  void grow(index_t max_rank) {
    const auto needed = static_cast<std::size_t>(max_rank) * static_cast<std::size_t>(max_rank);
    if (scratch_.size() < needed) scratch_.resize(needed);
    kernel_.reserve(max_rank);
  }

  template <class P>
  T run(const char* where, std::span<const svd_adapter_ref<P>> params,
        const std::span<const svd_adapter_ref<T>>* grads, std::span<T> norms) {
    // ---- validate everything first: no partial update on error ----
    ADALORA_REQUIRE(!params.empty(), where,
                    "params must hold at least one adapter (the mean over zero matrices is "
                    "undefined), got 0");
    const std::size_t count = 2 * params.size();
    ADALORA_REQUIRE(norms.empty() || norms.size() == count, where,
                    "norms must be empty or have 2 * params.size() = ", count, " elements, got ",
                    norms.size());
    if (grads != nullptr)
      ADALORA_REQUIRE(grads->size() == params.size(), where,
                      "grads must have params.size() = ", params.size(), " adapters, got ",
                      grads->size());
    index_t max_rank = 0;
    for (std::size_t k = 0; k < params.size(); ++k) {
      const auto& p = params[k];
      const index_t r = p.rank();
      ADALORA_REQUIRE(p.A.rows() == r, where, "params[", k, "].A must have E.size() = ", r,
                      " rows (one per singular value), got ", p.A.rows(), " x ", p.A.cols());
      ADALORA_REQUIRE(p.B.cols() == r, where, "params[", k, "].B must have E.size() = ", r,
                      " columns (one per singular value), got ", p.B.rows(), " x ", p.B.cols());
      if (grads != nullptr) {
        const auto& g = (*grads)[k];
        ADALORA_REQUIRE(g.A.rows() == p.A.rows() && g.A.cols() == p.A.cols(), where, "grads[", k,
                        "].A must be ", p.A.rows(), " x ", p.A.cols(), " like params[", k,
                        "].A, got ", g.A.rows(), " x ", g.A.cols());
        ADALORA_REQUIRE(g.B.rows() == p.B.rows() && g.B.cols() == p.B.cols(), where, "grads[", k,
                        "].B must be ", p.B.rows(), " x ", p.B.cols(), " like params[", k,
                        "].B, got ", g.B.rows(), " x ", g.B.cols());
      }
      if (r > max_rank) max_rank = r;
    }
    grow(max_rank);

    // ---- compute ----
    const bool mean = options_.form == orthogonality_form::reference_mean;
    // d/df of the weighted term: w/N for the mean (then ∇f = 2(C−I)M/f), w for f² (∇f² = 4(C−I)M).
    const acc_t weight = static_cast<acc_t>(options_.weight);
    const acc_t per_matrix = mean ? weight / static_cast<acc_t>(count) : weight;
    acc_t* d = scratch_.data();
    T sum = 0;
    for (std::size_t k = 0; k < params.size(); ++k) {
      for (int which = 0; which < 2; ++which) {
        // M = A, or M = Bᵀ (a transposed view, no copy): C(M) = M·Mᵀ in both cases.
        const matrix_view<const T> m = which == 0 ? matrix_view<const T>(params[k].A)
                                                  : matrix_view<const T>(params[k].B).transposed();
        const acc_t squared = kernel_.gram_minus_identity(m, d);
        const acc_t f = std::sqrt(squared);
        if (!norms.empty()) norms[2 * k + static_cast<std::size_t>(which)] = static_cast<T>(f);
        sum += static_cast<T>(mean ? f : squared);
        if (grads == nullptr) continue;
        // f == 0 only when C = I exactly: the subgradient 0 is used (documented above).
        const acc_t scale = mean ? (f > 0 ? per_matrix * 2 / f : acc_t(0)) : per_matrix * 4;
        if (scale == 0) continue;
        const auto& g = (*grads)[k];
        const matrix_view<T> gm = which == 0 ? g.A : g.B.transposed();
        kernel_.add_scaled_product(static_cast<const acc_t*>(d), scale, m, gm);
      }
    }
    return mean ? detail::finish_reference_mean(sum, count, options_.weight, options_.association)
                : static_cast<T>(options_.weight) * sum;
  }

  orthogonality_options options_;
  std::vector<acc_t> scratch_;  // D = C − I of the current matrix, r × r
  Kernel kernel_;
};

}  // namespace adalora
