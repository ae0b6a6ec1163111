// A lazy Eigen expression (2*A) has no memory to view: as_matrix must refuse it at compile time
// and tell the user to evaluate it first, instead of silently copying it.
// expect-error: adalora::as_matrix: this is a lazy expression
// expect-error: evaluate it into a matrix first
#include "adalora/integrations/eigen.hpp"

int main() {
  Eigen::MatrixXf a = Eigen::MatrixXf::Zero(2, 2);
  auto view = adalora::as_matrix(2.0f * a);
  return static_cast<int>(view.rows());
}
