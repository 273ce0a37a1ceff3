// Run-time choice of the CPU kernel table (cpuid), thread count, and the
// ISA-independent parts: the KV-cache write and the batched LoRA row grouping.
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/dispatch.h"
#include "cpu/lora.h"

namespace llmo {
namespace {

std::atomic<int> g_threads{0};

bool cpu_has(const char* feature) {
#if LLMO_X86
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512vnni") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  return std::strcmp(feature, "generic") == 0;
}

const KernelTable* table_for(const std::string& name) {
#if LLMO_X86
  if (name == "avx512vnni") return &avx512vnni::table;
  if (name == "avx2") return &avx2::table;
#endif
  if (name == "generic") return &generic::table;
  return nullptr;
}

const KernelTable* best_table() {
  if (const char* env = std::getenv("LLMO_NATIVE_ISA")) {
    const KernelTable* forced = table_for(env);
    if (forced != nullptr && cpu_has(env)) return forced;
  }
  for (const char* name : {"avx512vnni", "avx2"})
    if (cpu_has(name) && table_for(name) != nullptr) return table_for(name);
  return &generic::table;
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

int num_threads() {
  int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
  g_threads.store(n);
}

const KernelTable& kernels() {
  const KernelTable* t = g_table.load();
  if (t == nullptr) {
    t = best_table();
    g_table.store(t);
  }
  return *t;
}

const KernelTable& generic_kernels() { return generic::table; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512vnni", "avx2", "generic"})
    if (cpu_has(name) && table_for(name) != nullptr) out.emplace_back(name);
  return out;
}

void force_isa(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (t == nullptr || !cpu_has(name.c_str()))
    throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU/build");
  g_table.store(t);
}

void write_kv_cache(const char* key, const char* value, char* key_cache, char* value_cache, const int64_t* slots,
                    int64_t tokens, int64_t row_bytes, int64_t num_slots) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (tokens * row_bytes >= (1 << 20))
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0 || s >= num_slots) continue;
    std::memcpy(key_cache + s * row_bytes, key + t * row_bytes, row_bytes);
    std::memcpy(value_cache + s * row_bytes, value + t * row_bytes, row_bytes);
  }
}

LoraKernel lora_kernel() {
  const KernelTable* t = &kernels();
#if LLMO_X86
  if (t == &avx512vnni::table) return &avx512vnni::batched_lora;
  if (t == &avx2::table) return &avx2::batched_lora;
#endif
  (void)t;
  return &generic::batched_lora;
}

void group_lora_rows(const int64_t* indices, int64_t N, int64_t S, std::vector<int64_t>& rows,
                     std::vector<LoraGroup>& groups) {
  std::vector<int64_t> start(S + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t s = indices[i];
    if (s < -1 || s >= S)
      throw std::invalid_argument("indices must lie in [-1, " + std::to_string(S) + ") (the adapter slots), got " +
                                  std::to_string(s) + " at row " + std::to_string(i));
    if (s >= 0) ++start[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) {
    if (start[s + 1] > 0) groups.push_back({s, start[s], start[s + 1]});
    start[s + 1] += start[s];
  }
  rows.resize(start[S]);
  for (int64_t i = 0; i < N; ++i)
    if (indices[i] >= 0) rows[start[indices[i]]++] = i;
}

}  // namespace llmo
