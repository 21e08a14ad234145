/* Portable ChaCha20-Poly1305 (RFC 8439), the fallback under pywg._fastpath.
 *
 * ChaCha20: the RFC's block function, run 4, 8 or 16 blocks at a time with the GCC/Clang
 * vector extension (SSE2/NEON for 4; AVX2 and AVX-512F kernels on x86-64, compiled with
 * target attributes and chosen at run time, so no -march is needed), one block at a time
 * with other compilers. A seal takes the Poly1305 key and the keystream in one run from
 * block 0. Poly1305: 44-bit limbs, four blocks per step (see below). The tag check is constant time, and an open decrypts only after the tag verified.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "portable.h"

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8) && defined(__GNUC__) && !defined(PYWG_NO_VECTOR)
#define PYWG_POLY_IFMA 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(PYWG_NO_VECTOR)
#define PYWG_CHACHA_VECTOR 1
#endif

#define ROTL32(v, n) (((v) << (n)) | ((v) >> (32 - (n))))

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
static inline uint32_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void store32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static inline void store64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}
#else
static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t load64(const uint8_t *p)
{
    return (uint64_t)load32(p) | (uint64_t)load32(p + 4) << 32;
}

static inline void store32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void store64(uint8_t *p, uint64_t v)
{
    store32(p, (uint32_t)v);
    store32(p + 4, (uint32_t)(v >> 32));
}
#endif

/* Clear secrets off the stack in a way the compiler cannot drop as a dead store. */
static void wipe(void *p, size_t n)
{
#ifdef __GNUC__
    memset(p, 0, n);
    __asm__ __volatile__("" : : "r"(p) : "memory");
#else
    volatile uint8_t *v = (volatile uint8_t *)p;
    while (n--)
        *v++ = 0;
#endif
}

/* --- ChaCha20 (RFC 8439 2.1-2.4) ----------------------------------------------------- */

#define QR(a, b, c, d)                                                                   \
    do {                                                                                 \
        a += b; d ^= a; d = ROTL32(d, 16);                                               \
        c += d; b ^= c; b = ROTL32(b, 12);                                               \
        a += b; d ^= a; d = ROTL32(d, 8);                                                \
        c += d; b ^= c; b = ROTL32(b, 7);                                                \
    } while (0)

#define DOUBLE_ROUND(x)                                                                  \
    do {                                                                                 \
        QR(x[0], x[4], x[8], x[12]);                                                     \
        QR(x[1], x[5], x[9], x[13]);                                                     \
        QR(x[2], x[6], x[10], x[14]);                                                    \
        QR(x[3], x[7], x[11], x[15]);                                                    \
        QR(x[0], x[5], x[10], x[15]);                                                    \
        QR(x[1], x[6], x[11], x[12]);                                                    \
        QR(x[2], x[7], x[8], x[13]);                                                     \
        QR(x[3], x[4], x[9], x[14]);                                                     \
    } while (0)

static void chacha_init(uint32_t s[16], const uint8_t key[32], const uint8_t nonce[12],
                        uint32_t counter)
{
    s[0] = 0x61707865; /* "expand 32-byte k" */
    s[1] = 0x3320646e;
    s[2] = 0x79622d32;
    s[3] = 0x6b206574;
    for (int i = 0; i < 8; i++)
        s[4 + i] = load32(key + 4 * i);
    s[12] = counter;
    s[13] = load32(nonce);
    s[14] = load32(nonce + 4);
    s[15] = load32(nonce + 8);
}

/* One 64-byte keystream block for state s (s[12] is the block counter). */
static void chacha_block(const uint32_t s[16], uint8_t ks[64])
{
    uint32_t x[16];
    memcpy(x, s, sizeof x);
    for (int i = 0; i < 10; i++)
        DOUBLE_ROUND(x);
    for (int i = 0; i < 16; i++)
        store32(ks + 4 * i, x[i] + s[i]);
    wipe(x, sizeof x);
}

/* --- Poly1305 (RFC 8439 2.5) ---------------------------------------------------------
 * Numbers mod p = 2^130 - 5 in three limbs of 44, 44 and 42 bits (weights 1, 2^44, 2^88)
 * multiplied with 64x64->128-bit products (unsigned __int128). A product that lands on
 * 2^132 or above folds back times 20 (2^132 = 4 * 2^130 = 20 mod p), so a multiplier is
 * kept with its upper limbs times 20. Four blocks go in per step as
 *     h = (h + m1) r^4 + m2 r^3 + m3 r^2 + m4 r,
 * four independent products summed before one carry pass: the same result as four
 * Horner steps with a quarter of the dependency chain. Limbs stay below 2^45 between
 * steps, the products below 2^94, four summed below 2^98. */

__extension__ typedef unsigned __int128 u128;

#define M44 ((uint64_t)0xfffffffffff)
#define M42 ((uint64_t)0x3ffffffffff)
#define HIBIT ((uint64_t)1 << 40) /* 2^128 at the weight 2^88 of the top limb */

static inline void mul_acc(u128 d[3], uint64_t h0, uint64_t h1, uint64_t h2, const poly_mul_t *m)
{
    d[0] += (u128)h0 * m->r0 + (u128)h1 * m->s2 + (u128)h2 * m->s1;
    d[1] += (u128)h0 * m->r1 + (u128)h1 * m->r0 + (u128)h2 * m->s2;
    d[2] += (u128)h0 * m->r2 + (u128)h1 * m->r1 + (u128)h2 * m->r0;
}

/* d (three columns) -> limbs h, partly carried: h0, h2 in range, h1 at most a carry over. */
static inline void carry(u128 d[3], uint64_t *h0, uint64_t *h1, uint64_t *h2)
{
    uint64_t c;
    c = (uint64_t)(d[0] >> 44);
    *h0 = (uint64_t)d[0] & M44;
    d[1] += c;
    c = (uint64_t)(d[1] >> 44);
    *h1 = (uint64_t)d[1] & M44;
    d[2] += c;
    c = (uint64_t)(d[2] >> 42);
    *h2 = (uint64_t)d[2] & M42;
    *h0 += c * 5; /* 2^130 = 5 (mod p) */
    c = *h0 >> 44;
    *h0 &= M44;
    *h1 += c;
}

static void set_mul(poly_mul_t *m, uint64_t r0, uint64_t r1, uint64_t r2)
{
    m->r0 = r0;
    m->r1 = r1;
    m->r2 = r2;
    m->s1 = r1 * 20;
    m->s2 = r2 * 20;
}

static void poly_init(poly1305_t *st, const uint8_t key[32])
{
    uint64_t t0 = load64(key) & 0x0ffffffc0fffffffULL; /* clamp r */
    uint64_t t1 = load64(key + 8) & 0x0ffffffc0ffffffcULL;
    set_mul(&st->r[0], t0 & M44, ((t0 >> 44) | (t1 << 20)) & M44, t1 >> 24);
    for (int k = 1; k < 4; k++) { /* r^2 = r r, r^3 = r^2 r, r^4 = r^3 r */
        u128 d[3] = {0, 0, 0};
        uint64_t a0, a1, a2;
        mul_acc(d, st->r[k - 1].r0, st->r[k - 1].r1, st->r[k - 1].r2, &st->r[0]);
        carry(d, &a0, &a1, &a2);
        set_mul(&st->r[k], a0, a1, a2);
    }
    st->h0 = st->h1 = st->h2 = 0;
    st->pad0 = load64(key + 16);
    st->pad1 = load64(key + 24);
}

static inline void limbs(const uint8_t *m, uint64_t hibit, uint64_t *x0, uint64_t *x1,
                         uint64_t *x2)
{
    uint64_t lo = load64(m), hi = load64(m + 8);
    *x0 = lo & M44;
    *x1 = ((lo >> 44) | (hi << 20)) & M44;
    *x2 = (hi >> 24) | hibit;
}

/* Four whole blocks m[0:64] at once: h = (h + m1) r^4 + m2 r^3 + m3 r^2 + m4 r. */
static inline void poly_step4(poly1305_t *st, const uint8_t *m)
{
    uint64_t a0, a1, a2, b0, b1, b2, c0, c1, c2, e0, e1, e2;
    u128 d[3] = {0, 0, 0};
    limbs(m, HIBIT, &a0, &a1, &a2);
    limbs(m + 16, HIBIT, &b0, &b1, &b2);
    limbs(m + 32, HIBIT, &c0, &c1, &c2);
    limbs(m + 48, HIBIT, &e0, &e1, &e2);
    mul_acc(d, st->h0 + a0, st->h1 + a1, st->h2 + a2, &st->r[3]);
    mul_acc(d, b0, b1, b2, &st->r[2]);
    mul_acc(d, c0, c1, c2, &st->r[1]);
    mul_acc(d, e0, e1, e2, &st->r[0]);
    carry(d, &st->h0, &st->h1, &st->h2);
}

/* h = (h + m_i + 2^128 [when hibit]) * r mod p for each 16-byte block m_i; hibit is HIBIT
 * for whole blocks, 0 for the 0x01-terminated last partial block. */
static void poly_blocks(poly1305_t *st, const uint8_t *m, size_t nblocks, uint64_t hibit)
{
    if (hibit) {
        for (; nblocks >= 4; nblocks -= 4, m += 64)
            poly_step4(st, m);
    }
    uint64_t h0 = st->h0, h1 = st->h1, h2 = st->h2, a0, a1, a2;
    while (nblocks--) {
        u128 d[3] = {0, 0, 0};
        limbs(m, hibit, &a0, &a1, &a2);
        mul_acc(d, h0 + a0, h1 + a1, h2 + a2, &st->r[0]);
        carry(d, &h0, &h1, &h2);
        m += 16;
    }
    st->h0 = h0;
    st->h1 = h1;
    st->h2 = h2;
}

/* One step of a pipelined message's MAC (see pywg_portable_pipe_seal): four more of its
 * ciphertext blocks, when it has them. Called between ChaCha20 rounds of the next message
 * so that the multiplier works while the vector units run the rounds. */
static inline void pipe_step(pywg_portable_pipe_t *pipe)
{
    if (pipe != NULL && pipe->len - pipe->done >= 64) {
        poly_step4(&pipe->st, pipe->ct + pipe->done);
        pipe->done += 64;
    }
}

/* The data zero-padded to a multiple of 16 bytes (RFC 8439 2.8's pad16). */
static void poly_padded(poly1305_t *st, const uint8_t *data, size_t len)
{
    poly_blocks(st, data, len / 16, HIBIT);
    if (len % 16) {
        uint8_t block[16] = {0};
        memcpy(block, data + len - len % 16, len % 16);
        poly_blocks(st, block, 1, HIBIT);
    }
}

static void poly_finish(poly1305_t *st, uint8_t tag[16])
{
    uint64_t h0 = st->h0, h1 = st->h1, h2 = st->h2, c;
    /* Carry fully: afterwards h0, h1 < 2^44 and h2 <= 2^42, so h < 2^130 + 2^88 < 2p. */
    c = h1 >> 44; h1 &= M44; h2 += c;
    c = h2 >> 42; h2 &= M42; h0 += c * 5;
    c = h0 >> 44; h0 &= M44; h1 += c;
    c = h1 >> 44; h1 &= M44; h2 += c;

    /* g = h - p = h + 5 - 2^130; keep g when it did not go negative (h >= p). */
    uint64_t g0 = h0 + 5;
    c = g0 >> 44; g0 &= M44;
    uint64_t g1 = h1 + c;
    c = g1 >> 44; g1 &= M44;
    uint64_t g2 = h2 + c - ((uint64_t)1 << 42);
    uint64_t use_g = (g2 >> 63) - 1; /* all ones when g2 >= 0 */
    h0 = (h0 & ~use_g) | (g0 & use_g);
    h1 = (h1 & ~use_g) | (g1 & use_g);
    h2 = (h2 & ~use_g) | (g2 & use_g);

    /* tag = (h + s) mod 2^128; h1 < 2^44 and h2 < 2^42 here, so the ORs do not overlap */
    uint64_t t0 = h0 | (h1 << 44);
    uint64_t t1 = (h1 >> 20) | (h2 << 24);
    u128 sum = (u128)t0 + st->pad0;
    store64(tag, (uint64_t)sum);
    store64(tag + 8, t1 + st->pad1 + (uint64_t)(sum >> 64));
    wipe(st, sizeof *st);
}

/* --- wide keystream kernels -------------------------------------------------------------
 * LANES consecutive blocks at once, block b in lane b of sixteen vectors (one per state
 * word), written out as LANES * 64 bytes of keystream. With lane_nonces (3 words a lane)
 * every lane gets its own nonce and the same counter instead: the Poly1305 keys of LANES
 * messages in one run. The generic vector extension lets the compiler pick the
 * instructions: SSE2/NEON for 4 lanes, and on x86-64 AVX2 for 8 and AVX-512F for 16
 * lanes, compiled with target attributes and chosen at run time. */
#ifdef PYWG_CHACHA_VECTOR
#define DEFINE_KEYSTREAM(NAME, LANES, ATTRIBUTES)                                           \
    ATTRIBUTES static void NAME(const uint32_t s[16], uint8_t *ks, pywg_portable_pipe_t *pipe, \
                                const uint32_t *lane_nonces)                                \
    {                                                                                       \
        typedef uint32_t vec __attribute__((vector_size(4 * (LANES))));                     \
        vec x[16], o[16];                                                                   \
        uint32_t words[16][LANES];                                                          \
        for (int i = 0; i < 16; i++)                                                        \
            for (int l = 0; l < (LANES); l++)                                               \
                o[i][l] = s[i];                                                             \
        for (int l = 0; l < (LANES); l++) {                                                 \
            if (lane_nonces == NULL) {                                                      \
                o[12][l] += (uint32_t)l;                                                    \
            } else {                                                                        \
                o[13][l] = lane_nonces[3 * l];                                              \
                o[14][l] = lane_nonces[3 * l + 1];                                          \
                o[15][l] = lane_nonces[3 * l + 2];                                          \
            }                                                                               \
        }                                                                                   \
        memcpy(x, o, sizeof x);                                                             \
        for (int i = 0; i < 10; i++) {                                                      \
            DOUBLE_ROUND(x);                                                                \
            pipe_step(pipe);                                                                \
        }                                                                                   \
        for (int i = 0; i < 16; i++) {                                                      \
            vec w = x[i] + o[i];                                                            \
            memcpy(words[i], &w, sizeof w);                                                 \
        }                                                                                   \
        for (int b = 0; b < (LANES); b++)                                                   \
            for (int i = 0; i < 16; i++)                                                    \
                store32(ks + 64 * b + 4 * i, words[i][b]);                                  \
        wipe(words, sizeof words);                                                          \
    }

DEFINE_KEYSTREAM(keystream4, 4, )
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 6)
#define PYWG_CHACHA_X86_WIDE 1
DEFINE_KEYSTREAM(keystream8, 8, __attribute__((target("avx2"))))
DEFINE_KEYSTREAM(keystream16, 16, __attribute__((target("avx512f"))))
#endif
#endif

static void keystream1(const uint32_t s[16], uint8_t *ks, pywg_portable_pipe_t *pipe,
                       const uint32_t *lane_nonces)
{
    uint32_t state[16];
    memcpy(state, s, sizeof state);
    if (lane_nonces != NULL)
        memcpy(state + 13, lane_nonces, 12);
    chacha_block(state, ks);
    pipe_step(pipe);
    wipe(state, sizeof state);
}

typedef void (*keystream_fn)(const uint32_t s[16], uint8_t *ks, pywg_portable_pipe_t *pipe,
                             const uint32_t *lane_nonces);

/* The widest kernel this CPU runs, found once. */
static pthread_once_t simd_once = PTHREAD_ONCE_INIT;
static int simd_lanes = 1;
static int simd_ifma = 0; /* AVX-512 IFMA: eight Poly1305 MACs at once (poly8_blocks) */

static void detect_simd(void)
{
#ifdef PYWG_CHACHA_VECTOR
    simd_lanes = 4;
#ifdef PYWG_CHACHA_X86_WIDE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        simd_lanes = 8;
    if (__builtin_cpu_supports("avx512f"))
        simd_lanes = 16;
#ifdef PYWG_POLY_IFMA
    simd_ifma = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma");
#endif
#endif
#endif
    const char *cap = getenv("PYWG_PORTABLE_LANES"); /* tests: run the narrower kernels */
    if (cap != NULL && atoi(cap) >= 1 && atoi(cap) < simd_lanes)
        simd_lanes = atoi(cap) >= 16 ? 16 : atoi(cap) >= 8 ? 8 : atoi(cap) >= 4 ? 4 : 1;
    if (simd_lanes < 16)
        simd_ifma = 0; /* a cap also turns the wide MACs off (tests of the narrow paths) */
}

int pywg_portable_poly_lanes(void)
{
    pthread_once(&simd_once, detect_simd);
    return simd_ifma ? 8 : 1;
}

#ifdef PYWG_POLY_IFMA
/* --- eight Poly1305 MACs at once (AVX-512 IFMA) ------------------------------------------
 * Lane i of each vector holds message i's state in the scalar code's limbs (44/44/42 bits,
 * multipliers with their upper limbs times 20). vpmadd52luq/vpmadd52huq give the low and
 * the high 52 bits of a product of two 52-bit numbers: a column's high part has the
 * weight 2^52 = 2^8 * 2^44, so it moves to the next column shifted left by 8, and the top
 * column's to 2^132 = 20 (mod p). Limbs stay below 2^46 and multipliers below 2^49, so
 * every factor fits in 52 bits and every product in 104. Blocks must be whole; the
 * lanes' states go back to the scalar code for the rest. */
#define IFMA_TARGET __attribute__((target("avx512f,avx512ifma")))

IFMA_TARGET static void poly8_blocks(poly1305_t *const st[8], const uint8_t *const m[8],
                                     size_t nblocks)
{
    uint64_t lanes[8];
#define LOAD_LANES(expr)                                  \
    (__extension__({                                      \
        for (int i_ = 0; i_ < 8; i_++)                    \
            lanes[i_] = st[i_]->expr;                     \
        _mm512_loadu_si512((const void *)lanes);          \
    }))
    __m512i h0 = LOAD_LANES(h0), h1 = LOAD_LANES(h1), h2 = LOAD_LANES(h2);
    const __m512i r0 = LOAD_LANES(r[0].r0), r1 = LOAD_LANES(r[0].r1), r2 = LOAD_LANES(r[0].r2);
    const __m512i s1 = LOAD_LANES(r[0].s1), s2 = LOAD_LANES(r[0].s2);
#undef LOAD_LANES
    for (int i = 0; i < 8; i++)
        lanes[i] = (uint64_t)(m[i] - m[0]);
    const __m512i at = _mm512_loadu_si512((const void *)lanes);
    const __m512i m44 = _mm512_set1_epi64((long long)M44), m42 = _mm512_set1_epi64((long long)M42);
    const __m512i hibit = _mm512_set1_epi64((long long)HIBIT), zero = _mm512_setzero_si512();
    for (size_t b = 0; b < nblocks; b++) {
        const uint8_t *base = m[0] + 16 * b;
        __m512i lo = _mm512_i64gather_epi64(at, (const void *)base, 1);
        __m512i hi = _mm512_i64gather_epi64(at, (const void *)(base + 8), 1);
        h0 = _mm512_add_epi64(h0, _mm512_and_si512(lo, m44));
        h1 = _mm512_add_epi64(h1, _mm512_and_si512(
                                      _mm512_or_si512(_mm512_srli_epi64(lo, 44), _mm512_slli_epi64(hi, 20)), m44));
        h2 = _mm512_add_epi64(h2, _mm512_or_si512(_mm512_srli_epi64(hi, 24), hibit));
        __m512i l0 = _mm512_madd52lo_epu64(zero, h0, r0), u0 = _mm512_madd52hi_epu64(zero, h0, r0);
        __m512i l1 = _mm512_madd52lo_epu64(zero, h0, r1), u1 = _mm512_madd52hi_epu64(zero, h0, r1);
        __m512i l2 = _mm512_madd52lo_epu64(zero, h0, r2), u2 = _mm512_madd52hi_epu64(zero, h0, r2);
        l0 = _mm512_madd52lo_epu64(l0, h1, s2), u0 = _mm512_madd52hi_epu64(u0, h1, s2);
        l1 = _mm512_madd52lo_epu64(l1, h1, r0), u1 = _mm512_madd52hi_epu64(u1, h1, r0);
        l2 = _mm512_madd52lo_epu64(l2, h1, r1), u2 = _mm512_madd52hi_epu64(u2, h1, r1);
        l0 = _mm512_madd52lo_epu64(l0, h2, s1), u0 = _mm512_madd52hi_epu64(u0, h2, s1);
        l1 = _mm512_madd52lo_epu64(l1, h2, s2), u1 = _mm512_madd52hi_epu64(u1, h2, s2);
        l2 = _mm512_madd52lo_epu64(l2, h2, r0), u2 = _mm512_madd52hi_epu64(u2, h2, r0);
        /* columns: t0 = l0 + 20 (u2 << 8), t1 = l1 + (u0 << 8), t2 = l2 + (u1 << 8) */
        __m512i top = _mm512_slli_epi64(u2, 8);
        __m512i t0 = _mm512_add_epi64(l0, _mm512_add_epi64(_mm512_slli_epi64(top, 4), _mm512_slli_epi64(top, 2)));
        __m512i t1 = _mm512_add_epi64(l1, _mm512_slli_epi64(u0, 8));
        __m512i t2 = _mm512_add_epi64(l2, _mm512_slli_epi64(u1, 8));
        /* the scalar carry pass */
        t1 = _mm512_add_epi64(t1, _mm512_srli_epi64(t0, 44));
        t0 = _mm512_and_si512(t0, m44);
        t2 = _mm512_add_epi64(t2, _mm512_srli_epi64(t1, 44));
        t1 = _mm512_and_si512(t1, m44);
        __m512i c = _mm512_srli_epi64(t2, 42);
        t2 = _mm512_and_si512(t2, m42);
        t0 = _mm512_add_epi64(t0, _mm512_add_epi64(c, _mm512_slli_epi64(c, 2)));
        t1 = _mm512_add_epi64(t1, _mm512_srli_epi64(t0, 44));
        h0 = _mm512_and_si512(t0, m44);
        h1 = t1;
        h2 = t2;
    }
    _mm512_storeu_si512((void *)lanes, h0);
    for (int i = 0; i < 8; i++)
        st[i]->h0 = lanes[i];
    _mm512_storeu_si512((void *)lanes, h1);
    for (int i = 0; i < 8; i++)
        st[i]->h1 = lanes[i];
    _mm512_storeu_si512((void *)lanes, h2);
    for (int i = 0; i < 8; i++)
        st[i]->h2 = lanes[i];
}
#endif

int pywg_portable_lanes(void)
{
    pthread_once(&simd_once, detect_simd);
    return simd_lanes;
}

/* The kernel for the next `left` bytes of keystream: the widest the CPU has once more
 * than 256 bytes are left (one wide run, even partly unused, beats narrower runs: 1484
 * bytes for a 1420-byte packet measure best as two 16-lane runs), 4 lanes above 128
 * bytes, else single blocks. */
static keystream_fn pick_kernel(int lanes, size_t left, size_t *bytes)
{
#ifdef PYWG_CHACHA_X86_WIDE
    if (lanes >= 16 && left > 256) {
        *bytes = 1024;
        return keystream16;
    }
    if (lanes >= 8 && left > 256) {
        *bytes = 512;
        return keystream8;
    }
#endif
#ifdef PYWG_CHACHA_VECTOR
    if (lanes >= 4 && left > 128) {
        *bytes = 256;
        return keystream4;
    }
#endif
    (void)lanes;
    (void)left;
    *bytes = 64;
    return keystream1;
}

/* XOR outlen bytes of keystream (state s from its counter on; s[12] advances) with
 * in[0:inlen] followed by zeros; outlen >= inlen; in == out allowed. With `skip` = 64 the
 * first block is not used for data but copied to first_block (the Poly1305 key). */
static void chacha_xor_padded(uint32_t s[16], const uint8_t *in, size_t inlen, uint8_t *out,
                              size_t outlen, uint8_t *first_block, pywg_portable_pipe_t *pipe)
{
    uint8_t ks[1024];
    int lanes = pywg_portable_lanes();
    size_t skip = first_block != NULL ? 64 : 0, done = 0, bytes;
    while (done < outlen || skip) {
        keystream_fn kernel = pick_kernel(lanes, outlen - done + skip, &bytes);
        const uint8_t *k = ks;
        kernel(s, ks, pipe, NULL);
        s[12] += (uint32_t)(bytes / 64);
        if (skip) {
            memcpy(first_block, ks, 64);
            k += 64;
            bytes -= 64;
            skip = 0;
        }
        size_t n = outlen - done < bytes ? outlen - done : bytes;
        size_t nin = inlen > done ? (inlen - done < n ? inlen - done : n) : 0;
        for (size_t i = 0; i < nin; i++)
            out[done + i] = in[done + i] ^ k[i];
        memcpy(out + done + nin, k + nin, n - nin);
        done += n;
    }
    wipe(ks, sizeof ks);
}

void pywg_portable_chacha20(const uint8_t key[32], const uint8_t nonce[12], uint32_t counter,
                            const uint8_t *in, uint8_t *out, size_t len)
{
    uint32_t s[16];
    chacha_init(s, key, nonce, counter);
    chacha_xor_padded(s, in, len, out, len, NULL, NULL);
    wipe(s, sizeof s);
}

void pywg_portable_poly1305(const uint8_t key[32], const uint8_t *msg, size_t len,
                            uint8_t tag[16])
{
    poly1305_t st;
    poly_init(&st, key);
    poly_blocks(&st, msg, len / 16, HIBIT);
    if (len % 16) {
        /* The last partial block gets a 1 byte after it and no 2^128 bit. */
        uint8_t block[16] = {0};
        memcpy(block, msg + len - len % 16, len % 16);
        block[len % 16] = 1;
        poly_blocks(&st, block, 1, 0);
    }
    poly_finish(&st, tag);
}

/* --- AEAD_CHACHA20_POLY1305 (RFC 8439 2.8) ------------------------------------------- */

static void aead_tag(poly1305_t *st, size_t aadlen, size_t ctlen, uint8_t tag[16])
{
    uint8_t lengths[16];
    store64(lengths, (uint64_t)aadlen);
    store64(lengths + 8, (uint64_t)ctlen);
    poly_blocks(st, lengths, 1, HIBIT);
    poly_finish(st, tag);
}

void pywg_portable_seal(const uint8_t key[32], const uint8_t nonce[12],
                        const uint8_t *aad, size_t aadlen,
                        const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen,
                        uint8_t tag[16])
{
    uint32_t s[16];
    uint8_t block0[64];
    poly1305_t st;
    /* one keystream run from block 0: block 0 is the Poly1305 key (2.6), 1.. encrypt */
    chacha_init(s, key, nonce, 0);
    chacha_xor_padded(s, in, inlen, out, outlen, block0, NULL);
    wipe(s, sizeof s);
    poly_init(&st, block0);
    wipe(block0, sizeof block0);
    poly_padded(&st, aad, aadlen);
    poly_padded(&st, out, outlen);
    aead_tag(&st, aadlen, outlen, tag);
}

/* 1 when the 16-byte tags are equal, in constant time. */
static int tags_equal(const uint8_t a[16], const uint8_t b[16])
{
    uint32_t diff = 0;
    for (int i = 0; i < 16; i++)
        diff |= (uint32_t)(a[i] ^ b[i]);
    return (int)(1 & ((diff - 1) >> 8)); /* 1 iff diff == 0, without a branch */
}

int pywg_portable_open(const uint8_t key[32], const uint8_t nonce[12],
                       const uint8_t *aad, size_t aadlen,
                       const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out)
{
    uint32_t s[16];
    uint8_t block0[64], expected[16];
    poly1305_t st;
    /* the tag is checked before anything is decrypted */
    chacha_init(s, key, nonce, 0);
    chacha_block(s, block0);
    s[12] = 1;
    poly_init(&st, block0);
    wipe(block0, sizeof block0);
    poly_padded(&st, aad, aadlen);
    poly_padded(&st, ct, len);
    aead_tag(&st, aadlen, len, expected);
    int ok = tags_equal(expected, tag);
    if (ok)
        chacha_xor_padded(s, ct, len, out, len, NULL, NULL);
    wipe(s, sizeof s);
    return ok;
}

/* --- seals of equal-length messages, their MACs eight at once -------------------------- */

/* The keystreams of k messages side by side: lane j of a wide run is message j's block c
 * (its own nonce, the same counter), so no lane is wasted on a message's short end. Block
 * 0 of each goes to otk[j] (the Poly1305 key), blocks 1.. encrypt in[j] (inlen bytes,
 * then zeros up to outlen) into out[j]. */
static void chacha_side_by_side(const uint8_t key[32], size_t k, const uint64_t *counters,
                                const uint8_t *const *in, size_t inlen, uint8_t *const *out,
                                size_t outlen, uint8_t (*otk)[64])
{
    static const uint8_t no_nonce[12]; /* the lanes bring their own */
    uint32_t s[16], lane_nonces[16 * 3];
    uint8_t ks[1024];
    size_t width;
    keystream_fn kernel = pick_kernel(pywg_portable_lanes(), sizeof ks, &width);
    size_t lanes = width / 64, blocks = 1 + (outlen + 63) / 64;
    chacha_init(s, key, no_nonce, 0);
    for (size_t g = 0; g < k; g += lanes) {
        size_t m = k - g < lanes ? k - g : lanes;
        memset(lane_nonces, 0, sizeof lane_nonces);
        for (size_t j = 0; j < m; j++) { /* WireGuard's nonce: 4 zero bytes || counter (LE) */
            lane_nonces[3 * j + 1] = (uint32_t)counters[g + j];
            lane_nonces[3 * j + 2] = (uint32_t)(counters[g + j] >> 32);
        }
        for (size_t c = 0; c < blocks; c++) {
            s[12] = (uint32_t)c;
            kernel(s, ks, NULL, lane_nonces);
            for (size_t j = 0; j < m; j++) {
                const uint8_t *kj = ks + 64 * j;
                if (c == 0) {
                    memcpy(otk[g + j], kj, 64);
                    continue;
                }
                size_t done = 64 * (c - 1);
                size_t n = outlen - done < 64 ? outlen - done : 64;
                size_t nin = inlen > done ? (inlen - done < n ? inlen - done : n) : 0;
                const uint8_t *src = in[g + j] + done;
                uint8_t *dst = out[g + j] + done;
                for (size_t i = 0; i < nin; i++)
                    dst[i] = src[i] ^ kj[i];
                memcpy(dst + nin, kj + nin, n - nin);
            }
        }
    }
    wipe(s, sizeof s);
    wipe(ks, sizeof ks);
}

/* The AEAD tags (no aad) of k messages of len bytes each, their states keyed: eight MACs
 * at once where the CPU has AVX-512 IFMA, the rest (and the partial last block and the
 * length block) in the scalar code. */
static void mac_group(poly1305_t *st, size_t k, const uint8_t *const *m, size_t len,
                      uint8_t *const *tags)
{
    size_t done = 0;
#ifdef PYWG_POLY_IFMA
    if (k > 1 && pywg_portable_poly_lanes() == 8) {
        done = len / 16 * 16;
        for (size_t g = 0; g < k; g += 8) {
            poly1305_t *lane_st[8], spare[8];
            const uint8_t *lane_m[8];
            for (size_t i = 0; i < 8; i++) { /* unused lanes MAC message g again, into spares */
                if (g + i >= k)
                    spare[i] = st[g];
                lane_st[i] = g + i < k ? &st[g + i] : &spare[i];
                lane_m[i] = m[g + i < k ? g + i : g];
            }
            poly8_blocks(lane_st, lane_m, len / 16);
            wipe(spare, sizeof spare);
        }
    }
#endif
    for (size_t i = 0; i < k; i++) {
        poly_padded(&st[i], m[i] + done, len - done);
        aead_tag(&st[i], 0, len, tags[i]);
    }
}

void pywg_portable_seal_group(const uint8_t key[32], size_t k, const uint64_t *counters,
                              const uint8_t *const *in, size_t inlen, uint8_t *const *out,
                              size_t outlen, uint8_t *const *tags)
{
    uint8_t otk[PYWG_PORTABLE_GROUP][64];
    poly1305_t st[PYWG_PORTABLE_GROUP];
    chacha_side_by_side(key, k, counters, in, inlen, out, outlen, otk);
    for (size_t i = 0; i < k; i++)
        poly_init(&st[i], otk[i]);
    wipe(otk, sizeof otk);
    mac_group(st, k, (const uint8_t *const *)out, outlen, tags);
}

/* --- pipelined seals ----------------------------------------------------------------- */

void pywg_portable_pipe_flush(pywg_portable_pipe_t *pipe)
{
    if (!pipe->active)
        return;
    poly_padded(&pipe->st, pipe->ct + pipe->done, pipe->len - pipe->done);
    aead_tag(&pipe->st, 0, pipe->len, pipe->tag);
    pipe->active = 0;
}

void pywg_portable_pipe_seal(pywg_portable_pipe_t *pipe, const uint8_t key[32],
                             const uint8_t nonce[12], const uint8_t *in, size_t inlen,
                             uint8_t *out, size_t outlen, uint8_t tag[16])
{
    uint32_t s[16];
    uint8_t block0[64];
    chacha_init(s, key, nonce, 0);
    chacha_xor_padded(s, in, inlen, out, outlen, block0, pipe->active ? pipe : NULL);
    wipe(s, sizeof s);
    pywg_portable_pipe_flush(pipe);
    poly_init(&pipe->st, block0);
    wipe(block0, sizeof block0);
    pipe->ct = out;
    pipe->len = outlen;
    pipe->done = 0;
    pipe->tag = tag;
    pipe->active = 1;
}

/* --- opens in chunks ----------------------------------------------------------------- */

void pywg_portable_open_chunk(const uint8_t key[32], size_t k, const uint8_t *const *ct,
                              const size_t *len, const uint64_t *counters,
                              const uint8_t (*tags)[16], uint8_t *const *out, uint8_t *ok)
{
    uint32_t s[16], nonces[PYWG_PORTABLE_CHUNK * 3];
    uint8_t otk[PYWG_PORTABLE_CHUNK * 64];
    size_t width;
    keystream_fn kernel = pick_kernel(pywg_portable_lanes(), (size_t)64 * (k > 1 ? k : 2), &width);
    width /= 64; /* blocks, so messages, per kernel run */
    static const uint8_t no_nonce[12]; /* the lanes bring their own */
    /* block 0 of every message: its Poly1305 key */
    chacha_init(s, key, no_nonce, 0);
    for (size_t i = 0; i < k; i++) {
        nonces[3 * i] = 0; /* WireGuard's nonce: 4 zero bytes || counter (LE) */
        nonces[3 * i + 1] = (uint32_t)counters[i];
        nonces[3 * i + 2] = (uint32_t)(counters[i] >> 32);
    }
    for (size_t i = 0; i < k; i += width) {
        uint8_t ks[1024];
        uint32_t lane_nonces[16 * 3] = {0};
        size_t n = k - i < width ? k - i : width;
        memcpy(lane_nonces, nonces + 3 * i, 12 * n);
        kernel(s, ks, NULL, lane_nonces);
        memcpy(otk + 64 * i, ks, 64 * n);
        wipe(ks, sizeof ks);
    }
    /* every tag first (the messages of the first one's length side by side), then only
     * the messages that verified are decrypted */
    poly1305_t st[PYWG_PORTABLE_CHUNK];
    uint8_t expected[PYWG_PORTABLE_CHUNK][16];
    uint8_t *expected_at[PYWG_PORTABLE_CHUNK];
    size_t same = 1;
    while (same < k && len[same] == len[0])
        same++;
    for (size_t i = 0; i < k; i++) {
        poly_init(&st[i], otk + 64 * i);
        expected_at[i] = expected[i];
    }
    wipe(otk, sizeof otk);
    mac_group(st, same, ct, len[0], expected_at);
    for (size_t i = same; i < k; i++) {
        poly_padded(&st[i], ct[i], len[i]);
        aead_tag(&st[i], 0, len[i], expected[i]);
    }
    const uint8_t *src[PYWG_PORTABLE_CHUNK];
    uint8_t *dst[PYWG_PORTABLE_CHUNK];
    uint64_t ctrs[PYWG_PORTABLE_CHUNK];
    size_t m = 0;
    for (size_t i = 0; i < k; i++) {
        ok[i] = (uint8_t)tags_equal(expected[i], tags[i]);
        if (!ok[i]) {
            memset(out[i], 0, len[i]);
        } else if (i < same && same > 1) {
            src[m] = ct[i];
            dst[m] = out[i];
            ctrs[m++] = counters[i];
        } else {
            s[12] = 1;
            s[13] = nonces[3 * i];
            s[14] = nonces[3 * i + 1];
            s[15] = nonces[3 * i + 2];
            chacha_xor_padded(s, ct[i], len[i], out[i], len[i], NULL, NULL);
        }
    }
    if (m > 0) {
        uint8_t keys[PYWG_PORTABLE_CHUNK][64]; /* block 0 again: not needed here */
        chacha_side_by_side(key, m, ctrs, src, len[0], dst, len[0], keys);
        wipe(keys, sizeof keys);
    }
    wipe(s, sizeof s);
    wipe(expected, sizeof expected);
}
