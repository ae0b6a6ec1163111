#pragma once
// The network of the demo and the ways it is fine-tuned, with a hand-written backward pass in
// Eigen: this is the "plug adalora into your own training loop" story. Only the SVD adapters
// (AdaLoRA's) use the library: forward/backward over views of Eigen matrices, and merge for
// evaluation. The LoRA baseline and full fine-tuning are written here, as a user would.
//
// The adapters use the Eigen fast path (eigen_adapter_forward / eigen_adapter_backward, Eigen's
// GEMM) rather than the portable adapter_forward / adapter_backward: same arguments and results
// up to rounding, but the portable kernels sum sequentially for bit parity with torch, which made
// AdaLoRA's runs about 2.5 times slower here. A demo wants the speed, not the last bit.

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/eigen.hpp"
#include "adalora/integrations/eigen_kernels.hpp"
#include "examples/finetune/data.hpp"
#include "examples/finetune/rank_moves.hpp"

namespace finetune {

enum class activation { tanh, relu };

/// y = x · Wᵀ + b, W out × in (torch's nn.Linear layout).
struct linear {
  std::string name;
  matrix W;
  row_vector b;
  Eigen::Index in() const noexcept { return W.cols(); }
  Eigen::Index out() const noexcept { return W.rows(); }
};

/// A multi-layer perceptron: `act` after every layer but the last, which stays linear.
struct network {
  std::vector<linear> layers;
  activation act = activation::tanh;
};

inline void apply_activation(activation a, matrix& z) {
  if (a == activation::tanh)
    z = z.array().tanh().matrix();
  else
    z = z.cwiseMax(0.0f);
}

/// The network's output for a batch (n × in): what evaluation and data generation use.
inline matrix forward(const network& net, const matrix& x) {
  matrix h = x;
  for (std::size_t l = 0; l < net.layers.size(); ++l) {
    const linear& L = net.layers[l];
    matrix z = h * L.W.transpose();
    z.rowwise() += L.b;
    if (l + 1 < net.layers.size()) apply_activation(net.act, z);
    h = std::move(z);
  }
  return h;
}

/// full: every weight and bias trained. lora: B·A at fixed ranks. adalora: the SVD form with
/// the rank allocator. svd: the SVD form at fixed ranks, no pruning (an ablation that separates
/// AdaLoRA's parametrization from its allocation). growth: the SVD form with the allocator and
/// a rank_redistributor that moves rank (drops the weakest triplets, adds where it is missing).
enum class method { full, lora, adalora, svd, growth };

/// The SVD form B·diag(E)·A (AdaLoRA, growth and the fixed-rank ablation).
inline bool svd_form(method m) {
  return m == method::adalora || m == method::svd || m == method::growth;
}
/// Methods whose ranks the library's allocator decides.
inline bool allocated(method m) { return m == method::adalora || m == method::growth; }

/// A trainable tensor and its gradient, for the optimizer (which never needs to know which
/// method owns it).
struct parameter {
  float* value;
  float* grad;
  Eigen::Index size;
};

/// How the adapters are set up. LoRA: ΔW = (alpha / r) · B·A, B = 0 and A ~ N(0, 1/in) at
/// the start (Hu et al. 2021). SVD form: ΔW = alpha / (r_init + 1e-5) · B·diag(E)·A with the
/// references' init (E = 0, A and B ~ N(0, 0.02²); docs/algorithm.md §1).
struct adapter_options {
  method kind = method::lora;
  std::vector<int> ranks;  ///< per layer: LoRA's and svd's fixed rank, AdaLoRA's initial rank
  double lora_alpha = 8;
  double adalora_alpha = 8;
};

/// The base network plus one method's trainable parameters. Forward caches what backward needs;
/// backward accumulates into the gradients until zero_grad().
class adapted_network {
 public:
  adapted_network(const network& base, const adapter_options& o, rng& g)
      : base_(&base), options_(o) {
    if (o.kind != method::full && o.ranks.size() != base.layers.size())
      throw std::invalid_argument("adapted_network: one adapter rank per layer is needed");
    for (const linear& L : base.layers) {
      layer_state s;
      const int r = o.kind == method::full ? 0 : o.ranks[layers_.size()];
      if (r < 0) throw std::invalid_argument("adapted_network: adapter ranks must be >= 0");
      if (o.kind == method::full) {
        s.W = L.W;
        s.b = L.b;
        s.dW = matrix::Zero(L.out(), L.in());
        s.db = row_vector::Zero(L.out());
      } else if (o.kind == method::lora) {
        s.A = g.normal_matrix(r, L.in(), 1.0 / std::sqrt(static_cast<double>(L.in())));
        s.B = matrix::Zero(L.out(), r);
        s.lora_scaling = r > 0 ? static_cast<float>(o.lora_alpha / r) : 0.0f;
      } else {
        s.A = g.normal_matrix(r, L.in(), 0.02);
        s.E = vector::Zero(r);
        s.B = g.normal_matrix(L.out(), r, 0.02);
        s.scale = adalora::adapter_scale<float>(o.adalora_alpha, r);
      }
      if (o.kind != method::full) {
        s.dA = matrix::Zero(s.A.rows(), s.A.cols());
        s.dB = matrix::Zero(s.B.rows(), s.B.cols());
        s.dE = vector::Zero(s.E.size());
      }
      layers_.push_back(std::move(s));
    }
    h_.resize(layers_.size() + 1);
    z_.resize(layers_.size());
  }

  // The views below point into this object: it must not move while they are in use.
  adapted_network(const adapted_network&) = delete;
  adapted_network& operator=(const adapted_network&) = delete;

  /// The output for a training batch; keeps the activations for backward().
  const matrix& forward(const matrix& x) {
    h_[0] = x;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const linear& L = base_->layers[l];
      layer_state& s = layers_[l];
      matrix& z = z_[l];
      const matrix& h = h_[l];
      const bool full = options_.kind == method::full;
      z.noalias() = h * (full ? s.W : L.W).transpose();
      z.rowwise() += full ? s.b : L.b;
      const bool adapted = s.A.rows() > 0;  // rank-0 adapters (ablations) do nothing
      if (options_.kind == method::lora && adapted) {
        s.u.noalias() = h * s.A.transpose();  // n × r, kept for backward
        z.noalias() += s.lora_scaling * (s.u * s.B.transpose());
      } else if (svd_form(options_.kind) && adapted) {
        // y += ((x · (A ⊙ E)ᵀ) · Bᵀ) · alpha / (r + 1e-5), straight into z's memory.
        const auto t0 = clock::now();
        adalora::eigen_adapter_forward<float>(adapter_params(s), s.scale, adalora::as_matrix(h),
                                              adalora::as_matrix(z), s.ws);
        adapter_seconds_ += std::chrono::duration<double>(clock::now() - t0).count();
      }
      h_[l + 1] = z;
      if (l + 1 < layers_.size()) apply_activation(base_->act, h_[l + 1]);
    }
    return h_.back();
  }

  /// Backpropagates dL/d(output) (n × out) through the last forward(); gradients are added.
  void backward(const matrix& dout) {
    dz_ = dout;
    for (std::size_t l = layers_.size(); l-- > 0;) {
      const linear& L = base_->layers[l];
      layer_state& s = layers_[l];
      const matrix& h = h_[l];
      const bool need_dx = l > 0;  // the input's gradient is never needed
      if (need_dx) dh_.noalias() = dz_ * (options_.kind == method::full ? s.W : L.W);
      if (options_.kind == method::full) {
        s.dW.noalias() += dz_.transpose() * h;
        s.db += dz_.colwise().sum();
      } else if (s.A.rows() == 0) {
        // A rank-0 adapter (an ablation's) has no parameters and adds nothing to dh.
      } else if (options_.kind == method::lora) {
        // z += c · (h Aᵀ) Bᵀ:  dB = c dzᵀ u,  du = c dz B,  dA = duᵀ h,  dh += du A.
        s.dB.noalias() += s.lora_scaling * (dz_.transpose() * s.u);
        du_.noalias() = s.lora_scaling * (dz_ * s.B);
        s.dA.noalias() += du_.transpose() * h;
        if (need_dx) dh_.noalias() += du_ * s.A;
      } else {  // the SVD form, by the library
        const auto t0 = clock::now();
        adalora::eigen_adapter_backward<float>(
            adapter_params(s), s.scale, adalora::as_matrix(h), adalora::as_matrix(dz_),
            adapter_grads(s), s.ws,
            need_dx ? adalora::as_matrix(dh_) : adalora::matrix_view<float>{});
        adapter_seconds_ += std::chrono::duration<double>(clock::now() - t0).count();
      }
      if (!need_dx) break;
      // Through the activation of layer l − 1 (its output is h_[l]).
      if (base_->act == activation::tanh)
        dz_ = dh_.array() * (1.0f - h.array().square());
      else
        dz_ = dh_.array() * (h.array() > 0.0f).cast<float>();
    }
  }

  /// Seconds spent in the SVD adapters' forward and backward since the last call (the
  /// --compact report's "adapter's own cost"); resets the count.
  double take_adapter_seconds() { return std::exchange(adapter_seconds_, 0.0); }

  void zero_grad() {
    for (layer_state& s : layers_) {
      s.dW.setZero();
      s.db.setZero();
      s.dA.setZero();
      s.dE.setZero();
      s.dB.setZero();
    }
  }

  /// Every trainable tensor with its gradient, for the optimizer, in a fixed order: per layer,
  /// W and b (full), A and B (LoRA), or A, E and B (the SVD form, svd_parameter(l, j) = 3l + j),
  /// rank-0 ones (no memory) included, so that a change of rank keeps every index.
  std::vector<parameter> parameters() {
    std::vector<parameter> p;
    const auto add = [&p](auto& value, auto& grad) {
      p.push_back({value.data(), grad.data(), value.size()});
    };
    for (layer_state& s : layers_) {
      if (options_.kind == method::full) {
        add(s.W, s.dW);
        add(s.b, s.db);
        continue;
      }
      add(s.A, s.dA);
      if (svd_form(options_.kind)) add(s.E, s.dE);
      add(s.B, s.dB);
    }
    return p;
  }
  /// The index in parameters() of layer l's A (j = 0), E (1) or B (2), for the SVD form.
  static std::size_t svd_parameter(std::size_t l, std::size_t j) { return 3 * l + j; }

  // ---- the SVD form: the adapters the library's regularizer and allocator work on ----

  /// One named set of views of the SVD form's tensors (parameters and gradients), one adapter per
  /// layer under the layer's name. The views point into this object, which must not move.
  adalora::adapter_set<float> svd_adapters() {
    adalora::adapter_set<float> set;
    for (std::size_t l = 0; l < layers_.size(); ++l)
      set.add(base_->layers[l].name, adapter_params(layers_[l]), adapter_grads(layers_[l]));
    return set;
  }

  /// Layer l's SVD adapter (views of its A, E, B).
  adalora::svd_adapter_ref<float> adapter(std::size_t l) { return adapter_params(layers_.at(l)); }

  /// Applies a change of rank (rank_allocator::compact, growth) to layer l's A, E, B and their
  /// gradients, for the SVD form. Drops are made in place; new triplets are 0 (the parameters'
  /// values are for a growth init policy to set). The scale alpha / r stays the one of the
  /// initial rank: changing it would rescale the update the kept triplets already make.
  /// Views taken before (svd_adapters(), adapter()) are stale afterwards.
  void change_rank(std::size_t l, const adalora::triplet_map& m) {
    if (!svd_form(options_.kind))
      throw std::invalid_argument("adapted_network::change_rank: only the SVD form changes rank");
    layer_state& s = layers_.at(l);
    const Eigen::Index in = base_->layers[l].in(), out = base_->layers[l].out();
    for (matrix* a : {&s.A, &s.dA}) finetune::change_rank(*a, triplet_axis::rows, in, m);
    for (vector* e : {&s.E, &s.dE}) finetune::change_rank(*e, triplet_axis::entries, 1, m);
    for (matrix* b : {&s.B, &s.dB}) finetune::change_rank(*b, triplet_axis::columns, out, m);
  }

  /// The shape of layer l's weight, (out, in).
  std::pair<Eigen::Index, Eigen::Index> shape(std::size_t l) const {
    return {base_->layers.at(l).out(), base_->layers.at(l).in()};
  }

  /// The rank of each layer's update at the start: the adapters' ranks, min(in, out) for full
  /// fine-tuning (dense). AdaLoRA's final ranks are the allocator's kept counts.
  std::vector<int> initial_ranks() const {
    if (options_.kind != method::full) return options_.ranks;
    std::vector<int> r;
    for (const linear& L : base_->layers) r.push_back(static_cast<int>(std::min(L.in(), L.out())));
    return r;
  }

  /// Trainable parameters of the final model, given each layer's rank: all weights and biases
  /// for full fine-tuning, r·(in + out) per LoRA adapter, and for AdaLoRA the adapters resized
  /// to their kept triplets, kept·(in + out + 1) per adapter (what PEFT saves; svd alike).
  std::int64_t trainable_parameters(const std::vector<int>& ranks) const {
    std::int64_t n = 0;
    for (std::size_t l = 0; l < base_->layers.size(); ++l) {
      const linear& L = base_->layers[l];
      if (options_.kind == method::full)
        n += L.in() * L.out() + L.out();
      else
        n += ranks[l] * (L.in() + L.out() + (svd_form(options_.kind) ? 1 : 0));
    }
    return n;
  }

  /// The network with every update merged into its weights (W0 + ΔW), for fast evaluation.
  network merged() const {
    network m = *base_;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const layer_state& s = layers_[l];
      linear& L = m.layers[l];
      if (options_.kind == method::full) {
        L.W = s.W;
        L.b = s.b;
      } else if (options_.kind == method::lora) {
        L.W.noalias() += s.lora_scaling * (s.B * s.A);
      } else {
        adalora::merge<float>(adapter_params(s), s.scale, adalora::as_matrix(L.W));
      }
    }
    return m;
  }

 private:
  struct layer_state {
    matrix W, dW;  // full fine-tuning: trainable copies of the base weights
    row_vector b, db;
    matrix A, dA;  // LoRA and the SVD form: r × in
    vector E, dE;  // the SVD form: the r singular values
    matrix B, dB;  // LoRA and the SVD form: out × r
    matrix u;      // LoRA: h · Aᵀ of the last forward
    float lora_scaling = 1;
    adalora::adapter_scale<float> scale{0.0, 0};
    adalora::adapter_workspace<float> ws;
  };

  static adalora::svd_adapter_ref<float> adapter_params(layer_state& s) {
    return {adalora::as_matrix(s.A), adalora::as_vector(s.E), adalora::as_matrix(s.B)};
  }
  static adalora::svd_adapter_ref<const float> adapter_params(const layer_state& s) {
    return {adalora::as_matrix(s.A), adalora::as_vector(s.E), adalora::as_matrix(s.B)};
  }
  static adalora::svd_adapter_ref<float> adapter_grads(layer_state& s) {
    return {adalora::as_matrix(s.dA), adalora::as_vector(s.dE), adalora::as_matrix(s.dB)};
  }

  const network* base_;
  adapter_options options_;
  std::vector<layer_state> layers_;
  std::vector<matrix> h_;  // h_[0] = input, h_[l + 1] = output of layer l (after activation)
  std::vector<matrix> z_;  // pre-activations
  matrix dz_, dh_, du_;
  double adapter_seconds_ = 0;
  using clock = std::chrono::steady_clock;
};

}  // namespace finetune
