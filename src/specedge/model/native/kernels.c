/* Native CPU kernels (see specedge/model/native/__init__.py): row attention, RMSNorm, and
 * RoPE fused with the KV write.
 *
 * Row attention: query rows of a batch (decode steps, tree nodes, lookup chains) each against
 * its sequence's KV slot, read in place from the paged pool, in one call per layer. A row
 * attends its slot's positions 0..length-1, all of them before its mask start and, from there
 * on, those its mask bytes mark (a tree node: its ancestors and itself).
 *
 * For each (sequence, K/V head): the g query heads of the group are scored against every key
 * (each key read once for all g heads), softmaxed in float32, and the values summed with the
 * probabilities (each value read once), so K/V traffic is one pass over the slot with no copy
 * and no repeated heads. Scores, softmax and sums are float32; the output is rounded once to
 * the model's dtype (as torch's CPU SDPA kernel does).
 *
 * Layouts (element strides are in elements, not bytes):
 *   q:    row r, head h at q + r * q_row_stride + h * head_dim             (model dtype)
 *   keys, values: head j, pool position p at base + j * kv_head_stride + p * head_dim
 *   out:  row r, head h at out + r * out_row_stride + h * head_dim        (model dtype)
 *   rows[i], starts[i], lengths[i]: entry i's row, the pool position of its slot
 *   position 0, and how many positions it spans;
 *   masks (NULL: none), mask_starts[i], mask_offsets[i]: entry i attends slot position p >=
 *   mask_starts[i] only where masks[mask_offsets[i] + p - mask_starts[i]] is nonzero.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline uint16_t float_to_bf16(float x) { /* round to nearest even, NaN kept */
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0 (scores minus their maximum), written so that the compiler vectorises
 * it: 2^n * p(r) with r = x - n ln2, |r| <= ln2 / 2, p a degree-6 polynomial (relative
 * error about 2e-7, the size of a float's rounding). Below -87 (a masked score, -inf,
 * included) it returns 0. */
static inline float exp_nonpositive(float x) {
    const float given = x;
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504089f + 0.5f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = (int32_t)n + 127;
    uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return given < -87.0f ? 0.0f : p * scale;
}

enum { MAX_HEAD_DIM = 256, MAX_GROUP = 16 };

/* Scores of positions the row does not attend (its mask, from `mask_start` on) set to -inf:
 * their softmax weight is exactly 0. */
static void mask_scores(float *scores, int64_t group, int64_t length, const uint8_t *mask,
                        int64_t mask_start) {
    if (!mask) return;
    for (int64_t p = mask_start; p < length; p++)
        if (!mask[p - mask_start])
            for (int64_t j = 0; j < group; j++) scores[j * length + p] = -INFINITY;
}

/* Each of `group` rows of `scores` (`length` floats) replaced by its softmax. */
static void softmax_rows(float *scores, int64_t group, int64_t length) {
    for (int64_t j = 0; j < group; j++) {
        float *s = scores + j * length;
        float top = s[0];
        for (int64_t p = 1; p < length; p++) top = s[p] > top ? s[p] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t p = 0; p < length; p++) {
            s[p] = exp_nonpositive(s[p] - top);
            total += s[p];
        }
        float inverse = 1.0f / total;
#pragma omp simd
        for (int64_t p = 0; p < length; p++) s[p] *= inverse;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

/* head_bf16 with AVX512: keys dotted as bf16 pairs into float32 (vdpbf16ps, exact products),
 * values widened to float32 and accumulated with FMAs. Inlined into one function per (group,
 * head_dim) below, so that the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void head_bf16_avx512(
    const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t length,
    const uint8_t *mask, int64_t mask_start, const int64_t group, const int64_t head_dim,
    float scale, float *scores, float *out_group) {
    const int64_t pairs = head_dim / 32, wide = head_dim / 16;
    __m512bh qv[MAX_GROUP][MAX_HEAD_DIM / 32];
    for (int64_t j = 0; j < group; j++)
        for (int64_t c = 0; c < pairs; c++)
            qv[j][c] = (__m512bh)_mm512_loadu_si512(q + j * head_dim + c * 32);
    for (int64_t p = 0; p < length; p++) {
        const uint16_t *k = keys + p * head_dim;
        for (int64_t c = 0; c < pairs; c++)
            _mm_prefetch((const char *)(k + PREFETCH_ROWS * head_dim + c * 32), _MM_HINT_T0);
        __m512bh kv[MAX_HEAD_DIM / 32];
        for (int64_t c = 0; c < pairs; c++) kv[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
        for (int64_t j = 0; j < group; j++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < pairs; c++) acc = _mm512_dpbf16_ps(acc, qv[j][c], kv[c]);
            scores[j * length + p] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    mask_scores(scores, group, length, mask, mask_start);
    softmax_rows(scores, group, length);
    /* Value columns in blocks of at most 24 accumulators (of the 32 vector registers). */
    const int64_t block = group * wide <= 24 ? wide : (24 / group > 0 ? 24 / group : 1);
    for (int64_t c0 = 0; c0 < wide; c0 += block) {
        __m512 acc[MAX_GROUP][MAX_HEAD_DIM / 16];
        for (int64_t j = 0; j < group; j++)
            for (int64_t c = 0; c < block; c++) acc[j][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < length; p++) {
            const uint16_t *v = values + p * head_dim + c0 * 16;
            for (int64_t c = 0; c < block && c0 + c < wide; c += 2)
                _mm_prefetch((const char *)(v + PREFETCH_ROWS * head_dim + c * 16), _MM_HINT_T0);
            for (int64_t c = 0; c < block && c0 + c < wide; c++) {
                __m512i halves =
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + c * 16)));
                __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
                for (int64_t j = 0; j < group; j++)
                    acc[j][c] =
                        _mm512_fmadd_ps(_mm512_set1_ps(scores[j * length + p]), vf, acc[j][c]);
            }
        }
        for (int64_t j = 0; j < group; j++)
            for (int64_t c = 0; c < block && c0 + c < wide; c++)
                _mm512_storeu_ps(out_group + j * head_dim + (c0 + c) * 16, acc[j][c]);
    }
}

#define SPECIALISED(G, D)                                                                    \
    static void head_bf16_g##G##_d##D(const uint16_t *q, const uint16_t *keys,               \
                                      const uint16_t *values, int64_t length,                \
                                      const uint8_t *mask, int64_t mask_start, float scale,  \
                                      float *scores, float *out_group) {                     \
        head_bf16_avx512(q, keys, values, length, mask, mask_start, G, D, scale, scores,     \
                         out_group);                                                         \
    }
#define SPECIALISED_D(D)                                                                     \
    SPECIALISED(1, D) SPECIALISED(2, D) SPECIALISED(3, D) SPECIALISED(4, D)                  \
    SPECIALISED(5, D) SPECIALISED(6, D) SPECIALISED(7, D) SPECIALISED(8, D)
SPECIALISED_D(64)
SPECIALISED_D(128)

typedef void (*fast_head)(const uint16_t *, const uint16_t *, const uint16_t *, int64_t,
                          const uint8_t *, int64_t, float, float *, float *);
static const fast_head FAST_HEADS[2][8] = {
    {head_bf16_g1_d64, head_bf16_g2_d64, head_bf16_g3_d64, head_bf16_g4_d64, head_bf16_g5_d64,
     head_bf16_g6_d64, head_bf16_g7_d64, head_bf16_g8_d64},
    {head_bf16_g1_d128, head_bf16_g2_d128, head_bf16_g3_d128, head_bf16_g4_d128,
     head_bf16_g5_d128, head_bf16_g6_d128, head_bf16_g7_d128, head_bf16_g8_d128},
};

/* The specialised head for (group, head_dim), or NULL. */
static fast_head find_fast_head(int64_t group, int64_t head_dim) {
    if (group < 1 || group > 8) return NULL;
    if (head_dim == 64) return FAST_HEADS[0][group - 1];
    if (head_dim == 128) return FAST_HEADS[1][group - 1];
    return NULL;
}
#endif

/* One (sequence, K/V head), portable: q_group[g][D] float32 in, out_group[g][D] float32 out;
 * `scores` holds g * length floats. */
#define DEFINE_HEAD(NAME, T, LOAD)                                                           \
    static void NAME(const float *q_group, const T *keys, const T *values, int64_t length,   \
                     const uint8_t *mask, int64_t mask_start, int64_t group,                 \
                     int64_t head_dim, float scale, float *scores, float *out_group) {       \
        float row[MAX_HEAD_DIM];                                                             \
        for (int64_t p = 0; p < length; p++) {                                               \
            const T *k = keys + p * head_dim;                                                \
            for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(k[d]);                      \
            for (int64_t j = 0; j < group; j++) {                                            \
                const float *qj = q_group + j * head_dim;                                    \
                float acc = 0.0f;                                                            \
                _Pragma("omp simd reduction(+ : acc)")                                       \
                for (int64_t d = 0; d < head_dim; d++) acc += qj[d] * row[d];                \
                scores[j * length + p] = acc * scale;                                        \
            }                                                                                \
        }                                                                                    \
        mask_scores(scores, group, length, mask, mask_start);                                \
        softmax_rows(scores, group, length);                                                 \
        memset(out_group, 0, sizeof(float) * group * head_dim);                              \
        for (int64_t p = 0; p < length; p++) {                                               \
            const T *v = values + p * head_dim;                                              \
            for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(v[d]);                      \
            for (int64_t j = 0; j < group; j++) {                                            \
                float w = scores[j * length + p];                                            \
                float *o = out_group + j * head_dim;                                         \
                _Pragma("omp simd")                                                          \
                for (int64_t d = 0; d < head_dim; d++) o[d] += w * row[d];                   \
            }                                                                                \
        }                                                                                    \
    }

#define LOAD_BF16(x) bf16_to_float(x)
#define LOAD_F32(x) (x)
#define STORE_BF16(x) float_to_bf16(x)
#define STORE_F32(x) (x)

DEFINE_HEAD(head_bf16, uint16_t, LOAD_BF16)
DEFINE_HEAD(head_f32, float, LOAD_F32)


/* Returns 0, or -1 for a shape it does not take (head_dim or group too large), or -2 when
 * scratch memory could not be had. `FAST` says whether a head takes the raw rows (AVX512). */
#define DEFINE_ROWS(NAME, HEAD, FAST_TYPE, FAST, T, LOAD, STORE)                           \
    int NAME(const T *q, int64_t q_row_stride, const T *keys, const T *values,               \
             int64_t kv_head_stride, const int64_t *rows, const int64_t *starts,             \
             const int64_t *lengths, const uint8_t *masks, const int64_t *mask_starts,       \
             const int64_t *mask_offsets, int64_t num_sequences, int64_t num_heads,          \
             int64_t num_kv_heads, int64_t head_dim, float scale, T *out,                    \
             int64_t out_row_stride, int num_threads) {                                      \
        int64_t group = num_heads / num_kv_heads;                                            \
        if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;                         \
        int64_t longest = 1;                                                                 \
        for (int64_t i = 0; i < num_sequences; i++)                                          \
            longest = lengths[i] > longest ? lengths[i] : longest;                           \
        int failed = 0;                                                                      \
        FAST_TYPE fast = FAST;                                                               \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)")                \
        {                                                                                    \
            float *scores = malloc(sizeof(float) * group * longest);                         \
            float q_group[MAX_GROUP * MAX_HEAD_DIM], out_group[MAX_GROUP * MAX_HEAD_DIM];     \
            if (!scores) failed = 1;                                                         \
            _Pragma("omp for schedule(static) collapse(2)")                                  \
            for (int64_t i = 0; i < num_sequences; i++) {                                    \
                for (int64_t kv = 0; kv < num_kv_heads; kv++) {                              \
                    if (!scores) continue;                                                   \
                    const T *qi = q + rows[i] * q_row_stride + kv * group * head_dim;        \
                    int64_t offset = kv * kv_head_stride + starts[i] * head_dim;             \
                    const uint8_t *mask = masks && mask_starts[i] < lengths[i]               \
                                              ? masks + mask_offsets[i]                      \
                                              : NULL;                                        \
                    int64_t mask_start = mask ? mask_starts[i] : lengths[i];                 \
                    if (fast) {                                                              \
                        fast(qi, keys + offset, values + offset, lengths[i], mask, mask_start, \
                             scale, scores, out_group);                                      \
                    } else {                                                                 \
                        for (int64_t e = 0; e < group * head_dim; e++) q_group[e] = LOAD(qi[e]); \
                        HEAD(q_group, keys + offset, values + offset, lengths[i], mask,      \
                             mask_start, group, head_dim, scale, scores, out_group);         \
                    }                                                                        \
                    T *oi = out + rows[i] * out_row_stride + kv * group * head_dim;          \
                    for (int64_t e = 0; e < group * head_dim; e++) oi[e] = STORE(out_group[e]); \
                }                                                                            \
            }                                                                                \
            free(scores);                                                                    \
        }                                                                                    \
        return failed ? -2 : 0;                                                              \
    }

typedef void (*no_fast_head)(const float *, const float *, const float *, int64_t,
                             const uint8_t *, int64_t, float, float *, float *);
#ifdef HAVE_AVX512_BF16
DEFINE_ROWS(row_attention_bf16, head_bf16, fast_head, find_fast_head(group, head_dim),
              uint16_t, LOAD_BF16, STORE_BF16)
#else
typedef void (*no_fast_bf16)(const uint16_t *, const uint16_t *, const uint16_t *, int64_t,
                             const uint8_t *, int64_t, float, float *, float *);
DEFINE_ROWS(row_attention_bf16, head_bf16, no_fast_bf16, NULL, uint16_t, LOAD_BF16,
              STORE_BF16)
#endif
DEFINE_ROWS(row_attention_f32, head_f32, no_fast_head, NULL, float, LOAD_F32, STORE_F32)

/* RMSNorm of `rows` bf16 rows of `dim`, as the model's bf16 path: normalised in float32 and
 * rounded once to bf16, then scaled by the bf16 weight (a second rounding), as
 * `weight * F.rms_norm(x)` and the reference implementations' explicit upcast do. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *outr = out + r * dim;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; d++) {
            float value = bf16_to_float(xr[d]);
            squares += value * value;
        }
        float scale = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) {
            float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[d]) * scale));
            outr[d] = float_to_bf16(bf16_to_float(weight[d]) * normed);
        }
    }
}

/* RoPE on a layer's new queries and keys, and the keys and values stored in the KV pool, in
 * one pass; the same bf16 arithmetic as the model's torch path, rounding for rounding
 * (`qk * cos + rotate_half(qk) * sin`: each product rounded to bf16, then their sum):
 *   qk: row t, head h (queries, then keys) at qk + t * qk_row_stride + h * head_dim
 *   v:  row t, K/V head j at v + t * v_row_stride + j * head_dim
 *   cos, sin: [rows, head_dim]; index[t]: the pool position of row t
 *   q_out: [rows, num_heads, head_dim]; keys, values: head j, position p at
 *   j * kv_head_stride + p * head_dim. */
void rope_store_bf16(const uint16_t *qk, int64_t qk_row_stride, const uint16_t *v,
                     int64_t v_row_stride, const uint16_t *cos, const uint16_t *sin,
                     const int64_t *index, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, uint16_t *q_out, uint16_t *keys, uint16_t *values,
                     int64_t kv_head_stride) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            const uint16_t *x = qk + t * qk_row_stride + h * head_dim;
            uint16_t *out = h < num_heads
                                ? q_out + (t * num_heads + h) * head_dim
                                : keys + (h - num_heads) * kv_head_stride + index[t] * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) {
                float rotated = d < half ? -bf16_to_float(x[d + half]) : bf16_to_float(x[d - half]);
                float a = bf16_to_float(float_to_bf16(bf16_to_float(x[d]) * bf16_to_float(c[d])));
                float b = bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[d])));
                out[d] = float_to_bf16(a + b);
            }
        }
        for (int64_t j = 0; j < num_kv_heads; j++)
            memcpy(values + j * kv_head_stride + index[t] * head_dim,
                   v + t * v_row_stride + j * head_dim, sizeof(uint16_t) * head_dim);
    }
}
