/* The model's hot operations on the CPU, one call each: a MoE layer's experts (dsv3_moe, with
 * dsv3_sum_f32 to put parts together), DeepSeek-V3's router (dsv3_route), absorbed multi-head
 * latent attention with its cache write (dsv3_mla), RMSNorm (dsv3_rmsnorm) and the MTP
 * module's entry (dsv3_mtp_entry).
 *
 * Boundary: plain C on raw buffers, built on the products of cpu_gemm.c (whose semantics they
 * inherit: each output computed the same way whatever the other rows, so a row's result never
 * depends on the rows computed with it). dsv3cli.ops calls them through typed wrappers and
 * holds the torch reference of each, which the tests compare against.
 */

#include "cpu_vec.h"


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
/* out [r,D] (float32) = down(silu(gate xs) * up xs) for r gathered rows xs [r,D]; gate and up
 * [I,D] (gate and up rows), down [D,I]; scratch gu [r,2I], act [r,I] floats. With pk (a prefill's
 * expert of many tokens) the products are cpu_gemm.c's pk_product, with the same roundings (the
 * activations rounded to bfloat16 for a bfloat16 down). */
static int64_t swiglu_rows(int bf16, const void *xs, int64_t r, int64_t D, const void *wg, const void *wu, const void *wd,
                           int64_t I, float *gu, float *act, int pk, float *out) {
    uint16_t *act16 = (uint16_t *)act; /* the same memory, as a bfloat16 product's input */
    int wt = bf16 ? PK_BF16 : PK_F32;
    if (pk) {
        if (pk_product(xs, bf16, D, r, D, wt, wg, D, NULL, 0, I, gu, 2 * I) ||
            pk_product(xs, bf16, D, r, D, wt, wu, D, NULL, 0, I, gu + I, 2 * I))
            return -1;
    } else if (bf16) {
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
    if (pk) return pk_product(bf16 ? (const void *)act16 : act, bf16, I, r, I, wt, wd, I, NULL, 0, D, out, D);
    if (bf16)
        nt_bf16(act16, I, wd, I, out, D, r, D, I);
    else
        nt_f32(act, I, wd, I, out, D, r, D, I);
    return 0;
}

/* The experts of a MoE layer for N tokens, whatever their weights' format: expert by expert
 * (e = lo - 1 first: the shared expert, every token, when `shared`), its tokens gathered in groups
 * (in the compute dtype), `fn` computing the expert's float32 output rows for a group, added with
 * the token's routing weight into float32 sums rounded once at the end (with out_f32, y is float32
 * and gets the sums unrounded). Groups hold ROWS tokens, each a product of the nt kernels; in a
 * prefill (`prefill` 1), an expert with more than pk_rows tokens takes them PK_GROUP at a time through
 * pk_product instead (`prefill` 2, FP8 experts on a CPU with AMX: amx_fp8_product; both faster with
 * many rows, but their sums run in another order, and which experts
 * take it depends on the other tokens: no forward that must match single-token steps uses it).
 * `work_floats` is the scratch fn needs per row of a group. Returns 0, or -1 when scratch memory
 * cannot be had (y is untouched then). */
#define ROWS 16
#define PK_GROUP 256
/* pk_rows: above this many tokens an expert takes pk_product, near where it overtakes the nt
 * kernels (Zen 3, 7168 x 2048). Dense, 16: the products' cut too (dsv3cli.ops.PACK_ROWS), so a
 * bfloat16 prefill of up to 16 tokens keeps the bits of single steps everywhere. FP8, whose nt
 * kernel converts every code for every row group, 8 */
#define PK_ROWS_DENSE 16
#define PK_ROWS_FP8 8
typedef int64_t (*expert_fn)(const void *ctx, int64_t e, const char *xs, int64_t r, float *out, float *work, int pk);
static int64_t moe_drive(int bf16, const void *x, const int64_t *idx, const float *wt, void *y, int64_t N, int64_t Kx,
                         int64_t D, int64_t lo, int64_t hi, int shared, int out_f32, int prefill, int64_t pk_rows,
                         int64_t work_floats, expert_fn fn, const void *ctx) {
    size_t es = bf16 ? 2 : 4;
    int64_t nacc = out_f32 ? 0 : N * D, G = prefill ? PK_GROUP : ROWS;
    int64_t *tok = malloc((size_t)G * sizeof(int64_t) + (size_t)(nacc + G * (work_floats + D + 1)) * sizeof(float) +
                          (size_t)G * D * es), rc = 0;
    if (!tok) return -1;
    float *buf = (float *)(tok + G), *acc = out_f32 ? (float *)y : buf, *work = buf + nacc;
    float *out = work + G * work_floats, *scale = out + G * D;
    char *xs = (char *)(scale + G); /* the group's token rows, gathered */
    memset(acc, 0, (size_t)(N * D) * sizeof(float));
    for (int64_t e = lo - (shared != 0); e < hi && !rc; e++) {
        int64_t count = 0, n = 0;
        for (int64_t t = 0; prefill && t < N; t++)
            for (int64_t k = 0; k < (e < lo ? 1 : Kx); k++)
                if (e < lo || idx[t * Kx + k] == e) {
                    count++;
                    break;
                }
        int pk = prefill && count > pk_rows ? prefill : 0;
        int64_t group = pk ? PK_GROUP : ROWS;
        while (n < N && !rc) {
            int64_t r = 0;
            for (; n < N && r < group; n++)
                for (int64_t k = 0; k < (e < lo ? 1 : Kx); k++)
                    if (e < lo || idx[n * Kx + k] == e) {
                        tok[r] = n, scale[r] = e < lo ? 1.0f : wt[n * Kx + k];
                        memcpy(xs + r * D * es, (const char *)x + n * D * es, (size_t)D * es);
                        r++;
                        break; /* an expert appears once in a token's choices */
                    }
            if (r == 0) break;
            rc = fn(ctx, e, xs, r, out, work, pk);
            for (int64_t j = 0; j < r && !rc; j++)
                for (int64_t d = 0; d < D; d++) acc[tok[j] * D + d] += scale[j] * out[j * D + d];
        }
    }
    if (!out_f32 && !rc) store(acc, y, bf16, N * D);
    free(tok);
    return rc;
}

/* dense (bfloat16 or float32) experts: stacked w13 [E_local, 2I, D] (gate rows then up rows) and
 * w2 [E_local, D, I], the shared expert's gate sg and up su [Is,D], down sd [D,Is] */
struct dense_experts {
    int bf16;
    const char *w13, *w2, *sg, *su, *sd;
    int64_t D, I, Is, lo;
};
static int64_t dense_expert(const void *ctx, int64_t e, const char *xs, int64_t r, float *out, float *work, int pk) {
    const struct dense_experts *c = ctx;
    size_t es = c->bf16 ? 2 : 4;
    int64_t D = c->D, Ie = e < c->lo ? c->Is : c->I;
    const char *wg = c->sg, *wu = c->su, *wd = c->sd;
    if (e >= c->lo) {
        wg = c->w13 + (e - c->lo) * 2 * c->I * D * es, wu = wg + c->I * D * es;
        wd = c->w2 + (e - c->lo) * D * c->I * es;
    }
    return swiglu_rows(c->bf16, xs, r, D, wg, wu, wd, Ie, work, work + r * 2 * Ie, pk, out);
}

/* A MoE layer's experts for N tokens (the router's choices given):
 *   y[n] = shared(x[n]) + sum over k with lo <= idx[n][k] < hi of
 *          wt[n][k] * down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n][k] - lo
 * w13 [E_local, 2I, D] (gate rows then up rows), w2 [E_local, D, I]; the shared expert (this
 * rank's part; none when sg is NULL): gate sg and up su [Is,D], down sd [D,Is]. x, y [N,D] and
 * the weights all bfloat16 (bf16=1) or all float32; idx int64 [N,Kx]; wt float32 [N,Kx].
 * Each weight row is read once per group of tokens (moe_drive; `prefill`: see there). The hidden
 * activations stay float32 (rounded to bfloat16 as the input of a bfloat16 product), and y
 * accumulates in float32, rounded once at the end; with out_f32, y is float32 and gets the sums
 * unrounded (a part of the experts, for dsv3_sum_f32). Returns 0, or -1 when scratch memory cannot
 * be had (y is untouched then). */
int64_t dsv3_moe(int bf16, const void *x, const int64_t *idx, const float *wt, const void *w13, const void *w2, void *y,
                 int64_t N, int64_t Kx, int64_t D, int64_t I, int64_t lo, int64_t hi, const void *sg, const void *su,
                 const void *sd, int64_t Is, int out_f32, int prefill) {
    struct dense_experts c = {bf16, w13, w2, sg, su, sd, D, I, sg ? Is : 0, lo};
    int64_t Im = c.Is > I ? c.Is : I;
    return moe_drive(bf16, x, idx, wt, y, N, Kx, D, lo, hi, sg != NULL, out_f32, prefill, PK_ROWS_DENSE, 3 * Im, dense_expert, &c);
}

/* FP8 experts: each weight as E4M3 codes with its 128x128 block scales, by address: six per
 * expert (gate codes, gate scales, up codes, up scales, down codes, down scales), ptr for the
 * routed experts lo.. (6 per expert), sp for the shared expert (NULL: none); gate and up [I,D],
 * down [D,I] (the shared expert's width Is) */
struct fp8_experts {
    const int64_t *ptr, *sp;
    int bf16;
    int64_t D, I, Is, lo;
};
/* a prefill's product for fp8_expert, its weight q [n1,K] with scales s: on the AMX tiles (pk 2),
 * else pk_product */
static int64_t fp8_prefill(int pk, const void *x, int xbf16, int64_t M, int64_t K, const uint8_t *q, const float *s,
                           int64_t n1, float *y, int64_t ldy) {
#ifdef DSV3_AMX
    if (pk == 2) return amx_fp8_product(x, xbf16, K, M, K, q, s, 0, n1, y, ldy);
#endif
    return pk_product(x, xbf16, K, M, K, PK_FP8, q, K, s, 0, n1, y, ldy);
}

static int64_t fp8_expert(const void *ctx, int64_t e, const char *xs, int64_t r, float *out, float *work, int pk) {
    const struct fp8_experts *c = ctx;
    const int64_t *p = e < c->lo ? c->sp : c->ptr + (e - c->lo) * 6;
    int64_t D = c->D, Ie = e < c->lo ? c->Is : c->I, rc = 0;
    float *xf = work, *gu = xf + r * D, *act = gu + r * 2 * Ie;
    const uint8_t *q[3] = {(const uint8_t *)p[0], (const uint8_t *)p[2], (const uint8_t *)p[4]};
    const float *s[3] = {(const float *)p[1], (const float *)p[3], (const float *)p[5]};
    if (pk) {
        rc = fp8_prefill(pk, xs, c->bf16, r, D, q[0], s[0], Ie, gu, 2 * Ie);
        rc = rc ? rc : fp8_prefill(pk, xs, c->bf16, r, D, q[1], s[1], Ie, gu + Ie, 2 * Ie);
    } else {
        to_f32(xs, c->bf16, D, r, D, xf);
        rc = fp8_product(xf, r, D, q[0], s[0], 0, Ie, gu, 2 * Ie);
        rc = rc ? rc : fp8_product(xf, r, D, q[1], s[1], 0, Ie, gu + Ie, 2 * Ie);
    }
    if (rc) return rc;
    for (int64_t j = 0; j < r; j++) silu_mul(gu + j * 2 * Ie, gu + j * 2 * Ie + Ie, act + j * Ie, Ie);
    return pk ? fp8_prefill(pk, act, 0, r, Ie, q[2], s[2], D, out, D) : fp8_product(act, r, Ie, q[2], s[2], 0, D, out, D);
}

/* dsv3_moe for FP8 experts (fp8_expert), the products straight from the codes (fp8_product, or
 * pk_product in a prefill): the same routing, gathering, float32 activations and sums; bf16 says
 * the dtype of x and y. */
int64_t dsv3_moe_fp8(int bf16, const void *x, const int64_t *idx, const float *wt, const int64_t *ptr, const int64_t *sp,
                     void *y, int64_t N, int64_t Kx, int64_t D, int64_t I, int64_t lo, int64_t hi, int64_t Is, int out_f32,
                     int prefill) {
    struct fp8_experts c = {ptr, sp, bf16, D, I, sp ? Is : 0, lo};
    int64_t Im = c.Is > I ? c.Is : I;
    return moe_drive(bf16, x, idx, wt, y, N, Kx, D, lo, hi, sp != NULL, out_f32, prefill, PK_ROWS_FP8, D + 3 * Im, fp8_expert, &c);
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

