/* The lone-packet hop: see hop.h for what it does and why. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastpath.h"
#include "hop.h"
#include "screen.h"
#include "offload.h"

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define GSO_MAX_BYTES 65000 /* a UDP GSO send's payload at most (under 64 KB with headers) */
#define GSO_MAX_SEGMENTS 64

#define VNET_LEN 10
#define RUN_MAX 64 /* datagrams in one UDP_GRO read at most */
#define HEADER_LEN 16
#define OVERHEAD 32
#define KEY_LEN 32
#define MESSAGE_TRANSPORT 4
#define WORDS PYWG_HOP_REPLAY_WORDS
#define WINDOW (WORDS * 64 - 64)
/* REJECT_AFTER_MESSAGES: 2^64 - 1 - WINDOW - 1 */
#define REJECT_AFTER_MESSAGES (UINT64_MAX - WINDOW - 1)

typedef struct {
    int armed;
    uint8_t key[KEY_LEN];
    uint32_t remote_index;
    uint64_t next, end; /* the counters left: [next, end) */
    int64_t until;
    int fd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
} send_slot;

typedef struct {
    int armed;  /* holds a session (and its replay state) until reclaimed */
    int active; /* may be used (pywg_hop_disable clears it) */
    int slot;
    uint32_t index;
    uint8_t key[KEY_LEN];
    int64_t until;
    uint64_t greatest;
    uint64_t bitmap[WORDS];
    struct sockaddr_storage addr;
    socklen_t addrlen;
} receive_entry;

typedef struct {
    size_t n;
    uint8_t *starts; /* n * width bytes, big endian */
    int32_t *slots;
} routes_t;

/* Sealed messages waiting to leave in one UDP GSO send (under the TUN lock): all to one
 * address, all `stride` bytes but maybe the last. */
typedef struct {
    size_t used;
    uint32_t count, stride;
    int closed; /* a shorter message was added: it must be the last */
    int fd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    pywg_hop_group *g;
} send_batch;

typedef struct {
    uint32_t length;
    uint32_t source_len;
    uint8_t source[PYWG_HOP_SOCKADDR];
    uint8_t data[PYWG_HOP_BACKLOG_MESSAGE];
} backlog_entry;

struct pywg_hop {
    pthread_mutex_t mu;  /* the armed state and the routes */
    pthread_mutex_t tun; /* from a TUN read until what it read is sent */
    int backend;
    int vnet;
    uint32_t mtu;
    routes_t routes4, routes6;
    send_slot send[PYWG_HOP_MAX_SLOTS];
    receive_entry receive[PYWG_HOP_MAX_RECEIVE];
    uint8_t plain[VNET_LEN + PYWG_HOP_BUFFER]; /* inbound only: opened packet(s) */
    uint8_t frames[PYWG_HOP_BUFFER + RUN_MAX * VNET_LEN]; /* inbound only: coalesced frames */
    uint8_t sealed[PYWG_HOP_BUFFER];           /* under the TUN lock: sealed messages */
    send_batch batch;                          /* under the TUN lock: what sealed holds */
    int gso;                                   /* send batches with UDP_SEGMENT */
    struct pywg_screen *screen;                /* drops what Python would drop anyway */
    uint64_t tun_full;                         /* (atomic) TUN writes refused, EAGAIN: packets lost */
    backlog_entry backlog[PYWG_HOP_BACKLOG];   /* inbound thread only: handshake messages */
    uint32_t backlog_head, backlog_count;      /* (count: atomic, read by stats) */
    backlog_entry known[PYWG_HOP_BACKLOG_KNOWN]; /* the same, from a peer's address, once full */
    uint32_t known_head, known_count;
    uint64_t backlog_full;                     /* (atomic) dropped: the backlog was full */
};

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* After a failed TUN write: 1 if the TUN's queue was full (the packet is lost, counted as
 * DropReason.TUN_FULL, as Python's writes do), 0 for an error that is the interface's. */
static int tun_full(pywg_hop *hop)
{
    if (errno != EAGAIN && errno != EWOULDBLOCK)
        return 0;
    __atomic_fetch_add(&hop->tun_full, 1, __ATOMIC_RELAXED);
    return 1;
}

static void wipe(void *p, size_t n)
{
    volatile uint8_t *v = p;
    while (n--)
        *v++ = 0;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --- replay filter ------------------------------------------------------------------- */

static int replay_fresh(uint64_t greatest, const uint64_t *bitmap, uint64_t counter)
{
    if (greatest >= REJECT_AFTER_MESSAGES + 1 || counter >= REJECT_AFTER_MESSAGES)
        return 0;
    counter += 1; /* the filter numbers counters from 1 */
    if (counter + WINDOW < greatest)
        return 0;
    if (counter > greatest)
        return 1;
    return !(bitmap[(counter >> 6) & (WORDS - 1)] & (UINT64_C(1) << (counter & 63)));
}

int pywg_hop_replay_validate(uint64_t *greatest, uint64_t *bitmap, uint64_t counter)
{
    if (!replay_fresh(*greatest, bitmap, counter))
        return 0;
    counter += 1;
    uint64_t index = counter >> 6;
    if (counter > *greatest) {
        uint64_t current = *greatest >> 6;
        uint64_t top = index - current < WORDS ? index - current : WORDS;
        for (uint64_t i = 1; i <= top; i++)
            bitmap[(i + current) & (WORDS - 1)] = 0;
        *greatest = counter;
    }
    bitmap[index & (WORDS - 1)] |= UINT64_C(1) << (counter & 63);
    return 1;
}

/* --- inner packets and routes -------------------------------------------------------- */

/* The length the IPv4/IPv6 header claims, or -1 (as pywg.protocol.inner.inner_length). */
static long inner_length(const uint8_t *p, size_t len)
{
    if (len == 0)
        return -1;
    if (p[0] >> 4 == 4 && len >= 20) {
        size_t claimed = (size_t)p[2] << 8 | p[3];
        return claimed >= 20 && claimed <= len ? (long)claimed : -1;
    }
    if (p[0] >> 4 == 6 && len >= 40) {
        size_t claimed = 40 + ((size_t)p[4] << 8 | p[5]);
        return claimed <= len ? (long)claimed : -1;
    }
    return -1;
}

/* The slot answering for an address (width 4 or 16 bytes, big endian), -1 for none.
 * Caller holds mu. */
static int route(const routes_t *r, const uint8_t *address, size_t width)
{
    size_t lo = 0, hi = r->n;
    while (lo < hi) { /* the last run starting at or below address */
        size_t mid = lo + (hi - lo) / 2;
        if (memcmp(r->starts + mid * width, address, width) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo == 0 ? -1 : r->slots[lo - 1];
}

/* Caller holds mu; the packet has passed inner_length. */
static int route_packet(const pywg_hop *hop, const uint8_t *p, int destination)
{
    if (p[0] >> 4 == 4)
        return route(&hop->routes4, p + (destination ? 16 : 12), 4);
    return route(&hop->routes6, p + (destination ? 24 : 8), 16);
}

int pywg_hop_route_lookup(pywg_hop *hop, int family, const uint8_t *address)
{
    pthread_mutex_lock(&hop->mu);
    int slot = family == 4 ? route(&hop->routes4, address, 4) : route(&hop->routes6, address, 16);
    pthread_mutex_unlock(&hop->mu);
    return slot;
}

long pywg_hop_inner_length(const uint8_t *p, size_t len) { return inner_length(p, len); }

/* --- set-up -------------------------------------------------------------------------- */

pywg_hop *pywg_hop_new(int backend, int vnet_hdr)
{
    pywg_hop *hop = calloc(1, sizeof *hop);
    if (hop == NULL)
        return NULL;
    pthread_mutex_init(&hop->mu, NULL);
    pthread_mutex_init(&hop->tun, NULL);
    hop->backend = backend;
    hop->vnet = vnet_hdr;
    return hop;
}

void pywg_hop_free(pywg_hop *hop)
{
    if (hop == NULL)
        return;
    free(hop->routes4.starts);
    free(hop->routes4.slots);
    free(hop->routes6.starts);
    free(hop->routes6.slots);
    pthread_mutex_destroy(&hop->mu);
    pthread_mutex_destroy(&hop->tun);
    wipe(hop, sizeof *hop);
    free(hop);
}

void pywg_hop_set_gso(pywg_hop *hop, int on)
{
    pthread_mutex_lock(&hop->tun);
    hop->gso = on;
    pthread_mutex_unlock(&hop->tun);
}

void pywg_hop_set_mtu(pywg_hop *hop, uint32_t mtu)
{
    pthread_mutex_lock(&hop->mu);
    hop->mtu = mtu;
    pthread_mutex_unlock(&hop->mu);
}

int pywg_hop_set_routes(pywg_hop *hop, int family, size_t n, const uint8_t *starts,
                        const int32_t *slots)
{
    size_t width = family == 4 ? 4 : 16;
    if ((family != 4 && family != 6) || n == 0 || n > SIZE_MAX / 16)
        return -1;
    for (size_t i = 1; i < n; i++)
        if (memcmp(starts + (i - 1) * width, starts + i * width, width) >= 0)
            return -1;
    routes_t fresh = {n, malloc(n * width), malloc(n * sizeof(int32_t))};
    if (fresh.starts == NULL || fresh.slots == NULL) {
        free(fresh.starts);
        free(fresh.slots);
        return -1;
    }
    memcpy(fresh.starts, starts, n * width);
    memcpy(fresh.slots, slots, n * sizeof(int32_t));
    pthread_mutex_lock(&hop->mu);
    routes_t *r = family == 4 ? &hop->routes4 : &hop->routes6;
    routes_t old = *r;
    *r = fresh;
    pthread_mutex_unlock(&hop->mu);
    free(old.starts);
    free(old.slots);
    return 0;
}

int pywg_hop_arm_send(pywg_hop *hop, int slot, const uint8_t *key, uint32_t remote_index,
                      uint64_t first, uint64_t count, int64_t until_ns, int fd,
                      const uint8_t *sockaddr, uint32_t addrlen)
{
    if (slot < 0 || slot >= PYWG_HOP_MAX_SLOTS || addrlen > sizeof(struct sockaddr_storage)
        || first + count < first)
        return -1;
    pthread_mutex_lock(&hop->mu);
    send_slot *s = &hop->send[slot];
    memcpy(s->key, key, KEY_LEN);
    s->remote_index = remote_index;
    s->next = first;
    s->end = first + count;
    s->until = until_ns;
    s->fd = fd;
    memset(&s->addr, 0, sizeof s->addr);
    memcpy(&s->addr, sockaddr, addrlen);
    s->addrlen = addrlen;
    s->armed = 1;
    pthread_mutex_unlock(&hop->mu);
    return 0;
}

uint64_t pywg_hop_send_left(pywg_hop *hop, int slot)
{
    if (slot < 0 || slot >= PYWG_HOP_MAX_SLOTS)
        return 0;
    pthread_mutex_lock(&hop->mu);
    const send_slot *s = &hop->send[slot];
    uint64_t left = s->armed ? s->end - s->next : 0;
    pthread_mutex_unlock(&hop->mu);
    return left;
}

static void revoke_slot(send_slot *s)
{
    s->armed = 0;
    s->next = s->end = 0;
    wipe(s->key, KEY_LEN);
}

void pywg_hop_revoke_send(pywg_hop *hop, int slot)
{
    if (slot < 0 || slot >= PYWG_HOP_MAX_SLOTS)
        return;
    pthread_mutex_lock(&hop->mu);
    revoke_slot(&hop->send[slot]);
    pthread_mutex_unlock(&hop->mu);
}

/* Caller holds mu. */
static receive_entry *find_receive(pywg_hop *hop, uint32_t index)
{
    for (int i = 0; i < PYWG_HOP_MAX_RECEIVE; i++)
        if (hop->receive[i].armed && hop->receive[i].index == index)
            return &hop->receive[i];
    return NULL;
}

int pywg_hop_arm_receive(pywg_hop *hop, int slot, uint32_t local_index, const uint8_t *key,
                         int64_t until_ns, uint64_t greatest, const uint64_t *bitmap,
                         const uint8_t *sockaddr, uint32_t addrlen)
{
    if (addrlen > sizeof(struct sockaddr_storage))
        return -1;
    pthread_mutex_lock(&hop->mu);
    receive_entry *e = find_receive(hop, local_index);
    for (int i = 0; e == NULL && i < PYWG_HOP_MAX_RECEIVE; i++)
        if (!hop->receive[i].armed)
            e = &hop->receive[i];
    if (e == NULL) {
        pthread_mutex_unlock(&hop->mu);
        return -1;
    }
    e->slot = slot;
    e->index = local_index;
    memcpy(e->key, key, KEY_LEN);
    e->until = until_ns;
    e->greatest = greatest;
    memcpy(e->bitmap, bitmap, sizeof e->bitmap);
    memset(&e->addr, 0, sizeof e->addr);
    memcpy(&e->addr, sockaddr, addrlen);
    e->addrlen = addrlen;
    e->armed = e->active = 1;
    pthread_mutex_unlock(&hop->mu);
    return 0;
}

int pywg_hop_reclaim(pywg_hop *hop, uint32_t local_index, uint64_t *greatest, uint64_t *bitmap)
{
    pthread_mutex_lock(&hop->mu);
    receive_entry *e = find_receive(hop, local_index);
    if (e != NULL) {
        *greatest = e->greatest;
        memcpy(bitmap, e->bitmap, sizeof e->bitmap);
        wipe(e, sizeof *e);
    }
    pthread_mutex_unlock(&hop->mu);
    return e != NULL;
}

void pywg_hop_disable(pywg_hop *hop)
{
    pthread_mutex_lock(&hop->mu);
    for (int i = 0; i < PYWG_HOP_MAX_SLOTS; i++)
        revoke_slot(&hop->send[i]);
    for (int i = 0; i < PYWG_HOP_MAX_RECEIVE; i++)
        hop->receive[i].active = 0;
    pthread_mutex_unlock(&hop->mu);
}

int pywg_hop_tun_lock(pywg_hop *hop, int wait)
{
    if (wait)
        return pthread_mutex_lock(&hop->tun) == 0;
    return pthread_mutex_trylock(&hop->tun) == 0;
}

void pywg_hop_tun_unlock(pywg_hop *hop)
{
    pthread_mutex_unlock(&hop->tun);
}

/* --- the hops ------------------------------------------------------------------------ */

/* Sends what the batch holds: one UDP GSO send (or, refused, one datagram at a time, and no
 * GSO from then on). Caller holds the TUN lock. */
static void flush(pywg_hop *hop)
{
    send_batch *b = &hop->batch;
    if (b->count == 0)
        return;
    if (b->count > 1 && hop->gso) {
        union {
            struct cmsghdr align;
            uint8_t space[CMSG_SPACE(sizeof(uint16_t))];
        } control;
        memset(&control, 0, sizeof control);
        struct iovec iov = {hop->sealed, b->used};
        struct msghdr m = {.msg_name = &b->addr, .msg_namelen = b->addrlen, .msg_iov = &iov, .msg_iovlen = 1,
                           .msg_control = control.space, .msg_controllen = sizeof control.space};
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        uint16_t segment = (uint16_t)b->stride;
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof segment);
        memcpy(CMSG_DATA(c), &segment, sizeof segment);
        int err = sendmsg(b->fd, &m, MSG_DONTWAIT) < 0 ? errno : 0;
        if (err == EIO || err == EINVAL || err == EOPNOTSUPP || err == EMSGSIZE) {
            hop->gso = 0; /* the kernel refuses: one datagram at a time below */
        } else {
            if (err)
                b->g->err = err;
            b->count = 0;
            b->used = 0;
            return;
        }
    }
    for (size_t off = 0; off < b->used; off += b->stride) {
        size_t len = b->used - off < b->stride ? b->used - off : b->stride;
        if (sendto(b->fd, hop->sealed + off, len, MSG_DONTWAIT, (struct sockaddr *)&b->addr, b->addrlen) < 0)
            b->g->err = errno;
    }
    b->count = 0;
    b->used = 0;
}

/* A frame read from the TUN, sealed and sent if it is a lone IP packet routed to an armed
 * slot with a group free in r->sent for it: 1 (accounted there), else 0 (untouched, for
 * Python). Caller holds the TUN lock (hop->sealed is used). */
static int send_lone(pywg_hop *hop, uint8_t *frame, size_t len, pywg_hop_result *r)
{
    int needs_csum = 0; /* a checksum the kernel left us to finish at csum_at */
    size_t csum_at = 0, csum_start = 0;
    if (hop->vnet) { /* no segmentation asked for; at most a checksum to finish */
        if (len < VNET_LEN || frame[1] != VNET_GSO_NONE || (frame[0] & ~VNET_F_NEEDS_CSUM) != 0)
            return 0;
        if (frame[0] & VNET_F_NEEDS_CSUM) {
            needs_csum = 1;
            csum_start = (size_t)frame[6] | (size_t)frame[7] << 8;
            csum_at = csum_start + ((size_t)frame[8] | (size_t)frame[9] << 8);
            if (csum_at + 2 > len - VNET_LEN)
                return 0;
        }
        frame += VNET_LEN;
        len -= VNET_LEN;
    }
    if (len > 65535 || inner_length(frame, len) < 0)
        return 0;
    uint8_t key[KEY_LEN];
    struct sockaddr_storage addr;
    pthread_mutex_lock(&hop->mu);
    int slot = route_packet(hop, frame, 1);
    send_slot *s = slot >= 0 && slot < PYWG_HOP_MAX_SLOTS ? &hop->send[slot] : NULL;
    pywg_hop_group *g = NULL;
    if (s != NULL && s->armed) {
        for (uint32_t i = 0; i < r->nsent && g == NULL; i++)
            if (r->sent[i].slot == slot && r->sent[i].index == s->remote_index)
                g = &r->sent[i];
        if (g == NULL && r->nsent < PYWG_HOP_GROUPS) {
            g = &r->sent[r->nsent];
            memset(g, 0, sizeof *g);
            g->slot = slot;
            g->index = s->remote_index;
        }
    }
    int64_t at = now_ns(); /* before it leaves (pywg_hop_group.at_ns) */
    if (g == NULL || s->next >= s->end || at >= s->until) {
        pthread_mutex_unlock(&hop->mu);
        return 0;
    }
    if (g == &r->sent[r->nsent])
        r->nsent++;
    uint64_t counter = s->next++;
    memcpy(key, s->key, KEY_LEN);
    uint32_t remote_index = s->remote_index;
    int fd = s->fd;
    memcpy(&addr, &s->addr, sizeof addr);
    socklen_t addrlen = s->addrlen;
    uint32_t mtu = hop->mtu;
    pthread_mutex_unlock(&hop->mu);

    if (needs_csum) { /* as pywg_split: the field holds the pseudo-header sum */
        uint16_t sum = pywg_checksum(frame + csum_start, len - csum_start, 0);
        if (sum == 0 && csum_at - csum_start == 6)
            sum = 0xffff; /* UDP: 0 would mean "no checksum" */
        frame[csum_at] = (uint8_t)(sum >> 8);
        frame[csum_at + 1] = (uint8_t)sum;
    }
    /* joins the batch when it goes the same way and is no longer than its messages */
    send_batch *b = &hop->batch;
    uint64_t wire = OVERHEAD + pywg_fp_padded_len(len, mtu);
    if (b->count > 0 && !(hop->gso && !b->closed && b->g == g && b->fd == fd && b->addrlen == addrlen
                          && memcmp(&b->addr, &addr, addrlen) == 0 && wire <= b->stride
                          && b->used + wire <= GSO_MAX_BYTES && b->count < GSO_MAX_SEGMENTS))
        flush(hop);
    size_t in_off = 0, out_off = 0;
    uint32_t in_len = (uint32_t)len, out_len = 0;
    int rc = pywg_fp_seal_batch(hop->backend, key, remote_index, counter, 1, frame, len, &in_off,
                                &in_len, mtu, hop->sealed + b->used, sizeof hop->sealed - b->used,
                                &out_off, &out_len);
    wipe(key, KEY_LEN);
    if (rc != PYWG_FP_OK)
        return 0; /* (a counter skipped: harmless) */
    if (b->count == 0) {
        b->stride = out_len;
        b->closed = 0;
        b->fd = fd;
        memcpy(&b->addr, &addr, sizeof addr);
        b->addrlen = addrlen;
        b->g = g;
    }
    b->closed |= out_len < b->stride;
    b->used += out_len;
    b->count++;
    g->packets++;
    g->wire += out_len;
    g->at_ns = at;
    return 1;
}

/* Reads the TUN and sends lone packets until it is empty, max frames were sent, or a frame
 * is Python's. See hop.h. */
static int pump(pywg_hop *hop, int tun_fd, uint8_t *buf, size_t size, int lock, uint32_t max,
                uint32_t *length, int32_t *err, pywg_hop_result *r)
{
    if (lock == PYWG_HOP_LOCK_WAIT)
        pthread_mutex_lock(&hop->tun);
    else if (lock == PYWG_HOP_LOCK_TRY && pthread_mutex_trylock(&hop->tun) != 0)
        return PYWG_HOP_BUSY;
    int kind = PYWG_HOP_HANDLED;
    for (uint32_t i = 0; i < max; i++) {
        ssize_t n = read(tun_fd, buf, size);
        if (n < 0) {
            int e = errno;
            *err = e == EAGAIN || e == EWOULDBLOCK ? 0 : e;
            kind = *err ? PYWG_HOP_ERROR : PYWG_HOP_EMPTY;
            break;
        }
        if (!send_lone(hop, buf, (size_t)n, r)) {
            flush(hop); /* before Python sends anything: the order is kept */
            *length = (uint32_t)n;
            return PYWG_HOP_PYTHON; /* the TUN lock stays held */
        }
    }
    flush(hop);
    if (lock != PYWG_HOP_LOCK_HELD)
        pthread_mutex_unlock(&hop->tun);
    return kind;
}

int pywg_hop_pump(pywg_hop *hop, int tun_fd, uint8_t *buf, size_t size, int lock, uint32_t max,
                  pywg_hop_result *r)
{
    memset(r, 0, sizeof *r);
    return r->kind = pump(hop, tun_fd, buf, size, lock, max, &r->length, &r->err, r);
}

int pywg_hop_pump_wait(pywg_hop *hop, int tun_fd, int wake_fd, int timeout_ms, uint8_t *buf, size_t size,
                       uint32_t max, pywg_hop_result *r)
{
    int kind = pywg_hop_pump(hop, tun_fd, buf, size, PYWG_HOP_LOCK_WAIT, max, r);
    if (kind != PYWG_HOP_EMPTY || r->nsent > 0)
        return kind;
    struct pollfd p[2] = {{.fd = tun_fd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
    if (poll(p, 2, timeout_ms) <= 0 || !(p[0].revents & (POLLIN | POLLERR | POLLHUP))) {
        r->woken = (p[1].revents & POLLIN) != 0;
        return kind;
    }
    kind = pywg_hop_pump(hop, tun_fd, buf, size, PYWG_HOP_LOCK_WAIT, max, r);
    r->woken = (p[1].revents & POLLIN) != 0;
    return kind;
}

static int same_source(const struct sockaddr_storage *want, const uint8_t *got, socklen_t len)
{
    const struct sockaddr *w = (const struct sockaddr *)want;
    struct sockaddr_storage g;
    memset(&g, 0, sizeof g);
    memcpy(&g, got, len < sizeof g ? len : sizeof g);
    if (w->sa_family != g.ss_family)
        return 0;
    if (w->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)want, *b = (const void *)&g;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    if (w->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const void *)want, *b = (const void *)&g;
        return a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, 16) == 0;
    }
    return 0;
}

/* The group in r->received that accounts for session (slot, index), NULL when all are
 * taken by others. */
static pywg_hop_delivery *delivery_group(pywg_hop_result *r, int slot, uint32_t index)
{
    for (uint32_t i = 0; i < r->nreceived; i++)
        if (r->received[i].slot == slot && r->received[i].index == index)
            return &r->received[i];
    if (r->nreceived == PYWG_HOP_GROUPS)
        return NULL;
    pywg_hop_delivery *g = &r->received[r->nreceived++];
    memset(g, 0, sizeof *g);
    g->slot = slot;
    g->index = index;
    return g;
}

/* A UDP_GRO read of n bytes (segments of `segment` bytes, the last maybe shorter) carried
 * to the TUN when it is what a sender's run looks like: every datagram a transport message
 * to one armed session from its source, counters consecutive and all newer than the
 * filter has seen, every tag valid, every inner packet IP from an address the peer may
 * use. Opened, coalesced (TCP segments merged) and written: 1, accounted in r. Anything
 * else: 0, nothing changed (buf untouched, the filter as it was), for Python. */
static int receive_run(pywg_hop *hop, const uint8_t *buf, size_t n, size_t segment, int tun_fd,
                       pywg_hop_result *r)
{
    if (!hop->vnet || segment < OVERHEAD || segment - OVERHEAD > 65535)
        return 0;
    size_t count = (n - 1) / segment + 1, last = n - (count - 1) * segment;
    if (count > RUN_MAX || last < OVERHEAD || get32(buf) != MESSAGE_TRANSPORT)
        return 0;
    uint64_t first = get64(buf + 8);
    for (size_t i = 1; i < count; i++)
        if (memcmp(buf + i * segment, buf, 8) != 0 || get64(buf + i * segment + 8) != first + i)
            return 0;
    uint32_t index = get32(buf + 4);
    uint8_t key[KEY_LEN];
    int64_t at = now_ns(); /* after they arrived (pywg_hop_delivery.at_ns) */
    pthread_mutex_lock(&hop->mu);
    receive_entry *e = find_receive(hop, index);
    /* all newer than anything seen (as ReplayFilter.validate_run): then each is fresh */
    int usable = e != NULL && e->active && at < e->until
                 && same_source(&e->addr, r->source, r->source_len) && first + 1 > e->greatest
                 && first + count - 1 < REJECT_AFTER_MESSAGES && e->greatest < REJECT_AFTER_MESSAGES + 1;
    int slot = usable ? e->slot : -1;
    if (usable)
        memcpy(key, e->key, KEY_LEN);
    pthread_mutex_unlock(&hop->mu);
    pywg_hop_delivery *g = usable ? delivery_group(r, slot, index) : NULL;
    if (g == NULL) {
        wipe(key, KEY_LEN);
        return 0;
    }

    uint32_t lengths[RUN_MAX], off[RUN_MAX], len[RUN_MAX], in_off[RUN_MAX], in_len[RUN_MAX];
    uint8_t ok[RUN_MAX], source[16];
    uint64_t counters[RUN_MAX];
    int32_t group_of[RUN_MAX], info[4];
    size_t stride = segment - OVERHEAD;
    int rc = pywg_fp_open_gro(hop->backend, key, buf, n, (uint32_t)segment, hop->plain, sizeof hop->plain,
                              stride, count, lengths, ok, counters);
    wipe(key, KEY_LEN);
    if (rc != PYWG_FP_OK)
        return 0;
    uint32_t carried = 0;
    for (size_t i = 0; i < count; i++) {
        if (!ok[i])
            return 0;
        carried |= lengths[i] > 0;
    }
    int frames = pywg_coalesce_run(hop->plain, stride, lengths, ok, count, hop->frames, sizeof hop->frames,
                                   off, len, group_of, in_off, in_len, source, info);
    if (frames < 0 || info[0] != 0 || (info[3] > 0 && !info[1]))
        return 0; /* not IP, or several sources: Python checks each */
    pthread_mutex_lock(&hop->mu);
    e = find_receive(hop, index);
    int accepted = e != NULL && e->active && first + 1 > e->greatest
                   && (info[3] == 0 || route(info[2] == 4 ? &hop->routes4 : &hop->routes6, source,
                                            (size_t)info[2]) == slot);
    for (size_t i = 0; accepted && i < count; i++)
        pywg_hop_replay_validate(&e->greatest, e->bitmap, first + i);
    pthread_mutex_unlock(&hop->mu);
    if (!accepted)
        return 0;
    g->wire += (uint32_t)n;
    g->carried |= carried;
    g->datagrams += (uint32_t)count;
    g->at_ns = at;
    for (int i = 0; i < frames; i++) {
        if (write(tun_fd, hop->frames + off[i], len[i]) < 0) {
            if (tun_full(hop))
                continue;
            r->err = errno;
            break;
        }
        g->frames++;
    }
    return 1;
}

/* A lone transport message of an armed session from its source, fresh, valid, carrying
 * an IP packet from an address the peer may use (or nothing: a keepalive): opened, its
 * counter recorded, written. 1, accounted in r; else 0, nothing changed. */
static int receive_lone(pywg_hop *hop, const uint8_t *buf, size_t n, int tun_fd, pywg_hop_result *r)
{
    if (n < OVERHEAD || get32(buf) != MESSAGE_TRANSPORT)
        return 0;
    uint32_t index = get32(buf + 4);
    uint64_t counter = get64(buf + 8);
    uint8_t key[KEY_LEN];
    int64_t at = now_ns(); /* after it arrived (pywg_hop_delivery.at_ns) */
    pthread_mutex_lock(&hop->mu);
    receive_entry *e = find_receive(hop, index);
    if (e == NULL || !e->active || at >= e->until || !same_source(&e->addr, r->source, r->source_len)
        || !replay_fresh(e->greatest, e->bitmap, counter)) {
        pthread_mutex_unlock(&hop->mu);
        return 0; /* Python's: it counts what is wrong, or roams */
    }
    int slot = e->slot;
    memcpy(key, e->key, KEY_LEN);
    pthread_mutex_unlock(&hop->mu);
    pywg_hop_delivery *g = delivery_group(r, slot, index);
    if (g == NULL) {
        wipe(key, KEY_LEN);
        return 0;
    }

    uint8_t *plain = hop->plain + VNET_LEN;
    size_t in_off = 0, out_off = 0;
    uint32_t in_len = (uint32_t)n, out_len = 0;
    uint8_t ok = 0;
    uint64_t opened_counter = 0;
    int rc = pywg_fp_open_batch(hop->backend, key, 1, buf, n, &in_off, &in_len, plain,
                                PYWG_HOP_BUFFER, &out_off, &out_len, &ok, &opened_counter);
    wipe(key, KEY_LEN);
    if (rc != PYWG_FP_OK || !ok)
        return 0;
    long inner = 0;
    if (out_len > 0) {
        inner = inner_length(plain, out_len);
        if (inner < 0)
            return 0;
    }
    pthread_mutex_lock(&hop->mu);
    e = find_receive(hop, index);
    int accepted = e != NULL && e->active && (inner == 0 || route_packet(hop, plain, 0) == slot)
                   && pywg_hop_replay_validate(&e->greatest, e->bitmap, counter);
    pthread_mutex_unlock(&hop->mu);
    if (!accepted)
        return 0;
    g->wire += (uint32_t)n;
    g->datagrams++;
    g->at_ns = at;
    if (inner > 0) {
        ssize_t written;
        g->carried = 1;
        if (hop->vnet) {
            memset(hop->plain, 0, VNET_LEN);
            written = write(tun_fd, hop->plain, VNET_LEN + (size_t)inner);
        } else {
            written = write(tun_fd, plain, (size_t)inner);
        }
        if (written < 0) {
            if (!tun_full(hop))
                r->err = errno;
        } else {
            g->frames++;
        }
    }
    return 1;
}

uint64_t pywg_hop_tun_full(pywg_hop *hop) { return __atomic_load_n(&hop->tun_full, __ATOMIC_RELAXED); }

/* 1 for a handshake message at its exact size (an initiation, a response, a cookie reply),
 * read as one datagram. */
static int is_handshake(const uint8_t *data, size_t len, uint32_t segment)
{
    if ((segment && segment < len) || len < 4 || data[1] || data[2] || data[3])
        return 0;
    return (data[0] == 1 && len == 148) || (data[0] == 2 && len == 92) || (data[0] == 3 && len == 64);
}

/* 1 when source is the address of a peer the hop is armed to send to or receive from. */
static int known_source(pywg_hop *hop, const uint8_t *source, uint32_t source_len)
{
    int known = 0;
    pthread_mutex_lock(&hop->mu);
    for (int i = 0; i < PYWG_HOP_MAX_SLOTS && !known; i++)
        known = hop->send[i].armed && same_source(&hop->send[i].addr, source, source_len);
    for (int i = 0; i < PYWG_HOP_MAX_RECEIVE && !known; i++)
        known = hop->receive[i].armed && same_source(&hop->receive[i].addr, source, source_len);
    pthread_mutex_unlock(&hop->mu);
    return known;
}

static int ring_put(backlog_entry *ring, uint32_t size, uint32_t head, uint32_t *count, const uint8_t *data,
                    size_t len, const uint8_t *source, uint32_t source_len)
{
    uint32_t n = *count;
    if (n >= size)
        return 0;
    backlog_entry *e = &ring[(head + n) % size];
    e->length = (uint32_t)len;
    e->source_len = source_len;
    memcpy(e->source, source, source_len);
    memcpy(e->data, data, len);
    __atomic_store_n(count, n + 1, __ATOMIC_RELAXED);
    return 1;
}

/* Queues a handshake message the inbound thread read. A full backlog still takes one from
 * the address of a peer it knows (a peer that lost its session, among a flood from other
 * addresses) into a small lane of its own, taken first; anything else is dropped, counted. */
static void backlog_put(pywg_hop *hop, const uint8_t *data, size_t len, const uint8_t *source,
                        uint32_t source_len)
{
    int queued = 0;
    if (len <= PYWG_HOP_BACKLOG_MESSAGE && source_len <= PYWG_HOP_SOCKADDR) {
        queued = ring_put(hop->backlog, PYWG_HOP_BACKLOG, hop->backlog_head, &hop->backlog_count, data, len, source,
                          source_len);
        if (!queued && known_source(hop, source, source_len))
            queued = ring_put(hop->known, PYWG_HOP_BACKLOG_KNOWN, hop->known_head, &hop->known_count, data, len,
                              source, source_len);
    }
    if (!queued)
        __atomic_fetch_add(&hop->backlog_full, 1, __ATOMIC_RELAXED);
}

uint32_t pywg_hop_backlog_count(pywg_hop *hop)
{
    return __atomic_load_n(&hop->backlog_count, __ATOMIC_RELAXED) + __atomic_load_n(&hop->known_count, __ATOMIC_RELAXED);
}

uint64_t pywg_hop_backlog_full(pywg_hop *hop) { return __atomic_load_n(&hop->backlog_full, __ATOMIC_RELAXED); }

static int ring_take(backlog_entry *ring, uint32_t size, uint32_t *head, uint32_t *count, uint8_t *buf,
                     size_t buf_size, uint8_t *source, uint32_t *source_len)
{
    uint32_t n = *count;
    if (n == 0 || buf_size < ring[*head].length)
        return -1;
    backlog_entry *e = &ring[*head];
    memcpy(buf, e->data, e->length);
    memcpy(source, e->source, e->source_len);
    *source_len = e->source_len;
    *head = (*head + 1) % size;
    __atomic_store_n(count, n - 1, __ATOMIC_RELAXED);
    return (int)e->length;
}

int pywg_hop_backlog_take(pywg_hop *hop, uint8_t *buf, size_t size, uint8_t *source, uint32_t *source_len)
{
    int length = ring_take(hop->known, PYWG_HOP_BACKLOG_KNOWN, &hop->known_head, &hop->known_count, buf, size, source,
                           source_len);
    if (length < 0)
        length = ring_take(hop->backlog, PYWG_HOP_BACKLOG, &hop->backlog_head, &hop->backlog_count, buf, size, source,
                           source_len);
    return length;
}

void pywg_hop_set_screen(pywg_hop *hop, struct pywg_screen *screen)
{
    pthread_mutex_lock(&hop->mu);
    hop->screen = screen;
    pthread_mutex_unlock(&hop->mu);
}

int pywg_hop_in(pywg_hop *hop, int sock_fd, int tun_fd, uint8_t *buf, size_t size,
                uint8_t *turn_buf, size_t turn_size, int turn, uint32_t max, pywg_hop_result *r)
{
    memset(r, 0, sizeof *r);
    r->turn = PYWG_HOP_NONE;
    int kind = PYWG_HOP_EMPTY;
    for (uint32_t i = 0; i < max && r->err == 0; i++) {
        union {
            struct cmsghdr align;
            uint8_t space[CMSG_SPACE(sizeof(int))];
        } control;
        struct iovec iov = {buf, size};
        struct msghdr m = {.msg_name = r->source, .msg_namelen = sizeof r->source, .msg_iov = &iov,
                           .msg_iovlen = 1, .msg_control = control.space,
                           .msg_controllen = sizeof control.space};
        ssize_t n = recvmsg(sock_fd, &m, MSG_DONTWAIT);
        if (n < 0) {
            int err = errno;
            if (kind == PYWG_HOP_EMPTY && err != EAGAIN && err != EWOULDBLOCK) {
                r->err = err;
                kind = PYWG_HOP_ERROR;
            }
            break; /* (an error after deliveries: the ICMP report it stands for is dropped) */
        }
        r->reads++;
        r->source_len = m.msg_namelen;
        r->segment = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int segment;
                memcpy(&segment, CMSG_DATA(c), sizeof segment);
                r->segment = segment > 0 ? (uint32_t)segment : 0;
            }
        int handled = r->segment && r->segment < (uint64_t)n
                          ? receive_run(hop, buf, (size_t)n, r->segment, tun_fd, r)
                          : receive_lone(hop, buf, (size_t)n, tun_fd, r);
        if (!handled && hop->screen != NULL) {
            int verdict = pywg_screen_run_verdict(hop->screen, buf, (size_t)n, r->segment);
            if (verdict >= PYWG_SCREEN_FIRST_DROP) { /* dropped here, counted, never Python's */
                if (r->segment && r->segment < (uint64_t)n) /* each under its own verdict */
                    pywg_screen_count_run(hop->screen, buf, (size_t)n, r->segment);
                else
                    pywg_screen_count(hop->screen, verdict, 1);
                if (kind == PYWG_HOP_EMPTY)
                    kind = PYWG_HOP_HANDLED;
                continue;
            }
        }
        if (!handled && is_handshake(buf, (size_t)n, r->segment)) {
            backlog_put(hop, buf, (size_t)n, r->source, r->source_len);
            if (kind == PYWG_HOP_EMPTY)
                kind = PYWG_HOP_HANDLED;
            continue;
        }
        if (!handled) {
            r->length = (uint32_t)n;
            kind = PYWG_HOP_PYTHON;
            break;
        }
        kind = PYWG_HOP_HANDLED;
    }
    r->backlog = hop->backlog_count + hop->known_count;
    uint32_t frames = 0;
    for (uint32_t i = 0; i < r->nreceived; i++)
        frames += r->received[i].frames;
    if (frames > 0 && turn && r->err == 0)
        r->turn = pump(hop, tun_fd, turn_buf, turn_size, PYWG_HOP_LOCK_TRY, PYWG_HOP_TURN_MAX,
                       &r->turn_length, &r->turn_err, r);
    return r->kind = kind;
}

int pywg_hop_in_wait(pywg_hop *hop, const int *socks, int nsocks, int wake_fd, int timeout_ms, int tun_fd,
                     uint8_t *buf, size_t size, uint8_t *turn_buf, size_t turn_size, int turn, uint32_t max,
                     pywg_hop_result *r)
{
    struct pollfd p[PYWG_HOP_MAX_SOCKETS + 1];
    memset(r, 0, sizeof *r);
    r->turn = PYWG_HOP_NONE;
    if (nsocks < 0 || nsocks > PYWG_HOP_MAX_SOCKETS)
        return r->kind = PYWG_HOP_EMPTY;
    for (int i = 0; i < nsocks; i++)
        p[i] = (struct pollfd){.fd = socks[i], .events = POLLIN};
    p[nsocks] = (struct pollfd){.fd = wake_fd, .events = POLLIN};
    if (poll(p, (nfds_t)nsocks + 1, timeout_ms) <= 0)
        return r->kind = PYWG_HOP_EMPTY;
    int woken = (p[nsocks].revents & POLLIN) != 0;
    for (int i = 0; i < nsocks; i++)
        if (p[i].revents) {
            int kind = pywg_hop_in(hop, socks[i], tun_fd, buf, size, turn_buf, turn_size, turn, max, r);
            r->woken = woken;
            r->sock = i;
            return kind;
        }
    r->woken = woken;
    return r->kind = PYWG_HOP_EMPTY;
}
