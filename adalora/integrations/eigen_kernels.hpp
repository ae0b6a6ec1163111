#pragma once
// Eigen fast paths for the library's dense kernels. Opt-in, like eigen.hpp: the core never
// includes these headers; depend on //adalora/integrations:eigen_kernels to use them.
//
//  * eigen_gram_kernel<T, Acc> (eigen_gram_kernel.hpp): the Kernel policy of
//    orthogonality_regularizer, register-blocked on Eigen's packet math (thin products: Eigen's
//    own GEMM wastes most of its blocks there).
//        adalora::orthogonality_regularizer<float, adalora::eigen_gram_kernel<float>> orth;
//  * eigen_adapter_forward / eigen_adapter_backward (eigen_adapter_kernels.hpp): adapter_forward
//    / adapter_backward with the same arguments, checks, exceptions and add-into semantics, on
//    Eigen's GEMM or, at small rank, on register-blocked kernels (eigen_thin_products.hpp).
//  * What they share (eigen_dense.hpp): views mapped in place or packed, and a GEMM tiled so
//    that Eigen allocates nothing.
//
// Agreement, not bit parity. The portable kernels reproduce torch bit for bit because they sum
// every dot product sequentially without FMA. Eigen's GEMM and the register-blocked kernels
// block the sums, may keep several partial sums per output and use FMA where the target has it
// (intrinsics, which -ffp-contract=off does not affect); they also fold scaling / rn into one
// factor. Results are
// therefore rounded differently, within a few units of the working precision times the length
// of the dot products: tests/eigen_kernels_test.cpp states and checks the tolerances. Use the
// portable path where bit parity with PEFT matters (golden replays), this one for speed.

#include "adalora/integrations/eigen_adapter_kernels.hpp"
#include "adalora/integrations/eigen_gram_kernel.hpp"
