// Fused elementwise kernels for one decoder layer on CPU: residual add + RMSNorm, SiLU(gate) * up
// on the fused gate_up output, and the rotary embedding applied to q and k in place.
//
// Why: a decode step of a small model is bound by the number of torch ops, not by their bytes
// (each op costs a dispatch, an allocation and a pass over memory). RMSNorm with its residual add
// is ~8 torch ops, rotary ~10, the gated activation 3; each is one call here.
//
// Numerics: every kernel reproduces the reference's arithmetic operation by operation, so the
// fused model is bit-identical to the torch-ops model (and stays token-identical to transformers):
// * RMSNorm sums the squares in the exact order of torch's CPU sum (ATen SumKernel.cpp: a cascade
//   over 4 interleaved accumulators of `lanes`-wide vectors, then the scalar tail, then the lanes),
//   divides by n, adds eps, takes 1 / sqrt, then casts and multiplies as transformers' LlamaRMSNorm.
//   `lanes` is the width of torch's sum kernel, found by cpu_kernels.py's load-time self-check
//   (torch 2.13 runs its 8-lane AVX2 sum even where its other kernels use AVX-512).
// * SiLU uses the exp torch's vectorized kernel uses (SLEEF's 1-ulp expf) on the elements torch
//   vectorizes and std::exp on its scalar tail.
// * Every intermediate the reference rounds to bf16/fp16 is rounded here too.
// The library is built with -ffp-contract=off: a fused multiply-add would round once where torch
// rounds twice.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>
#endif

namespace {

// torch's vector ISA, as the Python side reads it from torch.backends.cpu.get_cpu_capability().
enum Isa : int64_t { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t compiled_isa() {
#if defined(__AVX512F__)
  return kAvx512;
#elif defined(__AVX2__)
  return kAvx2;
#else
  return kDefault;
#endif
}

// Work below this many elements runs on the calling thread: at batch 1 a fork/join costs more
// than the whole kernel.
constexpr int64_t kParallelElements = 1 << 15;

inline int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, kParallelElements / row_elements); }

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);  // float: identity; BFloat16/Half: round to nearest even, as torch
}

inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// Sum of h[i]^2 over W-wide units (W floats each), `count` units, in the order of ATen's row_sum
// with ilp_factor 4 over multi_row_sum's 4-level cascade. result: the W lanes of partial_sums[0].
template <int W>
void row_sum_squares(const float* h, int64_t count, float* result) {
  constexpr int kLevels = 4, kRows = 4;
  float acc[kLevels][kRows][W] = {};
  const int64_t size = count / kRows;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  auto add_unit = [&](float* into, int64_t unit) {
    const float* u = h + unit * W;
    for (int l = 0; l < W; ++l) into[l] += u[l] * u[l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kRows; ++k) add_unit(acc[0][k], i * kRows + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kRows; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < kRows; ++k) add_unit(acc[0][k], i * kRows + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kRows; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t unit = size * kRows; unit < count; ++unit) add_unit(acc[0][0], unit);
  for (int k = 1; k < kRows; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  std::copy(acc[0][0], acc[0][0] + W, result);
}

// torch's CPU sum of h^2 over a contiguous row of n floats (the `pow(2).mean(-1)` of RMSNorm).
template <int W>
float sum_squares(const float* h, int64_t n) {
  if (n < W) {  // scalar_inner_sum
    float total;
    row_sum_squares<1>(h, n, &total);
    return total;
  }
  const int64_t vectors = n / W;  // vectorized_inner_sum
  float lanes[W];
  row_sum_squares<W>(h, vectors, lanes);
  float total = 0.f;
  for (int64_t k = vectors * W; k < n; ++k) total += h[k] * h[k];
  for (int l = 0; l < W; ++l) total += lanes[l];
  return total;
}

// One row: residual (if any) += x in place, then out = weight * (h * rsqrt(mean(h^2) + eps)) with
// h = the new residual (or x) in fp32, cast back to T before the weight multiply.
template <typename T, int W>
void rms_norm_row(const T* x, T* residual, const T* weight, float eps, int64_t n, T* out, std::vector<float>& h) {
  h.resize(n);
  if (residual != nullptr) {
    for (int64_t e = 0; e < n; ++e) {
      const T sum = round_to<T>(static_cast<float>(x[e]) + static_cast<float>(residual[e]));
      residual[e] = sum;
      h[e] = static_cast<float>(sum);
    }
  } else {
    for (int64_t e = 0; e < n; ++e) h[e] = static_cast<float>(x[e]);
  }
  const float variance = sum_squares<W>(h.data(), n) / static_cast<float>(n);
  const float inv = 1.f / std::sqrt(variance + eps);
  for (int64_t e = 0; e < n; ++e)
    out[e] = round_to<T>(static_cast<float>(weight[e]) * static_cast<float>(round_to<T>(h[e] * inv)));
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

// exp as torch's vectorized float kernels compute it on this ISA.
template <int64_t I>
inline void vector_exp(const float* in, float* out) {
#if defined(__AVX512F__)
  if constexpr (I == kAvx512) {
    _mm512_storeu_ps(out, Sleef_expf16_u10(_mm512_loadu_ps(in)));
    return;
  }
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
  if constexpr (I == kAvx2) {
    _mm256_storeu_ps(out, Sleef_expf8_u10(_mm256_loadu_ps(in)));
    return;
  }
#endif
  for (int l = 0; l < 8; ++l) out[l] = std::exp(in[l]);  // the generic Vectorized<float>: map(std::exp)
}

// SiLU(gate) * up over one row of n, as `F.silu(gate) * up`: torch's vectorized loop covers whole
// pairs of its vectors (Vectorized<T>) and leaves the rest to the scalar formula.
template <typename T, int64_t I>
void silu_mul_row(const T* gate, const T* up, int64_t n, T* out) {
  constexpr int W = I == kAvx512 ? 16 : 8;                        // floats per exp call
  constexpr int64_t kChunk = 2 * (W * 4 / sizeof(T));             // 2 x Vectorized<T>::size()
  const int64_t vectorized = n / kChunk * kChunk;
  int64_t start = 0;
#if defined(__AVX512F__)
  if constexpr (I == kAvx512 && std::is_same_v<T, float>) {  // the common case, in registers
    const __m512 one = _mm512_set1_ps(1.f), sign = _mm512_set1_ps(-0.f);
    for (; start < vectorized; start += 16) {
      const __m512 g = _mm512_loadu_ps(gate + start);
      const __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_xor_ps(g, sign))));
      _mm512_storeu_ps(out + start, _mm512_mul_ps(act, _mm512_loadu_ps(up + start)));
    }
  }
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
  if constexpr (I == kAvx2 && std::is_same_v<T, float>) {
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; start < vectorized; start += 8) {
      const __m256 g = _mm256_loadu_ps(gate + start);
      const __m256 act = _mm256_div_ps(g, _mm256_add_ps(one, Sleef_expf8_u10(_mm256_xor_ps(g, sign))));
      _mm256_storeu_ps(out + start, _mm256_mul_ps(act, _mm256_loadu_ps(up + start)));
    }
  }
#endif
  float neg[W], e[W];
  for (int64_t i = start; i < vectorized; i += W) {
    for (int l = 0; l < W; ++l) neg[l] = -static_cast<float>(gate[i + l]);
    vector_exp<I>(neg, e);
    for (int l = 0; l < W; ++l) {
      const T act = round_to<T>(static_cast<float>(gate[i + l]) / (1.f + e[l]));
      out[i + l] = round_to<T>(static_cast<float>(act) * static_cast<float>(up[i + l]));
    }
  }
  for (int64_t i = vectorized; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const T act = round_to<T>(g / (1.f + std::exp(-g)));
    out[i] = round_to<T>(static_cast<float>(act) * static_cast<float>(up[i]));
  }
}

// x [heads, D] (row stride `head_stride`) rotated in place, rotate-half convention.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t head_stride, int64_t half, const T* cos, const T* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x1 = x + h * head_stride;
    T* x2 = x1 + half;
    for (int64_t d = 0; d < half; ++d) {
      const float a = static_cast<float>(x1[d]), b = static_cast<float>(x2[d]);
      const float c = static_cast<float>(cos[d]), s = static_cast<float>(sin[d]);
      // torch: (x1 * cos) - (x2 * sin), (x2 * cos) + (x1 * sin), each product rounded to T
      const float ac = static_cast<float>(round_to<T>(a * c)), bs = static_cast<float>(round_to<T>(b * s));
      const float bc = static_cast<float>(round_to<T>(b * c)), as = static_cast<float>(round_to<T>(a * s));
      x1[d] = round_to<T>(ac - bs);
      x2[d] = round_to<T>(bc + as);
    }
  }
}

}  // namespace

// x [.., n]; residual: None or x's shape, updated in place to x + residual; weight [n]
// -> the normed rows, x's shape. lanes: torch's float vector width (1 = no vector path).
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps, int64_t lanes) {
  check_rows(x, "x");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == x.scalar_type(),
              "weight must be [n] in x's dtype");
  TORCH_CHECK(lanes == 8 || lanes == 16, "lanes must be 8 or 16");
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                residual->scalar_type() == x.scalar_type(), "residual must be a contiguous tensor like x");
  }
  auto out = at::empty_like(xc);
  const int64_t rows = xc.numel() / std::max<int64_t>(n, 1);
  const float epsf = static_cast<float>(eps);  // torch adds the Python float as the tensor's float
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> h;
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row_residual = rp == nullptr ? nullptr : rp + r * n;
        if (lanes == 16) {
          rms_norm_row<scalar_t, 16>(xp + r * n, row_residual, wp, epsf, n, op + r * n, h);
        } else {
          rms_norm_row<scalar_t, 8>(xp + r * n, row_residual, wp, epsf, n, op + r * n, h);
        }
      }
    });
  });
  return out;
}

// gate_up [T, 2I] (gate then up, rows contiguous) -> SiLU(gate) * up, [T, I]. isa: torch's (Isa).
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "gate_up must hold gate and up halves");
  TORCH_CHECK(isa >= kDefault && isa <= compiled_isa(), "this build cannot reproduce torch's ISA ", isa);
  const auto gu = gate_up.contiguous();
  const int64_t n = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(2 * n, 1);
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* in = gu.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = in + r * 2 * n;
        if (isa == kAvx512) {
          silu_mul_row<scalar_t, kAvx512>(gate, gate + n, n, op + r * n);
        } else if (isa == kAvx2) {
          silu_mul_row<scalar_t, kAvx2>(gate, gate + n, n, op + r * n);
        } else {
          silu_mul_row<scalar_t, kDefault>(gate, gate + n, n, op + r * n);
        }
      }
    });
  });
  return out;
}

// q [T, H, D], k [T, KVH, D] (any token/head strides, D contiguous): rotated in place by
// cos, sin [T, 1, D/2] (contiguous, q's dtype).
void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q and k must be [T, heads, D] with the same T and D");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "q and k must be contiguous in D");
  const int64_t tokens = q.size(0), dim = q.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && cos.numel() == tokens * half && sin.numel() == tokens * half,
              "cos and sin must be [T, 1, D/2]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos and sin must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() &&
              sin.scalar_type() == q.scalar_type(), "q, k, cos and sin must share a dtype");
  const int64_t per_token = (q.size(1) + k.size(1)) * dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(per_token), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_heads(qp + t * q.stride(0), q.size(1), q.stride(1), half, cp + t * half, sp + t * half);
        rotate_heads(kp + t * k.stride(0), k.size(1), k.stride(1), half, cp + t * half, sp + t * half);
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &compiled_isa, "the widest torch ISA this build can reproduce (0 default, 1 avx2, 2 avx512)");
  m.def("rms_norm", &rms_norm, "residual add (in place) + RMSNorm", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"), py::arg("lanes"));
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up on a fused gate_up", py::arg("gate_up"), py::arg("isa"));
  m.def("rotary_", &rotary_, "rotary embedding on q and k in place");
}
