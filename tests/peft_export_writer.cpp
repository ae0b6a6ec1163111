// Writes a PEFT export of trained, masked adapters into a directory, together with
// reference.json: for each module its input x and the output of the FULL-rank masked adapter
// (adalora's forward). tests/check_peft_export.py then reads the export independently (Python
// and torch, no adalora code) and checks that the resized adapters reproduce those outputs.
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

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  using adalora::index_t;
  const index_t r = 6;
  const double alpha = 12;
  struct spec {
    std::string name;
    index_t in, out;
    std::vector<bool> keep;
  };
  const std::vector<spec> specs = {
      {"model.decoder.layers.0.self_attn.q_proj", 16, 16, {true, false, true, true, false, false}},
      {"model.decoder.layers.0.self_attn.v_proj", 16, 16, {false, false, false, false, false, false}},
      {"model.decoder.layers.1.fc1", 16, 24, {true, true, true, true, true, true}},
      {"model.decoder.layers.1.fc2", 24, 16, {false, false, false, false, false, true}},
  };

  std::mt19937_64 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<adalora::svd_adapter<float>> adapters;
  adalora::rank_pattern pattern;
  nlohmann::ordered_json reference = {{"init_r", r}, {"lora_alpha", alpha}};
  reference["modules"] = nlohmann::ordered_json::object();
  for (const auto& s : specs) {
    adalora::svd_adapter<float> a(s.in, s.out, r, alpha);
    auto p = a.params();
    for (index_t i = 0; i < p.A.size(); ++i) p.A.data()[i] = 0.25f * normal(rng);
    for (index_t i = 0; i < p.E.size(); ++i) p.E.data()[i] = normal(rng);
    for (index_t i = 0; i < p.B.size(); ++i) p.B.data()[i] = 0.25f * normal(rng);
    a.mask(s.keep);  // what the allocator leaves at the end of training
    pattern.add(s.name, s.keep);

    const index_t n = 4;
    std::vector<float> x(static_cast<std::size_t>(n * s.in)), y(static_cast<std::size_t>(n * s.out), 0.0f);
    for (auto& v : x) v = normal(rng);
    a.forward(adalora::make_matrix_view<const float>(x.data(), n, s.in),
              adalora::make_matrix_view(y.data(), n, s.out));
    auto rows = [](const std::vector<float>& v, index_t rows_, index_t cols) {
      nlohmann::ordered_json j = nlohmann::ordered_json::array();
      for (index_t i = 0; i < rows_; ++i)
        j.push_back(std::vector<float>(v.begin() + i * cols, v.begin() + (i + 1) * cols));
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
  std::vector<adalora::peft_module_ref<float>> modules;
  for (std::size_t i = 0; i < specs.size(); ++i) modules.push_back({specs[i].name, adapters[i].params()});
  adalora::save_peft_adapter<float>(dir, config, modules);

  // float -> JSON number -> Python float -> float32 is exact: nlohmann prints floats with
  // enough digits to round-trip.
  std::ofstream(dir / "reference.json") << reference.dump(1) << '\n';
  std::printf("peft_export_writer: wrote %zu modules to %s\n", specs.size(), dir.c_str());
  return 0;
}
