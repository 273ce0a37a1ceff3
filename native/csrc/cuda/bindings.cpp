// pybind11 surface of the CUDA kernels: device pointers, the device index and
// the caller's CUDA stream come from Python (torch); nothing links libtorch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/kernels.h"

namespace py = pybind11;
namespace lc = llmo::cuda;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

cudaStream_t use(int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  return reinterpret_cast<cudaStream_t>(stream);
}

void paged_attention(int device, uintptr_t stream, uintptr_t q, uintptr_t out, uintptr_t key_cache,
                     uintptr_t value_cache, int kv_dtype, uintptr_t block_tables, uintptr_t row_seq,
                     uintptr_t row_len, int rows, int heads, int kv_heads, int head_dim, int block_size,
                     int max_blocks, float scale, int num_partitions, uintptr_t tmp_out, uintptr_t max_logits,
                     uintptr_t exp_sums) {
  if (head_dim > lc::kMaxHeadDim) throw std::invalid_argument("head_dim above 256 is not supported on CUDA");
  if (kv_heads <= 0 || heads % kv_heads != 0 || num_partitions < 1)
    throw std::invalid_argument("paged_attention: inconsistent shape arguments");
  lc::AttnParams p{ptr<const float>(q), ptr<float>(out), ptr<const void>(key_cache), ptr<const void>(value_cache),
                   kv_dtype, ptr<const int32_t>(block_tables), ptr<const int32_t>(row_seq),
                   ptr<const int32_t>(row_len), rows, heads, kv_heads, head_dim, block_size, max_blocks, scale,
                   num_partitions, ptr<float>(tmp_out), ptr<float>(max_logits), ptr<float>(exp_sums)};
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::paged_attention(p, s), "paged_attention");
}

void write_kv_cache(int device, uintptr_t stream, uintptr_t key, uintptr_t value, uintptr_t key_cache,
                    uintptr_t value_cache, uintptr_t slots, int64_t tokens, int64_t row_elems, int elem_size,
                    int64_t num_slots) {
  if (elem_size != 2 && elem_size != 4) throw std::invalid_argument("elem_size must be 2 or 4");
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::write_kv_cache(ptr<const void>(key), ptr<const void>(value), ptr<void>(key_cache),
                           ptr<void>(value_cache), ptr<const int64_t>(slots), tokens, row_elems, elem_size,
                           num_slots, s),
        "write_kv_cache");
}

void quantize_rows(int device, uintptr_t stream, uintptr_t x, uintptr_t q, uintptr_t scales, int64_t M, int64_t K) {
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::quantize_rows(ptr<const float>(x), ptr<int8_t>(q), ptr<float>(scales), M, K, s), "quantize_rows");
}

void int8_gemm(int device, uintptr_t stream, uintptr_t a, uintptr_t b, uintptr_t a_scales, uintptr_t b_scales,
               uintptr_t bias, uintptr_t out, int out_dtype, int64_t M, int64_t N, int64_t K) {
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::int8_gemm(ptr<const int8_t>(a), ptr<const int8_t>(b), ptr<const float>(a_scales),
                      ptr<const float>(b_scales), ptr<const float>(bias), ptr<void>(out), out_dtype, M, N, K, s),
        "int8_gemm");
}

void check_int4(int64_t K, int group) {
  if (group != 32 && group != 64 && group != 128) throw std::invalid_argument("group must be 32, 64 or 128");
  if (K % 64 != 0 || K % group != 0) throw std::invalid_argument("K must be a multiple of 64 and of group");
}

void int4_gemm(int device, uintptr_t stream, uintptr_t x, uintptr_t packed, uintptr_t scales, int scale_dtype,
               uintptr_t zeros, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K, int group) {
  check_int4(K, group);
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::int4_gemm(ptr<const float>(x), ptr<const uint8_t>(packed), ptr<const void>(scales), scale_dtype,
                      ptr<const uint8_t>(zeros), ptr<const float>(bias), ptr<float>(out), M, N, K, group, s),
        "int4_gemm");
}

void int4_dequantize(int device, uintptr_t stream, uintptr_t packed, uintptr_t scales, int scale_dtype,
                     uintptr_t zeros, uintptr_t out, int out_dtype, int64_t N, int64_t K, int group) {
  check_int4(K, group);
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::int4_dequantize(ptr<const uint8_t>(packed), ptr<const void>(scales), scale_dtype,
                            ptr<const uint8_t>(zeros), ptr<void>(out), out_dtype, N, K, group, s),
        "int4_dequantize");
}

// Slot indices are the caller's to check (reading them here would synchronise the GPU);
// the kernels skip rows whose index is not in [0, S).
void batched_lora(int device, uintptr_t stream, uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t indices,
                  uintptr_t scaling, uintptr_t t, uintptr_t out, int dtype, int64_t N, int64_t K, int64_t M, int64_t R,
                  int64_t S) {
  if (dtype != llmo::kF32 && dtype != llmo::kBF16 && dtype != llmo::kF16)
    throw std::invalid_argument("unknown dtype code");
  if (N < 0 || K < 0 || M < 0 || R < 0 || S < 0) throw std::invalid_argument("batched_lora: negative size");
  if (N > 0x7fffffffLL || (M + 127) / 128 > 65535 || (R + 7) / 8 > 65535)
    throw std::invalid_argument("batched_lora: shape exceeds the CUDA grid limits");
  cudaStream_t s = use(device, stream);
  py::gil_scoped_release release;
  check(lc::batched_lora(ptr<const void>(x), ptr<const void>(a), ptr<const void>(b), ptr<const int64_t>(indices),
                         ptr<const float>(scaling), ptr<float>(t), ptr<void>(out), dtype, N, K, M, R, S, s),
        "batched_lora");
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "LLMO CUDA kernels (sm_80 / sm_89 / sm_90), static CUDA runtime";
  m.attr("PARTITION_SIZE") = lc::kPartitionSize;
  m.def("device_count", &device_count, "Visible CUDA devices (0 when no driver or GPU).");
  m.def("paged_attention", &paged_attention);
  m.def("write_kv_cache", &write_kv_cache);
  m.def("quantize_rows", &quantize_rows);
  m.def("int8_gemm", &int8_gemm);
  m.def("int4_gemm", &int4_gemm);
  m.def("int4_dequantize", &int4_dequantize);
  m.def("batched_lora", &batched_lora);
}
