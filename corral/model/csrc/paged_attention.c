/* Decode attention over a paged KV cache on the CPU: one new query token per sequence.
 *
 * Compiled on first use by corral/model/cpu_attention.py (gcc -O3 -march=native -fopenmp) and
 * called through ctypes; decode_step.c includes it too. Shapes (contiguous, ids int64):
 *   q, out        [B, nh, hd] fp32
 *   k/v cache     [num_blocks, bs, nkv, hd], fp32 or fp16 (kv_f16: llama.cpp's default cache
 *                 type; half the bytes to stream, converted to fp32 as they are loaded)
 *   block_tables  [B, >= ceil(ctx/bs)] (row stride `bt_stride`), context_lens [B]
 *
 * A task covers one sequence and a range of its kv heads (all of them when there are enough
 * sequences to share out: then every K/V row is read whole, and in order; the hardware streams
 * a whole row far better than the hd of every nkv * hd values one head reads). The g = nh/nkv
 * query heads of a kv head run together, so each K/V row is read from memory once. The context
 * is walked in tiles of at most TILE tokens inside one block, with an online softmax (running
 * max m, running sum l, output accumulator rescaled by exp(m_old - m_new) when the max grows).
 * Each head's values go through the same operations in the same order whatever the task split,
 * so the split never changes a result.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define TILE 32
#define ATT_INLINE static inline __attribute__((always_inline))

/* fp16 -> fp32, exact (F16C, NEON's __fp16, else FP16's fp16_ieee_to_fp32_value: the exponent
 * rebias runs as a float multiply, which also handles subnormals, inf and NaN) */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    uint32_t bits = (two_w >> 4) + (0xE0u << 23);
    float norm, denorm, out;
    memcpy(&norm, &bits, 4);
    norm *= 0x1.0p-112f;
    bits = (two_w >> 17) | (126u << 23);
    memcpy(&denorm, &bits, 4);
    denorm -= 0.5f;
    memcpy(&bits, two_w < (1u << 27) ? &denorm : &norm, 4);
    bits |= sign;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

/* element i of a cache of fp32 (f16 = 0) or fp16 values */
ATT_INLINE float kv_get(const void *p, int64_t i, int f16) {
    return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
ATT_INLINE const void *kv_at(const void *p, int64_t i, int f16) {
    return (const char *)p + i * (f16 ? 2 : 4);
}

/* ---- portable kernels: any hd, any CPU ------------------------------------------------------ */
ATT_INLINE float dot_c(const float *q, const void *k, int hd, int f16) {
    float s = 0.0f;
    for (int i = 0; i < hd; i++) s += q[i] * kv_get(k, i, f16);
    return s;
}
ATT_INLINE void accumulate_c(float *acc, float alpha, const float *p, const void *v, int64_t stride,
                     int n, int hd, int f16) {
    for (int i = 0; i < hd; i++) acc[i] *= alpha;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < hd; i++) acc[i] += p[j] * kv_get(v, j * stride + i, f16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ATT_AVX512 1
#define ATT_VEC 16 /* hd a multiple of this takes the vector kernels below */
/* Lanes of x[0..n) for n <= 16. */
static inline __mmask16 tail_mask(int n) { return (__mmask16)((1u << n) - 1u); }
static inline __mmask16 tail_mask16(int n) { return n >= 16 ? (__mmask16)0xffff : tail_mask(n); }

/* exp for x <= 0 (Cephes expf: ~1 ulp). Inputs below -87 give ~exp(-87) ≈ 0 relative to the
 * running sum (>= 1), which holds the row's max term exp(0). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 16 cache values from element i on */
ATT_INLINE __m512 kv_load(const void *p, int64_t i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
               : _mm512_loadu_ps((const float *)p + i);
}

/* r[j] = sum of the 16 lanes of v[j] for j < 16: a transpose-and-add tree (45 shuffles and adds
 * for 16 sums, against ~10 dependent steps for each _mm512_reduce_add_ps). */
static inline __m512 sum16(__m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: v2i, v2i+1 partials interleaved */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: keys 4i..4i+3 */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) /* lanes 0,1: keys 8i..8i+3 / 8i+4..8i+7 halves */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                         _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

/* s[j] = dot(q, k + j * stride) for j < n <= 16 */
ATT_INLINE void dots(const float *q, const void *k, int64_t stride, int n, int hd, int f16, float *s) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) { /* a constant trip count keeps acc in registers */
        acc[j] = _mm512_setzero_ps();
        if (j < n)
            for (int i = 0; i < hd; i += 16)
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv_load(k, j * stride + i, f16), acc[j]);
    }
    _mm512_mask_storeu_ps(s, tail_mask16(n), sum16(acc));
}

/* p[0..n) = exp(s[0..n) - mx); returns their sum. */
static inline float exp_sum(const float *s, float *p, int n, float mx) {
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm));
        _mm512_mask_storeu_ps(p + j, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* acc[0..hd) = acc * alpha + sum_j p[j] * v[j * stride + 0..hd): up to 128 columns at a time,
 * keys inner, so their FMA chains run side by side */
ATT_INLINE void accumulate(float *acc, float alpha, const float *p, const void *v, int64_t stride, int n,
                   int hd, int f16) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int i0 = 0; i0 < hd; i0 += 128) {
        const int nc = hd - i0 < 128 ? (hd - i0) / 16 : 8;
        __m512 a[8] = {0};
        for (int c = 0; c < 8; c++)
            if (c < nc) a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + i0 + 16 * c), va);
        for (int j = 0; j < n; j++) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            for (int c = 0; c < 8; c++)
                if (c < nc) a[c] = _mm512_fmadd_ps(pj, kv_load(v, j * stride + i0 + 16 * c, f16), a[c]);
        }
        for (int c = 0; c < 8; c++)
            if (c < nc) _mm512_storeu_ps(acc + i0 + 16 * c, a[c]);
    }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* AVX2 + FMA + F16C (most laptops, AMD before Zen 4): 8 lanes, the same exp polynomial */
#define ATT_AVX2 1
#define ATT_VEC 8
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* exp for x <= 0; x is clamped to -87, so 2^n (n >= -126) stays a normal float */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
/* lanes j < n of 8 (n >= 1) */
static inline __m256i lanes8(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
/* 8 cache values from element i on */
ATT_INLINE __m256 kv_load(const void *p, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}
/* s[j] = dot(q, k + j * stride) for j < n <= 8: eight independent accumulators (one dot's FMAs
 * in a row would wait on each other's latency), summed by a transpose-and-add tree into one
 * vector of the 8 dots. Measured (2-core Zen 4, avx2 build, SmolLM2 shape, 24 sequences x 232
 * keys, cache hot): 0.32 -> 0.21 ms a layer against one dot at a time. */
ATT_INLINE void dots(const float *q, const void *k, int64_t stride, int n, int hd, int f16, float *s) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; j++) /* a constant trip count keeps acc in registers */
            if (j < n) acc[j] = _mm256_fmadd_ps(qv, kv_load(k, j * stride + i, f16), acc[j]);
    }
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* [j0..3 lo | hi] */
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                   _mm256_permute2f128_ps(u0, u1, 0x31));
    if (n == 8) _mm256_storeu_ps(s, r);
    else _mm256_maskstore_ps(s, lanes8(n), r);
}
static inline float exp_sum(const float *s, float *p, int n, float mx) {
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        const __m256i m = lanes8(n - j);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j, m), vm));
        _mm256_maskstore_ps(p + j, m, e);
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
    }
    return hsum256(sum);
}
/* acc[0..hd) = acc * alpha + sum_j p[j] * v[j * stride + 0..hd): 64 columns at a time, keys
 * inner, so 8 FMA chains run side by side */
ATT_INLINE void accumulate(float *acc, float alpha, const float *p, const void *v, int64_t stride, int n,
                   int hd, int f16) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (int i0 = 0; i0 < hd; i0 += 64) {
        const int nc = hd - i0 < 64 ? (hd - i0) / 8 : 8;
        __m256 a[8] = {0};
        for (int c = 0; c < 8; c++)
            if (c < nc) a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + i0 + 8 * c), va);
        for (int j = 0; j < n; j++) {
            const __m256 pj = _mm256_broadcast_ss(p + j);
            for (int c = 0; c < 8; c++)
                if (c < nc) a[c] = _mm256_fmadd_ps(pj, kv_load(v, j * stride + i0 + 8 * c, f16), a[c]);
        }
        for (int c = 0; c < 8; c++)
            if (c < nc) _mm256_storeu_ps(acc + i0 + 8 * c, a[c]);
    }
}
#else
#define ATT_VEC 0
static inline float exp_sum(const float *s, float *p, int n, float mx) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        p[j] = expf(s[j] - mx);
        sum += p[j];
    }
    return sum;
}
#endif

/* Keys [t_begin, t_end) of kv heads [kh0, kh1) of one sequence folded into the online-softmax
 * state of their query heads (g per kv head, in order): q[(kh1-kh0)*g][hd] (already scaled),
 * running max m[], sum l[], unnormalized acc[][hd]. k_cache / v_cache: the layer's whole cache.
 * Inlined into callers with constant hd and f16, so the common cases get fully unrolled loops. */
ATT_INLINE void attend_range(const float *q, const void *k_cache, const void *v_cache,
                     const int64_t *table, int64_t t_begin, int64_t t_end, int g, int nkv,
                     int kh0, int kh1, int hd, int bs, int f16, float *acc, float *m, float *l) {
    float s[g * TILE], p[TILE];
    const int64_t row = (int64_t)nkv * hd;  /* values between consecutive tokens */
    const int vec = ATT_VEC && hd % (ATT_VEC ? ATT_VEC : 1) == 0;
    (void)vec;
    for (int64_t t0 = t_begin; t0 < t_end;) {
        const int64_t off = t0 % bs;
        int n = (int)(bs - off < TILE ? bs - off : TILE);
        if (t_end - t0 < n) n = (int)(t_end - t0);
        const int64_t base = (table[t0 / bs] * bs + off) * row;
#if defined(__x86_64__) || defined(__i386__)
        /* the next tile's rows of these heads: blocks sit anywhere in the cache */
        if (t0 + n < t_end) {
            const int64_t t1 = t0 + n, off1 = t1 % bs;
            int n1 = (int)(bs - off1 < TILE ? bs - off1 : TILE);
            if (t_end - t1 < n1) n1 = (int)(t_end - t1);
            const int64_t base1 = (table[t1 / bs] * bs + off1) * row + (int64_t)kh0 * hd;
            const int bytes = (kh1 - kh0) * hd * (f16 ? 2 : 4);
            for (int j = 0; j < n1; j++) {
                const char *kr = kv_at(k_cache, base1 + j * row, f16);
                const char *vr = kv_at(v_cache, base1 + j * row, f16);
                for (int b = 0; b < bytes; b += 64) {
                    _mm_prefetch(kr + b, _MM_HINT_T0);
                    _mm_prefetch(vr + b, _MM_HINT_T0);
                }
            }
        }
#endif
        for (int kh = kh0; kh < kh1; kh++) {
            const void *k = kv_at(k_cache, base + (int64_t)kh * hd, f16);
            const void *v = kv_at(v_cache, base + (int64_t)kh * hd, f16);
            const int h0 = (kh - kh0) * g;
            for (int h = 0; h < g; h++) {
                const float *qh = q + (size_t)(h0 + h) * hd;
#if ATT_VEC
                if (vec) {
                    for (int j0 = 0; j0 < n; j0 += ATT_VEC)
                        dots(qh, kv_at(k, j0 * row, f16), row, n - j0 < ATT_VEC ? n - j0 : ATT_VEC,
                             hd, f16, s + h * TILE + j0);
                    continue;
                }
#endif
                for (int j = 0; j < n; j++) s[h * TILE + j] = dot_c(qh, kv_at(k, j * row, f16), hd, f16);
            }
            for (int h = 0; h < g; h++) {
                const int hh = h0 + h;
                float mx = m[hh];
                for (int j = 0; j < n; j++) mx = s[h * TILE + j] > mx ? s[h * TILE + j] : mx;
                const float alpha = expf(m[hh] - mx);  /* 0 on the first tile (m = -inf) */
                l[hh] = l[hh] * alpha + exp_sum(s + h * TILE, p, n, mx);
                m[hh] = mx;
#if ATT_VEC
                if (vec) {
                    accumulate(acc + (size_t)hh * hd, alpha, p, v, row, n, hd, f16);
                    continue;
                }
#endif
                accumulate_c(acc + (size_t)hh * hd, alpha, p, v, row, n, hd, f16);
            }
        }
        t0 += n;
    }
}

/* kv heads [kh0, kh1) of one sequence, all ctx keys: their query heads q[][hd] (already scaled)
 * -> out[][hd]. */
ATT_INLINE void attend(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
               int64_t ctx, int g, int nkv, int kh0, int kh1, int hd, int bs, int f16,
               float *out) {
    const int nq = (kh1 - kh0) * g;
    float acc[nq * hd], m[nq], l[nq];
    memset(acc, 0, sizeof(acc));
    for (int h = 0; h < nq; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    attend_range(q, k_cache, v_cache, table, 0, ctx, g, nkv, kh0, kh1, hd, bs, f16, acc, m, l);
    for (int h = 0; h < nq; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;  /* ctx 0: zeros */
        for (int i = 0; i < hd; i++) out[h * hd + i] = acc[h * hd + i] * inv;
    }
}

/* attend() with hd and f16 as constants for the common head sizes */
static void attend_any(const float *q, const void *k_cache, const void *v_cache,
                       const int64_t *table, int64_t ctx, int g, int nkv, int kh0, int kh1,
                       int hd, int bs, int f16, float *out) {
#define ATTEND(HD, F16) attend(q, k_cache, v_cache, table, ctx, g, nkv, kh0, kh1, HD, bs, F16, out)
    if (hd == 64) { if (f16) ATTEND(64, 1); else ATTEND(64, 0); }
    else if (hd == 128) { if (f16) ATTEND(128, 1); else ATTEND(128, 0); }
    else if (f16) ATTEND(hd, 1);
    else ATTEND(hd, 0);
#undef ATTEND
}

/* attend_range() with hd and f16 as constants for the common head sizes (decode_step.c's) */
static inline void attend_range_any(const float *q, const void *k_cache, const void *v_cache,
                             const int64_t *table, int64_t t_begin, int64_t t_end, int g, int nkv,
                             int kh0, int kh1, int hd, int bs, int f16, float *acc, float *m,
                             float *l) {
#define RANGE(HD, F16) attend_range(q, k_cache, v_cache, table, t_begin, t_end, g, nkv, kh0, kh1, \
                                    HD, bs, F16, acc, m, l)
    if (hd == 64) { if (f16) RANGE(64, 1); else RANGE(64, 0); }
    else if (hd == 128) { if (f16) RANGE(128, 1); else RANGE(128, 0); }
    else if (f16) RANGE(hd, 1);
    else RANGE(hd, 0);
#undef RANGE
}

/* kv heads a task covers: all of them once there are 4 sequences a thread (whole rows read in
 * order), else one (more tasks than threads) */
static int heads_per_task(int B, int nkv, int threads) {
    return B >= 4 * threads ? nkv : 1;
}

void paged_decode(const float *q, const void *k_cache, const void *v_cache,
                  const int64_t *block_tables, int64_t bt_stride, const int64_t *context_lens,
                  float *out, int B, int nh, int nkv, int hd, int bs, float scale, int kv_f16,
                  int num_threads) {
    const int g = nh / nkv, per = heads_per_task(B, nkv, num_threads), groups = nkv / per;
    const int tasks = B * groups;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int task = 0; task < tasks; task++) {
        const int b = task / groups, kh0 = task % groups * per;
        const int64_t off = ((int64_t)b * nh + (int64_t)kh0 * g) * hd;
        float qs[per * g * hd];
        for (int i = 0; i < per * g * hd; i++) qs[i] = q[off + i] * scale;
        attend_any(qs, k_cache, v_cache, block_tables + (int64_t)b * bt_stride, context_lens[b],
                   g, nkv, kh0, kh0 + per, hd, bs, kv_f16, out + off);
    }
}
