#pragma once
// Views of one SVD adapter's three tensors, in the layout of the reference implementations.

#include <type_traits>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {

/// The tensors of one adapted weight, W0 + B·diag(E)·A · scaling / (r_init + 1e-5):
///   A  (r × in)   lora_A, the right singular vectors Q of the paper (rows),
///   E  (r)        lora_E, the singular values λ (PEFT stores it as an (r, 1) column),
///   B  (out × r)  lora_B, the left singular vectors P of the paper (columns).
/// The same struct carries the gradients of those tensors. It never owns memory.
template <class T>
struct svd_adapter_ref {
  matrix_view<T> A;
  vector_view<T> E;
  matrix_view<T> B;

  constexpr index_t rank() const noexcept { return E.size(); }
  constexpr index_t in_features() const noexcept { return A.cols(); }
  constexpr index_t out_features() const noexcept { return B.rows(); }

  /// A read-only view of the same tensors.
  constexpr operator svd_adapter_ref<const T>() const noexcept  // NOLINT: implicit by design
    requires(!std::is_const_v<T>)
  {
    return {A, E, B};
  }

  /// Throws unless A is r × in and B is out × r with r = E.size(); `where` names the caller.
  void check_shapes(const char* where, const char* argument = "adapter") const {
    ADALORA_REQUIRE(A.rows() == E.size(), where, argument, ".A must have E.size() = ", E.size(),
                    " rows (one per singular value), got ", A.rows(), " x ", A.cols());
    ADALORA_REQUIRE(B.cols() == E.size(), where, argument, ".B must have E.size() = ", E.size(),
                    " columns (one per singular value), got ", B.rows(), " x ", B.cols());
  }
};

/// Throws unless `grads` has exactly the shapes of `params`.
template <class T, class U>
void check_same_shapes(const svd_adapter_ref<T>& params, const svd_adapter_ref<U>& grads,
                       const char* where) {
  ADALORA_REQUIRE(grads.A.rows() == params.A.rows() && grads.A.cols() == params.A.cols(), where,
                  "gradient of A must be ", params.A.rows(), " x ", params.A.cols(), ", got ",
                  grads.A.rows(), " x ", grads.A.cols());
  ADALORA_REQUIRE(grads.E.size() == params.E.size(), where, "gradient of E must have size ",
                  params.E.size(), ", got ", grads.E.size());
  ADALORA_REQUIRE(grads.B.rows() == params.B.rows() && grads.B.cols() == params.B.cols(), where,
                  "gradient of B must be ", params.B.rows(), " x ", params.B.cols(), ", got ",
                  grads.B.rows(), " x ", grads.B.cols());
}

}  // namespace adalora
