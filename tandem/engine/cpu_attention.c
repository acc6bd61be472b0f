/* Decode attention on CPU, reading the paged KV cache in place.
 *
 * One work item is one (sequence, KV head): its `group` query rows walk the sequence's
 * blocks through the block table, one block at a time, with an online softmax in float32.
 * Nothing is gathered, padded or masked, and each key and value row is loaded (and widened
 * from bfloat16) once for all the query heads that share it. Items run in parallel on the
 * OpenMP runtime torch already loaded (the same `libgomp.so.1`), on as many threads as the
 * caller says torch uses. Strides are in elements; caches are [blocks, block_size, kv_heads,
 * dim].
 */
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64
#define INLINE static inline __attribute__((always_inline))

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
 * 2^n * 2^f with n = round(x / ln 2) and a degree-6 polynomial on f in [-0.5, 0.5], within
 * ~2e-7 relative of expf. */
INLINE float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x; /* keeps 2^n normal; -inf (no key yet) gives ~1e-38 */
    const float t = x * 1.44269504f;
    const float n = __builtin_rintf(t);
    const float f = (t - n) * 0.69314718f;
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

INLINE void prefetch_row(const void *base, int64_t offset, int n, int bf16) {
    const char *p = (const char *)base + offset * (bf16 ? 2 : 4);
    for (int byte = 0; byte < n * (bf16 ? 2 : 4); byte += 64) __builtin_prefetch(p + byte);
}

/* One (sequence, KV head): `q` rows are the group's query heads, already scaled. */
INLINE void attend(float q[][MAX_HEAD_DIM], float acc[][MAX_HEAD_DIM], int group, int dim,
                   const void *k_cache, const void *v_cache, int64_t s_cb, int64_t s_ct,
                   int64_t head_offset, const int32_t *blocks, int len, int block_size,
                   int bf16) {
    float m[MAX_GROUP], l[MAX_GROUP], alpha[MAX_GROUP], s[MAX_GROUP][MAX_BLOCK];
    float row[MAX_HEAD_DIM];
    for (int g = 0; g < group; g++) {
        m[g] = -1e30f;
        l[g] = 0.0f;
        for (int d = 0; d < dim; d++) acc[g][d] = 0.0f;
    }
    for (int start = 0; start < len; start += block_size) {
        const int n = len - start < block_size ? len - start : block_size;
        const int64_t base = (int64_t)blocks[start / block_size] * s_cb + head_offset;
        if (start + block_size < len) { /* blocks are scattered: fetch the next one's rows now */
            const int64_t next = (int64_t)blocks[start / block_size + 1] * s_cb + head_offset;
            for (int t = 0; t < block_size; t++) {
                prefetch_row(k_cache, next + t * s_ct, dim, bf16);
                prefetch_row(v_cache, next + t * s_ct, dim, bf16);
            }
        }
        for (int t = 0; t < n; t++) {
            load_row(row, k_cache, base + t * s_ct, dim, bf16);
            for (int g = 0; g < group; g++) {
                float dot = 0.0f;
                for (int d = 0; d < dim; d++) dot += q[g][d] * row[d];
                s[g][t] = dot;
            }
        }
        for (int g = 0; g < group; g++) {
            float top = m[g];
            for (int t = 0; t < n; t++) top = s[g][t] > top ? s[g][t] : top;
            alpha[g] = exp_neg(m[g] - top);
            float sum = 0.0f;
            for (int t = 0; t < n; t++) {
                s[g][t] = exp_neg(s[g][t] - top);
                sum += s[g][t];
            }
            l[g] = l[g] * alpha[g] + sum;
            m[g] = top;
            for (int d = 0; d < dim; d++) acc[g][d] *= alpha[g];
        }
        for (int t = 0; t < n; t++) {
            load_row(row, v_cache, base + t * s_ct, dim, bf16);
            for (int g = 0; g < group; g++)
                for (int d = 0; d < dim; d++) acc[g][d] += s[g][t] * row[d];
        }
    }
    for (int g = 0; g < group; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int d = 0; d < dim; d++) acc[g][d] *= inv;
    }
}

INLINE void decode(const void *q, int64_t s_qt, int64_t s_qh, const void *k_cache,
                   const void *v_cache, int64_t s_cb, int64_t s_ct, int64_t s_ch,
                   const int32_t *rows, const int32_t *block_tables, int64_t s_bt,
                   const int32_t *seq_lens, void *out, int64_t s_ot, int64_t s_oh, int num_seqs,
                   int num_heads, int num_kv_heads, int dim, int block_size, float scale,
                   int threads, int bf16) {
    const int group = num_heads / num_kv_heads, items = num_seqs * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads < items ? threads : items)
    for (int item = 0; item < items; item++) {
        const int seq = item / num_kv_heads, kv_head = item % num_kv_heads;
        const int64_t row = rows[seq];
        float qs[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
        for (int g = 0; g < group; g++) {
            load_row(qs[g], q, row * s_qt + (int64_t)(kv_head * group + g) * s_qh, dim, bf16);
            for (int d = 0; d < dim; d++) qs[g][d] *= scale;
        }
        attend(qs, acc, group, dim, k_cache, v_cache, s_cb, s_ct, kv_head * s_ch,
               block_tables + seq * s_bt, seq_lens[seq], block_size, bf16);
        for (int g = 0; g < group; g++)
            store_row(out, row * s_ot + (int64_t)(kv_head * group + g) * s_oh, acc[g], dim,
                      bf16);
    }
}

/* Head dims 64 and 128 get code of their own: with the trip count known, each row's loops
 * become a few whole vector instructions instead of a vectorised loop with its edges. */
#define DECODE_AT(DIM, BF16)                                                                  \
    decode(q, s_qt, s_qh, k_cache, v_cache, s_cb, s_ct, s_ch, rows, block_tables, s_bt,       \
           seq_lens, out, s_ot, s_oh, num_seqs, num_heads, num_kv_heads, DIM, block_size,     \
           scale, threads, BF16)
#define EXPORT(NAME, BF16)                                                                    \
    void NAME(const void *q, int64_t s_qt, int64_t s_qh, const void *k_cache,                 \
              const void *v_cache, int64_t s_cb, int64_t s_ct, int64_t s_ch,                  \
              const int32_t *rows, const int32_t *block_tables, int64_t s_bt,                 \
              const int32_t *seq_lens, void *out, int64_t s_ot, int64_t s_oh, int num_seqs,   \
              int num_heads, int num_kv_heads, int dim, int block_size, float scale,          \
              int threads) {                                                                  \
        if (dim == 64)                                                                        \
            DECODE_AT(64, BF16);                                                              \
        else if (dim == 128)                                                                  \
            DECODE_AT(128, BF16);                                                             \
        else                                                                                  \
            DECODE_AT(dim, BF16);                                                             \
    }
EXPORT(decode_attention_bf16, 1)
EXPORT(decode_attention_f32, 0)

/* The limits the Python side checks before calling: 0 group, 1 head dim, 2 block size. */
int decode_attention_limits(int which) {
    return which == 0 ? MAX_GROUP : which == 1 ? MAX_HEAD_DIM : MAX_BLOCK;
}
