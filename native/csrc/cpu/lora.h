// Batched multi-adapter LoRA on the CPU (S-LoRA / Punica style): the ISA-independent
// row grouping (dispatch.cpp) and the per-ISA kernel entry points (kernels_body.h).
#pragma once

#include <cstdint>
#include <vector>

namespace llmo {

// Rows rows[begin, begin + count) of the grouped row list all use adapter slot `slot`.
struct LoraGroup {
  int64_t slot, begin, count;
};

// out[row] += scaling[s] * B[s] @ (A[s] @ x[row]) for every grouped row, s its slot.
// x [N, K], A [S, R, K], B [S, M, R] and out [N, M] share one dtype (f32 or bf16).
struct LoraArgs {
  const void* x;
  const void* a;
  const void* b;
  const float* scaling;  // [S]
  void* out;
  int dtype;
  int64_t N, K, M, R;
  const int64_t* rows;      // rows with an adapter, grouped by slot (row order within a slot)
  const LoraGroup* groups;  // one per slot present
  int64_t num_groups;
  float* t;  // [number of grouped rows, R] scratch: the scaled shrunk rows, fp32
};

using LoraKernel = void (*)(const LoraArgs&);

// Groups the rows by slot (a stable counting sort); rows with index -1 are left out.
// Throws std::invalid_argument when an index lies outside [-1, S).
void group_lora_rows(const int64_t* indices, int64_t N, int64_t S, std::vector<int64_t>& rows,
                     std::vector<LoraGroup>& groups);

// The batched LoRA kernel of the active instruction set (follows force_isa).
LoraKernel lora_kernel();

namespace generic { void batched_lora(const LoraArgs& p); }
namespace avx2 { void batched_lora(const LoraArgs& p); }
namespace avx512vnni { void batched_lora(const LoraArgs& p); }

}  // namespace llmo
