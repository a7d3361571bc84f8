/* Helpers shared by the CPU kernels (kernels.c, prefill_attention.c, decode_bf16.c): bf16 <-> fp32,
 * a branch-free exp, row loads/stores in either dtype, and GCC vector types of 16 lanes.
 * Data: fp32 (dtype 0) or bf16 stored as uint16 (dtype 1). */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)v << 16;
    return x.f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even; branch-free so it vectorizes */
    union { uint32_t u; float f; } x;
    x.f = f;
    x.u += 0x7fffu + ((x.u >> 16) & 1u);
    return (uint16_t)(x.u >> 16);
}

/* exp, clamped to [-87, 88], branch-free so `omp simd` vectorizes it:
 * 2^(x*log2 e) split into integer and fraction, degree-6 polynomial; rel. error ~2e-7. */
static inline float fast_exp(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float t = x * 1.44269504f;
    const float fi = __builtin_floorf(t);
    const float f = t - fi;
    float p = 1.535336188e-4f;
    p = p * f + 1.339887440e-3f;
    p = p * f + 9.618437357e-3f;
    p = p * f + 5.550332471e-2f;
    p = p * f + 2.402264791e-1f;
    p = p * f + 6.931472028e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)fi + 127) << 23;
    return p * scale.f;
}

static inline void load_row(const void *base, int64_t offset, int dtype, int64_t n, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + offset, n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static inline void store_row(void *base, int64_t offset, int dtype, int64_t n, const float *src) {
    if (dtype == 0) {
        memcpy((float *)base + offset, src, n * sizeof(float));
    } else {
        uint16_t *dst = (uint16_t *)base + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    }
}

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
#define MAX_BLOCK 128

typedef float vf16 __attribute__((vector_size(64)));    /* one zmm with AVX-512 */
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
#define LANES 16

static inline vf16 vselect(vi16 mask, vf16 a, vf16 b) {   /* mask lanes are -1 (take a) or 0 (take b) */
    return (vf16)(((vi16)a & mask) | ((vi16)b & ~mask));
}

static inline vf16 vmax(vf16 a, vf16 b) {
#ifdef __AVX512F__
    return (vf16)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return vselect(a > b, a, b);
#endif
}

/* 2^t for t <= 0 on a vector, 0 below -125 (so -inf gives 0), branch-free: round t to the
 * nearest integer with the 1.5 * 2^23 trick, 2^f on [-0.5, 0.5] by its degree-6 Taylor
 * polynomial (rel. error < 2e-7), and the integer part into the exponent. */
static inline vf16 vexp2_nonpos(vf16 t) {
    const vi16 in_range = t >= -125.f;
    const vf16 r = t + 12582912.f;                    /* the low mantissa bits now hold round(t) */
    const vf16 f = t - (r - 12582912.f);
    const vi16 ti = (vi16)r - 0x4B400000;
    vf16 p = (vf16){} + 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    return vselect(in_range, p * (vf16)((ti + 127) << 23), (vf16){});
}

/* Two fp32 vectors to bf16 pairs, rounded to nearest even: lane i = (p0[i], p1[i]). */
static inline vi16 pack_bf16_pair(vf16 p0, vf16 p1) {
    const vu16 lo = (vu16)p0, hi = (vu16)p1;
    return (vi16)(((lo + 0x7fffu + ((lo >> 16) & 1u)) >> 16) | ((hi + 0x7fffu + ((hi >> 16) & 1u)) & 0xffff0000u));
}
