// The CPU kernel's row loop compiled for AVX2 + FMA + F16C (CMake adds the flags to this file
// only); rope_cpu.cpp runs it when the CPU has them.
#define ROPE_CPU_ISA avx2
#include "rope/rope_cpu_impl.h"
