// Block checksums (XXH3-64 per block) fused with an optional copy; see checksum.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvs {

// sums[i] = XXH3-64(seed) of block i of the n bytes at src (of dst after copying
// src there, when dst is not null). `sums` holds max(1, ceil(n / block)) entries.
// Large values are split over up to `threads` pooled threads. Raises
// std::invalid_argument for a negative size or block.
void block_sums(std::uint8_t* dst, const std::uint8_t* src, std::int64_t n, std::uint64_t seed,
                std::uint64_t* sums, std::int64_t block, int threads);

// block_sums with a copy into a scatter list: the n bytes at src land in segments
// (seg_addr[i], seg_len[i]) back to back (the lengths must add up to n), and sums[i]
// is the XXH3-64(seed) of block i of what landed there. Raises std::invalid_argument
// when the lengths do not add up.
void block_sums_scatter(const std::uint8_t* src, std::int64_t n, const std::uint64_t* seg_addr,
                        const std::uint64_t* seg_len, std::int64_t n_segs, std::uint64_t seed,
                        std::uint64_t* sums, std::int64_t block, int threads);

// block_sums_scatter for n_jobs jobs in one pass: job j copies len[j] > 0 bytes from
// src[j] into segments [seg_begin[j], seg_begin[j + 1]) of (seg_addr, seg_len), back to
// back (their lengths must add up to len[j]), hashing each `block` of what landed with
// seeds[j]; the sums of job j follow those of job j - 1 in `sums` (ceil(len / block)
// each). The blocks of all jobs are spread over up to `threads` pooled threads, so many
// small copies use them as well as one large one. Raises std::invalid_argument, before
// any copy, for a job without bytes or whose segments do not add up. With `gather` the
// copy goes the other way: the segments are the sources and src[j] the contiguous
// destination (a value in pieces written into one buffer), hashed as it lands there.
void block_sums_batch(const std::uint64_t* src, const std::int64_t* len, const std::int64_t* seg_begin,
                      const std::uint64_t* seg_addr, const std::uint64_t* seg_len, const std::uint64_t* seeds,
                      std::int64_t n_jobs, std::uint64_t* sums, std::int64_t block, int threads,
                      bool gather = false);

// XXH3-64 built for AVX2 (xxh3_avx2.cpp); call only when the CPU supports AVX2.
std::uint64_t xxh3_avx2(const void* data, std::size_t n, std::uint64_t seed);

// memcpy(dst, src, n), then XXH3-64 of dst, in one pass (xxh3_avx2.cpp); AVX2 only.
std::uint64_t copy_xxh3_avx2(void* dst, const void* src, std::size_t n, std::uint64_t seed);

}  // namespace kvs
