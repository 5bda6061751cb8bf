// Attention for every token of a step (prompt chunks and decode rows alike) reading K/V straight
// from the paged cache.
//
// Why a kernel: on CPU, torch's SDPA needs the K/V of every sequence gathered into a padded
// contiguous copy first, and its flash kernel is tuned for long query blocks, not one token. At
// batch 32 the gather plus SDPA took about half of a decode step (shard/cpu_kernels.py has the
// numbers). Here each sequence reads its K/V rows in place, and each kv head serves every query
// head of its GQA group from them.
//
// Why prompt tokens too: one arithmetic per query row. A row's result depends only on its query
// and the K/V it attends to, never on how many rows share the step, where a chunk starts or which
// prefix came from the cache (SDPA's flash kernel sums in an order set by its block sizes, so a
// cached prefix changed greedy outputs). Rows of one sequence are taken in tiles so that each K/V
// row read from memory serves the whole tile; the per-row operations and their order are the same
// whatever the tile size.
//
// Two passes over the keys (scores, then a softmax-weighted sum of the values), accumulating in
// float whatever the cache dtype, with arithmetic fixed per element (see exp_nonpositive). Built once per machine by shard/cpu_kernels.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
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

// Every sum below has one fixed order per output element: a dot product is eight lanes (d % 8),
// each a chain of fused multiply-adds from d = 0 up (std::fma rounds once, in a vector register or
// in scalar code alike), added in a fixed tree; the softmax denominator uses fixed lanes too; the
// weighted sum of values is an fma chain over positions. So the bits of one element do not depend
// on how the compiler vectorized a loop, where a remainder starts, how many rows the tile holds or
// which x86 CPU ran it.
constexpr int kLanes = 8;

inline float lane_tree(const float* lane) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// e^x for x <= 0 (a softmax's shifted scores): Cephes' expf, written with fma, a rounding trick
// and a shift only, so that its AVX2 twin below agrees with it to the bit (libm's expf and its
// vector twin do not). Below -87 the result is e^-87, negligible next to the row maximum's 1.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float k = std::fma(x, 1.44269504088896341f, 12582912.f) - 12582912.f;  // round(x / ln 2)
  float r = std::fma(k, -0.693359375f, x);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// The same operations as the scalar code below, eight lanes at a time (the scalar forms are the
// fallback for CPUs without AVX2/FMA and, on every CPU, for the elements past the last full 8).
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // as `x < -87 ? -87 : x`, NaN included
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

inline void exp_shifted(float* s, int64_t len, float top) {  // s[t] = e^(s[t] - top)
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; t + kLanes <= len; t += kLanes)
    _mm256_storeu_ps(s + t, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top))));
#endif
  for (; t < len; ++t) s[t] = exp_nonpositive(s[t] - top);
}

// out[i] = queries[i] . key for NQ queries at once: NQ independent chains hide the fma latency.
template <int NQ>
inline void dots(const float* const* queries, const float* key, int64_t dim, float* const* out) {
  float lane[NQ][kLanes] = {};
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[NQ];
  for (int i = 0; i < NQ; ++i) acc[i] = _mm256_setzero_ps();
  for (; d + kLanes <= dim; d += kLanes) {
    const __m256 k = _mm256_loadu_ps(key + d);
    for (int i = 0; i < NQ; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(queries[i] + d), k, acc[i]);
  }
  if (d == dim) {  // lane_tree's order: (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then (0 + 2, 1 + 3), then 0 + 1
    for (int i = 0; i < NQ; ++i) {
      const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
      const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
      *out[i] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
    }
    return;
  }
  for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(lane[i], acc[i]);
#endif
  for (; d + kLanes <= dim; d += kLanes)
    for (int i = 0; i < NQ; ++i)
      for (int l = 0; l < kLanes; ++l) lane[i][l] = std::fma(queries[i][d + l], key[d + l], lane[i][l]);
  for (int l = 0; d + l < dim; ++l)  // a head dim that is not a multiple of 8
    for (int i = 0; i < NQ; ++i) lane[i][l] = std::fma(queries[i][d + l], key[d + l], lane[i][l]);
  for (int i = 0; i < NQ; ++i) *out[i] = lane_tree(lane[i]);
}

inline void fma_row(float p, const float* value, int64_t dim, float* acc) {  // acc += p * value
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 weight = _mm256_set1_ps(p);
  for (; d + kLanes <= dim; d += kLanes)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < dim; ++d) acc[d] = std::fma(p, value[d], acc[d]);
}

// A cached row as float: fp32 rows are used in place, others converted into `buffer`.
inline const float* as_float(const float* row, int64_t, float*) { return row; }
template <typename T>
inline const float* as_float(const T* row, int64_t dim, float* buffer) {
  for (int64_t d = 0; d < dim; ++d) buffer[d] = static_cast<float>(row[d]);
  return buffer;
}

// Rows [row_begin, row_end) of one sequence, kv heads [kv_begin, kv_end). Row r attends to
// positions [0, lens[r - row_begin]) (ascending along the tile); q and out point at the step's
// [T, H, D]. A tile reads each cached position once per pass for all its rows and query heads.
template <typename T>
void attend_tile(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t row_begin,
                 int64_t row_end, const int64_t* lens, int64_t kv_begin, int64_t kv_end, float scale,
                 const Geometry& g, int64_t heads_total, T* out, std::vector<float>& scratch) {
  const int64_t dim = g.dim, first = kv_begin * g.group, heads = (kv_end - kv_begin) * g.group;
  const int64_t rows = row_end - row_begin, longest = lens[rows - 1];
  scratch.resize(rows * heads * (dim * 2 + longest) + dim);
  float* query = scratch.data();              // [rows, heads, dim], pre-scaled
  float* acc = query + rows * heads * dim;    // [rows, heads, dim]
  float* scores = acc + rows * heads * dim;   // [rows, heads, longest]
  float* row = scores + rows * heads * longest;  // [dim]: one cached K or V row as float
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + (row_begin + r) * heads_total * dim + first * dim;
    for (int64_t i = 0; i < heads * dim; ++i) {
      query[r * heads * dim + i] = static_cast<float>(qr[i]) * scale;
      acc[r * heads * dim + i] = 0.f;
    }
  }
  std::vector<const float*> qs(rows * g.group);
  std::vector<float*> outs(rows * g.group);
  int64_t live = 0;  // first row that attends to position t (lens ascend along the tile)
  for (int64_t t = 0; t < longest; ++t) {
    while (lens[live] <= t) ++live;
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      const float* key = as_float(cached_row(k_cache, table, t, kv, g), dim, row);
      int64_t n = 0;
      for (int64_t r = live; r < rows; ++r) {
        for (int64_t j = 0; j < g.group; ++j, ++n) {
          const int64_t h = (kv - kv_begin) * g.group + j;
          qs[n] = query + (r * heads + h) * dim;
          outs[n] = scores + (r * heads + h) * longest + t;
        }
      }
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) dots<4>(&qs[i], key, dim, &outs[i]);
      switch (n - i) {
        case 3: dots<3>(&qs[i], key, dim, &outs[i]); break;
        case 2: dots<2>(&qs[i], key, dim, &outs[i]); break;
        case 1: dots<1>(&qs[i], key, dim, &outs[i]); break;
        default: break;
      }
    }
  }
  std::vector<float> inv_sum(rows * heads);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t len = lens[r];
    for (int64_t h = 0; h < heads; ++h) {
      float* s = scores + (r * heads + h) * longest;
      const float top = *std::max_element(s, s + len);
      exp_shifted(s, len, top);
      float lane[kLanes] = {};
      int64_t t = 0;
      for (; t + kLanes <= len; t += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += s[t + l];
      for (int l = 0; t < len; ++t, ++l) lane[l] += s[t];
      const float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
      inv_sum[r * heads + h] = 1.f / sum;
    }
  }
  live = 0;
  for (int64_t t = 0; t < longest; ++t) {
    while (lens[live] <= t) ++live;
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      const float* value = as_float(cached_row(v_cache, table, t, kv, g), dim, row);
      for (int64_t r = live; r < rows; ++r) {
        for (int64_t j = 0; j < g.group; ++j) {
          const int64_t h = (kv - kv_begin) * g.group + j;
          const float p = scores[(r * heads + h) * longest + t];
          fma_row(p, value, dim, acc + (r * heads + h) * dim);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + (row_begin + r) * heads_total * dim + first * dim;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < dim; ++d)
        o[h * dim + d] = static_cast<T>(acc[(r * heads + h) * dim + d] * inv_sum[r * heads + h]);
  }
}

struct Item {
  int64_t seq, row_begin, row_end, kv_begin;
};

// Rows of one sequence per work item: more share each K/V row read, fewer keep the tile's scores
// ([rows, heads, kv_len] floats) in L2. Only speed depends on it, never a result.
constexpr int64_t kTileRows = 8;
constexpr int64_t kTileScores = 64 * 1024;

}  // namespace

// q [T, H, D]: the step's tokens, sequence after sequence; k_cache, v_cache [num_blocks,
// block_size, KVH, D] (contiguous, q's dtype); block_tables [S, max_blocks] int32; query_starts
// [S + 1] int32 (sequence s owns rows query_starts[s] .. query_starts[s + 1] - 1, its last rows);
// kv_lens [S] int32: positions sequence s holds once this step's tokens are written, so its row i
// of n attends to kv_len - n + i + 1 positions. -> [T, H, D]
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [T, H, D] and the cache [blocks, block_size, KVH, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == q.size(2), "cache and q shapes disagree");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && kv_lens.scalar_type() == at::kInt &&
                  query_starts.scalar_type() == at::kInt,
              "block_tables, query_starts and kv_lens must be int32");
  const int64_t seqs = block_tables.size(0), tokens = q.size(0), heads = q.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(block_tables.dim() == 2 && kv_lens.numel() == seqs && query_starts.numel() == seqs + 1,
              "one block table, one length and one query start per sequence");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = kv_lens.contiguous();
  const auto starts = query_starts.contiguous();
  const Geometry g{heads / kv_heads, q.size(2), k_cache.size(1), kv_heads * q.size(2)};
  const int64_t max_blocks = tables.size(1), num_blocks = k_cache.size(0);
  const int32_t* table_ptr = tables.data_ptr<int32_t>();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int32_t* start_ptr = starts.data_ptr<int32_t>();
  // Bounds are checked here, once, so the inner loops can trust every index.
  TORCH_CHECK(start_ptr[0] == 0 && start_ptr[seqs] == tokens, "query_starts must run from 0 to the token count");
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t n = start_ptr[s + 1] - start_ptr[s];
    TORCH_CHECK(n >= 1 && n <= len_ptr[s], "every sequence needs 1..kv_len query rows");
    TORCH_CHECK(len_ptr[s] <= max_blocks * g.block_size, "kv length out of range");
    const int64_t used = (len_ptr[s] + g.block_size - 1) / g.block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t block = table_ptr[s * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of range");
    }
  }
  // Work items: tiles of a sequence's rows; with fewer items than threads, (tile, kv head) pairs,
  // so a single stream still uses every core.
  std::vector<Item> items;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t tile = std::clamp<int64_t>(kTileScores / (heads * len_ptr[s]), 1, kTileRows);
    for (int64_t r = start_ptr[s]; r < start_ptr[s + 1]; r += tile)
      items.push_back({s, r, std::min<int64_t>(r + tile, start_ptr[s + 1]), 0});
  }
  const int64_t threads = at::get_num_threads();
  const int64_t split = static_cast<int64_t>(items.size()) < threads ? kv_heads : 1;
  const int64_t span = kv_heads / split;
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t work = static_cast<int64_t>(items.size()) * split;
    // Thread i takes items i, i + threads, ...: a prompt's later tiles attend to more positions,
    // so contiguous ranges would leave the last thread with most of the work.
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      std::vector<int64_t> row_lens(kTileRows);
      for (int64_t lane = begin; lane < end; ++lane) {
        for (int64_t w = lane; w < work; w += threads) {
          const Item& item = items[w / split];
          const int64_t kv_begin = (w % split) * span;
          const int64_t n = start_ptr[item.seq + 1] - start_ptr[item.seq];
          const int64_t base = len_ptr[item.seq] - n - start_ptr[item.seq] + 1;  // row r attends to base + r
          for (int64_t r = item.row_begin; r < item.row_end; ++r) row_lens[r - item.row_begin] = base + r;
          attend_tile<scalar_t>(q_ptr, k_ptr, v_ptr, table_ptr + item.seq * max_blocks, item.row_begin,
                                item.row_end, row_lens.data(), kv_begin, kv_begin + span,
                                static_cast<float>(scale), g, heads, out_ptr, scratch);
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "attention for a step's tokens over a paged K/V cache");
}
