// CPU kernels for the memory-bound parts of decoding, built on first use by
// cpu_kernels.py (torch.utils.cpp_extension). Requires AVX512-BF16.
//
// skinny_linear_bf16: y = x @ w.T for few rows of x (decode steps). Every weight row is
// read from memory exactly once per call: a tile of TILE_N rows stays in L1 while all M
// rows of x are multiplied by it, so the kernel streams weights at memory bandwidth.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t TILE_N = 4;

inline float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

// One tile: rows [n0, n0 + TILE_N) of w against every row of x, TILE_M rows of x at
// a time (TILE_M x TILE_N accumulators stay in registers).
constexpr int64_t TILE_M = 4;

void tile_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y,
               int64_t M, int64_t N, int64_t K, int64_t n0) {
  const int64_t rows = std::min(TILE_N, N - n0);
  for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
    const int64_t ms = std::min(TILE_M, M - m0);
    __m512 acc[TILE_M][TILE_N];
    for (int64_t i = 0; i < TILE_M; ++i)
      for (int64_t r = 0; r < TILE_N; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512bh wv[TILE_N];
      for (int64_t r = 0; r < rows; ++r)
        wv[r] = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k);
      for (int64_t i = 0; i < ms; ++i) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
        for (int64_t r = 0; r < rows; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
      }
    }
    for (int64_t i = 0; i < ms; ++i) {
      const at::BFloat16* xm = x + (m0 + i) * K;
      for (int64_t r = 0; r < rows; ++r) {
        float s = reduce(acc[i][r]);
        for (int64_t kk = k; kk < K; ++kk)  // tail when K is not a multiple of 32
          s += static_cast<float>(xm[kk]) * static_cast<float>(w[(n0 + r) * K + kk]);
        y[(m0 + i) * N + n0 + r] = at::BFloat16(s);
      }
    }
  }
}


constexpr int64_t kMaxGroup = 16;  // most query heads per KV head

// hsum16: lane L of the result is the sum of all lanes of the vector stored at
// v[kHsumOrder[L]] (callers store token i's vector at v[kHsumOrder[i]]).
constexpr int kHsumOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 512 -> two 256-bit halves summed
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // -> 128-bit quarters summed
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]),
                         _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
}

}  // namespace

torch::Tensor skinny_linear_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "skinny_linear_bf16 takes bfloat16 tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t num_tiles = (N + TILE_N - 1) / TILE_N;
  at::parallel_for(0, num_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_rows(xp, wp, yp, M, N, K, t * TILE_N);
  });
  return y;
}


// paged_decode_attention_bf16: one query token per sequence attends to its context,
// read straight from the paged cache (no gather copy), one pass over the keys and one
// over the values per sequence.
//   q [B, H, D], k_cache/v_cache [num_blocks, block_size, Hkv, D], block_table [B, max_blocks],
//   ctx_lens [B]  ->  out [B, H, D]
torch::Tensor paged_decode_attention_bf16(torch::Tensor q, torch::Tensor k_cache,
                                          torch::Tensor v_cache, torch::Tensor block_table,
                                          torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "paged_decode_attention_bf16 takes bfloat16 tensors");
  q = q.contiguous();
  block_table = block_table.contiguous();
  ctx_lens = ctx_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = H / Hkv, max_blocks = block_table.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= 256, "head_dim must be a multiple of 32, at most 256");
  TORCH_CHECK(G <= kMaxGroup, "at most 16 query heads per KV head");
  auto out = torch::empty_like(q);
  const auto* qp = q.data_ptr<at::BFloat16>();
  const auto* kp = k_cache.data_ptr<at::BFloat16>();
  const auto* vp = v_cache.data_ptr<at::BFloat16>();
  const auto* tables = block_table.data_ptr<int64_t>();
  const auto* lens = ctx_lens.data_ptr<int64_t>();
  auto* op = out.data_ptr<at::BFloat16>();
  const float fscale = static_cast<float>(scale);

  // One task per sequence. Scores are made 16 tokens at a time and reduced together
  // (hsum16), and so
  // are values, with accumulators in registers.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> inv_sum(H);
    std::vector<float> acc(H * D);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const at::BFloat16* qb = qp + b * H * D;
      const int64_t n_pad = (n + 15) / 16 * 16;
      scores.assign(H * n_pad, 0.f);
      auto row = [&](const at::BFloat16* cache, int64_t t) {
        return cache + (table[t / bs] * bs + t % bs) * Hkv * D;
      };
      // 1. scores[head][t] = scale * q_head . k_t[head / G]
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t valid = std::min<int64_t>(16, n - t0);
        const at::BFloat16* krow[16];
        for (int64_t i = 0; i < valid; ++i) krow[i] = row(kp, t0 + i);
        for (int64_t head = 0; head < H; ++head) {
          const at::BFloat16* qh = qb + head * D;
          const int64_t koff = (head / G) * D;
          __m512 dots[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 dot = _mm512_setzero_ps();
            if (i < valid) {
              for (int64_t d = 0; d < D; d += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(qh + d),
                                       (__m512bh)_mm512_loadu_si512(krow[i] + koff + d));
            }
            dots[kHsumOrder[i]] = dot;
          }
          _mm512_storeu_ps(scores.data() + head * n_pad + t0,
                           _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(fscale)));
        }
      }
      // 2. softmax over t, per query head
      for (int64_t head = 0; head < H; ++head) {
        float* s = scores.data() + head * n_pad;
        float m = -INFINITY;
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          s[t] = expf(s[t] - m);
          sum += s[t];
        }
        inv_sum[head] = 1.f / sum;
      }
      // 3. out_head = sum_t p[head][t] v_t[head / G], 16 tokens at a time with the
      //    accumulators of one 16-wide slice of a KV head's heads in registers
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t valid = std::min<int64_t>(16, n - t0);
        const at::BFloat16* vrow[16];
        for (int64_t i = 0; i < valid; ++i) vrow[i] = row(vp, t0 + i);
        for (int64_t h = 0; h < Hkv; ++h) {
          const float* p = scores.data() + h * G * n_pad + t0;
          for (int64_t d = 0; d < D; d += 16) {
            __m512 a[kMaxGroup];
            for (int64_t g = 0; g < G; ++g) a[g] = _mm512_loadu_ps(acc.data() + (h * G + g) * D + d);
            for (int64_t i = 0; i < valid; ++i) {
              __m512 v = _mm512_cvtpbh_ps(
                  (__m256bh)_mm256_loadu_si256((const __m256i*)(vrow[i] + h * D + d)));
              for (int64_t g = 0; g < G; ++g)
                a[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * n_pad + i]), v, a[g]);
            }
            for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(acc.data() + (h * G + g) * D + d, a[g]);
          }
        }
      }
      at::BFloat16* ob = op + b * H * D;
      for (int64_t head = 0; head < H; ++head)
        for (int64_t d = 0; d < D; ++d)
          ob[head * D + d] = at::BFloat16(acc[head * D + d] * inv_sum[head]);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear_bf16", &skinny_linear_bf16, "y = x @ w.T for few rows (bf16)");
  m.def("paged_decode_attention_bf16", &paged_decode_attention_bf16,
        "decode attention over the paged KV cache (bf16)");
}
