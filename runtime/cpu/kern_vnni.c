/* Opt-in int8 decode products (FMK_DOT_INT8) on AVX-512 VNNI CPUs, for T <= FMK_INT8_MAX_T.
 *
 * Activations are quantized per weight group g and token, symmetrically: dx = max|x| / 127,
 * xq = round(x / dx) in -127..127. vpdpbusd multiplies the weights' unsigned q by xq, 64 products
 * per instruction (the float path does 16 per FMA, after unpacking), and per group
 *     y += scale_g * dx_g * sum(q * xq) + bias_g * dx_g * sum(xq)
 * i.e. exactly the dequantized weights times the rounded x: only the rounding of x (<= dx/2 per
 * element) separates this from the float result. The batched and float-weight products stay float.
 *
 * Activation layout: word block b (16 words) has E = 8/bits byte planes of 64 bytes; plane k,
 * lane l, byte m holds xq of element (16b + l) * P + m * E + k (P = 32/bits per word), which is
 * what byte m of ((word >> bits*k) & mask-per-byte) holds, so the dot products need no shuffles.
 */
#include "fmk_internal.h"
#ifdef FMK_X86
#include <math.h>

#define FMK_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define FMK_FN(name) fmk_vnni_##name
#include "kern_avx512.h"
#include "kern_simd.h" /* the helpers (to_f32, store, tile_rows); no table: FMK_KERNELS unset */

#define I8_L 16 /* words per block, one per 32-bit lane */

FMK_TARGET static int prepare(fmk_job *job, const float *x, void **bufs) {
    const fmk_matrix *m = job->m[0];
    const int64_t T = job->T, cols = m->cols, gs = m->group_size, P = 32 / m->bits, E = 8 / m->bits;
    const int64_t nwords = cols / P, wstride = (nwords + I8_L - 1) / I8_L * I8_L, ngroups = cols / gs;
    const int64_t qstride = wstride / I8_L * E * 64, gstride = ngroups + I8_L; /* bytes; floats */
    int8_t *xq = (int8_t *)fmk_zalloc((T * qstride + 3) / 4);
    float *dx = fmk_zalloc(T * gstride), *xw = fmk_zalloc(T * wstride);
    bufs[0] = xq, bufs[1] = dx, bufs[2] = xw;
    if (!xq || !dx || !xw) return FMK_ENOMEM;
    int64_t off[32]; /* byte of element `within` of a word, from the word's lane: plane, then byte */
    for (int64_t within = 0; within < P; within++) off[within] = within % E * 64 + within / E;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * cols;
        float *d = dx + t * gstride;
        for (int64_t g = 0; g < ngroups; g++) {
            const float *xg = xt + g * gs;
            __m512 vmax = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 16 <= gs; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + j)));
            float amax = _mm512_reduce_max_ps(vmax);
            for (; j < gs; j++) amax = fmaxf(amax, fabsf(xg[j]));
            d[g] = amax / 127.0f;
        }
        const int wsh = __builtin_ctzll((unsigned long long)(gs / P)); /* words per group: a power of two */
        for (int64_t wi = 0; wi < nwords; wi++) {
            const float dg = d[wi >> wsh], *xv = xt + wi * P, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
            int8_t *dst = xq + t * qstride + wi / I8_L * E * 64 + wi % I8_L * 4;
            int sum = 0; /* of the rounded activations: see below */
            for (int64_t within = 0; within < P; within++) {
                float v = xv[within] * inv; /* |v| <= 127 up to rounding */
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                const int qx = (int)((v + 0x1.8p23f) - 0x1.8p23f); /* round to nearest even */
                dst[off[within]] = (int8_t)qx;
                sum += qx;
            }
            /* The bias term uses the sum of the rounded activations, dx * sum(xq), not sum(x): the
             * result is then exactly the dot of the dequantized weights with the rounded x. With the
             * exact sum, the rounding error of x was multiplied by q (0..2^bits-1, mean near the
             * middle) instead of by q - its group's offset: 3-4x the error (q8, Gaussian x: 0.65-2.5%
             * relative output error against 0.59-0.63% now). */
            xw[t * wstride + wi] = dg * (float)sum;
        }
    }
    job->xq = xq, job->xscale = dx, job->xsum = xw;
    job->qstride = qstride, job->gstride = gstride, job->xstride = wstride * P;
    return FMK_OK;
}

/* Row words / scales / biases (float32, zero padded) without FMK_QMAGIC's rewrite: q is exact. */
FMK_INLINE FMK_FN(qrow) FMK_FN(i8_row)(const fmk_matrix *m, int64_t row, float *tmp) {
    const int64_t ngroups = m->cols / m->group_size, esz = m->sdtype == FMK_F32 ? 4 : 2;
    float *s = tmp, *b = tmp + ngroups + I8_L;
    FMK_FN(to_f32)(s, (const char *)m->scales + row * ngroups * esz, m->sdtype, ngroups);
    FMK_FN(to_f32)(b, (const char *)m->biases + row * ngroups * esz, m->sdtype, ngroups);
    return (FMK_FN(qrow)){(const uint32_t *)m->weight + row * (m->cols * m->bits / 32), s, b};
}

/* One block (w[i] loaded, words j .. j+15) of NR rows for one token. */
FMK_INLINE void FMK_FN(i8block)(const VI *w, const FMK_FN(qrow) *rw, const int NR, const int BITS,
                                const int8_t *xb, V dxl, V xs, int64_t g0, VX gidx, V *tot) {
    const int E = 8 / BITS;
    const VI mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    for (int i = 0; i < NR; i++) {
        VI acc = _mm512_setzero_si512();
        for (int k = 0; k < E; k++) {
            VI q = k ? _mm512_srli_epi32(w[i], BITS * k) : w[i];
            if (BITS < 8) q = _mm512_and_si512(q, mask);
            acc = _mm512_dpbusd_epi32(acc, q, _mm512_load_si512(xb + k * 64)); /* u8 q x s8 xq, 4 per lane */
        }
        const V s = v_perm(v_load(rw[i].s + g0), gidx), b = v_perm(v_load(rw[i].b + g0), gidx);
        tot[i] = v_fma(b, xs, v_fma(_mm512_cvtepi32_ps(acc), v_mul(s, dxl), tot[i]));
    }
}

FMK_INLINE void FMK_FN(i8tile)(const FMK_FN(qrow) *rw, const int NR, const int BITS, const fmk_job *job,
                               int64_t t, float *out) {
    const int64_t nwords = job->m[0]->cols * BITS / 32, wpg = job->m[0]->group_size * BITS / 32;
    const int E = 8 / BITS, wsh = __builtin_ctzll((unsigned long long)wpg);
    const VX gidx = vx_groups(wpg);
    const int8_t *xq = job->xq + t * job->qstride;
    const float *dx = job->xscale + t * job->gstride, *xw = job->xsum + t * (job->xstride * BITS / 32);
    V tot[2] = {v_zero(), v_zero()};
    VI w[2];
    for (int64_t j = 0; j < nwords; j += I8_L) {
        for (int i = 0; i < NR; i++) {
            if (j + I8_L <= nwords) {
                __builtin_prefetch(rw[i].w + j + FMK_PREFETCH / 4);
                w[i] = vi_load(rw[i].w + j);
            } else { /* partial block: zero words (their xq are zero too) */
                uint32_t tmp[I8_L] = {0};
                memcpy(tmp, rw[i].w + j, (size_t)(nwords - j) * sizeof(uint32_t));
                w[i] = vi_load(tmp);
            }
        }
        const int64_t g0 = j >> wsh;
        FMK_FN(i8block)(w, rw, NR, BITS, xq + j / I8_L * E * 64, v_perm(v_load(dx + g0), gidx), v_load(xw + j), g0,
                        gidx, tot);
    }
    for (int i = 0; i < NR; i++) out[i] = v_hsum(tot[i]);
}

FMK_INLINE void FMK_FN(i8rows)(fmk_job *job, int64_t r0, int64_t r1, const int BITS) {
    const int64_t pad = job->m[0]->cols / job->m[0]->group_size + I8_L;
    float *conv = fmk_zalloc(4 * pad);
    if (!conv) {
        fmk_job_fail(job, FMK_ENOMEM);
        return;
    }
    for (int64_t r = r0, step; r < r1; r += step) {
        const fmk_matrix *mats[4];
        int64_t idx[4];
        const int nr = FMK_FN(tile_rows)(job, r, r1, 2, mats, idx, &step);
        FMK_FN(qrow) rw[2];
        for (int i = 0; i < nr; i++) rw[i] = FMK_FN(i8_row)(mats[i], idx[i], conv + 2 * i * pad);
        for (int64_t t = 0; t < job->T; t++) {
            float out[2];
            if (nr == 2) FMK_FN(i8tile)(rw, 2, BITS, job, t, out);
            else FMK_FN(i8tile)(rw, 1, BITS, job, t, out);
            FMK_FN(store)(job, r, nr, t, 1, out, 1);
        }
    }
    free(conv);
}

FMK_TARGET static void FMK_FN(i8_q2)(fmk_job *j, int64_t a, int64_t b) { FMK_FN(i8rows)(j, a, b, 2); }
FMK_TARGET static void FMK_FN(i8_q4)(fmk_job *j, int64_t a, int64_t b) { FMK_FN(i8rows)(j, a, b, 4); }
FMK_TARGET static void FMK_FN(i8_q8)(fmk_job *j, int64_t a, int64_t b) { FMK_FN(i8rows)(j, a, b, 8); }

FMK_TARGET static void FMK_FN(i8_rows)(void *ctx, int64_t r0, int64_t r1) {
    fmk_job *job = ctx;
    switch (job->m[0]->bits) {
    case 2: FMK_FN(i8_q2)(job, r0, r1); break;
    case 4: FMK_FN(i8_q4)(job, r0, r1); break;
    default: FMK_FN(i8_q8)(job, r0, r1);
    }
}

const fmk_kernels fmk_kernels_vnni = {I8_L, 2, FMK_FN(i8_rows), prepare};
#endif
