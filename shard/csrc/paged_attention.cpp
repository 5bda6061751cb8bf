// Decode attention (one query token per sequence) reading K/V straight from the paged cache.
//
// Why a kernel: on CPU, torch's SDPA needs the K/V of every sequence gathered into a padded
// contiguous copy first, and its flash kernel is tuned for long query blocks, not one token. At
// batch 32 the gather plus SDPA took about half of a decode step (shard/cpu_kernels.py has the
// numbers). Here each sequence reads its K/V rows once per pass, in place, and each kv head serves every
// query head of its GQA group from them.
//
// Two passes over the keys (scores, then a softmax-weighted sum of the values), accumulating in
// float whatever the cache dtype. Built once per machine by shard/cpu_kernels.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Geometry {
  int64_t group;       // query heads per kv head
  int64_t dim;         // head dim
  int64_t block_size;  // tokens per cache block
  int64_t row_stride;  // elements per cached token: kv_heads * dim
};

template <typename T>
inline const T* cached_row(const T* cache, const int32_t* table, int64_t position, int64_t kv_head,
                           const Geometry& g) {
  const int64_t slot = static_cast<int64_t>(table[position / g.block_size]) * g.block_size + position % g.block_size;
  return cache + slot * g.row_stride + kv_head * g.dim;
}

// One sequence, kv heads [kv_begin, kv_end): q and out point at the sequence's [H, D]. Every
// cached token's row holds all kv heads side by side, so a sequence's rows are read front to back,
// once per pass, instead of once per kv head (3x the DRAM traffic for SmolLM2's 3 kv heads).
template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t len, int64_t kv_begin,
            int64_t kv_end, float scale, const Geometry& g, T* out, std::vector<float>& scratch) {
  const int64_t dim = g.dim, first = kv_begin * g.group, heads = (kv_end - kv_begin) * g.group;
  scratch.resize(heads * dim * 2 + heads * len);
  float* query = scratch.data();       // [heads, dim], pre-scaled
  float* acc = query + heads * dim;    // [heads, dim]
  float* scores = acc + heads * dim;   // [heads, len]
  for (int64_t i = 0; i < heads * dim; ++i) {
    query[i] = static_cast<float>(q[first * dim + i]) * scale;
    acc[i] = 0.f;
  }
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      const T* k = cached_row(k_cache, table, t, kv, g);
      for (int64_t j = 0; j < g.group; ++j) {
        const int64_t h = (kv - kv_begin) * g.group + j;
        const float* qh = query + h * dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dim; ++d) s += qh[d] * static_cast<float>(k[d]);
        scores[h * len + t] = s;
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * len;
    const float top = *std::max_element(s, s + len);
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      const T* v = cached_row(v_cache, table, t, kv, g);
      for (int64_t j = 0; j < g.group; ++j) {
        const int64_t h = (kv - kv_begin) * g.group + j;
        const float p = scores[h * len + t];
        float* a = acc + h * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) a[d] += p * static_cast<float>(v[d]);
      }
    }
  }
  for (int64_t i = 0; i < heads * dim; ++i) out[first * dim + i] = static_cast<T>(acc[i]);
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D] (contiguous, q's dtype);
// block_tables [B, max_blocks] int32; kv_lens [B] int32 (>= 1) -> [B, H, D]
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, H, D] and the cache [blocks, block_size, KVH, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == q.size(2), "cache and q shapes disagree");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && kv_lens.scalar_type() == at::kInt,
              "block_tables and kv_lens must be int32");
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && kv_lens.numel() == batch,
              "one block table and one length per sequence");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = kv_lens.contiguous();
  const Geometry g{heads / kv_heads, q.size(2), k_cache.size(1), kv_heads * q.size(2)};
  const int64_t max_blocks = tables.size(1), num_blocks = k_cache.size(0);
  const int32_t* table_ptr = tables.data_ptr<int32_t>();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  // Bounds are checked here, once, so the inner loops can trust every index.
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_ptr[b] >= 1 && len_ptr[b] <= max_blocks * g.block_size, "kv length out of range");
    const int64_t used = (len_ptr[b] + g.block_size - 1) / g.block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t block = table_ptr[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of range");
    }
  }
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    // Work items are whole sequences; with fewer sequences than threads, (sequence, kv head)
    // pairs, so a single stream still uses every core.
    const int64_t split = batch < at::get_num_threads() ? kv_heads : 1;
    const int64_t span = kv_heads / split;
    at::parallel_for(0, batch * split, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / split, kv_begin = (item % split) * span;
        const int64_t offset = b * heads * g.dim;
        attend<scalar_t>(q_ptr + offset, k_ptr, v_ptr, table_ptr + b * max_blocks, len_ptr[b], kv_begin,
                         kv_begin + span, static_cast<float>(scale), g, out_ptr + offset, scratch);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged K/V cache");
}
