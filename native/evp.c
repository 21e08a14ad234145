/* OpenSSL EVP ChaCha20-Poly1305 loaded with dlopen; see evp.h. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "evp.h"
#include "portable.h"

/* From openssl/evp.h (stable across 1.1 and 3.x). */
#define EVP_CTRL_AEAD_SET_IVLEN 0x9
#define EVP_CTRL_AEAD_GET_TAG 0x10
#define EVP_CTRL_AEAD_SET_TAG 0x11

typedef void *(*ctx_new_fn)(void);
typedef void (*ctx_free_fn)(void *ctx);
typedef const void *(*cipher_fn)(void);
typedef int (*init_fn)(void *ctx, const void *cipher, void *engine, const unsigned char *key,
                       const unsigned char *iv);
typedef int (*ctrl_fn)(void *ctx, int type, int arg, void *ptr);
typedef int (*update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *in,
                         int inl);
typedef int (*final_fn)(void *ctx, unsigned char *out, int *outl);

/* Written once under load_once, read-only afterwards. */
static struct {
    ctx_new_fn ctx_new;
    ctx_free_fn ctx_free;
    cipher_fn chacha20_poly1305;
    init_fn encrypt_init, decrypt_init;
    ctrl_fn ctrl;
    update_fn encrypt_update, decrypt_update;
    final_fn encrypt_final, decrypt_final;
    const void *cipher;
} evp;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static pthread_key_t ctx_key;
static int usable;
static char description[160] = "not loaded yet";

static const char *const library_names[] = {
#ifdef __APPLE__
    "libcrypto.3.dylib",
    "libcrypto.dylib",
#endif
    "libcrypto.so.3",
    "libcrypto.so",
};

static int resolve(void *handle, const char *name, void *fnptr)
{
    void *sym = dlsym(handle, name);
    if (sym == NULL)
        return 0;
    memcpy(fnptr, &sym, sizeof sym); /* object pointer -> function pointer, POSIX style */
    return 1;
}

static void ctx_destructor(void *ctx)
{
    if (ctx != NULL)
        evp.ctx_free(ctx);
}

/* A context with the cipher and a 12-byte nonce length set, ready for keys. */
static void *new_ctx(void)
{
    void *ctx = evp.ctx_new();
    if (ctx == NULL)
        return NULL;
    if (evp.encrypt_init(ctx, evp.cipher, NULL, NULL, NULL) != 1 ||
        evp.ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1) {
        evp.ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

/* RFC 8439 2.8.2 plus a padded seal, each compared with the portable code. */
static int self_test(void)
{
    static const uint8_t rfc_tag[16] = {0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a,
                                        0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60, 0x06, 0x91};
    static const char text[] = "Ladies and Gentlemen of the class of '99: If I could offer "
                               "you only one tip for the future, sunscreen would be it.";
    static const uint8_t nonce[12] = {7, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47};
    static const uint8_t aad[12] = {0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1,
                                    0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7};
    const size_t len = sizeof text - 1; /* 114 */
    uint8_t key[32], ct[128], ref[128], pt[128], tag[16], reftag[16];
    int ok = 0;
    for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)(0x80 + i);
    void *ctx = new_ctx();
    if (ctx == NULL)
        return 0;
    /* the RFC vector */
    if (!pywg_evp_begin(ctx, key, 1) ||
        !pywg_evp_seal(ctx, nonce, aad, sizeof aad, (const uint8_t *)text, len, ct, len, tag))
        goto done;
    pywg_portable_seal(key, nonce, aad, sizeof aad, (const uint8_t *)text, len, ref, len, reftag);
    if (memcmp(tag, rfc_tag, 16) || memcmp(reftag, rfc_tag, 16) || memcmp(ct, ref, len))
        goto done;
    if (!pywg_evp_begin(ctx, key, 0) ||
        pywg_evp_open(ctx, nonce, aad, sizeof aad, ct, len, tag, pt) != 1 ||
        memcmp(pt, text, len))
        goto done;
    tag[5] ^= 1;
    if (pywg_evp_open(ctx, nonce, aad, sizeof aad, ct, len, tag, pt) != 0)
        goto done;
    /* 77 bytes sealed as 96 (padding with zeros after the plaintext), no aad */
    if (!pywg_evp_begin(ctx, key, 1) ||
        !pywg_evp_seal(ctx, nonce, NULL, 0, (const uint8_t *)text, 77, ct, 96, tag))
        goto done;
    pywg_portable_seal(key, nonce, NULL, 0, (const uint8_t *)text, 77, ref, 96, reftag);
    ok = !memcmp(ct, ref, 96) && !memcmp(tag, reftag, 16);
done:
    evp.ctx_free(ctx);
    return ok;
}

static void load(void)
{
    const char *why = "no libcrypto found";
    for (size_t i = 0; i < sizeof library_names / sizeof library_names[0]; i++) {
        void *handle = dlopen(library_names[i], RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL)
            continue;
        memset(&evp, 0, sizeof evp);
        if (!resolve(handle, "EVP_CIPHER_CTX_new", &evp.ctx_new) ||
            !resolve(handle, "EVP_CIPHER_CTX_free", &evp.ctx_free) ||
            !resolve(handle, "EVP_chacha20_poly1305", &evp.chacha20_poly1305) ||
            !resolve(handle, "EVP_EncryptInit_ex", &evp.encrypt_init) ||
            !resolve(handle, "EVP_DecryptInit_ex", &evp.decrypt_init) ||
            !resolve(handle, "EVP_CIPHER_CTX_ctrl", &evp.ctrl) ||
            !resolve(handle, "EVP_EncryptUpdate", &evp.encrypt_update) ||
            !resolve(handle, "EVP_DecryptUpdate", &evp.decrypt_update) ||
            !resolve(handle, "EVP_EncryptFinal_ex", &evp.encrypt_final) ||
            !resolve(handle, "EVP_DecryptFinal_ex", &evp.decrypt_final)) {
            why = "libcrypto lacks an EVP function";
            dlclose(handle);
            continue;
        }
        evp.cipher = evp.chacha20_poly1305();
        if (evp.cipher == NULL) {
            why = "libcrypto has no chacha20-poly1305";
            dlclose(handle);
            continue;
        }
        if (!self_test()) {
            why = "libcrypto failed the RFC 8439 self-test";
            dlclose(handle);
            continue;
        }
        if (pthread_key_create(&ctx_key, ctx_destructor) != 0) {
            why = "pthread_key_create failed";
            dlclose(handle);
            break;
        }
        usable = 1;
        snprintf(description, sizeof description, "%s (EVP_chacha20_poly1305)",
                 library_names[i]);
        return; /* the handle stays open for the life of the process */
    }
    snprintf(description, sizeof description, "unavailable: %s", why);
}

int pywg_evp_available(void)
{
    pthread_once(&load_once, load);
    return usable;
}

const char *pywg_evp_describe(void)
{
    pthread_once(&load_once, load);
    return description;
}

void *pywg_evp_thread_ctx(void)
{
    if (!pywg_evp_available())
        return NULL;
    void *ctx = pthread_getspecific(ctx_key);
    if (ctx == NULL) {
        ctx = new_ctx();
        if (ctx == NULL)
            return NULL;
        if (pthread_setspecific(ctx_key, ctx) != 0) {
            evp.ctx_free(ctx);
            return NULL;
        }
    }
    return ctx;
}

int pywg_evp_begin(void *ctx, const uint8_t key[32], int enc)
{
    init_fn init = enc ? evp.encrypt_init : evp.decrypt_init;
    return init(ctx, NULL, NULL, key, NULL) == 1;
}

/* EVP lengths are int: feed longer inputs in pieces. in == NULL feeds zeros. */
static int update(update_fn fn, void *ctx, uint8_t *out, const uint8_t *in, size_t len)
{
    static const uint8_t zeros[64];
    while (len > 0) {
        size_t limit = in != NULL ? (size_t)1 << 30 : sizeof zeros;
        int n = (int)(len < limit ? len : limit), written = 0;
        if (fn(ctx, out, &written, in != NULL ? in : zeros, n) != 1)
            return 0;
        if (out != NULL) {
            if (written != n)
                return 0;
            out += n;
        }
        if (in != NULL)
            in += n;
        len -= (size_t)n;
    }
    return 1;
}

int pywg_evp_seal(void *ctx, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                  const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, uint8_t tag[16])
{
    uint8_t scratch[32];
    int written = 0;
    if (evp.encrypt_init(ctx, NULL, NULL, NULL, nonce) != 1)
        return 0;
    if (aadlen > 0 && !update(evp.encrypt_update, ctx, NULL, aad, aadlen))
        return 0;
    if (!update(evp.encrypt_update, ctx, out, in, inlen))
        return 0;
    if (outlen > inlen && !update(evp.encrypt_update, ctx, out + inlen, NULL, outlen - inlen))
        return 0;
    if (evp.encrypt_final(ctx, scratch, &written) != 1 || written != 0)
        return 0;
    return evp.ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

int pywg_evp_open(void *ctx, const uint8_t nonce[12], const uint8_t *aad, size_t aadlen,
                  const uint8_t *ct, size_t len, const uint8_t tag[16], uint8_t *out)
{
    uint8_t scratch[32], expected[16];
    int written = 0;
    memcpy(expected, tag, 16);
    if (evp.decrypt_init(ctx, NULL, NULL, NULL, nonce) != 1)
        return -1;
    if (aadlen > 0 && !update(evp.decrypt_update, ctx, NULL, aad, aadlen))
        return -1;
    if (!update(evp.decrypt_update, ctx, out, ct, len))
        return -1;
    if (evp.ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, expected) != 1)
        return -1;
    /* OpenSSL compares the tags with CRYPTO_memcmp (constant time). */
    return evp.decrypt_final(ctx, scratch, &written) > 0 ? 1 : 0;
}
