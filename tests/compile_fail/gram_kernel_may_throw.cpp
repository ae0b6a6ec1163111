// A Gram kernel whose compute calls are not noexcept: a throw halfway through the gradient would
// leave the user's gradients half-updated, so the regularizer refuses it (GramKernel requirement
// 6).
// expect-error: a Gram kernel's gram_minus_identity and add_scaled_product must be noexcept
#include "adalora/orthogonality.hpp"

struct throwing_kernel {
  using accumulator_type = double;
  void reserve(adalora::index_t) {}
  double gram_minus_identity(adalora::matrix_view<const float>, double*) { return 0; }
  void add_scaled_product(const double*, double, adalora::matrix_view<const float>,
                          adalora::matrix_view<float>) {}
};

int main() {
  adalora::orthogonality_regularizer<float, throwing_kernel> orth;
  return static_cast<int>(orth.options().weight);
}
