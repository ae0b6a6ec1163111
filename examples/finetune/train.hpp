#pragma once
// One fine-tuning run: minibatch Adam over a hand-written loss, with AdaLoRA's two extra calls
// in their place (the regularizer's gradient before the optimizer step, the allocator right
// after it, docs/algorithm.md §3), and the numbers the demo reports. Rank that changes
// physically goes through one path, trainer::change_rank: compaction once the pattern is final
// (run_config::compact) and growth (method::growth, a rank_redistributor after the allocator).

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
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

  /// Adam's moments of parameter k (flat, laid out like it), for a change of rank to remap.
  vector& first_moment(std::size_t k) { return m_.at(k); }
  vector& second_moment(std::size_t k) { return v_.at(k); }

  /// Points the optimizer at the tensors after a change of rank: the same parameters in the same
  /// order, each moment already remapped to its new size. The step count (bias correction) stays.
  void rebind(std::vector<parameter> params) {
    if (params.size() != params_.size())
      throw std::invalid_argument("adam::rebind: expected " + std::to_string(params_.size()) +
                                  " parameters, got " + std::to_string(params.size()));
    for (std::size_t k = 0; k < params.size(); ++k)
      if (params[k].size != m_[k].size() || params[k].size != v_[k].size())
        throw std::invalid_argument("adam::rebind: parameter " + std::to_string(k) + " has " +
                                    std::to_string(params[k].size) + " numbers, its moments " +
                                    std::to_string(m_[k].size()) + " and " +
                                    std::to_string(v_[k].size()) + "; remap them first");
    params_ = std::move(params);
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
  bool compact = false;   ///< AdaLoRA: drop the pruned triplets once the pattern is final
  adapter_options adapters;
  adalora_options ada;    ///< growth too: ada.initial_rank per matrix, a total of `budget`
                          ///< per matrix at the end (equal: constant total; above: rising)
  adalora::redistribution_options growth{.interval = 10, .moves = 2};  ///< growth: the moves
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
  // AdaLoRA: the step after which the pattern was final (and, with `compact`, the adapters were
  // compacted), and the time of every later step: all of it (training only, no evaluation), and
  // the adapters' own part (their forward and backward, regularizer, Adam, allocator).
  std::int64_t final_from = -1;
  std::vector<double> step_seconds, adapter_step_seconds;
  /// Σ kept·(in + out) / Σ initial rank·(in + out): the kept fraction of the adapters' products.
  double kept_cost_fraction = std::nan("");
};

/// One fine-tuning run, a step at a time (so that two runs can be timed side by side): minibatch
/// Adam on `data.train`, with AdaLoRA's regularizer and allocator for the SVD form.
class trainer {
 public:
  trainer(const network& base, const split& data, const loss_function& loss, const run_config& c)
      : base_(base),
        data_(data),
        loss_(loss),
        c_(c),
        init_(derive_seed(c.seed, 1)),     // adapter initialisation
        batches_(derive_seed(c.seed, 2)),  // minibatch order
        model_(base, adapter_options_of(c, base.layers.size()), init_),
        optimizer_(model_.parameters()),
        orth_({.weight = c.ada.orth_weight}),
        start_(clock::now()) {
    result_.config = c;
    const std::size_t n_layers = base.layers.size();
    // The SVD form: the library's regularizer over the model's adapters, one named set of views
    // of their tensors; AdaLoRA also has the allocator, made from the same set (its initial
    // budget is the sum of the adapters' ranks).
    if (svd_form(c.kind)) adapters_ = model_.svd_adapters();
    const auto frac = [&](double f) { return static_cast<std::int64_t>(f * double(c.steps)); };
    const adalora::schedule_options phases{
        .target_budget = static_cast<std::int64_t>(c.budget) * static_cast<std::int64_t>(n_layers),
        .total_step = c.steps,
        .tinit = frac(c.ada.tinit),
        .tfinal = frac(c.ada.tfinal),
        .delta_t = c.ada.delta_t};
    // AdaLoRA at a budget equal to its initial rank has nothing to prune (the cubic schedule
    // refuses bT = b0): its allocator then keeps a constant total, and nothing moves.
    if (c.kind == method::adalora && c.budget < c.ada.initial_rank) {
      allocator_ = std::make_unique<cubic_allocator>(adapters_, adalora::cubic_schedule(phases));
    } else if (allocated(c.kind) && c.budget == c.ada.initial_rank) {
      allocator_ = std::make_unique<constant_allocator>(
          adapters_, adalora::constant_total_schedule({.total_step = phases.total_step,
                                                       .tinit = phases.tinit,
                                                       .tfinal = phases.tfinal,
                                                       .delta_t = phases.delta_t}));
    } else if (c.kind == method::adalora) {
      throw std::invalid_argument("finetune::trainer: AdaLoRA's budget " +
                                  std::to_string(c.budget) + " is above its initial rank " +
                                  std::to_string(c.ada.initial_rank) + "; it can only prune");
    } else if (c.kind == method::growth) {
      allocator_ = std::make_unique<rising_allocator>(
          adapters_, adalora::rising_schedule(phases), adalora::smoothed_sensitivity{},
          adalora::allocator_options{.rank_can_grow = true});
    }
    if (c.kind == method::growth) mover_.emplace(c.growth);
    with_allocator([&](auto& a) {
      const auto& before = a.last_result();  // full ranks before the first step
      result_.rank_history.push_back({0, std::vector<int>(before.kept.begin(), before.kept.end())});
    });
    order_ = permutation(data.train.size(), batches_);
    rows_.resize(static_cast<std::size_t>(c.batch));
    result_.curve.push_back({0, loss.evaluate(base, data.validation)});
    curve_every_ = std::max<std::int64_t>(1, c.steps / c.curve_points);
  }

  // The model's views point into this object.
  trainer(const trainer&) = delete;
  trainer& operator=(const trainer&) = delete;

  bool done() const { return t_ == c_.steps; }

  /// One optimizer step (t counting from 0), and a validation point every so often.
  void step() {
    const auto t0 = clock::now();
    const Eigen::Index n = data_.train.size();
    for (auto& r : rows_) {  // epochs of a fixed shuffle per run
      if (cursor_ == n) {
        order_ = permutation(n, batches_);
        cursor_ = 0;
      }
      r = order_[static_cast<std::size_t>(cursor_++)];
    }
    const dataset batch = gather(data_.train, rows_);
    loss_(model_.forward(batch.x), batch, &dout_);
    model_.backward(dout_);
    const auto t1 = clock::now();  // from here on, only adapter work
    if (!adapters_.empty()) orth_.value_and_gradient(adapters_);  // adds ∂R/∂A, ∂R/∂B
    optimizer_.step(c_.lr);
    with_allocator([&](auto& a) {
      // After the optimizer step, before the gradients are cleared, t counting from 0.
      const auto& s = a.step(t_, adapters_);
      bool event = s.action == adalora::mask_action::threshold || s.forced;
      if (mover_) {
        if (const auto change = mover_->step(t_, a)) {
          change_rank(*change);
          event = true;
        }
      }
      if (event) {
        const auto& kept = a.last_result().kept;
        result_.rank_history.push_back({t_, std::vector<int>(kept.begin(), kept.end())});
      }
      if (result_.final_from < 0 && a.pattern_final()) {
        result_.final_from = t_;
        if (c_.compact) change_rank(a.compact());
      }
    });
    model_.zero_grad();
    const auto t2 = clock::now();
    const double adapter_seconds = model_.take_adapter_seconds() + seconds(t1, t2);
    if (result_.final_from >= 0 && t_ > result_.final_from) {
      result_.step_seconds.push_back(seconds(t0, t2));
      result_.adapter_step_seconds.push_back(adapter_seconds);
    }
    ++t_;
    if (t_ % curve_every_ == 0 || t_ == c_.steps)
      result_.curve.push_back({t_, loss_.evaluate(model_.merged(), data_.validation)});
  }

  /// The run's numbers, once done(). With `trained` non-null, the fine-tuned network (updates
  /// merged) is stored there.
  run_result finish(network* trained = nullptr) {
    const network final_net = model_.merged();
    result_.validation = result_.curve.back().validation;  // the last step always records one
    result_.test = loss_.evaluate(final_net, data_.test);
    with_allocator([&](auto& a) {
      const auto& kept = a.last_result().kept;
      result_.ranks.assign(kept.begin(), kept.end());
    });
    if (allocated(c_.kind)) {
      double kept_cost = 0, initial_cost = 0;
      for (std::size_t l = 0; l < base_.layers.size(); ++l) {
        const auto width = static_cast<double>(base_.layers[l].in() + base_.layers[l].out());
        kept_cost += result_.ranks[l] * width;
        initial_cost += c_.ada.initial_rank * width;
      }
      result_.kept_cost_fraction = kept_cost / initial_cost;
    } else {
      result_.ranks = model_.initial_ranks();
    }
    result_.params = model_.trainable_parameters(result_.ranks);
    if (trained != nullptr) *trained = final_net;
    result_.seconds = seconds(start_, clock::now());
    return std::move(result_);
  }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds(clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }

  using cubic_allocator = adalora::rank_allocator<float>;
  using constant_allocator = adalora::rank_allocator<float, adalora::smoothed_sensitivity,
                                                     adalora::constant_total_schedule>;
  using rising_allocator =
      adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::rising_schedule>;

  /// Calls f with the allocator, whichever schedule it has; nothing without one.
  template <class F>
  void with_allocator(F&& f) {
    std::visit(
        [&](auto& a) {
          if constexpr (!std::is_same_v<std::decay_t<decltype(a)>, std::monostate>) f(*a);
        },
        allocator_);
  }

  static adapter_options adapter_options_of(const run_config& c, std::size_t n_layers) {
    adapter_options ao = c.adapters;
    ao.kind = c.kind;
    if (allocated(c.kind))
      ao.ranks.assign(n_layers, c.ada.initial_rank);
    else if (c.kind != method::full)
      ao.ranks = c.layer_ranks.empty() ? std::vector<int>(n_layers, c.budget) : c.layer_ranks;
    return ao;
  }

  /// Applies a change of rank (the allocator has made it already) to everything with a triplet
  /// axis: each layer's A, E, B and gradients, and Adam's two moments of each (new triplets'
  /// gradients and moments 0, their parameters by the init policy: E = 0, so the function does
  /// not jump); then points the optimizer and the adapter set at the new tensors.
  void change_rank(const adalora::rank_change& change) {
    for (std::size_t l = 0; l < change.size(); ++l) {
      const adalora::triplet_map& m = change[l];
      model_.change_rank(l, m);
      if (m.added() > 0) growth_init_(model_.adapter(l), m, growth_rng_);
      const auto [out, in] = model_.shape(l);
      const std::pair<triplet_axis, Eigen::Index> axes[] = {
          {triplet_axis::rows, in}, {triplet_axis::entries, 1}, {triplet_axis::columns, out}};
      for (std::size_t j = 0; j < 3; ++j) {
        const std::size_t k = adapted_network::svd_parameter(l, j);
        finetune::change_rank(optimizer_.first_moment(k), axes[j].first, axes[j].second, m);
        finetune::change_rank(optimizer_.second_moment(k), axes[j].first, axes[j].second, m);
      }
    }
    optimizer_.rebind(model_.parameters());
    adapters_ = model_.svd_adapters();
  }

  const network& base_;
  const split& data_;
  const loss_function& loss_;
  run_config c_;
  rng init_, batches_;
  adapted_network model_;
  adam optimizer_;
  adalora::adapter_set<float> adapters_;
  std::variant<std::monostate, std::unique_ptr<cubic_allocator>,
               std::unique_ptr<constant_allocator>, std::unique_ptr<rising_allocator>>
      allocator_;
  std::optional<adalora::rank_redistributor<>> mover_;
  adalora::zero_singular_value_init growth_init_{.init_std = 0.02};  // the references' init std
  std::mt19937_64 growth_rng_{derive_seed(c_.seed, 3)};
  adalora::orthogonality_regularizer<float> orth_;
  run_result result_;
  std::vector<Eigen::Index> order_;
  Eigen::Index cursor_ = 0;
  std::vector<Eigen::Index> rows_;
  matrix dout_;
  std::int64_t curve_every_ = 1;
  std::int64_t t_ = 0;
  clock::time_point start_;
};

/// Fine-tunes `base` on `data.train` with one method and returns its validation and test numbers.
/// With `trained` non-null, the fine-tuned network (updates merged) is stored there.
inline run_result train_run(const network& base, const split& data, const loss_function& loss,
                            const run_config& c, network* trained = nullptr) {
  trainer run(base, data, loss, c);
  while (!run.done()) run.step();
  return run.finish(trained);
}

}  // namespace finetune
