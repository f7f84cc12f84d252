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
#include "kernels.h"

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
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* the same quantization, 16 lanes at a time (cvtps rounds to nearest even, as lrintf does; only the order in
     * which the float sum xs adds up differs) */
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < C; ++c) {
            const float *p = x + m * K + c * CHUNK;
            const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const float scale = amax / 127.f;
            const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
            int8_t *q = xq + m * K + c * CHUNK;
            _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
            d[m * C + c] = scale;
            xs[m * C + c] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            qs[m * C + c] = 8.f * scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        }
    }
#else
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
#endif
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

/* One block of 16 rows for `mt` (1..MT) rows of x. Each chunk's integer sums go straight into the float
 * accumulators, s * (d * isum - 8 * d * qsum) + zero * xs per chunk (no per-group float sums: with 8 rows of x those
 * made 24 live vectors, and GCC spilled the integer sums to the stack inside the dot-product loop). */
static inline __attribute__((always_inline)) void block_rows(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *d, const float *xs,
                       const float *qs, int64_t K, int64_t G, int cpg, int mt, float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MT];
    for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const __m512 s = load_bf16x16(sz + g * 2 * ROWS);
        const __m512 z = load_bf16x16(sz + g * 2 * ROWS + ROWS);
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
                const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_set1_ps(d[m * C + c]), _mm512_set1_ps(qs[m * C + c]));
                acc[m] = _mm512_fmadd_ps(s, t, acc[m]);
                acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[m * C + c]), acc[m]);
            }
        }
    }
    for (int m = 0; m < mt; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 has 16 vector registers, so the rows of x go in tiles of up to 4: a tile's 4 x 2 integer sums (rows x the
 * block's two halves of 8 output rows, one 256-bit vector each), both halves' unpacked codes and the two broadcast
 * activation words fit, and each broadcast serves both halves. Within a chunk the vpmaddubsw products of a row are
 * added as int16 (each is at most 2 * 15 * 127 = 3,810 in magnitude, the eight of a half at most 30,480 < 32,767)
 * and widened once by vpmaddwd. The float sums of a tile live in memory (touched once per chunk). */
#define XT 4 /* rows of x per register tile */
static inline __attribute__((always_inline)) void block_tile(const uint8_t *codes, const int8_t *xq, const float *d,
                                                             int64_t K, int64_t c0, int cpg, int mt, float gacc[][2][8]) {
    const int64_t C = K / CHUNK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int cc = 0; cc < cpg; ++cc) {
        const int64_t c = c0 + cc;
        const uint8_t *w = codes + c * CHUNK_BYTES;
        _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 8 * CHUNK_BYTES + 192), _MM_HINT_T0);
        __m256i s16[XT][2];
        for (int m = 0; m < mt; ++m) s16[m][0] = s16[m][1] = _mm256_setzero_si256();
        for (int v = 0; v < 4; ++v) {
            const __m256i raw0 = _mm256_loadu_si256((const __m256i *)(w + 64 * v));
            const __m256i raw1 = _mm256_loadu_si256((const __m256i *)(w + 64 * v + 32));
            const __m256i lo0 = _mm256_and_si256(raw0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), low);
            const __m256i lo1 = _mm256_and_si256(raw1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low);
            for (int m = 0; m < mt; ++m) {
                const int8_t *xr = xq + m * K + c * CHUNK + 8 * v;
                int32_t q0, q1;
                memcpy(&q0, xr, 4);
                memcpy(&q1, xr + 4, 4);
                const __m256i b0 = _mm256_set1_epi32(q0), b1 = _mm256_set1_epi32(q1);
                /* saturating adds (which never saturate here) keep GCC from reassociating the sums into a tree of
                 * products spilled to the stack */
                s16[m][0] = _mm256_adds_epi16(s16[m][0], _mm256_maddubs_epi16(lo0, b0));
                s16[m][0] = _mm256_adds_epi16(s16[m][0], _mm256_maddubs_epi16(hi0, b1));
                s16[m][1] = _mm256_adds_epi16(s16[m][1], _mm256_maddubs_epi16(lo1, b0));
                s16[m][1] = _mm256_adds_epi16(s16[m][1], _mm256_maddubs_epi16(hi1, b1));
            }
        }
        for (int m = 0; m < mt; ++m) {
            const __m256 dm = _mm256_set1_ps(d[m * C + c]);
            for (int h = 0; h < 2; ++h) {
                const __m256 is = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m][h], ones));
                _mm256_storeu_ps(gacc[m][h], _mm256_fmadd_ps(is, dm, _mm256_loadu_ps(gacc[m][h])));
            }
        }
    }
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((always_inline)) void block_rows(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *d, const float *xs,
                       const float *qs, int64_t K, int64_t G, int cpg, int mt, float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    __m256 acc[MT][2];
    for (int m = 0; m < mt; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        float gacc[MT][2][8] __attribute__((aligned(32)));
        memset(gacc, 0, sizeof(float) * 16 * (size_t)mt);
        for (int m0 = 0; m0 < mt; m0 += XT) {  /* a second tile reads the block's chunks from L1 */
            const int t = mt - m0 < XT ? mt - m0 : XT;
            switch (t) {
            case 4: block_tile(codes, xq + m0 * K, d + m0 * C, K, g * cpg, cpg, 4, gacc + m0); break;
            case 3: block_tile(codes, xq + m0 * K, d + m0 * C, K, g * cpg, cpg, 3, gacc + m0); break;
            case 2: block_tile(codes, xq + m0 * K, d + m0 * C, K, g * cpg, cpg, 2, gacc + m0); break;
            default: block_tile(codes, xq + m0 * K, d + m0 * C, K, g * cpg, cpg, 1, gacc + m0); break;
            }
        }
        for (int m = 0; m < mt; ++m) {
            float xsg = 0.f, qsg = 0.f;
            for (int cc = 0; cc < cpg; ++cc) {
                xsg += xs[m * C + g * cpg + cc];
                qsg += qs[m * C + g * cpg + cc];
            }
            for (int h = 0; h < 2; ++h) {
                const __m256 s = load_bf16x8(sz + g * 2 * ROWS + 8 * h);
                const __m256 z = load_bf16x8(sz + g * 2 * ROWS + ROWS + 8 * h);
                const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(gacc[m][h]), _mm256_set1_ps(qsg));
                acc[m][h] = _mm256_fmadd_ps(s, t, acc[m][h]);
                acc[m][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(xsg), acc[m][h]);
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

int mc_int4_shape_ok(int64_t M, int64_t K, int64_t N, int64_t group) {
    return M > 0 && K > 0 && N > 0 && K % CHUNK == 0 && group % CHUNK == 0 && K % group == 0 && N % ROWS == 0;
}

#define BARRIER_SPINS 2000 /* x ~28 ns per pause on the project's CPUs */

void mc_barrier_wait(spin_barrier *b) {
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

/* The int4 matmul as work for thread t of a team of nt (a barrier after quantizing x and at the end).
 * xq: M * K bytes, dbuf: 3 * M * K / 32 floats of scratch. */
void mc_int4_team(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                      int64_t group, float *y, int8_t *xq, float *dbuf, int t, int nt, spin_barrier *bar) {
    const int64_t C = K / CHUNK, G = K / group, nb = N / ROWS;
    const int cpg = (int)(group / CHUNK);
    float *d = dbuf, *xs = dbuf + M * C, *qs = dbuf + 2 * M * C;
    int64_t lo, hi;
#ifdef MC_EXACT
    /* test build: float activations, weights dequantized one by one ((code - 8) * s + zero), no int8 rounding */
    mc_split_range(N, t, nt, &lo, &hi);
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
    mc_barrier_wait(bar);
    return;
#endif
    mc_split_range(M, t, nt, &lo, &hi);
    if (hi > lo) quantize_act(x + lo * K, hi - lo, K, xq + lo * K, d + lo * C, xs + lo * C, qs + lo * C);
    mc_barrier_wait(bar);
    const int64_t block_codes = C * CHUNK_BYTES, block_sz = G * 2 * ROWS;
    mc_split_range(nb, t, nt, &lo, &hi);
    /* panels of PANEL rows of x: a panel's int8 rows stay in L1/L2 while this thread's blocks stream past (one
     * pass over all M rows per block made a 1,024-token prefill read its activations from L3 once per block).
     * A static split into contiguous halves: taking runs of blocks dynamically (mc_claim) made the decode step
     * slower at 1 row (20%) and at 8 rows (9%) */
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
    mc_barrier_wait(bar);
}

/* y (M, N) float32 = x (M, K) float32 @ W^T. K % group == 0, group % 32 == 0, N % 16 == 0. Returns 0 or an error code. */
int mc_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                   int64_t group, float *y, int nthreads) {
    if (!mc_int4_shape_ok(M, K, N, group)) return 1;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * (size_t)(M * (K / CHUNK)) * 3);
    if (!xq || !d) { free(xq); free(d); return 2; }
    spin_barrier bar = {0, 0, 0, 1};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp single
        bar.n = omp_get_num_threads();
        mc_int4_team(x, M, K, N, codes, sz, group, y, xq, d, omp_get_thread_num(), bar.n, &bar);
    }
    free(xq);
    free(d);
    return 0;
}

/* The weight as bfloat16 (N, K) row-major, w = (code - 8) * s + zero rounded to nearest even: for long inputs
 * (prefill), where a bf16 GEMM beats the int8 dot products (a 1,024-token prefill: 0.6 s against 0.8 s of matmuls). */
int mc_int4_dequant_bf16(const uint8_t *codes, const uint16_t *sz, int64_t N, int64_t K, int64_t group, uint16_t *out,
                         int nthreads) {
    if (!mc_int4_shape_ok(1, K, N, group)) return 1;
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
#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__)) && defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 a) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* nr (1..2) weight rows from n0 times mr (1..4) rows of x from m0: per chunk, vpmaddubsw on |w| and sign(w) * xq. */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *w, const float *scales, int64_t n0, int nr,
                                                            const int8_t *xq, const float *d, const float *corr, int64_t m0,
                                                            int mr, int64_t K, float *y, int64_t N) {
    const int64_t C = K / CHUNK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int r = 0; r < nr; ++r)
        for (int m = 0; m < mr; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
        /* rows read in pairs, chunk by chunk, are two short streams the hardware prefetcher follows badly (one row
         * of x ran at half the speed of a row-by-row pass): fetch the tiles two ahead, one line per chunk */
        _mm_prefetch((const char *)(w + (n0 + 2 * nr) * K + c * 64), _MM_HINT_T0);
        __m256i wv[2], aw[2];
        for (int r = 0; r < nr; ++r) {
            wv[r] = _mm256_loadu_si256((const __m256i *)(w + (n0 + r) * K + c * CHUNK));
            aw[r] = _mm256_sign_epi8(wv[r], wv[r]);
        }
        for (int m = 0; m < mr; ++m) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (m0 + m) * K + c * CHUNK));
            const __m256 dm = _mm256_set1_ps(d[(m0 + m) * C + c]);
            for (int r = 0; r < nr; ++r) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, wv[r])), ones);
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dm, acc[r][m]);
            }
        }
    }
    for (int r = 0; r < nr; ++r)
        for (int m = 0; m < mr; ++m) y[(m0 + m) * N + n0 + r] = scales[n0 + r] * (hsum8(acc[r][m]) - corr[m0 + m]);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* nr (1..4) weight rows from n0 times mr (1..4) rows of x from m0: per 64 columns, vpdpbusd of the unsigned weights
 * (q ^ 0x80 = q + 128) against the activations, scaled by each chunk's d (dvec: 8 lanes per chunk). Each weight vector
 * is loaded once for all rows of x and each activation vector once for all weight rows; every (row, row of x) pair
 * adds its products in the same order whatever the tile, so one row of x gets the same bits alone or in a batch. */
static inline __attribute__((always_inline)) void int8_tile512(const int8_t *w, const float *scales, int64_t n0, int nr,
                                                               const int8_t *xq, const float *d, const float *dvec,
                                                               const float *corr, int64_t m0, int mr, int64_t K,
                                                               float *y, int64_t N) {
    const int64_t V = K / 64;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[4][4];
    for (int r = 0; r < nr; ++r)
        for (int m = 0; m < mr; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t v = 0; v < V; ++v) {
        __m512i wu[4];
        for (int r = 0; r < nr; ++r) {
            /* the next tile's rows, one line each: 4 interleaved row streams outrun the hardware prefetcher */
            _mm_prefetch((const char *)(w + (n0 + nr + r) * K + 64 * v), _MM_HINT_T0);
            wu[r] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + (n0 + r) * K + 64 * v)), flip);
        }
        for (int m = 0; m < mr; ++m) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq + (m0 + m) * K + 64 * v));
            const __m512 dv = _mm512_loadu_ps(dvec + ((m0 + m) * V + v) * 16);
            for (int r = 0; r < nr; ++r)
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu[r], xv)), dv,
                                            acc[r][m]);
        }
    }
    if (K % 64) { /* a last chunk of 32 */
        const int64_t k = 64 * V;
        const __mmask64 half = 0xFFFFFFFFull;
        for (int r = 0; r < nr; ++r) {
            const __m512i wu = _mm512_maskz_mov_epi8(half, _mm512_xor_si512(_mm512_maskz_loadu_epi8(half, w + (n0 + r) * K + k), flip));
            for (int m = 0; m < mr; ++m) {
                const __m512i xv = _mm512_maskz_loadu_epi8(half, xq + (m0 + m) * K + k);
                const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_set1_ps(d[(m0 + m) * (K / CHUNK) + k / CHUNK]), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < nr; ++r)
        for (int m = 0; m < mr; ++m) y[(m0 + m) * N + n0 + r] = scales[n0 + r] * (_mm512_reduce_add_ps(acc[r][m]) - corr[m0 + m]);
}
#endif

static void int8_rows(const int8_t *w, const float *scales, int64_t n0, int64_t n1, const int8_t *xq, const float *d,
                      const float *dvec, const float *corr, int64_t M, int64_t K, float *y, int64_t N) {
    const int64_t C = K / CHUNK;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (M == 1) { /* one row of x: row by row, one stream the hardware prefetcher follows (same sums as a tile) */
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t *wr = w + n * K;
            __m512 acc = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + k)), flip);
                const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512((const void *)(xq + k)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_loadu_ps(dvec + (k / 64) * 16), acc);
            }
            if (k < K) {
                const __mmask64 half = 0xFFFFFFFFull;
                const __m512i wu = _mm512_maskz_mov_epi8(half, _mm512_xor_si512(_mm512_maskz_loadu_epi8(half, wr + k), flip));
                const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_maskz_loadu_epi8(half, xq + k));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_set1_ps(d[k / CHUNK]), acc);
            }
            y[n] = scales[n] * (_mm512_reduce_add_ps(acc) - corr[0]);
        }
        return;
    }
    (void)C;
    for (int64_t n = n0; n < n1; n += 4) {
        const int nr = n + 4 <= n1 ? 4 : (int)(n1 - n);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mr = (int)(M - m0 < 4 ? M - m0 : 4);
            switch (nr * 4 + mr) {  /* constant tile sizes, so the 16 accumulators stay in registers */
            case 20: int8_tile512(w, scales, n, 4, xq, d, dvec, corr, m0, 4, K, y, N); break;
            case 19: int8_tile512(w, scales, n, 4, xq, d, dvec, corr, m0, 3, K, y, N); break;
            case 18: int8_tile512(w, scales, n, 4, xq, d, dvec, corr, m0, 2, K, y, N); break;
            case 17: int8_tile512(w, scales, n, 4, xq, d, dvec, corr, m0, 1, K, y, N); break;
            default:
                for (int r = 0; r < nr; ++r)
                    for (int m = 0; m < mr; ++m) int8_tile512(w, scales, n + r, 1, xq, d, dvec, corr, m0 + m, 1, K, y, N);
                break;
            }
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    /* tiles of 2 weight rows x up to 4 rows of x: 8 independent accumulators (one per pair) hide the latency of
     * the per-chunk fma (one accumulator per pair made every chunk wait for the last: ~2x slower at 8 rows), and
     * each weight chunk is loaded and made unsigned once for all rows of x */
    (void)dvec;
    (void)C;
    for (int64_t n = n0; n < n1; n += 2) {
        const int nr = n + 2 <= n1 ? 2 : 1;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mr = (int)(M - m0 < 4 ? M - m0 : 4);
            switch (nr * 4 + mr) {
            case 12: int8_tile(w, scales, n, 2, xq, d, corr, m0, 4, K, y, N); break;
            case 11: int8_tile(w, scales, n, 2, xq, d, corr, m0, 3, K, y, N); break;
            case 10: int8_tile(w, scales, n, 2, xq, d, corr, m0, 2, K, y, N); break;
            case 9: int8_tile(w, scales, n, 2, xq, d, corr, m0, 1, K, y, N); break;
            default: for (int m = 0; m < mr; ++m) int8_tile(w, scales, n, 1, xq, d, corr, m0 + m, 1, K, y, N); break;
            }
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
 * int8 weights in the int4 kernel's block layout (AVX512-VNNI builds): the output head at several rows of x. In the
 * row-major layout each vpdpbusd sums 64 columns of one output row, so every (row, row of x) pair pays its own float
 * convert and fma per 64 columns; here the 16 lanes are 16 output rows (as in the int4 kernel), and one convert and
 * one fma per chunk of 32 columns and row of x serve all 16. Layout (modelcore/cpu_int4.py pack_int8_blocks): rows in
 * blocks of 16; per block and chunk of 32 columns, 512 bytes = 8 vectors of 64; byte 4 * r + j of vector v is row
 * r's weight at column 4v + j, plus 128 (unsigned for vpdpbusd). With x quantized per chunk as above:
 *     y[m, n] = s[n] * sum_c ( d[m, c] * sum_k (q[n, k] + 128) * xq[m, k]  -  128 * d[m, c] * sum_k xq[m, k] )
 * --------------------------------------------------------------------------------------------------------------- */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define I8B_CHUNK_BYTES 512
static inline __attribute__((always_inline)) void int8b_rows(const uint8_t *wb, const float *scales, const int8_t *xq,
                                                             const float *d, const float *qs, int64_t K, int mt,
                                                             float *y, int64_t ldy) {
    const int64_t C = K / CHUNK;
    __m512 acc[MT];
    for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
        const uint8_t *w = wb + c * I8B_CHUNK_BYTES;
        for (int i = 0; i < 8; ++i) _mm_prefetch((const char *)(w + 4 * I8B_CHUNK_BYTES + 64 * i), _MM_HINT_T0);
        __m512i iacc[MT];
        for (int m = 0; m < mt; ++m) iacc[m] = _mm512_setzero_si512();
        for (int v = 0; v < 8; ++v) {
            const __m512i raw = _mm512_loadu_si512((const void *)(w + 64 * v));
            for (int m = 0; m < mt; ++m) {
                int32_t q;
                memcpy(&q, xq + m * K + c * CHUNK + 4 * v, 4);
                iacc[m] = _mm512_dpbusd_epi32(iacc[m], raw, _mm512_set1_epi32(q));
            }
        }
        for (int m = 0; m < mt; ++m)  /* qs = 8 * d * sum(xq): 16 * qs is what the +128 added */
            acc[m] = _mm512_add_ps(acc[m], _mm512_fmsub_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_set1_ps(d[m * C + c]),
                                                           _mm512_set1_ps(16.f * qs[m * C + c])));
    }
    const __m512 s = _mm512_loadu_ps(scales);
    for (int m = 0; m < mt; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(s, acc[m]));
}
#endif

/* y (M, N) float32 = x (M, K) @ (q * s[:, None])^T with q in the block layout above. N % 16 == 0, K % 32 == 0.
 * Returns 0, 1 (shapes), 2 (memory) or 3 (this build has no AVX512-VNNI: use mc_int8_matmul). */
int mc_int8b_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *wb, const float *scales, float *y,
                    int nthreads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (M <= 0 || K <= 0 || N <= 0 || K % CHUNK || N % ROWS) return 1;
    const int64_t C = K / CHUNK, nb = N / ROWS;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * (size_t)(M * C * 3));
    if (!xq || !d) { free(xq); free(d); return 2; }
    float *xs = d + M * C, *qs = d + 2 * M * C;
    quantize_act(x, M, K, xq, d, xs, qs);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *wbb = wb + b * C * I8B_CHUNK_BYTES;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)(M - m0 < MT ? M - m0 : MT);
            const int8_t *xm = xq + m0 * K;
            const float *dm = d + m0 * C, *qm = qs + m0 * C;
            float *ym = y + m0 * N + b * ROWS;
            switch (mt) {  /* a constant row count per call, so the accumulators stay in registers */
            case 8: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 8, ym, N); break;
            case 7: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 7, ym, N); break;
            case 6: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 6, ym, N); break;
            case 5: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 5, ym, N); break;
            case 4: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 4, ym, N); break;
            case 3: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 3, ym, N); break;
            case 2: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 2, ym, N); break;
            default: int8b_rows(wbb, scales + b * ROWS, xm, dm, qm, K, 1, ym, N); break;
            }
        }
    }
    free(xq);
    free(d);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)N; (void)wb; (void)scales; (void)y; (void)nthreads;
    return 3;
#endif
}
