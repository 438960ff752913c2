/* The AVX-512 vector vocabulary of kern_simd.h (16 float lanes, 32 registers: bigger tiles).
 * Included by kern_avx512.c and kern_vnni.c after they define FMK_TARGET (a superset of
 * avx512f,avx2,fma,f16c) and FMK_FN; x86-64 only (the includers check FMK_X86). */
#ifndef FMK_KERN_AVX512_H
#define FMK_KERN_AVX512_H
#include <immintrin.h>

#define FMK_L 16
#define FMK_NT 4
#define FMK_DR 4
#define FMK_BATCH_T 4 /* measured: the FMA form wins below, dequantize-once from here */
#define FMK_CHUNK 1024
#define FMK_QMAGIC 1
#define FMK_V static inline __attribute__((always_inline)) FMK_TARGET

typedef __m512 V;
typedef __m512i VI;
typedef __m512i VX;

FMK_V V v_zero(void) { return _mm512_setzero_ps(); }
FMK_V V v_load(const float *p) { return _mm512_loadu_ps(p); }
FMK_V void v_store(float *p, V v) { _mm512_storeu_ps(p, v); }
FMK_V V v_set1(float f) { return _mm512_set1_ps(f); }
FMK_V V v_mul(V a, V b) { return _mm512_mul_ps(a, b); }
FMK_V V v_add(V a, V b) { return _mm512_add_ps(a, b); }
FMK_V V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
FMK_V float v_hsum(V v) { return _mm512_reduce_add_ps(v); }
FMK_V VI vi_load(const uint32_t *p) { return _mm512_loadu_si512(p); }
FMK_V V v_q(VI w, int bits, int k) { /* FMK_QMAGIC: 1 + q / 2^bits */
    const int top = 23 - bits, shift = top - bits * k; /* q to the mantissa's top bits */
    const VI moved = shift >= 0 ? _mm512_slli_epi32(w, (unsigned)shift) : _mm512_srli_epi32(w, (unsigned)-shift);
    const VI mask = _mm512_set1_epi32((int)(((1u << bits) - 1) << top)), one = _mm512_set1_epi32(0x3f800000);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(moved, mask, one, 0xea)); /* (moved & mask) | one */
}
FMK_V VX vx_groups(int64_t wpg) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    if (wpg >= FMK_L) return _mm512_setzero_si512();
    return wpg == 1 ? lane : _mm512_srli_epi32(lane, __builtin_ctzll((unsigned long long)wpg));
}
FMK_V V v_perm(V v, VX idx) { return _mm512_permutexvar_ps(idx, v); }
FMK_V V v_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
FMK_V V v_load_bf16(const uint16_t *p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

#endif
