// A Gram kernel that cannot be default-constructed (it takes its block size in its constructor)
// and has no reserve(): both requirements must be named (GramKernel requirements 2 and 3).
// expect-error: adalora: a Gram kernel must be default-constructible
// expect-error: adalora: a Gram kernel needs the member function `void reserve(adalora::index_t
// expect-error: `void reserve(adalora::index_t max_rank)`, after which calls with r <= max_rank
#include "adalora/orthogonality.hpp"

struct sized_kernel {
  using accumulator_type = double;
  explicit sized_kernel(adalora::index_t block) : block_(block) {}
  double gram_minus_identity(adalora::matrix_view<const float>, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, adalora::matrix_view<const float>,
                          adalora::matrix_view<float>) noexcept {}
  adalora::index_t block_;
};

int main() {
  adalora::orthogonality_regularizer<float, sized_kernel> orth;
  return static_cast<int>(orth.options().weight);
}
