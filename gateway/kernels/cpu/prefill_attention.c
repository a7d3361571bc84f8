/* Paged causal prefill attention, called through ctypes (see cpu_ops.py); the decode kernels
 * are in kernels.c (fp32) and decode_bf16.c, the elementwise kernels in kernels.c, shared
 * helpers in common.h. */
#include "common.h"

/* ---- Paged causal prefill attention ------------------------------------------------------
 * A task is (sequence, kv head, tile of up to LANES consecutive query tokens). Everything is
 * vectorized over the task's rows (token, query head of the kv head): a full tile is G vectors,
 * lane i of vector g = token i, head g; shorter tiles and decodes pack the rows densely (see
 * row_q). Q is transposed once per task into qT[v][d] (a vector of LANES rows), so a score
 * vector is s[v][t] = sum_d qT[v][d] * k[t][d], FMAs with k[t][d] broadcast: no horizontal
 * reduction per (row, key), and the softmax is vertical too (max and sum over keys are
 * elementwise over vectors). The output accumulates transposed the same way,
 * accT[v][d] += p[v][t] * v[t][d], and is transposed back once.
 * Keys are walked in tiles of KEY_TILE positions, gathered from the paged cache by position
 * (so any block size works), and only up to the tile's last causal position; online (flash)
 * softmax, accumulation always in fp32.
 * bf16 inputs, where the compiler targets AVX512-BF16, take the same path with vdpbf16ps
 * (two bf16 products per fp32 lane per instruction): q and k are used exactly as stored, and
 * the probabilities are rounded to bf16 for p.v, as torch's bf16 flash attention does. */
#define KEY_TILE 64
#define MICRO 8          /* accumulators per micro-kernel: keys (q.k) or head dims (p.v) */

struct prefill_args {              /* one call: pointers and shapes shared by every task */
    const void *q, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *seq_lens, *query_start;
    int64_t q_stride, max_blocks, num_heads, num_kv_heads, group, block_size;
    float scale;
    int dtype;
};

struct prefill_tile {              /* one task */
    const int32_t *table;          /* the sequence's block table */
    int64_t tok0, nq;              /* flat-batch tokens [tok0, tok0 + nq), nq <= LANES */
    int64_t first_pos;             /* context position of token tok0: it sees keys [0, first_pos] */
    int64_t kvh;
    int64_t nv;                    /* vectors of rows: ceil(group * nq / LANES) */
};

struct prefill_scratch {           /* per thread, 64-byte aligned; the bf16 path reuses qT, kf, vf */
    vf16 *qT, *accT, *s;           /* [nv][HD], [nv][HD], [KEY_TILE] (nv <= G) */
    float *kf, *vf;                /* [KEY_TILE][HD] fp32 rows */
    vf16 *m, *l;                   /* [nv]: running max and sum per row */
    vi16 *limit;                   /* [nv]: each row's last visible key position */
    vi16 *pp;                      /* [KEY_TILE / 2]: bf16 probability pairs */
};

/* Rows of a task: row r = g * nq + i is query head kvh * G + g of token tok0 + i, held in lane
 * r % LANES of vector r / LANES. A full prefill tile is G vectors of the 16 tokens of one head;
 * a decode (nq = 1) is one vector holding the G heads. */
static inline const void *row_q(const struct prefill_args *a, const struct prefill_tile *t, int64_t r,
                                const int64_t HD) {
    const int64_t g = r / t->nq, i = r % t->nq;
    return (const char *)a->q + ((t->tok0 + i) * a->q_stride + (t->kvh * a->group + g) * HD) * (a->dtype ? 2 : 4);
}

/* Cache offsets (elements) of the rows of key positions [kt0, kt0 + n) for the tile's kv head,
 * walking the block table without a division per key. */
static inline void kv_offsets(const struct prefill_args *a, const struct prefill_tile *t, int64_t kt0, int64_t n,
                              int64_t *off, const int64_t HD) {
    int64_t block = kt0 / a->block_size, within = kt0 % a->block_size;
    for (int64_t k = 0; k < n; k++) {
        off[k] = (((int64_t)t->table[block] * a->block_size + within) * a->num_kv_heads + t->kvh) * HD;
        if (++within == a->block_size) { within = 0; block++; }
    }
}

/* Prefetch the K and V rows of key positions [kt0, end) (at most a tile) into cache while the
 * current tile computes: each row is a separate HD-element piece of a scattered page. */
static inline void prefetch_tile(const struct prefill_args *a, const struct prefill_tile *t, int64_t kt0,
                                 int64_t end, const int64_t HD) {
    int64_t off[KEY_TILE];
    const int64_t n = end - kt0 < KEY_TILE ? end - kt0 : KEY_TILE, bytes = HD * (a->dtype ? 2 : 4);
    if (n <= 0) return;
    kv_offsets(a, t, kt0, n, off, HD);
    for (int64_t k = 0; k < n; k++) {
        const char *kr = (const char *)a->k_cache + off[k] * (a->dtype ? 2 : 4);
        const char *vr = (const char *)a->v_cache + off[k] * (a->dtype ? 2 : 4);
        for (int64_t b = 0; b < bytes; b += 64) {
            __builtin_prefetch(kr + b);
            __builtin_prefetch(vr + b);
        }
    }
}

/* Zero the accumulators and set each row's causal limit (padding lanes: first_pos, harmless). */
static inline void tile_begin(const struct prefill_args *a, const struct prefill_tile *t,
                              const struct prefill_scratch *w, const int64_t HD) {
    for (int64_t v = 0; v < t->nv; v++) {
        for (int i = 0; i < LANES; i++) {
            const int64_t r = v * LANES + i;
            w->limit[v][i] = (int32_t)(t->first_pos + (r < a->group * t->nq ? r % t->nq : 0));
        }
        for (int64_t d = 0; d < HD; d++) w->accT[v * HD + d] = (vf16){};
        w->m[v] = (vf16){} - INFINITY;
        w->l[v] = (vf16){};
    }
}

/* out[token][head][d] = accT[v][d][lane] / l[v][lane]: the one transpose back per task. */
static inline void tile_end(const struct prefill_args *a, const struct prefill_tile *t,
                            const struct prefill_scratch *w, const int64_t HD) {
    float row[MAX_HEAD_DIM];
    for (int64_t r = 0; r < a->group * t->nq; r++) {
        const int64_t v = r / LANES, lane = r % LANES, g = r / t->nq, i = r % t->nq;
        const float sum = w->l[v][lane];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t d = 0; d < HD; d++) row[d] = w->accT[v * HD + d][lane] * inv;
        store_row(a->out, ((t->tok0 + i) * a->num_heads + t->kvh * a->group + g) * HD, a->dtype, HD, row);
    }
}

/* Online-softmax step for one head over n raw score vectors s[t] (lane = query token, key at
 * position kt0 + t): mask keys past each lane's causal limit, take the new running max, and
 * turn scores into probabilities exp(scale * (s - max)), written back to s, or, when pp is
 * given, packed into bf16 pairs pp[t / 2] (a zero probability after an odd n). Updates the
 * running sum and returns the factor that rescales the old accumulators (0 on the first tile,
 * where m = -inf). */
static inline __attribute__((always_inline)) vf16 softmax_tile(vf16 *s, int64_t n, int64_t kt0, vi16 limit,
                                                               int masked, float scale, vf16 *m, vf16 *l,
                                                               vi16 *pp) {
    const float c = scale * 1.44269504f;              /* exp(x) = 2^(x log2 e) */
    vf16 part[4] = {*m, *m, *m, *m}, sum = (vf16){};   /* 4 independent max chains */
    for (int64_t t = 0; t < n; t++) {
        if (masked) s[t] = vselect((vi16){} + (int32_t)(kt0 + t) <= limit, s[t], (vf16){} - INFINITY);
        part[t % 4] = vmax(part[t % 4], s[t]);
    }
    const vf16 mx = vmax(vmax(part[0], part[1]), vmax(part[2], part[3]));
    if (pp) {
        for (int64_t t = 0; t < n; t += 2) {
            const vf16 p0 = vexp2_nonpos((s[t] - mx) * c);
            const vf16 p1 = t + 1 < n ? vexp2_nonpos((s[t + 1] - mx) * c) : (vf16){};
            pp[t / 2] = pack_bf16_pair(p0, p1);
            sum += p0 + p1;
        }
    } else {
        for (int64_t t = 0; t < n; t++) {
            s[t] = vexp2_nonpos((s[t] - mx) * c);
            sum += s[t];
        }
    }
    const vf16 corr = vexp2_nonpos((*m - mx) * c);
    *l = *l * corr + sum;
    *m = mx;
    return corr;
}

/* fp32 q.k: s[t] = sum_d qT[d] * kf[t][d] for t < n rounded up to MICRO (kf rows past n are zero). */
static inline __attribute__((always_inline)) void qk_tile(const vf16 *qT, const float *kf, int64_t n,
                                                          vf16 *s, const int64_t HD) {
    for (int64_t t0 = 0; t0 < n; t0 += MICRO) {
        vf16 acc[MICRO];
        const float *k = kf + t0 * HD;
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) acc[j] = (vf16){};
        for (int64_t d = 0; d < HD; d++) {
            const vf16 qd = qT[d];
#pragma GCC unroll 8
            for (int j = 0; j < MICRO; j++) acc[j] += qd * k[j * HD + d];
        }
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) s[t0 + j] = acc[j];
    }
}

/* fp32 p.v: accT[d] = accT[d] * corr + sum_{t<n} p[t] * vf[t][d], MICRO head dims in registers. */
static inline __attribute__((always_inline)) void pv_tile(vf16 *accT, const vf16 *p, const float *vf,
                                                          int64_t n, vf16 corr, const int64_t HD) {
    for (int64_t d0 = 0; d0 < HD; d0 += MICRO) {
        vf16 acc[MICRO];
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) acc[j] = accT[d0 + j] * corr;
        for (int64_t t = 0; t < n; t++) {
            const vf16 pt = p[t];
            const float *v = vf + t * HD + d0;
#pragma GCC unroll 8
            for (int j = 0; j < MICRO; j++) acc[j] += pt * v[j];
        }
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) accT[d0 + j] = acc[j];
    }
}

/* One task, fp32 math on either dtype: q transposed to fp32 qT[g][d] once, each key tile's
 * K and V rows converted to fp32 kf/vf, then per head q.k, softmax, p.v. */
static inline __attribute__((always_inline)) void prefill_tile_f32(const struct prefill_args *a,
                                                                   const struct prefill_tile *t,
                                                                   const struct prefill_scratch *w,
                                                                   const int64_t HD) {
    float row[MAX_HEAD_DIM];
    prefetch_tile(a, t, 0, t->first_pos + t->nq, HD);
    prefetch_tile(a, t, KEY_TILE, t->first_pos + t->nq, HD);
    tile_begin(a, t, w, HD);
    for (int64_t r = 0; r < t->nv * LANES; r++) {
        if (r < a->group * t->nq)
            load_row(row_q(a, t, r, HD), 0, a->dtype, HD, row);
        else
            memset(row, 0, sizeof(row));
        for (int64_t d = 0; d < HD; d++) w->qT[r / LANES * HD + d][r % LANES] = row[d];
    }
    const int64_t end = t->first_pos + t->nq;            /* keys [0, end) are visible to some lane */
    for (int64_t kt0 = 0; kt0 < end; kt0 += KEY_TILE) {
        const int64_t n = end - kt0 < KEY_TILE ? end - kt0 : KEY_TILE;
        const int64_t n_pad = (n + MICRO - 1) / MICRO * MICRO;
        int64_t off[KEY_TILE];
        kv_offsets(a, t, kt0, n, off, HD);
        prefetch_tile(a, t, kt0 + 2 * KEY_TILE, end, HD);
        for (int64_t k = 0; k < n; k++) {
            load_row(a->k_cache, off[k], a->dtype, HD, w->kf + k * HD);
            load_row(a->v_cache, off[k], a->dtype, HD, w->vf + k * HD);
        }
        memset(w->kf + n * HD, 0, (n_pad - n) * HD * sizeof(float));
        const int masked = kt0 + n - 1 > t->first_pos;   /* the tile reaches past lane 0's limit */
        for (int64_t v = 0; v < t->nv; v++) {
            qk_tile(w->qT + v * HD, w->kf, n, w->s, HD);
            const vf16 corr = softmax_tile(w->s, n, kt0, w->limit[v], masked, a->scale, &w->m[v], &w->l[v], NULL);
            pv_tile(w->accT + v * HD, w->s, w->vf, n, corr, HD);
        }
    }
    tile_end(a, t, w, HD);
}

#ifdef __AVX512BF16__
#define HAVE_BF16_DOT 1

static inline __m512bh bcast_pair(const uint32_t *p) {   /* one bf16 pair to every lane */
    return (__m512bh)_mm512_set1_epi32((int)*p);
}

/* bf16 q.k: s[t] = sum over d pairs of qp[d2] . (k[t][2 d2], k[t][2 d2 + 1]), where lane i of
 * qp[d2] holds q[i][2 d2], q[i][2 d2 + 1]; kb rows [n rounded up to MICRO][HD], zero past n.
 * noinline (here and in pv_tile_bf16): inlined into the task, GCC 12 spills accumulators. */
static __attribute__((noinline)) void qk_tile_bf16(const vi16 *qp, const uint16_t *kb, int64_t n, vf16 *s,
                                                   const int64_t HD) {
    for (int64_t t0 = 0; t0 < n; t0 += MICRO) {
        __m512 acc[MICRO];
        const uint32_t *k = (const uint32_t *)(kb + t0 * HD);
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t d2 = 0; d2 < HD / 2; d2++) {
            const __m512bh qd = (__m512bh)qp[d2];
#pragma GCC unroll 8
            for (int j = 0; j < MICRO; j++) acc[j] = _mm512_dpbf16_ps(acc[j], qd, bcast_pair(k + j * HD / 2 + d2));
        }
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) s[t0 + j] = (vf16)acc[j];
    }
}

/* bf16 p.v: accT[d] = accT[d] * corr + sum_t2 pp[t2] . vp[t2][d], where vp[t2][d] holds
 * (v[2 t2][d], v[2 t2 + 1][d]); MICRO head dims in registers. */
static __attribute__((noinline)) void pv_tile_bf16(vf16 *accT, const vi16 *pp, const uint32_t *vp, int64_t n2,
                                                   vf16 corr, const int64_t HD) {
    for (int64_t d0 = 0; d0 < HD; d0 += MICRO) {
        __m512 acc[MICRO];
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) acc[j] = (__m512)(accT[d0 + j] * corr);
        for (int64_t t2 = 0; t2 < n2; t2++) {
            const __m512bh pt = (__m512bh)pp[t2];
#pragma GCC unroll 8
            for (int j = 0; j < MICRO; j++) acc[j] = _mm512_dpbf16_ps(acc[j], pt, bcast_pair(vp + t2 * HD + d0 + j));
        }
#pragma GCC unroll 8
        for (int j = 0; j < MICRO; j++) accT[d0 + j] = (vf16)acc[j];
    }
}

/* One task on bf16 data with vdpbf16ps: q pairs transposed once (qp[g][d2], 32-bit words of
 * the q rows), K rows copied as stored, V rows interleaved in pairs of keys. */
static inline __attribute__((always_inline)) void prefill_tile_bf16(const struct prefill_args *a,
                                                                    const struct prefill_tile *t,
                                                                    const struct prefill_scratch *w,
                                                                    const int64_t HD) {
    vi16 *qp = (vi16 *)w->qT;                             /* [G][HD / 2] */
    uint16_t *kb = (uint16_t *)w->kf;                     /* [KEY_TILE][HD] */
    uint32_t *vp = (uint32_t *)w->vf;                     /* [KEY_TILE / 2][HD] */
    static const uint16_t zeros[MAX_HEAD_DIM];
    prefetch_tile(a, t, 0, t->first_pos + t->nq, HD);
    prefetch_tile(a, t, KEY_TILE, t->first_pos + t->nq, HD);
    tile_begin(a, t, w, HD);
    for (int64_t r = 0; r < t->nv * LANES; r++) {
        const char *row = r < a->group * t->nq ? row_q(a, t, r, HD) : NULL;
        for (int64_t d2 = 0; d2 < HD / 2; d2++) {
            uint32_t word = 0;
            if (row) memcpy(&word, row + 4 * d2, sizeof(word));
            qp[r / LANES * HD / 2 + d2][r % LANES] = (int32_t)word;
        }
    }
    const int64_t end = t->first_pos + t->nq;
    for (int64_t kt0 = 0; kt0 < end; kt0 += KEY_TILE) {
        const int64_t n = end - kt0 < KEY_TILE ? end - kt0 : KEY_TILE;
        const int64_t n_pad = (n + MICRO - 1) / MICRO * MICRO, n2 = (n + 1) / 2;
        int64_t off[KEY_TILE];
        kv_offsets(a, t, kt0, n, off, HD);
        prefetch_tile(a, t, kt0 + 2 * KEY_TILE, end, HD);
        for (int64_t k = 0; k < n; k++)
            memcpy(kb + k * HD, (const uint16_t *)a->k_cache + off[k], HD * sizeof(uint16_t));
        memset(kb + n * HD, 0, (n_pad - n) * HD * sizeof(uint16_t));
        for (int64_t k2 = 0; k2 < n2; k2++) {
            const uint16_t *v0 = (const uint16_t *)a->v_cache + off[2 * k2];
            const uint16_t *v1 = 2 * k2 + 1 < n ? (const uint16_t *)a->v_cache + off[2 * k2 + 1] : zeros;
#pragma omp simd
            for (int64_t d = 0; d < HD; d++) vp[k2 * HD + d] = (uint32_t)v0[d] | ((uint32_t)v1[d] << 16);
        }
        const int masked = kt0 + n - 1 > t->first_pos;
        for (int64_t v = 0; v < t->nv; v++) {
            qk_tile_bf16(qp + v * HD / 2, kb, n, w->s, HD);
            const vf16 corr = softmax_tile(w->s, n, kt0, w->limit[v], masked, a->scale, &w->m[v], &w->l[v], w->pp);
            pv_tile_bf16(w->accT + v * HD, w->pp, vp, n2, corr, HD);
        }
    }
    tile_end(a, t, w, HD);
}
#else
#define HAVE_BF16_DOT 0
#endif

#if HAVE_BF16_DOT
#define PREFILL_BF16 prefill_tile_bf16
#else
#define PREFILL_BF16 prefill_tile_f32     /* not taken: bf16 data runs the fp32 path */
#endif

/* One task at a compile-time head dim (the micro-kernels unroll over it). */
#define DEFINE_PREFILL_TILE(HD)                                                                    \
static void prefill_tile_##HD(const struct prefill_args *a, const struct prefill_tile *t,           \
                              const struct prefill_scratch *w) {                                   \
    if (HAVE_BF16_DOT && a->dtype == 1) PREFILL_BF16(a, t, w, HD);                                \
    else prefill_tile_f32(a, t, w, HD);                                                            \
}
DEFINE_PREFILL_TILE(64)
DEFINE_PREFILL_TILE(128)
DEFINE_PREFILL_TILE(256)

/* 1 where bf16 attention uses vdpbf16ps: then decodes are cheaper as 1-token chunks of
 * paged_prefill_attention (one vector holds a kv head's G query heads) than in
 * paged_decode_attention. */
int prefill_bf16_dot(void) { return HAVE_BF16_DOT; }

/* Causal attention for the chunks of sequences [first_seq, num_seqs) of a flat batch (prefill
 * chunks, and decodes as 1-token chunks).
 * Sequence s owns query rows [query_start[s], query_start[s+1]), the last rows of a context of
 * seq_lens[s] tokens already in the paged cache; row i of the chunk sees keys
 * [0, seq_lens[s] - query_len + i]. q, caches and tables as paged_decode_attention;
 * out [T, H, head_dim] contiguous. Tasks (sequence, LANES-row tile, kv head) are handed out
 * dynamically, last tiles (longest contexts) first. Returns 0, or -1 (head dim not 64/128/256,
 * or out of memory: out is then incomplete). */
int paged_prefill_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                            const int32_t *query_start, void *out, int64_t first_seq, int64_t num_seqs,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            float scale, int dtype) {
    if (head_dim != 64 && head_dim != 128 && head_dim != 256) return -1;
    if (num_seqs <= first_seq) return 0;
    const struct prefill_args a = {q, k_cache, v_cache, out, block_tables, seq_lens, query_start, q_stride,
                                   max_blocks, num_heads, num_kv_heads, num_heads / num_kv_heads, block_size,
                                   scale, dtype};
    const int64_t nseq = num_seqs - first_seq;
    int64_t *task_start = malloc((nseq + 1) * sizeof(int64_t));
    if (!task_start) return -1;
    task_start[0] = 0;
    for (int64_t s = 0; s < nseq; s++) {
        const int64_t rows = query_start[first_seq + s + 1] - query_start[first_seq + s];
        task_start[s + 1] = task_start[s] + (rows + LANES - 1) / LANES * num_kv_heads;
    }
    const int64_t num_tasks = task_start[nseq];
    int failed = 0;
#pragma omp parallel
    {
        struct prefill_scratch w;
        const size_t vec = sizeof(vf16), rows = (size_t)KEY_TILE * head_dim * sizeof(float);
        const size_t sizes[] = {a.group * head_dim * vec, a.group * head_dim * vec, KEY_TILE * vec, rows, rows,
                                a.group * vec, a.group * vec, a.group * vec, KEY_TILE / 2 * vec};
        void **parts[] = {(void **)&w.qT, (void **)&w.accT, (void **)&w.s, (void **)&w.kf, (void **)&w.vf,
                          (void **)&w.m, (void **)&w.l, (void **)&w.limit, (void **)&w.pp};
        size_t total = 0;
        for (int i = 0; i < 9; i++) total += sizes[i];       /* all multiples of 64 bytes */
        char *mem = aligned_alloc(64, total);
        if (mem) {
            char *p = mem;
            for (int i = 0; i < 9; i++) { *parts[i] = p; p += sizes[i]; }
        } else {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < num_tasks; j++) {
            if (!mem) continue;
            const int64_t task = num_tasks - 1 - j;
            int64_t lo = 0, hi = nseq - 1;                 /* the sequence whose range holds task */
            while (lo < hi) {
                const int64_t mid = (lo + hi + 1) / 2;
                if (task_start[mid] <= task) lo = mid; else hi = mid - 1;
            }
            const int64_t s = first_seq + lo, local = task - task_start[lo];
            const int64_t rows = query_start[s + 1] - query_start[s], tiles = (rows + LANES - 1) / LANES;
            const int64_t tile = local % tiles;   /* kv-head-major: neighbouring tasks share K/V */
            const int64_t nq = rows - tile * LANES < LANES ? rows - tile * LANES : LANES;
            const struct prefill_tile t = {
                .table = block_tables + s * max_blocks,
                .tok0 = query_start[s] + tile * LANES,
                .nq = nq,
                .first_pos = seq_lens[s] - rows + tile * LANES,
                .kvh = local / tiles,
                .nv = (a.group * nq + LANES - 1) / LANES,
            };
            if (head_dim == 64) prefill_tile_64(&a, &t, &w);
            else if (head_dim == 128) prefill_tile_128(&a, &t, &w);
            else prefill_tile_256(&a, &t, &w);
        }
        free(mem);
    }
    free(task_start);
    return failed ? -1 : 0;
}
