// Kernels built for the generic instruction set (selected at run time by dispatch.cpp).
#define LLMO_ISA 0
#define LLMO_NS generic
#define LLMO_ISA_NAME "generic"
#include "kernels_body.h"
