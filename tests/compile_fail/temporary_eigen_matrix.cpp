// A temporary Eigen::Matrix owns its memory and dies at the end of the statement: a view of it
// would dangle, so as_matrix must refuse it at compile time.
// expect-error: adalora::as_matrix: refusing to view a temporary that owns its memory
#include "adalora/integrations/eigen.hpp"

int main() {
  auto view = adalora::as_matrix(Eigen::MatrixXd(2, 2));
  return static_cast<int>(view.rows());
}
