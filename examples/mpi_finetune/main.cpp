// The quick start's known-answer problem trained data-parallel over MPI.
//
// Three frozen linear maps get SVD adapters of rank 6; the fine-tuning target adds hidden updates
// of rank 4, 0 and 2; the allocator prunes the total rank from 18 to 6 (examples/quickstart.cpp,
// same shapes, data, schedule and optimizer). Here every rank holds all three adapters (a
// replica, as in PyTorch DDP) and computes the gradients of its share of each batch of 32; the
// gradients are summed over the ranks into the batch mean (adalora::gradient_all_reducer: one
// MPI_Allreduce per step); every replica then takes the same SGD step and calls the allocator.
//
// Why the allocator keeps its default communicator, single_process: after the all-reduce every
// replica has the same parameters and gradients, so each computes the same scores and masks on
// its own and nothing more needs to travel. An mpi_communicator is for SHARDED allocators (each
// rank holding part of the adapters); here it would add every replica's identical partial sums,
// P copies of each score.
//
// Rank 0 then trains the same problem in one process (in this binary) and compares the final
// ranks; the exit status is non-zero if they differ or if the replicas drifted apart. The
// gradients' rounding differs from one process's (each rank sums half a batch), so the runs are
// not bit-identical; the decisions they lead to are the same.
//
//   mpirun -np 2 --oversubscribe bazel-bin/examples/mpi_finetune/mpi_finetune [--steps N]

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/mpi.hpp"
#include "examples/common/planted_update.hpp"

namespace {

using adalora::index_t;
using adalora::make_matrix_view;

struct layer {
  index_t in, out, hidden_rank;
  std::vector<float> target;  // the update the adapter should learn, out × in
};

struct outcome {
  std::vector<index_t> hidden, kept;
  bool replicas_identical = true;
};

/// Trains the problem; with `comm`, data-parallel over its ranks (this rank's share of every
/// batch), else in one process. Rank 0 prints progress when `verbose`.
outcome train(std::int64_t steps, const adalora::mpi_communicator* comm, bool verbose) {
  // Every rank draws the same data from the same seed and uses its share of each batch: what a
  // distributed sampler gives a real loader, without files.
  std::mt19937_64 rng(7);
  std::vector<layer> layers = {{24, 16, 4, {}}, {16, 16, 0, {}}, {16, 12, 2, {}}};
  const index_t r = 6, target_total = 6, batch = 32;
  const int ranks = comm ? comm->size() : 1;
  const adalora::index_slice mine = adalora::even_slice(batch, comm ? comm->rank() : 0, ranks);

  std::vector<adalora::svd_adapter<float>> adapters;
  for (auto& L : layers) {
    L.target = adalora_examples::planted_update(L.out, L.in, L.hidden_rank, rng);
    adapters.emplace_back(L.in, L.out, r, /*alpha=*/double(r));
    adapters.back().initialize(rng);
  }
  // Every replica holds all of every adapter: a set of whole adapters, as in one process.
  adalora::adapter_set<float> set;
  for (std::size_t l = 0; l < adapters.size(); ++l) set.add("layer" + std::to_string(l), adapters[l]);

  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  adalora::rank_allocator<float> allocator(  // single_process: see the file comment
      set, adalora::cubic_schedule({.target_budget = target_total,
                                    .total_step = steps,
                                    .tinit = steps / 10,
                                    .tfinal = steps / 4,
                                    .delta_t = 10}));
  std::optional<adalora::gradient_all_reducer<float>> reduce_grads;
  if (comm) reduce_grads.emplace(*comm);

  const float lr = 0.1f;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t t = 0; t < steps; ++t) {
    double loss = 0.0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto& L = layers[l];
      // The whole batch is drawn (the random stream stays the quick start's); this rank trains
      // on rows [mine.begin, mine.begin + mine.count) of it. Its loss is divided by the WHOLE
      // batch size, so the all-reduce's sum is the batch mean even when shares are uneven (32
      // over 3 ranks); DDP's average of per-rank means (divisor 0) agrees only for equal shares.
      std::vector<float> x(static_cast<std::size_t>(batch * L.in));
      for (auto& v : x) v = normal(rng);
      const float* xs = x.data() + mine.begin * L.in;
      std::vector<float> y(static_cast<std::size_t>(mine.count * L.out), 0.0f), dy(y.size());
      adapters[l].forward(make_matrix_view<const float>(xs, mine.count, L.in),
                          make_matrix_view(y.data(), mine.count, L.out));
      for (index_t b = 0; b < mine.count; ++b)
        for (index_t i = 0; i < L.out; ++i) {
          float want = 0.0f;
          for (index_t j = 0; j < L.in; ++j)
            want += L.target[static_cast<std::size_t>(i * L.in + j)] * xs[b * L.in + j];
          const float err = y[static_cast<std::size_t>(b * L.out + i)] - want;
          loss += 0.5 * err * err / batch;
          dy[static_cast<std::size_t>(b * L.out + i)] = err / float(batch);
        }
      adapters[l].backward(make_matrix_view<const float>(xs, mine.count, L.in),
                           make_matrix_view<const float>(dy.data(), mine.count, L.out));
    }
    // The data gradients are the only thing to all-reduce before the allocator: their sum over
    // the ranks (divisor 1, see above) is the whole batch's mean gradient.
    if (reduce_grads) (*reduce_grads)(set.grads(), 1.0);
    // The regularizer depends on the parameters alone, identical on every replica: each adds it
    // locally, after the all-reduce, with nothing to exchange.
    const float reg = orth.value_and_gradient(set);

    for (auto& a : adapters) {  // SGD, then the allocator, then clear the gradients
      auto p = a.params();
      auto g = a.grads();
      for (index_t i = 0; i < p.A.size(); ++i) p.A.data()[i] -= lr * g.A.data()[i];
      for (index_t i = 0; i < p.E.size(); ++i) p.E.data()[i] -= lr * g.E.data()[i];
      for (index_t i = 0; i < p.B.size(); ++i) p.B.data()[i] -= lr * g.B.data()[i];
    }
    const auto& step = allocator.step(t, set);  // after optimizer.step(), t from 0
    for (auto& a : adapters) a.zero_grad();

    if (t % (steps / 6) == 0 || t == steps - 1) {
      if (comm) comm->all_reduce_sum(std::span<double>(&loss, 1));  // the whole batch's loss
      if (verbose)
        std::printf("step %4lld  loss %.5f  orth %.4f  budget %2lld  kept %lld %lld %lld\n",
                    static_cast<long long>(t), loss, double(reg), static_cast<long long>(step.budget),
                    static_cast<long long>(step.kept[0]), static_cast<long long>(step.kept[1]),
                    static_cast<long long>(step.kept[2]));
    }
  }

  outcome out;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    out.hidden.push_back(layers[l].hidden_rank);
    out.kept.push_back(allocator.last_result().kept[l]);
  }
  if (comm) {  // the replicas must not have drifted apart: masks and parameters, bit for bit
    std::vector<float> all;
    for (auto& a : adapters) {
      auto p = a.params();
      all.insert(all.end(), p.A.data(), p.A.data() + p.A.size());
      all.insert(all.end(), p.E.data(), p.E.data() + p.E.size());
      all.insert(all.end(), p.B.data(), p.B.data() + p.B.size());
    }
    const auto masks = allocator.resumable().kept;
    const bool same_masks = adalora::same_on_all_ranks(*comm, masks);
    const bool same_params = adalora::same_on_all_ranks(*comm, std::span<const float>(all));
    out.replicas_identical = same_masks && same_params;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  adalora::mpi_environment env(argc, argv);
  std::int64_t steps = 1000;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoll(argv[i + 1]);

  const adalora::mpi_communicator world;  // MPI_COMM_WORLD
  const bool root = world.rank() == 0;
  if (root)
    std::printf(
        "data-parallel on %d ranks: each computes the gradients of %lld of the 32 examples per step\n\n",
        world.size(), static_cast<long long>(adalora::even_slice(32, 0, world.size()).count));
  const outcome dp = train(steps, &world, root);
  if (!root) return dp.replicas_identical ? 0 : 1;

  // The single-process run of the same problem, for comparison (rank 0 only; the others are done).
  const outcome one = train(steps, nullptr, false);
  std::printf("\nreplicas identical after training (parameters and masks): %s\n",
              dp.replicas_identical ? "yes" : "NO");
  std::printf("\nlayer   hidden rank   kept (%d ranks)   kept (1 process)\n", world.size());
  int matches = 0;
  for (std::size_t l = 0; l < dp.kept.size(); ++l) {
    matches += dp.kept[l] == dp.hidden[l] ? 1 : 0;
    std::printf("layer%zu  %11lld  %14lld  %17lld\n", l, static_cast<long long>(dp.hidden[l]),
                static_cast<long long>(dp.kept[l]), static_cast<long long>(one.kept[l]));
  }
  std::printf("%d of %zu layers kept exactly their hidden rank\n", matches, dp.kept.size());
  const bool same = dp.kept == one.kept;
  std::printf("data-parallel final ranks equal those of one process: %s\n", same ? "yes" : "NO");
  return same && dp.replicas_identical ? 0 : 1;
}
