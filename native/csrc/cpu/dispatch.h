#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace llmo {

const KernelTable& kernels();
const KernelTable& generic_kernels();
std::vector<std::string> available_isas();
void force_isa(const std::string& name);
void write_kv_cache(const char* key, const char* value, char* key_cache, char* value_cache, const int64_t* slots,
                    int64_t tokens, int64_t row_bytes, int64_t num_slots);

}  // namespace llmo
