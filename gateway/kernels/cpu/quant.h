/* Shared by the quantized-weight kernels (quant_gemv.c: VNNI, quant_bf16.c: vdpbf16ps): the
 * weight descriptor quant_cpu.py builds once per PackedWeight, and the AVX-512 loads and the
 * tile store (bias, fp32 or bf16 output) both kernels use. Layout: quant_layout.py. */
#pragma once
#include "common.h"

struct qweight {                       /* a PackedWeight's tiles (quant_cpu.py builds it once per weight) */
    const uint8_t *q;
    const uint16_t *d, *m;             /* m NULL for 8-bit codes */
    int64_t n, k, kp, block, offset, w4;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline __m512 f16x16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512 load16(const void *x, int dtype, int64_t i, __mmask16 mask) {
    if (dtype == 0) return _mm512_maskz_loadu_ps(mask, (const float *)x + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + i)), 16));
}

/* acc[r] (16 output rows of activation row r0 + r, fp32) + bias → out, masked past n. */
static inline void store_tile(const __m512 *acc, int R, int64_t r0, int64_t t, int64_t n, const void *bias,
                              void *out, int dtype) {
    const int64_t c0 = t * 16, cols = n - c0 < 16 ? n - c0 : 16;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    __m512 b = _mm512_setzero_ps();
    if (bias) b = dtype == 0 ? _mm512_maskz_loadu_ps(mask, (const float *)bias + c0)
                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                   _mm256_maskz_loadu_epi16(mask, (const uint16_t *)bias + c0)), 16));
    for (int r = 0; r < R; r++) {
        const __m512 y = _mm512_add_ps(acc[r], b);
        if (dtype == 0) {
            _mm512_mask_storeu_ps((float *)out + (r0 + r) * n + c0, mask, y);
        } else {   /* round to nearest even, as common.h's f32_to_bf16 */
            const __m512i u = _mm512_castps_si512(y);
            const __m512i rnd = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
            const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, rnd), 16));
            _mm256_mask_storeu_epi16((uint16_t *)out + (r0 + r) * n + c0, mask, h);
        }
    }
}

#endif
