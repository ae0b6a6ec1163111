// An ADL hook declared outside its type's namespace is not found (argument-dependent lookup
// looks in the type's namespace): the message must say where the hook belongs.
// expect-error: adalora::as_matrix: no view for this type
// expect-error: adalora::as_vector: no view for this type
// expect-error: in T's own namespace, where argument-dependent lookup finds it
#include <vector>

#include "adalora/backend.hpp"

namespace mine {
struct tensor {
  std::vector<float> v = std::vector<float>(4);
};
}  // namespace mine

namespace helpers {
adalora::matrix_view<float> adalora_matrix_view(mine::tensor& t) {
  return {t.v.data(), 2, 2, 2, 1};
}
adalora::vector_view<float> adalora_vector_view(mine::tensor& t) { return {t.v.data(), 4}; }
}  // namespace helpers

int main() {
  mine::tensor t;
  return static_cast<int>(adalora::as_matrix(t).rows() + adalora::as_vector(t).size());
}
