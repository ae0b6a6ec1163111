// A user-written Gram kernel in the orthogonality regularizer: the plain-loop kernel of
// naive_gram_kernel.hpp regularizes a set of adapters and gives the portable kernel's value and
// gradients bit for bit. This is how to test a faster kernel of your own: against the portable
// one, on the adapters your model has.
//
//   bazel run //examples/custom_gram_kernel

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "examples/custom_gram_kernel/naive_gram_kernel.hpp"

namespace {

/// Adapters of three shapes with random factors, and a set of them.
struct model {
  std::vector<adalora::svd_adapter<float>> layers;
  adalora::adapter_set<float> set;
  explicit model(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    layers.emplace_back(96, 64, 8, 8.0);
    layers.emplace_back(64, 200, 12, 12.0);
    layers.emplace_back(300, 16, 4, 4.0);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      layers[l].initialize(rng);
      set.add("layer" + std::to_string(l), layers[l]);
    }
  }
};

}  // namespace

int main() {
  const adalora::orthogonality_options options{.weight = 0.1};
  adalora::orthogonality_regularizer<float> portable(options);
  adalora::orthogonality_regularizer<float, naive_gram_kernel<float>> naive(options);

  model a(11), b(11);  // the same adapters twice, so that each regularizer has its own gradients
  const float value_portable = portable.value_and_gradient(a.set);
  const float value_naive = naive.value_and_gradient(b.set);

  long differences = 0, nonzero = 0;
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    const auto ga = a.layers[l].grads(), gb = b.layers[l].grads();
    for (adalora::index_t i = 0; i < ga.A.size(); ++i) {
      differences += ga.A.data()[i] != gb.A.data()[i];
      nonzero += ga.A.data()[i] != 0.0f;
    }
    for (adalora::index_t i = 0; i < ga.B.size(); ++i) differences += ga.B.data()[i] != gb.B.data()[i];
  }
  std::printf("regularizer: portable kernel %.9g, naive kernel %.9g; %ld gradient entries differ\n",
              double(value_portable), double(value_naive), differences);
  if (value_naive != value_portable || differences != 0 || nonzero == 0) {
    std::printf("the naive kernel did NOT reproduce the portable kernel\n");
    return 1;
  }
  std::printf("the naive kernel matched the portable kernel bit for bit\n");
  return 0;
}
