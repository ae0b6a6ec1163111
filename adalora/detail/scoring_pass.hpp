#pragma once
// The rank allocator's pass over memory, and the data it leaves behind.
//
// One pass visits every element this process holds (A, E and B of every adapter), updates the
// metric's state (or scores from the frozen state, or only counts NaN/infinity), and reduces the
// element scores to partial sums per triplet: s(E_i), and the block sums of row i of A and of
// column i of B. The sums are formed in double over blocks of score_sum_block elements in a
// fixed order, so that they are the same for every thread count and every sharding; the
// communicator then adds them over processes, and the triplet scores follow from the sums alone.
//
//   state_layout         where each adapter's metric state lies (state_size values per element)
//   partial_sum_layout   the encoding of the partial sums: one array of doubles, written by the
//                        pass and read by combine_triplet_scores, through the same accessors
//   scoring_pass         the tasks (planned once from the shapes), the threads, the pass itself
//   triplet_score        S = s(E) + (mean s(A row) + mean s(B column)), rounded as the references

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/config.hpp"
#include "adalora/detail/score_kernels.hpp"
#include "adalora/detail/task_pool.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora::detail {

/// The blocks of score_sum_block elements that n elements make (the last one may be short).
inline std::size_t sum_blocks(index_t n) noexcept {
  return static_cast<std::size_t>(n / score_sum_block + (n % score_sum_block != 0 ? 1 : 0));
}

/// out = x · y + z, or false (out unchanged) where that is beyond std::size_t.
inline bool checked_mul_add(std::size_t x, std::size_t y, std::size_t z, std::size_t& out) noexcept {
  if (y != 0 && x > (std::numeric_limits<std::size_t>::max() - z) / y) return false;
  out = x * y + z;
  return true;
}

/// The extents of the part of an adapter this process holds.
struct local_dims {
  index_t r = 0, in = 0, out = 0;
};

/// Where the metric's state lies: for each adapter in turn, its local A (r × in), E (r) and B
/// (out × r) elements in row-major order, state_size values per element. Offsets are in values.
class state_layout {
 public:
  /// Appends an adapter; false (nothing appended) where the state would not fit in memory.
  bool add(const local_dims& d, std::size_t state_size) {
    const auto r = static_cast<std::size_t>(d.r);
    std::size_t a = 0, e = 0, b = 0, end = 0;
    if (!checked_mul_add(r, static_cast<std::size_t>(d.in), 0, a) ||
        !checked_mul_add(a, state_size, size_, a) || !checked_mul_add(r, state_size, a, e) ||
        !checked_mul_add(static_cast<std::size_t>(d.out), r, 0, b) ||
        !checked_mul_add(b, state_size, e, end))
      return false;
    adapters_.push_back({size_, a, e, d});
    size_ = end;
    return true;
  }
  /// Values in all.
  std::size_t size() const noexcept { return size_; }
  /// The first value of adapter a's tensor `role`.
  std::size_t begin(std::size_t a, tensor_role role) const noexcept {
    const entry& x = adapters_[a];
    return role == tensor_role::A ? x.a : role == tensor_role::E ? x.e : x.b;
  }
  /// The values of adapter a's tensor `role`.
  std::size_t count(std::size_t a, tensor_role role) const noexcept {
    const std::size_t end = a + 1 < adapters_.size() ? adapters_[a + 1].a : size_;
    const entry& x = adapters_[a];
    return role == tensor_role::A ? x.e - x.a : role == tensor_role::E ? x.b - x.e : end - x.b;
  }
  const local_dims& local(std::size_t a) const noexcept { return adapters_[a].dims; }

 private:
  struct entry {
    std::size_t a, e, b;  // first value of A, E and B
    local_dims dims;
  };
  std::vector<entry> adapters_;
  std::size_t size_ = 0;
};

/// The encoding of a step's partial sums: one array of doubles (what the communicator adds up
/// over processes), indexed by the WHOLE adapters' triplets and blocks, whatever this process
/// holds (entries it does not hold stay 0):
///
///   [ s(E_i) for every triplet i of every adapter, in adapter order          ]  b0 entries
///   [ per adapter: r × a_blocks, row i = the block sums of row i of A         ]  a_blocks = ⌈in / 256⌉
///   [ per adapter: b_blocks × r, row b = block b of the rows of B, per triplet ]  b_blocks = ⌈out / 256⌉
///
/// Block b of row i of A is the sum over columns [256·b, 256·(b + 1)); block b of column i of B
/// the sum over rows [256·b, 256·(b + 1)) (score_sum_block = 256). The pass writes the entries
/// through e_score, a_block_sum and b_block_sum; row_sum and column_sum read them back.
class partial_sum_layout {
 public:
  /// Appends a (whole) adapter; false (nothing appended) where the sums would not fit in memory.
  bool add(index_t rank, index_t in, index_t out) {
    const auto r = static_cast<std::size_t>(rank);
    const std::size_t a_blocks = sum_blocks(in), b_blocks = sum_blocks(out);
    std::size_t triplets = 0, a_total = 0, b_total = 0, size = 0;
    if (!checked_mul_add(1, r, triplets_, triplets) || !checked_mul_add(r, a_blocks, a_total_, a_total) ||
        !checked_mul_add(r, b_blocks, b_total_, b_total) ||
        !checked_mul_add(1, triplets, a_total, size) || !checked_mul_add(1, size, b_total, size))
      return false;
    adapters_.push_back({triplets_, r, a_total_, b_total_, a_blocks, b_blocks, in, out});
    triplets_ = triplets, a_total_ = a_total, b_total_ = b_total;
    return true;
  }

  std::size_t adapters() const noexcept { return adapters_.size(); }
  /// All adapters' triplets: the initial budget b0.
  std::size_t triplets() const noexcept { return triplets_; }
  /// Entries in all.
  std::size_t size() const noexcept { return triplets_ + a_total_ + b_total_; }

  /// Adapter a's first triplet in the allocator's numbering (all adapters' triplets in order).
  std::size_t first_triplet(std::size_t a) const noexcept { return adapters_[a].triplet; }
  /// Adapter a's (whole) rank, in_features and out_features.
  std::size_t rank(std::size_t a) const noexcept { return adapters_[a].rank; }
  index_t in_features(std::size_t a) const noexcept { return adapters_[a].in; }
  index_t out_features(std::size_t a) const noexcept { return adapters_[a].out; }
  std::size_t a_blocks(std::size_t a) const noexcept { return adapters_[a].a_blocks; }
  std::size_t b_blocks(std::size_t a) const noexcept { return adapters_[a].b_blocks; }

  /// The entry of s(E_i), triplet i of adapter a.
  std::size_t e_score(std::size_t a, std::size_t i) const noexcept { return adapters_[a].triplet + i; }
  /// The entry of block `block` of row i of adapter a's A. Row i's blocks are contiguous.
  std::size_t a_block_sum(std::size_t a, std::size_t i, std::size_t block) const noexcept {
    const adapter& x = adapters_[a];
    return triplets_ + x.a_sums + i * x.a_blocks + block;
  }
  /// The entry of block `block` of column i of adapter a's B. A block's triplets are contiguous.
  std::size_t b_block_sum(std::size_t a, std::size_t block, std::size_t i) const noexcept {
    const adapter& x = adapters_[a];
    return triplets_ + a_total_ + x.b_sums + block * x.rank + i;
  }

  /// Σ_j s(A_ij) of triplet i of adapter a: its block sums added in block order.
  double row_sum(std::span<const double> partials, std::size_t a, std::size_t i) const noexcept {
    const double* sums = partials.data() + a_block_sum(a, i, 0);
    double row = 0.0;
    for (std::size_t b = 0; b < adapters_[a].a_blocks; ++b) row += sums[b];
    return row;
  }
  /// Σ_j s(B_ji) of triplet i of adapter a: its block sums added in block order.
  double column_sum(std::span<const double> partials, std::size_t a, std::size_t i) const noexcept {
    const adapter& x = adapters_[a];
    double col = 0.0;
    for (std::size_t b = 0; b < x.b_blocks; ++b) col += partials[b_block_sum(a, b, i)];
    return col;
  }

 private:
  struct adapter {
    std::size_t triplet;            // first triplet
    std::size_t rank;
    std::size_t a_sums, b_sums;     // first A / B block sum, relative to the A / B section
    std::size_t a_blocks, b_blocks;
    index_t in, out;
  };
  std::vector<adapter> adapters_;
  std::size_t triplets_ = 0, a_total_ = 0, b_total_ = 0;
};

/// A triplet's score from its sums: S = s(E) + (mean s(A row) + mean s(B column)) in the
/// references' association (PEFT _combine_ipt, then E + that), each term rounded to T as torch
/// rounds it; beyond T's range the double value is kept (rounding is monotone, so the order of
/// scores is kept).
template <class T>
double triplet_score(double e, double row_sum, double column_sum, double in, double out) noexcept {
  const double mean_a = row_sum / in, mean_b = column_sum / out;
  const T rounded = static_cast<T>(e) + (static_cast<T>(mean_a) + static_cast<T>(mean_b));
  return !is_non_finite(rounded) ? static_cast<double>(rounded) : e + (mean_a + mean_b);
}

/// Every triplet's score from the (all-reduced) partial sums, to scores[first_triplet(a) + i].
template <class T>
void combine_triplet_scores(const partial_sum_layout& layout, std::span<const double> partials,
                            std::span<double> scores) noexcept {
  for (std::size_t a = 0; a < layout.adapters(); ++a) {
    const double in = static_cast<double>(layout.in_features(a));
    const double out = static_cast<double>(layout.out_features(a));
    for (std::size_t i = 0; i < layout.rank(a); ++i)
      scores[layout.first_triplet(a) + i] =
          triplet_score<T>(partials[layout.e_score(a, i)], layout.row_sum(partials, a, i),
                           layout.column_sum(partials, a, i), in, out);
  }
}

/// The pass over memory of a rank_allocator<T, Metric>: built once from the adapters' shapes
/// (add() per adapter, then finish()), then run() once or twice per step. Owns the partial sums,
/// the task plan and the worker threads; the state is the caller's (the allocator keeps it as
/// part of what it checkpoints). Nothing is allocated after finish().
template <class T, class Metric>
class scoring_pass {
 public:
  /// State values per element.
  static constexpr index_t K = static_cast<index_t>(Metric::state_size);
  /// Elements per task, for threads.
  static constexpr index_t task_elements = 1 << 15;
  static constexpr index_t sum_block = score_sum_block;

  /// An adapter's tensor, as a pass reports where it found something.
  struct site {
    std::size_t adapter = 0;
    tensor_role role = tensor_role::A;
  };
  /// What a pass found: the elements with a NaN/infinite parameter or gradient (and the first
  /// tensor, in task order, that has one), and the first tensor where the metric returned a
  /// negative or non-finite score for finite input (a broken metric; never in check mode).
  struct outcome {
    std::int64_t non_finite = 0;
    site first_non_finite;
    bool bad_score = false;
    site first_bad_score;
  };

  /// Appends an adapter: its WHOLE shape with its resolved shard (no "-1 = to the end" left).
  /// False where its sizes do not fit in memory; the pass is then unusable (the allocator's
  /// constructor throws).
  bool add(const adapter_shape& s) {
    const adapter_shard& h = s.shard;
    shards_.push_back(h);
    return states_.add({h.triplet_count, h.in_count, h.out_count}, static_cast<std::size_t>(K)) &&
           sums_.add(s.rank, s.in_features, s.out_features);
  }

  /// After the last add(): plans the tasks, sizes the partial sums and starts threads − 1 worker
  /// threads (std::runtime_error if one cannot be started).
  void finish(unsigned threads, const char* where) {
    partials_.assign(sums_.size(), 0.0);
    plan_tasks(threads);
    if (threads > 1) pool_ = std::make_unique<task_pool>(threads, where);
  }

  const state_layout& states() const noexcept { return states_; }
  const partial_sum_layout& sums() const noexcept { return sums_; }
  /// The partial sums of the last pass (see partial_sum_layout); the caller all-reduces them.
  std::span<double> partials() noexcept { return partials_; }
  std::span<const double> partials() const noexcept { return partials_; }

  /// One pass over every element this process holds (views already checked against the
  /// shapes), on the state laid out as states() says. Except in check mode, the partial sums are
  /// zeroed and formed anew.
  outcome run(pass_mode mode, const Metric& metric, std::span<const adapter_tensors<T>> adapters,
              std::span<T> state) {
    // Entries this process does not hold stay zero, so that the communicator's sum over
    // processes gives each block sum exactly (x + 0 = x: no rounding, whatever the order).
    if (mode != pass_mode::check) std::fill(partials_.begin(), partials_.end(), 0.0);
    context ctx{this, &metric, adapters, state.data(), mode};
    if (pool_)
      pool_->run(tasks_.size(), &run_task_entry, &ctx, split_);
    else
      for (std::size_t id = 0; id < tasks_.size(); ++id) run_task_entry(&ctx, id);

    outcome o;
    for (std::size_t id = 0; id < tasks_.size(); ++id) {
      const site where{tasks_[id].adapter, tasks_[id].role};
      if (task_non_finite_[id] > 0 && o.non_finite == 0) o.first_non_finite = where;
      o.non_finite += task_non_finite_[id];
      if (task_bad_score_[id] && mode != pass_mode::check && !o.bad_score)
        o.bad_score = true, o.first_bad_score = where;
    }
    return o;
  }

 private:
  /// A unit of work: local rows [begin, end) of A or B of one adapter, or all of its local E.
  /// Tasks are planned once from the shapes alone.
  struct task {
    std::size_t adapter;
    tensor_role role;
    index_t begin, end;
  };

  struct context {
    scoring_pass* self;
    const Metric* metric;
    std::span<const adapter_tensors<T>> adapters;
    T* state;
    pass_mode mode;
  };

  void plan_tasks(unsigned threads) {
    for (std::size_t a = 0; a < shards_.size(); ++a) {
      const local_dims& d = states_.local(a);
      if (d.r == 0) continue;
      if (d.in > 0) {
        const index_t a_rows = std::max<index_t>(1, task_elements / d.in);
        for (index_t i = 0; i < d.r; i += a_rows)
          tasks_.push_back({a, tensor_role::A, i, std::min(d.r, i + a_rows)});
      }
      tasks_.push_back({a, tensor_role::E, 0, d.r});
      // B tasks cover whole sum blocks (in the adapter's global row numbering).
      const index_t b_rows = std::max<index_t>(1, task_elements / (d.r * sum_block)) * sum_block;
      for (index_t j = 0; j < d.out; j += b_rows)
        tasks_.push_back({a, tensor_role::B, j, std::min(d.out, j + b_rows)});
    }
    task_non_finite_.assign(tasks_.size(), 0);
    task_bad_score_.assign(tasks_.size(), 0);
    // Each thread's home tasks: contiguous, with about equal element counts (see task_pool).
    std::vector<std::size_t> cumulative(tasks_.size() + 1, 0);
    for (std::size_t id = 0; id < tasks_.size(); ++id) {
      const task& tk = tasks_[id];
      const local_dims& d = states_.local(tk.adapter);
      const index_t width = tk.role == tensor_role::A ? d.in : tk.role == tensor_role::B ? d.r : 1;
      cumulative[id + 1] = cumulative[id] + static_cast<std::size_t>((tk.end - tk.begin) * width);
    }
    split_.assign(threads + 1, tasks_.size());
    split_[0] = 0;
    for (std::size_t k = 1; k < threads; ++k) {
      const std::size_t target = cumulative.back() / threads * k;
      // At most tasks_.size(), and non-decreasing in k as the targets are.
      split_[k] = static_cast<std::size_t>(
          std::lower_bound(cumulative.begin(), cumulative.end(), target) - cumulative.begin());
    }
  }

  static void run_task_entry(void* ctx, std::size_t id) {
    auto& c = *static_cast<context*>(ctx);
    // Each task scores through its own L1-sized scratch row on the running thread's stack.
    double scratch[sum_block];
    switch (c.mode) {
      case pass_mode::update: c.self->template run_task<pass_mode::update>(c, id, scratch); break;
      case pass_mode::frozen: c.self->template run_task<pass_mode::frozen>(c, id, scratch); break;
      case pass_mode::check: c.self->template run_task<pass_mode::check>(c, id, scratch); break;
    }
  }

  template <pass_mode Mode>
  void run_task(const context& c, std::size_t id, double* scratch) {
    const task& tk = tasks_[id];
    const std::size_t a = tk.adapter;
    const local_dims& L = states_.local(a);
    const adapter_shard& h = shards_[a];
    const Metric& metric = *c.metric;
    const svd_adapter_ref<T>& p = c.adapters[a].params;
    const svd_adapter_ref<const T>& g = c.adapters[a].grads;
    const auto tb = static_cast<std::size_t>(h.triplet_begin);  // sums are per global triplet
    T* st = c.state + states_.begin(a, tk.role);
    double* partials = partials_.data();
    std::int64_t bad = 0;
    bool scores_ok = true;

    if (tk.role == tensor_role::A) {
      // One sum per (triplet, block of sum_block columns), blocks in the global numbering.
      const index_t in = L.in;
      const auto first_block = static_cast<std::size_t>(h.in_begin / sum_block);
      for (index_t i = tk.begin; i < tk.end; ++i) {
        double* row = partials + sums_.a_block_sum(a, tb + static_cast<std::size_t>(i), first_block);
        for (index_t j0 = 0; j0 < in; j0 += sum_block) {
          const index_t n = std::min(sum_block, in - j0);
          const run_summary s = score_run<Mode, score_sink::sum>(
              metric, tensor_role::A, &p.A(i, j0), p.A.col_stride(), &g.A(i, j0), g.A.col_stride(),
              st + (i * in + j0) * K, n, scratch);
          bad += s.non_finite;
          if constexpr (Mode != pass_mode::check) {
            scores_ok &= s.valid;  // a sum beyond double's range is +inf: ranked, not an error
            row[j0 / sum_block] = s.sum;
          }
        }
      }
    } else if (tk.role == tensor_role::E) {
      for (index_t i0 = tk.begin; i0 < tk.end; i0 += sum_block) {
        const index_t n = std::min(sum_block, tk.end - i0);
        const run_summary s = score_run<Mode, score_sink::store>(
            metric, tensor_role::E, &p.E[i0], p.E.stride(), &g.E[i0], g.E.stride(), st + i0 * K, n,
            scratch);
        bad += s.non_finite;
        if constexpr (Mode != pass_mode::check) {
          scores_ok &= s.valid;
          if (h.scores_e)
            std::copy(scratch, scratch + n, partials + sums_.e_score(a, tb + static_cast<std::size_t>(i0)));
        }
      }
    } else {
      // One sum per (block of sum_block rows, triplet): the rows of a block are added in order.
      const index_t local_r = L.r;
      const bool flat = p.B.is_row_major_contiguous() && g.B.is_row_major_contiguous();
      // Where the rows are contiguous, several are scored as one flat run (r is often 8 or 16:
      // a run per row would be too short to vectorise), never across a block of rows. Runs of
      // a multiple of vector_block elements where the row width allows it.
      // Rows of width local_r that make a multiple of vector_block elements (local_r >= 1 here).
      const index_t step = vector_block / std::gcd(local_r, vector_block);
      const index_t rows_per_run = !flat || local_r > sum_block ? 1
                                   : step * local_r <= sum_block ? sum_block / local_r / step * step
                                                                 : sum_block / local_r;
      [[maybe_unused]] bool columns = false;  // unused where the column kernel is not built
      if constexpr (uses_column_kernel<Mode, T, Metric>)
        columns = flat && local_r % 4 == 0 && local_r <= max_column_kernel_width;
      for (index_t j = tk.begin; j < tk.end;) {
        const index_t global = h.out_begin + j;
        const auto block = static_cast<std::size_t>(global / sum_block);
        double* col = partials + sums_.b_block_sum(a, block, tb);
        const index_t block_end = (global / sum_block + 1) * sum_block;
#if ADALORA_VECTOR_EXTENSIONS
        if constexpr (uses_column_kernel<Mode, T, Metric>) {
          if (columns) {  // the rows of the block in one run, summed in registers
            const index_t rows = std::min(tk.end - j, block_end - global);
            const run_summary s =
                score_columns(metric, &p.B(j, 0), &g.B(j, 0), st + j * local_r * K, rows, local_r, col);
            bad += s.non_finite;
            scores_ok &= s.valid;
            j += rows;
            continue;
          }
        }
#endif
        const index_t rows = std::min({rows_per_run, tk.end - j, block_end - global});
        for (index_t i0 = 0; i0 < local_r; i0 += sum_block) {
          const index_t n = flat ? rows * local_r : std::min(sum_block, local_r - i0);
          // A flat run is contiguous even where a one-column view reports another col stride.
          const run_summary s = score_run<Mode, score_sink::store>(
              metric, tensor_role::B, &p.B(j, i0), flat ? 1 : p.B.col_stride(), &g.B(j, i0),
              flat ? 1 : g.B.col_stride(), st + (j * local_r + i0) * K, n, scratch);
          bad += s.non_finite;
          if constexpr (Mode != pass_mode::check) {
            const index_t width = flat ? local_r : n;
            for (index_t q = 0; q < rows; ++q) add_scores(col + i0, scratch + q * width, width);
            scores_ok &= s.valid;
          }
        }
        j += rows;
      }
    }
    task_non_finite_[id] = bad;
    task_bad_score_[id] = scores_ok ? 0 : 1;
  }

  state_layout states_;
  partial_sum_layout sums_;
  std::vector<adapter_shard> shards_;          // per adapter, resolved
  std::vector<double> partials_;               // see partial_sum_layout
  std::vector<task> tasks_;
  std::vector<std::int64_t> task_non_finite_;
  std::vector<std::uint8_t> task_bad_score_;
  std::vector<std::size_t> split_;             // first task of each thread's home range
  std::unique_ptr<task_pool> pool_;
};

}  // namespace adalora::detail
