// Matrix-vector products with int8 (group-wise scales), bfloat16 or float32 weights, and one GPT block's
// decode step (decode_block), for decoding on the CPU.
//
// Explained with llm_from_scratch/quantize.py, which builds this file on first use and checks every
// result against its plain reference (dequantize the weights, then F.linear). A decode step
// multiplies a few token vectors x (M, K), float32, by every weight matrix W (N, K): each weight is
// read once, so the speed is set by how many bytes the weights take. The weights are turned into
// float32 on the fly, in registers (never written back to memory), and multiplied with every one
// of the M vectors while they are there; the sums are float32. For one vector (M = 1, batch-1
// decoding) each row is read front to back on its own, and bfloat16 and int8 weights are widened
// by shifts within each 32-bit lane, without shuffles, against a copy of the vector whose elements
// are reordered to match (even and odd elements; four phases).
//
//   int8:  W[n, k] = q[n, k] * s[n, k / G]   q int8 in [-127, 127], s float16, G the group size
//   bf16:  W[n, k] = the bfloat16 weight widened to float32 (exact: its top 16 bits)
//   fp32:  W[n, k] as it is (the same loops, so that float32 weights get the same prefetching and threads)
//   w8a8:  the int8 weights as above, and each token vector quantized the same way, per group of G:
//          x[k] ~= p[k] * t[k / G], t = max |x| / 127 over the group (float32), p = round(x / t)
//          in [-127, 127]; a group's products are summed in int32, then scaled once by s * t
//          (llama.cpp's q8_0 x q8_0 dot product). With AVX-512 VNNI one vpdpbusd multiplies 64
//          pairs of bytes and adds them in fours: about 6 instructions per 64 weights and vector,
//          against 16 for widening every int8 weight to float32.
//
// Output rows are shared among PyTorch's threads (at::parallel_for, OpenMP). With AVX-512 (the
// course's AMD EPYC and Intel Xeon machines) the inner loop uses 512-bit registers; elsewhere
// plain loops that the compiler vectorises for whatever the CPU has. What it does not do:
// gradients, or anything but the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
// AVX-512 F, BW and VL (x86-64-v4): every AVX-512 processor since Skylake-SP
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LLMFS_AVX512 1
#else
#define LLMFS_AVX512 0
#endif
#if LLMFS_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMFS_VNNI 1
#else
#define LLMFS_VNNI 0
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // token vectors per pass over a weight row (more: several passes)
// Ask for the weights this far ahead of the ones being multiplied: one core's hardware prefetcher
// alone keeps too few reads in flight (without it: 7.5 GB/s of int8 weights on one core of the
// course's machine, with it 15-21, a plain torch sum reads 21; benchmarks/RESULTS.md). With the
// weights on 2 MiB pages (quantize._huge_page_copy) 16 KiB ahead reads float32 best (28-30 GB/s on
// two threads against 28 at 8 KiB, 28 at 24 KiB and 28 at 32 KiB). -DLLMFS_PREFETCH_BYTES=N builds
// another distance.
#ifndef LLMFS_PREFETCH_BYTES
#define LLMFS_PREFETCH_BYTES 16384
#endif
constexpr int64_t kPrefetchBytes = LLMFS_PREFETCH_BYTES;

#if defined(__F16C__)
// One instruction (F16C) instead of c10::Half's bit manipulation: a scale per group is converted
// for every row, in the inner loop of int8_rows.
inline float half_to_float(const at::Half h) { return _cvtsh_ss(h.x); }
#else
inline float half_to_float(const at::Half h) { return static_cast<float>(h); }
#endif

#if LLMFS_AVX512
// 16 int8 weights -> 16 floats
inline __m512 load_int8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 16 bfloat16 weights -> 16 floats: a bfloat16 is the top half of a float32
inline __m512 load_bf16(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// The float32 sum of four vectors of partial sums, for one output.
inline float sum4(const __m512 acc[4]) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}
// Up to 16 float16 scales (n of them, the rest 0) as float32: sixteen groups' scales at once.
inline __m512 load_scales(const at::Half* s, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), s));
}
// Groups of 32 two per 64-byte load: lanes 0-7 take the scale at index 2i of a vector of sixteen
// groups' scales, lanes 8-15 the one at 2i + 1 (start here, add 2 per load; _mm512_permutexvar_ps).
inline __m512i pair_index() { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }

// R weight rows times M vectors: R * M accumulators, so that enough FMA chains run side by side
// and each load of x serves R rows.
template <int R, int M>
void int8_rows(const int8_t* q, const at::Half* s, const float* x, float* y, const float* b, int64_t n, int64_t N,
               int64_t K, int64_t G, int64_t x_stride) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t groups = K / G;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 scale[R];
    for (int r = 0; r < R; ++r) {
      scale[r] = _mm512_set1_ps(half_to_float(s[(n + r) * groups + g]));
      _mm_prefetch(reinterpret_cast<const char*>(q + (n + r) * K + g * G) + kPrefetchBytes, _MM_HINT_T0);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_mul_ps(load_int8(q + (n + r) * K + k), scale[r]);  // q * s: exact in float32
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * x_stride + k), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (b ? b[n + r] : 0.f);
}

// 16 float32 weights as they are (the dense loops below load either format through load_dense)
inline __m512 load_dense(const uint16_t* p) { return load_bf16(p); }
inline __m512 load_dense(const float* p) { return _mm512_loadu_ps(p); }

// bfloat16 (T = uint16_t) or float32 weights: as int8_rows without the scales.
template <typename T, int R, int M>
void dense_rows(const T* w, const float* x, float* y, const float* b, int64_t n, int64_t N, int64_t K, int64_t x_stride) {
  constexpr int64_t kPerLine = 64 / sizeof(T);  // weights per 64-byte cache line: one prefetch each
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    for (int r = 0; r < R; ++r) {
      if (k % kPerLine == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 wv = load_dense(w + (n + r) * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * x_stride + k), acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (b ? b[n + r] : 0.f);
}

// One vector (M = 1): each row read front to back on its own, with four sums side by side along
// it, so that each thread streams one run of memory (rows side by side read four runs at once).
template <typename T>
void dense_row_one(const T* w, const float* x, float* y, const float* b, int64_t n, int64_t K) {
  constexpr int64_t kPerLine = 64 / sizeof(T);
  const T* row = w + n * K;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int64_t line = 0; line < 64; line += kPerLine)
      _mm_prefetch(reinterpret_cast<const char*>(row + k + line) + kPrefetchBytes, _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(load_dense(row + k + 16 * j), _mm512_loadu_ps(x + k + 16 * j), acc[j]);
  }
  for (; k < K; k += 16) acc[0] = _mm512_fmadd_ps(load_dense(row + k), _mm512_loadu_ps(x + k), acc[0]);
  y[n] = sum4(acc) + (b ? b[n] : 0.f);
}

// bfloat16, one vector: 32 weights per load, widened without a shuffle. In each 32-bit lane the
// low half is an even-numbered weight and the high half the next, odd one; shifting the lane left
// by 16 gives the even weight as a float32, masking off the low half gives the odd one. So the
// vector is split once per product into its even and odd elements (xs: K / 2 of each) and every
// load serves two FMAs, with one shift or one and each: no vpmovzxwd, which crosses lanes.
inline void split_even_odd(const float* x, int64_t K, float* xs) {
  for (int64_t k = 0; k < K / 2; ++k) {
    xs[k] = x[2 * k];
    xs[K / 2 + k] = x[2 * k + 1];
  }
}

inline void bf16_row_split(const uint16_t* w, const float* xs, float* y, const float* b, int64_t n, int64_t K) {
  const uint16_t* row = w + n * K;
  const float* xe = xs;
  const float* xo = xs + K / 2;
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0; k < K; k += 64) {  // 64 weights: two loads of 32, each two FMAs of 16
    _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + k + 32) + kPrefetchBytes, _MM_HINT_T0);
    for (int j = 0; j < 2; ++j) {
      const __m512i pairs = _mm512_loadu_si512(row + k + 32 * j);
      const int64_t i = k / 2 + 16 * j;
      acc[2 * j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), _mm512_loadu_ps(xe + i), acc[2 * j]);
      acc[2 * j + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(pairs, high)), _mm512_loadu_ps(xo + i), acc[2 * j + 1]);
    }
  }
  y[n] = sum4(acc) + (b ? b[n] : 0.f);
}

// int8 weights, one vector, G = 32: 64 weights per load, widened without a shuffle. Lane i of the
// load holds weights 4i .. 4i + 3; shifting the lane left by 24 - 8j, then arithmetically right by
// 24, gives weight 4i + j as a signed int32. So the vector is split once per product into four
// phases (x4[j][i] = x[4i + j], K / 4 each); each phase's 16 products are summed into one vector
// whose lanes 0-7 belong to the load's first group of 32 and lanes 8-15 to the second, and that
// vector is scaled by its two groups' scales (sixteen groups' scales are converted at once).
inline void split_phases(const float* x, int64_t K, float* x4) {
  for (int64_t i = 0; i < K / 4; ++i)
    for (int j = 0; j < 4; ++j) x4[j * (K / 4) + i] = x[4 * i + j];
}

inline void int8_row_phases(const int8_t* q, const at::Half* s, const float* x4, float* y, const float* b, int64_t n,
                            int64_t K) {
  const int8_t* row = q + n * K;
  const at::Half* sr = s + n * (K / 32);
  const int64_t Q = K / 4;
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g0 = 0; g0 < K / 32; g0 += 16) {
    const int64_t groups = std::min<int64_t>(16, K / 32 - g0);  // even: K % 64 == 0
    const __m512 scales = load_scales(sr + g0, groups);
    __m512i index = pair_index();
    for (int64_t j = 0; j < groups; j += 2, index = _mm512_add_epi32(index, _mm512_set1_epi32(2))) {
      const int64_t k = (g0 + j) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(row + k);
      const int64_t i = k / 4;
      __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24)), _mm512_loadu_ps(x4 + i));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16), 24)), _mm512_loadu_ps(x4 + Q + i), t);
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 8), 24)), _mm512_loadu_ps(x4 + 2 * Q + i), t);
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(w, 24)), _mm512_loadu_ps(x4 + 3 * Q + i), t);
      acc[j / 2 % 2] = _mm512_fmadd_ps(t, _mm512_permutexvar_ps(index, scales), acc[j / 2 % 2]);
    }
  }
  y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + (b ? b[n] : 0.f);
}

// int8 weights, one vector, any group size (a multiple of 16): rows one at a time, as dense_row_one.
inline void int8_row_one(const int8_t* q, const at::Half* s, const float* x, float* y, const float* b, int64_t n,
                         int64_t K, int64_t G) {
  const int8_t* row = q + n * K;
  const at::Half* sr = s + n * (K / G);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int j = 0;
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 scale = _mm512_set1_ps(half_to_float(sr[g]));
    for (int64_t k = g * G; k < (g + 1) * G; k += 16, j = (j + 1) & 3) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(load_int8(row + k), scale), _mm512_loadu_ps(x + k), acc[j]);
    }
  }
  y[n] = sum4(acc) + (b ? b[n] : 0.f);
}

// Rows n0..n1 for M vectors: R rows at a time (fewer rows when M is large), then the leftover rows.
template <int M>
void int8_block(const int8_t* q, const at::Half* s, const float* x, float* y, const float* b, int64_t n0, int64_t n1, int64_t N,
                int64_t K, int64_t G, int64_t x_stride) {
  constexpr int R = M <= 4 ? 4 : 2;  // at most 16 accumulators (of 32 registers)
  int64_t n = n0;
  if (M == 1) {
    for (; n < n1; ++n) int8_row_one(q, s, x, y, b, n, K, G);
    return;
  }
  for (; n + R <= n1; n += R) int8_rows<R, M>(q, s, x, y, b, n, N, K, G, x_stride);
  for (; n < n1; ++n) int8_rows<1, M>(q, s, x, y, b, n, N, K, G, x_stride);
}

template <typename T, int M>
void dense_block(const T* w, const float* x, float* y, const float* b, int64_t n0, int64_t n1, int64_t N, int64_t K,
                 int64_t x_stride) {
  constexpr int R = M <= 4 ? 4 : 2;
  int64_t n = n0;
  if (M == 1) {
    for (; n < n1; ++n) dense_row_one<T>(w, x, y, b, n, K);
    return;
  }
  for (; n + R <= n1; n += R) dense_rows<T, R, M>(w, x, y, b, n, N, K, x_stride);
  for (; n < n1; ++n) dense_rows<T, 1, M>(w, x, y, b, n, N, K, x_stride);
}

template <typename F>
void dispatch_rows(int64_t m, F&& f) {  // call f with M as a compile-time constant
  switch (m) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}
#endif

// Plain loops: the same sums, for CPUs without AVX-512 (and for K or G not a multiple of 16).
void int8_plain(const int8_t* q, const at::Half* s, const float* x, float* y, const float* b, int64_t n0, int64_t n1, int64_t M,
                int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = half_to_float(s[n * groups + g]);
        for (int64_t k = g * G; k < (g + 1) * G; ++k) total += static_cast<float>(q[n * K + k]) * scale * x[m * K + k];
      }
      y[m * N + n] = total + (b ? b[n] : 0.f);
    }
}

void bf16_plain(const uint16_t* w, const float* x, float* y, const float* b, int64_t n0, int64_t n1, int64_t M, int64_t N,
                int64_t K) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t bits = static_cast<uint32_t>(w[n * K + k]) << 16;
        float wf;
        std::memcpy(&wf, &bits, sizeof wf);
        total += wf * x[m * K + k];
      }
      y[m * N + n] = total + (b ? b[n] : 0.f);
    }
}

void f32_plain(const float* w, const float* x, float* y, const float* b, int64_t n0, int64_t n1, int64_t M, int64_t N,
               int64_t K) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) total += w[n * K + k] * x[m * K + k];
      y[m * N + n] = total + (b ? b[n] : 0.f);
    }
}


// ---- w8a8: int8 weights times int8 token vectors -------------------------------------------------
// One token vector x (K floats) quantized per group of G: p (K) int8 and t (K / G) float32. The
// same arithmetic as quantize.quantize_activations: t = amax / 127, then round(x * (1 / t)),
// to nearest even (the default rounding mode), so that both give the same bytes.
void quantize_vector(const float* x, int64_t K, int64_t G, int8_t* p, float* t) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float* xg = x + g * G;
    int64_t k = 0;
    float amax = 0.f;
#if LLMFS_AVX512
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= G; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; k < G; ++k) amax = std::max(amax, std::fabs(xg[k]));
    const float scale = amax / 127.f;
    const float inverse = scale != 0.f ? 1.f / scale : 0.f;
    k = 0;
#if LLMFS_AVX512
    // vcvtps2dq rounds in the default mode, to nearest even, as std::rint below and torch.round
    const __m512 vinv = _mm512_set1_ps(inverse);
    for (; k + 16 <= G; k += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), vinv));  // in [-127, 127]
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + g * G + k), _mm512_cvtepi32_epi8(v));
    }
#endif
    for (; k < G; ++k) p[g * G + k] = static_cast<int8_t>(std::rint(xg[k] * inverse));  // in [-127, 127]
    t[g] = scale;
  }
}

// One weight row (K int8, scales s per group) times one quantized vector, in plain loops.
float w8a8_dot_plain(const int8_t* q, const at::Half* s, const int8_t* p, const float* t, int64_t K, int64_t G) {
  float total = 0.f;
  for (int64_t g = 0; g < K / G; ++g) {
    int32_t dot = 0;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += static_cast<int32_t>(q[k]) * static_cast<int32_t>(p[k]);
    total += static_cast<float>(dot) * (half_to_float(s[g]) * t[g]);
  }
  return total;
}

#if LLMFS_VNNI
// vpdpbusd multiplies unsigned by signed bytes and adds each four products into an int32 lane. The
// weights are made unsigned by flipping their top bit (q + 128, one xor), and each lane starts from
// -128 times the sum of its four vector bytes (lanes, below), so that it ends at exactly the sum
// of its four q * p. (Taking 128 * sum(p) off once per group instead would leave lanes 128 times
// larger than their sums, which float32 then rounds worse.) 64 products -> the 16 int32 lanes.
// half: the first 32 bytes only (the rest, and lanes 8-15, count as zero).
inline __m512i dot_bytes(const __m512i w, const int8_t* p, const int32_t* lanes, bool half = false) {
  const __m512i start = _mm512_maskz_loadu_epi32(half ? 0x00ff : 0xffff, lanes);
  return _mm512_dpbusd_epi32(start, w, _mm512_maskz_loadu_epi8(half ? 0xffffffffull : ~0ull, p));
}
inline __m512i flipped(const int8_t* q, bool half = false) {  // 64 weights + 128, as unsigned bytes
  return _mm512_xor_si512(_mm512_maskz_loadu_epi8(half ? 0xffffffffull : ~0ull, q), _mm512_set1_epi8(static_cast<char>(0x80)));
}

// lanes[i] = -128 * (p[4i] + ... + p[4i + 3]) for the K / 4 lanes of one quantized vector
void lane_offsets(const int8_t* p, int64_t K, int32_t* lanes) {
  for (int64_t i = 0; i < K / 4; ++i)
    lanes[i] = -128 * (static_cast<int32_t>(p[4 * i]) + p[4 * i + 1] + p[4 * i + 2] + p[4 * i + 3]);
}

// One weight row times M quantized vectors (p, t, lanes: M of each, strides K, K / G, K / 4):
// each 64 weights are loaded and flipped once for all M.
// G == 32: each 64-byte load holds two groups, whose sums land in lanes 0-7 and 8-15. Sixteen
// groups' scales s * t are one vector; each pair of groups takes its two from it by a permute.
template <int M>
void w8a8_row_pairs(const int8_t* q, const at::Half* s, const int8_t* p, const float* t, const int32_t* lanes,
                    int64_t K, float* out) {
  const int64_t groups = K / 32;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const __m512 sw = load_scales(s + g0, n);  // (16,) weight scales
    __m512 scales[M];  // (16,) s * t for each vector
    for (int m = 0; m < M; ++m) scales[m] = _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(mask, t + m * (K / 32) + g0));
    __m512i index = pair_index();
    for (int64_t j = 0; j < n; j += 2, index = _mm512_add_epi32(index, _mm512_set1_epi32(2))) {
      const int64_t k = (g0 + j) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(q + k) + kPrefetchBytes, _MM_HINT_T0);
      const bool half = j + 1 == n;  // the last group alone when their number is odd
      const __m512i w = flipped(q + k, half);
      for (int m = 0; m < M; ++m) {
        const __m512i sums = dot_bytes(w, p + m * K + k, lanes + m * (K / 4) + k / 4, half);  // (16,) int32
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(index, scales[m]), total[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(total[m]);
}

// G a multiple of 64: one group is one or more whole 64-byte loads.
template <int M>
void w8a8_row_wide(const int8_t* q, const at::Half* s, const int8_t* p, const float* t, const int32_t* lanes,
                   int64_t K, int64_t G, float* out) {
  const int64_t groups = K / G;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[M];
    for (int m = 0; m < M; ++m) sums[m] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(q + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i w = flipped(q + k);
      for (int m = 0; m < M; ++m) sums[m] = _mm512_add_epi32(sums[m], dot_bytes(w, p + m * K + k, lanes + m * (K / 4) + k / 4));
    }
    const float sg = half_to_float(s[g]);
    for (int m = 0; m < M; ++m)
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[m]), _mm512_set1_ps(sg * t[m * groups + g]), total[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(total[m]);
}
#endif

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "quantized_matvec: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantized_matvec: x must be a contiguous float32 (M, K) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "quantized_matvec: weight must be a contiguous (N, K) tensor with K = x.size(1)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == weight.size(0),
                "quantized_matvec: bias must be a contiguous float32 (N,) tensor");
  }
}

// int8 weights (N, K) with float16 scales (N, K / G): what int8_linear and int8_act_linear check.
void check_int8_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, const char* op) {
  check_inputs(x, qweight, bias);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == qweight.size(0) && qweight.size(1) % scales.size(1) == 0,
              op, ": scales must be a contiguous float16 (N, K / group_size) tensor");
}

// Rows per task: about 64 KiB of weights, so that each thread gets a long stretch of memory to stream.
int64_t grain(int64_t K, int64_t bytes_per_weight) { return std::max<int64_t>(16, (1 << 16) / (K * bytes_per_weight)); }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check_int8_inputs(x, qweight, scales, bias, "int8_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = K / scales.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* q = qweight.data_ptr<int8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
#if LLMFS_AVX512
  if (M == 1 && G == 32 && K % 64 == 0) {
    std::vector<float> x4(K);
    split_phases(xp, K, x4.data());
    at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) int8_row_phases(q, s, x4.data(), yp, bp, n, K);
    });
    return y;
  }
#endif
  at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
#if LLMFS_AVX512
    if (K % 16 == 0 && G % 16 == 0) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, M - m0);
        dispatch_rows(rows, [&](auto m) {
          int8_block<decltype(m)::value>(q, s, xp + m0 * K, yp + m0 * N, bp, n0, n1, N, K, G, K);
        });
      }
      return;
    }
#endif
    int8_plain(q, s, xp, yp, bp, n0, n1, M, N, K, G);
  });
  return y;
}

at::Tensor int8_act_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias) {
  check_int8_inputs(x, qweight, scales, bias, "int8_act_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), groups = scales.size(1), G = K / groups;
  // The token vectors quantized once, before the threads share the rows: (M, K) bytes, (M, groups) scales.
  std::vector<int8_t> p(M * K);
  std::vector<float> t(M * groups);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_vector(xp + m * K, K, G, &p[m * K], &t[m * groups]);
#if LLMFS_VNNI
  std::vector<int32_t> lanes(M * K / 4);  // each vector's lane offsets, for dot_bytes
  const bool vnni = G == 32 || G % 64 == 0;  // the loops below; other group sizes take the plain ones
  if (vnni)
    for (int64_t m = 0; m < M; ++m) lane_offsets(&p[m * K], K, &lanes[m * K / 4]);
#endif
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* q = qweight.data_ptr<int8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, N, grain(K, 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = q + n * K;
      const at::Half* sn = s + n * groups;
#if LLMFS_VNNI
      if (vnni) {
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {  // up to 8 vectors per pass over the row
          float dots[kMaxRows];
          dispatch_rows(std::min(kMaxRows, M - m0), [&](auto rows) {
            constexpr int R = decltype(rows)::value;
            if (G == 32) w8a8_row_pairs<R>(qn, sn, &p[m0 * K], &t[m0 * groups], &lanes[m0 * K / 4], K, dots);
            else w8a8_row_wide<R>(qn, sn, &p[m0 * K], &t[m0 * groups], &lanes[m0 * K / 4], K, G, dots);
          });
          for (int64_t m = m0; m < std::min(M, m0 + kMaxRows); ++m) yp[m * N + n] = dots[m - m0] + (bp ? bp[n] : 0.f);
        }
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m)  // the row stays in the L1 cache for the vectors after the first
        yp[m * N + n] = w8a8_dot_plain(qn, sn, &p[m * K], &t[m * groups], K, G) + (bp ? bp[n] : 0.f);
    }
  });
  return y;
}

// What bf16_linear and f32_linear share: the output, the threads, and the AVX-512 blocks or the plain loops.
template <typename T, typename Plain>
at::Tensor dense_linear(const at::Tensor& x, const T* w, int64_t N, const c10::optional<at::Tensor>& bias, Plain plain) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
#if LLMFS_AVX512
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (M == 1 && K % 64 == 0) {
      std::vector<float> xs(K);
      split_even_odd(xp, K, xs.data());
      at::parallel_for(0, N, grain(K, sizeof(T)), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) bf16_row_split(w, xs.data(), yp, bp, n, K);
      });
      return y;
    }
  }
#endif
  at::parallel_for(0, N, grain(K, sizeof(T)), [&](int64_t n0, int64_t n1) {
#if LLMFS_AVX512
    if (K % 16 == 0) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, M - m0);
        dispatch_rows(rows, [&](auto m) {
          dense_block<T, decltype(m)::value>(w, xp + m0 * K, yp + m0 * N, bp, n0, n1, N, K, K);
        });
      }
      return;
    }
#endif
    plain(w, xp, yp, bp, n0, n1, M, N, K);
  });
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "bf16_linear: weight must be bfloat16");
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  return dense_linear(x, w, weight.size(0), bias, bf16_plain);
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "f32_linear: weight must be float32");
  return dense_linear(x, weight.data_ptr<float>(), weight.size(0), bias, f32_plain);
}

// ---- one decode step of a GPT block ------------------------------------------------------------
// DecodeBlock's short path (quantize.py) in one call: the same ATen operations in the same order
// as Block.forward (layer norm, the four products, the cache write, attention, GELU, the two
// residual additions), so the same bits, without a trip through Python between them. x (B, 1, C);
// the layers' formats in kinds (0 fp32, 1 bf16, 2 int8, 3 w8a8) with their weights, scales (int8
// and w8a8) and biases; key_store / value_store (B, n_heads, capacity, head_dim) hold `length`
// cached tokens, and this token's key and value are written at position `length`.
at::Tensor product(int64_t kind, const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& s,
                   const c10::optional<at::Tensor>& b) {
  switch (kind) {
    case 0: return f32_linear(h, w, b);
    case 1: return bf16_linear(h, w, b);
    case 2: return int8_linear(h, w, *s, b);
    case 3: return int8_act_linear(h, w, *s, b);
    default: TORCH_CHECK(false, "decode_block: unknown layer kind ", kind);
  }
}

at::Tensor decode_block(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& norms, at::ArrayRef<double> eps,
                        at::IntArrayRef kinds, const at::TensorList weights, const std::vector<c10::optional<at::Tensor>>& scales,
                        const std::vector<c10::optional<at::Tensor>>& biases, const at::Tensor& key_store,
                        const at::Tensor& value_store, int64_t length, int64_t n_heads, c10::string_view approximate) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && norms.size() == 4 && eps.size() == 2 && kinds.size() == 4 &&
                  weights.size() == 4 && scales.size() == 4 && biases.size() == 4,
              "decode_block: x (B, 1, C), 4 norm tensors, 2 eps, and 4 layers");
  TORCH_CHECK(key_store.dim() == 4 && length < key_store.size(2) && key_store.size(0) == x.size(0) &&
                  key_store.size(1) == n_heads,
              "decode_block: the cache's storage must be (B, n_heads, capacity, head_dim) with room for one token");
  const int64_t B = x.size(0), C = x.size(2), D = C / n_heads;
  at::Tensor h = at::layer_norm(x, {C}, norms[0], norms[1], eps[0]).view({B, C});
  std::vector<at::Tensor> qkv = product(kinds[0], h, weights[0], scales[0], biases[0]).view({B, 3, n_heads, 1, D}).unbind(1);
  key_store.narrow(2, length, 1).copy_(qkv[1]);  // (B, n_heads, 1, head_dim): in place, as KVCache.append
  value_store.narrow(2, length, 1).copy_(qkv[2]);
  at::Tensor y = at::scaled_dot_product_attention(qkv[0], key_store.narrow(2, 0, length + 1),
                                                  value_store.narrow(2, 0, length + 1));
  at::Tensor out = at::add(x, product(kinds[1], y.reshape({B, C}), weights[1], scales[1], biases[1]).view({B, 1, C}));
  h = at::layer_norm(out, {C}, norms[2], norms[3], eps[1]).view({B, C});
  h = at::gelu(product(kinds[2], h, weights[2], scales[2], biases[2]), approximate);
  return at::add(out, product(kinds[3], h, weights[3], scales[3], biases[3]).view({B, 1, C}));
}

// Which inner loops this build uses: "avx512-vnni", "avx512" or "plain"; Python checks that the CPU runs it.
std::string isa() { return LLMFS_VNNI ? "avx512-vnni" : LLMFS_AVX512 ? "avx512" : "plain"; }

}  // namespace

TORCH_LIBRARY(llm_from_scratch_quantized, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int8_act_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_block(Tensor x, Tensor?[] norms, float[] eps, int[] kinds, Tensor[] weights, Tensor?[] scales, "
        "Tensor?[] biases, Tensor(a!) key_store, Tensor(b!) value_store, int length, int n_heads, str approximate) -> Tensor");
  m.def("isa() -> str");
}

TORCH_LIBRARY_IMPL(llm_from_scratch_quantized, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("int8_act_linear", int8_act_linear);
  m.impl("bf16_linear", bf16_linear);
  m.impl("f32_linear", f32_linear);
  m.impl("decode_block", decode_block);
}

TORCH_LIBRARY_IMPL(llm_from_scratch_quantized, CompositeExplicitAutograd, m) {
  m.impl("isa", isa);
}
