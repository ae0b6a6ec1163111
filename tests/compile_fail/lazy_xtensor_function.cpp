// An xt::xfunction (a + b) is lazy: as_matrix must refuse it at compile time.
// expect-error: adalora::as_matrix: this is a lazy expression
#include <xtensor/xtensor.hpp>

#include "adalora/integrations/xtensor.hpp"

int main() {
  xt::xtensor<double, 2> a = xt::zeros<double>({2, 2});
  auto view = adalora::as_matrix(a + a);
  return static_cast<int>(view.rows());
}
