/* Matrix products on the CPU for the model's forwards: few rows (decode, MTP verification), and
 * every size on CPUs without bfloat16 dot products (AVX2 only), where torch's bfloat16 products
 * are slow at every size.
 *
 * Boundary: plain C on raw buffers, no Python or torch; dsv3_kernels.cpu builds it per
 * instruction set (with cpu_ops.c, which builds the model operations on these products, and
 * cpu_fp8.c) and dsv3cli.ops calls it behind one seam, with torch's matmul as the reference the
 * tests compare against. Why it exists: at decode sizes (one to a few rows) torch's bfloat16
 * products on the CPU cost 50-90 us a call (the native kernel is not vectorised for one row;
 * oneDNN has a fixed set-up cost), while the weights stream from cache in a few microseconds.
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

#define _GNU_SOURCE /* syscall(), for dsv3_amx_init */
#include "cpu_vec.h"

/* ---- nt: y = x . w^T, one row of w against MB rows of x at a time -------------------------------- */

/* acc[i * as] = the 16 lane sums of dot(x[i], w) for i < MB (a constant after inlining), each w
 * load serving MB rows; returns where the k tail (summed in order after the lanes, see tail())
 * starts. The weight is read row after row, in memory order: a single sequential stream from
 * DRAM runs at twice the speed of four interleaved short ones (measured: 17 vs 7 GB/s on one
 * core). Every accumulator sees the same operations whatever MB is. */
#define DEFINE_DOTS(SUF, TX, TW, LDX, LDW)                                                                       \
    static inline __attribute__((always_inline)) int64_t dots_##SUF(const TX *x, int64_t ldx, const TW *w, int64_t K, \
                                                                    v16f *acc, int64_t as, const int MB) {         \
        for (int i = 0; i < MB; i++) acc[i * as] = (v16f){0};                                                    \
        int64_t k = 0;                                                                                           \
        for (; k + VL <= K; k += VL) {                                                                           \
            v16f wv = LDW(w + k);                                                                                \
            for (int i = 0; i < MB; i++) acc[i * as] += LDX(x + i * ldx + k) * wv;                               \
        }                                                                                                        \
        return k;                                                                                                \
    }
DEFINE_DOTS(f32, float, float, ld_f32, ld_f32)
DEFINE_DOTS(fp8, float, uint8_t, ld_f32, ld_fp8)

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
DEFINE_DOTS(bf16, uint16_t, uint16_t, ld_bf16, ld_bf16)
#endif

/* s plus the products of the k tail [k, K) of one x row and one w row, in order */
/* a * b rounded on its own: never fused into the addition that follows (which fp-contract=fast
 * would otherwise decide case by case), so every tail sums its products the same way */
static inline float mul_rn(float a, float b) {
    float p = a * b;
#if defined(__SSE__)
    __asm__("" : "+x"(p));
#else
    __asm__("" : "+m"(p));
#endif
    return p;
}
#define DEFINE_TAIL(SUF, TX, TW, XF, WF)                                                                         \
    static inline float tail_##SUF(float s, const TX *x, const TW *w, int64_t k, int64_t K) {                    \
        for (; k < K; k++) s += mul_rn(XF(x[k]), WF(w[k]));                                                      \
        return s;                                                                                                \
    }
static inline float id_f32(float v) { return v; }
DEFINE_TAIL(f32, float, float, id_f32, id_f32)
DEFINE_TAIL(bf16, uint16_t, uint16_t, bf16_f32, bf16_f32)
DEFINE_TAIL(fp8, float, uint8_t, id_f32, fp8_f32)

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
#define DEFINE_NT(SUF, TX, TW)                                                                                  \
    DSV3_HIDDEN void nt_##SUF(const TX *x, int64_t ldx, const TW *w, int64_t ldw, float *y, int64_t ldy, int64_t M,  \
                         int64_t N, int64_t K) {                                                                 \
        int64_t m = 0;                                                                                           \
        NT_ROWS(SUF, 4)                                                                                          \
        NT_ROWS(SUF, 2)                                                                                          \
        NT_ROWS(SUF, 1)                                                                                          \
    }
#ifndef DSV3_AVX2
DEFINE_NT(f32, float, float)
DEFINE_NT(bf16, uint16_t, uint16_t)
#endif
#if !defined(DSV3_AVX2) && !defined(__AVX512F__)
DEFINE_NT(fp8, float, uint8_t)
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
 * time, the last columns one by one (each a chain over k in order, like a tile's lanes; fma_rn,
 * because as `s += x * w` GCC vectorised the loop for AVX-512 as an in-order sum of unfused
 * products at some K and kept the fused scalar loop at others: a token's attention then
 * depended on how many cache positions the call covered) */
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
                for (int64_t k = 0; k < K; k++) s = fma_rn(x[i * K + k], W_F32(w[k * ldw + n]), s);             \
                y[i * ldy + n] = s;                                                                              \
            }                                                                                                    \
    }                                                                                                            \
    DSV3_HIDDEN void nn_##SUF(const float *x, const W_T *w, int64_t ldw, float *y, int64_t ldy, int64_t M, int64_t N, \
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
 * gives the even ones and a mask the odd ones, two operations and no shuffle for 16 values.
 * FP8 the same as bfloat16 (fp8_pairs; fp8_product puts x in that order). */
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
 * MB = 1 with NB <= 8: eight accumulators, the rows' 16 values converted once a step). With PF
 * each step also prefetches its share of the next NB rows, in memory order: where the conversion
 * slows the reading (FP8), the hardware prefetchers do not keep NB interleaved streams of short
 * rows ahead (one-row FP8 products over rows of 1536 and 2048 codes ran 1.6-1.8x slower without;
 * bfloat16, read at the memory's speed, runs 2-30% slower with it). */
#define DEFINE_NT_TILE(SUF, TX, TW, LOADX, LOADW, PF)                                                            \
    static inline __attribute__((always_inline)) void nt_tile_##SUF(const TX *x, int64_t ldx, const TW *w,       \
                                                                    int64_t ldw, float *y, int64_t ldy,          \
                                                                    int64_t K, const int MB, const int NB) {     \
        __m256 acc[8];                                                                                           \
        for (int i = 0; i < MB * NB; i++) acc[i] = _mm256_setzero_ps();                                          \
        int64_t k = 0;                                                                                           \
        const char *next = (const char *)(w + NB * ldw);                                                         \
        for (; k + 16 <= K; k += 16) {                                                                           \
            __m256 xl[2], xh[2];                                                                                 \
            for (int b = 0; PF && b < NB * 16 * (int)sizeof(TW); b += 64)                                        \
                _mm_prefetch(next + k * NB * (int64_t)sizeof(TW) + b, _MM_HINT_T0);                              \
            for (int i = 0; i < MB; i++) LOADX(x + i * ldx + k, xl[i], xh[i]);                                   \
            for (int j = 0; j < NB; j++) {                                                                       \
                __m256 wl, wh;                                                                                   \
                LOADW(w + j * ldw + k, wl, wh);                                                                  \
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
#define LOAD_FP8(p, l, h) /* the even k, then the odd ones (x in pair order: fp8_product) */                  \
    do {                                                                                                         \
        __m128i a_, b_;                                                                                          \
        fp8_pairs(_mm_loadu_si128((const __m128i *)(p)), &a_, &b_);                                              \
        l = _mm256_cvtph_ps(a_), h = _mm256_cvtph_ps(b_);                                                        \
    } while (0)
#define LOAD_BF16(p, l, h)                                                                                       \
    do {                                                                                                         \
        __m256i v_ = _mm256_loadu_si256((const __m256i *)(p));                                                   \
        l = bf_even(v_), h = bf_odd(v_);                                                                         \
    } while (0)
DEFINE_NT_TILE(f32, float, float, LOAD_F32, LOAD_F32, 0)
DEFINE_NT_TILE(bf16, uint16_t, uint16_t, LOAD_BF16, LOAD_BF16, 0)
DEFINE_NT_TILE(fp8, float, uint8_t, LOAD_F32, LOAD_FP8, 1)

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

#ifdef __AVX512F__
/* rows of at most this many codes are prefetched (one row of an Intel Xeon 6 VM's FP8 products,
 * interleaved A/B, weights beyond its 480 MB L3: rows of 1536 and 2048 codes 1.2-1.5x faster
 * with, rows of 7168 and more 1.2x slower) */
#define PF_MAX_K 4096
/* nt_fp8 with 16 lanes, as the AVX2 tiles above (MB rows of x by NB rows of w, accumulators in
 * registers, each step prefetching its share of the next NB rows of short rows). Which k a lane holds: each
 * whole 32 k in pair order, lane j summing k = 2j then 2j+1 (fp8_pairs32; fp8_product puts x in
 * that order); a last 16 k in order, lane j summing k = j; then the tree of hsum and the k tail
 * in order. nt_f32 over fp8_unpack's rows computes the same operations. */
static inline __attribute__((always_inline)) void nt_tile_fp8(const float *x, int64_t ldx, const uint8_t *w,
                                                              int64_t ldw, float *y, int64_t ldy, int64_t K,
                                                              const int MB, const int NB) {
    __m512 acc[8];
    for (int i = 0; i < MB * NB; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    const char *next = (const char *)(w + NB * ldw);
    for (; k + 32 <= K; k += 32) {
        __m512 xl[2], xh[2];
        for (int b = 0; K <= PF_MAX_K && b < NB * 32; b += 64) _mm_prefetch(next + k * NB + b, _MM_HINT_T0);
        for (int i = 0; i < MB; i++) xl[i] = _mm512_loadu_ps(x + i * ldx + k), xh[i] = _mm512_loadu_ps(x + i * ldx + k + 16);
        for (int j = 0; j < NB; j++) {
            __m256i e, o;
            fp8_pairs32(_mm256_loadu_si256((const __m256i *)(w + j * ldw + k)), &e, &o);
            __m512 wl = _mm512_cvtph_ps(e), wh = _mm512_cvtph_ps(o);
            for (int i = 0; i < MB; i++)
                acc[i * NB + j] = _mm512_fmadd_ps(xh[i], wh, _mm512_fmadd_ps(xl[i], wl, acc[i * NB + j]));
        }
    }
    if (k + 16 <= K) {
        for (int j = 0; j < NB; j++) {
            __m512 wv = fp8x16_ps(w + j * ldw + k);
            for (int i = 0; i < MB; i++) acc[i * NB + j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), wv, acc[i * NB + j]);
        }
        k += 16;
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            v16f a;
            memcpy(&a, &acc[i * NB + j], sizeof a);
            y[i * ldy + j] = tail_fp8(hsum(a), x + i * ldx, w + j * ldw, k, K);
        }
}
#endif

#if defined(DSV3_AVX2) || defined(__AVX512F__)
/* each tile shape a function of its own: inlined into one loop nest, the shapes' register
 * allocations interfered (the 1 x 8 loop spilled pointers and vectors to the stack) */
#define NT_TILE_FN(SUF, TX, TW, MB, NB)                                                                          \
    static __attribute__((noinline)) void nt_##SUF##_##MB##x##NB(const TX *x, int64_t ldx, const TW *w,        \
                                                                 int64_t ldw, float *y, int64_t ldy, int64_t K) { \
        nt_tile_##SUF(x, ldx, w, ldw, y, ldy, K, MB, NB);                                                        \
    }
#define NT_TILE_TABLE(SUF, TX, TW)                                                                              \
    NT_TILE_FN(SUF, TX, TW, 2, 1) NT_TILE_FN(SUF, TX, TW, 2, 2) NT_TILE_FN(SUF, TX, TW, 2, 3)                 \
    NT_TILE_FN(SUF, TX, TW, 2, 4) NT_TILE_FN(SUF, TX, TW, 1, 1) NT_TILE_FN(SUF, TX, TW, 1, 2)                 \
    NT_TILE_FN(SUF, TX, TW, 1, 3) NT_TILE_FN(SUF, TX, TW, 1, 4) NT_TILE_FN(SUF, TX, TW, 1, 5)                 \
    NT_TILE_FN(SUF, TX, TW, 1, 6) NT_TILE_FN(SUF, TX, TW, 1, 7) NT_TILE_FN(SUF, TX, TW, 1, 8)                 \
    typedef void (*nt_tile_fn_##SUF)(const TX *, int64_t, const TW *, int64_t, float *, int64_t, int64_t);        \
    static const nt_tile_fn_##SUF nt_tiles_##SUF[2][8] = {                                                       \
        {nt_##SUF##_1x1, nt_##SUF##_1x2, nt_##SUF##_1x3, nt_##SUF##_1x4, nt_##SUF##_1x5, nt_##SUF##_1x6,         \
         nt_##SUF##_1x7, nt_##SUF##_1x8},                                                                        \
        {nt_##SUF##_2x1, nt_##SUF##_2x2, nt_##SUF##_2x3, nt_##SUF##_2x4}};

/* y [M,N] = x [M,K] . w [N,K]^T: rows in panels whose x stays in L2; in a panel, blocks of 8 w
 * rows (kept in L1 while the panel's rows pass), rows two at a time against 4 of them, a last
 * odd row against all 8 */
#define DEFINE_NT_TILED(SUF, TX, TW)                                                                             \
    DSV3_HIDDEN void nt_##SUF(const TX *x, int64_t ldx, const TW *w, int64_t ldw, float *y, int64_t ldy, int64_t M,  \
                         int64_t N, int64_t K) {                                                                 \
        int64_t panel = (int64_t)(128 * 1024 / sizeof(TX)) / (K > 0 ? K : 1);                                    \
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
#ifdef DSV3_AVX2
NT_TILE_TABLE(f32, float, float)
NT_TILE_TABLE(bf16, uint16_t, uint16_t)
DEFINE_NT_TILED(f32, float, float)
DEFINE_NT_TILED(bf16, uint16_t, uint16_t)
#endif
NT_TILE_TABLE(fp8, float, uint8_t)
DEFINE_NT_TILED(fp8, float, uint8_t)
#endif

/* x [M,K] with row stride ldx, in bfloat16 or float32 -> contiguous float32 */
DSV3_HIDDEN void to_f32(const void *x, int bf16, int64_t ldx, int64_t M, int64_t K, float *out) {
    for (int64_t m = 0; m < M; m++) {
        if (bf16) {
            const uint16_t *r = (const uint16_t *)x + m * ldx;
            for (int64_t k = 0; k < K; k++) out[m * K + k] = bf16_f32(r[k]);
        } else {
            memcpy(out + m * K, (const float *)x + m * ldx, (size_t)K * sizeof(float));
        }
    }
}

DSV3_HIDDEN void store(const float *v, void *y, int bf16, int64_t n) {
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

/* rows of y [M, n] (float32, contiguous) into the columns n0.. of y (rows ldy apart), bfloat16
 * (bf16=1) or float32: a column range's results, as the product wrappers below write them */
static void store_cols(const float *yf, void *y, int bf16, int64_t ldy, int64_t M, int64_t n0, int64_t n) {
    size_t es = bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m++) store(yf + m * n, (char *)y + (m * ldy + n0) * es, bf16, n);
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

/* ---- FP8 weights: products straight from the E4M3 codes ------------------------------------------ */

#ifndef FP8_FUSED_ROWS
#define FP8_FUSED_ROWS 4 /* up to this many rows the codes are converted in registers as they stream */
#endif
#ifndef FP8_UNPACK_ROWS
#define FP8_UNPACK_ROWS 8 /* more: this many weight rows at a time converted into a cached buffer */
#endif

/* rows [rows, K] of codes -> their values times 2^-8 (cpu_vec.h), contiguous float32, in the order
 * nt_fp8 takes k: with AVX2 each whole 16 k in pair order (the even k, then the odd ones); with
 * AVX-512 each whole 32 k so, then a last 16 in order */
static void fp8_unpack(const uint8_t *q, int64_t rows, int64_t K, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * K;
        float *o = out + r * K;
        int64_t k = 0;
#ifdef __AVX512F__
        for (; k + 32 <= K; k += 32) {
            __m256i e, d;
            fp8_pairs32(_mm256_loadu_si256((const __m256i *)(qr + k)), &e, &d);
            _mm512_storeu_ps(o + k, _mm512_cvtph_ps(e));
            _mm512_storeu_ps(o + k + 16, _mm512_cvtph_ps(d));
        }
#endif
        for (; k + VL <= K; k += VL) {
#ifdef DSV3_AVX2
            __m128i e, d;
            fp8_pairs(_mm_loadu_si128((const __m128i *)(qr + k)), &e, &d);
            _mm256_storeu_ps(o + k, _mm256_cvtph_ps(e));
            _mm256_storeu_ps(o + k + 8, _mm256_cvtph_ps(d));
#else
            v16f v = ld_fp8(qr + k);
            memcpy(o + k, &v, sizeof v);
#endif
        }
        for (; k < K; k++) o[k] = fp8_f32(qr[k]);
    }
}

/* x [M,K] as fp8_unpack orders k, copied into out (x itself in the generic build) */
static const float *fp8_pair_order(const float *x, int64_t M, int64_t K, float *out) {
#if defined(DSV3_AVX2) || defined(__AVX512F__)
    for (int64_t m = 0; m < M; m++) {
        int64_t k = 0;
#ifdef __AVX512F__
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (; k + 32 <= K; k += 32) {
            __m512 a = _mm512_loadu_ps(x + m * K + k), b = _mm512_loadu_ps(x + m * K + k + 16);
            _mm512_storeu_ps(out + m * K + k, _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(out + m * K + k + 16, _mm512_permutex2var_ps(a, odd, b));
        }
#else
        for (; k + 16 <= K; k += 16) {
            const float *p = x + m * K + k;
            __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
            /* per 128-bit half [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit quarters then put in order */
            __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
            _mm256_storeu_ps(out + m * K + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xd8)));
            _mm256_storeu_ps(out + m * K + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xd8)));
        }
#endif
        memcpy(out + m * K + k, x + m * K + k, (size_t)(K - k) * sizeof(float));
    }
    return out;
#else
    (void)M, (void)K, (void)out;
    return x;
#endif
}

/* y [M, n1-n0] (float32, rows ldy apart) = x [M,K] (float32, contiguous) . w[n0:n1]^T, w the E4M3
 * codes q [N,K] with the 128x128 block scales s [ceil(N/128), ceil(K/128)] (the multipliers).
 * Semantics: for output n, x is first multiplied by its blocks' scales, xs[m][k] = x[m][k] *
 * s[n/128][k/128] (one float32 rounding), then the float32 product of xs with the codes' exact
 * values: the lanes, tree and tail of nt_f32 (with AVX2 over each 16 k in pair order, so a lane
 * holds k = 2j and 2j+1 as bfloat16's do; with AVX-512 over each 32 k so). The codes are never dequantized into a weight-sized
 * copy: with few rows they are converted in registers as they stream past (nt_fp8), with more,
 * FP8_UNPACK_ROWS weight rows at a time into a buffer that stays in cache, which nt_f32 then
 * reads for every row; both compute the same operations, so a row's result does not depend on
 * how many rows are computed with it. Returns 0, or -1 when scratch memory cannot be had. */
int64_t fp8_product(const float *x, int64_t M, int64_t K, const uint8_t *q, const float *s, int64_t n0, int64_t n1,
                    float *y, int64_t ldy) {
    int64_t KB = (K + 127) / 128;
    int unpack = M > FP8_FUSED_ROWS;
    float *xs = malloc(((size_t)2 * M * K + (unpack ? (size_t)FP8_UNPACK_ROWS * K : 0)) * sizeof(float) + 64);
    if (!xs) return -1;
    float *wf = xs + 2 * M * K;
    /* once, not per block of rows: a group of 16 or 32 k never straddles a 128-k block, so
     * scaling the reordered x gives the reordered scaled x */
    const float *xo = fp8_pair_order(x, M, K, xs + M * K);
    for (int64_t b0 = n0 / 128 * 128; b0 < n1; b0 += 128) {
        int64_t lo = b0 > n0 ? b0 : n0, hi = b0 + 128 < n1 ? b0 + 128 : n1;
        const float *sb = s + (b0 / 128) * KB;
        for (int64_t m = 0; m < M; m++)
            for (int64_t kb = 0; kb < KB; kb++) {
                float sc = sb[kb] * 256.0f; /* the codes' 2^-8 (cpu_vec.h), exactly */
                int64_t k1 = (kb + 1) * 128 < K ? (kb + 1) * 128 : K;
                for (int64_t k = kb * 128; k < k1; k++) xs[m * K + k] = xo[m * K + k] * sc;
            }
        if (!unpack) {
            nt_fp8(xs, K, q + lo * K, K, y + (lo - n0), ldy, M, hi - lo, K);
            continue;
        }
        for (int64_t r0 = lo; r0 < hi; r0 += FP8_UNPACK_ROWS) {
            int64_t nr = hi - r0 < FP8_UNPACK_ROWS ? hi - r0 : FP8_UNPACK_ROWS;
            fp8_unpack(q + r0 * K, nr, K, wf);
            nt_f32(xs, K, wf, K, y + (r0 - n0), ldy, M, nr, K);
        }
    }
    free(xs);
    return 0;
}

/* y [M,N] = x [M,K] . w^T for an FP8 weight w (fp8_product), x and y bfloat16 (bf16=1) or float32,
 * x rows ldx apart, y rows ldy apart; only the output columns n0..n1 (threads split them: a
 * column's result does not depend on the split). Returns 0, or -1 when scratch memory cannot be
 * had (nothing is written then). */
int64_t dsv3_fp8_gemm(int bf16, const void *x, int64_t ldx, const uint8_t *q, const float *s, void *y, int64_t ldy,
                      int64_t M, int64_t K, int64_t n0, int64_t n1) {
    int64_t n = n1 - n0;
    float *xf = malloc((size_t)(M * K + M * n) * sizeof(float) + 64);
    if (!xf) return -1;
    float *yf = xf + M * K;
    to_f32(x, bf16, ldx, M, K, xf);
    int64_t rc = fp8_product(xf, M, K, q, s, n0, n1, yf, n);
    if (!rc) store_cols(yf, y, bf16, ldy, M, n0, n);
    free(xf);
    return rc;
}

/* ---- prefill products: weight panels packed into cache --------------------------------------------
 * A prefill's products have many rows (the prompt's tokens), so they are bound by the multiply-adds,
 * not by reading the weight. There the weight is packed, PK_NR rows of it and PK_KC of its k at a
 * time, into float32 [k][PK_NR] in L1 (converted from bfloat16, or from E4M3 codes times their block
 * scale), and a tile of PK_MR rows of x by PK_NR outputs runs as PK_MR * PK_NR / lanes independent
 * chains of fused multiply-adds, each x value broadcast once a k and each packed vector loaded once
 * for PK_MR rows. Semantics: each output is one chain of fused multiply-adds over k in order from 0
 * (the partial sums are stored and reloaded between k blocks, exactly), with an FP8 weight's values
 * first rounded once to float32 (code value times its block's scale): the dequantized weight in
 * float32, without a weight-sized copy. The result of a row does not depend on the other rows or on
 * how outputs are split across threads; it differs from the nt kernels' lane order above, which is
 * why only forwards that need no bit-equality with single-row steps (a prefill) use this. */
#define PK_KC 384 /* k per packed panel: PK_KC * PK_NR floats stay in L1 */
#define PK_MC 192 /* rows of x per block: PK_MC * PK_KC floats stay in L2 */
#define PK_NR 16
#ifdef DSV3_AVX2
#define PK_MR 6 /* 12 accumulators of 8 lanes, 2 packed vectors and a broadcast in 16 registers */
#elif defined(__AVX512F__)
#define PK_MR 8 /* 8 accumulators of 16 lanes: enough chains to cover the multiply-add latency */
#else
#define PK_MR 4
#endif

/* the weight value at w[off] as float32, an FP8 code times sc (its block scale times 2^8, the
 * codes' 2^-8 of cpu_vec.h) */
static inline float pk_value(int wtype, const void *w, int64_t off, float sc) {
    if (wtype == PK_F32) return ((const float *)w)[off];
    if (wtype == PK_BF16) return bf16_f32(((const uint16_t *)w)[off]);
    return fp8_f32(((const uint8_t *)w)[off]) * sc;
}

#ifdef DSV3_AVX2
/* r[j] = row j's 8 values -> r[k] = the 8 rows' values at k */
static inline void tr8(__m256 *r) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}
static inline __m256 pk_load8(int wtype, const void *w, int64_t off) {
    if (wtype == PK_F32) return _mm256_loadu_ps((const float *)w + off);
    if (wtype == PK_BF16) return ld8_bf16((const uint16_t *)w + off);
    __m128i lo, hi;
    fp8_halves(_mm_loadl_epi64((const __m128i *)((const uint8_t *)w + off)), &lo, &hi);
    return _mm256_cvtph_ps(lo);
}
#endif

/* bp [kc][PK_NR] = the weight rows n..n+PK_NR (zeros from n1 on) at k0..k0+kc */
static void pk_pack(int wtype, const void *w, int64_t ldw, const float *s, int64_t KB, int64_t n, int64_t n1,
                    int64_t k0, int64_t kc, float *bp) {
    float sc[PK_NR][PK_KC / 128 + 2]; /* each row's block scales over k0..k0+kc, times 2^8 */
    int64_t b0 = k0 / 128;
    for (int j = 0; j < PK_NR; j++)
        for (int64_t b = b0; wtype == PK_FP8 && n + j < n1 && b * 128 < k0 + kc; b++)
            sc[j][b - b0] = s[(n + j) / 128 * KB + b] * 256.0f;
    int64_t kk = 0;
#ifdef DSV3_AVX2
    if (n + PK_NR <= n1)
        for (; kk + 8 <= kc && (k0 + kk) / 128 == (k0 + kk + 7) / 128; kk += 8)
            for (int j0 = 0; j0 < PK_NR; j0 += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++) {
                    r[j] = pk_load8(wtype, w, (n + j0 + j) * ldw + k0 + kk);
                    if (wtype == PK_FP8) r[j] = _mm256_mul_ps(r[j], _mm256_set1_ps(sc[j0 + j][(k0 + kk) / 128 - b0]));
                }
                tr8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(bp + (kk + i) * PK_NR + j0, r[i]);
            }
#endif
    for (; kk < kc; kk++)
        for (int j = 0; j < PK_NR; j++)
            bp[kk * PK_NR + j] = n + j < n1 ? pk_value(wtype, w, (n + j) * ldw + k0 + kk, sc[j][(k0 + kk) / 128 - b0]) : 0.0f;
}

/* the weight rows n..n+PK_NR at k0..k0+kc into cache ahead of their packing: they are short runs of
 * long rows, which the hardware prefetchers follow late (a product of few rows took three times
 * its reading time without this) */
static inline void pk_prefetch(int wtype, const void *w, int64_t ldw, int64_t n, int64_t n1, int64_t k0, int64_t kc) {
    size_t es = wtype == PK_F32 ? 4 : wtype == PK_BF16 ? 2 : 1;
    for (int64_t j = n; j < n + PK_NR && j < n1; j++) {
        const char *r = (const char *)w + (size_t)(j * ldw + k0) * es;
        for (size_t off = 0; off < (size_t)kc * es; off += 64) __builtin_prefetch(r + off);
    }
}

/* c [MB][PK_NR] (rows ldc apart) (+)= a [kc][PK_MR] (a packed tile, its first MB rows) . bp [kc][PK_NR];
 * the accumulators are named variables: as an array GCC kept them in memory, storing each after
 * every step */
#ifdef DSV3_AVX2
#define PK_ROW(i, F)                                                                                             \
    if (MB > i) F(i)
#define PK_ROWS(F) PK_ROW(0, F); PK_ROW(1, F); PK_ROW(2, F); PK_ROW(3, F); PK_ROW(4, F); PK_ROW(5, F)
#define PK_INIT(i) c##i##a = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc),                         \
                   c##i##b = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8)
#define PK_STORE(i) _mm256_storeu_ps(c + i * ldc, c##i##a), _mm256_storeu_ps(c + i * ldc + 8, c##i##b)
#define PK_STEP(i)                                                                                               \
    do {                                                                                                         \
        __m256 av = _mm256_broadcast_ss(a + k * PK_MR + i);                                                      \
        c##i##a = _mm256_fmadd_ps(av, b0, c##i##a), c##i##b = _mm256_fmadd_ps(av, b1, c##i##b);                  \
    } while (0)
static inline __attribute__((always_inline)) void pk_tile(const float *a, const float *bp, int64_t kc, float *c,
                                                          int64_t ldc, int first, const int MB) {
    __m256 c0a, c0b, c1a, c1b, c2a, c2b, c3a, c3b, c4a, c4b, c5a, c5b;
    PK_ROWS(PK_INIT);
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(bp + k * PK_NR), b1 = _mm256_loadu_ps(bp + k * PK_NR + 8);
        PK_ROWS(PK_STEP);
    }
    PK_ROWS(PK_STORE);
}
#else
static inline __attribute__((always_inline)) void pk_tile(const float *a, const float *bp, int64_t kc, float *c,
                                                          int64_t ldc, int first, const int MB) {
    v16f acc[PK_MR];
    for (int i = 0; i < MB; i++) acc[i] = first ? (v16f){0} : ld_f32(c + i * ldc);
    for (int64_t k = 0; k < kc; k++) {
        v16f b = ld_f32(bp + k * PK_NR);
        for (int i = 0; i < MB; i++) acc[i] += ((v16f){0} + a[k * PK_MR + i]) * b;
    }
    for (int i = 0; i < MB; i++) memcpy(c + i * ldc, &acc[i], sizeof(v16f));
}
#endif
#define PK_TILE_FN(MB)                                                                                           \
    static __attribute__((noinline)) void pk_tile_##MB(const float *a, const float *bp, int64_t kc, float *c,    \
                                                       int64_t ldc, int first) {                                 \
        pk_tile(a, bp, kc, c, ldc, first, MB);                                                                   \
    }
PK_TILE_FN(1) PK_TILE_FN(2) PK_TILE_FN(3) PK_TILE_FN(4)
#if PK_MR > 4
PK_TILE_FN(5) PK_TILE_FN(6)
#endif
#if PK_MR > 6
PK_TILE_FN(7) PK_TILE_FN(8)
#endif
typedef void (*pk_tile_fn)(const float *, const float *, int64_t, float *, int64_t, int);
static const pk_tile_fn pk_tiles[PK_MR] = {pk_tile_1, pk_tile_2, pk_tile_3, pk_tile_4,
#if PK_MR > 4
                                           pk_tile_5, pk_tile_6,
#endif
#if PK_MR > 6
                                           pk_tile_7, pk_tile_8,
#endif
};

/* y [M, n1-n0] (float32, rows ldy apart) = x [M,K] (bfloat16 when xbf16, else float32; rows ldx
 * apart, converted as they are packed) . w[n0:n1]^T, w [N,K]
 * (rows ldw apart) float32, bfloat16 or E4M3 codes with 128x128 block scales s [ceil(N/128),
 * ceil(K/128)] (wtype). See the top of this section for the semantics. A last partial panel of
 * outputs accumulates in a buffer of whole panels. Returns 0, or -1 when scratch memory cannot be
 * had. */
DSV3_HIDDEN int64_t pk_product(const void *x, int xbf16, int64_t ldx, int64_t M, int64_t K, int wtype, const void *w,
                               int64_t ldw, const float *s, int64_t n0, int64_t n1, float *y, int64_t ldy) {
    float *bp = malloc((size_t)(PK_KC + PK_MC) * PK_NR * sizeof(float) + (size_t)PK_MC * PK_KC * sizeof(float) + 64);
    if (!bp) return -1;
    float *part = bp + PK_KC * PK_NR; /* [PK_MC][PK_NR]: the partial panel's sums */
    /* x's block [PK_MC][PK_KC] as tiles [PK_MR rows][kc][PK_MR]: each tile's values in the order it
     * reads them (x's rows are often a multiple of 4 KB apart, and six such streams fight over the
     * same L1 sets) */
    float *ap = part + PK_MC * PK_NR;
    int64_t KB = (K + 127) / 128, nfull = n0 + (n1 - n0) / PK_NR * PK_NR;
    for (int64_t m0 = 0; m0 < M; m0 += PK_MC) {
        int64_t m1 = m0 + PK_MC < M ? m0 + PK_MC : M;
        for (int64_t k0 = 0; k0 < K; k0 += PK_KC) {
            int64_t kc = K - k0 < PK_KC ? K - k0 : PK_KC;
            for (int64_t m = m0; m < m1; m++) {
                float *t = ap + (m - m0) / PK_MR * kc * PK_MR + (m - m0) % PK_MR;
                const void *xr = xbf16 ? (const void *)((const uint16_t *)x + m * ldx + k0) : (const float *)x + m * ldx + k0;
                for (int64_t k = 0; k < kc; k++)
                    t[k * PK_MR] = xbf16 ? bf16_f32(((const uint16_t *)xr)[k]) : ((const float *)xr)[k];
            }
            for (int64_t n = n0; n < n1; n += PK_NR) {
                pk_prefetch(wtype, w, ldw, n + 2 * PK_NR, n1, k0, kc);
                pk_pack(wtype, w, ldw, s, KB, n, n1, k0, kc, bp);
                float *c = n < nfull ? y + m0 * ldy + (n - n0) : part;
                int64_t ldc = n < nfull ? ldy : PK_NR, m = m0;
                for (; m + PK_MR <= m1; m += PK_MR)
                    pk_tiles[PK_MR - 1](ap + (m - m0) * kc, bp, kc, c + (m - m0) * ldc, ldc, k0 == 0);
                if (m < m1) pk_tiles[m1 - m - 1](ap + (m - m0) * kc, bp, kc, c + (m - m0) * ldc, ldc, k0 == 0);
            }
        }
        for (int64_t m = m0; m < m1 && nfull < n1; m++)
            memcpy(y + m * ldy + (nfull - n0), part + (m - m0) * PK_NR, (size_t)(n1 - nfull) * sizeof(float));
    }
    free(bp);
    return 0;
}

/* y [M,N] = x [M,K] . w^T for a prefill (pk_product), only the output columns n0..n1: x and y
 * bfloat16 (bf16=1) or float32, x rows ldx apart, y rows ldy apart; w as in pk_product. Returns 0,
 * or -1 when scratch memory cannot be had (nothing is written then). */
int64_t dsv3_gemm_prefill(int bf16, int wtype, const void *x, int64_t ldx, const void *w, int64_t ldw, const float *s,
                          void *y, int64_t ldy, int64_t M, int64_t K, int64_t n0, int64_t n1) {
    int64_t n = n1 - n0;
    float *yf = malloc((size_t)(M * n) * sizeof(float) + 64);
    if (!yf) return -1;
    int64_t rc = pk_product(x, bf16, ldx, M, K, wtype, w, ldw, s, n0, n1, yf, n);
    if (!rc) store_cols(yf, y, bf16, ldy, M, n0, n);
    free(yf);
    return rc;
}

/* ---- AMX: a prefill's FP8 products on the tile unit -----------------------------------------------
 * Where the CPU has AMX (and the kernel grants this process its tile state: dsv3_amx_init), a
 * prefill's FP8 products run on the tiles, 16x16 float32 sums per multiply of a 16x32 by a 32x16
 * bfloat16 tile. The weight is the left operand, so its rows are used as they lie: 32 rows at a
 * time converted into a bfloat16 panel in L2, each code times its block scale rounded once to
 * nearest even (the weight `dsv3 quantize --to bf16` writes, but that values below 2^-126 become
 * zero: "dequantize to bfloat16, then multiply", without a weight-sized copy); x is rounded to bfloat16 (it is bfloat16 already in a
 * bfloat16 model) and packed once per call into the right operand's pairs of k, 16 tokens a tile.
 * Semantics: each output is that bfloat16 weight row times that bfloat16 x row, summed in float32
 * by the tile unit (its own order, denormals flushed); a row does not depend on the other rows or
 * on how the outputs are split, but sums in another order than every other product here, so only
 * a prefill uses it. */
#ifdef DSV3_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* 1 when this build has the AMX products and the kernel lets this process use the tiles, else 0 */
int dsv3_amx_init(void) {
#ifdef DSV3_AMX
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#ifdef DSV3_AMX
/* y [M, n1-n0] (float32, rows ldy apart) = x [M,K] (bfloat16 when xbf16, else float32; rows ldx
 * apart) . w[n0:n1]^T, w the E4M3 codes q [N,K] with block scales s [ceil(N/128), ceil(K/128)],
 * on the tiles (see above). Returns 0, or -1 when scratch memory cannot be had. */
DSV3_HIDDEN AMX_TARGET int64_t amx_fp8_product(const void *x, int xbf16, int64_t ldx, int64_t M, int64_t K,
                                               const uint8_t *q, const float *s, int64_t n0, int64_t n1, float *y,
                                               int64_t ldy) {
    int64_t Kp = (K + 31) / 32 * 32, Mp = (M + 15) / 16 * 16, KB = (K + 127) / 128;
    /* xb [Mp/16][Kp/2][16][2]: tokens in tiles of 16, their k in pairs; panel [32][Kp]; cb 4 tiles */
    size_t xn = (size_t)Mp * Kp, pn = (size_t)32 * Kp;
    uint16_t *xb = aligned_alloc(64, ((xn + pn) * 2 + 4 * 256 * sizeof(float) + 63) / 64 * 64);
    if (!xb) return -1;
    uint16_t *panel = xb + xn;
    float *cb = (float *)(panel + pn);
    memset(xb + (M / 16) * 16 * Kp, 0, (size_t)(Mp - M / 16 * 16) * Kp * 2); /* the last tile's missing tokens */
    for (int64_t m = 0; m < M; m++) { /* each pair of k a 32-bit word: row m's words 16 words apart */
        uint16_t *row = panel; /* the panel is not in use yet: a row of x in bfloat16, zeros to Kp */
        if (xbf16)
            memcpy(row, (const uint16_t *)x + m * ldx, (size_t)K * 2);
        else
            for (int64_t k = 0; k < K; k++) row[k] = f32_bf16(((const float *)x)[m * ldx + k]);
        memset(row + K, 0, (size_t)(Kp - K) * 2);
        uint32_t *dst = (uint32_t *)xb + (m / 16) * (Kp / 2) * 16 + m % 16;
        for (int64_t p = 0; p < Kp / 2; p++) memcpy(dst + p * 16, row + 2 * p, 4);
    }
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) cfg = {1, 0, {0}, {0}, {0}};
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    for (int64_t nb = n0; nb < n1; nb += 32) {
        int64_t nr = n1 - nb < 32 ? n1 - nb : 32;
        for (int64_t j = 0; j < 32; j++) { /* the panel: weight row nb + j in bfloat16, zeros past K and n1 */
            uint16_t *pr = panel + j * Kp;
            int64_t k = 0;
            if (j < nr) {
                const uint8_t *qr = q + (nb + j) * K;
                const float *sr = s + (nb + j) / 128 * KB;
                for (; k + 32 <= K; k += 32) { /* 32 k never straddle a 128 block */
                    __m512 sc = _mm512_set1_ps(sr[k / 128] * 256.0f);
                    __m512 lo = _mm512_mul_ps(fp8x16_ps(qr + k), sc), hi = _mm512_mul_ps(fp8x16_ps(qr + k + 16), sc);
                    _mm512_storeu_si512(pr + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
                for (; k < K; k++) pr[k] = f32_bf16(fp8_f32(qr[k]) * (sr[k / 128] * 256.0f));
            }
            memset(pr + k, 0, (size_t)(Kp - k) * 2);
        }
        for (int64_t mb = 0; mb < Mp; mb += 32) {
            int two = mb + 16 < Mp;
            const uint16_t *b0 = xb + (mb / 16) * (Kp / 2) * 32, *b1 = b0 + (Kp / 2) * 32;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < Kp; k += 32) {
                _tile_loadd(4, panel + k, Kp * 2);
                _tile_loadd(5, panel + 16 * Kp + k, Kp * 2);
                _tile_loadd(6, b0 + k / 2 * 32, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
                if (two) {
                    _tile_loadd(7, b1 + k / 2 * 32, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, cb, 64);
            _tile_stored(1, cb + 256, 64);
            if (two) {
                _tile_stored(2, cb + 512, 64);
                _tile_stored(3, cb + 768, 64);
            }
            /* tile t: weight rows (t % 2) * 16 .. by tokens mb + (t / 2) * 16 .. */
            for (int t = 0; t < (two ? 4 : 2); t++)
                for (int64_t j = 0; j < 16 && mb + (t / 2) * 16 + j < M; j++)
                    for (int64_t i = 0; i < 16 && (t % 2) * 16 + i < nr; i++)
                        y[(mb + (t / 2) * 16 + j) * ldy + nb + (t % 2) * 16 + i - n0] = cb[t * 256 + i * 16 + j];
        }
    }
    _tile_release();
    free(xb);
    return 0;
}
#endif

/* y [M,N] = x [M,K] . w^T for an FP8 weight in a prefill, on the AMX tiles (amx_fp8_product), only
 * the output columns n0..n1, x and y bfloat16 (bf16=1) or float32 as in dsv3_fp8_gemm. Returns 0,
 * -1 when scratch memory cannot be had, or -2 in a build without AMX (nothing is written then). */
int64_t dsv3_fp8_gemm_amx(int bf16, const void *x, int64_t ldx, const uint8_t *q, const float *s, void *y, int64_t ldy,
                          int64_t M, int64_t K, int64_t n0, int64_t n1) {
#ifdef DSV3_AMX
    int64_t n = n1 - n0;
    float *yf = malloc((size_t)(M * n) * sizeof(float) + 64);
    if (!yf) return -1;
    int64_t rc = amx_fp8_product(x, bf16, ldx, M, K, q, s, n0, n1, yf, n);
    if (!rc) store_cols(yf, y, bf16, ldy, M, n0, n);
    free(yf);
    return rc;
#else
    (void)bf16, (void)x, (void)ldx, (void)q, (void)s, (void)y, (void)ldy, (void)M, (void)K, (void)n0, (void)n1;
    return -2;
#endif
}
