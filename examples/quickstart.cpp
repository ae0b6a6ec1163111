// Quick start: AdaLoRA in a hand-written training loop, with nothing but adalora's core.
//
// Three frozen linear maps y = W0 x get SVD adapters of rank 6. The fine-tuning target adds a
// hidden update of rank 4, 0 and 2 to them. Plain SGD on the squared error plus the
// orthogonality regularizer trains the adapters; after every optimizer step the rank allocator
// updates importance and prunes singular values, from a total rank of 18 down to 6. At the end
// the kept ranks should follow the hidden ones.
//
//   bazel run -c opt //examples:quickstart -- [--steps N]

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "examples/common/planted_update.hpp"

namespace {

using adalora::index_t;
using adalora::make_matrix_view;

struct layer {
  index_t in, out, hidden_rank;
  std::vector<float> target;  // the update the adapter should learn, out × in
};

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 1000;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoll(argv[i + 1]);

  std::mt19937_64 rng(7);
  std::vector<layer> layers = {{24, 16, 4, {}}, {16, 16, 0, {}}, {16, 12, 2, {}}};
  const index_t r = 6, target_total = 6, batch = 32;
  std::vector<adalora::svd_adapter<float>> adapters;
  for (auto& L : layers) {
    L.target = adalora_examples::planted_update(L.out, L.in, L.hidden_rank, rng);
    adapters.emplace_back(L.in, L.out, r, /*alpha=*/double(r));
    adapters.back().initialize(rng);
  }
  // One named set of the adapters' views, which the regularizer and the allocator both take.
  adalora::adapter_set<float> set;
  for (std::size_t l = 0; l < adapters.size(); ++l) set.add("layer" + std::to_string(l), adapters[l]);

  // The three policies: regularizer, schedule, allocator (smoothed sensitivity by default). The
  // schedule's initial budget is the sum of the adapters' ranks, which the allocator fills in.
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  adalora::rank_allocator<float> allocator(
      set, adalora::cubic_schedule({.target_budget = target_total,
                                    .total_step = steps,
                                    .tinit = steps / 10,
                                    .tfinal = steps / 4,
                                    .delta_t = 10}));

  const float lr = 0.1f;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t t = 0; t < steps; ++t) {
    double loss = 0.0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto& L = layers[l];
      // x ~ N(0, I); the adapter should output target·x (W0 x is frozen and cancels out).
      std::vector<float> x(static_cast<std::size_t>(batch * L.in)), y(static_cast<std::size_t>(batch * L.out), 0.0f);
      for (auto& v : x) v = normal(rng);
      adapters[l].forward(make_matrix_view<const float>(x.data(), batch, L.in), make_matrix_view(y.data(), batch, L.out));
      std::vector<float> dy(y.size());
      for (index_t b = 0; b < batch; ++b)
        for (index_t i = 0; i < L.out; ++i) {
          float want = 0.0f;
          for (index_t j = 0; j < L.in; ++j) want += L.target[static_cast<std::size_t>(i * L.in + j)] * x[static_cast<std::size_t>(b * L.in + j)];
          const float err = y[static_cast<std::size_t>(b * L.out + i)] - want;
          loss += 0.5 * err * err / batch;
          dy[static_cast<std::size_t>(b * L.out + i)] = err / float(batch);
        }
      adapters[l].backward(make_matrix_view<const float>(x.data(), batch, L.in), make_matrix_view<const float>(dy.data(), batch, L.out));
    }
    const float reg = orth.value_and_gradient(set);  // adds ∂R/∂A, ∂R/∂B into grads

    for (auto& a : adapters) {  // SGD, then the allocator, then clear the gradients
      auto p = a.params();
      auto g = a.grads();
      for (index_t i = 0; i < p.A.size(); ++i) p.A.data()[i] -= lr * g.A.data()[i];
      for (index_t i = 0; i < p.E.size(); ++i) p.E.data()[i] -= lr * g.E.data()[i];
      for (index_t i = 0; i < p.B.size(); ++i) p.B.data()[i] -= lr * g.B.data()[i];
    }
    const auto& step = allocator.step(t, set);  // after optimizer.step(), t from 0
    for (auto& a : adapters) a.zero_grad();

    if (t % (steps / 6) == 0 || t == steps - 1)
      std::printf("step %4lld  loss %.5f  orth %.4f  budget %2lld  kept %lld %lld %lld\n",
                  static_cast<long long>(t), loss, double(reg), static_cast<long long>(step.budget),
                  static_cast<long long>(step.kept[0]), static_cast<long long>(step.kept[1]),
                  static_cast<long long>(step.kept[2]));
  }

  std::printf("\nlayer   hidden rank   kept rank\n");
  int matches = 0;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const index_t kept = allocator.last_result().kept[l];
    matches += kept == layers[l].hidden_rank ? 1 : 0;
    std::printf("layer%zu  %11lld  %10lld\n", l, static_cast<long long>(layers[l].hidden_rank),
                static_cast<long long>(kept));
  }
  std::printf("%d of %zu layers kept exactly their hidden rank\n", matches, layers.size());
  return 0;
}
