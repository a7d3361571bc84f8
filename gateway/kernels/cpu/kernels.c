/* CPU kernels for gateway's hot path, called through ctypes (see cpu_ops.py).
 *
 * Why C: on CPU the torch composition of these ops costs many small kernel launches per
 * layer, and paged attention in torch must first gather every sequence's pages into a
 * contiguous copy (and prefill runs per sequence). These loops read the paged cache in place.
 * Data: fp32 (dtype 0) or bf16 stored as uint16 (dtype 1); math and accumulation are fp32,
 * except that bf16 attention on AVX512-BF16 multiplies bf16 pairs (prefill_attention.c, decode_bf16.c).
 * Threads: OpenMP, linked against the libgomp torch already loaded (same pool, no
 * oversubscription). */
#include "common.h"

/* One (sequence, kv head) of decode attention; HD is a compile-time head dim so the
 * per-token dot products unroll fully. Online softmax with one rescale per block. */
#define DEFINE_DECODE_TASK(HD)                                                                     \
static void decode_task_##HD(const void *q, int64_t q_off, const void *k_cache, const void *v_cache, \
                             const int32_t *table, int64_t len, void *out, int64_t out_off,         \
                             int64_t group, int64_t token_stride, int64_t kv_off,                   \
                             int64_t block_size, float scale, int dtype) {                          \
    float qf[MAX_GROUP][HD], acc[MAX_GROUP][HD], row_max[MAX_GROUP], row_sum[MAX_GROUP];            \
    float kf[MAX_BLOCK][HD], scores[MAX_GROUP][MAX_BLOCK];                                          \
    for (int64_t g = 0; g < group; g++) {                                                           \
        load_row(q, q_off + g * HD, dtype, HD, qf[g]);                                              \
        for (int64_t d = 0; d < HD; d++) { qf[g][d] *= scale; acc[g][d] = 0.f; }                    \
        row_max[g] = -INFINITY;                                                                     \
        row_sum[g] = 0.f;                                                                           \
    }                                                                                               \
    for (int64_t start = 0; start < len; start += block_size) {                                     \
        const int64_t n = len - start < block_size ? len - start : block_size;                      \
        const int64_t base = (int64_t)table[start / block_size] * block_size * token_stride + kv_off; \
        for (int64_t t = 0; t < n; t++) load_row(k_cache, base + t * token_stride, dtype, HD, kf[t]); \
        for (int64_t g = 0; g < group; g++) {                                                       \
            float block_max = row_max[g];                                                           \
            for (int64_t t = 0; t < n; t++) {                                                       \
                float dot = 0.f;                                                                    \
                _Pragma("omp simd reduction(+ : dot)")                                              \
                for (int64_t d = 0; d < HD; d++) dot += qf[g][d] * kf[t][d];                        \
                scores[g][t] = dot;                                                                 \
                block_max = dot > block_max ? dot : block_max;                                      \
            }                                                                                       \
            const float correction = fast_exp(row_max[g] - block_max);                              \
            float block_sum = 0.f;                                                                  \
            _Pragma("omp simd reduction(+ : block_sum)")                                            \
            for (int64_t t = 0; t < n; t++) {                                                       \
                scores[g][t] = fast_exp(scores[g][t] - block_max);                                  \
                block_sum += scores[g][t];                                                          \
            }                                                                                       \
            row_sum[g] = row_sum[g] * correction + block_sum;                                       \
            for (int64_t d = 0; d < HD; d++) acc[g][d] *= correction;                               \
            row_max[g] = block_max;                                                                 \
        }                                                                                           \
        for (int64_t t = 0; t < n; t++) {          /* kf now holds this block's values */           \
            load_row(v_cache, base + t * token_stride, dtype, HD, kf[t]);                           \
            for (int64_t g = 0; g < group; g++) {                                                   \
                const float p = scores[g][t];                                                       \
                for (int64_t d = 0; d < HD; d++) acc[g][d] += p * kf[t][d];                         \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int64_t g = 0; g < group; g++) {                                                           \
        const float inv = row_sum[g] > 0.f ? 1.f / row_sum[g] : 0.f;                                \
        for (int64_t d = 0; d < HD; d++) acc[g][d] *= inv;                                          \
        store_row(out, out_off + g * HD, dtype, HD, acc[g]);                                        \
    }                                                                                               \
}

DEFINE_DECODE_TASK(64)
DEFINE_DECODE_TASK(128)
DEFINE_DECODE_TASK(256)

/* One query token per sequence attends to its whole paged context.
 * q: token s at q + s*q_stride, head h at +h*head_dim. caches: [blocks, block_size, kv_heads, head_dim].
 * out: [num_seqs, num_heads, head_dim] contiguous. head_dim must be 64, 128 or 256. */
int paged_decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                           const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                           void *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, float scale, int dtype) {
    if (head_dim != 64 && head_dim != 128 && head_dim != 256) return -1;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; s++) {
        for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
            const int64_t q_off = s * q_stride + kvh * group * head_dim;
            const int64_t out_off = (s * num_heads + kvh * group) * head_dim;
            const int32_t *table = block_tables + s * max_blocks;
            const int64_t kv_off = kvh * head_dim;
            if (head_dim == 64)
                decode_task_64(q, q_off, k_cache, v_cache, table, seq_lens[s], out, out_off, group,
                               token_stride, kv_off, block_size, scale, dtype);
            else if (head_dim == 128)
                decode_task_128(q, q_off, k_cache, v_cache, table, seq_lens[s], out, out_off, group,
                                token_stride, kv_off, block_size, scale, dtype);
            else
                decode_task_256(q, q_off, k_cache, v_cache, table, seq_lens[s], out, out_off, group,
                                token_stride, kv_off, block_size, scale, dtype);
        }
    }
    return 0;
}

/* residual (if given) += x, in place; out = rms_norm(residual or x) * weight. Rows contiguous. */
void add_rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t rows,
                  int64_t hidden, float eps, int dtype) {
#pragma omp parallel for schedule(static) if (rows * hidden > 1048576)
    for (int64_t r = 0; r < rows; r++) {
        float buf[8192], w[8192];
        load_row(x, r * hidden, dtype, hidden, buf);
        if (residual) {
            float res[8192];
            load_row(residual, r * hidden, dtype, hidden, res);
            for (int64_t i = 0; i < hidden; i++) buf[i] += res[i];
            store_row(residual, r * hidden, dtype, hidden, buf);
            load_row(residual, r * hidden, dtype, hidden, buf);   /* normalize the rounded sum */
        }
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < hidden; i++) sq += buf[i] * buf[i];
        const float inv = 1.f / sqrtf(sq / (float)hidden + eps);
        load_row(weight, 0, dtype, hidden, w);
        for (int64_t i = 0; i < hidden; i++) buf[i] = buf[i] * inv * w[i];
        store_row(out, r * hidden, dtype, hidden, buf);
    }
}

/* Neox rotary in place on `heads` heads of each token (q and k may be one strided view).
 * cos_sin: fp32 [max_position, head_dim] = [cos | sin]. */
void rotary_inplace(void *x, int64_t token_stride, int64_t tokens, int64_t heads, int64_t head_dim,
                    const int64_t *positions, const float *cos_sin, int dtype) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens * heads > 8192)
    for (int64_t t = 0; t < tokens; t++) {
        const float *cos = cos_sin + positions[t] * head_dim, *sin = cos + half;
        float v[MAX_HEAD_DIM], o[MAX_HEAD_DIM];
        for (int64_t h = 0; h < heads; h++) {
            const int64_t off = t * token_stride + h * head_dim;
            load_row(x, off, dtype, head_dim, v);
            for (int64_t i = 0; i < half; i++) {
                o[i] = v[i] * cos[i] - v[i + half] * sin[i];
                o[i + half] = v[i + half] * cos[i] + v[i] * sin[i];
            }
            store_row(x, off, dtype, head_dim, o);
        }
    }
}

/* out[t, :] = silu(x[t, :inter]) * x[t, inter:]. Written with vector operations, 16 at a time
 * (GCC does not vectorize the scalar fast_exp loop here): sigmoid from e = exp(-|g|) <= 1,
 * 1 / (1 + e) or e / (1 + e), so the exponential never overflows. */
void silu_and_mul(const void *x, void *out, int64_t tokens, int64_t inter, int dtype) {
#pragma omp parallel for schedule(static) if (tokens * inter > 1048576)
    for (int64_t t = 0; t < tokens; t++) {
        float g[16384], u[16384];
        load_row(x, t * 2 * inter, dtype, inter, g);
        load_row(x, t * 2 * inter + inter, dtype, inter, u);
        int64_t i = 0;
        for (; i + LANES <= inter; i += LANES) {
            vf16 gv, uv;
            memcpy(&gv, g + i, sizeof(gv));
            memcpy(&uv, u + i, sizeof(uv));
            const vf16 e = vexp2_nonpos(vselect(gv < 0.f, gv, -gv) * 1.44269504f);
            gv = gv * vselect(gv < 0.f, e, (vf16){} + 1.f) / (1.f + e) * uv;
            memcpy(g + i, &gv, sizeof(gv));
        }
        for (; i < inter; i++) g[i] = g[i] / (1.f + fast_exp(-g[i])) * u[i];
        store_row(out, t * inter, dtype, inter, g);
    }
}

/* Copy each token's K and V rows [kv_heads * head_dim] into its cache slot; slots < 0 are
 * padding and skipped. key/value rows are token_stride apart (views into the qkv output). */
void store_kv(const void *key, const void *value, int64_t token_stride, void *k_cache, void *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_elems, int64_t elem_size) {
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        memcpy((char *)k_cache + slot * row_elems * elem_size, (const char *)key + t * token_stride * elem_size,
               row_elems * elem_size);
        memcpy((char *)v_cache + slot * row_elems * elem_size, (const char *)value + t * token_stride * elem_size,
               row_elems * elem_size);
    }
}
