// Paged decode / chunked-prefill attention over [num_blocks, block_size, kv_heads, head_dim]
// caches, with a split-K (partitioned) variant for long contexts, and the KV-cache write.
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace llmo {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// One thread block per (row, query head, partition of kPartitionSize tokens).
template <typename KV>
__global__ void __launch_bounds__(kThreads) attention_partition(AttnParams p) {
  __shared__ float logits[kPartitionSize];
  __shared__ float qs[kMaxHeadDim];
  __shared__ float scratch[32];
  const int r = blockIdx.x, hq = blockIdx.y, part = blockIdx.z;
  const int dim = p.head_dim, group = p.heads / p.kv_heads, kvh = hq / group;
  const int len = p.row_len[r];
  const int start = part * kPartitionSize;
  const int end = min(len, start + kPartitionSize);
  const int64_t head_index = static_cast<int64_t>(r) * p.heads + hq;
  const bool split = p.num_partitions > 1;
  if (start >= end) {
    // Empty partition (or empty context): contributes nothing.
    if (split) {
      if (threadIdx.x == 0) {
        p.max_logits[head_index * p.num_partitions + part] = -INFINITY;
        p.exp_sums[head_index * p.num_partitions + part] = 0.f;
      }
      for (int d = threadIdx.x; d < dim; d += blockDim.x)
        p.tmp_out[(head_index * p.num_partitions + part) * dim + d] = 0.f;
    } else {
      for (int d = threadIdx.x; d < dim; d += blockDim.x) p.out[head_index * dim + d] = 0.f;
    }
    return;
  }
  for (int d = threadIdx.x; d < dim; d += blockDim.x) qs[d] = p.q[head_index * dim + d] * p.scale;
  __syncthreads();

  const KV* kc = static_cast<const KV*>(p.key_cache);
  const KV* vc = static_cast<const KV*>(p.value_cache);
  const int32_t* table = p.block_tables + static_cast<int64_t>(p.row_seq[r]) * p.max_blocks;
  const int64_t tok_stride = static_cast<int64_t>(p.kv_heads) * dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  // Phase 1: one warp per token, lanes across head_dim.
  for (int t = start + warp; t < end; t += warps) {
    const int64_t slot = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
    const KV* krow = kc + slot * tok_stride + static_cast<int64_t>(kvh) * dim;
    float acc = 0.f;
    for (int d = lane; d < dim; d += 32) acc += qs[d] * to_float(krow[d]);
    acc = warp_sum(acc);
    if (lane == 0) logits[t - start] = acc;
  }
  __syncthreads();

  const int n = end - start;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, logits[i]);
  m = block_reduce<true>(m, scratch);
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = __expf(logits[i] - m);
    logits[i] = e;
    s += e;
  }
  s = block_reduce<false>(s, scratch);
  __syncthreads();

  // Phase 2: threads across head_dim, coalesced V reads.
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.f;
    for (int t = start; t < end; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
      acc += logits[t - start] * to_float(vc[slot * tok_stride + static_cast<int64_t>(kvh) * dim + d]);
    }
    if (split) {
      p.tmp_out[(head_index * p.num_partitions + part) * dim + d] = acc;
    } else {
      p.out[head_index * dim + d] = acc / s;
    }
  }
  if (split && threadIdx.x == 0) {
    p.max_logits[head_index * p.num_partitions + part] = m;
    p.exp_sums[head_index * p.num_partitions + part] = s;
  }
}

// Combine partitions: rescale each by exp(m_p - max) and normalise.
__global__ void __launch_bounds__(kThreads) attention_reduce(AttnParams p) {
  const int64_t head_index = static_cast<int64_t>(blockIdx.x) * p.heads + blockIdx.y;
  const int parts = p.num_partitions, dim = p.head_dim;
  const float* maxes = p.max_logits + head_index * parts;
  const float* sums = p.exp_sums + head_index * parts;
  float gmax = -INFINITY;
  for (int i = 0; i < parts; ++i) gmax = fmaxf(gmax, maxes[i]);
  if (gmax == -INFINITY) {
    for (int d = threadIdx.x; d < dim; d += blockDim.x) p.out[head_index * dim + d] = 0.f;
    return;
  }
  float total = 0.f;
  for (int i = 0; i < parts; ++i) total += sums[i] * __expf(maxes[i] - gmax);
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < parts; ++i) acc += p.tmp_out[(head_index * parts + i) * dim + d] * __expf(maxes[i] - gmax);
    p.out[head_index * dim + d] = acc / total;
  }
}

template <typename T>
__global__ void write_kv(const T* key, const T* value, T* key_cache, T* value_cache, const int64_t* slots,
                         int64_t row_elems, int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  for (int64_t i = threadIdx.x; i < row_elems; i += blockDim.x) {
    key_cache[slot * row_elems + i] = key[t * row_elems + i];
    value_cache[slot * row_elems + i] = value[t * row_elems + i];
  }
}

}  // namespace

cudaError_t paged_attention(const AttnParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const dim3 grid(p.rows, p.heads, p.num_partitions);
  switch (p.kv_dtype) {
    case kBF16: attention_partition<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case kF16: attention_partition<__half><<<grid, kThreads, 0, stream>>>(p); break;
    default: attention_partition<float><<<grid, kThreads, 0, stream>>>(p); break;
  }
  if (p.num_partitions > 1) attention_reduce<<<dim3(p.rows, p.heads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t write_kv_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                           const int64_t* slots, int64_t tokens, int64_t row_elems, int elem_size, int64_t num_slots,
                           cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (elem_size == 4) {
    write_kv<uint32_t><<<tokens, 256, 0, stream>>>(static_cast<const uint32_t*>(key),
                                                    static_cast<const uint32_t*>(value),
                                                    static_cast<uint32_t*>(key_cache),
                                                    static_cast<uint32_t*>(value_cache), slots, row_elems, num_slots);
  } else {
    write_kv<uint16_t><<<tokens, 256, 0, stream>>>(static_cast<const uint16_t*>(key),
                                                    static_cast<const uint16_t*>(value),
                                                    static_cast<uint16_t*>(key_cache),
                                                    static_cast<uint16_t*>(value_cache), slots, row_elems, num_slots);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmo
