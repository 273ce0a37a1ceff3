// Kernels built for the avx2 instruction set (selected at run time by dispatch.cpp).
#define LLMO_ISA 1
#define LLMO_NS avx2
#define LLMO_ISA_NAME "avx2"
#include "kernels_body.h"
