/* KIVI store reads for memopt::kv_attend's decode step (memopt/runtime/kv_ops.py), fp32 arithmetic.

   Built on first use by memopt/runtime/native.py (cc -O3 -march=native, cached per CPU) and called through
   ctypes; without a C compiler kv_ops reads the store with PyTorch ops instead (the same result, slower).

   The store of one group of KV heads (memopt/kv/kivi.py): `bits`-bit codes packed `per = 8 / bits` a byte,
   element i of a byte in bits [bits * i, bits * (i + 1)).
     keys    codes (heads, blocks, D, group * bits / 8): a channel's codes for a block's tokens together, per
             block and channel an fp16 scale and zero (heads, blocks, D): k = code * scale + zero;
     values  codes (heads, tokens, D * bits / 8), per token and group of D / G channels an fp16 scale and
             zero (heads, tokens, G).
   Nothing is dequantized into memory (but a pre-RoPE key block, into a scratch: key_logits_rope): 16 codes at a
   time are unpacked into a vector register and the scales and zeros are factored out of the products, so every
   product is a vector multiply-add of codes into accumulators (no horizontal sums):
     q . k_t  = sum_c (q_c s_bc) u_tc + sum_c q_c z_bc          (block b: per channel, an axpy over its tokens)
     sum_t p_t v_tc = sum_t (p_t s_tj) u_tc + sum_t p_t z_tj    (token t: per group j, an axpy over its channels)
   Accumulators are kept in plane order (plane i: the elements i, i + per, ...) and put in order once at the end.
   Vectors are GCC / Clang vector extensions: AVX-512, AVX2 or NEON, whatever -march=native gives. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 1024
#define MAX_R 64
#define INLINE static inline __attribute__((always_inline))

typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

#if defined(__F16C__)
#include <immintrin.h>
INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
INLINE float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-08f;
        return (h & 0x8000u) ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* 16 (8) codes from bytes p[0..15] ((p[k] >> shift) & mask) as floats: widened to 32 bits before the shift
   and the conversion (x86 has no byte shift; GCC scalarizes a vector u8 -> f32 conversion). */
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE vf16 codes16(const uint8_t *p, int shift, int mask) {
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    x = _mm512_and_si512(_mm512_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask));
    return (vf16)_mm512_cvtepi32_ps(x);
}
#else
INLINE vf16 codes16(const uint8_t *p, int shift, int mask) {
    vf16 u;
    for (int k = 0; k < 16; k++) u[k] = (float)((p[k] >> shift) & mask);
    return u;
}
#endif
#if defined(__AVX2__)
#include <immintrin.h>
INLINE vf8 codes8(const uint8_t *p, int shift, int mask) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    x = _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
    return (vf8)_mm256_cvtepi32_ps(x);
}
#else
INLINE vf8 codes8(const uint8_t *p, int shift, int mask) {
    vf8 u;
    for (int k = 0; k < 8; k++) u[k] = (float)((p[k] >> shift) & mask);
    return u;
}
#endif

/* acc[r * acc_stride + j] += coef[r * coef_stride] * ((row[j] >> shift) & mask) for r < R, j < n. */
INLINE void axpy_codes(int R, const float *coef, int coef_stride, const uint8_t *row, int n, const int shift,
                       const int mask, float *acc, int acc_stride) {
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        vf16 u = codes16(row + j, shift, mask);
        for (int r = 0; r < R; r++) {
            vf16 a;
            float *at = acc + r * acc_stride + j;
            memcpy(&a, at, sizeof a);
            a += coef[r * coef_stride] * u;
            memcpy(at, &a, sizeof a);
        }
    }
    for (; j + 8 <= n; j += 8) {
        vf8 u = codes8(row + j, shift, mask);
        for (int r = 0; r < R; r++) {
            vf8 a;
            float *at = acc + r * acc_stride + j;
            memcpy(&a, at, sizeof a);
            a += coef[r * coef_stride] * u;
            memcpy(at, &a, sizeof a);
        }
    }
    for (; j < n; j++)
        for (int r = 0; r < R; r++)
            acc[r * acc_stride + j] += coef[r * coef_stride] * (float)((row[j] >> shift) & mask);
}

/* dst[k] = half src[k] as float, k < n. */
INLINE void halves(const uint16_t *src, int n, float *dst) {
    int k = 0;
#if defined(__F16C__)
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + k))));
#endif
    for (; k < n; k++) dst[k] = h2f(src[k]);
}

/* One block whose channels are 16 bytes (a plane a vector): acc[r * per * 16 + i * 16 + k], R and per constants. */
INLINE void key_block16(const int R, const int per, const int bits, int D, const float *w, const uint8_t *block,
                        float *acc) {
    const int mask = (1 << bits) - 1;
    vf16 a[R][per];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < per; i++) a[r][i] = (vf16){0};
    for (int c = 0; c < D; c++)
        for (int i = 0; i < per; i++) {
            vf16 u = codes16(block + (long)c * 16, bits * i, mask);
            for (int r = 0; r < R; r++) a[r][i] += w[r * D + c] * u;
        }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < per; i++) memcpy(acc + (r * per + i) * 16, &a[r][i], sizeof a[r][i]);
}

INLINE void key_logits(int H, int R, int D, const int bits, int group, int nb, const float *q, const uint8_t *kq,
                       long kq_sh, long kq_sb, const uint16_t *ks, const uint16_t *kz, long s_sh, long s_sb,
                       float *out, long o_sh, long o_sr, float *work) {
    const int per = 8 / bits, mask = (1 << bits) - 1, cb = group / per;  /* cb: a channel's bytes per block */
    float *acc = work, *w = work + (long)R * group, qz[MAX_R], s[MAX_D], z[MAX_D];
    for (int h = 0; h < H; h++) {
        const float *qh = q + (long)h * R * D;
        for (int b = 0; b < nb; b++) {
            halves(ks + h * s_sh + b * s_sb, D, s);
            halves(kz + h * s_sh + b * s_sb, D, z);
            for (int r = 0; r < R; r++) {  /* the block-scaled queries and the zero term */
                float dot = 0.f;
                for (int c = 0; c < D; c++) {
                    w[r * D + c] = qh[r * D + c] * s[c];
                    dot += qh[r * D + c] * z[c];
                }
                qz[r] = dot;
            }
            const uint8_t *block = kq + h * kq_sh + b * kq_sb;
            if (cb == 16 && R <= 4) {  /* accumulators in registers */
                if (R == 1) key_block16(1, per, bits, D, w, block, acc);
                else if (R == 2) key_block16(2, per, bits, D, w, block, acc);
                else if (R == 3) key_block16(3, per, bits, D, w, block, acc);
                else key_block16(4, per, bits, D, w, block, acc);
            } else {
                memset(acc, 0, sizeof(float) * R * group);
                for (int c = 0; c < D; c++)
                    for (int i = 0; i < per; i++)
                        axpy_codes(R, w + c, D, block + (long)c * cb, cb, bits * i, mask, acc + i * cb, group);
            }
            float *o = out + h * o_sh + (long)b * group;
            for (int r = 0; r < R; r++)
                for (int i = 0; i < per; i++)
                    for (int j = 0; j < cb; j++) o[r * o_sr + per * j + i] = acc[r * group + i * cb + j] + qz[r];
        }
    }
}

#define BY_BITS(F, ...) \
    do { if (bits == 4) F(__VA_ARGS__, 4); else if (bits == 2) F(__VA_ARGS__, 2); else F(__VA_ARGS__, 8); } while (0)
#define KEYS(H, R, D, group, nb, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, out, o_sh, o_sr, work, BITS) \
    key_logits(H, R, D, BITS, group, nb, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, out, o_sh, o_sr, work)

/* logits[h, r, b * group + t] = q[h, r] . key t of block b, for blocks 0..nb-1.
   q (H, R, D) fp32 contiguous; kq element [h, b, c, j] at kq + h * kq_sh + b * kq_sb + c * group * bits / 8 + j;
   scales / zeros [h, b, c] at ks + h * s_sh + b * s_sb + c; out[h, r, x] at out + h * o_sh + r * o_sr + x. */
int kivi_key_logits(int H, int R, int D, int bits, int group, int nb, const float *q, const uint8_t *kq,
                    long kq_sh, long kq_sb, const uint16_t *ks, const uint16_t *kz, long s_sh, long s_sb,
                    float *out, long o_sh, long o_sr) {
    if (D > MAX_D || R < 1 || R > MAX_R || group > 1024 || (bits != 2 && bits != 4 && bits != 8) ||
        (group * bits) % 8)
        return 1;
    float *work = malloc(sizeof(float) * R * ((long)group + D));  /* accumulators, block-scaled queries */
    if (!work) return 1;
    BY_BITS(KEYS, H, R, D, group, nb, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, out, o_sh, o_sr, work);
    free(work);
    return 0;
}

/* Keys stored before RoPE (KIVI's pre-RoPE layout): key t of block b is RoPE at its position p of the stored k_t.
   A block is dequantized into `keys` (D, group) fp32, its tokens in plane order (token per * j + i at
   i * cb + j, as its codes lie), turned to its positions (k_c, k_{c+D/2}) <- (k_c cos - k_{c+D/2} sin,
   k_{c+D/2} cos + k_c sin) with cos, sin of p * inv_freq_c, then multiplied by the R query rows: the block is
   dequantized and turned once for every row, and every loop runs along a block's tokens (vectors). rope +
   offsets[b]: block b's table, cos (D/2, group) then sin (D/2, group), tokens in plane order. `rotated`: the
   stored keys are Hadamard-rotated (codes of H k_t, H the orthonormal Sylvester matrix, D a power of two), turned
   back first by a fast Walsh-Hadamard transform along the channels (log2 D butterfly passes, each a vector add /
   subtract over the block's tokens). Other arguments as kivi_key_logits'; acc: R * group floats. */
INLINE void key_logits_rope(int H, int R, int D, const int bits, int group, int nb, int rotated, const float *q,
                            const uint8_t *kq, long kq_sh, long kq_sb, const uint16_t *ks, const uint16_t *kz,
                            long s_sh, long s_sb, const float *rope, const int64_t *offsets, float *out, long o_sh,
                            long o_sr, float *acc, float *keys) {
    const int per = 8 / bits, mask = (1 << bits) - 1, cb = group / per, half = D / 2;
    const float norm = rotated ? 1.f / sqrtf((float)D) : 1.f;  /* H = (+-1 matrix) / sqrt(D), folded into s, z */
    float s[MAX_D], z[MAX_D];
    for (int h = 0; h < H; h++)
        for (int b = 0; b < nb; b++) {
            halves(ks + h * s_sh + b * s_sb, D, s);
            halves(kz + h * s_sh + b * s_sb, D, z);
            const uint8_t *block = kq + h * kq_sh + b * kq_sb;
            for (int c = 0; c < D; c++) {
                const float sc = s[c] * norm, zc = z[c] * norm;
                const uint8_t *u = block + (long)c * cb;
                float *row = keys + (long)c * group;
                for (int i = 0; i < per; i++)
                    for (int j = 0; j < cb; j++) row[i * cb + j] = (float)((u[j] >> (bits * i)) & mask) * sc + zc;
            }
            if (rotated)
                for (int len = 1; len < D; len <<= 1)
                    for (int c0 = 0; c0 < D; c0 += 2 * len)
                        for (int c = c0; c < c0 + len; c++) {
                            float *x = keys + (long)c * group, *y = x + (long)len * group;
                            for (int t = 0; t < group; t++) {
                                const float a = x[t], d = y[t];
                                x[t] = a + d;
                                y[t] = a - d;
                            }
                        }
            const float *cos_t = rope + offsets[b], *sin_t = cos_t + (long)half * group;
            for (int c = 0; c < half; c++) {
                float *ka = keys + (long)c * group, *kb = keys + (long)(c + half) * group;
                const float *ci = cos_t + (long)c * group, *si = sin_t + (long)c * group;
                for (int t = 0; t < group; t++) {
                    const float a = ka[t], d = kb[t];
                    ka[t] = a * ci[t] - d * si[t];
                    kb[t] = d * ci[t] + a * si[t];
                }
            }
            memset(acc, 0, sizeof(float) * R * group);
            for (int c = 0; c < D; c++) {
                const float *row = keys + (long)c * group;
                for (int r = 0; r < R; r++) {
                    const float qc = q[((long)h * R + r) * D + c];
                    float *ar = acc + (long)r * group;
                    for (int t = 0; t < group; t++) ar[t] += qc * row[t];
                }
            }
            for (int r = 0; r < R; r++) {
                float *o = out + h * o_sh + r * o_sr + (long)b * group;
                const float *ar = acc + (long)r * group;
                for (int i = 0; i < per; i++)
                    for (int j = 0; j < cb; j++) o[per * j + i] = ar[i * cb + j];
            }
        }
}

#define KEYS_ROPE(H, R, D, group, nb, rotated, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, rope, offsets, out, o_sh, \
                  o_sr, work, BITS)                                                                                \
    key_logits_rope(H, R, D, BITS, group, nb, rotated, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, rope, offsets, out,  \
                    o_sh, o_sr, work, work + (long)(R) * (group))

/* kivi_key_logits for a pre-RoPE store (key_logits_rope), D even; rotated: Hadamard-rotated keys, D a power of
   two. */
int kivi_key_logits_rope(int H, int R, int D, int bits, int group, int nb, int rotated, const float *q,
                         const uint8_t *kq, long kq_sh, long kq_sb, const uint16_t *ks, const uint16_t *kz, long s_sh,
                         long s_sb, const float *rope, const int64_t *offsets, float *out, long o_sh, long o_sr) {
    if (D > MAX_D || D % 2 || R < 1 || R > MAX_R || group > 1024 || (bits != 2 && bits != 4 && bits != 8) ||
        (group * bits) % 8 || !rope || !offsets || (rotated && (D & (D - 1))))
        return 1;
    float *work = malloc(sizeof(float) * group * ((long)R + D));  /* the rows' accumulators, a block's keys */
    if (!work) return 1;
    BY_BITS(KEYS_ROPE, H, R, D, group, nb, rotated, q, kq, kq_sh, kq_sb, ks, kz, s_sh, s_sb, rope, offsets, out, o_sh,
            o_sr, work);
    free(work);
    return 0;
}

#define TILE 64

/* A tile of m value rows whose groups are 16 bytes a plane (a vector each), accumulated into acc (R, D) plane
   order; R, D and bits constants: the accumulators stay in registers. */
INLINE void value_tile16(const int R, const int D, const int bits, int m, const uint8_t *rows, const float *coef,
                         float *acc) {
    const int per = 8 / bits, mask = (1 << bits) - 1, G = D / (16 * per), bytes = D / per;
    vf16 a[R][per * G];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < per * G; v++) memcpy(&a[r][v], acc + r * D + v * 16, sizeof a[r][v]);
    for (int t = 0; t < m; t++)
        for (int i = 0; i < per; i++)
            for (int g = 0; g < G; g++) {
                vf16 u = codes16(rows + (long)t * bytes + g * 16, bits * i, mask);
                for (int r = 0; r < R; r++) a[r][i * G + g] += coef[(r * TILE + t) * G + g] * u;
            }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < per * G; v++) memcpy(acc + r * D + v * 16, &a[r][v], sizeof a[r][v]);
}

#define VALUE_TILE16(DD)                                                   \
    do {                                                                   \
        if (R == 1) value_tile16(1, DD, bits, m, rows, coef, acc);         \
        else if (R == 2) value_tile16(2, DD, bits, m, rows, coef, acc);    \
        else if (R == 3) value_tile16(3, DD, bits, m, rows, coef, acc);    \
        else value_tile16(4, DD, bits, m, rows, coef, acc);                \
    } while (0)


INLINE void value_output(int H, int R, int D, const int bits, int G, int n, const float *p, long p_sh, long p_sr,
                         const uint8_t *vq, long vq_sh, const uint16_t *vs, const uint16_t *vz, long s_sh,
                         float *out, float *work) {
    const int per = 8 / bits, mask = (1 << bits) - 1, bytes = D / per, width = D / G, run = width / per;
    float *acc = work, *zacc = acc + (long)R * D, *coef = zacc + (long)R * G, *s = coef + (long)R * TILE * G,
          *z = s + TILE * G;
    for (int h = 0; h < H; h++) {
        memset(acc, 0, sizeof(float) * R * D);
        memset(zacc, 0, sizeof(float) * R * G);
        const float *ph = p + h * p_sh;
        for (int t0 = 0; t0 < n; t0 += TILE) {  /* a tile's scales and weights, then its codes */
            const int m = n - t0 < TILE ? n - t0 : TILE;
            halves(vs + h * s_sh + (long)t0 * G, m * G, s);
            halves(vz + h * s_sh + (long)t0 * G, m * G, z);
            for (int r = 0; r < R; r++) {
                const float *pr = ph + r * p_sr + t0;
                for (int g = 0; g < G; g++) {
                    float zs = 0.f;
                    for (int t = 0; t < m; t++) {
                        coef[(r * TILE + t) * G + g] = pr[t] * s[t * G + g];
                        zs += pr[t] * z[t * G + g];
                    }
                    zacc[r * G + g] += zs;
                }
            }
            const uint8_t *rows = vq + h * vq_sh + (long)t0 * bytes;
            if (run == 16 && R <= 4 && (D == 64 || D == 128)) {  /* accumulators in registers */
                if (D == 64) VALUE_TILE16(64);
                else VALUE_TILE16(128);
            } else {
                for (int t = 0; t < m; t++)
                    for (int i = 0; i < per; i++)  /* plane i of group g: bytes g * run .. (g + 1) * run - 1 */
                        for (int g = 0; g < G; g++)
                            axpy_codes(R, coef + t * G + g, TILE * G, rows + (long)t * bytes + g * run, run, bits * i,
                                       mask, acc + i * bytes + g * run, D);
            }
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < per; i++)
                for (int j = 0; j < bytes; j++) {
                    int c = per * j + i;
                    out[((long)h * R + r) * D + c] += acc[r * D + i * bytes + j] + zacc[r * G + c / width];
                }
    }
}

#define VALUES(H, R, D, G, n, p, p_sh, p_sr, vq, vq_sh, vs, vz, s_sh, out, work, BITS) \
    value_output(H, R, D, BITS, G, n, p, p_sh, p_sr, vq, vq_sh, vs, vz, s_sh, out, work)

/* out[h, r] += sum_t p[h, r, t] * value t, for tokens 0..n-1.
   p[h, r, t] at p + h * p_sh + r * p_sr + t; vq element [h, t, j] at vq + h * vq_sh + t * D * bits / 8 + j;
   scales / zeros [h, t, g] at vs + h * s_sh + t * G + g; out (H, R, D) fp32 contiguous. */
int kivi_value_output(int H, int R, int D, int bits, int G, int n, const float *p, long p_sh, long p_sr,
                      const uint8_t *vq, long vq_sh, const uint16_t *vs, const uint16_t *vz, long s_sh,
                      float *out) {
    if (D > MAX_D || R < 1 || R > MAX_R || G < 1 || (bits != 2 && bits != 4 && bits != 8) || D % G ||
        (D / G) % (8 / bits))
        return 1;
    /* accumulators, zero terms, a tile's weights, scales and zeros */
    float *work = malloc(sizeof(float) * ((long)R * D + (long)R * G + (long)R * TILE * G + 2L * TILE * G));
    if (!work) return 1;
    BY_BITS(VALUES, H, R, D, G, n, p, p_sh, p_sr, vq, vq_sh, vs, vz, s_sh, out, work);
    free(work);
    return 0;
}

/* ---------------------------------------------------------------- full-precision rows
   A segment: rows of D values (fp32, fp16 or bf16: dtype 0, 1, 2), row t of head h at element h * sh + t * sr.
   seg: `count` segments of 5 int64 each: address, dtype, rows, sh, sr. The sinks, the residual ring, the new
   token and a 16-bit store are segments: read in place, whatever their dtype, with no concatenation. */

INLINE void load_row(const int64_t *s, long off, int D, float *dst) {
    if (s[1] == 0) memcpy(dst, (const float *)(intptr_t)s[0] + off, sizeof(float) * D);
    else if (s[1] == 1) halves((const uint16_t *)(intptr_t)s[0] + off, D, dst);
    else {
        const uint16_t *x = (const uint16_t *)(intptr_t)s[0] + off;
        for (int c = 0; c < D; c++) {
            uint32_t bits = (uint32_t)x[c] << 16;
            memcpy(dst + c, &bits, sizeof bits);
        }
    }
}

static int segments_ok(const int64_t *seg, int count, int D) {
    if (D > MAX_D) return 0;
    for (int k = 0; k < count; k++)
        if (seg[5 * k + 1] < 0 || seg[5 * k + 1] > 2 || seg[5 * k + 2] < 0) return 0;
    return 1;
}

/* out[h, r, x] (at out + h * o_sh + r * o_sr + x) = q[h, r] . row x, the segments' rows one after the other. */
int dense_logits(int H, int R, int D, const float *q, const int64_t *seg, int count, float *out, long o_sh,
                 long o_sr) {
    if (!segments_ok(seg, count, D) || R < 1) return 1;
    float row[MAX_D];
    for (int h = 0; h < H; h++) {
        const float *qh = q + (long)h * R * D;
        long x = 0;
        for (int k = 0; k < count; k++) {
            const int64_t *s = seg + 5 * k;
            for (long t = 0; t < s[2]; t++, x++) {
                load_row(s, h * s[3] + t * s[4], D, row);
                for (int r = 0; r < R; r++) {
                    float dot = 0.f;
                    for (int c = 0; c < D; c++) dot += qh[r * D + c] * row[c];
                    out[h * o_sh + r * o_sr + x] = dot;
                }
            }
        }
    }
    return 0;
}

/* out[h, r] (H, R, D) fp32 contiguous += sum_x p[h, r, x] * row x (p at p + h * p_sh + r * p_sr + x). */
int dense_output(int H, int R, int D, const float *p, long p_sh, long p_sr, const int64_t *seg, int count,
                 float *out) {
    if (!segments_ok(seg, count, D) || R < 1) return 1;
    float row[MAX_D];
    for (int h = 0; h < H; h++) {
        long x = 0;
        for (int k = 0; k < count; k++) {
            const int64_t *s = seg + 5 * k;
            for (long t = 0; t < s[2]; t++, x++) {
                load_row(s, h * s[3] + t * s[4], D, row);
                for (int r = 0; r < R; r++) {
                    const float w = p[h * p_sh + r * p_sr + x];
                    float *o = out + ((long)h * R + r) * D;
                    for (int c = 0; c < D; c++) o[c] += w * row[c];
                }
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- one decode step of a group of heads */

typedef int32_t vi16 __attribute__((vector_size(64)));

/* exp(x) for x <= 0 (softmax after the max is subtracted), 16 at a time: x = n ln2 + r, |r| <= ln2 / 2,
   exp(r) by its degree-6 Taylor polynomial (relative error < 3e-7), 2^n put in the exponent bits; x < -87
   (-inf included) gives 0. */
INLINE vf16 exp_nonpositive(vf16 x) {
    const vf16 lo = (vf16){0} - 87.0f;
    vi16 small = x < lo;
    x = (vf16)(((vi16)x & ~small) | ((vi16)lo & small));
    vi16 n = (vi16){0} - __builtin_convertvector(0.5f - x * 1.44269504088896341f, vi16);  /* round(x / ln2) */
    vf16 fn = __builtin_convertvector(n, vf16);
    vf16 r = x - fn * 0.693145751953125f - fn * 1.428606765330187e-06f;
    vf16 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667163e-1f + r * (4.1666667908e-2f +
                 r * (8.3333337680e-3f + r * 1.3888889225e-3f)))));
    return (vf16)(((vi16)p + (n << 23)) & ~small);  /* x < -87: 0 (no denormal weights: they are slow) */
}

/* Each row x of scores (H * R rows of n): mask columns [dead_lo, dead_hi), soft-cap (cap > 0), softmax. */
static void softmax_rows(float *scores, long rows, long n, long dead_lo, long dead_hi, float cap) {
    for (long x = 0; x < rows; x++) {
        float *s = scores + x * n, top = -INFINITY, sum = 0.f;
        for (long t = dead_lo; t < dead_hi; t++) s[t] = -INFINITY;
        if (cap > 0.f)
            for (long t = 0; t < n; t++)
                if (s[t] != -INFINITY) s[t] = tanhf(s[t] / cap) * cap;
        for (long t = 0; t < n; t++) top = s[t] > top ? s[t] : top;
        long t = 0;
        vf16 acc = (vf16){0};
        for (; t + 16 <= n; t += 16) {
            vf16 v;
            memcpy(&v, s + t, sizeof v);
            v = exp_nonpositive(v - top);
            acc += v;
            memcpy(s + t, &v, sizeof v);
        }
        for (int k = 0; k < 16; k++) sum += acc[k];
        for (; t < n; t++) {
            s[t] = s[t] - top < -87.0f ? 0.f : expf(s[t] - top);
            sum += s[t];
        }
        const float inv = 1.f / sum;
        for (t = 0; t < n; t++) s[t] *= inv;
    }
}

/* Attention of queries q (H, R, D) fp32 contiguous (already scaled; qs: the same for a rotated store) over
   [packed store | full-precision segments]: nbk (nbv) packed key (value) blocks of `group` tokens, then the key
   (value) segments kseg (vseg); both sides must cover the same n columns. Scores go to `scores` (H * R * n
   floats, overwritten), the packed values' output is added into store_out, the segments' into out (both (H, R, D)
   fp32 contiguous, may be the same). Columns [dead_lo, dead_hi) are masked; cap > 0 soft-caps the logits. A
   non-NULL rope: the packed keys are stored before RoPE, block b's cos / sin tables at rope + offsets[b], and
   Hadamard-rotated when `rotated` (key_logits_rope; qs is then q). Returns 0, or 1 when a kernel refuses its
   arguments (nothing is then written into out). */
int kivi_attend(int H, int R, int D, const float *q, const float *qs, int group, float cap, long dead_lo,
                long dead_hi, int key_bits, int nbk, const uint8_t *kq, long kq_sh, long kq_sb, const uint16_t *ks,
                const uint16_t *kz, long ks_sh, long ks_sb, int value_bits, int G, int nbv, const uint8_t *vq,
                long vq_sh, const uint16_t *vs, const uint16_t *vz, long vs_sh, const int64_t *kseg, int kcount,
                const int64_t *vseg, int vcount, float *scores, float *out, float *store_out, const float *rope,
                const int64_t *offsets, int rotated) {
    long nk = (long)nbk * group, nv = (long)nbv * group;
    for (int k = 0; k < kcount; k++) nk += kseg[5 * k + 2];
    for (int k = 0; k < vcount; k++) nv += vseg[5 * k + 2];
    if (nk != nv || nk < 1 || R < 1 || R > MAX_R || D > MAX_D || !segments_ok(kseg, kcount, D) ||
        !segments_ok(vseg, vcount, D))
        return 1;
    if (nbk && ((key_bits != 2 && key_bits != 4 && key_bits != 8) || (group * key_bits) % 8)) return 1;
    if (nbv && ((value_bits != 2 && value_bits != 4 && value_bits != 8) || G < 1 || D % G ||
                (D / G) % (8 / value_bits)))
        return 1;
    const long n = nk, packed_k = (long)nbk * group, packed_v = (long)nbv * group;
    if (nbk && (rope ? kivi_key_logits_rope(H, R, D, key_bits, group, nbk, rotated, qs, kq, kq_sh, kq_sb, ks, kz,
                                            ks_sh, ks_sb, rope, offsets, scores, (long)R * n, n)
                     : kivi_key_logits(H, R, D, key_bits, group, nbk, qs, kq, kq_sh, kq_sb, ks, kz, ks_sh, ks_sb,
                                       scores, (long)R * n, n)))
        return 1;
    dense_logits(H, R, D, q, kseg, kcount, scores + packed_k, (long)R * n, n);
    softmax_rows(scores, (long)H * R, n, dead_lo, dead_hi, cap);
    if (nbv && kivi_value_output(H, R, D, value_bits, G, (int)packed_v, scores, (long)R * n, n, vq, vq_sh, vs, vz,
                                 vs_sh, store_out))
        return 1;  /* (store_out may hold a partial sum: the caller raises) */
    dense_output(H, R, D, scores + packed_v, (long)R * n, n, vseg, vcount, out);
    return 0;
}

/* ---------------------------------------------------------------- the whole step in one call */

/* One value as dtype 0 / 1 / 2 (fp32 / fp16 / bf16) from a float, rounded to nearest even as PyTorch's casts do. */
INLINE void store_value(void *dst, int dtype, long i, float x) {
    if (dtype == 0) {
        ((float *)dst)[i] = x;
        return;
    }
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if (dtype == 2) {
        ((uint16_t *)dst)[i] = x != x ? 0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        return;
    }
#if defined(__F16C__)
    ((uint16_t *)dst)[i] = _cvtss_sh(x, 0);  /* 0: round to nearest even */
#else
    _Float16 h = (_Float16)x;
    memcpy((uint16_t *)dst + i, &h, sizeof h);
#endif
}

/* dst[h] = src[h] for H rows of D values, converting between dtypes (row h at element h * sh of each). */
static void copy_rows(int H, int D, const int64_t *src, const int64_t *dst) {
    float row[MAX_D];
    const int64_t s[5] = {src[0], src[1], 1, src[2], 0};
    for (int h = 0; h < H; h++) {
        load_row(s, h * src[2], D, row);
        void *base = (void *)(intptr_t)dst[0];
        for (int c = 0; c < D; c++) store_value(base, (int)dst[1], h * dst[2] + c, row[c]);
    }
}

/* `kivi_attend` with every argument in one int64 table (one ctypes argument: the call costs ~1 us instead of ~7),
   out and store_out zeroed here, then, when a[30] is 1, the new token's key and value rows copied into their
   slot (a[31..36]: source key address, dtype, head stride, the same for the value; a[37..42]: the slots').
   rope, offsets: a pre-RoPE key store's tables (kivi_attend), NULL otherwise; rotated: its keys are
   Hadamard-rotated. */
int kivi_step(const int64_t *a, double cap, const float *rope, const int64_t *offsets, int rotated) {
    const int H = (int)a[0], R = (int)a[1], D = (int)a[2];
    const int kcount = (int)a[28], vcount = (int)a[29];
    const int64_t *kseg = a + 43, *vseg = kseg + 5 * kcount;
    float *out = (float *)(intptr_t)a[26], *store_out = (float *)(intptr_t)a[27];
    if (R < 1 || R > MAX_R || D > MAX_D || H < 1) return 1;
    memset(out, 0, sizeof(float) * H * R * D);
    if (store_out != out) memset(store_out, 0, sizeof(float) * H * R * D);
    int rc = kivi_attend(H, R, D, (const float *)(intptr_t)a[3], (const float *)(intptr_t)a[4], (int)a[5], (float)cap,
                         a[6], a[7], (int)a[8], (int)a[9], (const uint8_t *)(intptr_t)a[10], a[11], a[12],
                         (const uint16_t *)(intptr_t)a[13], (const uint16_t *)(intptr_t)a[14], a[15], a[16], (int)a[17],
                         (int)a[18], (int)a[19], (const uint8_t *)(intptr_t)a[20], a[21],
                         (const uint16_t *)(intptr_t)a[22], (const uint16_t *)(intptr_t)a[23], a[24], kseg, kcount,
                         vseg, vcount, (float *)(intptr_t)a[25], out, store_out, rope, offsets, rotated);
    if (rc || !a[30]) return rc;
    for (int x = 0; x < 2; x++)
        if (a[31 + 3 * x + 1] < 0 || a[31 + 3 * x + 1] > 2 || a[37 + 3 * x + 1] < 0 || a[37 + 3 * x + 1] > 2) return 1;
    copy_rows(H, D, a + 31, a + 37);
    copy_rows(H, D, a + 34, a + 40);
    return 0;
}
