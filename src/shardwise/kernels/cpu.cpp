// shardwise's CPU kernels (AVX2, and AVX-512 where the CPU has it): matrix products that read
// quantised weights directly, their dequantisation, decode attention over the paged KV pool,
// RMSNorm, SwiGLU and GeGLU, fp32 and packed-panel quantised products for batches, and a decode
// step through a shard's dense layers built from them.
//
// Weights come in blocks of 32 along each row. q8: int8 values, w = scale * q. q4: 16 bytes a
// block, element j in the low nibble of byte j and element j + 16 in its high nibble (GGUF's
// Q4_0/Q4_1 order), w = scale * q + min. Scales and mins: fp16 [rows, blocks], as in GGUF.
// Activations are rounded to int16 per block of 32 (scale = max|x| / 32767) so that a block's
// dot product is integer multiply-adds (two madd) instead of 32 FMAs on widened weights. (int8
// activations, as llama.cpp rounds them, cost SmolLM2-135M 2.6 % perplexity; int16 ~0.) The mins'
// term uses the exact fp32 block sums of x. Each weight block is unpacked once and multiplied
// into up to GROUP rows of x, so a step reads each byte once.
// Threads: torch's own pool (at::parallel_for, built with -fopenmp against torch's libgomp), so
// these never fight torch's threads for cores.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int GROUP = 4;
// Weight blocks are prefetched this far ahead of the product (into the next rows: a matrix's rows
// lie end to end). On an Intel Xeon the hardware's prefetcher alone kept one core's stream of blocks
// at ~7 GB/s, restarting at every 4 KB page; with this, a single-stream decode step of SmolLM2-135M
// int4 took 6.3 ms where it took 9.4 (the two interleaved; 2048 bytes ahead did as well, 512 half
// as well). (On an AMD EPYC, an earlier software prefetch had changed nothing.)
constexpr int64_t PREFETCH_BYTES = 4096;

inline void prefetch_at(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
inline void prefetch(const uint8_t* p) { prefetch_at(p + PREFETCH_BYTES); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x rounded to int16 per block, with each block's scale and exact sum.
struct QuantisedRows {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
};

QuantisedRows quantise_rows(const float* x, int64_t rows, int64_t cols) {
  const int64_t blocks = rows * cols / BLOCK;
  QuantisedRows out{std::vector<int16_t>(rows * cols), std::vector<float>(blocks), std::vector<float>(blocks)};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < blocks; b++) {
    const float* xb = x + b * BLOCK;
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      total = _mm256_add_ps(total, v[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 32767.0f;
    const __m256 inverse = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    for (int half = 0; half < 2; half++) {  // packs work within 128-bit lanes; the permute restores order
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * half], inverse));  // round to nearest
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * half + 1], inverse));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + b * BLOCK + 16 * half),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    out.scale[b] = d;
    out.sum[b] = hsum(total);
  }
  return out;
}

// 32 weights of a block as four vectors of fp32 values (before scale and min)
inline void widen(const uint8_t* q, bool q4, __m256 v[4]) {
  if (q4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i halves[2] = {_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask)};
    for (int i = 0; i < 4; i++)
      v[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(i % 2 ? _mm_srli_si128(halves[i / 2], 8) : halves[i / 2]));
  } else {
    for (int i = 0; i < 4; i++)
      v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
  }
}

// sum over blocks of min * (sum of x over the block): the mins' part of a q4 dot product
inline float min_term(const uint16_t* mins, const float* xsums, int64_t blocks) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + b))),
                          _mm256_loadu_ps(xsums + b), acc);
  float out = hsum(acc);
  for (; b < blocks; b++) out += _cvtsh_ss(mins[b]) * xsums[b];
  return out;
}

struct Weight {
  const uint8_t* qs;
  const uint16_t* scales;
  const uint16_t* mins;  // null for q8
  int64_t cols, row_bytes, blocks;
  bool q4;
};

// y[r, n] for the rows r of one group and weight rows [n0, n1).
template <bool Q4, int R>
void group_product(const Weight& w, const QuantisedRows& x, int64_t r0, int64_t n0, int64_t n1, float* y,
                   int64_t ldy, const float* bias) {
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  std::vector<float> factor(R * w.blocks);  // weight scale * x scale, per row and block
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* q = w.qs + n * w.row_bytes;
    const uint16_t* scale = w.scales + n * w.blocks;
    for (int r = 0; r < R; r++) {
      const float* xs = x.scale.data() + (r0 + r) * w.blocks;
      int64_t b = 0;
      for (; b + 8 <= w.blocks; b += 8)
        _mm256_storeu_ps(&factor[r * w.blocks + b],
                         _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + b))),
                                       _mm256_loadu_ps(xs + b)));
      for (; b < w.blocks; b++) factor[r * w.blocks + b] = _cvtsh_ss(scale[b]) * xs[b];
    }
    const int16_t* xq[R];
    const float* f[R];
    for (int r = 0; r < R; r++) xq[r] = x.q.data() + (r0 + r) * w.blocks * BLOCK, f[r] = &factor[r * w.blocks];
    // acc += dot(block b of the weight row, of each x row) * factor
    auto step = [&](int64_t b, __m256* acc) __attribute__((always_inline)) {
      __m256i w0, w1;  // elements 0-15 and 16-31 as int16
      if constexpr (Q4) {  // byte i holds elements i (low nibble) and i + 16: widen the bytes once, then split
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)));
        w0 = _mm256_and_si256(bytes, low4);
        w1 = _mm256_srli_epi16(bytes, 4);
      } else {
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16)));
      }
      for (int r = 0; r < R; r++) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq[r] + b * BLOCK);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(f[r] + b), acc[r]);
      }
    };
    __m256 even[R], odd[R];  // two chains of accumulators (even and odd blocks) hide the FMA latency
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= w.blocks; b += 2) {
      prefetch(q + b * (Q4 ? 16 : 32));  // (two q4 blocks are half a cache line, two q8 blocks one)
      step(b, even), step(b + 1, odd);
    }
    if (b < w.blocks) step(b, even);
    for (int r = 0; r < R; r++) {
      float out = hsum(_mm256_add_ps(even[r], odd[r])) + (bias ? bias[n] : 0.0f);
      if (w.mins) out += min_term(w.mins + n * w.blocks, x.sum.data() + (r0 + r) * w.blocks, w.blocks);
      y[(r0 + r) * ldy + n] = out;
    }
  }
}

template <bool Q4>
void product(const Weight& w, const QuantisedRows& x, int64_t rows_x, int64_t n0, int64_t n1, float* y,
             int64_t ldy, const float* bias) {
  for (int64_t r = 0; r < rows_x; r += GROUP) {
    switch (rows_x - r < GROUP ? rows_x - r : GROUP) {
      case 1: group_product<Q4, 1>(w, x, r, n0, n1, y, ldy, bias); break;
      case 2: group_product<Q4, 2>(w, x, r, n0, n1, y, ldy, bias); break;
      case 3: group_product<Q4, 3>(w, x, r, n0, n1, y, ldy, bias); break;
      default: group_product<Q4, GROUP>(w, x, r, n0, n1, y, ldy, bias); break;
    }
  }
}

Weight weight(int fmt, const uint8_t* qs, const uint16_t* scales, const uint16_t* mins, int64_t cols) {
  return Weight{qs, scales, mins, cols, fmt == 4 ? cols / 2 : cols, cols / BLOCK, fmt == 4};
}

// weight row n as fp32 into out[cols]
void dequantize_row(const Weight& w, int64_t n, float* out) {
  for (int64_t b = 0; b < w.blocks; b++) {
    __m256 v[4];
    const uint8_t* q = w.qs + n * w.row_bytes + b * (w.q4 ? 16 : 32);
    if (b % 2 == 0) prefetch(q);
    widen(q, w.q4, v);
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(w.scales[n * w.blocks + b]));
    const __m256 m = _mm256_set1_ps(w.mins ? _cvtsh_ss(w.mins[n * w.blocks + b]) : 0.0f);
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + b * BLOCK + 8 * i, _mm256_fmadd_ps(s, v[i], m));
  }
}

}  // namespace

extern "C" {

// y[rows_x, w_rows] = x[rows_x, cols] . W^T (+ bias); fmt 8 or 4; cols a multiple of 32.
void sw_quant_linear(int fmt, const float* x, int64_t rows_x, const uint8_t* qs, const uint16_t* scales,
                     const uint16_t* mins, int64_t w_rows, int64_t cols, const float* bias, float* y) {
  const Weight w = weight(fmt, qs, scales, mins, cols);
  const QuantisedRows xq = quantise_rows(x, rows_x, cols);
  at::parallel_for(0, w_rows, 16, [&](int64_t n0, int64_t n1) {
    if (w.q4) product<true>(w, xq, rows_x, n0, n1, y, w_rows, bias);
    else product<false>(w, xq, rows_x, n0, n1, y, w_rows, bias);
  });
}

// out[w_rows, cols] = the weights as fp32.
void sw_dequantize(int fmt, const uint8_t* qs, const uint16_t* scales, const uint16_t* mins, int64_t w_rows,
                   int64_t cols, float* out) {
  const Weight w = weight(fmt, qs, scales, mins, cols);
  at::parallel_for(0, w_rows, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) dequantize_row(w, n, out + n * cols);
  });
}

}  // extern "C"

// Decode attention straight from the paged KV pool: one new query token per sequence.
// keys, values: [kv_heads, pool_slots, dim]; slots: [seqs, longest] (int64, a sequence's first
// totals[s] entries valid). One task per (sequence, query head): its kv head's rows are read in
// place (no gather copies, no padding masks) and stay in cache for the other heads of the group.
// window > 0 limits a sequence to its last `window` tokens; softcap > 0 applies cap * tanh(score / cap).
namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float out = hsum(acc);
  for (; i < n; i++) out += a[i] * b[i];
  return out;
}

// the eight horizontal sums of a[0..7], as one vector
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// exp(x) for x <= 0: 2^k * p(r), k = round(x / ln 2), |r| <= ln(2) / 2, p of degree 6 (rel. error ~1e-7)
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below, exp underflows: 2^-126 is close enough to 0
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

// One (sequence, query head) of decode attention. DIM: the head size when known at compile
// time (loops unroll, accumulators stay in registers), else 0 and `runtime_dim`.
template <int DIM>
void attend_one(const float* qh, const float* kh, const float* vh, const int64_t* at, int64_t n,
                int64_t runtime_dim, float scale, float softcap, std::vector<float>& scores, float* o) {
  const int64_t dim = DIM ? DIM : runtime_dim;
  scores.resize(n + 8);
  int64_t p = 0;
  for (; p + 8 <= n && dim % 8 == 0; p += 8) {  // eight positions at a time, one reduction
    __m256 acc[8];
    for (int j = 0; j < 8; j++) {
      const float* k = kh + at[p + j] * dim;
      acc[j] = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k));
      for (int64_t i = 8; i < dim; i += 8) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), acc[j]);
    }
    _mm256_storeu_ps(&scores[p], _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
  }
  for (; p < n; p++) scores[p] = dot(qh, kh + at[p] * dim, dim) * scale;
  float peak = -INFINITY;
  for (p = 0; p < n; p++) {
    if (softcap > 0.0f) scores[p] = softcap * std::tanh(scores[p] / softcap);
    peak = scores[p] > peak ? scores[p] : peak;
  }
  for (p = n; p < n + 8; p++) scores[p] = -INFINITY;  // a whole last vector: its padding exps to ~0
  __m256 sum = _mm256_setzero_ps();
  for (p = 0; p < n; p += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(&scores[p]), _mm256_set1_ps(peak)));
    _mm256_storeu_ps(&scores[p], e);
    sum = _mm256_add_ps(sum, e);
  }
  const float inverse = 1.0f / hsum(sum);
  int64_t c = 0;
  for (; c + 64 <= dim; c += 64) {  // o = sum of weight * v, 64 dims at a time in registers
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (p = 0; p < n; p++) {
      const float* v = vh + at[p] * dim + c;
      const __m256 w = _mm256_set1_ps(scores[p]);
      for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + c + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(inverse)));
  }
  if constexpr (DIM % 64 != 0 || DIM == 0) {
    for (int64_t i = c; i < dim; i++) {  // dims past the last 64
      float total = 0.0f;
      for (p = 0; p < n; p++) total += scores[p] * vh[at[p] * dim + i];
      o[i] = total * inverse;
    }
  }
}

// o = x / rms(x) * weight over one row of dim values (o may be x)
inline void rms_norm_row(const float* xr, const float* weight, int64_t dim, float eps, float* o) {
  __m256 squares = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) squares = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + i), squares);
  float total = hsum(squares);
  for (; i < dim; i++) total += xr[i] * xr[i];
  const float inverse = 1.0f / std::sqrt(total / dim + eps);
  const __m256 iv = _mm256_set1_ps(inverse);
  for (i = 0; i + 8 <= dim; i += 8)
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), iv), _mm256_loadu_ps(weight + i)));
  for (; i < dim; i++) o[i] = xr[i] * inverse * weight[i];
}

// x rotated by RoPE (rotate-half, HF's convention) over its first `rotary` dims into out
inline void rope(const float* x, const float* cos, const float* sin, int64_t rotary, int64_t dim, float* out) {
  const int64_t half = rotary / 2;
  for (int64_t i = 0; i < half; i++) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
  for (int64_t i = rotary; i < dim; i++) out[i] = x[i];
}

}  // namespace

// A decode step's attention from its fused q/k/v projection: qkv [seqs, (heads + 2 kv_heads) * dim].
// Each head of q and k is RMS-normed first where q_norm / k_norm ([dim]) are given (Qwen3, Gemma 3),
// then RoPE (cos, sin: [seqs, rotary]) turns them; k and v are written into the pool at write_slots;
// then each query attends to its sequence's slots (its new token included).
extern "C" void sw_decode_attention(const float* qkv, const float* cos, const float* sin, int64_t rotary,
                                    float* keys, float* values, int64_t pool_slots, const int64_t* write_slots,
                                    const int64_t* slots, const int64_t* totals, int64_t seqs, int64_t longest,
                                    int64_t heads, int64_t kv_heads, int64_t dim, int64_t window, float scale,
                                    float softcap, const float* q_norm, const float* k_norm, float eps, float* out) {
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim;
  std::vector<float> q(seqs * heads * dim);
  at::parallel_for(0, seqs, 8, [&](int64_t s0, int64_t s1) {
    std::vector<float> normed(dim);
    // a head normed (into `normed`) where a norm is given, then turned into out
    auto turn = [&](const float* head, const float* norm, const float* c, const float* n, float* out) {
      if (norm) rms_norm_row(head, norm, dim, eps, normed.data());
      rope(norm ? normed.data() : head, c, n, rotary, dim, out);
    };
    for (int64_t s = s0; s < s1; s++) {
      const float *row = qkv + s * width, *c = cos + s * rotary, *n = sin + s * rotary;
      for (int64_t h = 0; h < heads; h++) turn(row + h * dim, q_norm, c, n, &q[(s * heads + h) * dim]);
      for (int64_t h = 0; h < kv_heads; h++) {
        const int64_t at = (h * pool_slots + write_slots[s]) * dim;
        turn(row + (heads + h) * dim, k_norm, c, n, keys + at);
        const float* v = row + (heads + kv_heads + h) * dim;
        std::copy(v, v + dim, values + at);
      }
    }
  });
  // a second thread pays off from a few hundred (position, head) pairs (on a 2-core Xeon a single
  // stream's step at 400 positions: 10.4 ms with attention on one thread, 7.2 on two)
  const int64_t grain = (256 + longest - 1) / (longest > 0 ? longest : 1);
  at::parallel_for(0, seqs * heads, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; t++) {
      const int64_t s = t / heads, kv = t % heads / group;
      const int64_t end = totals[s], start = window > 0 && end > window ? end - window : 0;
      const float *kh = keys + kv * pool_slots * dim, *vh = values + kv * pool_slots * dim;
      const int64_t* at = slots + s * longest + start;
      const float* qh = &q[t * dim];
      switch (dim) {
        case 64: attend_one<64>(qh, kh, vh, at, end - start, dim, scale, softcap, scores, out + t * dim); break;
        case 128: attend_one<128>(qh, kh, vh, at, end - start, dim, scale, softcap, scores, out + t * dim); break;
        default: attend_one<0>(qh, kh, vh, at, end - start, dim, scale, softcap, scores, out + t * dim);
      }
    }
  });
}

// out = x / rms(x) * weight, per row of x [rows, dim]
extern "C" void sw_rms_norm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) rms_norm_row(x + r * dim, weight, dim, eps, out + r * dim);
  });
}

// A gated MLP's middle: out[r, i] = act(g) * u for gate_up[r] = [g (inter values), u (inter values)], one
// pass instead of torch's three (the activation, a copy of the gate half, the product). Both
// activations are g * sigmoid(z): SwiGLU's silu with z = g, GeGLU's tanh-approximated gelu with
// z = 2 sqrt(2 / pi) (g + 0.044715 g^3) (as 0.5 (1 + tanh(y)) = sigmoid(2 y)); sigmoid from
// e = exp(-|z|): 1 / (1 + e) for z >= 0, e / (1 + e) below.
template <bool GELU>
void gated(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  constexpr float K0 = 1.5957691216057308f, K1 = 0.044715f;  // 2 sqrt(2 / pi), gelu's cubic term
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    for (int64_t r = r0; r < r1; r++) {
      const float* g = gate_up + r * 2 * inter;
      const float* u = g + inter;
      float* o = out + r * inter;
      int64_t i = 0;
      for (; i + 8 <= inter; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        __m256 z = x;
        if constexpr (GELU)
          z = _mm256_mul_ps(_mm256_set1_ps(K0), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(K1), x),
                                                                _mm256_mul_ps(x, x), x));
        const __m256 e = exp_nonpositive(_mm256_or_ps(z, sign));  // exp(-|z|)
        const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, z), _mm256_add_ps(one, e));  // sign bit picks e
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(u + i)));
      }
      for (; i < inter; i++) {
        const float z = GELU ? K0 * (K1 * g[i] * g[i] * g[i] + g[i]) : g[i];
        o[i] = g[i] / (1.0f + std::exp(-z)) * u[i];
      }
    }
  });
}

extern "C" void sw_silu_mul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  gated<false>(gate_up, rows, inter, out);
}

extern "C" void sw_gelu_mul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  gated<true>(gate_up, rows, inter, out);
}

// y[rows, n] = x[rows, k] . W[n, k]^T (+ bias) in fp32, for the few-row products of decode steps. Each
// tile of R rows of x by NW rows of W keeps R x NW accumulators in registers over k, so every
// weight load feeds R FMAs and every x load NW: fp32 FMAs at close to the core's peak, where a
// BLAS's GEMM, shaped for large products, reaches a third of it on 8-64 rows here.
namespace {

template <int R, int NW>
void f32_tile(const float* x, int64_t k, const float* w, const float* bias, float* y, int64_t ldy) {
  __m256 acc[R][NW];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < NW; j++) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 wv[NW];
    for (int j = 0; j < NW; j++) wv[j] = _mm256_loadu_ps(w + j * k + i);
    for (int r = 0; r < R; r++) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int j = 0; j < NW; j++) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int j = 0; j < NW; j++) {
      float out = hsum(acc[r][j]) + (bias ? bias[j] : 0.0f);
      for (int64_t t = i; t < k; t++) out += x[r * k + t] * w[j * k + t];
      y[r * ldy + j] = out;
    }
}

template <int NW>
void f32_column(const float* x, int64_t rows, int64_t k, const float* w, const float* bias, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) f32_tile<3, NW>(x + r * k, k, w, bias, y + r * ldy, ldy);
  if (rows - r == 2) f32_tile<2, NW>(x + r * k, k, w, bias, y + r * ldy, ldy);
  if (rows - r == 1) f32_tile<1, NW>(x + r * k, k, w, bias, y + r * ldy, ldy);
}

constexpr int64_t NW = 4;  // weight rows per tile

// The same tile in AVX-512 where the CPU has it (twice the FMAs an instruction, 32 registers: 6 rows
// of x a tile), compiled for that target alone and picked at run time.
#define AVX512 __attribute__((target("avx512f,fma")))

template <int R, int W>
AVX512 void f32_tile512(const float* x, int64_t k, const float* w, const float* bias, float* y, int64_t ldy) {
  __m512 acc[R][W];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < W; j++) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[W];
    for (int j = 0; j < W; j++) wv[j] = _mm512_loadu_ps(w + j * k + i);
    for (int r = 0; r < R; r++) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + i);
      for (int j = 0; j < W; j++) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int j = 0; j < W; j++) {
      float out = _mm512_reduce_add_ps(acc[r][j]) + (bias ? bias[j] : 0.0f);
      for (int64_t t = i; t < k; t++) out += x[r * k + t] * w[j * k + t];
      y[r * ldy + j] = out;
    }
}

template <int W>
AVX512 void f32_column512(const float* x, int64_t rows, int64_t k, const float* w, const float* bias, float* y,
                          int64_t ldy) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) f32_tile512<6, W>(x + r * k, k, w, bias, y + r * ldy, ldy);
  switch (rows - r) {
    case 5: f32_tile512<5, W>(x + r * k, k, w, bias, y + r * ldy, ldy); break;
    case 4: f32_tile512<4, W>(x + r * k, k, w, bias, y + r * ldy, ldy); break;
    case 3: f32_tile512<3, W>(x + r * k, k, w, bias, y + r * ldy, ldy); break;
    case 2: f32_tile512<2, W>(x + r * k, k, w, bias, y + r * ldy, ldy); break;
    case 1: f32_tile512<1, W>(x + r * k, k, w, bias, y + r * ldy, ldy); break;
  }
}

const bool HAS_AVX512 = __builtin_cpu_supports("avx512f");

// y[:, j:j+width] from weight rows w[width, k] (width <= NW)
void f32_columns(const float* x, int64_t rows, int64_t k, const float* w, int64_t width, const float* bias,
                 float* y, int64_t ldy) {
  if (HAS_AVX512 && width == NW) return f32_column512<NW>(x, rows, k, w, bias, y, ldy);
  switch (width) {
    case 4: f32_column<4>(x, rows, k, w, bias, y, ldy); break;
    case 3: f32_column<3>(x, rows, k, w, bias, y, ldy); break;
    case 2: f32_column<2>(x, rows, k, w, bias, y, ldy); break;
    default: f32_column<1>(x, rows, k, w, bias, y, ldy);
  }
}

}  // namespace

extern "C" void sw_linear_f32(const float* x, int64_t rows, const float* w, int64_t n, int64_t k, const float* bias,
                              float* y) {
  at::parallel_for(0, (n + NW - 1) / NW, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t j = t * NW;
      f32_columns(x, rows, k, w + j * k, n - j < NW ? n - j : NW, bias ? bias + j : nullptr, y + j, n);
    }
  });
}

// Batched products from quantised weights on AVX-512: outer products over packed panels. x is packed
// once a call as x^T [k, rows rounded up to 16]; each panel of PANEL weight rows is dequantised a
// block of KC columns at a time into a buffer that stays in L1, and for every k each weight is
// broadcast into V vectors of 16 rows' accumulators: V x PANEL FMAs for V + PANEL loads, no
// horizontal sums, and every output summed over k in order, whatever the number of rows.
namespace {

constexpr int PANEL = 12;      // weight rows a panel: 2 x 12 accumulators of 32 registers
constexpr int64_t KC = 256;    // columns a block: the panel's block (12 KB) and x^T's (32 KB at 32 rows)

// the panel's rows [n0, n0 + width) over columns [c0, c0 + kc) as fp32 into out[PANEL][KC]
template <bool Q4, bool MINS>
AVX512 void dequantize_block(const Weight& w, int64_t n0, int64_t width, int64_t c0, int64_t kc, float* out) {
  constexpr int64_t BYTES = Q4 ? 16 : 32;  // a block's
  const int64_t blocks = kc / BLOCK, first = c0 / BLOCK;
  for (int64_t p = 0; p < width; p++) {
    const uint8_t* row = w.qs + (n0 + p) * w.row_bytes;
    const uint8_t* q = row + first * BYTES;
    const uint16_t* scale = w.scales + (n0 + p) * w.blocks + first;
    const uint16_t* min = MINS ? w.mins + (n0 + p) * w.blocks + first : nullptr;
    float* o = out + p * KC;
    // the row's next block (after its last, the next panel's row) on its way while this one computes
    const uint8_t* next = c0 + kc < w.cols ? q + blocks * BYTES : row + PANEL * w.row_bytes;
    for (int64_t line = 0; line < blocks * BYTES; line += 64) prefetch_at(next + line);
    for (int64_t b = 0; b < blocks; b++, o += BLOCK) {
      __m512 lo, hi;  // elements 0-15 and 16-31
      if constexpr (Q4) {  // byte i: element i in the low nibble, i + 16 in the high
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + BYTES * b)));
        lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)));
        hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      } else {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + BYTES * b))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + BYTES * b + 16))));
      }
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale[b]));
      const __m512 m = _mm512_set1_ps(MINS ? _cvtsh_ss(min[b]) : 0.0f);
      _mm512_storeu_ps(o, _mm512_fmadd_ps(s, lo, m));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(s, hi, m));
    }
  }
  for (int64_t p = width; p < PANEL; p++) std::fill(out + p * KC, out + p * KC + kc, 0.0f);
}

// acc[V vectors of rows][PANEL] (kept in memory between blocks) += x^T[kc, V * 16] * panel^T
template <int V>
AVX512 void panel_block(const float* xt, int64_t ldx, const float* panel, int64_t kc, float* acc) {
  __m512 a[V][PANEL];
  for (int v = 0; v < V; v++)
    for (int p = 0; p < PANEL; p++) a[v][p] = _mm512_loadu_ps(acc + (v * PANEL + p) * 16);
  for (int64_t i = 0; i < kc; i++) {
    __m512 xv[V];
    for (int v = 0; v < V; v++) xv[v] = _mm512_loadu_ps(xt + i * ldx + 16 * v);
    for (int p = 0; p < PANEL; p++) {
      const __m512 wv = _mm512_set1_ps(panel[p * KC + i]);
      for (int v = 0; v < V; v++) a[v][p] = _mm512_fmadd_ps(xv[v], wv, a[v][p]);
    }
  }
  for (int v = 0; v < V; v++)
    for (int p = 0; p < PANEL; p++) _mm512_storeu_ps(acc + (v * PANEL + p) * 16, a[v][p]);
}

AVX512 void panel_product(const Weight& w, const float* x, int64_t rows, int64_t n, int64_t k, const float* bias,
                          float* y) {
  const int64_t ldx = (rows + 15) / 16 * 16, vectors = ldx / 16;
  const auto dequantize = w.q4 ? (w.mins ? dequantize_block<true, true> : dequantize_block<true, false>)
                               : dequantize_block<false, false>;
  // buffers kept from call to call (torch's pool threads persist): every element is written before it is read
  static thread_local std::vector<float> packed;
  packed.resize(k * ldx);
  const float* const xt = packed.data();  // (the pool's threads read this thread's buffer)
  for (int64_t i = 0; i < k; i++) {
    float* column = packed.data() + i * ldx;
    for (int64_t r = 0; r < rows; r++) column[r] = x[r * k + i];
    std::fill(column + rows, column + ldx, 0.0f);
  }
  at::parallel_for(0, (n + PANEL - 1) / PANEL, 1, [&](int64_t t0, int64_t t1) {
    static thread_local std::vector<float> panel, acc;
    panel.resize(PANEL * KC), acc.resize(vectors * PANEL * 16);
    for (int64_t t = t0; t < t1; t++) {
      const int64_t n0 = t * PANEL, width = std::min<int64_t>(PANEL, n - n0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c0 = 0; c0 < k; c0 += KC) {
        const int64_t kc = std::min(KC, k - c0);
        dequantize(w, n0, width, c0, kc, panel.data());
        int64_t v = 0;
        for (; v + 2 <= vectors; v += 2) panel_block<2>(xt + c0 * ldx + 16 * v, ldx, panel.data(), kc,
                                                        acc.data() + v * PANEL * 16);
        if (v < vectors) panel_block<1>(xt + c0 * ldx + 16 * v, ldx, panel.data(), kc,
                                        acc.data() + v * PANEL * 16);
      }
      for (int64_t r = 0; r < rows; r++)
        for (int64_t p = 0; p < width; p++)
          y[r * n + n0 + p] = acc[((r / 16) * PANEL + p) * 16 + r % 16] + (bias ? bias[n0 + p] : 0.0f);
    }
  });
}

}  // namespace

// Whether sw_quant_linear_f32 runs the packed panels (faster than dequantising for MKL up to ~256 rows).
extern "C" int sw_packed_panels() { return HAS_AVX512; }

// The same product from quantised weights (fmt 8 or 4, as sw_quant_linear), for batches: on AVX-512
// the packed panels above; on AVX2 each tile's NW weight rows are dequantised into a buffer that
// stays in L1 and multiplied with every row of x in fp32. Either way a batch pays the
// dequantisation once per weight and reads a quarter of fp32's bytes.
extern "C" void sw_quant_linear_f32(int fmt, const float* x, int64_t rows, const uint8_t* qs, const uint16_t* scales,
                                    const uint16_t* mins, int64_t n, int64_t k, const float* bias, float* y) {
  const Weight w = weight(fmt, qs, scales, mins, k);
  if (HAS_AVX512) {  // in runs of rows whose x^T (up to 1 MB) stays in L2 for every panel
    const int64_t run = std::max<int64_t>(16, (int64_t{1} << 18) / k / 16 * 16);
    for (int64_t r = 0; r < rows; r += run) panel_product(w, x + r * k, std::min(run, rows - r), n, k, bias, y + r * n);
    return;
  }
  at::parallel_for(0, (n + NW - 1) / NW, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(NW * k);
    for (int64_t t = t0; t < t1; t++) {
      const int64_t j = t * NW, width = n - j < NW ? n - j : NW;
      for (int64_t r = 0; r < width; r++) dequantize_row(w, j + r, tile.data() + r * k);
      f32_columns(x, rows, k, tile.data(), width, bias ? bias + j : nullptr, y + j, n);
    }
  });
}

// A pure decode step (one new token per sequence) through a run of plain decoder layers in one call:
// pre-norm attention and a SwiGLU MLP, each matrix fp32 (fmt 0) or quantised blocks (fmt 8 / 4),
// products picked as the Python side picks them. The same kernels as op-by-op, minus ~10 Python
// calls a layer (a third of a single-stream step on this model).
struct Matrix {
  int64_t fmt;  // 0: fp32 [n, k] in data; 8 / 4: blocks (qs in data)
  const void* data;
  const uint16_t *scales, *mins;
  int64_t n, k;
};

struct DecodeLayer {
  const float *attn_norm, *mlp_norm, *qkv_bias;
  Matrix qkv, o, gate_up, down;
  int64_t heads, kv_heads, dim, window;
  float eps, scale, softcap;
  const float *q_norm, *k_norm, *post_attn_norm, *post_mlp_norm;  // each null where the layer has none
  int64_t gelu, local;  // GeGLU (else SwiGLU); the local RoPE (Gemma 3's sliding layers; else the global)
};

struct DecodeStep {
  const float *cos, *sin;
  int64_t rotary;
  const float *local_cos, *local_sin;  // null where no layer turns by the local RoPE
  int64_t local_rotary;
  float* kv;  // the shard's pool [layers, 2, kv_heads, pool_slots, dim]
  int64_t pool_slots;
  const int64_t *write_slots, *slots, *totals;
  int64_t seqs, longest, direct_rows;
};

namespace {

void matmul(const Matrix& m, const float* x, int64_t rows, int64_t direct_rows, const float* bias, float* y) {
  const auto* qs = static_cast<const uint8_t*>(m.data);
  if (m.fmt == 0) sw_linear_f32(x, rows, static_cast<const float*>(m.data), m.n, m.k, bias, y);
  else if (rows <= direct_rows) sw_quant_linear(m.fmt, x, rows, qs, m.scales, m.mins, m.n, m.k, bias, y);
  else sw_quant_linear_f32(m.fmt, x, rows, qs, m.scales, m.mins, m.n, m.k, bias, y);
}

void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

}  // namespace

// x [seqs, hidden]: the residual stream, updated in place.
extern "C" void sw_decode_layers(const DecodeLayer* layers, int64_t count, const DecodeStep* step, int64_t hidden,
                                 float* x) {
  const int64_t seqs = step->seqs;
  std::vector<float> normed(seqs * hidden), out(seqs * hidden), qkv, attended, gate_up, middle;
  for (int64_t l = 0; l < count; l++) {
    const DecodeLayer& L = layers[l];
    const int64_t head_slots = L.kv_heads * step->pool_slots * L.dim;
    float* keys = step->kv + 2 * l * head_slots;
    qkv.resize(seqs * L.qkv.n);
    attended.resize(seqs * L.heads * L.dim);
    gate_up.resize(seqs * L.gate_up.n);
    middle.resize(seqs * L.gate_up.n / 2);
    sw_rms_norm(x, L.attn_norm, seqs, hidden, L.eps, normed.data());
    matmul(L.qkv, normed.data(), seqs, step->direct_rows, L.qkv_bias, qkv.data());
    sw_decode_attention(qkv.data(), L.local ? step->local_cos : step->cos, L.local ? step->local_sin : step->sin,
                        L.local ? step->local_rotary : step->rotary, keys, keys + head_slots, step->pool_slots,
                        step->write_slots, step->slots, step->totals, seqs, step->longest, L.heads, L.kv_heads, L.dim,
                        L.window, L.scale, L.softcap, L.q_norm, L.k_norm, L.eps, attended.data());
    matmul(L.o, attended.data(), seqs, step->direct_rows, nullptr, out.data());
    if (L.post_attn_norm) sw_rms_norm(out.data(), L.post_attn_norm, seqs, hidden, L.eps, out.data());
    add_into(x, out.data(), seqs * hidden);
    sw_rms_norm(x, L.mlp_norm, seqs, hidden, L.eps, normed.data());
    matmul(L.gate_up, normed.data(), seqs, step->direct_rows, nullptr, gate_up.data());
    (L.gelu ? sw_gelu_mul : sw_silu_mul)(gate_up.data(), seqs, L.gate_up.n / 2, middle.data());
    matmul(L.down, middle.data(), seqs, step->direct_rows, nullptr, out.data());
    if (L.post_mlp_norm) sw_rms_norm(out.data(), L.post_mlp_norm, seqs, hidden, L.eps, out.data());
    add_into(x, out.data(), seqs * hidden);
  }
}
