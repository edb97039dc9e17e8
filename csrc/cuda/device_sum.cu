// The HBM tier's checksum ("device sum", DSUM64), computed where the bytes lie.
// Compiled at run time by NVRTC through CuPy RawModule (kvstore/tiers/cuda_device.py).
// Self-contained: no includes. The host twin (the reference every other path is
// checked against) is kvstore/device_sum.py; docs/gpu.md describes the function.
//
// The value is read as little-endian 64-bit words w_0..w_{m-1} (the last one
// zero-padded). Word i contributes mix(w_i ^ (seed + (i + 1) * GOLDEN)), where mix
// is the SplitMix64 finalizer; the contributions are summed modulo 2^64, so any
// thread may add any word (one pass, every thread busy, no ordering), and the
// position folded into each word makes reorderings count. The host finishes with
// mix(total ^ (n * LENGTH) ^ seed). The seed is derived from the key, so a chunk
// read under another key does not verify.
//
// kvs_dsum adds the words of `src` into *out; kvs_dsum_copy also stores each word
// into `dst` as it goes (a verified copy in one read of the source). Both want
// `src` (and `dst`) 8-byte aligned; the host takes another path otherwise.
// Grid-stride loops; a warp shuffle and one atomicAdd per block reduce.

typedef unsigned long long u64;

#define KVS_GOLDEN 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ u64 kvs_mix(u64 x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

__device__ __forceinline__ u64 kvs_term(u64 w, u64 i, u64 seed) {
  return kvs_mix(w ^ (seed + (i + 1ULL) * KVS_GOLDEN));
}

__device__ __forceinline__ void kvs_reduce_add(u64 acc, u64* out) {
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xFFFFFFFFu, acc, off);
  __shared__ u64 warps[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  if (lane == 0) warps[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = (blockDim.x + 31u) >> 5;
    acc = lane < nwarps ? warps[lane] : 0ULL;
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xFFFFFFFFu, acc, off);
    if (lane == 0) atomicAdd(out, acc);
  }
}

// The zero-padded last word of a value whose size is not a multiple of 8.
__device__ __forceinline__ u64 kvs_tail(const unsigned char* src, u64 words, u64 n,
                                        unsigned char* dst) {
  u64 w = 0;
  for (u64 b = words * 8ULL; b < n; ++b) {
    w |= static_cast<u64>(src[b]) << (8ULL * (b - words * 8ULL));
    if (dst) dst[b] = src[b];
  }
  return w;
}

template <bool COPY>
__device__ void kvs_sum(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                        u64 n, u64 seed, u64* out) {
  const u64* s = reinterpret_cast<const u64*>(src);
  u64* d = reinterpret_cast<u64*>(dst);
  const u64 words = n >> 3;
  const u64 stride = static_cast<u64>(gridDim.x) * blockDim.x;
  u64 i = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x;
  // the position term seed + (i + 1) * GOLDEN, advanced by additions (no multiply per word)
  u64 pos = seed + (i + 1ULL) * KVS_GOLDEN;
  const u64 step = stride * KVS_GOLDEN;
  u64 acc = 0;
  // two words in flight per thread before their stores
  for (; i + stride < words; i += 2 * stride, pos += 2 * step) {
    const u64 a = s[i], b = s[i + stride];
    if (COPY) {
      d[i] = a;
      d[i + stride] = b;
    }
    acc += kvs_mix(a ^ pos) + kvs_mix(b ^ (pos + step));
  }
  if (i < words) {  // (then i + stride >= words: one word left at most)
    const u64 a = s[i];
    if (COPY) d[i] = a;
    acc += kvs_mix(a ^ pos);
  }
  if ((n & 7ULL) && blockIdx.x == 0 && threadIdx.x == 0)
    acc += kvs_term(kvs_tail(src, words, n, COPY ? dst : nullptr), words, seed);
  kvs_reduce_add(acc, out);
}

extern "C" __global__ void kvs_dsum(const unsigned char* src, u64 n, u64 seed, u64* out) {
  kvs_sum<false>(src, nullptr, n, seed, out);
}

extern "C" __global__ void kvs_dsum_copy(const unsigned char* src, unsigned char* dst, u64 n, u64 seed,
                                         u64* out) {
  kvs_sum<true>(src, dst, n, seed, out);
}
