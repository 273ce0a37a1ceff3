// INT8 W8A8 GEMM (dp4a), per-row activation quantization, INT4 weight-only GEMM
// (llmo-int4-v1 layout) and INT4 dequantization for large-M calls (dense cuBLAS GEMM after).
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace llmo {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;

__global__ void quantize_rows_kernel(const float* x, int8_t* q, float* scales, int64_t K) {
  __shared__ float scratch[32];
  const int64_t m = blockIdx.x;
  const float* row = x + m * K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(row[k]));
  amax = block_reduce<true>(amax, scratch);
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / scale;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    q[m * K + k] = static_cast<int8_t>(fminf(127.f, fmaxf(-127.f, rintf(row[k] * inv))));
  if (threadIdx.x == 0) scales[m] = scale;
}

// C[M, N] = (A[M, K] . B[N, K]^T) * a_scale[m] * b_scale[n] + bias[n].
// 64 x 64 output tile per block, 256 threads each owning a 4 x 4 sub-tile;
// K advances 64 bytes at a time through shared memory, 4 bytes per dp4a.
constexpr int kTile = 64, kTileK = 64, kWords = kTileK / 4;

template <typename Out>
__global__ void __launch_bounds__(256) int8_gemm_kernel(const int8_t* a, const int8_t* b, const float* a_scales,
                                                         const float* b_scales, const float* bias, Out* out,
                                                         int64_t M, int64_t N, int64_t K) {
  __shared__ int32_t as[kTile][kWords + 1];
  __shared__ int32_t bs[kTile][kWords + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int32_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    // Each thread packs 4 bytes x 4 words of each tile (zero padded at the edges).
    for (int i = tid; i < kTile * kWords; i += blockDim.x) {
      const int row = i / kWords, word = i % kWords;
      int32_t va = 0, vb = 0;
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + word * 4 + j;
        const int8_t xa = (m0 + row < M && k < K) ? a[(m0 + row) * K + k] : 0;
        const int8_t xb = (n0 + row < N && k < K) ? b[(n0 + row) * K + k] : 0;
        va |= (static_cast<int32_t>(static_cast<uint8_t>(xa)) << (8 * j));
        vb |= (static_cast<int32_t>(static_cast<uint8_t>(xb)) << (8 * j));
      }
      as[row][word] = va;
      bs[row][word] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      int32_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = as[ty * 4 + i][w];
        bv[i] = bs[tx * 4 + i][w];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= N) continue;
      float v = static_cast<float>(acc[i][j]) * a_scales[m] * b_scales[n];
      if (bias != nullptr) v += bias[n];
      from_float(v, &out[m * N + n]);
    }
  }
}

// INT4 weight-only GEMM: one warp per output column n and up to kRows activation
// rows; each lane takes whole 64-channel chunks (32 packed bytes).
constexpr int kRows = 8, kWarps = 4;

__global__ void __launch_bounds__(kWarps * 32) int4_gemm_kernel(const float* x, const uint8_t* packed,
                                                                 const void* scales, int scale_dtype,
                                                                 const uint8_t* zeros, const float* bias, float* out,
                                                                 int64_t M, int64_t N, int64_t K, int group) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;
  const int rows = M - m0 < kRows ? static_cast<int>(M - m0) : kRows;
  const int64_t groups = K / group;
  const uint8_t* w = packed + n * (K / 2);
  float acc[kRows] = {};
  for (int64_t c = lane; c < K / 64; c += 32) {
    const int64_t g_lo = (c * 64) / group, g_hi = (c * 64 + 32) / group;
    const float s_lo = load_any(scales, scale_dtype, n * groups + g_lo);
    const float s_hi = load_any(scales, scale_dtype, n * groups + g_hi);
    const float z_lo = static_cast<float>(zeros[n * groups + g_lo]);
    const float z_hi = static_cast<float>(zeros[n * groups + g_hi]);
    const uint4* wv = reinterpret_cast<const uint4*>(w + c * 32);
    const uint4 words[2] = {wv[0], wv[1]};
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const float lo = (static_cast<float>(bytes[j] & 0x0F) - z_lo) * s_lo;
      const float hi = (static_cast<float>(bytes[j] >> 4) - z_hi) * s_hi;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        // Fully unrolled with a guard so acc[] stays in registers.
        if (i < rows) {
          const float* xr = x + (m0 + i) * K + c * 64;
          acc[i] += lo * xr[j] + hi * xr[j + 32];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0 && i < rows) out[(m0 + i) * N + n] = v + (bias != nullptr ? bias[n] : 0.f);
  }
}

template <typename Out>
__global__ void int4_dequant_kernel(const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros,
                                    Out* out, int64_t N, int64_t K, int group) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // packed byte index
  if (idx >= N * (K / 2)) return;
  const int64_t n = idx / (K / 2), byte = idx % (K / 2);
  const int64_t c = byte / 32, j = byte % 32;
  const int64_t k_lo = c * 64 + j, k_hi = k_lo + 32;
  const int64_t groups = K / group;
  const uint8_t v = packed[idx];
  const float lo = (static_cast<float>(v & 0x0F) - zeros[n * groups + k_lo / group]) *
                   load_any(scales, scale_dtype, n * groups + k_lo / group);
  const float hi = (static_cast<float>(v >> 4) - zeros[n * groups + k_hi / group]) *
                   load_any(scales, scale_dtype, n * groups + k_hi / group);
  from_float(lo, &out[n * K + k_lo]);
  from_float(hi, &out[n * K + k_hi]);
}

}  // namespace

cudaError_t quantize_rows(const float* x, int8_t* q, float* scales, int64_t M, int64_t K, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  quantize_rows_kernel<<<M, kQuantThreads, 0, stream>>>(x, q, scales, K);
  return cudaGetLastError();
}

cudaError_t int8_gemm(const int8_t* a, const int8_t* b, const float* a_scales, const float* b_scales, const float* bias,
                      void* out, int out_dtype, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  switch (out_dtype) {
    case kBF16:
      int8_gemm_kernel<<<grid, 256, 0, stream>>>(a, b, a_scales, b_scales, bias,
                                                 static_cast<__nv_bfloat16*>(out), M, N, K);
      break;
    case kF16:
      int8_gemm_kernel<<<grid, 256, 0, stream>>>(a, b, a_scales, b_scales, bias, static_cast<__half*>(out), M, N, K);
      break;
    default:
      int8_gemm_kernel<<<grid, 256, 0, stream>>>(a, b, a_scales, b_scales, bias, static_cast<float*>(out), M, N, K);
      break;
  }
  return cudaGetLastError();
}

cudaError_t int4_gemm(const float* x, const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros,
                      const float* bias, float* out, int64_t M, int64_t N, int64_t K, int group, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid((N + kWarps - 1) / kWarps, (M + kRows - 1) / kRows);
  int4_gemm_kernel<<<grid, kWarps * 32, 0, stream>>>(x, packed, scales, scale_dtype, zeros, bias, out, M, N, K, group);
  return cudaGetLastError();
}

cudaError_t int4_dequantize(const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros, void* out,
                            int out_dtype, int64_t N, int64_t K, int group, cudaStream_t stream) {
  const int64_t total = N * (K / 2);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  switch (out_dtype) {
    case kBF16:
      int4_dequant_kernel<<<blocks, threads, 0, stream>>>(packed, scales, scale_dtype, zeros,
                                                           static_cast<__nv_bfloat16*>(out), N, K, group);
      break;
    case kF16:
      int4_dequant_kernel<<<blocks, threads, 0, stream>>>(packed, scales, scale_dtype, zeros,
                                                           static_cast<__half*>(out), N, K, group);
      break;
    default:
      int4_dequant_kernel<<<blocks, threads, 0, stream>>>(packed, scales, scale_dtype, zeros,
                                                           static_cast<float*>(out), N, K, group);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmo
