/* Our own CPU kernel for group-wise asymmetric int4 weights: y (M, N) = x (M, K) @ W^T.
 *
 * The method is llama.cpp's Q4_1 x Q8_1 dot product, written here for our layout: the activations are
 * quantized on the fly to int8 per chunk of 32 columns (scale d = max|x| / 127, and the exact float sum of
 * the chunk), then the unsigned 4-bit codes are multiplied with the int8 activations by integer dot-product
 * instructions (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd), and the float scales are applied once
 * per chunk and group:
 *     w[n, k] = (code[n, k] - 8) * s[n, g] + zero[n, g]          (zero = min + 8 * s, as torch's int4 kernels store it)
 *     y[m, n] = sum_g  s[n, g] * sum_{c in g} d[m, c] * (isum[m, n, c] - 8 * qsum[m, c]) + zero[n, g] * xs[m, g]
 * where isum = sum of code * xq over the chunk, qsum = sum of xq (so the activation rounding error is multiplied
 * by code - 8, not by code: half the error of subtracting 8 * the exact sum), xs = exact float sum of x.
 *
 * Layout (built by modelcore/cpu_int4.py): rows in blocks of 16; for each block, for each chunk of 32 columns,
 * 256 bytes = 4 vectors of 64 bytes; byte 4 * r + j of vector v holds row r's code of column 8v + j in its low
 * nibble and of column 8v + 4 + j in its high nibble. Scales: for each block, for each group, 16 bf16 scales
 * then 16 bf16 zeros. A block's data is contiguous, so one thread streams it once for all M rows of x.
 *
 * Plain C with a C ABI (called through ctypes, no Python or torch headers), so it compiles in about a second;
 * OpenMP for the threads (torch's own libgomp, already loaded by the time this library is).
 */
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
#define MT 8 /* rows of x per pass over a block's weights */
#define PANEL 64 /* rows of x per sweep over the weights */

const char *mc_int4_isa(void) {
#if defined(MC_EXACT)
    return "exact";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512vnni";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* x (M, K) float32 -> xq (M, K) int8, d (M, K/32) scales, xs (M, K/32) exact sums, qs (M, K/32) 8 * d * sum(xq). */
static void quantize_act(const float *x, int64_t M, int64_t K, int8_t *xq, float *d, float *xs, float *qs) {
    const int64_t C = K / CHUNK;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < C; ++c) {
            const float *p = x + m * K + c * CHUNK;
            float amax = 0.f, sum = 0.f;
            for (int j = 0; j < CHUNK; ++j) {
                float a = fabsf(p[j]);
                amax = a > amax ? a : amax;
                sum += p[j];
            }
            const float scale = amax / 127.f;
            const float inv = scale > 0.f ? 1.f / scale : 0.f;
            int8_t *q = xq + m * K + c * CHUNK;
            int32_t qsum = 0;
            for (int j = 0; j < CHUNK; ++j) {
                q[j] = (int8_t)lrintf(p[j] * inv);
                qsum += q[j];
            }
            d[m * C + c] = scale;
            xs[m * C + c] = sum;
            qs[m * C + c] = 8.f * scale * (float)qsum;
        }
    }
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One block of 16 rows for `mt` (1..MT) rows of x. */
static inline __attribute__((always_inline)) void block_rows(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *d, const float *xs,
                       const float *qs, int64_t K, int64_t G, int cpg, int mt, float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MT];
    for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512 gacc[MT];
        float xsg[MT], qsg[MT];
        for (int m = 0; m < mt; ++m) { gacc[m] = _mm512_setzero_ps(); xsg[m] = qsg[m] = 0.f; }
        for (int cc = 0; cc < cpg; ++cc) {
            const int64_t c = g * cpg + cc;
            const uint8_t *w = codes + c * CHUNK_BYTES;
            /* the stream runs ahead of the hardware prefetcher when several rows of x make each chunk slow */
            _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 192), _MM_HINT_T0);
            __m512i iacc[MT];
            for (int m = 0; m < mt; ++m) iacc[m] = _mm512_setzero_si512();
            for (int v = 0; v < 4; ++v) {
                const __m512i raw = _mm512_loadu_si512((const void *)(w + 64 * v));
                const __m512i lo = _mm512_and_si512(raw, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                for (int m = 0; m < mt; ++m) {
                    const int8_t *xr = xq + m * K + c * CHUNK + 8 * v;
                    int32_t q0, q1;
                    memcpy(&q0, xr, 4);
                    memcpy(&q1, xr + 4, 4);
                    iacc[m] = _mm512_dpbusd_epi32(iacc[m], lo, _mm512_set1_epi32(q0));
                    iacc[m] = _mm512_dpbusd_epi32(iacc[m], hi, _mm512_set1_epi32(q1));
                }
            }
            for (int m = 0; m < mt; ++m) {
                gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_set1_ps(d[m * C + c]), gacc[m]);
                xsg[m] += xs[m * C + c];
                qsg[m] += qs[m * C + c];
            }
        }
        const __m512 s = load_bf16x16(sz + g * 2 * ROWS);
        const __m512 z = load_bf16x16(sz + g * 2 * ROWS + ROWS);
        for (int m = 0; m < mt; ++m) {
            const __m512 t = _mm512_sub_ps(gacc[m], _mm512_set1_ps(qsg[m]));
            acc[m] = _mm512_fmadd_ps(s, t, acc[m]);
            acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsg[m]), acc[m]);
        }
    }
    for (int m = 0; m < mt; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((always_inline)) void block_rows(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *d, const float *xs,
                       const float *qs, int64_t K, int64_t G, int cpg, int mt, float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MT][2];
    for (int m = 0; m < mt; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 gacc[MT][2];
        float xsg[MT], qsg[MT];
        for (int m = 0; m < mt; ++m) { gacc[m][0] = gacc[m][1] = _mm256_setzero_ps(); xsg[m] = qsg[m] = 0.f; }
        for (int cc = 0; cc < cpg; ++cc) {
            const int64_t c = g * cpg + cc;
            const uint8_t *w = codes + c * CHUNK_BYTES;
            __m256i iacc[MT][2];
            for (int m = 0; m < mt; ++m) iacc[m][0] = iacc[m][1] = _mm256_setzero_si256();
            for (int v = 0; v < 4; ++v) {
                for (int h = 0; h < 2; ++h) { /* rows 0-7, then 8-15 */
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 64 * v + 32 * h));
                    const __m256i lo = _mm256_and_si256(raw, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                    for (int m = 0; m < mt; ++m) {
                        const int8_t *xr = xq + m * K + c * CHUNK + 8 * v;
                        int32_t q0, q1;
                        memcpy(&q0, xr, 4);
                        memcpy(&q1, xr + 4, 4);
                        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(q0)), ones);
                        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(q1)), ones);
                        iacc[m][h] = _mm256_add_epi32(iacc[m][h], _mm256_add_epi32(p0, p1));
                    }
                }
            }
            for (int m = 0; m < mt; ++m) {
                const __m256 dm = _mm256_set1_ps(d[m * C + c]);
                gacc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][0]), dm, gacc[m][0]);
                gacc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][1]), dm, gacc[m][1]);
                xsg[m] += xs[m * C + c];
                qsg[m] += qs[m * C + c];
            }
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 s = load_bf16x8(sz + g * 2 * ROWS + 8 * h);
            const __m256 z = load_bf16x8(sz + g * 2 * ROWS + ROWS + 8 * h);
            for (int m = 0; m < mt; ++m) {
                const __m256 t = _mm256_sub_ps(gacc[m][h], _mm256_set1_ps(qsg[m]));
                acc[m][h] = _mm256_fmadd_ps(s, t, acc[m][h]);
                acc[m][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(xsg[m]), acc[m][h]);
            }
        }
    }
    for (int m = 0; m < mt; ++m) {
        _mm256_storeu_ps(y + m * ldy, acc[m][0]);
        _mm256_storeu_ps(y + m * ldy + 8, acc[m][1]);
    }
}

#else
static inline __attribute__((always_inline)) void block_rows(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *d, const float *xs,
                       const float *qs, int64_t K, int64_t G, int cpg, int mt, float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    for (int m = 0; m < mt; ++m) {
        float acc[ROWS] = {0};
        for (int64_t g = 0; g < G; ++g) {
            float gacc[ROWS] = {0}, xsg = 0.f, qsg = 0.f;
            for (int cc = 0; cc < cpg; ++cc) {
                const int64_t c = g * cpg + cc;
                const uint8_t *w = codes + c * CHUNK_BYTES;
                int32_t isum[ROWS] = {0};
                for (int v = 0; v < 4; ++v)
                    for (int r = 0; r < ROWS; ++r)
                        for (int j = 0; j < 4; ++j) {
                            const uint8_t b = w[64 * v + 4 * r + j];
                            const int8_t *xr = xq + m * K + c * CHUNK + 8 * v;
                            isum[r] += (b & 15) * xr[j] + (b >> 4) * xr[4 + j];
                        }
                for (int r = 0; r < ROWS; ++r) gacc[r] += (float)isum[r] * d[m * C + c];
                xsg += xs[m * C + c];
                qsg += qs[m * C + c];
            }
            for (int r = 0; r < ROWS; ++r) {
                const float s = bf16_to_f32(sz[g * 2 * ROWS + r]), z = bf16_to_f32(sz[g * 2 * ROWS + ROWS + r]);
                acc[r] += s * (gacc[r] - qsg) + z * xsg;
            }
        }
        for (int r = 0; r < ROWS; ++r) y[m * ldy + r] = acc[r];
    }
}
#endif

static int int4_shape_ok(int64_t M, int64_t K, int64_t N, int64_t group) {
    return M > 0 && K > 0 && N > 0 && K % CHUNK == 0 && group % CHUNK == 0 && K % group == 0 && N % ROWS == 0;
}

/* A barrier that spins for ~50 us (pause) before it sleeps on a futex. libgomp's own barriers sleep almost at once
 * whenever it manages more threads than there are CPUs (e.g. a server's worker thread after the main thread loaded
 * the model), and a wake-up per barrier made a 2-thread decode step three times slower; a barrier that only spins
 * is worse when another process holds the other core (the partner is descheduled: a hundred times slower). */
typedef struct {
    _Atomic int count;
    _Atomic int gen;
    _Atomic int sleepers;
    int n;
} spin_barrier;

#define BARRIER_SPINS 2000 /* x ~28 ns per pause on the project's CPUs */

static void barrier_wait(spin_barrier *b) {
    if (b->n <= 1) return;
    const int g = atomic_load(&b->gen);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        atomic_fetch_add(&b->gen, 1);
#ifdef __linux__
        if (atomic_load(&b->sleepers)) syscall(SYS_futex, (int *)&b->gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        return;
    }
    for (int spins = 0; spins < BARRIER_SPINS; ++spins) {
        if (atomic_load_explicit(&b->gen, memory_order_acquire) != g) return;
#ifdef __x86_64__
        _mm_pause();
#endif
    }
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->gen) == g) {
#ifdef __linux__
        syscall(SYS_futex, (int *)&b->gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);  /* returns at once if gen moved on */
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&b->sleepers, 1);
}

/* [lo, hi) of n items for thread t of nt (static, contiguous). */
static inline void split_range(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    const int64_t q = n / nt, r = n % nt;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

/* The int4 matmul as work for thread t of a team of nt (a barrier after quantizing x and at the end).
 * xq: M * K bytes, dbuf: 3 * M * K / 32 floats of scratch. */
static void int4_team(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                      int64_t group, float *y, int8_t *xq, float *dbuf, int t, int nt, spin_barrier *bar) {
    const int64_t C = K / CHUNK, G = K / group, nb = N / ROWS;
    const int cpg = (int)(group / CHUNK);
    float *d = dbuf, *xs = dbuf + M * C, *qs = dbuf + 2 * M * C;
    int64_t lo, hi;
#ifdef MC_EXACT
    /* test build: float activations, weights dequantized one by one ((code - 8) * s + zero), no int8 rounding */
    split_range(N, t, nt, &lo, &hi);
    for (int64_t n = lo; n < hi; ++n)
        for (int64_t m = 0; m < M; ++m) {
            const int64_t b = n / ROWS, r = n % ROWS;
            double acc = 0.0;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t c = k / CHUNK, col = k % CHUNK, v = col / 8, hi4 = (col % 8) / 4, j = col % 4;
                const uint8_t byte = codes[b * C * CHUNK_BYTES + c * CHUNK_BYTES + 64 * v + 4 * r + j];
                const int code = hi4 ? byte >> 4 : byte & 15;
                const int64_t g = k / group;
                const float sc = bf16_to_f32(sz[b * G * 2 * ROWS + g * 2 * ROWS + r]);
                const float z = bf16_to_f32(sz[b * G * 2 * ROWS + g * 2 * ROWS + ROWS + r]);
                acc += (double)((float)(code - 8) * sc + z) * (double)x[m * K + k];
            }
            y[m * N + n] = (float)acc;
        }
    (void)nb; (void)cpg; (void)d; (void)xs; (void)qs; (void)xq;
    barrier_wait(bar);
    return;
#endif
    split_range(M, t, nt, &lo, &hi);
    if (hi > lo) quantize_act(x + lo * K, hi - lo, K, xq + lo * K, d + lo * C, xs + lo * C, qs + lo * C);
    barrier_wait(bar);
    const int64_t block_codes = C * CHUNK_BYTES, block_sz = G * 2 * ROWS;
    split_range(nb, t, nt, &lo, &hi);
    /* panels of PANEL rows of x: a panel's int8 rows stay in L1/L2 while this thread's blocks stream past (one
     * pass over all M rows per block made a 1,024-token prefill read its activations from L3 once per block) */
    for (int64_t p0 = 0; p0 < M; p0 += PANEL)
    for (int64_t b = lo; b < hi; ++b) {
        const int64_t p1 = p0 + PANEL < M ? p0 + PANEL : M;
        for (int64_t m0 = p0; m0 < p1; m0 += MT) {
            const int mt = (int)(p1 - m0 < MT ? p1 - m0 : MT);
            const uint8_t *bc = codes + b * block_codes;
            const uint16_t *bs = sz + b * block_sz;
            /* a constant row count per call, so the accumulators stay in registers */
            switch (mt) {
            case 8: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 8, y + m0 * N + b * ROWS, N); break;
            case 7: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 7, y + m0 * N + b * ROWS, N); break;
            case 6: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 6, y + m0 * N + b * ROWS, N); break;
            case 5: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 5, y + m0 * N + b * ROWS, N); break;
            case 4: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 4, y + m0 * N + b * ROWS, N); break;
            case 3: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 3, y + m0 * N + b * ROWS, N); break;
            case 2: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 2, y + m0 * N + b * ROWS, N); break;
            default: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 1, y + m0 * N + b * ROWS, N); break;
            }
        }
    }
    barrier_wait(bar);
}

/* y (M, N) float32 = x (M, K) float32 @ W^T. K % group == 0, group % 32 == 0, N % 16 == 0. Returns 0 or an error code. */
int mc_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                   int64_t group, float *y, int nthreads) {
    if (!int4_shape_ok(M, K, N, group)) return 1;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * (size_t)(M * (K / CHUNK)) * 3);
    if (!xq || !d) { free(xq); free(d); return 2; }
    spin_barrier bar = {0, 0, 0, 1};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp single
        bar.n = omp_get_num_threads();
        int4_team(x, M, K, N, codes, sz, group, y, xq, d, omp_get_thread_num(), bar.n, &bar);
    }
    free(xq);
    free(d);
    return 0;
}

/* The weight as bfloat16 (N, K) row-major, w = (code - 8) * s + zero rounded to nearest even: for long inputs
 * (prefill), where a bf16 GEMM beats the int8 dot products (a 1,024-token prefill: 0.6 s against 0.8 s of matmuls). */
int mc_int4_dequant_bf16(const uint8_t *codes, const uint16_t *sz, int64_t N, int64_t K, int64_t group, uint16_t *out,
                         int nthreads) {
    if (!int4_shape_ok(1, K, N, group)) return 1;
    const int64_t C = K / CHUNK, G = K / group, nb = N / ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *bc = codes + b * C * CHUNK_BYTES;
        const uint16_t *bs = sz + b * G * 2 * ROWS;
        for (int64_t r = 0; r < ROWS; ++r) {
            uint16_t *o = out + (b * ROWS + r) * K;
            for (int64_t c = 0; c < C; ++c) {
                const int64_t g = c * CHUNK / group;
                const float sc = bf16_to_f32(bs[g * 2 * ROWS + r]), z = bf16_to_f32(bs[g * 2 * ROWS + ROWS + r]) - 8.f * sc;
                float w[CHUNK];
                for (int v = 0; v < 4; ++v)
                    for (int j = 0; j < 4; ++j) {
                        const uint8_t byte = bc[c * CHUNK_BYTES + 64 * v + 4 * r + j];
                        w[8 * v + j] = (float)(byte & 15);
                        w[8 * v + 4 + j] = (float)(byte >> 4);
                    }
#pragma omp simd
                for (int k = 0; k < CHUNK; ++k) {
                    union { float f; uint32_t u; } bits = {.f = w[k] * sc + z};
                    o[c * CHUNK + k] = (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);
                }
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * int8 weights, one scale per output row (Int8Linear's plain (N, K) layout, so a tied embedding reads the same rows):
 *     y[m, n] = s[n] * sum_c d[m, c] * sum_{k in c} q[n, k] * xq[m, k]
 * with the activations int8 per chunk of 32 columns as above (llama.cpp's Q8_0 x Q8_0 dot product). AVX512-VNNI:
 * 64 weights of one row per vpdpbusd against 64 activations (two chunks), weights made unsigned by q ^ 0x80 = q + 128
 * and the 128 * sum(xq) that adds taken off once per row of x; AVX2: vpmaddubsw on |q| and sign(q) * xq.
 * --------------------------------------------------------------------------------------------------------------- */
static void int8_rows(const int8_t *w, const float *scales, int64_t n0, int64_t n1, const int8_t *xq, const float *d,
                      const float *dvec, const float *corr, int64_t M, int64_t K, float *y, int64_t N) {
    const int64_t C = K / CHUNK;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t *wr = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t *xr = xq + m * K;
            const float *dr = d + m * C;
            __m512 acc = _mm512_setzero_ps();
            int64_t k = 0;
            const float *dvr = dvec + m * (K / 64) * 16;  /* per 64 columns: 8 lanes of each chunk's scale */
            for (; k + 64 <= K; k += 64) {
                const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + k)), flip);
                const __m512i xv = _mm512_loadu_si512((const void *)(xr + k));
                const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_loadu_ps(dvr + (k / 64) * 16), acc);
            }
            if (k < K) { /* a last chunk of 32 */
                const __mmask64 half = 0xFFFFFFFFull;
                const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(half, wr + k), flip);
                const __m512i xv = _mm512_maskz_loadu_epi8(half, xr + k);
                const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_mov_epi8(half, wu), xv);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_set1_ps(dr[k / CHUNK]), acc);
            }
            y[m * N + n] = scales[n] * (_mm512_reduce_add_ps(acc) - corr[m]);
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t *wr = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t *xr = xq + m * K;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t c = 0; c < C; ++c) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + c * CHUNK));
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + c * CHUNK));
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[m * C + c]), acc);
            }
            __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            r = _mm_add_ss(r, _mm_movehdup_ps(r));
            y[m * N + n] = scales[n] * (_mm_cvtss_f32(r) - corr[m]);
        }
    }
#else
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
            float acc = 0.f;
            for (int64_t c = 0; c < C; ++c) {
                int32_t is = 0;
                for (int j = 0; j < CHUNK; ++j) is += (int32_t)w[n * K + c * CHUNK + j] * xq[m * K + c * CHUNK + j];
                acc += (float)is * d[m * C + c];
            }
            y[m * N + n] = scales[n] * (acc - corr[m]);
        }
#endif
}

/* y (M, N) float32 = x (M, K) float32 @ (q * s[:, None])^T for int8 q (N, K) row-major, s (N,) float32. K % 32 == 0. */
int mc_int8_matmul(const float *x, int64_t M, int64_t K, int64_t N, const int8_t *w, const float *scales, float *y,
                   int nthreads) {
    if (M <= 0 || K <= 0 || N <= 0 || K % CHUNK) return 1;
    const int64_t C = K / CHUNK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * (size_t)(M * C * 3 + M + M * (K / 64) * 16));
    if (!xq || !d) { free(xq); free(d); return 2; }
    float *xs = d + M * C, *qs = d + 2 * M * C, *corr = d + 3 * M * C, *dvec = corr + M;
    quantize_act(x, M, K, xq, d, xs, qs);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t v = 0; v < K / 64; ++v)
            for (int j = 0; j < 16; ++j) dvec[(m * (K / 64) + v) * 16 + j] = d[m * C + 2 * v + j / 8];
    for (int64_t m = 0; m < M; ++m) {
        float c = 0.f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        for (int64_t j = 0; j < C; ++j) c += 16.f * qs[m * C + j];  /* qs = 8 * d * sum(xq); the flip adds 128 * d * sum(xq) */
#endif
        corr[m] = c;
    }
    const int64_t step = 64;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t n0 = 0; n0 < N; n0 += step) int8_rows(w, scales, n0, n0 + step < N ? n0 + step : N, xq, d, dvec, corr, M, K, y, N);
    free(xq);
    free(d);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * One decode step of a Llama/Qwen2-family stack for B sequences (one new token each, each at its own position), all
 * layers in one call: the Python side spends a few microseconds per torch op, and a layer is some twenty of them,
 * more than its four matmuls cost here. Per layer (float32 throughout; the naive twin is the torch path of
 * modelcore/model.py):
 *   x = rmsnorm(h) * w_attn_norm; qkv = x @ Wqkv^T (+ bias); RoPE (rotate-half) on q and k with cos/sin of the row's
 *   position; k, v written to the row's cache at that position; per head softmax(q k^T * scale) v over the row's
 *   keys [start, pos]; h += attn @ Wo^T; x = rmsnorm(h) * w_ffn_norm; g, u = x @ Wgu^T; h += (silu(g) * u) @ Wdown^T.
 * Then out = rmsnorm(h) * w_final_norm. The B rows share each matmul (one pass over the weights).
 * Weights come as int64 addresses, DECODE_FIELDS per layer; caches as (k, v) addresses per layer, each
 * (rows, Hkv, max_len, hd) float32 with `row_stride` elements between rows.
 * --------------------------------------------------------------------------------------------------------------- */
enum { F_NORM1, F_QKV, F_QKV_S, F_QKV_B, F_O, F_O_S, F_NORM2, F_GU, F_GU_S, F_DOWN, F_DOWN_S, DECODE_FIELDS };

int mc_decode_fields(void) { return DECODE_FIELDS; }

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

static void rope_rotate_half(float *x, const float *cos, const float *sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* exp(x) for x <= 88 in plain arithmetic the compiler vectorizes (glibc's expf stays scalar): Cody-Waite reduction by
 * ln 2 and Cephes' degree-6 polynomial, relative error ~1e-7; inputs below -87 give ~1e-38 instead of 0. */
static inline float vexpf(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    union { uint32_t u; float f; } scale = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* Attention of the `rep` query heads that share one key/value head, over keys [start, S): each key row is read once
 * for all of them. q: rep * hd, o: rep * hd, sc: rep * S floats of scratch. */
#if defined(__AVX512F__)
#define ATT_MAXV 16 /* query heads x head_dim / 16 held in registers */
/* rep * hd <= 16 * ATT_MAXV, hd % 16 == 0: queries and outputs stay in registers while keys/values stream by. */
static void attend_group_avx512(const float *q, const float *kb, const float *vb, int64_t rep, int64_t start, int64_t S,
                                int64_t hd, float scale, float *sc, float *o) {
    const int64_t nv = hd / 16;
    __m512 qv[ATT_MAXV], ov[ATT_MAXV];
    for (int64_t j = 0; j < rep * nv; ++j) { qv[j] = _mm512_loadu_ps(q + 16 * j); ov[j] = _mm512_setzero_ps(); }
    for (int64_t s = start; s < S; ++s) {
        const float *ks = kb + s * hd;
        for (int64_t r = 0; r < rep; ++r) {
            __m512 acc = _mm512_mul_ps(qv[r * nv], _mm512_loadu_ps(ks));
            for (int64_t j = 1; j < nv; ++j) acc = _mm512_fmadd_ps(qv[r * nv + j], _mm512_loadu_ps(ks + 16 * j), acc);
            sc[r * S + s] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (int64_t r = 0; r < rep; ++r) {
        float *sr = sc + r * S, mx = -INFINITY, sum = 0.f;
        for (int64_t s = start; s < S; ++s) mx = sr[s] > mx ? sr[s] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = start; s < S; ++s) {
            sr[s] = vexpf(sr[s] - mx);
            sum += sr[s];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t s = start; s < S; ++s) sr[s] *= inv;
    }
    for (int64_t s = start; s < S; ++s) {
        const float *vs = vb + s * hd;
        for (int64_t j = 0; j < nv; ++j) {
            const __m512 v = _mm512_loadu_ps(vs + 16 * j);
            for (int64_t r = 0; r < rep; ++r) ov[r * nv + j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * S + s]), v, ov[r * nv + j]);
        }
    }
    for (int64_t j = 0; j < rep * nv; ++j) _mm512_storeu_ps(o + 16 * j, ov[j]);
}
#endif

static void attend_group(const float *q, const float *kb, const float *vb, int64_t rep, int64_t start, int64_t S,
                         int64_t hd, float scale, float *sc, float *o) {
#if defined(__AVX512F__)
    if (hd % 16 == 0 && rep * (hd / 16) <= ATT_MAXV) {
        attend_group_avx512(q, kb, vb, rep, start, S, hd, scale, sc, o);
        return;
    }
#endif
    for (int64_t s = start; s < S; ++s) {
        const float *ks = kb + s * hd;
        for (int64_t r = 0; r < rep; ++r) {
            const float *qr = q + r * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < hd; ++i) dot += qr[i] * ks[i];
            sc[r * S + s] = dot * scale;
        }
    }
    for (int64_t r = 0; r < rep; ++r) {
        float *sr = sc + r * S, mx = -INFINITY, sum = 0.f;
        for (int64_t s = start; s < S; ++s) mx = sr[s] > mx ? sr[s] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = start; s < S; ++s) {
            sr[s] = vexpf(sr[s] - mx);
            sum += sr[s];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t s = start; s < S; ++s) sr[s] *= inv;
    }
    for (int64_t i = 0; i < rep * hd; ++i) o[i] = 0.f;
    for (int64_t s = start; s < S; ++s) {
        const float *vs = vb + s * hd;
        for (int64_t r = 0; r < rep; ++r) {
            const float p = sc[r * S + s];
            float *orow = o + r * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) orow[i] += p * vs[i];
        }
    }
}

int mc_llama_decode(const int64_t *table, const int64_t *caches, int n_layers, int64_t B, int64_t D, int64_t H,
                    int64_t Hkv, int64_t hd, int64_t I, int64_t group, int64_t max_len, int64_t row_stride, float eps,
                    int64_t window, float scale, const float *cos_tab, const float *sin_tab, const int64_t *positions,
                    float *h, const float *final_norm, float *out, int nthreads) {
    if (B < 1 || H % Hkv || hd % 2) return 1;
    int64_t smax = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (positions[b] < 0 || positions[b] >= max_len) return 1;
        smax = positions[b] + 1 > smax ? positions[b] + 1 : smax;
    }
    const int64_t nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv, rep = H / Hkv;
    if (!int4_shape_ok(B, D, nqkv, group) || !int4_shape_ok(B, nq, D, group) || !int4_shape_ok(B, D, 2 * I, group) ||
        !int4_shape_ok(B, I, D, group))
        return 1;
    const int64_t kmax = D > I ? (D > nq ? D : nq) : (I > nq ? I : nq);
    float *buf = (float *)malloc(sizeof(float) * (size_t)(B * (D + nqkv + nq + 3 * I) + B * H * smax + 3 * B * kmax / CHUNK));
    int8_t *xq = (int8_t *)malloc((size_t)(B * kmax));
    if (!buf || !xq) { free(buf); free(xq); return 2; }
    float *x = buf, *qkv = x + B * D, *att = qkv + B * nqkv, *gu = att + B * nq, *act = gu + B * 2 * I, *scores = act + B * I;
    float *dq = scores + B * H * smax;
    /* one team for the whole step, synchronised by spin barriers (see barrier_wait): thread 0 runs the serial
     * pieces, the matmuls and the attention are shared; the threads never go back to sleep between layers */
    spin_barrier bar = {0, 0, 0, 1};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp single
        bar.n = omp_get_num_threads();
        const int t = omp_get_thread_num(), nt = bar.n;
        int64_t lo, hi;
        for (int l = 0; l < n_layers; ++l) {
            const int64_t *tb = table + (int64_t)l * DECODE_FIELDS;
            float *kc = (float *)caches[2 * l], *vc = (float *)caches[2 * l + 1];
            if (t == 0)
                for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * D, (const float *)tb[F_NORM1], D, eps, x + b * D);
            barrier_wait(&bar);
            int4_team(x, B, D, nqkv, (const uint8_t *)tb[F_QKV], (const uint16_t *)tb[F_QKV_S], group, qkv, xq, dq, t, nt, &bar);
            split_range(B, t, nt, &lo, &hi);
            for (int64_t b = lo; b < hi; ++b) {
                float *r = qkv + b * nqkv;
                const int64_t pos = positions[b];
                if (tb[F_QKV_B]) {
                    const float *bias = (const float *)tb[F_QKV_B];
                    for (int64_t i = 0; i < nqkv; ++i) r[i] += bias[i];
                }
                const float *cs = cos_tab + pos * hd, *sn = sin_tab + pos * hd;
                for (int64_t hh = 0; hh < H + Hkv; ++hh) rope_rotate_half(r + hh * hd, cs, sn, hd);  /* q heads, then k heads */
                for (int64_t g = 0; g < Hkv; ++g) {
                    memcpy(kc + b * row_stride + (g * max_len + pos) * hd, r + nq + g * hd, sizeof(float) * (size_t)hd);
                    memcpy(vc + b * row_stride + (g * max_len + pos) * hd, r + nq + nkv + g * hd, sizeof(float) * (size_t)hd);
                }
            }
            barrier_wait(&bar);
            split_range(B * Hkv, t, nt, &lo, &hi);
            for (int64_t bg = lo; bg < hi; ++bg) {  /* one (row, key/value head) pair: its rep query heads */
                const int64_t b = bg / Hkv, g = bg % Hkv, S = positions[b] + 1;
                const int64_t start = window > 0 && S > window ? S - window : 0;
                const int64_t off = b * row_stride + g * max_len * hd;
                attend_group(qkv + b * nqkv + g * rep * hd, kc + off, vc + off, rep, start, S, hd, scale,
                             scores + bg * rep * smax, att + b * nq + g * rep * hd);
            }
            barrier_wait(&bar);
            int4_team(att, B, nq, D, (const uint8_t *)tb[F_O], (const uint16_t *)tb[F_O_S], group, x, xq, dq, t, nt, &bar);
            split_range(B, t, nt, &lo, &hi);
            for (int64_t b = lo; b < hi; ++b) {
                for (int64_t i = 0; i < D; ++i) h[b * D + i] += x[b * D + i];
                rmsnorm(h + b * D, (const float *)tb[F_NORM2], D, eps, x + b * D);
            }
            barrier_wait(&bar);
            int4_team(x, B, D, 2 * I, (const uint8_t *)tb[F_GU], (const uint16_t *)tb[F_GU_S], group, gu, xq, dq, t, nt, &bar);
            split_range(B * I, t, nt, &lo, &hi);
#pragma omp simd
            for (int64_t e = lo; e < hi; ++e) {
                const int64_t b = e / I, i = e % I;
                const float g = gu[b * 2 * I + i];
                act[e] = g / (1.f + vexpf(-g)) * gu[b * 2 * I + I + i];
            }
            barrier_wait(&bar);
            int4_team(act, B, I, D, (const uint8_t *)tb[F_DOWN], (const uint16_t *)tb[F_DOWN_S], group, x, xq, dq, t, nt, &bar);
            split_range(B * D, t, nt, &lo, &hi);
            for (int64_t e = lo; e < hi; ++e) h[e] += x[e];
            barrier_wait(&bar);
        }
    }
    if (final_norm)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * D, final_norm, D, eps, out + b * D);
    free(buf);
    free(xq);
    return 0;
}
