/* Prefill attention on the CPU with bf16 products (AVX512-BF16's vdpbf16ps), for encoding chunks of
   many tokens over a long cache (kernels/segment_attention.py: `flash_attention`).

   torch's fused CPU attention runs its products in fp32 at 60-175 GFLOP/s here; bf16 products with
   fp32 sums run at ~430. Queries (times the scale), keys, values and the probabilities are rounded
   to bf16, as torch's bf16 attention does; scores, the softmax and the output stay fp32.

   Layout: the G query heads of a kv head are folded into rows r = t * G + g (query t, head g), so
   every row of a block reads the same keys, and rows of one query share a mask. A block of RB rows
   walks its key range in blocks of KB keys with the online softmax of flash attention. Keys are
   packed once per call as [group of 16 keys][hd / 2][16][2] (16 scores per instruction), values as
   [key pair][hd][2] (16 output dims per instruction); both hold pairs of bf16 in 32-bit words. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#include "simd.h"

#define RB 8          /* query rows per block (independent accumulator chains) */
#define KB 64         /* keys per block */
#define MAXHD 256

int ghostline_prefill_bf16(void) { return 1; }

static inline uint16_t bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline uint32_t pair(float a, float b) { return (uint32_t)bf16(a) | ((uint32_t)bf16(b) << 16); }

static inline __m512 dp(__m512 acc, uint32_t a, const uint32_t *b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)_mm512_loadu_si512(b));
}

/* q [H, T, hd], K/V rows [lo, hi) of kv head j at K + j * kstride + row * hd (row i is position
   start + i), qpos [T] increasing, window 0 for none; out [H, T, hd]. work: 2 * KV * n16 * hd
   uint32 words, n16 = (hi - lo) rounded up to 16. */
void ghostline_prefill_attention(const float *q, const float *K, const float *V, long kstride, long H, long KV,
                                 long T, long hd, long start, long lo, long hi, const long *qpos, long window,
                                 float scale, float *out, uint32_t *work, int threads) {
    long G = H / KV, n = hi - lo, n16 = (n + 15) / 16 * 16, h2 = hd / 2;
    uint32_t *Kp = work, *Vp = work + KV * n16 * h2;
    /* pack: Kp[j][g][d2][i] = keys 16g+i, dims 2d2, 2d2+1; Vp[j][kk][d] = keys 2kk, 2kk+1, dim d */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long jg = 0; jg < KV * (n16 / 16); jg++) {
        long j = jg / (n16 / 16), g = jg % (n16 / 16);
        uint32_t *kp = Kp + (j * n16 + g * 16) * h2, *vp = Vp + (j * n16 + g * 16) * h2;
        for (long i = 0; i < 16; i++) {
            long key = g * 16 + i;
            const float *kr = K + j * kstride + (lo + key) * hd;
            for (long d2 = 0; d2 < h2; d2++)
                kp[d2 * 16 + i] = key < n ? pair(kr[2 * d2], kr[2 * d2 + 1]) : 0;
        }
        for (long i = 0; i < 16; i += 2) {
            long key = g * 16 + i;
            const float *v0 = V + j * kstride + (lo + key) * hd, *v1 = v0 + hd;
            uint32_t *o = vp + (i / 2) * hd;
            for (long d = 0; d < hd; d++)
                o[d] = pair(key < n ? v0[d] : 0.f, key + 1 < n ? v1[d] : 0.f);
        }
    }
    long R = G * T, blocks = (R + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (long jb = 0; jb < KV * blocks; jb++) {
        long j = jb / blocks, r0 = (jb % blocks) * RB;
        uint32_t qb[RB][MAXHD / 2];
        float acc[RB][MAXHD], s[RB][KB], m[RB], l[RB];
        uint32_t P[RB][KB / 2];
        long qp[RB];
        for (long r = 0; r < RB; r++) {
            long row = r0 + r < R ? r0 + r : R - 1; /* a short last block repeats its last row */
            long t = row / G, h = j * G + row % G;
            const float *qr = q + (h * T + t) * hd;
            for (long d2 = 0; d2 < h2; d2++) qb[r][d2] = pair(qr[2 * d2] * scale, qr[2 * d2 + 1] * scale);
            qp[r] = qpos[t];
            m[r] = -INFINITY;
            l[r] = 0.f;
            memset(acc[r], 0, hd * sizeof(float));
        }
        long qmin = qp[0], qmax = qp[RB - 1];
        long from = window ? qmin - window + 1 - start : 0, to = qmax - start + 1;
        from = from > lo ? from : lo;
        to = to < hi ? to : hi;
        long k0 = lo + (from - lo) / 16 * 16; /* group-aligned */
        for (long kb = k0; kb < to; kb += KB) {
            long nk = to - kb < KB ? (to - kb + 15) / 16 * 16 : KB; /* keys of this block, whole groups */
            /* scores: 16 keys x RB rows per pass over the dims */
            for (long g = 0; g < nk; g += 16) {
                const uint32_t *kp = Kp + (j * n16 + (kb - lo) + g) * h2;
                __m512 a[RB];
                for (long r = 0; r < RB; r++) a[r] = _mm512_setzero_ps();
                for (long d2 = 0; d2 < h2; d2++, kp += 16)
                    for (long r = 0; r < RB; r++) a[r] = dp(a[r], qb[r][d2], kp);
                for (long r = 0; r < RB; r++) _mm512_storeu_ps(s[r] + g, a[r]);
            }
            /* online softmax; masked keys (past the query, before its window, past hi) weigh 0 */
            float alpha[RB];
            for (long r = 0; r < RB; r++) {
                long last = qp[r] - start, first = window ? qp[r] - window + 1 - start : lo;
                if (last > hi - 1) last = hi - 1;
                __mmask16 ok[KB / 16];
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (long g = 0; g < nk; g += 16) {
                    long base = kb + g;
                    __mmask16 mk = 0;
                    for (long i = 0; i < 16; i++) mk |= (__mmask16)((base + i <= last && base + i >= first) << i);
                    ok[g / 16] = mk;
                    mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_loadu_ps(s[r] + g));
                }
                float mb = _mm512_reduce_max_ps(mx);
                if (mb == -INFINITY) { /* nothing visible in this block */
                    alpha[r] = 1.f;
                    memset(P[r], 0, sizeof(P[r]));
                    continue;
                }
                float mn = m[r] > mb ? m[r] : mb;
                alpha[r] = m[r] == -INFINITY ? 0.f : expf(m[r] - mn);
                m[r] = mn;
                __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mn);
                float p[KB];
                for (long g = 0; g < nk; g += 16) {
                    __m512 e = _mm512_maskz_mov_ps(ok[g / 16], exp16(_mm512_sub_ps(_mm512_loadu_ps(s[r] + g), mv)));
                    sum = _mm512_add_ps(sum, e);
                    _mm512_storeu_ps(p + g, e);
                }
                l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
                for (long i = 0; i < nk; i += 2) P[r][i / 2] = pair(p[i], p[i + 1]);
            }
            /* acc = acc * alpha + P V: 16 output dims x RB rows per pass over the key pairs */
            for (long d = 0; d < hd; d += 16) {
                __m512 a[RB];
                for (long r = 0; r < RB; r++) a[r] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d), _mm512_set1_ps(alpha[r]));
                const uint32_t *vp = Vp + (j * n16 + (kb - lo)) * h2 + d;
                for (long kk = 0; kk < nk / 2; kk++, vp += hd)
                    for (long r = 0; r < RB; r++) a[r] = dp(a[r], P[r][kk], vp);
                for (long r = 0; r < RB; r++) _mm512_storeu_ps(acc[r] + d, a[r]);
            }
        }
        for (long r = 0; r < RB && r0 + r < R; r++) {
            long row = r0 + r, t = row / G, h = j * G + row % G;
            float *o = out + (h * T + t) * hd, inv = 1.f / l[r];
            for (long d = 0; d < hd; d++) o[d] = acc[r][d] * inv;
        }
    }
}
#else
int ghostline_prefill_bf16(void) { return 0; }

/* Without AVX512-BF16 the symbol still exists (the loader binds it), but callers ask
   ghostline_prefill_bf16() first and never call it. */
void ghostline_prefill_attention(const float *q, const float *K, const float *V, long kstride, long H, long KV,
                                 long T, long hd, long start, long lo, long hi, const long *qpos, long window,
                                 float scale, float *out, uint32_t *work, int threads) {
    (void)q, (void)K, (void)V, (void)kstride, (void)H, (void)KV, (void)T, (void)hd, (void)start, (void)lo, (void)hi;
    (void)qpos, (void)window, (void)scale, (void)out, (void)work, (void)threads;
}
#endif
