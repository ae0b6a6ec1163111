// A view_traits specialisation that gives views but does not say whether its type owns its
// memory: without that, a temporary's view could dangle, so it is refused (R2 of
// adalora/backend.hpp).
// expect-error: adalora: a view_traits<T> specialisation that gives views must declare `static
// expect-error: must declare `static constexpr bool owns_memory` (true if T owns its elements
#include <vector>

#include "adalora/backend.hpp"

namespace theirs {
struct tensor {
  std::vector<float> v = std::vector<float>(4);
};
}  // namespace theirs

template <>
struct adalora::view_traits<theirs::tensor> {
  static matrix_view<float> matrix(theirs::tensor& t) { return {t.v.data(), 2, 2, 2, 1}; }
};

int main() {
  theirs::tensor t;
  return static_cast<int>(adalora::as_matrix(t).rows());
}
