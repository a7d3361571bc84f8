/* Paged decode attention for bf16 on AVX512-BF16 (vdpbf16ps), called through ctypes (see
 * cpu_ops.py). Vector lanes run over KEYS: each chunk of 16 key positions (gathered by position
 * from the paged cache, any block size) is transposed once per kv head into HD/2 vectors of bf16
 * pairs, Kt[j] lane i = (k[i][2j], k[i][2j+1]), so a head's 16 scores are HD/2 vdpbf16ps with q
 * pairs broadcast: no horizontal reduction per key. Online softmax in fp32 per tile of 64 keys;
 * p.v in fp32 FMAs, V rows widened to fp32 as even/odd head dims (one shift or mask per 16 dims),
 * so the accumulators hold dims de-interleaved and are packed back into bf16 pairs (round to
 * nearest even) once per task.
 *
 * Memory: in a decode step the cache was last read a whole model step ago, so it streams from
 * DRAM. A task is a sequence with all its kv heads (a run of them for wide models), so each
 * token row [num_kv_heads, head_dim] is read whole, once (a task per (sequence, kv head) read a
 * third of each row and streamed ~20% slower); only with fewer than DEC_SEQS_PER_THREAD
 * sequences per thread is a task one (sequence, kv head), for parallelism. Within a tile, the
 * scores run chunk by chunk (all the task's heads on each 16-key chunk), then p.v the same way,
 * so K and V are each consumed in row order, and two prefetch cursors (K, V) walk the
 * sequence's rows DEC_LEAD_LINES cache lines ahead of that consumption, into L2 (prefetcht1),
 * moving on as many rows as each step consumes. Measured cold (bench/decode_cold.py, Zen4):
 * every line must be prefetched (every other one: ~1.5x slower); prefetcht0 into L1 (~1.25x) or
 * the whole next tile at once (~1.35x) overflow the miss queues and lose prefetches.
 * Returns 0, or -1 (no AVX512-BF16, head dim not 64/128, group > 8: the caller falls back). */
#include "common.h"
#include <omp.h>

#ifdef __AVX512BF16__

#define DEC_TILE 64          /* keys per online-softmax step, scored 16 at a time */
#define DEC_MAX_GROUP 8
#define DEC_TASK_HEADS 16    /* query heads per task at most (their state is on the stack) */
#define DEC_SEQS_PER_THREAD 4   /* fewer sequences per thread: a task per (sequence, kv head) */
#define DEC_LEAD_LINES 128   /* prefetch lead of each cursor, in 64-byte lines (96-192 measure alike) */
#define PREFETCH(p) __builtin_prefetch((p), 0, 2)       /* prefetcht1: into L2, whose miss queue is deeper */

struct dec_args {
    const uint16_t *q, *k_cache, *v_cache;
    uint16_t *out;
    const int32_t *block_tables, *seq_lens;
    int64_t q_stride, max_blocks, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
};

struct head_state {          /* one query head's q, running max and sum, and output accumulators */
    __m512 acc[8];           /* [2 * 32-dim block + odd] */
    uint32_t qw[64];         /* q as bf16 pairs */
    float m, l;
};

struct dec_cursor {          /* prefetch position in one cache: a sequence's rows, the task's span of each */
    const char *base;        /* the cache, plus the bytes before the task's first kv head */
    const int32_t *table;
    const char *row_ptr;     /* the next row's span */
    int64_t row, end, block, within, block_size, row_bytes;
    int lines;               /* 64-byte lines per span */
};

/* 16x16 transpose of 32-bit words: rows r[0..16) in, columns c[0..16) out. */
static inline __attribute__((always_inline)) void transpose16(const __m512i *r, __m512i *c) {
    __m512i t[16], u[16], x[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {          /* u[4 i + c]: rows 4i..4i+3, column 4L + c in lane L */
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int h = 0; h < 2; h++)            /* row groups (0,1) and (2,3) */
        for (int cc = 0; cc < 4; cc++) {
            x[8 * h + cc] = _mm512_shuffle_i32x4(u[8 * h + cc], u[8 * h + 4 + cc], 0x88);     /* cols c, 8+c */
            x[8 * h + 4 + cc] = _mm512_shuffle_i32x4(u[8 * h + cc], u[8 * h + 4 + cc], 0xdd); /* cols 4+c, 12+c */
        }
    for (int cc = 0; cc < 4; cc++) {
        c[cc] = _mm512_shuffle_i32x4(x[cc], x[8 + cc], 0x88);
        c[8 + cc] = _mm512_shuffle_i32x4(x[cc], x[8 + cc], 0xdd);
        c[4 + cc] = _mm512_shuffle_i32x4(x[4 + cc], x[12 + cc], 0x88);
        c[12 + cc] = _mm512_shuffle_i32x4(x[4 + cc], x[12 + cc], 0xdd);
    }
}

static inline void cursor_seek(struct dec_cursor *c, int64_t block) {   /* to the start of a block */
    c->row_ptr = c->base + (int64_t)c->table[block] * c->block_size * c->row_bytes;
}

static inline struct dec_cursor cursor_init(const struct dec_args *a, const uint16_t *cache, int64_t s, int64_t kv0,
                                            int nkv) {
    struct dec_cursor c = {.base = (const char *)(cache + kv0 * a->head_dim),
                           .table = a->block_tables + s * a->max_blocks, .end = a->seq_lens[s],
                           .block_size = a->block_size, .row_bytes = a->num_kv_heads * a->head_dim * 2,
                           .lines = (int)((nkv * a->head_dim * 2 + 63) / 64)};
    if (c.end > 0) cursor_seek(&c, 0);
    return c;
}

/* Prefetches the span of the cursor's next n rows (fewer at the sequence's end). */
static inline __attribute__((always_inline)) void cursor_rows(struct dec_cursor *c, int n) {
    for (int r = 0; r < n && c->row < c->end; r++) {
        for (int l = 0; l < c->lines; l++) PREFETCH(c->row_ptr + 64 * l);
        c->row_ptr += c->row_bytes;
        if (++c->within == c->block_size) {
            c->within = 0;
            if (++c->row < c->end) cursor_seek(c, ++c->block);
        } else {
            c->row++;
        }
    }
}

/* Row offsets (elements, at kv head 0) of the next n keys of a sequence; advances (block, within). */
static inline void tile_rows(const struct dec_args *a, const int32_t *table, int64_t *block, int64_t *within, int n,
                             int64_t *offs) {
    const int64_t row_stride = a->num_kv_heads * a->head_dim;
    for (int i = 0; i < n; i++) {
        offs[i] = ((int64_t)table[*block] * a->block_size + *within) * row_stride;
        if (++*within == a->block_size) { *within = 0; (*block)++; }
    }
}

/* One kv head's scores for a chunk of nv keys (rows at offs; the first 16), -inf past nv, into
 * sc_out[g * DEC_TILE / 16] (the chunk's column of p). */
static inline __attribute__((always_inline)) void chunk_scores(const struct dec_args *a, const int64_t *offs, int nv,
                                                               int64_t kvh, const struct head_state *st, __m512 *sc_out,
                                                               const int G, const int HD) {
    const int NCH = G == 1 ? 4 : (G < 4 ? 2 : 1);     /* independent score chains per head */
    __m512i kt[64];
    const uint16_t *rows[16];
    for (int i = 0; i < 16; i++) rows[i] = a->k_cache + offs[i < nv ? i : 0] + kvh * HD;   /* past nv: masked */
    for (int b = 0; b < HD / 32; b++) {
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(rows[i] + 32 * b);
        transpose16(r, kt + 16 * b);
    }
    __m512 sc[DEC_MAX_GROUP][4];
    for (int g = 0; g < G; g++)
        for (int h = 0; h < NCH; h++) sc[g][h] = _mm512_setzero_ps();
    for (int j = 0; j < HD / 2; j += NCH)
        for (int h = 0; h < NCH; h++)
            for (int g = 0; g < G; g++)
                sc[g][h] = _mm512_dpbf16_ps(sc[g][h], (__m512bh)kt[j + h], (__m512bh)_mm512_set1_epi32((int)st[g].qw[j + h]));
    const __mmask16 valid = nv >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nv) - 1u);
    for (int g = 0; g < G; g++) {
        __m512 sg = sc[g][0];
        for (int h = 1; h < NCH; h++) sg = _mm512_add_ps(sg, sc[g][h]);
        sc_out[g * (DEC_TILE / 16)] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, sg);
    }
}

/* Online softmax step: scores -> probabilities in place, running max and sum updated,
 * corr[g] = the factor that rescales the head's accumulators. */
static inline __attribute__((always_inline)) void tile_softmax(const struct dec_args *a, int nsub,
                                                               struct head_state *st, __m512 p[][DEC_TILE / 16],
                                                               __m512 *corr, const int G) {
    const float c = a->scale * 1.44269504f;
    for (int g = 0; g < G; g++) {
        __m512 vm = p[g][0];
        for (int cidx = 1; cidx < nsub; cidx++) vm = _mm512_max_ps(vm, p[g][cidx]);
        const float cmax = _mm512_reduce_max_ps(vm);
        const float mx = cmax > st[g].m ? cmax : st[g].m;
        const __m512 mxc = _mm512_set1_ps(mx * c), cc = _mm512_set1_ps(c);
        __m512 sum = _mm512_setzero_ps();
        for (int cidx = 0; cidx < nsub; cidx++) {
            const vf16 pv = vexp2_nonpos((vf16)_mm512_fmsub_ps(p[g][cidx], cc, mxc));
            p[g][cidx] = (__m512)pv;
            sum = _mm512_add_ps(sum, (__m512)pv);
        }
        const vf16 cv = vexp2_nonpos((vf16){} + (st[g].m - mx) * c);   /* 0 on the first tile */
        st[g].l = st[g].l * cv[0] + _mm512_reduce_add_ps(sum);
        st[g].m = mx;
        corr[g] = (__m512)cv;
    }
}

/* acc (times corr, where given) + p.v for one kv head over nv keys (rows at offs, probabilities
 * pc[g * DEC_TILE / 16] as floats 0..nv): head blocks of <= 4, 64-dim groups (4 accumulators
 * per head). */
static inline __attribute__((always_inline)) void chunk_pv(const struct dec_args *a, const int64_t *offs, int nv,
                                                           int64_t kvh, struct head_state *st, const __m512 *pc,
                                                           const __m512 *corr, const int G, const int HD) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int ng = G - g0 < 4 ? G - g0 : 4;
        for (int dg = 0; dg < HD / 32; dg += 2) {
            __m512 ac[4][4];
            for (int gi = 0; gi < ng; gi++)
                for (int v = 0; v < 4; v++)
                    ac[gi][v] = corr ? _mm512_mul_ps(st[g0 + gi].acc[2 * dg + v], corr[g0 + gi]) : st[g0 + gi].acc[2 * dg + v];
            for (int t = 0; t < nv; t++) {
                const uint16_t *vr = a->v_cache + offs[t] + kvh * HD + 32 * dg;
                const __m512i w0 = _mm512_loadu_si512(vr), w1 = _mm512_loadu_si512(vr + 32);
                const __m512 vv[4] = {
                    (__m512)_mm512_slli_epi32(w0, 16), (__m512)_mm512_and_si512(w0, _mm512_set1_epi32((int)0xffff0000u)),
                    (__m512)_mm512_slli_epi32(w1, 16), (__m512)_mm512_and_si512(w1, _mm512_set1_epi32((int)0xffff0000u))};
                for (int gi = 0; gi < ng; gi++) {
                    const __m512 pb = _mm512_set1_ps(((const float *)&pc[(g0 + gi) * (DEC_TILE / 16)])[t]);
                    for (int v = 0; v < 4; v++) ac[gi][v] = _mm512_fmadd_ps(pb, vv[v], ac[gi][v]);
                }
            }
            for (int gi = 0; gi < ng; gi++)
                for (int v = 0; v < 4; v++) st[g0 + gi].acc[2 * dg + v] = ac[gi][v];
        }
    }
}

/* Query heads' outputs: acc / l, packed back into bf16 pairs (round to nearest even). */
static inline void write_out(const struct dec_args *a, int64_t s, int64_t h, const struct head_state *st, int HD) {
    const float inv = st->l > 0.f ? 1.f / st->l : 0.f;
    uint16_t *o = a->out + (s * a->num_heads + h) * HD;
    for (int b = 0; b < HD / 32; b++) {
        const vi16 w = pack_bf16_pair((vf16)st->acc[2 * b] * inv, (vf16)st->acc[2 * b + 1] * inv);
        _mm512_storeu_si512(o + 32 * b, (__m512i)w);
    }
}

/* Sequence s, kv heads [kv0, kv0 + nkv): per tile of keys, the scores of every head chunk by
 * chunk, the softmax step, then p.v chunk by chunk, with the K and V cursors running ahead (each
 * head's call moves its cursor on by its share of the chunk's rows, so the lead stays put). */
static inline __attribute__((always_inline)) void decode_task(const struct dec_args *a, int64_t s, int64_t kv0,
                                                              int nkv, const int G, const int HD) {
    const int64_t L = a->seq_lens[s];
    struct head_state st[DEC_TASK_HEADS];
    for (int h = 0; h < nkv * G; h++) {
        memcpy(st[h].qw, a->q + s * a->q_stride + (kv0 * G + h) * HD, HD * 2);
        for (int v = 0; v < 2 * HD / 32; v++) st[h].acc[v] = _mm512_setzero_ps();
        st[h].m = -INFINITY;
        st[h].l = 0.f;
    }
    struct dec_cursor kc = cursor_init(a, a->k_cache, s, kv0, nkv), vc = cursor_init(a, a->v_cache, s, kv0, nkv);
    const int lead = (DEC_LEAD_LINES + kc.lines - 1) / kc.lines;       /* in rows */
    const int pv_keys = nkv == 1 ? DEC_TILE : 16;     /* one head: no need to go chunk by chunk */
    cursor_rows(&kc, lead);
    cursor_rows(&vc, lead);
    const int32_t *table = a->block_tables + s * a->max_blocks;
    int64_t offs[DEC_TILE], block = 0, within = 0;
    for (int64_t t0 = 0; t0 < L; t0 += DEC_TILE) {
        const int n = L - t0 < DEC_TILE ? (int)(L - t0) : DEC_TILE, nsub = (n + 15) / 16;
        tile_rows(a, table, &block, &within, n, offs);
        __m512 p[DEC_TASK_HEADS][DEC_TILE / 16], corr[DEC_TASK_HEADS];   /* scores, then probabilities */
        for (int c = 0; c < nsub; c++)
            for (int k = 0; k < nkv; k++) {
                cursor_rows(&kc, 16 * (k + 1) / nkv - 16 * k / nkv);
                chunk_scores(a, offs + 16 * c, n - 16 * c, kv0 + k, st + k * G, &p[k * G][c], G, HD);
            }
        for (int k = 0; k < nkv; k++) tile_softmax(a, nsub, st + k * G, p + k * G, corr + k * G, G);
        for (int t = 0; t < n; t += pv_keys) {
            const int nv = n - t < pv_keys ? n - t : pv_keys;
            for (int k = 0; k < nkv; k++) {
                cursor_rows(&vc, nv * (k + 1) / nkv - nv * k / nkv);
                chunk_pv(a, offs + t, nv, kv0 + k, st + k * G, &p[k * G][t / 16], t ? NULL : corr + k * G, G, HD);
            }
        }
    }
    for (int h = 0; h < nkv * G; h++) write_out(a, s, kv0 * G + h, st + h, HD);
}

#define DEC_TASK(G, HD) \
    static void decode_task_##G##_##HD(const struct dec_args *a, int64_t s, int64_t kv0, int nkv) { decode_task(a, s, kv0, nkv, G, HD); }
#define DEC_TASKS(HD) DEC_TASK(1, HD) DEC_TASK(2, HD) DEC_TASK(3, HD) DEC_TASK(4, HD) DEC_TASK(5, HD) DEC_TASK(6, HD) DEC_TASK(7, HD) DEC_TASK(8, HD)
DEC_TASKS(64)
DEC_TASKS(128)
typedef void (*dec_task_fn)(const struct dec_args *, int64_t, int64_t, int);
static const dec_task_fn dec_tasks[2][8] = {
    {decode_task_1_64, decode_task_2_64, decode_task_3_64, decode_task_4_64, decode_task_5_64, decode_task_6_64,
     decode_task_7_64, decode_task_8_64},
    {decode_task_1_128, decode_task_2_128, decode_task_3_128, decode_task_4_128, decode_task_5_128, decode_task_6_128,
     decode_task_7_128, decode_task_8_128}};

/* Decodes: sequences [0, num_seqs), one query token each (flat-batch row s), context
 * seq_lens[s] tokens already in the paged cache [num_blocks, block_size, num_kv_heads, head_dim]
 * (bf16 as uint16); q rows q_stride elements apart, out [num_seqs, num_heads, head_dim].
 * A task is a sequence and a run of kv heads: all of them (up to DEC_TASK_HEADS query heads)
 * when there are enough sequences to keep the threads busy, else one. */
int paged_decode_attention_bf16(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, void *out,
                                int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t block_size, float scale) {
    if ((head_dim != 64 && head_dim != 128) || num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (group < 1 || group > DEC_MAX_GROUP || block_size <= 0) return -1;
    const struct dec_args a = {q, k_cache, v_cache, out, block_tables, seq_lens, q_stride, max_blocks, num_heads,
                               num_kv_heads, head_dim, block_size, scale};
    const dec_task_fn fn = dec_tasks[head_dim == 128][group - 1];
    int64_t per_task = DEC_TASK_HEADS / group < num_kv_heads ? DEC_TASK_HEADS / group : num_kv_heads;
    if (num_seqs < DEC_SEQS_PER_THREAD * omp_get_max_threads()) per_task = 1;
    const int64_t runs = (num_kv_heads + per_task - 1) / per_task, num_tasks = num_seqs * runs;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; task++) {
        const int64_t kv0 = task % runs * per_task;
        fn(&a, task / runs, kv0, (int)(kv0 + per_task < num_kv_heads ? per_task : num_kv_heads - kv0));
    }
    return 0;
}

#else

int paged_decode_attention_bf16(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, void *out,
                                int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t block_size, float scale) {
    (void)q; (void)q_stride; (void)k_cache; (void)v_cache; (void)block_tables; (void)max_blocks; (void)seq_lens;
    (void)out; (void)num_seqs; (void)num_heads; (void)num_kv_heads; (void)head_dim; (void)block_size; (void)scale;
    return -1;
}

#endif
