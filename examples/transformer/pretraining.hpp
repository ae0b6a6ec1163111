#pragma once
// Pre-training the encoder as a masked language model on the GCIDE text, and the cache that lets
// only the first run pay for it: the base weights in the project's safetensors format, keyed by
// a CRC-32 of the model configuration, the recipe, the vocabulary and the token stream. A run
// with the same key loads the file (and says REUSED); any change trains again.

#include <torch/torch.h>
#include <zlib.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "adalora/integrations/torch.hpp"
#include "adalora/io/safetensors.hpp"
#include "examples/finetune/svg.hpp"
#include "examples/transformer/corpus.hpp"
#include "examples/transformer/model.hpp"
#include "examples/transformer/training.hpp"

namespace transformer {

struct pretrain_options {
  model_config model;
  std::int64_t steps = 3000, batch = 64;
  std::filesystem::path cache;  ///< the folder of cached encoders
};

/// The text to pre-train on: token ids of the kept paragraphs, in order, and their CRC-32.
struct pretrain_data {
  const vocabulary* vocab = nullptr;
  const std::vector<std::int32_t>* stream = nullptr;
  std::uint32_t stream_crc = 0;
};

inline double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

inline std::string duration_text(double s) {
  if (s < 90) return finetune::svg::format("%.0f s", s);
  return finetune::svg::format("%.0f min", s / 60);
}

struct pretrain_info {
  bool reused = false;
  std::filesystem::path file;
  double final_loss = std::nan(""), seconds = 0;
  std::int64_t steps = 0;
};

inline std::string cache_key(const pretrain_options& f, const pretrain_data& d) {
  const std::string recipe =
      f.model.text() + finetune::svg::format("; masked LM, %lld steps, batch %lld, lr 1e-3, mask 0.15, seed 1",
                              (long long)f.steps, (long long)f.batch);
  uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(recipe.data()), static_cast<uInt>(recipe.size()));
  const std::uint32_t more[2] = {d.vocab->checksum(), d.stream_crc};
  crc = crc32(crc, reinterpret_cast<const Bytef*>(more), sizeof more);
  return finetune::svg::format("%08lx", static_cast<unsigned long>(crc));
}

inline void save_encoder(encoder& model, const std::filesystem::path& file, const std::string& key, double loss) {
  adalora::safetensors_writer w;
  for (auto& [name, t] : model.named_base()) {
    const torch::Tensor c = t->detach().contiguous();
    if (c.dim() == 2)
      w.add(name, adalora::torch_matrix_view<const float>(c, name.c_str()));
    else
      w.add(name, adalora::torch_vector_view<const float>(c, name.c_str()), {c.size(0)});
  }
  w.set_metadata("format", "pt");
  w.set_metadata("adalora_transformer_key", key);
  w.set_metadata("mlm_loss", finetune::svg::format("%.6f", loss));
  std::filesystem::create_directories(file.parent_path());
  w.write(file);
}

/// Loads the cached encoder if its file has every tensor with the right shape and the same key.
inline bool load_encoder(encoder& model, const std::filesystem::path& file, const std::string& key, double& loss) {
  if (!std::filesystem::exists(file)) return false;
  try {
    const auto st = adalora::safetensors_file::read(file);
    const auto it = st.metadata().find("adalora_transformer_key");
    if (it == st.metadata().end() || it->second != key) return false;
    for (auto& [name, t] : model.named_base()) {
      const auto& info = st.at(name);
      if (info.shape != t->sizes().vec()) return false;
      torch::Tensor fresh = torch::empty_like(*t);
      st.copy_values<float>(name, std::span<float>(fresh.data_ptr<float>(), std::size_t(fresh.numel())));
      *t = fresh;
    }
    const auto l = st.metadata().find("mlm_loss");
    loss = l == st.metadata().end() ? std::nan("") : std::stod(l->second);
    return true;
  } catch (const std::exception& e) {
    std::cerr << "pretrain: cached file " << file << " unusable (" << e.what() << "); training again\n";
    return false;
  }
}

inline pretrain_info pretrain(encoder& model, const pretrain_options& f, const pretrain_data& d) {
  pretrain_info info;
  const std::string key = cache_key(f, d);
  info.file = f.cache / ("encoder_" + key + ".safetensors");
  info.steps = f.steps;
  const auto start = std::chrono::steady_clock::now();
  if (load_encoder(model, info.file, key, info.final_loss)) {
    info.reused = true;
    std::cerr << "pretrain: REUSED the cached pre-trained encoder " << info.file.string()
              << finetune::svg::format(" (masked-LM loss %.3f)\n", info.final_loss);
    return info;
  }
  std::cerr << "pretrain: no cached encoder for key " << key << "; pre-training " << f.model.text()
            << finetune::svg::format(" for %lld steps (batch %lld) on %zu tokens\n", (long long)f.steps,
                      (long long)f.batch, d.stream->size());
  const std::int64_t seq = f.model.seq, span = seq - 1;
  const auto windows = std::int64_t(d.stream->size()) / span;
  if (windows < 1) throw std::runtime_error("pretrain: the pre-training text is shorter than one sequence");
  model.set_base_trainable(true);
  torch::optim::AdamW opt(model.base_parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.01));
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<std::int64_t> window(0, windows - 1);
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<std::int32_t> random_word(vocabulary::special_count,
                                                          std::int32_t(d.vocab->size()) - 1);
  const std::int64_t warmup = std::max<std::int64_t>(1, f.steps / 20);
  double avg = std::nan("");
  for (std::int64_t t = 0; t < f.steps; ++t) {
    torch::Tensor ids = torch::empty({f.batch, seq}, torch::kInt64);
    auto a = ids.accessor<std::int64_t, 2>();
    std::vector<std::int64_t> where, targets;
    for (std::int64_t b = 0; b < f.batch; ++b) {
      const std::int64_t w = window(rng);
      a[b][0] = vocabulary::cls;
      for (std::int64_t j = 0; j < span; ++j) {
        const std::int32_t tok = (*d.stream)[static_cast<std::size_t>(w * span + j)];
        std::int32_t in = tok;
        if (u(rng) < 0.15) {  // BERT's rule: 80% [MASK], 10% a random word, 10% unchanged
          where.push_back(b * seq + j + 1);
          targets.push_back(tok);
          const double r = u(rng);
          in = r < 0.8 ? vocabulary::mask : r < 0.9 ? random_word(rng) : tok;
        }
        a[b][j + 1] = in;
      }
    }
    if (where.empty()) continue;
    const double lr = 1e-3 * (t < warmup ? double(t + 1) / double(warmup)
                                         : double(f.steps - t) / double(f.steps - warmup + 1));
    set_lr(opt, lr);
    const torch::Tensor loss = torch::cross_entropy_loss(
        model.mlm_logits(ids, torch::tensor(where)), torch::tensor(targets));
    opt.zero_grad();
    loss.backward();
    opt.step();
    const double l = loss.item<double>();
    avg = std::isnan(avg) ? l : 0.98 * avg + 0.02 * l;
    if ((t + 1) % std::max<std::int64_t>(10, f.steps / 20) == 0 || t + 1 == f.steps) {
      const double el = seconds_since(start);
      std::cerr << finetune::svg::format("pretrain: step %lld/%lld  masked-LM loss %.3f  %s elapsed, about %s left\n",
                          (long long)(t + 1), (long long)f.steps, avg,
                          duration_text(el).c_str(),
                          duration_text(el / double(t + 1) * double(f.steps - t - 1)).c_str());
    }
  }
  model.set_base_trainable(false);
  for (auto& p : model.base_parameters()) p.mutable_grad() = torch::Tensor();
  info.final_loss = avg;
  info.seconds = seconds_since(start);
  save_encoder(model, info.file, key, avg);
  std::cerr << "pretrain: saved " << info.file.string() << finetune::svg::format(" after %.0f s\n", info.seconds);
  return info;
}


}  // namespace transformer
