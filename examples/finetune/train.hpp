#pragma once
// One fine-tuning run: minibatch Adam over a hand-written loss, with AdaLoRA's two extra calls
// in their place (the regularizer's gradient before the optimizer step, the allocator right
// after it, docs/algorithm.md §3), and the numbers the demo reports.

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "examples/finetune/data.hpp"
#include "examples/finetune/model.hpp"

namespace finetune {

// ---- losses -----------------------------------------------------------------------------------

enum class loss_kind {
  relative_mse,   ///< mean squared error divided by the pre-trained model's (1 = no progress)
  cross_entropy,  ///< softmax cross-entropy over the classes
};

/// A loss value, and the accuracy for classification.
struct loss_value {
  double loss = 0;
  double accuracy = 0;  ///< classification only
};

struct loss_function {
  loss_kind kind = loss_kind::relative_mse;
  double mse_scale = 1;  ///< relative_mse: the pre-trained model's MSE on the training set

  /// Loss (mean over the batch) of `out` against `d`; writes dL/dout into `grad` if non-null.
  loss_value operator()(const matrix& out, const dataset& d, matrix* grad) const {
    loss_value v;
    const auto n = static_cast<double>(out.rows());
    if (kind == loss_kind::relative_mse) {
      const matrix diff = out - d.y;
      const double per = 1.0 / (n * static_cast<double>(out.cols()) * mse_scale);
      v.loss = static_cast<double>(diff.squaredNorm()) * per;
      if (grad != nullptr) *grad = static_cast<float>(2 * per) * diff;
      return v;
    }
    // Cross-entropy with the log-sum-exp shift; dL/dout = (softmax − onehot) / n.
    if (grad != nullptr) grad->resize(out.rows(), out.cols());
    std::int64_t correct = 0;
    for (Eigen::Index i = 0; i < out.rows(); ++i) {
      const int label = d.labels[static_cast<std::size_t>(i)];
      Eigen::Index best = 0;
      const float top = out.row(i).maxCoeff(&best);
      correct += best == label ? 1 : 0;
      const Eigen::ArrayXf e = (out.row(i).array() - top).exp().transpose();
      const float sum = e.sum();
      v.loss += static_cast<double>(std::log(sum) - (out(i, label) - top));
      if (grad != nullptr) {
        grad->row(i) = (e / (sum * static_cast<float>(n))).matrix().transpose();
        (*grad)(i, label) -= static_cast<float>(1.0 / n);
      }
    }
    v.loss /= n;
    v.accuracy = static_cast<double>(correct) / n;
    return v;
  }

  /// Loss and accuracy of a network on a whole set, in slices so that memory stays small.
  loss_value evaluate(const network& net, const dataset& d) const {
    constexpr Eigen::Index slice = 2048;
    loss_value total;
    for (Eigen::Index i = 0; i < d.size(); i += slice) {
      const Eigen::Index n = std::min(slice, d.size() - i);
      dataset part;
      part.x = d.x.middleRows(i, n);
      if (d.y.size() > 0) part.y = d.y.middleRows(i, n);
      if (!d.labels.empty()) part.labels.assign(d.labels.begin() + i, d.labels.begin() + i + n);
      const loss_value v = (*this)(forward(net, part.x), part, nullptr);
      total.loss += v.loss * static_cast<double>(n);
      total.accuracy += v.accuracy * static_cast<double>(n);
    }
    total.loss /= static_cast<double>(d.size());
    total.accuracy /= static_cast<double>(d.size());
    return total;
  }
};

// ---- the optimizer ----------------------------------------------------------------------------

/// Adam (Kingma & Ba 2015) with bias correction, as torch.optim.Adam without weight decay.
class adam {
 public:
  adam(std::vector<parameter> params, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : params_(std::move(params)), beta1_(beta1), beta2_(beta2), eps_(eps) {
    for (const parameter& p : params_) {
      m_.emplace_back(vector::Zero(p.size));
      v_.emplace_back(vector::Zero(p.size));
    }
  }

  void step(double lr) {
    ++t_;
    const double c1 = 1 - std::pow(beta1_, static_cast<double>(t_));
    const double c2 = 1 - std::pow(beta2_, static_cast<double>(t_));
    const auto b1 = static_cast<float>(beta1_), b2 = static_cast<float>(beta2_);
    const auto step_size = static_cast<float>(lr / c1);
    const auto root_c2 = static_cast<float>(std::sqrt(c2)), eps = static_cast<float>(eps_);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Eigen::Map<vector> w(params_[k].value, params_[k].size);
      Eigen::Map<const vector> g(params_[k].grad, params_[k].size);
      m_[k] = b1 * m_[k] + (1 - b1) * g;
      v_[k] = b2 * v_[k] + (1 - b2) * g.cwiseAbs2();
      w.array() -= step_size * m_[k].array() / (v_[k].array().sqrt() / root_c2 + eps);
    }
  }

 private:
  std::vector<parameter> params_;
  std::vector<vector> m_, v_;
  double beta1_, beta2_, eps_;
  std::int64_t t_ = 0;
};

// ---- one run ----------------------------------------------------------------------------------

/// AdaLoRA's own settings (the allocator's schedule as fractions of the run).
struct adalora_options {
  int initial_rank = 8;
  double orth_weight = 0.1;   ///< loralib's default; the loss here is O(1) at the start
  double tinit = 0.1;         ///< warm-up, fraction of the steps
  double tfinal = 0.3;        ///< final phase (pattern fixed, training goes on), fraction
  std::int64_t delta_t = 10;  ///< mask interval
};

struct run_config {
  method kind = method::lora;
  int budget = 2;  ///< rank per adapted matrix: LoRA's r, AdaLoRA's average final rank
  std::vector<int> layer_ranks;  ///< LoRA / svd: per-matrix ranks instead of `budget` each
  double lr = 1e-3;
  std::uint64_t seed = 0;
  std::int64_t steps = 1000;
  Eigen::Index batch = 64;
  int curve_points = 25;  ///< validation losses recorded along the run
  adapter_options adapters;
  adalora_options ada;
};

/// A point of the validation curve.
struct curve_point {
  std::int64_t step;
  loss_value validation;
};

/// One allocator event for the history CSV.
struct rank_event {
  std::int64_t step;
  std::vector<int> kept;
};

struct run_result {
  run_config config;
  loss_value validation, test;
  std::vector<curve_point> curve;
  std::vector<rank_event> rank_history;  ///< AdaLoRA only
  std::vector<int> ranks;
  std::int64_t params = 0;
  double seconds = 0;
};

/// Fine-tunes `base` on `data.train` with one method and returns its validation and test numbers.
/// With `trained` non-null, the fine-tuned network (updates merged) is stored there.
inline run_result train_run(const network& base, const split& data, const loss_function& loss,
                            const run_config& c, network* trained = nullptr) {
  const auto start = std::chrono::steady_clock::now();
  run_result result;
  result.config = c;
  rng init(derive_seed(c.seed, 1));     // adapter initialisation
  rng batches(derive_seed(c.seed, 2));  // minibatch order

  adapter_options ao = c.adapters;
  ao.kind = c.kind;
  const std::size_t n_layers = base.layers.size();
  if (c.kind == method::adalora)
    ao.ranks.assign(n_layers, c.ada.initial_rank);
  else if (c.kind != method::full)
    ao.ranks = c.layer_ranks.empty() ? std::vector<int>(n_layers, c.budget) : c.layer_ranks;
  adapted_network model(base, ao, init);
  adam optimizer(model.parameters());

  // The SVD form: the library's regularizer over the model's adapters, one named set of views
  // of their tensors; AdaLoRA also has the allocator, made from the same set (its initial budget
  // is the sum of the adapters' ranks).
  adalora::adapter_set<float> adapters;
  std::unique_ptr<adalora::rank_allocator<float>> allocator;
  adalora::orthogonality_regularizer<float> orth({.weight = c.ada.orth_weight});
  if (svd_form(c.kind)) adapters = model.svd_adapters();
  if (c.kind == method::adalora) {
    const auto frac = [&](double f) { return static_cast<std::int64_t>(f * double(c.steps)); };
    allocator = std::make_unique<adalora::rank_allocator<float>>(
        adapters,
        adalora::cubic_schedule({.target_budget = static_cast<std::int64_t>(c.budget) *
                                                  static_cast<std::int64_t>(n_layers),
                                 .total_step = c.steps,
                                 .tinit = frac(c.ada.tinit),
                                 .tfinal = frac(c.ada.tfinal),
                                 .delta_t = c.ada.delta_t}));
    const auto& before = allocator->last_result();  // full ranks before the first step
    result.rank_history.push_back({0, std::vector<int>(before.kept.begin(), before.kept.end())});
  }

  const Eigen::Index n = data.train.size();
  std::vector<Eigen::Index> order = permutation(n, batches);
  Eigen::Index cursor = 0;
  std::vector<Eigen::Index> rows(static_cast<std::size_t>(c.batch));
  matrix dout;
  result.curve.push_back({0, loss.evaluate(base, data.validation)});
  const std::int64_t curve_every = std::max<std::int64_t>(1, c.steps / c.curve_points);

  for (std::int64_t t = 0; t < c.steps; ++t) {
    for (auto& r : rows) {  // epochs of a fixed shuffle per run
      if (cursor == n) {
        order = permutation(n, batches);
        cursor = 0;
      }
      r = order[static_cast<std::size_t>(cursor++)];
    }
    const dataset batch = gather(data.train, rows);
    loss(model.forward(batch.x), batch, &dout);
    model.backward(dout);
    if (!adapters.empty()) orth.value_and_gradient(adapters);  // adds ∂R/∂A, ∂R/∂B
    optimizer.step(c.lr);
    if (allocator) {
      // After the optimizer step, before the gradients are cleared, t counting from 0.
      const auto& s = allocator->step(t, adapters);
      if (s.action == adalora::mask_action::threshold || s.forced)
        result.rank_history.push_back({t, std::vector<int>(s.kept.begin(), s.kept.end())});
    }
    model.zero_grad();
    if ((t + 1) % curve_every == 0 || t + 1 == c.steps)
      result.curve.push_back({t + 1, loss.evaluate(model.merged(), data.validation)});
  }

  const network final_net = model.merged();
  result.validation = result.curve.back().validation;  // the last step always records one
  result.test = loss.evaluate(final_net, data.test);
  if (allocator) {
    const auto& kept = allocator->last_result().kept;
    result.ranks.assign(kept.begin(), kept.end());
  } else {
    result.ranks = model.initial_ranks();
  }
  result.params = model.trainable_parameters(result.ranks);
  if (trained != nullptr) *trained = final_net;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace finetune
