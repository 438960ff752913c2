/* Shared by the fmk_* sources: the job a kernel runs, the per-ISA kernel table, the thread pool,
 * scalar float conversions. Not part of the public API (fmk.h). */
#ifndef FMK_INTERNAL_H
#define FMK_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fmk.h"

/* x86-64 builds carry the AVX2 / AVX-512 kernels; everything else (aarch64, ...) only the
 * portable ones. -DFMK_NO_X86 builds the portable-only library on x86 too (tests of that build). */
#if defined(__x86_64__) && !defined(FMK_NO_X86)
#define FMK_X86 1
#endif

/* fn(ctx, r0, r1) handles rows [r0, r1); fmk_parallel_for splits [0, n) into at most `threads`
 * contiguous ranges whose bounds are multiples of `grain` (except the last), runs them on the
 * pool and the calling thread, and returns when all are done. */
typedef void (*fmk_range_fn)(void *ctx, int64_t r0, int64_t r1);
int fmk_parallel_for(int threads, int64_t n, int64_t grain, fmk_range_fn fn, void *ctx);

enum fmk_epilogue {
    FMK_STORE = 0,    /* y[t, r] = (W x_t)[r] */
    FMK_SILU_MUL = 1, /* y[t, r] = silu((G x_t)[r]) * (U x_t)[r]  with m[0] = G, m[1] = U */
};

/* One matrix product over prepared activations (fmk_prepare_x). */
typedef struct fmk_job {
    const fmk_matrix *m[2]; /* m[0]; m[1] only for FMK_SILU_MUL (same layout as m[0]) */
    int epilogue;
    int64_t T;
    const float *xp;        /* [T, xstride] activations in the ISA's block order, zero padded */
    const float *xsum;      /* quantized: [T, xstride/P] sum of each word's P activations */
    int64_t xstride;
    const int8_t *xq;       /* int8 decode (kern_vnni.c): [T, qstride] quantized activations */
    const float *xscale;    /* int8 decode: [T, gstride] their scale per weight group */
    int64_t qstride, gstride;
    float *y;               /* [T, rows] */
    int status;             /* FMK_OK, or the first failure a worker saw (fmk_job_fail) */
} fmk_job;

static inline void fmk_job_fail(fmk_job *job, int status) {
    __atomic_store_n(&job->status, status, __ATOMIC_RELAXED);
}

/* What one instruction set provides. */
typedef struct fmk_kernels {
    int lanes;         /* floats per vector: fixes the activation block order */
    int tile_rows;     /* rows per register tile (row ranges split on this grain) */
    fmk_range_fn rows; /* ctx: fmk_job */
    /* lays out x for `rows` (fills the job's activation fields; the buffers to free go to
     * bufs[0..2]); NULL: the float block order of fmk_api.c */
    int (*prepare)(fmk_job *job, const float *x, void **bufs);
} fmk_kernels;

extern const fmk_kernels fmk_kernels_scalar;
#ifdef FMK_X86
extern const fmk_kernels fmk_kernels_avx2;
extern const fmk_kernels fmk_kernels_avx512;
extern const fmk_kernels fmk_kernels_vnni; /* int8 decode, T < FMK_INT8_MAX_T */
#define FMK_INT8_MAX_T 3
int fmk_int8_cpu(void); /* AVX-512 with BW and VNNI */
#endif

/* Activation layout for quantized weights with P = 32/bits values per word and L lanes: word
 * block b (words b*L .. b*L+L-1) holds P vectors, vector k lane l = x[(b*L + l)*P + k], so that
 * lane l of (words >> bits*k) & mask multiplies it. Float weights (P = 1) keep x's order. */
static inline int64_t fmk_xstride(int64_t cols, int bits, int lanes) {
    const int64_t per_word = bits == 16 ? 1 : 32 / bits;
    const int64_t nwords = cols / per_word;
    return (nwords + lanes - 1) / lanes * lanes * per_word;
}

/* n zeroed floats, 64-byte aligned: vector loads of activations and scratch then never split a
 * cache line (measured: unaligned activations cost the decode kernel about a third). free() it. */
static inline float *fmk_zalloc(int64_t n) {
    const size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

static inline float fmk_bits_to_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float fmk_bf16_to_f32(uint16_t h) { return fmk_bits_to_f32((uint32_t)h << 16); }

static inline float fmk_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return fmk_bits_to_f32(sign | 0x7f800000u | (man << 13)); /* inf / nan */
    if (exp) return fmk_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
    const float sub = (float)man * 0x1p-24f; /* subnormal (or zero): exact in float32 */
    return sign ? -sub : sub;
}

/* Element i of a float array stored in `dtype`. */
static inline float fmk_load_f32(const void *p, int dtype, int64_t i) {
    if (dtype == FMK_BF16) return fmk_bf16_to_f32(((const uint16_t *)p)[i]);
    if (dtype == FMK_F16) return fmk_f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

#endif
