/* pywg._fastpath: batch seal/open of WireGuard transport messages (ChaCha20-Poly1305).
 *
 * This header is also the cffi cdef (native/build_fastpath.py drops the preprocessor
 * lines), so it holds plain declarations only.
 *
 * Wire format of a transport message (little endian):
 *   u32 type = 4 | u32 receiver index | u64 counter | ciphertext (padded length) | tag (16)
 * sealed with nonce = 4 zero bytes || u64 LE counter and no associated data.
 *
 * Every batch function checks all offsets and lengths against the buffer sizes before it
 * touches any memory and returns a negative PYWG_FP_E* code when one is out of range, so
 * a caller's mistake cannot make it read or write outside the buffers. An output may
 * coincide exactly with its input (sealing in place: out_off + 16 == in_off; opening in
 * place: out_off == in_off + 16) or overlap it arbitrarily: each message is read whole
 * before its output is written. Messages are processed in order.
 *
 * Nothing here needs the GIL and there is no shared mutable state: OpenSSL is loaded once
 * (pthread_once) and each thread keeps its own cipher context.
 */
#ifndef PYWG_FASTPATH_H
#define PYWG_FASTPATH_H

#include <stddef.h>
#include <stdint.h>

enum {
    PYWG_FP_AUTO = 0,     /* pywg_fp_default_backend() */
    PYWG_FP_OPENSSL = 1,  /* libcrypto's EVP ChaCha20-Poly1305, dlopen'ed */
    PYWG_FP_PORTABLE = 2, /* the C code in portable.c */
};

enum {
    PYWG_FP_OK = 0,
    PYWG_FP_EBOUNDS = -1,      /* an offset or length reaches outside its buffer */
    PYWG_FP_EARG = -2,         /* a length above PYWG_FP_MAX_LEN, counter overflow, bad stride */
    PYWG_FP_EUNAVAILABLE = -3, /* the backend asked for is not available */
    PYWG_FP_EBACKEND = -4,     /* OpenSSL reported an error */
};

enum {
    PYWG_FP_MAX_LEN = 1073741824, /* largest plaintext of one message (2^30) */
};

/* 1 when OpenSSL's libcrypto loaded and passed its self-test (loads it on first call). */
int pywg_fp_openssl_available(void);
/* Which libcrypto was loaded, or why none was. */
const char *pywg_fp_openssl_describe(void);
/* The backend PYWG_FP_AUTO resolves to: portable where its 16-lane (AVX-512F) kernels
 * run or OpenSSL is missing, else OpenSSL. */
int pywg_fp_default_backend(void);
/* Blocks per ChaCha20 kernel run in the portable backend (1, 4, 8 or 16: the CPU's
 * widest SIMD, capped by the environment variable PYWG_PORTABLE_LANES). */
int pywg_fp_portable_lanes(void);

/* WireGuard's padded plaintext length: up to a multiple of 16, but not beyond the MTU
 * (mtu = 0: no MTU cap). The sealed message is 32 bytes longer. */
uint64_t pywg_fp_padded_len(uint64_t len, uint32_t mtu);

/* Lays n sealed messages out back to back: writes out_off[i] (when out_off is not NULL)
 * and returns the total size of the output buffer they need. */
uint64_t pywg_fp_seal_layout(size_t n, const uint32_t *in_len, uint32_t mtu, size_t *out_off);

/* Seals n packets in[in_off[i] : + in_len[i]] into transport messages at out[out_off[i]:],
 * counters first_counter + i; writes out_len[i] = 32 + padded length. */
int pywg_fp_seal_batch(int backend, const uint8_t *key, uint32_t receiver_index,
                       uint64_t first_counter, size_t n,
                       const uint8_t *in, size_t in_size, const size_t *in_off,
                       const uint32_t *in_len, uint32_t mtu,
                       uint8_t *out, size_t out_size, const size_t *out_off, uint32_t *out_len);

/* Opens n transport messages in[in_off[i] : + in_len[i]] (headers are not checked beyond
 * reading the counter): writes the plaintext to out[out_off[i]:], out_len[i] (its length,
 * in_len - 32), ok[i] (1 when the tag verified) and counters[i]. A message that fails,
 * or is shorter than 32 bytes, gets ok = 0, out_len = 0 and its output range zeroed; it
 * does not affect the others. */
int pywg_fp_open_batch(int backend, const uint8_t *key, size_t n,
                       const uint8_t *in, size_t in_size, const size_t *in_off,
                       const uint32_t *in_len,
                       uint8_t *out, size_t out_size, const size_t *out_off,
                       uint32_t *out_len, uint8_t *ok, uint64_t *counters);

/* The UDP GSO layout: in[0:in_size] is a run of segments of segment_size bytes, the last
 * one possibly shorter (but not empty). Seals segment i into out[i * stride:] with
 * stride = 32 + padded(segment_size, mtu), all but the last message exactly stride long.
 * Writes the number of messages to *count and the total output length to *out_used. */
int pywg_fp_seal_gso(int backend, const uint8_t *key, uint32_t receiver_index,
                     uint64_t first_counter, const uint8_t *in, size_t in_size,
                     uint32_t segment_size, uint32_t mtu, uint8_t *out, size_t out_size,
                     size_t *count, size_t *out_used);

/* The UDP GRO layout: in[0:in_size] holds n = ceil(in_size / segment_size) messages of
 * segment_size bytes, the last possibly shorter. Opens message i into out[i * out_stride:]
 * (out_stride >= segment_size - 32), with out_len/ok/counters as pywg_fp_open_batch;
 * those arrays hold n entries. */
int pywg_fp_open_gro(int backend, const uint8_t *key, const uint8_t *in, size_t in_size,
                     uint32_t segment_size, uint8_t *out, size_t out_size, size_t out_stride,
                     size_t n, uint32_t *out_len, uint8_t *ok, uint64_t *counters);

/* Single AEAD_CHACHA20_POLY1305 operations with any nonce and associated data, for tests
 * against the RFC vectors. seal writes len + 16 bytes (ciphertext || tag); open reads
 * len >= 16 bytes (ciphertext || tag) and writes len - 16, returning 1 (verified), 0 (not)
 * or a negative PYWG_FP_E* code. */
int pywg_fp_aead_seal(int backend, const uint8_t *key, const uint8_t *nonce,
                      const uint8_t *aad, size_t aadlen, const uint8_t *in, size_t len,
                      uint8_t *out);
int pywg_fp_aead_open(int backend, const uint8_t *key, const uint8_t *nonce,
                      const uint8_t *aad, size_t aadlen, const uint8_t *in, size_t len,
                      uint8_t *out);

/* The portable primitives alone (RFC 8439 2.4 and 2.5), for the RFC vectors. */
void pywg_fp_chacha20(const uint8_t *key, const uint8_t *nonce, uint32_t counter,
                      const uint8_t *in, uint8_t *out, size_t len);
void pywg_fp_poly1305(const uint8_t *key, const uint8_t *msg, size_t len, uint8_t *tag);

#endif
