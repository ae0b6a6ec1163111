// Control: the same calls done right compile, so a failure above is the refusal, not a broken
// include path or harness.
// expect: compiles
#include <xtensor/xtensor.hpp>

#include "adalora/integrations/eigen.hpp"
#include "adalora/integrations/xtensor.hpp"

float first_element(adalora::matrix_view<float> m) { return m(0, 0); }

int main() {
  Eigen::MatrixXf a = Eigen::MatrixXf::Zero(2, 2);
  Eigen::MatrixXf twice = 2.0f * a;  // evaluated: now it has memory
  xt::xtensor<double, 2> x = xt::zeros<double>({2, 2});
  xt::xtensor<double, 2> sum = x + x;
  auto v = adalora::as_matrix(twice);
  auto b = adalora::as_matrix(a.block(0, 0, 1, 1));  // an rvalue Block refers to a's memory
  auto s = adalora::as_matrix(sum);
  return static_cast<int>(first_element(v) + first_element(b) + s(0, 0));
}
