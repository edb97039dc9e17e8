// pybind11 bindings: kvstore._native. Every function takes raw addresses and
// byte counts (no torch, no NumPy ABI), releases the GIL while copying, and
// raises ValueError (mapped to kvstore.errors.InvalidArgument by
// kvstore/kernels/cpu.py) before touching memory when an argument is off.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "paged_copy.h"
#ifdef KVS_HAVE_XXHASH
#include "checksum.h"
#endif

namespace py = pybind11;

namespace {

void paged_copy_py(bool scatter, std::uint64_t chunk, std::int64_t chunk_size,
                   std::uint64_t layer_bases, std::int64_t n_layers, std::uint64_t ids,
                   std::uint64_t pos, std::int64_t n_ids, std::int64_t chunk_blocks,
                   std::int64_t num_blocks,
                   std::int64_t block_stride, std::int64_t block_tokens, std::int64_t num_tokens,
                   std::int64_t kv_count, std::int64_t kv_src, std::int64_t kv_dst,
                   std::int64_t tok_merge, std::int64_t tok_src, std::int64_t tok_dst,
                   std::int64_t head_count, std::int64_t head_src, std::int64_t head_dst,
                   std::int64_t run, std::int64_t blk_dst, std::int64_t layer_dst, int threads) {
  kvs::PagedPlan p;
  p.chunk = reinterpret_cast<std::uint8_t*>(chunk);
  p.chunk_size = chunk_size;
  p.layer_bases = reinterpret_cast<const std::uint64_t*>(layer_bases);
  p.n_layers = n_layers;
  p.ids = reinterpret_cast<const std::int64_t*>(ids);
  p.pos = reinterpret_cast<const std::int64_t*>(pos);
  p.n_ids = n_ids;
  p.chunk_blocks = chunk_blocks;
  p.num_blocks = num_blocks;
  p.block_stride = block_stride;
  p.block_tokens = block_tokens;
  p.num_tokens = num_tokens;
  p.kv_count = kv_count;
  p.kv_src = kv_src;
  p.kv_dst = kv_dst;
  p.tok_merge = tok_merge;
  p.tok_src = tok_src;
  p.tok_dst = tok_dst;
  p.head_count = head_count;
  p.head_src = head_src;
  p.head_dst = head_dst;
  p.run = run;
  p.blk_dst = blk_dst;
  p.layer_dst = layer_dst;
  kvs::validate(p);  // with the GIL held: errors surface before any copy
  py::gil_scoped_release nogil;
  kvs::paged_copy(p, scatter, threads);
}

void copy_py(std::uint64_t dst, std::uint64_t src, std::int64_t nbytes, int threads) {
  if (nbytes < 0) throw std::invalid_argument("copy: negative byte count");
  if (nbytes == 0) return;
  if (dst == 0 || src == 0) throw std::invalid_argument("copy: null address");
  py::gil_scoped_release nogil;
  kvs::parallel_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                     static_cast<std::size_t>(nbytes), threads);
}

#ifdef KVS_HAVE_XXHASH
void block_sums_py(std::uint64_t dst, std::uint64_t src, std::int64_t nbytes, std::uint64_t seed,
                   std::uint64_t sums, std::int64_t block, int threads) {
  if (nbytes > 0 && src == 0) throw std::invalid_argument("block_sums: null source");
  if (sums == 0) throw std::invalid_argument("block_sums: null output");
  if (nbytes < 0 || block <= 0) throw std::invalid_argument("block_sums: negative size or non-positive block");
  py::gil_scoped_release nogil;
  kvs::block_sums(reinterpret_cast<std::uint8_t*>(dst), reinterpret_cast<const std::uint8_t*>(src), nbytes,
                  seed, reinterpret_cast<std::uint64_t*>(sums), block, threads);
}

void block_sums_scatter_py(std::uint64_t src, std::int64_t nbytes, std::uint64_t seg_addr, std::uint64_t seg_len,
                           std::int64_t n_segs, std::uint64_t seed, std::uint64_t sums, std::int64_t block,
                           int threads) {
  if (nbytes > 0 && (src == 0 || seg_addr == 0 || seg_len == 0))
    throw std::invalid_argument("block_sums_scatter: null address");
  if (sums == 0) throw std::invalid_argument("block_sums_scatter: null output");
  if (nbytes < 0 || block <= 0 || n_segs < 0)
    throw std::invalid_argument("block_sums_scatter: negative size or non-positive block");
  const auto* addr = reinterpret_cast<const std::uint64_t*>(seg_addr);
  const auto* len = reinterpret_cast<const std::uint64_t*>(seg_len);
  std::uint64_t total = 0;
  for (std::int64_t i = 0; i < n_segs; ++i) {
    if (addr[i] == 0 || len[i] == 0) throw std::invalid_argument("block_sums_scatter: empty or null segment");
    total += len[i];
  }
  if (total != static_cast<std::uint64_t>(nbytes))
    throw std::invalid_argument("block_sums_scatter: segments do not add up to the source");
  py::gil_scoped_release nogil;
  kvs::block_sums_scatter(reinterpret_cast<const std::uint8_t*>(src), nbytes, addr, len, n_segs, seed,
                          reinterpret_cast<std::uint64_t*>(sums), block, threads);
}

void block_sums_batch_py(std::uint64_t src, std::uint64_t len, std::uint64_t seg_begin, std::uint64_t seg_addr,
                         std::uint64_t seg_len, std::uint64_t seeds, std::int64_t n_jobs, std::uint64_t sums,
                         std::int64_t block, int threads, bool gather) {
  if (n_jobs < 0 || block <= 0) throw std::invalid_argument("block_sums_batch: negative job count or block");
  if (n_jobs == 0) return;
  if (src == 0 || len == 0 || seg_begin == 0 || seg_addr == 0 || seg_len == 0 || seeds == 0 || sums == 0)
    throw std::invalid_argument("block_sums_batch: null array");
  const auto* srcs = reinterpret_cast<const std::uint64_t*>(src);
  const auto* begin = reinterpret_cast<const std::int64_t*>(seg_begin);
  const auto* addr = reinterpret_cast<const std::uint64_t*>(seg_addr);
  const auto* lens = reinterpret_cast<const std::uint64_t*>(seg_len);
  if (begin[0] != 0) throw std::invalid_argument("block_sums_batch: seg_begin must start at 0");
  for (std::int64_t j = 0; j < n_jobs; ++j) {
    if (srcs[j] == 0) throw std::invalid_argument("block_sums_batch: null source");
    if (begin[j + 1] < begin[j]) throw std::invalid_argument("block_sums_batch: seg_begin must not decrease");
  }
  for (std::int64_t k = 0; k < begin[n_jobs]; ++k)
    if (addr[k] == 0 || lens[k] == 0) throw std::invalid_argument("block_sums_batch: empty or null segment");
  py::gil_scoped_release nogil;
  kvs::block_sums_batch(srcs, reinterpret_cast<const std::int64_t*>(len), begin, addr, lens,
                        reinterpret_cast<const std::uint64_t*>(seeds), n_jobs,
                        reinterpret_cast<std::uint64_t*>(sums), block, threads, gather);
}
#endif

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kvstore native kernels: paged KV gather/scatter and parallel memcpy (host memory).";
  m.attr("ABI_VERSION") = 2;  // kvstore.checksum.NATIVE_ABI
  m.def("paged_copy", &paged_copy_py, py::kw_only(), py::arg("scatter"), py::arg("chunk"),
        py::arg("chunk_size"), py::arg("layer_bases"), py::arg("n_layers"), py::arg("ids"),
        py::arg("pos"), py::arg("n_ids"), py::arg("chunk_blocks"), py::arg("num_blocks"), py::arg("block_stride"),
        py::arg("block_tokens"), py::arg("num_tokens"), py::arg("kv_count"), py::arg("kv_src"),
        py::arg("kv_dst"), py::arg("tok_merge"), py::arg("tok_src"), py::arg("tok_dst"),
        py::arg("head_count"), py::arg("head_src"), py::arg("head_dst"), py::arg("run"),
        py::arg("blk_dst"), py::arg("layer_dst"), py::arg("threads"),
        "Gather (scatter=False) or scatter one paged plan; see csrc/paged_copy.h.");
  m.def("copy", &copy_py, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("threads"),
        "memcpy of nbytes from src to dst over up to `threads` threads (GIL released).");
  m.def("hardware_threads", &kvs::hardware_threads, "std::thread::hardware_concurrency().");
#ifdef KVS_HAVE_XXHASH
  m.def("block_sums", &block_sums_py, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("seed"),
        py::arg("sums"), py::arg("block"), py::arg("threads"),
        "XXH3-64 (seeded) of every `block` bytes of src, copying to dst first when dst != 0 "
        "(GIL released; kvstore.checksum's format).");
  m.def("block_sums_scatter", &block_sums_scatter_py, py::arg("src"), py::arg("nbytes"), py::arg("seg_addr"),
        py::arg("seg_len"), py::arg("n_segs"), py::arg("seed"), py::arg("sums"), py::arg("block"),
        py::arg("threads"),
        "Copy nbytes of src into the segments (uint64 address and length arrays) back to back; "
        "the XXH3-64 (seeded) of every `block` bytes of what landed (GIL released).");
  m.def("block_sums_batch", &block_sums_batch_py, py::arg("src"), py::arg("len"), py::arg("seg_begin"),
        py::arg("seg_addr"), py::arg("seg_len"), py::arg("seeds"), py::arg("n_jobs"), py::arg("sums"),
        py::arg("block"), py::arg("threads"), py::arg("gather") = false,
        "block_sums_scatter for many jobs (addresses of int64/uint64 arrays) in one pass over "
        "up to `threads` threads; gather=True copies the segments into src instead; see "
        "csrc/checksum.h (GIL released).");
#endif
}
