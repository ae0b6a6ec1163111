// Compaction: once the rank pattern is final, the pruned triplets leave memory. A, E and B,
// their gradients and Adam's moments shrink to the kept rank where they lie, and training goes
// on at the smaller rank (docs/compaction.md).
//
// The quick start's problem (three layers of rank 6, hidden updates of rank 4, 0 and 2, total
// rank 18 pruned to 6), trained with a hand-written Adam and no orthogonality regularizer, twice:
// once with the pruned triplets masked to the end, as PEFT and loralib do, and once compacted as
// soon as allocator.pattern_final(). With the regularizer off and the portable kernels
// (svd_adapter::forward/backward sum over the rank in index order, so a masked triplet adds
// exact zeros), compiled without FMA contraction (-ffp-contract=off, as .bazelrc sets), the two
// runs must agree bit for bit; the program checks that and exits 1 if not.
//
//   bazel run -c opt //examples/compaction -- [--steps N]

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

/// One of Adam's moments for one adapter, laid out like its A (r × in), E (r) and B (out × r).
struct moment {
  std::vector<float> A, E, B;
  adalora::svd_adapter_ref<float> view;  // shrinks with the adapter; the buffers stay put
  moment(index_t in, index_t out, index_t r)
      : A(static_cast<std::size_t>(r * in)), E(static_cast<std::size_t>(r)), B(static_cast<std::size_t>(out * r)),
        view{make_matrix_view(A.data(), r, in), adalora::make_vector_view(E.data(), r),
             make_matrix_view(B.data(), out, r)} {}
};

/// Adam on one adapter's tensors, element by element through the views.
void adam_step(const adalora::svd_adapter_ref<float>& p, const adalora::svd_adapter_ref<float>& g,
               const adalora::svd_adapter_ref<float>& m, const adalora::svd_adapter_ref<float>& v,
               std::int64_t t) {
  const float lr = 0.01f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
  const float c1 = 1.0f - std::pow(b1, float(t + 1)), c2 = 1.0f - std::pow(b2, float(t + 1));
  auto update = [&](float& w, float grad, float& mw, float& vw) {
    mw = b1 * mw + (1.0f - b1) * grad;
    vw = b2 * vw + (1.0f - b2) * grad * grad;
    w -= lr * (mw / c1) / (std::sqrt(vw / c2) + eps);
  };
  for (index_t i = 0; i < p.rank(); ++i) {
    for (index_t j = 0; j < p.in_features(); ++j) update(p.A(i, j), g.A(i, j), m.A(i, j), v.A(i, j));
    update(p.E[i], g.E[i], m.E[i], v.E[i]);
    for (index_t o = 0; o < p.out_features(); ++o) update(p.B(o, i), g.B(o, i), m.B(o, i), v.B(o, i));
  }
}

struct run_result {
  std::int64_t compacted_at = -1;
  std::vector<index_t> kept;               // per layer, the allocator's final pattern
  std::vector<index_t> rank;               // per layer, the rank in memory at the end
  std::vector<std::vector<float>> delta;   // per layer, ΔW
  std::vector<std::vector<float>> params;  // per layer, the kept triplets' A, E, B in order
  double loss = 0;                         // of the last step
};

run_result train(std::int64_t steps, bool compact) {
  struct layer {
    index_t in, out, hidden_rank;
  };
  const std::vector<layer> layers = {{24, 16, 4}, {16, 16, 0}, {16, 12, 2}};
  const index_t r = 6, batch = 32;
  std::mt19937_64 rng(7);
  std::vector<std::vector<float>> targets;
  std::vector<adalora::svd_adapter<float>> adapters;
  std::vector<moment> m1, m2;
  adalora::adapter_set<float> set;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const layer& L = layers[l];
    targets.push_back(adalora_examples::planted_update(L.out, L.in, L.hidden_rank, rng));
    adapters.emplace_back(L.in, L.out, r, /*alpha=*/double(r));
    adapters.back().initialize(rng);
    m1.emplace_back(L.in, L.out, r);
    m2.emplace_back(L.in, L.out, r);
  }
  for (std::size_t l = 0; l < layers.size(); ++l) set.add("layer" + std::to_string(l), adapters[l]);
  adalora::rank_allocator<float> allocator(
      set, adalora::cubic_schedule({.target_budget = 6, .total_step = steps, .tinit = steps / 10,
                                    .tfinal = steps / 4, .delta_t = 10}));

  run_result result;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t t = 0; t < steps; ++t) {
    result.loss = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) {  // ½‖adapter(x) − target·x‖² per row
      const layer& L = layers[l];
      std::vector<float> x(static_cast<std::size_t>(batch * L.in)), y(static_cast<std::size_t>(batch * L.out), 0.0f);
      for (float& v : x) v = normal(rng);
      adapters[l].forward(make_matrix_view<const float>(x.data(), batch, L.in), make_matrix_view(y.data(), batch, L.out));
      std::vector<float> dy(y.size());
      for (index_t b = 0; b < batch; ++b)
        for (index_t i = 0; i < L.out; ++i) {
          float want = 0.0f;
          for (index_t j = 0; j < L.in; ++j)
            want += targets[l][static_cast<std::size_t>(i * L.in + j)] * x[static_cast<std::size_t>(b * L.in + j)];
          const float err = y[static_cast<std::size_t>(b * L.out + i)] - want;
          result.loss += 0.5 * err * err / batch;
          dy[static_cast<std::size_t>(b * L.out + i)] = err / float(batch);
        }
      adapters[l].backward(make_matrix_view<const float>(x.data(), batch, L.in),
                           make_matrix_view<const float>(dy.data(), batch, L.out));
    }
    for (std::size_t l = 0; l < layers.size(); ++l)
      adam_step(adapters[l].params(), adapters[l].grads(), m1[l].view, m2[l].view, t);

    allocator.step(t, set);  // after the optimizer step, before the gradients are cleared
    if (compact && result.compacted_at < 0 && allocator.pattern_final()) {
      // The pattern cannot change any more: drop the pruned triplets from memory.
      const adalora::rank_change change = allocator.compact();
      for (std::size_t l = 0; l < adapters.size(); ++l) {
        adapters[l].change_rank(change[l]);                         // A, E, B and their gradients
        m1[l].view = adalora::compact(m1[l].view, change[l]);       // Adam's moments, same map
        m2[l].view = adalora::compact(m2[l].view, change[l]);
        set.replace(l, adapters[l].params(), adapters[l].grads());  // the set views the new rank
      }
      result.compacted_at = t;
      std::printf("step %lld: pattern final, compacted ranks %lld %lld %lld -> %lld %lld %lld\n",
                  static_cast<long long>(t), static_cast<long long>(change[0].old_rank),
                  static_cast<long long>(change[1].old_rank), static_cast<long long>(change[2].old_rank),
                  static_cast<long long>(change[0].new_rank()), static_cast<long long>(change[1].new_rank()),
                  static_cast<long long>(change[2].new_rank()));
    }
    for (auto& a : adapters) a.zero_grad();
  }

  for (std::size_t l = 0; l < layers.size(); ++l) {
    const layer& L = layers[l];
    const adalora::svd_adapter<float>& a = adapters[l];
    result.kept.push_back(allocator.last_result().kept[l]);
    result.rank.push_back(a.rank());
    result.delta.emplace_back(static_cast<std::size_t>(L.out * L.in));
    a.delta_weight(make_matrix_view(result.delta.back().data(), L.out, L.in));
    // The kept triplets, by the allocator's mask (all of them once compacted).
    const auto keep = allocator.kept_mask(l);
    std::vector<float> kept_params;
    for (index_t i = 0; i < a.rank(); ++i) {
      if (!keep[static_cast<std::size_t>(i)]) continue;
      for (index_t j = 0; j < L.in; ++j) kept_params.push_back(a.params().A(i, j));
      kept_params.push_back(a.params().E[i]);
      for (index_t o = 0; o < L.out; ++o) kept_params.push_back(a.params().B(o, i));
    }
    result.params.push_back(std::move(kept_params));
  }
  return result;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
}

/// Adapter parameters in memory: r · (in + 1 + out) per layer.
long long parameter_count(const std::vector<index_t>& ranks) {
  const index_t in[] = {24, 16, 16}, out[] = {16, 16, 12};
  long long n = 0;
  for (std::size_t l = 0; l < ranks.size(); ++l) n += ranks[l] * (in[l] + 1 + out[l]);
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 1000;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoll(argv[i + 1]);

  const run_result masked = train(steps, false);
  const run_result compacted = train(steps, true);
  if (compacted.compacted_at < 0) {
    std::printf("the pattern never became final in %lld steps; nothing was compacted\n",
                static_cast<long long>(steps));
    return 1;
  }

  std::printf("\nlayer   kept   rank in memory (masked / compacted)\n");
  for (std::size_t l = 0; l < masked.kept.size(); ++l)
    std::printf("layer%zu  %4lld   %lld / %lld\n", l, static_cast<long long>(compacted.kept[l]),
                static_cast<long long>(masked.rank[l]), static_cast<long long>(compacted.rank[l]));
  std::printf("adapter parameters in memory: %lld masked, %lld compacted\n",
              parameter_count(masked.rank), parameter_count(compacted.rank));
  std::printf("last step's loss: %.7g masked, %.7g compacted\n", masked.loss, compacted.loss);

  int differ = 0;
  for (std::size_t l = 0; l < masked.kept.size(); ++l) {
    const bool same = masked.kept[l] == compacted.kept[l] && compacted.rank[l] == compacted.kept[l] &&
                      same_bits(masked.delta[l], compacted.delta[l]) &&
                      same_bits(masked.params[l], compacted.params[l]);
    if (!same) std::printf("layer%zu: the compacted run differs from the masked run\n", l);
    differ += same ? 0 : 1;
  }
  if (differ > 0 || masked.loss != compacted.loss) return 1;
  std::printf("compacted training is bit-identical to masked training (delta W and kept A, E, B of %zu layers)\n",
              masked.kept.size());
  return 0;
}
