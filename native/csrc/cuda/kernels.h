// Host launchers for the LLMO CUDA kernels (no libtorch: raw device pointers
// and the caller's stream). Every launcher returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace llmo {
namespace cuda {

struct AttnParams {
  const float* q;  // [rows, heads, dim] fp32
  float* out;      // [rows, heads, dim] fp32
  const void* key_cache;
  const void* value_cache;
  int kv_dtype;
  const int32_t* block_tables;
  const int32_t* row_seq;
  const int32_t* row_len;
  int rows, heads, kv_heads, head_dim, block_size, max_blocks;
  float scale;
  // Split-K scratch (used when num_partitions > 1): [rows, heads, parts(, dim)]
  int num_partitions;
  float* tmp_out;
  float* max_logits;
  float* exp_sums;
};

constexpr int kPartitionSize = 512;
constexpr int kMaxHeadDim = 256;

cudaError_t paged_attention(const AttnParams& p, cudaStream_t stream);
cudaError_t write_kv_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                           const int64_t* slots, int64_t tokens, int64_t row_elems, int elem_size, int64_t num_slots,
                           cudaStream_t stream);
cudaError_t quantize_rows(const float* x, int8_t* q, float* scales, int64_t M, int64_t K, cudaStream_t stream);
cudaError_t int8_gemm(const int8_t* a, const int8_t* b, const float* a_scales, const float* b_scales, const float* bias,
                      void* out, int out_dtype, int64_t M, int64_t N, int64_t K, cudaStream_t stream);
cudaError_t int4_gemm(const float* x, const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros,
                      const float* bias, float* out, int64_t M, int64_t N, int64_t K, int group, cudaStream_t stream);
cudaError_t int4_dequantize(const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros, void* out,
                            int out_dtype, int64_t N, int64_t K, int group, cudaStream_t stream);
// out[row] += scaling[s] * B[s] @ (A[s] @ x[row]) for s = indices[row] in [0, S), in place;
// x [N, K], A [S, R, K], B [S, M, R], out [N, M] of one dtype; t: [N, R] fp32 scratch.
cudaError_t batched_lora(const void* x, const void* a, const void* b, const int64_t* indices, const float* scaling,
                         float* t, void* out, int dtype, int64_t N, int64_t K, int64_t M, int64_t R, int64_t S,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace llmo
