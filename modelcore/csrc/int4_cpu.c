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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#define ROWS 16
#define CHUNK 32
#define CHUNK_BYTES 256
#define MT 4 /* rows of x per pass over a block's weights */

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

/* y (M, N) float32 = x (M, K) float32 @ W^T. K % group == 0, group % 32 == 0, N % 16 == 0. Returns 0 or an error code. */
int mc_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *codes, const uint16_t *sz,
                   int64_t group, float *y, int nthreads) {
    if (M <= 0 || K <= 0 || N <= 0 || K % CHUNK || group % CHUNK || K % group || N % ROWS) return 1;
    const int64_t C = K / CHUNK, G = K / group, nb = N / ROWS;
    const int cpg = (int)(group / CHUNK);
#ifdef MC_EXACT
    /* test build: float activations, weights dequantized one by one ((code - 8) * s + zero), no int8 rounding */
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            const int64_t b = n / ROWS, r = n % ROWS;
            double acc = 0.0;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t c = k / CHUNK, col = k % CHUNK, v = col / 8, hi = (col % 8) / 4, j = col % 4;
                const uint8_t byte = codes[b * C * CHUNK_BYTES + c * CHUNK_BYTES + 64 * v + 4 * r + j];
                const int code = hi ? byte >> 4 : byte & 15;
                const int64_t g = k / group;
                const float sc = bf16_to_f32(sz[b * G * 2 * ROWS + g * 2 * ROWS + r]);
                const float z = bf16_to_f32(sz[b * G * 2 * ROWS + g * 2 * ROWS + ROWS + r]);
                acc += (double)((float)(code - 8) * sc + z) * (double)x[m * K + k];
            }
            y[m * N + n] = (float)acc;
        }
    (void)nb; (void)cpg; (void)nthreads;
    return 0;
#endif
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * (size_t)(M * C) * 3);
    if (!xq || !d) { free(xq); free(d); return 2; }
    float *xs = d + M * C, *qs = d + 2 * M * C;
    if (M >= 64 && nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; ++m) quantize_act(x + m * K, 1, K, xq + m * K, d + m * C, xs + m * C, qs + m * C);
    } else {
        quantize_act(x, M, K, xq, d, xs, qs);
    }
    const int64_t block_codes = C * CHUNK_BYTES, block_sz = G * 2 * ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)(M - m0 < MT ? M - m0 : MT);
            const uint8_t *bc = codes + b * block_codes;
            const uint16_t *bs = sz + b * block_sz;
            /* a constant row count per call, so the accumulators stay in registers */
            switch (mt) {
            case 4: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 4, y + m0 * N + b * ROWS, N); break;
            case 3: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 3, y + m0 * N + b * ROWS, N); break;
            case 2: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 2, y + m0 * N + b * ROWS, N); break;
            default: block_rows(bc, bs, xq + m0 * K, d + m0 * C, xs + m0 * C, qs + m0 * C, K, G, cpg, 1, y + m0 * N + b * ROWS, N); break;
            }
        }
    }
    free(xq);
    free(d);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * One decode step of a Llama/Qwen2-family stack for one sequence, all layers in one call: the Python side spends
 * a few microseconds per torch op, and a layer is some twenty of them, more than its four matmuls cost here.
 * Per layer (float32 throughout; the naive twin is the torch path of modelcore/model.py):
 *   x = rmsnorm(h) * w_attn_norm; qkv = x @ Wqkv^T (+ bias); RoPE (rotate-half) on q and k with cos/sin of `pos`;
 *   k, v written to the cache at `pos`; per head softmax(q k^T * scale) v over keys [start, pos];
 *   h += attn @ Wo^T; x = rmsnorm(h) * w_ffn_norm; g, u = x @ Wgu^T; h += (silu(g) * u) @ Wdown^T.
 * Then out = rmsnorm(h) * w_final_norm. Layer pointers come as int64 addresses, DECODE_FIELDS per layer.
 * --------------------------------------------------------------------------------------------------------------- */
enum { F_NORM1, F_QKV, F_QKV_S, F_QKV_B, F_O, F_O_S, F_NORM2, F_GU, F_GU_S, F_DOWN, F_DOWN_S, F_KC, F_VC, DECODE_FIELDS };

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

int mc_llama_decode(const int64_t *table, int n_layers, int64_t D, int64_t H, int64_t Hkv, int64_t hd, int64_t I,
                    int64_t group, int64_t max_len, float eps, int64_t window, float scale, const float *cos,
                    const float *sin, int64_t pos, float *h, const float *final_norm, float *out, int nthreads) {
    if (pos < 0 || pos >= max_len || H % Hkv || hd % 2) return 1;
    const int64_t nq = H * hd, nkv = Hkv * hd, rep = H / Hkv, S = pos + 1;
    const int64_t start = window > 0 && S > window ? S - window : 0;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(D + nq + 2 * nkv + nq + 2 * I + I + H * S));
    if (!buf) return 2;
    float *x = buf, *qkv = x + D, *att = qkv + nq + 2 * nkv, *gu = att + nq, *act = gu + 2 * I, *scores = act + I;
    int rc = 0;
    for (int l = 0; l < n_layers && !rc; ++l) {
        const int64_t *t = table + (int64_t)l * DECODE_FIELDS;
        rmsnorm(h, (const float *)t[F_NORM1], D, eps, x);
        rc |= mc_int4_matmul(x, 1, D, nq + 2 * nkv, (const uint8_t *)t[F_QKV], (const uint16_t *)t[F_QKV_S], group, qkv, nthreads);
        if (t[F_QKV_B]) {
            const float *bias = (const float *)t[F_QKV_B];
            for (int64_t i = 0; i < nq + 2 * nkv; ++i) qkv[i] += bias[i];
        }
        float *q = qkv, *k = qkv + nq, *v = k + nkv;
        for (int64_t hh = 0; hh < H; ++hh) rope_rotate_half(q + hh * hd, cos, sin, hd);
        float *kc = (float *)t[F_KC], *vc = (float *)t[F_VC];
        for (int64_t g = 0; g < Hkv; ++g) {
            rope_rotate_half(k + g * hd, cos, sin, hd);
            memcpy(kc + (g * max_len + pos) * hd, k + g * hd, sizeof(float) * (size_t)hd);
            memcpy(vc + (g * max_len + pos) * hd, v + g * hd, sizeof(float) * (size_t)hd);
        }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && H * (S - start) * hd >= 65536)
        for (int64_t hh = 0; hh < H; ++hh) {
            const float *qh = q + hh * hd;
            const float *kb = kc + (hh / rep) * max_len * hd, *vb = vc + (hh / rep) * max_len * hd;
            float *sc = scores + hh * S, mx = -INFINITY;
            for (int64_t s = start; s < S; ++s) {
                const float *ks = kb + s * hd;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < hd; ++i) dot += qh[i] * ks[i];
                sc[s] = dot * scale;
                mx = sc[s] > mx ? sc[s] : mx;
            }
            float sum = 0.f;
            for (int64_t s = start; s < S; ++s) { sc[s] = expf(sc[s] - mx); sum += sc[s]; }
            float *o = att + hh * hd;
            for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
            for (int64_t s = start; s < S; ++s) {
                const float p = sc[s] / sum;
                const float *vs = vb + s * hd;
#pragma omp simd
                for (int64_t i = 0; i < hd; ++i) o[i] += p * vs[i];
            }
        }
        rc |= mc_int4_matmul(att, 1, nq, D, (const uint8_t *)t[F_O], (const uint16_t *)t[F_O_S], group, x, nthreads);
        for (int64_t i = 0; i < D; ++i) h[i] += x[i];
        rmsnorm(h, (const float *)t[F_NORM2], D, eps, x);
        rc |= mc_int4_matmul(x, 1, D, 2 * I, (const uint8_t *)t[F_GU], (const uint16_t *)t[F_GU_S], group, gu, nthreads);
        for (int64_t i = 0; i < I; ++i) {
            const float g = gu[i];
            act[i] = g / (1.f + expf(-g)) * gu[I + i];
        }
        rc |= mc_int4_matmul(act, 1, I, D, (const uint8_t *)t[F_DOWN], (const uint16_t *)t[F_DOWN_S], group, x, nthreads);
        for (int64_t i = 0; i < D; ++i) h[i] += x[i];
    }
    if (!rc && final_norm) rmsnorm(h, final_norm, D, eps, out);
    free(buf);
    return rc;
}
