#pragma once
// Reading and writing whole files safely, for every adalora reader and writer (checkpoints,
// safetensors, adapter_config.json, rank patterns). The standard library and POSIX only.
//
// Reading refuses what is not a regular file before reading a byte: a directory, a FIFO (which
// would block for ever), a device such as /dev/zero (which would never end), a socket. It reads
// at most the size the file had when it was opened, and at most a limit the caller sets.
//
// Writing is atomic: the bytes go to a new temporary file next to the target, created
// exclusively and never through a symbolic link (O_CREAT | O_EXCL | O_NOFOLLOW, with a name no
// other process can predict), are synced, and the file is renamed over the target. On any
// failure, a throwing callback included, the temporary file is closed and removed and the
// previous file at the target is left as it was.
//
// Errors are detail::file_io::failure (a std::runtime_error) carrying only the reason ("it is a
// directory", "cannot open it for reading (No such file or directory)"); each caller adds its
// own "adalora::<function>: '<path>': " in front, or converts it to its own error type.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <new>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "adalora/config.hpp"

namespace adalora {

/// The system calls write_file_atomically makes, replaceable to inject failures in tests (or to
/// count bytes). Empty members mean the POSIX call. Each returns what the POSIX call returns and
/// sets errno on failure; a callback may also throw, which fails the write like an error would.
struct file_write_ops {
  std::function<long(int fd, const std::uint8_t* data, std::size_t size)> write;
  std::function<int(int fd)> fsync;
  std::function<int(const char* from, const char* to)> rename;
};

namespace detail::file_io {

/// The reason a file could not be read or written, without the caller's context.
struct failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw failure(concat(parts...));
}

inline std::string reason(int err) { return std::system_category().message(err); }

/// What kind of file a stat describes, for "it is a directory" messages.
inline const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

/// Closes a descriptor on every path out of a scope.
class descriptor {
 public:
  explicit descriptor(int fd) noexcept : fd_(fd) {}
  descriptor(const descriptor&) = delete;
  descriptor& operator=(const descriptor&) = delete;
  ~descriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const noexcept { return fd_; }
  /// Closes now and reports the result (a close can report a failed delayed write).
  int close() noexcept {
    const int r = ::close(fd_);
    fd_ = -1;
    return r;
  }

 private:
  int fd_;
};

}  // namespace detail::file_io

/// Reads the whole regular file at `path`. Throws detail::file_io::failure (see the header
/// comment) if it cannot be opened, is not a regular file, is larger than `max_bytes`, or
/// reading fails. Byte is std::uint8_t, std::byte or char.
template <class Byte = std::uint8_t>
std::vector<Byte> read_regular_file(const std::string& path,
                                    std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) {
  static_assert(sizeof(Byte) == 1, "adalora::read_regular_file: Byte must be a byte type");
  using detail::file_io::fail;
  using detail::file_io::reason;
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it has no effect on regular files.
  detail::file_io::descriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() < 0) fail("cannot open it for reading (", reason(errno), ")");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail("cannot examine it (", reason(errno), ")");
  if (!S_ISREG(st.st_mode)) fail("it is ", detail::file_io::kind_of(st.st_mode), ", not a regular file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > max_bytes) fail("it is ", size, " bytes long, more than the limit of ", max_bytes, " bytes");
  std::vector<Byte> bytes(static_cast<std::size_t>(size));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const std::size_t chunk = std::min<std::size_t>(bytes.size() - done, std::size_t{1} << 30);
    const ssize_t n = ::read(fd.get(), bytes.data() + done, chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("reading failed after ", done, " of ", size, " bytes (", reason(errno), ")");
    if (n == 0) fail("it ended after ", done, " of its ", size, " bytes (it shrank while being read)");
    done += static_cast<std::size_t>(n);
  }
  return bytes;
}

/// read_regular_file for a public reader: every failure, running out of memory included, is a
/// std::runtime_error "adalora::<function>: '<path>': <reason>".
template <class Byte = std::uint8_t>
std::vector<Byte> read_file_for(const char* function, const std::string& path,
                                std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) {
  const auto cannot_read = [&](const char* reason) {
    return std::runtime_error(detail::concat("adalora::", function, ": '", path, "': ", reason));
  };
  try {
    return read_regular_file<Byte>(path, max_bytes);
  } catch (const detail::file_io::failure& e) {
    throw cannot_read(e.what());
  } catch (const std::bad_alloc&) {
    throw cannot_read("there is not enough memory to hold it");
  } catch (const std::length_error&) {
    throw cannot_read("there is not enough memory to hold it");
  }
}

namespace detail::file_io {

/// A fresh name next to `path` that nobody can guess in advance: pid (processes sharing a
/// directory), a counter (threads of this process) and 64 random bits (an attacker planting
/// links in a shared directory).
inline std::string temporary_name(const std::string& path) {
  static std::atomic<unsigned long> counter{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char random[17];
  std::snprintf(random, sizeof random, "%016llx", static_cast<unsigned long long>(rng()));
  return concat(path, ".tmp.", ::getpid(), ".", counter++, ".", random);
}

/// The directory that holds `path`, for syncing the rename.
inline std::string directory_of(const std::string& path) {
  const std::string::size_type slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace detail::file_io

/// Writes `bytes` to `path` atomically (see the header comment). Throws
/// detail::file_io::failure naming the failed operation and the system's reason, ending with
/// "the previous file is intact"; no temporary file is left behind.
inline void write_file_atomically(const std::string& path, std::span<const std::uint8_t> bytes,
                                  const file_write_ops& ops = {}) {
  using detail::file_io::fail;
  using detail::file_io::reason;
  ADALORA_REQUIRE(!path.empty(), "write_file_atomically", "the path is empty");
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    fail("it is a directory; nothing was written");

  std::string tmp;
  int raw_fd = -1;
  for (int attempt = 0; attempt < 16 && raw_fd < 0; ++attempt) {
    tmp = detail::file_io::temporary_name(path);
    raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (raw_fd < 0 && errno != EEXIST) break;
  }
  if (raw_fd < 0) fail("cannot create a temporary file next to it ('", tmp, "': ", reason(errno), ")");
  detail::file_io::descriptor fd(raw_fd);

  // From here every failure removes the temporary file.
  bool removed = false;
  auto give_up = [&](const std::string& what) {
    if (fd.get() >= 0) fd.close();
    ::unlink(tmp.c_str());
    removed = true;
    fail(what, "; the previous file is intact");
  };
  try {
    std::size_t done = 0;
    while (done < bytes.size()) {
      const std::size_t chunk = std::min<std::size_t>(bytes.size() - done, std::size_t{1} << 30);
      const long n = ops.write ? ops.write(fd.get(), bytes.data() + done, chunk)
                               : static_cast<long>(::write(fd.get(), bytes.data() + done, chunk));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // No progress and no error would loop for ever: report it as an I/O error.
        const int err = n == 0 ? EIO : errno;
        give_up(detail::concat("writing the temporary file '", tmp, "' failed (", reason(err), ")"));
      }
      done += static_cast<std::size_t>(n);
    }
    if ((ops.fsync ? ops.fsync(fd.get()) : ::fsync(fd.get())) != 0)
      give_up(detail::concat("syncing the temporary file '", tmp, "' failed (", reason(errno), ")"));
    if (fd.close() != 0)
      give_up(detail::concat("closing the temporary file '", tmp, "' failed (", reason(errno), ")"));
    if ((ops.rename ? ops.rename(tmp.c_str(), path.c_str()) : std::rename(tmp.c_str(), path.c_str())) != 0)
      give_up(detail::concat("renaming '", tmp, "' over it failed (", reason(errno), ")"));
  } catch (const detail::file_io::failure& e) {
    if (removed) throw;  // from give_up
    give_up(detail::concat("writing the temporary file '", tmp, "' failed (a callback threw: ", e.what(), ")"));
  } catch (const std::exception& e) {
    give_up(detail::concat("writing the temporary file '", tmp, "' failed (a callback threw: ", e.what(), ")"));
  } catch (...) {
    give_up(detail::concat("writing the temporary file '", tmp, "' failed (a callback threw)"));
  }
  // Make the rename itself durable (POSIX: a rename is in the directory's data). Best effort:
  // the new file is in place whatever this says.
  const int dfd = ::open(detail::file_io::directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

/// Same, for text (a JSON document).
inline void write_file_atomically(const std::string& path, std::string_view text,
                                  const file_write_ops& ops = {}) {
  write_file_atomically(
      path, std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()),
      ops);
}

/// write_file_atomically for a public writer, the twin of read_file_for: a failure is a
/// std::runtime_error "adalora::<function>: '<path>': <reason>; the previous file is intact".
/// Bytes is a span of bytes or a string_view.
template <class Bytes>
void write_file_for(const char* function, const std::string& path, const Bytes& bytes) {
  try {
    write_file_atomically(path, bytes);
  } catch (const detail::file_io::failure& e) {
    throw std::runtime_error(detail::concat("adalora::", function, ": '", path, "': ", e.what()));
  }
}

}  // namespace adalora
