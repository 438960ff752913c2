/* AVX-512 kernels: kern_simd.h over the vocabulary of kern_avx512.h. Per-function target
 * attributes (no global -mavx512f); fmk_isa.c runs them only where the CPU has AVX-512. */
#include "fmk_internal.h"
#ifdef FMK_X86

#define FMK_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
#define FMK_FN(name) fmk_avx512_##name
#define FMK_KERNELS fmk_kernels_avx512
#include "kern_avx512.h"
#include "kern_simd.h"
#endif
