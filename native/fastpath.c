/* pywg._fastpath: the batch layer over the two ChaCha20-Poly1305 backends.
 * See fastpath.h for the contracts. */
#include <string.h>

#include "evp.h"
#include "fastpath.h"
#include "portable.h"

#define HEADER_LEN 16
#define TAG_LEN 16
#define OVERHEAD (HEADER_LEN + TAG_LEN)
#define MESSAGE_TRANSPORT 4

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static inline uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static inline int overlaps(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return alen > 0 && blen > 0 && x < y + blen && y < x + alen;
}

/* [off, off + len) lies within a buffer of size bytes. */
static inline int fits(size_t off, uint64_t len, size_t size)
{
    return off <= size && len <= (uint64_t)(size - off);
}

int pywg_fp_openssl_available(void)
{
    return pywg_evp_available();
}

const char *pywg_fp_openssl_describe(void)
{
    return pywg_evp_describe();
}

/* The portable code with its 16-lane (AVX-512F) kernels and pipelined MACs outruns
 * OpenSSL's EVP per message (measured in bench/test_bench_fastpath.py: OpenSSL pays a
 * fixed cost per message for its nonce and Poly1305 set-up); with narrower SIMD OpenSSL's
 * own assembly is the better bet. */
int pywg_fp_default_backend(void)
{
    if (pywg_portable_lanes() >= 16 || !pywg_evp_available())
        return PYWG_FP_PORTABLE;
    return PYWG_FP_OPENSSL;
}

int pywg_fp_portable_lanes(void)
{
    return pywg_portable_lanes();
}

uint64_t pywg_fp_padded_len(uint64_t len, uint32_t mtu)
{
    if (mtu == 0)
        return (len + 15) & ~(uint64_t)15;
    uint64_t last = len > mtu ? len % mtu : len;
    uint64_t padded = (last + 15) & ~(uint64_t)15;
    if (padded > mtu)
        padded = mtu;
    return len + padded - last;
}

uint64_t pywg_fp_seal_layout(size_t n, const uint32_t *in_len, uint32_t mtu, size_t *out_off)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (out_off != NULL)
            out_off[i] = (size_t)total;
        total += OVERHEAD + pywg_fp_padded_len(in_len[i], mtu);
    }
    return total;
}

/* --- one message --------------------------------------------------------------------- */

typedef struct {
    int backend; /* PYWG_FP_OPENSSL or PYWG_FP_PORTABLE */
    void *ctx;   /* the thread's EVP context, keyed (OpenSSL) */
    const uint8_t *key;
    pywg_portable_pipe_t pipe; /* portable batch seals: the message whose MAC is pending */
} engine_t;

static int engine_start(engine_t *e, int backend, const uint8_t *key, int enc)
{
    if (backend == PYWG_FP_AUTO)
        backend = pywg_fp_default_backend();
    e->backend = backend;
    e->key = key;
    e->ctx = NULL;
    e->pipe.active = 0;
    if (backend == PYWG_FP_PORTABLE)
        return PYWG_FP_OK;
    if (backend != PYWG_FP_OPENSSL || !pywg_evp_available())
        return PYWG_FP_EUNAVAILABLE;
    e->ctx = pywg_evp_thread_ctx();
    if (e->ctx == NULL || !pywg_evp_begin(e->ctx, key, enc))
        return PYWG_FP_EBACKEND;
    return PYWG_FP_OK;
}

static int seal(const engine_t *e, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, uint8_t *tag)
{
    if (e->backend == PYWG_FP_OPENSSL)
        return pywg_evp_seal(e->ctx, nonce, aad, aadlen, in, inlen, out, outlen, tag)
                   ? PYWG_FP_OK : PYWG_FP_EBACKEND;
    pywg_portable_seal(e->key, nonce, aad, aadlen, in, inlen, out, outlen, tag);
    return PYWG_FP_OK;
}

/* 1 verified, 0 not, <0 error. */
static int open_(const engine_t *e, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                 const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out)
{
    if (e->backend == PYWG_FP_OPENSSL) {
        int r = pywg_evp_open(e->ctx, nonce, aad, aadlen, ct, len, tag, out);
        return r < 0 ? PYWG_FP_EBACKEND : r;
    }
    return pywg_portable_open(e->key, nonce, aad, aadlen, ct, len, tag, out);
}

static inline void wg_nonce(uint8_t nonce[12], uint64_t counter)
{
    memset(nonce, 0, 4);
    put64(nonce + 4, counter);
}

/* Seal plaintext p[0:len] as a message of 32 + plen bytes at out. With the portable
 * backend the tag is written by the next call or by engine_flush (see portable.h). */
static int seal_message(engine_t *e, uint32_t receiver_index, uint64_t counter,
                        const uint8_t *p, size_t len, size_t plen, uint8_t *out)
{
    uint8_t nonce[12];
    uint8_t *ct = out + HEADER_LEN;
    int r = PYWG_FP_OK;
    if (e->pipe.active) {
        /* the pending message's bytes must not move under its MAC: if this one reads or
         * writes them, finish that one first (as if sealed one after the other) */
        const uint8_t *pending = e->pipe.ct - HEADER_LEN;
        size_t span = OVERHEAD + e->pipe.len;
        if (overlaps(out, OVERHEAD + plen, pending, span) || overlaps(p, len, pending, span))
            pywg_portable_pipe_flush(&e->pipe);
    }
    if (p != ct && overlaps(p, len, out, OVERHEAD + plen)) {
        memmove(ct, p, len); /* read the whole input before writing, then seal in place */
        p = ct;
    }
    wg_nonce(nonce, counter);
    if (e->backend == PYWG_FP_PORTABLE)
        pywg_portable_pipe_seal(&e->pipe, e->key, nonce, p, len, ct, plen, ct + plen);
    else
        r = seal(e, nonce, NULL, 0, p, len, ct, plen, ct + plen);
    put32(out, MESSAGE_TRANSPORT);
    put32(out + 4, receiver_index);
    put64(out + 8, counter);
    return r;
}

/* Write the last pending tag (portable seals). */
static void engine_flush(engine_t *e)
{
    pywg_portable_pipe_flush(&e->pipe);
}

static int open_message(const engine_t *e, const uint8_t *msg, size_t mlen, uint8_t *out,
                        uint32_t *out_len, uint8_t *ok, uint64_t *counter)
{
    uint8_t nonce[12], tag[TAG_LEN];
    *counter = mlen >= HEADER_LEN ? get64(msg + 8) : 0;
    *ok = 0;
    *out_len = 0;
    if (mlen < OVERHEAD)
        return PYWG_FP_OK;
    size_t len = mlen - OVERHEAD;
    const uint8_t *ct = msg + HEADER_LEN;
    memcpy(tag, ct + len, TAG_LEN);
    if (ct != out && overlaps(ct, len, out, len)) {
        memmove(out, ct, len);
        ct = out;
    }
    wg_nonce(nonce, *counter);
    int r = open_(e, nonce, NULL, 0, ct, len, tag, out);
    if (r < 0)
        return r;
    if (r == 1) {
        *ok = 1;
        *out_len = (uint32_t)len;
    } else {
        memset(out, 0, len); /* never leave unauthenticated plaintext behind */
    }
    return PYWG_FP_OK;
}

/* --- batches ------------------------------------------------------------------------- */

int pywg_fp_seal_batch(int backend, const uint8_t *key, uint32_t receiver_index,
                       uint64_t first_counter, size_t n,
                       const uint8_t *in, size_t in_size, const size_t *in_off,
                       const uint32_t *in_len, uint32_t mtu,
                       uint8_t *out, size_t out_size, const size_t *out_off, uint32_t *out_len)
{
    engine_t e;
    if (n == 0)
        return PYWG_FP_OK;
    if (first_counter > UINT64_MAX - (n - 1))
        return PYWG_FP_EARG;
    for (size_t i = 0; i < n; i++) {
        if (in_len[i] > PYWG_FP_MAX_LEN)
            return PYWG_FP_EARG;
        if (!fits(in_off[i], in_len[i], in_size) ||
            !fits(out_off[i], OVERHEAD + pywg_fp_padded_len(in_len[i], mtu), out_size))
            return PYWG_FP_EBOUNDS;
    }
    int r = engine_start(&e, backend, key, 1);
    for (size_t i = 0; r == PYWG_FP_OK && i < n; i++) {
        size_t plen = (size_t)pywg_fp_padded_len(in_len[i], mtu);
        r = seal_message(&e, receiver_index, first_counter + i, in + in_off[i], in_len[i], plen,
                         out + out_off[i]);
        out_len[i] = (uint32_t)(OVERHEAD + plen);
    }
    engine_flush(&e);
    return r;
}

/* Portable opens go in chunks (pywg_portable_open_chunk) when no message's output touches
 * another message's bytes or output and each output is its ciphertext or clear of it;
 * otherwise, and always with OpenSSL, one message after the other. */
typedef struct {
    size_t k;
    const uint8_t *msg[PYWG_PORTABLE_CHUNK];
    size_t mlen[PYWG_PORTABLE_CHUNK];
    uint8_t *out[PYWG_PORTABLE_CHUNK];
    uint32_t *out_len[PYWG_PORTABLE_CHUNK];
    uint8_t *ok[PYWG_PORTABLE_CHUNK];
    uint64_t *counter[PYWG_PORTABLE_CHUNK];
} chunk_t;

static int chunk_pipelinable(const chunk_t *c)
{
    for (size_t a = 0; a < c->k; a++) {
        if (c->mlen[a] < OVERHEAD)
            return 0;
        size_t len = c->mlen[a] - OVERHEAD;
        const uint8_t *ct = c->msg[a] + HEADER_LEN;
        if (c->out[a] != ct && overlaps(c->out[a], len, ct, len))
            return 0;
        for (size_t b = 0; b < c->k; b++) /* (outputs too: a chunk writes them out of order) */
            if (b != a && (overlaps(c->out[a], len, c->msg[b], c->mlen[b])
                           || (c->mlen[b] >= OVERHEAD && overlaps(c->out[a], len, c->out[b], c->mlen[b] - OVERHEAD))))
                return 0;
    }
    return 1;
}

static int chunk_flush(engine_t *e, chunk_t *c)
{
    int r = PYWG_FP_OK;
    if (c->k == 0)
        return r;
    if (!chunk_pipelinable(c)) {
        for (size_t a = 0; r == PYWG_FP_OK && a < c->k; a++)
            r = open_message(e, c->msg[a], c->mlen[a], c->out[a], c->out_len[a], c->ok[a],
                             c->counter[a]);
        c->k = 0;
        return r;
    }
    const uint8_t *ct[PYWG_PORTABLE_CHUNK];
    size_t len[PYWG_PORTABLE_CHUNK];
    uint64_t counters[PYWG_PORTABLE_CHUNK];
    uint8_t tags[PYWG_PORTABLE_CHUNK][TAG_LEN], ok[PYWG_PORTABLE_CHUNK];
    for (size_t a = 0; a < c->k; a++) { /* read every header and tag before any writing */
        len[a] = c->mlen[a] - OVERHEAD;
        ct[a] = c->msg[a] + HEADER_LEN;
        counters[a] = get64(c->msg[a] + 8);
        memcpy(tags[a], ct[a] + len[a], TAG_LEN);
    }
    pywg_portable_open_chunk(e->key, c->k, ct, len, counters, (const uint8_t (*)[16])tags,
                             c->out, ok);
    for (size_t a = 0; a < c->k; a++) {
        *c->ok[a] = ok[a];
        *c->out_len[a] = ok[a] ? (uint32_t)len[a] : 0;
        *c->counter[a] = counters[a];
    }
    c->k = 0;
    return r;
}

/* Open one message now (OpenSSL) or queue it in the chunk (portable). */
static int open_queued(engine_t *e, chunk_t *c, const uint8_t *msg, size_t mlen, uint8_t *out,
                       uint32_t *out_len, uint8_t *ok, uint64_t *counter)
{
    if (e->backend != PYWG_FP_PORTABLE)
        return open_message(e, msg, mlen, out, out_len, ok, counter);
    c->msg[c->k] = msg;
    c->mlen[c->k] = mlen;
    c->out[c->k] = out;
    c->out_len[c->k] = out_len;
    c->ok[c->k] = ok;
    c->counter[c->k] = counter;
    if (++c->k == PYWG_PORTABLE_CHUNK)
        return chunk_flush(e, c);
    return PYWG_FP_OK;
}

int pywg_fp_open_batch(int backend, const uint8_t *key, size_t n,
                       const uint8_t *in, size_t in_size, const size_t *in_off,
                       const uint32_t *in_len,
                       uint8_t *out, size_t out_size, const size_t *out_off,
                       uint32_t *out_len, uint8_t *ok, uint64_t *counters)
{
    engine_t e;
    chunk_t chunk;
    if (n == 0)
        return PYWG_FP_OK;
    for (size_t i = 0; i < n; i++) {
        if (in_len[i] > PYWG_FP_MAX_LEN + OVERHEAD)
            return PYWG_FP_EARG;
        if (!fits(in_off[i], in_len[i], in_size))
            return PYWG_FP_EBOUNDS;
        if (in_len[i] >= OVERHEAD && !fits(out_off[i], in_len[i] - OVERHEAD, out_size))
            return PYWG_FP_EBOUNDS;
    }
    int r = engine_start(&e, backend, key, 0);
    chunk.k = 0;
    for (size_t i = 0; r == PYWG_FP_OK && i < n; i++)
        r = open_queued(&e, &chunk, in + in_off[i], in_len[i], out + out_off[i], &out_len[i],
                        &ok[i], &counters[i]);
    if (r == PYWG_FP_OK)
        r = chunk_flush(&e, &chunk);
    return r;
}

int pywg_fp_seal_gso(int backend, const uint8_t *key, uint32_t receiver_index,
                     uint64_t first_counter, const uint8_t *in, size_t in_size,
                     uint32_t segment_size, uint32_t mtu, uint8_t *out, size_t out_size,
                     size_t *count, size_t *out_used)
{
    engine_t e;
    *count = 0;
    *out_used = 0;
    if (segment_size == 0 || segment_size > PYWG_FP_MAX_LEN)
        return PYWG_FP_EARG;
    if (in_size == 0)
        return PYWG_FP_OK;
    size_t n = (in_size - 1) / segment_size + 1;
    size_t last = in_size - (n - 1) * (size_t)segment_size;
    uint64_t stride = OVERHEAD + pywg_fp_padded_len(segment_size, mtu);
    uint64_t used = (uint64_t)(n - 1) * stride + OVERHEAD + pywg_fp_padded_len(last, mtu);
    if (first_counter > UINT64_MAX - (n - 1))
        return PYWG_FP_EARG;
    if (used > out_size)
        return PYWG_FP_EBOUNDS;
    int r = engine_start(&e, backend, key, 1);
    size_t i = 0;
    if (r == PYWG_FP_OK && e.backend == PYWG_FP_PORTABLE && pywg_portable_lanes() >= 8
        && !overlaps(in, in_size, out, (size_t)used)) {
        /* the messages of segment_size bytes in groups, side by side (portable.h) */
        size_t whole = last == segment_size ? n : n - 1;
        size_t plen = (size_t)pywg_fp_padded_len(segment_size, mtu);
        for (; i < whole; i += PYWG_PORTABLE_GROUP) {
            size_t k = whole - i < PYWG_PORTABLE_GROUP ? whole - i : PYWG_PORTABLE_GROUP;
            uint64_t counters[PYWG_PORTABLE_GROUP];
            const uint8_t *src[PYWG_PORTABLE_GROUP];
            uint8_t *dst[PYWG_PORTABLE_GROUP], *tags[PYWG_PORTABLE_GROUP];
            for (size_t j = 0; j < k; j++) {
                uint8_t *msg = out + (i + j) * (size_t)stride;
                counters[j] = first_counter + i + j;
                src[j] = in + (i + j) * (size_t)segment_size;
                dst[j] = msg + HEADER_LEN;
                tags[j] = msg + HEADER_LEN + plen;
                put32(msg, MESSAGE_TRANSPORT);
                put32(msg + 4, receiver_index);
                put64(msg + 8, counters[j]);
            }
            pywg_portable_seal_group(key, k, counters, src, segment_size, dst, plen, tags);
        }
        i = whole;
    }
    for (; r == PYWG_FP_OK && i < n; i++) {
        size_t len = i + 1 < n ? segment_size : last;
        r = seal_message(&e, receiver_index, first_counter + i, in + i * (size_t)segment_size,
                         len, (size_t)pywg_fp_padded_len(len, mtu), out + i * (size_t)stride);
    }
    engine_flush(&e);
    if (r == PYWG_FP_OK) {
        *count = n;
        *out_used = (size_t)used;
    }
    return r;
}

int pywg_fp_open_gro(int backend, const uint8_t *key, const uint8_t *in, size_t in_size,
                     uint32_t segment_size, uint8_t *out, size_t out_size, size_t out_stride,
                     size_t n, uint32_t *out_len, uint8_t *ok, uint64_t *counters)
{
    engine_t e;
    if (segment_size == 0 || segment_size > PYWG_FP_MAX_LEN + OVERHEAD)
        return PYWG_FP_EARG;
    if (n != (in_size == 0 ? 0 : (in_size - 1) / segment_size + 1))
        return PYWG_FP_EARG;
    if (n == 0)
        return PYWG_FP_OK;
    size_t last = in_size - (n - 1) * (size_t)segment_size;
    if (segment_size >= OVERHEAD && out_stride < segment_size - OVERHEAD)
        return PYWG_FP_EARG;
    /* the last message's output ends furthest out (strides are >= the plaintext sizes) */
    if (out_stride != 0 && n - 1 > SIZE_MAX / out_stride)
        return PYWG_FP_EBOUNDS;
    if (last >= OVERHEAD && !fits((n - 1) * out_stride, last - OVERHEAD, out_size))
        return PYWG_FP_EBOUNDS;
    if (n > 1 && segment_size >= OVERHEAD &&
        !fits((n - 2) * out_stride, segment_size - OVERHEAD, out_size))
        return PYWG_FP_EBOUNDS;
    chunk_t chunk;
    int r = engine_start(&e, backend, key, 0);
    chunk.k = 0;
    for (size_t i = 0; r == PYWG_FP_OK && i < n; i++) {
        size_t len = i + 1 < n ? segment_size : last;
        r = open_queued(&e, &chunk, in + i * (size_t)segment_size, len, out + i * out_stride,
                        &out_len[i], &ok[i], &counters[i]);
    }
    if (r == PYWG_FP_OK)
        r = chunk_flush(&e, &chunk);
    return r;
}

/* --- single operations (tests) ------------------------------------------------------- */

int pywg_fp_aead_seal(int backend, const uint8_t *key, const uint8_t *nonce,
                      const uint8_t *aad, size_t aadlen, const uint8_t *in, size_t len,
                      uint8_t *out)
{
    engine_t e;
    if (len > PYWG_FP_MAX_LEN || aadlen > PYWG_FP_MAX_LEN)
        return PYWG_FP_EARG;
    int r = engine_start(&e, backend, key, 1);
    if (r == PYWG_FP_OK)
        r = seal(&e, nonce, aad, aadlen, in, len, out, len, out + len);
    return r;
}

int pywg_fp_aead_open(int backend, const uint8_t *key, const uint8_t *nonce,
                      const uint8_t *aad, size_t aadlen, const uint8_t *in, size_t len,
                      uint8_t *out)
{
    engine_t e;
    uint8_t tag[TAG_LEN];
    if (len < TAG_LEN || len > PYWG_FP_MAX_LEN + TAG_LEN || aadlen > PYWG_FP_MAX_LEN)
        return PYWG_FP_EARG;
    int r = engine_start(&e, backend, key, 0);
    if (r != PYWG_FP_OK)
        return r;
    memcpy(tag, in + len - TAG_LEN, TAG_LEN);
    r = open_(&e, nonce, aad, aadlen, in, len - TAG_LEN, tag, out);
    if (r == 0)
        memset(out, 0, len - TAG_LEN);
    return r;
}

void pywg_fp_chacha20(const uint8_t *key, const uint8_t *nonce, uint32_t counter,
                      const uint8_t *in, uint8_t *out, size_t len)
{
    pywg_portable_chacha20(key, nonce, counter, in, out, len);
}

void pywg_fp_poly1305(const uint8_t *key, const uint8_t *msg, size_t len, uint8_t *tag)
{
    pywg_portable_poly1305(key, msg, len, tag);
}
