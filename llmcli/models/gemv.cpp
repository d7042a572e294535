// Few-row matrix products for decoding on x86: y (M, N) = x (M, K) · Wᵀ with W (N, K), the weights streamed from
// memory once per call. Weights: fp32 and bf16 row-major, every output a dot product over a contiguous row of W;
// int8 (symmetric, a float scale per row) and int4 (a float scale per group of `group` inputs, stored as q + 8) in
// tiles of 16 rows, a vector lane per row (see int_tile). For the integer weights the activations are quantized to
// int8 per block of 32 (a float scale each) and the dot products run on integers, as llama.cpp's Q8_0 / Q4_0 do.
//
// Each kernel has an AVX-512 body (FMA, BF16 dot products, VNNI) and an AVX2 body, compiled for their own targets;
// llmcli.models.gemv picks one from the CPU's features at run time (`isa`: 2 = AVX-512, 1 = AVX2). Output rows are
// split between threads in contiguous ranges; a thread reads its rows of W one after the other, the order memory
// streams fastest (4 interleaved rows read a third slower, benchmarks/gemv.py), runs every x row over each row
// while it is in cache, and keeps a few accumulators per dot product so that the adds do not all wait on one
// another (kWays512, kWays256).
// Preconditions (checked here too): contiguous weights, K a multiple of 32, group a multiple of 32. x may be any
// layout and fp32 or bf16: read in place where it is as the body reads it, else converted (input_rows).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // inputs per quantized activation block

struct Rows {  // the operands of one call, shared by every task
  const void* w;
  const void* scales;  // (N, K / group), integer weights only: fp32, or fp16 in the tile bodies
  int64_t group;
  const void* x;        // f32 (M, K), or bf16 / int8 after the caller's preparation
  const float* block_scales;  // int8 activations: per row and block of 32, its scale (see prepare_int8_rows)
  const int32_t* block_fix;   // and its correction
  float* y;
  int64_t M, K, N;
  int64_t ldy;  // y's row stride: N, or the outputs of all the matrices of one call side by side
};

#if defined(__x86_64__)

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

// Accumulators per dot product: AVX-512 2, AVX2 4. With 4 the AVX-512 bodies read memory up to a fifth slower on
// the AMD EPYC we see, though they compute faster in cache (benchmarks/gemv_versions.py); AVX2's, half as wide,
// need 4 to keep up in cache and read as fast either way.
constexpr int kWays512 = 2, kWays256 = 4;

AVX512 inline float sum512(const __m512 (&acc)[kWays512]) {
  return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2 inline float sum256(const __m256 (&acc)[kWays256]) {
  return hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// Every body runs `STEP(acc[u], i)` for i = 0 .. steps - 1 over `ways` accumulators, `ways` steps at a time.
#define ACCUMULATE(ways, steps, STEP)                        \
  {                                                          \
    int64_t i = 0;                                           \
    for (; i + (ways) <= (steps); i += (ways)) {             \
      for (int u = 0; u < (ways); ++u) { STEP(acc[u], i + u) } \
    }                                                        \
    for (; i < (steps); ++i) { STEP(acc[0], i) }             \
  }

// ---- fp32 weights

AVX512 void f32_avx512(const Rows& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = static_cast<const float*>(a.w) + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = static_cast<const float*>(a.x) + m * a.K;
      __m512 acc[kWays512] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#define STEP(s, i) s = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * (i)), _mm512_loadu_ps(x + 16 * (i)), s);
      ACCUMULATE(kWays512, a.K / 16, STEP)
#undef STEP
      a.y[m * a.ldy + n] = sum512(acc);
    }
  }
}

AVX2 void f32_avx2(const Rows& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = static_cast<const float*>(a.w) + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = static_cast<const float*>(a.x) + m * a.K;
      __m256 acc[kWays256] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#define STEP(s, i) s = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8 * (i)), _mm256_loadu_ps(x + 8 * (i)), s);
      ACCUMULATE(kWays256, a.K / 8, STEP)
#undef STEP
      a.y[m * a.ldy + n] = sum256(acc);
    }
  }
}

// ---- bf16 weights: AVX-512 BF16 multiplies bf16 pairs (x rounded to bf16 by the caller); AVX2 widens W to fp32

AVX512_BF16 void bf16_avx512(const Rows& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const uint16_t* x = static_cast<const uint16_t*>(a.x) + m * a.K;
      __m512 acc[kWays512] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#define STEP(s, i) \
  s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(w + 32 * (i)), (__m512bh)_mm512_loadu_si512(x + 32 * (i)));
      ACCUMULATE(kWays512, a.K / 32, STEP)
#undef STEP
      a.y[m * a.ldy + n] = sum512(acc);
    }
  }
}

AVX2 inline __m256 widen_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

AVX2 void bf16_avx2(const Rows& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = static_cast<const float*>(a.x) + m * a.K;
      __m256 acc[kWays256] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#define STEP(s, i) s = _mm256_fmadd_ps(widen_bf16(w + 8 * (i)), _mm256_loadu_ps(x + 8 * (i)), s);
      ACCUMULATE(kWays256, a.K / 8, STEP)
#undef STEP
      a.y[m * a.ldy + n] = sum256(acc);
    }
  }
}

// ---- integer weights in tiles of 16 rows, the tile bodies' own layout (made by llmcli.models.quantized's
// `tile_rows`, a permutation of the row-major bytes). Per tile and block of 32 inputs: vectors of 64 bytes, lane r
// of vector i holding 4 of row r's inputs: int8, 8 vectors, vector i inputs 4i .. 4i + 3 (signed bytes); int4,
// 4 vectors, vector i inputs 4i .. 4i + 3 in its low nibbles and 16 + 4i .. 16 + 4i + 3 in its high ones (q + 8).
// A lane is a row: each dpbusd multiplies 16 rows by the same 4 activations (broadcast), a block's products are
// scaled once for all 16 rows and a tile's outputs are one store; no horizontal sums, a third of a row-major body's
// instructions per weight byte. Scales: per tile and group, its 16 rows' side by side (int8: one group, K wide),
// fp32 or fp16 (an fp16 value each, as quantize makes them: half the bytes).
// Rows past the last whole tile stay row-major after the tiles. Activations: int8 blocks of 32 in natural order, a
// scale and a correction (-offset · the block's sum, see `tile_offset`) per block.

constexpr int64_t kTileRows = 16;

struct TileShape {
  int64_t blocks, per_group, groups, row_bytes;  // row_bytes: K · bits / 8
};

// What the activations' correction undoes: VNNI and AVX2 multiply unsigned by signed bytes, so int4 enters as
// q + 8 (both bodies) and int8 as q + 128 (q xor 0x80, AVX-512); AVX2's int8 body uses signs instead (no offset).
constexpr int32_t tile_offset(int bits, int64_t isa) { return bits == 4 ? 8 : (isa == 2 ? 128 : 0); }

inline int32_t four_bytes(const int8_t* p) {  // 4 activation bytes, to broadcast to every row's lane
  int32_t four;
  std::memcpy(&four, p, 4);
  return four;
}

// Asks for the next tile's scales ahead of its weights, all of them at once: int4's (a ninth of its bytes), read a
// few bytes at a time beside the weights, make a second stream per thread, which this machine reads slower (int4
// streamed 1.00-1.18x faster with this, benchmarks/gemv_versions.py). A prefetch past the last tile never faults.
template <typename S>
inline void prefetch_next_scales(const S* tile_scales, const TileShape& s) {
#if defined(__x86_64__)
  const char* next = reinterpret_cast<const char*>(tile_scales + kTileRows * s.groups);
  for (int64_t offset = 0; offset < kTileRows * s.groups * int64_t(sizeof(S)); offset += 64)
    _mm_prefetch(next + offset, _MM_HINT_T0);
#endif
}

// A tile's 16 scales of one group (8 of them, AVX2), fp32 or fp16.
template <typename S>
AVX512_VNNI inline __m512 tile_scales(const S* p) {
  if constexpr (std::is_same_v<S, float>) return _mm512_loadu_ps(p);
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename S>
AVX2 inline __m256 tile_scales_avx2(const S* p) {
  if constexpr (std::is_same_v<S, float>) return _mm256_loadu_ps(p);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Tile t (rows 16t .. 16t + 15) against every activation row.
template <int Bits, typename S>
AVX512_VNNI void int_tile(const Rows& a, const TileShape& s, int64_t t) {
  constexpr int64_t block_bytes = kTileRows * kBlock * Bits / 8;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + t * kTileRows * s.row_bytes;
  const S* ws = static_cast<const S*>(a.scales) + t * kTileRows * s.groups;
  if constexpr (Bits == 4) prefetch_next_scales(ws, s);  // int8's: 2 bytes a row, no second stream to speak of
  const __m512i nibble = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = static_cast<const int8_t*>(a.x) + m * a.K;
    const float* xs = a.block_scales + m * s.blocks;
    const int32_t* fix = a.block_fix + m * s.blocks;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < s.blocks; ++b) {
      const uint8_t* wb = w + b * block_bytes;
      const int8_t* xb = x + b * kBlock;
      __m512i even = _mm512_set1_epi32(fix[b]), odd = _mm512_setzero_si512();  // two chains of dpbusd
      for (int i = 0; i < 4; ++i) {
        if constexpr (Bits == 4) {
          const __m512i packed = _mm512_loadu_si512(wb + 64 * i);
          even = _mm512_dpbusd_epi32(even, _mm512_and_si512(packed, nibble), _mm512_set1_epi32(four_bytes(xb + 4 * i)));
          odd = _mm512_dpbusd_epi32(odd, _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble),
                                    _mm512_set1_epi32(four_bytes(xb + 16 + 4 * i)));
        } else {
          even = _mm512_dpbusd_epi32(even, _mm512_xor_si512(_mm512_loadu_si512(wb + 128 * i), sign),
                                     _mm512_set1_epi32(four_bytes(xb + 8 * i)));
          odd = _mm512_dpbusd_epi32(odd, _mm512_xor_si512(_mm512_loadu_si512(wb + 128 * i + 64), sign),
                                    _mm512_set1_epi32(four_bytes(xb + 8 * i + 4)));
        }
      }
      const __m512 scale = _mm512_mul_ps(tile_scales(ws + (b / s.per_group) * kTileRows), _mm512_set1_ps(xs[b]));
      acc[b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), scale, acc[b & 1]);
    }
    _mm512_storeu_ps(a.y + m * a.ldy + t * kTileRows, _mm512_add_ps(acc[0], acc[1]));
  }
}

// The AVX2 body over the same tiles: a 64-byte vector as two halves of 8 rows. AVX2 multiplies unsigned by signed
// bytes into saturating int16 pairs. int4: 15 · 127 · 2 at most, so a block's 8 pair sums add up in int16 (30,480 at
// most) before one widening. int8: |q| against x with q's sign (128 · 127 · 2 fits), widened at every vector.
template <int Bits, typename S>
AVX2 void int_tile_avx2(const Rows& a, const TileShape& s, int64_t t) {
  constexpr int64_t block_bytes = kTileRows * kBlock * Bits / 8;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + t * kTileRows * s.row_bytes;
  const S* ws = static_cast<const S*>(a.scales) + t * kTileRows * s.groups;
  if constexpr (Bits == 4) prefetch_next_scales(ws, s);  // int8's: 2 bytes a row, no second stream to speak of
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = static_cast<const int8_t*>(a.x) + m * a.K;
    const float* xs = a.block_scales + m * s.blocks;
    const int32_t* fix = a.block_fix + m * s.blocks;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0-7, 8-15
    for (int64_t b = 0; b < s.blocks; ++b) {
      const uint8_t* wb = w + b * block_bytes;
      const int8_t* xb = x + b * kBlock;
      const __m256 xscale = _mm256_set1_ps(xs[b]);
      for (int h = 0; h < 2; ++h) {
        __m256i dot = _mm256_set1_epi32(fix[b]);
        if constexpr (Bits == 4) {
          __m256i pairs = _mm256_setzero_si256();
          for (int i = 0; i < 4; ++i) {
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * i + 32 * h));
            const __m256i low = _mm256_and_si256(packed, nibble);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(low, _mm256_set1_epi32(four_bytes(xb + 4 * i))));
            pairs = _mm256_add_epi16(pairs,
                                     _mm256_maddubs_epi16(high, _mm256_set1_epi32(four_bytes(xb + 16 + 4 * i))));
          }
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
        } else {
          for (int i = 0; i < 8; ++i) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * i + 32 * h));
            const __m256i xv = _mm256_set1_epi32(four_bytes(xb + 4 * i));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
          }
        }
        const __m256 scale = _mm256_mul_ps(tile_scales_avx2(ws + (b / s.per_group) * kTileRows + 8 * h), xscale);
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[h]);
      }
    }
    _mm256_storeu_ps(a.y + m * a.ldy + t * kTileRows, acc[0]);
    _mm256_storeu_ps(a.y + m * a.ldy + t * kTileRows + 8, acc[1]);
  }
}

// Row n past the tiles (row-major: int8 one byte per column; int4 byte j holds columns 2j and 2j + 1), one at a time.
template <int Bits, typename S>
void int_row(const Rows& a, const TileShape& s, int64_t n) {
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * s.row_bytes;
  const S* ws = static_cast<const S*>(a.scales) + n * s.groups;
  auto weight = [&](int64_t k) -> int32_t {
    if constexpr (Bits == 4) return ((w[k / 2] >> (4 * (k % 2))) & 0x0F) - 8;
    return static_cast<int8_t>(w[k]);
  };
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* x = static_cast<const int8_t*>(a.x) + m * a.K;
    float total = 0.f;
    for (int64_t b = 0; b < s.blocks; ++b) {
      int32_t dot = 0;
      for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) dot += weight(k) * x[k];
      total += static_cast<float>(dot) * a.block_scales[m * s.blocks + b] * static_cast<float>(ws[b / s.per_group]);
    }
    a.y[m * a.ldy + n] = total;
  }
}

// One block of 32 activations -> int8 (scale = absmax / 127, rounded to nearest even), in natural order.
AVX2 void quantize_block(const float* in, int32_t* q, float* scale, int32_t* sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4], top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(in + 8 * i);
    top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
  }
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  t = _mm_max_ss(t, _mm_movehdup_ps(t));
  const float absmax = _mm_cvtss_f32(t);
  const __m256 inverse = _mm256_set1_ps(absmax > 0.f ? 127.f / absmax : 0.f);
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * i), qi);
    total = _mm256_add_epi32(total, qi);
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total);
  *sum = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  *scale = absmax / 127.f;
}

#endif  // __x86_64__

using Body = void (*)(const Rows&, int64_t, int64_t);

// One call for several matrices of one K against the same activations (q, k and v; gate and up): their outputs
// side by side in y (M, ΣN), the threads splitting the rows of all of them in order (each still reads contiguous
// rows, and the matrices lie one after the other in memory).
void run(Body body, std::vector<Rows> parts, float* y) {
  int64_t total = 0;
  for (const auto& part : parts) total += part.N;
  int64_t offset = 0;
  for (auto& part : parts) {
    part.y = y + offset;
    part.ldy = total;
    offset += part.N;
  }
  at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
    int64_t start = 0;
    for (const auto& part : parts) {
      const int64_t lo = std::max(begin, start), hi = std::min(end, start + part.N);
      if (lo < hi) body(part, lo - start, hi - start);
      start += part.N;
    }
  });
}

void check(const torch::Tensor& w, int64_t k, int64_t isa) {
#if !defined(__x86_64__)
  TORCH_CHECK(false, "llmcli's kernels are x86 only");
#endif
  TORCH_CHECK(isa == 1 || isa == 2, "isa is 1 (AVX2) or 2 (AVX-512)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "contiguous 2-d weights");
  TORCH_CHECK(k % kBlock == 0, "K must be a multiple of 32");
}

// A model's activations x (..., K), fp32 or bf16, as the bodies read them: M rows of K contiguous values in
// `dtype`. Read in place where they are so; otherwise converted into `buffer` (kept by the caller between calls).
// No tensor is made: a decode step makes some 120 of these calls, and each dispatch (a reshape, a `to`) costs
// about half a microsecond to one.
struct Input {
  const void* data;
  int64_t M;
};

Input input_rows(const torch::Tensor& x, int64_t K, torch::ScalarType dtype, std::vector<float>& buffer,
                 torch::Tensor& keep) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x's last dimension must be the weights' K");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x: fp32 or bf16");
  keep = x.is_contiguous() ? x : x.contiguous();
  const int64_t M = K == 0 ? 0 : keep.numel() / K;
  if (keep.scalar_type() == dtype) return {keep.data_ptr(), M};
  buffer.resize(dtype == torch::kFloat32 ? M * K : (M * K + 1) / 2);
  if (dtype == torch::kFloat32) {  // bf16 -> fp32, exact
    const auto* from = keep.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) buffer[i] = static_cast<float>(from[i]);
  } else {  // fp32 -> bf16, round to nearest even as `to`
    const float* from = keep.data_ptr<float>();
    auto* to = reinterpret_cast<at::BFloat16*>(buffer.data());
    for (int64_t i = 0; i < M * K; ++i) to[i] = at::BFloat16(from[i]);
  }
  return {buffer.data(), M};
}

// The result of a model's call: x's leading shape and dtype, N wide. The bodies write fp32 `y`: the output itself
// for fp32 x, else `scratch` (kept by the caller), rounded into the output by `finish`.
struct Output {
  torch::Tensor out;
  float* y;
};

Output output_for(const torch::Tensor& x, int64_t M, int64_t N, std::vector<float>& scratch) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto out = torch::empty(shape, x.options());
  if (x.scalar_type() == torch::kFloat32) return {out, out.data_ptr<float>()};
  scratch.resize(M * N);
  return {out, scratch.data()};
}

// The bias (fp32 or bf16, N) added in fp32 before any rounding, as F.linear does, then y rounded into a bf16 output.
// Both here, not through add_ and `to`: each costs a dispatch (a bf16 bias's add_ two), some 200 calls a step.
torch::Tensor finish(const Output& o, int64_t M, int64_t N, const c10::optional<torch::Tensor>& bias) {
  float* y = o.y;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias (N,)");
    const auto b = bias->contiguous();
    if (b.scalar_type() == torch::kBFloat16) {
      const auto* from = b.data_ptr<at::BFloat16>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += static_cast<float>(from[n]);
    } else {
      TORCH_CHECK(b.scalar_type() == torch::kFloat32, "fp32 or bf16 bias");
      const float* from = b.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += from[n];
    }
  }
  if (o.out.scalar_type() == torch::kBFloat16) {
    auto* to = o.out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) to[i] = at::BFloat16(y[i]);  // round to nearest even, as `to`
  }
  return o.out;
}

// Activations (M, K) fp32 -> what the integer bodies read per x row: int8 blocks of 32 in natural order, and per
// block its scale and its correction (-offset · the block's sum; see tile_offset). Fills `a`'s x, block_scales and
// block_fix, raw pointers into `buffer` (a decode step makes some 120 of these calls, and a tensor for it, or each
// view of one, would cost a dispatch).
void prepare_int8_rows(const float* xp, int64_t M, int64_t K, int32_t offset, Rows& a, std::vector<int64_t>& buffer) {
  const int64_t blocks = K / kBlock;
  const int64_t q_bytes = (M * K + 63) / 64 * 64, block_bytes = M * blocks * 4;
  buffer.resize((q_bytes + 2 * block_bytes + 7) / 8);  // 8-byte words: the blocks' floats and ints stay aligned
  int8_t* q = reinterpret_cast<int8_t*>(buffer.data());
  float* scales = reinterpret_cast<float*>(q + q_bytes);
  int32_t* fix = reinterpret_cast<int32_t*>(q + q_bytes + block_bytes);
  a.x = q;
  a.block_scales = scales;
  a.block_fix = fix;
  alignas(32) int32_t values[kBlock];
  for (int64_t i = 0; i < M * blocks; ++i) {
    int32_t sum = 0;
#if defined(__x86_64__)
    quantize_block(xp + i * kBlock, values, &scales[i], &sum);
#endif
    for (int64_t j = 0; j < kBlock; ++j) q[i * kBlock + j] = static_cast<int8_t>(values[j]);
    fix[i] = -offset * sum;
  }
}

}  // namespace

// What x the float bodies read for weights of `dtype`: bf16 for the AVX-512 BF16 body, fp32 otherwise.
static torch::ScalarType float_input(torch::ScalarType dtype, int64_t isa) {
  return dtype == torch::kBFloat16 && isa == 2 ? torch::kBFloat16 : torch::kFloat32;
}

// x (M rows of K, in float_input's dtype) against each W (N_i, K), all fp32 or all bf16, into y (M, ΣN_i) fp32.
static void float_products(const void* x, int64_t M, int64_t K, const std::vector<torch::Tensor>& ws, int64_t isa,
                           float* y) {
  TORCH_CHECK(!ws.empty(), "at least one weight");
  const auto dtype = ws[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "fp32 or bf16 W");
  std::vector<Rows> parts;
  for (const auto& w : ws) {
    check(w, K, isa);
    TORCH_CHECK(w.scalar_type() == dtype && w.size(1) == K, "one dtype and one K for every W");
    parts.push_back({w.data_ptr(), nullptr, 0, x, nullptr, nullptr, nullptr, M, K, w.size(0), w.size(0)});
  }
#if defined(__x86_64__)
  const Body body = dtype == torch::kFloat32 ? (isa == 2 ? f32_avx512 : f32_avx2)
                                             : (isa == 2 ? bf16_avx512 : bf16_avx2);
  run(body, parts, y);
#endif
}

// y = x Wᵀ for a 2-d x (M, K) already as the body reads it (float_input), fp32 (M, N): the bodies alone, for tests.
static torch::Tensor body_products(const torch::Tensor& x, const torch::Tensor& w, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == w.size(-1), "contiguous 2-d x (M, K)");
  TORCH_CHECK(x.scalar_type() == float_input(w.scalar_type(), isa), "x: fp32, or bf16 for bf16 W on isa 2");
  auto y = torch::empty({x.size(0), w.size(0)}, torch::kFloat32);
  float_products(x.data_ptr(), x.size(0), x.size(1), {w}, isa, y.data_ptr<float>());
  return y;
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32, "fp32 W");
  return body_products(x, w, isa);
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "bf16 W");
  return body_products(x, w, isa);
}

// F.linear(x, W, bias) for x (..., K) in fp32 or bf16 and contiguous fp32 or bf16 weights (N_i, K): the call a
// model makes, in one op; several weights give their outputs side by side (..., ΣN_i), `bias` then covering all.
torch::Tensor linear(torch::Tensor x, std::vector<torch::Tensor> w, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(!w.empty(), "at least one weight");
  thread_local std::vector<float> converted, scratch;  // kept between calls: no allocation per call
  torch::Tensor keep;
  const int64_t K = w[0].size(-1);
  const Input in = input_rows(x, K, float_input(w[0].scalar_type(), isa), converted, keep);
  int64_t N = 0;
  for (const auto& each : w) N += each.size(0);
  const Output out = output_for(x, in.M, N, scratch);
  float_products(in.data, in.M, K, w, isa, out.y);
  return finish(out, in.M, N, bias);
}

using Tile = void (*)(const Rows&, const TileShape&, int64_t);

// The bodies for a whole tile and for a row past the tiles.
template <typename S>
std::pair<Tile, Tile> tile_bodies(int64_t bits, int64_t isa) {
  if (bits == 4) return {isa == 2 ? int_tile<4, S> : int_tile_avx2<4, S>, int_row<4, S>};
  return {isa == 2 ? int_tile<8, S> : int_tile_avx2<8, S>, int_row<8, S>};
}

// Integer weights in tiles (see int_tile): each qweight int8 (N_i, K) or int4 uint8 (N_i, K / 2) and scales
// (N_i, K / group), all fp32 or all fp16, hold tile_rows's bytes (int8: group = K); x (..., K) fp32 or bf16,
// quantized here once for all of them; the outputs side by side in x's dtype. isa 2: the AVX-512 VNNI bodies, 1:
// the AVX2 ones (a CPU without the body's features is an error, not an illegal instruction).
torch::Tensor linear_int_tiles(torch::Tensor x, std::vector<torch::Tensor> qweight, std::vector<torch::Tensor> scales,
                               int64_t group, int64_t bits, int64_t isa) {
#if defined(__x86_64__)
  static const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  TORCH_CHECK(isa == 1 || isa == 2, "isa is 1 (AVX2) or 2 (AVX-512 VNNI)");
  TORCH_CHECK(isa == 2 ? vnni : avx2, isa == 2 ? "this CPU has no AVX-512 VNNI" : "this CPU has no AVX2");
  TORCH_CHECK(bits == 4 || bits == 8, "bits is 4 or 8");
  TORCH_CHECK(!qweight.empty() && qweight.size() == scales.size(), "one scales tensor per qweight");
  const int64_t K = qweight[0].size(1) * 8 / bits;
  thread_local std::vector<float> converted, scratch;  // kept between calls: no allocation per call
  torch::Tensor keep;
  const Input in = input_rows(x, K, torch::kFloat32, converted, keep);
  TORCH_CHECK(group % kBlock == 0 && K % group == 0, "group a multiple of 32 that divides K");
  const TileShape shape{K / kBlock, group / kBlock, K / group, K * bits / 8};
  int64_t total = 0, units = 0;
  for (size_t i = 0; i < qweight.size(); ++i) {
    const auto& q = qweight[i];
    const auto& s = scales[i];
    check(q, K, 2);
    TORCH_CHECK(q.scalar_type() == (bits == 4 ? torch::kUInt8 : torch::kInt8) && q.size(1) == shape.row_bytes,
                "int8 bytes or uint8 nibbles, one K for every qweight");
    TORCH_CHECK(s.scalar_type() == scales[0].scalar_type() &&
                    (s.scalar_type() == torch::kFloat32 || s.scalar_type() == torch::kHalf) && s.is_contiguous() &&
                    s.dim() == 2 && s.size(0) == q.size(0) && s.size(1) == K / group,
                "scales (N, K / group), all fp32 or all fp16");
    total += q.size(0);
    units += q.size(0) / kTileRows + q.size(0) % kTileRows;  // a whole tile, or a row past the tiles
  }
  const int64_t M = in.M;
  Rows activations{};
  thread_local std::vector<int64_t> buffer;
  prepare_int8_rows(static_cast<const float*>(in.data), M, K, tile_offset(bits, isa), activations, buffer);
  const Output out = output_for(x, M, total, scratch);
  std::vector<Rows> parts;
  int64_t offset = 0;
  for (size_t i = 0; i < qweight.size(); ++i) {
    parts.push_back({qweight[i].data_ptr(), scales[i].data_ptr(), group, activations.x,
                     activations.block_scales, activations.block_fix, out.y + offset, M, K,
                     qweight[i].size(0), total});
    offset += qweight[i].size(0);
  }
  const auto bodies = scales[0].scalar_type() == torch::kHalf ? tile_bodies<at::Half>(bits, isa)
                                                              : tile_bodies<float>(bits, isa);
  const Tile tile = bodies.first, row = bodies.second;
  at::parallel_for(0, units, 4, [&](int64_t begin, int64_t end) {
    int64_t start = 0;  // the first unit of the part
    for (const auto& part : parts) {
      const int64_t tiles = part.N / kTileRows, count = tiles + part.N % kTileRows;
      for (int64_t u = std::max(begin, start); u < std::min(end, start + count); ++u) {
        if (u - start < tiles) {
          tile(part, shape, u - start);
        } else {
          row(part, shape, tiles * kTileRows + (u - start - tiles));
        }
      }
      start += count;
    }
  });
  return finish(out, M, total, c10::nullopt);
#else
  TORCH_CHECK(false, "llmcli's kernels are x86 only");
#endif
}

// ---- attention for one query per sequence (a decode step): out = softmax(q·Kᵀ · scale) V per head, over all L
// cached keys (no mask), a query head h reading key head h / (H / Hkv) (GQA). The body is written once over a
// target's float vectors (Lanes16: AVX-512, Lanes8: AVX2) and inlined into a function for each target.

namespace {

constexpr int64_t kMaxHeadDim = 256;

// e^x for x <= 0 (a score minus the largest): x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial
// (relative error about 1e-7), times 2^n. Below -87 the result is e^-87 or 0, nothing next to the largest term's 1.
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f, kLog2e = 1.44269504088896341f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__x86_64__)
// What the attention body needs of a target's float vectors; `n` lanes of a load are read, the rest are zero.
struct Lanes16 {  // AVX-512
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static AVX512 inline Reg zero() { return _mm512_setzero_ps(); }
  static AVX512 inline Reg set1(float v) { return _mm512_set1_ps(v); }
  static AVX512 inline Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static AVX512 inline Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static AVX512 inline Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static AVX512 inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static AVX512 inline Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static AVX512 inline __mmask16 first(int n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
  static AVX512 inline Reg load(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static AVX512 inline Reg load(const at::BFloat16* p, int n) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static AVX512 inline void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static AVX512 inline Reg keep(Reg v, int n, float fill) {  // lanes from n on set to `fill`
    return _mm512_mask_blend_ps(first(n), _mm512_set1_ps(fill), v);
  }
  static AVX512 inline float sum(Reg v) { return _mm512_reduce_add_ps(v); }
  static AVX512 inline float top(Reg v) { return _mm512_reduce_max_ps(v); }
  // lane i = the sum of r[i]'s lanes: pairs, then quads within each 128-bit lane, then across them
  static AVX512 inline Reg sums(Reg (&r)[16]) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; ++k)
      t[k] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]), _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]));
    for (int k = 0; k < 4; ++k)
      u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  static AVX512 inline Reg fnmadd(Reg a, Reg b, Reg c) { return _mm512_fnmadd_ps(a, b, c); }
  static AVX512 inline Reg round(Reg v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
  static AVX512 inline Reg times_pow2(Reg y, Reg n) { return _mm512_scalef_ps(y, n); }  // y · 2^n
};

struct Lanes8 {  // AVX2
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static AVX2 inline Reg zero() { return _mm256_setzero_ps(); }
  static AVX2 inline Reg set1(float v) { return _mm256_set1_ps(v); }
  static AVX2 inline Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static AVX2 inline Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static AVX2 inline Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static AVX2 inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static AVX2 inline Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static AVX2 inline __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static AVX2 inline Reg load(const float* p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(n));
  }
  static AVX2 inline Reg load(const at::BFloat16* p, int n) {
    __m128i half;
    if (n >= 8) {
      half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t part[8] = {};
      std::memcpy(part, p, 2 * n);
      half = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static AVX2 inline void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static AVX2 inline Reg keep(Reg v, int n, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(first(n)));
  }
  static AVX2 inline float sum(Reg v) { return hsum256(v); }
  static AVX2 inline float top(Reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static AVX2 inline Reg sums(Reg (&r)[8]) {  // as Lanes16's, one 128-bit step fewer
    __m256 t[4], u[2];
    for (int k = 0; k < 4; ++k)
      t[k] = _mm256_add_ps(_mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]), _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]));
    for (int k = 0; k < 2; ++k)
      u[k] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }
  static AVX2 inline Reg fnmadd(Reg a, Reg b, Reg c) { return _mm256_fnmadd_ps(a, b, c); }
  static AVX2 inline Reg round(Reg v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static AVX2 inline Reg times_pow2(Reg y, Reg n) {  // y · 2^n for n >= -126 (a normal 2^n, built in its bits)
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
  }
};

// e^x on every lane, for x <= 0 (see kExpPoly). max(-87, x) keeps a NaN (max returns its second operand).
template <class V>
[[gnu::always_inline]] inline typename V::Reg exp_lanes(typename V::Reg x) {
  x = V::max(V::set1(-87.f), x);
  const auto n = V::round(V::mul(x, V::set1(kLog2e)));
  const auto r = V::fnmadd(n, V::set1(kLn2Low), V::fnmadd(n, V::set1(kLn2High), x));
  auto y = V::set1(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = V::fmadd(y, r, V::set1(kExpPoly[i]));
  return V::times_pow2(V::fmadd(y, V::mul(r, r), V::add(r, V::set1(1.f))), n);
}
#endif

struct Heads {
  const void* q; const void* k; const void* v; void* out;
  int64_t H, group, L, D;
  int64_t q_b, q_h, k_b, k_h, v_b, v_h;  // strides (elements) of batch and head; a head's positions are D apart
  float scale;
};

// acc[u] += p_j · v_j's vectors first .. first + U - 1, over every key j, the U accumulators kept in registers.
template <class V, typename T, int U>
[[gnu::always_inline]] inline void weigh_values(const Heads& a, const T* v, const float* p, int64_t first,
                                                float* acc) {
  constexpr int W = V::kLanes;
  typename V::Reg sum[U];
  int lanes[U];
  for (int u = 0; u < U; ++u) {
    sum[u] = V::zero();
    lanes[u] = static_cast<int>(std::min<int64_t>(W, a.D - (first + u) * W));
  }
  for (int64_t j = 0; j < a.L; ++j) {
    const auto pj = V::set1(p[j]);
    const T* vj = v + j * a.D + first * W;
    for (int u = 0; u < U; ++u) sum[u] = V::fmadd(pj, V::load(vj + u * W, lanes[u]), sum[u]);
  }
  for (int u = 0; u < U; ++u) V::store(acc + (first + u) * W, sum[u]);
}

// Query heads begin .. end - 1 (of B · H). Scores W keys at a time: each key's products summed over its vectors, then
// the W sums side by side (V::sums: no horizontal add per key); the softmax on W lanes; the values weighed 4 vectors
// of the head at a time in registers.
template <class V, typename T>
[[gnu::always_inline]] inline void attend_heads(const Heads& a, int64_t begin, int64_t end) {
  constexpr int W = V::kLanes;
  using Reg = typename V::Reg;
  const int64_t vectors = (a.D + W - 1) / W;
  const int last = static_cast<int>(a.D - (vectors - 1) * W);  // lanes of a row's last vector
  std::vector<float> p((a.L + W - 1) / W * W);
  alignas(64) float acc[kMaxHeadDim + 64];
  Reg q[kMaxHeadDim / W];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / a.H, h = i % a.H, g = h / a.group;
    const T* qi = static_cast<const T*>(a.q) + b * a.q_b + h * a.q_h;
    const T* k = static_cast<const T*>(a.k) + b * a.k_b + g * a.k_h;
    const T* v = static_cast<const T*>(a.v) + b * a.v_b + g * a.v_h;
    for (int64_t u = 0; u < vectors; ++u)
      q[u] = V::mul(V::load(qi + u * W, u + 1 < vectors ? W : last), V::set1(a.scale));
    Reg top = V::set1(-std::numeric_limits<float>::infinity());
    for (int64_t j0 = 0; j0 < a.L; j0 += W) {
      const int live = static_cast<int>(std::min<int64_t>(W, a.L - j0));
      Reg part[W];
      for (int t = 0; t < W; ++t) {
        part[t] = V::zero();
        if (t < live) {
          const T* kj = k + (j0 + t) * a.D;
          for (int64_t u = 0; u < vectors; ++u)
            part[t] = V::fmadd(q[u], V::load(kj + u * W, u + 1 < vectors ? W : last), part[t]);
        }
      }
      const Reg s = V::sums(part);
      V::store(p.data() + j0, s);
      top = V::max(top, V::keep(s, live, -std::numeric_limits<float>::infinity()));
    }
    const Reg shift = V::set1(V::top(top));
    Reg total = V::zero();
    for (int64_t j0 = 0; j0 < a.L; j0 += W) {
      const Reg e = V::keep(exp_lanes<V>(V::sub(V::load(p.data() + j0, W), shift)),
                            static_cast<int>(std::min<int64_t>(W, a.L - j0)), 0.f);
      V::store(p.data() + j0, e);
      total = V::add(total, e);
    }
    for (int64_t u = 0; u < vectors; u += 4) {
      switch (std::min<int64_t>(4, vectors - u)) {
        case 4: weigh_values<V, T, 4>(a, v, p.data(), u, acc); break;
        case 3: weigh_values<V, T, 3>(a, v, p.data(), u, acc); break;
        case 2: weigh_values<V, T, 2>(a, v, p.data(), u, acc); break;
        default: weigh_values<V, T, 1>(a, v, p.data(), u, acc); break;
      }
    }
    const float inverse_total = 1.f / V::sum(total);
    T* out = static_cast<T*>(a.out) + i * a.D;
    for (int64_t d = 0; d < a.D; ++d) out[d] = static_cast<T>(acc[d] * inverse_total);
  }
}

#if defined(__x86_64__)
template <typename T>
AVX512 void attend_avx512(const Heads& a, int64_t begin, int64_t end) { attend_heads<Lanes16, T>(a, begin, end); }
template <typename T>
AVX2 void attend_avx2(const Heads& a, int64_t begin, int64_t end) { attend_heads<Lanes8, T>(a, begin, end); }
#endif

}  // namespace

// q (B, H, 1, D); k, v (B, Hkv, L, D) with each head's positions contiguous (a KV cache's first L slots); fp32 or
// bf16, all one dtype. Returns (B, H, 1, D) in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t isa) {
  TORCH_CHECK(isa == 1 || isa == 2, "isa is 1 (AVX2) or 2 (AVX-512)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q (B, H, 1, D), k and v (B, Hkv, L, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3), "matching shapes");
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), L = k.size(2), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && L > 0 && D <= kMaxHeadDim, "H a multiple of Hkv, L > 0, D <= 256");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "one dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D,
              "each head's positions contiguous");
  auto out = torch::empty({B, H, 1, D}, q.options());
  const Heads a{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, H / Hkv, L, D,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                static_cast<float>(scale)};
  const int64_t grain = std::max<int64_t>(1, 16384 / (L * D));  // a short cache is not worth a second thread
#if defined(__x86_64__)
  using Attend = void (*)(const Heads&, int64_t, int64_t);
  Attend body;
  if (q.scalar_type() == torch::kFloat32) {
    body = isa == 2 ? attend_avx512<float> : attend_avx2<float>;
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "fp32 or bf16");
    body = isa == 2 ? attend_avx512<at::BFloat16> : attend_avx2<at::BFloat16>;
  }
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) { body(a, begin, end); });
#else
  TORCH_CHECK(false, "llmcli's kernels are x86 only");
#endif
  return out;
}

// ---- greedy decoding's argmax over each row of logits (B, V), fp32 or bf16: the first index of the largest value,
// or of the first NaN, as torch.argmax (whose CPU reduction reads 49K bf16 logits in about 170 us).

namespace {

#if defined(__x86_64__)
template <typename T>
AVX512 int64_t argmax_row(const T* row, int64_t V) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 best = lowest;
  __m512i where = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 live = V - i >= 16 ? 0xFFFF : (__mmask16)((1u << (V - i)) - 1);
    __m512 v;
    if constexpr (std::is_same_v<T, float>) {
      v = _mm512_mask_loadu_ps(lowest, live, row + i);
    } else {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, row + i));
      v = _mm512_mask_blend_ps(live, lowest, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    }
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 higher = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // ties keep the earlier index
    best = _mm512_mask_blend_ps(higher, best, v);
    where = _mm512_mask_blend_epi32(higher, where, at);
    at = _mm512_add_epi32(at, sixteen);
  }
  if (nan) {
    for (int64_t i = 0; i < V; ++i) {
      float value;
      if constexpr (std::is_same_v<T, float>) {
        value = row[i];
      } else {
        const uint32_t bits = static_cast<uint32_t>(row[i]) << 16;
        std::memcpy(&value, &bits, 4);
      }
      if (std::isnan(value)) return i;
    }
  }
  alignas(64) float values[16];
  alignas(64) int32_t index[16];
  _mm512_store_ps(values, best);
  _mm512_store_si512(index, where);
  int64_t pick = index[0];
  float top = values[0];
  for (int j = 1; j < 16; ++j)
    if (values[j] > top || (values[j] == top && index[j] < pick)) top = values[j], pick = index[j];
  return pick;
}
#endif

}  // namespace

// logits (B, V) with contiguous rows (any row stride) -> (B,) int64. The AVX-512 body only: the caller checks the CPU.
torch::Tensor argmax_rows(torch::Tensor logits) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  TORCH_CHECK(avx512, "argmax_rows needs AVX-512");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0, "logits (B, V), rows contiguous");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "V fits in 32 bits");
  const int64_t B = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto out = torch::empty({B}, torch::kLong);
  auto* picks = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (logits.scalar_type() == torch::kFloat32) {
      picks[b] = argmax_row(logits.data_ptr<float>() + b * stride, V);
    } else {
      TORCH_CHECK(logits.scalar_type() == torch::kBFloat16, "fp32 or bf16 logits");
      picks[b] = argmax_row(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()) + b * stride, V);
    }
  }
  return out;
#else
  TORCH_CHECK(false, "llmcli's kernels are x86 only");
#endif
}

// Ops (torch.ops.llmcli.*): schemas here, CPU kernels below; their shapes for torch.compile are in gemv.py.
TORCH_LIBRARY(llmcli, m) {
  m.def("linear_f32(Tensor x, Tensor w, int isa) -> Tensor");  // y = x Wᵀ, 2-d operands as the bodies take them
  m.def("linear_bf16(Tensor x, Tensor w, int isa) -> Tensor");
  m.def("linear(Tensor x, Tensor[] w, Tensor? bias, int isa) -> Tensor");  // F.linear; several W: outputs side by side
  // int8 or int4 in tile_rows's layout
  m.def("linear_int_tiles(Tensor x, Tensor[] qweight, Tensor[] scales, int group, int bits, int isa) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");  // greedy decoding's pick per row
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcli, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear", &linear);
  m.impl("linear_int_tiles", &linear_int_tiles);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decode_attention", &decode_attention);
}
