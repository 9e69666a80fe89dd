/* A whole decode step of a Llama on quantized CPU weights in one call (model/fused_decode.py).
 *
 * M rows, x [M][D] (the embeddings, updated in place): one new token of a decoding sequence
 * each, or one token of a prefill chunk (kv_first: all rows' k/v are written before any row
 * attends, since a chunk's rows read each other's). Per layer:
 *
 *   xn = rmsnorm(x)            -> qkv = xn @ Wqkv^T                          [stage qkv]
 *   per (sequence, kv heads): rope q (their query heads) and k, k/v -> the paged cache slot
 *       (fp32 or fp16), paged decode attention over the sequence's blocks (GQA, online
 *       softmax; all kv heads in one task once there are 4 rows a thread)       [stage attn]
 *   x += attn @ Wo^T                                                         [stage o]
 *   xn = rmsnorm(x)            -> h = silu(xn @ Wgate^T) * (xn @ Wup^T)        [stage gate_up]
 *   x += h @ Wdown^T                                                         [stage down]
 *
 * then out = rmsnorm(x) with the final norm. The matmul kernels are gguf_gemm.c's and the
 * attention is paged_attention.c's (both included below: one translation unit, so their static
 * inline kernels inline here), so the numbers are the per-call path's: int8 matmuls bit for bit
 * (the kernels give the same rows whatever the tile split), fp32 matmuls too, and the norms,
 * SiLU and attention to float rounding (their sums run in another order).
 *
 * Threads: ONE OpenMP region for the whole stack instead of ~4 fork/joins per layer (the
 * structure of llama.cpp's graph compute). Each stage hands out its work in chunks through an
 * atomic counter (output rows of a matmul; (sequence, kv heads, part) tasks of attention) and a
 * thread goes on to the next stage once every chunk of this one is done, whoever did it (see
 * "stages without barriers" below): a thread the OS preempts on a busy machine delays the step
 * by the chunk it holds, not by its share of every stage. Small steps (M*K <= REDUNDANT_MAX)
 * normalize and quantize the matmul inputs on every thread (a few microseconds) rather than
 * wait for one thread to do it; gate|up chunks are JCHUNK columns of h wide and quantize their
 * own h blocks for the down matmul, so SiLU needs no stage of its own. That leaves 5 waits a
 * layer for a single sequence.
 */
#include "gguf_gemm.c"
#include "paged_attention.c"
#include <sched.h>

#define MAX_PARTS 4
#define NSTAGE 9       /* counters per layer (see the stage list in decode_step) */
#define JCHUNK 256     /* gate|up chunk: h columns, a multiple of every activation block */
#define REDUNDANT_MAX 4096

/* ---- the model, as fused_decode.py packs it once at load ----------------------------------- */

typedef struct {
    int type, n, use_int;        /* ggml type, rows, 1: int8 kernel (else the fp32 tile kernel) */
    const uint8_t *base;
    const int64_t *offsets;      /* byte offset of each row from base */
} dpart_t;

typedef struct {
    int nparts, n, k;
    int forms;                   /* activation forms the parts read: 1 int8/32, 2 int8/256 */
    dpart_t parts[MAX_PARTS];    /* rows of the fused matrix, in order */
} dmat_t;

typedef struct {
    const float *attn_norm, *ffn_norm;
    dmat_t qkv, o, gate_up, down;
} dlayer_t;

typedef struct {
    const dlayer_t *layers;
    const float *final_norm;
    int n_layers, D, nh, nkv, hd, inter;
    float eps, scale;
} dmodel_t;

/* ==== row-range matmuls: gguf_gemm.c's kernels without their OpenMP region ====================
 * The caller owns the threads and hands each one ranges of output rows.
 * gguf_gemm.c exports them: gemm_int_range / gemm_int_work_bytes / int_block / quant_row. */
typedef struct { int8_t *q; float *d; int32_t *s; int16_t *s16; } qbuf_t;
typedef struct { int K; const float *f; qbuf_t q32, q256; } act_t; /* one matmul's input rows */

static xq_t xq_view(const act_t *a, int B) {
    const qbuf_t *b = B == 32 ? &a->q32 : &a->q256;
    const xq_t X = {a->K, a->K / B, b->q, b->d, b->s, b->s16};
    return X;
}

/* int8 forms of values [j0, j1) of row i of a->f (j0, j1 multiples of the block sizes asked) */
static void quant_part(const act_t *a, int forms, int i, int j0, int j1) {
    const int K = a->K, n = j1 - j0;
    const float *x = a->f + (size_t)i * K + j0;
    if (forms & 1) {
        const qbuf_t *b = &a->q32;
        quant_row(x, n, 32, b->q + (size_t)i * K + j0, b->d + (size_t)i * (K / 32) + j0 / 32,
                  b->s + (size_t)i * (K / 32) + j0 / 32, 0);
    }
    if (forms & 2) {
        const qbuf_t *b = &a->q256;
        quant_row(x, n, 256, b->q + (size_t)i * K + j0, b->d + (size_t)i * (K / 256) + j0 / 256,
                  b->s + (size_t)i * (K / 32) + j0 / 32, b->s16 + (size_t)i * (K / 16) + j0 / 16);
    }
}

/* rows [n0, n1) of one fp32-path part (gguf_gemm's tile kernel): work holds NR rows of K */
static void rows_f32(int type, const float *x, int M, int K, const uint8_t *base,
                     const int64_t *offsets, int n0, int n1, float *y, int ldy, float *work) {
    const dequant_fn dq = pick(type);
    for (int n = n0; n < n1; n += NR) {
        const int nr = n1 - n < NR ? n1 - n : NR;
        for (int j = 0; j < nr; j++) dq(base + offsets[n + j], K, work + (size_t)j * K);
        tile_rows(x, M, K, work, nr, y + (n - n0), ldy);
    }
}

/* logical rows [r0, r1) of a fused matrix (its parts one after another) */
static void mat_rows(const dmat_t *m, const act_t *a, int M, int r0, int r1, float *y, int ldy,
                     void *work) {
    int first = 0;
    for (int p = 0; p < m->nparts; p++) {
        const dpart_t *P = &m->parts[p];
        const int lo = first > r0 ? first : r0, hi = first + P->n < r1 ? first + P->n : r1;
        if (lo < hi) {
            float *yy = y + (lo - r0);
            if (P->use_int) {
                const xq_t X = xq_view(a, int_block(P->type));
                gemm_int_range(P->type, &X, M, P->base, P->offsets, lo - first, hi - first, yy, ldy, work);
            } else {
                rows_f32(P->type, a->f, M, a->K, P->base, P->offsets, lo - first, hi - first, yy,
                         ldy, (float *)work);
            }
        }
        first += P->n;
    }
}

/* ==== the other operations ==================================================================== */

/* out = w * (x / sqrt(mean(x^2) + eps)), as model.llama.RMSNorm (whose sum runs in torch's order) */
static void rmsnorm(const float *x, const float *w, int D, float eps, float *out) {
    float lane[16] = {0}, ss = 0.0f;
    int i = 0;
    for (; i + 16 <= D; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += x[i + l] * x[i + l];
    for (; i < D; i++) ss += x[i] * x[i];
    for (int l = 0; l < 16; l++) ss += lane[l];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (i = 0; i < D; i++) out[i] = w[i] * (x[i] * r);
}

/* rotate_half rope on one head: out = x * cos + rotate_half(x) * sin (same roundings as torch) */
static inline void rope(const float *x, const float *c, const float *s, int hd, float *out) {
    const int h = hd / 2;
    for (int i = 0; i < h; i++) {
        out[i] = x[i] * c[i] - x[i + h] * s[i];
        out[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/* kv head kh of a qkv row: k (roped) and v -> the caches at element `at`, fp32 or fp16 (rounded
 * to nearest even, as torch's cast of the layer path's write_kv) */
static void kv_write(void *kc, void *vc, int f16, int64_t at, const float *row, const float *c,
                     const float *s, int nh, int nkv, int kh, int hd) {
    float k[hd];
    rope(row + (size_t)(nh + kh) * hd, c, s, hd, k);
    const float *v = row + (size_t)(nh + nkv + kh) * hd;
    if (!f16) {
        memcpy((float *)kc + at, k, sizeof(float) * hd);
        memcpy((float *)vc + at, v, sizeof(float) * hd);
        return;
    }
    uint16_t *kd = (uint16_t *)kc + at, *vd = (uint16_t *)vc + at;
    for (int e = 0; e < hd; e++) {
        kd[e] = fp32_to_fp16(k[e]);
        vd[e] = fp32_to_fp16(v[e]);
    }
}
/* h[j] = silu(g[j]) * u[j] = g / (1 + exp(-g)) * u */
static void silu_mul(const float *g, const float *u, int n, float *h) {
    int j = 0;
#ifdef ATT_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; j + 16 <= n; j += 16) {
        const __m512 gv = _mm512_loadu_ps(g + j);
        /* exp512 is accurate for any argument <= 88; above, exp(-g) overflows to inf, silu -> -0 */
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(h + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                              _mm512_loadu_ps(u + j)));
    }
#elif defined(ATT_AVX2)
    /* exp256 does not overflow to inf: exp(-g) is clamped at exp(88) ~ 1.7e38, so silu(g) for
     * g < -88 is ~ g * 6e-39 * u instead of -0. (The scalar loop takes 4.1-4.3 ns a value on
     * Zen 3, this one 0.5: for the 1B shape's 16 x 8192 values a token, ~0.5 ms of a token.) */
    const __m256 one = _mm256_set1_ps(1.0f), top = _mm256_set1_ps(88.0f);
    for (; j + 8 <= n; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), top));
        _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) h[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* ---- stages without barriers ---------------------------------------------------------------
 * A stage's work items (row chunks, tasks) are handed out by `next` and counted by `done`; a
 * thread waits for a stage's `done` to reach its item count, not for the other threads to
 * arrive. A thread the OS has preempted holds up the others only while it holds an item: the
 * rest of the stage and the next ones run without it, and when it comes back it finds them
 * done. (Work a late thread does for itself, the redundant norms, reads buffers that later
 * stages may have changed meanwhile; it only uses that work if it then gets an item of the
 * next stage, and it can only get one while that stage is unfinished, when those buffers
 * still hold what it read.) Waiting spins briefly, then yields the core (see WAIT_SPINS). */
typedef struct { int next, done; } stage_t;

static inline int grab(stage_t *s) { return __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED); }
static inline void finish(stage_t *s) { __atomic_fetch_add(&s->done, 1, __ATOMIC_RELEASE); }

#ifndef WAIT_SPINS
#define WAIT_SPINS 2000
#endif

static void wait_stage(stage_t *s, int n) {
    for (int spins = 0; __atomic_load_n(&s->done, __ATOMIC_ACQUIRE) < n; spins++) {
        if (spins < WAIT_SPINS) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield");
#endif
        } else {
            sched_yield();
        }
    }
}

#ifdef SYNC_BARRIER /* experiment: OpenMP barriers instead */
#define SYNC(s, n) _Pragma("omp barrier")
#else
#define SYNC(s, n) wait_stage(s, n)
#endif

/* rows per matmul chunk: ~16 chunks a thread, a multiple of the widest tile (16 rows: a
 * repacked tile is computed whole), 16..256 */
static int chunk_rows(int N, int T) {
    int c = (N + 16 * T - 1) / (16 * T);
    c = (c + 15) / 16 * 16;
    return c < 16 ? 16 : (c > 256 ? 256 : c);
}

static size_t align64(size_t n) { return (n + 63) / 64 * 64; }

/* int8 buffers for M rows of K values, carved from *mem */
static qbuf_t qbuf_carve(char **mem, int M, int K, int B) {
    qbuf_t b;
    b.q = (int8_t *)*mem;
    *mem += align64((size_t)M * K);
    b.d = (float *)*mem;
    *mem += align64(sizeof(float) * (size_t)M * (K / B + 1));
    b.s = (int32_t *)*mem;
    *mem += align64(sizeof(int32_t) * (size_t)M * (K / 32 + 1));
    b.s16 = (int16_t *)*mem;
    *mem += align64(sizeof(int16_t) * (size_t)M * (K / 16 + 1));
    return b;
}

static size_t qbuf_bytes(int M, int K, int B) {
    return align64((size_t)M * K) + align64(sizeof(float) * (size_t)M * (K / B + 1)) +
           align64(sizeof(int32_t) * (size_t)M * (K / 32 + 1)) +
           align64(sizeof(int16_t) * (size_t)M * (K / 16 + 1));
}

/* Attention of a step with few (sequence, kv head) pairs splits each one's context into parts
 * (flash-decoding), so every thread gets work: parts of at least MIN_PART keys, merged by
 * whichever thread finishes a pair's last part. */
#define MIN_PART 64

static int attention_parts(int pairs, int nt) {
    return pairs >= 4 * nt ? 1 : (4 * nt + pairs - 1) / pairs;
}

static inline int parts_of(int64_t ctx, int parts) {
    const int64_t most = (ctx + MIN_PART - 1) / MIN_PART;
    return most < parts ? (int)(most > 0 ? most : 1) : parts;
}

/* out[g][hd] from np partial states [acc g*hd | m g | l g] */
static void merge_parts(const float *parts, int np, int g, int hd, float *out) {
    const size_t stride = (size_t)g * hd + 2 * g;
    for (int h = 0; h < g; h++) {
        float mx = -INFINITY, l = 0.0f;
        for (int p = 0; p < np; p++) {
            const float mp = parts[p * stride + (size_t)g * hd + h];
            mx = mp > mx ? mp : mx;
        }
        float *o = out + (size_t)h * hd;
        for (int e = 0; e < hd; e++) o[e] = 0.0f;
        for (int p = 0; p < np; p++) {
            const float *st = parts + p * stride;
            const float w = expf(st[(size_t)g * hd + h] - mx);
            l = l + st[(size_t)g * hd + g + h] * w;
            for (int e = 0; e < hd; e++) o[e] = o[e] + st[(size_t)h * hd + e] * w;
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int e = 0; e < hd; e++) o[e] = o[e] * inv;
    }
}

/* ==== the step ================================================================================ */

/* Returns 0, or -3 when out of memory. k_caches/v_caches: one [blocks][bs][nkv][hd] fp32 cache
 * per layer; slots [M], tables [M][bt_stride], ctx [M] (tokens after this one is written): one
 * entry per row, so a prefill chunk of n tokens is n rows with the same table and ctx growing
 * by one. kv_first: some sequence has several rows (then all k/v are written before attention). */
int decode_step(const dmodel_t *m, float *x, const float *cosb, const float *sinb,
                void *const *k_caches, void *const *v_caches, int kv_f16, int bs,
                const int64_t *slots, const int64_t *tables, int64_t bt_stride, const int64_t *ctx,
                int M, float *out, int n_threads, int kv_first) {
    const int D = m->D, nh = m->nh, nkv = m->nkv, hd = m->hd, I = m->inter, L = m->n_layers;
    const int g = nh / nkv, nqkv = (nh + 2 * nkv) * hd, natt = nh * hd;
    int kmax = D > natt ? D : natt;
    kmax = kmax > I ? kmax : I;
    const int redundant = (size_t)M * (D > natt ? D : natt) <= REDUNDANT_MAX;
    int T = n_threads < 1 ? 1 : n_threads;
    /* one allocation: shared buffers, then per-thread ones */
    size_t work_bytes = align64(sizeof(float) * NR * (size_t)kmax);
    static const int int_types[] = {2, 3, 8, 12, 13, 14};
    const int ks[] = {D, natt, I};
    for (int a = 0; a < 3; a++) /* the int8 kernels' scratch for any type and K of the step */
        for (int t = 0; t < 6; t++) {
            if (ks[a] % int_block(int_types[t])) continue;
            const size_t need = align64(gemm_int_work_bytes(int_types[t], ks[a], M));
            work_bytes = work_bytes > need ? work_bytes : need;
        }
    const size_t act_bytes = qbuf_bytes(M, kmax, 32) + qbuf_bytes(M, kmax, 256) +
                             align64(sizeof(float) * (size_t)M * kmax);
    const size_t tmp_bytes = align64(sizeof(float) * (size_t)M * 2 * JCHUNK);
    const size_t per_thread = work_bytes + tmp_bytes + (redundant ? act_bytes : 0);
    /* attention tasks: (sequence, group of `per` kv heads, context part) */
    const int per = heads_per_task(M, nkv, T), G = nkv / per, gq = per * g;
    const int parts = attention_parts(M * G, T), n_att = M * G * parts;
    const size_t part_floats = (size_t)gq * hd + 2 * gq;
    const size_t partial_bytes = parts > 1 ? align64(sizeof(float) * (size_t)n_att * part_floats) +
                                                 align64(sizeof(int) * (size_t)M * G)
                                           : 0;
    const size_t shared = partial_bytes + align64(sizeof(float) * (size_t)M * nqkv) +
                          align64(sizeof(float) * (size_t)M * natt) + 2 * act_bytes +
                          align64(sizeof(stage_t) * (size_t)(L * NSTAGE + 1));
    char *mem = (char *)aligned_alloc(64, shared + per_thread * T);
    if (!mem) return -3;
    char *p = mem;
    float *partial = (float *)p;
    int *merges = 0;
    if (parts > 1) {
        p += align64(sizeof(float) * (size_t)n_att * part_floats);
        merges = (int *)p;
        memset(merges, 0, sizeof(int) * (size_t)M * G);
        p += align64(sizeof(int) * (size_t)M * G);
    }
    float *qkv = (float *)p;
    p += align64(sizeof(float) * (size_t)M * nqkv);
    float *att = (float *)p;
    p += align64(sizeof(float) * (size_t)M * natt);
    /* A: the normed x (or the attention output) for qkv, o and gate|up; H: h for down */
    act_t a_shared, hact;
    float *xn_shared = (float *)p;
    p += align64(sizeof(float) * (size_t)M * kmax);
    a_shared.q32 = qbuf_carve(&p, M, kmax, 32);
    a_shared.q256 = qbuf_carve(&p, M, kmax, 256);
    float *hbuf = (float *)p;
    p += align64(sizeof(float) * (size_t)M * kmax);
    hact.q32 = qbuf_carve(&p, M, kmax, 32);
    hact.q256 = qbuf_carve(&p, M, kmax, 256);
    hact.K = I;
    hact.f = hbuf;
    stage_t *stages = (stage_t *)p;
    p += align64(sizeof(stage_t) * (size_t)(L * NSTAGE + 1));
    memset(stages, 0, sizeof(stage_t) * (size_t)(L * NSTAGE + 1));
    char *thread_mem = p;

#pragma omp parallel num_threads(T)
    {
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        char *tp = thread_mem + per_thread * tid;
        void *work = tp;
        float *tmp = (float *)(tp + work_bytes);
        act_t a = a_shared;
        float *xn = xn_shared;
        if (redundant) { /* this thread's own copy of the matmul inputs */
            char *q = tp + work_bytes + tmp_bytes;
            xn = (float *)q;
            q += align64(sizeof(float) * (size_t)M * kmax);
            a.q32 = qbuf_carve(&q, M, kmax, 32);
            a.q256 = qbuf_carve(&q, M, kmax, 256);
        }
        for (int l = 0; l < L; l++) {
            const dlayer_t *ly = &m->layers[l];
            stage_t *st = stages + l * NSTAGE;
            void *kc = k_caches[l], *vc = v_caches[l];

            /* 1. xn = rmsnorm(x) and its int8 forms for qkv */
            a.K = D;
            a.f = xn;
            if (redundant) {
                for (int i = 0; i < M; i++) {
                    rmsnorm(x + (size_t)i * D, ly->attn_norm, D, m->eps, xn + (size_t)i * D);
                    quant_part(&a, ly->qkv.forms, i, 0, D);
                }
            } else {
                for (int i; (i = grab(st + 0)) < M; finish(st + 0)) {
                    rmsnorm(x + (size_t)i * D, ly->attn_norm, D, m->eps, xn + (size_t)i * D);
                    quant_part(&a, ly->qkv.forms, i, 0, D);
                }
                SYNC(st + 0, M);
            }

            /* 2. qkv = xn @ Wqkv^T */
            const int ch_qkv = chunk_rows(nqkv, nt), nc_qkv = (nqkv + ch_qkv - 1) / ch_qkv;
            for (int c; (c = grab(st + 1)) < nc_qkv; finish(st + 1)) {
                const int r0 = c * ch_qkv, r1 = r0 + ch_qkv < nqkv ? r0 + ch_qkv : nqkv;
                mat_rows(&ly->qkv, &a, M, r0, r1, qkv + r0, nqkv, work);
            }
            SYNC(st + 1, nc_qkv);

            /* 2b. several rows of one sequence (prefill chunks): every row's k/v goes to the
             *     cache before any row attends, since a row reads the ones before it */
            if (kv_first) {
                for (int task; (task = grab(st + 8)) < M * nkv; finish(st + 8)) {
                    const int i = task / nkv, kh = task % nkv;
                    const float *row = qkv + (size_t)i * nqkv;
                    const float *c = cosb + (size_t)i * hd, *s = sinb + (size_t)i * hd;
                    kv_write(kc, vc, kv_f16, (slots[i] * nkv + kh) * (int64_t)hd, row, c, s, nh, nkv, kh, hd);
                }
                SYNC(st + 8, M * nkv);
            }

            /* 3. per (sequence, kv heads, context part): rope, cache write, attention */
            for (int task; (task = grab(st + 2)) < n_att; finish(st + 2)) {
                const int i = task / (G * parts), grp = task / parts % G, part = task % parts;
                const int np = parts_of(ctx[i], parts), kh0 = grp * per, kh1 = kh0 + per;
                if (part >= np) continue;
                const float *row = qkv + (size_t)i * nqkv;
                const float *c = cosb + (size_t)i * hd, *s = sinb + (size_t)i * hd;
                float qs[gq * hd];
                for (int h = 0; h < gq; h++) rope(row + (size_t)(kh0 * g + h) * hd, c, s, hd, qs + h * hd);
                for (int e = 0; e < gq * hd; e++) qs[e] = qs[e] * m->scale;
                if (!kv_first && part == np - 1) /* the part that reads the new token writes it */
                    for (int kh = kh0; kh < kh1; kh++)
                        kv_write(kc, vc, kv_f16, (slots[i] * nkv + kh) * (int64_t)hd, row, c, s, nh, nkv, kh, hd);
                const int64_t *table = tables + (int64_t)i * bt_stride;
                float *o = att + ((size_t)i * nh + (size_t)kh0 * g) * hd;
                if (np == 1) {
                    attend_any(qs, kc, vc, table, ctx[i], g, nkv, kh0, kh1, hd, bs, kv_f16, o);
                    continue;
                }
                const int64_t len = (ctx[i] + np - 1) / np, t0 = part * len;
                const int64_t t1 = t0 + len < ctx[i] ? t0 + len : ctx[i];
                float *acc = partial + (((size_t)i * G + grp) * parts + part) * part_floats;
                float *pm = acc + gq * hd, *pl = pm + gq;
                memset(acc, 0, sizeof(float) * gq * hd);
                for (int h = 0; h < gq; h++) { pm[h] = -INFINITY; pl[h] = 0.0f; }
                attend_range_any(qs, kc, vc, table, t0, t1, g, nkv, kh0, kh1, hd, bs, kv_f16, acc, pm, pl);
                /* the last part of this layer to finish merges them all (counts run on across
                 * layers: a (sequence, head group) has np parts in every layer) */
                if (__atomic_add_fetch(merges + (size_t)i * G + grp, 1, __ATOMIC_ACQ_REL) == (l + 1) * np)
                    merge_parts(partial + ((size_t)i * G + grp) * parts * part_floats, np, gq, hd, o);
            }
            SYNC(st + 2, n_att);

            /* 4. int8 forms of the attention output for o */
            a.K = natt;
            a.f = att;
            if (ly->o.forms) {
                if (redundant) {
                    for (int i = 0; i < M; i++) quant_part(&a, ly->o.forms, i, 0, natt);
                } else {
                    for (int i; (i = grab(st + 3)) < M; finish(st + 3)) quant_part(&a, ly->o.forms, i, 0, natt);
                    SYNC(st + 3, M);
                }
            }

            /* 5. x += att @ Wo^T */
            const int ch_d = chunk_rows(D, nt), nc_d = (D + ch_d - 1) / ch_d;
            for (int c; (c = grab(st + 4)) < nc_d; finish(st + 4)) {
                const int r0 = c * ch_d, r1 = r0 + ch_d < D ? r0 + ch_d : D, w = r1 - r0;
                mat_rows(&ly->o, &a, M, r0, r1, tmp, w, work);
                for (int i = 0; i < M; i++)
                    for (int r = 0; r < w; r++) x[(size_t)i * D + r0 + r] += tmp[(size_t)i * w + r];
            }
            SYNC(st + 4, nc_d);

            /* 6. xn = rmsnorm(x) and its int8 forms for gate|up */
            a.K = D;
            a.f = xn;
            if (redundant) {
                for (int i = 0; i < M; i++) {
                    rmsnorm(x + (size_t)i * D, ly->ffn_norm, D, m->eps, xn + (size_t)i * D);
                    quant_part(&a, ly->gate_up.forms, i, 0, D);
                }
            } else {
                for (int i; (i = grab(st + 5)) < M; finish(st + 5)) {
                    rmsnorm(x + (size_t)i * D, ly->ffn_norm, D, m->eps, xn + (size_t)i * D);
                    quant_part(&a, ly->gate_up.forms, i, 0, D);
                }
                SYNC(st + 5, M);
            }

            /* 7. h = silu(xn @ Wgate^T) * (xn @ Wup^T), chunks of JCHUNK columns of h, each
             *    quantizing its own blocks for down */
            const int nc_h = (I + JCHUNK - 1) / JCHUNK;
            for (int c; (c = grab(st + 6)) < nc_h; finish(st + 6)) {
                const int j0 = c * JCHUNK, j1 = j0 + JCHUNK < I ? j0 + JCHUNK : I, w = j1 - j0;
                float *gt = tmp, *ut = tmp + (size_t)M * w;
                mat_rows(&ly->gate_up, &a, M, j0, j1, gt, w, work);
                mat_rows(&ly->gate_up, &a, M, I + j0, I + j1, ut, w, work);
                for (int i = 0; i < M; i++) {
                    silu_mul(gt + (size_t)i * w, ut + (size_t)i * w, w, hbuf + (size_t)i * I + j0);
                    quant_part(&hact, ly->down.forms, i, j0, j1);
                }
            }
            SYNC(st + 6, nc_h);

            /* 8. x += h @ Wdown^T */
            for (int c; (c = grab(st + 7)) < nc_d; finish(st + 7)) {
                const int r0 = c * ch_d, r1 = r0 + ch_d < D ? r0 + ch_d : D, w = r1 - r0;
                mat_rows(&ly->down, &hact, M, r0, r1, tmp, w, work);
                for (int i = 0; i < M; i++)
                    for (int r = 0; r < w; r++) x[(size_t)i * D + r0 + r] += tmp[(size_t)i * w + r];
            }
            SYNC(st + 7, nc_d);
        }
        /* the final norm */
        for (int i; (i = grab(stages + L * NSTAGE)) < M;)
            rmsnorm(x + (size_t)i * D, m->final_norm, D, m->eps, out + (size_t)i * D);
    }
    free(mem);
    return 0;
}
