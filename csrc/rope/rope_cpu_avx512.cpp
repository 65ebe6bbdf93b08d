// The CPU kernel's row loop compiled for AVX-512 (F, BW, DQ, VL) + FMA + F16C, 512-bit vectors
// (CMake adds the flags to this file only); rope_cpu.cpp runs it when the CPU has them.
#define ROPE_CPU_ISA avx512
#include "rope/rope_cpu_impl.h"
