// pybind11 surface of the CPU kernels. Arguments are raw addresses (uintptr)
// and sizes already validated by llmo.ops; the GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/dispatch.h"
#include "cpu/lora.h"

namespace py = pybind11;
using llmo::AttnArgs;
using llmo::Int4GemmArgs;
using llmo::Int8GemmArgs;
using llmo::Int8LinearArgs;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_dtype(int dtype) {
  if (dtype != llmo::kF32 && dtype != llmo::kBF16 && dtype != llmo::kF16)
    throw std::invalid_argument("unknown dtype code");
}

// Every index the kernel will follow is checked first, so bad tables raise
// ValueError instead of reading out of bounds (cheap: O(rows x blocks)).
void check_indices(const int32_t* tables, const int32_t* row_seq, const int32_t* row_len, int64_t rows,
                   int64_t num_seqs, int64_t num_blocks, int block_size, int max_blocks) {
  const int64_t capacity = static_cast<int64_t>(max_blocks) * block_size;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t seq = row_seq[r], len = row_len[r];
    if (seq < 0 || seq >= num_seqs) throw std::invalid_argument("row sequence index out of range");
    if (len < 0) throw std::invalid_argument("context_lens must be non-negative");
    if (len > capacity)
      throw std::invalid_argument("context_lens exceed the block table capacity (" + std::to_string(max_blocks) +
                                  " blocks x " + std::to_string(block_size) + ")");
    const int32_t* t = tables + seq * max_blocks;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b)
      if (t[b] < 0 || t[b] >= num_blocks)
        throw std::invalid_argument("block_tables entries in use must lie in [0, " + std::to_string(num_blocks) + ")");
  }
}

void attention_rows(uintptr_t q, uintptr_t out, uintptr_t key_cache, uintptr_t value_cache, int kv_dtype,
                    uintptr_t block_tables, uintptr_t row_seq, uintptr_t row_len, int64_t rows, int heads,
                    int kv_heads, int head_dim, int block_size, int max_blocks, float scale, int64_t num_seqs,
                    int64_t num_blocks) {
  check_dtype(kv_dtype);
  if (kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 || block_size <= 0 || rows < 0)
    throw std::invalid_argument("attention_rows: inconsistent shape arguments");
  check_indices(ptr<const int32_t>(block_tables), ptr<const int32_t>(row_seq), ptr<const int32_t>(row_len), rows,
                num_seqs, num_blocks, block_size, max_blocks);
  AttnArgs a{ptr<const float>(q), ptr<float>(out), ptr<const void>(key_cache), ptr<const void>(value_cache),
             kv_dtype, ptr<const int32_t>(block_tables), ptr<const int32_t>(row_seq), ptr<const int32_t>(row_len),
             rows, heads, kv_heads, head_dim, block_size, max_blocks, scale};
  py::gil_scoped_release release;
  // The SIMD paths walk head_dim in 8-float steps.
  const auto& k = head_dim % 8 == 0 ? llmo::kernels() : llmo::generic_kernels();
  k.attention(a);
}

void quantize_rows(uintptr_t x, uintptr_t q, uintptr_t scales, int64_t M, int64_t K) {
  py::gil_scoped_release release;
  llmo::kernels().quantize_rows(ptr<const float>(x), ptr<int8_t>(q), ptr<float>(scales), M, K);
}

void int8_gemm(uintptr_t a, uintptr_t b, uintptr_t a_scales, uintptr_t b_scales, uintptr_t bias, uintptr_t out,
               int64_t M, int64_t N, int64_t K) {
  Int8GemmArgs p{ptr<const int8_t>(a), ptr<const int8_t>(b), ptr<const float>(a_scales), ptr<const float>(b_scales),
                 ptr<const float>(bias), ptr<float>(out), M, N, K};
  py::gil_scoped_release release;
  llmo::kernels().int8_gemm(p);
}

// int8_linear accumulates sum(q * w) in int32: |q| <= 127, |w| <= 128.
constexpr int64_t kInt8MaxK = 131072;

// Blocks of 8 columns x 4-channel groups x 32 bytes, then one flag byte per (block, 8 groups).
int64_t int8_packed_bytes(int64_t N, int64_t K) {
  const int64_t groups = (K + 3) / 4;
  return (N + 7) / 8 * (groups * 32 + (groups + 7) / 8);
}

void check_int8_shape(int64_t M, int64_t N, int64_t K) {
  if (M < 0 || N <= 0 || K <= 0) throw std::invalid_argument("int8: M must be >= 0 and N, K positive");
  if (K > kInt8MaxK) throw std::invalid_argument("int8: K must be <= " + std::to_string(kInt8MaxK));
}

void int8_pack(uintptr_t w, uintptr_t packed, uintptr_t colsum, int64_t N, int64_t K) {
  check_int8_shape(0, N, K);
  py::gil_scoped_release release;
  llmo::kernels().int8_pack(ptr<const int8_t>(w), ptr<int8_t>(packed), ptr<int32_t>(colsum), N, K);
}

void quantize_rows_u7(uintptr_t x, uintptr_t q, uintptr_t scales, uintptr_t zero_points, int64_t M, int64_t K) {
  check_int8_shape(M, 1, K);
  py::gil_scoped_release release;
  llmo::kernels().quantize_rows_u7(ptr<const float>(x), ptr<uint8_t>(q), ptr<float>(scales),
                                   ptr<int32_t>(zero_points), M, K, K);
}

void int8_linear(uintptr_t x, uintptr_t packed, uintptr_t colsum, uintptr_t w_scales, uintptr_t bias, uintptr_t out,
                 int64_t M, int64_t N, int64_t K) {
  check_int8_shape(M, N, K);
  Int8LinearArgs p{ptr<const float>(x), ptr<const int8_t>(packed), ptr<const int32_t>(colsum),
                   ptr<const float>(w_scales), ptr<const float>(bias), ptr<float>(out), M, N, K};
  py::gil_scoped_release release;
  if (M > 0) llmo::kernels().int8_linear(p);
}

void check_int4(int64_t K, int group) {
  if (group != 32 && group != 64 && group != 128) throw std::invalid_argument("group must be 32, 64 or 128");
  if (K % 64 != 0 || K % group != 0) throw std::invalid_argument("K must be a multiple of 64 and of group");
}

void int4_gemm(uintptr_t x, uintptr_t packed, uintptr_t scales, int scale_dtype, uintptr_t zeros, uintptr_t bias,
               uintptr_t out, int64_t M, int64_t N, int64_t K, int group) {
  check_dtype(scale_dtype);
  check_int4(K, group);
  Int4GemmArgs p{ptr<const float>(x), ptr<const uint8_t>(packed), ptr<const void>(scales), scale_dtype,
                 ptr<const uint8_t>(zeros), ptr<const float>(bias), ptr<float>(out), M, N, K, group};
  py::gil_scoped_release release;
  llmo::kernels().int4_gemm(p);
}

void int4_dequantize(uintptr_t packed, uintptr_t scales, int scale_dtype, uintptr_t zeros, uintptr_t out,
                     int out_dtype, int64_t N, int64_t K, int group) {
  check_dtype(scale_dtype);
  check_int4(K, group);
  if (out_dtype != llmo::kF32 && out_dtype != llmo::kBF16) throw std::invalid_argument("out dtype must be f32 or bf16");
  py::gil_scoped_release release;
  llmo::kernels().int4_dequant(ptr<const uint8_t>(packed), ptr<const void>(scales), scale_dtype,
                               ptr<const uint8_t>(zeros), ptr<void>(out), out_dtype, N, K, group);
}

void write_kv_cache(uintptr_t key, uintptr_t value, uintptr_t key_cache, uintptr_t value_cache, uintptr_t slots,
                    int64_t tokens, int64_t row_bytes, int64_t num_slots) {
  py::gil_scoped_release release;
  llmo::write_kv_cache(ptr<const char>(key), ptr<const char>(value), ptr<char>(key_cache), ptr<char>(value_cache),
                       ptr<const int64_t>(slots), tokens, row_bytes, num_slots);
}

// The slot indices are checked while the rows are grouped (ValueError on a bad one).
void batched_lora(uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t indices, uintptr_t scaling, uintptr_t out,
                  int dtype, int64_t N, int64_t K, int64_t M, int64_t R, int64_t S) {
  if (dtype != llmo::kF32 && dtype != llmo::kBF16) throw std::invalid_argument("batched_lora: dtype must be f32 or bf16");
  if (N < 0 || K < 0 || M < 0 || R < 0 || S < 0) throw std::invalid_argument("batched_lora: negative size");
  std::vector<int64_t> rows;
  std::vector<llmo::LoraGroup> groups;
  llmo::group_lora_rows(ptr<const int64_t>(indices), N, S, rows, groups);
  if (groups.empty() || K == 0 || M == 0 || R == 0) return;  // nothing to add
  std::vector<float> t(rows.size() * static_cast<size_t>(R));
  llmo::LoraArgs p{ptr<const void>(x), ptr<const void>(a), ptr<const void>(b), ptr<const float>(scaling),
                   ptr<void>(out), dtype, N, K, M, R, rows.data(), groups.data(),
                   static_cast<int64_t>(groups.size()), t.data()};
  py::gil_scoped_release release;
  llmo::lora_kernel()(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "LLMO CPU kernels (AVX2 / AVX-512 VNNI / portable, OpenMP)";
  m.attr("DTYPE_F32") = static_cast<int>(llmo::kF32);
  m.attr("DTYPE_BF16") = static_cast<int>(llmo::kBF16);
  m.attr("DTYPE_F16") = static_cast<int>(llmo::kF16);
  m.def("isa", [] { return std::string(llmo::kernels().name); }, "Instruction set of the active kernels.");
  m.def("available_isas", &llmo::available_isas, "Kernel instruction sets this CPU can run, best first.");
  m.def("force_isa", &llmo::force_isa, py::arg("name"), "Use the given instruction set (tests, benchmarks).");
  m.def("get_num_threads", &llmo::num_threads);
  m.def("set_num_threads", &llmo::set_num_threads, py::arg("n"));
  m.def("attention_rows", &attention_rows, "Paged attention for query rows (see llmo.ops).");
  m.def("quantize_rows", &quantize_rows, "Symmetric per-row int8 quantization.");
  m.def("int8_gemm", &int8_gemm, "W8A8 GEMM with per-row / per-column scales.");
  m.def("int8_max_k", [] { return kInt8MaxK; }, "Largest K int8_linear accepts (int32 accumulators).");
  m.def("int8_packed_bytes", &int8_packed_bytes, py::arg("N"), py::arg("K"), "Size of an int8_pack buffer.");
  m.def("int8_pack", &int8_pack, "Pack an int8 [N, K] weight for int8_linear; also writes its row sums.");
  m.def("quantize_rows_u7", &quantize_rows_u7, "Asymmetric per-row 7-bit (0..127) quantization with zero points.");
  m.def("int8_linear", &int8_linear, "Per-token u7 activation quantization + GEMM with a packed int8 weight.");
  m.def("int4_gemm", &int4_gemm, "Weight-only INT4 GEMM (llmo-int4-v1 layout).");
  m.def("int4_dequantize", &int4_dequantize, "Dequantize llmo-int4-v1 weights to f32 or bf16.");
  m.def("write_kv_cache", &write_kv_cache, "Copy K/V rows into cache slots.");
  m.def("batched_lora", &batched_lora, "Multi-adapter LoRA delta added to out in place (see llmo.ops).");
}
