/* Fused CPU kernels for the FP8 block format (E4M3 codes, float32 scales per 128x128 weight
 * block or per 1x128 activation tile): one pass over memory per tensor.
 *
 * Boundary: plain C on raw row-major buffers, no Python or torch. dsv3_kernels.cpu compiles
 * this file (-O3 -march=native), loads it with ctypes and splits rows across threads;
 * dsv3cli.fp8 (tensors) and dsv3cli.convert (checkpoint files) call that. The format is
 * defined by the float64 references in dsv3cli.fp8; every function here equals them bit for bit:
 *   dequant: out = round_to_nearest_even(float32(q) * s), the product one float32 rounding,
 *            then (for bf16) one more rounding to bf16; NaN codes (0x7f, 0xff) give NaN.
 *   quant:   amax = max |w| over the block (on the bit patterns, so NaN > Inf > finite),
 *            s = float32(max(amax, 1e-4) / 448) (ue8m0: rounded up to a power of two; a
 *            non-finite s stays as it is), q = e4m3(float32(w / s)) rounded to nearest even
 *            and saturated at +-448 (as torch's float32 -> float8_e4m3fn cast), NaN -> 0x7f/0xff.
 * The inner loops are branch-free so the compiler vectorizes them; every function sets the
 * float environment it needs (nearest rounding, no flush-to-zero, no denormals-are-zero) and
 * restores the caller's. Dequantization turns every code into a normal float32 (its exact
 * value, or that times 2**-8 on the AVX2 + F16C path), never a float32 subnormal, so its speed
 * does not depend on the codes (a subnormal operand takes a slow microcoded path on many
 * CPUs: up to 5.5x slower on uniformly random codes, 6% of which are E4M3 subnormals).
 *
 * Rows [r0, r1) of a tensor per call, so callers can hand row ranges to several threads.
 * Quantization ranges must start on a block-row boundary (a multiple of `br`).
 */

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define DSV3_HAVE_MXCSR 1
#endif

#define BLOCK 128
/* Input bytes per quantization tile (br rows x some columns): they stay in L2 between the
 * amax pass and the quantize pass over the same tile. */
#ifndef TILE_BYTES
#define TILE_BYTES (256 * 1024)
#endif
#define MAX_TILE 4096 /* columns */

typedef unsigned int fpenv_t;

static fpenv_t fp_enter(void) {
#ifdef DSV3_HAVE_MXCSR
    fpenv_t old = _mm_getcsr();
    /* round to nearest (RC = 0), no flush-to-zero (bit 15), no denormals-are-zero (bit 6),
     * all exceptions masked: subnormal products and inputs must be exact. */
    _mm_setcsr((old & ~(0x6000u | 0x8000u | 0x0040u)) | 0x1F80u);
    return old;
#else
    return 0;
#endif
}

static void fp_leave(fpenv_t old) {
#ifdef DSV3_HAVE_MXCSR
    _mm_setcsr(old);
#else
    (void)old;
#endif
}

static inline float as_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t as_u32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---------------------------------------------------------------- dequantization */

/* Columns whose scales are expanded at a time (a 32 KB table that stays in L1). */
#define SEG 8192

/* float32 bits of the E4M3 code's value, exact, never a float32 subnormal (the smallest
 * nonzero code is 2**-9), so the multiply that follows costs the same for every code.
 * Normal codes: the exponent and mantissa moved into place and rebiased from 7 to 127.
 * Subnormal codes (exponent 0, value m * 2**-9): the mantissa under the exponent of 2**-6,
 * minus 2**-6 (exact); zero gives +0 before the sign. NaN codes (S.1111.111) give a quiet
 * NaN. Every choice is a mask, not `?:`: gcc turns some of those into branches and then does
 * not vectorize the loop. */
static inline float e4m3_value(uint8_t c) {
    uint32_t em = (uint32_t)(c & 0x7Fu) << 20;
    uint32_t normal = em + (120u << 23);
    uint32_t sub = as_u32(as_f32(em | (121u << 23)) - 0x1p-6f);
    uint32_t is_sub = -(uint32_t)(em < (1u << 23));
    uint32_t is_nan = -(uint32_t)(em == (0x7Fu << 20));
    uint32_t b = (sub & is_sub) | (normal & ~is_sub);
    b = (b & ~is_nan) | (0x7FC00000u & is_nan);
    return as_f32(b | ((uint32_t)(c & 0x80u) << 24));
}

/* float32 -> bf16 bits, round to nearest even. Any NaN whose payload does not carry into the
 * sign bit stays a NaN (those of e4m3_value do not). */
static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u = as_u32(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* As f32_to_bf16_rne for any NaN: a NaN stays a quiet NaN of the same sign. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = as_u32(f);
    uint32_t nan = -(uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (uint16_t)((f32_to_bf16_rne(f) & ~nan) | (((u >> 16) | 0x40u) & nan));
}

#if defined(__AVX2__) && defined(__F16C__)
/* 8 codes -> 8 float32 values times 2**-8, through the CPU's half-precision conversion: the
 * code's bits, shifted, are a binary16 whose exponent field has its top bit clear (E4M3
 * subnormals become binary16 subnormals, which the conversion takes at full speed, and the
 * results are normal float32s); NaN codes are given a quiet NaN of their sign. */
static inline __m256 e4m3x8_value_shr8(const uint8_t *q) {
    __m128i c = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)q));  /* sign-extended */
    __m128i h = _mm_and_si128(_mm_slli_epi16(c, 7), _mm_set1_epi16((short)0xBF80));
    __m256 f = _mm256_cvtph_ps(h);
    __m128i nan16 = _mm_cmpeq_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7F));
    __m256i nan = _mm256_cvtepi16_epi32(nan16);
    return _mm256_or_ps(f, _mm256_castsi256_ps(_mm256_and_si256(nan, _mm256_set1_epi32(0x7FC00000))));
}

/* float32 x8 -> bf16 x8, round to nearest even (as f32_to_bf16_rne). */
static inline __m128i bf16x8_rne(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#ifdef __AVX512BW__
/* the same 16 at a time (the NaN codes by a mask), and their rounding to bf16 */
static inline __m512 e4m3x16_value_shr8(const uint8_t *q) {
    __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m512 f = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16((short)0xBF80)));
    __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(c, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7F));
    return _mm512_mask_or_ps(f, nan, f, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}
static inline __m256i bf16x16_rne(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16));
}
#endif
#define CODE_SHIFT 0x1p8f /* sx holds s * 2**8 in the fast loops */
#else
#define CODE_SHIFT 1.0f
#endif

/* Scales finite and below 2**119: the code's value times sx (= s * CODE_SHIFT, exact) is
 * float32(q * s) with its single rounding. */
static void dequant_seg_bf16(const uint8_t *restrict q, const float *restrict sx, uint16_t *restrict out, int64_t n) {
    int64_t j = 0;
#ifdef __AVX512BW__
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(out + j), bf16x16_rne(_mm512_mul_ps(e4m3x16_value_shr8(q + j), _mm512_loadu_ps(sx + j))));
#endif
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(out + j), bf16x8_rne(_mm256_mul_ps(e4m3x8_value_shr8(q + j), _mm256_loadu_ps(sx + j))));
#endif
    for (; j < n; j++)
        out[j] = f32_to_bf16_rne(e4m3_value(q[j]) * (sx[j] * (1.0f / CODE_SHIFT)));
}

static void dequant_seg_f32(const uint8_t *restrict q, const float *restrict sx, float *restrict out, int64_t n) {
    int64_t j = 0;
#ifdef __AVX512BW__
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(out + j, _mm512_mul_ps(e4m3x16_value_shr8(q + j), _mm512_loadu_ps(sx + j)));
#endif
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_mul_ps(e4m3x8_value_shr8(q + j), _mm256_loadu_ps(sx + j)));
#endif
    for (; j < n; j++)
        out[j] = e4m3_value(q[j]) * (sx[j] * (1.0f / CODE_SHIFT));
}

/* Other scales (2**119 and above, Inf, NaN): the code's exact value times s, with a NaN-safe
 * bf16 rounding (a NaN scale's payload may round into the sign bit). */
static void dequant_seg_any_bf16(const uint8_t *restrict q, const float *restrict s, uint16_t *restrict out, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        out[j] = f32_to_bf16(e4m3_value(q[j]) * s[j]);
}

static void dequant_seg_any_f32(const uint8_t *restrict q, const float *restrict s, float *restrict out, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        out[j] = e4m3_value(q[j]) * s[j];
}

/* Per-column scales of columns c0..c0+n-1 of one block row `sr`, into `sx`; returns 1 when all
 * are finite and below 2**119 (sx then holds s * CODE_SHIFT, exact), else 0 (sx holds s). */
static int expand_scales(const float *sr, int64_t c0, int64_t n, float *sx) {
    int small = 1;
    for (int64_t j = 0; j < n; j++) {
        float s = sr[(c0 + j) / BLOCK];
        sx[j] = s * CODE_SHIFT;
        small &= s > -0x1p119f && s < 0x1p119f; /* false for NaN too */
    }
    if (!small)
        for (int64_t j = 0; j < n; j++)
            sx[j] = sr[(c0 + j) / BLOCK];
    return small;
}

/* One body for both output types. */
#define DEQUANT_BODY(SEG_FAST, SEG_ANY)                                                        \
    fpenv_t env = fp_enter();                                                                  \
    int64_t nc = (cols + BLOCK - 1) / BLOCK;                                                   \
    float sx[SEG];                                                                             \
    for (int64_t rb = r0; rb < r1;) {                                                          \
        int64_t re = (rb / BLOCK + 1) * BLOCK < r1 ? (rb / BLOCK + 1) * BLOCK : r1;            \
        const float *sr = s + (rb / BLOCK) * nc;                                               \
        for (int64_t c0 = 0; c0 < cols; c0 += SEG) {                                           \
            int64_t n = cols - c0 < SEG ? cols - c0 : SEG;                                     \
            int small = expand_scales(sr, c0, n, sx);                                           \
            for (int64_t r = rb; r < re; r++) {                                                \
                if (small)                                                                     \
                    SEG_FAST(q + r * cols + c0, sx, out + r * cols + c0, n);                   \
                else                                                                           \
                    SEG_ANY(q + r * cols + c0, sx, out + r * cols + c0, n);                    \
            }                                                                                  \
        }                                                                                      \
        rb = re;                                                                               \
    }                                                                                          \
    fp_leave(env);

/* q uint8 [rows, cols] (E4M3 codes), s float32 [ceil(rows/128), ceil(cols/128)] ->
 * out bf16 bits [rows, cols], rows r0..r1-1 only. */
void dsv3_dequant_bf16(const uint8_t *q, const float *s, uint16_t *out, int64_t cols, int64_t r0, int64_t r1) {
    DEQUANT_BODY(dequant_seg_bf16, dequant_seg_any_bf16)
}

/* As dsv3_dequant_bf16, float32 output. */
void dsv3_dequant_f32(const uint8_t *q, const float *s, float *out, int64_t cols, int64_t r0, int64_t r1) {
    DEQUANT_BODY(dequant_seg_f32, dequant_seg_any_f32)
}

/* ---------------------------------------------------------------- quantization */

/* float32 -> E4M3FN code, round to nearest even, saturating at +-448 (Inf too), NaN -> 0x7f
 * with the sign: torch's float32 -> float8_e4m3fn cast, bit for bit. */
static inline uint8_t f32_to_e4m3(float x) {
    uint32_t u = as_u32(x);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7FFFFFFFu;
    /* |x| >= 2**-6 (normal E4M3): rebias the exponent from 127 to 7, then drop 20 mantissa
     * bits rounding to nearest even (a carry moves into the exponent, as it should). */
    uint32_t normal = (a - (120u << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    normal = normal > 0x7Eu ? 0x7Eu : normal; /* 448 is the largest finite code */
    /* |x| < 2**-6: adding 2**14 leaves x rounded (nearest even, by the FPU) to a multiple of
     * 2**-9, the subnormal quantum; the low mantissa bits are then the code (8 = 2**-6). */
    uint32_t sub = as_u32(as_f32(a) + 0x1p14f) - (141u << 23);
    uint32_t c = a < (121u << 23) ? sub : normal;
    c = a > 0x7F800000u ? 0x7Fu : c;
    return (uint8_t)(c | sign);
}

/* float32 amax of a block (bits of |w| as float32 bits) -> scale. */
static inline float block_scale(uint32_t amax_bits, int ue8m0) {
    float amax = as_f32(amax_bits);
    /* the floor keeps an all-zero block from dividing by zero; NaN compares false and stays */
    float s = (amax < 1e-4f ? 1e-4f : amax) / 448.0f;
    if (ue8m0) {
        uint32_t b = as_u32(s); /* s > 0 */
        if ((b & 0x7F800000u) != 0x7F800000u)
            b = ((b >> 23) + ((b & 0x7FFFFFu) != 0u)) << 23; /* 2**ceil(log2 s) */
        s = as_f32(b);
    }
    return s;
}

/* As f32_to_e4m3 for |x| < 464, which is every w / s of a block with a finite scale
 * (|w| <= amax and s = amax / 448 rounded: |w / s| <= 448 * (1 + 2**-23)), NaN excluded. */
static inline uint8_t f32_to_e4m3_finite(float x) {
    uint32_t u = as_u32(x);
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t normal = (a - (120u << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    uint32_t sub = as_u32(as_f32(a) + 0x1p14f) - (141u << 23);
    uint32_t c = a < (121u << 23) ? sub : normal;
    return (uint8_t)(c | ((u >> 24) & 0x80u));
}

static inline float bf16_to_f32(uint16_t b) { return as_f32((uint32_t)b << 16); }
static inline float f32_id(float x) { return x; }

/* Quantize n elements of one block row with scale s: q = e4m3(float32(w / s)). A finite s
 * whose mantissa is zero (every ue8m0 scale) is a power of two, so w * (1 / s) is the same
 * single rounding of the same exact value as w / s, and a multiply is cheaper. */
#define QUANT_COLS(NAME, T, TO_F32)                                                              \
    static void NAME(const T *restrict w, float s, uint8_t *restrict q, int64_t n) {             \
        uint32_t sb = as_u32(s);                                                                 \
        if ((sb & 0x7F800000u) == 0x7F800000u) { /* NaN/Inf amax: keep torch's NaN/saturation */ \
            for (int64_t j = 0; j < n; j++)                                                      \
                q[j] = f32_to_e4m3(TO_F32(w[j]) / s);                                            \
        } else if ((sb & 0x7FFFFFu) == 0u && (sb & 0x7F800000u) != 0u) {                         \
            float inv = 1.0f / s; /* exact: a power of two */                                    \
            for (int64_t j = 0; j < n; j++)                                                      \
                q[j] = f32_to_e4m3_finite(TO_F32(w[j]) * inv);                                   \
        } else {                                                                                 \
            for (int64_t j = 0; j < n; j++)                                                      \
                q[j] = f32_to_e4m3_finite(TO_F32(w[j]) / s);                                     \
        }                                                                                        \
    }
QUANT_COLS(quant_cols_bf16, uint16_t, bf16_to_f32)
QUANT_COLS(quant_cols_f32, float, f32_id)

static void amax_cols_bf16(const uint16_t *restrict w, uint32_t *restrict m, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t a = w[j] & 0x7FFFu;
        m[j] = m[j] > a ? m[j] : a;
    }
}

static void amax_cols_f32(const float *restrict w, uint32_t *restrict m, int64_t n) {
    const uint32_t *wb = (const uint32_t *)w;
    for (int64_t j = 0; j < n; j++) {
        uint32_t a = wb[j] & 0x7FFFFFFFu;
        m[j] = m[j] > a ? m[j] : a;
    }
}

static uint32_t max_u32(const uint32_t *m, int64_t n) {
    uint32_t r = 0;
    for (int64_t j = 0; j < n; j++)
        r = r > m[j] ? r : m[j];
    return r;
}

static inline void prefetch(const void *p, int64_t nbytes) {
#if defined(__GNUC__)
    for (int64_t k = 0; k < nbytes; k += 64)
        __builtin_prefetch((const char *)p + k, 0, 3);
#else
    (void)p, (void)nbytes;
#endif
}

/* Blocks of br rows x 128 columns are done a tile at a time (br rows x TILE_BYTES / br of
 * columns): an amax pass over the tile, its scales, then the quantize pass over the same tile,
 * now in L2. The amax pass reads br strided runs, too many streams for the hardware
 * prefetcher, so the quantize pass prefetches the next tile's rows as it goes. */
#define QUANT_ROWS(NAME, T, SHIFT, AMAX_COLS_FN, QUANT_COLS_FN)                                  \
    int64_t NAME(const T *w, uint8_t *q, float *s, int64_t rows, int64_t cols, int64_t br,       \
                 int ue8m0, int64_t r0, int64_t r1) {                                            \
        fpenv_t env = fp_enter();                                                                \
        int64_t nonfinite = 0;                                                                   \
        int64_t nc = (cols + BLOCK - 1) / BLOCK;                                                 \
        int64_t tile = TILE_BYTES / (br * (int64_t)sizeof(T)) / BLOCK * BLOCK;                   \
        tile = tile < BLOCK ? BLOCK : tile > MAX_TILE ? MAX_TILE : tile;                         \
        uint32_t m[MAX_TILE];                                                                    \
        float st[MAX_TILE / BLOCK];                                                              \
        for (int64_t rb = r0; rb < r1; rb += br) {                                               \
            int64_t re = rb + br < rows ? rb + br : rows;                                        \
            for (int64_t t0 = 0; t0 < cols; t0 += tile) {                                        \
                int64_t tn = cols - t0 < tile ? cols - t0 : tile;                                \
                memset(m, 0, (size_t)tn * sizeof(uint32_t));                                     \
                for (int64_t r = rb; r < re; r++)                                                \
                    AMAX_COLS_FN(w + r * cols + t0, m, tn);                                      \
                for (int64_t b = 0; b * BLOCK < tn; b++) {                                       \
                    int64_t n = tn - b * BLOCK < BLOCK ? tn - b * BLOCK : BLOCK;                 \
                    st[b] = block_scale(max_u32(m + b * BLOCK, n) << SHIFT, ue8m0);              \
                    s[(rb / br) * nc + t0 / BLOCK + b] = st[b];                                  \
                    nonfinite += (as_u32(st[b]) & 0x7F800000u) == 0x7F800000u;                   \
                }                                                                                \
                /* the next tile: further along these rows, or the start of the next block */   \
                int64_t nx0 = t0 + tn < cols ? t0 + tn : 0, nxr = t0 + tn < cols ? 0 : br;       \
                int64_t nxn = cols - nx0 < tile ? cols - nx0 : tile;                             \
                for (int64_t r = rb; r < re; r++) {                                              \
                    const T *nx = r + nxr < r1 ? w + (r + nxr) * cols + nx0 : NULL;              \
                    for (int64_t b = 0; b * BLOCK < tn; b++) {                                   \
                        int64_t c0 = t0 + b * BLOCK, n = cols - c0 < BLOCK ? cols - c0 : BLOCK;  \
                        if (nx && b * BLOCK < nxn) /* a few lines at a time: the miss queue is short */ \
                            prefetch(nx + b * BLOCK, (nxn - b * BLOCK < BLOCK ? nxn - b * BLOCK : BLOCK) * (int64_t)sizeof(T)); \
                        QUANT_COLS_FN(w + r * cols + c0, st[b], q + r * cols + c0, n);           \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        fp_leave(env);                                                                           \
        return nonfinite;                                                                        \
    }

/* w bf16 bits [rows, cols] -> q uint8 [rows, cols] (E4M3 codes) and s float32
 * [ceil(rows/br), ceil(cols/128)] for blocks of br rows x 128 columns (br = 128 for weights,
 * 1 for activations), rows r0..r1-1 only; r0 is a multiple of br. Returns how many of the
 * scales it wrote are NaN or Inf (a NaN or Inf in the block's weights). */
QUANT_ROWS(dsv3_quant_bf16, uint16_t, 16, amax_cols_bf16, quant_cols_bf16)

/* As dsv3_quant_bf16, float32 input. */
QUANT_ROWS(dsv3_quant_f32, float, 0, amax_cols_f32, quant_cols_f32)

/* x float32 [n] -> E4M3 codes [n] (the cast alone, for tests against torch's). */
void dsv3_f32_to_e4m3(const float *x, uint8_t *q, int64_t n) {
    fpenv_t env = fp_enter();
    for (int64_t j = 0; j < n; j++)
        q[j] = f32_to_e4m3(x[j]);
    fp_leave(env);
}

/* the library's interface version, checked by dsv3_kernels.cpu (both C files) */
int dsv3_cpu_abi(void) { return 7; }
