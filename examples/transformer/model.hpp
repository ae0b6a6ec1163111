#pragma once
// A small pre-LayerNorm transformer encoder in libtorch's C++ frontend, written out with plain
// tensors (no torch::nn modules) so that every adapted matrix is a named tensor that adalora
// views without copies:
//   tokens -> embedding + learned positions -> L × [x += Wo·attention(LN(x)); x += Wf2·gelu(Wf1·LN(x))]
//   -> LN -> (pre-training) tied-embedding logits at masked positions
//          | (fine-tuning) mean over non-padding positions -> linear head (45 classes)
// No dropout: runs are short and deterministic given the seed.
//
// Every one of Wq, Wk, Wv, Wo, Wf1, Wf2 is an adapted_linear: a frozen (or, for full
// fine-tuning, trainable) W, b and optionally
//   LoRA     y += (x·Aᵀ)·Bᵀ · alpha / r                       A (r×in) random, B (out×r) = 0
//   AdaLoRA  y += (x·(A⊙E)ᵀ)·Bᵀ · alpha / (ranknum + 1e-5)    PEFT's SVDLinear: A, B ~ N(0, 0.02),
//                                                              E (r×1) = 0, ranknum = initial r

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace transformer {

struct model_config {
  std::int64_t vocab = 8000;  ///< including the special tokens
  std::int64_t width = 128;
  std::int64_t layers = 4;
  std::int64_t heads = 4;
  std::int64_t ffn = 512;
  std::int64_t seq = 32;  ///< tokens per example, [CLS] included

  std::string text() const {
    return "vocab " + std::to_string(vocab) + ", width " + std::to_string(width) + ", " +
           std::to_string(layers) + " layers, " + std::to_string(heads) + " heads, ffn " +
           std::to_string(ffn) + ", sequence " + std::to_string(seq);
  }
};

enum class adapter_kind { none, lora, adalora };

/// The six matrix types of a layer, in the order of the rank picture's columns.
inline const std::vector<std::string>& matrix_types() {
  static const std::vector<std::string> names = {"q", "k", "v", "o", "f1", "f2"};
  return names;
}

struct adapted_linear {
  std::string name;  ///< module path, e.g. "layers.2.attn.q": the key of the rank pattern
  torch::Tensor W, b;
  adapter_kind kind = adapter_kind::none;
  torch::Tensor A, E, B;
  double scale = 1;  ///< LoRA: alpha / r; AdaLoRA: alpha / (ranknum + 1e-5)

  torch::Tensor forward(const torch::Tensor& x) const {
    torch::Tensor y = torch::linear(x, W, b);
    if (kind == adapter_kind::lora) return y + torch::linear(torch::linear(x, A), B) * scale;
    if (kind == adapter_kind::adalora)
      return y + torch::linear(torch::linear(x, A * E), B) * scale;
    return y;
  }

  /// Attaches an adapter of rank r (A, E, B require gradients; W and b keep theirs).
  void attach(adapter_kind k, std::int64_t r, double alpha, torch::Generator& gen) {
    kind = k;
    const auto in = W.size(1), out = W.size(0);
    if (k == adapter_kind::lora) {
      // PEFT's LoRA: A Kaiming-uniform (a = sqrt 5: bound 1/sqrt(in)), B zero.
      const double bound = 1.0 / std::sqrt(double(in));
      A = (torch::rand({r, in}, gen) * 2 - 1).mul_(bound).requires_grad_();
      B = torch::zeros({out, r}).requires_grad_();
      scale = alpha / double(r);
    } else if (k == adapter_kind::adalora) {
      A = (torch::randn({r, in}, gen) * 0.02).requires_grad_();
      E = torch::zeros({r, 1}).requires_grad_();
      B = (torch::randn({out, r}, gen) * 0.02).requires_grad_();
      scale = alpha / (double(r) + 1e-5);
    }
  }

  std::vector<torch::Tensor> adapter_parameters() const {
    if (kind == adapter_kind::lora) return {A, B};
    if (kind == adapter_kind::adalora) return {A, E, B};
    return {};
  }
};

struct layer_norm {
  torch::Tensor weight, bias;
  torch::Tensor forward(const torch::Tensor& x) const {
    return torch::layer_norm(x, {x.size(-1)}, weight, bias, 1e-5);
  }
};

struct encoder_layer {
  layer_norm ln1, ln2;
  adapted_linear q, k, v, o, f1, f2;
  std::vector<adapted_linear*> linears() { return {&q, &k, &v, &o, &f1, &f2}; }
  std::vector<const adapted_linear*> linears() const { return {&q, &k, &v, &o, &f1, &f2}; }
};

/// The encoder's base weights and, after attach_adapters, its adapters.
class encoder {
 public:
  encoder(const model_config& c, std::uint64_t seed) : config_(c) {
    torch::Generator gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);
    const auto d = c.width;
    const auto normal = [&](std::vector<std::int64_t> shape, double std) {
      return torch::randn(shape, gen) * std;
    };
    tokens_ = normal({c.vocab, d}, 0.02);
    positions_ = normal({c.seq, d}, 0.02);
    // GPT-2's rule: the projections into the residual stream get std 0.02 / sqrt(2L).
    const double residual_std = 0.02 / std::sqrt(2.0 * double(c.layers));
    for (std::int64_t l = 0; l < c.layers; ++l) {
      encoder_layer L;
      const std::string p = "layers." + std::to_string(l) + ".";
      L.ln1 = {torch::ones({d}), torch::zeros({d})};
      L.ln2 = {torch::ones({d}), torch::zeros({d})};
      const auto linear = [&](const std::string& name, std::int64_t out, std::int64_t in,
                              double std) {
        adapted_linear a;
        a.name = p + name;
        a.W = normal({out, in}, std);
        a.b = torch::zeros({out});
        return a;
      };
      L.q = linear("attn.q", d, d, 0.02);
      L.k = linear("attn.k", d, d, 0.02);
      L.v = linear("attn.v", d, d, 0.02);
      L.o = linear("attn.o", d, d, residual_std);
      L.f1 = linear("ffn.f1", c.ffn, d, 0.02);
      L.f2 = linear("ffn.f2", d, c.ffn, residual_std);
      layers_.push_back(std::move(L));
    }
    final_ln_ = {torch::ones({d}), torch::zeros({d})};
    mlm_bias_ = torch::zeros({c.vocab});
  }

  const model_config& config() const { return config_; }

  /// Every base tensor by name (what the pre-training cache stores), in a fixed order.
  std::vector<std::pair<std::string, torch::Tensor*>> named_base() {
    std::vector<std::pair<std::string, torch::Tensor*>> out = {
        {"embed.tokens", &tokens_}, {"embed.positions", &positions_}};
    for (auto& L : layers_) {
      const std::string p = L.q.name.substr(0, L.q.name.find("attn"));
      out.push_back({p + "ln1.weight", &L.ln1.weight});
      out.push_back({p + "ln1.bias", &L.ln1.bias});
      out.push_back({p + "ln2.weight", &L.ln2.weight});
      out.push_back({p + "ln2.bias", &L.ln2.bias});
      for (adapted_linear* a : L.linears()) {
        out.push_back({a->name + ".weight", &a->W});
        out.push_back({a->name + ".bias", &a->b});
      }
    }
    out.push_back({"final_ln.weight", &final_ln_.weight});
    out.push_back({"final_ln.bias", &final_ln_.bias});
    out.push_back({"mlm.bias", &mlm_bias_});
    return out;
  }

  std::vector<torch::Tensor> base_parameters() {
    std::vector<torch::Tensor> out;
    for (auto& [name, t] : named_base()) out.push_back(*t);
    return out;
  }

  void set_base_trainable(bool trainable) {
    for (auto& [name, t] : named_base()) t->requires_grad_(trainable);
  }

  /// The adapted matrices, layer by layer, q k v o f1 f2 within a layer.
  std::vector<adapted_linear*> adapted() {
    std::vector<adapted_linear*> out;
    for (auto& L : layers_)
      for (adapted_linear* a : L.linears()) out.push_back(a);
    return out;
  }

  void attach_adapters(adapter_kind k, std::int64_t r, double alpha, std::uint64_t seed) {
    torch::Generator gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);
    for (adapted_linear* a : adapted()) a->attach(k, r, alpha, gen);
  }

  /// Hidden states (batch × seq × width) of token ids (batch × seq, int64; 0 = padding).
  torch::Tensor hidden(const torch::Tensor& ids) const {
    const auto batch = ids.size(0), seq = ids.size(1), d = config_.width, h = config_.heads;
    torch::Tensor x = torch::embedding(tokens_, ids) + positions_.narrow(0, 0, seq);
    // Padding keys get -inf before the softmax; every row has its [CLS], so none is all -inf.
    const torch::Tensor key_bias =
        torch::zeros({batch, 1, 1, seq}).masked_fill_((ids == 0).view({batch, 1, 1, seq}),
                                                       -INFINITY);
    const double inv_sqrt = 1.0 / std::sqrt(double(d / h));
    const auto heads = [&](const torch::Tensor& t) {
      return t.view({batch, seq, h, d / h}).transpose(1, 2);
    };
    for (const auto& L : layers_) {
      const torch::Tensor a = L.ln1.forward(x);
      const torch::Tensor scores =
          torch::matmul(heads(L.q.forward(a)), heads(L.k.forward(a)).transpose(-2, -1)) * inv_sqrt +
          key_bias;
      const torch::Tensor mixed = torch::matmul(torch::softmax(scores, -1), heads(L.v.forward(a)));
      x = x + L.o.forward(mixed.transpose(1, 2).reshape({batch, seq, d}));
      x = x + L.f2.forward(torch::gelu(L.f1.forward(L.ln2.forward(x))));
    }
    return final_ln_.forward(x);
  }

  /// Masked-LM logits (n × vocab) at the flat positions `where` of hidden(ids).
  torch::Tensor mlm_logits(const torch::Tensor& ids, const torch::Tensor& where) const {
    const torch::Tensor h = hidden(ids).reshape({-1, config_.width}).index_select(0, where);
    return torch::linear(h, tokens_, mlm_bias_);
  }

  /// Mean of the hidden states over non-padding positions (batch × width).
  torch::Tensor pooled(const torch::Tensor& ids) const {
    const torch::Tensor keep = (ids != 0).to(torch::kFloat32).unsqueeze(-1);
    return (hidden(ids) * keep).sum(1) / keep.sum(1);
  }

 private:
  model_config config_;
  torch::Tensor tokens_, positions_, mlm_bias_;
  std::vector<encoder_layer> layers_;
  layer_norm final_ln_;
};

}  // namespace transformer
