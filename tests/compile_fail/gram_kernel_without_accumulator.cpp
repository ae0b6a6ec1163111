// A Gram kernel for orthogonality_regularizer<T, Kernel> that forgets `accumulator_type`: the
// regularizer must refuse it and say what to declare (GramKernel requirement 1).
// expect-error: adalora: a Gram kernel needs `using accumulator_type = Acc;`
#include "adalora/orthogonality.hpp"

struct no_accumulator_kernel {
  void reserve(adalora::index_t) {}
  double gram_minus_identity(adalora::matrix_view<const float>, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, adalora::matrix_view<const float>,
                          adalora::matrix_view<float>) noexcept {}
};

int main() {
  adalora::orthogonality_regularizer<float, no_accumulator_kernel> orth;
  return static_cast<int>(orth.options().weight);
}
