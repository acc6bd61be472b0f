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

/* Row `row` of a [rows, ...] array with `stride` elements between rows. */
INLINE void *at_row(const void *base, int64_t row, int64_t stride, int bf16) {
    return base ? (char *)base + row * stride * (bf16 ? 2 : 4) : NULL;
}

/* Whether `elements` of work are worth threads: below 65,536 (a decode step's rows) not. */
#define PARALLEL(elements, threads) ((int64_t)(elements) >= 65536 && (threads) > 1)

/* With `residual`: s = x + residual, written back to x (the next layer's residual); then
 * out = weight * round(s / sqrt(mean(s^2) + eps)), as Hugging Face's LlamaRMSNorm. */
INLINE void add_rms_norm_row(void *x, const void *residual, const void *weight, void *out,
                             int dim, float eps, int bf16) {
    float s[dim];
    float sum = 0.0f;
    for (int d = 0; d < dim; d++) {
        float v = get(x, d, bf16);
        if (residual) {
            v = r16(v + get(residual, d, bf16), bf16);
            put(x, d, v, bf16);
        }
        s[d] = v;
        sum += v * v;
    }
    const float inv = 1.0f / sqrtf(sum / dim + eps);
    for (int d = 0; d < dim; d++) put(out, d, get(weight, d, bf16) * r16(s[d] * inv, bf16), bf16);
}

INLINE void add_rms_norm(void *x, int64_t s_x, const void *residual, int64_t s_r,
                         const void *weight, void *out, int64_t s_o, int rows, int dim,
                         float eps, int threads, int bf16) {
    PARALLEL_FOR(row, rows, PARALLEL((int64_t)rows * dim, threads),
                 add_rms_norm_row(at_row(x, row, s_x, bf16), at_row(residual, row, s_r, bf16),
                                  weight, at_row(out, row, s_o, bf16), dim, eps, bf16));
}

/* Rotate-half RoPE of one head in place: x[i], x[i + half] by the angle whose cos and sin
 * are table[i] and table[half + i]. Products are rounded before they are summed, as torch's
 * ops do (no fused multiply-add). */
__attribute__((optimize("fp-contract=off"))) static void rotate(void *x, int64_t at,
                                                                const void *table, int half,
                                                                int bf16) {
    for (int i = 0; i < half; i++) {
        const float a = get(x, at + i, bf16), b = get(x, at + half + i, bf16);
        const float c = get(table, i, bf16), sn = get(table, half + i, bf16);
        const float ac = r16(a * c, bf16), bs = r16(b * sn, bf16);
        const float bc = r16(b * c, bf16), as = r16(a * sn, bf16);
        put(x, at + i, ac - bs, bf16);
        put(x, at + half + i, bc + as, bf16);
    }
}

/* Token t's query and key heads rotated in place by its row of `table` ([cos | sin] of
 * width dim); then, where slots is given, its keys and values copied to cache slot
 * slots[t] (a slot is one token's [kv_heads, dim] row). */
INLINE void rope_store_token(void *q, int64_t s_qh, void *k, int64_t s_kh, const void *v,
                             int64_t s_vh, const void *table, void *k_slot, void *v_slot,
                             int num_heads, int num_kv_heads, int dim, int bf16) {
    const int size = bf16 ? 2 : 4;
    for (int h = 0; h < num_heads; h++) rotate(q, h * s_qh, table, dim / 2, bf16);
    for (int h = 0; h < num_kv_heads; h++) {
        rotate(k, h * s_kh, table, dim / 2, bf16);
        if (!k_slot) continue;
        memcpy((char *)k_slot + (size_t)h * dim * size, (const char *)k + h * s_kh * size,
               (size_t)dim * size);
        memcpy((char *)v_slot + (size_t)h * dim * size, (const char *)v + h * s_vh * size,
               (size_t)dim * size);
    }
}

INLINE void rope_store(void *q, int64_t s_qt, int64_t s_qh, void *k, int64_t s_kt,
                       int64_t s_kh, const void *v, int64_t s_vt, int64_t s_vh,
                       const void *table, int64_t s_table, void *k_cache, void *v_cache,
                       int64_t s_slot, const int64_t *slots, int tokens, int num_heads,
                       int num_kv_heads, int dim, int threads, int bf16) {
    const int64_t elements = (int64_t)tokens * (num_heads + num_kv_heads) * dim;
    PARALLEL_FOR(t, tokens, PARALLEL(elements, threads),
                 rope_store_token(at_row(q, t, s_qt, bf16), s_qh, at_row(k, t, s_kt, bf16), s_kh,
                                  at_row(v, t, s_vt, bf16), s_vh,
                                  at_row(table, t, s_table, bf16),
                                  slots ? at_row(k_cache, slots[t], s_slot, bf16) : NULL,
                                  slots ? at_row(v_cache, slots[t], s_slot, bf16) : NULL,
                                  num_heads, num_kv_heads, dim, bf16));
}

/* out = silu(gate) * up for x = [gate | up] (each `inter` wide): silu rounded, then the
 * product, as torch's two ops round. */
INLINE void silu_and_mul_row(const void *x, void *out, int inter, int bf16) {
    for (int i = 0; i < inter; i++) {
        const float g = get(x, i, bf16), up = get(x, inter + i, bf16);
        const float e = exp_neg(-fabsf(g)); /* exp(-|g|): the sigmoid without overflow */
        /* Below -87 (exp_neg's floor) torch's g / (1 + exp(-g)) is a zero or a denormal. */
        const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : g < -87.0f ? 0.0f : e / (1.0f + e);
        put(out, i, r16(g * sigmoid, bf16) * up, bf16);
    }
}

INLINE void silu_and_mul(const void *x, int64_t s_x, void *out, int64_t s_o, int rows,
                         int inter, int threads, int bf16) {
    PARALLEL_FOR(row, rows, PARALLEL((int64_t)rows * inter, threads),
                 silu_and_mul_row(at_row(x, row, s_x, bf16), at_row(out, row, s_o, bf16), inter,
                                  bf16));
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
