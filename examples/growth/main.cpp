// Growth on a known answer: three adapters whose ideal updates have planted ranks 6, 2 and 0,
// every adapter starting at rank 2 (a total of 6). Prune-only AdaLoRA cannot give the first
// adapter more than the 2 it started with; a rank_redistributor at a constant total moves rank
// from the adapter that needs none to the one that needs most.
//
//   bazel run //examples/growth
//
// Loss per adapter: ½‖ΔW − M‖²_F with M = U diag(s) Vᵀ (k orthonormal columns in U and V), plus
// the library's orthogonality regularizer; Adam written here; docs/growth.md walks through it.
// The program exits non-zero unless growth ends with the first adapter's rank above 2 and a
// lower loss than the fixed ranks.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"

namespace {

using adalora::index_t;

constexpr index_t width = 16;
constexpr std::int64_t steps = 600;

/// An n × k matrix (row-major) with orthonormal columns.
std::vector<double> orthonormal_columns(index_t n, index_t k, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> q(static_cast<std::size_t>(n * k));
  for (double& x : q) x = normal(rng);
  auto at = [&](index_t i, index_t j) -> double& { return q[static_cast<std::size_t>(i * k + j)]; };
  for (index_t j = 0; j < k; ++j) {
    for (int pass = 0; pass < 2; ++pass)
      for (index_t p = 0; p < j; ++p) {
        double d = 0;
        for (index_t i = 0; i < n; ++i) d += at(i, p) * at(i, j);
        for (index_t i = 0; i < n; ++i) at(i, j) -= d * at(i, p);
      }
    double norm = 0;
    for (index_t i = 0; i < n; ++i) norm += at(i, j) * at(i, j);
    for (index_t i = 0; i < n; ++i) at(i, j) /= std::sqrt(norm);
  }
  return q;
}

/// The target update of planted rank k: U diag(s) Vᵀ, s in [1, 2] (appended to `values`).
std::vector<float> planted_update(index_t k, std::mt19937_64& rng, std::vector<double>& values) {
  std::vector<float> m(static_cast<std::size_t>(width * width), 0.0f);
  if (k == 0) return m;
  const std::vector<double> u = orthonormal_columns(width, k, rng), v = orthonormal_columns(width, k, rng);
  std::uniform_real_distribution<double> uniform(1.0, 2.0);
  for (index_t j = 0; j < k; ++j) {
    const double s = uniform(rng);
    values.push_back(s);
    for (index_t o = 0; o < width; ++o)
      for (index_t i = 0; i < width; ++i)
        m[static_cast<std::size_t>(o * width + i)] +=
            static_cast<float>(s * u[static_cast<std::size_t>(o * k + j)] * v[static_cast<std::size_t>(i * k + j)]);
  }
  return m;
}

/// One adapter with its Adam moments, laid out like its parameters (so that a rank change is
/// applied to them the same way).
struct layer {
  adalora::svd_adapter<float> adapter{width, width, 2, 4.0};
  adalora::svd_adapter<float> m1{width, width, 2, 4.0}, m2{width, width, 2, 4.0};
  std::vector<float> target;

  void change_rank(const adalora::triplet_map& m, std::mt19937_64& rng) {
    adapter.change_rank(m);
    adalora::zero_singular_value_init{}(adapter.params(), m, rng);  // E = 0: no jump
    m1.change_rank(m);  // new triplets' moments start at zero
    m2.change_rank(m);
  }
};

/// ∂(½‖ΔW − M‖²)/∂(A, E, B) with ΔW = c·B diag(E) A, added into the gradients; returns the loss.
double data_loss_and_gradient(layer& l) {
  adalora::svd_adapter<float>& a = l.adapter;
  const index_t r = a.rank();
  std::vector<float> delta(static_cast<std::size_t>(width * width));
  a.delta_weight(adalora::make_matrix_view(delta.data(), width, width));
  double loss = 0;
  for (std::size_t i = 0; i < delta.size(); ++i) {
    delta[i] -= l.target[i];  // now the residual R
    loss += 0.5 * double(delta[i]) * double(delta[i]);
  }
  const double c = double(a.scale().scaling()) / double(a.scale().rn());
  const auto p = a.params();
  const auto g = a.grads();
  for (index_t k = 0; k < r; ++k) {
    // (Bᵀ R)_k· and (R Aᵀ)_·k
    std::vector<double> btr(static_cast<std::size_t>(width), 0.0), rat(static_cast<std::size_t>(width), 0.0);
    for (index_t o = 0; o < width; ++o)
      for (index_t i = 0; i < width; ++i) {
        const double res = delta[static_cast<std::size_t>(o * width + i)];
        btr[static_cast<std::size_t>(i)] += double(p.B(o, k)) * res;
        rat[static_cast<std::size_t>(o)] += res * double(p.A(k, i));
      }
    double e_grad = 0;
    for (index_t i = 0; i < width; ++i) {
      g.A(k, i) += static_cast<float>(c * double(p.E[k]) * btr[static_cast<std::size_t>(i)]);
      e_grad += btr[static_cast<std::size_t>(i)] * double(p.A(k, i));
    }
    g.E[k] += static_cast<float>(c * e_grad);
    for (index_t o = 0; o < width; ++o)
      g.B(o, k) += static_cast<float>(c * double(p.E[k]) * rat[static_cast<std::size_t>(o)]);
  }
  return loss;
}

void adam_step(layer& l, std::int64_t t, double lr) {
  const double c1 = 1 - std::pow(0.9, double(t + 1)), c2 = 1 - std::pow(0.999, double(t + 1));
  auto update = [&](float& w, float g, float& m, float& v) {
    m = 0.9f * m + 0.1f * g;
    v = 0.999f * v + 0.001f * g * g;
    w -= static_cast<float>(lr / c1 * m / (std::sqrt(v / c2) + 1e-8));
  };
  const auto p = l.adapter.params();
  const auto g = l.adapter.grads();
  const auto m = l.m1.params();
  const auto v = l.m2.params();
  for (index_t k = 0; k < p.rank(); ++k) {
    for (index_t i = 0; i < width; ++i) update(p.A(k, i), g.A(k, i), m.A(k, i), v.A(k, i));
    update(p.E[k], g.E[k], m.E[k], v.E[k]);
    for (index_t o = 0; o < width; ++o) update(p.B(o, k), g.B(o, k), m.B(o, k), v.B(o, k));
  }
}

struct outcome {
  double loss = 0;
  std::vector<index_t> ranks;
  std::vector<index_t> best_ranks;  // Eckart–Young: the largest planted singular values
  double best_loss = 0;             // ½ Σ of the planted singular values left out, squared
};

/// The best any allocation of `total` rank can do: keep the `total` largest planted singular
/// values over all adapters (per adapter, the best rank-k approximation keeps its k largest).
void best_allocation(const std::vector<std::vector<double>>& values, index_t total, outcome& o) {
  std::vector<std::pair<double, std::size_t>> all;
  for (std::size_t a = 0; a < values.size(); ++a)
    for (double v : values[a]) all.push_back({v, a});
  std::sort(all.begin(), all.end(), std::greater<>());
  o.best_ranks.assign(values.size(), 0);
  for (std::size_t i = 0; i < all.size(); ++i)
    if (static_cast<index_t>(i) < total)
      ++o.best_ranks[all[i].second];
    else
      o.best_loss += 0.5 * all[i].first * all[i].first;
}

outcome train(bool grow) {
  std::mt19937_64 rng(2023);
  const std::vector<index_t> planted = {6, 2, 0};
  std::vector<layer> layers(planted.size());
  adalora::adapter_set<float> adapters;
  std::vector<std::vector<double>> values(planted.size());
  for (std::size_t a = 0; a < layers.size(); ++a) {
    layers[a].target = planted_update(planted[a], rng, values[a]);
    layers[a].adapter.initialize(rng);
    adapters.add("layer" + std::to_string(a), layers[a].adapter);
  }
  // The total stays at the sum of the initial ranks; rank moves in the middle of the run.
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::constant_total_schedule>
      allocator(adapters, adalora::constant_total_schedule(
                              {.total_step = steps, .tinit = 60, .tfinal = 150, .delta_t = 10}));
  adalora::rank_redistributor mover({.interval = 30, .moves = 1});
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});

  double loss = 0;
  for (std::int64_t t = 0; t < steps; ++t) {
    loss = 0;
    for (layer& l : layers) loss += data_loss_and_gradient(l);
    orth.value_and_gradient(adapters);
    for (layer& l : layers) adam_step(l, t, 0.01);
    allocator.step(t, adapters);
    if (grow)
      if (auto change = mover.step(t, allocator))
        for (std::size_t a = 0; a < layers.size(); ++a) {
          layers[a].change_rank((*change)[a], rng);
          adapters.replace(a, layers[a].adapter.params(), layers[a].adapter.grads());
        }
    for (layer& l : layers) l.adapter.zero_grad();
  }
  outcome o;
  o.loss = loss;
  for (const auto& s : allocator.shapes()) o.ranks.push_back(s.rank);
  best_allocation(values, adapters.total_rank(), o);
  return o;
}

}  // namespace

int main() {
  const outcome fixed = train(false);
  const outcome grown = train(true);
  auto ranks = [](const outcome& o) {
    std::string s;
    for (index_t r : o.ranks) s += (s.empty() ? "" : " ") + std::to_string(r);
    return s;
  };
  std::printf("planted ranks                    6 2 0\n");
  std::printf("best at total 6 (Eckart-Young)   %s  loss %.4f\n", ranks({0, grown.best_ranks, {}, 0}).c_str(), grown.best_loss);
  std::printf("fixed ranks (prune-only)         %s  loss %.4f\n", ranks(fixed).c_str(), fixed.loss);
  std::printf("grown ranks (redistributor)      %s  loss %.4f\n", ranks(grown).c_str(), grown.loss);
  const bool ok = grown.ranks[0] > 2 && grown.loss < fixed.loss;
  std::printf("%s\n", ok ? "growth moved rank to where it was missing" : "growth did NOT help");
  return ok ? 0 : 1;
}
