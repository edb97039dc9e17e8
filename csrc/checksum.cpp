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

#include <xxhash.h>
#include <xxh_x86dispatch.h>

#include <algorithm>
#include <cstring>
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
        sums[i] = have_avx2() ? copy_xxh3_avx2(dst + lo, src + lo, static_cast<std::size_t>(len), seed)
                              : (std::memcpy(dst + lo, src + lo, static_cast<std::size_t>(len)),
                                 xxh3(dst + lo, len, seed));
      } else {
        sums[i] = xxh3(src + lo, len, seed);
      }
    }
  });
}

}  // namespace kvs
