/* What the C kernels share: the instruction set they are built for (one library per variant,
 * see dsv3_kernels.cpu), 16-lane float vectors, bfloat16 conversions and the lane-sum trees.
 * Header-only: each file of a variant includes it. */
#ifndef DSV3_CPU_VEC_H
#define DSV3_CPU_VEC_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* AVX2 without AVX-512 (Zen 2/3, most desktop and many cloud x86 CPUs): the products below use
 * 256-bit intrinsics; the compiler lowers this file's generic 16-lane vectors poorly there
 * (measured on Zen 3: 1-3 G multiply-adds/s, against 20+ with the intrinsics). */
#define DSV3_AVX2 1
#endif
#if defined(__AVX512F__) || defined(DSV3_AVX2)
#include <immintrin.h>
#endif

#define VL 16
typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#if defined(__GNUC__) && !defined(__clang__)
/* a*b+c as one fused operation everywhere in this file, vector and scalar code alike */
#pragma GCC optimize("fp-contract=fast")
#elif defined(__clang__)
#pragma clang fp contract(fast)
#endif

/* a * b + c, fused where the CPU has fused multiply-adds (as fp-contract makes every a * b + c
 * of these files), written out where a loop must not be vectorised into separate products */
static inline float fma_rn(float a, float b, float c) {
#ifdef FP_FAST_FMAF
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

static inline float bf16_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) { /* nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline v16f ld_f32(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16f ld_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    /* one widening load; the generic form below splits into 256-bit halves where the compiler
     * prefers narrow vectors (-march=znver4) */
    v16f f;
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    memcpy(&f, &u, sizeof f);
    return f;
#else
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

static inline float hsum(v16f v) {
    float s = 0.0f, a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    for (int i = 0; i < 2; i++) c[i] = b[i] + b[i + 2];
    s = c[0] + c[1];
    return s;
}

/* The hsum of 16 vectors at once, lane i of the result = hsum(v[i]) bit for bit: the same tree,
 * each level adding the same pairs, but four vector additions (after two-source shuffles that
 * line the pairs up) per level instead of sixteen extract-and-add chains. Level 1 puts the 8
 * partial sums a[] of v[2j] and v[2j+1] side by side in u[j], level 2 the 4 b[] of four
 * vectors, and so on: at the end, lane i belongs to v[i]. */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline v16f hsum16(const v16f *v) {
    v16f u[8], w[4], x[2];
    for (int j = 0; j < 8; j++)
        u[j] = SHUF(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUF(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int j = 0; j < 4; j++)
        w[j] = SHUF(u[2 * j], u[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUF(u[2 * j], u[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int j = 0; j < 2; j++)
        x[j] = SHUF(w[2 * j], w[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SHUF(w[2 * j], w[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUF(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUF(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* ---- E4M3 codes as numbers, in registers ---------------------------------------------------------
 * An E4M3 code's 7 low bits, moved up by 7 into a half-precision word (sign to bit 15), are that
 * code's value times 2^-8 exactly, subnormal codes included (both formats put the exponent just
 * above the mantissa and E4M3's bias is half precision's minus 8), and the CPU's half-precision
 * conversion (F16C) turns them into float32 at full speed: no float32 subnormal ever appears,
 * so the speed does not depend on the codes. The 2^8 is folded into the block scales by the
 * callers (cpu_gemm.c's FP8 products). The NaN codes (0x7f, 0xff) come out as 480 there: the
 * products never see them (dsv3cli.ops sends a weight that has one to the reference, and loading
 * refuses them), and telling them apart cost a fifth of the conversion's speed. The scalar table
 * gives them NaN. */
static float fp8_table[256]; /* each code's value times 2^-8, for the scalar paths */
__attribute__((constructor)) static void fp8_table_init(void) {
    for (int c = 0; c < 256; c++) {
        int e = (c >> 3) & 15, m = c & 7;
        float v = e ? ldexpf(1.0f + (float)m / 8.0f, e - 7 - 8) : ldexpf((float)m, -9 - 8);
        if ((c & 0x7f) == 0x7f) v = __builtin_nanf("");
        fp8_table[c] = c & 0x80 ? -v : v;
    }
}
static inline float fp8_f32(uint8_t c) { return fp8_table[c]; }

#ifdef __AVX2__
/* 16 codes -> their half-precision words (see above) */
static inline __m256i fp8_half_bits(__m128i codes) {
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(codes), 7), _mm256_set1_epi16((short)0xbf80));
}
/* the same words, the first 8 and the last 8 in two registers: each code goes to the high byte of
 * its word without crossing 128-bit lanes, and an arithmetic shift puts it in place (fewer and
 * cheaper operations than the widening above, where the conversion is the bottleneck) */
static inline void fp8_halves(__m128i codes, __m128i *lo, __m128i *hi) {
    const __m128i z = _mm_setzero_si128(), m = _mm_set1_epi16((short)0xbf80);
    *lo = _mm_and_si128(_mm_srai_epi16(_mm_unpacklo_epi8(z, codes), 1), m);
    *hi = _mm_and_si128(_mm_srai_epi16(_mm_unpackhi_epi8(z, codes), 1), m);
}
/* 16 codes -> the half-precision words of the even ones (codes 0, 2, .., 14) and of the odd ones,
 * with one multiply-add of byte pairs each (vpmaddubsw: 128 times the code read as a signed byte
 * is the word above, but for bit 14, which the mask clears) and no byte shuffle: where the
 * conversion bounds a product this is 15-20% faster than fp8_halves on Zen 3 (the multiplies run
 * beside the shuffles and shifts, which share ports with the conversion). The products that use
 * it take k in that order (cpu_gemm.c's FP8 products). */
static inline void fp8_pairs(__m128i codes, __m128i *even, __m128i *odd) {
    const __m128i m = _mm_set1_epi16((short)0xbf80);
    *even = _mm_and_si128(_mm_maddubs_epi16(_mm_set1_epi16(0x0080), codes), m);
    *odd = _mm_and_si128(_mm_maddubs_epi16(_mm_set1_epi16((short)0x8000), codes), m);
}
/* fp8_pairs of 32 codes: the 16 even ones (codes 0, 2, .., 30) and the 16 odd ones, each in order
 * (a word takes its two bytes from within itself, so no lane is crossed) */
static inline void fp8_pairs32(__m256i codes, __m256i *even, __m256i *odd) {
    const __m256i m = _mm256_set1_epi16((short)0xbf80);
    *even = _mm256_and_si256(_mm256_maddubs_epi16(_mm256_set1_epi16(0x0080), codes), m);
    *odd = _mm256_and_si256(_mm256_maddubs_epi16(_mm256_set1_epi16((short)0x8000), codes), m);
}
#endif

#ifdef __AVX512F__
/* 16 codes -> their values times 2^-8, in order */
static inline __m512 fp8x16_ps(const uint8_t *p) { return _mm512_cvtph_ps(fp8_half_bits(_mm_loadu_si128((const __m128i *)p))); }
#endif

/* 16 codes -> their values times 2^-8 */
static inline v16f ld_fp8(const uint8_t *p) {
    v16f f;
#if defined(__AVX512F__)
    __m512 v = fp8x16_ps(p);
    memcpy(&f, &v, sizeof f);
#elif defined(__AVX2__)
    __m128i a, b;
    fp8_halves(_mm_loadu_si128((const __m128i *)p), &a, &b);
    __m256 lo = _mm256_cvtph_ps(a), hi = _mm256_cvtph_ps(b);
    memcpy(&f, &lo, 32);
    memcpy((char *)&f + 32, &hi, 32);
#else
    for (int i = 0; i < VL; i++) f[i] = fp8_table[p[i]];
#endif
    return f;
}

/* the products of cpu_gemm.c that the model operations of cpu_ops.c build on (see cpu_gemm.c) */
#define DSV3_HIDDEN __attribute__((visibility("hidden")))
DSV3_HIDDEN void nt_f32(const float *x, int64_t ldx, const float *w, int64_t ldw, float *y, int64_t ldy, int64_t M,
                        int64_t N, int64_t K);
DSV3_HIDDEN void nt_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw, float *y, int64_t ldy,
                         int64_t M, int64_t N, int64_t K);
DSV3_HIDDEN void nn_f32(const float *x, const float *w, int64_t ldw, float *y, int64_t ldy, int64_t M, int64_t N,
                        int64_t K);
DSV3_HIDDEN void nn_bf16(const float *x, const uint16_t *w, int64_t ldw, float *y, int64_t ldy, int64_t M, int64_t N,
                         int64_t K);
DSV3_HIDDEN void nt_fp8(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, float *y, int64_t ldy, int64_t M,
                        int64_t N, int64_t K);
DSV3_HIDDEN int64_t fp8_product(const float *x, int64_t M, int64_t K, const uint8_t *q, const float *s, int64_t n0,
                                int64_t n1, float *y, int64_t ldy);
enum { PK_F32 = 0, PK_BF16 = 1, PK_FP8 = 2 }; /* pk_product's weight formats */
DSV3_HIDDEN int64_t pk_product(const void *x, int xbf16, int64_t ldx, int64_t M, int64_t K, int wtype, const void *w,
                               int64_t ldw, const float *s, int64_t n0, int64_t n1, float *y, int64_t ldy);
#if defined(__AVX512BF16__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
/* the AMX prefill product (cpu_gemm.c): only it is compiled for the tiles (a compiler without
 * them still builds the rest of the variant) */
#define DSV3_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
DSV3_HIDDEN AMX_TARGET int64_t amx_fp8_product(const void *x, int xbf16, int64_t ldx, int64_t M, int64_t K, const uint8_t *q,
                                    const float *s, int64_t n0, int64_t n1, float *y, int64_t ldy);
#endif
DSV3_HIDDEN void to_f32(const void *x, int bf16, int64_t ldx, int64_t M, int64_t K, float *out);
DSV3_HIDDEN void store(const float *v, void *y, int bf16, int64_t n);
#endif
