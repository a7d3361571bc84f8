/* Products with packed quantized weights (quant_layout.py's tiles), called through ctypes from
 * cpu_ops.quant_linear: y[M, N] = x[M, K] W^T (+ bias), x fp32 or bf16.
 *
 * quant_linear_vnni: activations quantized to int8 per weight block (32 values, q6_k 16:
 * scale amax/127, as ggml's q8_0), then AVX512-VNNI vpdpbusd of the unsigned weight codes
 * against the signed activation bytes. A tile is 16 output rows, one per vector lane, with 4
 * consecutive k per lane, so a block's dot products need no horizontal sums: per block and row
 * the int32 lane sums are scaled once, y += d_w d_a (dot - offset * sum(a_q)) for 8-bit codes
 * (w = d (u - offset)) and y += d_w d_a dot + m_w d_a sum(a_q) for 4-bit ones (w = d u + m).
 * Each weight tile is read once per call and reused from registers for MR activation rows at
 * a time; tiles run in parallel on the OpenMP pool (torch's libgomp).
 *
 * Returns 0, or -1 when this CPU (runtime check) or this build lacks AVX512-VNNI / F16C: the
 * caller then runs the torch reference. */
#include "quant.h"
#include <omp.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

#define MR 4   /* activation rows per pass over a weight tile */

struct qargs {
    const uint8_t *q;                  /* the tiles: [tiles][K'/4 (w8) or K'/8 (w4)][16][4] */
    const uint16_t *d, *m;             /* float16 [tiles][K'/B][16]; m NULL for 8-bit codes */
    const int8_t *aq;                  /* activations [M][K'] */
    const float *da;                   /* activation scale per block [M][K'/B] */
    const int32_t *sa;                 /* sum of a_q per block [M][K'/B] */
    int64_t m_rows, n, kp, block, offset, nb;
};

/* One activation row → int8 per block of B (16 or 32; scale amax/127, round half to even as
 * vcvtps2dq does), the block scales and the code sums. Columns past k are zero. */
static void quantize_row(const void *x, int dtype, int64_t k, int64_t kp, int64_t block, int8_t *aq, float *da,
                         int32_t *sa) {
    for (int64_t b0 = 0; b0 < kp; b0 += block) {
        __m512 v[2];
        for (int h = 0; h < block / 16; h++) {
            const int64_t i = b0 + 16 * h, left = k - i;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (left > 0 ? (__mmask16)((1u << left) - 1u) : 0);
            v[h] = load16(x, dtype, i, mask);
        }
        __m512 amax = _mm512_abs_ps(v[0]);
        if (block == 32) amax = _mm512_max_ps(amax, _mm512_abs_ps(v[1]));
        const float m = _mm512_reduce_max_ps(amax);
        const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
        __m512i sum = _mm512_setzero_si512();
        for (int h = 0; h < block / 16; h++) {
            const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));
            sum = _mm512_add_epi32(sum, c);
            _mm_storeu_si128((__m128i *)(aq + b0 + 16 * h), _mm512_cvtepi32_epi8(c));
        }
        da[b0 / block] = m / 127.f;
        sa[b0 / block] = _mm512_reduce_add_epi32(sum);
    }
}

/* Rows [r0, r0 + R) against tile t; acc[r] gets the 16 lanes (output rows) in fp32. */
static inline __attribute__((always_inline)) void tile_rows(const struct qargs *a, int64_t t, int64_t r0, const int R,
                                                            const int W4, __m512 *acc) {
    const int64_t per_block = a->block / (W4 ? 8 : 4);          /* 64-byte vectors per block */
    const __m512i *qt = (const __m512i *)(a->q + t * (a->kp / (W4 ? 8 : 4)) * 64);
    const uint16_t *dt = a->d + t * a->nb * 16, *mt = W4 ? a->m + t * a->nb * 16 : NULL;
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->nb; b++) {
        __m512i s0[MR], s1[MR];
        for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm512_setzero_si512();
        for (int64_t g = 0; g < per_block; g++) {
            const __m512i v = _mm512_loadu_si512(qt + b * per_block + g);
            const int64_t k = b * a->block + g * (W4 ? 8 : 4);
            if (W4) {
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int r = 0; r < R; r++) {
                    const int32_t *ar = (const int32_t *)(a->aq + (r0 + r) * a->kp + k);
                    s0[r] = _mm512_dpbusd_epi32(s0[r], lo, _mm512_set1_epi32(ar[0]));
                    s1[r] = _mm512_dpbusd_epi32(s1[r], hi, _mm512_set1_epi32(ar[1]));
                }
            } else {
                for (int r = 0; r < R; r++) {
                    const int32_t *ar = (const int32_t *)(a->aq + (r0 + r) * a->kp + k);
                    if (g & 1) s1[r] = _mm512_dpbusd_epi32(s1[r], v, _mm512_set1_epi32(ar[0]));
                    else s0[r] = _mm512_dpbusd_epi32(s0[r], v, _mm512_set1_epi32(ar[0]));
                }
            }
        }
        const __m512 dw = f16x16(dt + b * 16);
        const __m512 mw = W4 ? f16x16(mt + b * 16) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            const int64_t ab = (r0 + r) * a->nb + b;
            __m512i s = _mm512_add_epi32(s0[r], s1[r]);
            if (!W4) s = _mm512_sub_epi32(s, _mm512_set1_epi32((int32_t)a->offset * a->sa[ab]));
            const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(a->da[ab]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            if (W4) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a->da[ab] * (float)a->sa[ab]), acc[r]);
        }
    }
}

static void run_tiles(const struct qargs *a, const void *bias, void *out, int dtype, int w4) {
    const int64_t tiles = (a->n + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        __m512 acc[MR];
        int64_t r0 = 0;
        for (; r0 + MR <= a->m_rows; r0 += MR) {
            if (w4) tile_rows(a, t, r0, MR, 1, acc); else tile_rows(a, t, r0, MR, 0, acc);
            store_tile(acc, MR, r0, t, a->n, bias, out, dtype);
        }
        for (; r0 < a->m_rows; r0++) {
            if (w4) tile_rows(a, t, r0, 1, 1, acc); else tile_rows(a, t, r0, 1, 0, acc);
            store_tile(acc, 1, r0, t, a->n, bias, out, dtype);
        }
    }
}

/* Small M: every thread quantizes all rows itself (a few hundred values) instead of sharing
 * them across a barrier: on a loaded box a barrier waits for a descheduled thread. */
#define PRIVATE_ROWS 16

int quant_linear_vnni(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    const uint8_t *q = w->q;
    const uint16_t *d = w->d, *mins = w->m;
    const int64_t n = w->n, k = w->k, kp = w->kp, block = w->block, offset = w->offset;
    const int w4 = (int)w->w4;
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw") || (block != 16 && block != 32)
        || kp % block)
        return -1;
    const int64_t nb = kp / block, tiles = (n + 15) / 16;
    const int parallel = tiles * m_rows * kp > 32768, private_rows = m_rows <= PRIVATE_ROWS;
    const int copies = parallel && private_rows ? omp_get_max_threads() : 1;
    const int64_t aq_bytes = (m_rows * kp + 63) / 64 * 64;
    int8_t *aq = aligned_alloc(64, (size_t)(aq_bytes * copies));
    float *da = malloc(sizeof(float) * m_rows * nb * copies);
    int32_t *sa = malloc(sizeof(int32_t) * m_rows * nb * copies);
    if (!aq || !da || !sa) { free(aq); free(da); free(sa); return -1; }
    const int64_t row_bytes = k * (dtype ? 2 : 4);
#pragma omp parallel if (parallel)
    {
        const int copy = copies > 1 ? omp_get_thread_num() : 0;
        struct qargs a = {q, d, mins, aq + copy * aq_bytes, da + copy * m_rows * nb, sa + copy * m_rows * nb,
                          m_rows, n, kp, block, offset, nb};
        if (private_rows) {   /* copies == the team's size, or a team of one */
            for (int64_t r = 0; r < m_rows; r++)
                quantize_row((const char *)x + r * row_bytes, dtype, k, kp, block, (int8_t *)a.aq + r * kp,
                             (float *)a.da + r * nb, (int32_t *)a.sa + r * nb);
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m_rows; r++)
                quantize_row((const char *)x + r * row_bytes, dtype, k, kp, block, (int8_t *)a.aq + r * kp,
                             (float *)a.da + r * nb, (int32_t *)a.sa + r * nb);
        }
        run_tiles(&a, bias, out, dtype, w4);
    }
    free(aq); free(da); free(sa);
    return 0;
}

/* Rows ids[0..t) of a packed table, dequantized into out [t][k] (fp32 or bf16): the embedding
 * lookup and the LM head's rescoring rows. Plain C (a row is a few hundred values).
 * Returns 0, -2 when an id is outside [0, n) (nothing written), -1 when the row is too long. */
int quant_rows(const uint8_t *q, const uint16_t *d, const uint16_t *mins, int64_t kp, int64_t k, int64_t block,
               int64_t offset, int w4, const int64_t *ids, int64_t t, int64_t n, void *out, int dtype) {
    const int64_t nb = kp / block, tile_bytes = kp / (w4 ? 8 : 4) * 64;
    float row[8192];
    if (kp > 8192) return -1;
    for (int64_t i = 0; i < t; i++)
        if (ids[i] < 0 || ids[i] >= n) return -2;
    for (int64_t i = 0; i < t; i++) {
        const int64_t tile = ids[i] / 16, lane = ids[i] % 16;
        const uint8_t *qt = q + tile * tile_bytes + lane * 4;
        const uint16_t *dt = d + tile * nb * 16 + lane, *mt = w4 ? mins + tile * nb * 16 + lane : NULL;
        for (int64_t c = 0; c < k; c++) {
            const int64_t b = c / block;
            const float scale = _cvtsh_ss(dt[b * 16]);
            if (w4) {
                const uint8_t byte = qt[(c / 8) * 64 + (c % 4)];
                const int code = (c % 8) < 4 ? byte & 15 : byte >> 4;
                row[c] = scale * (float)code + _cvtsh_ss(mt[b * 16]);
            } else {
                row[c] = scale * (float)((int)qt[(c / 4) * 64 + (c % 4)] - (int)offset);
            }
        }
        store_row(out, i * k, dtype, k, row);
    }
    return 0;
}

#else

int quant_linear_vnni(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    return -1;
}

int quant_rows(const uint8_t *q, const uint16_t *d, const uint16_t *mins, int64_t kp, int64_t k, int64_t block,
               int64_t offset, int w4, const int64_t *ids, int64_t t, int64_t n, void *out, int dtype) {
    return -1;
}

#endif
