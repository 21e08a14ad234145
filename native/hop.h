/* pywg._fastpath, the lone-packet hop: one packet's whole way through the daemon in one C
 * call, for the packets whose latency matters (a ping, a TCP ACK, a DNS query).
 *
 * Outbound: TUN read -> route (allowed IPs) -> seal -> sendto. Inbound: recvmsg -> open ->
 * replay filter -> inner packet and source checks -> TUN write, then a turn at the TUN
 * (what the kernel answered, sent the same way). Python's engine stays the authority: it
 * "arms" the hop with what one packet needs (a send key and a block of counters it has
 * reserved; a receive key with the replay filter handed over), and accounts for every
 * packet the hop carried right after the call (timers, byte counts). Anything the hop
 * does not handle (a batch, a super-packet, a handshake, an unknown session, an address
 * that roamed, a packet that fails a check) is handed back to Python untouched, where the
 * ordinary data path treats it and counts drops as always.
 *
 * Locking: one mutex guards the armed state (taken by the call and by Python's arming,
 * from any thread); a second one, the TUN lock, is held from a TUN read until what it read
 * is sent, so that packets leave in the order the kernel queued them whichever thread read
 * them. Every call releases the GIL (cffi API mode).
 *
 * This header is also the cffi cdef (preprocessor lines dropped).
 */
#ifndef PYWG_HOP_H
#define PYWG_HOP_H

#include <stddef.h>
#include <stdint.h>

enum {
    PYWG_HOP_MAX_SLOTS = 256,  /* peers the hop knows (a slot per peer) */
    PYWG_HOP_MAX_RECEIVE = 64, /* receive sessions armed at once */
    PYWG_HOP_REPLAY_WORDS = 128, /* the replay bitmap: 8192 bits, as ReplayFilter */
    PYWG_HOP_BUFFER = 65600, /* the size of the buffers callers pass */
};

enum {
    PYWG_HOP_EMPTY = 0,    /* nothing to read */
    PYWG_HOP_HANDLED = 1,  /* carried in C: account for it (slot, index, wire, carried) */
    PYWG_HOP_PYTHON = 2,   /* for Python: buf[0:length] (a datagram or a TUN frame) */
    PYWG_HOP_ERROR = 3,    /* the read failed: err */
};

enum {
    PYWG_TURN_NONE = 0,    /* not taken (no TUN write, or the other thread holds the TUN) */
    PYWG_TURN_EMPTY = 1,   /* the TUN had nothing */
    PYWG_TURN_SENT = 2,    /* a lone packet sent: account for it (turn_slot, ...) */
    PYWG_TURN_PYTHON = 3,  /* a frame for Python in turn_buf[0:turn_length]; the TUN lock is
                              still held: release it with pywg_hop_tun_unlock when it is sent */
};

typedef struct pywg_hop pywg_hop;

typedef struct {
    int32_t kind;          /* PYWG_HOP_* */
    int32_t err;           /* errno (PYWG_HOP_ERROR), or of a failed send/TUN write (0: none) */
    int32_t slot;          /* HANDLED: the peer's slot */
    uint32_t index;        /* HANDLED: the receiver index in the message (inbound: ours,
                              outbound: the peer's) */
    uint32_t length;       /* PYTHON: bytes in buf; HANDLED: the wire bytes */
    uint32_t segment;      /* PYTHON, inbound: the UDP GRO segment size (0: one datagram) */
    uint32_t carried;      /* HANDLED, inbound: 1 if an IP packet (not a keepalive) */
    uint32_t source_len;   /* inbound: the datagram's source (a sockaddr) */
    uint8_t source[28];
    int32_t turn;          /* PYWG_TURN_* */
    int32_t turn_slot;
    uint32_t turn_index;
    uint32_t turn_length;  /* SENT: wire bytes; PYTHON: bytes in turn_buf */
    int32_t turn_err;      /* a failed send (0: none) */
} pywg_hop_result;

/* A hop sealing with this backend (PYWG_FP_*), for a TUN with (1) or without (0) virtio-net
 * headers. NULL when out of memory. */
pywg_hop *pywg_hop_new(int backend, int vnet_hdr);
/* Wipes the keys and frees. */
void pywg_hop_free(pywg_hop *hop);
/* The MTU used to pad sealed packets (0: no padding cap), as the engine's. */
void pywg_hop_set_mtu(pywg_hop *hop, uint32_t mtu);

/* Replaces the allowed-IPs runs of one family (4 or 6): n run starts, big endian (4 or 16
 * bytes each, ascending, the first 0), and the slot answering for each run (-1: none).
 * Returns 0, or -1 if they are not ascending / n is 0 / out of memory. */
int pywg_hop_set_routes(pywg_hop *hop, int family, size_t n, const uint8_t *starts,
                        const int32_t *slots);

/* Arms slot for sending: counters [first, first + count) reserved by the engine on the
 * session (key, the peer's receiver index), usable until CLOCK_MONOTONIC reaches until_ns;
 * datagrams go to sockaddr[0:addrlen] through socket fd. */
int pywg_hop_arm_send(pywg_hop *hop, int slot, const uint8_t *key, uint32_t remote_index,
                      uint64_t first, uint64_t count, int64_t until_ns, int fd,
                      const uint8_t *sockaddr, uint32_t addrlen);
/* Counters the slot has left (0 when unarmed). */
uint64_t pywg_hop_send_left(pywg_hop *hop, int slot);
/* Takes the slot's send state away (the engine reserved counters past the block). */
void pywg_hop_revoke_send(pywg_hop *hop, int slot);

/* Arms the receive session with our index local_index for slot: its key, the replay
 * filter's state handed over (greatest: one more than the highest counter accepted,
 * 0 = none; bitmap: PYWG_HOP_REPLAY_WORDS words), usable until until_ns, for datagrams
 * from sockaddr[0:addrlen] only. Returns 0, or -1 when PYWG_HOP_MAX_RECEIVE are armed. */
int pywg_hop_arm_receive(pywg_hop *hop, int slot, uint32_t local_index, const uint8_t *key,
                         int64_t until_ns, uint64_t greatest, const uint64_t *bitmap,
                         const uint8_t *sockaddr, uint32_t addrlen);
/* Takes a receive session back: 1 and its replay state in greatest/bitmap (the key wiped),
 * or 0 if local_index was not armed. */
int pywg_hop_reclaim(pywg_hop *hop, uint32_t local_index, uint64_t *greatest, uint64_t *bitmap);
/* Revokes every send slot and stops using every receive session (they stay armed for
 * pywg_hop_reclaim, which hands back their replay state). Any thread. */
void pywg_hop_disable(pywg_hop *hop);

/* The TUN lock: wait = 1 blocks, 0 tries. Returns 1 when taken. */
int pywg_hop_tun_lock(pywg_hop *hop, int wait);
void pywg_hop_tun_unlock(pywg_hop *hop);

/* Outbound: takes the TUN lock and reads one frame from tun_fd (non-blocking) into buf
 * (size >= PYWG_HOP_BUFFER). EMPTY, HANDLED and ERROR release the TUN lock; PYTHON keeps it
 * held (the caller reads on, sends, then calls pywg_hop_tun_unlock). */
int pywg_hop_out(pywg_hop *hop, int tun_fd, uint8_t *buf, size_t size, pywg_hop_result *r);

/* Inbound: receives one datagram (UDP GRO: possibly many) from sock_fd (non-blocking) into
 * buf and carries it to the TUN when it is a lone transport message of an armed session.
 * After a TUN write, with turn = 1, takes a turn at the TUN into turn_buf. Returns kind. */
int pywg_hop_in(pywg_hop *hop, int sock_fd, int tun_fd, uint8_t *buf, size_t size,
                uint8_t *turn_buf, size_t turn_size, int turn, pywg_hop_result *r);

/* The replay filter (RFC 6479 as the kernel's, the algorithm of ReplayFilter): 1 and the
 * counter recorded if it is fresh, else 0. For the tests, against the kernel's vectors. */
int pywg_hop_replay_validate(uint64_t *greatest, uint64_t *bitmap, uint64_t counter);

#endif
