/* y[M, ldy] (columns 0..N-1) = x[M,K] @ W^T with W's rows in GGUF blocks, read in place.
 *
 * Compiled on first use by corral/model/gguf_kernels.py, once per instruction-set variant
 * (x86: AVX-512+VNNI, AVX-512, AVX2+AVX-VNNI, AVX2+FMA+F16C, portable; aarch64: NEON+sdot,
 * NEON; -DGGUF_PORTABLE: plain C anywhere; always -ffp-contract=off) and called through
 * ctypes. Two paths: the fp32 path below, and the integer path further down. W is given
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
 * fp32 path work split: threads take tiles of NR=4 output rows; a tile is dequantized once
 * into a thread-local fp32 buffer (L1/L2) and every row of x is dotted against it, MR=4 at a
 * time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* -DGGUF_PORTABLE: plain C on any architecture (CI's portable build, and the aarch64 check) */
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(GGUF_PORTABLE)
#define USE_NEON 1
#include <arm_neon.h>
#else
#define USE_NEON 0
#endif

#define NR 4
#define MR 4

static inline float fp16_to_fp32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif USE_NEON
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
#elif USE_NEON
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

/* ==== quantizer: F32/F16/BF16 rows -> Q8_0 / Q4_0 blocks (`--quantize` packs HF folders) ======
 * Byte for byte as corral/model/quantize.py's torch reference and gguf.quants' numpy quantizer:
 * the same fp32 operations in the same order (-ffp-contract=off: no fused multiply-add), per
 * block of 32 values (the source is widened exactly first, as torch's .float() does):
 *   Q8_0: d = max|x| / 127, inv = d ? 1/d : 0, q = x*inv rounded half away from zero;
 *   Q4_0: m = the first value of largest |x|, d = m / -8, inv = d ? 1/d : 0,
 *         q = trunc(x*inv + 8.5) clamped to [0, 15], q[j] | q[j+16] << 4;
 * d stored as fp16 rounded to nearest even. Non-finite values give what torch's casts give: a
 * NaN max makes d NaN (Q4_0: the first NaN counts as the largest, as torch's argmax), and a
 * quotient that is NaN or infinite (_roundf turns inf into NaN) becomes q = 0 (Q4_0 clamps
 * +-inf to 15 / 0, where gguf's numpy, casting before it clips, gives 0). */

static inline uint16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    /* FP16's fp16_ieee_from_fp32_value (torch's scalar conversion): the fp32 adds round to
     * nearest even at fp16's precision, subnormals included; NaN keeps its sign and top payload
     * bits, quieted, as F16C's vcvtps2ph does */
    uint32_t w, b;
    memcpy(&w, &f, 4);
    const uint32_t shl1 = w + w, sign = w & 0x80000000u;
    if (shl1 > 0xff000000u) return (uint16_t)((sign >> 16) | 0x7e00u | ((w >> 13) & 0x3ffu));
    const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * to_inf) * to_zero;
    uint32_t bias = shl1 & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    b = (bias >> 1) + 0x07800000u;
    float fb;
    memcpy(&fb, &b, 4);
    base = fb + base;
    memcpy(&b, &base, 4);
    return (uint16_t)((sign >> 16) | (((b >> 13) & 0x7c00u) + (b & 0x0fffu)));
#endif
}

static inline void put_fp16(uint8_t *p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    memcpy(p, &h, 2);
}

/* |x| as the bits of a float: for non-NaN values their order is the integers' order, so the
 * max is an integer max (which vectorizes; float max with NaN rules does not). NaN > 0x7f800000. */
static inline uint32_t abs_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b & 0x7fffffffu;
}

static inline uint32_t block_amax_bits(const float *x) {
    uint32_t m = 0;
    for (int j = 0; j < 32; j++) {
        const uint32_t a = abs_bits(x[j]);
        m = a > m ? a : m;
    }
    return m;
}

static inline void q8_0_block(const float *x, uint8_t *o) {
    const uint32_t m = block_amax_bits(x);
    float amax;
    memcpy(&amax, &m, 4);
    if (m > 0x7f800000u) amax = __builtin_nanf("");  /* torch's amax: the default NaN */
    const float d = amax / 127.0f, inv = d == 0.0f ? 0.0f : 1.0f / d;
    put_fp16(o, d);
    int32_t q[32];
    for (int j = 0; j < 32; j++) {
        float v = x[j] * inv;
        uint32_t b;
        memcpy(&b, &v, 4);
        b &= -(uint32_t)((b & 0x7fffffffu) <= 0x43000000u);  /* |v| <= 128, else (NaN, inf) 0 */
        memcpy(&v, &b, 4);
        const int i = (int)v;  /* truncated; v - i is exact */
        const float frac = v - (float)i;
        q[j] = i + (frac >= 0.5f) - (frac <= -0.5f);  /* half away from zero */
    }
    for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)q[j];
}

static inline void q4_0_block(const float *x, uint8_t *o) {
    const uint32_t m = block_amax_bits(x);
    /* torch's argmax of |x|: the first NaN, else the first |x| == max */
    const uint32_t at_least = m > 0x7f800000u ? 0x7f800001u : m;
    uint32_t hits = 0;
    for (int j = 0; j < 32; j++) hits |= (uint32_t)(abs_bits(x[j]) >= at_least) << j;
    const float d = x[__builtin_ctz(hits)] / -8.0f, inv = d == 0.0f ? 0.0f : 1.0f / d;
    put_fp16(o, d);
#if defined(__AVX2__)
    /* the loop below, by hand: gcc's 256-bit code for it is 2.5x slower (its 512-bit is fine) */
    const __m256 vinv = _mm256_set1_ps(inv), bias = _mm256_set1_ps(8.5f);
    const __m256 top = _mm256_set1_ps(15.0f), zero = _mm256_setzero_ps();
    __m256i q[4];
    for (int i = 0; i < 4; i++) {
        __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), vinv), bias);
        t = _mm256_blendv_ps(t, top, _mm256_cmp_ps(t, top, _CMP_GE_OQ));
        t = _mm256_and_ps(t, _mm256_cmp_ps(t, zero, _CMP_GE_OQ));  /* NaN, < 0 -> 0 */
        q[i] = _mm256_cvttps_epi32(t);
    }
    /* packus works per 128-bit lane: 64-bit quarters [0-3 | 8-11 | 4-7 | 12-15] -> in order */
    const __m256i lo = _mm256_packus_epi32(q[0], q[1]), hi = _mm256_packus_epi32(q[2], q[3]);
    const __m256i v = _mm256_permute4x64_epi64(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), 0xd8);
    _mm_storeu_si128((__m128i *)(o + 2), _mm_packus_epi16(_mm256_castsi256_si128(v),
                                                          _mm256_extracti128_si256(v, 1)));
#else
    int32_t q[32];
    for (int j = 0; j < 32; j++) {
        float t = x[j] * inv + 8.5f;
        t = t >= 15.0f ? 15.0f : t;
        t = t >= 0.0f ? t : 0.0f;  /* NaN -> 0 */
        q[j] = (int)t;
    }
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
#endif
}

/* F16 -> fp32 (exact), 8 at a time where F16C has it (dq_f16 converts one value at a time) */
static void widen_f16(const uint8_t *b, int K, float *out) {
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= K; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 2 * i))));
#endif
    for (; i < K; i++) out[i] = fp16_to_fp32(b + 2 * i);
}

/* out[N, K/32 blocks] = rows of `src` (N x K values of type src_type: F32 0, F16 1, BF16 30)
 * quantized to qtype (Q8_0 8 or Q4_0 2). Returns 0, or -1 for an unknown type or K % 32. Rows
 * are dealt dynamically: a thread the OS does not schedule (a busy machine) holds up little. */
int gguf_quantize_rows(int qtype, int src_type, const uint8_t *src, int N, int K, uint8_t *out,
                       int n_threads) {
    if ((qtype != 8 && qtype != 2) || (src_type != 0 && src_type != 1 && src_type != 30) ||
        K <= 0 || K % 32)
        return -1;
    const dequant_fn widen = src_type == 1 ? widen_f16 : pick(src_type);
    const size_t in_row = (size_t)K * (src_type == 0 ? 4 : 2);
    const size_t out_row = (size_t)K / 32 * (qtype == 8 ? 34 : 18);
    const int grain = K >= 1 << 14 ? 1 : (1 << 14) / K;  /* rows of >= 16K values a task */
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, grain) if (N > grain)
    for (int n = 0; n < N; n++) {
        float buf[256];  /* 8 blocks widened at a time (F32 rows are read in place) */
        const uint8_t *in = src + (size_t)n * in_row;
        uint8_t *o = out + (size_t)n * out_row;
        for (int k0 = 0; k0 < K; k0 += 256) {
            const int kn = K - k0 < 256 ? K - k0 : 256;
            const float *x = (const float *)(in + (size_t)k0 * 4);
            if (src_type != 0) {
                widen(in + (size_t)k0 * 2, kn, buf);
                x = buf;
            }
            for (int b = 0; b < kn; b += 32) {
                if (qtype == 8) {
                    q8_0_block(x + b, o);
                    o += 34;
                } else {
                    q4_0_block(x + b, o);
                    o += 18;
                }
            }
        }
    }
    return 0;
}

/* Which instruction set this build's dot products use (tests check the variant they asked). */
const char *gguf_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVXVNNI__)
    return "avxvnni";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif USE_NEON && defined(__ARM_FEATURE_DOTPROD)
    return "neondot";
#elif USE_NEON
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
 * The integer sums are exact whatever the SIMD width or instruction (maddubs+madd, VNNI dpbusd
 * and dpwssd, NEON sdot or smull+sadalp, scalar C), and the fp32 operations above run in this
 * order, one rounding each, in every variant (SIMD lanes hold different rows, never different
 * parts of one sum): every x86 variant, both NEON variants and the portable build give
 * bit-identical results.
 *
 * Entry points inside the library (no OpenMP region of their own, for callers that split work
 * themselves): xq_alloc/xq_free; quantize_rows (activation rows [m0, m1) -> xq_t) or quant_row
 * (any block-aligned range of one row); gemm_int_range (output rows [n0, n1) for all M tokens
 * from an xq_t, with gemm_int_work_bytes of scratch).
 *
 * Small steps (decode, M < 4 on x86, every M elsewhere): tiles of NR=4 weight rows x up to MR=4
 * tokens. Per block, each row's block is unpacked once in registers and dotted against each
 * token (int32 lanes), the 4 rows' lanes are reduced together (lane r = row r), and the fp32
 * step runs on the 4 rows at once. Tokens run in chunks of TCHUNK so their int8 rows stay in
 * L2. Larger steps on x86 take the 8-row transposed tiles further down.
 */

#define TCHUNK 128
#if defined(__AVX2__)
#define INT_SIMD 1 /* x86: AVX2 and up (the 8-row tiles below exist too) */
#else
#define INT_SIMD 0
#endif
#define AI inline __attribute__((always_inline))

/* An empty asm that takes and returns v in a register: the AVX2 kernels' int16/int32 running
 * sums pass through it once per step, so GCC's reassociation cannot turn them into trees of
 * products computed first and spilled to the stack (it did: at 32 tokens on Zen 3, ~0.7
 * maddubs a cycle, 1.3x slower). */
#define KEEP(v) __asm__("" : "+x"(v))

typedef struct {
    int K, nb;     /* nb: activation blocks per row (K/32 or K/256) */
    int8_t *q;     /* [M][K] */
    float *d;      /* [M][nb] */
    int32_t *s;    /* [M][K/32]: sums of 32 quantized values */
    int16_t *s16;  /* [M][K/16]: sums of 16 (K-quants only, else NULL) */
} xq_t;

/* activation block size of the integer path for a weight type, 0: none */
static int int_block(int type) {
    switch (type) {
    case 2: case 3: case 8: return 32;
    case 12: case 13: case 14: return 256;
#if INT_SIMD
    case 102: case 103: case 108: return 32; /* RP_Q4_0, RP_Q4_1, RP_Q8_0 */
    case 112: return 256; /* RP_Q4_K */
#endif
    case 213: case 214: return 256; /* RI_Q5_K, RI_Q6_K */
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type) {
    case 2: return 18;
    case 3: return 20;
    case 8: return 34;
    case 12: return 144;
    case 13: return 176;
    case 14: return 210;
    default: return 0;
    }
}

void xq_free(xq_t *X) {
    free(X->q); free(X->d); free(X->s); free(X->s16);
    X->q = 0; X->d = 0; X->s = 0; X->s16 = 0;
}

/* buffers for M rows of K activations in blocks of B (32 or 256): 0, or -3 if out of memory */
int xq_alloc(xq_t *X, int M, int K, int B) {
    X->K = K;
    X->nb = K / B;
    X->q = (int8_t *)malloc((size_t)M * K);
    X->d = (float *)malloc(sizeof(float) * (size_t)M * X->nb);
    X->s = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * (K / 32));
    X->s16 = B == 256 ? (int16_t *)malloc(sizeof(int16_t) * (size_t)M * (K / 16)) : 0;
    if (!X->q || !X->d || !X->s || (B == 256 && !X->s16)) {
        xq_free(X);
        return -3;
    }
    return 0;
}

/* B activations -> B int8 and their scale: d = amax/127, q = round(x*127/amax) half away from
 * zero, clamped to +-127 (SIMD or not, the same fp32 operations: the same bytes) */
static void quant_block(const float *xb, int B, int8_t *q, float *d) {
#if INT_SIMD
    /* max(|x|, mx): a NaN |x| leaves mx, as in the C loop; 4 chains (max is exact) */
    __m256 m4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < B; i += 32)
        for (int k = 0; k < 4; k++)
            m4[k] = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i + 8 * k)), m4[k]);
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(m4[0], m4[1]), _mm256_max_ps(m4[2], m4[3]));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float amax = _mm_cvtss_f32(m);
#elif USE_NEON
    float32x4_t m4[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int i = 0; i < B; i += 16)
        for (int k = 0; k < 4; k++) m4[k] = vmaxnmq_f32(m4[k], vabsq_f32(vld1q_f32(xb + i + 4 * k)));
    const float amax = vmaxnmvq_f32(vmaxnmq_f32(vmaxnmq_f32(m4[0], m4[1]), vmaxnmq_f32(m4[2], m4[3])));
#else
    float amax = 0.0f;
    for (int i = 0; i < B; i++) {
        const float a = xb[i] < 0 ? -xb[i] : xb[i];
        amax = a > amax ? a : amax;
    }
#endif
    const float id = amax > 0 ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
#if INT_SIMD
    const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    for (int i = 0; i < B; i += 32) {
        __m256i r[4];
        for (int k = 0; k < 4; k++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * k), vid);
            const __m256 vr = _mm256_add_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), half));
            r[k] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(vr), lo), hi);
        }
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(q + i),
                            _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
#elif USE_NEON
    const uint32x4_t sign = vdupq_n_u32(0x80000000u), half = vreinterpretq_u32_f32(vdupq_n_f32(0.5f));
    for (int i = 0; i < B; i += 16) {
        int16x4_t h[4];
        for (int k = 0; k < 4; k++) {
            const float32x4_t v = vmulq_n_f32(vld1q_f32(xb + i + 4 * k), id);
            const float32x4_t sh = vreinterpretq_f32_u32(vorrq_u32(vandq_u32(vreinterpretq_u32_f32(v), sign), half));
            const int32x4_t iv = vcvtq_s32_f32(vaddq_f32(v, sh)); /* toward zero, as C's cast */
            h[k] = vmovn_s32(vminq_s32(vmaxq_s32(iv, vdupq_n_s32(-127)), vdupq_n_s32(127)));
        }
        vst1q_s8(q + i, vcombine_s8(vmovn_s16(vcombine_s16(h[0], h[1])), vmovn_s16(vcombine_s16(h[2], h[3]))));
    }
#else
    for (int i = 0; i < B; i++) {
        const float v = xb[i] * id;
        int iv = (int)(v >= 0 ? v + 0.5f : v - 0.5f);
        iv = iv > 127 ? 127 : (iv < -127 ? -127 : iv);
        q[i] = (int8_t)iv;
    }
#endif
}

/* n activations (a whole row or a range of it, n a multiple of B) into n int8, n/B scales d,
 * n/32 sums s and, when s16 is given, n/16 sums s16 */
void quant_row(const float *x, int n, int B, int8_t *q, float *d, int32_t *s, int16_t *s16) {
    for (int b = 0; b < n / B; b++) quant_block(x + (size_t)b * B, B, q + (size_t)b * B, d + b);
    for (int j = 0; j < n / 32; j++) {
        int t = 0;
        for (int i = 0; i < 32; i++) t += q[j * 32 + i];
        s[j] = t;
    }
    if (s16)
        for (int j = 0; j < n / 16; j++) {
            int t = 0;
            for (int i = 0; i < 16; i++) t += q[j * 16 + i];
            s16[j] = (int16_t)t;
        }
}

/* rows [m0, m1) of x [*, K] into X (the same rows of its buffers) */
void quantize_rows(const float *x, int m0, int m1, xq_t *X) {
    const int K = X->K, B = K / X->nb;
    for (int m = m0; m < m1; m++)
        quant_row(x + (size_t)m * K, K, B, X->q + (size_t)m * K, X->d + (size_t)m * X->nb,
                  X->s + (size_t)m * (K / 32), X->s16 ? X->s16 + (size_t)m * (K / 16) : 0);
}

/* Q4_K/Q5_K: the 8 6-bit scales and mins, unpacked with 32-bit masks as ggml does (the same
 * values as k_scale_min): bytes 0..7 the scales, 8..15 the mins */
static inline void k_scales16(const uint8_t *blk, uint32_t u[4]) {
    memcpy(u, blk + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
}

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
        uint32_t u[4];
        uint8_t b[16];
        k_scales16(blk, u);
        memcpy(b, u, 16);
        for (int s = 0; s < 8; s++) {
            k->sc[s] = b[s];
            k->mn[s] = b[8 + s];
        }
        k->d = fp16_to_fp32(blk);
        k->dmin = fp16_to_fp32(blk + 2);
    }
}

/* One weight block in plain C, the reference every SIMD path must equal. K-quants are first
 * unpacked (blk_unpack: u the 256 values in order, unsigned, Q6_K's as q+32; sc the scales,
 * mn the mins), then dotted per token (blk_int); 32-value types are read in place. */
static AI void blk_unpack(int type, const uint8_t *blk, uint8_t *u, int *sc, int *mn) {
    if (type == 14) {
        const uint8_t *ql = blk, *qh = blk + 128;
        for (int c = 0; c < 8; c++) { /* 32 values: c/4 picks the half, c%4 the bit pair */
            const uint8_t *lo = ql + (c / 4) * 64 + (c % 2) * 32, *hi = qh + (c / 4) * 32;
            const int lshift = ((c / 2) % 2) * 4, hshift = 2 * (c % 4);
            for (int l = 0; l < 32; l++)
                u[c * 32 + l] = (uint8_t)(((lo[l] >> lshift) & 15) | (((hi[l] >> hshift) & 3) << 4));
        }
        for (int j = 0; j < 16; j++) sc[j] = ((const int8_t *)(blk + 192))[j];
        return;
    }
    uint32_t w32[4];
    uint8_t sm[16];
    k_scales16(blk, w32);
    memcpy(sm, w32, 16);
    for (int s = 0; s < 8; s++) {
        sc[s] = sm[s];
        mn[s] = sm[8 + s];
    }
    const uint8_t *qs = blk + (type == 12 ? 16 : 48), *qh = blk + 16;
    for (int s = 0; s < 8; s++) {
        const uint8_t *q = qs + (s / 2) * 32;
        const int shift = (s & 1) * 4;
        for (int l = 0; l < 32; l++) {
            int v = (q[l] >> shift) & 15;
            if (type == 13) v |= ((qh[l] >> s) & 1) << 4;
            u[s * 32 + l] = (uint8_t)v;
        }
    }
}

/* the exact integer sums of one block against one token's activation block: blk the block
 * (32-value types) or u/sc/mn from blk_unpack (K-quants); xq/xs/xs16 the token's block */
static AI void blk_int(int type, const uint8_t *blk, const uint8_t *u, const int *sc, const int *mn,
                       const int8_t *xq, const int32_t *xs, const int16_t *xs16, int *is, int *im) {
    int a = 0, m = 0;
    if (type == 2 || type == 3) {
        const uint8_t *q = blk + (type == 2 ? 2 : 4);
        for (int j = 0; j < 16; j++) a += (q[j] & 15) * xq[j] + (q[j] >> 4) * xq[j + 16];
        if (type == 2) a -= 8 * xs[0];
        else m = xs[0];
    } else if (type == 8) {
        const int8_t *q = (const int8_t *)(blk + 2);
        for (int j = 0; j < 32; j++) a += q[j] * xq[j];
    } else if (type == 14) {
        for (int j = 0; j < 16; j++) {
            int d16 = 0;
            for (int l = 0; l < 16; l++) d16 += u[16 * j + l] * xq[16 * j + l];
            a += sc[j] * (d16 - 32 * xs16[j]);
        }
    } else { /* Q4_K, Q5_K */
        for (int s = 0; s < 8; s++) {
            int d32 = 0;
            for (int l = 0; l < 32; l++) d32 += u[32 * s + l] * xq[32 * s + l];
            a += sc[s] * d32;
            m += mn[s] * xs[s];
        }
    }
    *is = a;
    *im = m;
}

/* ---- small steps: the integer sums of one block for 4 rows x mt tokens, per architecture -----
 * tile_block(type, mt, w, at, xb, xs, xs16, is, im): for rows w[r] + at (one weight block each)
 * and tokens t < mt (xb/xs/xs16: the token's activation block and its 32- and 16-sums), lane r
 * of is[t] / im[t] = the exact integer sums that blk_int gives for (row r, token t).
 * V4I / V4F: 4 int32 / fp32 lanes, one per row. */

#if INT_SIMD
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI256 1
#define DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define VNNI256 1
#define DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define VNNI256 0
#define DPBUSD(acc, a, b) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
#define DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

typedef __m128i V4I;
typedef __m128 V4F;
#define v4f_zero() _mm_setzero_ps()
#define v4f_set1(f) _mm_set1_ps(f)
#define v4f_add(a, b) _mm_add_ps(a, b)
#define v4f_sub(a, b) _mm_sub_ps(a, b)
#define v4f_mul(a, b) _mm_mul_ps(a, b)
#define v4f_cvt(i) _mm_cvtepi32_ps(i)
#define v4f_store(p, a) _mm_storeu_ps(p, a)

static AI V4F load4_fp16(const uint8_t *const *w, size_t at) {
    uint16_t h[4];
    for (int r = 0; r < 4; r++) memcpy(h + r, w[r] + at, 2);
    const uint64_t v = h[0] | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 32 | (uint64_t)h[3] << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
}

/* lane r = sum of the 8 lanes of v[r] */
static AI __m128i reduce4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static AI __m256i nibbles32(const uint8_t *p) { /* 16 bytes -> lo nibbles | hi nibbles */
    const __m128i q = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}

static AI void tile_block32(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                            const int8_t *const xb[MR], const int32_t *const xs[MR],
                            V4I is[MR], V4I im[MR]) {
    __m256i x[MR], L[NR][MR];
    for (int t = 0; t < mt; t++) x[t] = _mm256_loadu_si256((const __m256i *)xb[t]);
    for (int r = 0; r < NR; r++) {
        const uint8_t *blk = w[r] + at;
        if (type == 8) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
#if VNNI256 /* (w + 128) unsigned; the 128*xs it adds is taken off below */
            const __m256i wu = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));
            for (int t = 0; t < mt; t++) L[r][t] = DPBUSD(_mm256_setzero_si256(), wu, x[t]);
#else
            const __m256i aw = _mm256_abs_epi8(wv);
            for (int t = 0; t < mt; t++)
                L[r][t] = DPBUSD(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x[t], wv));
#endif
        } else {
            const __m256i wv = nibbles32(blk + (type == 2 ? 2 : 4));
            for (int t = 0; t < mt; t++) L[r][t] = DPBUSD(_mm256_setzero_si256(), wv, x[t]);
        }
    }
    for (int t = 0; t < mt; t++) {
        const int s = xs[t][0];
        is[t] = reduce4(L[0][t], L[1][t], L[2][t], L[3][t]);
        if (type == 2) is[t] = _mm_sub_epi32(is[t], _mm_set1_epi32(8 * s));
        if (type == 8 && VNNI256) is[t] = _mm_sub_epi32(is[t], _mm_set1_epi32(128 * s));
        if (type == 3) im[t] = _mm_set1_epi32(s);
    }
}

/* Q4_K/Q5_K: the 8 6-bit scales (bytes 0..7) and mins (8..15), the values of k_scales16 */
static AI __m128i k_scales_simd(const uint8_t *blk) {
    const __m128i s = _mm_loadu_si128((const __m128i *)(blk + 4)); /* 12 bytes + 4 of qs */
    /* low bits: sc j<4: s[j]&63, j>=4: s[j+4]&15; mn j<4: s[j+4]&63, j>=4: s[j+4]>>4 */
    const __m128i a = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i lo = _mm_blend_epi32(
        _mm_and_si128(a, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
        _mm_and_si128(_mm_srli_epi16(a, 4), _mm_set1_epi8(15)), 0x8);
    /* high bits (j>=4): sc from s[j-4]>>6, mn from s[j]>>6, to bits 4-5 */
    const __m128i b = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    return _mm_or_si128(lo, _mm_srli_epi16(_mm_and_si128(b, _mm_set1_epi8((char)0xc0)), 2));
}

/* 4 rows' fp16 pairs at +0 and +2 (d and m / dmin), both converted at once */
static AI void load4_dm(const uint8_t *const *w, size_t at, V4F *d, V4F *m) {
    int32_t v[4];
    for (int r = 0; r < 4; r++) memcpy(v + r, w[r] + at, 4);
    const __m256 h = _mm256_cvtph_ps(_mm_set_epi32(v[3], v[2], v[1], v[0])); /* d0 m0 d1 m1 .. */
    const __m256 p = _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    *d = _mm256_castps256_ps128(p);
    *m = _mm256_extractf128_ps(p, 1);
}


#if defined(__AVX512BW__)
/* AVX-512: two 32-value sub-blocks per vector. Q4_K/Q5_K's nibble planes hold sub-blocks
 * (0|2), (1|3), (4|6), (5|7), so each token's activations are paired the same way once per
 * block; Q6_K's 64-byte halves are in value order. */
#if defined(__AVX512VNNI__)
#define DPWSSD512(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define DPWSSD512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif

static AI __m512i cat256(const int8_t *lo, const int8_t *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

static AI __m256i fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* Q4_K/Q5_K: int16 scale a in lanes 0-15, b in 16-31, for the pairs (a|b) above */
static const int16_t K4PAIR[4][32] __attribute__((aligned(64))) = {
#define KP(a, b) {a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b}
    KP(0, 2), KP(1, 3), KP(4, 6), KP(5, 7)
#undef KP
};
/* Q6_K: int8 scales 4q..4q+3, 8 bytes each (before widening to int16) */
static const uint8_t K6QUAD[4][32] __attribute__((aligned(32))) = {
#define KQ(q) {4*q, 4*q, 4*q, 4*q, 4*q, 4*q, 4*q, 4*q, 4*q+1, 4*q+1, 4*q+1, 4*q+1, 4*q+1, 4*q+1, 4*q+1, \
    4*q+1, 4*q+2, 4*q+2, 4*q+2, 4*q+2, 4*q+2, 4*q+2, 4*q+2, 4*q+2, 4*q+3, 4*q+3, 4*q+3, 4*q+3, \
    4*q+3, 4*q+3, 4*q+3, 4*q+3}
    KQ(0), KQ(1), KQ(2), KQ(3)
#undef KQ
};

static AI void tile_blockk(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                           const int8_t *const xb[MR], const int16_t *const xs16[MR],
                           V4I is[MR], V4I im[MR]) {
    const __m512i m4 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    __m512i X[MR][4];
    __m256i L[NR][MR], xsv[MR];
    __m128i Lm[NR][MR], x32[MR];
    for (int t = 0; t < mt; t++) {
        const int8_t *x = xb[t];
        if (type == 14) {
            for (int i = 0; i < 4; i++) X[t][i] = _mm512_loadu_si512((const void *)(x + 64 * i));
            xsv[t] = _mm256_loadu_si256((const __m256i *)xs16[t]);
        } else {
            X[t][0] = cat256(x, x + 64);
            X[t][1] = cat256(x + 32, x + 96);
            X[t][2] = cat256(x + 128, x + 192);
            X[t][3] = cat256(x + 160, x + 224);
            x32[t] = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xs16[t]),
                                    _mm_loadu_si128((const __m128i *)(xs16[t] + 8)));
        }
    }
    for (int r = 0; r < NR; r++) {
        const uint8_t *blk = w[r] + at;
        __m512i acc[MR];
        for (int t = 0; t < mt; t++) acc[t] = _mm512_setzero_si512();
        if (type == 14) {
            const __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
            const __m256i sc8x2 = _mm256_broadcastsi128_si256(sc8);
            const __m512i c02 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
            const __m512i c46 = _mm512_add_epi16(c02, _mm512_set1_epi16(4));
            for (int j = 0; j < 2; j++) {
                const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * j));
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * j)));
                __m512i v[2];
                v[0] = _mm512_or_si512(_mm512_and_si512(ql, m4),
                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, c02), m3), 4));
                v[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, c46), m3), 4));
                for (int h = 0; h < 2; h++) {
                    const __m512i scl = _mm512_cvtepi8_epi16(
                        _mm256_shuffle_epi8(sc8x2, _mm256_load_si256((const __m256i *)K6QUAD[2 * j + h])));
                    for (int t = 0; t < mt; t++)
                        acc[t] = DPWSSD512(acc[t], _mm512_maddubs_epi16(v[h], X[t][2 * j + h]), scl);
                }
            }
            const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            for (int t = 0; t < mt; t++)
                L[r][t] = _mm256_sub_epi32(fold512(acc[t]), _mm256_slli_epi32(_mm256_madd_epi16(sc16, xsv[t]), 5));
        } else {
            const __m256i sm16 = _mm256_cvtepu8_epi16(k_scales_simd(blk));
            const __m512i sc = _mm512_castsi256_si512(sm16);
            const __m128i mins = _mm256_extracti128_si256(sm16, 1);
            const uint8_t *qs = blk + (type == 12 ? 16 : 48);
            const __m512i q01 = _mm512_loadu_si512((const void *)qs), q23 = _mm512_loadu_si512((const void *)(qs + 64));
            __m512i v[4] = {_mm512_and_si512(q01, m4), _mm512_and_si512(_mm512_srli_epi16(q01, 4), m4),
                            _mm512_and_si512(q23, m4), _mm512_and_si512(_mm512_srli_epi16(q23, 4), m4)};
            if (type == 13) { /* 5th bits: bit s of qh[l] for sub-block s, pairs as above */
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
                const __m512i b16 = _mm512_set1_epi8(16);
                for (int i = 0; i < 4; i++) {
                    const int sa = (i / 2) * 4 + (i % 2); /* pair i = (sa | sa + 2) */
                    const __m512i bit = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)(1 << sa))),
                                                           _mm256_set1_epi8((char)(1 << (sa + 2))), 1);
                    v[i] = _mm512_mask_add_epi8(v[i], _mm512_test_epi8_mask(qh, bit), v[i], b16);
                }
            }
            for (int i = 0; i < 4; i++) {
                const __m512i scl = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)K4PAIR[i]), sc);
                for (int t = 0; t < mt; t++)
                    acc[t] = DPWSSD512(acc[t], _mm512_maddubs_epi16(v[i], X[t][i]), scl);
            }
            for (int t = 0; t < mt; t++) {
                L[r][t] = fold512(acc[t]);
                Lm[r][t] = _mm_madd_epi16(mins, x32[t]);
            }
        }
    }
    for (int t = 0; t < mt; t++) {
        is[t] = reduce4(L[0][t], L[1][t], L[2][t], L[3][t]);
        if (type != 14)
            im[t] = _mm_hadd_epi32(_mm_hadd_epi32(Lm[0][t], Lm[1][t]), _mm_hadd_epi32(Lm[2][t], Lm[3][t]));
    }
}
#else /* AVX2: one 32-value sub-block per vector */
/* byte shuffles: Q4_K/Q5_K scale s to all 16 int16 lanes (of [sc0..7 | sc0..7]) */
static const uint8_t K4SHUF[8][32] __attribute__((aligned(32))) = {
#define K4ROW(s) {2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, \
    2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, 2*s, 2*s+1, \
    2*s, 2*s+1, 2*s, 2*s+1}
    K4ROW(0), K4ROW(1), K4ROW(2), K4ROW(3), K4ROW(4), K4ROW(5), K4ROW(6), K4ROW(7)
#undef K4ROW
};
/* Q6_K: its 16 int8 scales as even ones then odd ones; widened to int16, lane 0 holds sc[2c]
 * and lane 1 sc[2c+1] at position c, so K4SHUF[c] spreads chunk c's scales (values 32c..32c+15
 * in lane 0, 32c+16.. in lane 1) in one shuffle */
static const uint8_t K6EVENODD[16] __attribute__((aligned(16))) = {0, 2, 4, 6, 8, 10, 12, 14,
                                                                   1, 3, 5, 7, 9, 11, 13, 15};

static AI void tile_blockk(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                           const int8_t *const xb[MR], const int16_t *const xs16[MR],
                           V4I is[MR], V4I im[MR]) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256i L[NR][MR], xsv[MR];
    __m128i Lm[NR][MR], x32[MR];
    for (int t = 0; t < mt; t++) {
        if (type == 14) {
            xsv[t] = _mm256_loadu_si256((const __m256i *)xs16[t]);
        } else { /* the 8 sums of 32 from the 16 sums of 16 */
            x32[t] = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xs16[t]),
                                    _mm_loadu_si128((const __m128i *)(xs16[t] + 8)));
        }
    }
    for (int r = 0; r < NR; r++) {
        const uint8_t *blk = w[r] + at;
        __m256i acc[MR];
        for (int t = 0; t < mt; t++) acc[t] = _mm256_setzero_si256();
        if (type == 14) {
            const __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
            const __m256i eo = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i *)K6EVENODD)));
            for (int j = 0; j < 2; j++) {
                const __m256i a = _mm256_loadu_si256((const __m256i *)(blk + 64 * j));
                const __m256i b = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32));
                const __m256i h = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * j));
                __m256i v[4];
                v[0] = _mm256_or_si256(_mm256_and_si256(a, m4),
                                       _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(3)), 4));
                v[1] = _mm256_or_si256(_mm256_and_si256(b, m4),
                                       _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(12)), 2));
                v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                                       _mm256_and_si256(h, _mm256_set1_epi8(48)));
                v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
                                       _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xc0)), 2));
                for (int i = 0; i < 4; i++) {
                    const __m256i scl = _mm256_shuffle_epi8(eo, _mm256_load_si256((const __m256i *)K4SHUF[4 * j + i]));
                    for (int t = 0; t < mt; t++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xb[t] + 128 * j + 32 * i));
                        acc[t] = DPWSSD(acc[t], _mm256_maddubs_epi16(v[i], xv), scl);
                        KEEP(acc[t]);
                    }
                }
            }
            const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            for (int t = 0; t < mt; t++)
                L[r][t] = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, xsv[t]), 5));
        } else {
            const __m256i sm16 = _mm256_cvtepu8_epi16(k_scales_simd(blk));
            const __m256i scs = _mm256_permute2x128_si256(sm16, sm16, 0x00);
            const __m128i mins = _mm256_extracti128_si256(sm16, 1);
            const uint8_t *qs = blk + (type == 12 ? 16 : 48);
            const __m256i qh = type == 13 ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : m4;
            for (int p = 0; p < 4; p++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
                __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if (type == 13) { /* 5th bits: bit 2p of qh[l] for the low nibbles, 2p+1 high */
                    const __m256i one = _mm256_set1_epi8(1), hp = _mm256_srli_epi16(qh, 2 * p);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hp, one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hp, 1), one), 4));
                }
                const __m256i sl = _mm256_shuffle_epi8(scs, _mm256_load_si256((const __m256i *)K4SHUF[2 * p]));
                const __m256i sh = _mm256_shuffle_epi8(scs, _mm256_load_si256((const __m256i *)K4SHUF[2 * p + 1]));
                for (int t = 0; t < mt; t++) {
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xb[t] + 64 * p));
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb[t] + 64 * p + 32));
                    acc[t] = DPWSSD(acc[t], _mm256_maddubs_epi16(lo, x0), sl);
                    acc[t] = DPWSSD(acc[t], _mm256_maddubs_epi16(hi, x1), sh);
                    KEEP(acc[t]);
                }
            }
            for (int t = 0; t < mt; t++) {
                L[r][t] = acc[t];
                Lm[r][t] = _mm_madd_epi16(mins, x32[t]);
            }
        }
    }
    for (int t = 0; t < mt; t++) {
        is[t] = reduce4(L[0][t], L[1][t], L[2][t], L[3][t]);
        if (type != 14)
            im[t] = _mm_hadd_epi32(_mm_hadd_epi32(Lm[0][t], Lm[1][t]), _mm_hadd_epi32(Lm[2][t], Lm[3][t]));
    }
}

#endif /* __AVX512BW__ */
#elif USE_NEON

typedef int32x4_t V4I;
typedef float32x4_t V4F;
#define v4f_zero() vdupq_n_f32(0.0f)
#define v4f_set1(f) vdupq_n_f32(f)
#define v4f_add(a, b) vaddq_f32(a, b)
#define v4f_sub(a, b) vsubq_f32(a, b)
#define v4f_mul(a, b) vmulq_f32(a, b)
#define v4f_cvt(i) vcvtq_f32_s32(i)
#define v4f_store(p, a) vst1q_f32(p, a)

static AI V4F load4_fp16(const uint8_t *const *w, size_t at) {
    uint16_t h[4];
    for (int r = 0; r < 4; r++) memcpy(h + r, w[r] + at, 2);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

static AI void load4_dm(const uint8_t *const *w, size_t at, V4F *d, V4F *m) {
    *d = load4_fp16(w, at);
    *m = load4_fp16(w, at + 2);
}

/* acc + the 16 products a*b, in 4 int32 lanes (which lane holds which product differs between
 * the two ways; only whole sums are used) */
static AI int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else /* |a*b| <= 128*127, so two products fit int16 */
    return vpadalq_s16(acc, vaddq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)), vmull_high_s8(a, b)));
#endif
}

static AI int32x4_t reduce4(int32x4_t v0, int32x4_t v1, int32x4_t v2, int32x4_t v3) {
    return vpaddq_s32(vpaddq_s32(v0, v1), vpaddq_s32(v2, v3));
}

static AI void tile_block32(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                            const int8_t *const xb[MR], const int32_t *const xs[MR],
                            V4I is[MR], V4I im[MR]) {
    int8x16_t x0[MR], x1[MR];
    int32x4_t L[NR][MR];
    for (int t = 0; t < mt; t++) {
        x0[t] = vld1q_s8(xb[t]);
        x1[t] = vld1q_s8(xb[t] + 16);
    }
    for (int r = 0; r < NR; r++) {
        const uint8_t *blk = w[r] + at;
        int8x16_t w0, w1;
        if (type == 8) {
            w0 = vld1q_s8((const int8_t *)(blk + 2));
            w1 = vld1q_s8((const int8_t *)(blk + 18));
        } else {
            const uint8x16_t q = vld1q_u8(blk + (type == 2 ? 2 : 4));
            w0 = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15)));
            w1 = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
        }
        for (int t = 0; t < mt; t++) L[r][t] = dot16(dot16(vdupq_n_s32(0), w0, x0[t]), w1, x1[t]);
    }
    for (int t = 0; t < mt; t++) {
        const int s = xs[t][0];
        is[t] = reduce4(L[0][t], L[1][t], L[2][t], L[3][t]);
        if (type == 2) is[t] = vsubq_s32(is[t], vdupq_n_s32(8 * s));
        if (type == 3) im[t] = vdupq_n_s32(s);
    }
}

static AI void tile_blockk(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                           const int8_t *const xb[MR], const int16_t *const xs16[MR],
                           V4I is[MR], V4I im[MR]) {
    const uint8x16_t m4 = vdupq_n_u8(15), m3 = vdupq_n_u8(3);
    int32x4_t L[NR][MR], Lm[NR][MR];
    int16x8_t x32[MR], s16lo[MR], s16hi[MR];
    for (int t = 0; t < mt; t++) {
        s16lo[t] = vld1q_s16(xs16[t]);
        s16hi[t] = vld1q_s16(xs16[t] + 8);
        x32[t] = vpaddq_s16(s16lo[t], s16hi[t]); /* the 8 sums of 32 */
    }
    for (int r = 0; r < NR; r++) {
        const uint8_t *blk = w[r] + at;
        int32x4_t acc[MR];
        for (int t = 0; t < mt; t++) acc[t] = vdupq_n_s32(0);
        if (type == 14) {
            const int8_t *sc = (const int8_t *)(blk + 192);
            for (int j = 0; j < 2; j++) {
                const uint8_t *ql = blk + 64 * j, *qh = blk + 128 + 32 * j;
                const uint8x16_t a0 = vld1q_u8(ql), a1 = vld1q_u8(ql + 16);
                const uint8x16_t b0 = vld1q_u8(ql + 32), b1 = vld1q_u8(ql + 48);
                const uint8x16_t h0 = vld1q_u8(qh), h1 = vld1q_u8(qh + 16);
                uint8x16_t v[8]; /* 16 values each, in order */
                v[0] = vorrq_u8(vandq_u8(a0, m4), vshlq_n_u8(vandq_u8(h0, m3), 4));
                v[1] = vorrq_u8(vandq_u8(a1, m4), vshlq_n_u8(vandq_u8(h1, m3), 4));
                v[2] = vorrq_u8(vandq_u8(b0, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h0, 2), m3), 4));
                v[3] = vorrq_u8(vandq_u8(b1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h1, 2), m3), 4));
                v[4] = vorrq_u8(vshrq_n_u8(a0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h0, 4), m3), 4));
                v[5] = vorrq_u8(vshrq_n_u8(a1, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h1, 4), m3), 4));
                v[6] = vorrq_u8(vshrq_n_u8(b0, 4), vshlq_n_u8(vshrq_n_u8(h0, 6), 4));
                v[7] = vorrq_u8(vshrq_n_u8(b1, 4), vshlq_n_u8(vshrq_n_u8(h1, 6), 4));
                for (int i = 0; i < 8; i++)
                    for (int t = 0; t < mt; t++)
                        acc[t] = vmlaq_n_s32(acc[t], dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(v[i]),
                                                           vld1q_s8(xb[t] + 128 * j + 16 * i)),
                                             sc[8 * j + i]);
            }
            const int8x16_t sc8 = vld1q_s8(sc);
            const int16x8_t sclo = vmovl_s8(vget_low_s8(sc8)), schi = vmovl_high_s8(sc8);
            for (int t = 0; t < mt; t++) {
                int32x4_t o = vmull_s16(vget_low_s16(sclo), vget_low_s16(s16lo[t]));
                o = vmlal_high_s16(o, sclo, s16lo[t]);
                o = vmlal_s16(o, vget_low_s16(schi), vget_low_s16(s16hi[t]));
                o = vmlal_high_s16(o, schi, s16hi[t]);
                L[r][t] = vsubq_s32(acc[t], vshlq_n_s32(o, 5));
            }
        } else {
            uint32_t u[4];
            uint8_t sm[16];
            k_scales16(blk, u);
            memcpy(sm, u, 16);
            const int16x8_t mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(sm + 8)));
            const uint8_t *qs = blk + (type == 12 ? 16 : 48);
            uint8x16_t h0 = vdupq_n_u8(0), h1 = h0;
            if (type == 13) {
                h0 = vld1q_u8(blk + 16);
                h1 = vld1q_u8(blk + 32);
            }
            for (int p = 0; p < 4; p++) {
                const uint8x16_t q0 = vld1q_u8(qs + 32 * p), q1 = vld1q_u8(qs + 32 * p + 16);
                uint8x16_t lo0 = vandq_u8(q0, m4), lo1 = vandq_u8(q1, m4);
                uint8x16_t hi0 = vshrq_n_u8(q0, 4), hi1 = vshrq_n_u8(q1, 4);
                if (type == 13) { /* 5th bits: bit 2p of qh[l] for the low nibbles, 2p+1 high */
                    const uint8x16_t one = vdupq_n_u8(1);
                    const int8x16_t sl = vdupq_n_s8((int8_t)(-2 * p)), sh = vdupq_n_s8((int8_t)(-2 * p - 1));
                    lo0 = vorrq_u8(lo0, vshlq_n_u8(vandq_u8(vshlq_u8(h0, sl), one), 4));
                    lo1 = vorrq_u8(lo1, vshlq_n_u8(vandq_u8(vshlq_u8(h1, sl), one), 4));
                    hi0 = vorrq_u8(hi0, vshlq_n_u8(vandq_u8(vshlq_u8(h0, sh), one), 4));
                    hi1 = vorrq_u8(hi1, vshlq_n_u8(vandq_u8(vshlq_u8(h1, sh), one), 4));
                }
                for (int t = 0; t < mt; t++) {
                    const int8_t *x = xb[t] + 64 * p;
                    const int32x4_t dl = dot16(dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(lo0), vld1q_s8(x)),
                                               vreinterpretq_s8_u8(lo1), vld1q_s8(x + 16));
                    const int32x4_t dh = dot16(dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(hi0), vld1q_s8(x + 32)),
                                               vreinterpretq_s8_u8(hi1), vld1q_s8(x + 48));
                    acc[t] = vmlaq_n_s32(vmlaq_n_s32(acc[t], dl, sm[2 * p]), dh, sm[2 * p + 1]);
                }
            }
            for (int t = 0; t < mt; t++) {
                L[r][t] = acc[t];
                Lm[r][t] = vmlal_high_s16(vmull_s16(vget_low_s16(mins), vget_low_s16(x32[t])), mins, x32[t]);
            }
        }
    }
    for (int t = 0; t < mt; t++) {
        is[t] = reduce4(L[0][t], L[1][t], L[2][t], L[3][t]);
        if (type != 14) im[t] = reduce4(Lm[0][t], Lm[1][t], Lm[2][t], Lm[3][t]);
    }
}

#else /* portable C */

typedef struct { int32_t v[4]; } V4I;
typedef struct { float v[4]; } V4F;
static inline V4F v4f_zero(void) { V4F a = {{0, 0, 0, 0}}; return a; }
static inline V4F v4f_set1(float f) { V4F a = {{f, f, f, f}}; return a; }
#define V4F_OP(name, op) \
    static inline V4F name(V4F a, V4F b) { for (int i = 0; i < 4; i++) a.v[i] = a.v[i] op b.v[i]; return a; }
V4F_OP(v4f_add, +)
V4F_OP(v4f_sub, -)
V4F_OP(v4f_mul, *)
#undef V4F_OP
static inline V4F v4f_cvt(V4I x) { V4F a; for (int i = 0; i < 4; i++) a.v[i] = (float)x.v[i]; return a; }
static inline void v4f_store(float *p, V4F a) { memcpy(p, a.v, sizeof a.v); }

static inline V4F load4_fp16(const uint8_t *const *w, size_t at) {
    V4F a;
    for (int r = 0; r < 4; r++) a.v[r] = fp16_to_fp32(w[r] + at);
    return a;
}

static inline void load4_dm(const uint8_t *const *w, size_t at, V4F *d, V4F *m) {
    *d = load4_fp16(w, at);
    *m = load4_fp16(w, at + 2);
}

static AI void tile_block_c(int type, int mt, const uint8_t *const w[NR], size_t at,
                            const int8_t *const xb[MR], const int32_t *const xs[MR],
                            const int16_t *const xs16[MR], V4I is[MR], V4I im[MR]) {
    uint8_t u[256];
    int sc[16], mn[8];
    for (int r = 0; r < NR; r++) {
        if (int_block(type) == 256) blk_unpack(type, w[r] + at, u, sc, mn); /* once per row */
        for (int t = 0; t < mt; t++)
            blk_int(type, w[r] + at, u, sc, mn, xb[t], xs[t], xs16[t], &is[t].v[r], &im[t].v[r]);
    }
}
#define tile_block tile_block_c
#endif

#if INT_SIMD || USE_NEON
static AI void tile_block(const int type, const int mt, const uint8_t *const w[NR], size_t at,
                          const int8_t *const xb[MR], const int32_t *const xs[MR],
                          const int16_t *const xs16[MR], V4I is[MR], V4I im[MR]) {
    if (int_block(type) == 32) tile_block32(type, mt, w, at, xb, xs, is, im);
    else tile_blockk(type, mt, w, at, xb, xs16, is, im);
}
#endif

/* out[t][r] = (token t0+t) . (row w[r]) for t < mt, over all blocks (block b of row r at
 * w[r] + b * stride); nw: the next tile's rows (prefetched: 4 short row streams at a time
 * defeat the hardware prefetcher from DRAM; interleaved rows prefetch their one stream) */
static AI void gv_tile(const int type, const int mt, const uint8_t *const w[NR],
                       const uint8_t *const nw[NR], const size_t stride, const xq_t *X, int t0,
                       float out[MR][NR]) {
    const int K = X->K, nb = X->nb, B = int_block(type), bb = block_bytes(type);
    const int has_m = type == 3 || type == 12 || type == 13;
    const int8_t *xb[MR];
    const int32_t *xs[MR];
    const int16_t *xs16[MR];
    V4F a[MR];
    for (int t = 0; t < mt; t++) a[t] = v4f_zero();
    for (int b = 0; b < nb; b++) {
        const size_t at = (size_t)b * stride;
        if (stride != (size_t)bb) /* interleaved: one stream, 2 blocks ahead (measured +3-30 %) */
            for (int o = 0; o < NR * bb; o += 64) __builtin_prefetch(w[0] + at + 2 * stride + o, 0, 3);
        else
            for (int r = 0; r < NR; r++)
                for (int o = 0; o < bb; o += 64) __builtin_prefetch(nw[r] + at + o, 0, 3);
        for (int t = 0; t < mt; t++) {
            const size_t row = (size_t)(t0 + t);
            xb[t] = X->q + row * K + (size_t)b * B;
            xs[t] = X->s + row * (K / 32) + (size_t)b * (B / 32);
            xs16[t] = B == 256 ? X->s16 + row * (K / 16) + (size_t)b * 16 : 0;
        }
        V4I is[MR], im[MR];
        tile_block(type, mt, w, at, xb, xs, xs16, is, im);
        V4F dw, mw = v4f_zero();
        if (has_m) load4_dm(w, at, &dw, &mw);
        else dw = load4_fp16(w, at + (type == 14 ? 208 : 0));
        for (int t = 0; t < mt; t++) { /* the fp32 step of the formulas above, on 4 rows */
            const V4F dx = v4f_set1(X->d[(size_t)(t0 + t) * nb + b]);
            const V4F ti = v4f_mul(v4f_mul(dw, dx), v4f_cvt(is[t]));
            if (type == 3)
                a[t] = v4f_add(a[t], v4f_add(ti, v4f_mul(v4f_mul(mw, dx), v4f_cvt(im[t]))));
            else if (has_m)
                a[t] = v4f_sub(v4f_add(a[t], ti), v4f_mul(v4f_mul(mw, dx), v4f_cvt(im[t])));
            else
                a[t] = v4f_add(a[t], ti);
        }
    }
    for (int t = 0; t < mt; t++) v4f_store(out[t], a[t]);
}

/* every (type, token count) as its own compiled copy, so the accumulators stay in registers */
#define GV_CASE(T)                                                        \
    case T:                                                               \
        switch (mt) {                                                     \
        case 1: gv_tile(T, 1, w, nw, stride, X, t0, out); break;                  \
        case 2: gv_tile(T, 2, w, nw, stride, X, t0, out); break;                  \
        case 3: gv_tile(T, 3, w, nw, stride, X, t0, out); break;                  \
        default: gv_tile(T, 4, w, nw, stride, X, t0, out); break;                 \
        }                                                                 \
        break;

static void gv_dispatch(int type, int mt, const uint8_t *const w[NR], const uint8_t *const nw[NR],
                        size_t stride, const xq_t *X, int t0, float out[MR][NR]) {
    switch (type) {
    GV_CASE(2) GV_CASE(3) GV_CASE(8) GV_CASE(12) GV_CASE(13) GV_CASE(14)
    }
}
#undef GV_CASE

/* ---- Q5_K/Q6_K interleaved at load: their own blocks, NR rows side by side ------------------
 * Group g of NR rows (a last partial group repeats its last row), block b of its row r at
 * base + ((g * nb + b) * NR + r) * block bytes: the small tiles above read one sequential
 * stream instead of NR short ones (measured on Zen 4, 1B shapes from DRAM, 2 threads: the
 * rows give 17-26 GB/s, a hot cache 34-50, so the row streams, not the arithmetic, bound
 * them). The same kernels run on them, so results are bit-identical to the rows. Their ids:
 * RI_* = 200 + the ggml type. */
#define RI_Q5_K 213
#define RI_Q6_K 214
static int ri_source(int type) { return type > 200 ? type - 200 : 0; }

/* where row n starts (block 0) for a row layout (offsets) or an interleaved one (gbytes: one
 * group's bytes, bb: one block's) */
static inline const uint8_t *row_start(const uint8_t *base, const int64_t *offsets, int ri, int n,
                                       size_t gbytes, size_t bb) {
    return ri ? base + (size_t)(n / NR) * gbytes + (size_t)(n % NR) * bb : base + offsets[n];
}

/* output rows [n0, n1) for tokens [0, M), small tiles; y at column n0 */
static void gv_range(int type, const xq_t *X, int M, const uint8_t *base, const int64_t *offsets,
                     int n0, int n1, float *y, int ldy) {
    const int ri = ri_source(type) != 0, src = ri ? ri_source(type) : type;
    const size_t bb = (size_t)block_bytes(src), gbytes = (size_t)X->nb * NR * bb;
    const size_t stride = ri ? NR * bb : bb;
    const int start = ri ? n0 - n0 % NR : n0; /* interleaved: whole groups, the rows asked kept */
    for (int c0 = 0; c0 < M; c0 += TCHUNK) {
        const int c1 = M - c0 < TCHUNK ? M : c0 + TCHUNK;
        for (int n = start; n < n1; n += NR) {
            const int r0 = n0 > n ? n0 - n : 0, r1 = n1 - n < NR ? n1 - n : NR;
            const uint8_t *w[NR], *nw[NR];
            for (int r = 0; r < NR; r++) {
                w[r] = row_start(base, offsets, ri, n + (r < r1 ? r : r1 - 1), gbytes, bb);
                nw[r] = n + NR + r < n1 ? row_start(base, offsets, ri, n + NR + r, gbytes, bb) : w[r];
            }
            float out[MR][NR];
            for (int t0 = c0; t0 < c1; t0 += MR) {
                const int mt = c1 - t0 < MR ? c1 - t0 : MR;
                gv_dispatch(src, mt, w, nw, stride, X, t0, out);
                for (int t = 0; t < mt; t++)
                    for (int r = r0; r < r1; r++) y[(size_t)(t0 + t) * ldy + (n - n0) + r] = out[t][r];
            }
        }
    }
}

#if INT_SIMD
/* ---- steps of several tokens (x86): TL weight rows in the TL lanes (8 or 16) ------------------
 * A tile of TL rows is unpacked once for all its blocks and transposed so that lane r of a
 * vector holds 4 consecutive bytes of row r; each token's 4-byte group is broadcast and
 * dotted against it (dpbusd / maddubs+madd), so lane r accumulates row r's block sum with no
 * horizontal reduction, and the fp32 scale step runs on TL rows at once. Same integers, same
 * fp32 operations per row as above: bit-identical to the small-step and portable code. */

/* unpacked weight values of one 256-block: 8 x 32 bytes, unsigned (Q6_K: q + 32) */
static inline void k_unpack(int type, const uint8_t *blk, uint8_t *out) {
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
}

#define MT 4 /* tokens per pass over a prepared tile */

/* The tile's vector width: 16 rows in zmm lanes with AVX-512 VNNI, else 8 in ymm lanes (the
 * plain AVX-512 build keeps 8: without VNNI its Q8_0 needs sign_epi8, which has no zmm form). */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TL 16
typedef __m512i TVI;
typedef __m512 TVF;
#define tvi_zero() _mm512_setzero_si512()
#define tvi_add(a, b) _mm512_add_epi32(a, b)
#define tvi_sub(a, b) _mm512_sub_epi32(a, b)
#define tvi_mullo(a, b) _mm512_mullo_epi32(a, b)
#define tvi_madd16(a, b) _mm512_madd_epi16(a, b)
#define tvi_slli(a, n) _mm512_slli_epi32(a, n)
#define tvi_set1(v) _mm512_set1_epi32(v)
#define tvi_dpbusd(acc, a, b) _mm512_dpbusd_epi32(acc, a, b)
#define tvf_zero() _mm512_setzero_ps()
#define tvf_set1(f) _mm512_set1_ps(f)
#define tvf_add(a, b) _mm512_add_ps(a, b)
#define tvf_sub(a, b) _mm512_sub_ps(a, b)
#define tvf_mul(a, b) _mm512_mul_ps(a, b)
#define tvf_cvt(i) _mm512_cvtepi32_ps(i)
#define tvf_store(p, a) _mm512_storeu_ps(p, a)
static AI TVI tvi_cat(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
static AI TVF tvf_cat(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
#else
#define TL 8
typedef __m256i TVI;
typedef __m256 TVF;
#define tvi_zero() _mm256_setzero_si256()
#define tvi_add(a, b) _mm256_add_epi32(a, b)
#define tvi_sub(a, b) _mm256_sub_epi32(a, b)
#define tvi_mullo(a, b) _mm256_mullo_epi32(a, b)
#define tvi_madd16(a, b) _mm256_madd_epi16(a, b)
#define tvi_slli(a, n) _mm256_slli_epi32(a, n)
#define tvi_set1(v) _mm256_set1_epi32(v)
#define tvi_dpbusd(acc, a, b) DPBUSD(acc, a, b)
#define tvf_zero() _mm256_setzero_ps()
#define tvf_set1(f) _mm256_set1_ps(f)
#define tvf_add(a, b) _mm256_add_ps(a, b)
#define tvf_sub(a, b) _mm256_sub_ps(a, b)
#define tvf_mul(a, b) _mm256_mul_ps(a, b)
#define tvf_cvt(i) _mm256_cvtepi32_ps(i)
#define tvf_store(p, a) _mm256_storeu_ps(p, a)
#endif

/* prep32: t the transposed values (Q8_0 with VNNI: w + 128, unsigned; without: signed, and a
 * their absolute values); dw, mw the block's fp16 scales */
typedef struct { TVI t[8], a[8]; TVF dw, mw; } prep32;
/* prep256: t the transposed values, sc the scales per sub-block (16 of 16 values for Q6_K, 8
 * of 32 otherwise), scp int16 pairs per lane for one madd against a token's pair of sums:
 * Q6_K (sc[2i], sc[2i+1]) x 16-sums; Q4_K/Q5_K (mn[2i], mn[2i+1]) x 32-sums, i < 4 */
typedef struct { TVI t[64], sc[16], scp[8]; TVF d, dmin; } prep256;

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

static inline int32_t load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m256 fp16x8(const uint8_t *const *w, size_t at) {
    uint16_t h[8];
    for (int r = 0; r < 8; r++) memcpy(h + r, w[r] + at, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

/* 8 rows of one 32-value block, transposed: lane r of t[g] = bytes 4g..4g+3 of row r */
static void prep32_half(int type, const uint8_t *const w[8], size_t at, __m256i t[8], __m256 *dw,
                        __m256 *mw) {
    *dw = fp16x8(w, at);
    *mw = type == 3 ? fp16x8(w, at + 2) : _mm256_setzero_ps();
    for (int i = 0; i < 8; i++)
        t[i] = type == 8 ? _mm256_loadu_si256((const __m256i *)(w[i] + at + 2))
                         : nibbles32(w[i] + at + (type == 2 ? 2 : 4));
    transpose8x8(t);
}

/* 8 rows of one 256-value block: t[64] transposed, sc[16] / scp[8] per lane, d, dmin */
static void prep256_half(int type, const uint8_t *const w[8], size_t at, __m256i *t, __m256i *sc,
                         __m256i *scp, __m256 *d, __m256 *dmin) {
    uint8_t u[8][256] __attribute__((aligned(32)));
    kscales k[8];
    float dd[8], dm[8];
    for (int i = 0; i < 8; i++) {
        k_scales(type, w[i] + at, &k[i]);
        k_unpack(type, w[i] + at, u[i]);
        dd[i] = k[i].d;
        dm[i] = k[i].dmin;
    }
    *d = _mm256_loadu_ps(dd);
    *dmin = _mm256_loadu_ps(dm);
    for (int c = 0; c < 8; c++) {
        __m256i r[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_load_si256((const __m256i *)(u[i] + c * 32));
        transpose8x8(r);
        for (int g = 0; g < 8; g++) t[c * 8 + g] = r[g];
    }
    int32_t v[8];
    for (int j = 0; j < (type == 14 ? 16 : 8); j++) {
        for (int i = 0; i < 8; i++) v[i] = k[i].sc[j];
        sc[j] = _mm256_loadu_si256((const __m256i *)v);
    }
    for (int q = 0; q < 8; q++) {
        for (int i = 0; i < 8; i++) {
            const int lo = type == 14 ? k[i].sc[2 * q] : k[i].mn[(2 * q) % 8];
            const int hi = type == 14 ? k[i].sc[2 * q + 1] : k[i].mn[(2 * q + 1) % 8];
            v[i] = (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
        }
        scp[q] = _mm256_loadu_si256((const __m256i *)v);
    }
}

static void prep32_block(int type, const uint8_t *const w[TL], size_t at, prep32 *p) {
    __m256i t[TL / 8][8];
    __m256 dw[TL / 8], mw[TL / 8];
    for (int h = 0; h < TL / 8; h++) prep32_half(type, w + 8 * h, at, t[h], &dw[h], &mw[h]);
#if TL == 16
    for (int g = 0; g < 8; g++) p->t[g] = tvi_cat(t[0][g], t[1][g]);
    p->dw = tvf_cat(dw[0], dw[1]);
    p->mw = tvf_cat(mw[0], mw[1]);
#else
    for (int g = 0; g < 8; g++) p->t[g] = t[0][g];
    p->dw = dw[0];
    p->mw = mw[0];
#endif
    if (type == 8)
        for (int g = 0; g < 8; g++) {
#if TL == 16
            p->t[g] = _mm512_xor_si512(p->t[g], _mm512_set1_epi8((char)0x80)); /* w + 128 */
#elif VNNI256
            p->t[g] = _mm256_xor_si256(p->t[g], _mm256_set1_epi8((char)0x80));
#else
            p->a[g] = _mm256_abs_epi8(p->t[g]);
#endif
        }
}

static void prep256_block(int type, const uint8_t *const w[TL], size_t at, prep256 *p) {
#if TL == 16
    __m256i t[2][64] __attribute__((aligned(32))), sc[2][16], scp[2][8];
    __m256 d[2], dm[2];
    for (int h = 0; h < 2; h++) prep256_half(type, w + 8 * h, at, t[h], sc[h], scp[h], &d[h], &dm[h]);
    for (int g = 0; g < 64; g++) p->t[g] = tvi_cat(t[0][g], t[1][g]);
    for (int j = 0; j < 16; j++) p->sc[j] = tvi_cat(sc[0][j], sc[1][j]);
    for (int q = 0; q < 8; q++) p->scp[q] = tvi_cat(scp[0][q], scp[1][q]);
    p->d = tvf_cat(d[0], d[1]);
    p->dmin = tvf_cat(dm[0], dm[1]);
#else
    prep256_half(type, w, at, p->t, p->sc, p->scp, &p->d, &p->dmin);
#if !VNNI256 /* tdot256_n's madd: the scale in both int16 halves of its lane */
    for (int j = 0; j < (type == 14 ? 16 : 8); j++)
        p->sc[j] = _mm256_or_si256(_mm256_and_si256(p->sc[j], _mm256_set1_epi32(0xffff)),
                                   _mm256_slli_epi32(p->sc[j], 16));
#endif
#endif
}

static AI void tdot32_n(int type, const prep32 *P, const xq_t *X, int t0, int mt, TVF *a) {
    const int nb = X->nb;
    for (int t = 0; t < mt; t++) a[t] = tvf_zero();
    for (int b = 0; b < nb; b++) {
        const prep32 *p = P + b;
        TVI is0[MT], is1[MT];
        for (int t = 0; t < mt; t++) is0[t] = is1[t] = tvi_zero();
#if TL == 8 && !VNNI256
        if (type != 8) { /* 4-bit values: the 8 groups' maddubs pairs summed in int16 (<= 16 *
                          * 15 * 127), one madd to int32 */
            __m256i p16[MT];
            for (int g = 0; g < 8; g++) {
                const __m256i tv = p->t[g];
                for (int t = 0; t < mt; t++) {
                    const int8_t *xr = X->q + (size_t)(t0 + t) * X->K + (size_t)b * 32;
                    const __m256i m = _mm256_maddubs_epi16(tv, tvi_set1(load4(xr + 4 * g)));
                    p16[t] = g ? _mm256_add_epi16(p16[t], m) : m;
                    KEEP(p16[t]);
                }
            }
            for (int t = 0; t < mt; t++) is0[t] = _mm256_madd_epi16(p16[t], _mm256_set1_epi16(1));
        }
#endif
        for (int g = 0; g < 8 && (TL == 16 || VNNI256 || type == 8); g += 2) {
            for (int t = 0; t < mt; t++) {
                const int8_t *xr = X->q + (size_t)(t0 + t) * X->K + (size_t)b * 32;
                const TVI x0 = tvi_set1(load4(xr + 4 * g)), x1 = tvi_set1(load4(xr + 4 * g + 4));
#if TL == 8 && !VNNI256 /* Q8_0: |w| * (x with w's sign) */
                const __m256i one = _mm256_set1_epi16(1);
                is0[t] = _mm256_add_epi32(is0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(p->a[g], _mm256_sign_epi8(x0, p->t[g])), one));
                is1[t] = _mm256_add_epi32(is1[t], _mm256_madd_epi16(_mm256_maddubs_epi16(p->a[g + 1], _mm256_sign_epi8(x1, p->t[g + 1])), one));
                KEEP(is0[t]);
                KEEP(is1[t]);
#else
                is0[t] = tvi_dpbusd(is0[t], p->t[g], x0);
                is1[t] = tvi_dpbusd(is1[t], p->t[g + 1], x1);
#endif
            }
        }
        for (int t = 0; t < mt; t++) {
            const size_t row = (size_t)(t0 + t);
            const float dx = X->d[row * nb + b];
            const int xs = X->s[row * nb + b];
            TVI is = tvi_add(is0[t], is1[t]);
            if (type == 2) is = tvi_sub(is, tvi_set1(8 * xs));
#if TL == 16 || VNNI256
            if (type == 8) is = tvi_sub(is, tvi_set1(128 * xs));
#endif
            TVF term = tvf_mul(tvf_mul(p->dw, tvf_set1(dx)), tvf_cvt(is));
            if (type == 3) term = tvf_add(term, tvf_mul(tvf_mul(p->mw, tvf_set1(dx)), tvf_set1((float)xs)));
            a[t] = tvf_add(a[t], term);
        }
    }
}

static AI void tdot256_n(int type, const prep256 *P, const xq_t *X, int t0, int mt, TVF *a) {
    const int nb = X->nb;
    for (int t = 0; t < mt; t++) a[t] = tvf_zero();
    for (int b = 0; b < nb; b++) {
        const prep256 *p = P + b;
        TVI tot[MT], sub[MT];
        const int8_t *xr[MT];
        for (int t = 0; t < mt; t++) {
            tot[t] = tvi_zero();
            xr[t] = X->q + (size_t)(t0 + t) * X->K + (size_t)b * 256;
        }
        const int nsub = type == 14 ? 16 : 8, per = type == 14 ? 4 : 8;
#if TL == 8 && !VNNI256
        /* no dpbusd: maddubs' int16 pairs summed over `run` groups stay below 2^15 (Q4_K 8 *
         * 2*15*127, Q5_K 4 * 2*31*127, Q6_K 2 * 2*63*127), so one madd with the scale in both
         * int16 halves (prep) both widens and scales them: the same integers as dpbusd +
         * mullo below in about 60 % of the instructions */
        (void)sub;
        const int run = type == 12 ? 8 : type == 13 ? 4 : 2;
        for (int j = 0; j < nsub; j++) {
#pragma GCC unroll 8
            for (int g0 = j * per; g0 < (j + 1) * per; g0 += run) {
                __m256i p16[MT];
#pragma GCC unroll 8
                for (int g = g0; g < g0 + run; g++) {
                    const TVI tv = p->t[g];
                    for (int t = 0; t < mt; t++) {
                        const __m256i m = _mm256_maddubs_epi16(tv, tvi_set1(load4(xr[t] + 4 * g)));
                        p16[t] = g == g0 ? m : _mm256_add_epi16(p16[t], m);
                        KEEP(p16[t]);
                    }
                }
                for (int t = 0; t < mt; t++) tot[t] = tvi_add(tot[t], tvi_madd16(p16[t], p->sc[j]));
            }
        }
#else
        for (int j = 0; j < nsub; j++) {
            for (int t = 0; t < mt; t++) sub[t] = tvi_zero();
#pragma GCC unroll 8
            for (int g = j * per; g < (j + 1) * per; g++) { /* g: 4-byte group in the block */
                const TVI tv = p->t[g];
                for (int t = 0; t < mt; t++) sub[t] = tvi_dpbusd(sub[t], tv, tvi_set1(load4(xr[t] + 4 * g)));
            }
            for (int t = 0; t < mt; t++) tot[t] = tvi_add(tot[t], tvi_mullo(sub[t], p->sc[j]));
        }
#endif
        for (int t = 0; t < mt; t++) {
            /* a pair of the token's sums per madd: Q6_K's -32*sum(sc*xs16) (16-sums, adjacent
             * in memory); Q4_K/Q5_K's mins (32-sums, packed here in scalar registers, which
             * the vector ports, the bottleneck, do not pay for) */
            TVI im = tvi_zero();
            if (type == 14) {
                const int16_t *xs16 = X->s16 + (size_t)(t0 + t) * (X->K / 16) + (size_t)b * 16;
                for (int q = 0; q < 8; q++) im = tvi_add(im, tvi_madd16(p->scp[q], tvi_set1(load4(xs16 + 2 * q))));
                tot[t] = tvi_sub(tot[t], tvi_slli(im, 5));
            } else {
                const int32_t *xs = X->s + (size_t)(t0 + t) * (X->K / 32) + (size_t)b * 8;
                for (int q = 0; q < 4; q++) {
                    const uint32_t xp = (uint32_t)(uint16_t)xs[2 * q] | ((uint32_t)xs[2 * q + 1] << 16);
                    im = tvi_add(im, tvi_madd16(p->scp[q], tvi_set1((int32_t)xp)));
                }
            }
            const TVF dx = tvf_set1(X->d[(size_t)(t0 + t) * nb + b]);
            a[t] = tvf_add(a[t], tvf_mul(tvf_mul(p->d, dx), tvf_cvt(tot[t])));
            if (type != 14) a[t] = tvf_sub(a[t], tvf_mul(tvf_mul(p->dmin, dx), tvf_cvt(im)));
        }
    }
}

/* every (type, token count) as its own compiled copy, so the accumulators stay in registers */
#define TD_CASE(F, T)                                   \
    case T:                                             \
        switch (mt) {                                   \
        case 1: F##_n(T, P, X, t0, 1, a); break;         \
        case 2: F##_n(T, P, X, t0, 2, a); break;         \
        case 3: F##_n(T, P, X, t0, 3, a); break;         \
        default: F##_n(T, P, X, t0, 4, a); break;        \
        }                                               \
        break;

static void tdot32(int type, const prep32 *P, const xq_t *X, int t0, int mt, TVF *a) {
    switch (type) { TD_CASE(tdot32, 2) TD_CASE(tdot32, 3) TD_CASE(tdot32, 8) }
}

static void tdot256(int type, const prep256 *P, const xq_t *X, int t0, int mt, TVF *a) {
    switch (type) { TD_CASE(tdot256, 12) TD_CASE(tdot256, 13) TD_CASE(tdot256, 14) }
}
#undef TD_CASE

/* a tile prepared in work (prep32/prep256 per block, rows in the lanes) against tokens [0, M):
 * lanes [r0, r1) of each token's result into y[t * ldy + col + r] */
static void tdot_store(int type, const void *work, const xq_t *X, int M, float *y, int ldy,
                       int col, int r0, int r1) {
    TVF a[MT];
    for (int t0 = 0; t0 < M; t0 += MT) {
        const int mt = M - t0 < MT ? M - t0 : MT;
        if (int_block(type) == 32) tdot32(type, (const prep32 *)work, X, t0, mt, a);
        else tdot256(type, (const prep256 *)work, X, t0, mt, a);
        for (int t = 0; t < mt; t++) {
            float o[TL];
            tvf_store(o, a[t]);
            for (int r = r0; r < r1; r++) y[(size_t)(t0 + t) * ldy + col + r] = o[r];
        }
    }
}

/* output rows [n0, n1) for tokens [0, M) into y (at column n0): each tile of TL rows is
 * prepared once for all its blocks into buf (t8_work_bytes) */
static void t8_range(int type, const xq_t *X, int M, const uint8_t *base, const int64_t *offsets,
                     int n0, int n1, float *y, int ldy, void *buf) {
    const int ri = ri_source(type) != 0;
    if (ri) type = ri_source(type);
    const int B = int_block(type), nb = X->nb;
    const size_t bb = (size_t)block_bytes(type), gbytes = (size_t)nb * NR * bb;
    const size_t stride = ri ? NR * bb : bb;
    for (int n = n0; n < n1; n += TL) {
        const int nr = n1 - n < TL ? n1 - n : TL;
        const uint8_t *w[TL];
        for (int r = 0; r < TL; r++)
            w[r] = row_start(base, offsets, ri, n + (r < nr ? r : nr - 1), gbytes, bb);
        for (int b = 0; b < nb; b++) {
            if (B == 32) prep32_block(type, w, b * stride, (prep32 *)buf + b);
            else prep256_block(type, w, b * stride, (prep256 *)buf + b);
        }
        tdot_store(type, buf, X, M, y, ldy, n - n0, 0, nr);
    }
}

static size_t t8_work_bytes(int type, int K) {
    const size_t per = int_block(type) == 32 ? sizeof(prep32) : sizeof(prep256);
    return per * (size_t)(K / int_block(type));
}

/* ---- Q4_K repacked at load (x86): TL rows interleaved, so no step re-arranges them ----------
 * The tiles above are what every step of the transposed path builds and throws away, and the
 * small-step path pays a horizontal reduction and a scale shuffle per row and block instead
 * (compute-bound on CPUs that split 512-bit ops, e.g. Zen 4: 15-20 GB/s of weights on 2 cores
 * where DRAM gives ~30). Repacked once, a tile block is read straight into the lanes at any
 * step size. Tile t, block b sits at base + (t * nb + b) * RP4K_BYTES:
 *   qs  [32][TL][4]  granule i holds bytes 4i..4i+3 of each row's 128 qs bytes, so granule
 *                    p*8+k's low nibbles are values 64p+4k.. (sub-block 2p) and its high ones
 *                    64p+32+4k.. (sub-block 2p+1)
 *   sc  [8][TL]      the 6-bit scales, u8
 *   mn  [4][TL][2]   the 6-bit mins, u8, in pairs (mn[2q], mn[2q+1]): widened, the int16
 *                    pairs of prep256's scp
 *   d   [TL], dmin [TL]  fp16, as in the block
 * 148 bytes a row and block against 144 (+2.8 %; decode reads every byte once a token, and
 * int16 mins, 156 bytes, measured ~5 % slower on the 1B Q4_K shapes). Same integers and the
 * same fp32 operations per row as tdot256 and the small-step path: bit-identical results. */
#define RP_Q4_K 112 /* our own type id for repacked Q4_K (ggml's ids stay below 100) */
#define RP4K_BYTES (TL * 148)

static AI TVI tvi_load(const void *p) {
#if TL == 16
    return _mm512_loadu_si512(p);
#else
    return _mm256_loadu_si256((const __m256i *)p);
#endif
}
static AI TVI tvi_u8(const uint8_t *p) { /* TL bytes -> TL int32 lanes */
#if TL == 16
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#endif
}
static AI TVI tvi_u8pairs(const uint8_t *p) { /* 2*TL bytes -> TL lanes of 2 int16 */
#if TL == 16
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
#else
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
#endif
}
static AI TVF tvf_fp16(const uint8_t *p) { /* TL fp16 -> TL fp32 lanes */
#if TL == 16
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
}

static AI void rp4k_n(const uint8_t *T, const xq_t *X, int t0, int mt, TVF *a) {
    const int nb = X->nb;
    const TVI m4 = tvi_set1(0x0f0f0f0f);
    const int8_t *xr[MT];
    for (int t = 0; t < mt; t++) {
        a[t] = tvf_zero();
        xr[t] = X->q + (size_t)(t0 + t) * X->K;
    }
    for (int b = 0; b < nb; b++, T += RP4K_BYTES) {
        const uint8_t *sc8 = T + TL * 128, *mnp = sc8 + 8 * TL, *dd = mnp + 8 * TL;
        TVI tot[MT];
        for (int t = 0; t < mt; t++) tot[t] = tvi_zero();
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles) and 2p+1 (high) */
#if TL == 8 && !VNNI256
            /* maddubs pairs summed in int16 over the 8 groups (<= 8 * 2*15*127), then the scale
             * in both int16 halves of a lane: one madd widens and scales */
            const TVI s0 = tvi_u8(sc8 + (2 * p) * TL), s1 = tvi_u8(sc8 + (2 * p + 1) * TL);
            const TVI s0p = _mm256_or_si256(s0, _mm256_slli_epi32(s0, 16));
            const TVI s1p = _mm256_or_si256(s1, _mm256_slli_epi32(s1, 16));
            __m256i lo16[MT], hi16[MT];
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                const TVI v = tvi_load(T + (size_t)(p * 8 + k) * TL * 4);
                const TVI lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int t = 0; t < mt; t++) {
                    const int8_t *x = xr[t] + (size_t)b * 256 + 64 * p + 4 * k;
                    const __m256i ml = _mm256_maddubs_epi16(lo, tvi_set1(load4(x)));
                    const __m256i mh = _mm256_maddubs_epi16(hi, tvi_set1(load4(x + 32)));
                    lo16[t] = k ? _mm256_add_epi16(lo16[t], ml) : ml;
                    hi16[t] = k ? _mm256_add_epi16(hi16[t], mh) : mh;
                    KEEP(lo16[t]);
                    KEEP(hi16[t]);
                }
            }
            for (int t = 0; t < mt; t++)
                tot[t] = tvi_add(tot[t], tvi_add(tvi_madd16(lo16[t], s0p), tvi_madd16(hi16[t], s1p)));
#else
            TVI slo[MT], shi[MT];
            for (int t = 0; t < mt; t++) slo[t] = shi[t] = tvi_zero();
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                const TVI v = tvi_load(T + (size_t)(p * 8 + k) * TL * 4);
#if TL == 16
                const TVI lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
#else
                const TVI lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#endif
                for (int t = 0; t < mt; t++) {
                    const int8_t *x = xr[t] + (size_t)b * 256 + 64 * p + 4 * k;
                    slo[t] = tvi_dpbusd(slo[t], lo, tvi_set1(load4(x)));
                    shi[t] = tvi_dpbusd(shi[t], hi, tvi_set1(load4(x + 32)));
                }
            }
            const TVI s0 = tvi_u8(sc8 + (2 * p) * TL), s1 = tvi_u8(sc8 + (2 * p + 1) * TL);
            for (int t = 0; t < mt; t++)
                tot[t] = tvi_add(tot[t], tvi_add(tvi_mullo(slo[t], s0), tvi_mullo(shi[t], s1)));
#endif
        }
        const TVF d = tvf_fp16(dd), dmin = tvf_fp16(dd + 2 * TL);
        for (int t = 0; t < mt; t++) {
            const int32_t *xs = X->s + (size_t)(t0 + t) * (X->K / 32) + (size_t)b * 8;
            TVI im = tvi_zero();
            for (int q = 0; q < 4; q++) {
                const uint32_t xp = (uint32_t)(uint16_t)xs[2 * q] | ((uint32_t)xs[2 * q + 1] << 16);
                im = tvi_add(im, tvi_madd16(tvi_u8pairs(mnp + (size_t)q * TL * 2), tvi_set1((int32_t)xp)));
            }
            const TVF dx = tvf_set1(X->d[(size_t)(t0 + t) * nb + b]);
            a[t] = tvf_add(a[t], tvf_mul(tvf_mul(d, dx), tvf_cvt(tot[t])));
            a[t] = tvf_sub(a[t], tvf_mul(tvf_mul(dmin, dx), tvf_cvt(im)));
        }
    }
}

/* ---- Q4_0 / Q4_1 / Q8_0 repacked the same way: tile t, block b at base + (t * nb + b) *
 * rp_bytes(type): the quants as 4-byte granules [g][TL][4] (Q4: 4 granules whose low nibbles
 * are values 4g.. and high ones 16+4g..; Q8_0: 8 granules of values 4g.., plus 128 in VNNI
 * builds, as the transposed tiles hold them), then d [TL] (and Q4_1's m [TL]) fp16: the
 * block's own size, no more. */
#define RP_Q4_0 102
#define RP_Q4_1 103
#define RP_Q8_0 108

static AI void rp32_n(const int type, const uint8_t *T, const xq_t *X, int t0, int mt, TVF *a) {
    const int nb = X->nb, ng = type == RP_Q8_0 ? 8 : 4;
    const size_t bytes = (size_t)TL * (type == RP_Q8_0 ? 34 : type == RP_Q4_1 ? 20 : 18);
    const TVI m4 = tvi_set1(0x0f0f0f0f);
    const int8_t *xr[MT];
    for (int t = 0; t < mt; t++) {
        a[t] = tvf_zero();
        xr[t] = X->q + (size_t)(t0 + t) * X->K;
    }
    for (int b = 0; b < nb; b++, T += bytes) {
        TVI is0[MT], is1[MT];
#if TL == 8 && !VNNI256
        __m256i p16[MT]; /* 4-bit values: maddubs pairs summed in int16, <= 8 * 2*15*127 */
        const __m256i one = _mm256_set1_epi16(1);
        for (int t = 0; t < mt; t++) is0[t] = is1[t] = tvi_zero();
        for (int g = 0; g < ng; g++) {
            const __m256i v = tvi_load(T + (size_t)g * TL * 4);
            if (type == RP_Q8_0) { /* |w| * (x with w's sign) */
                const __m256i av = _mm256_abs_epi8(v);
                for (int t = 0; t < mt; t++) {
                    const __m256i sx = _mm256_sign_epi8(tvi_set1(load4(xr[t] + (size_t)b * 32 + 4 * g)), v);
                    is0[t] = _mm256_add_epi32(is0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(av, sx), one));
                    KEEP(is0[t]);
                }
            } else {
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int t = 0; t < mt; t++) {
                    const int8_t *x = xr[t] + (size_t)b * 32 + 4 * g;
                    const __m256i m = _mm256_add_epi16(_mm256_maddubs_epi16(lo, tvi_set1(load4(x))),
                                                       _mm256_maddubs_epi16(hi, tvi_set1(load4(x + 16))));
                    p16[t] = g ? _mm256_add_epi16(p16[t], m) : m;
                    KEEP(p16[t]);
                }
            }
        }
        if (type != RP_Q8_0)
            for (int t = 0; t < mt; t++) is0[t] = _mm256_madd_epi16(p16[t], one);
#else
        for (int t = 0; t < mt; t++) is0[t] = is1[t] = tvi_zero();
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++) {
            const TVI v = tvi_load(T + (size_t)g * TL * 4);
            if (type == RP_Q8_0) {
                for (int t = 0; t < mt; t++) {
                    const TVI xv = tvi_set1(load4(xr[t] + (size_t)b * 32 + 4 * g));
                    if (g & 1) is1[t] = tvi_dpbusd(is1[t], v, xv);
                    else is0[t] = tvi_dpbusd(is0[t], v, xv);
                }
            } else {
#if TL == 16
                const TVI lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
#else
                const TVI lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#endif
                for (int t = 0; t < mt; t++) {
                    const int8_t *x = xr[t] + (size_t)b * 32 + 4 * g;
                    is0[t] = tvi_dpbusd(is0[t], lo, tvi_set1(load4(x)));
                    is1[t] = tvi_dpbusd(is1[t], hi, tvi_set1(load4(x + 16)));
                }
            }
        }
#endif
        const uint8_t *dd = T + (size_t)ng * TL * 4;
        const TVF dw = tvf_fp16(dd);
        const TVF mw = type == RP_Q4_1 ? tvf_fp16(dd + 2 * TL) : tvf_zero();
        for (int t = 0; t < mt; t++) { /* tdot32_n's fp32 step */
            const size_t row = (size_t)(t0 + t);
            const float dx = X->d[row * nb + b];
            const int xs = X->s[row * nb + b];
            TVI is = tvi_add(is0[t], is1[t]);
            if (type == RP_Q4_0) is = tvi_sub(is, tvi_set1(8 * xs));
#if TL == 16 || VNNI256
            if (type == RP_Q8_0) is = tvi_sub(is, tvi_set1(128 * xs));
#endif
            TVF term = tvf_mul(tvf_mul(dw, tvf_set1(dx)), tvf_cvt(is));
            if (type == RP_Q4_1) term = tvf_add(term, tvf_mul(tvf_mul(mw, tvf_set1(dx)), tvf_set1((float)xs)));
            a[t] = tvf_add(a[t], term);
        }
    }
}

#define RP_MT(F, ...)                                        \
    switch (mt) {                                            \
    case 1: F(__VA_ARGS__, X, t0, 1, a); break;               \
    case 2: F(__VA_ARGS__, X, t0, 2, a); break;               \
    case 3: F(__VA_ARGS__, X, t0, 3, a); break;               \
    default: F(__VA_ARGS__, X, t0, 4, a); break;              \
    }

static void rp_tile(int type, const uint8_t *T, const xq_t *X, int t0, int mt, TVF *a) {
    switch (type) {
    case RP_Q4_K: RP_MT(rp4k_n, T) break;
    case RP_Q4_0: RP_MT(rp32_n, RP_Q4_0, T) break;
    case RP_Q4_1: RP_MT(rp32_n, RP_Q4_1, T) break;
    default: RP_MT(rp32_n, RP_Q8_0, T) break;
    }
}
#undef RP_MT

/* bytes of one tile block of a repacked type (0: not one) */
static size_t rp_bytes(int type) {
    switch (type) {
    case RP_Q4_K: return RP4K_BYTES;
    case RP_Q4_0: return (size_t)TL * 18;
    case RP_Q4_1: return (size_t)TL * 20;
    case RP_Q8_0: return (size_t)TL * 34;
    default: return 0;
    }
}

/* Larger steps unpack each repacked tile block once per step into the transposed tiles'
 * form (prep256 / prep32: no transposition needed, the lanes are already rows) and run
 * tdot256 / tdot32 on it: the direct kernels above unpack once per 4 tokens, which costs more
 * than it saves from t8_min_rows tokens on without VNNI (AVX2: 1.04-1.10x at 32-256 tokens);
 * with VNNI the direct kernels stay ahead at every size measured (Q4_K, 64 and 256 tokens:
 * 1.03-1.38x the rows' transposed tiles against 1.05-1.35x for unpacking once). */
#define RP_UNPACK_ONCE (TL == 8 && !VNNI256)
#if TL == 16
#define RP_AND _mm512_and_si512
#define RP_SR _mm512_srli_epi16
#else
#define RP_AND _mm256_and_si256
#define RP_SR _mm256_srli_epi16
#endif
static void rp_prep256(const uint8_t *T, prep256 *p) { /* RP_Q4_K */
    const TVI m4 = tvi_set1(0x0f0f0f0f);
    const uint8_t *sc8 = T + TL * 128, *mnp = sc8 + 8 * TL, *dd = mnp + 8 * TL;
    for (int pp = 0; pp < 4; pp++)
        for (int k = 0; k < 8; k++) {
            const TVI v = tvi_load(T + (size_t)(pp * 8 + k) * TL * 4);
            p->t[16 * pp + k] = RP_AND(v, m4);               /* values 64p + 4k.. */
            p->t[16 * pp + 8 + k] = RP_AND(RP_SR(v, 4), m4); /* values 64p + 32 + 4k.. */
        }
    for (int j = 0; j < 8; j++) p->sc[j] = tvi_u8(sc8 + (size_t)j * TL);
    for (int q = 0; q < 4; q++) p->scp[q] = tvi_u8pairs(mnp + (size_t)q * TL * 2);
    p->d = tvf_fp16(dd);
    p->dmin = tvf_fp16(dd + 2 * TL);
#if TL == 8 && !VNNI256 /* tdot256_n's madd: the scale in both int16 halves of its lane */
    for (int j = 0; j < 8; j++)
        p->sc[j] = _mm256_or_si256(_mm256_and_si256(p->sc[j], _mm256_set1_epi32(0xffff)),
                                   _mm256_slli_epi32(p->sc[j], 16));
#endif
}

static void rp_prep32(int type, const uint8_t *T, prep32 *p) {
    const TVI m4 = tvi_set1(0x0f0f0f0f);
    const int ng = type == RP_Q8_0 ? 8 : 4;
    for (int g = 0; g < ng; g++) {
        const TVI v = tvi_load(T + (size_t)g * TL * 4);
        if (type == RP_Q8_0) {
            p->t[g] = v; /* VNNI builds hold w + 128 already */
#if TL == 8 && !VNNI256
            p->a[g] = _mm256_abs_epi8(v);
#endif
        } else {
            p->t[g] = RP_AND(v, m4); /* values 4g.. */
            p->t[4 + g] = RP_AND(RP_SR(v, 4), m4); /* values 16 + 4g.. */
        }
    }
    const uint8_t *dd = T + (size_t)ng * TL * 4;
    p->dw = tvf_fp16(dd);
    p->mw = type == RP_Q4_1 ? tvf_fp16(dd + 2 * TL) : tvf_zero();
}
#undef RP_AND
#undef RP_SR

/* the ggml type a repacked type came from (tdot32 / tdot256 take those) */
static int rp_source(int type) { return type - 100; }

/* output rows [n0, n1) (any range: whole tiles are computed, the rows asked for stored); work:
 * t8_work_bytes of scratch for the unpack-once form, or NULL for the direct kernels */
static void rp_range(int type, const xq_t *X, int M, const uint8_t *base, int n0, int n1, float *y,
                     int ldy, void *work) {
    const size_t tile_bytes = (size_t)X->nb * rp_bytes(type);
    for (int tile = n0 / TL; tile * TL < n1; tile++) {
        const uint8_t *T = base + (size_t)tile * tile_bytes;
        const int r0 = n0 > tile * TL ? n0 - tile * TL : 0;
        const int r1 = n1 < (tile + 1) * TL ? n1 - tile * TL : TL;
        if (work) { /* unpacked once for all the step's tokens */
            const int src = rp_source(type), B = int_block(type);
            for (int b = 0; b < X->nb; b++) {
                if (B == 32) rp_prep32(type, T + b * rp_bytes(type), (prep32 *)work + b);
                else rp_prep256(T + b * rp_bytes(type), (prep256 *)work + b);
            }
            tdot_store(src, work, X, M, y, ldy, tile * TL - n0, r0, r1);
            continue;
        }
        TVF a[4];
        for (int t0 = 0; t0 < M; t0 += 4) {
            const int mt = M - t0 < 4 ? M - t0 : 4;
            rp_tile(type, T, X, t0, mt, a);
            for (int t = 0; t < mt; t++) {
                float o[TL];
                tvf_store(o, a[t]);
                for (int r = r0; r < r1; r++) y[(size_t)(t0 + t) * ldy + tile * TL + r - n0] = o[r];
            }
        }
    }
}
#endif

/* The repacked type a ggml type runs under in this build: RP_*, RI_* (Q5_K/Q6_K: only their
 * blocks interleaved; tiles in the RP_Q4_K form measured slower at decode than the rows, the
 * bit merging costing more per step than the tiles save) or 0 (none: F32/F16/BF16, or a build
 * without the x86 SIMD kernels). */
#if INT_SIMD
static int rp_type_of(int type) {
    switch (type) {
    case 2: return RP_Q4_0;
    case 3: return RP_Q4_1;
    case 8: return RP_Q8_0;
    case 12: return RP_Q4_K;
    case 13: return RI_Q5_K;
    case 14: return RI_Q6_K;
    default: return 0;
    }
}
#endif

/* Bytes the repacked form of N rows of K values of `type` takes in this build (0: none). */
size_t gguf_repack_bytes(int type, int N, int K) {
#if INT_SIMD
    const int rt = rp_type_of(type), B = int_block(type);
    if (rt && N > 0 && K % B == 0)
        return ri_source(rt) ? (size_t)((N + NR - 1) / NR) * NR * (K / B) * block_bytes(type)
                             : (size_t)((N + TL - 1) / TL) * (K / B) * rp_bytes(rt);
#endif
    (void)type; (void)N; (void)K;
    return 0;
}

/* Repack N rows of `type` (at base + offsets[n]) into out (gguf_repack_bytes bytes); a last
 * partial tile repeats its last row. Returns the type id the repacked rows run under, or -1
 * if there is no repacked form. */
int gguf_repack(int type, const uint8_t *base, const int64_t *offsets, int N, int K, uint8_t *out,
                int n_threads) {
    if (!gguf_repack_bytes(type, N, K)) return -1;
#if INT_SIMD
    const int rt = rp_type_of(type), B = int_block(type), nb = K / B, tiles = (N + TL - 1) / TL;
    const size_t tb = rp_bytes(rt), bb = (size_t)block_bytes(type);
    if (ri_source(rt)) {
        const int groups = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int g = 0; g < groups; g++)
            for (int r = 0; r < NR; r++) {
                const int n = g * NR + r < N ? g * NR + r : N - 1;
                for (int b = 0; b < nb; b++)
                    memcpy(out + (((size_t)g * nb + b) * NR + r) * bb, base + offsets[n] + (size_t)b * bb, bb);
            }
        return rt;
    }
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int tile = 0; tile < tiles; tile++)
        for (int b = 0; b < nb; b++) {
            uint8_t *T = out + ((size_t)tile * nb + b) * tb;
            for (int r = 0; r < TL; r++) {
                const int n = tile * TL + r < N ? tile * TL + r : N - 1;
                const uint8_t *blk = base + offsets[n] + (size_t)b * bb;
                if (rt == RP_Q4_K) {
                    uint8_t *sc8 = T + TL * 128, *mnp = sc8 + 8 * TL, *dd = mnp + 8 * TL;
                    for (int i = 0; i < 32; i++) memcpy(T + ((size_t)i * TL + r) * 4, blk + 16 + 4 * i, 4);
                    int sc[8], mn[8];
                    for (int j = 0; j < 8; j++) k_scale_min(blk + 4, j, &sc[j], &mn[j]);
                    for (int j = 0; j < 8; j++) sc8[j * TL + r] = (uint8_t)sc[j];
                    for (int j = 0; j < 8; j++) mnp[((size_t)(j / 2) * TL + r) * 2 + j % 2] = (uint8_t)mn[j];
                    memcpy(dd + 2 * r, blk, 2);
                    memcpy(dd + 2 * TL + 2 * r, blk + 2, 2);
                } else {
                    const int ng = rt == RP_Q8_0 ? 8 : 4, qoff = rt == RP_Q4_1 ? 4 : 2;
                    for (int g = 0; g < ng; g++) {
                        uint8_t *o = T + ((size_t)g * TL + r) * 4;
                        memcpy(o, blk + qoff + 4 * g, 4);
#if TL == 16 || VNNI256
                        if (rt == RP_Q8_0) /* w + 128, unsigned, as dpbusd takes it */
                            for (int i = 0; i < 4; i++) o[i] ^= 0x80;
#endif
                    }
                    uint8_t *dd = T + (size_t)ng * TL * 4;
                    memcpy(dd + 2 * r, blk, 2);
                    if (rt == RP_Q4_1) memcpy(dd + 2 * TL + 2 * r, blk + 2, 2);
                }
            }
        }
    return rt;
#else
    (void)base; (void)offsets; (void)out; (void)n_threads;
    return -1;
#endif
}

/* Steps of at least this many tokens take the transposed tiles (x86 SIMD builds): preparing a
 * tile costs more than the small tiles' per-token unpacking below that (measured, 1B shapes,
 * 1 thread: K-quants 4x slower with the transposed tiles at 4 tokens, 0.75x at 16, 1.15-1.6x
 * faster from 32; 32-value types 0.8-0.9x at 8, 1.1-1.8x faster at 10-12 but for Q8_0). */
#if INT_SIMD
static int t8_min_rows(int type) { return int_block(type) == 256 ? 24 : 10; }
#endif

/* Bytes of scratch gemm_int_range wants for this type, K and step size (0: none). */
size_t gemm_int_work_bytes(int type, int K, int M) {
    if (!int_block(type) || K % int_block(type)) return 0;
#if INT_SIMD
    if (rp_bytes(type) && !RP_UNPACK_ONCE) return 0;
    if (M >= t8_min_rows(type)) return t8_work_bytes(type, K);
#endif
    (void)M;
    return 0;
}

/* The tokens of X against weight rows [n0, n1): y[t * ldy + (n - n0)] for t < M, with no
 * OpenMP region of its own (the caller splits rows between threads). work: NULL (allocated
 * here when needed) or gemm_int_work_bytes(type, K, M) bytes aligned to 64. Returns 0, -1 for
 * a type without an integer path, -3 if out of memory. */
int gemm_int_range(int type, const xq_t *X, int M, const uint8_t *base, const int64_t *offsets,
                   int n0, int n1, float *y, int ldy, void *work) {
    if (!int_block(type) || X->K % int_block(type)) return -1;
#if INT_SIMD
    if (rp_bytes(type)) { /* base: the repacked tiles (offsets unused) */
        void *buf = 0;
        if (RP_UNPACK_ONCE && M >= t8_min_rows(type)) {
            buf = work ? work : aligned_alloc(64, t8_work_bytes(type, X->K));
            if (!buf) return -3;
        }
        rp_range(type, X, M, base, n0, n1, y, ldy, buf);
        if (buf && !work) free(buf);
        return 0;
    }
    if (M >= t8_min_rows(type)) {
        void *buf = work ? work : aligned_alloc(64, t8_work_bytes(type, X->K));
        if (!buf) return -3;
        t8_range(type, X, M, base, offsets, n0, n1, y, ldy, buf);
        if (!work) free(buf);
        return 0;
    }
#endif
    (void)work;
    gv_range(type, X, M, base, offsets, n0, n1, y, ldy);
    return 0;
}

/* y = x @ W^T like gguf_gemm, with x quantized to int8 first (see above). Returns -1 for a
 * type without an integer path (F32/F16/BF16: use gguf_gemm), -2 if K is not a multiple of
 * the activation block, -3 if out of memory. */
int gguf_gemm_int(int type, const float *x, int M, int K, const uint8_t *base,
                  const int64_t *offsets, int N, float *y, int ldy, int n_threads) {
    const int B = int_block(type);
    if (!B) return -1;
    if (K % B) return -2;
    xq_t X;
    if (xq_alloc(&X, M, K, B)) return -3;
    const int units = (N + 15) / 16; /* threads take contiguous rows in units of the widest tile */
    int rc = 0;
#pragma omp parallel num_threads(n_threads)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) quantize_rows(x, m, m + 1, &X);
        const int u0 = (int)((int64_t)units * tid / nth), u1 = (int)((int64_t)units * (tid + 1) / nth);
        const int n0 = 16 * u0, n1 = 16 * u1 < N ? 16 * u1 : N;
        if (n0 < n1) {
            const int r = gemm_int_range(type, &X, M, base, offsets, n0, n1, y + n0, ldy, 0);
            if (r) {
#pragma omp atomic write
                rc = r;
            }
        }
    }
    xq_free(&X);
    return rc;
}
