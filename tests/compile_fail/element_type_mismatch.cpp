// A view of double elements (from a MatrixXd) passed where float elements are expected: views
// never convert between element types, so this must not compile.
// expect-error: could not convert
// expect-error: matrix_view<double>
// expect-error: matrix_view<float>
#include "adalora/integrations/eigen.hpp"

float first_element(adalora::matrix_view<float> m) { return m(0, 0); }

int main() {
  Eigen::MatrixXd a = Eigen::MatrixXd::Zero(2, 2);
  return static_cast<int>(first_element(adalora::as_matrix(a)));
}
