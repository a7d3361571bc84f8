/* Packed weights (quant_layout.py's tiles, 8- and 4-bit codes) against fp32 activations, in fp32
 * FMAs: the kernel for fp32 models, whose products must not round the activations (int8 or
 * bf16 rounding is a step that amplifies a last-bit difference, e.g. a tensor-parallel sum's
 * order, into a different greedy token). Lanes are the tile's 16 output rows: for each k the
 * codes of 16 rows come out of the tile's 64-byte vector with a shift and a mask (byte j of a
 * lane, or its high nibble) and one vcvtdq2ps, then one FMA per activation row with x[k]
 * broadcast; per block, y += d * sum (c - offset) x (8-bit) or d * sum c x + m sum x (4-bit).
 * About 4x the instructions per weight of quant_gemv.c, still below the memory time at one row.
 * Returns -1 without AVX-512 (runtime check): the caller runs the torch reference. */
#include "quant.h"
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)

#define F_MR 4

struct fargs {
    const struct qweight *w;
    const float *x;                    /* [M][K'], zero past K */
    const float *sx;                   /* block sums [M][K'/B] (the 4-bit codes' min term) */
    int64_t m_rows, nb;
};

/* The codes of column k0 + j (w8: byte j; w4: nibble j of the 8 a lane packs) for 16 rows. */
static inline __attribute__((always_inline)) __m512 codes_of(__m512i v, int j, const int W4) {
    const int shift = W4 ? 8 * (j & 3) + 4 * (j >> 2) : 8 * j;
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(W4 ? 0x0f : 0xff)));
}

static inline __attribute__((always_inline)) void f_tile_rows(const struct fargs *a, int64_t t, int64_t r0,
                                                              const int R, const int W4, __m512 *acc) {
    const struct qweight *w = a->w;
    const int per = W4 ? 8 : 4, groups = (int)(w->block / per);
    const __m512i *qt = (const __m512i *)(w->q + t * (w->kp / per) * 64);
    const uint16_t *dt = w->d + t * a->nb * 16, *mt = W4 ? w->m + t * a->nb * 16 : NULL;
    const __m512 off = _mm512_set1_ps((float)w->offset);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->nb; b++) {
        __m512 s[F_MR][4];
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 4; h++) s[r][h] = _mm512_setzero_ps();
        for (int g = 0; g < groups; g++) {
            const __m512i v = _mm512_loadu_si512(qt + b * groups + g);
            const int64_t k0 = b * w->block + g * per;
            for (int j = 0; j < per; j++) {   /* 8-bit codes less their offset: exact, no cancellation later */
                const __m512 c = W4 ? codes_of(v, j, 1) : _mm512_sub_ps(codes_of(v, j, 0), off);
                for (int r = 0; r < R; r++)
                    s[r][j & 3] = _mm512_fmadd_ps(c, _mm512_set1_ps(a->x[(r0 + r) * w->kp + k0 + j]), s[r][j & 3]);
            }
        }
        const __m512 dw = f16x16(dt + b * 16);
        for (int r = 0; r < R; r++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), _mm512_add_ps(s[r][2], s[r][3]));
            acc[r] = _mm512_fmadd_ps(sum, dw, acc[r]);
            if (W4) acc[r] = _mm512_fmadd_ps(f16x16(mt + b * 16), _mm512_set1_ps(a->sx[(r0 + r) * a->nb + b]), acc[r]);
        }
    }
}

static void prepare_rows(const void *x, int dtype, const struct qweight *w, int64_t m_rows, float *xf, float *sx) {
    const int64_t nb = w->kp / w->block;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m_rows; r++) {
        float *row = xf + r * w->kp;
        memset(row + w->k, 0, sizeof(float) * (w->kp - w->k));
        load_row((const char *)x + r * w->k * (dtype ? 2 : 4), 0, dtype, w->k, row);
        for (int64_t b = 0; b < nb; b++) {
            float sum = 0.f;
            for (int64_t i = 0; i < w->block; i++) sum += row[b * w->block + i];
            sx[r * nb + b] = sum;
        }
    }
}

int quant_linear_f32(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || (w->block != 16 && w->block != 32)
        || w->kp % w->block)
        return -1;
    const int64_t nb = w->kp / w->block, tiles = (w->n + 15) / 16;
    float *xf = aligned_alloc(64, (size_t)((m_rows * w->kp * 4 + 63) / 64 * 64));
    float *sx = malloc(sizeof(float) * m_rows * nb);
    if (!xf || !sx) { free(xf); free(sx); return -1; }
    const struct fargs a = {w, xf, sx, m_rows, nb};
#pragma omp parallel if (tiles * m_rows * w->kp > 32768)
    {
        prepare_rows(x, dtype, w, m_rows, xf, sx);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            __m512 acc[F_MR];
            int64_t r0 = 0;
            for (; r0 + F_MR <= m_rows; r0 += F_MR) {
                if (w->w4) f_tile_rows(&a, t, r0, F_MR, 1, acc); else f_tile_rows(&a, t, r0, F_MR, 0, acc);
                store_tile(acc, F_MR, r0, t, w->n, bias, out, dtype);
            }
            for (; r0 < m_rows; r0++) {
                if (w->w4) f_tile_rows(&a, t, r0, 1, 1, acc); else f_tile_rows(&a, t, r0, 1, 0, acc);
                store_tile(acc, 1, r0, t, w->n, bias, out, dtype);
            }
        }
    }
    free(xf); free(sx);
    return 0;
}

#else

int quant_linear_f32(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    return -1;
}

#endif
