#pragma once
// Data for the fine-tuning demo: a deterministic random generator, the datasets both tasks use,
// and a reader for the IDX files (gzip) that Debian's dataset-fashion-mnist installs.

#include <zlib.h>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/testing/planted_rank.hpp"

namespace finetune {

/// Activations and weights: rows are samples (or output units), row-major so that a row of a
/// batch is contiguous for adalora's adapter kernels, which walk x row by row.
using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using row_vector = Eigen::RowVectorXf;
using vector = Eigen::VectorXf;

/// The testing kit's generator, SplitMix64 (Steele, Lea, Flood 2014) with Box–Muller normals
/// (next(), uniform() in (0, 1], normal()), and what the demo draws besides. The std::
/// distributions are implementation-defined; this one gives the same numbers with every standard
/// library, so the demo's tables are reproducible across platforms that share a libm.
class rng : public adalora::testing::detail::planted_rng {
 public:
  using planted_rng::planted_rng;

  /// Uniform in [0, n).
  std::size_t below(std::size_t n) noexcept { return static_cast<std::size_t>(next() % n); }

  /// A matrix of N(0, stddev²) entries.
  matrix normal_matrix(Eigen::Index rows, Eigen::Index cols, double stddev) {
    matrix m(rows, cols);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(stddev * normal());
    return m;
  }
};

/// Independent streams for independent purposes: a run's seed must not change the data, and the
/// data must not depend on how many runs came before.
inline std::uint64_t derive_seed(std::uint64_t base, std::uint64_t purpose) noexcept {
  rng mixer(base * 0x100000001b3ULL + purpose);
  return mixer.next();
}

/// Inputs and targets. Regression tasks fill `y`; classification tasks fill `labels`.
struct dataset {
  matrix x;
  matrix y;
  std::vector<int> labels;
  Eigen::Index size() const noexcept { return x.rows(); }
};

struct split {
  dataset train, validation, test;
};

/// Rows `rows` of `d`, in that order (a minibatch or a subset).
inline dataset gather(const dataset& d, const std::vector<Eigen::Index>& rows) {
  dataset out;
  out.x.resize(static_cast<Eigen::Index>(rows.size()), d.x.cols());
  if (d.y.size() > 0) out.y.resize(static_cast<Eigen::Index>(rows.size()), d.y.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto r = static_cast<Eigen::Index>(i);
    out.x.row(r) = d.x.row(rows[i]);
    if (d.y.size() > 0) out.y.row(r) = d.y.row(rows[i]);
    if (!d.labels.empty()) out.labels.push_back(d.labels[static_cast<std::size_t>(rows[i])]);
  }
  return out;
}

/// Fisher–Yates over 0..n-1.
inline std::vector<Eigen::Index> permutation(Eigen::Index n, rng& g) {
  std::vector<Eigen::Index> p(static_cast<std::size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = i;
  for (std::size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[g.below(i)]);
  return p;
}

// ---- Fashion-MNIST ------------------------------------------------------------------------------

inline constexpr const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

/// The class names of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), by label.
inline constexpr std::array<const char*, 10> fashion_mnist_classes = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

namespace detail {

/// The whole decompressed content of a .gz file.
inline std::vector<unsigned char> read_gzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("cannot open " + path);
  std::vector<unsigned char> bytes;
  std::array<unsigned char, 1 << 16> chunk{};
  for (;;) {
    const int n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int code = 0;
      const std::string why = gzerror(f, &code);
      gzclose(f);
      throw std::runtime_error("cannot decompress " + path + ": " + why);
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + n);
  }
  gzclose(f);
  return bytes;
}

inline std::uint32_t big_endian_u32(const std::vector<unsigned char>& b, std::size_t at) {
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) |
         (std::uint32_t{b[at + 2]} << 8) | std::uint32_t{b[at + 3]};
}

/// Parses an IDX file of unsigned bytes (LeCun's MNIST format: magic 0x00000800 | ndims, then
/// ndims big-endian u32 extents, then the data) and returns the extents; `data` gets the bytes.
inline std::vector<std::uint32_t> parse_idx_u8(const std::vector<unsigned char>& b,
                                               const std::string& path, std::size_t* offset) {
  if (b.size() < 4 || b[0] != 0 || b[1] != 0 || b[2] != 0x08)
    throw std::runtime_error(path + " is not an IDX file of unsigned bytes");
  const std::size_t ndims = b[3];
  const std::size_t header = 4 + 4 * ndims;
  if (ndims == 0 || b.size() < header) throw std::runtime_error(path + ": truncated IDX header");
  std::vector<std::uint32_t> dims;
  std::size_t count = 1;
  for (std::size_t d = 0; d < ndims; ++d) {
    dims.push_back(big_endian_u32(b, 4 + 4 * d));
    count *= dims.back();
  }
  if (b.size() != header + count)
    throw std::runtime_error(path + ": expected " + std::to_string(header + count) +
                             " bytes from the IDX header, got " + std::to_string(b.size()));
  *offset = header;
  return dims;
}

}  // namespace detail

/// Images of an IDX file as rows of `matrix` (n × rows·cols), scaled to [0, 1].
inline matrix read_idx_images(const std::string& path) {
  const std::vector<unsigned char> b = detail::read_gzip(path);
  std::size_t offset = 0;
  const std::vector<std::uint32_t> dims = detail::parse_idx_u8(b, path, &offset);
  if (dims.size() != 3) throw std::runtime_error(path + ": expected 3 IDX dimensions (images)");
  matrix x(static_cast<Eigen::Index>(dims[0]), static_cast<Eigen::Index>(dims[1] * dims[2]));
  for (Eigen::Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<float>(b[offset + static_cast<std::size_t>(i)]) / 255.0f;
  return x;
}

/// Labels of an IDX file.
inline std::vector<int> read_idx_labels(const std::string& path) {
  const std::vector<unsigned char> b = detail::read_gzip(path);
  std::size_t offset = 0;
  const std::vector<std::uint32_t> dims = detail::parse_idx_u8(b, path, &offset);
  if (dims.size() != 1) throw std::runtime_error(path + ": expected 1 IDX dimension (labels)");
  return std::vector<int>(b.begin() + static_cast<std::ptrdiff_t>(offset), b.end());
}

/// Fashion-MNIST's training and test sets (60000 and 10000 images of 28×28), pixels in [0, 1].
/// Throws std::runtime_error naming the Debian package when the files are not in `dir`.
inline std::pair<dataset, dataset> load_fashion_mnist(const std::string& dir) {
  const auto file = [&](const char* name) {
    const std::string path = dir + "/" + name;
    if (!std::filesystem::exists(path))
      throw std::runtime_error("Fashion-MNIST not found: " + path +
                               " is missing. Install Debian's dataset-fashion-mnist package "
                               "(scripts/setup.sh dataset-fashion-mnist) or pass --data-dir");
    return path;
  };
  dataset train, test;
  train.x = read_idx_images(file("train-images-idx3-ubyte.gz"));
  train.labels = read_idx_labels(file("train-labels-idx1-ubyte.gz"));
  test.x = read_idx_images(file("t10k-images-idx3-ubyte.gz"));
  test.labels = read_idx_labels(file("t10k-labels-idx1-ubyte.gz"));
  for (const dataset* d : {&train, &test})
    if (static_cast<Eigen::Index>(d->labels.size()) != d->x.rows())
      throw std::runtime_error(dir + ": the image and label files do not have the same count");
  return {std::move(train), std::move(test)};
}

/// The samples of `d` whose label is in [first, last], at most `limit` of them, in file order.
inline dataset select_classes(const dataset& d, int first, int last, Eigen::Index limit) {
  std::vector<Eigen::Index> rows;
  for (Eigen::Index i = 0; i < d.size() && static_cast<Eigen::Index>(rows.size()) < limit; ++i) {
    const int label = d.labels[static_cast<std::size_t>(i)];
    if (label >= first && label <= last) rows.push_back(i);
  }
  return gather(d, rows);
}

}  // namespace finetune
