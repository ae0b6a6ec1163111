// AdaLoRA against LoRA on a pre-trained transformer and real text, and what a training step
// costs. See docs/transformer.md for the protocol and the README for the results.
//
//   1. Data (Debian packages, parsed here): WordNet 3.0's synsets (wordnet-base) labelled with
//      their lexicographer file (45 classes), split 80/10/10 by a fixed hash of the synset's
//      identity; GCIDE's dictionary text (dict-gcide) for pre-training, minus every paragraph
//      that shares a run of words with a validation or test gloss. Lowercase words, vocabulary
//      from the pre-training text.
//   2. Pre-training: a masked language model on GCIDE, cached in the project's safetensors
//      format under a key of the model configuration, the recipe and the data's checksum.
//   3. Fine-tuning arms (same steps, batches, AdamW, warm-up, head): full, LoRA and AdaLoRA at
//      two budgets, a learning rate per arm chosen on validation from a grid with seed 0, then
//      every seed at that rate; ablations at the low budget.
//   4. Reports: the table, the rank picture (the paper's Figure 1), validation curves, a JSON
//      summary, AdaLoRA's adapters exported in PEFT's format and re-imported (same logits), and
//      the cost of a step (LoRA, AdaLoRA, and AdaLoRA's allocator written as PEFT writes it).
//   5. With --compact: AdaLoRA compacted to its kept triplets once its pattern is final, against
//      the masked runs (orthogonality on and off), and the final phase's step with and without.

#include <dlfcn.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "adalora/io/file_io.hpp"
#include "adalora/io/peft_adapter.hpp"
#include "adalora/io/safetensors.hpp"
#include "examples/finetune/svg.hpp"
#include "examples/transformer/corpus.hpp"
#include "examples/transformer/model.hpp"
#include "examples/transformer/pretraining.hpp"
#include "examples/transformer/step_cost.hpp"
#include "examples/transformer/training.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using finetune::svg::format;
using namespace transformer;

namespace {

using clock_type = std::chrono::steady_clock;

// ---- flags ---------------------------------------------------------------------------------------

struct flags {
  fs::path out = "out/transformer";
  fs::path cache;  // default: <out>/cache
  fs::path wordnet = "/usr/share/wordnet";
  fs::path gcide = "/usr/share/dictd/gcide.dict.dz";
  int seeds = 3;
  std::vector<int> budgets = {2, 8};
  std::int64_t steps = 1000, batch = 32;
  std::int64_t pretrain_steps = 3000, pretrain_batch = 64;
  std::vector<double> lr_grid = {1e-3, 3e-3, 1e-2};
  std::vector<double> lr_grid_full = {1e-4, 3e-4, 1e-3};
  bool ablations = true;
  bool with_full = true;  // --no-full: only the adapter arms (e.g. for a longer schedule)
  std::int64_t cost_steps = 150;
  unsigned jobs = 2;
  // The test suite's tiny version: a small model, few steps, a slice of the data.
  bool tiny = false;
  bool cost_only = false;  // data, pre-training (cached) and the step cost; no fine-tuning arms
  bool compact = false;       // the compaction comparison (compacted AdaLoRA runs, final-phase cost)
  bool compact_only = false;  // only that comparison, at the first learning rate of the grid
  std::int64_t final_untimed = 60;  // untimed steps before the final phase's timed ones
  model_config model;
  std::int64_t max_paragraphs = 0, max_train = 0, max_eval = 0;  // 0: all
};

const char* usage = R"(usage: transformer [options]
  --out DIR            outputs (default out/transformer)
  --cache DIR          pre-trained encoders (default DIR/cache of --out)
  --seeds N            seeds per arm (default 3)
  --budgets B1,B2      average final rank per matrix (default 2,8)
  --steps N            fine-tuning steps (default 1000, batch 32)
  --pretrain-steps N   masked-LM steps (default 3000, batch 64)
  --no-ablations       skip the ablation arms
  --no-full            skip full fine-tuning
  --lr-grid A,B,...    the adapter arms' learning-rate grid (default 1e-3,3e-3,1e-2)
  --cost-steps N       timed steps per model in the step-cost comparison (default 150; 0 skips)
  --jobs N             fine-tuning runs trained at once, one thread each (default 2)
  --cost-only          only the step-cost comparison (after the data and the cached pre-training)
  --compact            also AdaLoRA compacted to its kept triplets once its pattern is final,
                       against the masked runs at the same seeds and learning rate (orthogonality
                       on and off), and the final phase's step cost with and without compaction
  --compact-only       only that comparison (after the data and the cached pre-training), at the
                       first learning rate of --lr-grid
  --tiny               the test suite's version: small model, few steps, a slice of the data
)";

std::vector<double> double_list(const std::string& s) {
  std::vector<double> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    out.push_back(std::stod(item));
    if (!(out.back() > 0)) throw std::invalid_argument("--lr-grid: learning rates must be > 0");
  }
  if (out.empty()) throw std::invalid_argument("--lr-grid needs at least one learning rate");
  return out;
}

std::vector<int> int_list(const std::string& s) {
  std::vector<int> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoi(item));
  return out;
}

flags parse(int argc, char** argv) {
  flags f;
  bool cache_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    const auto positive = [&](const std::string& v) {
      const long long n = std::stoll(v);
      if (n < 0) throw std::invalid_argument(a + " must be >= 0, got " + v);
      return std::int64_t(n);
    };
    if (a == "--out") f.out = next();
    else if (a == "--cache") f.cache = next(), cache_set = true;
    else if (a == "--seeds") f.seeds = int(positive(next()));
    else if (a == "--budgets") f.budgets = int_list(next());
    else if (a == "--steps") f.steps = positive(next());
    else if (a == "--pretrain-steps") f.pretrain_steps = positive(next());
    else if (a == "--no-ablations") f.ablations = false;
    else if (a == "--no-full") f.with_full = false;
    else if (a == "--lr-grid") f.lr_grid = double_list(next());
    else if (a == "--cost-steps") f.cost_steps = positive(next());
    else if (a == "--jobs") f.jobs = unsigned(std::max<std::int64_t>(1, positive(next())));
    else if (a == "--tiny") f.tiny = true;
    else if (a == "--cost-only") f.cost_only = true;
    else if (a == "--compact") f.compact = true;
    else if (a == "--compact-only") f.compact = f.compact_only = true;
    else if (a == "--help" || a == "-h") {
      std::cout << usage;
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a + "\n" + usage);
    }
  }
  if (f.tiny) {
    f.model = {.vocab = 2000, .width = 32, .layers = 2, .heads = 2, .ffn = 64, .seq = 16};
    f.max_paragraphs = 4000, f.max_train = 3000, f.max_eval = 300;
    if (f.seeds == 3) f.seeds = 2;
    f.steps = std::min<std::int64_t>(f.steps, 60);
    f.pretrain_steps = std::min<std::int64_t>(f.pretrain_steps, 30);
    f.pretrain_batch = 16, f.batch = 16;
    f.lr_grid = {3e-3, 1e-2};
    f.lr_grid_full = {1e-3};
    f.cost_steps = std::min<std::int64_t>(f.cost_steps, 6);
    f.final_untimed = 30;
  }
  if (f.seeds < 1) throw std::invalid_argument("--seeds must be >= 1");
  if (f.budgets.empty()) throw std::invalid_argument("--budgets needs at least one budget");
  for (const int b : f.budgets)
    if (b < 1) throw std::invalid_argument("--budgets: each budget must be >= 1");
  std::sort(f.budgets.begin(), f.budgets.end());
  f.budgets.erase(std::unique(f.budgets.begin(), f.budgets.end()), f.budgets.end());
  if (f.steps < 20) throw std::invalid_argument("--steps must be >= 20");
  if (f.cost_only && f.compact_only)
    throw std::invalid_argument("--cost-only and --compact-only exclude each other");
  if (!cache_set) f.cache = f.out / "cache";
  return f;
}

// ---- the BLAS torch runs on ---------------------------------------------------------------------

/// The BLAS library mapped into this process (libtorch links libblas.so.3, which Debian's
/// alternatives point at OpenBLAS, BLIS or the reference BLAS).
std::string blas_in_use() {
  std::ifstream maps("/proc/self/maps");
  std::string found;
  for (std::string line; std::getline(maps, line);) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    if (path.find("blas") == std::string::npos && path.find("blis") == std::string::npos &&
        path.find("mkl") == std::string::npos)
      continue;
    if (path.find("openblas") != std::string::npos)
      return "OpenBLAS (" + fs::path(path).parent_path().filename().string() + ") " + path;
    if (path.find("blis") != std::string::npos) return "BLIS " + path;
    if (path.find("mkl") != std::string::npos) return "MKL " + path;
    found = "reference BLAS " + path;
  }
  return found.empty() ? "unknown (no BLAS library mapped)" : found;
}

/// One torch thread per run; OpenBLAS's own threads on top of that oversubscribe the cores
/// (2.5× slower on this model, docs/transformer.md), so they are turned off when present.
void single_threaded_blas() {
  using setter = void (*)(int);
  if (auto* f = reinterpret_cast<setter>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) f(1);
}

std::string load_text() {
  double l[3] = {0, 0, 0};
  if (getloadavg(l, 3) < 0) return "unknown";
  return format("%.2f %.2f %.2f", l[0], l[1], l[2]);
}

// ---- data ------------------------------------------------------------------------------------------

struct prepared {
  vocabulary vocab = vocabulary::from_ordered_words({});
  std::vector<std::int32_t> stream;  // the pre-training text, token ids, paragraphs in order
  labelled_set train, validation, validation_subset, test;
  std::int64_t classes = 45;
  std::int64_t synsets = 0, paragraphs = 0, dropped_paragraphs = 0, words = 0;
  std::array<std::int64_t, 3> split_sizes{};
  double majority_share = 0;  // of the test set, by the training set's majority class
  std::string majority_class;
  std::uint32_t stream_crc = 0;
};

labelled_set encode_set(const std::vector<const synset*>& items, const vocabulary& vocab,
                        std::int64_t seq) {
  labelled_set s;
  const auto n = std::int64_t(items.size());
  s.ids = torch::zeros({n, seq}, torch::kInt64);
  s.labels = torch::empty({n}, torch::kInt64);
  auto ids = s.ids.accessor<std::int64_t, 2>();
  auto labels = s.labels.accessor<std::int64_t, 1>();
  std::vector<std::int32_t> tokens;
  for (std::int64_t i = 0; i < n; ++i) {
    tokens.clear();
    vocab.encode(items[static_cast<std::size_t>(i)]->gloss, tokens);
    ids[i][0] = vocabulary::cls;
    const auto len = std::min<std::int64_t>(seq - 1, std::int64_t(tokens.size()));
    for (std::int64_t j = 0; j < len; ++j) ids[i][j + 1] = tokens[static_cast<std::size_t>(j)];
    labels[i] = items[static_cast<std::size_t>(i)]->lexfile;
    s.lengths.push_back(len + 1);
  }
  return s;
}

/// read(), its error message naming the Debian package the data comes from.
template <class Read>
auto from_package(const char* data, const char* package, Read&& read) {
  try {
    return read();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(e.what()) + " (" + data +
                             " comes from the Debian package " + package +
                             "; scripts/setup.sh installs it)");
  }
}

prepared prepare_data(const flags& f) {
  prepared d;
  const auto start = clock_type::now();
  const std::vector<synset> synsets =
      from_package("WordNet", "wordnet-base", [&] { return read_wordnet(f.wordnet); });
  d.synsets = std::int64_t(synsets.size());
  std::array<std::vector<const synset*>, 3> parts;
  for (const synset& s : synsets) parts[static_cast<std::size_t>(split_of(s))].push_back(&s);
  for (std::size_t k = 0; k < 3; ++k) d.split_sizes[k] = std::int64_t(parts[k].size());

  // Validation and test glosses must not be seen in pre-training (GCIDE includes WordNet text).
  overlap_filter filter(4);
  for (const std::size_t k : {std::size_t(1), std::size_t(2)})
    for (const synset* s : parts[k]) {
      const auto w = words(s->gloss);
      filter.add(w);
    }
  std::string text = from_package("GCIDE", "dict-gcide", [&] { return read_gzip(f.gcide); });
  std::vector<std::string> paragraphs = gcide_paragraphs(text);
  text.clear();
  text.shrink_to_fit();
  if (f.max_paragraphs > 0 && std::int64_t(paragraphs.size()) > f.max_paragraphs)
    paragraphs.resize(static_cast<std::size_t>(f.max_paragraphs));
  d.paragraphs = std::int64_t(paragraphs.size());
  word_counter counter;
  std::vector<char> kept(paragraphs.size(), 0);
  for (std::size_t i = 0; i < paragraphs.size(); ++i) {
    const auto w = words(paragraphs[i]);
    if (filter.overlaps(w)) {
      ++d.dropped_paragraphs;
      continue;
    }
    kept[i] = 1;
    for (const auto& x : w) counter.add(x);
  }
  d.words = counter.total();
  d.vocab = vocabulary::from_counts(counter, static_cast<std::size_t>(f.model.vocab));
  for (std::size_t i = 0; i < paragraphs.size(); ++i)
    if (kept[i]) d.vocab.encode(paragraphs[i], d.stream);
  d.stream_crc = static_cast<std::uint32_t>(
      crc32(0L, reinterpret_cast<const Bytef*>(d.stream.data()),
            static_cast<uInt>(d.stream.size() * sizeof(std::int32_t))));

  // --tiny keeps an evenly spaced slice: the files are ordered by part of speech and
  // lexicographer file, so a prefix would hold a handful of classes.
  const auto slice = [](std::vector<const synset*>& v, std::int64_t n) {
    if (n <= 0 || std::int64_t(v.size()) <= n) return;
    std::vector<const synset*> kept;
    for (std::int64_t i = 0; i < n; ++i) kept.push_back(v[static_cast<std::size_t>(i * std::int64_t(v.size()) / n)]);
    v = std::move(kept);
  };
  slice(parts[0], f.max_train);
  slice(parts[1], f.max_eval);
  slice(parts[2], f.max_eval);
  d.train = encode_set(parts[0], d.vocab, f.model.seq);
  d.validation = encode_set(parts[1], d.vocab, f.model.seq);
  d.test = encode_set(parts[2], d.vocab, f.model.seq);
  // The curves use a fixed slice of the validation set (evaluating all of it 5 times a run would
  // cost more than the training).
  std::vector<const synset*> subset(parts[1].begin(),
                                    parts[1].begin() + std::min<std::ptrdiff_t>(2000, std::ptrdiff_t(parts[1].size())));
  d.validation_subset = encode_set(subset, d.vocab, f.model.seq);

  std::array<std::int64_t, 45> counts{};
  for (const synset* s : parts[0]) ++counts[static_cast<std::size_t>(s->lexfile)];
  const auto majority = std::size_t(std::max_element(counts.begin(), counts.end()) - counts.begin());
  std::int64_t hits = 0;
  for (const synset* s : parts[2]) hits += s->lexfile == int(majority) ? 1 : 0;
  d.majority_share = double(hits) / double(std::max<std::size_t>(1, parts[2].size()));
  d.majority_class = std::string(lexfile_names[majority]);
  std::cerr << format(
      "data: %lld WordNet synsets, 45 classes, split %lld/%lld/%lld (train/validation/test%s); "
      "majority class %s = %.1f%% of test\n"
      "data: GCIDE %lld paragraphs, %lld dropped for sharing words with a validation or test "
      "gloss, %lld words, vocabulary %zu; %.1f s\n",
      (long long)d.synsets, (long long)d.split_sizes[0], (long long)d.split_sizes[1],
      (long long)d.split_sizes[2], f.tiny ? ", sliced for --tiny" : "", d.majority_class.c_str(),
      100 * d.majority_share, (long long)d.paragraphs, (long long)d.dropped_paragraphs,
      (long long)d.words, d.vocab.size(), seconds_since(start));
  return d;
}

// ---- the runs ------------------------------------------------------------------------------------

/// Runs `configs` on `jobs` threads (torch single-threaded in each), with progress lines.
class run_pool {
 public:
  run_pool(const encoder& base, const prepared& d, unsigned jobs, double total_work)
      : base_(base), d_(d), jobs_(jobs), total_work_(total_work), start_(clock_type::now()) {}

  static double work_of(const run_config& c) { return double(c.steps) * (c.kind == method::full ? 1.6 : 1.0); }

  std::vector<run_result> run(const std::vector<run_config>& configs, bool keep_first_adalora = false) {
    std::vector<run_result> results(configs.size());
    std::atomic<std::size_t> next{0};
    std::exception_ptr failure;
    std::mutex m;
    const auto worker = [&] {
      for (;;) {
        const std::size_t i = next++;
        if (i >= configs.size()) return;
        try {
          const bool keep = keep_first_adalora && configs[i].kind == method::adalora && configs[i].seed == 0;
          run_result r = fine_tune(configs[i], base_, d_.train, d_.validation_subset, d_.validation,
                                   d_.test, d_.classes, keep);
          std::lock_guard lock(m);
          done_work_ += work_of(configs[i]);
          const double el = seconds_since(start_);
          std::cerr << format("finetune: %-24s budget %d lr %.0e seed %d: validation %.4f test %.4f "
                              "(%.0f s)  [%.0f%% done, %s elapsed, about %s left]\n",
                              r.config.label().c_str(), r.config.budget, r.config.lr, r.config.seed,
                              r.validation.accuracy, r.test.accuracy, r.seconds,
                              100 * done_work_ / total_work_, duration_text(el).c_str(),
                              duration_text(el / done_work_ * (total_work_ - done_work_)).c_str());
          results[i] = std::move(r);
        } catch (...) {
          std::lock_guard lock(m);
          if (!failure) failure = std::current_exception();
          next = configs.size();
        }
      }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 1; t < jobs_; ++t) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
    if (failure) std::rethrow_exception(failure);
    return results;
  }

 private:
  const encoder& base_;
  const prepared& d_;
  unsigned jobs_;
  double total_work_, done_work_ = 0;
  clock_type::time_point start_;
};

struct arm_key {
  method kind;
  int budget;
  bool at_adalora_ranks = false;
  bool operator<(const arm_key& o) const {
    return std::tie(budget, kind, at_adalora_ranks) < std::tie(o.budget, o.kind, o.at_adalora_ranks);
  }
};

struct arm_summary {
  arm_key key;
  std::string label;
  double lr = 0;
  std::vector<run_result> runs;  // one per seed, at the chosen learning rate
  std::vector<double> grid_validation;  // seed 0's validation accuracy per grid learning rate
  std::vector<double> grid_lrs;
};

double stddev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean_of(v);
  double s = 0;
  for (const double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / double(v.size() - 1));
}
std::vector<double> test_accuracies(const arm_summary& a) {
  std::vector<double> v;
  for (const auto& r : a.runs) v.push_back(r.test.accuracy);
  return v;
}
std::vector<double> mean_ranks(const arm_summary& a) {
  std::vector<double> m(a.runs.front().ranks.size(), 0.0);
  for (const auto& r : a.runs)
    for (std::size_t i = 0; i < m.size(); ++i) m[i] += r.ranks[i] / double(a.runs.size());
  return m;
}

/// Ranks summed per matrix type over the layers ("q k v o f1 f2") and per layer.
std::string rank_sums(const std::vector<double>& ranks, std::int64_t layers) {
  const std::size_t types = matrix_types().size();
  std::string by_type, by_layer;
  for (std::size_t t = 0; t < types; ++t) {
    double s = 0;
    for (std::int64_t l = 0; l < layers; ++l) s += ranks[std::size_t(l) * types + t];
    by_type += (t ? " " : "") + format(std::abs(s - std::round(s)) < 1e-9 ? "%.0f" : "%.1f", s);
  }
  for (std::int64_t l = 0; l < layers; ++l) {
    double s = 0;
    for (std::size_t t = 0; t < types; ++t) s += ranks[std::size_t(l) * types + t];
    by_layer += (l ? " " : "") + format(std::abs(s - std::round(s)) < 1e-9 ? "%.0f" : "%.1f", s);
  }
  return by_type + " | " + by_layer;
}

// ---- PEFT export and re-import -------------------------------------------------------------------

struct round_trip {
  fs::path dir;
  double max_abs_difference = 0, max_abs_logit = 0;
  std::int64_t examples = 0, same_predictions = 0;
};

round_trip peft_round_trip(const run_result& r, const prepared& d, const fs::path& dir, const flags& f) {
  round_trip out;
  out.dir = dir;
  encoder& trained = *r.model;
  adalora::peft_adalora_config config;
  config.init_r = r.config.initial_rank();
  config.target_r = r.config.budget;
  config.tinit = std::llround(r.config.ada.tinit * double(r.config.steps));
  config.tfinal = std::llround(r.config.ada.tfinal * double(r.config.steps));
  config.delta_t = r.config.ada.delta_t;
  config.total_step = r.config.steps;
  config.orth_reg_weight = r.config.ada.orth_weight;
  config.lora_alpha = double(config.init_r);
  config.pattern = r.pattern;
  config.base_model_name_or_path = "adalora-transformer-" + f.model.text();
  std::vector<adalora::peft_module_ref<float>> modules;
  for (adapted_linear* a : trained.adapted())
    modules.push_back({a->name, adalora::torch_adapter_ref<const float>(a->A, a->E, a->B)});
  adalora::save_peft_adapter<float>(dir, config, modules);

  // Re-import into a fresh copy of the encoder: every module at its kept rank, PEFT's scale.
  const auto loaded = adalora::load_peft_adapter<float>(dir);
  encoder copy(trained);
  for (adapted_linear* a : copy.adapted()) {
    const auto* m = loaded.find(a->name);
    if (m == nullptr) throw std::runtime_error("PEFT round trip: module " + a->name + " missing");
    const auto p = m->adapter.params();
    const auto to_tensor = [](auto view, std::int64_t rows, std::int64_t cols) {
      torch::Tensor t = torch::empty({rows, cols});
      auto acc = t.accessor<float, 2>();
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) acc[i][j] = view(i, j);
      return t;
    };
    const auto k = p.E.size();
    a->A = to_tensor([&](auto i, auto j) { return p.A(i, j); }, k, p.A.cols());
    a->E = to_tensor([&](auto i, auto) { return p.E[i]; }, k, 1);
    a->B = to_tensor([&](auto i, auto j) { return p.B(i, j); }, p.B.rows(), k);
    a->scale = double(m->adapter.scale().scaling()) / double(m->adapter.scale().rn());
  }
  torch::NoGradGuard no_grad;
  const std::int64_t n = std::min<std::int64_t>(512, d.test.size());
  std::vector<std::int64_t> rows(static_cast<std::size_t>(n));
  std::iota(rows.begin(), rows.end(), 0);
  const auto [ids, labels] = batch_of(d.test, rows);
  const torch::Tensor before = torch::linear(trained.pooled(ids), r.head_w, r.head_b);
  const torch::Tensor after = torch::linear(copy.pooled(ids), r.head_w, r.head_b);
  out.examples = n;
  out.max_abs_difference = (before - after).abs().max().item<double>();
  out.max_abs_logit = before.abs().max().item<double>();
  out.same_predictions = (before.argmax(1) == after.argmax(1)).sum().item<std::int64_t>();
  return out;
}

// ---- reports -------------------------------------------------------------------------------------

/// Written with the library's atomic writer: a failed run leaves the previous file intact.
void write_text(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  adalora::write_file_for("transformer", file.string(), std::string_view(text));
}

json phase_json(const phase_times& p) {
  return {{"forward_backward_ms", median(p.forward_backward)},
          {"regularizer_ms", median(p.regularizer)},
          {"optimizer_ms", median(p.optimizer)},
          {"allocator_ms", median(p.allocator)},
          {"allocator_mean_ms", mean_of(p.allocator)},
          {"total_ms", median(p.total)},
          {"total_mean_ms", mean_of(p.total)}};
}

std::string step_cost_table(const std::vector<step_cost_result>& costs, const std::string& before,
                            const std::string& after, const std::string& blas) {
  std::string s = "Medians over the timed steps, ms per step, one torch thread, alternating models "
                  "on the same batch; torch BLAS: " + blas + "; load average before " + before +
                  ", after " + after + ".\n\n";
  s += "| budget | model | forward + backward | regularizer | optimizer | allocator (median / mean) "
       "| step (median) | vs LoRA at r |\n|---|---|---|---|---|---|---|---|\n";
  for (const auto& c : costs) {
    const double base = median(c.lora.total);
    const auto row = [&](const std::string& name, const phase_times& p, bool adaptive) {
      s += format("| %d | %s | %.2f | %s | %.2f | %s | %.2f | %+.1f%% |\n", c.budget, name.c_str(),
                  median(p.forward_backward),
                  !adaptive ? "-" : &p == &c.peft_style ? "in forward + backward"
                                         : format("%.2f", median(p.regularizer)).c_str(),
                  median(p.optimizer),
                  adaptive ? format("%.3f / %.3f", median(p.allocator), mean_of(p.allocator)).c_str() : "-",
                  median(p.total), 100 * (median(p.total) / base - 1));
    };
    row(format("LoRA r = %d", c.budget), c.lora, false);
    row(format("LoRA r = %lld", (long long)c.initial_rank), c.lora_rinit, false);
    row(format("AdaLoRA %lld → %d, adalora", (long long)c.initial_rank, c.budget), c.adalora, true);
    row(format("AdaLoRA %lld → %d, PEFT-style torch ops", (long long)c.initial_rank, c.budget),
        c.peft_style, true);
  }
  for (const auto& c : costs) {
    const double rinit = median(c.lora_rinit.total);
    const double ours = median(c.adalora.total), peft = median(c.peft_style.total);
    s += format(
        "\nbudget %d: AdaLoRA's adaptive part (regularizer + allocator) adds %.1f%% to LoRA's step "
        "at the same rank %lld (adalora: %.2f + %.3f ms); the PEFT-style step costs %+.1f%% over "
        "LoRA at rank %lld, adalora's %+.1f%%.\n",
        c.budget, 100 * (median(c.adalora.regularizer) + median(c.adalora.allocator)) / rinit,
        (long long)c.initial_rank, median(c.adalora.regularizer), median(c.adalora.allocator),
        100 * (peft / rinit - 1), (long long)c.initial_rank, 100 * (ours / rinit - 1));
  }
  return s;
}

/// The step-cost comparison at every budget, printed and written to transformer_step_cost.md.
std::vector<step_cost_result> step_costs(const encoder& base, const prepared& d, const flags& f,
                                         const std::string& blas, std::string& load_before,
                                         std::string& load_after) {
  std::vector<step_cost_result> costs;
  load_before = load_text();
  for (const int b : f.budgets) {
    if (f.cost_steps <= 0) break;
    std::cerr << format("step cost: budget %d, %lld timed steps per model, 4 models in turn...\n", b,
                        (long long)f.cost_steps);
    costs.push_back(measure_step_cost(base, d.train, d.classes, b, f.cost_steps, 10, f.steps,
                                      f.batch, adalora_recipe{}));
  }
  load_after = load_text();
  if (!costs.empty()) {
    const std::string cost = step_cost_table(costs, load_before, load_after, blas);
    std::cout << "\n" << cost;
    write_text(f.out / "transformer_step_cost.md", cost);
  }
  return costs;
}

// ---- compaction (issue 17) ---------------------------------------------------------------------

/// One budget and orthogonality setting: the same seeds masked (as PEFT trains) and compacted.
struct compaction_pair {
  int budget = 0;
  double lr = 0, orth_weight = 0;
  std::vector<run_result> masked, compacted;  // by seed
};

std::vector<double> test_losses(const std::vector<run_result>& runs) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(r.test.loss);
  return v;
}
std::vector<double> test_accuracies(const std::vector<run_result>& runs) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(r.test.accuracy);
  return v;
}
double median_final_step_ms(const std::vector<run_result>& runs) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(r.final_phase_step_ms);
  return median(v);
}

/// Per budget, AdaLoRA masked and compacted at every seed, with the recipe's orthogonality and
/// without. `summaries` (the protocol's arms) gives the learning rate and the masked runs with
/// orthogonality; without it the rate is the grid's first and every run is trained here.
std::vector<compaction_pair> compaction_comparison(run_pool& pool, const flags& f,
                                                   const std::map<arm_key, arm_summary>* summaries) {
  const adalora_recipe recipe;
  std::vector<compaction_pair> pairs;
  std::vector<run_config> configs;
  for (const int b : f.budgets)
    for (const double orth : {recipe.orth_weight, 0.0}) {
      compaction_pair p;
      p.budget = b;
      p.orth_weight = orth;
      p.lr = summaries ? summaries->at({method::adalora, b}).lr : f.lr_grid.front();
      if (summaries && orth == recipe.orth_weight)
        for (const auto& r : summaries->at({method::adalora, b}).runs) {
          run_result copy = r;
          copy.model.reset();
          p.masked.push_back(std::move(copy));
        }
      for (const bool compact : {false, true}) {
        if (!compact && !p.masked.empty()) continue;
        for (int s = 0; s < f.seeds; ++s) {
          run_config c;
          c.kind = method::adalora;
          c.budget = b;
          c.lr = p.lr;
          c.seed = s;
          c.steps = f.steps;
          c.batch = f.batch;
          c.ada.orth_weight = orth;
          c.compact = compact;
          configs.push_back(c);
        }
      }
      pairs.push_back(std::move(p));
    }
  std::cerr << format("compaction: %zu AdaLoRA runs, masked and compacted, orthogonality %.1f and 0\n",
                      configs.size(), recipe.orth_weight);
  for (auto& r : pool.run(configs))
    for (auto& p : pairs)
      if (p.budget == r.config.budget && p.orth_weight == r.config.ada.orth_weight)
        (r.config.compact ? p.compacted : p.masked).push_back(std::move(r));
  for (auto& p : pairs)
    for (auto* runs : {&p.masked, &p.compacted})
      std::sort(runs->begin(), runs->end(),
                [](const run_result& x, const run_result& y) { return x.config.seed < y.config.seed; });
  return pairs;
}

/// The final phase with and without compaction at every budget.
std::vector<final_phase_cost_result> final_phase_costs(const encoder& base, const prepared& d, const flags& f) {
  std::vector<final_phase_cost_result> costs;
  for (const int b : f.budgets) {
    if (f.cost_steps <= 0) break;
    std::cerr << format("final-phase cost: budget %d, %lld untimed then %lld timed steps per model, 3 "
                        "models in turn...\n", b, (long long)f.final_untimed, (long long)f.cost_steps);
    costs.push_back(measure_final_phase_cost(base, d.train, d.classes, b, f.cost_steps, f.final_untimed,
                                             f.batch, adalora_recipe{}));
  }
  return costs;
}

bool same_ranks(const run_result& masked, const run_result& compacted) {
  return compacted.compacted_at >= 0 && compacted.compacted_ranks == masked.ranks &&
         compacted.ranks == compacted.compacted_ranks;
}

std::string compaction_report(const std::vector<compaction_pair>& pairs,
                              const std::vector<final_phase_cost_result>& costs, const flags& f,
                              const std::string& load_before, const std::string& load_after,
                              const std::string& blas) {
  std::string s;
  if (!pairs.empty()) {
    const run_result& any = pairs.front().compacted.front();
    s += format(
        "AdaLoRA with and without compaction: the same seeds, batches and learning rate, once "
        "masked as PEFT and loralib train (pruned triplets stay in every product to the end) and "
        "once compacted to the kept triplets at the final phase's force mask (step %lld of %lld). "
        "Test accuracy, mean ± standard deviation over %d seed(s). The final-phase step is the "
        "median over the steps after the force mask of each run (two runs share the machine at a "
        "time: see the side-by-side table below for the cost).\n\n",
        (long long)any.compacted_at, (long long)f.steps, f.seeds);
    s += "| budget | orthogonality | lr | masked | compacted | difference | largest per-seed "
         "difference (accuracy / test loss) | final-phase step, masked → compacted | compacted "
         "ranks = kept ranks |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& p : pairs) {
      const auto am = test_accuracies(p.masked), ac = test_accuracies(p.compacted);
      const auto lm = test_losses(p.masked), lc = test_losses(p.compacted);
      double max_acc = 0, max_loss = 0;
      bool ranks = p.masked.size() == p.compacted.size();
      for (std::size_t i = 0; i < std::min(am.size(), ac.size()); ++i) {
        max_acc = std::max(max_acc, std::abs(ac[i] - am[i]));
        max_loss = std::max(max_loss, std::abs(lc[i] - lm[i]));
        ranks = ranks && same_ranks(p.masked[i], p.compacted[i]);
      }
      const double diff = mean_of(ac) - mean_of(am), spread = std::max(stddev(am), stddev(ac));
      s += format("| %d | %.1f | %.0e | %.4f ± %.4f | %.4f ± %.4f | %+.4f (%s) | %.4f / %.2e | "
                  "%.2f → %.2f ms | %s |\n",
                  p.budget, p.orth_weight, p.lr, mean_of(am), stddev(am), mean_of(ac), stddev(ac), diff,
                  std::abs(diff) <= spread ? "inside the seed spread" : "OUTSIDE the seed spread",
                  max_acc, max_loss, median_final_step_ms(p.masked), median_final_step_ms(p.compacted),
                  ranks ? "yes" : "NO");
    }
    s += "\n";
  }
  if (!costs.empty()) {
    const auto& c0 = costs.front();
    s += format(
        "The final phase's step, side by side: three models in turn on the same batch, medians "
        "over %lld steps of the final phase (after %lld untimed ones on a compressed cubic "
        "schedule that ends in the force mask), ms per step, one torch thread; torch BLAS: %s; "
        "load average before %s, after %s. Rank 0 is the same model with every adapter at rank 0: "
        "what does not depend on the rank. The adapter's own cost is a step minus the rank-0 "
        "step.\n\n",
        (long long)c0.steps, (long long)c0.untimed, blas.c_str(), load_before.c_str(), load_after.c_str());
    s += "| budget | model | triplets | forward + backward | regularizer | optimizer | allocator | "
         "step | adapter's own cost |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& c : costs) {
      const double base = median(c.rank0.total);
      const auto row = [&](const std::string& name, std::int64_t triplets, const phase_times& p, bool adaptive) {
        s += format("| %d | %s | %lld | %.2f | %.3f | %.2f | %s | %.2f | %s |\n", c.budget, name.c_str(),
                    (long long)triplets, median(p.forward_backward), median(p.regularizer),
                    median(p.optimizer), adaptive ? format("%.3f", median(p.allocator)).c_str() : "-",
                    median(p.total), adaptive ? format("%.2f", median(p.total) - base).c_str() : "-");
      };
      row("rank 0", 0, c.rank0, false);
      row(format("AdaLoRA %lld → %d, masked", (long long)c.initial_rank, c.budget), c.initial_total, c.masked, true);
      row(format("AdaLoRA %lld → %d, compacted", (long long)c.initial_rank, c.budget), c.kept_total, c.compacted, true);
    }
    for (const auto& c : costs) {
      const double base = median(c.rank0.total);
      const double own_masked = median(c.masked.total) - base, own_compacted = median(c.compacted.total) - base;
      s += format(
          "\nbudget %d: %lld of %lld triplets kept (fraction %.3f); the adapter's own cost falls "
          "from %.2f to %.2f ms per step, to %.3f of the masked one's; the whole step %+.1f%% "
          "(compaction itself took %.2f ms, once).\n",
          c.budget, (long long)c.kept_total, (long long)c.initial_total, c.kept_fraction(), own_masked,
          own_compacted, own_masked > 0 ? own_compacted / own_masked : std::nan(""),
          100 * (median(c.compacted.total) / median(c.masked.total) - 1), c.compaction_ms);
    }
  }
  return s;
}

json compaction_json(const std::vector<compaction_pair>& pairs, const std::vector<final_phase_cost_result>& costs) {
  json runs = json::array();
  for (const auto& p : pairs) {
    const auto side = [](const std::vector<run_result>& v) {
      json ranks = json::array(), compacted_ranks = json::array(), at = json::array();
      for (const auto& r : v) {
        ranks.push_back(r.ranks);
        compacted_ranks.push_back(r.compacted_ranks);
        at.push_back(r.compacted_at);
      }
      const auto acc = test_accuracies(v);
      return json{{"values", acc},
                  {"mean", mean_of(acc)},
                  {"std", stddev(acc)},
                  {"test_loss", test_losses(v)},
                  {"ranks", ranks},
                  {"compacted_ranks", compacted_ranks},
                  {"compacted_at", at},
                  {"final_phase_step_ms", median_final_step_ms(v)}};
    };
    const auto am = test_accuracies(p.masked), ac = test_accuracies(p.compacted);
    bool ranks = p.masked.size() == p.compacted.size();
    for (std::size_t i = 0; ranks && i < p.masked.size(); ++i) ranks = same_ranks(p.masked[i], p.compacted[i]);
    runs.push_back({{"budget", p.budget},
                    {"orthogonality", p.orth_weight},
                    {"lr", p.lr},
                    {"masked", side(p.masked)},
                    {"compacted", side(p.compacted)},
                    {"difference", mean_of(ac) - mean_of(am)},
                    {"seed_spread", std::max(stddev(am), stddev(ac))},
                    {"compacted_ranks_equal_kept", ranks}});
  }
  json cost = json::array();
  for (const auto& c : costs) {
    const double base = median(c.rank0.total);
    const double own_masked = median(c.masked.total) - base, own_compacted = median(c.compacted.total) - base;
    cost.push_back({{"budget", c.budget},
                    {"initial_rank", c.initial_rank},
                    {"initial_triplets", c.initial_total},
                    {"kept_triplets", c.kept_total},
                    {"kept_fraction", c.kept_fraction()},
                    {"timed_steps", c.steps},
                    {"untimed_steps", c.untimed},
                    {"rank0", phase_json(c.rank0)},
                    {"masked", phase_json(c.masked)},
                    {"compacted", phase_json(c.compacted)},
                    {"adapter_cost_masked_ms", own_masked},
                    {"adapter_cost_compacted_ms", own_compacted},
                    {"adapter_cost_ratio", own_masked > 0 ? json(own_compacted / own_masked) : json()},
                    {"step_ratio", median(c.compacted.total) / median(c.masked.total)},
                    {"compaction_ms", c.compaction_ms}});
  }
  return {{"runs", runs}, {"final_phase_cost", cost}};
}

/// The comparison's report, printed and written to transformer_compaction.md.
void write_compaction(const flags& f, const std::vector<compaction_pair>& pairs,
                      const std::vector<final_phase_cost_result>& costs, const std::string& load_before,
                      const std::string& load_after, const std::string& blas) {
  const std::string report = compaction_report(pairs, costs, f, load_before, load_after, blas);
  std::cout << "\n" << report << std::flush;
  write_text(f.out / "transformer_compaction.md", report);
}

}  // namespace

int main(int argc, char** argv) try {
  const auto start = clock_type::now();
  const flags f = parse(argc, argv);
  torch::set_num_threads(1);
  single_threaded_blas();
  const std::string blas = blas_in_use();
  std::cerr << "transformer: torch " << TORCH_VERSION << " on " << blas << "; " << f.jobs
            << " run(s) at a time, one torch thread each; load average " << load_text() << "\n";
  if (blas.rfind("reference", 0) == 0)
    std::cerr << "transformer: WARNING: torch runs on the reference BLAS (about 10x slower matrix "
                 "products); install OpenBLAS (scripts/setup.sh does: libopenblas0)\n";

  prepared d = prepare_data(f);
  model_config config = f.model;
  config.vocab = std::int64_t(d.vocab.size());
  encoder base(config, 7);
  const pretrain_info pre =
      pretrain(base, {.model = config, .steps = f.pretrain_steps, .batch = f.pretrain_batch, .cache = f.cache},
               {.vocab = &d.vocab, .stream = &d.stream, .stream_crc = d.stream_crc});
  if (f.cost_only) {
    std::string before, after;
    step_costs(base, d, f, blas, before, after);
    if (f.compact) {
      before = load_text();
      const auto costs = final_phase_costs(base, d, f);
      write_compaction(f, {}, costs, before, load_text(), blas);
    }
    return 0;
  }
  if (f.compact_only) {
    // AdaLoRA masked and compacted, orthogonality on and off, at every budget and seed.
    run_pool pool(base, d, f.jobs, 4.0 * double(f.budgets.size()) * f.seeds * double(f.steps));
    const std::vector<compaction_pair> pairs = compaction_comparison(pool, f, nullptr);
    const std::string before = load_text();
    const auto costs = final_phase_costs(base, d, f);
    const std::string after = load_text();
    write_compaction(f, pairs, costs, before, after, blas);
    json summary = {{"model", config.text()}, {"blas", blas}, {"steps", f.steps}, {"seeds", f.seeds}};
    summary["pretraining"] = {{"reused", pre.reused}, {"file", pre.file.string()}};
    summary["compaction"] = compaction_json(pairs, costs);
    summary["load_average_before_after"] = {before, after};
    summary["seconds"] = seconds_since(start);
    write_text(f.out / "summary.json", summary.dump(2) + "\n");
    std::cout << format("\ntransformer: outputs in %s/ (transformer_compaction.md, summary.json); done in %s\n",
                        f.out.string().c_str(), duration_text(seconds_since(start)).c_str());
    return 0;
  }

  // ---- the protocol: learning rate per arm on validation (seed 0), then every seed ----
  std::vector<arm_key> arms;
  for (const int b : f.budgets) {
    arms.push_back({method::lora, b});
    arms.push_back({method::adalora, b});
  }
  if (f.with_full) arms.push_back({method::full, 0});
  const auto config_of = [&](const arm_key& k, double lr, int seed) {
    run_config c;
    c.kind = k.kind;
    c.budget = k.budget;
    c.lr = lr;
    c.seed = seed;
    c.steps = f.steps;
    c.batch = f.batch;
    return c;
  };
  std::vector<run_config> grid;
  for (const auto& k : arms)
    for (const double lr : k.kind == method::full ? f.lr_grid_full : f.lr_grid) grid.push_back(config_of(k, lr, 0));
  // Work estimate for the progress lines: the grid, the other seeds, the ablations.
  double total = 0;
  for (const auto& c : grid) total += run_pool::work_of(c);
  for (const auto& k : arms) total += (f.seeds - 1) * run_pool::work_of(config_of(k, 0, 0));
  if (f.ablations) total += 2.0 * f.seeds * double(f.steps);
  if (f.compact) total += 3.0 * double(f.budgets.size()) * f.seeds * double(f.steps);
  run_pool pool(base, d, f.jobs, total);
  std::cerr << format("finetune: %zu arms, %zu grid runs (seed 0), then %d more seed(s) per arm%s; "
                      "%lld steps of batch %lld each\n",
                      arms.size(), grid.size(), f.seeds - 1, f.ablations ? ", then the ablations" : "",
                      (long long)f.steps, (long long)f.batch);
  std::vector<run_result> grid_results = pool.run(grid, true);

  std::map<arm_key, arm_summary> summaries;
  for (auto& r : grid_results) {
    const arm_key k{r.config.kind, r.config.kind == method::full ? 0 : r.config.budget};
    arm_summary& a = summaries[k];
    a.key = k;
    a.label = r.config.label();
    a.grid_lrs.push_back(r.config.lr);
    a.grid_validation.push_back(r.validation.accuracy);
    if (a.runs.empty() || r.validation.accuracy > a.runs.front().validation.accuracy) {
      a.runs.clear();
      a.lr = r.config.lr;
      a.runs.push_back(r);
    }
  }
  // A run kept for the PEFT export must be the chosen one; keep its model only if chosen.
  std::vector<run_config> seeds;
  for (const auto& [k, a] : summaries)
    for (int s = 1; s < f.seeds; ++s) seeds.push_back(config_of(k, a.lr, s));
  if (f.ablations) {
    const int low = f.budgets.front();
    const double ada_lr = summaries.at({method::adalora, low}).lr;
    for (int s = 0; s < f.seeds; ++s) {
      run_config c = config_of({method::svd_fixed_rank, low}, ada_lr, s);
      seeds.push_back(c);
    }
  }
  for (auto& r : pool.run(seeds)) {
    const arm_key k{r.config.kind, r.config.kind == method::full ? 0 : r.config.budget};
    arm_summary& a = summaries[k];
    a.key = k;
    a.label = r.config.label();
    a.lr = r.config.lr;
    a.runs.push_back(std::move(r));
  }
  if (f.ablations) {
    // LoRA trained at the ranks AdaLoRA kept (per seed), at LoRA's learning rate.
    const int low = f.budgets.front();
    const arm_summary& ada = summaries.at({method::adalora, low});
    std::vector<run_config> at_ranks;
    for (const auto& r : ada.runs) {
      run_config c = config_of({method::lora, low}, summaries.at({method::lora, low}).lr, r.config.seed);
      c.ranks = r.ranks;
      at_ranks.push_back(c);
    }
    for (auto& r : pool.run(at_ranks)) {
      const arm_key k{method::lora, low, true};
      arm_summary& a = summaries[k];
      a.key = k;
      a.label = r.config.label();
      a.lr = r.config.lr;
      a.runs.push_back(std::move(r));
    }
  }
  for (auto& [k, a] : summaries)
    std::sort(a.runs.begin(), a.runs.end(), [](const run_result& x, const run_result& y) {
      return x.config.seed < y.config.seed;
    });
  const std::vector<compaction_pair> compaction_pairs =
      f.compact ? compaction_comparison(pool, f, &summaries) : std::vector<compaction_pair>{};

  // ---- the table ----
  const fs::path out = f.out;
  fs::create_directories(out);
  const auto lora_mean = [&](int b) {
    const auto it = summaries.find({method::lora, b});
    return it == summaries.end() ? std::nan("") : mean_of(test_accuracies(it->second));
  };
  std::string table = format(
      "WordNet 3.0 lexicographer file from the gloss: %lld classes, %lld/%lld/%lld "
      "train/validation/test synsets, majority class (%s) %.1f%% of test. Encoder: %s, "
      "pre-trained as a masked LM on GCIDE (%s). %d seed(s), %lld steps of batch %lld, AdamW, "
      "warm-up %.0f%% then linear decay; learning rate per arm from {",
      (long long)d.classes, (long long)d.train.size(), (long long)d.validation.size(),
      (long long)d.test.size(), d.majority_class.c_str(), 100 * d.majority_share,
      config.text().c_str(), pre.reused ? "cached" : "trained in this run", f.seeds,
      (long long)f.steps, (long long)f.batch, 6.0);
  for (std::size_t i = 0; i < f.lr_grid.size(); ++i) table += (i ? ", " : "") + format("%.0e", f.lr_grid[i]);
  table += "} (full: {";
  for (std::size_t i = 0; i < f.lr_grid_full.size(); ++i)
    table += (i ? ", " : "") + format("%.0e", f.lr_grid_full[i]);
  table += "}) on validation accuracy with seed 0. AdaLoRA: initial rank 1.5× the budget, cubic "
           "schedule (warm-up 10%, final phase 30%, mask every 10 steps), orthogonality 0.1. "
           "Ranks: sums over the layers per matrix type (q k v o f1 f2) | per layer, means over "
           "seeds. AdaLoRA's parameters are its kept triplets (what PEFT saves); it trains 1.5× "
           "as many until the pruning is done.\n\n";
  table += "| method | budget (rank/matrix) | trainable params | lr | test accuracy | vs LoRA | "
           "ranks by type | by layer |\n|---|---|---|---|---|---|---|---|\n";
  std::vector<const arm_summary*> ordered;
  for (const auto& [k, a] : summaries) ordered.push_back(&a);
  std::stable_sort(ordered.begin(), ordered.end(), [](const arm_summary* x, const arm_summary* y) {
    const auto rank = [](const arm_summary* a) { return a->key.kind == method::full ? 1 << 20 : a->key.budget; };
    return rank(x) < rank(y);
  });
  for (const arm_summary* a : ordered) {
    const auto acc = test_accuracies(*a);
    double params = 0;
    for (const auto& r : a->runs) params += double(r.trainable) / double(a->runs.size());
    const bool full = a->key.kind == method::full;
    const double vs = full || (a->key.kind == method::lora && !a->key.at_adalora_ranks)
                          ? std::nan("")
                          : mean_of(acc) - lora_mean(a->key.budget);
    std::string ranks = full ? "dense | dense" : rank_sums(mean_ranks(*a), config.layers);
    const auto bar = ranks.find(" | ");
    table += format("| %s | %s | %.0f | %.0e | %.4f ± %.4f | %s | %s | %s |\n", a->label.c_str(),
                    full ? "-" : std::to_string(a->key.budget).c_str(), params, a->lr, mean_of(acc),
                    stddev(acc), std::isnan(vs) ? "" : format("%+.1f points", 100 * vs).c_str(),
                    ranks.substr(0, bar).c_str(), ranks.substr(bar + 3).c_str());
  }
  std::cout << "\n" << table << std::flush;
  write_text(out / "transformer_table.md", table);

  // ---- the rank picture (Figure 1) and the curves ----
  std::vector<finetune::svg::heat_row> heat;
  double max_rank = 1;
  for (const int b : f.budgets) {
    const auto ranks = mean_ranks(summaries.at({method::adalora, b}));
    for (std::int64_t l = 0; l < config.layers; ++l) {
      finetune::svg::heat_row row;
      row.label = format("budget %d, layer %lld", b, (long long)l);
      for (std::size_t t = 0; t < matrix_types().size(); ++t) {
        row.values.push_back(ranks[std::size_t(l) * matrix_types().size() + t]);
        max_rank = std::max(max_rank, row.values.back());
      }
      heat.push_back(row);
    }
  }
  write_text(out / "transformer_ranks.svg",
             finetune::svg::rank_heatmap(
                 "AdaLoRA's final rank per layer and matrix (WordNet lexicographer file)",
                 format("mean over %d seed(s); initial rank 1.5x the budget in every matrix", f.seeds),
                 matrix_types(), heat, max_rank));
  std::vector<finetune::svg::panel> panels;
  const char* colors[] = {"#1f77b4", "#d62728", "#555555", "#2ca02c", "#9467bd"};
  for (const int b : f.budgets) {
    finetune::svg::panel p;
    p.title = format("budget %d per matrix", b);
    std::vector<const arm_summary*> lines;
    for (const arm_summary* a : ordered)
      if (a->key.budget == b || a->key.kind == method::full) lines.push_back(a);
    std::size_t color = 0;
    for (const arm_summary* a : lines) {
      finetune::svg::series s;
      s.label = a->label;
      s.color = colors[color++ % 5];
      s.dash = a->key.at_adalora_ranks || a->key.kind == method::svd_fixed_rank ? "6,4" : "";
      // Mean over seeds at each evaluation.
      for (std::size_t i = 0; i < a->runs.front().curve.size(); ++i) {
        double v = 0;
        for (const auto& r : a->runs) v += r.curve[i].second / double(a->runs.size());
        s.points.emplace_back(double(a->runs.front().curve[i].first), v);
      }
      p.lines.push_back(s);
    }
    p.markers = {0.1 * double(f.steps), 0.7 * double(f.steps)};
    panels.push_back(p);
  }
  write_text(out / "transformer_curves.svg",
             finetune::svg::line_chart("Validation loss (2,000 validation glosses), mean over seeds",
                                       "step", "cross-entropy", panels));

  // ---- PEFT export and re-import ----
  const arm_summary& export_arm = summaries.at({method::adalora, f.budgets.front()});
  round_trip trip;
  if (export_arm.runs.front().model) {
    trip = peft_round_trip(export_arm.runs.front(), d, out / "transformer_adalora_peft", f);
    std::cout << format(
        "\nPEFT export: %s (adapter_model.safetensors, adapter_config.json), budget %d, seed 0; "
        "re-imported: max |logit difference| %.3g (largest logit %.3g), %lld of %lld "
        "predictions equal\n",
        trip.dir.string().c_str(), f.budgets.front(), trip.max_abs_difference, trip.max_abs_logit,
        (long long)trip.same_predictions, (long long)trip.examples);
  }

  // ---- the cost of a step ----
  std::string load_before, load_after;
  const std::vector<step_cost_result> costs = step_costs(base, d, f, blas, load_before, load_after);
  std::vector<final_phase_cost_result> final_costs;
  std::string final_load_before, final_load_after;
  if (f.compact) {
    final_load_before = load_text();
    final_costs = final_phase_costs(base, d, f);
    final_load_after = load_text();
    write_compaction(f, compaction_pairs, final_costs, final_load_before, final_load_after, blas);
  }

  // ---- the JSON summary, in the finetune demo's shape ----
  json task = {{"task", "wordnet-lexfile"},
               {"metric", "accuracy"},
               {"higher_is_better", true},
               {"steps", f.steps},
               {"seeds", f.seeds},
               {"adapters", adapter_names(base)}};
  json results = json::array();
  for (const arm_summary* a : ordered) {
    const auto acc = test_accuracies(*a);
    json r = {{"method", std::string(method_name(a->key.kind)) + (a->key.at_adalora_ranks ? "_at_adalora_ranks" : "")}};
    r["budget"] = a->key.kind == method::full ? json() : json(a->key.budget);
    r["metric"] = "accuracy";
    r["mean"] = mean_of(acc);
    r["std"] = stddev(acc);
    double params = 0;
    for (const auto& x : a->runs) params += double(x.trainable) / double(a->runs.size());
    r["params"] = std::int64_t(std::nearbyint(params));
    r["lr"] = a->lr;
    if (a->key.kind != method::full && !(a->key.kind == method::lora && !a->key.at_adalora_ranks))
      r["difference_to_lora"] = mean_of(acc) - lora_mean(a->key.budget);
    r["values"] = acc;
    r["ranks"] = json::array();
    for (const auto& x : a->runs) r["ranks"].push_back(x.ranks);
    if (!a->grid_lrs.empty()) {
      r["grid_lrs"] = a->grid_lrs;
      r["grid_validation_accuracy"] = a->grid_validation;
    }
    results.push_back(r);
  }
  task["results"] = results;
  task["classes"] = d.classes;
  task["split"] = {{"train", d.split_sizes[0]}, {"validation", d.split_sizes[1]}, {"test", d.split_sizes[2]}};
  task["majority_class"] = d.majority_class;
  task["majority_baseline"] = d.majority_share;
  json summary = {{"tasks", json::array({task})}};
  summary["model"] = config.text();
  summary["blas"] = blas;
  summary["pretraining"] = {{"reused", pre.reused},
                            {"file", pre.file.string()},
                            {"steps", pre.steps},
                            {"masked_lm_loss", pre.final_loss},
                            {"seconds", pre.seconds},
                            {"paragraphs", d.paragraphs},
                            {"paragraphs_dropped_for_overlap", d.dropped_paragraphs},
                            {"words", d.words},
                            {"vocabulary", d.vocab.size()}};
  if (!trip.dir.empty())
    summary["peft_round_trip"] = {{"dir", trip.dir.string()},
                                  {"examples", trip.examples},
                                  {"max_abs_logit_difference", trip.max_abs_difference},
                                  {"max_abs_logit", trip.max_abs_logit},
                                  {"same_predictions", trip.same_predictions}};
  json cost_json = json::array();
  for (const auto& c : costs)
    cost_json.push_back({{"budget", c.budget},
                         {"initial_rank", c.initial_rank},
                         {"timed_steps", c.steps},
                         {"lora", phase_json(c.lora)},
                         {"lora_initial_rank", phase_json(c.lora_rinit)},
                         {"adalora", phase_json(c.adalora)},
                         {"peft_style", phase_json(c.peft_style)}});
  summary["step_cost"] = cost_json;
  if (f.compact) {
    summary["compaction"] = compaction_json(compaction_pairs, final_costs);
    summary["compaction"]["load_average_before_after"] = {final_load_before, final_load_after};
  }
  summary["load_average_before_after"] = {load_before, load_after};
  summary["seconds"] = seconds_since(start);
  write_text(out / "summary.json", summary.dump(2) + "\n");
  std::cout << format("\ntransformer: outputs in %s/ (transformer_table.md, transformer_ranks.svg, "
                      "transformer_curves.svg, transformer_step_cost.md, summary.json, "
                      "transformer_adalora_peft/%s); done in %s\n",
                      out.string().c_str(), f.compact ? ", transformer_compaction.md" : "",
                      duration_text(seconds_since(start)).c_str());
  return 0;
} catch (const std::exception& e) {
  std::cerr << "transformer: error: " << e.what() << "\n";
  return 1;
}
