/* The matrix kernels, written once over a small vector vocabulary and instantiated per ISA by
 * kern_scalar.c, kern_avx2.c and kern_avx512.c. Each includes this file after defining:
 *
 *   FMK_L                  lanes per vector
 *   FMK_NT, FMK_DR         tokens per register tile (<= 4); rows per batched tile (<= 4)
 *   FMK_BATCH_T            from this many tokens on, quantized rows are dequantized once and
 *                          shared by all tokens (dtile) instead of the FMA form (qtile)
 *   FMK_CHUNK              activations per batched chunk (a multiple of 32 * FMK_L)
 *   FMK_TARGET             function attribute selecting the ISA (empty for scalar)
 *   FMK_FN(name)           the ISA-prefixed name, FMK_KERNELS the table's name (if any)
 *   V, VI, VX              float vector, 32-bit word vector, lane permutation
 *   v_zero() v_set1(f) v_load(p) v_store(p, v) v_add v_mul v_fma(a, b, c) = a*b + c  v_hsum(v)  vi_load(p)
 *   v_q(w, BITS, k)        value k of each lane's word: q = (w >> BITS*k) & (2^BITS - 1) as a float,
 *                          or, with FMK_QMAGIC, the float 1 + q / 2^BITS (q pasted into the
 *                          mantissa of 1.0: two integer ops instead of three, no conversion);
 *                          scales and biases are then rewritten so that value = f * s' + b' is
 *                          still q * s + b: s' = 2^BITS s, b' = b - 2^BITS s
 *   vx_groups(wpg)         permutation l -> l / wpg (l -> 0 when wpg >= L)   v_perm(v, idx)
 *   v_load_f16(p) v_load_bf16(p)   L 16-bit floats -> V
 *
 * Quantized rows use the FMA form per group, in float32: with the activations in block order
 * (fmk_internal.h), lane l of part = sum_k q[word l, k] * x[...] is one word's dot product; a
 * word lies in one group, so tot += scale[group of lane] * part, and the bias term
 * bias[group of lane] * (sum of the word's activations) likewise; a block's lanes take their
 * group's scale and bias by one permutation (vector paths need words per group to be a power of
 * two: fmk_api.c checks). Each unpacked block serves FMK_NT tokens and each activation load 2
 * rows (gate and up share it when fused).
 */
#include <math.h>
#include <stdlib.h>

#include "fmk_internal.h"

#define FMK_INLINE static inline __attribute__((always_inline)) FMK_TARGET
#ifndef FMK_PREFETCH
#define FMK_PREFETCH 4096 /* bytes ahead in a row's words: measured 1.45x on a q4 expert from DRAM (1 KiB: none) */
#endif

typedef struct {
    const uint32_t *w;  /* the row's words */
    const float *s, *b; /* its scales and biases in float32, zero padded by FMK_L */
} FMK_FN(qrow);

/* The first group of the block starting at word j (wpg = 1 << wsh words per group). */
static inline int64_t FMK_FN(group_of)(int64_t j, int64_t wpg, int wsh) { return FMK_L == 1 ? j / wpg : j >> wsh; }

/* dst[0..n) = src[0..n) as float32 (scales, biases, float weight tails). */
FMK_INLINE void FMK_FN(to_f32)(float *dst, const void *src, int dtype, int64_t n) {
    int64_t i = 0;
    if (dtype == FMK_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    for (; i + FMK_L <= n; i += FMK_L) {
        const uint16_t *p = (const uint16_t *)src + i;
        v_store(dst + i, dtype == FMK_BF16 ? v_load_bf16(p) : v_load_f16(p));
    }
    for (; i < n; i++) dst[i] = fmk_load_f32(src, dtype, i);
}

/* One block of FMK_L words (w[i] already loaded) for NR rows x NT tokens. */
FMK_INLINE void FMK_FN(qblock)(const VI *w, const FMK_FN(qrow) *rw, const int NR, const float *xb,
                               int64_t xstride, const float *xw, int64_t wstride, const int NT, const int BITS,
                               int64_t g0, VX gidx, V tot[2][4]) {
    const int P = 32 / BITS;
    /* C independent chains per (row, token): a single chain of P dependent FMAs per block would
     * be latency-bound; 2 rows x NT tokens x C = 8 chains keep two FMA pipes busy. */
    const int C = NT == 1 ? 4 : NT == 2 ? 2 : 1;
    V part[2][4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++)
            for (int c = 0; c < C; c++) part[i][t][c] = v_zero();
    for (int k = 0; k < P; k++) {
        V q[2];
        for (int i = 0; i < NR; i++) q[i] = v_q(w[i], BITS, k);
        for (int t = 0; t < NT; t++) {
            const V xv = v_load(xb + t * xstride + k * FMK_L);
            for (int i = 0; i < NR; i++) part[i][t][k % C] = v_fma(q[i], xv, part[i][t][k % C]);
        }
    }
    for (int i = 0; i < NR; i++) {
        const V s = v_perm(v_load(rw[i].s + g0), gidx), b = v_perm(v_load(rw[i].b + g0), gidx); /* per lane */
        for (int t = 0; t < NT; t++) {
            V sum = part[i][t][0];
            for (int c = 1; c < C; c++) sum = v_add(sum, part[i][t][c]);
            tot[i][t] = v_fma(b, v_load(xw + t * wstride), v_fma(s, sum, tot[i][t]));
        }
    }
}

/* out[i][t] = row i . token t for NR quantized rows and NT tokens. */
FMK_INLINE void FMK_FN(qtile)(const FMK_FN(qrow) *rw, const int NR, const float *xp, const float *xw,
                              int64_t xstride, const int NT, const int BITS, int64_t nwords, int64_t wpg,
                              float out[4][4]) {
    const int P = 32 / BITS, wsh = __builtin_ctzll((unsigned long long)wpg);
    const VX gidx = vx_groups(wpg);
    const int64_t wstride = xstride / P, nfull = nwords / FMK_L, tail = nwords % FMK_L;
    V tot[2][4];
    VI w[2];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) tot[i][t] = v_zero();
    for (int64_t j = 0; j < nfull * FMK_L; j += FMK_L) { /* j: first word of the block */
        for (int i = 0; i < NR; i++) {
            __builtin_prefetch(rw[i].w + j + FMK_PREFETCH / 4); /* words stream from DRAM */
            w[i] = vi_load(rw[i].w + j);
        }
        FMK_FN(qblock)(w, rw, NR, xp + j * P, xstride, xw + j, wstride, NT, BITS, FMK_FN(group_of)(j, wpg, wsh), gidx,
                       tot);
    }
    if (tail) { /* the last, partial block: zero words beyond the row (their x lanes are zero too) */
        const int64_t j = nfull * FMK_L;
        for (int i = 0; i < NR; i++) {
            uint32_t tmp[FMK_L] = {0};
            memcpy(tmp, rw[i].w + j, (size_t)tail * sizeof(uint32_t));
            w[i] = vi_load(tmp);
        }
        FMK_FN(qblock)(w, rw, NR, xp + j * P, xstride, xw + j, wstride, NT, BITS, FMK_FN(group_of)(j, wpg, wsh), gidx,
                       tot);
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) out[i][t] = v_hsum(tot[i][t]);
}

/* Dequantizes word blocks [b0, b1) of a row into dst (block order): value = q * scale + bias. */
FMK_INLINE void FMK_FN(dequant)(const FMK_FN(qrow) *rw, const int BITS, int64_t b0, int64_t b1, int64_t nwords,
                                int64_t wpg, float *dst) {
    const int P = 32 / BITS, wsh = __builtin_ctzll((unsigned long long)wpg);
    const VX gidx = vx_groups(wpg);
    for (int64_t j = b0 * FMK_L; j < b1 * FMK_L; j += FMK_L) {
        VI w;
        if (j + FMK_L <= nwords) {
            __builtin_prefetch(rw->w + j + FMK_PREFETCH / 4);
            w = vi_load(rw->w + j);
        } else { /* partial block: zero words (their activations are zero) */
            uint32_t tmp[FMK_L] = {0};
            memcpy(tmp, rw->w + j, (size_t)(nwords - j) * sizeof(uint32_t));
            w = vi_load(tmp);
        }
        const int64_t g0 = FMK_FN(group_of)(j, wpg, wsh);
        const V s = v_perm(v_load(rw->s + g0), gidx), bias = v_perm(v_load(rw->b + g0), gidx);
        float *out = dst + (j - b0 * FMK_L) * P;
        for (int k = 0; k < P; k++) v_store(out + k * FMK_L, v_fma(v_q(w, BITS, k), s, bias));
    }
}

/* out[i][t] = row i . token t over n floats, for NR rows and NT tokens: the batched kernel, each
 * weight vector loaded once per NT tokens and each activation vector once per NR rows. */
FMK_INLINE void FMK_FN(dtile)(float *const *wr, const int NR, const float *xp, int64_t xstride, const int NT,
                              int64_t n, float out[4][4]) {
    V tot[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) tot[i][t] = v_zero();
    for (int64_t j = 0; j < n; j += FMK_L) {
        V wv[4];
        for (int i = 0; i < NR; i++) wv[i] = v_load(wr[i] + j);
        for (int t = 0; t < NT; t++) {
            const V xv = v_load(xp + t * xstride + j);
            for (int i = 0; i < NR; i++) tot[i][t] = v_fma(wv[i], xv, tot[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) out[i][t] = v_hsum(tot[i][t]);
}

/* Writes results acc[i * accT + t] for tokens t0 .. t0+nt: nr rows from r, or (fused) nr/2 gate
 * rows followed by the nr/2 up rows of the same indices. */
static inline void FMK_FN(store)(const fmk_job *job, int64_t r, int nr, int64_t t0, int64_t nt, const float *acc,
                                 int64_t accT) {
    const int64_t rows = job->m[0]->rows;
    for (int64_t t = 0; t < nt; t++) {
        float *y = job->y + (t0 + t) * rows + r;
        if (job->epilogue == FMK_SILU_MUL) {
            for (int i = 0; i < nr / 2; i++) {
                const float g = acc[i * accT + t], u = acc[(nr / 2 + i) * accT + t];
                y[i] = g / (1.0f + expf(-g)) * u;
            }
        } else {
            for (int i = 0; i < nr; i++) y[i] = acc[i * accT + t];
        }
    }
}

/* Runs TILE(nr, nt) with nr, nt as compile-time constants (so tiles stay in registers). */
#define FMK_CASE(nr, nt, TILE) case (nr) * 8 + (nt): TILE(nr, nt); break;
#define FMK_CASES4(nr, TILE) FMK_CASE(nr, 1, TILE) FMK_CASE(nr, 2, TILE) FMK_CASE(nr, 3, TILE) FMK_CASE(nr, 4, TILE)

/* The rows of one tile, at most `most`: rows r, r+1, ... of m[0], or gate rows r.. then up rows r..
 * when fused. Returns how many; *step: how far r advances. */
static inline int FMK_FN(tile_rows)(const fmk_job *job, int64_t r, int64_t r1, int most, const fmk_matrix **mats,
                                    int64_t *idx, int64_t *step) {
    const int fused = job->epilogue == FMK_SILU_MUL;
    const int64_t left = r1 - r, per = fused ? most / 2 : most;
    const int h = (int)(left < per ? left : per);
    for (int i = 0; i < h; i++) {
        mats[i] = job->m[0], idx[i] = r + i;
        if (fused) mats[h + i] = job->m[1], idx[h + i] = r + i;
    }
    *step = h;
    return fused ? 2 * h : h;
}

/* Quantized row `row` of m: its words, and its scales / biases converted to float32 into
 * tmp [2 * (groups + FMK_L)] (zero beyond the groups: a tail block's extra lanes get 0). */
FMK_INLINE FMK_FN(qrow) FMK_FN(load_row)(const fmk_matrix *m, int64_t row, float *tmp) {
    const int64_t ngroups = m->cols / m->group_size, esz = m->sdtype == FMK_F32 ? 4 : 2;
    float *s = tmp, *b = tmp + ngroups + FMK_L;
    FMK_FN(to_f32)(s, (const char *)m->scales + row * ngroups * esz, m->sdtype, ngroups);
    FMK_FN(to_f32)(b, (const char *)m->biases + row * ngroups * esz, m->sdtype, ngroups);
    if (FMK_QMAGIC) { /* s' = 2^bits s, b' = b - 2^bits s */
        const float span = (float)(1 << m->bits); /* exact: a power of two */
        for (int64_t g = 0; g < ngroups; g += FMK_L) {
            const V sv = v_load(s + g), bv = v_load(b + g), spanv = v_set1(span), neg = v_set1(-span);
            v_store(b + g, v_fma(neg, sv, bv)); /* over-runs into the zero pad only: stays 0 */
            v_store(s + g, v_mul(spanv, sv));
        }
    }
    return (FMK_FN(qrow)){(const uint32_t *)m->weight + row * (m->cols * m->bits / 32), s, b};
}

/* Quantized rows [r0, r1) for T < FMK_BATCH_T (decode): the FMA form straight from the words,
 * two rows (or gate and up) and up to FMK_NT tokens per register tile. */
FMK_INLINE void FMK_FN(qrows)(fmk_job *job, int64_t r0, int64_t r1, const int BITS) {
    const fmk_matrix *m0 = job->m[0];
    const int P = 32 / BITS;
    const int64_t nwords = m0->cols / P, wstride = job->xstride / P, wpg = m0->group_size / P;
    const int64_t pad = m0->cols / m0->group_size + FMK_L;
    float *conv = fmk_zalloc(4 * pad); /* scales, biases of two rows */
    if (!conv) {
        fmk_job_fail(job, FMK_ENOMEM);
        return;
    }
    for (int64_t r = r0, step; r < r1; r += step) {
        const fmk_matrix *mats[4];
        int64_t idx[4];
        const int nr = FMK_FN(tile_rows)(job, r, r1, 2, mats, idx, &step);
        FMK_FN(qrow) rw[2];
        for (int i = 0; i < nr; i++) rw[i] = FMK_FN(load_row)(mats[i], idx[i], conv + 2 * i * pad);
        for (int64_t t0 = 0; t0 < job->T; t0 += FMK_NT) {
            const int nt = job->T - t0 < FMK_NT ? (int)(job->T - t0) : FMK_NT;
            const float *xp = job->xp + t0 * job->xstride, *xw = job->xsum + t0 * wstride;
            float out[4][4];
#define FMK_QT(NR_, NT_) FMK_FN(qtile)(rw, NR_, xp, xw, job->xstride, NT_, BITS, nwords, wpg, out)
            switch (nr * 8 + nt) { FMK_CASES4(1, FMK_QT) FMK_CASES4(2, FMK_QT) }
#undef FMK_QT
            FMK_FN(store)(job, r, nr, t0, nt, &out[0][0], 4);
        }
    }
    free(conv);
}

/* Batched rows [r0, r1) (quantized with T >= FMK_BATCH_T, or float weights BITS = 16): per tile
 * of FMK_DR rows and chunk of FMK_CHUNK activations, the rows' chunk is made float32 once
 * (dequantized or converted, into L1-sized scratch) and used by every token tile (dtile). */
FMK_INLINE void FMK_FN(brows)(fmk_job *job, int64_t r0, int64_t r1, const int BITS, const int WDT) {
    const fmk_matrix *m0 = job->m[0];
    const int64_t P = BITS == 16 ? 1 : 32 / BITS, T = job->T, xs = job->xstride, cols = m0->cols;
    const int64_t ch = xs < FMK_CHUNK ? xs : FMK_CHUNK; /* a multiple of P * FMK_L, like xs */
    const int64_t nwords = cols / P, wpg = BITS == 16 ? 1 : m0->group_size / P;
    const int64_t pad = BITS == 16 ? 0 : cols / m0->group_size + FMK_L, lsize = 8 * pad; /* load_row x 4 */
    float *scratch = fmk_zalloc(lsize + 4 * ch + 4 * T);
    if (!scratch) {
        fmk_job_fail(job, FMK_ENOMEM);
        return;
    }
    float *acc = scratch + lsize + 4 * ch; /* [nr, T] partial sums */
    float *dq[4] = {scratch + lsize, scratch + lsize + ch, scratch + lsize + 2 * ch, scratch + lsize + 3 * ch};
    for (int64_t r = r0, step; r < r1; r += step) {
        const fmk_matrix *mats[4];
        int64_t idx[4];
        const int nr = FMK_FN(tile_rows)(job, r, r1, FMK_DR, mats, idx, &step);
        FMK_FN(qrow) rw[4];
        if (BITS != 16)
            for (int i = 0; i < nr; i++) rw[i] = FMK_FN(load_row)(mats[i], idx[i], scratch + 2 * i * pad);
        memset(acc, 0, (size_t)(nr * T) * sizeof(float));
        for (int64_t j0 = 0; j0 < xs; j0 += ch) {
            const int64_t n = xs - j0 < ch ? xs - j0 : ch;
            for (int i = 0; i < nr; i++) {
                if (BITS != 16) {
                    FMK_FN(dequant)(&rw[i], BITS, j0 / (P * FMK_L), (j0 + n) / (P * FMK_L), nwords, wpg, dq[i]);
                } else { /* beyond cols, dq stays zero (never written) */
                    const char *w = (const char *)mats[i]->weight + (idx[i] * cols + j0) * (WDT == FMK_F32 ? 4 : 2);
                    FMK_FN(to_f32)(dq[i], w, WDT, cols - j0 < n ? cols - j0 : n);
                }
            }
            for (int64_t t0 = 0; t0 < T; t0 += FMK_NT) {
                const int nt = T - t0 < FMK_NT ? (int)(T - t0) : FMK_NT;
                float out[4][4];
#define FMK_DT(NR_, NT_) FMK_FN(dtile)(dq, NR_, job->xp + t0 * xs + j0, xs, NT_, n, out)
                switch (nr * 8 + nt) { FMK_CASES4(1, FMK_DT) FMK_CASES4(2, FMK_DT) FMK_CASES4(3, FMK_DT)
                                       FMK_CASES4(4, FMK_DT) }
#undef FMK_DT
                for (int i = 0; i < nr; i++)
                    for (int t = 0; t < nt; t++) acc[i * T + t0 + t] += out[i][t];
            }
        }
        FMK_FN(store)(job, r, nr, 0, T, acc, T);
    }
    free(scratch);
}

/* One specialisation per bit width / weight dtype, so shifts and masks are constants. */
#define FMK_ROWS(name, BITS, WDT)                                                               \
    FMK_TARGET static void FMK_FN(name)(fmk_job *j, int64_t a, int64_t b) {                     \
        if (BITS != 16 && j->T < FMK_BATCH_T) FMK_FN(qrows)(j, a, b, BITS == 16 ? 4 : BITS);    \
        else FMK_FN(brows)(j, a, b, BITS, WDT);                                                 \
    }
FMK_ROWS(rows_q2, 2, FMK_F32)
FMK_ROWS(rows_q4, 4, FMK_F32)
FMK_ROWS(rows_q8, 8, FMK_F32)
FMK_ROWS(rows_f32, 16, FMK_F32)
FMK_ROWS(rows_f16, 16, FMK_F16)
FMK_ROWS(rows_bf16, 16, FMK_BF16)

FMK_TARGET static void FMK_FN(rows)(void *ctx, int64_t r0, int64_t r1) {
    fmk_job *job = ctx;
    const fmk_matrix *m = job->m[0];
    switch (m->bits) {
    case 2: FMK_FN(rows_q2)(job, r0, r1); break;
    case 4: FMK_FN(rows_q4)(job, r0, r1); break;
    case 8: FMK_FN(rows_q8)(job, r0, r1); break;
    default:
        if (m->wdtype == FMK_BF16) FMK_FN(rows_bf16)(job, r0, r1);
        else if (m->wdtype == FMK_F16) FMK_FN(rows_f16)(job, r0, r1);
        else FMK_FN(rows_f32)(job, r0, r1);
    }
}

#ifdef FMK_KERNELS /* kern_vnni.c takes only the helpers */
const fmk_kernels FMK_KERNELS = {FMK_L, FMK_DR, FMK_FN(rows), NULL};
#endif
