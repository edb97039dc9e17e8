// Paged KV gather/scatter on the GPU: the CUDA twin of csrc/paged_copy.h.
// Compiled at run time by NVRTC through CuPy RawModule (kvstore/kernels/cuda.py),
// so installing kvstore needs no CUDA toolkit. Self-contained: no includes.
//
// Grid: x = work item (layer, chunk block), y = slices of that item. Each item
// is cut into units (kv, token group, head) of `run * tokens` contiguous bytes;
// `tpu` threads (a power of two, chosen by the host) copy one unit in V-byte
// vectors, four loads in flight before the stores. The host checks every id
// and size before launch; the id check here only keeps a bug from writing
// outside the cache.

typedef long long i64;

__device__ __forceinline__ i64 kvs_min(i64 a, i64 b) { return a < b ? a : b; }

template <typename V>
__device__ __forceinline__ void copy_vecs(V* __restrict__ d, const V* __restrict__ s, int n,
                                          int first, int step) {
  int w = first;
  for (; w + 3 * step < n; w += 4 * step) {
    V a = s[w], b = s[w + step], c = s[w + 2 * step], e = s[w + 3 * step];
    d[w] = a;
    d[w + step] = b;
    d[w + 2 * step] = c;
    d[w + 3 * step] = e;
  }
  for (; w < n; w += step) d[w] = s[w];
}

template <typename V>
__device__ void paged_copy(int scatter, unsigned char* chunk, const unsigned long long* layer_bases,
                           const i64* ids, const i64* pos, i64 n_ids, i64 num_blocks,
                           i64 block_stride, i64 block_tokens, i64 num_tokens, i64 kv_count,
                           i64 kv_src, i64 kv_dst, i64 tok_merge, i64 tok_src, i64 tok_dst,
                           i64 head_count, i64 head_src, i64 head_dst, i64 run, i64 blk_dst,
                           i64 layer_dst, int tpu) {
  // Index math in 32 bits: 64-bit division is emulated (~100 instructions)
  // and would cost as much as the copy for small units.
  const unsigned item = blockIdx.x;
  const unsigned l = item / static_cast<unsigned>(n_ids);
  const unsigned i = item - l * static_cast<unsigned>(n_ids);
  const i64 id = ids[i];
  if (id < 0 || id >= num_blocks) return;
  const i64 p = pos ? pos[i] : i;
  unsigned char* eng = reinterpret_cast<unsigned char*>(layer_bases[l]) + id * block_stride;
  unsigned char* chk = chunk + l * layer_dst + p * blk_dst;
  const unsigned nt = static_cast<unsigned>(kvs_min(block_tokens, num_tokens - p * block_tokens));
  const unsigned merge = static_cast<unsigned>(tok_merge);
  const unsigned heads = static_cast<unsigned>(head_count);
  const unsigned groups = (nt + merge - 1) / merge;
  const unsigned units = static_cast<unsigned>(kv_count) * groups * heads;
  const unsigned gtid = blockIdx.y * blockDim.x + threadIdx.x;
  const unsigned slots = (gridDim.y * blockDim.x) / tpu;
  const unsigned slot = gtid / tpu, sub = gtid % tpu;
  for (unsigned u = slot; u < units; u += slots) {
    const unsigned h = u % heads, r = u / heads;
    const unsigned g = r % groups, kv = r / groups;
    const unsigned t = g * merge;
    const unsigned m = (nt - t < merge) ? nt - t : merge;
    const int nv = static_cast<int>(run * m / static_cast<i64>(sizeof(V)));
    unsigned char* e = eng + kv * kv_src + t * tok_src + h * head_src;
    unsigned char* c = chk + kv * kv_dst + t * tok_dst + h * head_dst;
    if (scatter)
      copy_vecs<V>(reinterpret_cast<V*>(e), reinterpret_cast<const V*>(c), nv, sub, tpu);
    else
      copy_vecs<V>(reinterpret_cast<V*>(c), reinterpret_cast<const V*>(e), nv, sub, tpu);
  }
}

#define KVS_PAGED_KERNEL(NAME, V)                                                                  \
  extern "C" __global__ void NAME(                                                                 \
      int scatter, unsigned char* chunk, const unsigned long long* layer_bases, const i64* ids,    \
      const i64* pos, i64 n_ids, i64 num_blocks, i64 block_stride, i64 block_tokens,                \
      i64 num_tokens, i64 kv_count, i64 kv_src, i64 kv_dst, i64 tok_merge, i64 tok_src,             \
      i64 tok_dst, i64 head_count, i64 head_src, i64 head_dst, i64 run, i64 blk_dst,                \
      i64 layer_dst, int tpu) {                                                                    \
    paged_copy<V>(scatter, chunk, layer_bases, ids, pos, n_ids, num_blocks, block_stride,          \
                  block_tokens, num_tokens, kv_count, kv_src, kv_dst, tok_merge, tok_src, tok_dst, \
                  head_count, head_src, head_dst, run, blk_dst, layer_dst, tpu);                   \
  }

KVS_PAGED_KERNEL(kvs_paged_copy_v16, uint4)
KVS_PAGED_KERNEL(kvs_paged_copy_v8, uint2)
KVS_PAGED_KERNEL(kvs_paged_copy_v4, unsigned int)
KVS_PAGED_KERNEL(kvs_paged_copy_v2, unsigned short)
KVS_PAGED_KERNEL(kvs_paged_copy_v1, unsigned char)
