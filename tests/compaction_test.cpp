// Compaction and growth through the whole loop (docs/compaction.md): the rank allocator decides a
// change, the user applies it to parameters, gradients and Adam's moments (as svd_adapters, as
// raw buffers in mixed layouts, as Eigen matrices), and training goes on.
//
//  (a) With the regularizer off and the portable (index-order) kernels, compiled without FMA
//      contraction (.bazelrc's -ffp-contract=off; with it, a vectorised loop and its remainder may
//      fuse differently at another rank), training that compacts once the pattern is final is
//      bit-identical to training that only masks: the kept triplets' parameters and moments,
//      every ΔW, and every later step's kept counts. For both final-phase rules, both tie
//      policies, and with one adapter that ends at rank 0.
//  (b) The allocator after compact(): its ranks, state, scores and pattern, gathered from
//      before; the changes it refuses (too early, maps that do not fit, growth in the final
//      phase, sharded or multi-process allocators) leave it unchanged.
//  (c) adapter_set::compact on views of the user's memory; stale views are refused by step().
//  (d) Growth mid-training: new triplets with zero state, ΔW unchanged, steps go on.

#include <catch2/catch.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/eigen.hpp"
#include "adalora/testing/in_process_communicator.hpp"

namespace {

using adalora::adapter_scale;
using adalora::final_phase_rule;
using adalora::index_t;
using adalora::matrix_view;
using adalora::rank_change;
using adalora::svd_adapter_ref;
using adalora::tie_policy;
using adalora::triplet_map;
using adalora::vector_view;
using allocator_t = adalora::rank_allocator<float>;

/// Where the user keeps an adapter's tensors.
enum class storage {
  owners,       ///< svd_adapter (parameters and gradients) and two more for Adam's moments
  raw_buffers,  ///< std::vector<float>, a different layout for each of the four tensor sets
  eigen,        ///< Eigen matrices: column-major parameters and gradients, row-major moments
};
const char* name_of(storage s) {
  return s == storage::owners ? "owners" : s == storage::raw_buffers ? "raw buffers" : "eigen";
}

/// The four tensor sets of one adapter that have a triplet axis.
enum class tensor_set { params, grads, moment1, moment2 };

using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// One tensor set as a user holds it, in raw buffers or Eigen objects, and the view of it.
struct held {
  std::vector<float> a, e, b;
  Eigen::MatrixXf ca, cb;
  Eigen::VectorXf ce;
  row_major ra, rb;
  svd_adapter_ref<float> view;
};

/// A zeroed tensor set of rank r. Raw buffers take a layout per set, so that every move meets
/// column-major, padded, interleaved and strided tensors; Eigen takes its two storage orders.
std::unique_ptr<held> make_held(storage s, tensor_set k, index_t r, index_t in, index_t out) {
  auto h = std::make_unique<held>();
  auto buf = [](std::vector<float>& v, index_t n) {
    v.assign(static_cast<std::size_t>(n), 0.0f);
    return v.data();
  };
  if (s == storage::raw_buffers) {
    switch (k) {
      case tensor_set::params:  // A column-major, E every other element, B row-major
        h->view = {matrix_view<float>(buf(h->a, r * in), r, in, 1, r),
                   vector_view<float>(buf(h->e, 2 * r), r, 2),
                   matrix_view<float>(buf(h->b, out * r), out, r, r, 1)};
        break;
      case tensor_set::grads:  // A rows padded, E contiguous, B column-major
        h->view = {matrix_view<float>(buf(h->a, r * (in + 1)), r, in, in + 1, 1),
                   vector_view<float>(buf(h->e, r), r),
                   matrix_view<float>(buf(h->b, out * r), out, r, 1, out)};
        break;
      case tensor_set::moment1:  // A row-major, B column-major with a taller leading dimension
        h->view = {matrix_view<float>(buf(h->a, r * in), r, in, in, 1),
                   vector_view<float>(buf(h->e, r), r),
                   matrix_view<float>(buf(h->b, (out + 2) * r), out, r, 1, out + 2)};
        break;
      case tensor_set::moment2:  // A interleaved (no unit stride), E every third element
        h->view = {matrix_view<float>(buf(h->a, r * (2 * in + 1)), r, in, 2 * in + 1, 2),
                   vector_view<float>(buf(h->e, 3 * r), r, 3),
                   matrix_view<float>(buf(h->b, out * r), out, r, r, 1)};
        break;
    }
  } else if (k == tensor_set::params || k == tensor_set::grads) {
    h->ca = Eigen::MatrixXf::Zero(r, in);
    h->ce = Eigen::VectorXf::Zero(r);
    h->cb = Eigen::MatrixXf::Zero(out, r);
    h->view = {adalora::as_matrix(h->ca), adalora::as_vector(h->ce), adalora::as_matrix(h->cb)};
  } else {
    h->ra = row_major::Zero(r, in);
    h->ce = Eigen::VectorXf::Zero(r);
    h->rb = row_major::Zero(out, r);
    h->view = {adalora::as_matrix(h->ra), adalora::as_vector(h->ce), adalora::as_matrix(h->rb)};
  }
  return h;
}

struct layer_spec {
  index_t in, out, rank, planted;  // planted: the rank of the target update (0: no update)
};

/// The adapters of most tests: four shapes; the second one's target is zero, so its gradients
/// stay exactly zero, its scores are 0 (tied) and it ends at rank 0.
const std::vector<layer_spec> default_layers = {{12, 10, 6, 3}, {8, 9, 5, 0}, {10, 6, 4, 2}, {7, 5, 3, 1}};

struct config {
  final_phase_rule rule = final_phase_rule::peft;
  tie_policy ties = tie_policy::prune_all_ties;
  storage store = storage::owners;
  std::vector<layer_spec> layers = default_layers;
  std::int64_t target_budget = 7;
};

/// What a step decided, in the terms that must not change when the adapters are compacted.
/// (prune_count, threshold and missing are relative to the total rank, which compaction
/// lowers: docs/compaction.md, "What changes".)
std::string describe(const adalora::step_result<float>& r) {
  std::ostringstream s;
  s << "step " << r.step << " budget " << r.budget << " mask " << r.mask_due << " action "
    << static_cast<int>(r.action) << " kept";
  for (index_t k : r.kept) s << ' ' << k;
  s << " total " << r.kept_total;
  return s.str();
}

/// A regression problem per adapter (learn a planted low-rank update from random inputs) trained
/// with the portable forward and backward, Adam, and the rank allocator after each Adam step; no
/// orthogonality regularizer. The user's tensors live where config::store says.
class trainer {
 public:
  static constexpr index_t batch = 8;
  static constexpr std::int64_t total_steps = 60;
  static adalora::schedule_options schedule(std::int64_t target_budget = 7) {
    return {.target_budget = target_budget, .total_step = total_steps, .tinit = 5, .tfinal = 20, .delta_t = 3};
  }

  struct layer {
    layer_spec spec;
    adapter_scale<float> scale;
    std::vector<float> target;  // out × in
    std::unique_ptr<adalora::svd_adapter<float>> own, own_m, own_v;
    std::unique_ptr<held> p, g, m, v;
    svd_adapter_ref<float> P, G, M, V;
  };

  explicit trainer(config c) : cfg_(std::move(c)) {
    std::mt19937_64 init(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    layers.reserve(cfg_.layers.size());
    for (const layer_spec& s : cfg_.layers) {
      layer L{s, adapter_scale<float>(4.0, s.rank), std::vector<float>(static_cast<std::size_t>(s.out * s.in), 0.0f),
              {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
      // target = Σ_c (planted − c) · u_c v_cᵀ with Gaussian u, v.
      for (index_t c = 0; c < s.planted; ++c) {
        std::vector<float> u(static_cast<std::size_t>(s.out)), w(static_cast<std::size_t>(s.in));
        for (float& x : u) x = normal(init) / std::sqrt(float(s.out));
        for (float& x : w) x = normal(init) / std::sqrt(float(s.in));
        for (index_t o = 0; o < s.out; ++o)
          for (index_t j = 0; j < s.in; ++j)
            L.target[static_cast<std::size_t>(o * s.in + j)] +=
                float(s.planted - c) * u[static_cast<std::size_t>(o)] * w[static_cast<std::size_t>(j)];
      }
      allocate(L, s.rank);
      // The references' init: E = 0, A and B ~ N(0, 0.02), drawn in one order for every storage.
      std::normal_distribution<float> small(0.0f, 0.02f);
      for (index_t i = 0; i < s.rank; ++i)
        for (index_t j = 0; j < s.in; ++j) L.P.A(i, j) = small(init);
      for (index_t o = 0; o < s.out; ++o)
        for (index_t i = 0; i < s.rank; ++i) L.P.B(o, i) = small(init);
      layers.push_back(std::move(L));
    }
    for (std::size_t a = 0; a < layers.size(); ++a)
      set.add("layer" + std::to_string(a), layers[a].P, layers[a].G);
    alloc = std::make_unique<allocator_t>(set, adalora::cubic_schedule(schedule(cfg_.target_budget)), adalora::smoothed_sensitivity{},
                                          adalora::allocator_options{.final_phase = cfg_.rule, .ties = cfg_.ties});
  }

  /// Forward, backward, Adam, then the allocator's step (the gradients stay until zero_grads()).
  const adalora::step_result<float>& step(std::int64_t t) {
    for (layer& L : layers) {
      const index_t in = L.spec.in, out = L.spec.out;
      x_.resize(static_cast<std::size_t>(batch * in));
      for (float& v : x_) v = normal_(data_);
      y_.assign(static_cast<std::size_t>(batch * out), 0.0f);
      dy_.resize(y_.size());
      const auto xv = adalora::make_matrix_view<const float>(x_.data(), batch, in);
      adalora::adapter_forward<float>(L.P, L.scale, xv, adalora::make_matrix_view(y_.data(), batch, out), ws_);
      for (index_t k = 0; k < batch; ++k)
        for (index_t o = 0; o < out; ++o) {
          float want = 0.0f;
          for (index_t j = 0; j < in; ++j)
            want += L.target[static_cast<std::size_t>(o * in + j)] * x_[static_cast<std::size_t>(k * in + j)];
          const auto at = static_cast<std::size_t>(k * out + o);
          dy_[at] = (y_[at] - want) / float(batch);
        }
      adalora::adapter_backward<float>(L.P, L.scale, xv,
                                       adalora::make_matrix_view<const float>(dy_.data(), batch, out), L.G, ws_);
    }
    // Adam, element by element (so compaction of the moments is all it needs).
    const float lr = 0.02f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    const float c1 = 1.0f - std::pow(b1, float(t + 1)), c2 = 1.0f - std::pow(b2, float(t + 1));
    auto adam = [&](float& p, float g, float& m, float& v) {
      m = b1 * m + (1.0f - b1) * g;
      v = b2 * v + (1.0f - b2) * g * g;
      p -= lr * (m / c1) / (std::sqrt(v / c2) + eps);
    };
    for (layer& L : layers) {
      for (index_t i = 0; i < L.P.A.rows(); ++i)
        for (index_t j = 0; j < L.P.A.cols(); ++j) adam(L.P.A(i, j), L.G.A(i, j), L.M.A(i, j), L.V.A(i, j));
      for (index_t i = 0; i < L.P.E.size(); ++i) adam(L.P.E[i], L.G.E[i], L.M.E[i], L.V.E[i]);
      for (index_t o = 0; o < L.P.B.rows(); ++o)
        for (index_t i = 0; i < L.P.B.cols(); ++i) adam(L.P.B(o, i), L.G.B(o, i), L.M.B(o, i), L.V.B(o, i));
    }
    return alloc->step(t, set);
  }

  void zero_grads() {
    for (layer& L : layers) {
      for (index_t i = 0; i < L.G.A.rows(); ++i)
        for (index_t j = 0; j < L.G.A.cols(); ++j) L.G.A(i, j) = 0.0f;
      for (index_t i = 0; i < L.G.E.size(); ++i) L.G.E[i] = 0.0f;
      for (index_t o = 0; o < L.G.B.rows(); ++o)
        for (index_t i = 0; i < L.G.B.cols(); ++i) L.G.B(o, i) = 0.0f;
    }
  }

  /// allocator.compact(), applied to every tensor with a triplet axis.
  rank_change compact() {
    const rank_change c = alloc->compact();
    apply(c);
    return c;
  }

  /// allocator.grow(add), applied likewise; new triplets get E = 0 and small random A, B.
  rank_change grow(const std::vector<index_t>& add) {
    const rank_change c = alloc->grow(add);
    apply(c);
    return c;
  }

  /// ΔW of adapter a (out × in, row-major).
  std::vector<float> delta(std::size_t a) const {
    const layer& L = layers[a];
    std::vector<float> d(static_cast<std::size_t>(L.spec.out * L.spec.in));
    adalora::delta_weight<float>(L.P, L.scale, adalora::make_matrix_view(d.data(), L.spec.out, L.spec.in));
    return d;
  }

  std::vector<layer> layers;
  adalora::adapter_set<float> set;
  std::unique_ptr<allocator_t> alloc;

 private:
  void allocate(layer& L, index_t r) {
    const index_t in = L.spec.in, out = L.spec.out;
    if (cfg_.store == storage::owners) {
      L.own = std::make_unique<adalora::svd_adapter<float>>(in, out, r, L.scale);
      L.own_m = std::make_unique<adalora::svd_adapter<float>>(in, out, r, L.scale);
      L.own_v = std::make_unique<adalora::svd_adapter<float>>(in, out, r, L.scale);
      refresh_owned(L);
    } else {
      L.p = make_held(cfg_.store, tensor_set::params, r, in, out);
      L.g = make_held(cfg_.store, tensor_set::grads, r, in, out);
      L.m = make_held(cfg_.store, tensor_set::moment1, r, in, out);
      L.v = make_held(cfg_.store, tensor_set::moment2, r, in, out);
      L.P = L.p->view, L.G = L.g->view, L.M = L.m->view, L.V = L.v->view;
    }
  }
  static void refresh_owned(layer& L) {
    L.P = L.own->params(), L.G = L.own->grads(), L.M = L.own_m->params(), L.V = L.own_v->params();
  }

  void apply(const rank_change& c) {
    bool drops_only = true;
    for (const triplet_map& m : c) drops_only = drops_only && m.added() == 0;
    if (cfg_.store == storage::owners) {
      for (std::size_t a = 0; a < layers.size(); ++a) {
        layer& L = layers[a];
        L.own->change_rank(c[a]);
        L.own_m->change_rank(c[a]);
        L.own_v->change_rank(c[a]);
        refresh_owned(L);
        init_new(L, c[a]);
        set.replace(a, L.P, L.G);
      }
    } else if (drops_only) {
      // In place: the set compacts parameters and gradients, the moments are ours to compact.
      set.compact(c);
      for (std::size_t a = 0; a < layers.size(); ++a) {
        layer& L = layers[a];
        L.P = set.params()[a];
        L.G = set.grads()[a];
        L.M = adalora::compact(L.M, c[a]);
        L.V = adalora::compact(L.V, c[a]);
      }
    } else {
      // Growth needs new memory: remap every tensor set into tensors of the new rank.
      for (std::size_t a = 0; a < layers.size(); ++a) {
        layer& L = layers[a];
        const index_t r = c[a].new_rank();
        auto p = make_held(cfg_.store, tensor_set::params, r, L.spec.in, L.spec.out);
        auto g = make_held(cfg_.store, tensor_set::grads, r, L.spec.in, L.spec.out);
        auto m = make_held(cfg_.store, tensor_set::moment1, r, L.spec.in, L.spec.out);
        auto v = make_held(cfg_.store, tensor_set::moment2, r, L.spec.in, L.spec.out);
        adalora::remap<float>(L.P, c[a], p->view);
        adalora::remap<float>(L.G, c[a], g->view);
        adalora::remap<float>(L.M, c[a], m->view);
        adalora::remap<float>(L.V, c[a], v->view);
        L.p = std::move(p), L.g = std::move(g), L.m = std::move(m), L.v = std::move(v);
        L.P = L.p->view, L.G = L.g->view, L.M = L.m->view, L.V = L.v->view;
        init_new(L, c[a]);
        set.replace(a, L.P, L.G);
      }
    }
  }

  /// A growth init policy: E = 0 (so ΔW does not jump), A rows and B columns ~ N(0, 0.02).
  void init_new(layer& L, const triplet_map& m) {
    std::normal_distribution<float> small(0.0f, 0.02f);
    for (index_t i = 0; i < m.new_rank(); ++i) {
      if (m.source[static_cast<std::size_t>(i)] != adalora::new_triplet) continue;
      for (index_t j = 0; j < L.spec.in; ++j) L.P.A(i, j) = small(grow_rng_);
      for (index_t o = 0; o < L.spec.out; ++o) L.P.B(o, i) = small(grow_rng_);
    }
  }

  config cfg_;
  std::mt19937_64 data_{17};
  std::mt19937_64 grow_rng_{23};
  std::normal_distribution<float> normal_{0.0f, 1.0f};
  std::vector<float> x_, y_, dy_;
  adalora::adapter_workspace<float> ws_;
};

/// An adapter's tensors, row-major (A: r × in, E, B: out × r), the triplets where `keep` is 1
/// (all of them for an empty `keep`).
struct triplets {
  std::vector<float> A, E, B;
};
triplets take(const svd_adapter_ref<float>& t, const std::vector<std::uint8_t>& keep = {}) {
  triplets out;
  auto kept = [&](index_t i) { return keep.empty() || keep[static_cast<std::size_t>(i)] != 0; };
  for (index_t i = 0; i < t.rank(); ++i)
    if (kept(i)) {
      out.E.push_back(t.E[i]);
      for (index_t j = 0; j < t.A.cols(); ++j) out.A.push_back(t.A(i, j));
    }
  for (index_t o = 0; o < t.B.rows(); ++o)
    for (index_t i = 0; i < t.rank(); ++i)
      if (kept(i)) out.B.push_back(t.B(o, i));
  return out;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
}
bool same_bits(const triplets& x, const triplets& y) {
  return same_bits(x.A, y.A) && same_bits(x.E, y.E) && same_bits(x.B, y.B);
}

struct run_result {
  std::vector<std::string> steps;  // describe() of every step
  std::vector<std::vector<std::uint8_t>> final_mask;
  std::vector<triplets> params, moment1, moment2;  // kept triplets only
  std::vector<std::vector<float>> deltas;
  std::vector<index_t> ranks;  // the adapters' ranks at the end
  std::int64_t compacted_at = -1;
  bool missing_ok = true;
};

/// Trains for trainer::total_steps; with `compact_from` >= 0, compacts at the first step at or
/// after it where the pattern is final.
run_result run(const config& c, std::int64_t compact_from) {
  trainer tr(c);
  run_result out;
  for (std::int64_t t = 0; t < trainer::total_steps; ++t) {
    const auto& r = tr.step(t);
    out.steps.push_back(describe(r));
    // The rank the budget asks for beyond the total rank, reported before the final phase only
    // (growth is refused there): a compaction with ties below the budget reports none.
    const std::int64_t expected_missing =
        t < tr.alloc->schedule().final_phase_start() ? std::max<std::int64_t>(0, r.budget - tr.alloc->total_rank()) : 0;
    out.missing_ok = out.missing_ok && r.missing == expected_missing;
    if (compact_from >= 0 && out.compacted_at < 0 && t >= compact_from && tr.alloc->pattern_final()) {
      tr.compact();
      out.compacted_at = t;
    }
    tr.zero_grads();
  }
  for (std::size_t a = 0; a < tr.layers.size(); ++a) {
    const auto m = tr.alloc->kept_mask(a);
    out.final_mask.emplace_back(m.begin(), m.end());
    out.params.push_back(take(tr.layers[a].P, out.final_mask.back()));
    out.moment1.push_back(take(tr.layers[a].M, out.final_mask.back()));
    out.moment2.push_back(take(tr.layers[a].V, out.final_mask.back()));
    out.deltas.push_back(tr.delta(a));
    out.ranks.push_back(tr.layers[a].P.rank());
  }
  return out;
}

}  // namespace

TEST_CASE("training after compaction is bit-identical to masked training",
          "[compaction][exact]") {
  // Target 7 prunes the zero-target adapter to rank 0; target 15 prunes fewer triplets than it
  // has tied zero scores, so prune_all_ties keeps fewer than the budget (13).
  for (const std::int64_t target : {7, 15})
    for (const final_phase_rule rule : {final_phase_rule::peft, final_phase_rule::loralib})
      for (const tie_policy ties : {tie_policy::prune_all_ties, tie_policy::exact_budget}) {
        CAPTURE(target, rule == final_phase_rule::peft ? "peft" : "loralib",
                ties == tie_policy::exact_budget ? "exact_budget" : "prune_all_ties");
        const run_result masked = run({rule, ties, storage::owners, default_layers, target}, -1);
        REQUIRE(masked.compacted_at == -1);
        const auto zero_target_kept = std::count(masked.final_mask[1].begin(), masked.final_mask[1].end(), 1);
        if (target == 7) REQUIRE(zero_target_kept == 0);
        if (target == 15 && ties == tie_policy::prune_all_ties) REQUIRE(zero_target_kept == 0);
        for (const storage store : {storage::owners, storage::raw_buffers, storage::eigen})
          // Compacting as soon as allowed, and later in the final phase.
          for (const std::int64_t from : {std::int64_t{0}, std::int64_t{50}}) {
            CAPTURE(name_of(store), from);
            const run_result compacted = run({rule, ties, store, default_layers, target}, from);
            REQUIRE(compacted.compacted_at >= from);
            REQUIRE(compacted.compacted_at < trainer::total_steps - 1);
            CHECK(compacted.missing_ok);
            // Every step, before and after the compaction, decided the same.
            REQUIRE(compacted.steps.size() == masked.steps.size());
            for (std::size_t t = 0; t < masked.steps.size(); ++t) {
              CAPTURE(t);
              CHECK(compacted.steps[t] == masked.steps[t]);
            }
            for (std::size_t a = 0; a < masked.final_mask.size(); ++a) {
              CAPTURE(a);
              const auto kept = std::count(masked.final_mask[a].begin(), masked.final_mask[a].end(), 1);
              CHECK(compacted.ranks[a] == kept);  // only the kept triplets are left
              CHECK(same_bits(compacted.params[a], masked.params[a]));
              CHECK(same_bits(compacted.moment1[a], masked.moment1[a]));
              CHECK(same_bits(compacted.moment2[a], masked.moment2[a]));
              CHECK(same_bits(compacted.deltas[a], masked.deltas[a]));
            }
            CHECK(compacted.ranks[1] == zero_target_kept);
          }
      }
}

TEST_CASE("after compact() the allocator holds the kept triplets' state, scores and pattern",
          "[compaction][allocator]") {
  using K = std::integral_constant<std::size_t, allocator_t::metric_type::state_size>;
  for (const final_phase_rule rule : {final_phase_rule::peft, final_phase_rule::loralib}) {
    CAPTURE(rule == final_phase_rule::peft ? "peft" : "loralib");
    trainer tr({rule, tie_policy::exact_budget, storage::owners, default_layers});
    allocator_t& alloc = *tr.alloc;
    std::int64_t t = 0;
    for (; !alloc.pattern_final(); ++t) {
      REQUIRE(t < trainer::total_steps);
      tr.step(t);
      tr.zero_grads();
    }
    // The pattern is final from PEFT's force mask at T − tfinal, and from loralib's first mask
    // with frozen importance (the first step after T − tfinal where the schedule masks).
    const std::int64_t final_start = trainer::schedule().total_step - trainer::schedule().tfinal;
    CHECK(t - 1 == (rule == final_phase_rule::peft ? final_start : final_start + 1));

    const std::size_t n = alloc.num_adapters();
    std::vector<std::vector<std::uint8_t>> mask(n);
    std::vector<std::vector<double>> scores(n);
    std::vector<std::vector<float>> state_a(n), state_e(n), state_b(n);
    std::int64_t kept_total = 0;
    for (std::size_t a = 0; a < n; ++a) {
      mask[a].assign(alloc.kept_mask(a).begin(), alloc.kept_mask(a).end());
      scores[a].assign(alloc.triplet_scores(a).begin(), alloc.triplet_scores(a).end());
      state_a[a].assign(alloc.state(a, adalora::tensor_role::A).begin(), alloc.state(a, adalora::tensor_role::A).end());
      state_e[a].assign(alloc.state(a, adalora::tensor_role::E).begin(), alloc.state(a, adalora::tensor_role::E).end());
      state_b[a].assign(alloc.state(a, adalora::tensor_role::B).begin(), alloc.state(a, adalora::tensor_role::B).end());
      kept_total += std::count(mask[a].begin(), mask[a].end(), 1);
    }
    REQUIRE(kept_total == trainer::schedule().target_budget);

    const rank_change change = tr.compact();
    CHECK(alloc.total_rank() == kept_total);
    CHECK(alloc.initial_budget() == 18);  // b0 stays the constructor's
    CHECK(alloc.last_result().kept_total == kept_total);
    bool any_state = false;
    for (std::size_t a = 0; a < n; ++a) {
      CAPTURE(a);
      // The map is the kept mask's, and the ranks follow it.
      std::vector<index_t> expected_source;
      for (std::size_t i = 0; i < mask[a].size(); ++i)
        if (mask[a][i]) expected_source.push_back(static_cast<index_t>(i));
      CHECK(change[a].source == expected_source);
      CHECK(change[a].old_rank == default_layers[a].rank);
      const auto k = static_cast<index_t>(expected_source.size());
      CHECK(alloc.shapes()[a].rank == k);
      CHECK(tr.set.shapes()[a].rank == k);
      CHECK(alloc.last_result().kept[a] == k);
      const auto now = alloc.kept_mask(a);
      CHECK(std::vector<std::uint8_t>(now.begin(), now.end()) == std::vector<std::uint8_t>(static_cast<std::size_t>(k), 1));
      // Scores and state, gathered from the old layout by index: A r × in, E r, B out × r, each
      // element holding state_size values.
      const index_t in = default_layers[a].in, out = default_layers[a].out, r0 = default_layers[a].rank;
      std::vector<double> want_scores;
      std::vector<float> want_a, want_e, want_b;
      for (const index_t s : expected_source) {
        want_scores.push_back(scores[a][static_cast<std::size_t>(s)]);
        for (std::size_t q = 0; q < static_cast<std::size_t>(in) * K::value; ++q)
          want_a.push_back(state_a[a][static_cast<std::size_t>(s * in) * K::value + q]);
        for (std::size_t q = 0; q < K::value; ++q)
          want_e.push_back(state_e[a][static_cast<std::size_t>(s) * K::value + q]);
      }
      for (index_t o = 0; o < out; ++o)
        for (const index_t s : expected_source)
          for (std::size_t q = 0; q < K::value; ++q)
            want_b.push_back(state_b[a][static_cast<std::size_t>(o * r0 + s) * K::value + q]);
      const auto got_scores = alloc.triplet_scores(a);
      CHECK(std::vector<double>(got_scores.begin(), got_scores.end()) == want_scores);
      const auto sa = alloc.state(a, adalora::tensor_role::A), se = alloc.state(a, adalora::tensor_role::E),
                 sb = alloc.state(a, adalora::tensor_role::B);
      CHECK(same_bits(std::vector<float>(sa.begin(), sa.end()), want_a));
      CHECK(same_bits(std::vector<float>(se.begin(), se.end()), want_e));
      CHECK(same_bits(std::vector<float>(sb.begin(), sb.end()), want_b));
      for (float x : want_a) any_state = any_state || x != 0.0f;
    }
    // PEFT resets the importance state at its force mask; loralib keeps it frozen, so there the
    // gathered state is not trivially zero.
    CHECK(any_state == (rule == final_phase_rule::loralib));
    const adalora::rank_pattern pattern = alloc.pattern();
    CHECK(pattern.total_kept() == kept_total);
    for (const auto& entry : pattern.entries())
      CHECK(std::count(entry.kept.begin(), entry.kept.end(), false) == 0);

    // The allocator goes on at the new ranks; every later step keeps every triplet.
    for (; t < trainer::total_steps; ++t) {
      const auto& r = tr.step(t);
      CHECK(r.kept_total == kept_total);
      tr.zero_grads();
    }
  }
}

TEST_CASE("changes the allocator refuses leave it unchanged", "[compaction][allocator][errors]") {
  trainer tr({final_phase_rule::loralib, tie_policy::prune_all_ties, storage::owners, default_layers});
  trainer twin({final_phase_rule::loralib, tie_policy::prune_all_ties, storage::owners, default_layers});
  allocator_t& alloc = *tr.alloc;
  auto snapshot = [&] {
    std::ostringstream s;
    s << alloc.total_rank() << '|' << alloc.last_step() << '|' << describe(alloc.last_result()) << '|';
    for (std::size_t a = 0; a < alloc.num_adapters(); ++a) {
      s << alloc.shapes()[a].rank << ':';
      for (auto k : alloc.kept_mask(a)) s << int(k);
      for (double x : alloc.triplet_scores(a)) s << ',' << x;
      for (const auto role : {adalora::tensor_role::A, adalora::tensor_role::E, adalora::tensor_role::B})
        for (float x : alloc.state(a, role)) s << ';' << x;
    }
    return s.str();
  };
  auto identity = [&] {
    rank_change c;
    for (const auto& s : alloc.shapes()) c.push_back(triplet_map::appending(s.rank, 0));
    return c;
  };

  for (std::int64_t t = 0; t < trainer::total_steps; ++t) {
    tr.step(t);
    twin.step(t);
    if (t == 20) {  // in the reduction phase: the pattern can still change
      const std::string before = snapshot();
      REQUIRE_FALSE(alloc.pattern_final());
      REQUIRE_THROWS_AS(alloc.compact(), std::invalid_argument);
      REQUIRE_THROWS_WITH(alloc.compact(), Catch::Contains("rank_allocator::compact") &&
                                               Catch::Contains("not final") &&
                                               Catch::Contains("could still come back"));
      // Maps that do not fit: one too few, a wrong old rank, a bad order in the last adapter
      // only (all-or-nothing: the valid maps before it are not applied either).
      rank_change c = identity();
      c.pop_back();
      REQUIRE_THROWS_WITH(alloc.change_rank(c), Catch::Contains("change_rank") &&
                                                    Catch::Contains("one map per adapter, 4, got 3"));
      c = identity();
      c[2].old_rank = 5;
      REQUIRE_THROWS_WITH(alloc.change_rank(c), Catch::Contains("adapter 2 ('layer2')") &&
                                                    Catch::Contains("old rank must be its rank 4, got 5"));
      c = identity();
      c[0] = triplet_map::keeping(std::vector<bool>{true, false, true, true, true, true});
      c[3].source = {2, 1};
      REQUIRE_THROWS_WITH(alloc.change_rank(c), Catch::Contains("change_rank") && Catch::Contains("increase"));
      REQUIRE_THROWS_WITH(alloc.grow(std::vector<index_t>{1, 0}),
                          Catch::Contains("rank_allocator::grow") && Catch::Contains("one count per adapter, 4, got 2"));
      REQUIRE_THROWS_WITH(alloc.grow(std::vector<index_t>{1, -1, 0, 0}),
                          Catch::Contains("adapter 1 ('layer1')") && Catch::Contains(">= 0, got -1"));
      CHECK(snapshot() == before);
    }
    if (t == 39) {  // the next step is T − tfinal: from the final phase on the pattern is fixed
      const std::string before = snapshot();
      REQUIRE_THROWS_WITH(alloc.grow(std::vector<index_t>{0, 0, 1, 0}),
                          Catch::Contains("no triplet can be added from the final phase on") &&
                              Catch::Contains("step 40"));
      CHECK(snapshot() == before);
    }
    if (t == 45) {
      REQUIRE(alloc.pattern_final());
      const std::string before = snapshot();
      REQUIRE_THROWS_WITH(alloc.grow(std::vector<index_t>{1, 0, 0, 0}), Catch::Contains("final phase"));
      CHECK(snapshot() == before);
    }
    tr.zero_grads();
    twin.zero_grads();
  }
  // The refused calls changed nothing that later steps could see.
  CHECK(describe(alloc.last_result()) == describe(twin.alloc->last_result()));
  for (std::size_t a = 0; a < alloc.num_adapters(); ++a)
    CHECK(same_bits(take(tr.layers[a].P), take(twin.layers[a].P)));
}

namespace {

/// Gradients that are a fixed function of the step, for allocators whose training does not
/// matter (the refusals below).
void fake_gradients(const svd_adapter_ref<float>& g, std::int64_t t) {
  const float s = 0.01f * float(t + 1);
  for (index_t i = 0; i < g.A.rows(); ++i)
    for (index_t j = 0; j < g.A.cols(); ++j) g.A(i, j) = s * float((i * 7 + j + t) % 11) - 0.05f;
  for (index_t i = 0; i < g.E.size(); ++i) g.E[i] = s * float((i * 3 + t) % 5);
  for (index_t o = 0; o < g.B.rows(); ++o)
    for (index_t i = 0; i < g.B.cols(); ++i) g.B(o, i) = s * float((o * 5 + i + t) % 13) - 0.02f;
}

adalora::cubic_schedule small_schedule() {
  return adalora::cubic_schedule({.target_budget = 3, .total_step = 30, .tinit = 2, .tfinal = 10, .delta_t = 2});
}

}  // namespace

TEST_CASE("a sharded allocator refuses to change rank", "[compaction][allocator][errors]") {
  // Adapter k is held in part: triplets [2, 4) of its 4.
  std::vector<adalora::adapter_shape> shapes = {
      {"q", 8, 6, 4, {}}, {"k", 8, 6, 4, {.triplet_begin = 2, .triplet_count = 2}}};
  adalora::svd_adapter<float> q(8, 6, 4, 4.0), k_shard(8, 6, 2, 4.0);
  std::mt19937_64 rng(2);
  q.initialize(rng);
  k_shard.initialize(rng);
  std::vector<adalora::adapter_tensors<float>> views = {{q.params(), q.grads()}, {k_shard.params(), k_shard.grads()}};
  allocator_t alloc(shapes, small_schedule());
  for (std::int64_t t = 0; !alloc.pattern_final(); ++t) {
    REQUIRE(t < 30);
    fake_gradients(q.grads(), t);
    fake_gradients(k_shard.grads(), t);
    alloc.step(t, views);
  }
  const auto kept_before = alloc.last_result().kept_total;
  REQUIRE_THROWS_AS(alloc.compact(), std::invalid_argument);
  REQUIRE_THROWS_WITH(alloc.compact(), Catch::Contains("rank_allocator::change_rank") &&
                                           Catch::Contains("adapter 1 ('k') is sharded"));
  REQUIRE_THROWS_WITH(alloc.change_rank({triplet_map::appending(4, 0), triplet_map::appending(4, 0)}),
                      Catch::Contains("sharded"));
  CHECK(alloc.total_rank() == 8);
  CHECK(alloc.shapes()[0].rank == 4);
  CHECK(alloc.last_result().kept_total == kept_before);

  // The set refuses too: its shard's rank cannot change in place or by replacement.
  adalora::adapter_set<float> set;
  set.add(shapes[1], k_shard.params(), k_shard.grads());
  REQUIRE_THROWS_WITH(set.compact({triplet_map::keeping(std::vector<bool>{true, false, true, true})}),
                      Catch::Contains("adapter_set::compact") && Catch::Contains("sharded"));
  REQUIRE_THROWS_WITH(set.replace(0, k_shard.params(), k_shard.grads()), Catch::Contains("sharded"));
  CHECK(set.shapes()[0].rank == 4);
}

TEST_CASE("a multi-process allocator refuses to change rank", "[compaction][allocator][errors]") {
  using comm_allocator = adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
                                                 adalora::testing::in_process_communicator>;
  // Catch2's assertions are not thread-safe: the participant records, the test thread checks.
  std::string compact_error, change_error;
  bool was_final = false;
  std::int64_t total_after = -1;
  adalora::testing::in_process_group group(1);
  group.run([&](adalora::testing::in_process_communicator comm) {
    adalora::svd_adapter<float> q(8, 6, 4, 4.0);
    std::mt19937_64 rng(4);
    q.initialize(rng);
    comm_allocator alloc(std::vector<adalora::adapter_shape>{{"q", 8, 6, 4, {}}}, small_schedule(), {}, {}, comm);
    const std::vector<adalora::adapter_tensors<float>> views = {{q.params(), q.grads()}};
    for (std::int64_t t = 0; t < 30 && !alloc.pattern_final(); ++t) {
      fake_gradients(q.grads(), t);
      alloc.step(t, views);
    }
    was_final = alloc.pattern_final();
    try {
      alloc.compact();
    } catch (const std::invalid_argument& e) {
      compact_error = e.what();
    }
    try {
      alloc.change_rank({triplet_map::appending(4, 0)});
    } catch (const std::invalid_argument& e) {
      change_error = e.what();
    }
    total_after = alloc.total_rank();
  });
  REQUIRE(was_final);
  CHECK_THAT(compact_error, Catch::Contains("rank_allocator::change_rank") && Catch::Contains("multi-process"));
  CHECK_THAT(change_error, Catch::Contains("multi-process"));
  CHECK(total_after == 4);
}

TEST_CASE("adapter_set::compact moves the user's tensors; stale views are refused",
          "[compaction][adapter_set]") {
  for (const storage store : {storage::raw_buffers, storage::eigen}) {
    CAPTURE(name_of(store));
    trainer tr({final_phase_rule::peft, tie_policy::exact_budget, store, default_layers});
    std::int64_t t = 0;
    for (; !tr.alloc->pattern_final(); ++t) {
      tr.step(t);
      tr.zero_grads();
    }
    // Gradients of one more step, kept (not zeroed) so that their compaction is seen.
    tr.step(t++);
    std::vector<triplets> params, grads;
    std::vector<std::vector<std::uint8_t>> masks;
    for (std::size_t a = 0; a < tr.layers.size(); ++a) {
      masks.emplace_back(tr.alloc->kept_mask(a).begin(), tr.alloc->kept_mask(a).end());
      params.push_back(take(tr.layers[a].P, masks[a]));
      grads.push_back(take(tr.layers[a].G, masks[a]));
    }
    const adalora::adapter_set<float> stale = tr.set;

    // Refused before anything moves: one map too few, a map that adds, a wrong old rank.
    const rank_change good = [&] {
      rank_change c;
      for (const auto& m : masks) c.push_back(triplet_map::keeping(m));
      return c;
    }();
    rank_change bad = good;
    bad.pop_back();
    REQUIRE_THROWS_WITH(tr.set.compact(bad), Catch::Contains("adapter_set::compact") &&
                                                 Catch::Contains("one map per adapter, 4, got 3"));
    bad = good;
    bad[3] = triplet_map::appending(3, 1);
    REQUIRE_THROWS_WITH(tr.set.compact(bad), Catch::Contains("adapter_set::compact") && Catch::Contains("only drops"));
    bad = good;
    bad[2].old_rank = 3;
    REQUIRE_THROWS_WITH(tr.set.compact(bad), Catch::Contains("adapter 2 ('layer2')") &&
                                                 Catch::Contains("old rank must be its rank 4, got 3"));
    for (std::size_t a = 0; a < tr.layers.size(); ++a) {
      CHECK(tr.set.shapes()[a].rank == default_layers[a].rank);
      CHECK(same_bits(take(tr.set.params()[a], masks[a]), params[a]));
    }

    const rank_change change = tr.compact();  // set.compact and the moments
    REQUIRE(change.size() == good.size());
    for (std::size_t a = 0; a < change.size(); ++a) {
      CHECK(change[a].old_rank == good[a].old_rank);
      CHECK(change[a].source == good[a].source);
    }
    std::int64_t total = 0;
    for (std::size_t a = 0; a < tr.layers.size(); ++a) {
      CAPTURE(a);
      CHECK(same_bits(take(tr.set.params()[a]), params[a]));
      CHECK(same_bits(take(tr.set.grads()[a]), grads[a]));
      total += tr.set.shapes()[a].rank;
    }
    CHECK(tr.set.total_rank() == total);
    CHECK(total == tr.alloc->total_rank());
    tr.zero_grads();

    // The views from before the compaction no longer fit: the step says so and changes nothing.
    REQUIRE_THROWS_WITH(tr.alloc->step(t, stale), Catch::Contains("rank_allocator::step") &&
                                                      Catch::Contains("adapter 0 ('layer0'): A must be"));
    CHECK(tr.alloc->last_step() == t - 1);
    for (; t < trainer::total_steps; ++t) {
      CHECK(tr.step(t).kept_total == total);
      tr.zero_grads();
    }
  }
}

TEST_CASE("growth mid-training: new triplets start with zero state, the function does not jump",
          "[compaction][growth]") {
  // A fifth adapter starts at rank 0 and grows.
  std::vector<layer_spec> layers = default_layers;
  layers.push_back({6, 5, 0, 2});
  for (const storage store : {storage::owners, storage::raw_buffers, storage::eigen}) {
    CAPTURE(name_of(store));
    trainer tr({final_phase_rule::peft, tie_policy::exact_budget, store, layers});
    allocator_t& alloc = *tr.alloc;
    const std::int64_t grow_at = 20;
    for (std::int64_t t = 0; t < grow_at; ++t) {
      tr.step(t);
      tr.zero_grads();
    }
    const std::vector<index_t> add = {1, 0, 2, 0, 3};
    std::vector<std::vector<float>> deltas, state_a, state_b;
    std::vector<std::vector<double>> scores;
    for (std::size_t a = 0; a < layers.size(); ++a) {
      deltas.push_back(tr.delta(a));
      state_a.emplace_back(alloc.state(a, adalora::tensor_role::A).begin(), alloc.state(a, adalora::tensor_role::A).end());
      state_b.emplace_back(alloc.state(a, adalora::tensor_role::B).begin(), alloc.state(a, adalora::tensor_role::B).end());
      scores.emplace_back(alloc.triplet_scores(a).begin(), alloc.triplet_scores(a).end());
    }
    const std::int64_t before = alloc.total_rank();
    const rank_change change = tr.grow(add);
    REQUIRE(alloc.total_rank() == before + 6);
    CHECK(alloc.initial_budget() == 18);
    for (std::size_t a = 0; a < layers.size(); ++a) {
      CAPTURE(a);
      const index_t r0 = layers[a].rank, r1 = r0 + add[a], in = layers[a].in, out = layers[a].out;
      CHECK(change[a].source.size() == static_cast<std::size_t>(r1));
      CHECK(alloc.shapes()[a].rank == r1);
      CHECK(tr.set.shapes()[a].rank == r1);
      CHECK(tr.layers[a].P.rank() == r1);
      CHECK(same_bits(tr.delta(a), deltas[a]));  // E = 0 for the new triplets
      // Old triplets' state and scores where they were (rows of A first, then zeros), and
      // zeros for the new ones; B's state interleaves old and new per row.
      const auto K = allocator_t::metric_type::state_size;
      const auto sa = alloc.state(a, adalora::tensor_role::A), sb = alloc.state(a, adalora::tensor_role::B);
      std::vector<float> want_a = state_a[a], want_b;
      want_a.resize(static_cast<std::size_t>(r1 * in) * K, 0.0f);
      for (index_t o = 0; o < out; ++o)
        for (index_t i = 0; i < r1; ++i)
          for (std::size_t q = 0; q < K; ++q)
            want_b.push_back(i < r0 ? state_b[a][static_cast<std::size_t>(o * r0 + i) * K + q] : 0.0f);
      CHECK(same_bits(std::vector<float>(sa.begin(), sa.end()), want_a));
      CHECK(same_bits(std::vector<float>(sb.begin(), sb.end()), want_b));
      std::vector<double> want_scores = scores[a];
      want_scores.resize(static_cast<std::size_t>(r1), 0.0);
      const auto sc = alloc.triplet_scores(a);
      CHECK(std::vector<double>(sc.begin(), sc.end()) == want_scores);
      for (index_t i = r0; i < r1; ++i) CHECK(alloc.kept_mask(a)[static_cast<std::size_t>(i)] == 1);
      // The user's new tensors: zero gradients and moments for the new triplets.
      for (index_t i = r0; i < r1; ++i) {
        CHECK(tr.layers[a].P.E[i] == 0.0f);
        CHECK(tr.layers[a].M.E[i] == 0.0f);
        CHECK(tr.layers[a].V.A(i, 0) == 0.0f);
        CHECK(tr.layers[a].G.B(0, i) == 0.0f);
      }
    }

    // Training goes on; the next mask prunes total rank − budget, and the end is at the target.
    bool masked_after_growth = false;
    for (std::int64_t t = grow_at; t < trainer::total_steps; ++t) {
      const std::int64_t total = alloc.total_rank();
      const auto& r = tr.step(t);
      if (!masked_after_growth && r.action == adalora::mask_action::threshold) {
        CHECK(r.prune_count == total - r.budget);
        masked_after_growth = true;
      }
      if (alloc.pattern_final() && alloc.total_rank() > r.kept_total) tr.compact();
      tr.zero_grads();
    }
    CHECK(masked_after_growth);
    CHECK(alloc.last_result().kept_total == trainer::schedule().target_budget);
    CHECK(alloc.total_rank() == trainer::schedule().target_budget);
  }
}
