/* Decode attention over a paged KV cache on the CPU: one new query token per sequence.
 *
 * Compiled on first use by corral/model/cpu_attention.py (gcc -O3 -march=native -fopenmp) and
 * called through ctypes. Shapes (all fp32 contiguous, ids int64):
 *   q, out        [B, nh, hd]
 *   k/v cache     [num_blocks, bs, nkv, hd]
 *   block_tables  [B, >= ceil(ctx/bs)] (row stride `bt_stride`), context_lens [B]
 *
 * One task per (sequence, kv head), spread over OpenMP threads: the g = nh/nkv query heads that
 * share the kv head run together, so each K/V row is read from memory once. The context is
 * walked in tiles of at most TILE tokens inside one block, with an online softmax (running max
 * m, running sum l, output accumulator rescaled by exp(m_old - m_new) when the max grows).
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

#ifdef __AVX512F__
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

static inline float dot(const float *a, const float *b, int hd) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= hd; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < hd) {
        const __mmask16 m = tail_mask(hd - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
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

/* s[j] = dot(q, k + j * stride) for j < n <= 16, hd a multiple of 16 */
static inline __attribute__((always_inline)) void dots16(const float *q, const float *k,
                                                        int64_t stride, int n, int hd, float *s) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) { /* a constant trip count keeps acc in registers */
        acc[j] = _mm512_setzero_ps();
        if (j < n)
            for (int i = 0; i < hd; i += 16)
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + j * stride + i), acc[j]);
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

/* acc[0..hd) = acc * alpha + sum_j p[j] * v[j * stride + 0..hd). */
static inline void accumulate(float *acc, float alpha, const float *p, const float *v,
                              int64_t stride, int n, int hd) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 m = hd - i >= 16 ? (__mmask16)0xffff : tail_mask(hd - i);
        __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + i), va);
        for (int j = 0; j < n; j++)
            a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, v + j * stride + i), a);
        _mm512_mask_storeu_ps(acc + i, m, a);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA (most laptops, AMD before Zen 4): 8 lanes, the same exp polynomial as above */
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
static inline float dot(const float *a, const float *b, int hd) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= hd; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < hd; i++) s += a[i] * b[i];
    return s;
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
static inline void accumulate(float *acc, float alpha, const float *p, const float *v,
                              int64_t stride, int n, int hd) {
    const __m256 va = _mm256_set1_ps(alpha);
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + i), va);
        for (int j = 0; j < n; j++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * stride + i), a);
        _mm256_storeu_ps(acc + i, a);
    }
    for (; i < hd; i++) {
        acc[i] *= alpha;
        for (int j = 0; j < n; j++) acc[i] += p[j] * v[j * stride + i];
    }
}
#else
static inline float dot(const float *a, const float *b, int hd) {
    float s = 0.0f;
    for (int i = 0; i < hd; i++) s += a[i] * b[i];
    return s;
}

static inline float exp_sum(const float *s, float *p, int n, float mx) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        p[j] = expf(s[j] - mx);
        sum += p[j];
    }
    return sum;
}

static inline void accumulate(float *acc, float alpha, const float *p, const float *v,
                              int64_t stride, int n, int hd) {
    for (int i = 0; i < hd; i++) acc[i] *= alpha;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < hd; i++) acc[i] += p[j] * v[j * stride + i];
}
#endif

/* Keys [t_begin, t_end) of one (sequence, kv head) folded into the online-softmax state of its
 * g query heads q[g][hd] (already scaled): running max m[g], sum l[g], unnormalized acc[g][hd].
 * Inlined into callers with a constant hd, so the common head sizes get fully unrolled loops. */
static inline __attribute__((always_inline)) void attend_range(
        const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
        int64_t t_begin, int64_t t_end, int g, int nkv, int hd, int bs, float *acc, float *m,
        float *l) {
    float s[g * TILE], p[TILE];
    const int64_t row = (int64_t)nkv * hd;  /* floats between consecutive tokens */
    for (int64_t t0 = t_begin; t0 < t_end;) {
        const int64_t off = t0 % bs;
        int n = (int)(bs - off < TILE ? bs - off : TILE);
        if (t_end - t0 < n) n = (int)(t_end - t0);
        const int64_t base = (table[t0 / bs] * bs + off) * row;
        const float *k = k_cache + base, *v = v_cache + base;
#if defined(__x86_64__) || defined(__i386__)
        /* the next tile's rows of this head: blocks sit anywhere in the cache, and reading one
         * head's rows (hd of every nkv * hd floats) leaves the hardware prefetcher behind */
        if (t0 + n < t_end) {
            const int64_t t1 = t0 + n, off1 = t1 % bs;
            int n1 = (int)(bs - off1 < TILE ? bs - off1 : TILE);
            if (t_end - t1 < n1) n1 = (int)(t_end - t1);
            const int64_t base1 = (table[t1 / bs] * bs + off1) * row;
            for (int j = 0; j < n1; j++)
                for (int i = 0; i < hd; i += 16) {
                    _mm_prefetch((const char *)(k_cache + base1 + j * row + i), _MM_HINT_T0);
                    _mm_prefetch((const char *)(v_cache + base1 + j * row + i), _MM_HINT_T0);
                }
        }
#endif
#ifdef __AVX512F__
        if (hd % 16 == 0) {
            for (int h = 0; h < g; h++)
                for (int j0 = 0; j0 < n; j0 += 16)
                    dots16(q + h * hd, k + j0 * row, row, n - j0 < 16 ? n - j0 : 16, hd,
                           s + h * TILE + j0);
        } else
#endif
        for (int j = 0; j < n; j++)
            for (int h = 0; h < g; h++) s[h * TILE + j] = dot(q + h * hd, k + j * row, hd);
        for (int h = 0; h < g; h++) {
            float mx = m[h];
            for (int j = 0; j < n; j++) mx = s[h * TILE + j] > mx ? s[h * TILE + j] : mx;
            const float alpha = expf(m[h] - mx);  /* 0 on the first tile (m = -inf) */
            l[h] = l[h] * alpha + exp_sum(s + h * TILE, p, n, mx);
            m[h] = mx;
            accumulate(acc + h * hd, alpha, p, v, row, n, hd);
        }
        t0 += n;
    }
}

/* One (sequence, kv head), all ctx keys: g query heads q[g][hd] (already scaled) -> out[g][hd]. */
static inline __attribute__((always_inline)) void attend(
        const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
        int64_t ctx, int g, int nkv, int hd, int bs, float *out) {
    float acc[g * hd], m[g], l[g];
    memset(acc, 0, sizeof(acc));
    for (int h = 0; h < g; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    attend_range(q, k_cache, v_cache, table, 0, ctx, g, nkv, hd, bs, acc, m, l);
    for (int h = 0; h < g; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;  /* ctx 0: zeros */
        for (int i = 0; i < hd; i++) out[h * hd + i] = acc[h * hd + i] * inv;
    }
}

void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                      const int64_t *block_tables, int64_t bt_stride, const int64_t *context_lens,
                      float *out, int B, int nh, int nkv, int hd, int bs, float scale,
                      int num_threads) {
    const int g = nh / nkv;
    const int tasks = B * nkv;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int task = 0; task < tasks; task++) {
        const int b = task / nkv, kh = task % nkv;
        const int64_t off = ((int64_t)b * nh + (int64_t)kh * g) * hd;
        float qs[g * hd];
        for (int i = 0; i < g * hd; i++) qs[i] = q[off + i] * scale;
        const int64_t *table = block_tables + (int64_t)b * bt_stride;
        const float *kc = k_cache + (int64_t)kh * hd, *vc = v_cache + (int64_t)kh * hd;
        const int64_t ctx = context_lens[b];
        if (hd == 64)
            attend(qs, kc, vc, table, ctx, g, nkv, 64, bs, out + off);
        else if (hd == 128)
            attend(qs, kc, vc, table, ctx, g, nkv, 128, bs, out + off);
        else
            attend(qs, kc, vc, table, ctx, g, nkv, hd, bs, out + off);
    }
}
