/* The element-wise glue of a decoder layer on CPU: the residual add with RMSNorm, RoPE with
 * the KV-cache store, and SiLU-and-mul, one call each.
 *
 * In torch each is 3 to 12 small ops, and at a decode step's few rows an op costs its
 * dispatch, not its arithmetic: these calls do in one pass what the ops do, rounding where
 * they round (a bfloat16 op computes in float32 and rounds its result), so outputs match
 * torch's in bfloat16 up to the order of a sum. Rows are split over OpenMP threads only when
 * there are enough of them to pay for it. Strides are in elements.
 */
#include <math.h>

#include "cpu_kernels.h"

/* Element access for both dtypes: `r16` rounds a float32 value through bfloat16 (the
 * rounding a bfloat16 op applies to its result) and is the identity for float32. */
INLINE float get(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
INLINE void put(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}
INLINE float r16(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

#define PARALLEL_MIN_ELEMENTS 65536 /* below this a step's rows run on the calling thread */

/* With `residual`: s = x + residual, written back to x (the next layer's residual); then
 * out = weight * round(s / sqrt(mean(s^2) + eps)), as Hugging Face's LlamaRMSNorm. */
INLINE void add_rms_norm(void *x, int64_t s_x, const void *residual, int64_t s_r,
                         const void *weight, void *out, int64_t s_o, int rows, int dim,
                         float eps, int threads, int bf16) {
    const int par = (int64_t)rows * dim >= PARALLEL_MIN_ELEMENTS && threads > 1;
#pragma omp parallel for if (par) num_threads(threads)
    for (int row = 0; row < rows; row++) {
        float s[dim];
        float sum = 0.0f;
        for (int d = 0; d < dim; d++) {
            float v = get(x, row * s_x + d, bf16);
            if (residual) {
                v = r16(v + get(residual, row * s_r + d, bf16), bf16);
                put(x, row * s_x + d, v, bf16);
            }
            s[d] = v;
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / dim + eps);
        for (int d = 0; d < dim; d++)
            put(out, row * s_o + d, get(weight, d, bf16) * r16(s[d] * inv, bf16), bf16);
    }
}

/* Rotate-half RoPE of one head in place: x[i], x[i + half] by the angle whose cos and sin
 * are c[i] and sn[i]. Products are rounded before they are summed, as torch's ops do (no
 * fused multiply-add). */
__attribute__((optimize("fp-contract=off"))) static void rotate(void *x, int64_t at,
                                                                const void *table, int64_t row,
                                                                int half, int bf16) {
    for (int i = 0; i < half; i++) {
        const float a = get(x, at + i, bf16), b = get(x, at + half + i, bf16);
        const float c = get(table, row + i, bf16), sn = get(table, row + half + i, bf16);
        const float ac = r16(a * c, bf16), bs = r16(b * sn, bf16);
        const float bc = r16(b * c, bf16), as = r16(a * sn, bf16);
        put(x, at + i, ac - bs, bf16);
        put(x, at + half + i, bc + as, bf16);
    }
}

/* Token t's query and key heads rotated in place by its row of `table` ([cos | sin] of
 * width dim); then, where slots is given, its keys and values copied to cache slot
 * slots[t] (a slot is one token's [kv_heads, dim] row). */
INLINE void rope_store(void *q, int64_t s_qt, int64_t s_qh, void *k, int64_t s_kt,
                       int64_t s_kh, const void *v, int64_t s_vt, int64_t s_vh,
                       const void *table, int64_t s_table, void *k_cache, void *v_cache,
                       int64_t s_slot, const int64_t *slots, int tokens, int num_heads,
                       int num_kv_heads, int dim, int threads, int bf16) {
    const int size = bf16 ? 2 : 4;
    const int par = (int64_t)tokens * (num_heads + num_kv_heads) * dim >= PARALLEL_MIN_ELEMENTS
                    && threads > 1;
#pragma omp parallel for if (par) num_threads(threads)
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < num_heads; h++)
            rotate(q, t * s_qt + h * s_qh, table, t * s_table, dim / 2, bf16);
        for (int h = 0; h < num_kv_heads; h++) {
            rotate(k, t * s_kt + h * s_kh, table, t * s_table, dim / 2, bf16);
            if (!slots) continue;
            char *kc = (char *)k_cache + (slots[t] * s_slot + (int64_t)h * dim) * size;
            char *vc = (char *)v_cache + (slots[t] * s_slot + (int64_t)h * dim) * size;
            memcpy(kc, (const char *)k + (t * s_kt + h * s_kh) * size, (size_t)dim * size);
            memcpy(vc, (const char *)v + (t * s_vt + h * s_vh) * size, (size_t)dim * size);
        }
    }
}

/* out = silu(gate) * up for x = [gate | up] (each `inter` wide): silu rounded, then the
 * product, as torch's two ops round. */
INLINE void silu_and_mul(const void *x, int64_t s_x, void *out, int64_t s_o, int rows,
                         int inter, int threads, int bf16) {
    const int par = (int64_t)rows * inter >= PARALLEL_MIN_ELEMENTS && threads > 1;
#pragma omp parallel for if (par) num_threads(threads)
    for (int row = 0; row < rows; row++) {
        for (int i = 0; i < inter; i++) {
            const float g = get(x, row * s_x + i, bf16), up = get(x, row * s_x + inter + i, bf16);
            const float e = exp_neg(-fabsf(g)); /* exp(-|g|): the sigmoid without overflow */
            /* Below -87 (exp_neg's floor) torch's g / (1 + exp(-g)) is a zero or a denormal. */
            const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : g < -87.0f ? 0.0f : e / (1.0f + e);
            put(out, row * s_o + i, r16(g * sigmoid, bf16) * up, bf16);
        }
    }
}

/* NAME_bf16 and NAME_f32, taking PARAMS and passing the rest on with the dtype flag. */
#define BOTH_DTYPES(NAME, PARAMS, ...)                                                        \
    void NAME##_bf16 PARAMS { NAME(__VA_ARGS__, 1); }                                         \
    void NAME##_f32 PARAMS { NAME(__VA_ARGS__, 0); }

BOTH_DTYPES(add_rms_norm,
            (void *x, int64_t s_x, const void *residual, int64_t s_r, const void *weight,
             void *out, int64_t s_o, int rows, int dim, float eps, int threads),
            x, s_x, residual, s_r, weight, out, s_o, rows, dim, eps, threads)
BOTH_DTYPES(rope_store,
            (void *q, int64_t s_qt, int64_t s_qh, void *k, int64_t s_kt, int64_t s_kh,
             const void *v, int64_t s_vt, int64_t s_vh, const void *table, int64_t s_table,
             void *k_cache, void *v_cache, int64_t s_slot, const int64_t *slots, int tokens,
             int num_heads, int num_kv_heads, int dim, int threads),
            q, s_qt, s_qh, k, s_kt, s_kh, v, s_vt, s_vh, table, s_table, k_cache, v_cache,
            s_slot, slots, tokens, num_heads, num_kv_heads, dim, threads)
BOTH_DTYPES(silu_and_mul,
            (const void *x, int64_t s_x, void *out, int64_t s_o, int rows, int inter,
             int threads),
            x, s_x, out, s_o, rows, inter, threads)
