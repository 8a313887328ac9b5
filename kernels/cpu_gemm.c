/* Small matrix products for few-token forwards on the CPU (decode, MTP verification), and the
 * routed experts of a MoE layer in one call.
 *
 * Boundary: plain C on raw buffers, no Python or torch; dsv3_kernels.cpu builds and loads it
 * together with cpu_fp8.c, and dsv3cli.parallel / dsv3cli.model call it behind one seam each,
 * with torch's matmul as the fallback the tests compare against. Why it exists: at decode sizes
 * (one to a few rows) torch's bfloat16 products on the CPU cost 50-90 us a call (the native
 * kernel is not vectorised for one row; oneDNN has a fixed set-up cost), while the weights
 * stream from cache in a few microseconds.
 *
 * Semantics: every product accumulates in float32, one lane per 16 consecutive k, the 16 lanes
 * summed in a fixed tree, then the k tail in order; bfloat16 results are rounded once (nearest
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

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define VL 16
typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

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

/* ---- nt: y = x . w^T, one row of w against MB rows of x at a time -------------------------------- */

/* y[i] = dot(x[i], w) for i < MB (a constant after inlining): each w load serves MB rows. The
 * weight is read row after row, in memory order: a single sequential stream from DRAM runs at
 * twice the speed of four interleaved short ones (measured: 17 vs 7 GB/s on one core). Every
 * accumulator sees the same operations whatever MB is. */
static inline __attribute__((always_inline)) void dots_f32(const float *x, int64_t ldx, const float *w, int64_t K,
                                                           float *y, int64_t ldy, const int MB) {
    v16f acc[4];
    memset(acc, 0, sizeof acc);
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        v16f wv = ld_f32(w + k);
        for (int i = 0; i < MB; i++) acc[i] += ld_f32(x + i * ldx + k) * wv;
    }
    for (int i = 0; i < MB; i++) {
        float s = hsum(acc[i]);
        for (int64_t t = k; t < K; t++) s += x[i * ldx + t] * w[t];
        y[i * ldy] = s;
    }
}

#ifdef __AVX512BF16__
/* bfloat16 pairs straight into float32 lanes (vdpbf16ps): no conversion of x or w; the k tail is
 * a masked load, zeros adding nothing */
static inline __attribute__((always_inline)) void dots_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                            int64_t K, float *y, int64_t ldy, const int MB) {
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
    for (int i = 0; i < MB; i++) {
        v16f a;
        memcpy(&a, &acc[i], sizeof a);
        y[i * ldy] = hsum(a);
    }
}
#else
static inline __attribute__((always_inline)) void dots_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                            int64_t K, float *y, int64_t ldy, const int MB) {
    v16f acc[4];
    memset(acc, 0, sizeof acc);
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        v16f wv = ld_bf16(w + k);
        for (int i = 0; i < MB; i++) acc[i] += ld_bf16(x + i * ldx + k) * wv;
    }
    for (int i = 0; i < MB; i++) {
        float s = hsum(acc[i]);
        for (int64_t t = k; t < K; t++) s += bf16_f32(x[i * ldx + t]) * bf16_f32(w[t]);
        y[i * ldy] = s;
    }
}
#endif

/* y [M,N] (float32, row stride ldy) = x [M,K] (row stride ldx) . w[N,K]^T, x and w of one type;
 * rows of x in blocks of 4, 2, 1 */
#define NT_ROWS(SUF, MB)                                                                                         \
    for (; m + MB <= M; m += MB)                                                                                 \
        for (int64_t n = 0; n < N; n++) dots_##SUF(x + m * ldx, ldx, w + n * ldw, K, y + m * ldy + n, ldy, MB);
#define DEFINE_NT(SUF, T)                                                                                       \
    static void nt_##SUF(const T *x, int64_t ldx, const T *w, int64_t ldw, float *y, int64_t ldy, int64_t M,    \
                         int64_t N, int64_t K) {                                                                 \
        int64_t m = 0;                                                                                           \
        NT_ROWS(SUF, 4)                                                                                          \
        NT_ROWS(SUF, 2)                                                                                          \
        NT_ROWS(SUF, 1)                                                                                          \
    }
DEFINE_NT(f32, float)
DEFINE_NT(bf16, uint16_t)

/* ---- nn: y = x . w, rows of w scaled and added (x float32, contiguous [M,K]) --------------------- */

#define DEFINE_NN(SUF, W_T, LD_W, W_F32)                                                                        \
    static void nn_##SUF(const float *x, const W_T *w, int64_t ldw, float *y, int64_t ldy, int64_t M, int64_t N, \
                         int64_t K) {                                                                            \
        for (int64_t m = 0; m < M; m++) {                                                                        \
            const float *xm = x + m * K;                                                                         \
            int64_t n = 0;                                                                                       \
            for (; n + 4 * VL <= N; n += 4 * VL) {                                                               \
                v16f acc[4] = {0};                                                                               \
                for (int64_t k = 0; k < K; k++) {                                                                \
                    v16f xv = (v16f){0} + xm[k];                                                                 \
                    for (int j = 0; j < 4; j++) acc[j] += xv * LD_W(w + k * ldw + n + j * VL);                   \
                }                                                                                                \
                memcpy(y + m * ldy + n, acc, sizeof acc);                                                        \
            }                                                                                                    \
            for (; n + VL <= N; n += VL) {                                                                       \
                v16f acc = {0};                                                                                  \
                for (int64_t k = 0; k < K; k++) acc += ((v16f){0} + xm[k]) * LD_W(w + k * ldw + n);              \
                memcpy(y + m * ldy + n, &acc, sizeof acc);                                                       \
            }                                                                                                    \
            for (; n < N; n++) {                                                                                 \
                float s = 0.0f;                                                                                  \
                for (int64_t k = 0; k < K; k++) s += xm[k] * W_F32(w[k * ldw + n]);                              \
                y[m * ldy + n] = s;                                                                              \
            }                                                                                                    \
        }                                                                                                        \
    }

static inline float id_f32(float v) { return v; }
DEFINE_NN(bf16, uint16_t, ld_bf16, bf16_f32)
DEFINE_NN(f32, float, ld_f32, id_f32)

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
        for (int64_t i = 0; i < n; i++) o[i] = f32_bf16(v[i]);
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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* The routed experts of a MoE layer for N tokens:
 *   y[n] = sum over k with lo <= idx[n][k] < hi of
 *          wt[n][k] * down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n][k] - lo
 * w13 [E_local, 2I, D] (gate rows then up rows), w2 [E_local, D, I]; x, y [N, D] and the weights
 * all bfloat16 (bf16=1) or all float32; idx int64 [N, Kx]; wt float32 [N, Kx]. Expert by expert,
 * its tokens gathered in groups of up to ROWS, so each weight row is read once per group. The
 * hidden activations stay float32 (rounded to bfloat16 as the input of a bfloat16 product), and
 * y accumulates in float32, rounded once at the end. Returns 0, or -1 when scratch memory cannot
 * be had (y is untouched then). */
#define ROWS 16
int64_t dsv3_moe(int bf16, const void *x, const int64_t *idx, const float *wt, const void *w13, const void *w2, void *y,
                 int64_t N, int64_t Kx, int64_t D, int64_t I, int64_t lo, int64_t hi) {
    size_t es = bf16 ? 2 : 4;
    float *acc = malloc((size_t)(N * D + ROWS * (3 * I + D)) * sizeof(float) + (size_t)ROWS * D * es);
    if (!acc) return -1;
    float *gu = acc + N * D, *act = gu + ROWS * 2 * I, *out = act + ROWS * I;
    char *xs = (char *)(out + ROWS * D); /* the group's token rows, gathered */
    uint16_t *act16 = (uint16_t *)act;  /* the same memory, for a bfloat16 product's input */
    int64_t tok[ROWS];
    float scale[ROWS];
    memset(acc, 0, (size_t)(N * D) * sizeof(float));
    for (int64_t e = lo; e < hi; e++) {
        const char *we13 = (const char *)w13 + (e - lo) * 2 * I * D * es;
        const char *we2 = (const char *)w2 + (e - lo) * D * I * es;
        int64_t n = 0;
        while (n < N) {
            int64_t r = 0;
            for (; n < N && r < ROWS; n++)
                for (int64_t k = 0; k < Kx; k++)
                    if (idx[n * Kx + k] == e) {
                        tok[r] = n, scale[r] = wt[n * Kx + k];
                        memcpy(xs + r * D * es, (const char *)x + n * D * es, (size_t)D * es);
                        r++;
                        break; /* an expert appears once in a token's choices */
                    }
            if (r == 0) break;
            if (bf16) {
                nt_bf16((const uint16_t *)xs, D, (const uint16_t *)we13, D, gu, 2 * I, r, 2 * I, D);
                for (int64_t j = 0; j < r; j++)
                    for (int64_t i = 0; i < I; i++) act16[j * I + i] = f32_bf16(silu(gu[j * 2 * I + i]) * gu[j * 2 * I + I + i]);
                nt_bf16(act16, I, (const uint16_t *)we2, I, out, D, r, D, I);
            } else {
                nt_f32((const float *)xs, D, (const float *)we13, D, gu, 2 * I, r, 2 * I, D);
                for (int64_t j = 0; j < r; j++)
                    for (int64_t i = 0; i < I; i++) act[j * I + i] = silu(gu[j * 2 * I + i]) * gu[j * 2 * I + I + i];
                nt_f32(act, I, (const float *)we2, I, out, D, r, D, I);
            }
            for (int64_t j = 0; j < r; j++)
                for (int64_t d = 0; d < D; d++) acc[tok[j] * D + d] += scale[j] * out[j * D + d];
        }
    }
    store(acc, y, bf16, N * D);
    free(acc);
    return 0;
}

/* RMSNorm of `rows` rows of D: y = round(x / sqrt(mean(x^2) + eps) * w), in float32 (x, y
 * bfloat16 when bf16=1, else float32; x rows ld apart, y contiguous; w float32 [D]). */
void dsv3_rmsnorm(int bf16, const void *x, int64_t ldx, const float *w, void *y, int64_t rows, int64_t D, float eps) {
    size_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * ldx * es;
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            float v = bf16 ? bf16_f32(((const uint16_t *)xr)[d]) : ((const float *)xr)[d];
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) {
            float v = bf16 ? bf16_f32(((const uint16_t *)xr)[d]) : ((const float *)xr)[d];
            float o = v * inv * w[d];
            if (bf16)
                ((uint16_t *)y)[r * D + d] = f32_bf16(o);
            else
                ((float *)y)[r * D + d] = o;
        }
    }
}
