// Paged KV gather/scatter over raw host addresses: the narrow native boundary.
//
// One generic loop nest serves both chunk formats and every engine layout;
// Python (kvstore/kernels/paged.py) derives the strides and hands them over.
// For work item (layer l, chunk block i) with engine block id = ids[i]:
//
//   src = layer_bases[l] + ids[i] * block_stride          (engine side)
//   dst = chunk + l * layer_dst + pos[i] * blk_dst        (chunk side; pos[i] = i
//                                                           unless scatter dropped duplicates)
//   nt  = min(block_tokens, num_tokens - pos[i] * block_tokens)
//   for kv < kv_count, token group t < nt step tok_merge, head h < head_count:
//     copy run * min(tok_merge, nt - t) bytes between
//       src + kv*kv_src + t*tok_src + h*head_src  and
//       dst + kv*kv_dst + t*tok_dst + h*head_dst
//
// The CUDA twin (csrc/cuda/paged_copy.cu) implements the same nest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>

namespace kvs {

struct PagedPlan {
  std::uint8_t* chunk = nullptr;       // chunk bytes (dst of gather, src of scatter)
  std::int64_t chunk_size = 0;         // bytes available at chunk
  const std::uint64_t* layer_bases = nullptr;  // engine base address per layer
  std::int64_t n_layers = 0;
  const std::int64_t* ids = nullptr;   // engine block ids, one per chunk block
  const std::int64_t* pos = nullptr;   // chunk block index per id; nullptr = identity
  std::int64_t n_ids = 0;             // ids (and pos) entries
  std::int64_t chunk_blocks = 0;      // blocks in the chunk; == n_ids when pos is nullptr
  std::int64_t num_blocks = 0;         // engine blocks per layer (ids must be below)
  std::int64_t block_stride = 0;
  std::int64_t block_tokens = 0;
  std::int64_t num_tokens = 0;
  std::int64_t kv_count = 1, kv_src = 0, kv_dst = 0;
  std::int64_t tok_merge = 1, tok_src = 0, tok_dst = 0;
  std::int64_t head_count = 1, head_src = 0, head_dst = 0;
  std::int64_t run = 0;                // contiguous bytes per token (per head unless merged)
  std::int64_t blk_dst = 0;
  std::int64_t layer_dst = 0;
};

// Validates every field (ids in range, chunk large enough, sane counts) and
// throws std::invalid_argument before any byte is touched.
void validate(const PagedPlan& p);

// Gather (scatter == false: engine -> chunk) or scatter (chunk -> engine) with
// up to `threads` threads. Calls validate() first. Blocking; thread-safe
// (concurrent callers share one worker pool; a busy pool makes the later
// caller copy on its own thread).
void paged_copy(const PagedPlan& p, bool scatter, int threads);

// memcpy split over `threads` threads (same pool).
void parallel_copy(void* dst, const void* src, std::size_t n, int threads);

int hardware_threads();

// fn(begin, end) over [0, items) split into up to `threads` contiguous ranges, run on
// the warm worker pool (the caller runs the first range).
void for_ranges(std::int64_t items, int threads,
                const std::function<void(std::int64_t, std::int64_t)>& fn);

}  // namespace kvs
