/* Decode attention on CPU, reading the paged KV cache in place.
 *
 * One work item is one sequence and a run of its KV heads: their query rows walk the
 * sequence's blocks through the block table, one block at a time, with an online softmax in
 * float32. Nothing is gathered, padded or masked, and each key and value row is loaded (and
 * widened from bfloat16) once for all the query heads that share it. Items run in parallel on the
 * OpenMP runtime torch already loaded (the same `libgomp.so.1`), on as many threads as the
 * caller says torch uses. Strides are in elements; caches are [blocks, block_size, kv_heads,
 * dim].
 */
#include "cpu_kernels.h"

#define MAX_ROWS 64 /* query heads one work item holds */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64

INLINE void prefetch_run(const void *base, int64_t offset, int64_t n, int bf16) {
    const char *p = (const char *)base + offset * (bf16 ? 2 : 4);
    for (int64_t byte = 0; byte < n * (bf16 ? 2 : 4); byte += 64) __builtin_prefetch(p + byte);
}

/* KV heads [h0, h1) of one sequence; query row r = (h - h0) * group + g, already scaled.
 * Each token's keys (then values) for the range are adjacent in the cache, so a block is
 * read as 16 runs of (h1 - h0) * dim elements instead of one short row per item. */
INLINE void attend(float q[][MAX_HEAD_DIM], float acc[][MAX_HEAD_DIM], int h0, int h1,
                   int group, int dim, const void *k_cache, const void *v_cache, int64_t s_cb,
                   int64_t s_ct, int64_t s_ch, const int32_t *blocks, int len, int block_size,
                   int bf16) {
    const int num_rows = (h1 - h0) * group;
    float m[MAX_ROWS], l[MAX_ROWS], alpha[MAX_ROWS], s[MAX_ROWS][MAX_BLOCK];
    float row[MAX_HEAD_DIM];
    for (int r = 0; r < num_rows; r++) {
        m[r] = -1e30f;
        l[r] = 0.0f;
        for (int d = 0; d < dim; d++) acc[r][d] = 0.0f;
    }
    for (int start = 0; start < len; start += block_size) {
        const int n = len - start < block_size ? len - start : block_size;
        const int64_t base = (int64_t)blocks[start / block_size] * s_cb + h0 * s_ch;
        if (start + block_size < len) { /* blocks are scattered: ask for the next one now */
            const int64_t next = (int64_t)blocks[start / block_size + 1] * s_cb + h0 * s_ch;
            for (int t = 0; t < block_size; t++) {
                prefetch_run(k_cache, next + t * s_ct, (h1 - h0) * s_ch, bf16);
                prefetch_run(v_cache, next + t * s_ct, (h1 - h0) * s_ch, bf16);
            }
        }
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < h1 - h0; h++) {
                load_row(row, k_cache, base + t * s_ct + h * s_ch, dim, bf16);
                for (int g = 0; g < group; g++) {
                    float dot = 0.0f;
                    for (int d = 0; d < dim; d++) dot += q[h * group + g][d] * row[d];
                    s[h * group + g][t] = dot;
                }
            }
        }
        for (int r = 0; r < num_rows; r++) {
            float top = m[r];
            for (int t = 0; t < n; t++) top = s[r][t] > top ? s[r][t] : top;
            alpha[r] = exp_neg(m[r] - top);
            float sum = 0.0f;
            for (int t = 0; t < n; t++) {
                s[r][t] = exp_neg(s[r][t] - top);
                sum += s[r][t];
            }
            l[r] = l[r] * alpha[r] + sum;
            m[r] = top;
            for (int d = 0; d < dim; d++) acc[r][d] *= alpha[r];
        }
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < h1 - h0; h++) {
                load_row(row, v_cache, base + t * s_ct + h * s_ch, dim, bf16);
                for (int g = 0; g < group; g++) {
                    const float p = s[h * group + g][t];
                    for (int d = 0; d < dim; d++) acc[h * group + g][d] += p * row[d];
                }
            }
        }
    }
    for (int r = 0; r < num_rows; r++) {
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < dim; d++) acc[r][d] *= inv;
    }
}

/* Work item `item`: sequence item / parts, its part item % parts of the KV heads. */
INLINE void decode_item(int item, int parts, const void *q, int64_t s_qt, int64_t s_qh,
                        const void *k_cache, const void *v_cache, int64_t s_cb, int64_t s_ct,
                        int64_t s_ch, const int32_t *rows, const int32_t *block_tables,
                        int64_t s_bt, const int32_t *seq_lens, void *out, int64_t s_ot,
                        int64_t s_oh, int group, int num_kv_heads, int dim, int block_size,
                        float scale, int bf16) {
    const int seq = item / parts, part = item % parts;
    const int h0 = part * num_kv_heads / parts, h1 = (part + 1) * num_kv_heads / parts;
    const int64_t row = rows[seq];
    float qs[MAX_ROWS][MAX_HEAD_DIM], acc[MAX_ROWS][MAX_HEAD_DIM];
    for (int r = 0; r < (h1 - h0) * group; r++) {
        load_row(qs[r], q, row * s_qt + (int64_t)(h0 * group + r) * s_qh, dim, bf16);
        for (int d = 0; d < dim; d++) qs[r][d] *= scale;
    }
    attend(qs, acc, h0, h1, group, dim, k_cache, v_cache, s_cb, s_ct, s_ch,
           block_tables + seq * s_bt, seq_lens[seq], block_size, bf16);
    for (int r = 0; r < (h1 - h0) * group; r++)
        store_row(out, row * s_ot + (int64_t)(h0 * group + r) * s_oh, acc[r], dim, bf16);
}

/* Work items are (sequence, run of KV heads): a sequence's heads stay together unless the
 * threads would otherwise idle or its query rows exceed MAX_ROWS. */
INLINE void decode(const void *q, int64_t s_qt, int64_t s_qh, const void *k_cache,
                   const void *v_cache, int64_t s_cb, int64_t s_ct, int64_t s_ch,
                   const int32_t *rows, const int32_t *block_tables, int64_t s_bt,
                   const int32_t *seq_lens, void *out, int64_t s_ot, int64_t s_oh, int num_seqs,
                   int num_heads, int num_kv_heads, int dim, int block_size, float scale,
                   int threads, int bf16) {
    const int group = num_heads / num_kv_heads;
    int parts = (threads + num_seqs - 1) / num_seqs;
    const int per_item = MAX_ROWS / group; /* KV heads whose query rows fit one item */
    const int needed = (num_kv_heads + per_item - 1) / per_item;
    parts = parts < needed ? needed : parts;
    parts = parts > num_kv_heads ? num_kv_heads : parts;
    const int items = num_seqs * parts;
    threads = threads < items ? threads : items;
    PARALLEL_FOR(item, items, threads > 1,
                 decode_item(item, parts, q, s_qt, s_qh, k_cache, v_cache, s_cb, s_ct, s_ch,
                             rows, block_tables, s_bt, seq_lens, out, s_ot, s_oh, group,
                             num_kv_heads, dim, block_size, scale, bf16));
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
    return which == 0 ? MAX_ROWS : which == 1 ? MAX_HEAD_DIM : MAX_BLOCK;
}
