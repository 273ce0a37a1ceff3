// Shared definitions for the LLMO native kernels (CPU and CUDA hosts).
#pragma once

#include <cstdint>
#include <cstring>

namespace llmo {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_scalar(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Attention of R query rows; row r reads the first row_len[r] cached tokens of
// sequence row_seq[r]. Cache: [num_blocks, block_size, kv_heads, head_dim].
struct AttnArgs {
  const float* q;    // [rows, heads, head_dim]
  float* out;        // [rows, heads, head_dim]
  const void* key_cache;
  const void* value_cache;
  int kv_dtype;
  const int32_t* block_tables;  // [num_seqs, max_blocks]
  const int32_t* row_seq;       // [rows]
  const int32_t* row_len;       // [rows]
  int64_t rows;
  int heads, kv_heads, head_dim, block_size, max_blocks;
  float scale;
};

struct Int8GemmArgs {
  const int8_t* a;  // [M, K], values in [-127, 127]
  const int8_t* b;  // [N, K]
  const float* a_scales;
  const float* b_scales;
  const float* bias;  // [N] or null
  float* out;         // [M, N]
  int64_t M, N, K;
};

struct Int4GemmArgs {
  const float* x;        // [M, K]
  const uint8_t* packed;  // [N, K/2] llmo-int4-v1
  const void* scales;     // [N, K/group]
  int scale_dtype;
  const uint8_t* zeros;   // [N, K/group]
  const float* bias;      // [N] or null
  float* out;             // [M, N]
  int64_t M, N, K;
  int group;
};

// int8_linear on a packed weight (see int8_pack): per-token u7 activation codes.
struct Int8LinearArgs {
  const float* x;         // [M, K]
  const int8_t* packed;   // [ceil(N/8), ceil(K/4), 8, 4]
  const int32_t* colsum;  // [N] sum over K of each weight row
  const float* w_scales;  // [N]
  const float* bias;      // [N] or null
  float* out;             // [M, N]
  int64_t M, N, K;
};

struct KernelTable {
  const char* name;
  void (*attention)(const AttnArgs&);
  void (*quantize_rows)(const float* x, int8_t* q, float* scales, int64_t M, int64_t K);
  void (*int8_gemm)(const Int8GemmArgs&);
  void (*int4_gemm)(const Int4GemmArgs&);
  void (*int4_dequant)(const uint8_t* packed, const void* scales, int scale_dtype, const uint8_t* zeros, void* out,
                       int out_dtype, int64_t N, int64_t K, int group);
  void (*int8_pack)(const int8_t* w, int8_t* packed, int32_t* colsum, int64_t N, int64_t K);
  void (*quantize_rows_u7)(const float* x, uint8_t* q, float* scales, int32_t* zps, int64_t M, int64_t K,
                           int64_t kpad);
  void (*int8_linear)(const Int8LinearArgs&);
};

int num_threads();
void set_num_threads(int n);

namespace generic { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace avx512vnni { extern const KernelTable table; }

}  // namespace llmo
