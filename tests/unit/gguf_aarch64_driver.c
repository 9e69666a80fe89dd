/* Test driver for corral/model/csrc/gguf_gemm.c on another architecture (built static for
 * aarch64 by tests/unit/test_gguf_aarch64.py and run under qemu-aarch64).
 *
 * argv[1]: cases, little-endian: int32 n_cases, then per case int32 type, M, K, N, row_bytes,
 * N*row_bytes weight bytes, M*K fp32 activations. argv[2] receives per case int32 rc_int,
 * rc_fp32, rc_dequant, then fp32 y_int [M*N], y_fp32 [M*N], dequantized weights [N*K].
 * Prints gguf_isa(). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int gguf_gemm(int type, const float *x, int M, int K, const uint8_t *base, const int64_t *offsets,
              int N, float *y, int ldy, int n_threads);
int gguf_gemm_int(int type, const float *x, int M, int K, const uint8_t *base,
                  const int64_t *offsets, int N, float *y, int ldy, int n_threads);
int gguf_dequant_rows(int type, const uint8_t *base, const int64_t *offsets, int N, int K,
                      float *out, int n_threads);
const char *gguf_isa(void);

static void must_read(void *p, size_t size, size_t n, FILE *f) {
    if (fread(p, size, n, f) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s cases.bin out.bin\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) {
        fprintf(stderr, "cannot open the files\n");
        return 2;
    }
    int32_t n_cases;
    must_read(&n_cases, 4, 1, in);
    for (int c = 0; c < n_cases; c++) {
        int32_t h[5];
        must_read(h, 4, 5, in);
        const int type = h[0], M = h[1], K = h[2], N = h[3], row_bytes = h[4];
        uint8_t *w = malloc((size_t)N * row_bytes);
        float *x = malloc(sizeof(float) * (size_t)M * K);
        int64_t *off = malloc(sizeof(int64_t) * (size_t)N);
        float *yi = calloc((size_t)M * N, sizeof(float)), *yf = calloc((size_t)M * N, sizeof(float));
        float *dq = calloc((size_t)N * K, sizeof(float));
        must_read(w, 1, (size_t)N * row_bytes, in);
        must_read(x, sizeof(float), (size_t)M * K, in);
        for (int n = 0; n < N; n++) off[n] = (int64_t)n * row_bytes;
        int32_t rc[3];
        rc[0] = gguf_gemm_int(type, x, M, K, w, off, N, yi, N, 1);
        rc[1] = gguf_gemm(type, x, M, K, w, off, N, yf, N, 1);
        rc[2] = gguf_dequant_rows(type, w, off, N, K, dq, 1);
        fwrite(rc, 4, 3, out);
        fwrite(yi, sizeof(float), (size_t)M * N, out);
        fwrite(yf, sizeof(float), (size_t)M * N, out);
        fwrite(dq, sizeof(float), (size_t)N * K, out);
        free(w); free(x); free(off); free(yi); free(yf); free(dq);
    }
    fclose(in);
    fclose(out);
    printf("%s\n", gguf_isa());
    return 0;
}
