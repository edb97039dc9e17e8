// Block checksums fused with copies (kvstore.checksum's format, in C++).
//
// A value is hashed in `block`-byte blocks, each with XXH3-64 seeded by the key's
// seed; when `dst` is given, each block is copied first and hashed from the
// destination while it is still in cache, so copy + verify is one pass over
// memory. Built only where the xxHash library is installed (Debian: libxxhash-dev;
// setup.py checks): XXH3 runs as an AVX2 build of the library's code where the CPU
// has AVX2 (xxh3_avx2.cpp), else through the library's run-time dispatch. Python
// falls back to the `xxhash` package otherwise; all compute the same values.
#include "checksum.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>
#include <xxh_x86dispatch.h>

#include <algorithm>
#include <cstring>
#include <vector>
#include <stdexcept>

#include "paged_copy.h"

namespace kvs {

namespace {
// Below this many bytes per thread a second thread costs more than it brings.
constexpr std::int64_t kMinBytesPerThread = 4 * 1024 * 1024;
bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

std::uint64_t xxh3(const std::uint8_t* p, std::int64_t n, std::uint64_t seed) {
  return have_avx2() ? xxh3_avx2(p, static_cast<std::size_t>(n), seed)
                     : XXH3_64bits_withSeed_dispatch(p, static_cast<std::size_t>(n), seed);
}

// memcpy then XXH3-64 of what landed, in one pass where the CPU has AVX2.
std::uint64_t copy_xxh3(std::uint8_t* d, const std::uint8_t* s, std::int64_t n, std::uint64_t seed) {
  if (have_avx2()) return copy_xxh3_avx2(d, s, static_cast<std::size_t>(n), seed);
  std::memcpy(d, s, static_cast<std::size_t>(n));
  return xxh3(d, n, seed);
}
}  // namespace

void block_sums(std::uint8_t* dst, const std::uint8_t* src, std::int64_t n, std::uint64_t seed,
                std::uint64_t* sums, std::int64_t block, int threads) {
  if (n < 0 || block <= 0) throw std::invalid_argument("block_sums: negative size or non-positive block");
  const std::int64_t blocks = std::max<std::int64_t>(1, (n + block - 1) / block);
  int t = static_cast<int>(std::min<std::int64_t>(threads, 1 + n / kMinBytesPerThread));
  for_ranges(blocks, std::max(t, 1), [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t lo = i * block, len = std::max<std::int64_t>(std::min(block, n - lo), 0);
      if (dst != nullptr && len > 0) {
        sums[i] = copy_xxh3(dst + lo, src + lo, len, seed);
      } else {
        sums[i] = xxh3(src + lo, len, seed);
      }
    }
  });
}

void block_sums_scatter(const std::uint8_t* src, std::int64_t n, const std::uint64_t* seg_addr,
                        const std::uint64_t* seg_len, std::int64_t n_segs, std::uint64_t seed,
                        std::uint64_t* sums, std::int64_t block, int threads) {
  if (n < 0 || block <= 0 || n_segs < 0) throw std::invalid_argument("block_sums_scatter: negative size or block");
  // Where each segment starts in the logical destination (segments tile [0, n) in order).
  std::vector<std::int64_t> starts(static_cast<std::size_t>(n_segs) + 1, 0);
  for (std::int64_t s = 0; s < n_segs; ++s) starts[s + 1] = starts[s] + static_cast<std::int64_t>(seg_len[s]);
  if (starts[n_segs] != n) throw std::invalid_argument("block_sums_scatter: segments do not add up to the source");
  const std::int64_t blocks = std::max<std::int64_t>(1, (n + block - 1) / block);
  int t = static_cast<int>(std::min<std::int64_t>(threads, 1 + n / kMinBytesPerThread));
  for_ranges(blocks, std::max(t, 1), [&](std::int64_t b, std::int64_t e) {
    XXH3_state_t st;
    // first segment that holds byte b * block
    std::int64_t s = std::upper_bound(starts.begin(), starts.end(), b * block) - starts.begin() - 1;
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t lo = i * block, hi = std::min(lo + block, n);
      XXH3_64bits_reset_withSeed(&st, seed);
      for (std::int64_t at = lo; at < hi;) {
        while (starts[s + 1] <= at) ++s;
        const std::int64_t take = std::min(hi, starts[s + 1]) - at;
        auto* d = reinterpret_cast<std::uint8_t*>(seg_addr[s]) + (at - starts[s]);
        std::memcpy(d, src + at, static_cast<std::size_t>(take));
        XXH3_64bits_update_dispatch(&st, d, static_cast<std::size_t>(take));  // what landed, still in cache
        at += take;
      }
      sums[i] = XXH3_64bits_digest(&st);
    }
  });
}

void block_sums_batch(const std::uint64_t* src, const std::int64_t* len, const std::int64_t* seg_begin,
                      const std::uint64_t* seg_addr, const std::uint64_t* seg_len, const std::uint64_t* seeds,
                      std::int64_t n_jobs, std::uint64_t* sums, std::int64_t block, int threads, bool gather) {
  if (n_jobs < 0 || block <= 0) throw std::invalid_argument("block_sums_batch: negative job count or block");
  if (n_jobs == 0) return;
  // first[j]: job j's first block in `sums`; at[s]: where segment s starts inside its job
  std::vector<std::int64_t> first(static_cast<std::size_t>(n_jobs) + 1, 0);
  std::vector<std::int64_t> at(static_cast<std::size_t>(seg_begin[n_jobs]) + 1, 0);
  std::int64_t total = 0;
  for (std::int64_t j = 0; j < n_jobs; ++j) {
    if (len[j] <= 0 || seg_begin[j + 1] <= seg_begin[j])
      throw std::invalid_argument("block_sums_batch: a job without bytes or segments");
    std::int64_t pos = 0;
    for (std::int64_t s = seg_begin[j]; s < seg_begin[j + 1]; ++s) {
      at[s] = pos;
      pos += static_cast<std::int64_t>(seg_len[s]);
    }
    if (pos != len[j]) throw std::invalid_argument("block_sums_batch: segments do not add up to a job's source");
    first[j + 1] = first[j] + (len[j] + block - 1) / block;
    total += len[j];
  }
  const int t = static_cast<int>(std::min<std::int64_t>(threads, 1 + total / kMinBytesPerThread));
  for_ranges(first[n_jobs], std::max(t, 1), [&](std::int64_t b, std::int64_t e) {
    XXH3_state_t st;
    std::int64_t j = std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
    std::int64_t s = seg_begin[j];
    for (std::int64_t i = b; i < e; ++i) {
      while (first[j + 1] <= i) s = seg_begin[++j];
      const std::int64_t lo = (i - first[j]) * block, hi = std::min(lo + block, len[j]);
      while (at[s] + static_cast<std::int64_t>(seg_len[s]) <= lo) ++s;
      auto* flat = reinterpret_cast<std::uint8_t*>(src[j]);
      auto seg_at = [&](std::int64_t k, std::int64_t pos) {
        return reinterpret_cast<std::uint8_t*>(seg_addr[k]) + (pos - at[k]);
      };
      if (at[s] + static_cast<std::int64_t>(seg_len[s]) >= hi) {  // the block is within one segment
        sums[i] = gather ? copy_xxh3(flat + lo, seg_at(s, lo), hi - lo, seeds[j])
                         : copy_xxh3(seg_at(s, lo), flat + lo, hi - lo, seeds[j]);
        continue;
      }
      if (gather) {  // the pieces land back to back: hash the block once it is whole
        for (std::int64_t pos = lo, k = s; pos < hi;) {
          while (at[k] + static_cast<std::int64_t>(seg_len[k]) <= pos) ++k;
          const std::int64_t take = std::min(hi, at[k] + static_cast<std::int64_t>(seg_len[k])) - pos;
          std::memcpy(flat + pos, seg_at(k, pos), static_cast<std::size_t>(take));
          pos += take;
        }
        sums[i] = xxh3(flat + lo, hi - lo, seeds[j]);
        continue;
      }
      XXH3_64bits_reset_withSeed(&st, seeds[j]);
      for (std::int64_t pos = lo, k = s; pos < hi;) {
        while (at[k] + static_cast<std::int64_t>(seg_len[k]) <= pos) ++k;
        const std::int64_t take = std::min(hi, at[k] + static_cast<std::int64_t>(seg_len[k])) - pos;
        std::memcpy(seg_at(k, pos), flat + pos, static_cast<std::size_t>(take));
        XXH3_64bits_update_dispatch(&st, seg_at(k, pos), static_cast<std::size_t>(take));
        pos += take;
      }
      sums[i] = XXH3_64bits_digest(&st);
    }
  });
}

}  // namespace kvs
