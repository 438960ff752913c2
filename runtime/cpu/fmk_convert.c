/* Conversions between quantized and float matrices in natural (row-major) element order:
 * fmk_dequantize (rows of a quantized matrix to float32 / float16 / bfloat16: prefill products
 * that run as a float GEMM) and fmk_quantize (float rows to group-wise affine min/max: resident
 * matrices quantized at load). Both compute exactly what the torch twins in flashmoe_pack/quant.py
 * compute (dequantize; quantize with method "minmax"): the same float32 operations in the same
 * order (ISO C: no FMA contraction), round half to even, scales and biases rounded to their
 * dtype before q is chosen. Plain loops that the compiler vectorises; on x86-64 Linux each hot
 * function is also built for AVX2 and AVX-512 and picked at load (target_clones). Little-endian
 * hosts only (x86-64, aarch64): element j of a packed row is bits [bits*j, bits*j + bits) of
 * the row's bytes, which is SPEC.md's word packing read byte-wise. */
#include <math.h>

#include "fmk_internal.h"

#if defined(FMK_X86) && defined(__linux__) && defined(__GNUC__)
#define FMK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FMK_CLONES
#endif

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r); /* NaN stays quiet NaN */
}

static uint16_t f32_to_f16(float f) { /* round to nearest even; overflow to inf */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {                                   /* subnormal half (or zero) */
        const float sub = fabsf(f) * 0x1p24f;                /* exact; units of 2^-24 */
        return (uint16_t)(sign | (uint32_t)nearbyintf(sub));
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* dst[0..n) = src as float32 */
FMK_CLONES static void load_row(float *dst, const void *src, int dtype, int64_t n) {
    if (dtype == FMK_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == FMK_BF16) {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t u = (uint32_t)h[i] << 16;
            memcpy(dst + i, &u, sizeof u);
        }
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = fmk_f16_to_f32(((const uint16_t *)src)[i]);
    }
}

/* dst[0..n) of dtype = src rounded */
FMK_CLONES static void store_row(void *dst, int dtype, const float *src, int64_t n) {
    if (dtype == FMK_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == FMK_BF16) {
        uint16_t *h = dst;
        for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(src[i]);
    } else {
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = f32_to_f16(src[i]);
    }
}

/* row[j] = q[j] * s[g] + z[g] for one packed row of BITS-bit values */
FMK_CLONES static void dq_row(const uint8_t *bytes, const float *s, const float *z, int64_t cols, int64_t gs,
                              int bits, float *row) {
    for (int64_t g = 0; g < cols / gs; g++) {
        const float sg = s[g], zg = z[g];
        const uint8_t *b = bytes + g * gs * bits / 8;
        float *out = row + g * gs;
        if (bits == 8) {
            for (int64_t j = 0; j < gs; j++) out[j] = (float)b[j] * sg + zg;
        } else if (bits == 4) {
            for (int64_t j = 0; j < gs / 2; j++) {
                out[2 * j] = (float)(b[j] & 15) * sg + zg;
                out[2 * j + 1] = (float)(b[j] >> 4) * sg + zg;
            }
        } else {
            for (int64_t j = 0; j < gs / 4; j++)
                for (int k = 0; k < 4; k++) out[4 * j + k] = (float)((b[j] >> (2 * k)) & 3) * sg + zg;
        }
    }
}

typedef struct {
    const fmk_matrix *m;
    int64_t r0;
    void *out;
    int odtype;
    int status;
} dq_ctx;

/* rows [a, b) of the output = rows r0 + a .. of m */
static void dq_range(void *p, int64_t a, int64_t b) {
    dq_ctx *c = p;
    const fmk_matrix *m = c->m;
    const int64_t cols = m->cols, ngroups = cols / m->group_size, esz = m->sdtype == FMK_F32 ? 4 : 2;
    const int64_t osz = c->odtype == FMK_F32 ? 4 : 2;
    float *row = fmk_zalloc(cols + 2 * ngroups), *s = row + cols, *z = s + ngroups;
    if (!row) {
        __atomic_store_n(&c->status, FMK_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t i = a; i < b; i++) {
        const int64_t r = c->r0 + i;
        load_row(s, (const char *)m->scales + r * ngroups * esz, m->sdtype, ngroups);
        load_row(z, (const char *)m->biases + r * ngroups * esz, m->sdtype, ngroups);
        dq_row((const uint8_t *)m->weight + r * (cols * m->bits / 8), s, z, cols, m->group_size, m->bits, row);
        store_row((char *)c->out + i * cols * osz, c->odtype, row, cols);
    }
    free(row);
}

int fmk_dequantize(const fmk_matrix *m, int64_t r0, int64_t r1, void *out, int out_dtype, int threads) {
    if (!m || !m->weight || !m->scales || !m->biases || !out || threads < 1 || threads > FMK_MAX_THREADS)
        return FMK_EINVAL;
    if ((m->bits != 2 && m->bits != 4 && m->bits != 8) || m->group_size < 1 || m->cols < 1 || m->rows < 1)
        return FMK_EINVAL;
    if (m->group_size % (32 / m->bits) || m->cols % m->group_size) return FMK_EINVAL;
    if (m->sdtype < FMK_F32 || m->sdtype > FMK_BF16 || out_dtype < FMK_F32 || out_dtype > FMK_BF16)
        return FMK_EINVAL;
    if (r0 < 0 || r1 < r0 || r1 > m->rows) return FMK_EINVAL;
    if (r1 == r0) return FMK_OK;
    dq_ctx c = {m, r0, out, out_dtype, FMK_OK};
    const int rc = fmk_parallel_for(threads, r1 - r0, 1, dq_range, &c);
    return rc ? rc : c.status;
}

typedef struct {
    const fmk_matrix *src;
    fmk_matrix *dst;
    int status;
} q_ctx;

/* q of one group: clamp(round((x - z) / safe), 0, qmax), written as BITS-bit fields into bytes.
 * Clamping before rounding gives the same integer (qmax is one) and keeps the magic-number
 * rounding (exact round half to even below 2^22) in range. */
FMK_CLONES static void q_group(const float *x, int64_t gs, float z, float safe, int bits, uint8_t *bytes, float *q) {
    const float qmax = (float)((1 << bits) - 1);
    for (int64_t j = 0; j < gs; j++) {
        float v = (x[j] - z) / safe;
        v = v < 0.0f ? 0.0f : v > qmax ? qmax : v;
        q[j] = (v + 0x1.8p23f) - 0x1.8p23f;
    }
    if (bits == 8) {
        for (int64_t j = 0; j < gs; j++) bytes[j] = (uint8_t)q[j];
    } else {
        const int per = 8 / bits;
        for (int64_t j = 0; j < gs / per; j++) {
            unsigned v = 0;
            for (int k = 0; k < per; k++) v |= (unsigned)q[j * per + k] << (bits * k);
            bytes[j] = (uint8_t)v;
        }
    }
}

/* min and max of x[0..n): 16 running lanes (a vector each), then the lanes */
FMK_CLONES static void group_minmax(const float *x, int64_t n, float *lo_out, float *hi_out) {
    float lo[16], hi[16];
    int64_t j = 0;
    for (int l = 0; l < 16; l++) lo[l] = hi[l] = x[0];
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            const float v = x[j + l];
            lo[l] = v < lo[l] ? v : lo[l];
            hi[l] = v > hi[l] ? v : hi[l];
        }
    for (; j < n; j++) lo[0] = x[j] < lo[0] ? x[j] : lo[0], hi[0] = x[j] > hi[0] ? x[j] : hi[0];
    for (int l = 1; l < 16; l++) lo[0] = lo[l] < lo[0] ? lo[l] : lo[0], hi[0] = hi[l] > hi[0] ? hi[l] : hi[0];
    *lo_out = lo[0], *hi_out = hi[0];
}

static float round_to(float v, int dtype) { /* v as stored in dtype, read back */
    if (dtype == FMK_BF16) return fmk_bf16_to_f32(f32_to_bf16(v));
    if (dtype == FMK_F16) return fmk_f16_to_f32(f32_to_f16(v));
    return v;
}

static void q_range(void *p, int64_t a, int64_t b) {
    q_ctx *c = p;
    const fmk_matrix *src = c->src;
    fmk_matrix *dst = c->dst;
    const int bits = dst->bits;
    const int64_t cols = src->cols, gs = dst->group_size, ngroups = cols / gs;
    const int64_t in_sz = src->wdtype == FMK_F32 ? 4 : 2, s_sz = dst->sdtype == FMK_F32 ? 4 : 2;
    const float qmax = (float)((1 << bits) - 1);
    float *row = fmk_zalloc(cols + gs), *q = row + cols;
    if (!row) {
        __atomic_store_n(&c->status, FMK_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t r = a; r < b; r++) {
        load_row(row, (const char *)src->weight + r * cols * in_sz, src->wdtype, cols);
        uint8_t *bytes = (uint8_t *)dst->weight + r * (cols * bits / 8);
        for (int64_t g = 0; g < ngroups; g++) {
            const float *x = row + g * gs;
            float lo, hi;
            group_minmax(x, gs, &lo, &hi);
            const float s = round_to((hi - lo) / qmax, dst->sdtype), z = round_to(lo, dst->sdtype);
            if (dst->sdtype == FMK_F32) {
                ((float *)dst->scales)[r * ngroups + g] = s, ((float *)dst->biases)[r * ngroups + g] = z;
            } else {
                const uint16_t hs = dst->sdtype == FMK_BF16 ? f32_to_bf16(s) : f32_to_f16(s);
                const uint16_t hz = dst->sdtype == FMK_BF16 ? f32_to_bf16(z) : f32_to_f16(z);
                memcpy((char *)dst->scales + (r * ngroups + g) * s_sz, &hs, 2);
                memcpy((char *)dst->biases + (r * ngroups + g) * s_sz, &hz, 2);
            }
            q_group(x, gs, z, s == 0.0f ? 1.0f : s, bits, bytes + g * gs * bits / 8, q);
        }
    }
    free(row);
}

int fmk_quantize(const fmk_matrix *src, fmk_matrix *dst, int threads) {
    if (!src || !dst || !src->weight || !dst->weight || !dst->scales || !dst->biases) return FMK_EINVAL;
    if (threads < 1 || threads > FMK_MAX_THREADS || src->bits != 16 || src->rows < 1 || src->cols < 1)
        return FMK_EINVAL;
    if (src->wdtype < FMK_F32 || src->wdtype > FMK_BF16 || dst->sdtype < FMK_F32 || dst->sdtype > FMK_BF16)
        return FMK_EINVAL;
    if (dst->bits != 2 && dst->bits != 4 && dst->bits != 8) return FMK_EINVAL;
    if (dst->rows != src->rows || dst->cols != src->cols || dst->group_size < 1) return FMK_EINVAL;
    if (dst->group_size % (32 / dst->bits) || dst->cols % dst->group_size) return FMK_EINVAL;
    q_ctx c = {src, dst, FMK_OK};
    const int rc = fmk_parallel_for(threads, src->rows, 1, q_range, &c);
    return rc ? rc : c.status;
}
