/* W8A8 products for batched steps (prefill chunks, many decodes), called through ctypes from
 * quant_cpu.py: y[M, N] = x[M, K] W^T (+ bias) with W int8 per output channel (quant_layout.py's
 * 8-bit tiles, offset 128, one scale per row: every block's d is the row's scale) and x quantized
 * per token to int8 here (scale amax/127, round half to even).
 *
 * y[m, n] = da[m] s[n] (sum_k u[n, k] a[m, k] - 128 sum_k a[m, k]) + bias[n], u = w / s + 128 the
 * unsigned code vpdpbusd takes (u8 x s8; the 128 sum(a) per token undoes the offset, exactly).
 * With one scale per row and per token, the whole K sums in int32 (|sum| < 2^31 for K < 66,000)
 * and the rescale runs once per output, in the epilogue: the inner loop is nothing but loads,
 * broadcasts and vpdpbusd. Register tile: GM tokens x GN weight tiles of 16 rows = GM * GN zmm
 * accumulators (6 x 4 = 24), each step loading GN weight vectors (16 rows x 4 k) and
 * broadcasting 4 activation bytes per token (token rows padded with zeros to a multiple of GM,
 * stored only up to M). Work items are (panel of GN tiles, block of GMB
 * tokens), panel-major so a thread reuses a panel (GN x 16 x K bytes) from L1/L2 over its token
 * blocks; they run in parallel on the OpenMP pool (torch's libgomp).
 *
 * A row's result never depends on the batch (its own scale, an exact int32 sum, one epilogue).
 * Returns 0, or -1 when this CPU (runtime check) or this build lacks AVX512-VNNI, or the weight
 * is not 8-bit per-channel: the caller takes another kernel. */
#include "quant.h"
#include <omp.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

#define GM 6      /* tokens per register tile */
#define GN 4      /* 16-row weight tiles per register tile */
#define GMB 48    /* tokens per work item (GM * 8) */

struct gargs {
    const struct qweight *w;
    const int8_t *aq;                  /* activations [M][K'], zero past K */
    const float *da;                   /* per token: amax / 127 */
    const int32_t *sa;                 /* per token: sum of its codes */
    int64_t m_rows, tiles, nb;
};

/* One token → int8 codes (zero past k), its scale and its code sum. */
static void quantize_token(const void *x, int dtype, int64_t k, int64_t kp, int8_t *aq, float *da, int32_t *sa) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mask = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1u);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, dtype, i, mask)));
    }
    const float m = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < kp; i += 16) {
        const int64_t left = k - i;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (left > 0 ? (__mmask16)((1u << left) - 1u) : 0);
        const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, dtype, i, mask), inv));
        sum = _mm512_add_epi32(sum, c);
        _mm_storeu_si128((__m128i *)(aq + i), _mm512_cvtepi32_epi8(c));
    }
    *da = m / 127.f;
    *sa = _mm512_reduce_add_epi32(sum);
}

/* The int32 sums of GM tokens (aq rows from ar, padded with zero rows to a multiple of GM)
 * against GN tiles from qt: named accumulators, as GCC spills an array of them. */
#define ZERO4(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0
#define STEP4(r) do { const __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(ar + (r) * kp + 4 * g)); \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, w0, x4); c##r##1 = _mm512_dpbusd_epi32(c##r##1, w1, x4); \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, w2, x4); c##r##3 = _mm512_dpbusd_epi32(c##r##3, w3, x4); } while (0)
#define SAVE4(r) do { acc[r][0] = c##r##0; acc[r][1] = c##r##1; acc[r][2] = c##r##2; acc[r][3] = c##r##3; } while (0)

static void sums_6x4(const int8_t *ar, const uint8_t *qt, int64_t kp, __m512i acc[GM][GN]) {
    const int64_t tile_bytes = kp * 16;
    ZERO4(0); ZERO4(1); ZERO4(2); ZERO4(3); ZERO4(4); ZERO4(5);
    for (int64_t g = 0; g < kp / 4; g++) {
        const __m512i w0 = _mm512_loadu_si512(qt + g * 64), w1 = _mm512_loadu_si512(qt + tile_bytes + g * 64);
        const __m512i w2 = _mm512_loadu_si512(qt + 2 * tile_bytes + g * 64);
        const __m512i w3 = _mm512_loadu_si512(qt + 3 * tile_bytes + g * 64);
        STEP4(0); STEP4(1); STEP4(2); STEP4(3); STEP4(4); STEP4(5);
    }
    SAVE4(0); SAVE4(1); SAVE4(2); SAVE4(3); SAVE4(4); SAVE4(5);
}

/* The same for one tile (the last panel of an N that is not a multiple of 64). */
static void sums_6x1(const int8_t *ar, const uint8_t *qt, int64_t kp, __m512i acc[GM][GN], int c) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0;
    for (int64_t g = 0; g < kp / 4; g++) {
        const __m512i w = _mm512_loadu_si512(qt + g * 64);
        const int32_t *a = (const int32_t *)(ar + 4 * g);
        const int64_t st = kp / 4;
        s0 = _mm512_dpbusd_epi32(s0, w, _mm512_set1_epi32(a[0]));
        s1 = _mm512_dpbusd_epi32(s1, w, _mm512_set1_epi32(a[st]));
        s2 = _mm512_dpbusd_epi32(s2, w, _mm512_set1_epi32(a[2 * st]));
        s3 = _mm512_dpbusd_epi32(s3, w, _mm512_set1_epi32(a[3 * st]));
        s4 = _mm512_dpbusd_epi32(s4, w, _mm512_set1_epi32(a[4 * st]));
        s5 = _mm512_dpbusd_epi32(s5, w, _mm512_set1_epi32(a[5 * st]));
    }
    acc[0][c] = s0; acc[1][c] = s1; acc[2][c] = s2; acc[3][c] = s3; acc[4][c] = s4; acc[5][c] = s5;
}

/* Tokens [m0, m0 + R) x tiles [t0, t0 + C): the int32 sums, then the rescale and the store. */
static void gemm_tile(const struct gargs *a, int64_t m0, int64_t t0, int R, int C, const void *bias, void *out,
                      int dtype) {
    const struct qweight *w = a->w;
    const int64_t kp = w->kp;
    const uint8_t *qt = w->q + t0 * kp * 16;
    __m512i acc[GM][GN];
    if (C == GN) sums_6x4(a->aq + m0 * kp, qt, kp, acc);
    else for (int c = 0; c < C; c++) sums_6x1(a->aq + m0 * kp, qt + c * kp * 16, kp, acc, c);
    for (int c = 0; c < C; c++) {
        const __m512 s = f16x16(w->d + (t0 + c) * a->nb * 16);      /* block 0's d: the rows' scales */
        __m512 y[GM];
        for (int r = 0; r < R; r++) {
            const __m512i dot = _mm512_sub_epi32(acc[r][c], _mm512_set1_epi32((int32_t)w->offset * a->sa[m0 + r]));
            y[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(a->da[m0 + r])));
        }
        store_tile(y, R, m0, t0 + c, w->n, bias, out, dtype);
    }
}

static void gemm_item(const struct gargs *a, int64_t panel, int64_t block, const void *bias, void *out, int dtype) {
    const int64_t t0 = panel * GN, m1 = (block + 1) * GMB < a->m_rows ? (block + 1) * GMB : a->m_rows;
    const int C = a->tiles - t0 < GN ? (int)(a->tiles - t0) : GN;
    for (int64_t m = block * GMB; m < m1; m += GM)
        gemm_tile(a, m, t0, m1 - m < GM ? (int)(m1 - m) : GM, C, bias, out, dtype);
}

int quant_gemm_w8a8(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw") || w->w4 || w->kp % 32
        || w->block != 32)
        return -1;
    const int64_t kp = w->kp, tiles = (w->n + 15) / 16, panels = (tiles + GN - 1) / GN;
    const int64_t blocks = (m_rows + GMB - 1) / GMB, row_bytes = w->k * (dtype ? 2 : 4);
    const int64_t padded = (m_rows + GM - 1) / GM * GM;       /* zero tokens to a whole register tile */
    int8_t *aq = aligned_alloc(64, (size_t)((padded * kp + 63) / 64 * 64));
    float *da = malloc(sizeof(float) * m_rows);
    int32_t *sa = malloc(sizeof(int32_t) * m_rows);
    if (!aq || !da || !sa) { free(aq); free(da); free(sa); return -1; }
    memset(aq + m_rows * kp, 0, (size_t)((padded - m_rows) * kp));
    const struct gargs a = {w, aq, da, sa, m_rows, tiles, kp / 32};
#pragma omp parallel if (tiles * m_rows * kp > 32768)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m_rows; r++)
            quantize_token((const char *)x + r * row_bytes, dtype, w->k, kp, aq + r * kp, da + r, sa + r);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < panels * blocks; item++)
            gemm_item(&a, item / blocks, item % blocks, bias, out, dtype);
    }
    free(aq); free(da); free(sa);
    return 0;
}

#else

int quant_gemm_w8a8(const void *x, int64_t m_rows, int dtype, const struct qweight *w, const void *bias, void *out) {
    return -1;
}

#endif
