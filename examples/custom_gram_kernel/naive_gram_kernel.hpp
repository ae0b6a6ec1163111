#pragma once
// A user-written Gram kernel for adalora's orthogonality regularizer: the skeleton of
// docs/orthogonality_kernels.md (keep the two in step). Plain loops in double, exact: it gives
// the portable kernel's bits, so it is the reference to test a faster kernel against.

#include "adalora/orthogonality.hpp"

/// Plain loops in double. Every Gram entry and every entry of D·m is summed one term at a time in
/// index order, as the portable kernel sums it, so the two give the same bits.
template <class T>
class naive_gram_kernel {
 public:
  using accumulator_type = double;

  void reserve(adalora::index_t /*max_rank*/) {}  // no scratch, so nothing to grow

  double gram_minus_identity(adalora::matrix_view<const T> m, double* d) noexcept {
    const adalora::index_t r = m.rows(), n = m.cols();
    for (adalora::index_t i = 0; i < r; ++i)
      for (adalora::index_t j = i; j < r; ++j) {  // the upper triangle; the finish mirrors it
        double s = 0;
        for (adalora::index_t k = 0; k < n; ++k) s += double(m(i, k)) * double(m(j, k));
        d[i * r + j] = s;
      }
    return adalora::finish_gram_minus_identity(d, r);  // D = C − I, mirrored; ||D||²_F
  }

  void add_scaled_product(const double* d, double scale, adalora::matrix_view<const T> m,
                          adalora::matrix_view<T> g) noexcept {
    const adalora::index_t r = m.rows(), n = m.cols();
    for (adalora::index_t i = 0; i < r; ++i)
      for (adalora::index_t k = 0; k < n; ++k) {
        double s = 0;
        for (adalora::index_t j = 0; j < r; ++j) s += d[i * r + j] * double(m(j, k));
        g(i, k) = static_cast<T>(double(g(i, k)) + scale * s);  // one rounding per element
      }
  }
};

static_assert(adalora::GramKernel<naive_gram_kernel<float>, float>);
static_assert(adalora::GramKernel<naive_gram_kernel<double>, double>);
