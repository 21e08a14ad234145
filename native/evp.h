/* OpenSSL's ChaCha20-Poly1305 through the EVP API, loaded at run time with dlopen.
 *
 * No OpenSSL headers are needed to build: the few EVP functions are declared here as
 * function pointers and looked up in libcrypto.so.3 (then libcrypto.so) at first use.
 * What we gain is OpenSSL's assembly (AVX2/AVX-512 on x86-64, NEON on arm64).
 */
#ifndef PYWG_EVP_H
#define PYWG_EVP_H

#include <stddef.h>
#include <stdint.h>

/* Loads libcrypto once (thread-safe) and checks it against an RFC 8439 vector.
 * Returns 1 when the OpenSSL backend is usable. */
int pywg_evp_available(void);

/* A short text saying which library was loaded, or why none was. */
const char *pywg_evp_describe(void);

/* The calling thread's cipher context, created on first use and freed when the thread
 * exits; NULL when OpenSSL is unavailable or out of memory. */
void *pywg_evp_thread_ctx(void);

/* Set the key for a run of seals (enc = 1) or opens (enc = 0) on ctx. Returns 1 on success. */
int pywg_evp_begin(void *ctx, const uint8_t key[32], int enc);

/* Same contracts as pywg_portable_seal/open (see portable.h), on a ctx begun with the
 * key. seal returns 1 on success, 0 on an OpenSSL failure; open returns 1 when the tag
 * verified, 0 when it did not, -1 on an OpenSSL failure. On a failed open, out may hold
 * unauthenticated bytes: the caller wipes it. */
int pywg_evp_seal(void *ctx, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                  const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, uint8_t tag[16]);
int pywg_evp_open(void *ctx, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                  const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out);

#endif
