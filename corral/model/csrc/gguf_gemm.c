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
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return "neon";
#else
    return "portable";
#endif
}

/* ==== integer path: int8 activations x quantized weights ======================================
 *
 * As llama.cpp does it: each activation row is quantized once per call to 8 bits, then every
 * weight block is dotted against it in integers and the block's scales are applied in fp32.
 *   32-value types (Q4_0, Q4_1, Q8_0): per 32 activations dx = amax/127, q = round(x*127/amax),
 *     and the block's integer sum xs;
 *   K-quants (Q4_K, Q5_K, Q6_K): per 256 activations one dx (Q8_K-like), sums per 16 and per 32.
 * Per (row, token) and weight block b, with isum the exact int32 dot product of the block:
 *   Q4_0: acc = acc + (dw*dx) * (float)(isum - 8*xs)
 *   Q4_1: acc = acc + ((dw*dx) * (float)isum + (mw*dx) * (float)xs)
 *   Q8_0: acc = acc + (dw*dx) * (float)isum
 *   Q4_K/Q5_K: acc = acc + (d*dx) * (float)sum_s(sc_s*isum_s) - (dmin*dx) * (float)sum_s(mn_s*xs_s)
 *   Q6_K: acc = acc + (d*dx) * (float)sum_16(sc*(isum_16 - 32*xs_16))
 * The integer sums are exact whatever the SIMD width or instruction (maddubs+madd, VNNI dpbusd,
 * scalar C), and the fp32 operations above run in this order, one rounding each, in every
 * variant (SIMD lanes hold different rows, never different parts of one sum): AVX-512+VNNI,
 * AVX-512, AVX2 and the portable build give bit-identical results.
 *
 * Tiles: NR=4 weight rows x up to MR=4 tokens; the rows' blocks are unpacked once per token
 * group, tokens run in chunks of TCHUNK so their int8 rows stay in L2.
 */

#define TCHUNK 128

typedef struct {
    int K, nb;       /* nb: activation blocks per row (K/32 or K/256) */
    const int8_t *q; /* [M][K] */
    const float *d;  /* [M][nb] */
    const int32_t *s; /* [M][K/32]: sums of 32 quantized values */
    const int16_t *s16; /* [M][K/16]: sums of 16 (K-quants) */
} xq_t;

static void quant_row(const float *x, int K, int B, int8_t *q, float *d, int32_t *s, int16_t *s16) {
    for (int b = 0; b < K / B; b++) {
        const float *xb = x + (size_t)b * B;
        float amax = 0.0f;
        for (int i = 0; i < B; i++) {
            const float a = xb[i] < 0 ? -xb[i] : xb[i];
            amax = a > amax ? a : amax;
        }
        const float id = amax > 0 ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        for (int i = 0; i < B; i++) {
            const float v = xb[i] * id;
            int iv = (int)(v >= 0 ? v + 0.5f : v - 0.5f);
            iv = iv > 127 ? 127 : (iv < -127 ? -127 : iv);
            q[(size_t)b * B + i] = (int8_t)iv;
        }
    }
    for (int j = 0; j < K / 32; j++) {
        int t = 0;
        for (int i = 0; i < 32; i++) t += q[j * 32 + i];
        s[j] = t;
    }
    if (s16)
        for (int j = 0; j < K / 16; j++) {
            int t = 0;
            for (int i = 0; i < 16; i++) t += q[j * 16 + i];
            s16[j] = (int16_t)t;
        }
}

#if defined(__AVX2__)
#define INT_SIMD 1
/* exact int32 lanes: lane l = sum of the products of bytes 4l..4l+3 (a unsigned, b signed) */
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* [sum(v0), sum(v1), sum(v2), sum(v3)] of four int32x8 vectors */
static inline __m128i reduce4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static inline int hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline __m128 fp16x4(const uint8_t *const *w, size_t at) {
    uint16_t h[4];
    for (int r = 0; r < 4; r++) memcpy(h + r, w[r] + at, 2);
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)h));
}

static inline __m256i nibbles32(const uint8_t *p) { /* 16 bytes -> lo nibbles | hi nibbles */
    const __m128i q = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}
#endif

/* acc[t][r] over all blocks of a 32-value type, rows w[0..3], tokens t0..t0+mt-1 */
static inline __attribute__((always_inline)) void idot32_n(int type, const uint8_t *const w[NR], const xq_t *X, int t0, int mt,
                   float acc[MR][NR], const uint8_t *const nw[NR]) {
    const int nb = X->nb, bb = type == 2 ? 18 : (type == 3 ? 20 : 34);
#if INT_SIMD
    __m128 a[MR];
    for (int t = 0; t < MR; t++) a[t] = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const size_t at = (size_t)b * bb;
        /* the next tile's rows, block by block: 4 short row streams at a time defeat the
         * hardware prefetcher once the weights come from DRAM */
        for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(nw[r] + at), _MM_HINT_T0);
        const __m128 dw = fp16x4(w, at);
        __m256i wv[NR];
        __m128 mw = _mm_setzero_ps();
        if (type == 8) {
            for (int r = 0; r < NR; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w[r] + at + 2));
        } else {
            const int off = type == 2 ? 2 : 4;
            for (int r = 0; r < NR; r++) wv[r] = nibbles32(w[r] + at + off);
            if (type == 3) mw = fp16x4(w, at + 2);
        }
        __m256i aw[NR];
        if (type == 8)
            for (int r = 0; r < NR; r++) aw[r] = _mm256_abs_epi8(wv[r]);
        for (int t = 0; t < mt; t++) {
            const size_t row = (size_t)(t0 + t);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + row * X->K + b * 32));
            __m256i p[NR];
            if (type == 8) {
                for (int r = 0; r < NR; r++) p[r] = dot_u8s8(aw[r], _mm256_sign_epi8(xv, wv[r]));
            } else {
                for (int r = 0; r < NR; r++) p[r] = dot_u8s8(wv[r], xv);
            }
            __m128i is = reduce4(p[0], p[1], p[2], p[3]);
            const float dx = X->d[row * nb + b];
            const int xs = X->s[row * nb + b];
            const __m128 s = _mm_mul_ps(dw, _mm_set1_ps(dx));
            if (type == 2) is = _mm_sub_epi32(is, _mm_set1_epi32(8 * xs));
            __m128 term = _mm_mul_ps(s, _mm_cvtepi32_ps(is));
            if (type == 3)
                term = _mm_add_ps(term, _mm_mul_ps(_mm_mul_ps(mw, _mm_set1_ps(dx)),
                                                   _mm_set1_ps((float)xs)));
            a[t] = _mm_add_ps(a[t], term);
        }
    }
    for (int t = 0; t < mt; t++) _mm_storeu_ps(acc[t], a[t]);
#else
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < NR; r++) acc[t][r] = 0.0f;
    for (int b = 0; b < nb; b++) {
        const size_t at = (size_t)b * bb;
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w[r] + at;
            const float dw = fp16_to_fp32(blk);
            const float mw = type == 3 ? fp16_to_fp32(blk + 2) : 0.0f;
            for (int t = 0; t < mt; t++) {
                const size_t row = (size_t)(t0 + t);
                const int8_t *xq = X->q + row * X->K + b * 32;
                const float dx = X->d[row * nb + b];
                const int xs = X->s[row * nb + b];
                int is = 0;
                if (type == 8) {
                    const int8_t *q = (const int8_t *)(blk + 2);
                    for (int j = 0; j < 32; j++) is += q[j] * xq[j];
                } else {
                    const uint8_t *q = blk + (type == 2 ? 2 : 4);
                    for (int j = 0; j < 16; j++) is += (q[j] & 15) * xq[j] + (q[j] >> 4) * xq[j + 16];
                }
                if (type == 2) is -= 8 * xs;
                float term = (dw * dx) * (float)is;
                if (type == 3) term = term + (mw * dx) * (float)xs;
                acc[t][r] = acc[t][r] + term;
            }
        }
    }
#endif
}

/* constant token counts (and types) so the accumulators stay in registers */
static void idot32(int type, const uint8_t *const w[NR], const xq_t *X, int t0, int mt, float acc[MR][NR],
                   const uint8_t *const nw[NR]) {
    switch (type) {
    case 2:
        switch (mt) {
        case 4: idot32_n(2, w, X, t0, 4, acc, nw); break;
        case 3: idot32_n(2, w, X, t0, 3, acc, nw); break;
        case 2: idot32_n(2, w, X, t0, 2, acc, nw); break;
        case 1: idot32_n(2, w, X, t0, 1, acc, nw); break;
        }
        break;
    case 3:
        switch (mt) {
        case 4: idot32_n(3, w, X, t0, 4, acc, nw); break;
        case 3: idot32_n(3, w, X, t0, 3, acc, nw); break;
        case 2: idot32_n(3, w, X, t0, 2, acc, nw); break;
        case 1: idot32_n(3, w, X, t0, 1, acc, nw); break;
        }
        break;
    case 8:
        switch (mt) {
        case 4: idot32_n(8, w, X, t0, 4, acc, nw); break;
        case 3: idot32_n(8, w, X, t0, 3, acc, nw); break;
        case 2: idot32_n(8, w, X, t0, 2, acc, nw); break;
        case 1: idot32_n(8, w, X, t0, 1, acc, nw); break;
        }
        break;
    }
}

/* one K-quant weight block's integer sums against one token's block: *isum (scaled by the
 * sub-block scales) and *imin (Q4_K/Q5_K: the mins against the 32-sums) */
typedef struct {
    int sc[16], mn[8];
    float d, dmin;
} kscales;

static inline void k_scales(int type, const uint8_t *blk, kscales *k) {
    if (type == 14) {
        for (int j = 0; j < 16; j++) k->sc[j] = ((const int8_t *)(blk + 192))[j];
        k->d = fp16_to_fp32(blk + 208);
        k->dmin = 0.0f;
    } else {
        /* the 8 6-bit scales and mins, unpacked with 32-bit masks (as ggml does; the same
         * values as k_scale_min) */
        uint32_t u[4];
        memcpy(u, blk + 4, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
        const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
        u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
        u[2] = mins_lo;
        u[0] &= 0x3f3f3f3fu;
        uint8_t b[16];
        memcpy(b, u, 16);
        for (int s = 0; s < 8; s++) {
            k->sc[s] = b[s];
            k->mn[s] = b[8 + s];
        }
        k->d = fp16_to_fp32(blk);
        k->dmin = fp16_to_fp32(blk + 2);
    }
}

/* unpacked weight values of one 256-block: 8 x 32 bytes, unsigned (Q6_K: q + 32) */
static inline void k_unpack(int type, const uint8_t *blk, uint8_t *out) {
#if INT_SIMD
    const __m256i m4 = _mm256_set1_epi8(15);
    if (type == 14) {
        const uint8_t *ql = blk, *qh = blk + 128;
        for (int c = 0; c < 8; c++) {
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(ql + (c / 4) * 64 + (c % 2) * 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(qh + (c / 4) * 32));
            const __m256i l4 = _mm256_and_si256(_mm256_srli_epi16(lo, ((c / 2) % 2) * 4), m4);
            const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * (c % 4)), _mm256_set1_epi8(3));
            _mm256_storeu_si256((__m256i *)(out + c * 32), _mm256_or_si256(l4, _mm256_slli_epi16(h2, 4)));
        }
        return;
    }
    const uint8_t *qs = blk + (type == 12 ? 16 : 48);
    const __m256i qh = type == 13 ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
    for (int p = 0; p < 4; p++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + p * 32));
        __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (type == 13) {
            const __m256i one = _mm256_set1_epi8(1);
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p + 1), one), 4));
        }
        _mm256_storeu_si256((__m256i *)(out + 2 * p * 32), lo);
        _mm256_storeu_si256((__m256i *)(out + (2 * p + 1) * 32), hi);
    }
#else
    if (type == 14) {
        const uint8_t *ql = blk, *qh = blk + 128;
        for (int c = 0; c < 8; c++) {
            const uint8_t *lo = ql + (c / 4) * 64 + (c % 2) * 32, *hi = qh + (c / 4) * 32;
            const int lshift = ((c / 2) % 2) * 4, hshift = 2 * (c % 4);
            for (int l = 0; l < 32; l++)
                out[c * 32 + l] = (uint8_t)(((lo[l] >> lshift) & 15) | (((hi[l] >> hshift) & 3) << 4));
        }
        return;
    }
    const uint8_t *qs = blk + (type == 12 ? 16 : 48), *qh = blk + 16;
    for (int s = 0; s < 8; s++) {
        const uint8_t *q = qs + (s / 2) * 32;
        const int shift = (s & 1) * 4;
        for (int l = 0; l < 32; l++) {
            int v = (q[l] >> shift) & 15;
            if (type == 13) v |= ((qh[l] >> s) & 1) << 4;
            out[s * 32 + l] = (uint8_t)v;
        }
    }
#endif
}

static inline __attribute__((always_inline)) void idot256_n(int type, const uint8_t *const w[NR], const xq_t *X, int t0, int mt,
                    float acc[MR][NR]) {
    const int nb = X->nb, bb = type == 12 ? 144 : (type == 13 ? 176 : 210);
    uint8_t u[256] __attribute__((aligned(32)));
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < NR; r++) acc[t][r] = 0.0f;
    for (int b = 0; b < nb; b++) {
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w[r] + (size_t)b * bb;
            kscales k;
            k_scales(type, blk, &k);
            k_unpack(type, blk, u);
#if INT_SIMD
            __m256i scv[8];
            if (type == 14)
                for (int c = 0; c < 8; c++)
                    scv[c] = _mm256_set_m128i(_mm_set1_epi16((short)k.sc[2 * c + 1]), _mm_set1_epi16((short)k.sc[2 * c]));
            else
                for (int s = 0; s < 8; s++) scv[s] = _mm256_set1_epi16((short)k.sc[s]);
            __m256i sc16 = _mm256_setzero_si256();
            __m128i mn8 = _mm_setzero_si128();
            if (type == 14) {
                int16_t tmp[16];
                for (int j = 0; j < 16; j++) tmp[j] = (int16_t)k.sc[j];
                sc16 = _mm256_loadu_si256((const __m256i *)tmp);
            } else {
                int16_t tmp[8];
                for (int j = 0; j < 8; j++) tmp[j] = (int16_t)k.mn[j];
                mn8 = _mm_loadu_si128((const __m128i *)tmp);
            }
#endif
            for (int t = 0; t < mt; t++) {
                const size_t row = (size_t)(t0 + t);
                const int8_t *xq = X->q + row * X->K + (size_t)b * 256;
                const float dx = X->d[row * nb + b];
                int is = 0, im = 0;
#if INT_SIMD
                __m256i lanes = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    const __m256i p = _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(u + c * 32)),
                                                           _mm256_loadu_si256((const __m256i *)(xq + c * 32)));
                    lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(p, scv[c]));
                }
                if (type == 14) {
                    const __m256i bs = _mm256_loadu_si256((const __m256i *)(X->s16 + row * (X->K / 16) + (size_t)b * 16));
                    lanes = _mm256_sub_epi32(lanes, _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
                } else {
                    const int32_t *xs = X->s + row * (X->K / 32) + (size_t)b * 8;
                    const __m256i xs8 = _mm256_loadu_si256((const __m256i *)xs);
                    /* 32-sums fit int16: pack to 8 x int16 for one madd with the mins */
                    const __m128i x16 = _mm_packs_epi32(_mm256_castsi256_si128(xs8), _mm256_extracti128_si256(xs8, 1));
                    __m128i m = _mm_madd_epi16(mn8, x16);
                    m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0x4e));
                    m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0xb1));
                    im = _mm_cvtsi128_si32(m);
                }
                is = hsum8(lanes);
#else
                if (type == 14) {
                    const int16_t *bs = X->s16 + row * (X->K / 16) + (size_t)b * 16;
                    for (int j = 0; j < 16; j++) {
                        int d16 = 0;
                        for (int l = 0; l < 16; l++) d16 += u[j * 16 + l] * xq[j * 16 + l];
                        is += k.sc[j] * (d16 - 32 * bs[j]);
                    }
                } else {
                    const int32_t *xs = X->s + row * (X->K / 32) + (size_t)b * 8;
                    for (int s = 0; s < 8; s++) {
                        int d32 = 0;
                        for (int l = 0; l < 32; l++) d32 += u[s * 32 + l] * xq[s * 32 + l];
                        is += k.sc[s] * d32;
                        im += k.mn[s] * xs[s];
                    }
                }
#endif
                if (type == 14)
                    acc[t][r] = acc[t][r] + (k.d * dx) * (float)is;
                else
                    acc[t][r] = acc[t][r] + (k.d * dx) * (float)is - (k.dmin * dx) * (float)im;
            }
        }
    }
}

/* constant token counts (and types) so the accumulators stay in registers */
static void idot256(int type, const uint8_t *const w[NR], const xq_t *X, int t0, int mt, float acc[MR][NR]) {
    switch (type) {
    case 12:
        switch (mt) {
        case 4: idot256_n(12, w, X, t0, 4, acc); break;
        case 3: idot256_n(12, w, X, t0, 3, acc); break;
        case 2: idot256_n(12, w, X, t0, 2, acc); break;
        case 1: idot256_n(12, w, X, t0, 1, acc); break;
        }
        break;
    case 13:
        switch (mt) {
        case 4: idot256_n(13, w, X, t0, 4, acc); break;
        case 3: idot256_n(13, w, X, t0, 3, acc); break;
        case 2: idot256_n(13, w, X, t0, 2, acc); break;
        case 1: idot256_n(13, w, X, t0, 1, acc); break;
        }
        break;
    case 14:
        switch (mt) {
        case 4: idot256_n(14, w, X, t0, 4, acc); break;
        case 3: idot256_n(14, w, X, t0, 3, acc); break;
        case 2: idot256_n(14, w, X, t0, 2, acc); break;
        case 1: idot256_n(14, w, X, t0, 1, acc); break;
        }
        break;
    }
}

#if INT_SIMD
/* ---- steps of several tokens: 8 weight rows in the 8 lanes --------------------------------
 * A tile of 8 rows is unpacked once for all its blocks and transposed so that lane r of a
 * vector holds 4 consecutive bytes of row r; each token's 4-byte group is broadcast and
 * dotted against it (dpbusd / maddubs+madd), so lane r accumulates row r's block sum with no
 * horizontal reduction, and the fp32 scale step runs on 8 rows at once. Same integers, same
 * fp32 operations per row as above: bit-identical to the small-step and portable code. */
#define NR8 8
#define MT 4

typedef struct { __m256i t[8], a[8]; __m256 dw, mw; } prep32;
typedef struct { __m256i t[64], sc[16], mnp[4]; __m256 d, dmin; } prep256;

static inline void transpose8x8(__m256i *r) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

static inline __m256i dot_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline __m256 fp16x8(const uint8_t *const *w, size_t at) {
    uint16_t h[8];
    for (int r = 0; r < 8; r++) memcpy(h + r, w[r] + at, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

static void prep32_block(int type, const uint8_t *const w[NR8], size_t at, prep32 *p) {
    __m256i r[8];
    p->dw = fp16x8(w, at);
    p->mw = type == 3 ? fp16x8(w, at + 2) : _mm256_setzero_ps();
    for (int i = 0; i < 8; i++)
        r[i] = type == 8 ? _mm256_loadu_si256((const __m256i *)(w[i] + at + 2))
                         : nibbles32(w[i] + at + (type == 2 ? 2 : 4));
    transpose8x8(r);
    for (int g = 0; g < 8; g++) {
        if (type == 8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            p->t[g] = _mm256_xor_si256(r[g], _mm256_set1_epi8((char)0x80)); /* w + 128, unsigned */
#else
            p->t[g] = r[g];
            p->a[g] = _mm256_abs_epi8(r[g]);
#endif
        } else {
            p->t[g] = r[g];
        }
    }
}

static void prep256_block(int type, const uint8_t *const w[NR8], size_t at, prep256 *p) {
    uint8_t u[NR8][256] __attribute__((aligned(32)));
    kscales k[NR8];
    float d[8], dm[8];
    for (int i = 0; i < NR8; i++) {
        k_scales(type, w[i] + at, &k[i]);
        k_unpack(type, w[i] + at, u[i]);
        d[i] = k[i].d;
        dm[i] = k[i].dmin;
    }
    p->d = _mm256_loadu_ps(d);
    p->dmin = _mm256_loadu_ps(dm);
    for (int c = 0; c < 8; c++) {
        __m256i r[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_load_si256((const __m256i *)(u[i] + c * 32));
        transpose8x8(r);
        for (int g = 0; g < 8; g++) p->t[c * 8 + g] = r[g];
    }
    int32_t v[8];
    for (int j = 0; j < (type == 14 ? 16 : 8); j++) {
        for (int i = 0; i < 8; i++) v[i] = k[i].sc[j];
        p->sc[j] = _mm256_loadu_si256((const __m256i *)v);
    }
    if (type != 14)
        for (int q = 0; q < 4; q++) {
            for (int i = 0; i < 8; i++)
                v[i] = (int32_t)((uint32_t)(uint16_t)k[i].mn[2 * q] | ((uint32_t)k[i].mn[2 * q + 1] << 16));
            p->mnp[q] = _mm256_loadu_si256((const __m256i *)v);
        }
}

static inline __attribute__((always_inline)) void tdot32_n(int type, const prep32 *P, const xq_t *X, int t0, int mt, __m256 *a) {
    const int nb = X->nb;
    for (int t = 0; t < mt; t++) a[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const prep32 *p = P + b;
        __m256i is0[MT], is1[MT];
        for (int t = 0; t < mt; t++) is0[t] = is1[t] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
            for (int t = 0; t < mt; t++) {
                const int8_t *xr = X->q + (size_t)(t0 + t) * X->K + (size_t)b * 32;
                const __m256i x0 = bcast4(xr + 4 * g), x1 = bcast4(xr + 4 * g + 4);
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
                if (type == 8) {
                    const __m256i one = _mm256_set1_epi16(1);
                    is0[t] = _mm256_add_epi32(is0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(p->a[g], _mm256_sign_epi8(x0, p->t[g])), one));
                    is1[t] = _mm256_add_epi32(is1[t], _mm256_madd_epi16(_mm256_maddubs_epi16(p->a[g + 1], _mm256_sign_epi8(x1, p->t[g + 1])), one));
                    continue;
                }
#endif
                is0[t] = dot_acc(is0[t], p->t[g], x0);
                is1[t] = dot_acc(is1[t], p->t[g + 1], x1);
            }
        }
        for (int t = 0; t < mt; t++) {
            const size_t row = (size_t)(t0 + t);
            const float dx = X->d[row * nb + b];
            const int xs = X->s[row * nb + b];
            __m256i is = _mm256_add_epi32(is0[t], is1[t]);
            if (type == 2) is = _mm256_sub_epi32(is, _mm256_set1_epi32(8 * xs));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            if (type == 8) is = _mm256_sub_epi32(is, _mm256_set1_epi32(128 * xs));
#endif
            __m256 term = _mm256_mul_ps(_mm256_mul_ps(p->dw, _mm256_set1_ps(dx)), _mm256_cvtepi32_ps(is));
            if (type == 3)
                term = _mm256_add_ps(term, _mm256_mul_ps(_mm256_mul_ps(p->mw, _mm256_set1_ps(dx)),
                                                         _mm256_set1_ps((float)xs)));
            a[t] = _mm256_add_ps(a[t], term);
        }
    }
}

/* constant token counts (and types) so the accumulators stay in registers */
static void tdot32(int type, const prep32 *P, const xq_t *X, int t0, int mt, __m256 *a) {
    switch (type) {
    case 2:
        switch (mt) {
        case 4: tdot32_n(2, P, X, t0, 4, a); break;
        case 3: tdot32_n(2, P, X, t0, 3, a); break;
        case 2: tdot32_n(2, P, X, t0, 2, a); break;
        case 1: tdot32_n(2, P, X, t0, 1, a); break;
        }
        break;
    case 3:
        switch (mt) {
        case 4: tdot32_n(3, P, X, t0, 4, a); break;
        case 3: tdot32_n(3, P, X, t0, 3, a); break;
        case 2: tdot32_n(3, P, X, t0, 2, a); break;
        case 1: tdot32_n(3, P, X, t0, 1, a); break;
        }
        break;
    case 8:
        switch (mt) {
        case 4: tdot32_n(8, P, X, t0, 4, a); break;
        case 3: tdot32_n(8, P, X, t0, 3, a); break;
        case 2: tdot32_n(8, P, X, t0, 2, a); break;
        case 1: tdot32_n(8, P, X, t0, 1, a); break;
        }
        break;
    }
}

static inline __attribute__((always_inline)) void tdot256_n(int type, const prep256 *P, const xq_t *X, int t0, int mt, __m256 *a) {
    const int nb = X->nb;
    for (int t = 0; t < mt; t++) a[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const prep256 *p = P + b;
        __m256i tot[MT], sub[MT];
        const int8_t *xr[MT];
        for (int t = 0; t < mt; t++) {
            tot[t] = _mm256_setzero_si256();
            xr[t] = X->q + (size_t)(t0 + t) * X->K + (size_t)b * 256;
        }
        const int nsub = type == 14 ? 16 : 8, per = type == 14 ? 4 : 8;
        for (int j = 0; j < nsub; j++) {
            for (int t = 0; t < mt; t++) sub[t] = _mm256_setzero_si256();
            for (int g = j * per; g < (j + 1) * per; g++) { /* g: 4-byte group in the block */
                const __m256i tv = p->t[g];
                for (int t = 0; t < mt; t++) sub[t] = dot_acc(sub[t], tv, bcast4(xr[t] + 4 * g));
            }
            for (int t = 0; t < mt; t++) {
                __m256i v = sub[t];
                if (type == 14) {
                    const size_t row = (size_t)(t0 + t);
                    const int bs = X->s16[row * (X->K / 16) + (size_t)b * 16 + j];
                    v = _mm256_sub_epi32(v, _mm256_set1_epi32(32 * bs));
                }
                tot[t] = _mm256_add_epi32(tot[t], _mm256_mullo_epi32(v, p->sc[j]));
            }
        }
        for (int t = 0; t < mt; t++) {
            const size_t row = (size_t)(t0 + t);
            const __m256 dx = _mm256_set1_ps(X->d[row * nb + b]);
            a[t] = _mm256_add_ps(a[t], _mm256_mul_ps(_mm256_mul_ps(p->d, dx), _mm256_cvtepi32_ps(tot[t])));
            if (type != 14) {
                const int32_t *xs = X->s + row * (X->K / 32) + (size_t)b * 8;
                __m256i im = _mm256_setzero_si256();
                for (int q = 0; q < 4; q++) {
                    const __m256i xp = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)xs[2 * q] | ((uint32_t)xs[2 * q + 1] << 16)));
                    im = _mm256_add_epi32(im, _mm256_madd_epi16(p->mnp[q], xp));
                }
                a[t] = _mm256_sub_ps(a[t], _mm256_mul_ps(_mm256_mul_ps(p->dmin, dx), _mm256_cvtepi32_ps(im)));
            }
        }
    }
}

/* constant token counts (and types) so the accumulators stay in registers */
static void tdot256(int type, const prep256 *P, const xq_t *X, int t0, int mt, __m256 *a) {
    switch (type) {
    case 12:
        switch (mt) {
        case 4: tdot256_n(12, P, X, t0, 4, a); break;
        case 3: tdot256_n(12, P, X, t0, 3, a); break;
        case 2: tdot256_n(12, P, X, t0, 2, a); break;
        case 1: tdot256_n(12, P, X, t0, 1, a); break;
        }
        break;
    case 13:
        switch (mt) {
        case 4: tdot256_n(13, P, X, t0, 4, a); break;
        case 3: tdot256_n(13, P, X, t0, 3, a); break;
        case 2: tdot256_n(13, P, X, t0, 2, a); break;
        case 1: tdot256_n(13, P, X, t0, 1, a); break;
        }
        break;
    case 14:
        switch (mt) {
        case 4: tdot256_n(14, P, X, t0, 4, a); break;
        case 3: tdot256_n(14, P, X, t0, 3, a); break;
        case 2: tdot256_n(14, P, X, t0, 2, a); break;
        case 1: tdot256_n(14, P, X, t0, 1, a); break;
        }
        break;
    }
}

/* the 8-row path over all tiles of N (a parallel region of its own) */
static int gemm_t8(int type, int B, const xq_t *X, int M, const uint8_t *base,
                   const int64_t *offsets, int N, float *y, int ldy, int n_threads) {
    const int nb = X->nb, n_tiles = (N + NR8 - 1) / NR8;
    const size_t psize = B == 32 ? sizeof(prep32) : sizeof(prep256);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        void *buf = aligned_alloc(32, psize * nb);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int tile = 0; tile < n_tiles; tile++) {
            if (!buf) continue;
            const int n0 = tile * NR8, nr = N - n0 < NR8 ? N - n0 : NR8;
            const uint8_t *w[NR8];
            for (int r = 0; r < NR8; r++) w[r] = base + offsets[n0 + (r < nr ? r : nr - 1)];
            const size_t bb = (size_t)(B == 32 ? (type == 2 ? 18 : (type == 3 ? 20 : 34))
                                                : (type == 12 ? 144 : (type == 13 ? 176 : 210)));
            for (int b = 0; b < nb; b++) {
                if (B == 32) prep32_block(type, w, b * bb, (prep32 *)buf + b);
                else prep256_block(type, w, b * bb, (prep256 *)buf + b);
            }
            __m256 a[MT];
            for (int t0 = 0; t0 < M; t0 += MT) {
                const int mt = M - t0 < MT ? M - t0 : MT;
                if (B == 32) tdot32(type, (const prep32 *)buf, X, t0, mt, a);
                else tdot256(type, (const prep256 *)buf, X, t0, mt, a);
                for (int t = 0; t < mt; t++) {
                    float o[8];
                    _mm256_storeu_ps(o, a[t]);
                    for (int r = 0; r < nr; r++) y[(size_t)(t0 + t) * ldy + n0 + r] = o[r];
                }
            }
        }
        free(buf);
    }
    return failed ? -3 : 0;
}
#endif

/* steps of at least this many tokens take the 8-row path (SIMD builds) */
#define T8_MIN_ROWS 4

static int int_type(int type) { /* activation block size for the integer path, 0: none */
    switch (type) {
    case 2: case 3: case 8: return 32;
    case 12: case 13: case 14: return 256;
    default: return 0;
    }
}

/* y = x @ W^T like gguf_gemm, with x quantized to int8 first (see above). Returns -1 for a
 * type without an integer path (F32/F16/BF16: use gguf_gemm), -2 if K is not a multiple of
 * the activation block, -3 if out of memory. */
int gguf_gemm_int(int type, const float *x, int M, int K, const uint8_t *base,
                  const int64_t *offsets, int N, float *y, int ldy, int n_threads) {
    const int B = int_type(type);
    if (!B) return -1;
    if (K % B) return -2;
    const int nb = K / B;
    int8_t *q = (int8_t *)malloc((size_t)M * K);
    float *d = (float *)malloc(sizeof(float) * (size_t)M * nb);
    int32_t *s = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * (K / 32));
    int16_t *s16 = B == 256 ? (int16_t *)malloc(sizeof(int16_t) * (size_t)M * (K / 16)) : 0;
    if (!q || !d || !s || (B == 256 && !s16)) {
        free(q); free(d); free(s); free(s16);
        return -3;
    }
#pragma omp parallel for num_threads(n_threads) schedule(static) if (M >= 16)
    for (int i = 0; i < M; i++)
        quant_row(x + (size_t)i * K, K, B, q + (size_t)i * K, d + (size_t)i * nb,
                  s + (size_t)i * (K / 32), s16 ? s16 + (size_t)i * (K / 16) : 0);
    const xq_t X = {K, nb, q, d, s, s16};
#if INT_SIMD
    if (M >= T8_MIN_ROWS) {
        const int rc = gemm_t8(type, B, &X, M, base, offsets, N, y, ldy, n_threads);
        free(q); free(d); free(s); free(s16);
        return rc;
    }
#endif
    const int n_tiles = (N + NR - 1) / NR;
    for (int c0 = 0; c0 < M; c0 += TCHUNK) {
        const int c1 = M - c0 < TCHUNK ? M : c0 + TCHUNK;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int tile = 0; tile < n_tiles; tile++) {
            const int n0 = tile * NR, nr = N - n0 < NR ? N - n0 : NR;
            const uint8_t *w[NR];
            for (int r = 0; r < NR; r++) w[r] = base + offsets[n0 + (r < nr ? r : nr - 1)];
            const uint8_t *nw[NR]; /* the next tile's rows, to prefetch */
            for (int r = 0; r < NR; r++) nw[r] = n0 + NR + r < N ? base + offsets[n0 + NR + r] : w[r];
            float acc[MR][NR];
            for (int t0 = c0; t0 < c1; t0 += MR) {
                const int mt = c1 - t0 < MR ? c1 - t0 : MR;
                if (B == 32) idot32(type, w, &X, t0, mt, acc, nw);
                else idot256(type, w, &X, t0, mt, acc);
                for (int t = 0; t < mt; t++)
                    for (int r = 0; r < nr; r++) y[(size_t)(t0 + t) * ldy + n0 + r] = acc[t][r];
            }
        }
    }
    free(q); free(d); free(s); free(s16);
    return 0;
}
