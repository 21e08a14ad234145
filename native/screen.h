/* pywg._fastpath, the screen: a verdict on an inbound datagram before any Python runs.
 *
 * A datagram that cannot be ours is dropped here and counted, so that a flood of them
 * never enters the Python per-packet path nor delays the transport packets behind it:
 * one that is none of WireGuard's (types 1-4), STUN's or disco's, a wrong length for its
 * WireGuard type, a
 * handshake message whose mac1 is not keyed by one of our static public keys, and a
 * transport message, response or cookie reply addressed to a receiver index we never
 * gave out. The verdicts are exactly the engine's (pywg/protocol/dispatcher.py), in the
 * same order, and a differential test feeds both the same datagrams.
 *
 * The engine stays the authority: Python keeps the screen's mac1 keys and its set of
 * live receiver indices in step with the dispatcher (pywg_screen_set_mac1_keys,
 * pywg_screen_index). Counters are per verdict, read at scrape time. Thread-safe: one
 * mutex guards the keys and the index set; the counters are atomic.
 *
 * This header is also the cffi cdef (preprocessor lines dropped).
 */
#ifndef PYWG_SCREEN_H
#define PYWG_SCREEN_H

#include <stddef.h>
#include <stdint.h>

enum {
    PYWG_SCREEN_PASS = 0,          /* WireGuard for the engine */
    PYWG_SCREEN_STUN = 1,          /* magic cookie 0x2112A442 at offset 4: the STUN handler's */
    PYWG_SCREEN_DISCO = 2,         /* "TS" U+1F4AC: the disco handler's */
    /* The drops (DropReason in pywg/protocol/actions.py, the names every receive path uses:
     * the demux's verdict first, then the engine's length check). */
    PYWG_SCREEN_UNKNOWN_PROTOCOL = 3, /* dropped: not WireGuard (types 1-4), STUN nor disco */
    PYWG_SCREEN_BAD_SIZE = 4,         /* dropped: the wrong length for its WireGuard type */
    PYWG_SCREEN_BAD_MAC1 = 5,         /* dropped: a handshake message not for our keys */
    PYWG_SCREEN_UNKNOWN_INDEX = 6,    /* dropped: a receiver index we never gave out */
    PYWG_SCREEN_VERDICTS = 7,
    PYWG_SCREEN_FIRST_DROP = 3, /* verdicts from here on are drops (the first: UNKNOWN_PROTOCOL) */
};

enum {
    PYWG_SCREEN_INDEX_FREE = 0,    /* pywg_screen_index: the index was freed */
    PYWG_SCREEN_INDEX_PENDING = 1, /* given to a handshake (responses, cookie replies) */
    PYWG_SCREEN_INDEX_SESSION = 2, /* bound to a keypair (transport too) */
};

typedef struct pywg_screen pywg_screen;

pywg_screen *pywg_screen_new(void);
void pywg_screen_free(pywg_screen *screen);

/* The mac1 keys (HASH(LABEL_MAC1 || static public), 32 bytes each) of our static key and,
 * during a rotation's overlap, of the secondary one; NULL for none. Without a primary key,
 * handshake messages pass (the engine drops them: it has no private key). */
void pywg_screen_set_mac1_keys(pywg_screen *screen, const uint8_t *primary, const uint8_t *secondary);

/* Record an index's state (a PYWG_SCREEN_INDEX_* value). 0, or -1 if out of memory. */
int pywg_screen_index(pywg_screen *screen, uint32_t index, int state);

/* Forget every index (the engine was replaced). */
void pywg_screen_clear_indices(pywg_screen *screen);

/* The verdict on one datagram (not counted). */
int pywg_screen_verdict(pywg_screen *screen, const uint8_t *data, size_t len);

/* The verdict on a UDP_GRO run of len bytes in segments of `segment` bytes (the last maybe
 * shorter): a drop verdict (that of the first segment) only if every segment is dropped,
 * else PYWG_SCREEN_PASS (the engine takes the run). Not counted. */
int pywg_screen_run_verdict(pywg_screen *screen, const uint8_t *data, size_t len, size_t segment);

/* Count a datagram dropped with this verdict (`n` of them). */
void pywg_screen_count(pywg_screen *screen, int verdict, uint64_t n);

/* Count each datagram of a UDP_GRO run (as pywg_screen_run_verdict takes it) under its own
 * verdict, as Python's data path would one by one (passes are not counted). */
void pywg_screen_count_run(pywg_screen *screen, const uint8_t *data, size_t len, size_t segment);

/* The drops counted per verdict since the screen was made (out: PYWG_SCREEN_VERDICTS). */
void pywg_screen_counts(pywg_screen *screen, uint64_t *out);

/* BLAKE2s (RFC 7693) with a key of 0 to 32 bytes, out of 1 to 32 bytes. */
void pywg_blake2s(uint8_t *out, size_t outlen, const uint8_t *key, size_t keylen, const uint8_t *in,
                  size_t inlen);

#endif
