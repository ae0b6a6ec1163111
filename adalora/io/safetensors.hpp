#pragma once
// A reader and a writer for the safetensors format (the file format of PEFT's
// adapter_model.safetensors), on top of nlohmann/json.
//
// The format (huggingface/safetensors, "Format" in its README):
//   bytes [0, 8)         N, the header length, an unsigned 64-bit little-endian integer;
//   bytes [8, 8 + N)     the header, a UTF-8 JSON object
//                          {"<name>": {"dtype": "F32", "shape": [d0, d1, ...],
//                                      "data_offsets": [begin, end]}, ...,
//                           "__metadata__": {"<key>": "<string>", ...}}      (optional)
//                        that writers pad with trailing spaces so the data starts 8-byte aligned;
//   bytes [8 + N, EOF)   the data buffer; tensor bytes are [begin, end) relative to its start,
//                        row-major (C order), little-endian.
//
// Why a reader of our own: no C++ package for the format exists on Debian, and the format is
// small. What the reader guarantees, because a file may come from anywhere:
//  * it never reads outside the bytes it was given, whatever the file says: every length, offset
//    and shape is range- and overflow-checked before it is used;
//  * a malformed file (truncated, a header length past the end or over 100 MiB, a header that is
//    not a JSON object, is nested more than max_json_depth levels, has a duplicate key at any
//    level or anything but spaces (0x20) after its closing '}', an unknown dtype, a negative or
//    non-integer extent, data_offsets that are out of range, overlap, leave gaps, or do not match
//    shape × dtype size) is refused with std::invalid_argument naming the source, the tensor and
//    what is wrong; the rules are those of the reference implementation (its
//    `Metadata::validate`): the tensors' byte ranges must tile the data buffer exactly;
//  * values from the header are quoted in errors through json_excerpt (bounded, never recursing
//    deeply), and a file that cannot be read (a directory, a FIFO, a device) is refused before a
//    byte is read (read_regular_file);
//  * values are read with memcpy (no alignment assumption) and converted to the caller's type
//    from F16, BF16, F32 or F64.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <new>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/io/file_io.hpp"
#include "adalora/io/json_limits.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {

/// The element types of the safetensors format (names as in the header's "dtype").
enum class st_dtype : std::uint8_t { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

namespace detail::st {

struct dtype_info {
  st_dtype type;
  std::string_view name;
  std::size_t size;
};

inline constexpr dtype_info dtypes[] = {
    {st_dtype::BOOL, "BOOL", 1}, {st_dtype::U8, "U8", 1},     {st_dtype::I8, "I8", 1},
    {st_dtype::I16, "I16", 2},   {st_dtype::U16, "U16", 2},   {st_dtype::F16, "F16", 2},
    {st_dtype::BF16, "BF16", 2}, {st_dtype::I32, "I32", 4},   {st_dtype::U32, "U32", 4},
    {st_dtype::F32, "F32", 4},   {st_dtype::I64, "I64", 8},   {st_dtype::U64, "U64", 8},
    {st_dtype::F64, "F64", 8},
};

/// The reference implementation refuses headers over 100 MB; so do we, before allocating.
inline constexpr std::uint64_t max_header_size = 100'000'000;

inline std::uint64_t load_le64(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

inline void store_le64(std::uint64_t v, std::byte* p) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffu);
}

/// Copies `size` bytes of one little-endian element into host order.
inline void load_le(const std::byte* src, std::size_t size, void* dst) noexcept {
  std::memcpy(dst, src, size);
  if constexpr (std::endian::native == std::endian::big) {
    auto* b = static_cast<std::byte*>(dst);
    std::reverse(b, b + size);
  }
}

/// IEEE binary16 to float, exactly (every half value is a float).
inline float half_to_float(std::uint16_t h) noexcept {
  const int sign = (h >> 15) & 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  float value;
  if (exponent == 0)
    value = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  else if (exponent == 31)
    value = mantissa == 0 ? std::numeric_limits<float>::infinity()
                          : std::numeric_limits<float>::quiet_NaN();
  else
    value = std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
  return sign ? -value : value;
}

/// bfloat16 is the upper half of a float.
inline float bfloat16_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// The bytes a tensor of `shape` and `element_size`-byte elements holds. Throws
/// std::invalid_argument for a negative extent or a count past 2^63 - 1 (checked before each
/// multiplication, so it never wraps); a zero extent makes it 0 whatever the others are.
inline std::uint64_t shape_bytes(const char* where, const std::string& name,
                                 const std::vector<std::int64_t>& shape, std::size_t element_size) {
  const auto describe = [&] { return json_excerpt(nlohmann::json(shape)); };
  for (auto d : shape)
    ADALORA_REQUIRE(d >= 0, where, "tensor '", name, "' has a negative extent ", d, " in shape ",
                    describe());
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  constexpr auto limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  std::uint64_t n = element_size;
  for (auto d : shape) {
    ADALORA_REQUIRE(n <= limit / static_cast<std::uint64_t>(d), where, "tensor '", name,
                    "' of shape ", describe(), " would hold more than 2^63 - 1 bytes");
    n *= static_cast<std::uint64_t>(d);
  }
  return n;
}

}  // namespace detail::st

/// The header's name for a dtype ("F32", ...).
inline std::string_view to_string(st_dtype t) noexcept {
  for (const auto& d : detail::st::dtypes)
    if (d.type == t) return d.name;
  return "?";
}

/// Bytes per element of a dtype.
inline std::size_t dtype_size(st_dtype t) noexcept {
  for (const auto& d : detail::st::dtypes)
    if (d.type == t) return d.size;
  return 0;
}

/// The dtype a C++ floating-point type is stored as (float -> F32, double -> F64).
template <class T>
constexpr st_dtype st_dtype_of() noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adalora::st_dtype_of: only float (F32) and double (F64) are written");
  return std::is_same_v<T, float> ? st_dtype::F32 : st_dtype::F64;
}

/// One tensor of a safetensors file: its header entry.
struct st_tensor_info {
  std::string name;
  st_dtype dtype = st_dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  ///< data_offsets[0], relative to the data buffer
  std::uint64_t end = 0;    ///< data_offsets[1]
  /// Product of the extents (0 if any is 0; the reader has checked that it fits).
  std::int64_t numel() const noexcept {
    for (auto d : shape)
      if (d == 0) return 0;
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// A parsed safetensors file, held in memory. Construction validates everything (see the header
/// comment); afterwards every accessor is safe.
class safetensors_file {
 public:
  /// Parses `bytes` (the whole file). `source` names it in error messages.
  explicit safetensors_file(std::vector<std::byte> bytes, std::string source = "<memory>")
      : bytes_(std::move(bytes)), source_(std::move(source)) {
    parse();
  }

  /// Reads and parses a file. Throws std::runtime_error if it cannot be read (missing, not a
  /// regular file, too large for memory), std::invalid_argument if it is malformed.
  static safetensors_file read(const std::filesystem::path& path) {
    auto bytes = read_file_for<std::byte>("safetensors_file::read", path.string());
    return safetensors_file(std::move(bytes), path.string());
  }

  const std::string& source() const noexcept { return source_; }
  /// The tensors in the order of their data (ascending data_offsets).
  const std::vector<st_tensor_info>& tensors() const noexcept { return tensors_; }
  /// The "__metadata__" map (empty if absent); PEFT writes {"format": "pt"}.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// The tensor named `name`, or nullptr.
  const st_tensor_info* find(std::string_view name) const noexcept {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  /// The tensor named `name`; throws std::invalid_argument if absent.
  const st_tensor_info& at(std::string_view name) const {
    const st_tensor_info* t = find(name);
    ADALORA_REQUIRE(t != nullptr, "safetensors_file::at", "'", source_, "' has no tensor named '",
                    name, "'");
    return *t;
  }

  /// The raw little-endian bytes of a tensor of this file.
  std::span<const std::byte> raw(const st_tensor_info& t) const noexcept {
    return std::span<const std::byte>(bytes_).subspan(data_start_ + t.begin, t.end - t.begin);
  }

  /// The elements of tensor `name` in row-major order, converted to T (float or double) from
  /// F16, BF16, F32 or F64. Throws std::invalid_argument for another dtype.
  template <class T>
  std::vector<T> values(std::string_view name) const {
    std::vector<T> out(static_cast<std::size_t>(at(name).numel()));
    copy_values<T>(name, out);
    return out;
  }

  /// Same, into `out`, which must have exactly numel elements.
  template <class T>
  void copy_values(std::string_view name, std::span<T> out) const {
    static_assert(std::is_floating_point_v<T>, "adalora::safetensors_file: T must be floating-point");
    constexpr const char* where = "safetensors_file::copy_values";
    const st_tensor_info& t = at(name);
    ADALORA_REQUIRE(static_cast<std::int64_t>(out.size()) == t.numel(), where, "tensor '", name,
                    "' of '", source_, "' has ", t.numel(), " elements, the output has ",
                    out.size());
    const std::byte* p = bytes_.data() + data_start_ + t.begin;
    const std::size_t n = out.size();
    switch (t.dtype) {
      case st_dtype::F32:
        for (std::size_t i = 0; i < n; ++i) {
          float v;
          detail::st::load_le(p + 4 * i, 4, &v);
          out[i] = static_cast<T>(v);
        }
        break;
      case st_dtype::F64:
        for (std::size_t i = 0; i < n; ++i) {
          double v;
          detail::st::load_le(p + 8 * i, 8, &v);
          out[i] = static_cast<T>(v);
        }
        break;
      case st_dtype::F16:
      case st_dtype::BF16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t v;
          detail::st::load_le(p + 2 * i, 2, &v);
          out[i] = static_cast<T>(t.dtype == st_dtype::F16 ? detail::st::half_to_float(v)
                                                           : detail::st::bfloat16_to_float(v));
        }
        break;
      default:
        ADALORA_REQUIRE(false, where, "tensor '", name, "' of '", source_,
                        "' must be floating-point (F16, BF16, F32 or F64), got ",
                        to_string(t.dtype));
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("adalora::safetensors_file: '" + source_ + "' is malformed: " +
                                what);
  }

  static std::int64_t read_extent(const nlohmann::json& v, bool& ok) {
    ok = v.is_number_unsigned() ||
         (v.is_number_integer() && v.get<std::int64_t>() >= 0);
    if (!ok) return 0;
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      ok = false;
      return 0;
    }
    return static_cast<std::int64_t>(u);
  }

  void parse() {
    const std::uint64_t file_size = bytes_.size();
    if (file_size < 8)
      fail(detail::concat("it has ", file_size,
                          " bytes, fewer than the 8-byte header length (truncated?)"));
    const std::uint64_t n = detail::st::load_le64(bytes_.data());
    if (n > detail::st::max_header_size)
      fail(detail::concat("header length ", n, " is larger than the limit of ",
                          detail::st::max_header_size, " bytes"));
    if (n > file_size - 8)
      fail(detail::concat("header length ", n, " runs past the end of the file (",
                          file_size - 8, " bytes follow the length; truncated?)"));
    if (n < 2) fail(detail::concat("header length ", n, " is too small for a JSON object"));
    data_start_ = static_cast<std::size_t>(8 + n);
    const auto* text = reinterpret_cast<const char*>(bytes_.data() + 8);
    if (text[0] != '{') fail("the header does not start with '{'");

    // The format allows only spaces (0x20) as padding after the JSON object. nlohmann stops at a
    // NUL byte as if the input ended there, so a NUL is refused before parsing.
    std::size_t json_size = static_cast<std::size_t>(n);
    while (json_size > 0 && text[json_size - 1] == ' ') --json_size;
    if (const void* nul = std::memchr(text, 0, json_size))
      fail(detail::concat("the header has a NUL byte at byte ", static_cast<const char*>(nul) - text,
                          " of its ", n, "; only spaces (0x20) may pad it after the JSON object"));

    // Depth-limited (a deeply nested value would overflow the stack when described or copied)
    // and refusing duplicate keys at every level, as the reference reader does for names.
    nlohmann::json header;
    try {
      header = parse_json_strictly(std::string_view(text, json_size));
    } catch (const detail::json_io::bad_json& e) {
      fail(std::string("the header is refused: ") + e.what());
    }
    // Valid JSON that starts with '{' ends with '}' plus JSON whitespace: only spaces may pad.
    if (text[json_size - 1] != '}')
      fail(detail::concat("the header's JSON object is followed by character code ",
                          static_cast<int>(static_cast<unsigned char>(text[json_size - 1])),
                          " at byte ", json_size - 1, " of its ", n,
                          "; only spaces (0x20) may pad it"));
    if (!header.is_object()) fail("the header is not a JSON object");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& entry = it.value();
      if (name == "__metadata__") {
        if (!entry.is_object()) fail("__metadata__ must be an object of strings");
        for (auto m = entry.begin(); m != entry.end(); ++m) {
          if (!m.value().is_string())
            fail("__metadata__ value of '" + m.key() + "' must be a string, got " +
                 m.value().type_name());
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(name, entry));
    }

    // The byte ranges, in data order, must tile [0, data size) with no gap and no overlap.
    std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const std::uint64_t data_size = file_size - data_start_;
    std::uint64_t expected = 0;
    const std::string* previous = nullptr;
    for (const auto& t : tensors_) {
      if (t.begin != expected) {
        if (t.begin < expected)
          fail(detail::concat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                              "] overlap those of '", *previous, "', which end at ", expected));
        fail(detail::concat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                            "] leave a gap after byte ", expected, " of the data buffer"));
      }
      if (t.end > data_size)
        fail(detail::concat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                            "] run past the end of the data buffer (", data_size,
                            " bytes; truncated?)"));
      expected = t.end;
      previous = &t.name;
    }
    if (expected != data_size)
      fail(detail::concat("the tensors cover ", expected, " bytes of the data buffer, which has ",
                          data_size, " (trailing bytes)"));
  }

  st_tensor_info parse_entry(const std::string& name, const nlohmann::json& entry) const {
    if (!entry.is_object()) fail("entry '" + name + "' is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) fail("entry '" + name + "' has no \"" + field + "\"");
    st_tensor_info t;
    t.name = name;

    const auto& dtype = entry["dtype"];
    if (!dtype.is_string()) fail("entry '" + name + "' dtype is not a string");
    const auto& dtype_name = dtype.get_ref<const std::string&>();
    bool known = false;
    for (const auto& d : detail::st::dtypes)
      if (d.name == dtype_name) {
        t.dtype = d.type;
        known = true;
      }
    if (!known) fail("entry '" + name + "' has an unknown dtype '" + dtype_name + "'");

    const auto& shape = entry["shape"];
    if (!shape.is_array()) fail("entry '" + name + "' shape is not a list");
    // numel × element size must fit in 64 bits before it can be compared with the offsets.
    std::uint64_t bytes = dtype_size(t.dtype);
    bool overflow = false;
    for (const auto& d : shape) {
      bool ok = false;
      const std::int64_t extent = read_extent(d, ok);
      if (!ok)
        fail(detail::concat("entry '", name, "' shape ", json_excerpt(shape),
                            " must hold non-negative integers"));
      t.shape.push_back(extent);
      if (extent != 0 && bytes > std::numeric_limits<std::uint64_t>::max() /
                                     static_cast<std::uint64_t>(extent))
        overflow = true;
      else
        bytes *= static_cast<std::uint64_t>(extent);
    }
    bool has_zero = false;
    for (auto e : t.shape) has_zero = has_zero || e == 0;
    if (has_zero) bytes = 0, overflow = false;

    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2)
      fail("entry '" + name + "' data_offsets must be a list of two integers, got " +
           json_excerpt(offsets));
    bool ok0 = false, ok1 = false;
    const std::int64_t b = read_extent(offsets[0], ok0);
    const std::int64_t e = read_extent(offsets[1], ok1);
    if (!ok0 || !ok1)
      fail("entry '" + name + "' data_offsets must be non-negative integers, got " +
           json_excerpt(offsets));
    if (e < b)
      fail(detail::concat("entry '", name, "' data_offsets [", b, ", ", e,
                          "] end before they begin"));
    t.begin = static_cast<std::uint64_t>(b);
    t.end = static_cast<std::uint64_t>(e);
    if (overflow || t.end - t.begin != bytes)
      fail(detail::concat("entry '", name, "' data_offsets [", t.begin, ", ", t.end, "] hold ",
                          t.end - t.begin, " bytes, but shape ", json_excerpt(shape), " of ",
                          dtype_name, " needs ",
                          overflow ? std::string("more than 2^64") : std::to_string(bytes)));
    return t;
  }

  std::vector<std::byte> bytes_;
  std::string source_;
  std::size_t data_start_ = 0;
  std::vector<st_tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and metadata, then writes a safetensors file the way the reference writer
/// lays it out: compact JSON header with "__metadata__" first, tensors in name order, header
/// padded with spaces to a multiple of 8 bytes so that the data is 8-byte aligned, no gaps.
class safetensors_writer {
 public:
  /// Adds a tensor from raw little-endian bytes. Throws for an empty, non-UTF-8 or duplicate
  /// name, the name "__metadata__", a negative extent, a shape whose byte count passes 2^63 - 1
  /// or a byte count that does not match shape × dtype.
  void add_raw(std::string name, st_dtype dtype, std::vector<std::int64_t> shape,
               std::vector<std::byte> little_endian_bytes) {
    constexpr const char* where = "safetensors_writer::add";
    ADALORA_REQUIRE(!name.empty() && name != "__metadata__", where,
                    "tensor name must be non-empty and not \"__metadata__\", got '", name, "'");
    detail::json_io::require_utf8(where, "tensor name", name);
    ADALORA_REQUIRE(!names_.count(name), where, "tensor '", name, "' was already added");
    const std::uint64_t bytes = detail::st::shape_bytes(where, name, shape, dtype_size(dtype));
    ADALORA_REQUIRE(bytes == little_endian_bytes.size(), where, "tensor '", name, "' needs ",
                    bytes, " bytes for its shape, got ", little_endian_bytes.size());
    names_.insert(name);
    entries_.push_back({std::move(name), dtype, std::move(shape), std::move(little_endian_bytes)});
  }

  /// Adds a matrix (any strides) as a row-major tensor of shape {rows, cols}, stored as
  /// `store_as` (F32 or F64; a double stored as F32 is rounded to nearest).
  template <class T>
  void add(std::string name, matrix_view<const T> m, st_dtype store_as = st_dtype_of<std::remove_cv_t<T>>()) {
    add_shaped(std::move(name), {m.rows(), m.cols()}, m.rows(), m.cols(),
               [&](index_t i, index_t j) { return m(i, j); }, store_as);
  }

  /// Adds a vector (any stride) with the given shape (e.g. {r, 1} for lora_E, or {r}).
  template <class T>
  void add(std::string name, vector_view<const T> v, std::vector<std::int64_t> shape,
           st_dtype store_as = st_dtype_of<std::remove_cv_t<T>>()) {
    const std::uint64_t n = detail::st::shape_bytes("safetensors_writer::add", name, shape, 1);
    ADALORA_REQUIRE(v.size() >= 0 && n == static_cast<std::uint64_t>(v.size()),
                    "safetensors_writer::add", "tensor '", name, "' shape has ", n,
                    " elements, the vector ", v.size());
    add_shaped(std::move(name), std::move(shape), v.size(), 1,
               [&](index_t i, index_t) { return v[i]; }, store_as);
  }

  /// Sets a "__metadata__" entry (PEFT writes {"format": "pt"}). Both must be valid UTF-8.
  void set_metadata(std::string key, std::string value) {
    detail::json_io::require_utf8("safetensors_writer::set_metadata", "key", key);
    detail::json_io::require_utf8("safetensors_writer::set_metadata", "value", value);
    metadata_[std::move(key)] = std::move(value);
  }

  /// The whole file.
  std::vector<std::byte> serialize() const {
    std::vector<const entry*> order;
    for (const auto& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });

    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const entry* e : order) {
      header[e->name] = {{"dtype", std::string(to_string(e->dtype))},
                         {"shape", e->shape},
                         {"data_offsets", {offset, offset + e->bytes.size()}}};
      offset += e->bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::byte> out(8 + text.size() + offset);
    detail::st::store_le64(text.size(), out.data());
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::byte* p = out.data() + 8 + text.size();
    for (const entry* e : order) {
      if (!e->bytes.empty()) std::memcpy(p, e->bytes.data(), e->bytes.size());
      p += e->bytes.size();
    }
    return out;
  }

  /// Writes the file, atomically: a failure leaves any previous file at `path` as it was (see
  /// write_file_atomically). Throws std::runtime_error on an I/O error.
  void write(const std::filesystem::path& path) const {
    const auto bytes = serialize();
    write_file_for("safetensors_writer::write", path.string(),
                   std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(bytes.data()),
                                                 bytes.size()));
  }

 private:
  struct entry {
    std::string name;
    st_dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> bytes;
  };

  template <class Get>
  void add_shaped(std::string name, std::vector<std::int64_t> shape, index_t rows, index_t cols,
                  Get get, st_dtype store_as) {
    ADALORA_REQUIRE(store_as == st_dtype::F32 || store_as == st_dtype::F64,
                    "safetensors_writer::add", "tensor '", name,
                    "': floating-point data is stored as F32 or F64, got ", to_string(store_as));
    // Checked before allocating: rows × cols × size must not wrap (an unchecked view can claim
    // any extents).
    const std::uint64_t total = detail::st::shape_bytes("safetensors_writer::add", name, shape,
                                                        dtype_size(store_as));
    const std::size_t size = dtype_size(store_as);
    std::vector<std::byte> bytes(static_cast<std::size_t>(total));
    std::size_t k = 0;
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j, k += size) {
        if (store_as == st_dtype::F32) {
          const float v = static_cast<float>(get(i, j));
          std::memcpy(bytes.data() + k, &v, 4);
        } else {
          const double v = static_cast<double>(get(i, j));
          std::memcpy(bytes.data() + k, &v, 8);
        }
        if constexpr (std::endian::native == std::endian::big)
          std::reverse(bytes.data() + k, bytes.data() + k + size);
      }
    add_raw(std::move(name), store_as, std::move(shape), std::move(bytes));
  }

  std::vector<entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace adalora
