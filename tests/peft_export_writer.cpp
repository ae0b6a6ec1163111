// Writes PEFT exports of trained, masked adapters, one per case in DIR/<case>/, each with
// reference.json: the names of every module of the (imaginary) model the adapters belong to,
// and for each adapted module its input x and the output of the FULL-rank masked adapter
// (adalora's forward). tests/check_peft_export.py then reads each export independently (Python
// and torch, no adalora code), applies PEFT's own rules for matching target_modules, resizing
// and scaling on load, and checks that it reproduces those outputs.
//
// Cases: lora_alpha 12 and 0 (PEFT's rule for 0 differs after a resize), F32 and F64, modules
// that keep nothing, some, or everything, on a model whose other layers share their names.
//
//   peft_export_writer DIR

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "adalora/io/peft_adapter.hpp"
#include "adalora/svd_adapter.hpp"

namespace {

using adalora::index_t;

struct spec {
  std::string name;
  index_t in, out;
  std::vector<bool> keep;
};

/// Every module of a 4-layer model; only some get adapters.
std::vector<std::string> model_modules() {
  std::vector<std::string> names;
  for (int l = 0; l < 4; ++l)
    for (const char* m : {"self_attn.q_proj", "self_attn.v_proj", "fc1", "fc2"})
      names.push_back("model.decoder.layers." + std::to_string(l) + "." + m);
  names.push_back("model.decoder.embed_tokens");
  names.push_back("lm_head");
  return names;
}

template <class T>
void write_case(const std::filesystem::path& dir, double alpha, adalora::st_dtype dtype) {
  const index_t r = 6;
  const std::vector<spec> specs = {
      {"model.decoder.layers.0.self_attn.q_proj", 16, 16, {true, false, true, true, false, false}},
      {"model.decoder.layers.0.self_attn.v_proj", 16, 16, {false, false, false, false, false, false}},
      {"model.decoder.layers.1.fc1", 16, 24, {true, true, true, true, true, true}},
      {"model.decoder.layers.1.fc2", 24, 16, {false, false, false, false, false, true}},
  };

  std::mt19937_64 rng(2024);
  std::normal_distribution<T> normal(T(0), T(1));
  std::vector<adalora::svd_adapter<T>> adapters;
  adalora::rank_pattern pattern;
  nlohmann::ordered_json reference = {{"init_r", r},
                                      {"trained_lora_alpha", alpha},
                                      {"dtype", dtype == adalora::st_dtype::F64 ? "F64" : "F32"},
                                      {"model_modules", model_modules()}};
  reference["modules"] = nlohmann::ordered_json::object();
  for (const auto& s : specs) {
    adalora::svd_adapter<T> a(s.in, s.out, r, alpha);
    auto p = a.params();
    for (index_t i = 0; i < p.A.size(); ++i) p.A.data()[i] = T(0.25) * normal(rng);
    for (index_t i = 0; i < p.E.size(); ++i) p.E.data()[i] = normal(rng);
    for (index_t i = 0; i < p.B.size(); ++i) p.B.data()[i] = T(0.25) * normal(rng);
    a.mask(s.keep);  // what the allocator leaves at the end of training
    pattern.add(s.name, s.keep);

    const index_t n = 4;
    std::vector<T> x(static_cast<std::size_t>(n * s.in)), y(static_cast<std::size_t>(n * s.out), T(0));
    for (auto& v : x) v = normal(rng);
    a.forward(adalora::make_matrix_view<const T>(x.data(), n, s.in),
              adalora::make_matrix_view(y.data(), n, s.out));
    auto rows = [](const std::vector<T>& v, index_t rows_, index_t cols) {
      nlohmann::ordered_json j = nlohmann::ordered_json::array();
      for (index_t i = 0; i < rows_; ++i)
        j.push_back(std::vector<T>(v.begin() + i * cols, v.begin() + (i + 1) * cols));
      return j;
    };
    reference["modules"][s.name] = {{"in", s.in}, {"out", s.out}, {"kept", s.keep},
                                    {"x", rows(x, n, s.in)}, {"y_masked", rows(y, n, s.out)}};
    adapters.push_back(std::move(a));
  }

  adalora::peft_adalora_config config;
  config.init_r = r;
  config.target_r = 2;
  config.tinit = 20;
  config.tfinal = 40;
  config.delta_t = 5;
  config.total_step = 200;
  config.orth_reg_weight = 0.3;
  config.lora_alpha = alpha;
  config.pattern = pattern;
  config.base_model_name_or_path = "adalora/peft_export_writer";
  std::vector<adalora::peft_module_ref<T>> modules;
  for (std::size_t i = 0; i < specs.size(); ++i) modules.push_back({specs[i].name, adapters[i].params()});
  adalora::peft_save_options options;
  options.dtype = dtype;
  adalora::save_peft_adapter<T>(dir, config, modules, options);

  // A number -> JSON -> Python float -> float32/float64 is exact: nlohmann prints floating
  // point numbers with enough digits to round-trip.
  std::ofstream(dir / "reference.json") << reference.dump(1) << '\n';
  std::printf("peft_export_writer: wrote %zu modules to %s\n", specs.size(), dir.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  write_case<float>(dir / "alpha12_f32", 12, adalora::st_dtype::F32);
  write_case<float>(dir / "alpha0_f32", 0, adalora::st_dtype::F32);
  write_case<double>(dir / "alpha0_f64", 0, adalora::st_dtype::F64);
  write_case<double>(dir / "alpha3.5_f64", 3.5, adalora::st_dtype::F64);
  return 0;
}
