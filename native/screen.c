/* The screen: see screen.h. BLAKE2s follows RFC 7693 (section 3 and appendix C's
 * parameters for BLAKE2s: 10 rounds, rotations 16, 12, 8, 7). */
#include "screen.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum {
    KEY_LEN = 32,
    MAC_LEN = 16,
    INITIATION_SIZE = 148,
    RESPONSE_SIZE = 92,
    COOKIE_REPLY_SIZE = 64,
    TRANSPORT_MIN_SIZE = 32,
    STUN_HEADER = 20,
    DISCO_MAGIC_LEN = 6,
    INITIAL_SLOTS = 64, /* a power of two */
};

static const uint8_t DISCO_MAGIC[DISCO_MAGIC_LEN] = {'T', 'S', 0xf0, 0x9f, 0x92, 0xac};

/* --- BLAKE2s --------------------------------------------------------------------------- */

static const uint32_t IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define G(a, b, c, d, x, y)                                                                             \
    do {                                                                                                \
        v[a] = v[a] + v[b] + (x);                                                                       \
        v[d] = ror32(v[d] ^ v[a], 16);                                                                  \
        v[c] = v[c] + v[d];                                                                             \
        v[b] = ror32(v[b] ^ v[c], 12);                                                                  \
        v[a] = v[a] + v[b] + (y);                                                                       \
        v[d] = ror32(v[d] ^ v[a], 8);                                                                   \
        v[c] = v[c] + v[d];                                                                             \
        v[b] = ror32(v[b] ^ v[c], 7);                                                                   \
    } while (0)

static void compress(uint32_t h[8], const uint8_t block[64], uint64_t t, int last)
{
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load32(block + 4 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= (uint32_t)t;
    v[13] ^= (uint32_t)(t >> 32);
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 10; r++) {
        const uint8_t *s = SIGMA[r];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

void pywg_blake2s(uint8_t *out, size_t outlen, const uint8_t *key, size_t keylen, const uint8_t *in,
                  size_t inlen)
{
    uint32_t h[8];
    uint8_t block[64];
    uint64_t t = 0;
    if (outlen < 1 || outlen > 32 || keylen > 32)
        return;
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000u ^ ((uint32_t)keylen << 8) ^ (uint32_t)outlen;
    if (keylen > 0) { /* the key, padded, is the first block */
        memset(block, 0, sizeof block);
        memcpy(block, key, keylen);
        t = 64;
        compress(h, block, t, inlen == 0);
    }
    while (inlen > 64) {
        t += 64;
        compress(h, in, t, 0);
        in += 64;
        inlen -= 64;
    }
    if (inlen > 0 || keylen == 0) { /* the last block (an empty message unkeyed: one zero block) */
        memset(block, 0, sizeof block);
        memcpy(block, in, inlen);
        t += inlen;
        compress(h, block, t, 1);
    }
    uint8_t full[32];
    for (int i = 0; i < 8; i++) {
        full[4 * i] = (uint8_t)h[i];
        full[4 * i + 1] = (uint8_t)(h[i] >> 8);
        full[4 * i + 2] = (uint8_t)(h[i] >> 16);
        full[4 * i + 3] = (uint8_t)(h[i] >> 24);
    }
    memcpy(out, full, outlen);
    memset(block, 0, sizeof block);
}

/* --- the screen ------------------------------------------------------------------------ */

typedef struct {
    uint32_t index;
    uint8_t state; /* 0 empty, PYWG_SCREEN_INDEX_PENDING / _SESSION, 3 a tombstone */
} slot_t;

enum { TOMBSTONE = 3 };

struct pywg_screen {
    pthread_mutex_t mu;
    uint8_t mac1[2][KEY_LEN];
    int have_mac1[2];
    slot_t *slots;
    size_t nslots; /* a power of two */
    size_t used;   /* live + tombstones */
    uint64_t drops[PYWG_SCREEN_VERDICTS];
};

pywg_screen *pywg_screen_new(void)
{
    pywg_screen *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->slots = calloc(INITIAL_SLOTS, sizeof *s->slots);
    if (s->slots == NULL) {
        free(s);
        return NULL;
    }
    s->nslots = INITIAL_SLOTS;
    pthread_mutex_init(&s->mu, NULL);
    return s;
}

void pywg_screen_free(pywg_screen *s)
{
    if (s == NULL)
        return;
    pthread_mutex_destroy(&s->mu);
    memset(s->mac1, 0, sizeof s->mac1);
    free(s->slots);
    free(s);
}

void pywg_screen_set_mac1_keys(pywg_screen *s, const uint8_t *primary, const uint8_t *secondary)
{
    pthread_mutex_lock(&s->mu);
    const uint8_t *keys[2] = {primary, secondary};
    for (int i = 0; i < 2; i++) {
        s->have_mac1[i] = keys[i] != NULL;
        if (keys[i] != NULL)
            memcpy(s->mac1[i], keys[i], KEY_LEN);
        else
            memset(s->mac1[i], 0, KEY_LEN);
    }
    pthread_mutex_unlock(&s->mu);
}

static inline size_t hash_index(uint32_t index, size_t nslots)
{
    /* The engine's indices are random; the multiply spreads any that are not. */
    return (size_t)((index * 2654435761u) & (uint32_t)(nslots - 1));
}

/* The slot holding index, or NULL. Under mu. */
static slot_t *find(const pywg_screen *s, uint32_t index)
{
    size_t mask = s->nslots - 1;
    for (size_t i = hash_index(index, s->nslots), n = 0; n < s->nslots; i = (i + 1) & mask, n++) {
        slot_t *slot = &s->slots[i];
        if (slot->state == 0)
            return NULL;
        if (slot->state != TOMBSTONE && slot->index == index)
            return slot;
    }
    return NULL;
}

/* Rebuild the table with nslots slots (tombstones dropped). Under mu. */
static int rehash(pywg_screen *s, size_t nslots)
{
    slot_t *fresh = calloc(nslots, sizeof *fresh);
    if (fresh == NULL)
        return -1;
    size_t used = 0;
    for (size_t i = 0; i < s->nslots; i++) {
        slot_t *old = &s->slots[i];
        if (old->state == 0 || old->state == TOMBSTONE)
            continue;
        size_t j = hash_index(old->index, nslots);
        while (fresh[j].state != 0)
            j = (j + 1) & (nslots - 1);
        fresh[j] = *old;
        used++;
    }
    free(s->slots);
    s->slots = fresh;
    s->nslots = nslots;
    s->used = used;
    return 0;
}

int pywg_screen_index(pywg_screen *s, uint32_t index, int state)
{
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    slot_t *slot = find(s, index);
    if (state == PYWG_SCREEN_INDEX_FREE) {
        if (slot != NULL)
            slot->state = TOMBSTONE;
    } else if (slot != NULL) {
        slot->state = (uint8_t)state;
    } else {
        if ((s->used + 1) * 2 > s->nslots) { /* keep the load under one half */
            size_t live = 0;
            for (size_t i = 0; i < s->nslots; i++)
                live += s->slots[i].state == PYWG_SCREEN_INDEX_PENDING || s->slots[i].state == PYWG_SCREEN_INDEX_SESSION;
            size_t want = s->nslots;
            while ((live + 1) * 4 > want)
                want *= 2;
            rc = rehash(s, want);
        }
        if (rc == 0) {
            size_t j = hash_index(index, s->nslots);
            while (s->slots[j].state != 0 && s->slots[j].state != TOMBSTONE)
                j = (j + 1) & (s->nslots - 1);
            if (s->slots[j].state == 0)
                s->used++;
            s->slots[j].index = index;
            s->slots[j].state = (uint8_t)state;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void pywg_screen_clear_indices(pywg_screen *s)
{
    pthread_mutex_lock(&s->mu);
    memset(s->slots, 0, s->nslots * sizeof *s->slots);
    s->used = 0;
    pthread_mutex_unlock(&s->mu);
}

static int mac1_matches(const uint8_t key[KEY_LEN], const uint8_t *data, size_t len)
{
    uint8_t mac[MAC_LEN];
    size_t off = len - 2 * MAC_LEN;
    pywg_blake2s(mac, MAC_LEN, key, KEY_LEN, data, off);
    uint8_t diff = 0;
    for (int i = 0; i < MAC_LEN; i++) /* constant time */
        diff |= (uint8_t)(mac[i] ^ data[off + i]);
    return diff == 0;
}

void pywg_screen_count(pywg_screen *s, int verdict, uint64_t n)
{
    if (verdict >= PYWG_SCREEN_FIRST_DROP && verdict < PYWG_SCREEN_VERDICTS)
        __atomic_fetch_add(&s->drops[verdict], n, __ATOMIC_RELAXED);
}

int pywg_screen_verdict(pywg_screen *s, const uint8_t *data, size_t len)
{
    /* STUN: the two top bits zero, the magic cookie 0x2112A442 (big-endian) at offset 4, and
     * a length field that covers the rest: no WireGuard message has all three (its bytes 2-3
     * are zero, and none is 20 bytes long). */
    if (len >= STUN_HEADER && (data[0] & 0xC0) == 0 && load32(data + 4) == 0x42A41221u
        && len == STUN_HEADER + ((size_t)data[2] << 8 | data[3]))
        return PYWG_SCREEN_STUN;
    if (len >= DISCO_MAGIC_LEN && memcmp(data, DISCO_MAGIC, DISCO_MAGIC_LEN) == 0)
        return PYWG_SCREEN_DISCO;
    if (len < 4) /* the demux's verdict (pywg/protocol/demux.py), as for any other type */
        return PYWG_SCREEN_UNKNOWN_PROTOCOL;
    uint32_t type = load32(data);
    size_t want;
    switch (type) {
    case 1: want = INITIATION_SIZE; break;
    case 2: want = RESPONSE_SIZE; break;
    case 3: want = COOKIE_REPLY_SIZE; break;
    case 4: want = 0; break;
    default: return PYWG_SCREEN_UNKNOWN_PROTOCOL;
    }
    if (type == 4 ? len < TRANSPORT_MIN_SIZE : len != want)
        return PYWG_SCREEN_BAD_SIZE;
    int verdict = PYWG_SCREEN_PASS;
    pthread_mutex_lock(&s->mu);
    if (type == 1 || type == 2) {
        if (s->have_mac1[0] && !mac1_matches(s->mac1[0], data, len)
            && !(s->have_mac1[1] && mac1_matches(s->mac1[1], data, len)))
            verdict = PYWG_SCREEN_BAD_MAC1;
        else if (type == 2 && s->have_mac1[0] && find(s, load32(data + 8)) == NULL)
            verdict = PYWG_SCREEN_UNKNOWN_INDEX;
    } else {
        slot_t *slot = find(s, load32(data + 4));
        if (slot == NULL || (type == 4 && slot->state != PYWG_SCREEN_INDEX_SESSION))
            verdict = PYWG_SCREEN_UNKNOWN_INDEX;
    }
    pthread_mutex_unlock(&s->mu);
    return verdict;
}

int pywg_screen_run_verdict(pywg_screen *s, const uint8_t *data, size_t len, size_t segment)
{
    if (segment == 0 || segment >= len)
        return pywg_screen_verdict(s, data, len);
    int first = PYWG_SCREEN_PASS;
    for (size_t off = 0; off < len; off += segment) {
        size_t n = len - off < segment ? len - off : segment;
        int verdict = pywg_screen_verdict(s, data + off, n);
        if (verdict < PYWG_SCREEN_FIRST_DROP)
            return PYWG_SCREEN_PASS;
        if (off == 0)
            first = verdict;
    }
    return first;
}

void pywg_screen_count_run(pywg_screen *s, const uint8_t *data, size_t len, size_t segment)
{
    if (segment == 0 || segment >= len) {
        pywg_screen_count(s, pywg_screen_verdict(s, data, len), 1);
        return;
    }
    for (size_t off = 0; off < len; off += segment)
        pywg_screen_count(s, pywg_screen_verdict(s, data + off, len - off < segment ? len - off : segment), 1);
}

void pywg_screen_counts(pywg_screen *s, uint64_t *out)
{
    for (int i = 0; i < PYWG_SCREEN_VERDICTS; i++)
        out[i] = __atomic_load_n(&s->drops[i], __ATOMIC_RELAXED);
}
