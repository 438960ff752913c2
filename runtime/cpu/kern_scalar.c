/* The portable kernels: kern_simd.h with one lane, plain C (any CPU, any architecture). */
#include "fmk_internal.h"

#define FMK_L 1
#define FMK_NT 4
#define FMK_DR 4
#define FMK_BATCH_T 4
#define FMK_CHUNK 1024
#define FMK_QMAGIC 0
#define FMK_TARGET
#define FMK_FN(name) fmk_scalar_##name
#define FMK_KERNELS fmk_kernels_scalar

typedef float V;
typedef uint32_t VI;
typedef int VX;

static inline V v_zero(void) { return 0.0f; }
static inline V v_load(const float *p) { return *p; }
static inline void v_store(float *p, V v) { *p = v; }
static inline V v_set1(float f) { return f; }
static inline V v_mul(V a, V b) { return a * b; }
static inline V v_add(V a, V b) { return a + b; }
static inline V v_fma(V a, V b, V c) { return a * b + c; }
static inline float v_hsum(V v) { return v; }
static inline VI vi_load(const uint32_t *p) { return *p; }
static inline V v_q(VI w, int bits, int k) { return (float)((w >> (bits * k)) & ((1u << bits) - 1)); }
static inline VX vx_groups(int64_t wpg) { (void)wpg; return 0; }
static inline V v_perm(V v, VX idx) { (void)idx; return v; }
static inline V v_load_f16(const uint16_t *p) { return fmk_f16_to_f32(*p); }
static inline V v_load_bf16(const uint16_t *p) { return fmk_bf16_to_f32(*p); }

#include "kern_simd.h"
