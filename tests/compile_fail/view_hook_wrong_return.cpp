// Hooks that return something other than an adalora view (a pointer, a type that only converts
// to a view) must be refused with a message that names the hook and the type to return (R1 of
// adalora/backend.hpp), for each of the four hooks.
// expect-error: adalora_matrix_view(x), found by ADL for this type, must return an adalora::matrix_view<E>
// expect-error: adalora_vector_view(x), found by ADL for this type, must return an adalora::vector_view<E>
// expect-error: adalora: view_traits<T>::matrix(x) must return an adalora::matrix_view<E>
// expect-error: adalora: view_traits<T>::vector(x) must return an adalora::vector_view<E>
#include <vector>

#include "adalora/backend.hpp"

namespace mine {
struct tensor {
  std::vector<float> v;
};
float* adalora_matrix_view(tensor& t) { return t.v.data(); }
std::vector<float>& adalora_vector_view(tensor& t) { return t.v; }
}  // namespace mine

namespace theirs {
struct tensor {
  std::vector<float> v;
};
}  // namespace theirs

template <>
struct adalora::view_traits<theirs::tensor> {
  static constexpr bool owns_memory = true;
  static std::vector<float>& matrix(theirs::tensor& t) { return t.v; }
  static float* vector(theirs::tensor& t) { return t.v.data(); }
};

int main() {
  mine::tensor a;
  theirs::tensor b;
  adalora::as_matrix(a);
  adalora::as_vector(a);
  adalora::as_matrix(b);
  adalora::as_vector(b);
  return 0;
}
