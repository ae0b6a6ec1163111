// The safetensors reader and writer: round trips, the exact byte layout, and malformed files,
// which must be refused with a clear std::invalid_argument and never read out of bounds (this
// test also runs under AddressSanitizer).

#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/stat.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "adalora/io/safetensors.hpp"

namespace {

using adalora::safetensors_file;
using adalora::safetensors_writer;
using adalora::st_dtype;

/// A file from a header text and `data_size` bytes of data (0, 1, 2, ...).
std::vector<std::byte> make_file(const std::string& header, std::size_t data_size,
                                 std::uint64_t header_length_override = 0) {
  std::vector<std::byte> out(8 + header.size() + data_size);
  const std::uint64_t n = header_length_override ? header_length_override : header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = std::byte((n >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, header.data(), header.size());
  for (std::size_t i = 0; i < data_size; ++i) out[8 + header.size() + i] = std::byte(i & 0xff);
  return out;
}

std::string parse_error(std::vector<std::byte> bytes) {
  try {
    safetensors_file f(std::move(bytes), "test.safetensors");
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no error";
}

std::filesystem::path test_dir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : std::filesystem::temp_directory_path();
}

std::string file_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::byte> sample_file() {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  const std::vector<double> e = {0.1, -7.0, 1e300};
  safetensors_writer w;
  w.set_metadata("format", "pt");
  w.add<float>("b.weight", adalora::make_matrix_view<const float>(a.data(), 2, 3));
  w.add<double>("a.lora_E", adalora::vector_view<const double>(e.data(), 3), {3, 1});
  w.add<float>("c.empty", adalora::make_matrix_view<const float>(nullptr, 0, 4));
  return w.serialize();
}

}  // namespace

TEST_CASE("safetensors: what the writer writes reads back exactly", "[safetensors]") {
  const auto bytes = sample_file();
  // Layout: 8-byte little-endian length, header padded with spaces to 8-byte alignment.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes[std::size_t(i)]);
  REQUIRE(n % 8 == 0);
  REQUIRE(bytes.size() == 8 + n + 6 * 4 + 3 * 8);
  const std::string header(reinterpret_cast<const char*>(bytes.data() + 8), n);
  REQUIRE(header.rfind("{\"__metadata__\":{\"format\":\"pt\"},\"a.lora_E\":", 0) == 0);

  const safetensors_file f(bytes);
  REQUIRE(f.metadata().at("format") == "pt");
  REQUIRE(f.tensors().size() == 3);
  const auto& e = f.at("a.lora_E");
  REQUIRE(e.dtype == st_dtype::F64);
  REQUIRE(e.shape == std::vector<std::int64_t>{3, 1});
  REQUIRE(f.values<double>("a.lora_E") == std::vector<double>{0.1, -7.0, 1e300});
  REQUIRE(f.at("b.weight").shape == std::vector<std::int64_t>{2, 3});
  REQUIRE(f.values<float>("b.weight") == std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f});
  REQUIRE(f.values<double>("b.weight")[2] == 3.25);
  REQUIRE(f.at("c.empty").shape == std::vector<std::int64_t>{0, 4});
  REQUIRE(f.values<float>("c.empty").empty());
  REQUIRE(f.find("missing") == nullptr);
  REQUIRE_THROWS_WITH(f.at("missing"), Catch::Contains("no tensor named 'missing'"));
}

TEST_CASE("safetensors: strided views are written row-major; doubles round to F32 on request",
          "[safetensors]") {
  const std::vector<double> m = {1, 2, 3, 4, 5, 6};  // 2 x 3 row-major
  safetensors_writer w;
  const auto v = adalora::make_matrix_view<const double>(m.data(), 2, 3);
  w.add<double>("t", v.transposed(), st_dtype::F32);  // 3 x 2
  const safetensors_file f(w.serialize());
  REQUIRE(f.at("t").dtype == st_dtype::F32);
  REQUIRE(f.at("t").shape == std::vector<std::int64_t>{3, 2});
  REQUIRE(f.values<double>("t") == std::vector<double>{1, 4, 2, 5, 3, 6});
  safetensors_writer dup;
  dup.add<double>("t", v);
  REQUIRE_THROWS_WITH(dup.add<double>("t", v), Catch::Contains("already added"));
  REQUIRE_THROWS_WITH(dup.add<double>("__metadata__", v), Catch::Contains("__metadata__"));
}

TEST_CASE("safetensors: F16 and BF16 are converted exactly; integer tensors are refused as values",
          "[safetensors]") {
  // F16: 1.0 = 0x3c00, -2.5 = 0xc100, smallest subnormal 0x0001 = 2^-24, inf 0x7c00.
  // BF16: 1.0 = 0x3f80, -3.0 = 0xc040.
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},)"
      R"("i":{"dtype":"I32","shape":[1],"data_offsets":[12,16]}})";
  auto bytes = make_file(header, 16);
  const std::uint8_t data[] = {0x00, 0x3c, 0x00, 0xc1, 0x01, 0x00, 0x00, 0x7c,
                               0x80, 0x3f, 0x40, 0xc0, 7, 0, 0, 0};
  std::memcpy(bytes.data() + 8 + header.size(), data, sizeof data);
  const safetensors_file f(bytes);
  const auto h = f.values<float>("h");
  REQUIRE(h[0] == 1.0f);
  REQUIRE(h[1] == -2.5f);
  REQUIRE(h[2] == std::ldexp(1.0f, -24));
  REQUIRE(std::isinf(h[3]));
  REQUIRE(f.values<double>("b") == std::vector<double>{1.0, -3.0});
  REQUIRE_THROWS_WITH(f.values<float>("i"),
                      Catch::Contains("'i'") && Catch::Contains("floating-point") &&
                          Catch::Contains("I32"));
  std::vector<float> wrong(3);
  REQUIRE_THROWS_WITH(f.copy_values<float>("h", wrong), Catch::Contains("4 elements"));
}

TEST_CASE("safetensors: truncated files and impossible header lengths are refused",
          "[safetensors][malformed]") {
  REQUIRE_THAT(parse_error({}), Catch::Contains("test.safetensors") && Catch::Contains("0 bytes"));
  REQUIRE_THAT(parse_error(std::vector<std::byte>(5)), Catch::Contains("truncated"));
  const std::string h = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  // Header length past the end of the file.
  REQUIRE_THAT(parse_error(make_file(h, 8, h.size() + 9)),
               Catch::Contains("header length") && Catch::Contains("past the end"));
  // Header length over the 100 MB limit, in a tiny file: refused before anything is allocated.
  REQUIRE_THAT(parse_error(make_file(h, 8, std::uint64_t(1) << 62)),
               Catch::Contains("larger than the limit"));
  REQUIRE_THAT(parse_error(make_file(h, 8, ~std::uint64_t(0))), Catch::Contains("larger than the limit"));
  // Data cut short.
  REQUIRE_THAT(parse_error(make_file(h, 5)),
               Catch::Contains("'x'") && Catch::Contains("past the end of the data buffer"));
  // Cut inside the header.
  auto whole = make_file(h, 8);
  whole.resize(20);
  REQUIRE_THAT(parse_error(whole), Catch::Contains("past the end of the file"));
}

TEST_CASE("safetensors: headers that are not the expected JSON are refused",
          "[safetensors][malformed]") {
  REQUIRE_THAT(parse_error(make_file(R"({"x": )", 0)), Catch::Contains("not valid JSON"));
  REQUIRE_THAT(parse_error(make_file(R"([1, 2])", 0)), Catch::Contains("does not start with '{'"));
  REQUIRE_THAT(parse_error(make_file("{\"\xff\xfe\":1}", 0)), Catch::Contains("not valid JSON"));
  REQUIRE_THAT(parse_error(make_file(R"({"x": 3})", 0)), Catch::Contains("'x' is not an object"));
  REQUIRE_THAT(parse_error(make_file(R"({"x": {"dtype": "F32", "shape": [0]}})", 0)),
               Catch::Contains("'x' has no \"data_offsets\""));
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("unknown dtype 'F12'"));
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":3,"shape":[1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("dtype is not a string"));
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("non-negative integers"));
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("non-negative integers"));
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":"F32","shape":3,"data_offsets":[0,4]}})", 4)),
               Catch::Contains("shape is not a list"));
  REQUIRE_THAT(parse_error(make_file(R"({"__metadata__":{"format":1}})", 0)),
               Catch::Contains("__metadata__ value of 'format' must be a string"));
  REQUIRE_THAT(parse_error(make_file(R"({"__metadata__":[]})", 0)),
               Catch::Contains("__metadata__ must be an object"));
  const std::string dup =
      R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  REQUIRE_THAT(parse_error(make_file(dup, 8)), Catch::Contains("\"x\"") && Catch::Contains("twice"));
  // An empty header object with no data is a valid (empty) file.
  REQUIRE(parse_error(make_file("{}", 0)) == "no error");
}

TEST_CASE("safetensors: data_offsets out of range, overlapping, with gaps or not matching the "
          "shape are refused", "[safetensors][malformed]") {
  auto one = [](const std::string& offsets, const std::string& shape = "[2]") {
    return R"({"x":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}}";
  };
  REQUIRE_THAT(parse_error(make_file(one("[0,12]"), 8)),
               Catch::Contains("hold 12 bytes") && Catch::Contains("needs 8"));
  REQUIRE_THAT(parse_error(make_file(one("[8,4]"), 8)), Catch::Contains("end before they begin"));
  REQUIRE_THAT(parse_error(make_file(one("[0]"), 8)), Catch::Contains("list of two integers"));
  REQUIRE_THAT(parse_error(make_file(one("[0,-8]"), 8)), Catch::Contains("non-negative integers"));
  REQUIRE_THAT(parse_error(make_file(one("[0,8.0]"), 8)), Catch::Contains("non-negative integers"));
  REQUIRE_THAT(parse_error(make_file(one("[4,12]"), 12)), Catch::Contains("leave a gap"));
  REQUIRE_THAT(parse_error(make_file(one("[8,16]"), 8)),
               Catch::Contains("leave a gap"));  // also past the end: the first problem is named
  REQUIRE_THAT(parse_error(make_file(one("[0,8]"), 12)), Catch::Contains("trailing bytes"));
  REQUIRE_THAT(parse_error(make_file(one("[18446744073709551608,18446744073709551615]"), 8)),
               Catch::Contains("non-negative integers"));
  // numel × size overflowing 64 bits.
  REQUIRE_THAT(parse_error(make_file(one("[0,8]", "[4294967296,4294967296,4294967296]"), 8)),
               Catch::Contains("more than 2^64"));
  const std::string overlap =
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  REQUIRE_THAT(parse_error(make_file(overlap, 12)),
               Catch::Contains("'y'") && Catch::Contains("overlap those of 'x'"));
  const std::string same =
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("y":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE_THAT(parse_error(make_file(same, 8)), Catch::Contains("overlap"));
  // Zero-size tensors may share an offset with the next tensor's start.
  const std::string zero =
      R"({"z":{"dtype":"F64","shape":[0,3],"data_offsets":[0,0]},)"
      R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE(parse_error(make_file(zero, 8)) == "no error");
}

TEST_CASE("safetensors: random corruptions of a valid file never crash the reader",
          "[safetensors][malformed]") {
  const auto good = sample_file();
  std::mt19937_64 rng(11);
  int refused = 0, accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto bytes = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const auto kind = rng() % 4;
      const std::size_t pos = rng() % bytes.size();
      if (kind == 0) {
        bytes[pos] = std::byte(rng() & 0xff);
      } else if (kind == 1 && pos < 8) {
        bytes[pos] = std::byte(rng() & 0xff);  // the length field
      } else if (kind == 2) {
        bytes.resize(pos);  // truncate
        if (bytes.empty()) break;
      } else {
        // Replace a digit of the header with another digit (keeps the JSON valid, breaks offsets).
        for (std::size_t i = pos; i < bytes.size(); ++i)
          if (const auto c = std::to_integer<char>(bytes[i]); c >= '0' && c <= '9') {
            bytes[i] = std::byte('0' + rng() % 10);
            break;
          }
      }
    }
    try {
      const safetensors_file f(bytes);
      for (const auto& t : f.tensors()) {
        if (t.dtype == st_dtype::F32 || t.dtype == st_dtype::F64 || t.dtype == st_dtype::F16 ||
            t.dtype == st_dtype::BF16)
          (void)f.values<double>(t.name);
        (void)f.raw(t);
      }
      ++accepted;
    } catch (const std::invalid_argument&) {
      ++refused;
    }
  }
  REQUIRE(refused > 1000);
  REQUIRE(accepted + refused == 3000);
}

TEST_CASE("safetensors: files on disk", "[safetensors]") {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::filesystem::path dir = tmp ? tmp : std::filesystem::temp_directory_path();
  const auto path = dir / "adalora_safetensors_test.safetensors";
  safetensors_writer w;
  const std::vector<float> v = {1, 2, 3};
  w.add<float>("v", adalora::vector_view<const float>(v.data(), 3), {3});
  w.write(path);
  const auto f = safetensors_file::read(path);
  REQUIRE(f.source() == path.string());
  REQUIRE(f.values<float>("v") == v);
  std::filesystem::remove(path);
  REQUIRE_THROWS_AS(safetensors_file::read(path), std::runtime_error);
}

TEST_CASE("safetensors: a header nested 100,000 deep is refused, not a stack overflow",
          "[safetensors][malformed][hostile]") {
  // 200 KB: the shape is an array nested 100,000 deep. Describing or copying it recursed once per
  // level and crashed; the depth limit refuses it while parsing.
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  const std::string h = R"({"x":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})";
  REQUIRE_THAT(parse_error(make_file(h, 0)),
               Catch::Contains("test.safetensors") && Catch::Contains("64 levels"));
  // At the limit's edge a nested shape is refused as a bad shape, quoting it briefly.
  const std::string h2 = R"({"x":{"dtype":"F32","shape":)" + std::string(60, '[') +
                         std::string(60, ']') + R"(,"data_offsets":[0,0]}})";
  REQUIRE_THAT(parse_error(make_file(h2, 0)), Catch::Contains("non-negative integers"));
}

TEST_CASE("safetensors: a duplicate key at any level of the header is refused, naming it",
          "[safetensors][malformed][hostile]") {
  REQUIRE_THAT(parse_error(make_file(R"({"x":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4)),
               Catch::Contains("\"dtype\"") && Catch::Contains("twice"));
  REQUIRE_THAT(parse_error(make_file(R"({"__metadata__":{"format":"pt","format":"np"}})", 0)),
               Catch::Contains("\"format\"") && Catch::Contains("twice"));
}

TEST_CASE("safetensors: only spaces may pad the header after its JSON object",
          "[safetensors][malformed][hostile]") {
  using namespace std::string_literals;
  REQUIRE_THAT(parse_error(make_file("{}\0garbage!"s, 0)),
               Catch::Contains("NUL byte at byte 2") && Catch::Contains("only spaces"));
  REQUIRE_THAT(parse_error(make_file("{}\0      "s, 0)), Catch::Contains("NUL byte at byte 2"));
  REQUIRE_THAT(parse_error(make_file("{\"a\0\":1}"s, 0)), Catch::Contains("NUL byte at byte 3"));
  REQUIRE_THAT(parse_error(make_file("{}\n"s, 0)),
               Catch::Contains("character code 10 at byte 2") && Catch::Contains("only spaces"));
  REQUIRE_THAT(parse_error(make_file("{}\t  "s, 0)), Catch::Contains("character code 9"));
  REQUIRE_THAT(parse_error(make_file("{} x"s, 0)), Catch::Contains("not valid JSON"));
  REQUIRE(parse_error(make_file("{}      "s, 0)) == "no error");
  REQUIRE(parse_error(make_file("{ \"__metadata__\" : {} }  "s, 0)) == "no error");
}

TEST_CASE("safetensors writer: shapes whose byte count would wrap are refused before any "
          "arithmetic overflows", "[safetensors][hostile]") {
  constexpr std::int64_t big = std::int64_t{1} << 62;
  safetensors_writer w;
  // 2^62 × 4 elements wrapped to 0, matching 0 bytes.
  REQUIRE_THROWS_WITH(w.add_raw("x", st_dtype::U8, {big, 4}, {}),
                      Catch::Contains("safetensors_writer::add") && Catch::Contains("'x'") &&
                          Catch::Contains("more than 2^63 - 1 bytes"));
  REQUIRE_THROWS_WITH(w.add_raw("x", st_dtype::F32, {big, 2}, {}), Catch::Contains("2^63"));
  REQUIRE_THROWS_WITH(w.add_raw("x", st_dtype::F32, {2, -1}, {}), Catch::Contains("negative extent -1"));
  // The vector form multiplied the shape in signed arithmetic.
  const float v = 1;
  REQUIRE_THROWS_WITH(w.add<float>("v", adalora::vector_view<const float>(&v, 1), {big, 4}),
                      Catch::Contains("2^63"));
  // An unchecked view can claim any extents; rows × cols × 4 is checked before allocating.
  const adalora::matrix_view<const float> huge(&v, big, 8, 8, 1);
  REQUIRE_THROWS_WITH(w.add<float>("m", huge), Catch::Contains("'m'") && Catch::Contains("2^63"));
  // A zero extent makes any shape empty, as the reader accepts it.
  w.add_raw("z", st_dtype::F32, {0, big, big}, {});
  const safetensors_file f(w.serialize());
  REQUIRE(f.at("z").shape == std::vector<std::int64_t>{0, big, big});
  REQUIRE(f.at("z").numel() == 0);
}

TEST_CASE("safetensors writer: names and metadata that are not UTF-8 are refused when added",
          "[safetensors][hostile]") {
  safetensors_writer w;
  // nlohmann's type_error 316 escaped from serialize() without adalora's context.
  REQUIRE_THROWS_AS(w.set_metadata("format", "\xff"), std::invalid_argument);
  REQUIRE_THROWS_WITH(w.set_metadata("\xc3", "pt"),
                      Catch::Contains("safetensors_writer::set_metadata") && Catch::Contains("UTF-8"));
  REQUIRE_THROWS_WITH(w.add_raw("a\xe2\x82", st_dtype::U8, {1}, {std::byte{1}}),
                      Catch::Contains("tensor name") && Catch::Contains("UTF-8"));
  REQUIRE(safetensors_file(w.serialize()).tensors().empty());  // nothing was half-added
  w.set_metadata("caf\xc3\xa9", "\xe2\x82\xac");
  REQUIRE(safetensors_file(w.serialize()).metadata().at("caf\xc3\xa9") == "\xe2\x82\xac");
}

TEST_CASE("safetensors: a directory, a FIFO or a device is refused at once, naming the file",
          "[safetensors][hostile]") {
  const auto dir = test_dir();
  const auto refused = [](const std::filesystem::path& p, const char* kind) {
    REQUIRE_THROWS_AS(safetensors_file::read(p), std::runtime_error);
    REQUIRE_THROWS_WITH(safetensors_file::read(p),
                        Catch::Contains("adalora::safetensors_file::read: '" + p.string() + "'") &&
                            Catch::Contains(kind));
  };
  refused(dir, "a directory");
  const auto fifo = dir / "adalora_safetensors_test.fifo";
  std::filesystem::remove(fifo);
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  refused(fifo, "FIFO");  // used to wait for a writer for ever
  std::filesystem::remove(fifo);
  refused("/dev/zero", "character device");  // used to read until memory ran out
  refused(dir / "missing.safetensors", "cannot open");
}

TEST_CASE("safetensors writer: a write that fails half-way leaves the previous file intact",
          "[safetensors][hostile]") {
  const auto dir = test_dir() / "adalora_safetensors_atomic";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto path = dir / "adapter_model.safetensors";
  safetensors_writer small;
  const std::vector<float> one = {1};
  small.add<float>("v", adalora::vector_view<const float>(one.data(), 1), {1});
  small.write(path);
  const std::string before = file_text(path);

  safetensors_writer large;
  const std::vector<float> many(4096, 2.0f);
  large.add<float>("v", adalora::vector_view<const float>(many.data(), 4096), {4096});
  // Files may grow to 1 KiB only: the write fails with EFBIG after the first KiB (the signal
  // that would kill the process is ignored for the test).
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small_limit = old;
  small_limit.rlim_cur = 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small_limit) == 0);
  std::string error = "no error";
  try {
    large.write(path);
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  REQUIRE_THAT(error, Catch::Contains("adalora::safetensors_writer::write: '" + path.string() + "'") &&
                          Catch::Contains("previous file is intact"));
  REQUIRE(file_text(path) == before);
  REQUIRE(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()) == 1);
  // A directory in the way is named.
  REQUIRE_THROWS_WITH(large.write(dir),
                      Catch::Contains("safetensors_writer::write") && Catch::Contains("a directory"));
  std::filesystem::remove_all(dir);
}
