// The sharded allocator's collective against the allocator step itself, at the LLaMA-7B shape.
//
// 224 adapters of rank 8 (32 layers of q, k, v, o 4096 -> 4096, gate and up 4096 -> 11008, down
// 11008 -> 4096): 20.0 M adapter elements, 1792 triplets. A sharded allocator exchanges one
// buffer per mask event: b0 + sum over adapters of r * (ceil(in/256) + ceil(out/256)) doubles,
// here 79 872 (624 KiB), whatever the number of ranks. This program times, under mpirun:
//
//   1. the sharded step at a mask event (each rank holds a contiguous slice of every adapter's
//      triplets, updates its importance, all-reduces the partial sums, selects and masks), the
//      slowest rank per iteration;
//   2. the all-reduce of that buffer alone (mpi_communicator::all_reduce_sum);
//   3. for scale, the same step of one process that holds everything (a data-parallel replica,
//      single_process), and the data-parallel gradient all-reduce of every adapter gradient
//      (the user's, not the allocator's).
//
// It prints the medians and the collective's fraction of the step. A plain timed loop (Google
// Benchmark and MPI do not mix well: every rank must run the same iterations).
//
//   bazel build -c opt --config=opt //benchmarks:mpi_collective_benchmark
//   mpirun -np 2 --oversubscribe bazel-bin/benchmarks/mpi_collective_benchmark [--layers N]

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/integrations/mpi.hpp"
#include "adalora/rank_allocator.hpp"

namespace {

using adalora::index_t;
using clock_type = std::chrono::steady_clock;

std::vector<adalora::adapter_shape> llama7b_shapes(int layers, index_t r) {
  std::vector<adalora::adapter_shape> s;
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
      s.push_back({p + n, 4096, 4096, r, {}});
    s.push_back({p + "mlp.gate_proj", 4096, 11008, r, {}});
    s.push_back({p + "mlp.up_proj", 4096, 11008, r, {}});
    s.push_back({p + "mlp.down_proj", 11008, 4096, r, {}});
  }
  return s;
}

/// Owning local tensors (this rank's slice) with random parameters and gradients.
struct local_model {
  std::vector<std::vector<float>> store;  // A, E, B, gA, gE, gB per adapter
  std::vector<adalora::adapter_tensors<float>> views;
  std::vector<adalora::svd_adapter_ref<float>> grads;

  explicit local_model(const std::vector<adalora::adapter_shape>& shapes, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    store.reserve(shapes.size() * 6);
    for (const auto& s : shapes) {
      const auto& h = s.shard;
      const index_t r = h.triplet_count, in = h.in_count, out = h.out_count;
      for (std::size_t n : {std::size_t(r * in), std::size_t(r), std::size_t(out * r)})
        for (int twice = 0; twice < 2; ++twice) {
          std::vector<float> v(n);
          for (auto& x : v) x = normal(rng);
          store.push_back(std::move(v));
        }
      auto* t = &store[store.size() - 6];  // A, gA, E, gE, B, gB
      adalora::svd_adapter_ref<float> p{adalora::make_matrix_view(t[0].data(), r, in),
                                        adalora::vector_view<float>(t[2].data(), r),
                                        adalora::make_matrix_view(t[4].data(), out, r)};
      adalora::svd_adapter_ref<float> g{adalora::make_matrix_view(t[1].data(), r, in),
                                        adalora::vector_view<float>(t[3].data(), r),
                                        adalora::make_matrix_view(t[5].data(), out, r)};
      views.push_back({p, g});
      grads.push_back(g);
    }
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Times f() `iterations` times after `warmup` untimed calls; per iteration the slowest rank's
/// time (each call is collective or followed by a barrier); returns the median in ms.
template <class F>
double time_ms(const adalora::mpi_communicator& comm, int warmup, int iterations, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < iterations; ++i) {
    MPI_Barrier(comm.comm());
    const auto t0 = clock_type::now();
    f();
    double dt = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, comm.comm());
    ms.push_back(dt);
  }
  return median(ms);
}

/// Every step from 1 on is a mask event (tinit 0, delta_t 1, a long reduction phase).
adalora::cubic_schedule every_step_masks(std::int64_t b0) {
  return adalora::cubic_schedule({.initial_budget = b0,
                                  .target_budget = b0 / 2,
                                  .total_step = 1000000,
                                  .tinit = 0,
                                  .tfinal = 0,
                                  .delta_t = 1});
}

}  // namespace

int main(int argc, char** argv) {
  adalora::mpi_environment env(argc, argv);
  int layers = 32, iterations = 15;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--layers") == 0) layers = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--iterations") == 0) iterations = std::atoi(argv[i + 1]);
  }
  const adalora::mpi_communicator world;
  const bool root = world.rank() == 0;
  const index_t r = 8;
  const auto whole = llama7b_shapes(layers, r);
  std::int64_t b0 = 0, buffer = 0, elements = 0;
  for (const auto& s : whole) {
    b0 += s.rank;
    buffer += s.rank * ((s.in_features + 255) / 256 + (s.out_features + 255) / 256);
    elements += s.rank * (s.in_features + 1 + s.out_features);
  }
  buffer += b0;
  if (root)
    std::printf(
        "LLaMA-7B shape: %zu adapters, r = %lld, %.1f M elements, %lld triplets; %d ranks\n"
        "partial-sum buffer per mask event: %lld doubles (%.0f KiB)\n\n",
        whole.size(), static_cast<long long>(r), double(elements) / 1e6, static_cast<long long>(b0),
        world.size(), static_cast<long long>(buffer), double(buffer) * 8 / 1024);

  // 1. The sharded step at a mask event (its all-reduce included).
  double sharded_ms = 0;
  const std::int64_t length = buffer;
  {
    const auto mine = adalora::shard_shapes(whole, adalora::shard_layout::triplets, world);
    local_model m(mine, 1 + static_cast<std::uint64_t>(world.rank()));
    adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
                            adalora::mpi_communicator>
        alloc(mine, every_step_masks(b0), {}, {}, world);
    std::int64_t t = 0;
    alloc.step(t++, m.views);  // step 0: warm-up phase, no mask; touches every page
    sharded_ms = time_ms(world, 1, iterations, [&] {
      const auto& res = alloc.step(t++, m.views);
      if (res.action != adalora::mask_action::threshold) std::abort();
    });
  }

  // 2. The all-reduce of the same buffer alone.
  std::vector<double> partials(static_cast<std::size_t>(length), 1.0);
  const double collective_ms = time_ms(world, 5, 20 * iterations, [&] { world.all_reduce_sum(partials); });

  // 3a. One process holding everything (rank 0 times it; the others wait at the barrier).
  double single_ms = 0;
  if (root) {
    local_model m(adalora::shard_shapes(whole, adalora::shard_layout::replicated, 0, 1), 7);
    adalora::rank_allocator<float> alloc(whole, every_step_masks(b0));
    std::int64_t t = 0;
    alloc.step(t++, m.views);
    std::vector<double> ms;
    for (int i = 0; i < iterations + 1; ++i) {
      const auto t0 = clock_type::now();
      alloc.step(t++, m.views);
      if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(clock_type::now() - t0).count());
    }
    single_ms = median(ms);
  }
  MPI_Barrier(world.comm());

  // 3b. The data-parallel gradient all-reduce of every adapter gradient (20 M floats).
  double gradients_ms = 0;
  {
    local_model m(adalora::shard_shapes(whole, adalora::shard_layout::replicated, world), 3);
    adalora::gradient_all_reducer<float> reduce(world);
    gradients_ms = time_ms(world, 1, std::max(3, iterations / 3), [&] { reduce(m.grads); });
  }

  if (root) {
    std::printf("median over iterations (slowest rank per iteration):\n");
    std::printf("  sharded allocator step at a mask event, %d ranks:  %9.3f ms\n", world.size(), sharded_ms);
    std::printf("  its all-reduce of %lld doubles alone:           %9.3f ms\n",
                static_cast<long long>(length), collective_ms);
    std::printf("  collective / sharded step:                          %8.2f %%\n",
                100.0 * collective_ms / sharded_ms);
    std::printf("  one process holding everything, same step:         %9.3f ms\n", single_ms);
    std::printf("  collective / one-process step:                      %8.2f %%\n",
                100.0 * collective_ms / single_ms);
    std::printf("  for scale, the data-parallel gradient all-reduce (%.1f M floats): %.3f ms\n",
                double(elements) / 1e6, gradients_ms);
  }
  return 0;
}
