/* modelcore's fused CPU decode step (see the comment below); the int4 matmul and the barrier are in int4_cpu.c. */
#include "kernels.h"

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
 * cache_rows (NULL: row b uses cache row b) maps each input row to its sequence's cache row, so several rows can be
 * consecutive tokens of one sequence: a prefill. Every row writes its K/V before any row attends (a barrier between),
 * and a row attends to its cache row's keys up to its own position, so each token sees exactly the tokens before
 * it: causal attention, with no padding between sequences of different lengths.
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

#if defined(__AVX512F__)
/* vexpf on 16 lanes (GCC leaves the scalar one unvectorized in the loops below): the same reduction and polynomial,
 * with 2^n applied by vscalefps. */
static inline __m512 vexp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, f), f, f), _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* act[i] = silu(g[i]) * u[i] for i in [0, n) */
static void silu_mul(const float *g, const float *u, float *act, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
        const __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), vexp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(act + i, m, _mm512_mul_ps(sg, uv));
    }
}

/* Softmax in place over [start, S) of each of the rep score rows (row r at sc + r * S). */
static void softmax_rows(float *sc, int64_t rep, int64_t start, int64_t S) {
    const int64_t n = S - start;
    for (int64_t r = 0; r < rep; ++r) {
        float *sr = sc + r * S + start;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, sr + i));
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            const __m512 e = vexp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + i), mx));
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            _mm512_mask_storeu_ps(sr + i, m, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            _mm512_mask_storeu_ps(sr + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr + i), inv));
        }
    }
}
#else
static void silu_mul(const float *g, const float *u, float *act, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) act[i] = g[i] / (1.f + vexpf(-g[i])) * u[i];
}

/* Softmax in place over [start, S) of each of the rep score rows (row r at sc + r * S). */
static void softmax_rows(float *sc, int64_t rep, int64_t start, int64_t S) {
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
}
#endif

/* Attention of the `rep` query heads that share one key/value head, over keys [start, S): each key row is read once
 * for all of them. q: rep * hd, o: rep * hd, sc: rep * S floats of scratch. */
#if defined(__AVX512F__)
#define ATT_MAXV 16 /* query heads x head_dim / 16 held in registers */
/* The 8 horizontal sums of v[0..7] as one vector (lane j = sum of v[j]'s 16 lanes): 25 shuffles and adds where eight
 * separate reductions take some 64. */
static inline __m256 reduce8_ps(const __m512 *v) {
    __m512 w[4], x[2];
    for (int p = 0; p < 4; ++p)  /* 128-bit lanes (a0+a2, a1+a3, b0+b2, b1+b3) of a = v[2p], b = v[2p+1] */
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int p = 0; p < 2; ++p)  /* 128-bit lane k: 4 partial sums of v[4p + k] */
        x[p] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(z, z, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(z, z, _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane k of 128-bit lane L now holds v[L] (k even) or v[4 + L] (k odd) */
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), t));
}

/* Queries and outputs in registers while keys and values stream by (with the head count and width known to the
 * compiler), the scores of 8 keys at a time reduced together. */
static inline __attribute__((always_inline)) void attend_fixed(const float *q, const float *kb, const float *vb, const int rep,
                                                              const int nv, int64_t start, int64_t S, float scale, float *sc,
                                                              float *o) {
    const int64_t hd = 16 * nv;
    __m512 qv[ATT_MAXV], ov[ATT_MAXV];
    for (int j = 0; j < rep * nv; ++j) { qv[j] = _mm512_loadu_ps(q + 16 * j); ov[j] = _mm512_setzero_ps(); }
    const __m256 sv = _mm256_set1_ps(scale);
    int64_t s = start;
    for (; s + 8 <= S; s += 8) {
        const float *ks = kb + s * hd;
        /* these keys' values, for the pass after the softmax: both streams in flight at once (the cache comes
         * from memory, not from the caches, for a batch of rows) */
        for (int64_t i = 0; i < 8 * hd; i += 16) _mm_prefetch((const char *)(vb + s * hd + i), _MM_HINT_T0);
        for (int r = 0; r < rep; ++r) {
            __m512 acc[8];
            for (int i = 0; i < 8; ++i) {
                acc[i] = _mm512_mul_ps(qv[r * nv], _mm512_loadu_ps(ks + i * hd));
                for (int j = 1; j < nv; ++j) acc[i] = _mm512_fmadd_ps(qv[r * nv + j], _mm512_loadu_ps(ks + i * hd + 16 * j), acc[i]);
            }
            _mm256_storeu_ps(sc + r * S + s, _mm256_mul_ps(reduce8_ps(acc), sv));
        }
    }
    for (; s < S; ++s) {
        const float *ks = kb + s * hd;
        for (int r = 0; r < rep; ++r) {
            __m512 acc = _mm512_mul_ps(qv[r * nv], _mm512_loadu_ps(ks));
            for (int j = 1; j < nv; ++j) acc = _mm512_fmadd_ps(qv[r * nv + j], _mm512_loadu_ps(ks + 16 * j), acc);
            sc[r * S + s] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    softmax_rows(sc, rep, start, S);
    for (s = start; s < S; ++s) {
        const float *vs = vb + s * hd;
        for (int j = 0; j < nv; ++j) {
            const __m512 v = _mm512_loadu_ps(vs + 16 * j);
            for (int r = 0; r < rep; ++r) ov[r * nv + j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * S + s]), v, ov[r * nv + j]);
        }
    }
    for (int j = 0; j < rep * nv; ++j) _mm512_storeu_ps(o + 16 * j, ov[j]);
}

/* Other widths and groupings with rep * hd <= 16 * ATT_MAXV, hd % 16 == 0: the same code, sizes known at run time. */
static void attend_group_avx512(const float *q, const float *kb, const float *vb, int64_t rep, int64_t start, int64_t S,
                                int64_t hd, float scale, float *sc, float *o) {
    attend_fixed(q, kb, vb, (int)rep, (int)(hd / 16), start, S, scale, sc, o);
}
#endif

static void attend_group(const float *q, const float *kb, const float *vb, int64_t rep, int64_t start, int64_t S,
                         int64_t hd, float scale, float *sc, float *o) {
#if defined(__AVX512F__)
    if (hd == 64 || hd == 128) {  /* Llama/Qwen head widths: a build per (rep, width) */
        switch ((hd / 16) * 8 + rep) {
        case 33: attend_fixed(q, kb, vb, 1, 4, start, S, scale, sc, o); return;
        case 34: attend_fixed(q, kb, vb, 2, 4, start, S, scale, sc, o); return;
        case 35: attend_fixed(q, kb, vb, 3, 4, start, S, scale, sc, o); return;
        case 36: attend_fixed(q, kb, vb, 4, 4, start, S, scale, sc, o); return;
        case 65: attend_fixed(q, kb, vb, 1, 8, start, S, scale, sc, o); return;
        case 66: attend_fixed(q, kb, vb, 2, 8, start, S, scale, sc, o); return;
        default: break;
        }
    }
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
    softmax_rows(sc, rep, start, S);
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
                    const int64_t *cache_rows, float *h, const float *final_norm, float *out, int nthreads) {
    if (B < 1 || H % Hkv || hd % 2) return 1;
    int64_t smax = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (positions[b] < 0 || positions[b] >= max_len || (cache_rows && cache_rows[b] < 0)) return 1;
        smax = positions[b] + 1 > smax ? positions[b] + 1 : smax;
    }
    const int64_t nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv, rep = H / Hkv;
    if (!mc_int4_shape_ok(B, D, nqkv, group) || !mc_int4_shape_ok(B, nq, D, group) || !mc_int4_shape_ok(B, D, 2 * I, group) ||
        !mc_int4_shape_ok(B, I, D, group))
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
            mc_split_range(B, t, nt, &lo, &hi);
            for (int64_t b = lo; b < hi; ++b) rmsnorm(h + b * D, (const float *)tb[F_NORM1], D, eps, x + b * D);
            mc_barrier_wait(&bar);
            mc_int4_team(x, B, D, nqkv, (const uint8_t *)tb[F_QKV], (const uint16_t *)tb[F_QKV_S], group, qkv, xq, dq, t, nt, &bar);
            mc_split_range(B, t, nt, &lo, &hi);
            for (int64_t b = lo; b < hi; ++b) {
                float *r = qkv + b * nqkv;
                const int64_t pos = positions[b];
                if (tb[F_QKV_B]) {
                    const float *bias = (const float *)tb[F_QKV_B];
                    for (int64_t i = 0; i < nqkv; ++i) r[i] += bias[i];
                }
                const float *cs = cos_tab + pos * hd, *sn = sin_tab + pos * hd;
                for (int64_t hh = 0; hh < H + Hkv; ++hh) rope_rotate_half(r + hh * hd, cs, sn, hd);  /* q heads, then k heads */
                const int64_t cr = cache_rows ? cache_rows[b] : b;
                for (int64_t g = 0; g < Hkv; ++g) {
                    memcpy(kc + cr * row_stride + (g * max_len + pos) * hd, r + nq + g * hd, sizeof(float) * (size_t)hd);
                    memcpy(vc + cr * row_stride + (g * max_len + pos) * hd, r + nq + nkv + g * hd, sizeof(float) * (size_t)hd);
                }
            }
            if (t == 0) mc_claim_reset(&bar);
            mc_barrier_wait(&bar);
            int64_t bg0, bg1;  /* rows attend over different lengths: pairs are taken one at a time */
            while (mc_claim(&bar, B * Hkv, 1, &bg0, &bg1)) {
                const int64_t bg = bg0;  /* one (row, key/value head) pair: its rep query heads */
                const int64_t b = bg / Hkv, g = bg % Hkv, S = positions[b] + 1;
                const int64_t start = window > 0 && S > window ? S - window : 0;
                const int64_t off = (cache_rows ? cache_rows[b] : b) * row_stride + g * max_len * hd;
                attend_group(qkv + b * nqkv + g * rep * hd, kc + off, vc + off, rep, start, S, hd, scale,
                             scores + bg * rep * smax, att + b * nq + g * rep * hd);
            }
            mc_barrier_wait(&bar);
            mc_int4_team(att, B, nq, D, (const uint8_t *)tb[F_O], (const uint16_t *)tb[F_O_S], group, x, xq, dq, t, nt, &bar);
            mc_split_range(B, t, nt, &lo, &hi);
            for (int64_t b = lo; b < hi; ++b) {
                for (int64_t i = 0; i < D; ++i) h[b * D + i] += x[b * D + i];
                rmsnorm(h + b * D, (const float *)tb[F_NORM2], D, eps, x + b * D);
            }
            mc_barrier_wait(&bar);
            mc_int4_team(x, B, D, 2 * I, (const uint8_t *)tb[F_GU], (const uint16_t *)tb[F_GU_S], group, gu, xq, dq, t, nt, &bar);
            mc_split_range(B * I, t, nt, &lo, &hi);
            for (int64_t e = lo; e < hi;) {  /* this thread's part of row b: one contiguous run, vectorized */
                const int64_t b = e / I, end = (b + 1) * I < hi ? (b + 1) * I : hi;
                const float *g = gu + b * 2 * I + (e - b * I);  /* gate of element e; its up is I further */
                silu_mul(g, g + I, act + e, end - e);
                e = end;
            }
            mc_barrier_wait(&bar);
            mc_int4_team(act, B, I, D, (const uint8_t *)tb[F_DOWN], (const uint16_t *)tb[F_DOWN_S], group, x, xq, dq, t, nt, &bar);
            mc_split_range(B * D, t, nt, &lo, &hi);
            for (int64_t e = lo; e < hi; ++e) h[e] += x[e];
            mc_barrier_wait(&bar);
        }
    }
    if (final_norm)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * D, final_norm, D, eps, out + b * D);
    free(buf);
    free(xq);
    return 0;
}
