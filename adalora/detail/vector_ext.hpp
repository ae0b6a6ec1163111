#pragma once
// GCC/Clang vector extensions: the compiler lowers them to AVX2, NEON, ... for the target it
// builds for (no intrinsics, no run-time dispatch). g++ before 12 lowers some of the operations
// used here badly, so they are only used from g++ 12 and Clang on. On x86 they are used only
// where the target has 256-bit vectors (AVX: -mavx2, -march=x86-64-v3 or later): for an
// SSE2-only target g++ splits the 256-bit operations, and the hand-vectorised allocator step
// ran 3.6x slower than the plain loop g++ vectorises by itself (12.4 against 3.45 ms at the
// DeBERTaV3-base shape, g++ 12 -O2). Everything that uses them has a plain loop otherwise.
//
// Vectors are passed by reference throughout: by value their ABI depends on -mavx (-Wpsabi).

#include <cstdint>

#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && \
    (defined(__AVX__) || !(defined(__x86_64__) || defined(__i386__)))
#define ADALORA_VECTOR_EXTENSIONS 1
#else
#define ADALORA_VECTOR_EXTENSIONS 0
#endif

namespace adalora::detail {

#if ADALORA_VECTOR_EXTENSIONS
using v4f = float __attribute__((vector_size(16)));
using v8f = float __attribute__((vector_size(32)));
using v4d = double __attribute__((vector_size(32)));
using v8i = std::int32_t __attribute__((vector_size(32)));
#endif

}  // namespace adalora::detail
