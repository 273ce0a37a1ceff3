// Batched multi-adapter LoRA (Punica BGMV style): every token row gathers its own
// adapter's weights, one row per thread block, so a batch mixing many adapters costs
// two launches. Shrink: t[row] = scaling[s] * A[s] @ x[row] (fp32 scratch); expand:
// out[row] += B[s] @ t[row] in place. Rows of index -1 (or out of range) are skipped.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace llmo {
namespace cuda {
namespace {

constexpr int kShrinkWarps = 8;     // ranks per shrink block, one warp each
constexpr int kExpandCols = 128;    // output columns per expand block, one thread each
constexpr int kExpandRanks = 32;    // ranks of B staged in shared memory per step

template <typename Scalar>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    lora_shrink_kernel(const Scalar* x, const Scalar* a, const int64_t* indices, const float* scaling, float* t,
                       int64_t K, int64_t R, int64_t S) {
  const int64_t row = blockIdx.x;
  const int64_t s = indices[row];
  if (s < 0 || s >= S) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp;
  if (r >= R) return;  // the whole warp leaves together
  const Scalar* xr = x + row * K;
  const Scalar* ar = a + (s * R + r) * K;
  float acc = 0.f;
  for (int64_t k = lane; k < K; k += 32) acc += to_float(xr[k]) * to_float(ar[k]);  // coalesced
  acc = warp_sum(acc);
  if (lane == 0) t[row * R + r] = acc * scaling[s];
}

template <typename Scalar>
__global__ void __launch_bounds__(kExpandCols)
    lora_expand_kernel(const Scalar* b, const int64_t* indices, const float* t, Scalar* out, int64_t M, int64_t R,
                       int64_t S) {
  // B[s, m0:m0 + cols, r0:r0 + nr] staged column-major per thread (+1: no bank conflicts).
  __shared__ float bs[kExpandCols][kExpandRanks + 1];
  __shared__ float ts[kExpandRanks];
  const int64_t row = blockIdx.x;
  const int64_t s = indices[row];
  if (s < 0 || s >= S) return;  // uniform over the block: no barrier is skipped by part of it
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int cols = M - m0 < kExpandCols ? static_cast<int>(M - m0) : kExpandCols;
  const Scalar* bb = b + (s * M + m0) * R;  // B[s] rows m0.. are contiguous, R values each
  float acc = 0.f;
  for (int64_t r0 = 0; r0 < R; r0 += kExpandRanks) {
    const int nr = R - r0 < kExpandRanks ? static_cast<int>(R - r0) : kExpandRanks;
    for (int i = threadIdx.x; i < cols * nr; i += blockDim.x) {
      const int c = i / nr, j = i % nr;
      bs[c][j] = to_float(bb[static_cast<int64_t>(c) * R + r0 + j]);
    }
    if (threadIdx.x < nr) ts[threadIdx.x] = t[row * R + r0 + threadIdx.x];
    __syncthreads();
    if (threadIdx.x < cols)
      for (int j = 0; j < nr; ++j) acc += bs[threadIdx.x][j] * ts[j];
    __syncthreads();
  }
  if (threadIdx.x < cols) {
    Scalar* o = out + row * M + m0 + threadIdx.x;
    from_float(to_float(*o) + acc, o);
  }
}

template <typename Scalar>
cudaError_t launch_lora(const void* x, const void* a, const void* b, const int64_t* indices, const float* scaling,
                        float* t, void* out, int64_t N, int64_t K, int64_t M, int64_t R, int64_t S,
                        cudaStream_t stream) {
  const dim3 shrink_grid(static_cast<unsigned>(N), static_cast<unsigned>((R + kShrinkWarps - 1) / kShrinkWarps));
  lora_shrink_kernel<Scalar><<<shrink_grid, kShrinkWarps * 32, 0, stream>>>(
      static_cast<const Scalar*>(x), static_cast<const Scalar*>(a), indices, scaling, t, K, R, S);
  const dim3 expand_grid(static_cast<unsigned>(N), static_cast<unsigned>((M + kExpandCols - 1) / kExpandCols));
  lora_expand_kernel<Scalar><<<expand_grid, kExpandCols, 0, stream>>>(
      static_cast<const Scalar*>(b), indices, t, static_cast<Scalar*>(out), M, R, S);
  return cudaGetLastError();
}

}  // namespace

cudaError_t batched_lora(const void* x, const void* a, const void* b, const int64_t* indices, const float* scaling,
                         float* t, void* out, int dtype, int64_t N, int64_t K, int64_t M, int64_t R, int64_t S,
                         cudaStream_t stream) {
  if (N == 0 || M == 0 || R == 0 || S == 0) return cudaSuccess;  // no delta to add
  switch (dtype) {
    case kBF16: return launch_lora<__nv_bfloat16>(x, a, b, indices, scaling, t, out, N, K, M, R, S, stream);
    case kF16: return launch_lora<__half>(x, a, b, indices, scaling, t, out, N, K, M, R, S, stream);
    default: return launch_lora<float>(x, a, b, indices, scaling, t, out, N, K, M, R, S, stream);
  }
}

}  // namespace cuda
}  // namespace llmo
