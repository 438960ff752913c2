/* The public entry points: argument checks, activation preparation, the expert forward built
 * from matrix jobs, and a memory-read probe. The arithmetic lives in kern_simd.h. */
#include <math.h>
#include <stdlib.h>

#include "fmk_internal.h"

static int check_matrix(const fmk_matrix *m) {
    if (!m || !m->weight || m->rows < 1 || m->cols < 1 || m->rows > (1LL << 40) || m->cols > (1LL << 40))
        return FMK_EINVAL;
    if (m->bits == 16) return (m->wdtype == FMK_F32 || m->wdtype == FMK_F16 || m->wdtype == FMK_BF16) ? FMK_OK
                                                                                                       : FMK_EINVAL;
    if (m->bits != 2 && m->bits != 4 && m->bits != 8) return FMK_EINVAL;
    if (!m->scales || !m->biases || m->group_size < 1) return FMK_EINVAL;
    if (m->sdtype != FMK_F32 && m->sdtype != FMK_F16 && m->sdtype != FMK_BF16) return FMK_EINVAL;
    /* a group is whole words (SPEC.md), and whole groups make a row */
    if (m->group_size % (32 / m->bits) || m->cols % m->group_size) return FMK_EINVAL;
    return FMK_OK;
}

static int check_call(const fmk_matrix *m, const float *x, int64_t T, const float *y, int threads) {
    const int rc = check_matrix(m);
    if (rc) return rc;
    if (!x || !y || T < 0 || T > (1LL << 40) || threads < 1 || threads > FMK_MAX_THREADS) return FMK_EINVAL;
    return FMK_OK;
}

static const fmk_kernels *isa_kernels(int isa) {
#ifdef FMK_X86
    if (isa == FMK_ISA_AVX512) return &fmk_kernels_avx512;
    if (isa == FMK_ISA_AVX2) return &fmk_kernels_avx2;
#endif
    (void)isa;
    return &fmk_kernels_scalar;
}

/* The kernels for m under the active ISA. A vector path finds each lane's group by a fixed
 * permutation and a shift: words per group must be a power of two (any power-of-two group
 * size); other group sizes take the portable path. */
static const fmk_kernels *kernels_for(const fmk_matrix *m, int isa, int64_t T) {
    const fmk_kernels *k = isa_kernels(isa);
    if (m->bits != 16) {
        const int64_t wpg = m->group_size / (32 / m->bits);
        if (wpg & (wpg - 1)) return &fmk_kernels_scalar;
#ifdef FMK_X86
        if (isa == FMK_ISA_AVX512 && T <= FMK_INT8_MAX_T && fmk_dot_active() == FMK_DOT_INT8)
            return &fmk_kernels_vnni;
#endif
    }
    (void)T;
    return k;
}

/* Activations x [T, cols] in the block order of fmk_internal.h, zero padded, and for quantized
 * weights the sum of each word's activations [T, xstride / P] in the same order (the bias term). */
static int prepare_x(fmk_job *job, const fmk_kernels *k, const float *x, void **bufs) {
    const fmk_matrix *m = job->m[0];
    const int64_t cols = m->cols, L = k->lanes, T = job->T;
    const int64_t P = m->bits == 16 ? 1 : 32 / m->bits, nwords = cols / P;
    const int64_t stride = fmk_xstride(cols, m->bits, k->lanes), wstride = stride / P;
    float *xp = fmk_zalloc(T * stride);
    float *xw = fmk_zalloc(m->bits == 16 ? 1 : T * wstride);
    bufs[0] = xp, bufs[1] = xw;
    if (!xp || !xw) return FMK_ENOMEM;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * cols;
        float *dst = xp + t * stride;
        if (m->bits == 16) {
            memcpy(dst, xt, (size_t)cols * sizeof(float));
            continue;
        }
        for (int64_t wi = 0; wi < nwords; wi++) {
            float *blk = dst + (wi / L) * P * L + wi % L;
            double sum = 0.0;
            for (int64_t kk = 0; kk < P; kk++) blk[kk * L] = xt[wi * P + kk], sum += xt[wi * P + kk];
            xw[t * wstride + wi] = (float)sum; /* block order is word order here */
        }
    }
    job->xp = xp, job->xsum = xw, job->xstride = stride;
    return FMK_OK;
}

/* Runs job (its m, epilogue, T, y set) over x with kernels k on `threads` threads. */
static int run_job(fmk_job *job, const fmk_kernels *k, const float *x, int threads) {
    void *bufs[3] = {NULL, NULL, NULL};
    int rc = k->prepare ? k->prepare(job, x, bufs) : prepare_x(job, k, x, bufs);
    if (!rc) {
        job->status = FMK_OK;
        rc = fmk_parallel_for(threads, job->m[0]->rows, k->tile_rows, k->rows, job);
        if (!rc) rc = job->status;
    }
    for (int i = 0; i < 3; i++) free(bufs[i]);
    return rc;
}

static int matmul(const fmk_matrix *w, const float *x, int64_t T, float *y, int threads, int isa) {
    fmk_job job = {.m = {w, NULL}, .epilogue = FMK_STORE, .T = T, .y = y};
    return run_job(&job, kernels_for(w, isa, T), x, threads);
}

int fmk_matmul(const fmk_matrix *w, const float *x, int64_t T, float *y, int threads) {
    const int rc = check_call(w, x, T, y, threads);
    if (rc || T == 0) return rc;
    return matmul(w, x, T, y, threads, fmk_isa_active());
}

static int same_layout(const fmk_matrix *a, const fmk_matrix *b) {
    if (a->rows != b->rows || a->cols != b->cols || a->bits != b->bits) return 0;
    if (a->bits == 16) return a->wdtype == b->wdtype;
    return a->group_size == b->group_size && a->sdtype == b->sdtype;
}

int fmk_expert_forward(const fmk_matrix *gate, const fmk_matrix *up, const fmk_matrix *down, const float *x,
                       int64_t T, float *y, int threads) {
    int rc = check_call(gate, x, T, y, threads);
    if (!rc) rc = check_matrix(up);
    if (!rc) rc = check_matrix(down);
    if (rc) return rc;
    const int64_t I = gate->rows, H = gate->cols;
    if (up->rows != I || up->cols != H || down->rows != H || down->cols != I) return FMK_EINVAL;
    if (T == 0) return FMK_OK;
    const int isa = fmk_isa_active();
    float *h = malloc((size_t)(T * I) * sizeof(float)); /* silu(gate x) * up x  [T, I] */
    if (!h) return FMK_ENOMEM;
    if (same_layout(gate, up)) { /* one pass over x for both (the usual case: one record) */
        fmk_job job = {.m = {gate, up}, .epilogue = FMK_SILU_MUL, .T = T, .y = h};
        rc = run_job(&job, kernels_for(gate, isa, T), x, threads);
    } else { /* e.g. per-module bit overrides: two products, then silu(g) * u */
        float *u = malloc((size_t)(T * I) * sizeof(float));
        rc = u ? matmul(gate, x, T, h, threads, isa) : FMK_ENOMEM;
        if (!rc) rc = matmul(up, x, T, u, threads, isa);
        for (int64_t i = 0; !rc && i < T * I; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * u[i];
        free(u);
    }
    if (!rc) rc = matmul(down, h, T, y, threads, isa);
    free(h);
    return rc;
}

typedef struct {
    const uint64_t *p;
    uint64_t sum;
} read_ctx;

static void read_range(void *ctx, int64_t r0, int64_t r1) {
    read_ctx *c = ctx;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0; /* independent sums: the compiler vectorises this */
    for (int64_t i = r0; i < r1; i += 4) {
        s0 += c->p[i], s1 += c->p[i + 1], s2 += c->p[i + 2], s3 += c->p[i + 3];
    }
    __atomic_fetch_add(&c->sum, s0 + s1 + s2 + s3, __ATOMIC_RELAXED);
}

int fmk_read_bytes(const void *p, int64_t nbytes, int threads, uint64_t *checksum) {
    if (!p || !checksum || nbytes < 0 || nbytes % 32 || threads < 1 || threads > FMK_MAX_THREADS)
        return FMK_EINVAL;
    read_ctx c = {p, 0};
    const int rc = fmk_parallel_for(threads, nbytes / 8, 1 << 14, read_range, &c); /* 128 KiB grains */
    *checksum = c.sum;
    return rc;
}
