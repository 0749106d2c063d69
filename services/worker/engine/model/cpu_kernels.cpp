// CPU kernels for the memory-bound parts of decoding, built on first use by
// cpu_kernels.py (torch.utils.cpp_extension). Requires AVX512-BF16 and AVX512-VNNI.
//
// skinny_linear_bf16: y = x @ w.T for few rows of x (decode steps). Every weight row is
// read from memory exactly once per call: a tile of TILE_N rows stays in L1 while all M
// rows of x are multiplied by it, so the kernel streams weights at memory bandwidth.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

// M == 1 (one decode token): GEMV_ROWS weight rows at a time (independent accumulator
// chains), each group software-prefetching the next one whole. Streams at ~23 GB/s
// here, vs ~16 for the tiles above and ~26-31 for a plain sum.
constexpr int64_t GEMV_GRAIN = 256;
constexpr int GEMV_ROWS = 4;

inline float dot_row(const at::BFloat16* x, const at::BFloat16* wr, int64_t K) {
  __m512 a = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x + k),
                         (__m512bh)_mm512_loadu_si512(wr + k));
  float s = _mm512_reduce_add_ps(a);
  for (; k < K; ++k) s += static_cast<float>(x[k]) * static_cast<float>(wr[k]);
  return s;
}

void gemv_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t N,
               int64_t K, int64_t begin, int64_t end) {
  int64_t n = begin;
  const int64_t K32 = K / 32 * 32;
  for (; n + GEMV_ROWS <= end && K32 == K; n += GEMV_ROWS) {
    if (n + 2 * GEMV_ROWS <= N) {
      const char* next = (const char*)(w + (n + GEMV_ROWS) * K);
      for (int64_t off = 0; off < GEMV_ROWS * K * 2; off += 64)
        _mm_prefetch(next + off, _MM_HINT_T0);
    }
    __m512 acc[GEMV_ROWS];
    for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int r = 0; r < GEMV_ROWS; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], xv,
                                  (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k));
    }
    for (int r = 0; r < GEMV_ROWS; ++r) y[n + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r]));
  }
  for (; n < end; ++n) y[n] = at::BFloat16(dot_row(x, w + n * K, K));
}

// 2 <= M rows of x, K a multiple of 32: GEMV_ROWS weight rows at a time against up to
// GEMM_ROWS rows of x at once (the weight rows stay in L1 across the passes), with the
// next weight rows prefetched, as gemv_rows streams them. Each (x row, weight row) dot
// product accumulates in gemv_rows' order, so every row of y is bit for bit what a
// one-row call gives: speculative verification of drafts relies on it.
constexpr int GEMM_ROWS = 6;  // 6 x 4 accumulators + 6 x rows + 1 weight: 31 registers

template <int MM>
inline void gemv_group(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y,
                       int64_t N, int64_t K, int64_t n) {
  __m512 acc[MM][GEMV_ROWS];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < GEMV_ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MM];
    for (int m = 0; m < MM; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < GEMV_ROWS; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
      for (int m = 0; m < MM; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv[m], wv);
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < GEMV_ROWS; ++r)
      y[m * N + n + r] = at::BFloat16(_mm512_reduce_add_ps(acc[m][r]));
}

void gemm_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t M,
               int64_t N, int64_t K, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + GEMV_ROWS <= end; n += GEMV_ROWS) {
    if (n + 2 * GEMV_ROWS <= N) {
      const char* next = (const char*)(w + (n + GEMV_ROWS) * K);
      for (int64_t off = 0; off < GEMV_ROWS * K * 2; off += 64)
        _mm_prefetch(next + off, _MM_HINT_T0);
    }
    // Passes of at most GEMM_ROWS rows, balanced (9 rows: 5 + 4, not 6 + 3 or 4+4+1):
    // a pass of few rows does little arithmetic per weight load.
    const int64_t passes = (M + GEMM_ROWS - 1) / GEMM_ROWS;
    for (int64_t p = 0, m0 = 0; p < passes; ++p) {
      const int64_t mm = (M - m0) / (passes - p);
      const at::BFloat16* xm = x + m0 * K;
      at::BFloat16* ym = y + m0 * N;
      switch (mm) {
        case 1: gemv_group<1>(xm, w, ym, N, K, n); break;
        case 2: gemv_group<2>(xm, w, ym, N, K, n); break;
        case 3: gemv_group<3>(xm, w, ym, N, K, n); break;
        case 4: gemv_group<4>(xm, w, ym, N, K, n); break;
        case 5: gemv_group<5>(xm, w, ym, N, K, n); break;
        default: gemv_group<6>(xm, w, ym, N, K, n); break;
      }
      m0 += mm;
    }
  }
  for (; n < end; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = at::BFloat16(dot_row(x + m * K, w + n * K, K));
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
  if (M == 1) {
    at::parallel_for(0, N, GEMV_GRAIN, [&](int64_t begin, int64_t end) {
      gemv_rows(xp, wp, yp, N, K, begin, end);
    });
    return y;
  }
  if (K % 32 == 0) {
    at::parallel_for(0, N, GEMV_GRAIN, [&](int64_t begin, int64_t end) {
      gemm_rows(xp, wp, yp, M, N, K, begin, end);
    });
    return y;
  }
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
namespace {

struct DecodeArgs {
  const at::BFloat16* q;
  const at::BFloat16* k_cache;
  const at::BFloat16* v_cache;
  const int64_t* tables;
  const int64_t* lens;
  at::BFloat16* out;
  int64_t H, Hkv, G, D, bs, max_blocks;
  float scale;
};

struct Scratch {
  std::vector<float> scores, inv_sum, acc;
  std::vector<uint32_t> pairs;  // bf16 probabilities of token pairs, per head
};

// One sequence. kG is the number of query heads per KV head when known at compile
// time (so value accumulators live in registers), or 0 to read it from args.
// Pulls the next 16 tokens' rows into cache while the current 16 are computed (the
// hardware prefetcher alone left this kernel waiting on memory).
// Only the [begin, begin + len) part of each row (the heads being computed) is pulled.
inline void prefetch_rows(const at::BFloat16* cache, const int64_t* table, int64_t bs,
                          int64_t row_len, int64_t begin, int64_t len, int64_t t0,
                          int64_t n) {
  for (int64_t t = t0; t < std::min(t0 + 16, n); ++t) {
    const char* p = (const char*)(cache + (table[t / bs] * bs + t % bs) * row_len + begin);
    for (int64_t off = 0; off < len * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

// KV heads [h0, h1) of sequence b (their query heads [h0 * G, h1 * G)): a head's
// arithmetic does not depend on which others share the call.
template <int kG>
void attend_sequence(const DecodeArgs& a, int64_t b, int64_t h0, int64_t h1, Scratch& s) {
  const int64_t G = kG > 0 ? kG : a.G;
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D;
  const int64_t n = a.lens[b];
  const int64_t n_pad = (n + 15) / 16 * 16;
  const int64_t* table = a.tables + b * a.max_blocks;
  const at::BFloat16* qb = a.q + b * H * D;
  auto row = [&](const at::BFloat16* cache, int64_t t) {
    return cache + (table[t / a.bs] * a.bs + t % a.bs) * Hkv * D;
  };
  s.scores.assign(H * n_pad, 0.f);
  s.inv_sum.resize(H);
  s.acc.assign(H * D, 0.f);

  // 1. scores[head][t] = scale * q_head . k_t[head / G], 16 tokens reduced at once
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t valid = std::min<int64_t>(16, n - t0);
    const at::BFloat16* krow[16];
    for (int64_t i = 0; i < valid; ++i) krow[i] = row(a.k_cache, t0 + i);
    prefetch_rows(a.k_cache, table, a.bs, Hkv * D, h0 * D, (h1 - h0) * D, t0 + 32, n);
    for (int64_t head = h0 * G; head < h1 * G; ++head) {
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
      _mm512_storeu_ps(s.scores.data() + head * n_pad + t0,
                       _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(a.scale)));
    }
  }
  // 2. softmax over t, per query head (left unnormalized; divided at the end)
  for (int64_t head = h0 * G; head < h1 * G; ++head) {
    float* sc = s.scores.data() + head * n_pad;
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sc[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sc[t] = expf(sc[t] - m);
      sum += sc[t];
    }
    s.inv_sum[head] = 1.f / sum;
  }
  // 3. out_head = sum_t p[head][t] v_t[head / G] with bf16 dot products over token
  //    pairs: p rounded to bf16 (as flash attention does), accumulation in fp32.
  //    unpacklo/hi_epi16 interleave two tokens' rows, so accumulator lane 4k+i holds
  //    dim 8k+i (lo) or 8k+4+i (hi) of each 32-dim slice; undone at the end.
  s.pairs.resize(H * n_pad / 2);
  for (int64_t head = h0 * G; head < h1 * G; ++head) {
    const float* sc = s.scores.data() + head * n_pad;
    uint32_t* pp = s.pairs.data() + head * n_pad / 2;
    for (int64_t j = 0; j < n_pad / 2; ++j) {
      const uint32_t lo = at::BFloat16(sc[2 * j]).x, hi = at::BFloat16(sc[2 * j + 1]).x;
      pp[j] = lo | (hi << 16);
    }
  }
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t valid = std::min<int64_t>(16, n - t0);
    const at::BFloat16* vrow[16];
    for (int64_t i = 0; i < 16; ++i) vrow[i] = row(a.v_cache, t0 + std::min(i, valid - 1));
    prefetch_rows(a.v_cache, table, a.bs, Hkv * D, h0 * D, (h1 - h0) * D, t0 + 32, n);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t d = 0; d < D; d += 32) {
        __m512 lo_acc[kG > 0 ? kG : kMaxGroup], hi_acc[kG > 0 ? kG : kMaxGroup];
        for (int64_t g = 0; g < G; ++g) {
          lo_acc[g] = _mm512_loadu_ps(s.acc.data() + (h * G + g) * D + d);
          hi_acc[g] = _mm512_loadu_ps(s.acc.data() + (h * G + g) * D + d + 16);
        }
        for (int64_t j = 0; j < (valid + 1) / 2; ++j) {
          __m512i va = _mm512_loadu_si512(vrow[2 * j] + h * D + d);
          __m512i vb = _mm512_loadu_si512(vrow[2 * j + 1] + h * D + d);
          __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(va, vb);
          __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(va, vb);
          for (int64_t g = 0; g < G; ++g) {
            const uint32_t pair = s.pairs[(h * G + g) * n_pad / 2 + t0 / 2 + j];
            __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair);
            lo_acc[g] = _mm512_dpbf16_ps(lo_acc[g], lo, pv);
            hi_acc[g] = _mm512_dpbf16_ps(hi_acc[g], hi, pv);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          _mm512_storeu_ps(s.acc.data() + (h * G + g) * D + d, lo_acc[g]);
          _mm512_storeu_ps(s.acc.data() + (h * G + g) * D + d + 16, hi_acc[g]);
        }
      }
    }
  }
  at::BFloat16* ob = a.out + b * H * D;
  for (int64_t head = h0 * G; head < h1 * G; ++head) {
    const float* acc = s.acc.data() + head * D;
    for (int64_t d = 0; d < D; d += 32)
      for (int64_t k = 0; k < 4; ++k)
        for (int64_t i = 0; i < 4; ++i) {
          ob[head * D + d + 8 * k + i] = at::BFloat16(acc[d + 4 * k + i] * s.inv_sum[head]);
          ob[head * D + d + 8 * k + 4 + i] =
              at::BFloat16(acc[d + 16 + 4 * k + i] * s.inv_sum[head]);
        }
  }
}

// Whole sequences per task when there are enough of them for every thread; else
// (single-stream decode) each sequence's KV heads are split across the threads too.
template <int kG>
void attend_all(const DecodeArgs& a, int64_t B) {
  if (B >= at::get_num_threads() || a.Hkv == 1) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch s;
      for (int64_t b = begin; b < end; ++b) attend_sequence<kG>(a, b, 0, a.Hkv, s);
    });
    return;
  }
  at::parallel_for(0, B * a.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t i = begin; i < end;) {  // runs of KV heads of one sequence
      const int64_t b = i / a.Hkv, h1 = std::min(end - b * a.Hkv, a.Hkv);
      attend_sequence<kG>(a, b, i % a.Hkv, h1, s);
      i = b * a.Hkv + h1;
    }
  });
}

}  // namespace

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
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(D % 32 == 0 && D <= 256, "head_dim must be a multiple of 32, at most 256");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "at most 16 query heads per KV head");
  auto out = torch::empty_like(q);
  const DecodeArgs args{q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
                        v_cache.data_ptr<at::BFloat16>(), block_table.data_ptr<int64_t>(),
                        ctx_lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(),
                        H, Hkv, H / Hkv, D, k_cache.size(1), block_table.size(1),
                        static_cast<float>(scale)};
  switch (args.G) {  // the common GQA group sizes get register accumulators
    case 1: attend_all<1>(args, B); break;
    case 2: attend_all<2>(args, B); break;
    case 3: attend_all<3>(args, B); break;
    case 4: attend_all<4>(args, B); break;
    case 7: attend_all<7>(args, B); break;
    case 8: attend_all<8>(args, B); break;
    default: attend_all<0>(args, B); break;
  }
  return out;
}


// Fused elementwise ops of a decoder layer (bf16 in and out, fp32 math). Each replaces
// several PyTorch ops whose dispatch cost dominates at decode batch sizes.
namespace {

inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)p));
}

inline void store_bf16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}

// y = w * bf16(x / rms(x)), rounded as the reference implementation rounds.
inline void norm_row(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y,
                     int64_t d, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    __m512 v = load_bf16(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / d + eps));
  for (int64_t i = 0; i < d; i += 16) {
    __m512 normed = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16(x + i), inv)));
    store_bf16(y + i, _mm512_mul_ps(normed, load_bf16(w + i)));
  }
}

void check_rows(const torch::Tensor& x, int64_t multiple) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "expected a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(x.size(1) % multiple == 0, "row length must be a multiple of ", multiple);
}

}  // namespace

torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor w, double eps) {
  x = x.contiguous();
  check_rows(x, 16);
  auto y = torch::empty_like(x);
  const int64_t d = x.size(1);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, x.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * d, wp, yp + r * d, d, (float)eps);
  });
  return y;
}

// x += delta (in place, rounded to bf16); returns rms_norm(x) * w.
torch::Tensor add_rms_norm_bf16(torch::Tensor x, torch::Tensor delta, torch::Tensor w,
                                double eps) {
  check_rows(x, 16);
  delta = delta.contiguous();
  auto y = torch::empty_like(x);
  const int64_t d = x.size(1);
  auto* xp = x.data_ptr<at::BFloat16>();
  const auto* dp = delta.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, x.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t i = 0; i < d; i += 16)
        store_bf16(xp + r * d + i, _mm512_add_ps(load_bf16(xp + r * d + i),
                                                 load_bf16(dp + r * d + i)));
      norm_row(xp + r * d, wp, yp + r * d, d, (float)eps);
    }
  });
  return y;
}

// Rotates, in place, the first num_heads heads of every row of qkv [T, *] by each
// token's cos/sin [T, D] (half-split layout).
void rope_bf16_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                int64_t head_dim) {
  check_rows(qkv, 1);
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(head_dim % 32 == 0, "head_dim must be a multiple of 32");
  const int64_t row = qkv.size(1), half = head_dim / 2;
  auto* xp = qkv.data_ptr<at::BFloat16>();
  const auto* cp = cos.data_ptr<at::BFloat16>();
  const auto* sp = sin.data_ptr<at::BFloat16>();
  at::parallel_for(0, qkv.size(0), 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const at::BFloat16* c = cp + t * head_dim;
      const at::BFloat16* s = sp + t * head_dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        at::BFloat16* x = xp + t * row + h * head_dim;
        for (int64_t i = 0; i < half; i += 16) {
          __m512 x1 = load_bf16(x + i), x2 = load_bf16(x + half + i);
          // out1 = x1 cos - x2 sin;  out2 = x2 cos + x1 sin
          store_bf16(x + i, _mm512_fmsub_ps(x1, load_bf16(c + i),
                                            _mm512_mul_ps(x2, load_bf16(s + i))));
          store_bf16(x + half + i, _mm512_fmadd_ps(x2, load_bf16(c + half + i),
                                                   _mm512_mul_ps(x1, load_bf16(s + half + i))));
        }
      }
    }
  });
}

// silu(gate) * up for gate_up [T, 2I] -> [T, I].
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  check_rows(gate_up, 32);
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto y = torch::empty({T, I}, gate_up.options());
  const auto* gp = gate_up.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const at::BFloat16* g = gp + t * 2 * I;
      for (int64_t i = 0; i < I; i += 16) {
        alignas(64) float gv[16], uv[16];
        _mm512_store_ps(gv, load_bf16(g + i));
        _mm512_store_ps(uv, load_bf16(g + I + i));
#pragma omp simd
        for (int k = 0; k < 16; ++k) gv[k] = gv[k] / (1.f + expf(-gv[k])) * uv[k];
        store_bf16(yp + t * I + i, _mm512_load_ps(gv));
      }
    }
  });
  return y;
}


// Stores this step's keys and values ([T, Hkv, D] views, rows may be strided, e.g.
// slices of the fused qkv output) into their cache slots.
void write_kv_bf16(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                   torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                  k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16,
              "write_kv_bf16 takes bfloat16 tensors");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 &&
                  v.stride(1) == v.size(2), "each token's heads must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  slots = slots.contiguous();
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  const auto* kp = k.data_ptr<at::BFloat16>();
  const auto* vp = v.data_ptr<at::BFloat16>();
  auto* kc = k_cache.data_ptr<at::BFloat16>();
  auto* vc = v_cache.data_ptr<at::BFloat16>();
  const auto* sp = slots.data_ptr<int64_t>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      std::memcpy(kc + sp[t] * row, kp + t * ks, row * sizeof(at::BFloat16));
      std::memcpy(vc + sp[t] * row, vp + t * vs, row * sizeof(at::BFloat16));
    }
  });
}


// Weight-only quantized linears: y = x @ dequant(w).T, x and y bf16.
//   int8: w int8 [N, K], scales fp16 [N, K / G]: w[n, k] = q * scales[n, k / G]
//         (symmetric; G = K: one scale per output channel).
//   int4: w uint8 [N, K / 2], scales and offsets fp16 [N, K / G]: w[n, k] =
//         q * scales[n, g] + offsets[n, g] with g = k / G (asymmetric groups of G, a
//         multiple of 32; K a multiple of 64). Each 64 weights are 32 bytes: byte i holds
//         weight i in its low nibble and weight i + 32 in its high one, so one 32-byte
//         load widened to 16-bit lanes gives both 32-weight halves in order with one
//         mask and one shift; OR-ing 0x4300 into a lane holding q makes it the bf16 of
//         128 + q, so the kernel multiplies by 128 + q and takes 128 * scale off the
//         offset (the products are exact in fp32; the sums lose ~4 of fp32's 24 bits).
// For up to QSKINNY rows of x (decode steps): the weights are read once and multiplied
// in registers (the ints exactly as bf16, each group's scale applied to its partial
// sums); more rows take a pass per QSKINNY (speculative verification). Many rows are
// bound by arithmetic, not bytes: ops.py runs them on a packed bf16 copy of the
// dequantized weights.
namespace {

constexpr int64_t QSKINNY = 2;

struct QWeight {
  const uint8_t* q;
  const uint16_t* scales;  // fp16 bits
  const uint16_t* offsets;  // int4 only
  int64_t N, K, G;
  bool int4;
};

// 16 int8 weights as fp32.
inline __m512 int8_ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

constexpr int QROWS = 4;  // weight rows per register tile

// Pulls the next tile's weight bytes toward the cache while this one is computed.
inline void prefetch_bytes(const uint8_t* p, int64_t n) {
  for (int64_t off = 0; off < n; off += 64) _mm_prefetch((const char*)(p + off), _MM_HINT_T0);
}

// One tile: weight rows [n0, n0 + R) against MM rows of x (compile-time sizes, so the
// accumulators stay in registers). int4: xsum [MM, K / G] holds the sums of x over each
// group (the offsets' share).
constexpr int64_t Q4_MAX_GROUPS = 1024;  // groups a row (K / G): sizes the scale buffer

// sum_g (offsets[g] - 128 scales[g]) * xsum[g] over a row's ng groups (the offsets'
// share of y, less the 128 * scale the kernel multiplied by), 16 groups at a time.
inline float q4_offset_share(const uint16_t* offsets, const float* scales, const float* xsum,
                             int64_t ng) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 k128 = _mm512_set1_ps(128.f);
  int64_t g = 0;
  for (; g + 16 <= ng; g += 16) {
    const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(offsets + g)));
    const __m512 c = _mm512_fnmadd_ps(k128, _mm512_loadu_ps(scales + g), o);
    acc = _mm512_fmadd_ps(c, _mm512_loadu_ps(xsum + g), acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; g < ng; ++g)
    sum = std::fma(_cvtsh_ss(offsets[g]) - 128.f * scales[g], xsum[g], sum);
  return sum;
}

template <int MM, int R>
inline void q4_tile(const QWeight& w, const at::BFloat16* x, const float* xsum,
                    at::BFloat16* y, int64_t n0) {
  const int64_t K = w.K, N = w.N, G = w.G, ng = K / G, row_bytes = K / 2;
  const uint8_t* base = w.q + n0 * row_bytes;
  // The weight bytes, scales and offsets of the tile after next (the next one's are on
  // their way): without the scales and offsets, a layer's down projection (576 rows of
  // 1,536 inputs) streamed at ~13 GB/s against its gate/up's ~26 (30 layers' int4
  // matmuls, weights from memory: 3.56-3.88 ms -> 3.38-3.59).
  if (n0 + 3 * R <= N) {
    prefetch_bytes(base + 2 * R * row_bytes, R * row_bytes);
    prefetch_bytes(reinterpret_cast<const uint8_t*>(w.scales + (n0 + 2 * R) * ng), R * ng * 2);
    prefetch_bytes(reinterpret_cast<const uint8_t*>(w.offsets + (n0 + 2 * R) * ng), R * ng * 2);
  } else if (n0 + 2 * R <= N) {
    prefetch_bytes(base + R * row_bytes, R * row_bytes);
  }
  // The rows' scales in fp32, so that each group's costs one fmadd with a broadcast.
  float sc[R][Q4_MAX_GROUPS];
  for (int r = 0; r < R; ++r) {
    const uint16_t* src = w.scales + (n0 + r) * ng;
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16)
      _mm512_storeu_ps(sc[r] + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + g))));
    for (; g < ng; ++g) sc[r][g] = _cvtsh_ss(src[g]);
  }
  const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  __m512 tot[MM][R], acc[MM][R];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) tot[m][r] = acc[m][r] = _mm512_setzero_ps();
  // Row r's 64 weights at k as two bf16 vectors of 128 + q: weights k.. and k + 32..
  auto unpack = [&](int r, int64_t k, __m512bh& lo, __m512bh& hi) {
    const __m512i v = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256((const __m256i*)(base + r * row_bytes + k / 2)));
    lo = (__m512bh)_mm512_ternarylogic_epi32(v, low, bias, 0xEA);  // v & low | bias
    hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
  };
  // x's 64 values at k, as the two halves the weights unpack to, for each row of x.
  auto load_x = [&](int64_t k, __m512bh* xl, __m512bh* xh) {
    for (int m = 0; m < MM; ++m) {
      xl[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      xh[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
    }
  };
  if (G == 32) {  // each half of a 64-weight block is a group of its own
    for (int64_t k = 0, g = 0; k < K; k += 64, g += 2) {
      __m512bh xl[MM], xh[MM];
      load_x(k, xl, xh);
      for (int r = 0; r < R; ++r) {
        __m512bh lo, hi;
        unpack(r, k, lo, hi);
        const __m512 s_lo = _mm512_set1_ps(sc[r][g]), s_hi = _mm512_set1_ps(sc[r][g + 1]);
        for (int m = 0; m < MM; ++m) {
          tot[m][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xl[m], lo), s_lo,
                                      tot[m][r]);
          tot[m][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xh[m], hi), s_hi,
                                      tot[m][r]);
        }
      }
    }
  } else {  // a group spans whole blocks (G a multiple of 64, check_qweight)
    for (int64_t g = 0; g < ng; ++g) {
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
        __m512bh xl[MM], xh[MM];
        load_x(k, xl, xh);
        for (int r = 0; r < R; ++r) {
          __m512bh lo, hi;
          unpack(r, k, lo, hi);
          for (int m = 0; m < MM; ++m)
            acc[m][r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[m][r], xl[m], lo), xh[m], hi);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sv = _mm512_set1_ps(sc[r][g]);
        for (int m = 0; m < MM; ++m) {
          tot[m][r] = _mm512_fmadd_ps(acc[m][r], sv, tot[m][r]);
          acc[m][r] = _mm512_setzero_ps();
        }
      }
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r)
      y[m * N + n0 + r] = at::BFloat16(
          _mm512_reduce_add_ps(tot[m][r]) +
          q4_offset_share(w.offsets + (n0 + r) * ng, sc[r], xsum + m * ng, ng));
}

// One row of x for the int8 kernel: x ~ x16 * scale, except its few outliers, which
// are kept apart in fp32 (quantize_rows_int16).
constexpr int Q8_MAX_OUTLIERS = 16;
struct Q8Row {
  float scale = 0.f;  // NaN: the row holds a NaN or inf, and so will its outputs
  int shift = 0;  // -64 for a row of tiny values, scaled up by 2^64 to be quantized
  int num_outliers = 0;
  int32_t outlier_k[Q8_MAX_OUTLIERS];
  float outlier_x[Q8_MAX_OUTLIERS];
};

// The same for int8, in integers: x16 [MM, K] is each row of x as int16 (rows[m]),
// each weight is sign-extended to int16 and VNNI's vpdpwssd adds 32 products into 16
// int32 lanes an instruction (exact), and each group's sums are scaled in fp32. Per 32
// weights that is a widening and one dot product, where converting each weight to fp32
// took three operations per 16 and bound the kernel. The row's outliers (0 in x16) are
// added in fp32, exactly as the fp32 kernel did. The int32 lanes take at most
// Q8_MAX_DOTS dot products (2 products each of at most 32767 * 128) before they are
// emptied into fp32: no overflow at any group size.
constexpr int Q8_MAX_DOTS = 64;

template <int MM, int R>
inline void q8_tile(const QWeight& w, const int16_t* x16, const Q8Row* rows,
                    at::BFloat16* y, int64_t n0) {
  const int64_t K = w.K, N = w.N, G = w.G, ng = K / G;
  const auto* base = reinterpret_cast<const int8_t*>(w.q) + n0 * K;
  if (n0 + 2 * R <= N) prefetch_bytes(w.q + (n0 + R) * K, R * K);
  __m512 tot[MM][R];
  __m512i acc[MM][R];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) {
      tot[m][r] = _mm512_setzero_ps();
      acc[m][r] = _mm512_setzero_si512();
    }
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t end = (g + 1) * G;
    for (int64_t k = g * G; k < end;) {
      const int64_t stop = std::min(end, k + 32 * Q8_MAX_DOTS);
      for (; k < stop; k += 32) {
        __m512i xv[MM];
        for (int m = 0; m < MM; ++m) xv[m] = _mm512_loadu_si512(x16 + m * K + k);
        for (int r = 0; r < R; ++r) {
          const __m512i wv = _mm512_cvtepi8_epi16(
              _mm256_loadu_si256((const __m256i*)(base + r * K + k)));
          for (int m = 0; m < MM; ++m) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], xv[m], wv);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sv = _mm512_set1_ps(_cvtsh_ss(w.scales[(n0 + r) * ng + g]));
        for (int m = 0; m < MM; ++m) {
          tot[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), sv, tot[m][r]);
          acc[m][r] = _mm512_setzero_si512();
        }
      }
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) {
      const Q8Row& row = rows[m];
      float out = 0.f;
      for (int j = 0; j < row.num_outliers; ++j) {
        const int64_t k = row.outlier_k[j];
        out += row.outlier_x[j] * static_cast<float>(base[r * K + k]) *
               _cvtsh_ss(w.scales[(n0 + r) * ng + k / G]);
      }
      y[m * N + n0 + r] = at::BFloat16(
          std::ldexp(_mm512_reduce_add_ps(tot[m][r]) * row.scale, row.shift) + out);
    }
}

// Values more than this many times the row's root mean square are outliers: LLMs'
// "massive activations" run to 1,000x the rest, and one scale for the row would leave
// the rest a few steps of int16 (with an outlier at 1,000x, 8.5% error on the others'
// share; at 3,000x, 19%).
constexpr float Q8_OUTLIER_RMS = 8.f;

inline bool finite_bf16(const at::BFloat16* row, int64_t K) {
  const __m512i exp_mask = _mm512_set1_epi16(0x7F80);
  for (int64_t k = 0; k < K; k += 32) {
    const __m512i e = _mm512_and_si512(_mm512_loadu_si512(row + k), exp_mask);
    if (_mm512_cmpeq_epi16_mask(e, exp_mask)) return false;  // all exponent bits: inf/NaN
  }
  return true;
}

// Row m of x [M, K] as int16 (x16) and rows[m]: the largest magnitude that is not an
// outlier mapped to 32767 (a row of zeros: all 0, scale 0), the outliers (at most
// Q8_MAX_OUTLIERS of the largest; more and the row has none) 0 in x16 and kept in fp32.
// A row whose largest value is under 2^-64 is scaled up by 2^64 first (exactly), as
// 32767 over it would overflow (bf16 values go down to ~1e-40). Each row on its own, so a row's result does not depend
// on the rows beside it. K is a multiple of 32 (check_qweight); rounded to nearest even.
void quantize_rows_int16(const at::BFloat16* x, int64_t M, int64_t K, int16_t* x16,
                         Q8Row* rows) {
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* row = x + m * K;
    int16_t* out = x16 + m * K;
    Q8Row& q = rows[m];
    q = Q8Row{};
    if (!finite_bf16(row, K)) {  // the fp32 kernel's outputs would be NaN or inf
      std::fill(out, out + K, int16_t{0});
      q.scale = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    __m512 vsq = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load_bf16(row + k);
      vsq = _mm512_fmadd_ps(v, v, vsq);
    }
    // (A sum of squares past fp32's range makes rms inf: no outliers, one scale.)
    const float rms = std::sqrt(_mm512_reduce_add_ps(vsq) / K);
    const __m512 limit = _mm512_set1_ps(rms * Q8_OUTLIER_RMS);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 a = _mm512_abs_ps(load_bf16(row + k));
      __mmask16 big = rms > 0.f ? _mm512_cmp_ps_mask(a, limit, _CMP_GT_OQ) : 0;
      for (; big; big &= big - 1) {
        const int i = __builtin_ctz(big);
        if (q.num_outliers < Q8_MAX_OUTLIERS) {
          q.outlier_k[q.num_outliers] = static_cast<int32_t>(k + i);
          q.outlier_x[q.num_outliers] = static_cast<float>(row[k + i]);
        }
        ++q.num_outliers;
      }
      vmax = _mm512_max_ps(vmax, a);
    }
    float amax = _mm512_reduce_max_ps(vmax);
    if (q.num_outliers > Q8_MAX_OUTLIERS) {
      q.num_outliers = 0;  // too many to keep apart: one scale for the whole row
    } else if (q.num_outliers > 0) {
      vmax = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 a = _mm512_abs_ps(load_bf16(row + k));
        vmax = _mm512_mask_max_ps(vmax, _mm512_cmp_ps_mask(a, limit, _CMP_LE_OQ), vmax, a);
      }
      amax = _mm512_reduce_max_ps(vmax);
    }
    // Scaled by 2^64 with vscalefps, not a multiply: -ffast-math would fold two
    // multiplies into one by 2^64 * 32767 / amax, which overflows.
    q.shift = amax < 0x1p-64f ? -64 : 0;
    amax = std::ldexp(amax, -q.shift);
    const __m512 up = _mm512_set1_ps(static_cast<float>(-q.shift));
    const __m512 mul = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    q.scale = amax / 32767.f;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512i v = _mm512_cvt_roundps_epi32(
          _mm512_mul_ps(_mm512_scalef_ps(load_bf16(row + k), up), mul),
          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256((__m256i*)(out + k), _mm512_cvtsepi32_epi16(v));
    }
    for (int j = 0; j < q.num_outliers; ++j) out[q.outlier_k[j]] = 0;
  }
}

template <int MM>
void qskinny_rows_m(const QWeight& w, const at::BFloat16* x, const int16_t* x16,
                    const Q8Row* xrows, const float* xsum, at::BFloat16* y, int64_t begin,
                    int64_t end) {
  int64_t n = begin;
  if (w.int4) {
    for (; n + QROWS <= end; n += QROWS) q4_tile<MM, QROWS>(w, x, xsum, y, n);
    for (; n < end; ++n) q4_tile<MM, 1>(w, x, xsum, y, n);
  } else {
    for (; n + QROWS <= end; n += QROWS) q8_tile<MM, QROWS>(w, x16, xrows, y, n);
    for (; n < end; ++n) q8_tile<MM, 1>(w, x16, xrows, y, n);
  }
}

// Rows [begin, end) of y for M <= QSKINNY rows of x.
void qskinny_rows(const QWeight& w, const at::BFloat16* x, const int16_t* x16,
                  const Q8Row* xrows, const float* xsum, at::BFloat16* y, int64_t M,
                  int64_t begin, int64_t end) {
  if (M == 1) qskinny_rows_m<1>(w, x, x16, xrows, xsum, y, begin, end);
  else qskinny_rows_m<2>(w, x, x16, xrows, xsum, y, begin, end);
}

// The group size is K / scales.size(1): scales are [N, K / G].
QWeight check_qweight(const torch::Tensor& w, const torch::Tensor& scales,
                      const torch::Tensor& offsets, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D tensor");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == w.size(0) && scales.size(1) > 0,
              "scales must be contiguous fp16 [N, K / group size]");
  TORCH_CHECK(K % 32 == 0, "the input width must be a multiple of 32");
  const int64_t group_size = K / scales.size(1);
  TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && K % group_size == 0,
              "the group size must be a multiple of 32 dividing the input width");
  QWeight q{static_cast<const uint8_t*>(w.data_ptr()),
            static_cast<const uint16_t*>(scales.data_ptr()), nullptr,
            w.size(0), K,
            group_size, w.scalar_type() == at::kByte};
  if (q.int4) {
    TORCH_CHECK(w.size(1) * 2 == K, "int4 weights hold two per byte");
    TORCH_CHECK(K % 64 == 0, "int4 needs an input width that is a multiple of 64");
    TORCH_CHECK(group_size == 32 || group_size % 64 == 0,
                "int4 groups are 32 or a multiple of 64 (a group spans whole 64-blocks)");
    TORCH_CHECK(K / group_size <= Q4_MAX_GROUPS, "int4: at most ", Q4_MAX_GROUPS,
                " groups a row");
    TORCH_CHECK(offsets.scalar_type() == at::kHalf && offsets.is_contiguous() &&
                    scales.numel() == q.N * (K / group_size) &&
                    offsets.numel() == scales.numel(), "one scale and offset per group");
    q.offsets = static_cast<const uint16_t*>(offsets.data_ptr());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K, "int8 weights are [N, K]");
    TORCH_CHECK(scales.numel() == q.N * (K / group_size), "one scale per int8 group");
  }
  return q;
}

}  // namespace

torch::Tensor quantized_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales,
                               torch::Tensor offsets) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be 2-D bfloat16");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const QWeight q = check_qweight(w, scales, offsets, K);
  const int64_t N = q.N;
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  if (M == 0) return y;
  std::vector<int16_t> x16(q.int4 ? 0 : M * K);
  std::vector<Q8Row> xrows(q.int4 ? 0 : M);
  std::vector<float> xsum(q.int4 ? M * (K / q.G) : 0, 0.f);
  if (q.int4) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        xsum[m * (K / q.G) + k / q.G] += static_cast<float>(xp[m * K + k]);
  } else {
    quantize_rows_int16(xp, M, K, x16.data(), xrows.data());
  }
  // QSKINNY rows of x per pass over the weights: a row's arithmetic is the same in
  // every pass, so each row of y is what a one-row call gives (speculative verification
  // relies on it). Many rows are cheaper on ops.py's packed bf16 copy.
  const int64_t ng = K / q.G;
  for (int64_t m0 = 0; m0 < M; m0 += QSKINNY) {
    const int64_t mm = std::min(QSKINNY, M - m0);
    const int16_t* x16m = q.int4 ? nullptr : x16.data() + m0 * K;
    const Q8Row* xrm = q.int4 ? nullptr : xrows.data() + m0;
    const float* xsm = q.int4 ? xsum.data() + m0 * ng : nullptr;
    at::parallel_for(0, (N + QROWS - 1) / QROWS, GEMV_GRAIN / QROWS,
                     [&](int64_t b, int64_t e) {
      qskinny_rows(q, xp + m0 * K, x16m, xrm, xsm, yp + m0 * N, mm, b * QROWS,
                   std::min(N, e * QROWS));
    });
  }
  return y;
}

// A bf16 weight (scales undefined) or a quantized one, for few rows of x.
torch::Tensor any_linear(const torch::Tensor& x, const torch::Tensor& w,
                         const torch::Tensor& scales, const torch::Tensor& offsets) {
  if (w.scalar_type() == at::kBFloat16) return skinny_linear_bf16(x, w);
  return quantized_linear(x, w, scales, offsets);
}

// Every decoder layer of a decode step of at most SKINNY rows (1-2 tokens, no
// prefill), in one call: the same kernels the Python loop calls, without its
// per-op interpreter and dispatch cost (~1-2 ms of a ~16 ms single-stream step here).
// x [T, d] is the residual stream (updated in place); returns the final-normed hidden.
torch::Tensor decode_layers_bf16(torch::Tensor x, std::vector<torch::Tensor> input_norms,
                                 std::vector<torch::Tensor> qkv_ws,
                                 std::vector<torch::Tensor> o_ws,
                                 std::vector<torch::Tensor> post_norms,
                                 std::vector<torch::Tensor> gate_up_ws,
                                 std::vector<torch::Tensor> down_ws, torch::Tensor final_norm,
                                 std::vector<torch::Tensor> k_caches,
                                 std::vector<torch::Tensor> v_caches, torch::Tensor cos,
                                 torch::Tensor sin, torch::Tensor slots,
                                 torch::Tensor block_table, torch::Tensor ctx_lens,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 double eps, double scale,
                                 std::vector<torch::Tensor> qparams) {
  // qparams: empty for bf16 weights; for quantized ones, per layer the scales and
  // offsets of qkv, o, gate_up and down in that order (8 tensors a layer; offsets of
  // int8 weights are empty tensors).
  const int64_t L = static_cast<int64_t>(qkv_ws.size());
  const int64_t T = x.size(0), H = num_heads, Hkv = num_kv_heads, D = head_dim;
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(qparams.empty() || static_cast<int64_t>(qparams.size()) == 8 * L,
              "qparams: 8 tensors a layer");
  auto lin = [&](const torch::Tensor& in, const torch::Tensor& w, int64_t i, int j) {
    if (qparams.empty()) return skinny_linear_bf16(in, w);
    return any_linear(in, w, qparams[8 * i + 2 * j], qparams[8 * i + 2 * j + 1]);
  };
  torch::Tensor h = rms_norm_bf16(x, input_norms[0], eps);
  for (int64_t i = 0; i < L; ++i) {
    torch::Tensor qkv = lin(h, qkv_ws[i], i, 0);
    rope_bf16_(qkv, cos, sin, H + Hkv, D);
    torch::Tensor q = qkv.narrow(1, 0, H * D).view({T, H, D});
    torch::Tensor k = qkv.narrow(1, H * D, Hkv * D).view({T, Hkv, D});
    torch::Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({T, Hkv, D});
    write_kv_bf16(k, v, k_caches[i], v_caches[i], slots);
    torch::Tensor attn = paged_decode_attention_bf16(q, k_caches[i], v_caches[i], block_table,
                                                     ctx_lens, scale);
    h = add_rms_norm_bf16(x, lin(attn.view({T, H * D}), o_ws[i], i, 1), post_norms[i], eps);
    torch::Tensor mlp = lin(silu_mul_bf16(lin(h, gate_up_ws[i], i, 2)), down_ws[i], i, 3);
    h = add_rms_norm_bf16(x, mlp, i + 1 < L ? input_norms[i + 1] : final_norm, eps);
  }
  return h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear_bf16", &skinny_linear_bf16, "y = x @ w.T for few rows (bf16)");
  m.def("paged_decode_attention_bf16", &paged_decode_attention_bf16,
        "decode attention over the paged KV cache (bf16)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm (bf16)");
  m.def("add_rms_norm_bf16", &add_rms_norm_bf16, "x += delta; RMSNorm(x) (bf16)");
  m.def("rope_bf16_", &rope_bf16_, "rotary embedding, in place (bf16)");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up (bf16)");
  m.def("write_kv_bf16", &write_kv_bf16, "store keys/values into cache slots (bf16)");
  m.def("decode_layers_bf16", &decode_layers_bf16, "all decoder layers of a 1-2 token step");
  m.def("quantized_linear", &quantized_linear,
        "y = x @ dequant(w).T for int8 (per row) or int4 (grouped) weights, bf16 x");
}
