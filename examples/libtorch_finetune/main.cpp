// AdaLoRA in a libtorch training loop: the adapters are torch parameters, libtorch's autograd
// computes the gradients and a torch optimizer updates them; adalora sees the parameters and
// their .grad() through zero-copy views, gathered once in a named adapter_set
// (adalora::add_torch_adapter, adalora/integrations/torch.hpp).
//
// The problem is examples/quickstart.cpp's, on the same seed: three frozen linear maps whose
// fine-tuning target adds a hidden update of rank 4, 0 and 2, adapters of rank 6, and a rank
// budget pruned from 18 to 6. The targets, the adapters' initial values and every input batch
// are drawn from the same std::mt19937_64(7) stream in the same order as the quickstart, so
// with `--optimizer sgd` (the quickstart's plain SGD, lr 0.1) this program follows the same
// trajectory up to rounding (torch's matmul sums in another order than adalora's sequential
// dot products). The default is Adam, the optimizer PEFT users train with.
//
// After training it prints the kept rank of each layer next to the planted one and, with
// `--compare`, next to what the quickstart's loop (adalora's own forward/backward and SGD, run
// here in-process on the same stream) keeps.
//
//   bazel run -c opt //examples/libtorch_finetune -- [--steps N] [--optimizer adam|sgd]
//       [--compare] [--export DIR]
//
// --export DIR writes the trained adapters as PEFT's adapter files (adapter_model.safetensors,
// adapter_config.json), resized to the final rank pattern.

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "adalora/io/peft_adapter.hpp"
#include "examples/common/planted_update.hpp"

namespace {

using adalora::index_t;

struct layer {
  index_t in, out, hidden_rank;
  std::vector<float> target;  // out × in, row-major
};

/// A float tensor holding a copy of `v` with the given shape.
torch::Tensor tensor_of(const std::vector<float>& v, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<float*>(v.data()), shape, torch::kFloat32).clone();
}

struct problem {
  std::vector<layer> layers = {{24, 16, 4, {}}, {16, 16, 0, {}}, {16, 12, 2, {}}};
  static constexpr index_t r = 6, target_total = 6, batch = 32;
  std::mt19937_64 rng{7};
  std::vector<adalora::svd_adapter<float>> initial;  // the quickstart's initial adapters

  problem() {
    for (auto& L : layers) {
      L.target = adalora_examples::planted_update(L.out, L.in, L.hidden_rank, rng);
      initial.emplace_back(L.in, L.out, r, /*alpha=*/double(r));
      initial.back().initialize(rng);
    }
  }

  /// Layer l's adapter's name: its key in the rank pattern and in the PEFT export.
  static std::string name(std::size_t l) { return "layer" + std::to_string(l); }

  /// The initial budget is the sum of the adapters' ranks, which the allocator fills in.
  adalora::cubic_schedule schedule(std::int64_t steps) const {
    return adalora::cubic_schedule({.target_budget = target_total,
                                    .total_step = steps,
                                    .tinit = steps / 10,
                                    .tfinal = steps / 4,
                                    .delta_t = 10});
  }
};

/// The quickstart's loop on adalora's own forward/backward and plain SGD (lr 0.1): the
/// reference this program's torch path is compared with. Returns the kept rank per layer.
std::vector<index_t> core_reference(std::int64_t steps) {
  problem p;
  auto adapters = p.initial;
  adalora::adapter_set<float> set;
  for (std::size_t l = 0; l < adapters.size(); ++l) set.add(problem::name(l), adapters[l]);
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  adalora::rank_allocator<float> allocator(set, p.schedule(steps));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const index_t batch = problem::batch;
  for (std::int64_t t = 0; t < steps; ++t) {
    for (std::size_t l = 0; l < p.layers.size(); ++l) {
      const auto& L = p.layers[l];
      std::vector<float> x(static_cast<std::size_t>(batch * L.in)), y(static_cast<std::size_t>(batch * L.out), 0.0f);
      for (auto& v : x) v = normal(p.rng);
      adapters[l].forward(adalora::make_matrix_view<const float>(x.data(), batch, L.in),
                          adalora::make_matrix_view(y.data(), batch, L.out));
      std::vector<float> dy(y.size());
      for (index_t b = 0; b < batch; ++b)
        for (index_t i = 0; i < L.out; ++i) {
          float want = 0.0f;
          for (index_t j = 0; j < L.in; ++j)
            want += L.target[static_cast<std::size_t>(i * L.in + j)] * x[static_cast<std::size_t>(b * L.in + j)];
          dy[static_cast<std::size_t>(b * L.out + i)] = (y[static_cast<std::size_t>(b * L.out + i)] - want) / float(batch);
        }
      adapters[l].backward(adalora::make_matrix_view<const float>(x.data(), batch, L.in),
                           adalora::make_matrix_view<const float>(dy.data(), batch, L.out));
    }
    orth.value_and_gradient(set);
    for (auto& a : adapters) {
      auto pa = a.params();
      auto g = a.grads();
      for (index_t i = 0; i < pa.A.size(); ++i) pa.A.data()[i] -= 0.1f * g.A.data()[i];
      for (index_t i = 0; i < pa.E.size(); ++i) pa.E.data()[i] -= 0.1f * g.E.data()[i];
      for (index_t i = 0; i < pa.B.size(); ++i) pa.B.data()[i] -= 0.1f * g.B.data()[i];
    }
    allocator.step(t, set);
    for (auto& a : adapters) a.zero_grad();
  }
  const auto kept = allocator.last_result().kept;
  return {kept.begin(), kept.end()};
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 1000;
  std::string optimizer_name = "adam";
  std::string export_dir;
  bool compare = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--optimizer") == 0 && i + 1 < argc) optimizer_name = argv[++i];
    else if (std::strcmp(argv[i], "--export") == 0 && i + 1 < argc) export_dir = argv[++i];
    else if (std::strcmp(argv[i], "--compare") == 0) compare = true;
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--optimizer adam|sgd] [--compare] [--export DIR]\n", argv[0]);
      return 2;
    }
  }
  if (steps < 40 || (optimizer_name != "adam" && optimizer_name != "sgd")) {
    std::fprintf(stderr, "need --steps >= 40 and --optimizer adam or sgd\n");
    return 2;
  }
  torch::set_num_threads(1);  // tiny matrices: threads cost more than they give

  problem p;
  const std::size_t n = p.layers.size();
  const float alpha = float(problem::r);
  // The adapters as torch parameters: lora_A (r, in), lora_E (r, 1) = 0, lora_B (out, r),
  // starting from the quickstart's initial values.
  std::vector<torch::Tensor> A, E, B, targets;
  std::vector<torch::Tensor> parameters;
  for (std::size_t l = 0; l < n; ++l) {
    const auto& L = p.layers[l];
    const auto init = p.initial[l].params();
    A.push_back(tensor_of(std::vector<float>(init.A.data(), init.A.data() + init.A.size()), {problem::r, L.in}).requires_grad_());
    E.push_back(torch::zeros({problem::r, 1}).requires_grad_());
    B.push_back(tensor_of(std::vector<float>(init.B.data(), init.B.data() + init.B.size()), {L.out, problem::r}).requires_grad_());
    targets.push_back(tensor_of(L.target, {L.out, L.in}));
    parameters.insert(parameters.end(), {A[l], E[l], B[l]});
  }
  // torch makes each .grad() at the first backward(). A zero one now lets one named set view the
  // parameters and their gradients for the whole run: backward() accumulates into an existing
  // .grad() in place, and the loop below clears them in place (not with set_to_none, which would
  // drop the tensors the set views).
  for (auto& q : parameters) q.mutable_grad() = torch::zeros_like(q);
  adalora::adapter_set<float> set;
  for (std::size_t l = 0; l < n; ++l)
    adalora::add_torch_adapter(set, problem::name(l), A[l], E[l], B[l]);

  // PEFT's ranknum: a float tensor holding r, fixed; the scale is alpha / (ranknum + 1e-5).
  const auto ranknum = torch::full({1}, float(problem::r));

  std::unique_ptr<torch::optim::Optimizer> optimizer;
  if (optimizer_name == "adam")
    optimizer = std::make_unique<torch::optim::Adam>(parameters, torch::optim::AdamOptions(0.01));
  else
    optimizer = std::make_unique<torch::optim::SGD>(parameters, torch::optim::SGDOptions(0.1));

  // The regularizer enters through adalora's value and analytic gradient, added into .grad()
  // after backward(), rather than as torch ops inside the loss. Why: (1) it is the same
  // function the core path uses, with the references' exact definition (unsquared Frobenius
  // norm, PEFT's mean; Gram products accumulated in double), so the two paths of this example
  // differ only in the model's forward/backward and the optimizer; (2) it builds no autograd
  // graph of 2·n Gram matrices per step; (3) its gradient is defined where C = I, where torch's
  // norm backward divides by zero. Adding ∂R/∂A and ∂R/∂B to .grad() before optimizer.step() is
  // exactly what autograd would do with R in the loss.
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  adalora::rank_allocator<float> allocator(set, p.schedule(steps));

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> x_host(n);
  for (std::int64_t t = 0; t < steps; ++t) {
    torch::Tensor loss = torch::zeros({});
    for (std::size_t l = 0; l < n; ++l) {
      const auto& L = p.layers[l];
      auto& x = x_host[l];
      x.resize(static_cast<std::size_t>(problem::batch * L.in));
      for (auto& v : x) v = normal(p.rng);  // the quickstart's batch, drawn in the same order
      const auto xt = torch::from_blob(x.data(), {problem::batch, L.in}, torch::kFloat32);
      // PEFT's SVDLinear forward (docs/algorithm.md §2): ((x · (A ⊙ E)ᵀ) · Bᵀ) · scaling / (ranknum + 1e-5).
      const auto y = xt.mm((A[l] * E[l]).t()).mm(B[l].t()) * alpha / (ranknum + 1e-5);
      const auto want = xt.mm(targets[l].t());
      loss = loss + 0.5 * (y - want).pow(2).sum() / double(problem::batch);
    }
    loss.backward();
    const float reg = orth.value_and_gradient(set);  // adds ∂R/∂A, ∂R/∂B into .grad()

    optimizer->step();
    // After optimizer.step(), before the gradients are cleared, with t counting from 0 (docs/algorithm.md
    // §3): the allocator reads the updated parameters and the gradients that produced them, and
    // zeroes pruned entries of E in place (no autograd graph holds E at this point).
    const auto& step = allocator.step(t, set);
    for (auto& q : parameters) q.mutable_grad().zero_();  // in place: the set views them

    if (t % (steps / 6) == 0 || t == steps - 1)
      std::printf("step %4lld  loss %.5f  orth %.4f  budget %2lld  kept %lld %lld %lld\n",
                  static_cast<long long>(t), loss.item<double>(), double(reg),
                  static_cast<long long>(step.budget), static_cast<long long>(step.kept[0]),
                  static_cast<long long>(step.kept[1]), static_cast<long long>(step.kept[2]));
  }

  std::vector<index_t> reference;
  if (compare) reference = core_reference(steps);

  std::printf("\noptimizer %s, %lld steps\nlayer   hidden rank   kept rank%s\n",
              optimizer_name.c_str(), static_cast<long long>(steps),
              compare ? "   kept by the quickstart's loop (SGD, adalora forward/backward)" : "");
  int matches = 0, same_as_reference = 0;
  for (std::size_t l = 0; l < n; ++l) {
    const index_t kept = allocator.last_result().kept[l];
    matches += kept == p.layers[l].hidden_rank ? 1 : 0;
    std::printf("layer%zu  %11lld  %10lld", l, static_cast<long long>(p.layers[l].hidden_rank),
                static_cast<long long>(kept));
    if (compare) {
      same_as_reference += kept == reference[l] ? 1 : 0;
      std::printf("  %10lld", static_cast<long long>(reference[l]));
    }
    std::printf("\n");
  }
  std::printf("%d of %zu layers kept exactly their hidden rank\n", matches, n);
  if (compare)
    std::printf("%d of %zu layers kept the same rank as the quickstart's loop\n",
                same_as_reference, n);

  if (!export_dir.empty()) {
    adalora::peft_adalora_config config;
    config.init_r = problem::r;
    config.target_r = problem::target_total / index_t(n);
    config.tinit = steps / 10;
    config.tfinal = steps / 4;
    config.delta_t = 10;
    config.total_step = steps;
    config.orth_reg_weight = 0.1;
    config.lora_alpha = alpha;
    config.pattern = allocator.pattern();
    std::vector<adalora::peft_module_ref<float>> modules;
    for (std::size_t l = 0; l < n; ++l)
      modules.push_back({set.name(l), adalora::torch_adapter_ref<const float>(A[l], E[l], B[l])});
    adalora::save_peft_adapter<float>(export_dir, config, modules);
    std::printf("wrote %s/%s and %s/%s\n", export_dir.c_str(), adalora::peft_weights_file,
                export_dir.c_str(), adalora::peft_config_file);
  }
  return 0;
}
