/* Shared by modelcore's C kernels (int4_cpu.c: the matmuls; decode_cpu.c: the fused decode step), compiled
 * together into one library by modelcore/cpu_int4.py. */
#ifndef MODELCORE_KERNELS_H
#define MODELCORE_KERNELS_H

#define _GNU_SOURCE
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#define ROWS 16
#define CHUNK 32
#define CHUNK_BYTES 256

#define ROWS 16         /* output rows per int4 block */
#define CHUNK 32        /* columns per activation-quantization chunk */
#define CHUNK_BYTES 256 /* one block's codes for one chunk */

/* A barrier that spins for ~50 us (pause) before it sleeps on a futex. libgomp's own barriers sleep almost at once
 * whenever it manages more threads than there are CPUs (e.g. a server's worker thread after the main thread loaded
 * the model), and a wake-up per barrier made a 2-thread decode step three times slower; a barrier that only spins
 * is worse when another process holds the other core (the partner is descheduled: a hundred times slower). */
typedef struct {
    _Atomic int count;
    _Atomic int gen;
    _Atomic int sleepers;
    int n;
    _Atomic int64_t next; /* work counter of the phase between two barriers (mc_claim); reset by thread 0 */
} spin_barrier;

/* Dynamic sharing of n items between the team: each call takes the next `step` items, [*lo, *hi), and returns 0 once
 * none are left. A thread that runs slower (its core shared, its memory farther) takes fewer, where a static split
 * made the other wait at the next barrier. The counter must have been reset (mc_claim_reset by one thread) before a
 * barrier that precedes the first claim. */
static inline int mc_claim(spin_barrier *b, int64_t n, int64_t step, int64_t *lo, int64_t *hi) {
    const int64_t i = atomic_fetch_add_explicit(&b->next, step, memory_order_relaxed);
    if (i >= n) return 0;
    *lo = i;
    *hi = i + step < n ? i + step : n;
    return 1;
}
static inline void mc_claim_reset(spin_barrier *b) { atomic_store_explicit(&b->next, 0, memory_order_relaxed); }

void mc_barrier_wait(spin_barrier *b);

/* [lo, hi) of n items for thread t of nt (static, contiguous). */
static inline void mc_split_range(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    const int64_t q = n / nt, r = n % nt;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

int mc_int4_shape_ok(int64_t M, int64_t K, int64_t N, int64_t group);

/* The int4 matmul y (M, N) = x (M, K) @ W^T as work for thread t of a team of nt (see int4_cpu.c). */
void mc_int4_team(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                  int64_t group, float *y, int8_t *xq, float *dbuf, int t, int nt, spin_barrier *bar);
int mc_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                   int64_t group, float *y, int nthreads);

#endif
