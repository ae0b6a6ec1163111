// The fine-tuning demo: LoRA vs AdaLoRA at the same final total rank, with full fine-tuning as a
// reference line, on a known-answer problem (planted ranks) and on Fashion-MNIST.
//
//   bazel run --config=opt //examples/finetune -- [--task planted|fashion-mnist|all] ...
//   (run with --help for every flag)
//
// Every (method, budget) is trained with the same steps, Adam and data for each learning rate of
// a small grid and each seed; the learning rate is chosen per method and budget on the
// validation set (mean over the seeds), and the test metric of that choice is reported.
// --compact times AdaLoRA's final phase masked and compacted side by side; --growth runs the
// planted task's growth experiment (every matrix from rank 2) as a second table.

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "examples/finetune/data.hpp"
#include "examples/finetune/model.hpp"
#include "examples/finetune/svg.hpp"
#include "examples/finetune/tasks.hpp"
#include "examples/finetune/train.hpp"

namespace {

using namespace finetune;
namespace fs = std::filesystem;
using svg::format;

constexpr const char* usage = R"(usage: finetune [flags]

Fine-tunes a pre-trained network with LoRA (fixed rank r per matrix) and with AdaLoRA (the adalora
library: SVD adapters, orthogonality regularizer, rank allocator with the cubic schedule) at the
same final total rank, plus full fine-tuning as a reference; prints a table and writes pictures.

flags:
  --task NAME          planted (default): a known answer, every matrix's ideal update has a
                       planted rank; fashion-mnist: pre-train on 5 classes, fine-tune to the
                       other 5; all: both, one after the other
  --seeds N            seeds per (method, budget, learning rate) (default 3)
  --budgets LIST       ranks per matrix, comma-separated, each in 1..7
                       (default 1,2,4 for planted, 2,4 for fashion-mnist)
  --steps N            optimizer steps per run (default 1200 planted, 600 fashion-mnist)
  --out DIR            output folder (default out/finetune): <task>_ranks.svg, <task>_curves.svg,
                       <task>_rank_history.csv, <task>_table.md, summary.json
  --summary-json PATH  where to write the JSON summary (default DIR/summary.json)
  --threads N          runs trained in parallel (default: the number of CPUs)
  --data-dir DIR       Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)
  --pretrain-steps N   fashion-mnist pre-training steps (default 300)
  --ablations          also train, per budget, AdaLoRA's SVD form at a fixed rank (no pruning)
                       and LoRA at the ranks AdaLoRA kept: which part of AdaLoRA helps?
  --orth-weight W      AdaLoRA's orthogonality regularizer weight (default 0.1; 0: off)
  --compact            also train, per budget and seed at AdaLoRA's chosen learning rate,
                       AdaLoRA with its adapters compacted to the kept triplets once the
                       pattern is final, side by side with the masked run: the time per step
                       of the final phase and the test loss of both (<task>_compaction.md)
  --growth             planted task: also the growth experiment, every matrix starting at rank
                       --grow-from, below the planted 8 and 6: LoRA, AdaLoRA from that rank,
                       AdaLoRA from 8, and growing AdaLoRA (a rank_redistributor moves rank at
                       a constant total, or adds it on a rising one) at each budget of 2, 3
                       (or of --budgets) (planted_growth_*)
  --grow-from R        growth: the initial rank per matrix (default 2)
  --grow-interval N    growth: steps between moves of rank (default 10)
  --grow-moves N       growth: triplets dropped and added per move (default 2)
  --help               this text

Exit status: 0 on success, 1 on a runtime error (e.g. missing data), 2 on a bad flag.
)";

/// A command-line mistake: reported with the usage hint and exit status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct flags {
  std::string task = "planted";
  int seeds = 3;
  std::vector<int> budgets;  // empty: the task's default
  std::int64_t steps = 0;    // 0: the task's default
  std::string out = "out/finetune";
  std::string summary_json;  // empty: <out>/summary.json
  int threads = 0;           // 0: hardware_concurrency
  std::string data_dir = fashion_mnist_default_dir;
  std::int64_t pretrain_steps = 300;
  bool ablations = false;
  double orth_weight = 0.1;
  bool compact = false;
  bool growth = false;
  int grow_from = 2;
  std::int64_t grow_interval = 10;
  int grow_moves = 2;
};

/// A non-negative finite number, the whole string.
double parse_weight(const std::string& flag, const std::string& text) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || ptr != end || !std::isfinite(v) || v < 0)
    throw usage_error(flag + " expects a number >= 0, got '" + text + "'");
  return v;
}

/// A positive integer, the whole string, in [1, max].
std::int64_t parse_positive(const std::string& flag, const std::string& text, std::int64_t max) {
  std::int64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || ptr != end || v < 1 || v > max)
    throw usage_error(flag + " expects an integer in 1.." + std::to_string(max) + ", got '" + text +
                      "'");
  return v;
}

flags parse_flags(int argc, char** argv) {
  flags f;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    if (const auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "--help" || arg == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    const auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--task") {
      f.task = next();
      if (f.task != "planted" && f.task != "fashion-mnist" && f.task != "all")
        throw usage_error("--task must be planted, fashion-mnist or all, got '" + f.task + "'");
    } else if (arg == "--seeds") {
      f.seeds = static_cast<int>(parse_positive(arg, next(), 100));
    } else if (arg == "--budgets") {
      const std::string list = next();
      std::stringstream in(list);
      std::string item;
      f.budgets.clear();
      while (std::getline(in, item, ',')) {
        const int b = static_cast<int>(parse_positive("--budgets", item, 7));
        if (std::find(f.budgets.begin(), f.budgets.end(), b) != f.budgets.end())
          throw usage_error("--budgets lists " + item + " twice");
        f.budgets.push_back(b);
      }
      if (f.budgets.empty() || list.back() == ',')
        throw usage_error("--budgets expects a comma-separated list such as 1,2,4, got '" + list +
                          "'");
    } else if (arg == "--steps") {
      f.steps = parse_positive(arg, next(), 10'000'000);
    } else if (arg == "--out") {
      f.out = next();
      if (f.out.empty()) throw usage_error("--out needs a folder name");
    } else if (arg == "--summary-json") {
      f.summary_json = next();
      if (f.summary_json.empty()) throw usage_error("--summary-json needs a file name");
    } else if (arg == "--threads") {
      f.threads = static_cast<int>(parse_positive(arg, next(), 256));
    } else if (arg == "--data-dir") {
      f.data_dir = next();
    } else if (arg == "--ablations") {
      if (has_value) throw usage_error("--ablations takes no value");
      f.ablations = true;
    } else if (arg == "--orth-weight") {
      f.orth_weight = parse_weight(arg, next());
    } else if (arg == "--compact" || arg == "--growth") {
      if (has_value) throw usage_error(arg + " takes no value");
      (arg == "--compact" ? f.compact : f.growth) = true;
    } else if (arg == "--grow-from") {
      f.grow_from = static_cast<int>(parse_positive(arg, next(), 7));
    } else if (arg == "--grow-interval") {
      f.grow_interval = parse_positive(arg, next(), 1'000'000);
    } else if (arg == "--grow-moves") {
      f.grow_moves = static_cast<int>(parse_positive(arg, next(), 100));
    } else if (arg == "--pretrain-steps") {
      f.pretrain_steps = parse_positive(arg, next(), 10'000'000);
    } else {
      throw usage_error("unknown flag '" + std::string(argv[i]) + "'");
    }
  }
  if (f.growth && f.task == "fashion-mnist")
    throw usage_error("--growth is an experiment on the planted task; use --task planted or all");
  return f;
}

/// `bazel run` starts the binary in its runfiles tree; relative paths mean the user's folder.
fs::path user_path(const std::string& p) {
  const fs::path path(p);
  if (path.is_absolute()) return path;
  if (const char* wd = std::getenv("BUILD_WORKING_DIRECTORY")) return fs::path(wd) / path;
  return path;
}

void write_file(const fs::path& p, const std::string& content) {
  std::ofstream out(p, std::ios::binary);
  out << content;
  if (!out) throw std::runtime_error("cannot write " + p.string());
}

// ---- the JSON summary ---------------------------------------------------------------------------

/// The summary keeps its keys in the order they are set.
using json_value = nlohmann::ordered_json;

/// Whether an object is among j's items, or their items, at any depth.
bool holds_object(const json_value& j) {
  return std::any_of(j.begin(), j.end(), [](const json_value& item) {
    return item.is_object() || (item.is_array() && holds_object(item));
  });
}

/// The summary as text, laid out for reading and diffing: an object or array that holds an
/// object spreads over lines indented by two spaces a level; any other is written on one line
/// with ", " and ": " between its items (one line per result). Numbers that are not integers are
/// written to 6 significant digits (printf's %g), non-finite ones as null (JSON has neither NaN
/// nor infinity); everything else as nlohmann::json writes it.
std::string summary_text(const json_value& j, int indent = 0) {
  if (j.is_number_float()) {
    const double x = j.get<double>();
    return std::isfinite(x) ? format("%.6g", x) : "null";
  }
  if (!j.is_structured()) return j.dump();
  const bool spread = holds_object(j);
  const std::string inner = "\n" + std::string(static_cast<std::size_t>(indent + 2), ' ');
  std::string s(1, j.is_object() ? '{' : '[');
  for (auto item = j.begin(); item != j.end(); ++item) {
    if (item != j.begin()) s += spread ? "," : ", ";
    if (spread) s += inner;
    if (j.is_object()) s += json_value(item.key()).dump() + ": ";
    s += summary_text(item.value(), indent + 2);
  }
  if (spread) s += "\n" + std::string(static_cast<std::size_t>(indent), ' ');
  return s + (j.is_object() ? '}' : ']');
}

// ---- statistics -------------------------------------------------------------------------------

double mean(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

/// Sample standard deviation (n − 1); 0 for a single value.
double stddev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean(v);
  double s = 0;
  for (const double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

/// Ranks (1-based, ties averaged) of the values.
std::vector<double> fractional_ranks(const std::vector<double>& v) {
  std::vector<std::size_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < idx.size();) {
    std::size_t j = i;
    while (j + 1 < idx.size() && v[idx[j + 1]] == v[idx[i]]) ++j;
    for (std::size_t k = i; k <= j; ++k) r[idx[k]] = (static_cast<double>(i + j) / 2.0) + 1.0;
    i = j + 1;
  }
  return r;
}

/// Spearman's rank correlation (Pearson's on the fractional ranks); NaN if either is constant.
double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  const std::vector<double> ra = fractional_ranks(a), rb = fractional_ranks(b);
  const double ma = mean(ra), mb = mean(rb);
  double sab = 0, saa = 0, sbb = 0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    sab += (ra[i] - ma) * (rb[i] - mb);
    saa += (ra[i] - ma) * (ra[i] - ma);
    sbb += (rb[i] - mb) * (rb[i] - mb);
  }
  return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : std::nan("");
}

// ---- running the grid -------------------------------------------------------------------------

/// A row of the table: a method at a budget. `adalora_ranks` is the ablation "LoRA at the ranks
/// AdaLoRA kept" (per seed, from AdaLoRA's run at the same budget and seed).
struct arm {
  method kind = method::lora;
  int budget = 0;  // rank per matrix (final, on average); 0 for full fine-tuning
  bool adalora_ranks = false;
  int initial_rank = 0;  // AdaLoRA and growth: every matrix's rank at the start; 0: the task's

  std::string label() const {
    if (adalora_ranks) return "LoRA at AdaLoRA's ranks";
    switch (kind) {
      case method::full: return "full";
      case method::lora: return "LoRA";
      case method::svd: return "SVD form, no pruning";
      case method::growth:
        return format("growing AdaLoRA from rank %d", initial_rank) +
               (budget > initial_rank ? ", rising total" : "");
      default: return initial_rank > 0 ? format("AdaLoRA from rank %d", initial_rank) : "AdaLoRA";
    }
  }
  /// The JSON name.
  std::string name() const {
    if (adalora_ranks) return "lora_adalora_ranks";
    switch (kind) {
      case method::full: return "full";
      case method::lora: return "lora";
      case method::svd: return "svd_fixed_rank";
      case method::growth: return "adalora_growth";
      default: return "adalora";
    }
  }
  /// Table order: by budget, LoRA first, then AdaLoRA (by initial rank), growth, the ablations;
  /// full fine-tuning last.
  std::tuple<int, int, int> order() const {
    const int within = adalora_ranks              ? 4
                       : kind == method::lora     ? 0
                       : kind == method::adalora  ? 1
                       : kind == method::growth   ? 2
                                                  : 3;
    return kind == method::full ? std::tuple{1 << 20, 0, 0}
                                : std::tuple{budget, within, initial_rank};
  }
  bool same(const arm& o) const {
    return kind == o.kind && budget == o.budget && adalora_ranks == o.adalora_ranks &&
           initial_rank == o.initial_rank;
  }
};

/// One arm after choosing its learning rate.
struct arm_summary {
  arm a;
  double lr = 0;
  std::vector<const run_result*> runs;     // the chosen learning rate, one per seed
  std::vector<double> metric;              // test metric per seed
  std::vector<double> test_loss;           // test loss per seed
  std::vector<double> mean_ranks;          // per matrix, over seeds
  double params = 0;                       // mean over seeds
  double ratio = std::nan("");             // mean metric / plain LoRA's at the same budget
  double difference = std::nan("");        // mean metric − plain LoRA's
  double rank_correlation = std::nan("");  // AdaLoRA, planted: Spearman vs planted, hidden layers
};

std::string ranks_text(const std::vector<double>& r) {
  std::string s;
  for (const double x : r) {
    if (!s.empty()) s += ' ';
    s += std::abs(x - std::round(x)) < 1e-9 ? format("%.0f", x) : format("%.1f", x);
  }
  return s;
}

std::string ranks_text(const std::vector<int>& r) {
  return ranks_text(std::vector<double>(r.begin(), r.end()));
}

/// The median of the values (0 for none).
double median(std::vector<double> v) {
  if (v.empty()) return 0;
  const std::size_t h = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h), v.end());
  if (v.size() % 2 == 1) return v[h];
  return (v[h] + *std::max_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h))) / 2;
}

/// --compact: AdaLoRA at one budget, each seed trained masked and compacted side by side.
struct compaction_row {
  int budget = 0;
  double lr = 0;
  std::vector<double> loss_masked, loss_compacted;   // test metric per seed
  std::vector<double> step_masked, step_compacted;   // median final-phase step, ms, per seed
  std::vector<double> own_masked, own_compacted;     // the adapters' own part of it
  std::vector<double> kept_fraction;                 // of the adapters' products, per seed
  std::vector<std::vector<int>> ranks;               // compacted ranks, per seed
};

class task_runner {
 public:
  /// `name` names the output files; `growth`: the growth experiment's arms instead of the main
  /// table's.
  task_runner(const task& t, const flags& f, std::vector<int> budgets, std::int64_t steps,
              std::string name, bool growth = false)
      : t_(t), f_(f), budgets_(std::move(budgets)), steps_(steps), name_(std::move(name)),
        growth_(growth) {}

  /// Trains every arm at every learning rate of its grid and every seed, on a pool of threads,
  /// and picks each arm's learning rate. With ablations, a second round trains LoRA at the
  /// ranks AdaLoRA kept.
  void run() {
    std::vector<arm> first, second;
    if (growth_) {
      // Every matrix starts at --grow-from: AdaLoRA can only keep it, growth can move it. AdaLoRA
      // from the task's usual rank (8) is the reference that could reach the planted ranks.
      for (const int b : budgets_) {
        first.push_back({method::growth, b, false, f_.grow_from});
        first.push_back({method::adalora, b, false, t_.ada.initial_rank});
        first.push_back({method::adalora, b, false, b});
        first.push_back({method::lora, b});
      }
    } else {
      // The slowest runs (the SVD form) first, so that the pool ends together.
      for (const int b : budgets_) first.push_back({method::adalora, b});
      if (f_.ablations)
        for (const int b : budgets_) first.push_back({method::svd, b});
      first.push_back({method::full, 0});
      for (const int b : budgets_) first.push_back({method::lora, b});
      if (f_.ablations)
        for (const int b : budgets_) second.push_back({method::lora, b, true});
    }
    total_ = jobs_of(first) + jobs_of(second);
    train(first);
    train(second);  // needs AdaLoRA's kept ranks from the first round
    std::stable_sort(
        summaries_.begin(), summaries_.end(),
        [](const arm_summary& x, const arm_summary& y) { return x.a.order() < y.a.order(); });
    for (arm_summary& c : summaries_) compare(c);
    if (f_.compact && !growth_) compaction_study();
  }

  /// The table, as Markdown (what the README shows) and for the terminal.
  std::string table() const {
    const bool planted = !t_.planted.empty();
    std::string s = "| method | budget (rank/matrix) | trainable params | lr | " +
                    std::string(planted ? "test loss (MSE / pre-trained MSE)" : "test accuracy") +
                    " | vs LoRA | ranks per matrix (" + matrix_names() + ") |\n";
    s += "|---|---|---|---|---|---|---|\n";
    for (const arm_summary& c : summaries_) {
      const bool full = c.a.kind == method::full;
      s += "| " + c.a.label() + " | " + (full ? std::string("-") : std::to_string(c.a.budget)) +
           " | " + format("%.0f", c.params) + " | " + format("%.0e", c.lr) + " | " +
           format("%.4f ± %.4f", mean(c.metric), stddev(c.metric)) + " | " + vs_lora(c) + " | " +
           (full ? std::string("dense") : ranks_text(c.mean_ranks)) + " |\n";
    }
    if (planted) s += "| planted | | | | | | " + ranks_text(t_.planted) + " |\n";
    return s;
  }

  std::string notes() const {
    std::string s = format(
        "%s: %d seed(s), %lld steps, batch %ld, Adam; learning rate per method "
        "and budget chosen on the validation set from {",
        name_.c_str(), f_.seeds, static_cast<long long>(steps_), static_cast<long>(t_.batch));
    for (std::size_t i = 0; i < t_.lr_grid_adapters.size(); ++i)
      s += (i ? ", " : "") + format("%.0e", t_.lr_grid_adapters[i]);
    if (growth_) {
      s += format(
          "}. Growth: a rank_redistributor every %lld steps moves %d triplet(s) (drops the "
          "weakest, adds where the weakest kept triplet scores highest; E = 0 for new ones) "
          "between steps %lld and %lld, at a constant total (budget = initial rank) or adding "
          "the rank a rising total asks for. Orthogonality weight %g. Ranks are means over "
          "seeds.\n",
          static_cast<long long>(f_.grow_interval), f_.grow_moves,
          static_cast<long long>(frac(t_.ada.tinit)),
          static_cast<long long>(steps_ - frac(t_.ada.tfinal)), f_.orth_weight);
    } else {
      s += "} (full: {";
      for (std::size_t i = 0; i < t_.lr_grid_full.size(); ++i)
        s += (i ? ", " : "") + format("%.0e", t_.lr_grid_full[i]);
      s += format("}). AdaLoRA starts at rank %d per matrix; ranks are means over seeds.\n",
                  t_.ada.initial_rank);
      if (f_.orth_weight != adalora_options{}.orth_weight)
        s += format("orthogonality regularizer weight %g\n", f_.orth_weight);
    }
    if (!t_.planted.empty()) {
      for (const arm_summary& c : summaries_)
        if (!std::isnan(c.rank_correlation))
          s += format(
              "budget %d: %s's kept ranks vs the planted ones on the hidden layers: "
              "Spearman %.2f\n",
              c.a.budget, c.a.label().c_str(), c.rank_correlation);
    } else {
      s += format("pre-trained model: %.4f accuracy on its own 5 classes, 0 on the new ones\n",
                  t_.pretrained_accuracy);
    }
    return s;
  }

  /// --compact: the final phase's time per step (medians over its steps, means over seeds) and
  /// the test metric, masked and compacted; empty without --compact.
  std::string compaction_table() const {
    if (compaction_.empty()) return "";
    const bool planted = !t_.planted.empty();
    std::string s = format(
        "%s, compaction: AdaLoRA masked vs compacted at its chosen lr, %d seed(s) side by side "
        "(one step each in turn, one thread); orthogonality weight %g. Time per step in the "
        "final phase after the pattern is final (ms, median over its steps, mean over seeds): "
        "all of the step, and the adapters' own part (their forward and backward, regularizer, "
        "Adam, allocator); kept cost = Σ kept·(in+out) / Σ initial·(in+out).\n\n",
        t_.name.c_str(), f_.seeds, f_.orth_weight);
    s += "| budget | kept cost | step, masked | step, compacted | ratio | adapters, masked | "
         "adapters, compacted | ratio | " +
         std::string(planted ? "test loss" : "test accuracy") +
         ", masked | compacted | compacted − masked (per seed) | largest relative difference "
         "| compacted ranks |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const compaction_row& r : compaction_) {
      std::vector<double> diff;
      for (std::size_t i = 0; i < r.loss_masked.size(); ++i)
        diff.push_back(r.loss_compacted[i] - r.loss_masked[i]);
      std::vector<double> mean_ranks(r.ranks.front().size(), 0.0);
      for (const auto& ranks : r.ranks)
        for (std::size_t l = 0; l < ranks.size(); ++l)
          mean_ranks[l] += ranks[l] / static_cast<double>(r.ranks.size());
      s += format("| %d | %.3f | %.4f | %.4f | %.2f | %.4f | %.4f | %.2f | %.4f ± %.4f | "
                  "%.4f ± %.4f | %+.1e ± %.1e | %.1e | %s |\n",
                  r.budget, mean(r.kept_fraction), mean(r.step_masked), mean(r.step_compacted),
                  mean(r.step_compacted) / mean(r.step_masked), mean(r.own_masked),
                  mean(r.own_compacted), mean(r.own_compacted) / mean(r.own_masked),
                  mean(r.loss_masked), stddev(r.loss_masked), mean(r.loss_compacted),
                  stddev(r.loss_compacted), mean(diff), stddev(diff), largest_difference(r),
                  ranks_text(mean_ranks).c_str());
    }
    double largest = 0;
    for (const compaction_row& r : compaction_) largest = std::max(largest, largest_difference(r));
    s += format("\ncompaction: largest relative test-%s difference %.3e\n",
                planted ? "loss" : "accuracy", largest);
    return s;
  }

  void write_outputs(const fs::path& dir) const {
    fs::create_directories(dir);
    write_file(dir / (name_ + "_table.md"), notes() + "\n" + table());
    write_file(dir / (name_ + "_rank_history.csv"), rank_history_csv());
    write_file(dir / (name_ + "_ranks.svg"), ranks_svg());
    write_file(dir / (name_ + "_curves.svg"), curves_svg());
    if (!compaction_.empty()) write_file(dir / (name_ + "_compaction.md"), compaction_table());
  }

  /// This task's entry of the JSON summary.
  json_value json() const {
    json_value task = {{"task", name_},
                       {"metric", t_.metric},
                       {"higher_is_better", t_.higher_is_better},
                       {"steps", steps_},
                       {"seeds", f_.seeds},
                       {"orth_weight", f_.orth_weight},
                       {"adapters", json_value::array()}};
    for (const linear& L : t_.base.layers) task["adapters"].push_back(L.name);
    if (!t_.planted.empty()) task["planted_ranks"] = t_.planted;
    if (growth_)
      task["growth"] = {{"initial_rank", f_.grow_from},
                        {"interval", f_.grow_interval},
                        {"moves", f_.grow_moves}};
    json_value& results = task["results"] = json_value::array();
    for (const arm_summary& c : summaries_) {
      json_value r = {{"method", c.a.name()}};
      r["budget"] = c.a.kind == method::full ? json_value() : json_value(c.a.budget);
      if (c.a.initial_rank > 0) r["initial_rank"] = c.a.initial_rank;
      r["metric"] = t_.metric;
      r["mean"] = mean(c.metric);
      r["std"] = stddev(c.metric);
      // A mean over seeds of whole counts, rounded to one (half to even, as printf's %.0f).
      r["params"] = static_cast<std::int64_t>(std::nearbyint(c.params));
      r["lr"] = c.lr;
      r["test_loss_mean"] = mean(c.test_loss);
      r["test_loss_std"] = stddev(c.test_loss);
      if (!std::isnan(c.ratio)) {
        r["ratio_to_lora"] = c.ratio;
        r["difference_to_lora"] = c.difference;
      }
      if (!std::isnan(c.rank_correlation)) r["rank_spearman_hidden"] = c.rank_correlation;
      r["values"] = c.metric;
      r["ranks"] = json_value::array();
      for (const run_result* run : c.runs) r["ranks"].push_back(run->ranks);
      results.push_back(std::move(r));
    }
    if (!compaction_.empty()) {
      json_value& rows = task["compaction"] = json_value::array();
      for (const compaction_row& c : compaction_)
        rows.push_back({{"budget", c.budget},
                        {"lr", c.lr},
                        {"kept_cost_fraction", c.kept_fraction},
                        {"step_ms_masked", c.step_masked},
                        {"step_ms_compacted", c.step_compacted},
                        {"adapter_ms_masked", c.own_masked},
                        {"adapter_ms_compacted", c.own_compacted},
                        {"metric_masked", c.loss_masked},
                        {"metric_compacted", c.loss_compacted},
                        {"largest_relative_difference", largest_difference(c)},
                        {"ranks_compacted", c.ranks}});
    }
    return task;
  }

 private:
  std::int64_t frac(double f) const { return static_cast<std::int64_t>(f * double(steps_)); }

  std::string matrix_names() const {
    std::string s;
    for (const linear& L : t_.base.layers) s += (s.empty() ? "" : " ") + L.name;
    return s;
  }

  /// Against plain LoRA at the same budget: the loss ratio, or the accuracy difference.
  std::string vs_lora(const arm_summary& c) const {
    if (std::isnan(c.ratio)) return "";
    if (!t_.higher_is_better) return format("%.2f×", c.ratio);
    return format("%+.1f points", 100 * c.difference);
  }

  const arm_summary* find(const arm& a) const {
    for (const arm_summary& c : summaries_)
      if (c.a.same(a)) return &c;
    return nullptr;
  }

  run_config config_of(const arm& a, double lr, int seed) const {
    run_config c;
    c.kind = a.kind;
    c.budget = a.budget;
    c.lr = lr;
    c.seed = static_cast<std::uint64_t>(seed);
    c.steps = steps_;
    c.batch = t_.batch;
    c.curve_points = t_.curve_points;
    c.ada = t_.ada;
    c.ada.orth_weight = f_.orth_weight;
    if (a.initial_rank > 0) c.ada.initial_rank = a.initial_rank;
    c.growth.interval = f_.grow_interval;
    c.growth.moves = f_.grow_moves;
    return c;
  }

  /// Trains the arms (every learning rate and seed) and appends their summaries.
  void train(const std::vector<arm>& arms) {
    std::vector<run_config> jobs;
    std::vector<std::size_t> arm_of;
    for (std::size_t k = 0; k < arms.size(); ++k) {
      const arm& a = arms[k];
      const arm_summary* adalora = a.adalora_ranks ? find({method::adalora, a.budget}) : nullptr;
      for (const double lr : a.kind == method::full ? t_.lr_grid_full : t_.lr_grid_adapters)
        for (int s = 0; s < f_.seeds; ++s) {
          run_config c = config_of(a, lr, s);
          if (adalora != nullptr) c.layer_ranks = adalora->runs[static_cast<std::size_t>(s)]->ranks;
          jobs.push_back(std::move(c));
          arm_of.push_back(k);
        }
    }

    std::vector<run_result> results(jobs.size());
    std::atomic<std::size_t> next{0};
    std::mutex print;
    const auto worker = [&] {
      for (std::size_t i; (i = next++) < jobs.size();) {
        results[i] = train_run(t_.base, t_.data, t_.loss, jobs[i]);
        const run_result& r = results[i];
        const arm& a = arms[arm_of[i]];
        const std::lock_guard<std::mutex> lock(print);
        std::cerr << format("[%s %3zu/%zu] %s%s, lr %.0e, seed %d: validation %s %.4f",
                            name_.c_str(), ++done_, total_, a.label().c_str(),
                            a.kind == method::full ? "" : format(", budget %d", a.budget).c_str(),
                            r.config.lr, static_cast<int>(r.config.seed),
                            t_.higher_is_better ? "accuracy" : "loss",
                            t_.higher_is_better ? r.validation.accuracy : r.validation.loss);
        if (a.kind != method::full) std::cerr << ", ranks " << ranks_text(r.ranks);
        std::cerr << format(" (%.1f s)\n", r.seconds);
      }
    };
    const unsigned n_threads = f_.threads > 0 ? static_cast<unsigned>(f_.threads)
                                              : std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::thread> pool;
    for (unsigned k = 0; k < std::min<std::size_t>(n_threads, jobs.size()); ++k)
      pool.emplace_back(worker);
    for (std::thread& th : pool) th.join();

    // Keep the results (a deque: earlier summaries point into it) and summarise each arm.
    const std::size_t base = results_.size();
    for (run_result& r : results) results_.push_back(std::move(r));
    for (std::size_t k = 0; k < arms.size(); ++k) {
      std::vector<const run_result*> runs;
      for (std::size_t i = 0; i < jobs.size(); ++i)
        if (arm_of[i] == k) runs.push_back(&results_[base + i]);
      summaries_.push_back(summarize(arms[k], runs));
    }
  }

  /// How many runs the arms take (for the progress counter).
  std::size_t jobs_of(const std::vector<arm>& arms) const {
    std::size_t n = 0;
    for (const arm& a : arms)
      n += (a.kind == method::full ? t_.lr_grid_full : t_.lr_grid_adapters).size() *
           static_cast<std::size_t>(f_.seeds);
    return n;
  }

  /// Picks the arm's learning rate on the validation set (mean over seeds) and collects the
  /// test numbers of that choice.
  arm_summary summarize(const arm& a, const std::vector<const run_result*>& runs) const {
    std::map<double, std::vector<const run_result*>> by_lr;
    for (const run_result* r : runs) by_lr[r->config.lr].push_back(r);
    arm_summary c;
    c.a = a;
    double best = 0;
    for (const auto& [lr, group] : by_lr) {
      std::vector<double> v;
      for (const run_result* r : group)
        v.push_back(t_.higher_is_better ? r->validation.accuracy : r->validation.loss);
      const double score = t_.higher_is_better ? -mean(v) : mean(v);
      if (c.runs.empty() || score < best) {
        best = score;
        c.lr = lr;
        c.runs = group;
      }
    }
    for (const run_result* r : c.runs) {
      c.metric.push_back(t_.higher_is_better ? r->test.accuracy : r->test.loss);
      c.test_loss.push_back(r->test.loss);
      c.params += static_cast<double>(r->params) / static_cast<double>(c.runs.size());
    }
    c.mean_ranks.assign(c.runs.front()->ranks.size(), 0.0);
    for (const run_result* r : c.runs)
      for (std::size_t l = 0; l < r->ranks.size(); ++l)
        c.mean_ranks[l] += r->ranks[l] / static_cast<double>(c.runs.size());
    if (allocated(a.kind) && !t_.planted.empty()) {
      std::vector<double> planted, kept;
      for (const int l : t_.judged) {
        planted.push_back(t_.planted[static_cast<std::size_t>(l)]);
        kept.push_back(c.mean_ranks[static_cast<std::size_t>(l)]);
      }
      c.rank_correlation = spearman(planted, kept);
    }
    return c;
  }

  /// Fills the comparison with plain LoRA at the same budget.
  void compare(arm_summary& c) const {
    if (c.a.kind == method::full || (c.a.kind == method::lora && !c.a.adalora_ranks)) return;
    if (const arm_summary* lora = find({method::lora, c.a.budget})) {
      c.ratio = mean(c.metric) / mean(lora->metric);
      c.difference = mean(c.metric) - mean(lora->metric);
    }
  }

  /// --compact: per budget and seed, AdaLoRA at its chosen learning rate trained twice in
  /// lockstep (a step of one, a step of the other, on this thread alone), masked and compacted,
  /// so that both see the same machine load when their final-phase steps are timed.
  void compaction_study() {
    for (const int b : budgets_) {
      const arm_summary* c = find({method::adalora, b});
      if (c == nullptr) continue;
      compaction_row row;
      row.budget = b;
      row.lr = c->lr;
      for (int s = 0; s < f_.seeds; ++s) {
        run_config masked = config_of(c->a, c->lr, s), compacted = masked;
        compacted.compact = true;
        trainer m(t_.base, t_.data, t_.loss, masked), k(t_.base, t_.data, t_.loss, compacted);
        while (!m.done()) {
          m.step();
          k.step();
        }
        const run_result rm = m.finish(), rk = k.finish();
        const auto metric = [&](const run_result& r) {
          return t_.higher_is_better ? r.test.accuracy : r.test.loss;
        };
        const auto ms = [](const std::vector<double>& seconds) { return 1e3 * median(seconds); };
        row.loss_masked.push_back(metric(rm));
        row.loss_compacted.push_back(metric(rk));
        row.step_masked.push_back(ms(rm.step_seconds));
        row.step_compacted.push_back(ms(rk.step_seconds));
        row.own_masked.push_back(ms(rm.adapter_step_seconds));
        row.own_compacted.push_back(ms(rk.adapter_step_seconds));
        row.kept_fraction.push_back(rk.kept_cost_fraction);
        row.ranks.push_back(rk.ranks);
        std::cerr << format(
            "[%s compaction] budget %d, seed %d: final phase from step %lld, %zu steps timed; "
            "step %.4f ms masked, %.4f ms compacted; test %.6g vs %.6g\n",
            name_.c_str(), b, s, static_cast<long long>(rk.final_from), rk.step_seconds.size(),
            row.step_masked.back(), row.step_compacted.back(), row.loss_masked.back(),
            row.loss_compacted.back());
      }
      compaction_.push_back(std::move(row));
    }
  }

  static double largest_difference(const compaction_row& r) {
    double d = 0;
    for (std::size_t i = 0; i < r.loss_masked.size(); ++i)
      d = std::max(d, std::abs(r.loss_compacted[i] - r.loss_masked[i]) /
                          std::max(std::abs(r.loss_masked[i]), 1e-30));
    return d;
  }

  std::string rank_history_csv() const {
    std::string s = "method,budget,seed,step,adapter,kept\n";
    for (const arm_summary& c : summaries_) {
      if (!allocated(c.a.kind)) continue;
      const std::string method = c.a.name() + (c.a.initial_rank > 0
                                                   ? format("_from_%d", c.a.initial_rank)
                                                   : std::string());
      for (const run_result* r : c.runs)
        for (const rank_event& e : r->rank_history)
          for (std::size_t l = 0; l < e.kept.size(); ++l)
            s += format("%s,%d,%d,%lld,%s,%d\n", method.c_str(), c.a.budget,
                        static_cast<int>(r->config.seed), static_cast<long long>(e.step),
                        t_.base.layers[l].name.c_str(), e.kept[l]);
    }
    return s;
  }

  std::string ranks_svg() const {
    std::vector<std::string> columns;
    for (const linear& L : t_.base.layers)
      columns.push_back(L.name +
                        format(" %ld×%ld", static_cast<long>(L.out()), static_cast<long>(L.in())));
    std::vector<svg::heat_row> rows;
    double top = t_.ada.initial_rank;
    if (!t_.planted.empty())
      rows.push_back({"planted", std::vector<double>(t_.planted.begin(), t_.planted.end())});
    for (const arm_summary& c : summaries_)
      if (allocated(c.a.kind)) {
        rows.push_back({format("%s, budget %d (%zu in all)", c.a.label().c_str(), c.a.budget,
                               static_cast<std::size_t>(c.a.budget) * t_.base.layers.size()),
                        c.mean_ranks});
        top = std::max(top, *std::max_element(c.mean_ranks.begin(), c.mean_ranks.end()));
      }
    if (growth_)
      return svg::rank_heatmap(
          t_.name + format(", growth from rank %d: final rank of each adapted matrix", f_.grow_from),
          format("every matrix starts at rank %d (AdaLoRA from rank %d: the reference), mean of "
                 "%d seed(s); LoRA keeps its rank everywhere",
                 f_.grow_from, t_.ada.initial_rank, f_.seeds),
          columns, rows, top);
    return svg::rank_heatmap(
        t_.name + ": final rank of each adapted matrix",
        format(
            "AdaLoRA from rank %d per matrix, mean of %d seed(s); LoRA keeps its rank everywhere",
            t_.ada.initial_rank, f_.seeds),
        columns, rows, t_.ada.initial_rank);
  }

  std::string curves_svg() const {
    const auto mean_curve = [](const arm_summary& c) {
      std::vector<std::pair<double, double>> pts;
      for (std::size_t i = 0; i < c.runs.front()->curve.size(); ++i) {
        double y = 0;
        for (const run_result* r : c.runs)
          y += r->curve[i].validation.loss / static_cast<double>(c.runs.size());
        pts.emplace_back(static_cast<double>(c.runs.front()->curve[i].step), y);
      }
      return pts;
    };
    const arm_summary* full = find({method::full, 0});
    std::vector<svg::panel> panels;
    for (const int b : budgets_) {
      svg::panel p;
      p.title = format("rank %d per matrix", b);
      if (const arm_summary* c = find({method::lora, b}))
        p.lines.push_back({"LoRA", "#1f77b4", "", mean_curve(*c)});
      if (growth_) {
        if (const arm_summary* c = find({method::adalora, b, false, b}))
          p.lines.push_back({c->a.label(), "#ff7f0e", "", mean_curve(*c)});
        if (const arm_summary* c = find({method::adalora, b, false, t_.ada.initial_rank}))
          p.lines.push_back({c->a.label(), "#d62728", "6,4", mean_curve(*c)});
        if (const arm_summary* c = find({method::growth, b, false, f_.grow_from}))
          p.lines.push_back({c->a.label(), "#2ca02c", "", mean_curve(*c)});
      } else if (const arm_summary* c = find({method::adalora, b})) {
        p.lines.push_back({"AdaLoRA", "#d62728", "", mean_curve(*c)});
      }
      if (full != nullptr)
        p.lines.push_back({"full fine-tuning", "#777", "6,4", mean_curve(*full)});
      p.markers = {static_cast<double>(frac(t_.ada.tinit)),
                   static_cast<double>(steps_) - static_cast<double>(frac(t_.ada.tfinal))};
      panels.push_back(std::move(p));
    }
    return svg::line_chart(
        t_.name + (growth_ ? ", growth" : "") +
            (t_.planted.empty() ? ": validation loss (cross-entropy), mean over seeds"
                                : ": validation loss (MSE / pre-trained MSE), mean over seeds"),
        growth_ ? "step (dotted: where rank moves, or AdaLoRA prunes)"
                : "step (dotted: AdaLoRA's pruning phase)",
        "loss", panels);
  }

  const task& t_;
  const flags& f_;
  std::vector<int> budgets_;
  std::int64_t steps_;
  std::string name_;
  bool growth_;
  std::deque<run_result> results_;
  std::vector<arm_summary> summaries_;
  std::vector<compaction_row> compaction_;
  std::size_t done_ = 0;   // runs finished, for the progress lines
  std::size_t total_ = 0;  // runs in all rounds
};

int run(const flags& f) {
  const auto start = std::chrono::steady_clock::now();
  const fs::path out = user_path(f.out);
  const fs::path summary =
      f.summary_json.empty() ? out / "summary.json" : user_path(f.summary_json);
  std::vector<std::string> names;
  if (f.task == "planted" || f.task == "all") names.push_back("planted");
  if (f.task == "fashion-mnist" || f.task == "all") names.push_back("fashion-mnist");

  json_value json = {{"tasks", json_value::array()}};
  for (const std::string& name : names) {
    const auto task_start = std::chrono::steady_clock::now();
    task t;
    std::vector<int> budgets = f.budgets;
    if (name == "planted") {
      t = make_planted_task();
      if (budgets.empty()) budgets = {1, 2, 4};
      std::cerr << "planted: pre-trained tanh network " << t.base.layers.front().in();
      for (const linear& L : t.base.layers) std::cerr << "-" << L.out();
      std::cerr << "; the fine-tuning target adds updates of rank";
      for (const int r : t.planted) std::cerr << " " << r;
      std::cerr << " to its " << t.planted.size() << " matrices\n";
    } else {
      fashion_options fo;
      fo.data_dir = f.data_dir;
      fo.pretrain_steps = f.pretrain_steps;
      t = make_fashion_task(fo, std::cerr);
      if (budgets.empty()) budgets = {2, 4};
    }
    const std::int64_t steps = f.steps > 0 ? f.steps : t.default_steps;
    task_runner runner(t, f, budgets, steps, t.name);
    runner.run();
    std::cout << "\n" << runner.notes() << "\n" << runner.table() << std::endl;
    if (f.compact) std::cout << "\n" << runner.compaction_table() << std::endl;
    runner.write_outputs(out);
    json["tasks"].push_back(runner.json());
    if (f.growth && name == "planted") {
      // At budgets of at least the initial rank: below it, growth has nothing to add.
      std::vector<int> growth_budgets;
      for (const int b : f.budgets.empty() ? std::vector<int>{2, 3} : f.budgets)
        if (b >= f.grow_from) growth_budgets.push_back(b);
      if (growth_budgets.empty()) growth_budgets.push_back(f.grow_from);
      std::sort(growth_budgets.begin(), growth_budgets.end());
      task_runner growth(t, f, growth_budgets, steps, "planted_growth", true);
      growth.run();
      std::cout << "\n" << growth.notes() << "\n" << growth.table() << std::endl;
      growth.write_outputs(out);
      json["tasks"].push_back(growth.json());
    }
    std::cerr << format(
        "%s: %.1f s\n", name.c_str(),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - task_start).count());
  }

  if (summary.has_parent_path()) fs::create_directories(summary.parent_path());
  write_file(summary, summary_text(json) + "\n");
  std::cout << "pictures, tables and rank history in " << out.string() << "/, summary in "
            << summary.string() << "\n";
  std::cout << format(
      "finetune: done in %.1f s\n",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  flags f;
  try {
    f = parse_flags(argc, argv);
  } catch (const usage_error& e) {
    std::cerr << "finetune: " << e.what() << " (see --help)\n";
    return 2;
  }
  try {
    return run(f);
  } catch (const std::exception& e) {
    std::cerr << "finetune: " << e.what() << "\n";
    return 1;
  }
}
