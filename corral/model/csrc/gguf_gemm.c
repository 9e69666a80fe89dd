/* y[M, ldy] (columns 0..N-1) = x[M,K] @ W^T with W's rows in GGUF blocks, read in place.
 *
 * Compiled on first use by corral/model/gguf_kernels.py, once per instruction-set variant
 * (AVX-512, AVX2+FMA+F16C, portable; -ffp-contract=off) and called through ctypes. W is given
 * as a base pointer and one byte offset per output row, so the rows can come straight from a
 * memory-mapped .gguf file: fused layers (q|k|v, gate|up) and the rotary row permutation are
 * offset tables, never copies.
 *
 * Types (ggml ids), per block along K:
 *   F32 0, F16 1, BF16 30: one value;
 *   Q4_0 2 (32: fp16 d, 16 qs):          w = d*((q&15)-8)
 *   Q4_1 3 (32: fp16 d, fp16 m, 16 qs):  w = d*q + m
 *   Q8_0 8 (32: fp16 d, 32 int8):        w = d*q
 *   Q4_K 12 (256: d, dmin, 12 packed 6-bit scales/mins, 128 qs):     w = (d*sc)*q - dmin*mn
 *   Q5_K 13 (256: as Q4_K plus 32 bytes of 5th bits):                 w = (d*sc)*q - dmin*mn
 *   Q6_K 14 (256: 128 low nibbles, 64 high 2-bit pairs, 16 int8 scales, d): w = (d*sc)*(q-32)
 * Each weight is rebuilt exactly as gguf's numpy dequantizer does (fp32 operations in its
 * order, -ffp-contract=off keeps them separate roundings), so against the dequantized fp32
 * weights only the order of the dot-product sums differs.
 *
 * Work split: threads take tiles of NR=4 output rows; a tile is dequantized once into a
 * thread-local fp32 buffer (L1/L2) and every row of x is dotted against it, MR=4 at a time.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define NR 4
#define MR 4

static inline float fp16_to_fp32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ---- one row (K values) -> K floats, per type ---------------------------------------------- */

static void dq_f32(const uint8_t *b, int K, float *out) { memcpy(out, b, sizeof(float) * K); }

static void dq_f16(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K; i++) out[i] = fp16_to_fp32(b + 2 * i);
}

static void dq_bf16(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K; i++) {
        uint16_t h;
        memcpy(&h, b + 2 * i, 2);
        uint32_t bits = (uint32_t)h << 16;
        memcpy(out + i, &bits, 4);
    }
}

static void dq_q4_0(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 32; i++, b += 18, out += 32) {
        const float d = fp16_to_fp32(b);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)(b[2 + j] & 15) - 8);
            out[j + 16] = d * (float)((int)(b[2 + j] >> 4) - 8);
        }
    }
}

static void dq_q4_1(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 32; i++, b += 20, out += 32) {
        const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
        const uint8_t *qs = b + 4;
#ifdef __AVX512F__
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        const __m128i q = _mm_loadu_si128((const __m128i *)qs);
        const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0f));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0f));
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), vm));
        _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), vm));
#else
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)(qs[j] & 0x0f) + m;
            out[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
#endif
    }
}

static void dq_q8_0(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 32; i++, b += 34, out += 32) {
        const float d = fp16_to_fp32(b);
        const int8_t *q = (const int8_t *)(b + 2);
#ifdef __AVX512F__
        const __m512 vd = _mm512_set1_ps(d);
        const __m128i q0 = _mm_loadu_si128((const __m128i *)q);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(q + 16));
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), vd));
        _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), vd));
#else
        for (int j = 0; j < 32; j++) out[j] = (float)q[j] * d;
#endif
    }
}

/* Q4_K/Q5_K: 8 sub-blocks of 32, 6-bit scale and min each, packed in 12 bytes. */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

static void dq_q4_k(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 256; i++, b += 144, out += 256) {
        const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
        const uint8_t *sc6 = b + 4, *qs = b + 16;
        for (int s = 0; s < 8; s++) {
            int sc, mn;
            k_scale_min(sc6, s, &sc, &mn);
            const float ds = d * (float)sc, dm = dmin * (float)mn;
            const uint8_t *q = qs + (s / 2) * 32;
            const int shift = (s & 1) * 4;
            for (int l = 0; l < 32; l++) out[s * 32 + l] = ds * (float)((q[l] >> shift) & 15) - dm;
        }
    }
}

static void dq_q5_k(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 256; i++, b += 176, out += 256) {
        const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
        const uint8_t *sc6 = b + 4, *qh = b + 16, *qs = b + 48;
        for (int s = 0; s < 8; s++) {
            int sc, mn;
            k_scale_min(sc6, s, &sc, &mn);
            const float ds = d * (float)sc, dm = dmin * (float)mn;
            const uint8_t *q = qs + (s / 2) * 32;
            const int shift = (s & 1) * 4;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 15) | (((qh[l] >> s) & 1) << 4);
                out[s * 32 + l] = ds * (float)v - dm;
            }
        }
    }
}

static void dq_q6_k(const uint8_t *b, int K, float *out) {
    for (int i = 0; i < K / 256; i++, b += 210, out += 256) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = fp16_to_fp32(b + 208);
        for (int c = 0; c < 8; c++) {  /* chunks of 32 values */
            const uint8_t *lo = ql + (c / 4) * 64 + (c % 2) * 32, *hi = qh + (c / 4) * 32;
            const int lshift = ((c / 2) % 2) * 4, hshift = 2 * (c % 4);
            for (int l = 0; l < 32; l++) {
                const int e = c * 32 + l;
                const int q = (((lo[l] >> lshift) & 15) | (((hi[l] >> hshift) & 3) << 4)) - 32;
                out[e] = (d * (float)scales[e / 16]) * (float)q;
            }
        }
    }
}

typedef void (*dequant_fn)(const uint8_t *, int, float *);

static dequant_fn pick(int type) {
    switch (type) {
    case 0: return dq_f32;
    case 1: return dq_f16;
    case 2: return dq_q4_0;
    case 3: return dq_q4_1;
    case 8: return dq_q8_0;
    case 12: return dq_q4_k;
    case 13: return dq_q5_k;
    case 14: return dq_q6_k;
    case 30: return dq_bf16;
    default: return 0;
    }
}

/* ---- dot products -------------------------------------------------------------------------- */

/* y[i*ldy + j] = dot(x[i*K ..], w[j*K ..]) for i < mr, j < nr (compile-time sizes when
 * inlined with constants, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void micro(const int mr, const int nr,
                                                        const float *x, const float *w, int K,
                                                        float *y, int ldy) {
    int k = 0;
    float tail[MR][NR] = {{0}};
#if defined(__AVX512F__)
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_ps(w + (size_t)j * K + k);
        for (int i = 0; i < mr; i++) {
            const __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) tail[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm256_loadu_ps(w + (size_t)j * K + k);
        for (int i = 0; i < mr; i++) {
            const __m256 xv = _mm256_loadu_ps(x + (size_t)i * K + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]),
                                  _mm256_extractf128_ps(acc[i][j], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            tail[i][j] = _mm_cvtss_f32(s);
        }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = vdupq_n_f32(0.0f);
    for (; k + 4 <= K; k += 4) {
        float32x4_t wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = vld1q_f32(w + (size_t)j * K + k);
        for (int i = 0; i < mr; i++) {
            const float32x4_t xv = vld1q_f32(x + (size_t)i * K + k);
            for (int j = 0; j < nr; j++) acc[i][j] = vfmaq_f32(acc[i][j], xv, wv[j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) tail[i][j] = vaddvq_f32(acc[i][j]);
#else
    /* 16 independent lanes per output, summed at the end: vectorizes without reassociation */
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float lane[16] = {0};
            const float *xi = x + (size_t)i * K, *wj = w + (size_t)j * K;
            for (int kk = 0; kk + 16 <= K; kk += 16)
                for (int l = 0; l < 16; l++) lane[l] += xi[kk + l] * wj[kk + l];
            for (int l = 0; l < 16; l++) tail[i][j] += lane[l];
        }
    k = K - K % 16;
#endif
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float s = tail[i][j];
            for (int kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * w[(size_t)j * K + kk];
            y[(size_t)i * ldy + j] = s;
        }
}

/* All rows of x against one tile of nr dequantized weight rows. */
static void tile_rows(const float *x, int M, int K, const float *w, int nr, float *y, int ldy) {
    int i = 0;
    if (nr == NR) {
        for (; i + MR <= M; i += MR) micro(MR, NR, x + (size_t)i * K, w, K, y + (size_t)i * ldy, ldy);
        switch (M - i) {
        case 3: micro(3, NR, x + (size_t)i * K, w, K, y + (size_t)i * ldy, ldy); break;
        case 2: micro(2, NR, x + (size_t)i * K, w, K, y + (size_t)i * ldy, ldy); break;
        case 1: micro(1, NR, x + (size_t)i * K, w, K, y + (size_t)i * ldy, ldy); break;
        }
        return;
    }
    for (int j = 0; j < nr; j++)
        for (i = 0; i < M; i++)
            micro(1, 1, x + (size_t)i * K, w + (size_t)j * K, K, y + (size_t)i * ldy + j, ldy);
}

/* ---- public entry points (ctypes); x, y row-major; returns 0, or -1 for an unknown type ---- */

int gguf_gemm(int type, const float *x, int M, int K, const uint8_t *base, const int64_t *offsets,
              int N, float *y, int ldy, int n_threads) {
    const dequant_fn dq = pick(type);
    if (!dq) return -1;
    const int n_tiles = (N + NR - 1) / NR;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = (float *)malloc(sizeof(float) * NR * (size_t)K);
#pragma omp for schedule(static)
        for (int t = 0; t < n_tiles; t++) {
            const int n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
            for (int j = 0; j < nr; j++) dq(base + offsets[n0 + j], K, buf + (size_t)j * K);
            tile_rows(x, M, K, buf, nr, y + n0, ldy);
        }
        free(buf);
    }
    return 0;
}

/* out[n, K] = the fp32 weights of rows offsets[0..N-1] (prefill panels, embeddings, tests). */
int gguf_dequant_rows(int type, const uint8_t *base, const int64_t *offsets, int N, int K,
                      float *out, int n_threads) {
    const dequant_fn dq = pick(type);
    if (!dq) return -1;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (N > 8)
    for (int n = 0; n < N; n++) dq(base + offsets[n], K, out + (size_t)n * K);
    return 0;
}

/* Which instruction set this build's dot products use (tests check the variant they asked). */
const char *gguf_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return "neon";
#else
    return "portable";
#endif
}
