// XXH3-64 compiled for AVX2 (called only where the CPU has it; see checksum.cpp),
// plain and fused with a copy.
//
// The xxHash library's own run-time dispatch measured ~15 GB/s on this machine
// kind against ~37 GB/s for an AVX2 build of the same function, so the hot path
// carries its own AVX2 instance, inlined from the library's header (same
// algorithm, same values).
//
// copy_xxh3_avx2 runs XXH3's long-input loop (the library's accumulate step
// written out on registers, its scramble and merge steps, in the library's
// order) while it copies: each 64-byte stripe is loaded once, stored to the
// destination and accumulated from the same registers, instead of copying a
// whole checksum block and reading it back from L2 (which cost ~35% over a
// memcpy here). The value is the library's XXH3_64bits_withSeed of the bytes
// stored (tests compare the two on every length class).
#pragma GCC target("avx2")  // every function of this file is built for AVX2

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#define XXH_INLINE_ALL
#define XXH_VECTOR 2  // XXH_AVX2: the pragma does not define __AVX2__, so name the code path
#include <xxhash.h>

#include "checksum.h"

// The fused loop follows XXH3_hashLong_64b_internal of xxHash 0.8.x.
#define KVS_FUSED_XXH3 (XXH_VERSION_MAJOR == 0 && XXH_VERSION_MINOR == 8)

namespace kvs {

std::uint64_t xxh3_avx2(const void* data, std::size_t n, std::uint64_t seed) {
  return XXH3_64bits_withSeed(data, n, seed);
}

std::uint64_t copy_xxh3_avx2(void* dst, const void* src, std::size_t n, std::uint64_t seed) {
#if KVS_FUSED_XXH3
  if (n > XXH3_MIDSIZE_MAX) {
    XXH_ALIGN(XXH_SEC_ALIGN) xxh_u8 custom[XXH_SECRET_DEFAULT_SIZE];
    const xxh_u8* secret = XXH3_kSecret;
    if (seed != 0) {
      XXH3_initCustomSecret(custom, seed);
      secret = custom;
    }
    constexpr std::size_t kSecretSize = XXH_SECRET_DEFAULT_SIZE;
    constexpr std::size_t kStripesPerBlock = (kSecretSize - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
    constexpr std::size_t kBlockLen = XXH_STRIPE_LEN * kStripesPerBlock;
    XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;
    auto* out = static_cast<xxh_u8*>(dst);
    const auto* in = static_cast<const xxh_u8*>(src);
    const std::size_t blocks = (n - 1) / kBlockLen;
    for (std::size_t b = 0; b < blocks; ++b) {
      xxh_u8* block = out + b * kBlockLen;
      const xxh_u8* from = in + b * kBlockLen;
      // XXH3_accumulate_512_avx2 on the registers just loaded, stored to dst on the way.
      __m256i acc0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc));
      __m256i acc1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc) + 1);
      for (std::size_t s = 0; s < kStripesPerBlock; ++s) {
        const std::size_t at = s * XXH_STRIPE_LEN;
        _mm_prefetch(reinterpret_cast<const char*>(from + at + 1024), _MM_HINT_T0);
        const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + at));
        const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + at + 32));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + at), d0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + at + 32), d1);
        const auto* key = reinterpret_cast<const __m256i*>(secret + s * XXH_SECRET_CONSUME_RATE);
        const __m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256(key));
        const __m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256(key + 1));
        acc0 = _mm256_add_epi64(_mm256_mul_epu32(k0, _mm256_shuffle_epi32(k0, _MM_SHUFFLE(0, 3, 0, 1))),
                                _mm256_add_epi64(acc0, _mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2))));
        acc1 = _mm256_add_epi64(_mm256_mul_epu32(k1, _mm256_shuffle_epi32(k1, _MM_SHUFFLE(0, 3, 0, 1))),
                                _mm256_add_epi64(acc1, _mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2))));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc), acc0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc) + 1, acc1);
      XXH3_scrambleAcc(acc, secret + kSecretSize - XXH_STRIPE_LEN);
    }
    // The last partial block (1 .. kBlockLen bytes) and the last stripe, as the library does.
    xxh_u8* tail = out + blocks * kBlockLen;
    std::memcpy(tail, in + blocks * kBlockLen, n - blocks * kBlockLen);
    const std::size_t stripes = ((n - 1) - kBlockLen * blocks) / XXH_STRIPE_LEN;
    for (std::size_t s = 0; s < stripes; ++s)
      XXH3_accumulate_512(acc, tail + s * XXH_STRIPE_LEN, secret + s * XXH_SECRET_CONSUME_RATE);
    XXH3_accumulate_512(acc, out + n - XXH_STRIPE_LEN, secret + kSecretSize - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);
    return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START, static_cast<xxh_u64>(n) * XXH_PRIME64_1);
  }
#endif
  std::memcpy(dst, src, n);
  return XXH3_64bits_withSeed(dst, n, seed);
}

}  // namespace kvs
