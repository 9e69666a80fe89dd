/* y[M,N] = x[M,K] @ W^T with W in GGUF blocks (Q4_1 or Q8_0), fp32 activations and sums.
 *
 * Compiled on first use by corral/model/gguf_kernels.py (gcc -O3 -march=native -fopenmp
 * -ffp-contract=off) and called through ctypes. Blocks of 32 weights run along K:
 *   Q4_1: fp16 d, fp16 m, 16 bytes qs; w[j] = d*(qs[j]&15) + m, w[j+16] = d*(qs[j]>>4) + m
 *   Q8_0: fp16 d, 32 int8 q;           w[j] = d*q[j]
 * Each weight is rebuilt exactly as gguf's numpy dequantizer does it (fp32 multiply, then fp32
 * add: -ffp-contract=off keeps them two roundings), so against the dense fp32 weights only the
 * order of the dot-product sums differs. Accumulation uses explicit FMA intrinsics.
 *
 * Work split: threads take tiles of NR=4 output features; a tile's weights are dequantized
 * once into a thread-local fp32 buffer (L1/L2), then every row of x is dotted against it,
 * MR=4 rows at a time (16 accumulators).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32
#define Q4_1_BYTES 20
#define Q8_0_BYTES 34
#define NR 4
#define MR 4

static inline float fp16_to_fp32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
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

/* One row of n_blocks blocks -> n_blocks*32 floats. */
static void dequant_row_q4_1(const uint8_t *b, int n_blocks, float *out) {
    for (int i = 0; i < n_blocks; i++, b += Q4_1_BYTES, out += QK) {
        const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
        const uint8_t *qs = b + 4;
#ifdef __AVX512F__
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        const __m128i q = _mm_loadu_si128((const __m128i *)qs);
        const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0f));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0f));
        const __m512 flo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
        const __m512 fhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(vd, flo), vm));
        _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_mul_ps(vd, fhi), vm));
#else
        for (int j = 0; j < QK / 2; j++) {
            out[j] = d * (float)(qs[j] & 0x0f) + m;
            out[j + QK / 2] = d * (float)(qs[j] >> 4) + m;
        }
#endif
    }
}

static void dequant_row_q8_0(const uint8_t *b, int n_blocks, float *out) {
    for (int i = 0; i < n_blocks; i++, b += Q8_0_BYTES, out += QK) {
        const float d = fp16_to_fp32(b);
        const int8_t *q = (const int8_t *)(b + 2);
#ifdef __AVX512F__
        const __m512 vd = _mm512_set1_ps(d);
        const __m128i q0 = _mm_loadu_si128((const __m128i *)q);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(q + 16));
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), vd));
        _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), vd));
#else
        for (int j = 0; j < QK; j++) out[j] = (float)q[j] * d;
#endif
    }
}

/* y[i*ldy + j] = dot(x[i*K ..], w[j*K ..]) for i < mr, j < nr (compile-time sizes when
 * inlined with constants, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void micro(const int mr, const int nr,
                                                        const float *x, const float *w, int K,
                                                        float *y, int ldy) {
#ifdef __AVX512F__
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_ps(w + (size_t)j * K + k);
        for (int i = 0; i < mr; i++) {
            const __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[(size_t)i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
#else
    /* 16 independent lanes per output, summed at the end: vectorizes without reassociation. */
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float lane[16] = {0};
            const float *xi = x + (size_t)i * K, *wj = w + (size_t)j * K;
            for (int k = 0; k < K; k += 16)
                for (int l = 0; l < 16; l++) lane[l] += xi[k + l] * wj[k + l];
            float s = 0.0f;
            for (int l = 0; l < 16; l++) s += lane[l];
            y[(size_t)i * ldy + j] = s;
        }
#endif
}

/* All rows of x against one tile of nr dequantized weight rows. */
static void tile_rows(const float *x, int M, int K, const float *w, int nr, float *y, int N) {
    int i = 0;
    if (nr == NR) {
        for (; i + MR <= M; i += MR) micro(MR, NR, x + (size_t)i * K, w, K, y + (size_t)i * N, N);
        switch (M - i) {
        case 3: micro(3, NR, x + (size_t)i * K, w, K, y + (size_t)i * N, N); break;
        case 2: micro(2, NR, x + (size_t)i * K, w, K, y + (size_t)i * N, N); break;
        case 1: micro(1, NR, x + (size_t)i * K, w, K, y + (size_t)i * N, N); break;
        }
        return;
    }
    for (int j = 0; j < nr; j++)
        for (i = 0; i < M; i++)
            micro(1, 1, x + (size_t)i * K, w + (size_t)j * K, K, y + (size_t)i * N + j, N);
}

typedef void (*dequant_fn)(const uint8_t *, int, float *);

static void gemm(dequant_fn dq, size_t block_bytes, const float *x, int M, int K,
                 const uint8_t *w, int N, float *y, int n_threads) {
    const int n_blocks = K / QK;
    const size_t row_bytes = (size_t)n_blocks * block_bytes;
    const int n_tiles = (N + NR - 1) / NR;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = (float *)aligned_alloc(64, sizeof(float) * NR * (size_t)K);
#pragma omp for schedule(static)
        for (int t = 0; t < n_tiles; t++) {
            const int n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
            for (int j = 0; j < nr; j++)
                dq(w + (size_t)(n0 + j) * row_bytes, n_blocks, buf + (size_t)j * K);
            tile_rows(x, M, K, buf, nr, y + n0, N);
        }
        free(buf);
    }
}

/* Public entry points (ctypes). K must be a multiple of 32; x, y are contiguous row-major. */
void gguf_gemm_q4_1(const float *x, int M, int K, const uint8_t *w, int N, float *y, int nt) {
    gemm(dequant_row_q4_1, Q4_1_BYTES, x, M, K, w, N, y, nt);
}

void gguf_gemm_q8_0(const float *x, int M, int K, const uint8_t *w, int N, float *y, int nt) {
    gemm(dequant_row_q8_0, Q8_0_BYTES, x, M, K, w, N, y, nt);
}

/* Dequantize N rows (for tests: must equal the dense weights bit for bit). */
void gguf_dequant_q4_1(const uint8_t *w, int N, int K, float *out) {
    for (int n = 0; n < N; n++)
        dequant_row_q4_1(w + (size_t)n * (K / QK) * Q4_1_BYTES, K / QK, out + (size_t)n * K);
}

void gguf_dequant_q8_0(const uint8_t *w, int N, int K, float *out) {
    for (int n = 0; n < N; n++)
        dequant_row_q8_0(w + (size_t)n * (K / QK) * Q8_0_BYTES, K / QK, out + (size_t)n * K);
}
