// Kernels built for the avx512vnni instruction set (selected at run time by dispatch.cpp).
#define LLMO_ISA 2
#define LLMO_NS avx512vnni
#define LLMO_ISA_NAME "avx512vnni"
#include "kernels_body.h"
