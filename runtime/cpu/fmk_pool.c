/* A small persistent pthread pool for fmk_parallel_for.
 *
 * Workers are started on first need (up to threads - 1 of them; the caller runs part 0) and
 * sleep on a condition variable between jobs. One job runs at a time (job_lock), so calls from
 * several Python threads are serialised rather than oversubscribing the cores. After fork() the
 * child has no workers: the pool notices the new pid and starts over.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <unistd.h>

#include "fmk_internal.h"

typedef struct fmk_pool {
    pthread_mutex_t job_lock; /* held by the thread submitting a job, for the whole job */
    pthread_mutex_t mu;       /* guards the fields below */
    pthread_cond_t start, done;
    pid_t pid;                /* process that owns the workers */
    int nworkers;
    uint64_t generation;      /* incremented per job; workers run each generation once */
    int parts, pending;       /* parts of the current job; parts not finished yet */
    fmk_range_fn fn;
    void *ctx;
    int64_t n, grain;
    uint64_t born[FMK_MAX_THREADS]; /* generation when worker w was started: it joins later ones */
} fmk_pool;

static fmk_pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                        PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, {0}};

/* Part p of `parts`: a contiguous range of [0, n) whose start is a multiple of grain. */
static void part_range(int64_t n, int64_t grain, int parts, int p, int64_t *r0, int64_t *r1) {
    const int64_t units = (n + grain - 1) / grain; /* whole grains, the last maybe short */
    const int64_t u0 = units * p / parts, u1 = units * (p + 1) / parts;
    *r0 = u0 * grain < n ? u0 * grain : n;
    *r1 = u1 * grain < n ? u1 * grain : n;
}

static void *worker_main(void *arg) {
    const int part = (int)(intptr_t)arg; /* worker w runs part w + 1 */
    pthread_mutex_lock(&pool.mu);
    uint64_t seen = pool.born[part - 1]; /* not pool.generation: the job that started us counts */
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = pool.generation;
        if (part >= pool.parts) continue;
        const fmk_range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int64_t r0, r1;
        part_range(pool.n, pool.grain, pool.parts, part, &r0, &r1);
        pthread_mutex_unlock(&pool.mu);
        if (r0 < r1) fn(ctx, r0, r1);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* Called with pool.mu held: make sure `want` workers exist in this process. */
static int ensure_workers(int want) {
    if (pool.pid != getpid()) { /* first use, or a forked child: the old workers are gone */
        pool.pid = getpid();
        pool.nworkers = 0;
    }
    while (pool.nworkers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pool.born[pool.nworkers] = pool.generation;
        if (pthread_attr_init(&attr)) return FMK_ETHREAD;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(pool.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc) return FMK_ETHREAD;
        pool.nworkers++;
    }
    return FMK_OK;
}

int fmk_parallel_for(int threads, int64_t n, int64_t grain, fmk_range_fn fn, void *ctx) {
    if (threads < 1 || threads > FMK_MAX_THREADS || grain < 1 || n < 0) return FMK_EINVAL;
    const int64_t units = (n + grain - 1) / grain;
    const int parts = units < threads ? (int)units : threads;
    if (parts <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return FMK_OK;
    }
    if (pool.pid && pool.pid != getpid()) { /* forked child: locks may be held by threads gone */
        pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
        pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
        pool.job_lock = pool.mu = fresh;
        pool.start = pool.done = fresh_cond;
    }
    pthread_mutex_lock(&pool.job_lock);
    pthread_mutex_lock(&pool.mu);
    const int rc = ensure_workers(parts - 1);
    if (rc) {
        pthread_mutex_unlock(&pool.mu);
        pthread_mutex_unlock(&pool.job_lock);
        return rc;
    }
    pool.fn = fn, pool.ctx = ctx, pool.n = n, pool.grain = grain;
    pool.parts = parts, pool.pending = parts - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);

    int64_t r0, r1;
    part_range(n, grain, parts, 0, &r0, &r1);
    if (r0 < r1) fn(ctx, r0, r1);

    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.job_lock);
    return FMK_OK;
}
