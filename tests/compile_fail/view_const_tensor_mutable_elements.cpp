// Hooks that hand out views of mutable elements for a const tensor that owns its memory (here by
// const_cast, as a type whose const accessor returns a plain pointer invites): adalora writes
// through such views, so they are refused (R3 of adalora/backend.hpp).
// expect-error: adalora::matrix_view<const E>
// expect-error: adalora::vector_view<const E>
// expect-error: adalora: the view of a const tensor that owns its memory must have const elements
#include <vector>

#include "adalora/backend.hpp"

namespace mine {
struct tensor {
  std::vector<float> v = std::vector<float>(4);
};
adalora::matrix_view<float> adalora_matrix_view(const tensor& t) {
  return {const_cast<float*>(t.v.data()), 2, 2, 2, 1};
}
adalora::vector_view<float> adalora_vector_view(const tensor& t) {
  return {const_cast<float*>(t.v.data()), 4};
}
}  // namespace mine

int main() {
  const mine::tensor t;
  return static_cast<int>(adalora::as_matrix(t).rows() + adalora::as_vector(t).size());
}
