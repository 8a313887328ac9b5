/* Small matrix products for few-token forwards on the CPU (decode, MTP verification), and the
 * routed experts of a MoE layer in one call.
 *
 * Boundary: plain C on raw buffers, no Python or torch; dsv3_kernels.cpu builds and loads it
 * together with cpu_fp8.c, and dsv3cli.parallel / dsv3cli.model call it behind one seam each,
 * with torch's matmul as the fallback the tests compare against. Why it exists: at decode sizes
 * (one to a few rows) torch's bfloat16 products on the CPU cost 50-90 us a call (the native
 * kernel is not vectorised for one row; oneDNN has a fixed set-up cost), while the weights
 * stream from cache in a few microseconds. On CPUs without bfloat16 dot products (AVX2 only),
 * torch's bfloat16 products are slow at every size, and these serve the prefill too.
 *
 * Semantics: every product accumulates in float32 lanes, each of 16 consecutive k in one lane
 * (16 lanes, or 8 with AVX2; which k goes to which lane is fixed per instruction set), the
 * lanes summed in a fixed tree, then the k tail in order; bfloat16 results are rounded once (nearest
 * even). Each output element is computed the same way whatever the number of rows, the batch
 * or where it sits in a block, so a row's result never depends on the other rows (MTP
 * verification of T tokens gives the same numbers as T single-token steps).
 *
 * Layouts: row-major with a unit stride in the last dimension; other strides are in elements.
 *   nt: y[g][m][n] = sum_k x[g][m][k] * w[g][n][k]   (a linear layer: w is [N,K])
 *   nn: y[g][m][n] = sum_k x[g][m][k] * w[g][k][n]   (x @ w: w is [K,N])
 */

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

#ifdef DSV3_AVX2
/* vexp (below) in 8 lanes of AVX2 intrinsics: GCC scalarises comparisons of 16-lane generic
 * vectors on AVX2 (measured on Zen 3: 0.17 G/s, against 1.5 G/s this way) */
static inline __m256 vexp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365448f), hi = _mm256_set1_ps(88.7228391f), big = _mm256_set1_ps(12582912.0f);
    __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x)); /* NaN stays NaN */
    __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504f), big), big);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_cvttps_epi32(n), h = _mm256_srai_epi32(e, 1), b127 = _mm256_set1_epi32(127);
    __m256 sh = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, b127), 23));
    __m256 sl = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, h), b127), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, sh), sl);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}
#else
/* lanes of a where m is set (all ones), else of b (m from a vector comparison) */
static inline v16f sel(v16i m, v16f a, v16f b) {
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & m) | (bi & ~m);
    memcpy(&a, &ai, sizeof a);
    return a;
}

/* e^x in 16 lanes, within 1 ulp of exp: x = n ln2 + r (|r| <= ln2/2, ln2 in two parts), e^r by
 * Cephes' degree-7 polynomial, 2^n added to the exponent bits; 0 below -87.34 (where e^x leaves
 * the normal floats), +inf above 88.72. Vectorised because the softmax over the cache and the
 * SwiGLU activations were the part of a few-token forward that grows with the tokens (a scalar
 * expf costs ~20 cycles). */
static inline v16f vexp(v16f x) {
    const v16f lo = (v16f){0} - 87.3365448f, hi = (v16f){0} + 88.7228391f;
    v16f xc = sel(x < lo, lo, sel(x > hi, hi, x));
    v16f n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    v16f r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    v16f p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
              1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* 2^n in two halves, so that n = 128 (x near the top of the range) does not overflow the
     * exponent field */
    v16i e = __builtin_convertvector(n, v16i);
    v16i h = (e >> 1) + 127, l = e - (e >> 1) + 127;
    v16f sh, sl;
    h <<= 23, l <<= 23;
    memcpy(&sh, &h, sizeof sh);
    memcpy(&sl, &l, sizeof sl);
    v16f y = p * sh * sl;
    return sel(x < lo, (v16f){0}, sel(x > hi, (v16f){0} + __builtin_inff(), y));
}

#endif

/* the first n <= 16 floats at p as a vector (zeros after) / stored back */
static inline v16f ld_part(const float *p, int64_t n) {
    v16f v = {0};
    if (n == VL) /* a constant size: vector moves, not a call */
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
static inline void st_part(float *p, v16f v, int64_t n) {
    if (n == VL)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, (size_t)n * sizeof(float));
}
/* how many of n values are left from i, at most 16 (a vector's worth) */
static inline int64_t lanes(int64_t n, int64_t i) { return n - i < VL ? n - i : VL; }

/* Elementwise maps over float32 arrays, through vexp (y may be x):
 *   exp_sub: y = e^(x - sub);  sigmoid: y = 1 / (1 + e^-x);  silu_mul: y = g / (1 + e^-g) * u */
#ifdef DSV3_AVX2
/* 8 lanes at a time: the 16-lane generic vectors go through the stack on AVX2 */
static inline __m256 ld8_part(const float *p, int64_t n) {
    if (n >= 8) return _mm256_loadu_ps(p);
    float b[8] = {0};
    memcpy(b, p, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(b);
}
static inline void st8_part(float *p, __m256 v, int64_t n) {
    if (n >= 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    float b[8];
    _mm256_storeu_ps(b, v);
    memcpy(p, b, (size_t)n * sizeof(float));
}
static inline __m256 neg8(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
static void exp_sub(const float *x, float sub, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
        st8_part(y + i, vexp8(_mm256_sub_ps(ld8_part(x + i, n - i), _mm256_set1_ps(sub))), n - i);
}
static void sigmoid(const float *x, float *y, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8)
        st8_part(y + i, _mm256_div_ps(one, _mm256_add_ps(one, vexp8(neg8(ld8_part(x + i, n - i))))), n - i);
}
static void silu_mul(const float *g, const float *u, float *y, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8) {
        __m256 a = ld8_part(g + i, n - i);
        st8_part(y + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, vexp8(neg8(a)))), ld8_part(u + i, n - i)), n - i);
    }
}
#else
static void exp_sub(const float *x, float sub, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) st_part(y + i, vexp(ld_part(x + i, lanes(n, i)) - sub), lanes(n, i));
}
static void sigmoid(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) st_part(y + i, 1.0f / (1.0f + vexp(-ld_part(x + i, lanes(n, i)))), lanes(n, i));
}
static void silu_mul(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) {
        v16f a = ld_part(g + i, lanes(n, i));
        st_part(y + i, a / (1.0f + vexp(-a)) * ld_part(u + i, lanes(n, i)), lanes(n, i));
    }
}
#endif

/* ---- nt: y = x . w^T, one row of w against MB rows of x at a time -------------------------------- */

/* acc[i * as] = the 16 lane sums of dot(x[i], w) for i < MB (a constant after inlining), each w
 * load serving MB rows; returns where the k tail (summed in order after the lanes, see tail())
 * starts. The weight is read row after row, in memory order: a single sequential stream from
 * DRAM runs at twice the speed of four interleaved short ones (measured: 17 vs 7 GB/s on one
 * core). Every accumulator sees the same operations whatever MB is. */
#define DEFINE_DOTS(SUF, T, LD)                                                                                  \
    static inline __attribute__((always_inline)) int64_t dots_##SUF(const T *x, int64_t ldx, const T *w, int64_t K, \
                                                                    v16f *acc, int64_t as, const int MB) {         \
        for (int i = 0; i < MB; i++) acc[i * as] = (v16f){0};                                                    \
        int64_t k = 0;                                                                                           \
        for (; k + VL <= K; k += VL) {                                                                           \
            v16f wv = LD(w + k);                                                                                 \
            for (int i = 0; i < MB; i++) acc[i * as] += LD(x + i * ldx + k) * wv;                                \
        }                                                                                                        \
        return k;                                                                                                \
    }
DEFINE_DOTS(f32, float, ld_f32)

#ifdef __AVX512BF16__
/* bfloat16 pairs straight into float32 lanes (vdpbf16ps): no conversion of x or w; the k tail is
 * a masked load, zeros adding nothing, so there is no scalar tail */
static inline __attribute__((always_inline)) int64_t dots_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                               int64_t K, v16f *out, int64_t as, const int MB) {
    __m512 acc[4], acc2[4]; /* two chains per row (even and odd 32-wide chunks of k), for MB=1's sake */
    for (int i = 0; i < MB; i++) acc[i] = acc2[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k), wv2 = (__m512bh)_mm512_loadu_si512(w + k + 32);
        for (int i = 0; i < MB; i++) {
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k), wv);
            acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k + 32), wv2);
        }
    }
    for (int i = 0; i < MB; i++) acc[i] = _mm512_add_ps(acc[i], acc2[i]);
    for (; k + 32 <= K; k += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
        for (int i = 0; i < MB; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k), wv);
    }
    if (k < K) {
        __mmask32 tail = (__mmask32)((1u << (K - k)) - 1u);
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k);
        for (int i = 0; i < MB; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i * ldx + k), wv);
    }
    for (int i = 0; i < MB; i++) memcpy(&out[i * as], &acc[i], sizeof(v16f));
    return K;
}
#else
DEFINE_DOTS(bf16, uint16_t, ld_bf16)
#endif

/* s plus the products of the k tail [k, K) of one x row and one w row, in order */
#define DEFINE_TAIL(SUF, T, TO_F32)                                                                              \
    static inline float tail_##SUF(float s, const T *x, const T *w, int64_t k, int64_t K) {                      \
        for (; k < K; k++) s += TO_F32(x[k]) * TO_F32(w[k]);                                                     \
        return s;                                                                                                \
    }
static inline float id_f32(float v) { return v; }
DEFINE_TAIL(f32, float, id_f32)
DEFINE_TAIL(bf16, uint16_t, bf16_f32)

/* y [M,N] (float32, row stride ldy) = x [M,K] (row stride ldx) . w[N,K]^T, x and w of one type;
 * rows of x in blocks of 4, 2, 1, outputs in blocks of 16 (their lane sums reduced together by
 * hsum16), then one by one */
#define NT_ROWS(SUF, MB)                                                                                         \
    for (; m + MB <= M; m += MB) {                                                                               \
        const __typeof__(*x) *xm = x + m * ldx;                                                                  \
        int64_t n = 0;                                                                                           \
        for (; n + VL <= N; n += VL) {                                                                           \
            v16f acc[MB * VL];                                                                                   \
            int64_t k = 0;                                                                                       \
            for (int j = 0; j < VL; j++) k = dots_##SUF(xm, ldx, w + (n + j) * ldw, K, acc + j, VL, MB);         \
            for (int i = 0; i < MB; i++) {                                                                       \
                v16f s = hsum16(acc + i * VL);                                                                   \
                for (int j = 0; j < VL; j++)                                                                     \
                    y[(m + i) * ldy + n + j] = tail_##SUF(s[j], xm + i * ldx, w + (n + j) * ldw, k, K);     \
            }                                                                                                    \
        }                                                                                                        \
        for (; n < N; n++) {                                                                                     \
            v16f acc[MB];                                                                                        \
            int64_t k = dots_##SUF(xm, ldx, w + n * ldw, K, acc, 1, MB);                                         \
            for (int i = 0; i < MB; i++) y[(m + i) * ldy + n] = tail_##SUF(hsum(acc[i]), xm + i * ldx, w + n * ldw, k, K); \
        }                                                                                                        \
    }
#define DEFINE_NT(SUF, T)                                                                                       \
    static void nt_##SUF(const T *x, int64_t ldx, const T *w, int64_t ldw, float *y, int64_t ldy, int64_t M,    \
                         int64_t N, int64_t K) {                                                                 \
        int64_t m = 0;                                                                                           \
        NT_ROWS(SUF, 4)                                                                                          \
        NT_ROWS(SUF, 2)                                                                                          \
        NT_ROWS(SUF, 1)                                                                                          \
    }
#ifndef DSV3_AVX2
DEFINE_NT(f32, float)
DEFINE_NT(bf16, uint16_t)
#endif

/* ---- nn: y = x . w, rows of w scaled and added (x float32, contiguous [M,K]) --------------------- */

/* MB rows of y by NV vectors of 16 columns (constants after inlining): each output a chain of
 * fused multiply-adds over k in order, the MB x NV chains side by side so that they overlap
 * (one chain alone waits on its own latency) and each w load serves MB rows */
#define DEFINE_NN(SUF, W_T, LD_W, W_F32)                                                                        \
    static inline __attribute__((always_inline)) void nn_tile_##SUF(const float *x, int64_t K, const W_T *w,     \
                                                                    int64_t ldw, float *y, int64_t ldy,          \
                                                                    const int MB, const int NV) {                \
        v16f acc[4][4];                                                                                          \
        for (int i = 0; i < MB; i++)                                                                             \
            for (int j = 0; j < NV; j++) acc[i][j] = (v16f){0};                                                  \
        for (int64_t k = 0; k < K; k++) {                                                                        \
            v16f wv[4];                                                                                          \
            for (int j = 0; j < NV; j++) wv[j] = LD_W(w + k * ldw + j * VL);                                     \
            for (int i = 0; i < MB; i++) {                                                                       \
                v16f xv = (v16f){0} + x[i * K + k];                                                              \
                for (int j = 0; j < NV; j++) acc[i][j] += xv * wv[j];                                            \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < MB; i++)                                                                             \
            for (int j = 0; j < NV; j++) memcpy(y + i * ldy + j * VL, &acc[i][j], sizeof(v16f));                 \
    }

/* the nn driver over tiles of COLS columns a vector, NV_MAX vectors at most: rows 4, 2, 1 at a
 * time, the last columns one by one (each a chain over k in order, like a tile's lanes) */
#define DEFINE_NN_DRIVER(SUF, W_T, W_F32, COLS, NV_MAX)                                                         \
    static inline __attribute__((always_inline)) void nn_rows_##SUF(const float *x, const W_T *w, int64_t ldw,   \
                                                                    float *y, int64_t ldy, int64_t N, int64_t K, \
                                                                    const int MB) {                              \
        int64_t n = 0;                                                                                           \
        for (; n + NV_MAX * COLS <= N; n += NV_MAX * COLS) nn_tile_##SUF(x, K, w + n, ldw, y + n, ldy, MB, NV_MAX); \
        switch ((N - n) / COLS) {                                                                                \
        case 3: nn_tile_##SUF(x, K, w + n, ldw, y + n, ldy, MB, 3); break;                                       \
        case 2: nn_tile_##SUF(x, K, w + n, ldw, y + n, ldy, MB, 2); break;                                       \
        case 1: nn_tile_##SUF(x, K, w + n, ldw, y + n, ldy, MB, 1); break;                                       \
        }                                                                                                        \
        for (n += (N - n) / COLS * COLS; n < N; n++)                                                             \
            for (int i = 0; i < MB; i++) {                                                                       \
                float s = 0.0f;                                                                                  \
                for (int64_t k = 0; k < K; k++) s += x[i * K + k] * W_F32(w[k * ldw + n]);                       \
                y[i * ldy + n] = s;                                                                              \
            }                                                                                                    \
    }                                                                                                            \
    static void nn_##SUF(const float *x, const W_T *w, int64_t ldw, float *y, int64_t ldy, int64_t M, int64_t N, \
                         int64_t K) {                                                                            \
        int64_t m = 0;                                                                                           \
        for (; m + 4 <= M; m += 4) nn_rows_##SUF(x + m * K, w, ldw, y + m * ldy, ldy, N, K, 4);                  \
        for (; m + 2 <= M; m += 2) nn_rows_##SUF(x + m * K, w, ldw, y + m * ldy, ldy, N, K, 2);                  \
        for (; m < M; m++) nn_rows_##SUF(x + m * K, w, ldw, y + m * ldy, ldy, N, K, 1);                          \
    }

#ifndef DSV3_AVX2
DEFINE_NN(bf16, uint16_t, ld_bf16, bf16_f32)
DEFINE_NN(f32, float, ld_f32, id_f32)
DEFINE_NN_DRIVER(bf16, uint16_t, bf16_f32, VL, 4)
DEFINE_NN_DRIVER(f32, float, id_f32, VL, 4)
#else
/* ---- the same products with AVX2 intrinsics (DSV3_AVX2) ------------------------------------------ */

/* nt with 8 lanes: each output one 8-lane accumulator, lane j summing its k in order, then the
 * tree v[i] + v[i+4], then + [i+2], then lane 0 + lane 1, then the k tail in order. With one
 * accumulator per output a tile of 2 rows x 4 w rows needs 6 loads for 16 fused multiply-adds
 * (16 lanes in two accumulators: 8 for 8), which is what bounds these loops here (measured on
 * Zen 3: 30 against 17-24 G multiply-adds/s). Which k a lane holds: float32, k = j (mod 8);
 * bfloat16, k = 2j and 2j+1 (mod 16): a 32-bit word holds two consecutive values, so a shift
 * gives the even ones and a mask the odd ones, two operations and no shuffle for 16 values. */
static inline __m256 bf_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 bf_odd(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))); }

/* f32_bf16 of 8 floats, in the low halves of 32-bit lanes */
static inline __m256i bf16_8(const float *p) {
    __m256i u = _mm256_loadu_si256((const __m256i *)p), one = _mm256_set1_epi32(1);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, q, nan);
}

/* the tree over one accumulator's 8 lanes */
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* hsum8 of four accumulators at once (the same tree, the same bits): the levels side by side,
 * two accumulators per vector -> s0, s1, s2, s3 */
static inline __m128 hsum8x4(const __m256 *v) {
    __m256 x = _mm256_add_ps(_mm256_permute2f128_ps(v[0], v[1], 0x20), _mm256_permute2f128_ps(v[0], v[1], 0x31));
    __m256 y = _mm256_add_ps(_mm256_permute2f128_ps(v[2], v[3], 0x20), _mm256_permute2f128_ps(v[2], v[3], 0x31));
    __m256 b = _mm256_add_ps(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 c = _mm256_add_ps(_mm256_shuffle_ps(b, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(b, b, _MM_SHUFFLE(3, 1, 3, 1)));
    /* lanes 0, 1: s0, s2; lanes 4, 5: s1, s3 */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

/* y[i][j] for MB rows of x by NB rows of w (constants after inlining; MB = 2 with NB <= 4, or
 * MB = 1 with NB <= 8: eight accumulators, the rows' 16 values converted once a step) */
#define DEFINE_NT_TILE(SUF, T, LOAD)                                                                             \
    static inline __attribute__((always_inline)) void nt_tile_##SUF(const T *x, int64_t ldx, const T *w,         \
                                                                    int64_t ldw, float *y, int64_t ldy,          \
                                                                    int64_t K, const int MB, const int NB) {     \
        __m256 acc[8];                                                                                           \
        for (int i = 0; i < MB * NB; i++) acc[i] = _mm256_setzero_ps();                                          \
        int64_t k = 0;                                                                                           \
        for (; k + 16 <= K; k += 16) {                                                                           \
            __m256 xl[2], xh[2];                                                                                 \
            for (int i = 0; i < MB; i++) LOAD(x + i * ldx + k, xl[i], xh[i]);                                    \
            for (int j = 0; j < NB; j++) {                                                                       \
                __m256 wl, wh;                                                                                   \
                LOAD(w + j * ldw + k, wl, wh);                                                                   \
                for (int i = 0; i < MB; i++)                                                                     \
                    acc[i * NB + j] = _mm256_fmadd_ps(xh[i], wh, _mm256_fmadd_ps(xl[i], wl, acc[i * NB + j]));   \
            }                                                                                                    \
        }                                                                                                        \
        float sum[8];                                                                                            \
        for (int i = 0; i + 4 <= MB * NB; i += 4) _mm_storeu_ps(sum + i, hsum8x4(acc + i));                      \
        for (int i = MB * NB / 4 * 4; i < MB * NB; i++) sum[i] = hsum8(acc[i]);                                  \
        for (int i = 0; i < MB; i++)                                                                             \
            for (int j = 0; j < NB; j++)                                                                         \
                y[i * ldy + j] = tail_##SUF(sum[i * NB + j], x + i * ldx, w + j * ldw, k, K);                    \
    }
#define LOAD_F32(p, l, h) (l = _mm256_loadu_ps(p), h = _mm256_loadu_ps((p) + 8))
#define LOAD_BF16(p, l, h)                                                                                       \
    do {                                                                                                         \
        __m256i v_ = _mm256_loadu_si256((const __m256i *)(p));                                                   \
        l = bf_even(v_), h = bf_odd(v_);                                                                         \
    } while (0)
DEFINE_NT_TILE(f32, float, LOAD_F32)
DEFINE_NT_TILE(bf16, uint16_t, LOAD_BF16)
/* each tile shape a function of its own: inlined into one loop nest, the shapes' register
 * allocations interfered (the 1 x 8 loop spilled pointers and vectors to the stack) */
#define NT_TILE_FN(SUF, T, MB, NB)                                                                               \
    static __attribute__((noinline)) void nt_##SUF##_##MB##x##NB(const T *x, int64_t ldx, const T *w,          \
                                                                 int64_t ldw, float *y, int64_t ldy, int64_t K) { \
        nt_tile_##SUF(x, ldx, w, ldw, y, ldy, K, MB, NB);                                                        \
    }
#define NT_TILE_TABLE(SUF, T)                                                                                   \
    NT_TILE_FN(SUF, T, 2, 1) NT_TILE_FN(SUF, T, 2, 2) NT_TILE_FN(SUF, T, 2, 3) NT_TILE_FN(SUF, T, 2, 4)         \
    NT_TILE_FN(SUF, T, 1, 1) NT_TILE_FN(SUF, T, 1, 2) NT_TILE_FN(SUF, T, 1, 3) NT_TILE_FN(SUF, T, 1, 4)         \
    NT_TILE_FN(SUF, T, 1, 5) NT_TILE_FN(SUF, T, 1, 6) NT_TILE_FN(SUF, T, 1, 7) NT_TILE_FN(SUF, T, 1, 8)         \
    typedef void (*nt_tile_fn_##SUF)(const T *, int64_t, const T *, int64_t, float *, int64_t, int64_t);          \
    static const nt_tile_fn_##SUF nt_tiles_##SUF[2][8] = {                                                       \
        {nt_##SUF##_1x1, nt_##SUF##_1x2, nt_##SUF##_1x3, nt_##SUF##_1x4, nt_##SUF##_1x5, nt_##SUF##_1x6,         \
         nt_##SUF##_1x7, nt_##SUF##_1x8},                                                                        \
        {nt_##SUF##_2x1, nt_##SUF##_2x2, nt_##SUF##_2x3, nt_##SUF##_2x4}};
NT_TILE_TABLE(f32, float)
NT_TILE_TABLE(bf16, uint16_t)

/* y [M,N] = x [M,K] . w [N,K]^T: rows in panels whose x stays in L2; in a panel, blocks of 8 w
 * rows (kept in L1 while the panel's rows pass), rows two at a time against 4 of them, a last
 * odd row against all 8 */
#define DEFINE_NT_AVX2(SUF, T)                                                                                  \
    static void nt_##SUF(const T *x, int64_t ldx, const T *w, int64_t ldw, float *y, int64_t ldy, int64_t M,    \
                         int64_t N, int64_t K) {                                                                 \
        int64_t panel = (int64_t)(128 * 1024 / sizeof(T)) / (K > 0 ? K : 1);                                     \
        panel = panel < 2 ? 2 : panel;                                                                           \
        for (int64_t m0 = 0; m0 < M; m0 += panel) {                                                              \
            int64_t m1 = m0 + panel < M ? m0 + panel : M;                                                        \
            for (int64_t n0 = 0; n0 < N; n0 += 8) {                                                              \
                int64_t nw = N - n0 < 8 ? N - n0 : 8, m = m0;                                                    \
                for (; m + 2 <= m1; m += 2)                                                                      \
                    for (int64_t j = 0; j < nw; j += 4) {                                                        \
                        int64_t nb = nw - j < 4 ? nw - j : 4;                                                    \
                        nt_tiles_##SUF[1][nb - 1](x + m * ldx, ldx, w + (n0 + j) * ldw, ldw, y + m * ldy + n0 + j, ldy, K); \
                    }                                                                                            \
                if (m < m1) nt_tiles_##SUF[0][nw - 1](x + m * ldx, ldx, w + n0 * ldw, ldw, y + m * ldy + n0, ldy, K); \
            }                                                                                                    \
        }                                                                                                        \
    }
DEFINE_NT_AVX2(f32, float)
DEFINE_NT_AVX2(bf16, uint16_t)

/* nn: each output one chain of fused multiply-adds over k in order, as in the generic code (the
 * same bits); tiles of MB rows by NV vectors of 8 columns, MB * NV <= 12 accumulators */
static inline __m256 ld8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#define DEFINE_NN_AVX2(SUF, W_T)                                                                                 \
    static inline __attribute__((always_inline)) void nn_tile_##SUF(const float *x, int64_t K, const W_T *w,     \
                                                                    int64_t ldw, float *y, int64_t ldy,          \
                                                                    const int MB, const int NV) {                \
        __m256 acc[12];                                                                                          \
        for (int i = 0; i < MB * NV; i++) acc[i] = _mm256_setzero_ps();                                          \
        for (int64_t k = 0; k < K; k++) {                                                                        \
            __m256 wv[3];                                                                                        \
            for (int j = 0; j < NV; j++) wv[j] = ld8_##SUF(w + k * ldw + j * 8);                                 \
            for (int i = 0; i < MB; i++) {                                                                       \
                __m256 xv = _mm256_broadcast_ss(x + i * K + k);                                                  \
                for (int j = 0; j < NV; j++) acc[i * NV + j] = _mm256_fmadd_ps(xv, wv[j], acc[i * NV + j]);      \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < MB; i++)                                                                             \
            for (int j = 0; j < NV; j++) _mm256_storeu_ps(y + i * ldy + j * 8, acc[i * NV + j]);                 \
    }
DEFINE_NN_AVX2(bf16, uint16_t)
DEFINE_NN_AVX2(f32, float)
DEFINE_NN_DRIVER(bf16, uint16_t, bf16_f32, 8, 3)
DEFINE_NN_DRIVER(f32, float, id_f32, 8, 3)
#endif

/* x [M,K] with row stride ldx, in bfloat16 or float32 -> contiguous float32 */
static void to_f32(const void *x, int bf16, int64_t ldx, int64_t M, int64_t K, float *out) {
    for (int64_t m = 0; m < M; m++) {
        if (bf16) {
            const uint16_t *r = (const uint16_t *)x + m * ldx;
            for (int64_t k = 0; k < K; k++) out[m * K + k] = bf16_f32(r[k]);
        } else {
            memcpy(out + m * K, (const float *)x + m * ldx, (size_t)K * sizeof(float));
        }
    }
}

static void store(const float *v, void *y, int bf16, int64_t n) {
    if (bf16) {
        uint16_t *o = (uint16_t *)y;
        int64_t i = 0;
#ifdef DSV3_AVX2
        for (; i + 16 <= n; i += 16) /* f32_bf16, 16 at a time */
            _mm256_storeu_si256((__m256i *)(o + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_8(v + i), bf16_8(v + i + 8)), 0xd8));
#endif
        for (; i < n; i++) o[i] = f32_bf16(v[i]);
    } else {
        memcpy(y, v, (size_t)n * sizeof(float));
    }
}

/* B x H independent products (nt or nn, see the top), x, w and y all bfloat16 (bf16=1) or all
 * float32, M x K by K x N each. Strides in elements: x (sxb, sxh, sxm), w (swb, swh, sw: between
 * w's rows), y (syb, syh, sym); a stride of 0 repeats a matrix (w shared by the batch).
 * Returns 0, or -1 when scratch memory cannot be had (nothing is written then). */
int64_t dsv3_gemm(int bf16, int nn, const void *x, const void *w, void *y, int64_t B, int64_t H, int64_t M, int64_t N,
                  int64_t K, int64_t sxb, int64_t sxh, int64_t sxm, int64_t swb, int64_t swh, int64_t sw, int64_t syb,
                  int64_t syh, int64_t sym) {
    float *xf = malloc((size_t)(M * K + M * N) * sizeof(float) + 64);
    if (!xf) return -1;
    float *yf = xf + M * K;
    size_t es = bf16 ? 2 : 4;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const char *xg = (const char *)x + (b * sxb + h * sxh) * es, *wg = (const char *)w + (b * swb + h * swh) * es;
            if (nn) {
                to_f32(xg, bf16, sxm, M, K, xf);
                if (bf16)
                    nn_bf16(xf, (const uint16_t *)wg, sw, yf, N, M, N, K);
                else
                    nn_f32(xf, (const float *)wg, sw, yf, N, M, N, K);
            } else if (bf16) {
                nt_bf16((const uint16_t *)xg, sxm, (const uint16_t *)wg, sw, yf, N, M, N, K);
            } else {
                nt_f32((const float *)xg, sxm, (const float *)wg, sw, yf, N, M, N, K);
            }
            for (int64_t m = 0; m < M; m++) store(yf + m * N, (char *)y + (b * syb + h * syh + m * sym) * es, bf16, N);
        }
    free(xf);
    return 0;
}

/* out [r,D] (float32) = down(silu(gate xs) * up xs) for r gathered rows xs [r,D]; gate and up
 * [I,D] (gate and up rows), down [D,I]; scratch gu [ROWS,2I], act [ROWS,I] floats. */
static void swiglu_rows(int bf16, const void *xs, int64_t r, int64_t D, const void *wg, const void *wu, const void *wd,
                        int64_t I, float *gu, float *act, float *out) {
    uint16_t *act16 = (uint16_t *)act; /* the same memory, as a bfloat16 product's input */
    if (bf16) {
        nt_bf16(xs, D, wg, D, gu, 2 * I, r, I, D);
        nt_bf16(xs, D, wu, D, gu + I, 2 * I, r, I, D);
    } else {
        nt_f32(xs, D, wg, D, gu, 2 * I, r, I, D);
        nt_f32(xs, D, wu, D, gu + I, 2 * I, r, I, D);
    }
    for (int64_t j = 0; j < r; j++) {
        const float *g = gu + j * 2 * I;
        if (!bf16) {
            silu_mul(g, g + I, act + j * I, I);
            continue;
        }
        for (int64_t i = 0; i < I; i += 256) { /* through a float buffer: act16 shares act's memory */
            float a[256];
            int64_t c = I - i < 256 ? I - i : 256;
            silu_mul(g + i, g + I + i, a, c);
            store(a, act16 + j * I + i, 1, c);
        }
    }
    if (bf16)
        nt_bf16(act16, I, wd, I, out, D, r, D, I);
    else
        nt_f32(act, I, wd, I, out, D, r, D, I);
}

/* A MoE layer's experts for N tokens (the router's choices given):
 *   y[n] = shared(x[n]) + sum over k with lo <= idx[n][k] < hi of
 *          wt[n][k] * down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n][k] - lo
 * w13 [E_local, 2I, D] (gate rows then up rows), w2 [E_local, D, I]; the shared expert (this
 * rank's part; none when sg is NULL): gate sg and up su [Is,D], down sd [D,Is]. x, y [N,D] and
 * the weights all bfloat16 (bf16=1) or all float32; idx int64 [N,Kx]; wt float32 [N,Kx].
 * Expert by expert, its tokens gathered in groups of up to ROWS, so each weight row is read once
 * per group. The hidden activations stay float32 (rounded to bfloat16 as the input of a
 * bfloat16 product), and y accumulates in float32, rounded once at the end; with out_f32, y is
 * float32 and gets the sums unrounded (a part of the experts, for dsv3_sum_f32). Returns 0, or
 * -1 when scratch memory cannot be had (y is untouched then). */
#define ROWS 16
int64_t dsv3_moe(int bf16, const void *x, const int64_t *idx, const float *wt, const void *w13, const void *w2, void *y,
                 int64_t N, int64_t Kx, int64_t D, int64_t I, int64_t lo, int64_t hi, const void *sg, const void *su,
                 const void *sd, int64_t Is, int out_f32) {
    size_t es = bf16 ? 2 : 4;
    int64_t Im = sg && Is > I ? Is : I, nacc = out_f32 ? 0 : N * D;
    float *buf = malloc((size_t)(nacc + ROWS * (3 * Im + D)) * sizeof(float) + (size_t)ROWS * D * es);
    if (!buf) return -1;
    float *acc = out_f32 ? (float *)y : buf, *gu = buf + nacc, *act = gu + ROWS * 2 * Im, *out = act + ROWS * Im;
    char *xs = (char *)(out + ROWS * D); /* the group's token rows, gathered */
    int64_t tok[ROWS];
    float scale[ROWS];
    memset(acc, 0, (size_t)(N * D) * sizeof(float));
    for (int64_t e = lo - (sg != NULL); e < hi; e++) { /* e = lo - 1: the shared expert, every token */
        const char *wg, *wu, *wd;
        int64_t Ie = e < lo ? Is : I;
        if (e < lo) {
            wg = sg, wu = su, wd = sd;
        } else {
            wg = (const char *)w13 + (e - lo) * 2 * I * D * es, wu = wg + I * D * es;
            wd = (const char *)w2 + (e - lo) * D * I * es;
        }
        int64_t n = 0;
        while (n < N) {
            int64_t r = 0;
            for (; n < N && r < ROWS; n++)
                for (int64_t k = 0; k < (e < lo ? 1 : Kx); k++)
                    if (e < lo || idx[n * Kx + k] == e) {
                        tok[r] = n, scale[r] = e < lo ? 1.0f : wt[n * Kx + k];
                        memcpy(xs + r * D * es, (const char *)x + n * D * es, (size_t)D * es);
                        r++;
                        break; /* an expert appears once in a token's choices */
                    }
            if (r == 0) break;
            swiglu_rows(bf16, xs, r, D, wg, wu, wd, Ie, gu, act, out);
            for (int64_t j = 0; j < r; j++)
                for (int64_t d = 0; d < D; d++) acc[tok[j] * D + d] += scale[j] * out[j * D + d];
        }
    }
    if (!out_f32) store(acc, y, bf16, N * D);
    free(buf);
    return 0;
}

/* y[i] = round(parts[0][i] + parts[1][i] + ... + parts[P-1][i]), added left to right in float32
 * (parts [P,n]; y bfloat16 when bf16=1, else float32): dsv3_moe's parts put together */
void dsv3_sum_f32(const float *parts, int64_t P, int64_t n, void *y, int bf16) {
    float buf[1024];
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        int64_t c = n - i0 < 1024 ? n - i0 : 1024;
        memcpy(buf, parts + i0, (size_t)c * sizeof(float));
        for (int64_t p = 1; p < P; p++)
            for (int64_t i = 0; i < c; i++) buf[i] += parts[p * n + i0 + i];
        store(buf, (char *)y + i0 * (bf16 ? 2 : 4), bf16, c);
    }
}

/* index of the largest v[i] among allowed ones (-1 if none); ties go to the lowest index */
static int64_t argmax_allowed(const float *v, const unsigned char *allowed, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* DeepSeek-V3's router (noaux_tc, sigmoid scores) for N tokens: logits = x . wg^T (float32,
 * wg [E,D]); s = sigmoid(logits); selection on s + bias (bias may be NULL): the TG of G groups
 * with the largest sum of their top two, then the top K experts inside them, best first; the
 * weights are s at the chosen experts, divided by their sum (+1e-20) when norm, times scale.
 * x [N,D] bfloat16 (bf16=1) or float32; idx int64 [N,K] and wt float32 [N,K] are written.
 * Returns 0, or -1 when scratch memory cannot be had. */
int64_t dsv3_route(int bf16, const void *x, const float *wg, const float *bias, int64_t N, int64_t D, int64_t E,
                   int64_t G, int64_t TG, int64_t K, int norm, float scale, int64_t *idx, float *wt) {
    float *xf = malloc((size_t)(D + 3 * E + G) * sizeof(float) + (size_t)(E + G));
    if (!xf) return -1;
    float *s = xf + D, *sb = s + E, *gs = sb + E;
    unsigned char *ok = (unsigned char *)(gs + G), *gok = ok + E;
    int64_t per = E / G;
    for (int64_t n = 0; n < N; n++) {
        to_f32((const char *)x + n * D * (bf16 ? 2 : 4), bf16, D, 1, D, xf);
        nt_f32(xf, D, wg, D, s, E, 1, E, D);
        sigmoid(s, s, E);
        for (int64_t e = 0; e < E; e++) {
            sb[e] = bias ? s[e] + bias[e] : s[e];
            ok[e] = 1;
        }
        if (G > 1) {
            for (int64_t g = 0; g < G; g++) {
                const float *v = sb + g * per;
                int64_t a = 0;
                for (int64_t i = 1; i < per; i++) a = v[i] > v[a] ? i : a;
                int64_t b = a == 0 ? 1 : 0;
                for (int64_t i = 0; i < per; i++) b = i != a && v[i] > v[b] ? i : b;
                gs[g] = v[a] + v[b];
                gok[g] = 1;
            }
            memset(ok, 0, (size_t)E);
            for (int64_t t = 0; t < TG; t++) {
                int64_t g = argmax_allowed(gs, gok, G);
                gok[g] = 0;
                memset(ok + g * per, 1, (size_t)per);
            }
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int64_t e = argmax_allowed(sb, ok, E);
            ok[e] = 0;
            idx[n * K + k] = e;
            wt[n * K + k] = s[e];
            sum += s[e];
        }
        for (int64_t k = 0; k < K; k++) wt[n * K + k] = (norm ? wt[n * K + k] / (sum + 1e-20f) : wt[n * K + k]) * scale;
    }
    free(xf);
    return 0;
}
/* v rounded to bfloat16 when bf16 (stored as float), else v */
static inline float rnd(int bf16, float v) { return bf16 ? bf16_f32(f32_bf16(v)) : v; }
static inline float get(int bf16, const void *p, int64_t i) {
    return bf16 ? bf16_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void put(int bf16, void *p, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* one row of D: y = round(x / sqrt(mean(x^2) + eps) * w) (see dsv3_rmsnorm) */
static void rmsnorm_row(int bf16, const void *x, const float *w, int64_t D, float eps, void *y) {
    float ss = 0.0f;
    for (int64_t d = 0; d < D; d++) ss += get(bf16, x, d) * get(bf16, x, d);
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t d = 0; d < D; d++) put(bf16, y, d, get(bf16, x, d) * inv * w[d]);
}

/* Rotate interleaved pairs of n values: (x0 c - x1 s, x1 c + x0 s), with one position's rows of
 * the model's tables: cos (each pair's cos twice) and ssin ((-sin, +sin) per pair). */
static void rope(const float *x, const float *cos, const float *ssin, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i += 2) {
        out[i] = x[i] * cos[i] + x[i + 1] * ssin[i];
        out[i + 1] = x[i + 1] * cos[i + 1] + x[i] * ssin[i + 1];
    }
}

/* The cache entries of sequence b's T tokens (the RMSNorm'd latent, the roped key), at their
 * positions; kva, pos and cache as in dsv3_mla */
static void mla_write(int bf16, const void *kva, const float *normw, float eps, const float *cos, const float *ssin,
                      const int64_t *pos, void *cache, int64_t maxS, int64_t b, int64_t T, int64_t C, int64_t R) {
    size_t es = bf16 ? 2 : 4;
    int64_t CR = C + R;
    char *cb = (char *)cache + b * maxS * CR * es;
    for (int64_t t = 0; t < T; t++) {
        const char *src = (const char *)kva + (b * T + t) * CR * es;
        int64_t p = pos[b * T + t];
        rmsnorm_row(bf16, src, normw, C, eps, cb + p * CR * es);
        float kp[R > 0 ? R : 1], kr[R > 0 ? R : 1];
        for (int64_t r = 0; r < R; r++) kp[r] = get(bf16, src, C + r);
        rope(kp, cos + p * R, ssin + p * R, R, kr);
        for (int64_t r = 0; r < R; r++) put(bf16, cb + p * CR * es, C + r, kr[r]);
    }
}

#define MLA_WRITE 1
#define MLA_ATTEND 2
/* Absorbed multi-head latent attention for a few new tokens, one call per layer: writes the
 * tokens' cache entries (RMSNorm'd latent, roped key) at their positions, then for every token
 * and head: q_abs = q_nope . Wk[h], scores over the cache positions 0..pos (the causal mask),
 * softmax, the latent mix, and its projection by Wv[h]. The same steps and roundings as
 * MLA.forward's torch path (each intermediate rounded to the compute dtype where that path
 * rounds it: q, probabilities, the latent mix), through the same small products.
 *   q [B,T,H,nope+R], kva [B,T,C+R] (kv_a_proj's output), normw float32 [C], cos/ssin float32
 *   [maxS,R] (the model's whole tables, read at the tokens' positions), pos int64 [B,T], cache
 *   [maxB,maxS,C+R], wkv [H,nope+vdim,C] (kv_b_proj), out [B,T,H,vdim]; tensors bfloat16
 *   (bf16=1) or float32, all contiguous.
 * mode: MLA_WRITE | MLA_ATTEND (1 | 2) for both steps; MLA_WRITE alone writes the entries of all
 * tokens, MLA_ATTEND alone reads them (a long prefill: the entries once, then its tokens'
 * attention in parts, on several threads).
 * Returns 0, or -1 when scratch memory cannot be had (nothing is written then). */
int64_t dsv3_mla(int bf16, const void *q, const void *kva, const float *normw, float eps, const float *cos,
                 const float *ssin, const int64_t *pos, void *cache, int64_t maxS, const void *wkv, float scale, void *out,
                 int64_t B, int64_t T, int64_t H, int64_t nope, int64_t R, int64_t C, int64_t vdim, int64_t mode) {
    size_t es = bf16 ? 2 : 4;
    int64_t QK = nope + R, CR = C + R, S = 0;
    if (!(mode & MLA_ATTEND)) {
        for (int64_t b = 0; b < B; b++) mla_write(bf16, kva, normw, eps, cos, ssin, pos, cache, maxS, b, T, C, R);
        return 0;
    }
    for (int64_t i = 0; i < B * T; i++) S = pos[i] + 1 > S ? pos[i] + 1 : S;
    int64_t M = H * T;
    size_t nf = (size_t)(M * nope + M * C + M * S + M * vdim + (M * CR + M * C) * 2);
    float *tmp = malloc(nf * sizeof(float));
    if (!tmp) return -1;
    float *qn = tmp, *qa = qn + M * nope, *sc = qa + M * C, *yo = sc + M * S;
    char *qcat = (char *)(yo + M * vdim), *lat = qcat + M * CR * es; /* in the compute dtype */
    float *lf = (float *)(lat + M * C * es);
    for (int64_t b = 0; b < B; b++) {
        char *cb = (char *)cache + b * maxS * CR * es;
        if (mode & MLA_WRITE) mla_write(bf16, kva, normw, eps, cos, ssin, pos, cache, maxS, b, T, C, R);
        /* q_cat rows (h, t): [q_nope . Wk[h] | rope(q_pe)] * scale */
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const char *qs = (const char *)q + ((b * T + t) * H + h) * QK * es;
                for (int64_t d = 0; d < nope; d++) qn[(h * T + t) * nope + d] = get(bf16, qs, d);
                float qp[R > 0 ? R : 1], qr[R > 0 ? R : 1];
                int64_t p = pos[b * T + t];
                for (int64_t r = 0; r < R; r++) qp[r] = get(bf16, qs, nope + r);
                rope(qp, cos + p * R, ssin + p * R, R, qr);
                for (int64_t r = 0; r < R; r++) put(bf16, qcat + (h * T + t) * CR * es, C + r, rnd(bf16, qr[r]) * scale);
            }
        for (int64_t h = 0; h < H; h++) {
            const char *wk = (const char *)wkv + h * (nope + vdim) * C * es;
            if (bf16)
                nn_bf16(qn + h * T * nope, (const uint16_t *)wk, C, qa + h * T * C, C, T, C, nope);
            else
                nn_f32(qn + h * T * nope, (const float *)wk, C, qa + h * T * C, C, T, C, nope);
        }
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < C; c++) put(bf16, qcat + m * CR * es, c, rnd(bf16, qa[m * C + c]) * scale);
        if (bf16)
            nt_bf16((const uint16_t *)qcat, CR, (const uint16_t *)cb, CR, sc, S, M, S, CR);
        else
            nt_f32((const float *)qcat, CR, (const float *)cb, CR, sc, S, M, S, CR);
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) { /* softmax over 0..pos, zeros after */
                float *r = sc + (h * T + t) * S;
                int64_t n = pos[b * T + t] + 1;
                float mx = r[0], sum = 0.0f;
                for (int64_t j = 1; j < n; j++) mx = r[j] > mx ? r[j] : mx;
                exp_sub(r, mx, r, n);
                for (int64_t j = 0; j < n; j++) sum += r[j];
                for (int64_t j = 0; j < n; j++) r[j] = rnd(bf16, r[j] / sum);
                for (int64_t j = n; j < S; j++) r[j] = 0.0f;
            }
        if (bf16)
            nn_bf16(sc, (const uint16_t *)cb, CR, lf, C, M, C, S);
        else
            nn_f32(sc, (const float *)cb, CR, lf, C, M, C, S);
        for (int64_t i = 0; i < M * C; i++) put(bf16, lat, i, lf[i]);
        for (int64_t h = 0; h < H; h++) {
            const char *wv = (const char *)wkv + (h * (nope + vdim) + nope) * C * es;
            if (bf16)
                nt_bf16((const uint16_t *)(lat + h * T * C * es), C, (const uint16_t *)wv, C, yo, vdim, T, vdim, C);
            else
                nt_f32((const float *)(lat + h * T * C * es), C, (const float *)wv, C, yo, vdim, T, vdim, C);
            for (int64_t t = 0; t < T; t++)
                for (int64_t v = 0; v < vdim; v++) put(bf16, (char *)out + ((b * T + t) * H + h) * vdim * es, v, yo[t * vdim + v]);
        }
    }
    free(tmp);
    return 0;
}

/* RMSNorm of `rows` rows of D: y = round(x / sqrt(mean(x^2) + eps) * w), in float32 (x, y
 * bfloat16 when bf16=1, else float32; x rows ld apart, y contiguous; w float32 [D]). */
void dsv3_rmsnorm(int bf16, const void *x, int64_t ldx, const float *w, void *y, int64_t rows, int64_t D, float eps) {
    size_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) rmsnorm_row(bf16, (const char *)x + r * ldx * es, w, D, eps, (char *)y + r * D * es);
}

/* The MTP module's entry for `rows` tokens, all bfloat16 but the norms' float32 weights:
 * y = eh_proj([enorm(embed[tok]) | hnorm(h)]) with embed [V,D], h and y [rows,D], w [D,2D]. The
 * same steps and roundings as RMSNorm, cat and a linear one after the other (each norm rounded to
 * bfloat16, then one product like dsv3_gemm's), in one call. Returns 0, -1 when scratch memory
 * cannot be had, or -2 for a token id outside 0..V-1 (nothing is written then). */
int64_t dsv3_mtp_entry(const int64_t *tok, const uint16_t *embed, int64_t V, const uint16_t *h, const float *enw,
                       float eeps, const float *hnw, float heps, const uint16_t *w, uint16_t *y, int64_t rows, int64_t D) {
    for (int64_t r = 0; r < rows; r++)
        if (tok[r] < 0 || tok[r] >= V) return -2;
    uint16_t *cat = malloc((size_t)(rows * 2 * D) * 2 + (size_t)(rows * D) * sizeof(float));
    if (!cat) return -1;
    float *yf = (float *)(cat + rows * 2 * D);
    for (int64_t r = 0; r < rows; r++) {
        rmsnorm_row(1, embed + tok[r] * D, enw, D, eeps, cat + r * 2 * D);
        rmsnorm_row(1, h + r * D, hnw, D, heps, cat + r * 2 * D + D);
    }
    nt_bf16(cat, 2 * D, w, 2 * D, yf, D, rows, D, 2 * D);
    store(yf, y, 1, rows * D);
    free(cat);
    return 0;
}

int dsv3_native_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* y = e^x for n float32 values, through vexp (exposed so its accuracy can be tested) */
void dsv3_exp(const float *x, float *y, int64_t n) { exp_sub(x, 0.0f, y, n); }
