/* Portable ChaCha20, Poly1305 and AEAD_CHACHA20_POLY1305, written from RFC 8439.
 *
 * Used when OpenSSL's libcrypto cannot be loaded at run time (see evp.h), or when the
 * caller asks for it. Plain C99 plus the GCC/Clang vector extension and unsigned
 * __int128; no allocation, no global state, nothing that needs the GIL.
 */
#ifndef PYWG_PORTABLE_H
#define PYWG_PORTABLE_H

#include <stddef.h>
#include <stdint.h>

/* Poly1305 state (internal, here for pywg_portable_pipe_t's size). A multiplier: limbs
 * r0, r1, r2 of 44/44/42 bits and 20 r1, 20 r2. */
typedef struct {
    uint64_t r0, r1, r2, s1, s2;
} poly_mul_t;

typedef struct {
    poly_mul_t r[4]; /* r, r^2, r^3, r^4 */
    uint64_t h0, h1, h2;
    uint64_t pad0, pad1; /* s, added at the end */
} poly1305_t;

/* A batch of seals with each message's Poly1305 run during the next message's ChaCha20
 * (different execution units, so they overlap). Zero-initialise, call pywg_portable_pipe_seal
 * per message (same contract as pywg_portable_seal without aad), then
 * pywg_portable_pipe_flush: a message's tag is written only when the next message is
 * sealed or at the flush, and its ciphertext must stay untouched until then. */
typedef struct {
    poly1305_t st;
    const uint8_t *ct; /* ciphertext being MACed */
    size_t len, done;  /* its length, bytes MACed so far */
    uint8_t *tag;      /* where its tag goes */
    int active;
} pywg_portable_pipe_t;

void pywg_portable_pipe_seal(pywg_portable_pipe_t *pipe, const uint8_t key[32],
                             const uint8_t nonce[12], const uint8_t *in, size_t inlen,
                             uint8_t *out, size_t outlen, uint8_t tag[16]);
void pywg_portable_pipe_flush(pywg_portable_pipe_t *pipe);

/* Opens k <= PYWG_PORTABLE_CHUNK WireGuard messages (nonce = 4 zero bytes || counter, no
 * aad): ciphertext ct[i] of len[i] bytes, tag tags[i], plaintext to out[i] (== ct[i] or
 * not overlapping it), ok[i] = 1 when the tag verified (else out[i] is zeroed). One wide
 * ChaCha20 run makes all k Poly1305 keys; every tag is checked (constant time) before any
 * decryption, the messages of the first one's length side by side (MACs eight at once
 * with AVX-512 IFMA, keystreams one lane a message), so no out[i] may overlap another
 * message's bytes. */
#define PYWG_PORTABLE_CHUNK 16
void pywg_portable_open_chunk(const uint8_t key[32], size_t k, const uint8_t *const *ct,
                              const size_t *len, const uint64_t *counters,
                              const uint8_t (*tags)[16], uint8_t *const *out, uint8_t *ok);

#define PYWG_PORTABLE_GROUP 16
/* Seals k <= PYWG_PORTABLE_GROUP WireGuard messages (nonce = 4 zero bytes || counters[i], no aad) of the
 * same lengths: in[i][0:inlen] plus zero padding to outlen bytes of ciphertext at out[i],
 * the tag at tags[i]. No output may overlap any input. The keystreams run side by side
 * (one lane a message), and the MACs eight at once where the CPU has AVX-512 IFMA
 * (pywg_portable_poly_lanes() == 8). */
void pywg_portable_seal_group(const uint8_t key[32], size_t k, const uint64_t *counters,
                              const uint8_t *const *in, size_t inlen, uint8_t *const *out,
                              size_t outlen, uint8_t *const *tags);

/* Poly1305 MACs computed at once: 8 with AVX-512 IFMA, else 1. */
int pywg_portable_poly_lanes(void);

/* RFC 8439 2.4: XOR len bytes of in with the keystream of (key, nonce) starting at block
 * `counter`; in == out is allowed. */
void pywg_portable_chacha20(const uint8_t key[32], const uint8_t nonce[12], uint32_t counter,
                            const uint8_t *in, uint8_t *out, size_t len);

/* Lanes of the widest ChaCha20 kernel in use (1, 4, 8 or 16; PYWG_PORTABLE_LANES caps
 * it, read once at first use). */
int pywg_portable_lanes(void);

/* RFC 8439 2.5: the 16-byte Poly1305 tag of msg under the one-time key (r || s). */
void pywg_portable_poly1305(const uint8_t key[32], const uint8_t *msg, size_t len,
                            uint8_t tag[16]);

/* RFC 8439 2.8 seal. The plaintext is in[0:inlen] followed by (outlen - inlen) zero
 * bytes (outlen >= inlen): that is how WireGuard's padding is sealed without copying.
 * Writes outlen ciphertext bytes to out and the tag to tag. in == out is allowed. */
void pywg_portable_seal(const uint8_t key[32], const uint8_t nonce[12],
                        const uint8_t *aad, size_t aadlen,
                        const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen,
                        uint8_t tag[16]);

/* RFC 8439 2.8 open: checks the tag in constant time over (aad, ct[0:len]) first and only
 * then decrypts into out (ct == out is allowed). Returns 1 when the tag verified, else 0
 * and out is left untouched. */
int pywg_portable_open(const uint8_t key[32], const uint8_t nonce[12],
                       const uint8_t *aad, size_t aadlen,
                       const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out);

#endif
