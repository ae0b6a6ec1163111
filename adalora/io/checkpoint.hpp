#pragma once
// Checkpoints of a rank allocator: save everything it needs to continue, load it back, and resume
// bit for bit where the run stopped.
//
// What is saved: the element type; the adapters (names, shapes, their rank now and at
// construction); the schedule and the metric (a type tag and their options, through
// checkpoint_traits); the allocator options; and the allocator's resumable state
// (rank_allocator::resumable(): last step, PEFT's final-phase flag, the metric state of every
// element, the kept mask, the triplet scores and the last step's result), all at the ranks now.
// The user's tensors are not: they belong to the training loop's own checkpoint.
//
// Rank that changed (rank_allocator::compact, grow, change_rank): the checkpoint keeps the ranks
// at construction, which the schedule's initial budget is the sum of, so that the allocator is
// rebuilt with its original arguments (read_checkpoint_config returns them); loading reshapes it
// to the saved ranks (change_rank) before restoring its state, and the run resumes bit for bit.
// A sharded or multi-process allocator cannot change rank, and so refuses such a checkpoint.
//
// The format (docs/checkpoint_format.md has the byte-by-byte table): a fixed 32-byte header
//   magic "ADALCKPT", u32 version, u32 flags (0), u64 payload size, u32 CRC-32 of the payload,
//   u32 CRC-32 of the 28 header bytes before it,
// then the payload. Every integer is little-endian on disk whatever the host (bytes are written
// one by one, never by copying structs), floats are their IEEE-754 bit patterns in the same byte
// order, strings are a u32 length and UTF-8 bytes. A reader refuses versions newer than its own.
//
// Guarantees:
//  * save_checkpoint(path) is atomic (adalora/io/file_io.hpp): it writes a new temporary file
//    next to <path> (created exclusively, never through a symbolic link, with a name nobody can
//    predict), fsyncs it, and renames it over <path>, so a crash or a full disk in the middle
//    leaves the previous checkpoint intact; on a reported failure, a throwing callback included,
//    the temporary file is removed (after a crash it may remain: it is never read, and is safe to
//    delete).
//  * reading a file refuses what is not a regular file (a directory, a FIFO, /dev/zero) before
//    reading a byte; load_checkpoint and read_checkpoint read at most the size that a checkpoint
//    of their allocator can have.
//  * loading never reads outside the bytes it has, and parses and validates everything (header,
//    checksums, every count against the bytes present, every value's range, and the whole
//    configuration against the allocator's) into temporaries before rank_allocator::restore(),
//    which is all-or-nothing: on any checkpoint_error the allocator is unchanged.
//  * read_checkpoint_config refuses shapes that would make an allocator need more memory than the
//    file's bytes back (checkpoint_limits): a few hundred bytes cannot ask for gigabytes.
//  * errors are checkpoint_error with the function and the file in front, also when memory runs
//    out (std::bad_alloc) or a size is beyond what a vector holds (std::length_error).
//  * the element type, the adapters' names, shapes and ranks at construction, the schedule and
//    metric (tag and options) and the allocator options (final_phase, tie_policy,
//    non_finite_policy, rank_can_grow) must match the allocator's; `threads` may differ (results
//    do not depend on it), so a run may resume on a machine with another number of cores. The
//    ranks now may differ from the allocator's (it is reshaped), up to full rank
//    min(in_features, out_features) or the larger of its ranks now and at construction.
//  * version 1 checkpoints (before rank could change) load as before.
//
// Custom schedules and metrics: specialise adalora::checkpoint_traits (see below). A metric's
// own mutable members (anything a begin_step() changes) are not saved: traits encode options
// that are fixed at construction.

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <limits>
#include <new>
#include <ostream>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/config.hpp"
#include "adalora/growth_schedule.hpp"
#include "adalora/importance/magnitude.hpp"
#include "adalora/importance/sensitivity.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/io/file_io.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/rank_change.hpp"

namespace adalora {

/// The format version this library writes, and the newest it reads. Version 2 added the ranks
/// at construction, allocator_options::rank_can_grow and step_result::missing; version 1 files
/// still load (docs/checkpoint_format.md).
inline constexpr std::uint32_t checkpoint_format_version = 2;

/// Why a checkpoint could not be saved or loaded. what() names the function, the file (or
/// "bytes"/"stream") and what is wrong; error_kind() says which class of problem it is.
class checkpoint_error : public std::runtime_error {
 public:
  enum class kind : std::uint8_t {
    io,                   ///< the file could not be opened, read, written, synced or renamed
    not_a_checkpoint,     ///< no "ADALCKPT" magic: some other file
    truncated,            ///< fewer bytes than the header says (an interrupted copy)
    unsupported_version,  ///< written by a newer adalora (or an unknown version/flags)
    corrupt,              ///< a checksum does not match (bit rot, a damaged copy)
    malformed,            ///< checksums match but a value is out of range or inconsistent
    mismatch,             ///< a valid checkpoint of another configuration than the allocator's
  };
  checkpoint_error(kind k, const std::string& message) : std::runtime_error(message), kind_(k) {}
  kind error_kind() const noexcept { return kind_; }

 private:
  kind kind_;
};

// ---- bytes -------------------------------------------------------------------------------------

/// Appends little-endian values to a byte buffer. Used by the format and by checkpoint_traits.
class checkpoint_writer {
 public:
  void u8(std::uint8_t v) { out_.push_back(v); }
  void u32(std::uint32_t v) { put(v, 4); }
  void u64(std::uint64_t v) { put(v, 8); }
  void i64(std::int64_t v) { put(static_cast<std::uint64_t>(v), 8); }
  void f32(float v) { put(std::bit_cast<std::uint32_t>(v), 4); }
  void f64(double v) { put(std::bit_cast<std::uint64_t>(v), 8); }
  /// A u32 length, then the bytes.
  void str(std::string_view s) {
    ADALORA_REQUIRE(s.size() <= std::numeric_limits<std::uint32_t>::max(), "checkpoint_writer",
                    "strings must be shorter than 2^32 bytes, got ", s.size());
    u32(static_cast<std::uint32_t>(s.size()));
    out_.insert(out_.end(), s.begin(), s.end());
  }
  void bytes(std::span<const std::uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void reserve(std::size_t n) { out_.reserve(n); }

  const std::vector<std::uint8_t>& data() const noexcept { return out_; }
  std::vector<std::uint8_t> take() noexcept { return std::move(out_); }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
  }
  std::vector<std::uint8_t> out_;
};

/// Reads little-endian values from a byte span, never past its end: a read that does not fit
/// throws checkpoint_error(malformed) naming the field and the offset. Used by the format and
/// by checkpoint_traits.
class checkpoint_reader {
 public:
  explicit checkpoint_reader(std::span<const std::uint8_t> bytes) noexcept : in_(bytes) {}

  std::uint8_t u8(std::string_view field) { return static_cast<std::uint8_t>(get(1, field)); }
  std::uint32_t u32(std::string_view field) { return static_cast<std::uint32_t>(get(4, field)); }
  std::uint64_t u64(std::string_view field) { return get(8, field); }
  std::int64_t i64(std::string_view field) { return static_cast<std::int64_t>(get(8, field)); }
  float f32(std::string_view field) { return std::bit_cast<float>(u32(field)); }
  double f64(std::string_view field) { return std::bit_cast<double>(u64(field)); }
  /// 0 or 1, else malformed.
  bool flag(std::string_view field) {
    const std::uint8_t v = u8(field);
    if (v > 1) fail(field, " must be 0 or 1, got ", int(v));
    return v == 1;
  }
  /// A u32 length (at most max_length), then the bytes.
  std::string str(std::string_view field, std::size_t max_length) {
    const std::uint32_t n = u32(field);
    if (n > max_length) fail(field, " is ", n, " bytes long, more than the ", max_length, " allowed");
    const auto b = take(n, field);
    return std::string(b.begin(), b.end());
  }
  /// The next n bytes.
  std::span<const std::uint8_t> take(std::size_t n, std::string_view field) {
    need(n, field);
    const auto b = in_.subspan(pos_, n);
    pos_ += n;
    return b;
  }

  std::size_t offset() const noexcept { return pos_; }
  std::size_t remaining() const noexcept { return in_.size() - pos_; }
  /// Throws unless every byte was read.
  void expect_end(std::string_view what) {
    if (remaining() != 0)
      fail(what, " has ", remaining(), " unread bytes at its end (offset ", pos_, ")");
  }

  /// Throws checkpoint_error(malformed) with the message parts.
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw checkpoint_error(checkpoint_error::kind::malformed, detail::concat(parts...));
  }

 private:
  void need(std::size_t n, std::string_view field) const {
    if (n > remaining())
      fail("it ends inside ", field, " (", n, " bytes needed at offset ", pos_, ", ", remaining(),
           " left)");
  }
  std::uint64_t get(int n, std::string_view field) {
    need(static_cast<std::size_t>(n), field);
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= std::uint64_t{in_[pos_ + static_cast<std::size_t>(i)]} << (8 * i);
    pos_ += static_cast<std::size_t>(n);
    return v;
  }

  std::span<const std::uint8_t> in_;
  std::size_t pos_ = 0;
};

// ---- traits for schedules and metrics ----------------------------------------------------------

/// How a schedule or metric type is stored in a checkpoint. Specialise it for your own type X:
///
///   template <> struct adalora::checkpoint_traits<my_schedule> {
///     static constexpr std::string_view tag = "my_schedule";          // stored and compared
///     static void encode(const my_schedule& s, adalora::checkpoint_writer& w);  // its options
///     static my_schedule decode(adalora::checkpoint_reader& r);      // the inverse
///     static std::string describe(const my_schedule& s);  // optional: for mismatch messages
///   };
///
/// encode must write the options fixed at construction (not state that changes during a run):
/// a checkpoint loads only into an allocator whose schedule and metric encode to the same bytes.
/// decode may throw for invalid options (any std::logic_error or std::runtime_error, such as the
/// constructor's std::invalid_argument); load reports it as checkpoint_error(malformed).
/// Tags of the built-ins: "cubic_schedule", "linear_schedule", "constant_schedule",
/// "smoothed_sensitivity", "sensitivity", "magnitude", "parameter_magnitude".
template <class X>
struct checkpoint_traits {};

/// X has a usable checkpoint_traits specialisation.
template <class X>
concept Checkpointable = requires(const X& x, checkpoint_writer& w, checkpoint_reader& r) {
  { checkpoint_traits<X>::tag } -> std::convertible_to<std::string_view>;
  checkpoint_traits<X>::encode(x, w);
  { checkpoint_traits<X>::decode(r) } -> std::same_as<X>;
};

namespace detail {

template <class X>
concept has_checkpoint_describe = requires(const X& x) {
  { checkpoint_traits<X>::describe(x) } -> std::convertible_to<std::string>;
};

template <class Metric, class Schedule>
consteval bool check_checkpointable() {
  static_assert(Checkpointable<Schedule>,
                "adalora checkpoints: the schedule type has no checkpoint_traits. Specialise "
                "adalora::checkpoint_traits<YourSchedule> with `static constexpr "
                "std::string_view tag`, `static void encode(const YourSchedule&, "
                "adalora::checkpoint_writer&)` and `static YourSchedule "
                "decode(adalora::checkpoint_reader&)` (see adalora/io/checkpoint.hpp)");
  static_assert(Checkpointable<Metric>,
                "adalora checkpoints: the importance metric type has no checkpoint_traits. "
                "Specialise adalora::checkpoint_traits<YourMetric> with `static constexpr "
                "std::string_view tag`, `static void encode(const YourMetric&, "
                "adalora::checkpoint_writer&)` and `static YourMetric "
                "decode(adalora::checkpoint_reader&)` (see adalora/io/checkpoint.hpp)");
  return true;
}

/// The shared options of the built-in schedules: six i64 in declaration order.
template <class S>
struct builtin_schedule_traits {
  static void encode(const S& s, checkpoint_writer& w) {
    const schedule_options& o = s.options();
    for (std::int64_t v : {o.initial_budget, o.target_budget, o.total_step, o.tinit, o.tfinal, o.delta_t})
      w.i64(v);
  }
  static S decode(checkpoint_reader& r) {
    schedule_options o{};
    o.initial_budget = r.i64("initial_budget");
    o.target_budget = r.i64("target_budget");
    o.total_step = r.i64("total_step");
    o.tinit = r.i64("tinit");
    o.tfinal = r.i64("tfinal");
    o.delta_t = r.i64("delta_t");
    return S(o);  // validates
  }
  static std::string describe(const S& s) {
    const schedule_options& o = s.options();
    return concat("{initial_budget = ", o.initial_budget, ", target_budget = ", o.target_budget,
                  ", total_step = ", o.total_step, ", tinit = ", o.tinit, ", tfinal = ", o.tfinal,
                  ", delta_t = ", o.delta_t, "}");
  }
};

/// Metrics without options: nothing to store.
template <class M>
struct stateless_metric_traits {
  static void encode(const M&, checkpoint_writer&) {}
  static M decode(checkpoint_reader&) { return M{}; }
  static std::string describe(const M&) { return "{}"; }
};

}  // namespace detail

template <>
struct checkpoint_traits<cubic_schedule> : detail::builtin_schedule_traits<cubic_schedule> {
  static constexpr std::string_view tag = "cubic_schedule";
};
template <>
struct checkpoint_traits<linear_schedule> : detail::builtin_schedule_traits<linear_schedule> {
  static constexpr std::string_view tag = "linear_schedule";
};
template <>
struct checkpoint_traits<constant_schedule> : detail::builtin_schedule_traits<constant_schedule> {
  static constexpr std::string_view tag = "constant_schedule";
};
template <>
struct checkpoint_traits<rising_schedule> : detail::builtin_schedule_traits<rising_schedule> {
  static constexpr std::string_view tag = "rising_schedule";
};
/// Stored like the others (its target budget is its initial budget); built from its own options.
template <>
struct checkpoint_traits<constant_total_schedule> {
  static constexpr std::string_view tag = "constant_total_schedule";
  static void encode(const constant_total_schedule& s, checkpoint_writer& w) {
    detail::builtin_schedule_traits<constant_total_schedule>::encode(s, w);
  }
  static constant_total_schedule decode(checkpoint_reader& r) {
    constant_total_options o{};
    o.initial_budget = r.i64("initial_budget");
    const std::int64_t target = r.i64("target_budget");
    o.total_step = r.i64("total_step");
    o.tinit = r.i64("tinit");
    o.tfinal = r.i64("tfinal");
    o.delta_t = r.i64("delta_t");
    if (target != o.initial_budget)
      throw std::invalid_argument(detail::concat(
          "adalora::constant_total_schedule: target_budget must equal initial_budget = ",
          o.initial_budget, ", got ", target));
    return constant_total_schedule(o);  // validates
  }
  static std::string describe(const constant_total_schedule& s) {
    return detail::builtin_schedule_traits<constant_total_schedule>::describe(s);
  }
};

template <>
struct checkpoint_traits<smoothed_sensitivity> {
  static constexpr std::string_view tag = "smoothed_sensitivity";
  static void encode(const smoothed_sensitivity& m, checkpoint_writer& w) {
    w.f64(m.opts().beta1);
    w.f64(m.opts().beta2);
  }
  static smoothed_sensitivity decode(checkpoint_reader& r) {
    smoothed_sensitivity::options o;
    o.beta1 = r.f64("beta1");
    o.beta2 = r.f64("beta2");
    return smoothed_sensitivity(o);  // validates
  }
  static std::string describe(const smoothed_sensitivity& m) {
    std::ostringstream s;
    s.precision(17);
    s << "{beta1 = " << m.opts().beta1 << ", beta2 = " << m.opts().beta2 << "}";
    return s.str();
  }
};
template <>
struct checkpoint_traits<sensitivity> : detail::stateless_metric_traits<sensitivity> {
  static constexpr std::string_view tag = "sensitivity";
};
template <>
struct checkpoint_traits<magnitude> : detail::stateless_metric_traits<magnitude> {
  static constexpr std::string_view tag = "magnitude";
};
template <>
struct checkpoint_traits<parameter_magnitude> : detail::stateless_metric_traits<parameter_magnitude> {
  static constexpr std::string_view tag = "parameter_magnitude";
};

// ---- the format --------------------------------------------------------------------------------

namespace detail::ckpt {

inline constexpr std::array<std::uint8_t, 8> magic = {'A', 'D', 'A', 'L', 'C', 'K', 'P', 'T'};
inline constexpr std::size_t header_size = 32;
inline constexpr std::size_t max_tag = 256;        // schedule/metric tags
inline constexpr std::size_t max_name = 1 << 16;   // adapter names
inline constexpr std::uint32_t max_threads = 1 << 16;

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, as zlib and PNG): detects every burst
/// error up to 32 bits, so every single flipped bit.
inline constexpr std::array<std::uint32_t, 256> crc_table = [] {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t n = 0; n < 256; ++n) {
    std::uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[n] = c;
  }
  return t;
}();

inline std::uint32_t crc32(std::span<const std::uint8_t> bytes) noexcept {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::uint8_t b : bytes) c = crc_table[(c ^ b) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/// A checkpoint, parsed: configuration and resumable state as plain values.
template <class T>
struct image {
  std::string writer;  // "adalora <version>", informational
  std::vector<adapter_shape> shapes;  // ranks (and whole adapters' triplet counts) now
  std::vector<index_t> initial_ranks;  // per adapter, at construction (version 1: the ranks)
  std::string schedule_tag;
  std::vector<std::uint8_t> schedule_options;
  std::string metric_tag;
  std::uint32_t metric_state_size = 0;
  std::vector<std::uint8_t> metric_options;
  allocator_options options;
  std::int64_t last_step = -1;
  bool force_masked = false;
  std::vector<T> metric_state;
  std::vector<std::uint8_t> kept;
  std::vector<double> scores;
  step_result<T> last;  // its kept span is left empty; restore() recomputes it
};

/// Adapter a's rank at construction; an image whose initial_ranks stop short (one edited by hand
/// in a test) has its rank now there.
template <class T>
index_t initial_rank(const image<T>& im, std::size_t a) {
  return a < im.initial_ranks.size() ? im.initial_ranks[a] : im.shapes[a].rank;
}

template <class T>
constexpr std::uint8_t element_code = sizeof(T);  // 4: IEEE binary32, 8: IEEE binary64

inline const char* element_name(unsigned code) {
  return code == 4 ? "float32" : code == 8 ? "float64" : "unknown";
}

/// a * b + c for non-negative counts, or a malformed error when it exceeds 2^62 (a hostile file
/// must not wrap a size around to something small).
inline std::uint64_t checked_mad(std::uint64_t a, std::uint64_t b, std::uint64_t c,
                                 const checkpoint_reader& r, std::string_view what) {
  constexpr std::uint64_t limit = std::uint64_t{1} << 62;
  if (a != 0 && b > limit / a) r.fail(what, " overflows");
  const std::uint64_t p = a * b;
  if (c > limit - p) r.fail(what, " overflows");
  return p + c;
}

/// Appends the payload (everything after the header), in the order of
/// docs/checkpoint_format.md.
template <class T>
void encode_payload(const image<T>& im, checkpoint_writer& w) {
  w.u8(element_code<T>);
  w.str(im.writer);
  w.u32(static_cast<std::uint32_t>(im.shapes.size()));
  for (std::size_t a = 0; a < im.shapes.size(); ++a) {
    const adapter_shape& s = im.shapes[a];
    w.str(s.name);
    w.i64(s.in_features);
    w.i64(s.out_features);
    w.i64(s.rank);
    w.i64(initial_rank(im, a));
    // The slice this process holds (sharded training; the whole adapter otherwise), as the
    // allocator resolved it: each process saves and resumes its own slice.
    const adapter_shard& h = s.shard;
    for (index_t v : {h.triplet_begin, h.triplet_count, h.in_begin, h.in_count, h.out_begin, h.out_count})
      w.i64(v);
    w.u8(h.scores_e ? 1 : 0);
  }
  w.str(im.schedule_tag);
  w.u32(static_cast<std::uint32_t>(im.schedule_options.size()));
  w.bytes(im.schedule_options);
  w.str(im.metric_tag);
  w.u32(im.metric_state_size);
  w.u32(static_cast<std::uint32_t>(im.metric_options.size()));
  w.bytes(im.metric_options);
  w.u8(static_cast<std::uint8_t>(im.options.final_phase));
  w.u8(static_cast<std::uint8_t>(im.options.ties));
  w.u8(static_cast<std::uint8_t>(im.options.non_finite));
  w.u8(im.options.rank_can_grow ? 1 : 0);
  w.u32(im.options.threads);
  w.i64(im.last_step);
  w.u8(im.force_masked ? 1 : 0);
  w.u64(im.metric_state.size());
  for (T v : im.metric_state) {
    if constexpr (sizeof(T) == 4) w.f32(v);
    else w.f64(v);
  }
  w.u64(im.kept.size());
  w.bytes(im.kept);
  for (double v : im.scores) w.f64(v);
  const step_result<T>& r = im.last;
  w.i64(r.step);
  w.i64(r.budget);
  w.u8(r.mask_due ? 1 : 0);
  w.u8(r.importance_updated ? 1 : 0);
  w.u8(r.forced ? 1 : 0);
  w.u8(static_cast<std::uint8_t>(r.action));
  w.u8(r.skipped ? 1 : 0);
  w.f64(r.threshold);
  w.i64(r.prune_count);
  w.i64(r.non_finite);
  w.i64(r.missing);
}

/// Fills in the payload size and both checksums of a whole checkpoint (header + payload).
/// Tests and the fuzz target use it too, to re-seal bytes they edit on purpose.
inline void seal(std::span<std::uint8_t> file) noexcept {
  auto put = [&](std::size_t at, std::uint64_t v, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) file[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
  };
  put(16, file.size() - header_size, 8);
  put(24, crc32(file.subspan(header_size)), 4);
  put(28, crc32(file.first(header_size - 4)), 4);
}

/// Header + payload.
template <class T>
std::vector<std::uint8_t> encode(const image<T>& im) {
  checkpoint_writer w;
  w.reserve(header_size + 256 + im.metric_state.size() * sizeof(T) + im.kept.size() * 9);
  w.bytes(magic);
  w.u32(checkpoint_format_version);
  w.u32(0);  // flags, reserved
  w.u64(0);  // payload size, payload checksum, header checksum: seal()
  w.u32(0);
  w.u32(0);
  encode_payload(im, w);
  std::vector<std::uint8_t> bytes = w.take();
  seal(bytes);
  return bytes;
}

template <class... Parts>
[[noreturn]] void fail(checkpoint_error::kind k, const Parts&... parts) {
  throw checkpoint_error(k, concat(parts...));
}

/// A payload whose header and checksums passed, and its format version.
struct verified {
  std::uint32_t version;
  std::span<const std::uint8_t> payload;
};

/// Checks the header and both checksums and returns the payload. Knows nothing of T.
inline verified verified_payload(std::span<const std::uint8_t> bytes) {
  using k = checkpoint_error::kind;
  if (bytes.empty()) fail(k::truncated, "it is empty (0 bytes)");
  const std::size_t m = std::min(bytes.size(), magic.size());
  if (!std::equal(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(m), magic.begin()))
    fail(k::not_a_checkpoint, "it is not an adalora checkpoint (its first bytes are not \"ADALCKPT\")");
  if (bytes.size() < header_size)
    fail(k::truncated, "it is truncated: ", bytes.size(), " bytes, fewer than the ", header_size,
         "-byte header");
  checkpoint_reader h(bytes.first(header_size));
  h.take(magic.size(), "magic");
  const std::uint32_t version = h.u32("version");
  const std::uint32_t flags = h.u32("flags");
  const std::uint64_t payload_size = h.u64("payload size");
  const std::uint32_t payload_crc = h.u32("payload checksum");
  const std::uint32_t header_crc = h.u32("header checksum");
  // The header's own checksum first, so that a flipped bit in the version or the size reads as
  // corruption rather than as a newer version or a truncation.
  if (const std::uint32_t c = crc32(bytes.first(header_size - 4)); c != header_crc)
    fail(k::corrupt, "its header is corrupt (header checksum 0x", std::hex, header_crc,
         " stored, 0x", c, " computed)");
  if (version > checkpoint_format_version)
    fail(k::unsupported_version, "it has format version ", version,
         ", newer than this adalora reads (", checkpoint_format_version, "); upgrade adalora");
  if (version == 0) fail(k::unsupported_version, "it has format version 0, which does not exist");
  if (flags != 0)
    fail(k::unsupported_version, "it sets header flags 0x", std::hex, flags,
         " that format version ", std::dec, version, " does not define");
  const std::uint64_t present = bytes.size() - header_size;
  if (payload_size > present)
    fail(k::truncated, "it is truncated: the header announces ", payload_size,
         " payload bytes, only ", present, " are present");
  if (payload_size < present)
    fail(k::malformed, "it has ", present - payload_size,
         " bytes after the end of the payload the header announces (", payload_size, " bytes)");
  const auto payload = bytes.subspan(header_size);
  if (const std::uint32_t c = crc32(payload); c != payload_crc)
    fail(k::corrupt, "it is corrupt (payload checksum 0x", std::hex, payload_crc, " stored, 0x", c,
         " computed)");
  return {version, payload};
}

/// Parses a verified payload and checks that it is consistent in itself (counts add up, values
/// in range). Every count is checked against the bytes left before anything is allocated.
template <class T>
image<T> parse_payload(std::span<const std::uint8_t> payload, std::uint32_t version) {
  using k = checkpoint_error::kind;
  checkpoint_reader r(payload);
  image<T> im;
  const std::uint8_t code = r.u8("element type");
  if (code != 4 && code != 8) r.fail("element type code ", int(code), " is unknown (4 or 8)");
  if (code != element_code<T>)
    fail(k::mismatch, "element type: the checkpoint holds ", element_name(code),
         " state, the allocator is ", element_name(element_code<T>));
  im.writer = r.str("writer", max_tag);

  const std::uint32_t n = r.u32("adapter count");
  if (n == 0) r.fail("adapter count must be >= 1, got 0");
  const std::size_t adapter_bytes = version == 1 ? 77 : 85;  // at least, each
  if (n > r.remaining() / adapter_bytes)
    r.fail("adapter count ", n, " does not fit in the ", r.remaining(), " bytes left");
  im.shapes.reserve(n);
  im.initial_ranks.reserve(n);
  std::uint64_t elements = 0, triplets = 0, initial_triplets = 0;
  for (std::uint32_t a = 0; a < n; ++a) {
    adapter_shape s;
    s.name = r.str("adapter name", max_name);
    s.in_features = r.i64("in_features");
    s.out_features = r.i64("out_features");
    s.rank = r.i64("rank");
    if (s.in_features < 1 || s.out_features < 1 || s.rank < 0)
      r.fail("adapter ", a, " ('", s.name, "') has in_features ", s.in_features, ", out_features ",
             s.out_features, ", rank ", s.rank, "; they must be >= 1, >= 1, >= 0");
    const index_t initial = version == 1 ? s.rank : r.i64("initial rank");
    if (initial < 0)
      r.fail("adapter ", a, " ('", s.name, "') has initial rank ", initial, "; it must be >= 0");
    adapter_shard& h = s.shard;
    h.triplet_begin = r.i64("shard triplet_begin");
    h.triplet_count = r.i64("shard triplet_count");
    h.in_begin = r.i64("shard in_begin");
    h.in_count = r.i64("shard in_count");
    h.out_begin = r.i64("shard out_begin");
    h.out_count = r.i64("shard out_count");
    const std::uint8_t scores_e = r.u8("shard scores_e");
    if (scores_e > 1) r.fail("adapter ", a, " ('", s.name, "') has shard scores_e ", int(scores_e), " (0 or 1)");
    h.scores_e = scores_e == 1;
    auto within = [&](index_t begin, index_t count, index_t total, const char* what) {
      if (begin < 0 || count < 0 || begin > total || count > total - begin)
        r.fail("adapter ", a, " ('", s.name, "') has shard ", what, " [", begin, ", +", count,
               ") outside [0, ", total, "]");
    };
    within(h.triplet_begin, h.triplet_count, s.rank, "triplets");
    within(h.in_begin, h.in_count, s.in_features, "in columns");
    within(h.out_begin, h.out_count, s.out_features, "out rows");
    if (h.in_begin % rank_allocator<T>::sum_block != 0 || h.out_begin % rank_allocator<T>::sum_block != 0)
      r.fail("adapter ", a, " ('", s.name, "') has shard in_begin ", h.in_begin, " and out_begin ",
             h.out_begin, "; they must be multiples of ", rank_allocator<T>::sum_block);
    // The state covers the slice this process holds.
    const auto in = static_cast<std::uint64_t>(h.in_count);
    const auto out = static_cast<std::uint64_t>(h.out_count);
    const auto rk = static_cast<std::uint64_t>(h.triplet_count);
    const std::uint64_t per_triplet =  // a row of A, one E, a column of B
        checked_mad(1, in, checked_mad(1, out, 1, r, "an adapter's size"), r, "an adapter's size");
    elements = checked_mad(rk, per_triplet, elements, r, "the adapters' element count");
    triplets = checked_mad(1, static_cast<std::uint64_t>(s.rank), triplets, r, "the adapters' rank sum");
    initial_triplets = checked_mad(1, static_cast<std::uint64_t>(initial), initial_triplets, r,
                                   "the adapters' initial rank sum");
    im.shapes.push_back(std::move(s));
    im.initial_ranks.push_back(initial);
  }
  // rank_allocator::change_rank changes no rank while any adapter is sharded.
  const auto changed = [&](std::size_t a) { return im.initial_ranks[a] != im.shapes[a].rank; };
  for (std::size_t c = 0; c < n; ++c) {
    if (!changed(c)) continue;
    for (std::size_t a = 0; a < n; ++a) {
      if (detail::holds_whole(im.shapes[a])) continue;
      const adapter_shape& s = im.shapes[c];
      if (a == c)
        r.fail("adapter ", a, " ('", s.name, "') is sharded but has rank ", s.rank,
               " and initial rank ", im.initial_ranks[c], "; a sharded adapter's rank cannot change");
      r.fail("adapter ", c, " ('", s.name, "') has rank ", s.rank, " and initial rank ", im.initial_ranks[c],
             ", but adapter ", a, " ('", im.shapes[a].name, "') is sharded; a sharded allocator's rank "
             "cannot change");
    }
    break;
  }

  im.schedule_tag = r.str("schedule tag", max_tag);
  {
    const std::uint32_t len = r.u32("schedule options length");
    const auto b = r.take(len, "schedule options");
    im.schedule_options.assign(b.begin(), b.end());
  }
  im.metric_tag = r.str("metric tag", max_tag);
  im.metric_state_size = r.u32("metric state size");
  {
    const std::uint32_t len = r.u32("metric options length");
    const auto b = r.take(len, "metric options");
    im.metric_options.assign(b.begin(), b.end());
  }

  const std::uint8_t semantics = r.u8("final_phase");
  const std::uint8_t ties = r.u8("tie_policy");
  const std::uint8_t non_finite = r.u8("non_finite_policy");
  if (semantics > 1) r.fail("final_phase code ", int(semantics), " is unknown (0 peft, 1 loralib)");
  if (ties > 1) r.fail("tie_policy code ", int(ties), " is unknown (0 prune_all_ties, 1 exact_budget)");
  if (non_finite > 2)
    r.fail("non_finite_policy code ", int(non_finite),
           " is unknown (0 ignore_elements, 1 skip_step, 2 throw_error)");
  im.options.final_phase = static_cast<final_phase_rule>(semantics);
  im.options.ties = static_cast<tie_policy>(ties);
  im.options.non_finite = static_cast<non_finite_policy>(non_finite);
  im.options.rank_can_grow = version == 1 ? false : r.flag("rank_can_grow");
  im.options.threads = r.u32("threads");
  if (im.options.threads < 1 || im.options.threads > max_threads)
    r.fail("threads must be in [1, ", max_threads, "], got ", im.options.threads);

  im.last_step = r.i64("last step");
  if (im.last_step < -1) r.fail("last step must be >= -1, got ", im.last_step);
  im.force_masked = r.flag("final-phase flag");

  const std::uint64_t count = r.u64("metric state count");
  const std::uint64_t expected =
      checked_mad(elements, im.metric_state_size, 0, r, "the metric state's size");
  if (count != expected)
    r.fail("the metric state has ", count, " values; ", elements, " elements of ",
           im.metric_state_size, " values each make ", expected);
  const auto state = r.take(checked_mad(count, sizeof(T), 0, r, "the metric state's size"),
                            "the metric state");
  im.metric_state.resize(count);
  checkpoint_reader sr(state);
  for (std::uint64_t i = 0; i < count; ++i) {
    T v;
    if constexpr (sizeof(T) == 4) v = sr.f32("a state value");
    else v = sr.f64("a state value");
    if (!std::isfinite(v)) r.fail("metric state value ", i, " is not finite (", v, ")");
    im.metric_state[i] = v;
  }

  const std::uint64_t b0 = r.u64("triplet count");
  if (b0 != triplets)
    r.fail("the triplet count is ", b0, ", the adapters' ranks add up to ", triplets);
  const auto kept = r.take(b0, "the kept mask");
  im.kept.assign(kept.begin(), kept.end());
  for (std::size_t i = 0; i < im.kept.size(); ++i)
    if (im.kept[i] > 1) r.fail("kept mask entry ", i, " must be 0 or 1, got ", int(im.kept[i]));
  const auto scores = r.take(checked_mad(b0, 8, 0, r, "the scores' size"), "the triplet scores");
  im.scores.resize(b0);
  checkpoint_reader cr(scores);
  for (std::uint64_t i = 0; i < b0; ++i) {
    im.scores[i] = cr.f64("a score");
    if (!(im.scores[i] >= 0)) r.fail("triplet score ", i, " must be >= 0, got ", im.scores[i]);
  }

  step_result<T>& l = im.last;
  l.step = r.i64("last result's step");
  l.budget = r.i64("last result's budget");
  l.mask_due = r.flag("last result's mask flag");
  l.importance_updated = r.flag("last result's update flag");
  l.forced = r.flag("last result's forced flag");
  const std::uint8_t action = r.u8("last result's action");
  if (action > 2) r.fail("last result's action code ", int(action), " is unknown (0, 1 or 2)");
  l.action = static_cast<mask_action>(action);
  l.skipped = r.flag("last result's skipped flag");
  l.threshold = r.f64("last result's threshold");
  l.prune_count = r.i64("last result's prune_count");
  l.non_finite = r.i64("last result's non-finite count");
  l.missing = version == 1 ? 0 : r.i64("last result's missing count");
  r.expect_end("the payload");

  if (l.step != im.last_step)
    r.fail("the last result is of step ", l.step, ", the last step is ", im.last_step);
  // The budget is the schedule's: at most b0 unless it may rise above (growth). The prune count
  // is of the ranks at that step, which a later change may have made smaller than now's.
  const auto b0_initial = static_cast<std::int64_t>(initial_triplets);
  const bool budget_ok = l.budget >= 0 && (im.options.rank_can_grow || l.budget <= b0_initial);
  const bool prune_ok = l.prune_count >= 0 && (version > 1 || l.prune_count <= b0_initial);
  if (!budget_ok || !prune_ok)
    r.fail("the last result's budget ", l.budget, " and prune_count ", l.prune_count, " must be in [0, ",
           b0_initial, "]", im.options.rank_can_grow ? " (the budget may be more: rank_can_grow)" : "");
  if (l.missing < 0) r.fail("the last result's missing count is negative: ", l.missing);
  if (std::isnan(l.threshold)) r.fail("the last result's threshold is NaN");
  if (l.non_finite < 0) r.fail("the last result's non-finite count is negative: ", l.non_finite);
  if (im.force_masked && (im.options.final_phase != final_phase_rule::peft || im.last_step < 0))
    r.fail("the final-phase flag is set, which only a PEFT-semantics allocator that has stepped sets");
  return im;
}

template <class T>
image<T> parse(std::span<const std::uint8_t> bytes) {
  const verified v = verified_payload(bytes);
  return parse_payload<T>(v.payload, v.version);
}

/// The image of an allocator, as save_checkpoint writes it.
template <class T, class M, class S, class C>
image<T> image_of(const rank_allocator<T, M, S, C>& alloc) {
  const auto st = alloc.resumable();
  image<T> im;
  im.writer = concat("adalora ", ADALORA_VERSION_MAJOR, ".", ADALORA_VERSION_MINOR, ".",
                     ADALORA_VERSION_PATCH);
  im.shapes.assign(alloc.shapes().begin(), alloc.shapes().end());
  im.initial_ranks.assign(alloc.initial_ranks().begin(), alloc.initial_ranks().end());
  im.schedule_tag = std::string(checkpoint_traits<S>::tag);
  checkpoint_writer sw;
  checkpoint_traits<S>::encode(alloc.schedule(), sw);
  im.schedule_options = sw.take();
  im.metric_tag = std::string(checkpoint_traits<M>::tag);
  im.metric_state_size = static_cast<std::uint32_t>(M::state_size);
  checkpoint_writer mw;
  checkpoint_traits<M>::encode(alloc.metric(), mw);
  im.metric_options = mw.take();
  im.options = alloc.options();
  im.last_step = st.last_step;
  im.force_masked = st.force_masked;
  im.metric_state.assign(st.metric_state.begin(), st.metric_state.end());
  im.kept.assign(st.kept.begin(), st.kept.end());
  im.scores.assign(st.scores.begin(), st.scores.end());
  im.last = *st.last;
  im.last.kept = {};
  return im;
}

/// Decodes options bytes with a trait, requiring that it reads them all.
template <class X>
X decode_options(std::span<const std::uint8_t> bytes, std::string_view what) {
  checkpoint_reader r(bytes);
  try {
    X x = checkpoint_traits<X>::decode(r);
    r.expect_end(concat("the ", what, " options"));
    return x;
  } catch (const checkpoint_error& e) {
    fail(checkpoint_error::kind::malformed, "the ", what, " options: ", e.what());
  } catch (const std::logic_error& e) {  // a constructor's validation: invalid_argument, domain_error...
    fail(checkpoint_error::kind::malformed, "the ", what, " options are invalid: ", e.what());
  } catch (const std::runtime_error& e) {
    fail(checkpoint_error::kind::malformed, "the ", what, " options are invalid: ", e.what());
  }
}

/// "'tag' {options}" for messages, through the trait's describe() where it has one.
template <class X>
std::string describe(const X& x, const std::vector<std::uint8_t>& bytes) {
  if constexpr (has_checkpoint_describe<X>)
    return concat("'", checkpoint_traits<X>::tag, "' ", checkpoint_traits<X>::describe(x));
  else
    return concat("'", checkpoint_traits<X>::tag, "' (", bytes.size(), " bytes of options)");
}

/// Throws unless the stored tag and options are those of `mine`. Stored options of the same tag
/// are decoded first, so that damaged ones read as malformed rather than as a mismatch.
template <class X>
void match_options(std::string_view what, const std::string& tag,
                   const std::vector<std::uint8_t>& stored, const X& mine) {
  checkpoint_writer w;
  checkpoint_traits<X>::encode(mine, w);
  if (tag != checkpoint_traits<X>::tag)
    fail(checkpoint_error::kind::mismatch, what, ": the checkpoint was made with '", tag,
         "', the allocator has ", describe(mine, w.data()));
  const X theirs = decode_options<X>(stored, what);
  if (stored != w.data())
    fail(checkpoint_error::kind::mismatch, what, ": the checkpoint was made with ",
         describe(theirs, stored), ", the allocator has ", describe(mine, w.data()));
}

inline const char* name_of(final_phase_rule f) { return f == final_phase_rule::peft ? "peft" : "loralib"; }
inline const char* name_of(tie_policy t) {
  return t == tie_policy::prune_all_ties ? "prune_all_ties" : "exact_budget";
}
inline const char* name_of(non_finite_policy p) {
  return p == non_finite_policy::ignore_elements ? "ignore_elements"
         : p == non_finite_policy::skip_step     ? "skip_step"
                                                 : "throw_error";
}

/// The largest rank adapter `a` of `alloc` can be reshaped to by a load: full rank
/// min(in_features, out_features) (a triplet beyond it adds nothing that a full-rank adapter
/// cannot express), or its rank now or at construction where larger. Its rank now where it
/// cannot change (sharded, multi-process). Bounds what a load allocates, and so
/// max_loadable_size.
template <class T, class M, class S, class C>
index_t loadable_rank(const rank_allocator<T, M, S, C>& alloc, std::size_t a) {
  const adapter_shape& s = alloc.shapes()[a];
  if (!std::is_same_v<C, single_process> || !detail::holds_whole(s)) return s.rank;
  return std::max({s.rank, alloc.initial_ranks()[a], std::min(s.in_features, s.out_features)});
}

/// Throws checkpoint_error(mismatch) naming the first difference between the checkpoint's
/// configuration and the allocator's (ranks now may differ: load_into reshapes).
template <class T, class M, class S, class C>
void match(const image<T>& im, const rank_allocator<T, M, S, C>& alloc) {
  using k = checkpoint_error::kind;
  const auto shapes = alloc.shapes();
  if (im.shapes.size() != shapes.size())
    fail(k::mismatch, "the checkpoint has ", im.shapes.size(), " adapters, the allocator ",
         shapes.size());
  for (std::size_t a = 0; a < shapes.size(); ++a) {
    const adapter_shape& c = im.shapes[a];
    const adapter_shape& s = shapes[a];
    if (c.name != s.name)
      fail(k::mismatch, "adapter ", a, " is named '", c.name, "' in the checkpoint, '", s.name,
           "' in the allocator");
    // Ranks at construction must match; ranks now may differ (load_into reshapes).
    const index_t c0 = initial_rank(im, a), s0 = alloc.initial_ranks()[a];
    if (c.in_features != s.in_features || c.out_features != s.out_features || c0 != s0)
      fail(k::mismatch, "adapter ", a, " ('", s.name, "') has in_features ", c.in_features,
           ", out_features ", c.out_features, ", rank ", c0, " in the checkpoint, ",
           s.in_features, ", ", s.out_features, ", ", s0, " in the allocator",
           c0 == c.rank && s0 == s.rank
               ? std::string()
               : concat(" (ranks at construction, ", c.rank, " and ", s.rank,
                        " now; build the allocator with the ranks at construction, as "
                        "read_checkpoint_config returns them, and loading reshapes it)"));
    const adapter_shard& ch = c.shard;
    const adapter_shard& sh = s.shard;
    if (c.rank != s.rank) {
      // change_rank() (load_into) needs one process and every adapter whole.
      std::string why;
      if (!detail::holds_whole(c) || !detail::holds_whole(s))
        why = "a sharded adapter's rank cannot change";
      else if (!std::is_same_v<C, single_process>)
        why = "a multi-process allocator's rank cannot change (every process would have to change "
              "its shards at once)";
      for (std::size_t b = 0; b < shapes.size() && why.empty(); ++b)
        if (!detail::holds_whole(shapes[b]))
          why = concat("adapter ", b, " ('", shapes[b].name, "') is sharded, and a sharded "
                       "allocator's rank cannot change");
      if (!why.empty())
        fail(k::mismatch, "adapter ", a, " ('", s.name, "') has rank ", c.rank, " in the checkpoint (",
             c0, " at construction), ", s.rank, " in the allocator, which cannot be reshaped to it: ",
             why, " (docs/scale_out.md)");
      if (const index_t most = loadable_rank(alloc, a); c.rank > most)
        fail(k::mismatch, "adapter ", a, " ('", s.name, "') has rank ", c.rank,
             " in the checkpoint, more than the ", most, " this allocator loads (full rank ",
             std::min(s.in_features, s.out_features), " = min(in_features, out_features), or its "
             "rank now or at construction where larger)");
    }
    if (c.rank != s.rank ? ch.scores_e != sh.scores_e  // both whole: only scores_e can differ
                         : ch.triplet_begin != sh.triplet_begin || ch.triplet_count != sh.triplet_count ||
                               ch.in_begin != sh.in_begin || ch.in_count != sh.in_count ||
                               ch.out_begin != sh.out_begin || ch.out_count != sh.out_count ||
                               ch.scores_e != sh.scores_e)
      fail(k::mismatch, "adapter ", a, " ('", s.name, "') holds shard triplets [", ch.triplet_begin,
           ", +", ch.triplet_count, "), in [", ch.in_begin, ", +", ch.in_count, "), out [",
           ch.out_begin, ", +", ch.out_count, "), scores_e ", ch.scores_e,
           " in the checkpoint, triplets [", sh.triplet_begin, ", +", sh.triplet_count, "), in [",
           sh.in_begin, ", +", sh.in_count, "), out [", sh.out_begin, ", +", sh.out_count,
           "), scores_e ", sh.scores_e, " in the allocator (a sharded run resumes with the same layout)");
  }
  match_options("schedule", im.schedule_tag, im.schedule_options, alloc.schedule());
  match_options("importance metric", im.metric_tag, im.metric_options, alloc.metric());
  if (im.metric_state_size != M::state_size)
    fail(k::mismatch, "importance metric: the checkpoint keeps ", im.metric_state_size,
         " state values per element, the allocator's metric ", M::state_size);
  const allocator_options& o = alloc.options();
  if (im.options.final_phase != o.final_phase)
    fail(k::mismatch, "allocator options: the checkpoint has final_phase_rule::", name_of(im.options.final_phase),
         ", the allocator final_phase_rule::", name_of(o.final_phase));
  if (im.options.ties != o.ties)
    fail(k::mismatch, "allocator options: the checkpoint has tie_policy::", name_of(im.options.ties),
         ", the allocator tie_policy::", name_of(o.ties));
  if (im.options.non_finite != o.non_finite)
    fail(k::mismatch, "allocator options: the checkpoint has non_finite_policy::",
         name_of(im.options.non_finite), ", the allocator non_finite_policy::", name_of(o.non_finite));
  if (im.options.rank_can_grow != o.rank_can_grow)
    fail(k::mismatch, "allocator options: the checkpoint has rank_can_grow = ",
         im.options.rank_can_grow ? "true" : "false", ", the allocator rank_can_grow = ",
         o.rank_can_grow ? "true" : "false");
  if (im.force_masked && im.last_step < alloc.schedule().final_phase_start())
    fail(k::malformed, "the final-phase flag is set at step ", im.last_step,
         ", before the final phase starts (step ", alloc.schedule().final_phase_start(), ")");
}

/// Runs f(); a checkpoint_error gets `context` ("adalora::load_checkpoint: 'path': ") in front.
/// Running out of memory, or a size beyond what a vector holds, becomes checkpoint_error(io)
/// with the same context: a bare std::bad_alloc would not say which file or call it was.
template <class F>
decltype(auto) with_context(const std::string& context, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const checkpoint_error& e) {
    throw checkpoint_error(e.error_kind(), context + e.what());
  } catch (const std::bad_alloc&) {
    throw checkpoint_error(checkpoint_error::kind::io, context + "out of memory (std::bad_alloc)");
  } catch (const std::length_error& e) {
    throw checkpoint_error(checkpoint_error::kind::io,
                           concat(context, "a size is beyond what memory can hold (std::length_error: ",
                                  e.what(), ")"));
  }
}

inline std::string source(const char* fn, const std::string& path) {
  return concat("adalora::", fn, ": '", path, "': ");
}

/// The stream to its end, but no more than max_bytes: a longer stream is refused once it has
/// passed them (an endless one must not fill memory).
inline std::vector<std::uint8_t> read_all(std::istream& in, std::uint64_t max_bytes) {
  std::vector<std::uint8_t> bytes;
  char buf[1 << 16];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    bytes.insert(bytes.end(), buf, buf + in.gcount());
    if (bytes.size() > max_bytes)
      fail(checkpoint_error::kind::io, "it has more than ", max_bytes,
           " bytes, the most a checkpoint of this allocator can have");
  }
  if (in.bad()) fail(checkpoint_error::kind::io, "reading failed");
  return bytes;
}

/// The regular file at `path`, at most max_bytes long; anything else (a directory, a FIFO, a
/// device) is refused before a byte is read (adalora/io/file_io.hpp).
inline std::vector<std::uint8_t> read_file(const std::string& path,
                                           std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) {
  try {
    return read_regular_file<std::uint8_t>(path, max_bytes);
  } catch (const detail::file_io::failure& e) {
    fail(checkpoint_error::kind::io, e.what());
  }
}

/// More bytes than any checkpoint that loads into `alloc` can have: its checkpoint with every
/// adapter at loadable_rank(), with room for the longest writer string and to spare. A longer
/// file or stream is refused before it is read in full.
template <class T, class M, class S, class C>
std::uint64_t max_loadable_size(const rank_allocator<T, M, S, C>& alloc) {
  // In long double and saturated: full rank of a wide adapter can be beyond what a u64 counts.
  const auto ld = [](auto v) { return static_cast<long double>(v); };
  long double n = 4096;
  for (std::size_t a = 0; a < alloc.num_adapters(); ++a) {
    const adapter_shape& s = alloc.shapes()[a];
    const index_t rank = loadable_rank(alloc, a);
    // The state of the triplets this process holds (all of a whole adapter's), and every
    // triplet's mask entry and score.
    const index_t held = detail::holds_whole(s) ? rank : s.shard.triplet_count;
    n += 128 + ld(s.name.size()) + 9 * ld(rank) +
         ld(held) * (ld(s.shard.in_count) + 1 + ld(s.shard.out_count)) * ld(M::state_size) * ld(sizeof(T));
  }
  checkpoint_writer w;
  checkpoint_traits<S>::encode(alloc.schedule(), w);
  checkpoint_traits<M>::encode(alloc.metric(), w);
  n += ld(w.data().size());
  return n >= 1.8e19L ? std::numeric_limits<std::uint64_t>::max() : static_cast<std::uint64_t>(n);
}

/// Reshapes `alloc` to the checkpoint's ranks (match() allowed it: whole adapters, one process),
/// for restore() to overwrite every value: each adapter keeps its first min(old, new) triplets
/// and appends the rest. change_rank() adds triplets only before the final phase (growth is a
/// training decision there), so the allocator is first restored to a fresh state of its
/// layout, and back to its own if the reshape fails: all-or-nothing, like the rest of a load.
template <class T, class M, class S, class C>
void reshape_to(rank_allocator<T, M, S, C>& alloc, const image<T>& im) {
  rank_change change;
  for (std::size_t a = 0; a < im.shapes.size(); ++a) {
    triplet_map m;
    m.old_rank = alloc.shapes()[a].rank;
    for (index_t i = 0; i < im.shapes[a].rank; ++i) m.source.push_back(i < m.old_rank ? i : new_triplet);
    change.push_back(std::move(m));
  }
  const auto st = alloc.resumable();
  const std::vector<T> state(st.metric_state.begin(), st.metric_state.end());
  const std::vector<std::uint8_t> kept(st.kept.begin(), st.kept.end());
  const std::vector<double> scores(st.scores.begin(), st.scores.end());
  const step_result<T> last = *st.last;
  const std::vector<T> zeros(state.size(), T(0));
  const step_result<T> none{};
  alloc.restore({-1, false, zeros, kept, scores, &none});
  const auto undo = [&] { alloc.restore({st.last_step, st.force_masked, state, kept, scores, &last}); };
  try {
    alloc.change_rank(change);
  } catch (const std::bad_alloc&) {
    undo();
    throw;  // with_context names it
  } catch (const std::length_error&) {
    undo();
    throw;
  } catch (const std::exception& e) {  // a worker thread that could not start
    undo();
    fail(checkpoint_error::kind::io, "the allocator could not be reshaped to the checkpoint's ranks: ",
         e.what());
  }
}

/// The checkpoint of an allocator. Refuses what load would refuse, because a file that cannot
/// be loaded back must not replace a good one: names and tags over the format's limits, and
/// non-finite metric state (which appears only after the metric returned a non-finite score,
/// when step() threw).
template <class T, class M, class S, class C>
std::vector<std::uint8_t> encode_allocator(const rank_allocator<T, M, S, C>& alloc) {
  using k = checkpoint_error::kind;
  for (const adapter_shape& a : alloc.shapes())
    if (a.name.size() > max_name)
      fail(k::malformed, "adapter name '", a.name.substr(0, 40), "...' is ", a.name.size(),
           " bytes long, more than the ", max_name, " a checkpoint holds");
  for (std::string_view tag : {std::string_view(checkpoint_traits<S>::tag),
                               std::string_view(checkpoint_traits<M>::tag)})
    if (tag.empty() || tag.size() > max_tag)
      fail(k::malformed, "checkpoint_traits tag '", tag, "' must have 1 to ", max_tag, " bytes");
  const auto state = alloc.resumable().metric_state;
  for (std::size_t i = 0; i < state.size(); ++i)
    if (!std::isfinite(state[i]))
      fail(k::malformed, "the allocator's metric state value ", i,
           " is not finite (", state[i], "), as after a step that threw std::domain_error for a "
           "non-finite score; such a state cannot be resumed, so it is not saved");
  return encode(image_of(alloc));
}

/// Parses and validates everything first (errors get `context` in front), then restore(),
/// which cannot fail on what passed: the allocator changes completely or not at all.
template <class T, class M, class S, class C>
void load_into(rank_allocator<T, M, S, C>& alloc, std::span<const std::uint8_t> bytes,
               const std::string& context) {
  const auto im = with_context(context, [&] {
    auto parsed = parse<T>(bytes);
    match(parsed, alloc);
    return parsed;
  });
  bool reshape = false;  // the rank changed since the allocator's state (or the checkpoint's)
  for (std::size_t a = 0; a < im.shapes.size(); ++a)
    reshape = reshape || im.shapes[a].rank != alloc.shapes()[a].rank;
  if (reshape) with_context(context, [&] { reshape_to(alloc, im); });
  alloc.restore({im.last_step, im.force_masked, im.metric_state, im.kept, im.scores, &im.last});
}

}  // namespace detail::ckpt

// ---- the API -----------------------------------------------------------------------------------

/// The checkpoint of `alloc` as bytes (header + payload).
template <class T, class M, class S, class C>
std::vector<std::uint8_t> checkpoint_bytes(const rank_allocator<T, M, S, C>& alloc) {
  static_assert(detail::check_checkpointable<M, S>());
  return detail::ckpt::with_context("adalora::checkpoint_bytes: ",
                                    [&] { return detail::ckpt::encode_allocator(alloc); });
}

/// Restores `alloc` from checkpoint bytes. Throws checkpoint_error saying what is wrong (not a
/// checkpoint, truncated, newer version, corrupt, malformed, or made for another configuration);
/// the allocator is then unchanged.
template <class T, class M, class S, class C>
void load_checkpoint_bytes(rank_allocator<T, M, S, C>& alloc, std::span<const std::uint8_t> bytes) {
  static_assert(detail::check_checkpointable<M, S>());
  detail::ckpt::load_into(alloc, bytes, "adalora::load_checkpoint_bytes: ");
}

/// Writes the checkpoint of `alloc` to a stream (not atomic: prefer save_checkpoint for files).
template <class T, class M, class S, class C>
void write_checkpoint(const rank_allocator<T, M, S, C>& alloc, std::ostream& out) {
  static_assert(detail::check_checkpointable<M, S>());
  detail::ckpt::with_context("adalora::write_checkpoint: stream: ", [&] {
    const auto bytes = detail::ckpt::encode_allocator(alloc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) detail::ckpt::fail(checkpoint_error::kind::io, "writing failed");
  });
}

/// Reads a checkpoint from a stream (to its end) into `alloc`; as load_checkpoint_bytes. A
/// stream longer than any checkpoint of `alloc` is refused once it has passed that size.
template <class T, class M, class S, class C>
void read_checkpoint(rank_allocator<T, M, S, C>& alloc, std::istream& in) {
  static_assert(detail::check_checkpointable<M, S>());
  const std::string context = "adalora::read_checkpoint: stream: ";
  const auto bytes = detail::ckpt::with_context(
      context, [&] { return detail::ckpt::read_all(in, detail::ckpt::max_loadable_size(alloc)); });
  detail::ckpt::load_into(alloc, bytes, context);
}

/// The system calls save_checkpoint makes, replaceable to inject failures in tests (or to count
/// bytes): adalora::file_write_ops (adalora/io/file_io.hpp). Empty members mean the POSIX call;
/// each returns what the POSIX call returns and sets errno on failure, or throws.
using checkpoint_file_ops = file_write_ops;

namespace detail::ckpt {

/// adalora::write_file_atomically, its failures as checkpoint_error(io).
inline void write_file(const std::string& path, std::span<const std::uint8_t> bytes,
                      const checkpoint_file_ops& ops) {
  if (path.empty()) fail(checkpoint_error::kind::io, "the path is empty; nothing was written");
  try {
    adalora::write_file_atomically(path, bytes, ops);
  } catch (const detail::file_io::failure& e) {
    // The shared writer speaks of "the previous file"; here it is a checkpoint.
    std::string message = e.what();
    constexpr std::string_view file = "the previous file is intact";
    if (message.ends_with(file))
      message.replace(message.size() - file.size(), file.size(), "the previous checkpoint is intact");
    fail(checkpoint_error::kind::io, message);
  }
}

}  // namespace detail::ckpt

/// Saves the checkpoint of `alloc` to `path` atomically (see the header comment). Throws
/// checkpoint_error(io) naming the failed operation; the previous file at `path`, if any, is
/// then intact and no temporary file is left.
template <class T, class M, class S, class C>
void save_checkpoint(const rank_allocator<T, M, S, C>& alloc, const std::string& path,
                     const checkpoint_file_ops& ops = {}) {
  static_assert(detail::check_checkpointable<M, S>());
  detail::ckpt::with_context(detail::ckpt::source("save_checkpoint", path), [&] {
    detail::ckpt::write_file(path, detail::ckpt::encode_allocator(alloc), ops);
  });
}

/// Restores `alloc` from the checkpoint file at `path`. Throws checkpoint_error naming the file
/// and what is wrong; the allocator is then unchanged. Refuses, before reading, what is not a
/// regular file and a file longer than any checkpoint of `alloc` can be.
template <class T, class M, class S, class C>
void load_checkpoint(rank_allocator<T, M, S, C>& alloc, const std::string& path) {
  static_assert(detail::check_checkpointable<M, S>());
  const std::string context = detail::ckpt::source("load_checkpoint", path);
  const auto bytes = detail::ckpt::with_context(
      context, [&] { return detail::ckpt::read_file(path, detail::ckpt::max_loadable_size(alloc)); });
  detail::ckpt::load_into(alloc, bytes, context);
}

/// The constructor arguments of the allocator a checkpoint was saved from, so that a resumed
/// run can rebuild it without its original configuration:
///
///   auto c = adalora::read_checkpoint_config<float>(path);
///   adalora::rank_allocator<float> alloc(c.shapes, c.schedule, c.metric, c.options);
///   adalora::load_checkpoint(alloc, path);
///
/// `options.threads` is the saved run's; change it freely (results do not depend on it).
/// `shapes` have the ranks at construction (the schedule's initial budget is their sum); if the
/// run changed rank (compact, grow), load_checkpoint reshapes the allocator to the saved ranks,
/// and alloc.shapes() then has them, for the caller's tensors.
template <class Metric, class Schedule>
struct checkpoint_config {
  std::vector<adapter_shape> shapes;
  Schedule schedule;
  Metric metric;
  allocator_options options;
};

/// What read_checkpoint_config lets a file make the library allocate. The shapes a file declares
/// size the allocator built from them, and only part of that memory is backed by the file's own
/// bytes: the metric state of the slice this process holds is, but the block sums of every
/// triplet's row of A and column of B (one per 256 of the WHOLE adapter's in_features and
/// out_features, held or not) are not, nor, for a stateless metric (K = 0), anything that
/// follows the slice's size. A configuration whose allocator would need more than 16 bytes per
/// byte of the file plus `max_unbacked_bytes` is refused with checkpoint_error(malformed),
/// naming the adapter. Legitimate checkpoints stay far below (a LLaMA-70B-sized run, every
/// linear layer adapted at rank 12, needs under 8 MiB of block sums); raise max_unbacked_bytes
/// for a checkpoint you trust whose shapes are larger.
struct checkpoint_limits {
  std::uint64_t max_unbacked_bytes = std::uint64_t{64} << 20;
};

namespace detail::ckpt {

/// Bytes of allocator that a byte of checkpoint backs: a state value takes as many bytes in the
/// file as in the allocator, which adds its scores, sums and tasks (a few times the file at most).
inline constexpr std::uint64_t backed_per_byte = 16;

/// About how many bytes an allocator's constructor allocates for adapter `s` (rank_allocator.hpp
/// sizes them from the shapes), in long double so that no value of a hostile file overflows it:
/// the metric state of the slice held; per triplet of the whole adapter its scores, mask and
/// selection scratch (33 bytes) and the block sums of its row of A and column of B; the tasks
/// planned over the slice held (at most one per row of A, one for E, one per 256 rows of B);
/// the adapter's own records.
template <class T>
long double allocator_bytes(const adapter_shape& s, std::uint32_t state_size) {
  const auto ld = [](auto v) { return static_cast<long double>(v); };
  const auto blocks = [&](index_t n) { return std::ceil(ld(n) / ld(rank_allocator<T>::sum_block)); };
  const adapter_shard& h = s.shard;
  long double bytes = ld(h.triplet_count) * (ld(h.in_count) + 1 + ld(h.out_count)) * ld(state_size) * ld(sizeof(T));
  bytes += ld(s.rank) * (33 + 8 * (blocks(s.in_features) + blocks(s.out_features)));
  if (h.triplet_count > 0) bytes += 96 * (ld(h.triplet_count) + 2 + blocks(h.out_count));
  return bytes + 256 + ld(s.name.size());
}

/// Throws checkpoint_error(malformed) if an allocator of the image's configuration (built at the
/// ranks at construction, `built`, then reshaped to the image's) needs more memory than
/// `file_size` bytes back under `limits` (see checkpoint_limits).
template <class T>
void check_backed(const image<T>& im, std::span<const adapter_shape> built, std::size_t file_size,
                  const checkpoint_limits& limits) {
  const auto ld = [](auto v) { return static_cast<long double>(v); };
  const long double allowed = ld(file_size) * ld(backed_per_byte) + ld(limits.max_unbacked_bytes);
  long double need = 1024 + 8 * ld(im.options.threads);  // the allocator itself, a split per thread
  for (std::size_t a = 0; a < im.shapes.size(); ++a) {
    const adapter_shape& s = im.shapes[a];
    // Built at the ranks at construction, then reshaped to the ranks now (both held meanwhile).
    need += allocator_bytes<T>(s, im.metric_state_size);
    if (built[a].rank != s.rank) need += allocator_bytes<T>(built[a], im.metric_state_size);
    if (need <= allowed) continue;
    const adapter_shard& h = s.shard;
    const auto whole = [](long double v) {  // for the message: an integer, saturated
      return static_cast<std::uint64_t>(std::min(v, 1.8e19L));
    };
    fail(checkpoint_error::kind::malformed, "adapter ", a, " ('", s.name, "') has in_features ",
         s.in_features, ", out_features ", s.out_features, " and rank ", s.rank,
         " (this process holds triplets [", h.triplet_begin, ", +", h.triplet_count, "), in [",
         h.in_begin, ", +", h.in_count, "), out [", h.out_begin, ", +", h.out_count,
         ")): with the adapters before it, an allocator of this configuration would need about ",
         whole(need), " bytes, more than its ", file_size, " bytes back (", backed_per_byte,
         " per byte, plus checkpoint_limits::max_unbacked_bytes = ", limits.max_unbacked_bytes,
         "); raise that limit if you trust the checkpoint and expect these shapes");
  }
}

template <class T, class Metric, class Schedule>
checkpoint_config<Metric, Schedule> config_of(std::span<const std::uint8_t> bytes,
                                              const checkpoint_limits& limits) {
  using k = checkpoint_error::kind;
  image<T> im = parse<T>(bytes);
  if (im.schedule_tag != checkpoint_traits<Schedule>::tag)
    fail(k::mismatch, "the checkpoint's schedule is '", im.schedule_tag, "', not '",
         checkpoint_traits<Schedule>::tag, "'");
  if (im.metric_tag != checkpoint_traits<Metric>::tag || im.metric_state_size != Metric::state_size)
    fail(k::mismatch, "the checkpoint's importance metric is '", im.metric_tag, "' with ",
         im.metric_state_size, " state values per element, not '", checkpoint_traits<Metric>::tag,
         "' with ", Metric::state_size);
  Schedule schedule = decode_options<Schedule>(im.schedule_options, "schedule");
  Metric metric = decode_options<Metric>(im.metric_options, "importance metric");
  // What the allocator's constructor refuses, so that a configuration that reads constructs.
  if (const std::string problem = detail::adapter_name_problem(im.shapes); !problem.empty())
    fail(k::malformed, problem);
  std::int64_t b0 = 0;
  for (std::size_t a = 0; a < im.shapes.size(); ++a) b0 += initial_rank(im, a);  // bounded by parse()
  if (schedule.initial_budget() != b0)
    fail(k::malformed, "the schedule's initial budget ", schedule.initial_budget(),
         " is not the adapters' rank sum at construction ", b0);
  if (im.force_masked && im.last_step < schedule.final_phase_start())
    fail(k::malformed, "the final-phase flag is set at step ", im.last_step,
         ", before the final phase starts (step ", schedule.final_phase_start(), ")");
  // The allocator is built at the ranks at construction, and a load reshapes it to the ranks now.
  std::vector<adapter_shape> built = im.shapes;
  for (std::size_t a = 0; a < built.size(); ++a) {
    adapter_shape& s = built[a];
    if (s.rank == initial_rank(im, a)) continue;  // parse(): only whole adapters change rank
    s.rank = initial_rank(im, a);
    s.shard.triplet_count = s.rank;
  }
  check_backed(im, built, bytes.size(), limits);
  return {std::move(built), std::move(schedule), std::move(metric), im.options};
}

}  // namespace detail::ckpt

/// Reads the configuration from checkpoint bytes. Throws checkpoint_error as
/// load_checkpoint_bytes does, checkpoint_error(mismatch) if the checkpoint's element type,
/// schedule or metric type is not T, Schedule, Metric, and checkpoint_error(malformed) if its
/// shapes would make the allocator need more memory than the bytes back (checkpoint_limits).
template <class T, class Metric = smoothed_sensitivity, class Schedule = cubic_schedule>
checkpoint_config<Metric, Schedule> read_checkpoint_config_bytes(std::span<const std::uint8_t> bytes,
                                                                 const checkpoint_limits& limits = {}) {
  static_assert(detail::check_checkpointable<Metric, Schedule>());
  return detail::ckpt::with_context("adalora::read_checkpoint_config: bytes: ", [&] {
    return detail::ckpt::config_of<T, Metric, Schedule>(bytes, limits);
  });
}

/// read_checkpoint_config_bytes of the file at `path`, which must be a regular file.
template <class T, class Metric = smoothed_sensitivity, class Schedule = cubic_schedule>
checkpoint_config<Metric, Schedule> read_checkpoint_config(const std::string& path,
                                                           const checkpoint_limits& limits = {}) {
  static_assert(detail::check_checkpointable<Metric, Schedule>());
  return detail::ckpt::with_context(detail::ckpt::source("read_checkpoint_config", path), [&] {
    return detail::ckpt::config_of<T, Metric, Schedule>(detail::ckpt::read_file(path), limits);
  });
}

}  // namespace adalora
