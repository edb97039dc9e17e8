// Paged KV gather/scatter and a parallel memcpy on host memory.
// See paged_copy.h for the loop nest; the pool below keeps threads warm so a
// one-layer gather (~1 MiB) does not pay thread start-up on every call.
#include "paged_copy.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kvs {
namespace {

constexpr int kMaxThreads = 64;
// Below this many bytes per thread, extra threads cost more than they bring:
// waking a pooled worker takes tens of microseconds on a busy 2-vCPU VM, and
// one thread already moves ~1 MiB (a layer of a 256-token chunk) in ~150 us.
constexpr std::int64_t kMinBytesPerThread = 2 * 1024 * 1024;
constexpr std::int64_t kLimit = std::int64_t{1} << 52;

class Pool {
 public:
  // Runs fn(t) for t in [0, n): the caller runs t = 0, workers the rest.
  // Returns false without running anything when another call holds the pool.
  bool try_run(int n, const std::function<void(int)>& fn) {
    if (!call_mu_.try_lock()) return false;
    std::lock_guard<std::mutex> call(call_mu_, std::adopt_lock);
    grow(n - 1);
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = &fn;
      job_n_ = n;
      pending_ = n - 1;
      ++gen_;
    }
    cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> g(mu_);
    done_cv_.wait(g, [this] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  // Called with call_mu_ held, before the job's generation is published: a new
  // worker starts from the current generation, so it cannot miss that job.
  void grow(int workers) {
    std::uint64_t gen;
    {
      std::lock_guard<std::mutex> g(mu_);
      gen = gen_;
    }
    while (static_cast<int>(workers_.size()) < workers) {
      int idx = static_cast<int>(workers_.size());
      workers_.emplace_back([this, idx, gen] { loop(idx, gen); });
      workers_.back().detach();  // the pool is never destroyed (see get_pool)
    }
  }

  void loop(int idx, std::uint64_t seen) {
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return gen_ != seen; });
        seen = gen_;
        if (idx + 1 < job_n_) job = job_;
      }
      if (job == nullptr) continue;
      (*job)(idx + 1);
      std::lock_guard<std::mutex> g(mu_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int job_n_ = 0;
  int pending_ = 0;
  std::uint64_t gen_ = 0;
  std::vector<std::thread> workers_;
};

// The pool is leaked on purpose: joining detached workers at interpreter exit
// is impossible, and after fork() the child has none of the parent's threads,
// so it gets a fresh pool (the old one, with possibly locked mutexes, is never touched).
Pool& get_pool() {
  static std::atomic<Pool*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex mu;
  pid_t me = getpid();
  Pool* p = pool.load(std::memory_order_acquire);
  if (p != nullptr && owner.load(std::memory_order_acquire) == me) return *p;
  std::lock_guard<std::mutex> g(mu);
  p = pool.load(std::memory_order_acquire);
  if (p == nullptr || owner.load() != me) {
    p = new Pool();
    owner.store(me, std::memory_order_release);
    pool.store(p, std::memory_order_release);
  }
  return *p;
}

// fn(t, begin, end) over [0, items) split into n contiguous ranges.
void parallel_ranges(std::int64_t items, int n,
                     const std::function<void(std::int64_t, std::int64_t)>& fn) {
  n = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(n, items)));
  if (n == 1) {
    fn(0, items);
    return;
  }
  auto part = [&](int t) {
    std::int64_t b = items * t / n, e = items * (t + 1) / n;
    if (b < e) fn(b, e);
  };
  if (!get_pool().try_run(n, part)) fn(0, items);
}

void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check_range(const char* name, std::int64_t v, std::int64_t lo, std::int64_t hi) {
  if (v < lo || v > hi)
    fail(std::string("paged_copy: ") + name + "=" + std::to_string(v) + " outside [" +
         std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

std::int64_t block_end(const PagedPlan& p, std::int64_t pos, std::int64_t nt) {
  std::int64_t last = ((nt - 1) / p.tok_merge) * p.tok_merge;
  std::int64_t first_m = std::min(p.tok_merge, nt);
  std::int64_t base = pos * p.blk_dst + (p.kv_count - 1) * p.kv_dst + (p.head_count - 1) * p.head_dst;
  return base + std::max(p.run * first_m, last * p.tok_dst + p.run * (nt - last));
}

template <std::int64_t RUN, bool SCATTER>
void copy_items(const PagedPlan& p, std::int64_t begin, std::int64_t end) {
  for (std::int64_t item = begin; item < end; ++item) {
    const std::int64_t l = item / p.n_ids, i = item % p.n_ids;
    const std::int64_t pos = p.pos ? p.pos[i] : i;
    auto* eng = reinterpret_cast<std::uint8_t*>(p.layer_bases[l]) + p.ids[i] * p.block_stride;
    std::uint8_t* chk = p.chunk + l * p.layer_dst + pos * p.blk_dst;
    const std::int64_t nt = std::min(p.block_tokens, p.num_tokens - pos * p.block_tokens);
    for (std::int64_t kv = 0; kv < p.kv_count; ++kv) {
      for (std::int64_t t = 0; t < nt; t += p.tok_merge) {
        const std::int64_t n = (RUN > 0) ? RUN : p.run * std::min(p.tok_merge, nt - t);
        std::uint8_t* e = eng + kv * p.kv_src + t * p.tok_src;
        std::uint8_t* c = chk + kv * p.kv_dst + t * p.tok_dst;
        for (std::int64_t h = 0; h < p.head_count; ++h) {
          if (SCATTER)
            std::memcpy(e + h * p.head_src, c + h * p.head_dst, n);
          else
            std::memcpy(c + h * p.head_dst, e + h * p.head_src, n);
        }
      }
    }
  }
}

template <bool SCATTER>
void copy_dispatch(const PagedPlan& p, std::int64_t b, std::int64_t e) {
  // Fixed-size memcpy compiles to inline vector moves: HND layouts copy one
  // head_dim run (128-256 B) at a time, where a libc call per run would dominate.
  if (p.tok_merge == 1) {
    switch (p.run) {
      case 64: return copy_items<64, SCATTER>(p, b, e);
      case 128: return copy_items<128, SCATTER>(p, b, e);
      case 256: return copy_items<256, SCATTER>(p, b, e);
      case 512: return copy_items<512, SCATTER>(p, b, e);
      case 1152: return copy_items<1152, SCATTER>(p, b, e);  // MLA 576 x 2 B
      default: break;
    }
  }
  copy_items<0, SCATTER>(p, b, e);
}

}  // namespace

void validate(const PagedPlan& p) {
  if (p.chunk == nullptr || p.layer_bases == nullptr || p.ids == nullptr)
    fail("paged_copy: null chunk, layer base or id pointer");
  check_range("n_layers", p.n_layers, 1, kLimit);
  check_range("n_ids", p.n_ids, 1, kLimit);
  check_range("num_blocks", p.num_blocks, 1, kLimit);
  check_range("block_tokens", p.block_tokens, 1, kLimit);
  check_range("chunk_blocks", p.chunk_blocks, p.pos ? 1 : p.n_ids, p.pos ? kLimit : p.n_ids);
  check_range("num_tokens", p.num_tokens, (p.chunk_blocks - 1) * p.block_tokens + 1,
              p.chunk_blocks * p.block_tokens);
  check_range("kv_count", p.kv_count, 1, 2);
  check_range("tok_merge", p.tok_merge, 1, p.block_tokens);
  check_range("head_count", p.head_count, 1, kLimit);
  check_range("run", p.run, 1, kLimit);
  for (std::int64_t v : {p.kv_dst, p.tok_dst, p.head_dst, p.blk_dst, p.layer_dst})
    check_range("chunk stride", v, 0, kLimit);
  for (std::int64_t v : {p.block_stride, p.kv_src, p.tok_src, p.head_src})
    check_range("engine stride", v, -kLimit, kLimit);
  for (std::int64_t l = 0; l < p.n_layers; ++l)
    if (p.layer_bases[l] == 0) fail("paged_copy: layer " + std::to_string(l) + " has a null base");
  for (std::int64_t i = 0; i < p.n_ids; ++i) {
    if (p.ids[i] < 0 || p.ids[i] >= p.num_blocks)
      fail("paged_copy: block id " + std::to_string(p.ids[i]) + " at index " + std::to_string(i) +
           " outside [0, " + std::to_string(p.num_blocks) + ")");
    if (p.pos && (p.pos[i] < 0 || p.pos[i] >= p.chunk_blocks))
      fail("paged_copy: chunk position " + std::to_string(p.pos[i]) + " out of range");
  }
  std::int64_t last_nt = p.num_tokens - (p.chunk_blocks - 1) * p.block_tokens;
  std::int64_t need = (p.n_layers - 1) * p.layer_dst +
                      std::max(block_end(p, 0, std::min(p.block_tokens, p.num_tokens)),
                               block_end(p, p.chunk_blocks - 1, last_nt));
  if (need > p.chunk_size)
    fail("paged_copy: chunk buffer holds " + std::to_string(p.chunk_size) + " bytes, " +
         std::to_string(need) + " needed");
}

void paged_copy(const PagedPlan& p, bool scatter, int threads) {
  validate(p);
  const std::int64_t items = p.n_layers * p.n_ids;
  const std::int64_t bytes = p.layer_dst * p.n_layers;
  int n = std::clamp(threads, 1, kMaxThreads);
  n = static_cast<int>(std::min<std::int64_t>(n, 1 + bytes / kMinBytesPerThread));
  parallel_ranges(items, n, [&](std::int64_t b, std::int64_t e) {
    if (scatter)
      copy_dispatch<true>(p, b, e);
    else
      copy_dispatch<false>(p, b, e);
  });
}

void parallel_copy(void* dst, const void* src, std::size_t n, int threads) {
  constexpr std::int64_t kGrain = 64 * 1024;  // keep split points cache-line aligned
  const std::int64_t grains = (static_cast<std::int64_t>(n) + kGrain - 1) / kGrain;
  int t = std::clamp(threads, 1, kMaxThreads);
  t = static_cast<int>(std::min<std::int64_t>(t, 1 + static_cast<std::int64_t>(n) / kMinBytesPerThread));
  auto* d = static_cast<std::uint8_t*>(dst);
  const auto* s = static_cast<const std::uint8_t*>(src);
  parallel_ranges(grains, t, [&](std::int64_t b, std::int64_t e) {
    std::int64_t lo = b * kGrain, hi = std::min<std::int64_t>(e * kGrain, static_cast<std::int64_t>(n));
    std::memcpy(d + lo, s + lo, static_cast<std::size_t>(hi - lo));
  });
}

void for_ranges(std::int64_t items, int threads,
                const std::function<void(std::int64_t, std::int64_t)>& fn) {
  parallel_ranges(items, std::clamp(threads, 1, kMaxThreads), fn);
}

int hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

}  // namespace kvs
