// CPU kernel bodies, compiled once per instruction set (no include guard on purpose:
// each isa_*.cpp includes it once). The including file defines LLMO_ISA (0 = portable
// scalar, 1 = AVX2/FMA/F16C,
// 2 = AVX2 plus 256-bit AVX-512 VNNI dot products) and LLMO_NS (namespace).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if LLMO_ISA >= 1
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/lora.h"

namespace llmo {
namespace LLMO_NS {
namespace {

#if LLMO_ISA >= 1
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// acc += sum of u8 x s8 products, four per int32 lane. Callers keep every
// pairwise sum inside int16 (|u| <= 128, |s| <= 127) so maddubs never saturates.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if LLMO_ISA == 2
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// Two nibble-by-int8 dot products at once; nibbles (<= 15) leave int16 headroom
// to add the two maddubs results before widening.
inline __m256i dot2_u4s8(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if LLMO_ISA == 2
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, u0, s0), u1, s1);
#else
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}
#endif

// ---------------------------------------------------------------- attention

template <int DT>
inline const float* row_f32(const void* base, int64_t offset, int dim, float* buf) {
  if constexpr (DT == kF32) {
    return static_cast<const float*>(base) + offset;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#if LLMO_ISA >= 1
    for (int d = 0; d < dim; d += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      __m256 f;
      if constexpr (DT == kBF16) {
        f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        f = _mm256_cvtph_ps(h);
      }
      _mm256_storeu_ps(buf + d, f);
    }
#else
    for (int d = 0; d < dim; ++d) buf[d] = DT == kBF16 ? bf16_to_f32(src[d]) : f16_to_f32(src[d]);
#endif
    return buf;
  }
}

#if LLMO_ISA >= 1
// The widest float vector of the ISA: 16 lanes with AVX-512, 8 with AVX2.
#if LLMO_ISA == 2
using VecF = __m512;
constexpr int kVecF = 16;
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vset1(float x) { return _mm512_set1_ps(x); }
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
#else
using VecF = __m256;
constexpr int kVecF = 8;
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vset1(float x) { return _mm256_set1_ps(x); }
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline float vsum(VecF v) { return hsum(v); }
#endif
#endif

inline float dot_f32(const float* a, const float* b, int n) {
  float s = 0.f;
  int d = 0;
#if LLMO_ISA >= 1
  VecF acc0 = vzero(), acc1 = vzero();
  for (; d + 2 * kVecF <= n; d += 2 * kVecF) {
    acc0 = vfma(vload(a + d), vload(b + d), acc0);
    acc1 = vfma(vload(a + d + kVecF), vload(b + d + kVecF), acc1);
  }
  for (; d + kVecF <= n; d += kVecF) acc0 = vfma(vload(a + d), vload(b + d), acc0);
  s = vsum(vadd(acc0, acc1));
#endif
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// acc[0, dim) += p * v[0, dim) (the portable attention path).
inline void axpy(float* acc, float p, const float* v, int dim) {
  for (int d = 0; d < dim; ++d) acc[d] += p * v[d];
}

#if LLMO_ISA >= 1
// e^x for 8 lanes (Cephes expf: Cody-Waite reduction by ln 2, degree-6
// polynomial, about 1 ulp); inputs below -88 give 0 or a denormal.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// One block of online softmax: s[0..n) becomes exp(s - m_new), m_new =
// max(*running_max, max(s)); returns the sum of the new values and stores
// exp(old max - m_new), the rescale of what was summed before, in *alpha.
inline float softmax_block(float* s, int n, float* running_max, float* alpha) {
  float block_max = s[0];
  int t = 0;
#if LLMO_ISA >= 1
  if (n >= 8) {
    __m256 vm = _mm256_loadu_ps(s);
    for (t = 8; t + 8 <= n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    block_max = std::max(block_max, _mm_cvtss_f32(m4));
  }
#endif
  for (; t < n; ++t) block_max = std::max(block_max, s[t]);
  const float m_new = std::max(*running_max, block_max);
  *alpha = std::exp(*running_max - m_new);
  *running_max = m_new;
  float sum = 0.f;
  t = 0;
#if LLMO_ISA >= 1
  const __m256 vmax = _mm256_set1_ps(m_new);
  __m256 vsum = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmax));
    _mm256_storeu_ps(s + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = hsum(vsum);
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m_new);
    sum += s[t];
  }
  return sum;
}

#if LLMO_ISA >= 1
// acc[0, NV * kVecF) += sum over t < n of p[t] * rows[t * row_stride + ...], the
// accumulators held in registers for all n rows.
template <int NV>
inline void weighted_rows_part(float* acc, const float* p, const float* rows, int64_t row_stride, int n) {
  VecF r[NV];
  for (int i = 0; i < NV; ++i) r[i] = vload(acc + i * kVecF);
  for (int t = 0; t < n; ++t) {
    const VecF pt = vset1(p[t]);
    const float* v = rows + t * row_stride;
    for (int i = 0; i < NV; ++i) r[i] = vfma(pt, vload(v + i * kVecF), r[i]);
  }
  for (int i = 0; i < NV; ++i) vstore(acc + i * kVecF, r[i]);
}

// acc[0, dim) += sum over t < n of p[t] * rows[t * row_stride + 0, dim), in
// register-sized slices of up to 8 vectors; a tail below one vector is scalar.
inline void weighted_rows(float* acc, const float* p, const float* rows, int64_t row_stride, int n, int dim) {
  int d = 0;
  for (; d + 8 * kVecF <= dim; d += 8 * kVecF) weighted_rows_part<8>(acc + d, p, rows + d, row_stride, n);
  switch ((dim - d) / kVecF) {
    case 7: weighted_rows_part<7>(acc + d, p, rows + d, row_stride, n); break;
    case 6: weighted_rows_part<6>(acc + d, p, rows + d, row_stride, n); break;
    case 5: weighted_rows_part<5>(acc + d, p, rows + d, row_stride, n); break;
    case 4: weighted_rows_part<4>(acc + d, p, rows + d, row_stride, n); break;
    case 3: weighted_rows_part<3>(acc + d, p, rows + d, row_stride, n); break;
    case 2: weighted_rows_part<2>(acc + d, p, rows + d, row_stride, n); break;
    case 1: weighted_rows_part<1>(acc + d, p, rows + d, row_stride, n); break;
    default: break;
  }
  d += (dim - d) / kVecF * kVecF;
  for (; d < dim; ++d)
    for (int t = 0; t < n; ++t) acc[d] += p[t] * rows[t * row_stride + d];
}
#endif

// Bytes requested ahead of each jump between KV streams (see attention_impl).
constexpr int64_t kJumpPrefetch = 4096;

inline void prefetch_span(const char* p, int64_t bytes) {
#if LLMO_ISA >= 1
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// One work item = one query row and a contiguous range of KV heads. Within a
// block the item's K/V bytes for a token are contiguous ([token][head][dim]),
// so walking tokens in order streams memory; the next block (a random jump) is
// prefetched while the current one is computed.
template <int DT>
void attention_impl(const AttnArgs& a) {
  const int group = a.heads / a.kv_heads;
  const int dim = a.head_dim;
  const int bs = a.block_size;
  const int threads = num_threads();
  const int64_t want_items = threads;
  int chunks = static_cast<int>(std::min<int64_t>(a.kv_heads, (want_items + a.rows - 1) / std::max<int64_t>(a.rows, 1)));
  chunks = std::max(chunks, 1);
  const int per_chunk = (a.kv_heads + chunks - 1) / chunks;
  chunks = (a.kv_heads + per_chunk - 1) / per_chunk;
  const int64_t items = a.rows * chunks;
  const int64_t tok_stride = static_cast<int64_t>(a.kv_heads) * dim;
  const int esize = dtype_size(a.kv_dtype);
  const char* kbytes = static_cast<const char*>(a.key_cache);
  const char* vbytes = static_cast<const char*>(a.value_cache);
#pragma omp parallel num_threads(threads)
  {
    const int nq = per_chunk * group;  // query heads per item
    std::vector<float> q(nq * dim), acc(nq * dim), kbuf(dim), vbuf(static_cast<int64_t>(bs) * per_chunk * dim), sc(nq * bs), mx(nq), den(nq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t r = it / chunks;
      const int h0 = static_cast<int>(it % chunks) * per_chunk;
      const int nh = std::min(per_chunk, a.kv_heads - h0);
      const int nqh = nh * group;
      const int len = a.row_len[r];
      const int64_t qoff = (r * a.heads + static_cast<int64_t>(h0) * group) * dim;
      float* out = a.out + qoff;
      if (len <= 0) {
        std::fill(out, out + nqh * dim, 0.f);
        continue;
      }
      for (int i = 0; i < nqh * dim; ++i) q[i] = a.q[qoff + i] * a.scale;
      std::fill(acc.begin(), acc.begin() + nqh * dim, 0.f);
      std::fill(mx.begin(), mx.begin() + nqh, -std::numeric_limits<float>::infinity());
      std::fill(den.begin(), den.begin() + nqh, 0.f);
      const int32_t* table = a.block_tables + static_cast<int64_t>(a.row_seq[r]) * a.max_blocks;
      const int64_t span = static_cast<int64_t>(nh) * dim * esize;
      for (int pos = 0; pos < len; pos += bs) {
        const int64_t block = table[pos / bs];
        const int nt = std::min(bs, len - pos);
        const int64_t base = block * bs * tok_stride + static_cast<int64_t>(h0) * dim;
        // Within a block the hardware prefetcher streams the item's rows; what it
        // cannot see coming are the jumps (K to V of this block, V to K of the
        // next), so the first kJumpPrefetch bytes after each are requested ahead:
        // V two tokens before the K pass ends, the next K as the V pass starts.
        // (Prefetching whole blocks ahead measured slower: it evicts the rows being read.)
        const int next_nt = pos + bs < len ? std::min(bs, len - pos - bs) : 0;
        const int64_t next = next_nt > 0 ? table[pos / bs + 1] * bs * tok_stride + static_cast<int64_t>(h0) * dim : 0;
        const int lead_t = std::max(0, nt - 2);
        for (int t = 0; t < nt; ++t) {
          if (t == lead_t) prefetch_span(vbytes + base * esize, std::min<int64_t>(span * nt, kJumpPrefetch));
          for (int hh = 0; hh < nh; ++hh) {
            const float* krow = row_f32<DT>(a.key_cache, base + t * tok_stride + hh * dim, dim, kbuf.data());
            for (int g = 0; g < group; ++g) {
              const int qh = hh * group + g;
              sc[qh * bs + t] = dot_f32(&q[qh * dim], krow, dim);
            }
          }
        }
        for (int qh = 0; qh < nqh; ++qh) {
          float alpha = 1.f;
          const float sum = softmax_block(&sc[qh * bs], nt, &mx[qh], &alpha);
          den[qh] = den[qh] * alpha + sum;
          if (alpha != 1.f) {
            float* ac = &acc[qh * dim];
            for (int d = 0; d < dim; ++d) ac[d] *= alpha;
          }
        }
#if LLMO_ISA >= 1
        // Head by head, each head's output row stays in registers over the block's
        // tokens (7-8% faster than token-major axpy, which reloads it per token).
        if (next_nt > 0) prefetch_span(kbytes + next * esize, std::min<int64_t>(span * next_nt, kJumpPrefetch));
        const float* vrows;
        int64_t vstride;
        if constexpr (DT == kF32) {
          vrows = static_cast<const float*>(a.value_cache) + base;
          vstride = tok_stride;
        } else {
          for (int t = 0; t < nt; ++t) row_f32<DT>(a.value_cache, base + t * tok_stride, nh * dim, vbuf.data() + t * nh * dim);
          vrows = vbuf.data();
          vstride = static_cast<int64_t>(nh) * dim;
        }
        for (int qh = 0; qh < nqh; ++qh)
          weighted_rows(&acc[qh * dim], &sc[qh * bs], vrows + (qh / group) * dim, vstride, nt, dim);
#else
        for (int t = 0; t < nt; ++t) {
          for (int hh = 0; hh < nh; ++hh) {
            const float* vrow = row_f32<DT>(a.value_cache, base + t * tok_stride + hh * dim, dim, vbuf.data());
            for (int g = 0; g < group; ++g) {
              const int qh = hh * group + g;
              axpy(&acc[qh * dim], sc[qh * bs + t], vrow, dim);
            }
          }
        }
#endif
      }
      for (int qh = 0; qh < nqh; ++qh) {
        const float inv = 1.f / den[qh];
        for (int d = 0; d < dim; ++d) out[qh * dim + d] = acc[qh * dim + d] * inv;
      }
    }
  }
}

void attention(const AttnArgs& a) {
  switch (a.kv_dtype) {
    case kBF16: attention_impl<kBF16>(a); break;
    case kF16: attention_impl<kF16>(a); break;
    default: attention_impl<kF32>(a); break;
  }
}

// ---------------------------------------------------------- quantization

inline float absmax(const float* x, int64_t n) {
  int64_t i = 0;
  float m = 0.f;
#if LLMO_ISA >= 1
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vm = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  m = _mm_cvtss_f32(s);
#endif
  for (; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

// Symmetric int8 of n values; returns the scale and the sum of the codes.
inline float quantize_span(const float* x, int8_t* q, int64_t n, int32_t* code_sum) {
  const float amax = absmax(x, n);
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / scale;
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv)));
    q[i] = static_cast<int8_t>(v);
    sum += static_cast<int32_t>(v);
  }
  if (code_sum != nullptr) *code_sum = sum;
  return scale;
}

void quantize_rows(const float* x, int8_t* q, float* scales, int64_t M, int64_t K) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) scales[m] = quantize_span(x + m * K, q + m * K, K, nullptr);
}

// ------------------------------------------------------------- INT8 GEMM

// MT activation rows x NT weight rows; two weight rows stream at once so more
// cache misses are in flight (decode GEMV is bound by memory latency/bandwidth).
template <int MT, int NT>
inline void int8_tile(const Int8GemmArgs& p, int64_t m0, int64_t n0) {
  const int64_t K = p.K;
  int32_t tot[MT][NT];
  int64_t k = 0;
#if LLMO_ISA >= 1
  __m256i acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_si256();
  for (; k + 32 <= K; k += 32) {
    __m256i bv[NT], bu[NT];
    for (int j = 0; j < NT; ++j) {
      const int8_t* b = p.b + (n0 + j) * K + k;
      // Prefetch the same offset NT rows ahead: the next tile of this thread.
      _mm_prefetch(reinterpret_cast<const char*>(b + NT * K), _MM_HINT_T0);
      bv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      bu[j] = _mm256_abs_epi8(bv[j]);
    }
    for (int i = 0; i < MT; ++i) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a + (m0 + i) * K + k));
      // sign trick: |b| * (a * sign(b)) == a * b with an unsigned left operand
      for (int j = 0; j < NT; ++j) acc[i][j] = dot_u8s8(acc[i][j], bu[j], _mm256_sign_epi8(av, bv[j]));
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = hsum_i32(acc[i][j]);
#else
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = 0;
#endif
  for (int i = 0; i < MT; ++i) {
    const int8_t* a = p.a + (m0 + i) * K;
    for (int j = 0; j < NT; ++j) {
      const int64_t n = n0 + j;
      const int8_t* b = p.b + n * K;
      int32_t s = tot[i][j];
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<int32_t>(a[kk]) * static_cast<int32_t>(b[kk]);
      float v = static_cast<float>(s) * p.a_scales[m0 + i] * p.b_scales[n];
      if (p.bias != nullptr) v += p.bias[n];
      p.out[(m0 + i) * p.N + n] = v;
    }
  }
}

template <int NT>
inline void int8_rows(const Int8GemmArgs& p, int64_t n0) {
  int64_t m0 = 0;
  if constexpr (NT == 1) {
    for (; m0 + 4 <= p.M; m0 += 4) int8_tile<4, NT>(p, m0, n0);
  }
  switch (p.M - m0) {
    case 3: int8_tile<3, NT>(p, m0, n0); break;
    case 2: int8_tile<2, NT>(p, m0, n0); break;
    case 1: int8_tile<1, NT>(p, m0, n0); break;
    default: break;
  }
}

void int8_gemm(const Int8GemmArgs& p) {
  // Tile shapes keep every accumulator in the 16 ymm registers (spills cost
  // more than the extra loads): one activation row streams four weight rows
  // (memory bound), a few rows stream two, four or more rows take one.
  const int nt = p.M == 1 ? 4 : (p.M < 4 ? 2 : 1);
  const int64_t tiles = p.N / nt;
#pragma omp parallel num_threads(num_threads())
  {
    // Dynamic chunks: on a shared machine a preempted thread's share is taken
    // over instead of stalling the whole call at the barrier.
#pragma omp for schedule(dynamic, 16)
    for (int64_t t = 0; t < tiles; ++t) {
      if (nt == 4) {
        int8_rows<4>(p, 4 * t);
      } else if (nt == 2) {
        int8_rows<2>(p, 2 * t);
      } else {
        int8_rows<1>(p, t);
      }
    }
#pragma omp single
    for (int64_t n = tiles * nt; n < p.N; ++n) int8_rows<1>(p, n);
  }
}

// ------------------------------------------------ INT8 linear (packed W8A8)

// Per-token asymmetric 7-bit codes: q = clamp(round(x / s) + zp, 0, 127) with
// s = (max(x, 0) - min(x, 0)) / 127, so vpmaddubsw(u7, s8) never saturates
// (2 * 127 * 128 < 32767). Codes past K (up to kpad) are zero.
inline void quantize_span_u7(const float* x, uint8_t* q, int64_t K, int64_t kpad, float* scale_out,
                             int32_t* zp_out) {
  float lo = 0.f, hi = 0.f;
  int64_t i = 0;
#if LLMO_ISA >= 1
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  for (; i + 8 <= K; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float l8[8], h8[8];
  _mm256_store_ps(l8, vlo);
  _mm256_store_ps(h8, vhi);
  for (int j = 0; j < 8; ++j) {
    lo = std::min(lo, l8[j]);
    hi = std::max(hi, h8[j]);
  }
#endif
  for (; i < K; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float scale = (hi - lo) / 127.f;
  if (!(scale > 0.f)) scale = 1.f;
  const float inv = 1.f / scale;
  const float zpf = std::min(127.f, std::max(0.f, std::nearbyint(-lo * inv)));
  i = 0;
#if LLMO_ISA >= 1
  const __m256 vinv = _mm256_set1_ps(inv), vzp = _mm256_set1_ps(zpf);
  const __m256 vmax = _mm256_set1_ps(127.f), vmin = _mm256_setzero_ps();
  for (; i + 16 <= K; i += 16) {
    __m256 a = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 b =
        _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    a = _mm256_min_ps(vmax, _mm256_max_ps(vmin, _mm256_add_ps(a, vzp)));
    b = _mm256_min_ps(vmax, _mm256_max_ps(vmin, _mm256_add_ps(b, vzp)));
    const __m256i w16 = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));  // lanes interleaved
    const __m128i b8 = _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    // b8 order: a0-3 b0-3 a4-7 b4-7 -> restore a0-7 b0-7
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm_shuffle_epi32(b8, 0xd8));
  }
#endif
  for (; i < K; ++i) {
    const float v = std::min(127.f, std::max(0.f, std::nearbyint(x[i] * inv) + zpf));
    q[i] = static_cast<uint8_t>(v);
  }
  for (; i < kpad; ++i) q[i] = 0;
  *scale_out = scale;
  *zp_out = static_cast<int32_t>(zpf);
}

void quantize_rows_u7(const float* x, uint8_t* q, float* scales, int32_t* zps, int64_t M, int64_t K, int64_t kpad) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) quantize_span_u7(x + m * K, q + m * kpad, K, kpad, &scales[m], &zps[m]);
}

// Packed weight: blocks of 8 output columns; within a block, for each group of
// 4 input channels, 32 bytes = column c's 4 consecutive weights at bytes 4c..4c+3.
// One 32-byte load then multiplies against 4 broadcast activation codes.
// After the blocks: one flag byte per (block, segment of kSegSteps groups): 1 when
// two consecutive groups' vpmaddubsw results can be added in int16 before
// widening, i.e. 127 * (sum of the 4 |w| meeting in one int16 lane) <= 32767.
constexpr int64_t kSegSteps = 8;

inline int64_t int8_segments(int64_t K) { return ((K + 3) / 4 + kSegSteps - 1) / kSegSteps; }

void int8_pack(const int8_t* w, int8_t* packed, int32_t* colsum, int64_t N, int64_t K) {
  const int64_t k4 = (K + 3) / 4, blocks = (N + 7) / 8, segs = int8_segments(K);
  uint8_t* flags = reinterpret_cast<uint8_t*>(packed + blocks * k4 * 32);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t nb = 0; nb < blocks; ++nb) {
    int8_t* dst = packed + nb * k4 * 32;
    for (int c = 0; c < 8; ++c) {
      const int64_t n = nb * 8 + c;
      if (n >= N) {
        for (int64_t kq = 0; kq < k4; ++kq) std::memset(dst + kq * 32 + c * 4, 0, 4);
        continue;
      }
      const int8_t* row = w + n * K;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += row[k];
      colsum[n] = sum;
      const int64_t full = K / 4;
      for (int64_t kq = 0; kq < full; ++kq) std::memcpy(dst + kq * 32 + c * 4, row + kq * 4, 4);
      if (full < k4) {  // K tail, zero padded
        int8_t tail[4] = {0, 0, 0, 0};
        for (int64_t k = full * 4; k < K; ++k) tail[k - full * 4] = row[k];
        std::memcpy(dst + full * 32 + c * 4, tail, 4);
      }
    }
    for (int64_t sg = 0; sg < segs; ++sg) {
      bool safe = true;
      for (int64_t kq = sg * kSegSteps; kq + 1 < std::min(k4, (sg + 1) * kSegSteps) && safe; kq += 2)
        for (int lane = 0; lane < 16 && safe; ++lane) {  // int16 lane = column lane/2, channels 2*(lane%2)+{0,1}
          const int8_t* a = dst + kq * 32 + lane * 2;
          const int32_t mag = std::abs(a[0]) + std::abs(a[1]) + std::abs(a[32]) + std::abs(a[33]);
          safe = 127 * mag <= 32767;
        }
      flags[nb * segs + sg] = safe ? 1 : 0;
    }
  }
}

#if LLMO_ISA >= 1
// Groups [kq, k_end) of one K segment. Column block j with bit j of SAFE set
// adds two groups' vpmaddubsw results in int16 (safe by the pack-time check) and
// widens once; the others widen every group.
template <int MR, int NB, unsigned SAFE>
inline void int8p_segment(__m256i (&acc)[MR][NB], const int8_t* wp, int64_t bstride, const uint8_t* ap, int64_t kpad,
                          int64_t kq, int64_t k_end) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (; kq + 2 <= k_end; kq += 2) {
    if constexpr (MR == 1) {
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(wp + j * bstride + kq * 32) + 1024, _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      int32_t a8[2];
      std::memcpy(a8, ap + i * kpad + kq * 4, 8);
      const __m256i a0 = _mm256_set1_epi32(a8[0]), a1 = _mm256_set1_epi32(a8[1]);
      for (int j = 0; j < NB; ++j) {
        const int8_t* src = wp + j * bstride + kq * 32;
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
        if ((SAFE >> j) & 1u) {
          const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, w0), _mm256_maddubs_epi16(a1, w1));
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(s16, ones));
        } else {
          acc[i][j] = dot_u8s8(dot_u8s8(acc[i][j], a0, w0), a1, w1);
        }
      }
    }
  }
  for (; kq < k_end; ++kq) {
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ap + i * kpad + kq * 4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      for (int j = 0; j < NB; ++j)
        acc[i][j] = dot_u8s8(acc[i][j], av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + j * bstride + kq * 32)));
    }
  }
}

template <int MR, int NB, unsigned SAFE>
inline void int8p_segment_dispatch(unsigned mask, __m256i (&acc)[MR][NB], const int8_t* wp, int64_t bstride,
                                   const uint8_t* ap, int64_t kpad, int64_t kq, int64_t k_end) {
  if constexpr (SAFE + 1 < (1u << NB)) {
    if (mask != SAFE) {
      int8p_segment_dispatch<MR, NB, SAFE + 1>(mask, acc, wp, bstride, ap, kpad, kq, k_end);
      return;
    }
  }
  int8p_segment<MR, NB, SAFE>(acc, wp, bstride, ap, kpad, kq, k_end);
}
#endif

#if LLMO_ISA == 2
// Bytes requested ahead in each column block's stream.
constexpr int kInt8PrefetchAhead = 1024;

// 512-bit VNNI over the same packed layout: one 64-byte load holds a column
// block's channel quads kq and kq + 1, so the activation vector carries quad kq
// in lanes 0-7 and quad kq + 1 in lanes 8-15; the two halves are added at the end.
template <int MR, int NB>
inline void int8p_vnni512(__m256i (&acc)[MR][NB], const int8_t* wp, int64_t bstride, const uint8_t* ap, int64_t kpad,
                          int64_t k4) {
  const __m512i pair_index = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i wide[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) wide[i][j] = _mm512_setzero_si512();
  int64_t kq = 0;
  for (; kq + 2 <= k4; kq += 2) {
    for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(wp + j * bstride + kq * 32) + kInt8PrefetchAhead, _MM_HINT_T0);
    __m512i w[NB];
    for (int j = 0; j < NB; ++j) w[j] = _mm512_loadu_si512(wp + j * bstride + kq * 32);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_permutexvar_epi32(
          pair_index, _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ap + i * kpad + kq * 4))));
      for (int j = 0; j < NB; ++j) wide[i][j] = _mm512_dpbusd_epi32(wide[i][j], a, w[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j)
      acc[i][j] = _mm256_add_epi32(_mm512_castsi512_si256(wide[i][j]), _mm512_extracti64x4_epi64(wide[i][j], 1));
  for (; kq < k4; ++kq) {
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ap + i * kpad + kq * 4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      for (int j = 0; j < NB; ++j)
        acc[i][j] = dot_u8s8(acc[i][j], av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + j * bstride + kq * 32)));
    }
  }
}

// Many rows (MR >= 8) over 4 column blocks, one channel quad at a time: a zmm
// holds quad kq of two adjacent blocks (16 columns), so each activation quad is
// a plain dword broadcast and one 2 x 32-byte weight gather serves all MR rows
// (the pair form above needs a permute per row and step instead).
template <int MR>
inline void int8p_vnni512_rows(__m256i (&acc)[MR][4], const int8_t* wp, int64_t bstride, const uint8_t* ap,
                               int64_t kpad, int64_t k4) {
  __m512i wide[MR][2];
  for (int i = 0; i < MR; ++i) wide[i][0] = wide[i][1] = _mm512_setzero_si512();
  for (int64_t kq = 0; kq < k4; ++kq) {
    if ((kq & 1) == 0)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wp + j * bstride + kq * 32) + kInt8PrefetchAhead, _MM_HINT_T0);
    __m512i w[2];
    for (int h = 0; h < 2; ++h) {
      const int8_t* lo = wp + (2 * h) * bstride + kq * 32;
      w[h] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + bstride)), 1);
    }
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ap + i * kpad + kq * 4, 4);
      const __m512i a = _mm512_set1_epi32(a4);
      wide[i][0] = _mm512_dpbusd_epi32(wide[i][0], a, w[0]);
      wide[i][1] = _mm512_dpbusd_epi32(wide[i][1], a, w[1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2; ++h) {
      acc[i][2 * h] = _mm512_castsi512_si256(wide[i][h]);
      acc[i][2 * h + 1] = _mm512_extracti64x4_epi64(wide[i][h], 1);
    }
}
#endif

// Largest K for which a u7 x s8 dot minus zero point x column sum fits int32
// (each is at most 127 * 127 * K in magnitude).
constexpr int64_t kExactInt32K = 65536;

// MR activation rows x NB column blocks (8 columns each) over the whole of K.
template <int MR, int NB>
inline void int8p_tile(const Int8LinearArgs& p, const uint8_t* aq, int64_t kpad, const float* xs, const int32_t* zp,
                       int64_t m0, int64_t nb0) {
  const int64_t k4 = kpad / 4;
  alignas(32) int32_t res[MR][NB][8];
#if LLMO_ISA >= 1
  __m256i acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
  const int8_t* wp = p.packed + nb0 * k4 * 32;
  const int64_t bstride = k4 * 32;
  const uint8_t* ap = aq + m0 * kpad;
#if LLMO_ISA == 2
  if constexpr (MR >= 8 && NB == 4)
    int8p_vnni512_rows<MR>(acc, wp, bstride, ap, kpad, k4);
  else
    int8p_vnni512<MR, NB>(acc, wp, bstride, ap, kpad, k4);
#else
  const int64_t segs = int8_segments(p.K);
  const uint8_t* flags = reinterpret_cast<const uint8_t*>(p.packed + (p.N + 7) / 8 * bstride) + nb0 * segs;
  for (int64_t sg = 0; sg < segs; ++sg) {
    unsigned mask = 0;
    for (int j = 0; j < NB; ++j) mask |= static_cast<unsigned>(flags[j * segs + sg] != 0) << j;
    int8p_segment_dispatch<MR, NB, 0>(mask, acc, wp, bstride, ap, kpad, sg * kSegSteps,
                                      std::min(k4, (sg + 1) * kSegSteps));
  }
#endif
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(res[i][j]), acc[i][j]);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) {
      const int8_t* wb = p.packed + (nb0 + j) * k4 * 32;
      const uint8_t* a = aq + (m0 + i) * kpad;
      for (int c = 0; c < 8; ++c) {
        int32_t s = 0;
        for (int64_t k = 0; k < kpad; ++k) s += static_cast<int32_t>(a[k]) * wb[(k / 4) * 32 + c * 4 + (k % 4)];
        res[i][j][c] = s;
      }
    }
#endif
  for (int i = 0; i < MR; ++i) {
    const int64_t m = m0 + i;
    for (int j = 0; j < NB; ++j) {
      int c = 0;
#if LLMO_ISA >= 1
      const int64_t n0 = (nb0 + j) * 8;
      if (p.K <= kExactInt32K && n0 + 8 <= p.N) {
        // The scalar loop below, 8 columns at once and bit for bit: dot - zp * colsum
        // is exact in int32 for these K, then (dot * x_scale) * w_scale in double.
        const __m256i dot = _mm256_sub_epi32(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(res[i][j])),
            _mm256_mullo_epi32(_mm256_set1_epi32(zp[m]),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.colsum + n0))));
        const __m256d xsd = _mm256_set1_pd(static_cast<double>(xs[m]));
        const __m256 ws = _mm256_loadu_ps(p.w_scales + n0);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(dot)), xsd),
                                                        _mm256_cvtps_pd(_mm256_castps256_ps128(ws))));
        const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(dot, 1)), xsd),
                                                        _mm256_cvtps_pd(_mm256_extractf128_ps(ws, 1))));
        __m256 v = _mm256_set_m128(hi, lo);
        if (p.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + n0));
        _mm256_storeu_ps(p.out + m * p.N + n0, v);
        c = 8;
      }
#endif
      for (; c < 8; ++c) {
        const int64_t n = (nb0 + j) * 8 + c;
        if (n >= p.N) break;
        const int64_t dot = static_cast<int64_t>(res[i][j][c]) - static_cast<int64_t>(zp[m]) * p.colsum[n];
        float v = static_cast<float>(static_cast<double>(dot) * static_cast<double>(xs[m]) *
                                     static_cast<double>(p.w_scales[n]));
        if (p.bias != nullptr) v += p.bias[n];
        p.out[m * p.N + n] = v;
      }
    }
  }
}

template <int NB>
inline void int8p_columns(const Int8LinearArgs& p, const uint8_t* aq, int64_t kpad, const float* xs,
                          const int32_t* zp, int64_t nb0) {
  int64_t m0 = 0;
#if LLMO_ISA == 2
  if constexpr (NB == 4)
    for (; m0 + 8 <= p.M; m0 += 8) int8p_tile<8, NB>(p, aq, kpad, xs, zp, m0, nb0);
#endif
  for (; m0 + 4 <= p.M; m0 += 4) int8p_tile<4, NB>(p, aq, kpad, xs, zp, m0, nb0);
  switch (p.M - m0) {
    case 3: int8p_tile<3, NB>(p, aq, kpad, xs, zp, m0, nb0); break;
    case 2: int8p_tile<2, NB>(p, aq, kpad, xs, zp, m0, nb0); break;
    case 1: int8p_tile<1, NB>(p, aq, kpad, xs, zp, m0, nb0); break;
    default: break;
  }
}

void int8_linear(const Int8LinearArgs& p) {
  const int64_t kpad = (p.K + 3) / 4 * 4;
  const int64_t blocks = (p.N + 7) / 8;
  std::vector<uint8_t> aq(p.M * kpad);
  std::vector<float> xs(p.M);
  std::vector<int32_t> zp(p.M);
  quantize_rows_u7(p.x, aq.data(), xs.data(), zp.data(), p.M, p.K, kpad);
  // One row streams 4 column blocks (memory bound: more streams in flight);
  // more rows take 2 blocks per tile so 4 x 2 accumulators fit the registers.
  // (AVX-512 has 32 vector registers: 4 x 4 accumulators, and 8 rows x 2 zmm
  // per tile from M = 8 on, see int8p_vnni512_rows.)
  const int nb = p.M == 1 || LLMO_ISA == 2 ? 4 : 2;
  const int64_t tiles = blocks / nb;
#pragma omp parallel num_threads(num_threads())
  {
#pragma omp for schedule(dynamic, 4) nowait
    for (int64_t t = 0; t < tiles; ++t) {
      if (nb == 4 && p.M == 1) {
        int8p_tile<1, 4>(p, aq.data(), kpad, xs.data(), zp.data(), 0, 4 * t);
      } else if (nb == 4) {
        int8p_columns<4>(p, aq.data(), kpad, xs.data(), zp.data(), 4 * t);
      } else {
        int8p_columns<2>(p, aq.data(), kpad, xs.data(), zp.data(), 2 * t);
      }
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = tiles * nb; b < blocks; ++b) int8p_columns<1>(p, aq.data(), kpad, xs.data(), zp.data(), b);
  }
}

// ------------------------------------------------------------- INT4 GEMM

// count scales of one weight row as fp32 (hot: one call per output column).
inline void load_scales(const void* base, int dtype, int64_t offset, int64_t count, float* dst) {
  int64_t i = 0;
  if (dtype == kF32) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, count * sizeof(float));
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#if LLMO_ISA >= 1
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256 f = dtype == kF16 ? _mm256_cvtph_ps(h)
                                   : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(dst + i, f);
  }
#endif
  for (; i < count; ++i) dst[i] = dtype == kF16 ? f16_to_f32(src[i]) : bf16_to_f32(src[i]);
}

struct QuantizedActs {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, groups]
  std::vector<float> zcorr;   // [M, groups]: scale * sum of the group's codes
};

// NT output columns for MT activation rows: sum over groups of
// s_w * s_x * (dot(q_w, q_x) - zero * sum(q_x)). Several columns at once share
// the activation loads and keep more weight streams in flight.
static_assert(4 * 2 * 15 * 127 <= 32767, "int16 group sums of int4_tile");

#if LLMO_ISA == 2
inline __m512 halves_ps(float lo, float hi) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
}

// Pairs of 64-channel chunks in 512-bit registers. int4_gemm_gs lays each pair
// of xa.q out as [lo half of chunk c | lo half of c + 1 | hi half of c | hi half
// of c + 1], matching one 64-byte load of the packed nibbles; an odd last chunk
// stays as it is and takes the 256-bit path.
template <int GS, int MT, int NT>
inline void int4_dots512(const Int4GemmArgs& p, const QuantizedActs& xa, int64_t m0, int64_t n0, const float* ws,
                         float (&res)[MT][NT]) {
  const int64_t K = p.K, groups = K / GS, chunks = K / 64, pairs = chunks / 2;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 facc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) facc[i][j] = _mm512_setzero_ps();
  for (int64_t pr = 0; pr < pairs; ++pr) {
    const int64_t c = 2 * pr;
    __m512i lo[NT], hi[NT];
    for (int j = 0; j < NT; ++j) {
      const uint8_t* w = p.packed + (n0 + j) * (K / 2) + pr * 64;
      _mm_prefetch(reinterpret_cast<const char*>(w + NT * (K / 2)), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w);
      lo[j] = _mm512_and_si512(wv, mask);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
    }
    for (int i = 0; i < MT; ++i) {
      const int8_t* xp = xa.q.data() + (m0 + i) * K + pr * 128;
      const __m512i xlo = _mm512_loadu_si512(xp), xhi = _mm512_loadu_si512(xp + 64);
      const float* xs = xa.scale.data() + (m0 + i) * groups;
      for (int j = 0; j < NT; ++j) {
        const float* wsj = ws + j * groups;
        if constexpr (GS == 32) {  // lo lanes: groups 2c | 2c + 2, hi lanes: 2c + 1 | 2c + 3
          const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xlo);
          const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[j], xhi);
          const int64_t g = 2 * c;
          facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), halves_ps(wsj[g] * xs[g], wsj[g + 2] * xs[g + 2]),
                                       facc[i][j]);
          facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi),
                                       halves_ps(wsj[g + 1] * xs[g + 1], wsj[g + 3] * xs[g + 3]), facc[i][j]);
        } else {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xlo), hi[j], xhi);
          const __m512 sc = GS == 64 ? halves_ps(wsj[c] * xs[c], wsj[c + 1] * xs[c + 1])
                                     : _mm512_set1_ps(wsj[pr] * xs[pr]);
          facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, facc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) res[i][j] = _mm512_reduce_add_ps(facc[i][j]);
  if constexpr (GS < 128) {
    if (chunks % 2 == 1) {
      const int64_t c = chunks - 1;
      const __m256i mask8 = _mm256_set1_epi8(0x0F);
      for (int j = 0; j < NT; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.packed + (n0 + j) * (K / 2) + c * 32));
        const __m256i lo = _mm256_and_si256(wv, mask8), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask8);
        for (int i = 0; i < MT; ++i) {
          const int8_t* xp = xa.q.data() + (m0 + i) * K + c * 64;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
          const float* xs = xa.scale.data() + (m0 + i) * groups;
          const float* wsj = ws + j * groups;
          if constexpr (GS == 32) {
            res[i][j] += static_cast<float>(hsum_i32(dot_u8s8(_mm256_setzero_si256(), lo, x0))) * (wsj[2 * c] * xs[2 * c]);
            res[i][j] +=
                static_cast<float>(hsum_i32(dot_u8s8(_mm256_setzero_si256(), hi, x1))) * (wsj[2 * c + 1] * xs[2 * c + 1]);
          } else {
            res[i][j] += static_cast<float>(hsum_i32(dot2_u4s8(_mm256_setzero_si256(), lo, x0, hi, x1))) * (wsj[c] * xs[c]);
          }
        }
      }
    }
  }
}

// xa.q rows in the pair order int4_dots512 reads.
inline void pair_chunks(int8_t* row, int64_t K) {
  int8_t tmp[128];
  for (int64_t base = 0; base + 128 <= K; base += 128) {
    std::memcpy(tmp, row + base, 128);
    std::memcpy(row + base + 32, tmp + 64, 32);
    std::memcpy(row + base + 64, tmp + 32, 32);
  }
}
#endif

template <int GS, int MT, int NT>
inline void int4_tile(const Int4GemmArgs& p, const QuantizedActs& xa, int64_t m0, int64_t n0, const float* ws,
                      const float* wz) {
  const int64_t K = p.K;
  const int64_t groups = K / GS;
  float res[MT][NT];
#if LLMO_ISA == 2
  int4_dots512<GS, MT, NT>(p, xa, m0, n0, ws, res);
#elif LLMO_ISA >= 1
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 facc[MT][NT];
  __m256i iacc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      facc[i][j] = _mm256_setzero_ps();
      iacc[i][j] = _mm256_setzero_si256();
    }
  const int64_t chunks = K / 64;
  // Chunks of one group in an unrolled inner loop (GS = 32: two groups per chunk).
  constexpr int kChunksPerGroup = GS >= 64 ? GS / 64 : 1;
  for (int64_t c0 = 0; c0 < chunks; c0 += kChunksPerGroup) {
#pragma GCC unroll 2
    for (int cc = 0; cc < kChunksPerGroup; ++cc) {
      const int64_t c = c0 + cc;
      __m256i lo[NT], hi[NT];
      for (int j = 0; j < NT; ++j) {
        const uint8_t* w = p.packed + (n0 + j) * (K / 2) + c * 32;
        // NT rows ahead is the next tile this thread will stream.
        _mm_prefetch(reinterpret_cast<const char*>(w + NT * (K / 2)), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        lo[j] = _mm256_and_si256(wv, mask);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
      }
      for (int i = 0; i < MT; ++i) {
        const int8_t* xp = xa.q.data() + (m0 + i) * K + c * 64;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
        for (int j = 0; j < NT; ++j) {
          if constexpr (GS == 32) {
            const float* xs = xa.scale.data() + (m0 + i) * groups;
            const float* wsj = ws + j * groups;
            const __m256i d0 = dot_u8s8(_mm256_setzero_si256(), lo[j], x0);
            const __m256i d1 = dot_u8s8(_mm256_setzero_si256(), hi[j], x1);
            facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(wsj[2 * c] * xs[2 * c]), facc[i][j]);
            facc[i][j] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(wsj[2 * c + 1] * xs[2 * c + 1]), facc[i][j]);
          } else {
#if LLMO_ISA == 1
            // int16 partial sums for the whole group: each vpmaddubsw lane is at most
            // 2 * 15 * 127 = 3810 and a group (<= 128 channels) adds four of them, so a
            // single vpmaddwd widening per group suffices.
            iacc[i][j] = _mm256_add_epi16(
                iacc[i][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], x0), _mm256_maddubs_epi16(hi[j], x1)));
#else
            iacc[i][j] = dot2_u4s8(iacc[i][j], lo[j], x0, hi[j], x1);
#endif
          }
        }
      }
    }
    if constexpr (GS >= 64) {
      const int64_t g = c0 / kChunksPerGroup;
      for (int i = 0; i < MT; ++i) {
        const float xs = xa.scale[(m0 + i) * groups + g];
        for (int j = 0; j < NT; ++j) {
#if LLMO_ISA == 1
          const __m256i dots = _mm256_madd_epi16(iacc[i][j], _mm256_set1_epi16(1));
#else
          const __m256i dots = iacc[i][j];
#endif
          facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(ws[j * groups + g] * xs), facc[i][j]);
          iacc[i][j] = _mm256_setzero_si256();
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) res[i][j] = hsum(facc[i][j]);
#else
  for (int i = 0; i < MT; ++i) {
    const int8_t* xq = xa.q.data() + (m0 + i) * K;
    const float* xs = xa.scale.data() + (m0 + i) * groups;
    for (int j = 0; j < NT; ++j) {
      const uint8_t* w = p.packed + (n0 + j) * (K / 2);
      float r = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * GS; k < (g + 1) * GS; ++k) {
          const int64_t c = k / 64, jj = k % 64;
          const uint8_t byte = w[c * 32 + (jj & 31)];
          const int32_t qw = jj < 32 ? (byte & 0x0F) : (byte >> 4);
          dot += qw * static_cast<int32_t>(xq[k]);
        }
        r += static_cast<float>(dot) * (ws[j * groups + g] * xs[g]);
      }
      res[i][j] = r;
    }
  }
#endif
  for (int i = 0; i < MT; ++i) {
    const float* zc = xa.zcorr.data() + (m0 + i) * groups;
    for (int j = 0; j < NT; ++j) {
      const int64_t n = n0 + j;
      // wz holds scale * zero per group (see int4_columns)
      float v = res[i][j] - dot_f32(wz + j * groups, zc, static_cast<int>(groups));
      if (p.bias != nullptr) v += p.bias[n];
      p.out[(m0 + i) * p.N + n] = v;
    }
  }
}

template <int GS, int NT>
inline void int4_columns(const Int4GemmArgs& p, const QuantizedActs& xa, int64_t n0, float* ws, float* wz) {
  const int64_t groups = p.K / GS;
  // Scales and zero points of the tile after next: without this every tile starts
  // with dependent DRAM misses, which cost a third of the bandwidth at K = 4096.
  if (n0 + 3 * NT <= p.N) {
    const int64_t scale_bytes = dtype_size(p.scale_dtype);
    prefetch_span(static_cast<const char*>(p.scales) + (n0 + 2 * NT) * groups * scale_bytes, NT * groups * scale_bytes);
    prefetch_span(reinterpret_cast<const char*>(p.zeros + (n0 + 2 * NT) * groups), NT * groups);
  }
  for (int j = 0; j < NT; ++j) {
    load_scales(p.scales, p.scale_dtype, (n0 + j) * groups, groups, ws + j * groups);
    const uint8_t* zj = p.zeros + (n0 + j) * groups;
    const float* wsj = ws + j * groups;
    float* wzj = wz + j * groups;
    int64_t g = 0;
#if LLMO_ISA >= 1
    for (; g + 8 <= groups; g += 8) {
      const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zj + g));
      _mm256_storeu_ps(wzj + g, _mm256_mul_ps(_mm256_loadu_ps(wsj + g), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8))));
    }
#endif
    for (; g < groups; ++g) wzj[g] = wsj[g] * static_cast<float>(zj[g]);
  }
  int64_t m0 = 0;
  // 4 rows x NT columns of accumulators: NT = 1 fits AVX2's 16 registers, 2 AVX-512's 32.
  if constexpr (NT == 1 || (LLMO_ISA == 2 && NT == 2)) {
    for (; m0 + 4 <= p.M; m0 += 4) int4_tile<GS, 4, NT>(p, xa, m0, n0, ws, wz);
  }
  switch (p.M - m0) {
    case 3: int4_tile<GS, 3, NT>(p, xa, m0, n0, ws, wz); break;
    case 2: int4_tile<GS, 2, NT>(p, xa, m0, n0, ws, wz); break;
    case 1: int4_tile<GS, 1, NT>(p, xa, m0, n0, ws, wz); break;
    default: break;
  }
}

template <int GS>
void int4_gemm_gs(const Int4GemmArgs& p) {
  const int64_t K = p.K, M = p.M;
  const int64_t groups = K / GS;
  QuantizedActs xa;
  xa.q.resize(M * K);
  xa.scale.resize(M * groups);
  xa.zcorr.resize(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t code_sum = 0;
      const float sc = quantize_span(p.x + m * K + g * GS, xa.q.data() + m * K + g * GS, GS, &code_sum);
      xa.scale[m * groups + g] = sc;
      xa.zcorr[m * groups + g] = sc * static_cast<float>(code_sum);
    }
#if LLMO_ISA == 2
  // AVX-512 at M = 1 reads one column at a time, so each thread streams its run of
  // columns strictly sequentially: on the Zen 5 VM that read 15-45% faster than 4
  // interleaved columns (which the Xeon VM preferred); the fmadd chain is not the limit.
  for (int64_t m = 0; m < M; ++m) pair_chunks(xa.q.data() + m * K, K);
  const int nt = M == 1 ? 1 : 2;
#else
  // A single activation row streams two weight rows at once (shared activation loads).
  const int nt = M == 1 ? 2 : 1;
#endif
  // Each thread takes long runs of adjacent columns, about four per thread: the
  // longer a sequential run, the better the hardware prefetcher streams it (16-tile
  // runs measured 5-10% slower at M = 1). Dynamic runs let one thread take a
  // preempted one's share on a shared machine; nowait: one barrier per call.
  const int64_t tiles = p.N / nt;
  const int threads = num_threads();
  const int64_t run = std::max<int64_t>(16, tiles / (4 * static_cast<int64_t>(threads)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> ws(2 * groups), wz(2 * groups);
#pragma omp for schedule(dynamic, run) nowait
    for (int64_t t = 0; t < tiles; ++t) {
      switch (nt) {
        case 2: int4_columns<GS, 2>(p, xa, 2 * t, ws.data(), wz.data()); break;
        default: int4_columns<GS, 1>(p, xa, t, ws.data(), wz.data()); break;
      }
    }
#pragma omp single nowait
    for (int64_t n = tiles * nt; n < p.N; ++n) int4_columns<GS, 1>(p, xa, n, ws.data(), wz.data());
  }
}

void int4_gemm(const Int4GemmArgs& p) {
  switch (p.group) {
    case 32: int4_gemm_gs<32>(p); break;
    case 64: int4_gemm_gs<64>(p); break;
    default: int4_gemm_gs<128>(p); break;
  }
}

// Dequantize to a dense [N, K] fp32 or bf16 weight (for large-M calls, where a
// dense GEMM beats the decode-shaped kernel).
void int4_dequant(const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros, void* out,
                  int out_dtype, int64_t N, int64_t K, int group) {
  const int64_t groups = K / group;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t n = 0; n < N; ++n) {
    float row[64];
    for (int64_t c = 0; c < K / 64; ++c) {
      const uint8_t* w = packed + n * (K / 2) + c * 32;
      const int64_t g_lo = (c * 64) / group, g_hi = (c * 64 + 32) / group;
      const float s_lo = load_scalar(scales, scale_dtype, n * groups + g_lo);
      const float s_hi = load_scalar(scales, scale_dtype, n * groups + g_hi);
      const float z_lo = static_cast<float>(zeros[n * groups + g_lo]);
      const float z_hi = static_cast<float>(zeros[n * groups + g_hi]);
      for (int j = 0; j < 32; ++j) {
        row[j] = (static_cast<float>(w[j] & 0x0F) - z_lo) * s_lo;
        row[j + 32] = (static_cast<float>(w[j] >> 4) - z_hi) * s_hi;
      }
      if (out_dtype == kF32) {
        std::memcpy(static_cast<float*>(out) + n * K + c * 64, row, sizeof(row));
      } else {
        uint16_t* dst = static_cast<uint16_t*>(out) + n * K + c * 64;
        for (int j = 0; j < 64; ++j) dst[j] = f32_to_bf16(row[j]);
      }
    }
  }
}

// ------------------------------------------------------------ batched LoRA

template <int DT>
inline float lora_ld(const void* base, int64_t i) {
  if constexpr (DT == kF32) {
    return static_cast<const float*>(base)[i];
  } else {
    return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

template <int DT>
inline void lora_st(void* base, int64_t i, float v) {
  if constexpr (DT == kF32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
  }
}

#if LLMO_ISA >= 1
inline __m256 bf16x8_to_f32(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// f32_to_bf16 on 8 lanes, bit for bit: round to nearest even, NaN stays a quiet NaN.
inline __m128i f32x8_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(high, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i quiet = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// kVecF values of type DT from base[i...] as fp32.
template <int DT>
inline VecF lora_vload(const void* base, int64_t i) {
  if constexpr (DT == kF32) {
    return vload(static_cast<const float*>(base) + i);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
#if LLMO_ISA == 2
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    return bf16x8_to_f32(p);
#endif
  }
}

// The sums of v[0], ..., v[7] as one vector (lane q = sum of v[q]).
inline __m256 sum8x8(const __m256 (&v)[8]) {
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // per 128-bit half
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

inline void bf16_to_f32_span(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if LLMO_ISA >= 1
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, bf16x8_to_f32(src + i));
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// Shrink of MT rows of one slot by RT ranks: t[i * R + r0 + j] = scale * dot(x[rows[i]],
// A[slot, r0 + j]) (a_off = the slot's offset in A). Each A vector serves MT rows.
template <int DT, int MT, int RT>
inline void lora_shrink_tile(const LoraArgs& p, const int64_t* rows, int64_t a_off, int64_t r0, float scale, float* t) {
  const int64_t K = p.K;
  float res[MT][RT];
  int64_t k = 0;
#if LLMO_ISA >= 1
  VecF acc[MT][RT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < RT; ++j) acc[i][j] = vzero();
  for (; k + kVecF <= K; k += kVecF) {
    VecF xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = lora_vload<DT>(p.x, rows[i] * K + k);
    for (int j = 0; j < RT; ++j) {
      const VecF av = lora_vload<DT>(p.a, a_off + (r0 + j) * K + k);
      for (int i = 0; i < MT; ++i) acc[i][j] = vfma(xv[i], av, acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < RT; ++j) res[i][j] = vsum(acc[i][j]);
#else
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < RT; ++j) res[i][j] = 0.f;
#endif
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < RT; ++j) {
      float s = res[i][j];
      for (int64_t kk = k; kk < K; ++kk)
        s += lora_ld<DT>(p.x, rows[i] * K + kk) * lora_ld<DT>(p.a, a_off + (r0 + j) * K + kk);
      t[i * p.R + r0 + j] = s * scale;
    }
}

template <int DT, int MT>
inline void lora_shrink_ranks(const LoraArgs& p, const int64_t* rows, int64_t a_off, int64_t r_begin, int64_t r_end,
                              float scale, float* t) {
  // MT x RT accumulators plus MT activation vectors within AVX2's 16 registers.
  constexpr int RT = (LLMO_ISA == 2 || MT <= 2) ? 4 : 2;
  int64_t r = r_begin;
  for (; r + RT <= r_end; r += RT) lora_shrink_tile<DT, MT, RT>(p, rows, a_off, r, scale, t);
  for (; r < r_end; ++r) lora_shrink_tile<DT, MT, 1>(p, rows, a_off, r, scale, t);
}

#if LLMO_ISA >= 1
// out[off, off + 8) += v.
template <int DT>
inline void lora_add8(void* out, int64_t off, __m256 v) {
  if constexpr (DT == kF32) {
    float* o = static_cast<float*>(out) + off;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v));
  } else {
    uint16_t* o = static_cast<uint16_t*>(out) + off;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), f32x8_to_bf16(_mm256_add_ps(bf16x8_to_f32(o), v)));
  }
}

inline void transpose8x8(__m256 (&v)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// Expand of one row: out[o_off + c] += dot(b[c * R, c * R + R), t[0, R)) for c < cols, b
// the fp32 rows of B for these columns. Eight columns at a time, reduced together.
template <int DT>
inline void lora_expand_row(const float* b, const float* t, int64_t R, void* out, int64_t o_off, int64_t cols) {
  int64_t c = 0;
#if LLMO_ISA >= 1
  for (; c + 8 <= cols; c += 8) {
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= R; j += 8) {
      const __m256 tv = _mm256_loadu_ps(t + j);
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(_mm256_loadu_ps(b + (c + q) * R + j), tv, acc[q]);
    }
    __m256 sums = sum8x8(acc);
    if (j < R) {
      alignas(32) float tail[8];
      for (int q = 0; q < 8; ++q) {
        float s = 0.f;
        for (int64_t jj = j; jj < R; ++jj) s += b[(c + q) * R + jj] * t[jj];
        tail[q] = s;
      }
      sums = _mm256_add_ps(sums, _mm256_load_ps(tail));
    }
    lora_add8<DT>(out, o_off + c, sums);
  }
#endif
  for (; c < cols; ++c) {
    float s = 0.f;
    for (int64_t j = 0; j < R; ++j) s += b[c * R + j] * t[j];
    lora_st<DT>(out, o_off + c, lora_ld<DT>(out, o_off + c) + s);
  }
}

#if LLMO_ISA >= 1
// Expand of 4..8 rows of one slot over `cols` columns: lanes run over the rows (tt[j * 8 + i]
// = t of row i, rank j, zero past nrows) and each B value is a broadcast, so no reduction
// and no transposed copy of B are needed; an 8 x 8 transpose turns the columns into rows.
template <int DT>
inline void lora_expand_block(const LoraArgs& p, const float* b, const float* t, const int64_t* rows, int64_t nrows,
                              int64_t m0, int64_t cols, float* tt) {
  const int64_t R = p.R, M = p.M;
  for (int64_t j = 0; j < R; ++j)
    for (int64_t i = 0; i < 8; ++i) tt[j * 8 + i] = i < nrows ? t[i * R + j] : 0.f;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256 acc[8];  // acc[q] lane i: row i, column c + q
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    const float* bc = b + c * R;
    for (int64_t j = 0; j < R; ++j) {
      const __m256 tv = _mm256_loadu_ps(tt + j * 8);
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(bc + q * R + j), tv, acc[q]);
    }
    transpose8x8(acc);  // acc[i] lane q: row i, column c + q
    for (int64_t i = 0; i < nrows; ++i) lora_add8<DT>(p.out, rows[i] * M + m0 + c, acc[i]);
  }
  if (c < cols)
    for (int64_t i = 0; i < nrows; ++i) lora_expand_row<DT>(b + c * R, t + i * R, R, p.out, rows[i] * M + m0 + c, cols - c);
}
#endif

// Rows [row0, row0 + rows) of the grouped row list, all of slot `slot`.
struct LoraChunk {
  int64_t slot, row0, rows;
};

constexpr int64_t kLoraShrinkRows = 4;   // the shrink micro-kernel's row block
constexpr int64_t kLoraExpandRows = 32;  // rows sharing one (converted) block of B columns
constexpr int64_t kLoraMaxCols = 256;    // columns per expand item: B block <= 256 x R fp32
constexpr int64_t kLoraParallelMacs = 1 << 16;

// Two passes over the grouped rows: shrink (t = scaling * x A^T, per tile of rows of one
// slot and range of ranks), then, after the barrier, expand (out += t B^T, per chunk of
// rows and range of columns). Each adapter's A and B are read once per tile / chunk.
template <int DT>
void batched_lora_impl(const LoraArgs& p) {
  const int64_t R = p.R, K = p.K, M = p.M;
  std::vector<LoraChunk> shrink, expand;
  int64_t active = 0;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const LoraGroup& gr = p.groups[g];
    active += gr.count;
    for (int64_t i = 0; i < gr.count; i += kLoraShrinkRows)
      shrink.push_back({gr.slot, gr.begin + i, std::min(kLoraShrinkRows, gr.count - i)});
    for (int64_t i = 0; i < gr.count; i += kLoraExpandRows)
      expand.push_back({gr.slot, gr.begin + i, std::min(kLoraExpandRows, gr.count - i)});
  }
  if (shrink.empty() || R == 0 || M == 0) return;
  const int threads = num_threads();
  const bool parallel = threads > 1 && active * R * (K + M) >= kLoraParallelMacs;
  // About four items per thread: a decode step (a row or two per slot) splits its ranks
  // and columns, a prefill has enough row chunks already.
  const int64_t want = parallel ? 4 * static_cast<int64_t>(threads) : 1;
  const int64_t n_sh = static_cast<int64_t>(shrink.size()), n_ex = static_cast<int64_t>(expand.size());
  const int64_t rank_parts = std::max<int64_t>(1, std::min((R + 3) / 4, (want + n_sh - 1) / n_sh));
  const int64_t rank_step = ((R + rank_parts - 1) / rank_parts + 3) / 4 * 4;
  const int64_t col_parts =
      std::max((M + kLoraMaxCols - 1) / kLoraMaxCols, std::min((M + 63) / 64, (want + n_ex - 1) / n_ex));
  const int64_t col_step = ((M + col_parts - 1) / col_parts + 7) / 8 * 8;
  const int64_t rank_chunks = (R + rank_step - 1) / rank_step, col_chunks = (M + col_step - 1) / col_step;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> bbuf(DT == kF32 ? 0 : col_step * R), tt(8 * R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_sh * rank_chunks; ++it) {
      const LoraChunk& w = shrink[it / rank_chunks];
      const int64_t r0 = (it % rank_chunks) * rank_step, r1 = std::min(R, r0 + rank_step);
      const int64_t* rows = p.rows + w.row0;
      float* t = p.t + w.row0 * R;
      const int64_t a_off = w.slot * R * K;
      const float scale = p.scaling[w.slot];
      switch (w.rows) {
        case 4: lora_shrink_ranks<DT, 4>(p, rows, a_off, r0, r1, scale, t); break;
        case 3: lora_shrink_ranks<DT, 3>(p, rows, a_off, r0, r1, scale, t); break;
        case 2: lora_shrink_ranks<DT, 2>(p, rows, a_off, r0, r1, scale, t); break;
        default: lora_shrink_ranks<DT, 1>(p, rows, a_off, r0, r1, scale, t); break;
      }
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < n_ex * col_chunks; ++it) {
      const LoraChunk& w = expand[it / col_chunks];
      const int64_t m0 = (it % col_chunks) * col_step, cols = std::min(col_step, M - m0);
      const int64_t b_off = (w.slot * M + m0) * R;  // B[slot, m0:m0 + cols, :] is contiguous
      const float* b;
      if constexpr (DT == kF32) {
        b = static_cast<const float*>(p.b) + b_off;
      } else {
        bf16_to_f32_span(static_cast<const uint16_t*>(p.b) + b_off, bbuf.data(), cols * R);
        b = bbuf.data();
      }
      int64_t i = 0;
#if LLMO_ISA >= 1
      for (int64_t nb; (nb = std::min<int64_t>(8, w.rows - i)) >= 4; i += nb)
        lora_expand_block<DT>(p, b, p.t + (w.row0 + i) * R, p.rows + w.row0 + i, nb, m0, cols, tt.data());
#endif
      for (; i < w.rows; ++i)
        lora_expand_row<DT>(b, p.t + (w.row0 + i) * R, R, p.out, p.rows[w.row0 + i] * M + m0, cols);
    }
  }
}

}  // namespace

void batched_lora(const LoraArgs& p) {
  if (p.dtype == kBF16) {
    batched_lora_impl<kBF16>(p);
  } else {
    batched_lora_impl<kF32>(p);
  }
}

extern const KernelTable table = {LLMO_ISA_NAME, attention,   quantize_rows, int8_gemm,   int4_gemm,
                                  int4_dequant,  int8_pack,   quantize_rows_u7, int8_linear};

}  // namespace LLMO_NS
}  // namespace llmo
