/* AVX2 + FMA + F16C kernels: kern_simd.h with 8 float lanes. Compiled with per-function target
 * attributes (no global -mavx2); fmk_isa.c runs them only on CPUs that report these features. */
#include "fmk_internal.h"
#ifdef FMK_X86
#include <immintrin.h>

#define FMK_L 8
#define FMK_NT 2 /* 16 ymm registers: 2 rows x 2 tokens x (total, part) + operands */
#define FMK_DR 4
#define FMK_BATCH_T 6 /* measured: the FMA form wins below (only 2 tokens per tile here) */
#define FMK_CHUNK 1024
#define FMK_QMAGIC 0 /* no ternary logic op: the magic would cost as much as the conversion */
#define FMK_TARGET __attribute__((target("avx2,fma,f16c")))
#define FMK_FN(name) fmk_avx2_##name
#define FMK_KERNELS fmk_kernels_avx2
#define FMK_V static inline __attribute__((always_inline)) FMK_TARGET

typedef __m256 V;
typedef __m256i VI;
typedef __m256i VX;

FMK_V V v_zero(void) { return _mm256_setzero_ps(); }
FMK_V V v_load(const float *p) { return _mm256_loadu_ps(p); }
FMK_V void v_store(float *p, V v) { _mm256_storeu_ps(p, v); }
FMK_V V v_set1(float f) { return _mm256_set1_ps(f); }
FMK_V V v_mul(V a, V b) { return _mm256_mul_ps(a, b); }
FMK_V V v_add(V a, V b) { return _mm256_add_ps(a, b); }
FMK_V V v_fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
FMK_V float v_hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
FMK_V VI vi_load(const uint32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
FMK_V V v_q(VI w, int bits, int k) {
    const __m256i mask = _mm256_set1_epi32((int)((1u << bits) - 1));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, bits * k), mask));
}
FMK_V VX vx_groups(int64_t wpg) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    if (wpg >= FMK_L) return _mm256_setzero_si256();
    return wpg == 1 ? lane : _mm256_srli_epi32(lane, __builtin_ctzll((unsigned long long)wpg));
}
FMK_V V v_perm(V v, VX idx) { return _mm256_permutevar8x32_ps(v, idx); }
FMK_V V v_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
FMK_V V v_load_bf16(const uint16_t *p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

#include "kern_simd.h"
#endif
