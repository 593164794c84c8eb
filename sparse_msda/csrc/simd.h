// SIMD helpers of the CPU kernels: a GCC vector type as wide as one register of the target ISA,
// and the register budget the micro-kernels size their blocks by.
//
// The width is chosen at compile time from the -march the kernels are built for (the compiler's
// ISA macros): AVX-512 -> 64 bytes (32 zmm registers), AVX/AVX2 -> 32 bytes (16 ymm registers),
// anything else -> 16 bytes (SSE2 / NEON; 16 registers assumed). A vector type wider than the
// target's registers is NOT split into registers by GCC: it lives in memory (every operation a
// load and a store), which made the 64-byte version 4-8x slower on AVX2-only CPUs (issue 11).
//
// A kernel may define SPARSE_MSDA_SIMD_256 before including this header to use 32-byte vectors
// on an AVX-512 target too (ymm registers, all 32 of them; kIsa stays "avx512": it names the
// target ISA, which the dispatch guard keys on). The sampling kernel does: its rows are gathered
// corner by corner (memory-bound), and on the Zen 4 host its 32-byte build ran the BEV deformable
// encoder ~10% faster than the 64-byte one (README "The fused CPU kernels"); GCC's own Intel
// AVX-512 tunings also prefer 256-bit vectors by default.
#pragma once

#include <cstdint>

namespace sparse_msda_simd {

#if defined(__AVX512F__) && !defined(SPARSE_MSDA_SIMD_256)
constexpr int kVecBytes = 64;
constexpr int kVecRegisters = 32;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX512F__)  // SPARSE_MSDA_SIMD_256: 32-byte vectors (ymm0-31) on an AVX-512 target
constexpr int kVecBytes = 32;
constexpr int kVecRegisters = 32;
constexpr const char* kIsa = "avx512";  // the target ISA (dispatch guard), not the vector width
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kVecBytes = 32;
constexpr int kVecRegisters = 16;
constexpr const char* kIsa = "avx2";
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kVecRegisters = 16;
constexpr const char* kIsa = "avx";
#elif defined(__SSE2__)
constexpr int kVecBytes = 16;
constexpr int kVecRegisters = 16;
constexpr const char* kIsa = "sse2";
#elif defined(__ARM_NEON)
constexpr int kVecBytes = 16;
constexpr int kVecRegisters = 32;
constexpr const char* kIsa = "neon";
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegisters = 16;
constexpr const char* kIsa = "generic";
#endif

// One register of scalar_t (N lanes), unaligned loads and stores.
template <typename scalar_t>
struct Vec {
  typedef scalar_t type __attribute__((vector_size(kVecBytes), aligned(sizeof(scalar_t)), may_alias));
  static constexpr int64_t N = kVecBytes / static_cast<int64_t>(sizeof(scalar_t));
  static type load(const scalar_t* p) { return *reinterpret_cast<const type*>(p); }
  static void store(scalar_t* p, type v) { *reinterpret_cast<type*>(p) = v; }
  static type broadcast(scalar_t x) { return type{} + x; }
};

}  // namespace sparse_msda_simd
