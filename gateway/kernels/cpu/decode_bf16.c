/* Paged decode attention for bf16 on AVX512-BF16 (vdpbf16ps), called through ctypes (see
 * cpu_ops.py). A task is (sequence, kv head) with its G query heads; vector lanes run over KEYS:
 * each chunk of 16 key positions (gathered by position from the paged cache, any block size)
 * is transposed once into HD/2 vectors of bf16 pairs, Kt[j] lane i = (k[i][2j], k[i][2j+1]),
 * so a head's 16 scores are HD/2 vdpbf16ps with q pairs broadcast: no horizontal reduction per
 * key. Online softmax in fp32 per tile of 64 keys; p.v in fp32 FMAs, V rows widened to fp32 as even/odd
 * head dims (one shift or mask per 16 dims), so the accumulators hold dims de-interleaved and
 * are packed back into bf16 pairs (round to nearest even) once per task.
 * Returns 0, or -1 (no AVX512-BF16, head dim not 64/128, group > 8: the caller falls back). */
#include "common.h"

#ifdef __AVX512BF16__

#define DEC_TILE 64      /* keys per online-softmax step, scored 16 at a time */
#define DEC_MAX_GROUP 8

struct dec_args {
    const uint16_t *q, *k_cache, *v_cache;
    uint16_t *out;
    const int32_t *block_tables, *seq_lens;
    int64_t q_stride, max_blocks, num_heads, num_kv_heads, block_size;
    float scale;
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

static inline __attribute__((always_inline)) void decode_task(const struct dec_args *a, int64_t s, int64_t kvh,
                                                              const int G, const int HD) {
    const int64_t L = a->seq_lens[s];
    const int HB = HD / 32;                               /* 32-dim blocks: even/odd vectors each */
    const float c = a->scale * 1.44269504f;
    const int NCH = G == 1 ? 4 : (G < 4 ? 2 : 1);         /* independent score chains per head */
    uint32_t qw[DEC_MAX_GROUP][64];                       /* q as bf16 pairs */
    __m512 acc[DEC_MAX_GROUP][8];                          /* [g][2 * block + odd] */
    float m[DEC_MAX_GROUP], l[DEC_MAX_GROUP];
    __m512 p[DEC_MAX_GROUP][DEC_TILE / 16];                /* scores, then probabilities */
    __m512i kt[64];
    const uint16_t *rows[DEC_TILE];
    int64_t offs[DEC_TILE];
    for (int g = 0; g < G; g++) {
        memcpy(qw[g], a->q + s * a->q_stride + (kvh * G + g) * HD, HD * 2);
        for (int v = 0; v < 2 * HB; v++) acc[g][v] = _mm512_setzero_ps();
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    const int32_t *table = a->block_tables + s * a->max_blocks;
    const int64_t row_stride = a->num_kv_heads * HD;
    int64_t block = 0, within = 0;
    for (int64_t t0 = 0; t0 < L; t0 += DEC_TILE) {
        const int n = L - t0 < DEC_TILE ? (int)(L - t0) : DEC_TILE;
        const int nsub = (n + 15) / 16;
        for (int i = 0; i < n; i++) {
            offs[i] = ((int64_t)table[block] * a->block_size + within) * row_stride + kvh * HD;
            rows[i] = a->k_cache + offs[i];
            if (++within == a->block_size) { within = 0; block++; }
        }
        for (int i = n; i < nsub * 16; i++) rows[i] = rows[0];     /* finite data, masked below */
        {   /* prefetch the next tile's K and V rows */
            int64_t pb = block, pw = within;
            const int pn = L - t0 - n < DEC_TILE ? (int)(L - t0 - n) : DEC_TILE;
            for (int i = 0; i < pn; i++) {
                const int64_t o = ((int64_t)table[pb] * a->block_size + pw) * row_stride + kvh * HD;
                for (int bb = 0; bb < HD * 2; bb += 64) {
                    __builtin_prefetch((const char *)(a->k_cache + o) + bb);
                    __builtin_prefetch((const char *)(a->v_cache + o) + bb);
                }
                if (++pw == a->block_size) { pw = 0; pb++; }
            }
        }
        /* scores, 16 keys at a time */
        for (int cidx = 0; cidx < nsub; cidx++) {
            for (int b = 0; b < HB; b++) {
                __m512i r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(rows[16 * cidx + i] + 32 * b);
                transpose16(r, kt + 16 * b);
            }
            __m512 sc[DEC_MAX_GROUP][4];
            for (int g = 0; g < G; g++)
                for (int h = 0; h < NCH; h++) sc[g][h] = _mm512_setzero_ps();
            for (int j = 0; j < HD / 2; j += NCH)
                for (int h = 0; h < NCH; h++)
                    for (int g = 0; g < G; g++)
                        sc[g][h] = _mm512_dpbf16_ps(sc[g][h], (__m512bh)kt[j + h], (__m512bh)_mm512_set1_epi32((int)qw[g][j + h]));
            const int nv = n - 16 * cidx;
            const __mmask16 valid = nv >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nv) - 1u);
            for (int g = 0; g < G; g++) {
                __m512 sg = sc[g][0];
                for (int h = 1; h < NCH; h++) sg = _mm512_add_ps(sg, sc[g][h]);
                p[g][cidx] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, sg);
            }
        }
        /* online softmax over the tile */
        __m512 corr[DEC_MAX_GROUP];
        for (int g = 0; g < G; g++) {
            __m512 vm = p[g][0];
            for (int cidx = 1; cidx < nsub; cidx++) vm = _mm512_max_ps(vm, p[g][cidx]);
            const float cmax = _mm512_reduce_max_ps(vm);
            const float mx = cmax > m[g] ? cmax : m[g];
            const __m512 mxc = _mm512_set1_ps(mx * c), cc = _mm512_set1_ps(c);
            __m512 sum = _mm512_setzero_ps();
            for (int cidx = 0; cidx < nsub; cidx++) {
                const vf16 pv = vexp2_nonpos((vf16)_mm512_fmsub_ps(p[g][cidx], cc, mxc));
                p[g][cidx] = (__m512)pv;
                sum = _mm512_add_ps(sum, (__m512)pv);
            }
            const vf16 cv = vexp2_nonpos((vf16){} + (m[g] - mx) * c);   /* 0 on the first tile */
            l[g] = l[g] * cv[0] + _mm512_reduce_add_ps(sum);
            m[g] = mx;
            corr[g] = (__m512)cv;
        }
        /* p.v: head blocks of <= 4, 64-dim groups (4 accumulators per head) */
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int ng = G - g0 < 4 ? G - g0 : 4;
            for (int dg = 0; dg < HB; dg += 2) {
                __m512 ac[4][4];
                for (int gi = 0; gi < ng; gi++)
                    for (int v = 0; v < 4; v++) ac[gi][v] = _mm512_mul_ps(acc[g0 + gi][2 * dg + v], corr[g0 + gi]);
                for (int t = 0; t < n; t++) {
                    const uint16_t *vr = a->v_cache + offs[t] + 32 * dg;
                    const __m512i w0 = _mm512_loadu_si512(vr), w1 = _mm512_loadu_si512(vr + 32);
                    const __m512 vv[4] = {
                        (__m512)_mm512_slli_epi32(w0, 16), (__m512)_mm512_and_si512(w0, _mm512_set1_epi32((int)0xffff0000u)),
                        (__m512)_mm512_slli_epi32(w1, 16), (__m512)_mm512_and_si512(w1, _mm512_set1_epi32((int)0xffff0000u))};
                    for (int gi = 0; gi < ng; gi++) {
                        const __m512 pb = _mm512_set1_ps(((const float *)p[g0 + gi])[t]);
                        for (int v = 0; v < 4; v++) ac[gi][v] = _mm512_fmadd_ps(pb, vv[v], ac[gi][v]);
                    }
                }
                for (int gi = 0; gi < ng; gi++)
                    for (int v = 0; v < 4; v++) acc[g0 + gi][2 * dg + v] = ac[gi][v];
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        uint16_t *o = a->out + (s * a->num_heads + kvh * G + g) * HD;
        for (int b = 0; b < HB; b++) {
            const vf16 e = (vf16)acc[g][2 * b] * inv, od = (vf16)acc[g][2 * b + 1] * inv;
            const vu16 lo = (vu16)e, hi = (vu16)od;
            const vu16 w = ((lo + 0x7fffu + ((lo >> 16) & 1u)) >> 16) | ((hi + 0x7fffu + ((hi >> 16) & 1u)) & 0xffff0000u);
            _mm512_storeu_si512(o + 32 * b, (__m512i)w);
        }
    }
}

#define DEC_TASK(G, HD) static void decode_task_##G##_##HD(const struct dec_args *a, int64_t s, int64_t kvh) { decode_task(a, s, kvh, G, HD); }
#define DEC_TASKS(HD) DEC_TASK(1, HD) DEC_TASK(2, HD) DEC_TASK(3, HD) DEC_TASK(4, HD) DEC_TASK(5, HD) DEC_TASK(6, HD) DEC_TASK(7, HD) DEC_TASK(8, HD)
DEC_TASKS(64)
DEC_TASKS(128)
typedef void (*dec_task_fn)(const struct dec_args *, int64_t, int64_t);
static const dec_task_fn dec_tasks[2][8] = {
    {decode_task_1_64, decode_task_2_64, decode_task_3_64, decode_task_4_64, decode_task_5_64, decode_task_6_64,
     decode_task_7_64, decode_task_8_64},
    {decode_task_1_128, decode_task_2_128, decode_task_3_128, decode_task_4_128, decode_task_5_128, decode_task_6_128,
     decode_task_7_128, decode_task_8_128}};

/* Decodes: sequences [0, num_seqs), one query token each (flat-batch row s), context
 * seq_lens[s] tokens already in the paged cache [num_blocks, block_size, num_kv_heads, head_dim]
 * (bf16 as uint16); q rows q_stride elements apart, out [num_seqs, num_heads, head_dim]. */
int paged_decode_attention_bf16(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, void *out,
                                int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t block_size, float scale) {
    if ((head_dim != 64 && head_dim != 128) || num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (group < 1 || group > DEC_MAX_GROUP || block_size <= 0) return -1;
    const struct dec_args a = {q, k_cache, v_cache, out, block_tables, seq_lens, q_stride, max_blocks, num_heads,
                               num_kv_heads, block_size, scale};
    const dec_task_fn fn = dec_tasks[head_dim == 128][group - 1];
    const int64_t num_tasks = num_seqs * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; task++) fn(&a, task / num_kv_heads, task % num_kv_heads);
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
