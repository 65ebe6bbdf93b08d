// The CPU kernel's row loop compiled for AVX-512 with the BF16 conversion instruction
// (vcvtneps2bf16), for bfloat16 outputs (CMake adds the flags to this file only); rope_cpu.cpp
// runs it when the CPU has them.
#define ROPE_CPU_ISA avx512bf16
#include "rope/rope_cpu_impl.h"
