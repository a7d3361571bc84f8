/* The other way to multiply by 4-bit codes (quant_layout.py's w4 tiles: q4_0, q4_1, q4_k, int4):
 * activations stay bf16 (fp32 x is rounded to bf16), the codes are unpacked in registers to bf16
 * and multiplied with AVX512-BF16 vdpbf16ps. Unpacking is one byte interleave: bf16 bits
 * 0x4300 | c are exactly 128 + c for a code c < 16, so unpacklo/hi_epi8(codes, 0x43) gives bf16
 * pairs directly, and sum((128 + c) x) - 128 sum(x) = sum(c x); w = d c + m then gives
 * y = d sum((128 + c) x) + (m - 128 d) sum(x) per block, sum(x) of the block computed once per row.
 * The interleave works within 128-bit lanes, so lanes come out as (row 4L, k pair 01), (row 4L,
 * pair 23), (row 4L+1, 01), (row 4L+1, 23) [unpacklo; unpackhi: rows 4L+2, 4L+3]: activations are
 * broadcast 4 at a time (64 bits), block scales permuted to that lane order, and adjacent lane
 * pairs summed once per tile.
 * More accurate than quant_gemv.c's int8 activations, about twice its instructions per weight;
 * bench/quant_kernels.py --impl bf16 compares them. Returns -1 without AVX512-BF16 (runtime). */
#include "quant.h"
#include <omp.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

#define BF_MR 4

struct bargs {
    const struct qweight *w;
    const uint16_t *xb;                /* activations as bf16 [M][K'], zero past K */
    const float *sx;                   /* sum of each block of 32 of them [M][K'/32] */
    int64_t m_rows, nb;
};

/* One activation row → bf16 (fp32 rounded to nearest even), zero past k, and its block sums. */
static void prepare_row(const void *x, int dtype, int64_t k, int64_t kp, uint16_t *xb, float *sx) {
    for (int64_t b0 = 0; b0 < kp; b0 += 32) {
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
            const int64_t i = b0 + 16 * h, left = k - i;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (left > 0 ? (__mmask16)((1u << left) - 1u) : 0);
            v[h] = load16(x, dtype, i, mask);
        }
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]);      /* x[b0..b0+32) as bf16 */
        _mm512_storeu_si512(xb + b0, packed);
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(packed, 16));  /* the rounded values */
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(packed, _mm512_set1_epi32((int)0xffff0000u)));
        sx[b0 / 32] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}

static inline __attribute__((always_inline)) void bf_tile_rows(const struct bargs *a, int64_t t, int64_t r0,
                                                               const int R, __m512 *out) {
    const struct qweight *w = a->w;
    const __m512i *qt = (const __m512i *)(w->q + t * (w->kp / 8) * 64);
    const uint16_t *dt = w->d + t * a->nb * 16, *mt = w->m + t * a->nb * 16;
    const __m512i low = _mm512_set1_epi8(0x0f), c43 = _mm512_set1_epi8(0x43);
    const __m512i idx_lo = _mm512_set_epi32(13, 13, 12, 12, 9, 9, 8, 8, 5, 5, 4, 4, 1, 1, 0, 0);
    const __m512i idx_hi = _mm512_add_epi32(idx_lo, _mm512_set1_epi32(2));
    __m512 acc_lo[BF_MR], acc_hi[BF_MR], acc_m[BF_MR];
    for (int r = 0; r < R; r++) acc_lo[r] = acc_hi[r] = acc_m[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->nb; b++) {
        __m512 s_lo[BF_MR], s_hi[BF_MR];
        for (int r = 0; r < R; r++) s_lo[r] = s_hi[r] = _mm512_setzero_ps();
        for (int g = 0; g < 4; g++) {
            const __m512i v = _mm512_loadu_si512(qt + b * 4 + g);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            const __m512bh A = (__m512bh)_mm512_unpacklo_epi8(lo, c43), B = (__m512bh)_mm512_unpackhi_epi8(lo, c43);
            const __m512bh C = (__m512bh)_mm512_unpacklo_epi8(hi, c43), D = (__m512bh)_mm512_unpackhi_epi8(hi, c43);
            const int64_t k = b * 32 + g * 8;
            for (int r = 0; r < R; r++) {
                const int64_t *xr = (const int64_t *)(a->xb + (r0 + r) * w->kp + k);
                const __m512bh x0 = (__m512bh)_mm512_set1_epi64(xr[0]), x1 = (__m512bh)_mm512_set1_epi64(xr[1]);
                s_lo[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(s_lo[r], A, x0), C, x1);
                s_hi[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(s_hi[r], B, x0), D, x1);
            }
        }
        const __m512 dw = f16x16(dt + b * 16);
        const __m512 mw = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), dw, f16x16(mt + b * 16));   /* m - 128 d */
        const __m512 d_lo = _mm512_permutexvar_ps(idx_lo, dw), d_hi = _mm512_permutexvar_ps(idx_hi, dw);
        for (int r = 0; r < R; r++) {
            acc_lo[r] = _mm512_fmadd_ps(s_lo[r], d_lo, acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(s_hi[r], d_hi, acc_hi[r]);
            acc_m[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a->sx[(r0 + r) * a->nb + b]), acc_m[r]);
        }
    }
    /* row j: lanes (4(j/4) + 2(j%4) + {0,1}) of acc_lo for j%4 < 2, of acc_hi (j%4 - 2) otherwise */
    const __m512i rows = _mm512_set_epi32(16 + 14, 16 + 12, 14, 12, 16 + 10, 16 + 8, 10, 8, 16 + 6, 16 + 4, 6, 4,
                                          16 + 2, 16 + 0, 2, 0);
    for (int r = 0; r < R; r++) {
        const __m512 plo = _mm512_add_ps(acc_lo[r], _mm512_permute_ps(acc_lo[r], 0xB1));   /* adjacent pairs */
        const __m512 phi = _mm512_add_ps(acc_hi[r], _mm512_permute_ps(acc_hi[r], 0xB1));
        out[r] = _mm512_add_ps(_mm512_permutex2var_ps(plo, rows, phi), acc_m[r]);
    }
}

int quant_linear_bf16(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    if (!__builtin_cpu_supports("avx512bf16") || !w->w4 || w->block != 32 || w->kp % 32) return -1;
    const int64_t nb = w->kp / 32, tiles = (w->n + 15) / 16, row_bytes = w->k * (dtype ? 2 : 4);
    uint16_t *xb = aligned_alloc(64, (size_t)((m_rows * w->kp * 2 + 63) / 64 * 64));
    float *sx = malloc(sizeof(float) * m_rows * nb);
    if (!xb || !sx) { free(xb); free(sx); return -1; }
    const struct bargs a = {w, xb, sx, m_rows, nb};
#pragma omp parallel if (tiles * m_rows * w->kp > 32768)
    {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m_rows; r++)
        prepare_row((const char *)x + r * row_bytes, dtype, w->k, w->kp, xb + r * w->kp, sx + r * nb);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        __m512 acc[BF_MR];
        int64_t r0 = 0;
        for (; r0 + BF_MR <= m_rows; r0 += BF_MR) {
            bf_tile_rows(&a, t, r0, BF_MR, acc);
            store_tile(acc, BF_MR, r0, t, w->n, bias, out, dtype);
        }
        for (; r0 < m_rows; r0++) {
            bf_tile_rows(&a, t, r0, 1, acc);
            store_tile(acc, 1, r0, t, w->n, bias, out, dtype);
        }
    }
    }
    free(xb); free(sx);
    return 0;
}

#else

int quant_linear_bf16(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    return -1;
}

#endif
