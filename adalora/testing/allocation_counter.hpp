#pragma once
// Counting the heap allocations of a test binary, for the conformance kit's no-allocation check.
//
// The count comes from replacing the global operator new, which C++ allows exactly once per
// program. A header cannot do that for every includer (two test files would define it twice), so
// the kit only declares the counter here and a test binary opts in by writing, in ONE .cpp file,
// at global scope:
//
//     ADALORA_TESTING_COUNT_ALLOCATIONS();
//
// Without it the kit reports its allocation check as "skipped (not wired)" rather than passing
// silently: whether the counter is wired is probed at run time, not assumed.
//
// g++ 12 may report -Wmismatched-new-delete in the file that expands the macro (a false positive
// when both operator new and operator delete are user-defined); build that file with
// -Wno-mismatched-new-delete.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace adalora::testing {

namespace detail {

// Every allocation of every thread counts: a check can fail because another thread allocated
// during it, never pass because an allocation was missed.
inline std::atomic<std::int64_t> allocation_count{0};

// The probe's pointer goes through a volatile so that the compiler cannot pair and drop it.
inline void* volatile allocation_probe_sink = nullptr;

inline void* counted_new(std::size_t n) {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}

inline void* counted_new(std::size_t n, std::align_val_t align) {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  const auto a = static_cast<std::size_t>(align);
  // aligned_alloc wants a size that is a multiple of the alignment.
  const std::size_t size = n == 0 ? a : (n + a - 1) / a * a;
#if defined(_WIN32)
  if (void* p = _aligned_malloc(size, a)) return p;
#else
  if (void* p = std::aligned_alloc(a, size)) return p;
#endif
  throw std::bad_alloc();
}

inline void* counted_new_nothrow(std::size_t n) noexcept {
  try {
    return counted_new(n);
  } catch (...) {
    return nullptr;
  }
}
inline void* counted_new_nothrow(std::size_t n, std::align_val_t align) noexcept {
  try {
    return counted_new(n, align);
  } catch (...) {
    return nullptr;
  }
}

inline void counted_delete(void* p) noexcept { std::free(p); }

inline void counted_aligned_delete(void* p) noexcept {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

}  // namespace detail

/// The heap-allocation counter the conformance kit reads. Counts calls to the global operator
/// new, in all its forms, once ADALORA_TESTING_COUNT_ALLOCATIONS() is expanded in the test
/// binary.
struct allocation_counter {
  /// Allocations so far (all threads). Meaningful only when wired().
  static std::int64_t count() noexcept {
    return detail::allocation_count.load(std::memory_order_relaxed);
  }

  /// True iff the counting operator new is the one in effect in this program. Probes it by one
  /// allocation of one byte, so it is never called inside a window being counted.
  static bool wired() {
    const std::int64_t before = count();
    void* p = ::operator new(1);
    detail::allocation_probe_sink = p;
    ::operator delete(detail::allocation_probe_sink);
    detail::allocation_probe_sink = nullptr;
    return count() != before;
  }
};

}  // namespace adalora::testing

/// Replaces the global operator new/delete of the program with counting ones (see the header
/// comment). Expand it exactly once per test binary, at global scope, followed by a semicolon.
/// Every form is replaced, array and nothrow included: the standard says the defaults of those
/// forward to the plain forms, but sanitizer runtimes supply their own, which would then pair
/// their allocations with our deallocations.
#define ADALORA_TESTING_COUNT_ALLOCATIONS()                                                   \
  void* operator new(std::size_t n) { return ::adalora::testing::detail::counted_new(n); }    \
  void* operator new[](std::size_t n) { return ::adalora::testing::detail::counted_new(n); }  \
  void* operator new(std::size_t n, const std::nothrow_t&) noexcept {                         \
    return ::adalora::testing::detail::counted_new_nothrow(n);                                \
  }                                                                                           \
  void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {                       \
    return ::adalora::testing::detail::counted_new_nothrow(n);                                \
  }                                                                                           \
  void* operator new(std::size_t n, std::align_val_t a) {                                     \
    return ::adalora::testing::detail::counted_new(n, a);                                     \
  }                                                                                           \
  void* operator new[](std::size_t n, std::align_val_t a) {                                   \
    return ::adalora::testing::detail::counted_new(n, a);                                     \
  }                                                                                           \
  void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {     \
    return ::adalora::testing::detail::counted_new_nothrow(n, a);                             \
  }                                                                                           \
  void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {   \
    return ::adalora::testing::detail::counted_new_nothrow(n, a);                             \
  }                                                                                           \
  void operator delete(void* p) noexcept { ::adalora::testing::detail::counted_delete(p); }   \
  void operator delete[](void* p) noexcept { ::adalora::testing::detail::counted_delete(p); } \
  void operator delete(void* p, std::size_t) noexcept {                                       \
    ::adalora::testing::detail::counted_delete(p);                                            \
  }                                                                                           \
  void operator delete[](void* p, std::size_t) noexcept {                                     \
    ::adalora::testing::detail::counted_delete(p);                                            \
  }                                                                                           \
  void operator delete(void* p, const std::nothrow_t&) noexcept {                             \
    ::adalora::testing::detail::counted_delete(p);                                            \
  }                                                                                           \
  void operator delete[](void* p, const std::nothrow_t&) noexcept {                           \
    ::adalora::testing::detail::counted_delete(p);                                            \
  }                                                                                           \
  void operator delete(void* p, std::align_val_t) noexcept {                                  \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  void operator delete[](void* p, std::align_val_t) noexcept {                                \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  void operator delete(void* p, std::size_t, std::align_val_t) noexcept {                     \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {                   \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {           \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {         \
    ::adalora::testing::detail::counted_aligned_delete(p);                                    \
  }                                                                                           \
  static_assert(true, "takes the semicolon that follows the macro")
