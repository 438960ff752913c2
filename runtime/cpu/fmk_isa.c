/* Run-time instruction-set choice: what the CPU supports (cpuid through __builtin_cpu_supports,
 * which also checks that the OS saves the vector registers), FLASHMOE_ISA, fmk_set_isa. */
#include <stdlib.h>
#include <string.h>

#include "fmk_internal.h"

static const char *const isa_names[FMK_ISA_COUNT] = {"scalar", "avx2", "avx512"};

static int forced = -1, forced_dot = -1; /* fmk_set_isa, fmk_set_dot; -1: none */

int fmk_isa_supported(int isa) {
    if (isa == FMK_ISA_SCALAR) return 1;
#ifdef FMK_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c");
    if (isa == FMK_ISA_AVX2) return avx2;
    if (isa == FMK_ISA_AVX512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

int fmk_isa_best(void) {
    int best = FMK_ISA_SCALAR;
    for (int isa = 1; isa < FMK_ISA_COUNT; isa++)
        if (fmk_isa_supported(isa)) best = isa;
    return best;
}

/* FLASHMOE_ISA caps the ISA (a value above what the CPU has, or unknown, means the best). */
static int env_isa(void) {
    const char *v = getenv("FLASHMOE_ISA");
    const int best = fmk_isa_best();
    if (!v) return best;
    for (int isa = 0; isa < FMK_ISA_COUNT; isa++)
        if (!strcmp(v, isa_names[isa])) return isa < best ? isa : best;
    return best;
}

int fmk_isa_active(void) {
    const int f = __atomic_load_n(&forced, __ATOMIC_RELAXED);
    return f >= 0 ? f : env_isa();
}

int fmk_set_isa(int isa) {
    if (isa == -1) {
        __atomic_store_n(&forced, -1, __ATOMIC_RELAXED);
        return FMK_OK;
    }
    if (isa < 0 || isa >= FMK_ISA_COUNT || !fmk_isa_supported(isa)) return FMK_EISA;
    __atomic_store_n(&forced, isa, __ATOMIC_RELAXED);
    return FMK_OK;
}

#ifdef FMK_X86
int fmk_int8_cpu(void) {
    __builtin_cpu_init();
    return fmk_isa_supported(FMK_ISA_AVX512) && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}
#endif

int fmk_dot_supported(int dot) {
    if (dot == FMK_DOT_F32) return 1;
#ifdef FMK_X86
    if (dot == FMK_DOT_INT8) return fmk_int8_cpu();
#endif
    return 0;
}

/* FLASHMOE_CPU_DOT=int8 (or fmk_set_dot) asks for int8 decode products; they run where the CPU
 * has them and the avx512 ISA is active. */
int fmk_dot_active(void) {
    const int f = __atomic_load_n(&forced_dot, __ATOMIC_RELAXED);
    const char *v = getenv("FLASHMOE_CPU_DOT");
    const int want = f >= 0 ? f : (v && !strcmp(v, "int8") ? FMK_DOT_INT8 : FMK_DOT_F32);
    if (want == FMK_DOT_INT8 && fmk_dot_supported(FMK_DOT_INT8) && fmk_isa_active() == FMK_ISA_AVX512)
        return FMK_DOT_INT8;
    return FMK_DOT_F32;
}

int fmk_set_dot(int dot) {
    if (dot == -1 || ((dot == FMK_DOT_F32 || dot == FMK_DOT_INT8) && fmk_dot_supported(dot))) {
        __atomic_store_n(&forced_dot, dot, __ATOMIC_RELAXED);
        return FMK_OK;
    }
    return FMK_EISA;
}

const char *fmk_isa_name(int isa) { return isa >= 0 && isa < FMK_ISA_COUNT ? isa_names[isa] : "unknown"; }

const char *fmk_strerror(int status) {
    switch (status) {
    case FMK_OK: return "ok";
    case FMK_EINVAL: return "invalid argument";
    case FMK_ENOMEM: return "out of memory";
    case FMK_ETHREAD: return "cannot start a worker thread";
    case FMK_EISA: return "instruction set not supported by this CPU";
    default: return "unknown error";
    }
}
