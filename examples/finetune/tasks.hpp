#pragma once
// The two fine-tuning problems of the demo, each as a pre-trained network, data and a loss.
//
// Part 1, "planted": a known answer. A random tanh network is the pre-trained model; the
// fine-tuning target is the same network with an update of PLANTED rank added to each weight
// (8, 0, 1, 6, 0, 2, 4 by default), so the ideal update of every matrix has a known rank and a
// budget-aware method should put its rank there.
//
// Part 2, "fashion-mnist": real data. An MLP is pre-trained on five Fashion-MNIST classes and
// fine-tuned to the other five (the 10-way head stays; the new classes' rows must be learned).

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "examples/finetune/data.hpp"
#include "examples/finetune/model.hpp"
#include "examples/finetune/train.hpp"

namespace finetune {

/// Everything a task gives the runs: the frozen pre-trained network, the data and the loss.
struct task {
  std::string name;
  std::string metric;  ///< "test_relative_mse" or "test_accuracy"
  bool higher_is_better = false;
  network base;
  split data;
  loss_function loss;
  std::vector<int> planted;  ///< planted ranks per matrix (part 1), empty otherwise
  std::vector<int> judged;   ///< matrices whose rank recovery is judged (hidden layers)
  std::int64_t default_steps = 0;
  Eigen::Index batch = 64;
  int curve_points = 25;  ///< validation evaluations per run, for the loss curves
  std::vector<double> lr_grid_adapters, lr_grid_full;
  adalora_options ada;
  double pretrained_accuracy = 0;  ///< fashion-mnist: the pre-trained model on its own task
};

// ---- part 1 -----------------------------------------------------------------------------------

struct planted_layer {
  const char* name;
  Eigen::Index in, out;
  int rank;
};

/// Seven matrices of seven shapes. Rank 0 is planted only on hidden layers: the last, linear
/// layer would otherwise soak up spare rank to correct the layers before it.
inline std::vector<planted_layer> planted_layers() {
  return {{"fc0", 32, 64, 8}, {"fc1", 64, 64, 0}, {"fc2", 64, 48, 1}, {"fc3", 48, 48, 6},
          {"fc4", 48, 32, 0}, {"fc5", 32, 32, 2}, {"fc6", 32, 16, 4}};
}

/// An n × k matrix with orthonormal columns (Gram–Schmidt, twice).
inline matrix orthonormal_columns(Eigen::Index n, Eigen::Index k, rng& g) {
  matrix q = g.normal_matrix(n, k, 1.0);
  for (Eigen::Index j = 0; j < k; ++j) {
    for (int pass = 0; pass < 2; ++pass)
      for (Eigen::Index i = 0; i < j; ++i) q.col(j) -= q.col(i).dot(q.col(j)) * q.col(i);
    q.col(j).normalize();
  }
  return q;
}

inline task make_planted_task(std::uint64_t seed = 2023) {
  task t;
  t.name = "planted";
  t.metric = "test_relative_mse";
  t.default_steps = 1200;
  t.lr_grid_adapters = {1e-3, 3e-3, 1e-2};
  t.lr_grid_full = {3e-4, 1e-3, 3e-3};
  rng g(derive_seed(seed, 10));
  network target;
  t.base.act = target.act = activation::tanh;
  for (const planted_layer& p : planted_layers()) {
    linear L;
    L.name = p.name;
    // Gain 1.5 keeps tanh units away from both saturation and linearity, so every layer
    // matters to the output.
    L.W = g.normal_matrix(p.out, p.in, 1.5 / std::sqrt(static_cast<double>(p.in)));
    L.b = g.normal_matrix(1, p.out, 0.1);
    linear planted = L;
    if (p.rank > 0) {
      const matrix U = orthonormal_columns(p.out, p.rank, g);
      const matrix V = orthonormal_columns(p.in, p.rank, g);
      vector s(p.rank);
      for (int j = 0; j < p.rank; ++j) s[j] = static_cast<float>(0.6 + 0.8 * g.uniform());
      planted.W += U * s.asDiagonal() * V.transpose();
    }
    t.base.layers.push_back(L);
    target.layers.push_back(std::move(planted));
    t.planted.push_back(p.rank);
  }
  for (std::size_t l = 0; l + 1 < t.planted.size(); ++l) t.judged.push_back(static_cast<int>(l));

  // Inputs N(0, I); targets are the planted network's outputs (no noise: the answer is exact).
  const auto make = [&](Eigen::Index n) {
    dataset d;
    d.x = g.normal_matrix(n, t.base.layers.front().in(), 1.0);
    d.y = forward(target, d.x);
    return d;
  };
  t.data.train = make(4096);
  t.data.validation = make(1024);
  t.data.test = make(4096);
  // Losses are relative to the pre-trained network's MSE: 1 means no fine-tuning at all.
  t.loss.kind = loss_kind::relative_mse;
  t.loss.mse_scale = 1;  // so that the next line measures the plain MSE
  t.loss.mse_scale = t.loss.evaluate(t.base, t.data.train).loss;
  return t;
}

// ---- part 2 -----------------------------------------------------------------------------------

struct fashion_options {
  std::string data_dir = fashion_mnist_default_dir;
  Eigen::Index hidden = 128;
  Eigen::Index train = 6000;       ///< fine-tuning examples (classes 5-9)
  Eigen::Index validation = 1000;  ///< held out from the training file
  std::int64_t pretrain_steps = 300;
  std::uint64_t seed = 2023;
};

/// Pre-trains on classes 0-4 (full training from a random init), then sets up fine-tuning on
/// classes 5-9. Throws std::runtime_error when the dataset is not installed.
inline task make_fashion_task(const fashion_options& o, std::ostream& log) {
  task t;
  t.name = "fashion-mnist";
  t.metric = "test_accuracy";
  t.higher_is_better = true;
  t.default_steps = 600;
  t.batch = 32;
  t.curve_points = 12;  // a validation pass costs as much as ~50 training steps here
  t.lr_grid_adapters = {1e-3, 3e-3, 1e-2};
  t.lr_grid_full = {3e-4, 1e-3, 3e-3};
  auto [train_file, test_file] = load_fashion_mnist(o.data_dir);
  // Standardise pixels with the training file's statistics.
  const float mean = train_file.x.mean();
  const float stddev = std::sqrt((train_file.x.array() - mean).square().mean());
  for (dataset* d : {&train_file, &test_file}) d->x = ((d->x.array() - mean) / stddev).matrix();

  rng g(derive_seed(o.seed, 20));
  t.base.act = activation::relu;
  const Eigen::Index dims[] = {784, o.hidden, o.hidden, 10};
  for (int l = 0; l < 3; ++l) {
    linear L;
    L.name = "fc" + std::to_string(l);
    // He initialisation for ReLU layers.
    L.W = g.normal_matrix(dims[l + 1], dims[l], std::sqrt(2.0 / static_cast<double>(dims[l])));
    L.b = row_vector::Zero(dims[l + 1]);
    t.base.layers.push_back(std::move(L));
  }

  // Pre-training: classes 0-4, full training (this is the "pre-trained model" of the story).
  split pre;
  pre.train = select_classes(train_file, 0, 4, 30000);
  pre.validation = select_classes(test_file, 0, 4, 2000);
  pre.test = pre.validation;
  loss_function ce{loss_kind::cross_entropy, 1};
  const auto start = std::chrono::steady_clock::now();
  run_config pc;
  pc.kind = method::full;
  pc.lr = 1e-3;
  pc.seed = o.seed;
  pc.steps = o.pretrain_steps;
  pc.batch = 128;
  pc.curve_points = 1;
  network pretrained;
  t.pretrained_accuracy = train_run(t.base, pre, ce, pc, &pretrained).test.accuracy;
  t.base = std::move(pretrained);
  std::ostringstream line;
  line << std::fixed << std::setprecision(1) << "fashion-mnist: pre-trained " << dims[0] << "-"
       << dims[1] << "-" << dims[2] << "-" << dims[3] << " on classes 0-4 (" << pre.train.size()
       << " images, " << pc.steps << " steps) in "
       << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
       << " s: " << std::setprecision(4) << t.pretrained_accuracy
       << " accuracy on their test images; fine-tuning to classes 5-9 (";
  for (int c = 5; c <= 9; ++c) line << (c > 5 ? ", " : "") << fashion_mnist_classes[c];
  line << ")\n";
  log << line.str();

  // Fine-tuning: classes 5-9. Training and validation come from the training file (disjoint),
  // the test set is every test image of those classes.
  const dataset pool = select_classes(train_file, 5, 9, o.train + o.validation);
  std::vector<Eigen::Index> tr, va;
  for (Eigen::Index i = 0; i < pool.size(); ++i) (i < o.train ? tr : va).push_back(i);
  t.data.train = gather(pool, tr);
  t.data.validation = gather(pool, va);
  t.data.test = select_classes(test_file, 5, 9, test_file.size());
  t.loss = ce;
  return t;
}

}  // namespace finetune
