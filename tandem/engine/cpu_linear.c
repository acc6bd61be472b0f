/* A linear layer at a decode step's few rows, bfloat16: out = x W^T (+ bias).
 *
 * At one row a linear layer only streams its weight, and oneDNN's packed kernel spends ~13 us
 * of fixed cost a call and reads ~10-12 GB/s on one core; this plain loop, which the compiler
 * vectorises for the machine's CPU, reads the unpacked weight at 15-27 GB/s (the demo model's
 * layers, one thread, weights not in cache). Each output is one dot product in float32 over
 * the row, rounded once, as torch rounds a bfloat16 matmul; with more rows each weight row is
 * read once for all of them (from L1 for the second on). Output rows go to OpenMP threads only
 * for large weights, such as the logits'. Strides are in elements.
 */
#include <stdlib.h>

#include "cpu_kernels.h"

INLINE float dot(const float *x, const uint16_t *w, int k) {
    float acc = 0.0f;
    for (int i = 0; i < k; i++) acc += x[i] * bf16_to_f32(w[i]);
    return acc;
}

/* Output features of one OpenMP work item: enough that a thread's share is a long read. */
#define FEATURES_PER_ITEM 256

INLINE void linear_features(const float *xf, int rows, int k, const uint16_t *w,
                            const uint16_t *bias, uint16_t *out, int64_t s_o, int first,
                            int last) {
    for (int j = first; j < last; j++) {
        const uint16_t *wj = w + (int64_t)j * k;
        const float b = bias ? bf16_to_f32(bias[j]) : 0.0f;
        for (int m = 0; m < rows; m++)
            out[m * s_o + j] = f32_to_bf16(dot(xf + (int64_t)m * k, wj, k) + b);
    }
}

/* Returns 0, or -1 if the float32 copy of x could not be allocated (nothing written). */
int linear_bf16(const uint16_t *x, int64_t s_x, const uint16_t *w, const uint16_t *bias,
                uint16_t *out, int64_t s_o, int rows, int n, int k, int threads) {
    float *xf = malloc(sizeof(float) * rows * k);
    if (!xf) return -1;
    for (int m = 0; m < rows; m++) load_row(xf + (int64_t)m * k, x, m * s_x, k, 1);
    const int items = (n + FEATURES_PER_ITEM - 1) / FEATURES_PER_ITEM;
    const int parallel = threads > 1 && (int64_t)n * k >= (1 << 22); /* 8 MiB of weight */
    PARALLEL_FOR(item, items, parallel, {
        const int first = item * FEATURES_PER_ITEM;
        const int last = first + FEATURES_PER_ITEM < n ? first + FEATURES_PER_ITEM : n;
        linear_features(xf, rows, k, w, bias, out, s_o, first, last);
    });
    free(xf);
    return 0;
}
