// A temporary of a type viewed through the ADL hook, which does not declare that it owns no
// memory: it is taken to own it, and its view would dangle, so as_matrix and as_vector refuse
// it (R4 of adalora/backend.hpp).
// expect-error: adalora::as_matrix: refusing to view a temporary that owns its memory
// expect-error: adalora::as_vector: refusing to view a temporary that owns its memory
// expect-error: view_traits<T>::owns_memory = false
#include <vector>

#include "adalora/backend.hpp"

namespace mine {
struct tensor {
  std::vector<float> v = std::vector<float>(4);
};
adalora::matrix_view<float> adalora_matrix_view(tensor& t) { return {t.v.data(), 2, 2, 2, 1}; }
adalora::matrix_view<const float> adalora_matrix_view(const tensor& t) {
  return {t.v.data(), 2, 2, 2, 1};
}
adalora::vector_view<float> adalora_vector_view(tensor& t) { return {t.v.data(), 4}; }
adalora::vector_view<const float> adalora_vector_view(const tensor& t) { return {t.v.data(), 4}; }
tensor make() { return {}; }
}  // namespace mine

int main() {
  const auto m = adalora::as_matrix(mine::make());
  const auto v = adalora::as_vector(mine::make());
  return static_cast<int>(m.rows() + v.size());
}
