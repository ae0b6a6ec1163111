// Checkpoints: resume bit for bit, refuse damaged or foreign files with a message that says what
// is wrong while leaving the allocator unchanged, and never lose the previous file to a failed
// save.

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <limits>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <thread>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/sensitivity.hpp"
#include "adalora/io/checkpoint.hpp"
#include "adalora/rank_allocator.hpp"
#include "tests/checkpoint_run.hpp"

namespace {

using adalora::index_t;
using bytes_t = std::vector<std::uint8_t>;
using kind = adalora::checkpoint_error::kind;

using namespace checkpoint_run;

/// The user's side of the run: parameters and gradients of every adapter, SGD on them.
template <class T>
struct model {
  struct adapter {
    std::vector<T> A, E, B, gA, gE, gB;
  };
  std::vector<adalora::adapter_shape> shapes;
  std::uint64_t seed;
  std::vector<adapter> adapters;

  explicit model(std::vector<adalora::adapter_shape> s = run_shapes, std::uint64_t seed_ = 0)
      : shapes(std::move(s)), seed(seed_) {
    for (std::size_t a = 0; a < shapes.size(); ++a) {
      const auto& sh = shapes[a];
      adapter x;
      x.A.resize(static_cast<std::size_t>(sh.rank * sh.in_features));
      x.E.resize(static_cast<std::size_t>(sh.rank));
      x.B.resize(static_cast<std::size_t>(sh.out_features * sh.rank));
      for (std::size_t i = 0; i < x.A.size(); ++i) x.A[i] = T(noise(seed, a, 0, i));
      for (std::size_t i = 0; i < x.E.size(); ++i) x.E[i] = T(noise(seed, a, 1, i));
      for (std::size_t i = 0; i < x.B.size(); ++i) x.B[i] = T(noise(seed, a, 2, i));
      x.gA.resize(x.A.size());
      x.gE.resize(x.E.size());
      x.gB.resize(x.B.size());
      adapters.push_back(std::move(x));
    }
  }

  /// Gradients of step t (one NaN at steps 7 and 20, which the default policy skips over), then
  /// an SGD step.
  void train_step(std::int64_t t) {
    for (std::size_t a = 0; a < adapters.size(); ++a) {
      auto& x = adapters[a];
      const auto step = (seed << 32) + static_cast<std::uint64_t>(t) + 1;
      std::vector<T>* g[] = {&x.gA, &x.gE, &x.gB};
      std::vector<T>* p[] = {&x.A, &x.E, &x.B};
      for (std::size_t role = 0; role < 3; ++role)
        for (std::size_t i = 0; i < g[role]->size(); ++i) {
          (*g[role])[i] = T(noise(step, a, role, i));
          (*p[role])[i] = (*p[role])[i] - T(0.125) * (*g[role])[i];
        }
      if ((t == 7 || t == 20) && a == 1 && x.gB.size() > 3) x.gB[3] = std::numeric_limits<T>::quiet_NaN();
    }
  }

  std::vector<adalora::adapter_tensors<T>> views() {
    std::vector<adalora::adapter_tensors<T>> v;
    for (std::size_t a = 0; a < adapters.size(); ++a) {
      const auto& s = shapes[a];
      auto& x = adapters[a];
      v.push_back({{adalora::make_matrix_view(x.A.data(), s.rank, s.in_features),
                    adalora::vector_view<T>(x.E.data(), s.rank),
                    adalora::make_matrix_view(x.B.data(), s.out_features, s.rank)},
                   {adalora::make_matrix_view<const T>(x.gA.data(), s.rank, s.in_features),
                    adalora::vector_view<const T>(x.gE.data(), s.rank),
                    adalora::make_matrix_view<const T>(x.gB.data(), s.out_features, s.rank)}});
    }
    return v;
  }
};

/// Appends what step t did: the allocator's snapshot and every E value.
template <class T, class A>
void record(std::vector<std::uint64_t>& trace, const A& alloc, const model<T>& m) {
  const auto s = snapshot(alloc);
  trace.insert(trace.end(), s.begin(), s.end());
  for (const auto& x : m.adapters)
    for (T e : x.E) trace.push_back(bits(e));
}

std::filesystem::path temp_dir(const std::string& name) {
  const char* bazel = std::getenv("TEST_TMPDIR");
  const auto base = bazel ? std::filesystem::path(bazel) : std::filesystem::temp_directory_path();
  const auto dir = base / ("adalora_checkpoint_test_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

bytes_t file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return bytes_t(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::string> dir_entries(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

/// Runs total_steps straight, and again as k steps, save, load into a fresh allocator (with
/// `resume_threads` threads), the rest; the two traces must agree bit for bit.
template <class T>
void check_resume(adalora::allocator_options o, std::int64_t k, via how, unsigned resume_threads = 1) {
  std::vector<std::uint64_t> straight, resumed;
  {
    model<T> m;
    auto views = m.views();
    auto alloc = make_allocator<T>(o);
    for (std::int64_t t = 0; t < total_steps; ++t) {
      m.train_step(t);
      alloc.step(t, views);
      record(straight, alloc, m);
    }
  }
  model<T> m;
  auto views = m.views();
  const auto dir = temp_dir("resume");
  const std::string path = (dir / "allocator.ckpt").string();
  bytes_t saved;
  std::vector<std::uint64_t> at_save;
  {
    auto first = make_allocator<T>(o);
    for (std::int64_t t = 0; t < k; ++t) {
      m.train_step(t);
      first.step(t, views);
      record(resumed, first, m);
    }
    at_save = snapshot(first);
    saved = save_via(how, first, path);
  }  // the first allocator is gone: nothing but the checkpoint carries over

  auto resume = [&](allocator_t<T>& second) {
    load_via(how, second, saved, path);
    REQUIRE(first_difference(snapshot(second), at_save) == -1);
    for (std::int64_t t = k; t < total_steps; ++t) {
      m.train_step(t);
      second.step(t, views);
      record(resumed, second, m);
    }
  };
  if (how == via::file_and_config) {
    auto c = adalora::read_checkpoint_config<T>(path);
    REQUIRE(c.shapes.size() == run_shapes.size());
    REQUIRE(c.options.final_phase == o.final_phase);
    c.options.threads = resume_threads;
    allocator_t<T> second(c.shapes, c.schedule, c.metric, c.options);
    resume(second);
  } else {
    auto second = make_allocator<T>(o, resume_threads);
    resume(second);
  }
  INFO("first difference at trace entry " << first_difference(straight, resumed) << " of "
                                          << straight.size());
  REQUIRE(first_difference(straight, resumed) == -1);
}

/// An allocator of the run's configuration after `steps` steps (its own model).
template <class T>
struct stepped {
  model<T> m;
  std::vector<adalora::adapter_tensors<T>> views = m.views();
  allocator_t<T> alloc;
  explicit stepped(std::int64_t steps, adalora::allocator_options o = {}) : alloc(make_allocator<T>(o)) {
    for (std::int64_t t = 0; t < steps; ++t) {
      m.train_step(t);
      alloc.step(t, views);
    }
  }
};

}  // namespace

TEMPLATE_TEST_CASE("resume equals a straight run bit for bit, in every phase and both semantics",
                   "[checkpoint][resume]", float, double) {
  using T = TestType;
  // k = steps done before the save: 0 (nothing yet), inside the warm-up (3), at its last step
  // (6: steps 0..5 done), inside the reduction right after a mask (10) and between masks (13),
  // right after T - tfinal (24: PEFT's force mask done), and inside the final phase (28).
  const std::int64_t ks[] = {0, 3, 6, 10, 13, 24, 28};
  const via hows[] = {via::bytes, via::file, via::stream, via::file_and_config};
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    for (std::size_t i = 0; i < std::size(ks); ++i) {
      INFO((semantics == adalora::final_phase_rule::peft ? "peft" : "loralib") << ", k = " << ks[i]);
      check_resume<T>({.final_phase = semantics}, ks[i], hows[i % std::size(hows)]);
    }
  }
}

TEMPLATE_TEST_CASE("resume is exact with other policies and another thread count",
                   "[checkpoint][resume]", float, double) {
  using T = TestType;
  // exact_budget ties and skip_step (the NaN steps are skipped whole); the resumed allocator
  // runs with 2 threads, which must not change a bit.
  const adalora::allocator_options o = {.final_phase = adalora::final_phase_rule::peft,
                                        .ties = adalora::tie_policy::exact_budget,
                                        .non_finite = adalora::non_finite_policy::skip_step};
  for (std::int64_t k : {8, 21, 25}) {
    INFO("k = " << k);
    check_resume<T>(o, k, via::file_and_config, 2);
    check_resume<T>({.final_phase = adalora::final_phase_rule::loralib}, k, via::bytes, 2);
  }
}

TEST_CASE("a checkpoint is little-endian with the documented header", "[checkpoint][format]") {
  stepped<float> s(13);
  const bytes_t b = adalora::checkpoint_bytes(s.alloc);
  REQUIRE(std::string(b.begin(), b.begin() + 8) == "ADALCKPT");
  REQUIRE(b[8] == 2);  // version 2, little-endian u32
  REQUIRE((b[9] | b[10] | b[11]) == 0);
  REQUIRE((b[12] | b[13] | b[14] | b[15]) == 0);  // flags
  std::uint64_t payload = 0;
  for (int i = 0; i < 8; ++i) payload |= std::uint64_t{b[16 + static_cast<std::size_t>(i)]} << (8 * i);
  REQUIRE(payload == b.size() - 32);
  REQUIRE(b[32] == 4);  // element type: float32
  // The CRC-32 is the common one (zlib's): the check value of "123456789" is 0xCBF43926.
  const std::string check = "123456789";
  REQUIRE(adalora::detail::ckpt::crc32(std::span<const std::uint8_t>(
              reinterpret_cast<const std::uint8_t*>(check.data()), check.size())) == 0xCBF43926u);
  // Same state, same bytes: the encoding is deterministic.
  stepped<float> twin(13);
  REQUIRE(adalora::checkpoint_bytes(twin.alloc) == b);
}

TEST_CASE("damaged checkpoints are refused with what is wrong; the allocator is unchanged",
          "[checkpoint][errors]") {
  const bytes_t good = adalora::checkpoint_bytes(stepped<float>(13).alloc);
  stepped<float> target(5);  // a live allocator in another state, which a failed load must keep
  const auto before = snapshot(target.alloc);
  auto unchanged = [&] { return first_difference(snapshot(target.alloc), before) == -1; };
  auto load = [&](const bytes_t& b) { adalora::load_checkpoint_bytes(target.alloc, b); };
  auto kind_of = [&](const bytes_t& b) {
    try {
      load(b);
    } catch (const adalora::checkpoint_error& e) {
      return e.error_kind();
    }
    FAIL("loaded a damaged checkpoint");
    return kind::io;
  };

  SECTION("truncated at every length") {
    REQUIRE_THROWS_WITH(load({}), Catch::Contains("load_checkpoint") && Catch::Contains("empty"));
    REQUIRE_THROWS_WITH(load(bytes_t(good.begin(), good.begin() + 20)),
                        Catch::Contains("truncated") && Catch::Contains("20 bytes, fewer than the 32-byte header"));
    REQUIRE_THROWS_WITH(load(bytes_t(good.begin(), good.end() - 1)),
                        Catch::Contains("truncated") &&
                            Catch::Contains("announces " + std::to_string(good.size() - 32) +
                                            " payload bytes, only " + std::to_string(good.size() - 33)));
    for (std::size_t n = 0; n < good.size(); ++n) {
      INFO("length " << n);
      REQUIRE(kind_of(bytes_t(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n))) == kind::truncated);
    }
    REQUIRE(unchanged());
  }
  SECTION("a flipped bit anywhere") {
    for (std::size_t i = 0; i < good.size(); ++i) {
      INFO("byte " << i);
      bytes_t b = good;
      b[i] ^= static_cast<std::uint8_t>(1u << (i % 8));
      REQUIRE(kind_of(b) == (i < 8 ? kind::not_a_checkpoint : kind::corrupt));
    }
    bytes_t b = good;
    b[100] ^= 0x10;
    REQUIRE_THROWS_WITH(load(b), Catch::Contains("corrupt") && Catch::Contains("payload checksum"));
    b = good;
    b[17] ^= 0x01;  // the payload size: corruption, not a truncation
    REQUIRE_THROWS_WITH(load(b), Catch::Contains("header is corrupt"));
    REQUIRE(unchanged());
  }
  SECTION("from a newer version, or with unknown flags") {
    bytes_t b = good;
    b[8] = 3;
    adalora::detail::ckpt::seal(b);  // so that the edit reaches the checks behind the checksums
    REQUIRE_THROWS_WITH(load(b), Catch::Contains("format version 3, newer than this adalora reads (2)"));
    REQUIRE(kind_of(b) == kind::unsupported_version);
    b = good;
    b[12] = 4;
    adalora::detail::ckpt::seal(b);
    REQUIRE_THROWS_WITH(load(b), Catch::Contains("flags 0x4"));
    REQUIRE(unchanged());
  }
  SECTION("not a checkpoint, or with bytes after its end") {
    const std::string json = R"({"layers.0.q.lora_E": [true, false]})";
    REQUIRE_THROWS_WITH(load(bytes_t(json.begin(), json.end())),
                        Catch::Contains("not an adalora checkpoint"));
    bytes_t b = good;
    b.push_back(0);
    REQUIRE_THROWS_WITH(load(b), Catch::Contains("1 bytes after the end of the payload"));
    REQUIRE(unchanged());
  }
  SECTION("values out of range behind valid checksums (a hostile file)") {
    using adalora::detail::ckpt::encode;
    using adalora::detail::ckpt::parse;
    auto edited = [&](auto edit) {
      auto im = parse<float>(good);
      edit(im);
      return encode(im);
    };
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.kept[2] = 2; })),
                        Catch::Contains("kept mask entry 2 must be 0 or 1, got 2"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.metric_state[7] = std::numeric_limits<float>::infinity(); })),
                        Catch::Contains("metric state value 7 is not finite"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.metric_state.pop_back(); })),
                        Catch::Contains("the metric state has") && Catch::Contains("values each make"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.scores[0] = -1; })),
                        Catch::Contains("triplet score 0 must be >= 0"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.last_step = -3; im.last.step = -3; })),
                        Catch::Contains("last step must be >= -1, got -3"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.last.step = 2; })),
                        Catch::Contains("the last result is of step 2, the last step is 12"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.force_masked = true; })),
                        Catch::Contains("final-phase flag is set at step 12, before the final phase starts (step 23)"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.options.threads = 0; })),
                        Catch::Contains("threads must be in [1, 65536], got 0"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.shapes[1].in_features = -4; })),
                        Catch::Contains("adapter 1 ('layers.0.v') has in_features -4"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) {
                          im.shapes[0].rank = std::int64_t{1} << 61;
                          im.shapes[0].shard.triplet_count = std::int64_t{1} << 61;
                        })),
                        Catch::Contains("overflows"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.schedule_options.pop_back(); })),
                        Catch::Contains("the schedule options: it ends inside delta_t"));
    REQUIRE_THROWS_WITH(load(edited([](auto& im) { im.metric_options[7] = 0x7f; })),  // beta1 -> NaN
                        Catch::Contains("importance metric options are invalid") &&
                            Catch::Contains("beta1 must be in (0, 1)"));
    REQUIRE(kind_of(edited([](auto& im) { im.kept[0] = 7; })) == kind::malformed);
    REQUIRE(unchanged());
  }
  SECTION("a missing file") {
    REQUIRE_THROWS_WITH(adalora::load_checkpoint(target.alloc, "/nonexistent/dir/a.ckpt"),
                        Catch::Contains("'/nonexistent/dir/a.ckpt'") && Catch::Contains("cannot open"));
    REQUIRE(unchanged());
  }
}

TEST_CASE("a checkpoint of another configuration is refused, naming the difference",
          "[checkpoint][errors]") {
  stepped<float> source(13);
  const bytes_t good = adalora::checkpoint_bytes(source.alloc);
  auto refuses = [&](auto& alloc, const std::string& what) {
    const auto before = snapshot(alloc);
    try {
      adalora::load_checkpoint_bytes(alloc, good);
      FAIL("loaded into another configuration");
    } catch (const adalora::checkpoint_error& e) {
      INFO(e.what());
      CHECK(e.error_kind() == kind::mismatch);
      CHECK_THAT(e.what(), Catch::Contains(what));
    }
    REQUIRE(first_difference(snapshot(alloc), before) == -1);
  };
  const auto sched = adalora::cubic_schedule(run_schedule);
  auto shapes = run_shapes;

  SECTION("element type") {
    stepped<double> d(3);
    refuses(d.alloc, "element type: the checkpoint holds float32 state, the allocator is float64");
  }
  SECTION("adapters: count, names, shapes, ranks") {
    shapes.pop_back();
    allocator_t<float> fewer(shapes, sched);
    refuses(fewer, "the checkpoint has 4 adapters, the allocator 3");
    shapes = run_shapes;
    shapes[2].name = "layers.1.k";
    allocator_t<float> renamed(shapes, sched);
    refuses(renamed, "adapter 2 is named 'layers.1.q' in the checkpoint, 'layers.1.k' in the allocator");
    shapes = run_shapes;
    shapes[1].in_features = 9;
    allocator_t<float> wider(shapes, sched);
    refuses(wider, "adapter 1 ('layers.0.v') has in_features 3, out_features 7, rank 4 in the "
                   "checkpoint, 9, 7, 4 in the allocator");
    shapes = run_shapes;
    shapes[0].rank = 3;
    shapes[3].rank = 1;  // same b0, other ranks
    allocator_t<float> ranks(shapes, sched);
    refuses(ranks, "rank 4 in the checkpoint, 6, 5, 3 in the allocator");
  }
  SECTION("schedule type and options") {
    auto o = run_schedule;
    o.total_step = 31;
    allocator_t<float> longer(run_shapes, adalora::cubic_schedule(o));
    refuses(longer, "schedule: the checkpoint was made with 'cubic_schedule' {initial_budget = 11, "
                    "target_budget = 5, total_step = 30, tinit = 5, tfinal = 7, delta_t = 3}, the "
                    "allocator has 'cubic_schedule' {initial_budget = 11, target_budget = 5, "
                    "total_step = 31");
    adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::linear_schedule> linear(
        run_shapes, adalora::linear_schedule(run_schedule));
    refuses(linear, "schedule: the checkpoint was made with 'cubic_schedule', the allocator has 'linear_schedule' {");
  }
  SECTION("metric type and options") {
    allocator_t<float> beta(run_shapes, sched, adalora::smoothed_sensitivity({.beta1 = 0.8, .beta2 = 0.85}));
    refuses(beta, "importance metric: the checkpoint was made with 'smoothed_sensitivity' {beta1 = "
                  "0.84999999999999998, beta2 = 0.84999999999999998}, the allocator has "
                  "'smoothed_sensitivity' {beta1 = 0.80000000000000004");
    adalora::rank_allocator<float, adalora::sensitivity> plain(run_shapes, sched);
    refuses(plain, "importance metric: the checkpoint was made with 'smoothed_sensitivity', the "
                   "allocator has 'sensitivity' {}");
  }
  SECTION("allocator options; the thread count may differ") {
    allocator_t<float> loralib(run_shapes, sched, {}, {.final_phase = adalora::final_phase_rule::loralib});
    refuses(loralib, "final_phase_rule::peft, the allocator final_phase_rule::loralib");
    allocator_t<float> exact(run_shapes, sched, {}, {.ties = adalora::tie_policy::exact_budget});
    refuses(exact, "tie_policy::prune_all_ties, the allocator tie_policy::exact_budget");
    allocator_t<float> strict(run_shapes, sched, {}, {.non_finite = adalora::non_finite_policy::throw_error});
    refuses(strict, "non_finite_policy::ignore_elements, the allocator non_finite_policy::throw_error");
    allocator_t<float> threaded(run_shapes, sched, {}, {.threads = 3});
    adalora::load_checkpoint_bytes(threaded, good);
    REQUIRE(first_difference(snapshot(threaded), snapshot(source.alloc)) == -1);
  }
  SECTION("read_checkpoint_config refuses other types") {
    REQUIRE_THROWS_WITH((adalora::read_checkpoint_config_bytes<double>(good)),
                        Catch::Contains("float32 state, the allocator is float64"));
    REQUIRE_THROWS_WITH((adalora::read_checkpoint_config_bytes<float, adalora::sensitivity>(good)),
                        Catch::Contains("metric is 'smoothed_sensitivity'"));
    REQUIRE_THROWS_WITH((adalora::read_checkpoint_config_bytes<float, adalora::smoothed_sensitivity,
                                                               adalora::constant_schedule>(good)),
                        Catch::Contains("schedule is 'cubic_schedule', not 'constant_schedule'"));
  }
}

TEST_CASE("a state that could not be resumed is not saved", "[checkpoint][errors]") {
  // A non-finite metric state (what a metric's overflow leaves behind, after step() threw
  // std::domain_error) would be written to a file that load refuses, over a good one. It is
  // planted here through restore(), which takes any state of the right sizes.
  stepped<float> s(8);
  const auto st = s.alloc.resumable();
  std::vector<float> state(st.metric_state.begin(), st.metric_state.end());
  state[5] = std::numeric_limits<float>::infinity();
  const auto last = *st.last;
  s.alloc.restore({st.last_step, st.force_masked, state,
                   std::vector<std::uint8_t>(st.kept.begin(), st.kept.end()),
                   std::vector<double>(st.scores.begin(), st.scores.end()), &last});
  const auto dir = temp_dir("unsaveable");
  const std::string path = (dir / "run.ckpt").string();
  REQUIRE_THROWS_WITH(adalora::save_checkpoint(s.alloc, path),
                      Catch::Contains("save_checkpoint") &&
                          Catch::Contains("metric state value 5 is not finite") &&
                          Catch::Contains("not saved"));
  REQUIRE(dir_entries(dir).empty());
  REQUIRE_THROWS_WITH(adalora::checkpoint_bytes(s.alloc), Catch::Contains("adalora::checkpoint_bytes"));
}

TEST_CASE("a failed save leaves the previous checkpoint intact and no temporary file",
          "[checkpoint][atomic]") {
  const auto dir = temp_dir("atomic");
  const std::string path = (dir / "run.ckpt").string();
  stepped<float> s(10);
  adalora::save_checkpoint(s.alloc, path);
  const bytes_t previous = file_bytes(path);
  REQUIRE(previous == adalora::checkpoint_bytes(s.alloc));
  for (std::int64_t t = 10; t < 26; ++t) {  // into the final phase: another state
    s.m.train_step(t);
    s.alloc.step(t, s.views);
  }
  const bytes_t next = adalora::checkpoint_bytes(s.alloc);
  REQUIRE(next != previous);

  auto intact = [&] {
    REQUIRE(file_bytes(path) == previous);
    REQUIRE(dir_entries(dir) == std::vector<std::string>{"run.ckpt"});
  };

  SECTION("the disk fills up part-way") {
    for (std::size_t limit : {std::size_t{0}, std::size_t{1}, std::size_t{31}, std::size_t{32},
                              next.size() / 2, next.size() - 1}) {
      INFO("fails after " << limit << " bytes");
      std::size_t written = 0;
      adalora::checkpoint_file_ops ops;
      ops.write = [&](int fd, const std::uint8_t* data, std::size_t n) -> long {
        if (written >= limit) {
          errno = ENOSPC;
          return -1;
        }
        n = std::min(n, limit - written);  // a short write up to the limit, as a full disk does
        const long r = static_cast<long>(::write(fd, data, n));
        written += static_cast<std::size_t>(r);
        return r;
      };
      REQUIRE_THROWS_WITH(adalora::save_checkpoint(s.alloc, path, ops),
                          Catch::Contains("save_checkpoint") && Catch::Contains("writing") &&
                              Catch::Contains("No space left on device") &&
                              Catch::Contains("previous checkpoint is intact"));
      intact();
    }
  }
  SECTION("fsync or rename fails") {
    adalora::checkpoint_file_ops bad_sync;
    bad_sync.fsync = [](int) {
      errno = EIO;
      return -1;
    };
    REQUIRE_THROWS_WITH(adalora::save_checkpoint(s.alloc, path, bad_sync),
                        Catch::Contains("syncing") && Catch::Contains("Input/output error"));
    intact();
    adalora::checkpoint_file_ops bad_rename;
    bad_rename.rename = [](const char*, const char*) {
      errno = EXDEV;
      return -1;
    };
    REQUIRE_THROWS_WITH(adalora::save_checkpoint(s.alloc, path, bad_rename), Catch::Contains("renaming"));
    intact();
  }
  SECTION("short and interrupted writes still give the whole file") {
    int calls = 0;
    adalora::checkpoint_file_ops ops;
    ops.write = [&](int fd, const std::uint8_t* data, std::size_t n) -> long {
      if (++calls == 2) {
        errno = EINTR;
        return -1;
      }
      return static_cast<long>(::write(fd, data, std::min<std::size_t>(n, 7)));
    };
    adalora::save_checkpoint(s.alloc, path, ops);
    REQUIRE(calls > 10);
    REQUIRE(file_bytes(path) == next);
    REQUIRE(dir_entries(dir) == std::vector<std::string>{"run.ckpt"});
  }
  SECTION("a directory that does not exist") {
    REQUIRE_THROWS_WITH(adalora::save_checkpoint(s.alloc, (dir / "missing" / "x.ckpt").string()),
                        Catch::Contains("cannot create a temporary file"));
    intact();
  }
}

TEMPLATE_TEST_CASE("independent allocators run concurrently, each equal to its single-threaded twin",
                   "[checkpoint][threads]", float, double) {
  // Four allocators, each with 2 worker threads of its own, in four std::threads at once; each
  // also saves a checkpoint half-way to its own file and continues in a fresh allocator loaded
  // from it. Their traces must equal those of the same runs made one after another with 1
  // thread and no checkpoint. (That one allocator's result does not depend on its thread count
  // is rank_allocator_test's; here the point is that allocators do not interfere.)
  using T = TestType;
  const std::vector<adalora::adapter_shape> shapes = {
      {"wide", 2000, 3, 2}, {"tall", 4, 1500, 2}, {"small", 5, 6, 3}};
  const adalora::schedule_options so = {.initial_budget = 7, .target_budget = 3, .total_step = 10,
                                        .tinit = 1, .tfinal = 3, .delta_t = 2};
  constexpr std::int64_t steps = 12;  // warm-up, reduction and final phase
  constexpr int runs = 4;
  const auto dir = temp_dir(std::string("threads_") + (sizeof(T) == 4 ? "f32" : "f64"));

  auto run = [&](int id, unsigned threads, bool checkpoint) {
    const adalora::allocator_options o = {
        .final_phase = id % 2 ? adalora::final_phase_rule::loralib : adalora::final_phase_rule::peft,
        .threads = threads};
    model<T> m(shapes, static_cast<std::uint64_t>(id) + 1);
    auto views = m.views();
    std::vector<std::uint64_t> trace;
    auto make = [&] {
      return std::make_unique<allocator_t<T>>(shapes, adalora::cubic_schedule(so),
                                              adalora::smoothed_sensitivity{}, o);
    };
    auto alloc = make();
    for (std::int64_t t = 0; t < steps; ++t) {
      if (checkpoint && t == steps / 2) {
        const std::string path = (dir / ("run" + std::to_string(id) + ".ckpt")).string();
        adalora::save_checkpoint(*alloc, path);
        alloc = make();
        adalora::load_checkpoint(*alloc, path);
      }
      m.train_step(t);
      alloc->step(t, views);
      record(trace, *alloc, m);
    }
    return trace;
  };

  std::vector<std::vector<std::uint64_t>> twins(runs), concurrent(runs);
  for (int id = 0; id < runs; ++id) twins[static_cast<std::size_t>(id)] = run(id, 1, false);
  {
    std::vector<std::thread> pool;
    for (int id = 0; id < runs; ++id)
      pool.emplace_back([&, id] { concurrent[static_cast<std::size_t>(id)] = run(id, 2, true); });
    for (auto& t : pool) t.join();
  }
  for (int id = 0; id < runs; ++id) {
    INFO("run " << id);
    REQUIRE(!twins[static_cast<std::size_t>(id)].empty());
    REQUIRE(first_difference(concurrent[static_cast<std::size_t>(id)], twins[static_cast<std::size_t>(id)]) == -1);
  }
  REQUIRE(twins[0] != twins[1]);  // the runs really differ from each other
}

// ---- hostile inputs (docs/reliability.md, "Bad input") -----------------------------------------------------------------

namespace {

/// A metric whose checkpoint traits fail as a user's trait that allocates from what it reads may
/// fail: decode runs out of memory, encode (when asked) hits std::length_error.
struct greedy_metric : adalora::sensitivity {};
bool greedy_encode_throws = false;

}  // namespace

template <>
struct adalora::checkpoint_traits<greedy_metric> {
  static constexpr std::string_view tag = "greedy";
  static void encode(const greedy_metric&, adalora::checkpoint_writer&) {
    if (greedy_encode_throws) throw std::length_error("vector::_M_default_append");
  }
  static greedy_metric decode(adalora::checkpoint_reader&) { throw std::bad_alloc(); }
};

namespace {

const adalora::schedule_options small_schedule = {.initial_budget = 3, .target_budget = 1, .total_step = 10,
                                                  .tinit = 1, .tfinal = 2, .delta_t = 1};

/// The checkpoint of a sharded run whose process holds no column of A of adapter "wide" (rank 1),
/// with that adapter's in_features then set to `in_features` and `edit` applied: a few hundred
/// bytes that declare shapes of any size.
template <class M = adalora::smoothed_sensitivity>
bytes_t wide_checkpoint(index_t in_features, void (*edit)(adalora::adapter_shape&) = nullptr) {
  const std::vector<adalora::adapter_shape> shapes = {{"wide", 256, 4, 1, {.in_begin = 0, .in_count = 0}},
                                                      {"small", 3, 3, 2}};
  adalora::rank_allocator<float, M> alloc(shapes, adalora::cubic_schedule(small_schedule));
  auto im = adalora::detail::ckpt::parse<float>(adalora::checkpoint_bytes(alloc));
  im.shapes[0].in_features = in_features;
  if (edit) edit(im.shapes[0]);
  return adalora::detail::ckpt::encode(im);
}

std::size_t open_descriptors() {
  return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator("/proc/self/fd"),
                                                std::filesystem::directory_iterator()));
}

/// What f() throws as a checkpoint_error ("kind: message"), or "returned". If f has not returned
/// after 10 s (it blocks, as opening a FIFO without a writer does), fails the test and unblocks
/// it by opening `fifo` for writing, so that the test ends either way.
template <class F>
std::string refusal_within_10s(F f, const std::filesystem::path& fifo) {
  auto attempt = std::async(std::launch::async, [&]() -> std::string {
    try {
      f();
    } catch (const adalora::checkpoint_error& e) {
      return e.what();
    }
    return "returned";
  });
  if (attempt.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    while (attempt.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready) {
      const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
      if (w >= 0) ::close(w);
    }
    FAIL("blocked on the FIFO '" << fifo.string() << "'");
  }
  return attempt.get();
}

/// An endless stream of zero bytes (it stops after `cap` bytes, so that a reader without a bound
/// ends too), counting what it served.
struct zeros : std::streambuf {
  std::uint64_t served = 0;
  std::uint64_t cap;
  char buf[1 << 16] = {};
  explicit zeros(std::uint64_t c) : cap(c) {}
  int_type underflow() override {
    if (served >= cap) return traits_type::eof();
    served += sizeof buf;
    setg(buf, buf, buf + sizeof buf);
    return traits_type::to_int_type(buf[0]);
  }
};

}  // namespace

TEST_CASE("read_checkpoint_config refuses shapes that need more memory than the file backs",
          "[checkpoint][hostile]") {
  // Before: a 600-byte file declaring in_features 2^35 for an adapter whose columns it does not
  // hold passed, and the allocator built from it allocated 1 GiB of block sums (2^61: a bare
  // std::bad_alloc).
  using adalora::read_checkpoint_config_bytes;
  for (int bits : {35, 61}) {
    const bytes_t b = wide_checkpoint(index_t{1} << bits);
    INFO("in_features 2^" << bits << ", " << b.size() << " bytes");
    REQUIRE(b.size() < 1000);
    try {
      (void)read_checkpoint_config_bytes<float>(b);
      FAIL("read the configuration");
    } catch (const adalora::checkpoint_error& e) {
      CHECK(e.error_kind() == kind::malformed);
      CHECK_THAT(e.what(), Catch::Contains("adalora::read_checkpoint_config: bytes: adapter 0 ('wide') has "
                                           "in_features " + std::to_string(index_t{1} << bits)) &&
                               Catch::Contains("in [0, +0)") &&
                               Catch::Contains("more than its " + std::to_string(b.size()) + " bytes back") &&
                               Catch::Contains("checkpoint_limits::max_unbacked_bytes"));
    }
  }
  // A stateless metric: no state bytes at all, whatever the adapter holds.
  const bytes_t stateless = wide_checkpoint<adalora::magnitude>(index_t{1} << 35, [](adalora::adapter_shape& s) {
    s.shard.in_count = s.in_features;  // the whole adapter, unsharded
  });
  REQUIRE_THROWS_WITH((read_checkpoint_config_bytes<float, adalora::magnitude>(stateless)),
                      Catch::Contains("adapter 0 ('wide')") && Catch::Contains("more than its"));
  // The same from a file names the file.
  const auto dir = temp_dir("unbacked");
  const auto path = (dir / "wide.ckpt").string();
  {
    const bytes_t b = wide_checkpoint(index_t{1} << 35);
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()),
                                                static_cast<std::streamsize>(b.size()));
  }
  REQUIRE_THROWS_WITH(adalora::read_checkpoint_config<float>(path),
                      Catch::Contains("adalora::read_checkpoint_config: '" + path + "': adapter 0 ('wide')"));
  // The caller may allow more for a file it trusts (1 GiB here; not constructed).
  const auto c = adalora::read_checkpoint_config<float>(path, {.max_unbacked_bytes = std::uint64_t{2} << 30});
  REQUIRE(c.shapes[0].in_features == index_t{1} << 35);
}

TEST_CASE("read_checkpoint_config refuses names the allocator's constructor refuses",
          "[checkpoint][hostile]") {
  // Before: a file with a repeated or empty adapter name read, and constructing the allocator
  // from it threw std::invalid_argument.
  const bytes_t good = adalora::checkpoint_bytes(stepped<float>(3).alloc);
  auto edited = [&](auto edit) {
    auto im = adalora::detail::ckpt::parse<float>(good);
    edit(im);
    return adalora::detail::ckpt::encode(im);
  };
  const bytes_t repeated = edited([](auto& im) { im.shapes[3].name = im.shapes[1].name; });
  REQUIRE_THROWS_WITH(adalora::read_checkpoint_config_bytes<float>(repeated),
                      Catch::Contains("adapters 1 and 3 have the same name 'layers.0.v'"));
  const bytes_t empty = edited([](auto& im) { im.shapes[2].name.clear(); });
  REQUIRE_THROWS_WITH(adalora::read_checkpoint_config_bytes<float>(empty),
                      Catch::Contains("adapter 2 has an empty name"));
}

TEST_CASE("a sharded checkpoint whose process holds none of a wide adapter reads and resumes",
          "[checkpoint][hostile]") {
  // What the bound must not refuse: block sums of adapters held elsewhere, at realistic sizes.
  const std::vector<adalora::adapter_shape> shapes = {
      {"held_elsewhere", 8192, 28672, 16, {.triplet_begin = 0, .triplet_count = 0}},
      {"held_here", 3, 3, 2}};
  const adalora::schedule_options so = {.initial_budget = 18, .target_budget = 6, .total_step = 10,
                                        .tinit = 1, .tfinal = 2, .delta_t = 1};
  adalora::rank_allocator<float, adalora::magnitude> first(shapes, adalora::cubic_schedule(so));
  const bytes_t b = adalora::checkpoint_bytes(first);
  auto c = adalora::read_checkpoint_config_bytes<float, adalora::magnitude>(b);
  adalora::rank_allocator<float, adalora::magnitude> second(c.shapes, c.schedule, c.metric, c.options);
  adalora::load_checkpoint_bytes(second, b);
  REQUIRE(adalora::checkpoint_bytes(second) == b);
}

TEST_CASE("a save never writes through a symbolic link planted at a temporary name",
          "[checkpoint][atomic][hostile]") {
  // Before: the temporary file was <path>.tmp.<pid>.<n>, opened with O_CREAT | O_TRUNC: a link
  // planted there had its target overwritten, and the link was renamed into place.
  const auto dir = temp_dir("symlink");
  const auto victim = temp_dir("symlink_victim") / "victim";
  std::ofstream(victim) << "precious";
  const bytes_t precious = file_bytes(victim);
  const std::string path = (dir / "run.ckpt").string();
  for (int n = 0; n < 4096; ++n)  // every name the old writer would pick in this process, and more
    std::filesystem::create_symlink(victim, path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(n));
  const auto planted = dir_entries(dir);
  stepped<float> s(10);

  // What the descriptor written to is: a new regular file of one name in the checkpoint's
  // directory, not the victim.
  std::string written_to;
  bool fresh = false;
  adalora::checkpoint_file_ops ops;
  ops.write = [&](int fd, const std::uint8_t* data, std::size_t n) -> long {
    struct stat st {};
    const auto target = std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd));
    written_to = target.string();
    fresh = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 &&
            target.parent_path() == std::filesystem::canonical(dir) &&
            target.filename().string().starts_with("run.ckpt.tmp.") && !std::filesystem::is_symlink(target);
    return static_cast<long>(::write(fd, data, n));
  };
  adalora::save_checkpoint(s.alloc, path, ops);
  INFO("written to " << written_to);
  REQUIRE(fresh);
  adalora::save_checkpoint(s.alloc, path);  // and with the real calls
  REQUIRE(file_bytes(victim) == precious);
  REQUIRE(!std::filesystem::is_symlink(path));
  REQUIRE(file_bytes(path) == adalora::checkpoint_bytes(s.alloc));
  auto expected = planted;
  expected.push_back("run.ckpt");
  std::sort(expected.begin(), expected.end());
  REQUIRE(dir_entries(dir) == expected);  // no temporary file left, the planted links untouched
}

TEST_CASE("a callback that throws fails the save cleanly: checkpoint_error, no temporary file, "
          "no leaked descriptor", "[checkpoint][atomic]") {
  // Before: the exception went through bare, past the temporary file and its descriptor.
  const auto dir = temp_dir("throwing_callback");
  const std::string path = (dir / "run.ckpt").string();
  stepped<float> s(10);
  adalora::save_checkpoint(s.alloc, path);
  const bytes_t previous = file_bytes(path);
  s.m.train_step(10);
  s.alloc.step(10, s.views);

  auto fails_cleanly = [&](const adalora::checkpoint_file_ops& ops) {
    const std::size_t descriptors = open_descriptors();
    try {
      adalora::save_checkpoint(s.alloc, path, ops);
      FAIL("saved");
    } catch (const adalora::checkpoint_error& e) {
      CHECK(e.error_kind() == kind::io);
      CHECK_THAT(e.what(), Catch::StartsWith("adalora::save_checkpoint: '" + path + "': ") &&
                               Catch::Contains("a callback threw: disk on fire") &&
                               Catch::Contains("the previous checkpoint is intact"));
    }
    REQUIRE(open_descriptors() == descriptors);
    REQUIRE(file_bytes(path) == previous);
    REQUIRE(dir_entries(dir) == std::vector<std::string>{"run.ckpt"});
  };
  adalora::checkpoint_file_ops ops;
  ops.write = [](int, const std::uint8_t*, std::size_t) -> long { throw std::runtime_error("disk on fire"); };
  fails_cleanly(ops);
  ops = {};
  ops.fsync = [](int) -> int { throw std::runtime_error("disk on fire"); };
  fails_cleanly(ops);
  ops = {};
  ops.rename = [](const char*, const char*) -> int { throw std::runtime_error("disk on fire"); };
  fails_cleanly(ops);
}

TEST_CASE("what is not a regular file is refused at once, naming the file", "[checkpoint][hostile]") {
  stepped<float> target(5);
  const auto before = snapshot(target.alloc);
  const auto dir = temp_dir("not_regular");
  auto refusal = [](auto f) -> std::string {
    try {
      f();
    } catch (const adalora::checkpoint_error& e) {
      CHECK(e.error_kind() == kind::io);
      return e.what();
    }
    return "returned";
  };

  SECTION("/dev/zero: before, read without end") {
    CHECK_THAT(refusal([&] { adalora::load_checkpoint(target.alloc, "/dev/zero"); }),
               Catch::StartsWith("adalora::load_checkpoint: '/dev/zero': it is a character device"));
    CHECK_THAT(refusal([&] { (void)adalora::read_checkpoint_config<float>("/dev/zero"); }),
               Catch::StartsWith("adalora::read_checkpoint_config: '/dev/zero': it is a character device"));
  }
  SECTION("a FIFO: before, blocked for ever waiting for a writer") {
    const auto fifo = dir / "pipe.ckpt";
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK_THAT(refusal_within_10s([&] { adalora::load_checkpoint(target.alloc, fifo.string()); }, fifo),
               Catch::Contains("'" + fifo.string() + "': it is a FIFO"));
    CHECK_THAT(refusal_within_10s([&] { (void)adalora::read_checkpoint_config<float>(fifo.string()); }, fifo),
               Catch::Contains("'" + fifo.string() + "': it is a FIFO"));
  }
  SECTION("a directory: before, \"reading failed\" or a failed rename") {
    const std::string d = (dir / "checkpoints").string();
    std::filesystem::create_directory(d);
    CHECK_THAT(refusal([&] { adalora::load_checkpoint(target.alloc, d); }),
               Catch::StartsWith("adalora::load_checkpoint: '" + d + "': it is a directory"));
    CHECK_THAT(refusal([&] { (void)adalora::read_checkpoint_config<float>(d); }),
               Catch::StartsWith("adalora::read_checkpoint_config: '" + d + "': it is a directory"));
    CHECK_THAT(refusal([&] { adalora::save_checkpoint(target.alloc, d); }),
               Catch::StartsWith("adalora::save_checkpoint: '" + d + "': it is a directory"));
    REQUIRE(std::filesystem::is_directory(d));
    REQUIRE(dir_entries(dir) == std::vector<std::string>{"checkpoints"});
  }
  REQUIRE(first_difference(snapshot(target.alloc), before) == -1);
}

TEST_CASE("a file or stream longer than any checkpoint of the allocator is refused before it is read",
          "[checkpoint][hostile]") {
  stepped<float> target(5);
  const auto before = snapshot(target.alloc);
  const std::uint64_t own = adalora::checkpoint_bytes(target.alloc).size();
  SECTION("a 256 MiB file (sparse: it takes no disk)") {
    const auto path = temp_dir("long_file") / "big.ckpt";
    std::ofstream(path).close();
    std::filesystem::resize_file(path, std::uint64_t{256} << 20);
    try {
      adalora::load_checkpoint(target.alloc, path.string());
      FAIL("loaded");
    } catch (const adalora::checkpoint_error& e) {
      CHECK(e.error_kind() == kind::io);
      CHECK_THAT(e.what(), Catch::Contains("'" + path.string() + "': it is 268435456 bytes long, more than the limit of"));
    }
  }
  SECTION("an endless stream") {
    zeros source(std::uint64_t{256} << 20);
    std::istream in(&source);
    try {
      adalora::read_checkpoint(target.alloc, in);
      FAIL("loaded");
    } catch (const adalora::checkpoint_error& e) {
      CHECK(e.error_kind() == kind::io);
      CHECK_THAT(e.what(), Catch::StartsWith("adalora::read_checkpoint: stream: it has more than") &&
                               Catch::Contains("the most a checkpoint of this allocator can have"));
    }
    CHECK(source.served < own + (std::uint64_t{1} << 20));
  }
  REQUIRE(first_difference(snapshot(target.alloc), before) == -1);
}

TEST_CASE("errors of the standard library reach the user as checkpoint_error with context",
          "[checkpoint][errors]") {
  // Before: a trait's std::bad_alloc or std::length_error went through bare, saying neither the
  // function nor the file.
  adalora::rank_allocator<float, greedy_metric> alloc(run_shapes, adalora::cubic_schedule(run_schedule));
  const bytes_t b = adalora::checkpoint_bytes(alloc);
  REQUIRE_THROWS_AS(adalora::load_checkpoint_bytes(alloc, b), adalora::checkpoint_error);
  REQUIRE_THROWS_WITH(adalora::load_checkpoint_bytes(alloc, b),
                      Catch::StartsWith("adalora::load_checkpoint_bytes: ") &&
                          Catch::Contains("out of memory (std::bad_alloc)"));
  REQUIRE_THROWS_AS((adalora::read_checkpoint_config_bytes<float, greedy_metric>(b)), adalora::checkpoint_error);

  const auto dir = temp_dir("std_errors");
  const std::string path = (dir / "run.ckpt").string();
  greedy_encode_throws = true;
  try {
    adalora::save_checkpoint(alloc, path);
    FAIL("saved");
  } catch (const adalora::checkpoint_error& e) {
    CHECK(e.error_kind() == kind::io);
    CHECK_THAT(e.what(), Catch::StartsWith("adalora::save_checkpoint: '" + path + "': ") &&
                             Catch::Contains("std::length_error: vector::_M_default_append"));
  }
  greedy_encode_throws = false;
  REQUIRE(dir_entries(dir).empty());
}
