// Uses the installed core (adapter, regularizer, allocator) and the Eigen integration, so that a
// missing header, a wrong include path or a missing C++20 flag in the CMake package fails here.

#include <Eigen/Core>

#include <cstdio>

#include "adalora/adalora.hpp"
#include "adalora/integrations/eigen.hpp"

static_assert(ADALORA_VERSION_MAJOR == 0, "the installed headers carry the version");

int main() {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const adalora::index_t r = 3, in = 5, out = 4;
  Mat A = Mat::Random(r, in) * 0.1f, B = Mat::Random(out, r) * 0.1f;
  Eigen::VectorXf E = Eigen::VectorXf::Ones(r);
  Mat x = Mat::Random(2, in), y = Mat::Zero(2, out);

  const adalora::svd_adapter_ref<float> params{adalora::as_matrix(A), adalora::as_vector(E),
                                               adalora::as_matrix(B)};
  adalora::adapter_workspace<float> ws;
  adalora::adapter_forward<float>(params, adalora::adapter_scale<float>(8.0, r),
                                  adalora::as_matrix(x), adalora::as_matrix(y), ws);
  // Eigen computes the same product: y = x · (A ⊙ E)ᵀ · Bᵀ · alpha / (r + 1e-5).
  const Mat expected = (x * (E.asDiagonal() * A).transpose() * B.transpose()) * (8.0f / (3.0f + 1e-5f));
  if (!y.isApprox(expected, 1e-4f)) {
    std::printf("cmake consumer: adapter output differs from Eigen's\n");
    return 1;
  }
  Mat dA = Mat::Zero(r, in), dB = Mat::Zero(out, r);
  Eigen::VectorXf dE = Eigen::VectorXf::Zero(r);
  adalora::adapter_set<float> set;
  set.add("q", params, {adalora::as_matrix(dA), adalora::as_vector(dE), adalora::as_matrix(dB)});
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  const float reg = orth.value(set);
  std::printf("cmake consumer: OK (adalora %d.%d.%d, regularizer %.4f)\n", ADALORA_VERSION_MAJOR,
              ADALORA_VERSION_MINOR, ADALORA_VERSION_PATCH, double(reg));
  return 0;
}
