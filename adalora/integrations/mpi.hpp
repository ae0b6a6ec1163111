#pragma once
// MPI for the rank allocator: a Communicator over an MPI communicator, and what a data-parallel
// or sharded training loop needs around it (gradient all-reduce, shard layouts, a replica
// check). Opt-in: Bazel target //adalora/integrations:mpi; the core never includes this header.
//
// Two ways to train on P processes, and what each must all-reduce BEFORE allocator.step():
//
//  * Data-parallel (DDP): every rank holds every adapter and its own part of each batch. All-reduce
//    the gradients (gradient_all_reducer below, or your framework's DDP), take the optimizer step,
//    then call step() with the DEFAULT communicator, single_process: with identical parameters
//    and gradients every rank computes identical scores and masks, so nothing else travels.
//    Do not give it an mpi_communicator: every rank would add its identical copy of the partial
//    sums and the scores would be P times too large (and rounded differently).
//
//      adalora::mpi_environment env(argc, argv);                // or your own MPI_Init
//      adalora::mpi_communicator world;                         // MPI_COMM_WORLD, not owned
//      adalora::gradient_all_reducer<float> reduce_grads(world);
//      adalora::rank_allocator<float> allocator(shapes, schedule);   // single_process
//      for (std::int64_t t = 0; t < T; ++t) {
//        /* forward + backward on this rank's share of the batch, into grads */
//        reduce_grads(grads);                                   // sum over ranks / P (DDP's mean)
//        /* orthogonality regularizer, optimizer.step() */
//        allocator.step(t, tensors);                            // the same masks on every rank
//        /* zero the gradients */
//      }
//
//  * Sharded (ZeRO-3 / FSDP-like, or a subset of the adapters per rank): each rank holds a slice
//    of each adapter (shard_shapes() below describes it in adapter_shape::shard) and computes
//    the gradients of its slice. Nothing needs to be all-reduced before step(): give the
//    allocator an mpi_communicator, and at each mask event it all-reduces the partial sums of
//    the triplet scores (one double per triplet plus one per triplet and 256-element block of
//    A's row or B's column) and every rank derives the same scores, threshold and mask.
//
//      adalora::mpi_communicator world;
//      auto mine = adalora::shard_shapes(shapes, adalora::shard_layout::triplets, world);
//      adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
//                              adalora::mpi_communicator> allocator(mine, schedule, {}, {}, world);
//      /* tensors: views of this rank's slices, shaped as in mine[a].shard (shard_view() cuts
//         them out of full tensors) */
//      allocator.step(t, tensors);                              // collective at mask events
//
// Determinism: the allocator's partial sums are laid out so that each entry is contributed by
// exactly one rank and the others add exact zeros; whatever order MPI adds them in, the sums,
// and so the scores, thresholds and masks, are those of one process, bit for bit, for any
// number of ranks and threads. Gradients are the user's: their all-reduce is exact only when
// the sums are (MPI may add in any order), but it gives the same bits on every rank (Open MPI
// does; same_on_all_ranks() checks it), which is what keeps the replicas identical.
//
// Collective rules (as for any MPI collective): every rank of the communicator calls step() with
// the same t at every step (the schedule decides mask events, so all ranks reach the
// all-reduce together). In sharded mode keep non_finite_policy::ignore_elements: skip_step and
// throw_error decide from this rank's slice alone, so one rank could skip while the others wait
// in the all-reduce. An exception on one rank leaves the others blocked: catch, report, and
// MPI_Abort. Only the thread that calls step() calls MPI (the allocator's worker threads never
// do), so MPI_THREAD_FUNNELED is enough with options.threads > 1.
//
// Errors: a failing MPI call throws adalora::mpi_error with MPI's error string. MPI's default
// error handler (MPI_ERRORS_ARE_FATAL) aborts before any code is returned; set
// MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN) on the communicator you pass to get the
// exception instead.

// The deprecated MPI C++ bindings are not used; keep Open MPI's mpi.h from pulling them in.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/adapter_shape.hpp"
#include "adalora/sharding.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// An MPI call failed. what() names adalora's function, the MPI call and MPI's error string.
class mpi_error : public std::runtime_error {
 public:
  mpi_error(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  /// The MPI error code the call returned.
  int code() const noexcept { return code_; }

 private:
  int code_;
};

namespace detail::mpi {

/// Throws mpi_error unless rc is MPI_SUCCESS.
inline void check(int rc, const char* where, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  throw mpi_error(rc, concat("adalora::", where, ": ", call, " failed: ",
                             length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                        : std::string("unknown MPI error"),
                             " (error code ", rc, ")"));
}

template <class T>
MPI_Datatype datatype() noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adalora mpi: only float and double buffers are reduced");
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else return MPI_DOUBLE;
}

/// In-place MPI_SUM all-reduce of any length: MPI counts are int, so longer buffers go in
/// chunks of at most max_count (every rank cuts the same chunks, so the calls match).
template <class T>
void all_reduce_sum(MPI_Comm comm, std::span<T> values, const char* where,
                    std::size_t max_count = INT_MAX) {
  for (std::size_t done = 0; done < values.size();) {
    const std::size_t n = std::min(values.size() - done, max_count);
    check(MPI_Allreduce(MPI_IN_PLACE, values.data() + done, static_cast<int>(n), datatype<T>(),
                        MPI_SUM, comm),
          where, "MPI_Allreduce");
    done += n;
  }
}

}  // namespace detail::mpi

/// Initialises MPI (MPI_THREAD_FUNNELED) for the lifetime of the object unless it already is, and
/// finalises it on destruction if it did initialise it. For programs that have no MPI setup of
/// their own; one per process, on the main thread.
class mpi_environment {
 public:
  mpi_environment(int& argc, char**& argv) {
    int initialized = 0;
    detail::mpi::check(MPI_Initialized(&initialized), "mpi_environment", "MPI_Initialized");
    if (initialized) return;
    int provided = 0;
    detail::mpi::check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided),
                       "mpi_environment", "MPI_Init_thread");
    owner_ = true;
  }
  mpi_environment(const mpi_environment&) = delete;
  mpi_environment& operator=(const mpi_environment&) = delete;
  ~mpi_environment() {
    int finalized = 0;
    if (owner_ && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
  }

 private:
  bool owner_ = false;
};

/// The Communicator (communicator.hpp) of a sharded rank allocator over MPI: all_reduce_sum is
/// MPI_Allreduce(MPI_IN_PLACE, ..., MPI_DOUBLE, MPI_SUM, comm). Holds the MPI_Comm without
/// owning it: the communicator must outlive the allocator, and MPI must be initialised before
/// construction. A communicator of its own for the allocator (MPI_Comm_dup) keeps its traffic
/// apart from the program's, as libraries usually do, but is not required: the allocator's
/// all-reduce is an ordinary collective in program order.
class mpi_communicator {
 public:
  /// Throws std::invalid_argument if MPI is not initialised (or already finalised) or comm is
  /// MPI_COMM_NULL; mpi_error if MPI cannot tell the rank or size.
  explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    constexpr const char* where = "mpi_communicator";
    int initialized = 0, finalized = 0;
    detail::mpi::check(MPI_Initialized(&initialized), where, "MPI_Initialized");
    detail::mpi::check(MPI_Finalized(&finalized), where, "MPI_Finalized");
    ADALORA_REQUIRE(initialized && !finalized, where,
                    "MPI must be initialised (MPI_Init) and not finalised, got ",
                    initialized ? "finalised" : "not initialised");
    ADALORA_REQUIRE(comm != MPI_COMM_NULL, where, "comm must not be MPI_COMM_NULL");
    detail::mpi::check(MPI_Comm_rank(comm_, &rank_), where, "MPI_Comm_rank");
    detail::mpi::check(MPI_Comm_size(comm_, &size_), where, "MPI_Comm_size");
  }

  MPI_Comm comm() const noexcept { return comm_; }
  /// This process's rank in the communicator, and the number of processes.
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

  /// Replaces each value by its sum over all ranks (the Communicator requirement). Collective:
  /// every rank calls it with the same length. Throws mpi_error if MPI reports an error (see the
  /// header comment on error handlers).
  void all_reduce_sum(std::span<double> values) const {
    detail::mpi::all_reduce_sum(comm_, values, "mpi_communicator::all_reduce_sum");
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(Communicator<mpi_communicator>);

// ---- data-parallel: gradients -----------------------------------------------------------------

/// Sums a contiguous buffer of gradients over all ranks in place and divides by `divisor`
/// (default 0: the number of ranks, DDP's average of per-rank mean gradients). Pass the global
/// batch size as divisor when each rank holds the SUM of its examples' gradients; pass 1 when
/// each rank has already scaled its part. Collective; throws mpi_error.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
void all_reduce_gradients(const mpi_communicator& comm, std::span<T> grads, double divisor = 0) {
  constexpr const char* where = "all_reduce_gradients";
  ADALORA_REQUIRE(divisor >= 0, where, "divisor must be >= 0 (0: the number of ranks), got ",
                  divisor);
  detail::mpi::all_reduce_sum(comm.comm(), grads, where);
  const T d = static_cast<T>(divisor == 0 ? comm.size() : divisor);
  if (d != T(1))
    for (T& g : grads) g /= d;
}

/// The data-parallel gradient all-reduce of every adapter: packs all gradients (any strides)
/// into one buffer, all-reduces it with one MPI_Allreduce (one collective per step instead of
/// three per adapter, as DDP's buckets do), and writes sum / divisor back. The buffer is
/// allocated on the first call and reused, so later calls with the same shapes never allocate.
/// Division (not multiplication by 1/divisor) so that a sum that is exact gives the same bits
/// as one process computing sum / divisor.
template <class T>
class gradient_all_reducer {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adalora::gradient_all_reducer: the element type must be float or double");

 public:
  explicit gradient_all_reducer(mpi_communicator comm) : comm_(comm) {}

  /// Collective: every rank passes adapters of the same shapes. divisor as in
  /// all_reduce_gradients (0: the number of ranks).
  void operator()(std::span<const svd_adapter_ref<T>> grads, double divisor = 0) {
    constexpr const char* where = "gradient_all_reducer";
    ADALORA_REQUIRE(divisor >= 0, where, "divisor must be >= 0 (0: the number of ranks), got ",
                    divisor);
    std::size_t total = 0;
    for (const auto& g : grads) {
      g.check_shapes(where, "grads");
      total += static_cast<std::size_t>(g.A.size() + g.E.size() + g.B.size());
    }
    buffer_.resize(total);  // allocates only when the total grows
    T* out = buffer_.data();
    for (const auto& g : grads) {
      out = pack(g.A, out);
      for (index_t i = 0; i < g.E.size(); ++i) *out++ = g.E[i];
      out = pack(g.B, out);
    }
    detail::mpi::all_reduce_sum(comm_.comm(), std::span<T>(buffer_.data(), total), where);
    const T d = static_cast<T>(divisor == 0 ? comm_.size() : divisor);
    const T* in = buffer_.data();
    for (const auto& g : grads) {
      in = unpack(in, g.A, d);
      for (index_t i = 0; i < g.E.size(); ++i) g.E[i] = *in++ / d;
      in = unpack(in, g.B, d);
    }
  }
  void operator()(const std::vector<svd_adapter_ref<T>>& grads, double divisor = 0) {
    (*this)(std::span<const svd_adapter_ref<T>>(grads), divisor);
  }

  const mpi_communicator& communicator() const noexcept { return comm_; }

 private:
  static T* pack(const matrix_view<T>& m, T* out) {
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j) *out++ = m(i, j);
    return out;
  }
  static const T* unpack(const T* in, const matrix_view<T>& m, T d) {
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j) m(i, j) = *in++ / d;
    return in;
  }

  mpi_communicator comm_;
  std::vector<T> buffer_;
};

/// One-shot form of gradient_all_reducer (allocates its buffer at every call).
template <class T>
void all_reduce_gradients(const mpi_communicator& comm, std::span<const svd_adapter_ref<T>> grads,
                          double divisor = 0) {
  gradient_all_reducer<T> reduce(comm);
  reduce(grads, divisor);
}
template <class T>
void all_reduce_gradients(const mpi_communicator& comm,
                          const std::vector<svd_adapter_ref<T>>& grads, double divisor = 0) {
  all_reduce_gradients(comm, std::span<const svd_adapter_ref<T>>(grads), divisor);
}

/// True iff `bytes` are identical on every rank (a 64-bit FNV-1a hash compared with one
/// all-reduce of its minimum and maximum). Collective. A cheap guard against replicas that
/// drift apart: check the kept masks, or the parameters, every so often.
inline bool same_on_all_ranks(const mpi_communicator& comm, std::span<const std::byte> bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::byte b : bytes) h = (h ^ static_cast<std::uint64_t>(b)) * 0x100000001b3ULL;
  h ^= static_cast<std::uint64_t>(bytes.size()) * 0x9e3779b97f4a7c15ULL;
  // min(h) and min(~h) = ~max(h) in one call.
  std::uint64_t v[2] = {h, ~h};
  detail::mpi::check(MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_UINT64_T, MPI_MIN, comm.comm()),
                     "same_on_all_ranks", "MPI_Allreduce");
  return v[0] == ~v[1];
}
template <class X>
  requires std::is_trivially_copyable_v<X>
bool same_on_all_ranks(const mpi_communicator& comm, std::span<const X> values) {
  return same_on_all_ranks(comm, std::as_bytes(values));
}

/// shard_shapes for this process's rank in `comm`.
inline std::vector<adapter_shape> shard_shapes(std::vector<adapter_shape> shapes,
                                               shard_layout layout, const mpi_communicator& comm) {
  return shard_shapes(std::move(shapes), layout, comm.rank(), comm.size());
}

}  // namespace adalora
