// A Gram kernel whose gram_minus_identity returns the element type instead of its accumulator
// type, and whose gradient member has another name: both must be named with the expected
// signature (GramKernel requirements 4 and 5).
// expect-error: adalora: a Gram kernel needs the member function `Acc gram_minus_identity(
// expect-error: adalora: a Gram kernel needs the member function `void add_scaled_product(
#include "adalora/orthogonality.hpp"

struct misnamed_kernel {
  using accumulator_type = double;
  void reserve(adalora::index_t) {}
  float gram_minus_identity(adalora::matrix_view<const float>, double*) noexcept { return 0; }
  void add_gradient(const double*, double, adalora::matrix_view<const float>,
                    adalora::matrix_view<float>) noexcept {}
};

int main() {
  adalora::orthogonality_regularizer<float, misnamed_kernel> orth;
  return static_cast<int>(orth.options().weight);
}
