/* What Tandem's CPU kernels share: bfloat16 conversions as torch rounds them, a vectorisable
 * exp, row loads and stores that widen to float32, and a loop that goes parallel only when it
 * pays. */
#ifndef TANDEM_CPU_KERNELS_H
#define TANDEM_CPU_KERNELS_H
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* for (int I = 0; I < N; I++) BODY; on the caller's `threads` OpenMP threads when PARALLEL,
 * else on the calling thread: libgomp takes ~13 us to enter even a one-thread region, as long
 * as a whole decode-step call at one row. */
#define PARALLEL_FOR(I, N, PARALLEL, ...)                                                     \
    do {                                                                                      \
        if (PARALLEL) {                                                                       \
            _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")             \
            for (int I = 0; I < (N); I++) { __VA_ARGS__; }                                    \
        } else {                                                                              \
            for (int I = 0; I < (N); I++) { __VA_ARGS__; }                                    \
        }                                                                                     \
    } while (0)

INLINE float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return 0x7FC0;
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0 in a form the compiler vectorises (libm's expf is a call per element):
 * e^x = 2^n e^f with n = round(x / ln 2), f = x - n ln 2 taken in two fused steps (ln 2 split
 * in a short high part and the rest, so f keeps its low bits at large |x|) and a degree-6
 * polynomial on |f| <= ln(2) / 2: within 2.3e-7 relative of exp over [-87, 0] (checked against
 * float64; reducing as (x / ln 2 - n) * ln 2 instead lost 4e-6). */
INLINE float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x; /* keeps 2^n normal; the -1e30 start max gives ~1e-38 */
    const float n = __builtin_rintf(x * 1.44269504f);
    const float f = __builtin_fmaf(-n, 1.4286068e-06f, __builtin_fmaf(-n, 0.693145751953125f, x));
    float p = 1.0f / 720;
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

INLINE void load_row(float *dst, const void *base, int64_t offset, int n, int bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int d = 0; d < n; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        memcpy(dst, (const float *)base + offset, n * sizeof(float));
    }
}

INLINE void store_row(void *base, int64_t offset, const float *src, int n, int bf16) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int d = 0; d < n; d++) dst[d] = f32_to_bf16(src[d]);
    } else {
        memcpy((float *)base + offset, src, n * sizeof(float));
    }
}

#endif
