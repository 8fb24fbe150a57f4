/* One transformer layer of a decode or verify step on the CPU, in two calls (kernels/step.py), or
   every layer of a step over a scratch area in one (`ghostline_scratch_step`).

   `ghostline_qkv`: input RMSNorm, the fused q|k|v int8 projection, QK-norm (Gemma) and RoPE.
   `ghostline_attn_mlp`: attention of the new tokens over the cache's segments, o_proj, the norms and
   residuals, the gate|up and down int8 projections. The caller writes the new keys and values into
   its cache between the two (so every cache keeps its own bookkeeping).

   Int8 weight-only products: each activation row is rounded to int16 codes with its own step (the
   error is 1e-4 of the row's largest value at most), then y[m, n] = step[m] * scale[n] * the exact
   int32 dot product of the codes with the int8 row (VNNI's vpdpwssd, or pmaddwd): 32 weights per
   instruction, and the same integer on every path and for any split of the work. Attention handles
   each query on its own with the same key split whatever T is, so a row's result never depends on
   the other rows: a verify step of T tokens gives each token exactly what a decode step of that
   token alone gives. Threads split the output rows of the products and the keys of the attention.
   Built by kernels/step.py with the host compiler (-march=native); the vector paths are chosen at
   compile time (AVX-512, AVX2 + FMA, plain C). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include "simd.h"

#define ROWS 4 /* weight rows per inner block: four independent accumulator chains */

/* Integer dot products of int8 weights with int16 activations, exact in int32 (the caller bounds
   the activations so that no sum can overflow): the same integer on every vector path. */
#if defined(__AVX512BW__)
#define LANES 32
static inline __m512i dpw(__m512i acc, __m512i w, const int16_t *x) { /* acc + pairwise w * x[0..32) */
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512((const void *)x));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512((const void *)x)));
#endif
}

static inline __m512i madd32(const int8_t *q, const int16_t *x, __m512i acc) {
    return dpw(acc, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q)), x);
}

static inline int32_t idot(const int16_t *x, const int8_t *q, long K) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = madd32(q + k, x + k, a0);
        a1 = madd32(q + k + 32, x + k + 32, a1);
    }
    if (k < K) a0 = madd32(q + k, x + k, a0);
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}

/* One weight row against P activation rows (x rows K apart): each weight vector is widened once
   and used P times. out[p * stride]. */
#define PAIRS 4
static inline void idot1xP(const int16_t *x, const int8_t *q, long K, int P, int32_t *out, int stride) {
    __m512i acc[PAIRS];
    for (int p = 0; p < PAIRS; p++) acc[p] = _mm512_setzero_si512();
    for (long k = 0; k < K; k += 32) {
        __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + k)));
        for (int p = 0; p < PAIRS; p++) {
            if (p >= P) break;
            acc[p] = dpw(acc[p], w, x + p * K + k);
        }
    }
    for (int p = 0; p < P; p++) out[p * stride] = _mm512_reduce_add_epi32(acc[p]);
}

/* Four weight rows against P activation rows, out[p * 4 + r]. */
static inline void idot4xP(const int16_t *x, const int8_t *q, long K, int P, int32_t *out) {
    for (int r = 0; r < 4; r++) idot1xP(x, q + r * K, K, P, out + r, 4);
}
#elif defined(__AVX2__)
#define LANES 16
static inline __m256i madd16(const int8_t *q, const int16_t *x, __m256i acc) {
    __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)x)));
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline int32_t idot(const int16_t *x, const int8_t *q, long K) {
    __m256i acc = _mm256_setzero_si256();
    for (long k = 0; k < K; k += 16) acc = madd16(q + k, x + k, acc);
    return hsum_epi32(acc);
}

#else
#define LANES 1
static inline int32_t idot(const int16_t *x, const int8_t *q, long K) {
    int32_t acc = 0;
    for (long k = 0; k < K; k++) acc += (int32_t)q[k] * x[k];
    return acc;
}

#endif

/* Four weight rows, one after another: rows are contiguous, so each thread reads one sequential
   stream. Reading the four side by side (four streams a thread) halved the bandwidth here
   (18 against 36 GB/s from memory, AMD EPYC, two threads). */
static inline void idot4(const int16_t *x, const int8_t *q, long K, int32_t *out) {
    for (int r = 0; r < 4; r++) out[r] = idot(x, q + r * K, K);
}

int ghostline_lanes(void) { return LANES; }

/* The largest |activation| code for K terms: 127 * A * K < 2^31 keeps every int32 sum exact. */
static long act_range(long K) {
    long a = 2147483647L / (127L * K);
    return a > 32767 ? 32767 : a;
}

/* x [K] fp32 -> codes [K] int16 with x ~= codes * step; returns step (0 for an all-zero row). The
   rounding error, at most step / 2 per value, is 1e-4 of the row's largest value or less. */
static float quantize_act(const float *x, int16_t *codes, long K) {
    float amax = 0.f;
    long k0 = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; k0 + 16 <= K; k0 += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k0)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (long k = k0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
    if (amax == 0.f) {
        memset(codes, 0, K * sizeof(int16_t));
        return 0.f;
    }
    float range = (float)act_range(K), inv = range / amax;
    long k = 0;
#if defined(__AVX512F__)
    __m512 vinv = _mm512_set1_ps(inv); /* cvtps rounds to nearest even, as nearbyintf does */
    for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256((__m256i *)(codes + k),
                            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv))));
#endif
    for (; k < K; k++) codes[k] = (int16_t)nearbyintf(x[k] * inv);
    return amax / range;
}

/* y [M, N] = x [M, K] @ (q [N, K] * scale [N])^T; K a multiple of LANES (the launcher checks).
   Each row of x is rounded to int16 codes with its own step, then every dot product is exact. */
static void gemv(const float *x, const int8_t *q, const float *scale, float *y, long M, long N, long K, int threads) {
    int16_t *codes = malloc(M * K * sizeof(int16_t));
    float step[M];
    for (long m = 0; m < M; m++) step[m] = quantize_act(x + m * K, codes + m * K, K);
    long blocks = N / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)
    for (long b = 0; b < blocks; b++) {
        long n = b * ROWS;
#ifdef PAIRS
        int32_t out[ROWS * PAIRS];
        for (long m = 0; m < M; m += PAIRS) {
            int P = M - m < PAIRS ? (int)(M - m) : PAIRS;
            if (P == 1)
                idot4(codes + m * K, q + n * K, K, out);
            else
                idot4xP(codes + m * K, q + n * K, K, P, out);
            for (int p = 0; p < P; p++)
                for (int r = 0; r < ROWS; r++)
                    y[(m + p) * N + n + r] = (float)out[p * ROWS + r] * step[m + p] * scale[n + r];
        }
#else
        int32_t out[ROWS];
        for (long m = 0; m < M; m++) {
            idot4(codes + m * K, q + n * K, K, out);
            for (int r = 0; r < ROWS; r++) y[m * N + n + r] = (float)out[r] * step[m] * scale[n + r];
        }
#endif
    }
    for (long n = blocks * ROWS; n < N; n++)
        for (long m = 0; m < M; m++) y[m * N + n] = (float)idot(codes + m * K, q + n * K, K) * step[m] * scale[n];
    free(codes);
}

void ghostline_gemv_int8(const float *x, const int8_t *q, const float *scale, float *y, long M, long N, long K,
                         int threads) {
    gemv(x, q, scale, y, M, N, K, threads);
}

/* A layer's weights and shape, filled by kernels/step.py (field order matters: it mirrors Layer). */
typedef struct {
    long D, H, KV, hd, F, window; /* width, query heads, kv heads, head dim, MLP width, window (0: none) */
    long gemma;                   /* sandwich norms, QK-norm, tanh-GELU (else Llama: SiLU) */
    float eps, scale, softcap;    /* RMSNorm epsilon, attention scale, score soft-cap (0: none) */
    const int8_t *qkv, *o, *gu, *down;            /* [(H+2KV)hd, D], [D, H hd], [2F, D], [D, F] */
    const float *qkv_s, *o_s, *gu_s, *down_s;     /* fp32 row scales */
    const float *qkv_b;                           /* fp32 bias [(H+2KV)hd] or NULL */
    const float *n_in, *n_post_attn, *n_pre_ff, *n_post_ff, *n_q, *n_k; /* norm weights, offset added */
    int threads;
} Layer;

/* out = x / rms(x) * w over n values (out may be x); the statistics in fp32 as engine.model.RMSNorm. */
static void rmsnorm(const float *x, const float *w, float *out, long n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (long i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (long i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* x [hd] rotated in place by cos/sin [hd] (rotate-half layout, as kernels.rope_shift.apply_rope). */
static void rope(float *x, const float *c, const float *s, long hd) {
    long h = hd / 2;
    for (long i = 0; i < h; i++) {
        float x1 = x[i], x2 = x[i + h];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + h] = x2 * c[i + h] + x1 * s[i + h];
    }
}

/* x [T, D] -> q [T, H, hd], k and v [KV, T, hd] (normed, rotated); work holds T * (D + (H+2KV) hd) floats. */
void ghostline_qkv(const Layer *L, const float *x, long T, const float *cos, const float *sin, float *q, float *k,
                   float *v, float *work) {
    long D = L->D, hd = L->hd, H = L->H, KV = L->KV, N = (H + 2 * KV) * hd;
    float *h = work, *y = work + T * D;
    for (long t = 0; t < T; t++) rmsnorm(x + t * D, L->n_in, h + t * D, D, L->eps);
    gemv(h, L->qkv, L->qkv_s, y, T, N, D, L->threads);
    for (long t = 0; t < T; t++) {
        float *row = y + t * N;
        if (L->qkv_b)
            for (long i = 0; i < N; i++) row[i] += L->qkv_b[i];
        for (long j = 0; j < H + KV; j++) {
            float *head = row + j * hd;
            if (L->gemma) rmsnorm(head, j < H ? L->n_q : L->n_k, head, hd, L->eps);
            rope(head, cos + t * hd, sin + t * hd, hd);
        }
        memcpy(q + t * H * hd, row, H * hd * sizeof(float));
        for (long j = 0; j < KV; j++) {
            memcpy(k + (j * T + t) * hd, row + (H + j) * hd, hd * sizeof(float));
            memcpy(v + (j * T + t) * hd, row + (H + KV + j) * hd, hd * sizeof(float));
        }
    }
}

/* Keys and values the caller's cache holds: segment i has rows [0, n[i]) at positions start[i]..,
   kv head j's row r at K[i] + j * stride[i] + r * hd. */
#define NSEG 6 /* segments an attention call reads at most (kernels/step.py's MAX_SEGMENTS) */
typedef struct {
    long count;
    const float *K[NSEG], *V[NSEG];
    long n[NSEG], start[NSEG], stride[NSEG];
} Segments;

#define SPLIT 2 /* key parts per query: fixed, so a query's sums never depend on the thread count */
#define MAXG 16 /* query heads per kv head */
#define MAXT 16 /* query rows an attention call takes at once (kernels/step.py's MAX_ROWS) */
#define RG 4    /* query rows that share a walk over the keys (their weighted values stay in L1) */

#define KBLK 16 /* value rows a block of the weighted sum keeps in L1 */

/* The three inner loops of attention, with AVX-512 where the head dim is a multiple of 16. Each gives
   a row the same bits whatever else the call holds (lane-wise arithmetic, a fixed summation order). */
static inline float dot(const float *a, const float *b, long n) {
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        long e = 0;
        for (; e + 64 <= n; e += 64) {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e + 16), _mm512_loadu_ps(b + e + 16), s1);
            s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e + 32), _mm512_loadu_ps(b + e + 32), s2);
            s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e + 48), _mm512_loadu_ps(b + e + 48), s3);
        }
        for (; e < n; e += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), s0);
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
#endif
    float d = 0.f;
    for (long e = 0; e < n; e++) d += a[e] * b[e];
    return d;
}

/* w [r] = e^(sc [r] - m) for n <= KBLK scores (m their running max, so every exponent is <= 0). */
static inline void weights(const float *sc, float m, float *w, long n) {
#if defined(__AVX512F__)
    __mmask16 k = (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(w, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc), _mm512_set1_ps(m))));
#else
    for (long r = 0; r < n; r++) w[r] = expf(sc[r] - m);
#endif
}

/* acc [hd] += sum over r < n of w [r] v [r, hd], row after row: four vectors of acc stay in registers
   across the n value rows. */
static inline void accumulate(float *acc, const float *w, const float *v, long n, long hd) {
#if defined(__AVX512F__)
    if (hd % 16 == 0) {
        long e = 0;
        for (; e + 64 <= hd; e += 64) {
            __m512 a0 = _mm512_loadu_ps(acc + e), a1 = _mm512_loadu_ps(acc + e + 16);
            __m512 a2 = _mm512_loadu_ps(acc + e + 32), a3 = _mm512_loadu_ps(acc + e + 48);
            for (long r = 0; r < n; r++) {
                __m512 wr = _mm512_set1_ps(w[r]);
                const float *vr = v + r * hd + e;
                a0 = _mm512_fmadd_ps(wr, _mm512_loadu_ps(vr), a0);
                a1 = _mm512_fmadd_ps(wr, _mm512_loadu_ps(vr + 16), a1);
                a2 = _mm512_fmadd_ps(wr, _mm512_loadu_ps(vr + 32), a2);
                a3 = _mm512_fmadd_ps(wr, _mm512_loadu_ps(vr + 48), a3);
            }
            _mm512_storeu_ps(acc + e, a0);
            _mm512_storeu_ps(acc + e + 16, a1);
            _mm512_storeu_ps(acc + e + 32, a2);
            _mm512_storeu_ps(acc + e + 48, a3);
        }
        for (; e < hd; e += 16) {
            __m512 a0 = _mm512_loadu_ps(acc + e);
            for (long r = 0; r < n; r++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[r]), _mm512_loadu_ps(v + r * hd + e), a0);
            _mm512_storeu_ps(acc + e, a0);
        }
        return;
    }
#endif
    for (long r = 0; r < n; r++)
        for (long e = 0; e < hd; e++) acc[e] += w[r] * v[r * hd + e];
}

/* Attention of T query rows (positions qpos [T]) over the visible keys of kv head j, for the G
   query heads of j: q [T, H, hd] -> out [T, H, hd] (heads j G .. j G + G - 1 of each row). Each row
   splits its own visible keys into SPLIT parts, each with its own max, sum and weighted values,
   combined in a fixed order: a row's numbers are those of a one-row call, whatever T is. The rows
   share the reading of the keys and values: thread p walks the union of part p of RG rows at a
   time, each key row loaded once for all the rows of the group that see it. */
static void attend_rows(const Layer *L, const Segments *S, long j, const float *q, long T, const long *qpos,
                        float *out, float *scores, float *part_acc, int threads) {
    long hd = L->hd, H = L->H, G = H / L->KV, C = S->count;
    long lo[MAXT][NSEG], base[MAXT][NSEG + 1], chunk[MAXT], total[MAXT], off[MAXT], widest = 0, so = 0;
    for (long t = 0; t < T; t++) {
        base[t][0] = 0;
        for (long i = 0; i < C; i++) {
            long first = L->window ? qpos[t] - L->window + 1 - S->start[i] : 0;
            lo[t][i] = first > 0 ? first : 0;
            long last = qpos[t] - S->start[i] + 1, hi = last < S->n[i] ? last : S->n[i];
            base[t][i + 1] = base[t][i] + (hi > lo[t][i] ? hi - lo[t][i] : 0);
        }
        total[t] = base[t][C];
        chunk[t] = (total[t] + SPLIT - 1) / SPLIT;
        off[t] = so; /* row t's scores: [total[t], G] */
        so += total[t] * G;
        if (total[t] > widest) widest = total[t];
    }
    float m[MAXT][SPLIT][MAXG], l[MAXT][SPLIT][MAXG];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && widest >= 256)
    for (int p = 0; p < SPLIT; p++) {
        long from[MAXT], to[MAXT]; /* row t's part p in segment i: key rows [from, to) */
        float mp[MAXT][MAXG], lp[MAXT][MAXG]; /* this thread's max and sum (m, l: shared, written once) */
        for (long t = 0; t < T; t++) {
            for (long g = 0; g < G; g++) {
                mp[t][g] = -INFINITY;
                lp[t][g] = 0.f;
            }
            memset(part_acc + (t * SPLIT + p) * G * hd, 0, G * hd * sizeof(float));
        }
        for (long t0 = 0; t0 < T; t0 += RG)
        for (int pass = 0; pass < 2; pass++) { /* 0: scores and their max; 1: weights and values */
            long t1 = t0 + RG < T ? t0 + RG : T;
            for (long i = 0; i < C; i++) {
                long rmin = -1, rmax = -1;
                for (long t = t0; t < t1; t++) {
                    long a = p * chunk[t], b = a + chunk[t] < total[t] ? a + chunk[t] : total[t];
                    long x0 = a > base[t][i] ? a : base[t][i], x1 = b < base[t][i + 1] ? b : base[t][i + 1];
                    from[t] = lo[t][i] + x0 - base[t][i];
                    to[t] = x1 > x0 ? from[t] + x1 - x0 : from[t];
                    if (to[t] > from[t]) {
                        if (rmin < 0 || from[t] < rmin) rmin = from[t];
                        if (to[t] > rmax) rmax = to[t];
                    }
                }
                if (pass == 0) {
                    for (long r = rmin; r < rmax; r++) {
                        const float *kr = S->K[i] + j * S->stride[i] + r * hd;
                        for (long t = t0; t < t1; t++) {
                            if (r < from[t] || r >= to[t]) continue;
                            const float *qt = q + (t * H + j * G) * hd;
                            long idx = base[t][i] + r - lo[t][i];
                            for (long g = 0; g < G; g++) {
                                float d = dot(qt + g * hd, kr, hd) * L->scale;
                                if (L->softcap > 0.f) d = tanhf(d / L->softcap) * L->softcap;
                                scores[off[t] + g * total[t] + idx] = d;
                                if (d > mp[t][g]) mp[t][g] = d;
                            }
                        }
                    }
                    continue;
                }
                for (long r0 = rmin; r0 < rmax; r0 += KBLK) { /* a block of value rows, kept in L1 */
                    long r1 = r0 + KBLK < rmax ? r0 + KBLK : rmax;
                    const float *vb = S->V[i] + j * S->stride[i];
                    for (long t = t0; t < t1; t++) {
                        long a = r0 > from[t] ? r0 : from[t], b = r1 < to[t] ? r1 : to[t];
                        if (a >= b) continue;
                        float *acc = part_acc + (t * SPLIT + p) * G * hd;
                        for (long g = 0; g < G; g++) {
                            float w[KBLK];
                            weights(scores + off[t] + g * total[t] + base[t][i] + a - lo[t][i], mp[t][g], w, b - a);
                            for (long r = a; r < b; r++) lp[t][g] += w[r - a];
                            accumulate(acc + g * hd, w, vb + a * hd, b - a, hd);
                        }
                    }
                }
            }
        }
        for (long t = 0; t < T; t++)
            for (long g = 0; g < G; g++) {
                m[t][p][g] = mp[t][g];
                l[t][p][g] = lp[t][g];
            }
    }
    for (long t = 0; t < T; t++)
        for (long g = 0; g < G; g++) {
            float mx = -INFINITY;
            for (int p = 0; p < SPLIT; p++)
                if (m[t][p][g] > mx) mx = m[t][p][g];
            float denom = 0.f, f[SPLIT];
            for (int p = 0; p < SPLIT; p++) {
                f[p] = m[t][p][g] == -INFINITY ? 0.f : expf(m[t][p][g] - mx);
                denom += l[t][p][g] * f[p];
            }
            float *og = out + (t * H + j * G + g) * hd;
            for (long e = 0; e < hd; e++) {
                float s = 0.f;
                for (int p = 0; p < SPLIT; p++) s += part_acc[((t * SPLIT + p) * G + g) * hd + e] * f[p];
                og[e] = s / denom;
            }
        }
}

/* The MLP's gated activation a [i] = act(gate [i]) * up [i] over n values: tanh-GELU (Gemma) or
   SiLU (Llama); e^x from simd.h where AVX-512 is there, libm's tanhf and expf elsewhere. */
static void gated(const float *gate, const float *up, float *a, long n, long gemma) {
    long i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i), y;
        if (gemma) { /* 0.5 g (1 + tanh(u)); tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|) */
            __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                     _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g), g));
            __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(u)));
            __m512 th = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
            th = _mm512_mask_sub_ps(th, _mm512_cmp_ps_mask(u, zero, _CMP_LT_OQ), zero, th);
            y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, th));
        } else { /* g sigmoid(g); sigmoid from e = exp(-|g|): 1 / (1 + e) for g >= 0, e / (1 + e) below */
            __m512 e = exp16(_mm512_sub_ps(zero, _mm512_abs_ps(g)));
            __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, zero, _CMP_LT_OQ), one, e);
            y = _mm512_mul_ps(g, _mm512_div_ps(num, _mm512_add_ps(one, e)));
        }
        _mm512_storeu_ps(a + i, _mm512_mul_ps(y, _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
        float g = gate[i];
        float y = gemma ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) : g / (1.f + expf(-g));
        a[i] = y * up[i];
    }
}

/* x [T, D] += the attention branch and the MLP branch, for new tokens at positions qpos [T] with
   queries q [T, H, hd] over the segments (which already hold the new keys and values).
   work holds T * (H hd + 2D + 3F + keys G + SPLIT G hd) floats (see kernels/step.py). */
void ghostline_attn_mlp(const Layer *L, float *x, long T, const float *q, const long *qpos, const Segments *S,
                        float *work, long keys) {
    long D = L->D, hd = L->hd, H = L->H, KV = L->KV, F = L->F, G = H / KV;
    float *att = work, *o = att + T * H * hd, *h = o + T * D, *gu = h + T * D, *a = gu + T * 2 * F;
    float *scores = a + T * F, *part = scores + T * keys * G;
    for (long t0 = 0; t0 < T; t0 += MAXT)
        for (long j = 0; j < KV; j++)
            attend_rows(L, S, j, q + t0 * H * hd, T - t0 < MAXT ? T - t0 : MAXT, qpos + t0, att + t0 * H * hd, scores,
                        part, L->threads);
    gemv(att, L->o, L->o_s, o, T, D, H * hd, L->threads);
    for (long t = 0; t < T; t++) {
        float *xt = x + t * D, *ot = o + t * D;
        if (L->gemma) {
            rmsnorm(ot, L->n_post_attn, ot, D, L->eps);
            for (long i = 0; i < D; i++) xt[i] += ot[i];
            rmsnorm(xt, L->n_pre_ff, h + t * D, D, L->eps);
        } else {
            for (long i = 0; i < D; i++) xt[i] += ot[i];
            rmsnorm(xt, L->n_post_attn, h + t * D, D, L->eps);
        }
    }
    gemv(h, L->gu, L->gu_s, gu, T, 2 * F, D, L->threads);
#pragma omp parallel for schedule(static) num_threads(L->threads) if (L->threads > 1 && T > 1)
    for (long t = 0; t < T; t++) gated(gu + t * 2 * F, gu + t * 2 * F + F, a + t * F, F, L->gemma);
    gemv(a, L->down, L->down_s, o, T, D, F, L->threads);
    for (long t = 0; t < T; t++) {
        float *xt = x + t * D, *ot = o + t * D;
        if (L->gemma) rmsnorm(ot, L->n_post_ff, ot, D, L->eps);
        for (long i = 0; i < D; i++) xt[i] += ot[i];
    }
}

/* Where a scratch step's keys and values live (engine.cache.ScratchCache, batch 1): layer l's kv
   head j has prefix rows [0, start) at pk/pv + l * p_layer + j * p_head (positions 0..) and scratch
   rows at sk/sv + l * s_layer + j * s_head (row r at position start + r); rows are hd floats. */
typedef struct {
    float *pk, *pv, *sk, *sv;
    long p_layer, p_head, s_layer, s_head, start;
} Planes;

/* Every layer of a decode or verify step of T tokens whose keys and values go to scratch rows
   [i, i + T): per layer the same two halves as ghostline_qkv and ghostline_attn_mlp with the rows
   written between them, so the numbers are those of the per-layer calls, without a return to
   Python per layer. x [T, D] in place; cos/sin: each layer's RoPE table [T, hd]. work holds
   q, k, v (T (H + 2KV) hd floats), then the larger of what ghostline_qkv and ghostline_attn_mlp
   (keys = start + i + T) need: the two halves use it one after the other. */
void ghostline_scratch_step(const Layer *layers, long n_layers, float *x, long T, const float *const *cos,
                            const float *const *sin, const long *qpos, const Planes *P, long i, float *work) {
    for (long l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        long H = L->H, KV = L->KV, hd = L->hd;
        float *q = work, *k = q + T * H * hd, *v = k + KV * T * hd, *rest = v + KV * T * hd;
        ghostline_qkv(L, x, T, cos[l], sin[l], q, k, v, rest);
        Segments S = {.count = 2};
        for (long j = 0; j < KV; j++)
            for (long t = 0; t < T; t++) {
                memcpy(P->sk + l * P->s_layer + j * P->s_head + (i + t) * hd, k + (j * T + t) * hd, hd * sizeof(float));
                memcpy(P->sv + l * P->s_layer + j * P->s_head + (i + t) * hd, v + (j * T + t) * hd, hd * sizeof(float));
            }
        S.K[0] = P->pk + l * P->p_layer, S.V[0] = P->pv + l * P->p_layer;
        S.n[0] = P->start, S.start[0] = 0, S.stride[0] = P->p_head;
        S.K[1] = P->sk + l * P->s_layer, S.V[1] = P->sv + l * P->s_layer;
        S.n[1] = i + T, S.start[1] = P->start, S.stride[1] = P->s_head;
        ghostline_attn_mlp(L, x, T, q, qpos, &S, rest, P->start + i + T);
    }
}

/* SEC's state copying over a scratch area: for each of n_layers layers, the keys and values of x
   [T, D] (the exit hidden state, the same input for every layer): input RMSNorm, the k|v rows of
   the fused product, K-norm (Gemma) and RoPE, written to scratch rows [i, i + T). The q rows are
   never computed. work holds T (D + 2 KV hd) floats. */
void ghostline_scratch_kv(const Layer *layers, long n_layers, const float *x, long T, const float *const *cos,
                          const float *const *sin, const Planes *P, long i, float *work) {
    for (long l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        long D = L->D, hd = L->hd, H = L->H, KV = L->KV, N = 2 * KV * hd;
        float *h = work, *y = work + T * D;
        for (long t = 0; t < T; t++) rmsnorm(x + t * D, L->n_in, h + t * D, D, L->eps);
        gemv(h, L->qkv + H * hd * D, L->qkv_s + H * hd, y, T, N, D, L->threads);
        for (long t = 0; t < T; t++) {
            float *row = y + t * N;
            if (L->qkv_b)
                for (long j = 0; j < N; j++) row[j] += L->qkv_b[H * hd + j];
            for (long j = 0; j < KV; j++) {
                float *key = row + j * hd;
                if (L->gemma) rmsnorm(key, L->n_k, key, hd, L->eps);
                rope(key, cos[l] + t * hd, sin[l] + t * hd, hd);
                memcpy(P->sk + l * P->s_layer + j * P->s_head + (i + t) * hd, key, hd * sizeof(float));
                memcpy(P->sv + l * P->s_layer + j * P->s_head + (i + t) * hd, row + (KV + j) * hd, hd * sizeof(float));
            }
        }
    }
}

/* PIE's splice on the CPU (kernels/rope_shift.py): in every plane p of k/v [planes, cap, hd] (layer
   p / KV), rows [src, src + n) move to dst and the keys turn by the layer's cos/sin [L, hd]. The
   arithmetic of rope_shift_cpu, each product rounded on its own (no fused multiply-add, hence the
   attribute), so both give the same bits: o1 = x1 cos - x2 sin, o2 = x2 cos + x1 sin. One pass
   over the rows (torch's version makes five), rows taken from the far end when moving up. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void ghostline_shift(float *k, float *v, long planes, long KV, long cap, long hd, long src, long n, long dst,
                     const float *cos, const float *sin, int threads) {
    long h = hd / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long p = 0; p < planes; p++) {
        const float *c = cos + (p / KV) * hd, *s = sin + (p / KV) * hd;
        float *kp = k + p * cap * hd, *vp = v + p * cap * hd;
        float row[hd];
        memmove(vp + dst * hd, vp + src * hd, n * hd * sizeof(float));
        for (long r = 0; r < n; r++) {
            long i = dst > src ? n - 1 - r : r;
            memcpy(row, kp + (src + i) * hd, hd * sizeof(float));
            float *o = kp + (dst + i) * hd;
            for (long e = 0; e < h; e++) {
                float a = row[e] * c[e], b = row[e + h] * s[e];
                o[e] = a - b;
                float a2 = row[e + h] * c[e + h], b2 = row[e] * s[e + h];
                o[e + h] = a2 + b2;
            }
        }
    }
}
