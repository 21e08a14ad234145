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
    PYWG_HOP_BUFFER = 65600,
    PYWG_HOP_MAX_SOCKETS = 4,  /* UDP sockets pywg_hop_in_wait watches */ /* the size of the buffers callers pass */
};

enum {
    PYWG_HOP_EMPTY = 0,    /* nothing (more) to read */
    PYWG_HOP_HANDLED = 1,  /* carried in C: account for it (inbound: slot, index, length,
                              carried; outbound: the groups in sent) */
    PYWG_HOP_PYTHON = 2,   /* for Python: buf[0:length] (a datagram or a TUN frame; a TUN
                              frame leaves the TUN lock held: send it, then unlock) */
    PYWG_HOP_ERROR = 3,    /* the read failed: err */
    PYWG_HOP_BUSY = 4,     /* a turn not taken: another thread holds the TUN lock */
    PYWG_HOP_NONE = 5,     /* a turn not taken: nothing was written to the TUN */
};

enum {
    PYWG_HOP_LOCK_HELD = 0, /* the caller holds the TUN lock (and keeps it) */
    PYWG_HOP_LOCK_WAIT = 1, /* take it, waiting */
    PYWG_HOP_LOCK_TRY = 2,  /* take it if free (else PYWG_HOP_BUSY) */
};

enum {
    PYWG_HOP_GROUPS = 8,    /* sessions one call may send on */
    PYWG_HOP_TURN_MAX = 8,  /* frames a turn sends at most */
};

typedef struct pywg_hop pywg_hop;

/* Packets sent on one session in one call. */
typedef struct {
    int32_t slot;
    uint32_t index;        /* the peer's receiver index (names the session) */
    uint32_t packets;
    uint32_t wire;         /* bytes on the wire */
    int32_t err;           /* errno of a failed send (0: none) */
    int64_t at_ns;         /* CLOCK_MONOTONIC just before the last packet was sealed (so no
                              later than it left): the engine's timers take it as sent then,
                              whenever Python accounts for it */
} pywg_hop_group;

/* Transport messages delivered on one session in one call. */
typedef struct {
    int32_t slot;
    uint32_t index;        /* our receiver index (names the session) */
    uint32_t datagrams;    /* messages opened */
    uint32_t wire;         /* bytes on the wire */
    uint32_t carried;      /* 1 if IP packets (not only keepalives) */
    uint32_t frames;       /* TUN writes */
    int64_t at_ns;         /* CLOCK_MONOTONIC just after the last message was read (so no
                              earlier than it arrived): the engine's timers take it as
                              received then, whenever Python accounts for it */
} pywg_hop_delivery;

typedef struct {
    int32_t kind;          /* PYWG_HOP_* */
    int32_t err;           /* errno (PYWG_HOP_ERROR), or of a failed TUN write (inbound) */
    uint32_t length;       /* PYTHON: bytes in buf */
    uint32_t segment;      /* PYTHON, inbound: the UDP GRO segment size (0: one datagram) */
    uint32_t source_len;   /* inbound PYTHON: the datagram's source (a sockaddr) */
    uint8_t source[28];
    int32_t turn;          /* inbound: the turn's kind (PYWG_HOP_*: NONE, BUSY, EMPTY, HANDLED
                              (TURN_MAX sent), PYTHON (a frame in turn_buf), ERROR) */
    uint32_t turn_length;  /* PYTHON: bytes in turn_buf */
    int32_t turn_err;
    uint32_t nsent;        /* what was sent, by session */
    pywg_hop_group sent[8];
    uint32_t reads;        /* inbound: datagrams read (a GRO read counts once) */
    uint32_t backlog;      /* inbound, when reads: handshake messages waiting in the backlog */
    int32_t woken;         /* *_wait: the wake descriptor was readable (drain it) */
    int32_t sock;          /* pywg_hop_in_wait: which socket was read */
    uint32_t nreceived;    /* inbound: what was delivered, by session */
    pywg_hop_delivery received[8];
} pywg_hop_result;

/* A hop sealing with this backend (PYWG_FP_*), for a TUN with (1) or without (0) virtio-net
 * headers. NULL when out of memory. */
pywg_hop *pywg_hop_new(int backend, int vnet_hdr);
/* Wipes the keys and frees. */
void pywg_hop_free(pywg_hop *hop);
/* Whether packets the hop sends to one address in one call leave in one UDP GSO send
 * (UDP_SEGMENT; off by default, and off by itself when the kernel refuses it). */
void pywg_hop_set_gso(pywg_hop *hop, int on);
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

/* Screen what the hop would hand back (native/screen.h): datagrams that cannot be ours are
 * dropped and counted in C, never reaching Python. NULL: none (the default). The hop does
 * not own the screen: free it after the hop. */
struct pywg_screen;
void pywg_hop_set_screen(pywg_hop *hop, struct pywg_screen *screen);

/* Packets lost because the TUN's queue was full (a write refused with EAGAIN), so far. */
uint64_t pywg_hop_tun_full(pywg_hop *hop);

/* The handshake backlog: a handshake message (types 1-3 at their sizes, past the screen)
 * that pywg_hop_in reads is queued here and the read goes on, rather than being handed
 * back at once, so that a flood of them never keeps the inbound thread from reading its
 * sockets (transport packets behind them would be lost in a full socket buffer). The
 * inbound thread takes them at its pace; a full backlog still takes a message from the
 * address of a peer the hop is armed for into a small lane of its own (taken first: a peer
 * that lost its session among a flood from other addresses), and drops the rest, counted.
 * The backlog is the
 * inbound thread's: only it calls pywg_hop_in and these. */
enum {
    PYWG_HOP_BACKLOG = 1024,       /* handshake messages waiting, at most */
    PYWG_HOP_BACKLOG_KNOWN = 64,   /* and beyond, from the addresses of known peers (taken first) */
    PYWG_HOP_BACKLOG_MESSAGE = 148, /* the largest handshake message (an initiation) */
    PYWG_HOP_SOCKADDR = 28,        /* a sockaddr_in6 */
};
/* Handshake messages waiting in the backlog (both lanes). */
uint32_t pywg_hop_backlog_count(pywg_hop *hop);
/* Takes the oldest: its length (its bytes in buf, size >= PYWG_HOP_BACKLOG_MESSAGE, its
 * source in source[0:*source_len], room PYWG_HOP_SOCKADDR), or -1 when the backlog is empty. */
int pywg_hop_backlog_take(pywg_hop *hop, uint8_t *buf, size_t size, uint8_t *source, uint32_t *source_len);
/* Handshake messages dropped because the backlog was full, so far. */
uint64_t pywg_hop_backlog_full(pywg_hop *hop);

/* The TUN lock: wait = 1 blocks, 0 tries. Returns 1 when taken. */
int pywg_hop_tun_lock(pywg_hop *hop, int wait);
void pywg_hop_tun_unlock(pywg_hop *hop);

/* Outbound: reads frames from tun_fd (non-blocking) into buf (size >= PYWG_HOP_BUFFER) and
 * sends the lone packets of armed sessions, until the TUN is empty (EMPTY), max frames were
 * sent (HANDLED), or a frame is Python's (PYTHON). The TUN lock as lock says; taken here,
 * it is released unless the result is PYTHON. Accounts in r->sent whatever the result. */
int pywg_hop_pump(pywg_hop *hop, int tun_fd, uint8_t *buf, size_t size, int lock, uint32_t max,
                  pywg_hop_result *r);

/* pywg_hop_pump with PYWG_HOP_LOCK_WAIT, and when the TUN is empty, a wait of up to
 * timeout_ms for it or for wake_fd (r->woken), then one more pump: a packet that wakes the
 * thread is sent before any Python runs. */
int pywg_hop_pump_wait(pywg_hop *hop, int tun_fd, int wake_fd, int timeout_ms, uint8_t *buf, size_t size,
                       uint32_t max, pywg_hop_result *r);

/* Inbound: receives up to max datagrams from sock_fd (non-blocking; a UDP GRO read is one
 * datagram of many messages) into buf, and carries each to the TUN when it is a lone
 * transport message of an armed session, or a run of them as a sender seals it (one
 * session, consecutive counters, all fresh and valid, one allowed source: opened, TCP
 * segments coalesced, written; with a vnet TUN), accounting in r->received. Stops at the
 * first datagram that is Python's (PYTHON: buf[0:length], its source and segment size in
 * r), when the socket is empty or after max. After TUN writes, with turn = 1, takes a turn
 * at the TUN into turn_buf (a pump with PYWG_HOP_LOCK_TRY and PYWG_HOP_TURN_MAX; r->turn is
 * its kind). Returns kind: HANDLED, PYTHON (deliveries may precede it), EMPTY or ERROR. */
int pywg_hop_in(pywg_hop *hop, int sock_fd, int tun_fd, uint8_t *buf, size_t size,
                uint8_t *turn_buf, size_t turn_size, int turn, uint32_t max, pywg_hop_result *r);

/* The replay filter (RFC 6479 as the kernel's, the algorithm of ReplayFilter): 1 and the
 * counter recorded if it is fresh, else 0. For the tests, against the kernel's vectors. */
int pywg_hop_replay_validate(uint64_t *greatest, uint64_t *bitmap, uint64_t counter);

/* For the differential tests against the engine: the slot the routes give an address (4 or
 * 16 bytes, big endian, by family 4 or 6; -1 for none), as the hop routes a packet, and the
 * length of the inner packet the hop accepts (-1: not an IPv4/IPv6 packet it would carry). */
int pywg_hop_route_lookup(pywg_hop *hop, int family, const uint8_t *address);
long pywg_hop_inner_length(const uint8_t *p, size_t len);

/* A wait of up to timeout_ms for one of nsocks (<= PYWG_HOP_MAX_SOCKETS) UDP sockets or
 * wake_fd (r->woken), then pywg_hop_in on the first socket ready (r->sock): a datagram
 * that wakes the thread is carried before any Python runs. EMPTY when none was ready. */
int pywg_hop_in_wait(pywg_hop *hop, const int *socks, int nsocks, int wake_fd, int timeout_ms, int tun_fd,
                     uint8_t *buf, size_t size, uint8_t *turn_buf, size_t turn_size, int turn, uint32_t max,
                     pywg_hop_result *r);

#endif
