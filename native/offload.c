/* TUN offloads for pywg: split what the kernel hands us with IFF_VNET_HDR (TSO/USO
 * super-packets, partial checksums) into MTU-sized IP packets, and coalesce received TCP
 * segments of one flow into one super-packet (GRO) before writing to the TUN.
 *
 * Written from the virtio-net header definition (include/uapi/linux/virtio_net.h) and
 * RFC 791/793/8200/768/1071. All multi-byte header fields are big-endian on the wire; the
 * virtio-net header itself is little-endian (host order on the machines we build for).
 */
#include "offload.h"

#include <string.h>

#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_CWR 0x80

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* One's-complement sum of big-endian 16-bit words, not folded. */
static uint64_t csum_add(const uint8_t *p, size_t n, uint64_t sum) {
    while (n >= 8) {
        sum += (uint64_t)get32(p) + get32(p + 4);
        p += 8;
        n -= 8;
    }
    while (n >= 2) {
        sum += get16(p);
        p += 2;
        n -= 2;
    }
    if (n) sum += (uint64_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint64_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

uint16_t pywg_checksum(const uint8_t *data, size_t len, uint32_t initial) {
    return (uint16_t)~csum_fold(csum_add(data, len, initial));
}

/* Pseudo-header sum (not folded) for an upper-layer packet of `len` bytes. */
static uint64_t pseudo_sum(const uint8_t *ip, int v6, uint8_t proto, size_t len) {
    uint64_t sum = (uint64_t)proto + len;
    if (v6) return csum_add(ip + 8, 32, sum);
    return csum_add(ip + 12, 8, sum);
}

static void ipv4_fix_header(uint8_t *ip, size_t ihl) {
    ip[10] = ip[11] = 0;
    put16(ip + 10, (uint16_t)~csum_fold(csum_add(ip, ihl, 0)));
}

/* Network header length and upper protocol of an IP packet, or -1. */
static int ip_header(const uint8_t *pkt, size_t len, int *v6, uint8_t *proto) {
    if (len < 20) return -1;
    if (pkt[0] >> 4 == 4) {
        size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
        if (ihl < 20 || len < ihl || get16(pkt + 2) != len) return -1;
        *v6 = 0;
        *proto = pkt[9];
        return (int)ihl;
    }
    if (pkt[0] >> 4 == 6) {
        if (len < 40 || (size_t)get16(pkt + 4) + 40 != len) return -1;
        *v6 = 1;
        *proto = pkt[6];
        return 40;
    }
    return -1;
}

int pywg_split(const uint8_t *frame, size_t frame_len, uint8_t *out, size_t out_cap,
               uint32_t *seg_off, uint32_t *seg_len, size_t max_segs) {
    if (frame_len < VNET_HDR_LEN) return PYWG_OFFLOAD_BAD;
    const uint8_t flags = frame[0], gso_type = frame[1] & ~VNET_GSO_ECN;
    const size_t gso_size = le16(frame + 4), csum_start = le16(frame + 6), csum_offset = le16(frame + 8);
    const uint8_t *pkt = frame + VNET_HDR_LEN;
    const size_t len = frame_len - VNET_HDR_LEN;

    if (gso_type == VNET_GSO_NONE) {
        if (max_segs < 1 || out_cap < len) return PYWG_OFFLOAD_NOSPACE;
        memcpy(out, pkt, len);
        if (flags & VNET_F_NEEDS_CSUM) {
            if (csum_start + csum_offset + 2 > len) return PYWG_OFFLOAD_BAD;
            uint16_t sum = (uint16_t)~csum_fold(csum_add(out + csum_start, len - csum_start, 0));
            if (sum == 0 && csum_offset == 6) sum = 0xffff; /* UDP: 0 would mean "no checksum" */
            put16(out + csum_start + csum_offset, sum);
        }
        seg_off[0] = 0;
        seg_len[0] = (uint32_t)len;
        return 1;
    }

    /* A super-packet: TCPv4/TCPv6 (TSO) or UDP (USO). Its length fields may be 0 or hold
     * the whole size; we rebuild them per segment. */
    if (len < 20 || gso_size == 0) return PYWG_OFFLOAD_BAD;
    int v6 = pkt[0] >> 4 == 6;
    size_t ihl;
    uint8_t proto;
    if (v6) {
        ihl = 40;
        proto = pkt[6];
    } else if (pkt[0] >> 4 == 4) {
        ihl = (size_t)(pkt[0] & 0x0f) * 4;
        proto = pkt[9];
    } else {
        return PYWG_OFFLOAD_BAD;
    }
    int tcp = gso_type == VNET_GSO_TCPV4 || gso_type == VNET_GSO_TCPV6;
    if (ihl < 20 || len < ihl + 8 || (tcp && proto != PROTO_TCP) || (!tcp && proto != PROTO_UDP))
        return PYWG_OFFLOAD_BAD;
    size_t l4_hlen = 8;
    if (tcp) {
        if (len < ihl + 20) return PYWG_OFFLOAD_BAD;
        l4_hlen = (size_t)(pkt[ihl + 12] >> 4) * 4;
        if (l4_hlen < 20 || len < ihl + l4_hlen) return PYWG_OFFLOAD_BAD;
    }
    const size_t hdr = ihl + l4_hlen, payload = len - hdr;
    size_t nsegs = payload ? (payload + gso_size - 1) / gso_size : 1;
    if (nsegs > max_segs) return PYWG_OFFLOAD_NOSPACE;
    if (out_cap < nsegs * hdr + payload) return PYWG_OFFLOAD_NOSPACE;

    const uint32_t seq0 = tcp ? get32(pkt + ihl + 4) : 0;
    const uint16_t id0 = v6 ? 0 : get16(pkt + 4);
    const uint8_t tcp_flags = tcp ? pkt[ihl + 13] : 0;
    size_t pos = 0;
    for (size_t i = 0; i < nsegs; i++) {
        size_t chunk = payload - i * gso_size < gso_size ? payload - i * gso_size : gso_size;
        uint8_t *seg = out + pos;
        memcpy(seg, pkt, hdr);
        memcpy(seg + hdr, pkt + hdr + i * gso_size, chunk);
        size_t seg_total = hdr + chunk;
        if (v6) {
            put16(seg + 4, (uint16_t)(seg_total - 40));
        } else {
            put16(seg + 2, (uint16_t)seg_total);
            put16(seg + 4, (uint16_t)(id0 + i));
            ipv4_fix_header(seg, ihl);
        }
        uint8_t *l4 = seg + ihl;
        size_t l4_len = seg_total - ihl;
        if (tcp) {
            put32(l4 + 4, seq0 + (uint32_t)(i * gso_size));
            uint8_t f = tcp_flags;
            if (i + 1 < nsegs) f &= (uint8_t)~(TCP_FIN | TCP_PSH);
            if (i > 0) f &= (uint8_t)~TCP_CWR;
            l4[13] = f;
            l4[16] = l4[17] = 0;
            put16(l4 + 16, (uint16_t)~csum_fold(csum_add(l4, l4_len, pseudo_sum(seg, v6, PROTO_TCP, l4_len))));
        } else {
            put16(l4 + 4, (uint16_t)l4_len);
            l4[6] = l4[7] = 0;
            uint16_t sum = (uint16_t)~csum_fold(csum_add(l4, l4_len, pseudo_sum(seg, v6, PROTO_UDP, l4_len)));
            put16(l4 + 6, sum ? sum : 0xffff);
        }
        seg_off[i] = (uint32_t)pos;
        seg_len[i] = (uint32_t)seg_total;
        pos += seg_total;
    }
    return (int)nsegs;
}

/* --- GRO ------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *pkt;  /* first packet of the group: its headers are the group's */
    size_t hdr;          /* IP + TCP header length */
    size_t ihl;
    int v6;
    uint32_t next_seq;   /* sequence number the next segment must carry */
    size_t gso_size;     /* payload of the first segment */
    size_t payload;      /* total payload so far */
    size_t count;
    int closed;          /* a short segment (or PSH) ended it */
    int last;            /* index of the last member */
    uint8_t flags;       /* PSH of the last member is carried over */
} group_t;

/* Is this TCP segment (header at pkt, total len) one whose checksum verifies? */
static int tcp_checksum_ok(const uint8_t *pkt, size_t ihl, int v6, size_t len) {
    size_t l4_len = len - ihl;
    return csum_fold(csum_add(pkt + ihl, l4_len, pseudo_sum(pkt, v6, PROTO_TCP, l4_len))) == 0xffff;
}

static int same_flow(const group_t *g, const uint8_t *pkt, size_t ihl, int v6, size_t hdr) {
    const uint8_t *a = g->pkt;
    if (g->v6 != v6 || g->ihl != ihl || g->hdr != hdr) return 0;
    if (v6) {
        /* addresses, traffic class/flow label, hop limit */
        if (memcmp(a + 8, pkt + 8, 32) || memcmp(a, pkt, 4) || a[7] != pkt[7]) return 0;
    } else {
        if (memcmp(a + 12, pkt + 12, 8) || a[1] != pkt[1] || a[8] != pkt[8]) return 0;
        if ((a[6] & 0x40) != (pkt[6] & 0x40)) return 0; /* DF */
    }
    const uint8_t *ta = a + ihl, *tb = pkt + ihl;
    if (memcmp(ta, tb, 4)) return 0;                     /* ports */
    if (memcmp(ta + 8, tb + 8, 4)) return 0;             /* ack number */
    if ((ta[13] & ~TCP_PSH) != (tb[13] & ~TCP_PSH)) return 0;
    if (memcmp(ta + 20, tb + 20, hdr - ihl - 20)) return 0; /* identical options */
    return 1;
}

int pywg_coalesce(const uint8_t *in, const uint32_t *in_off, const uint32_t *in_len, size_t n,
                  uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                  int32_t *group_of) {
    group_t groups[PYWG_GRO_MAX_GROUPS];
    size_t ngroups = 0;
    int32_t next[PYWG_GRO_MAX_BATCH];
    int32_t first_of[PYWG_GRO_MAX_GROUPS];
    if (n > PYWG_GRO_MAX_BATCH) return PYWG_OFFLOAD_NOSPACE;

    /* Pass 1: assign each packet to a group (or to none: written alone). */
    for (size_t i = 0; i < n; i++) {
        const uint8_t *pkt = in + in_off[i];
        size_t len = in_len[i];
        int v6;
        uint8_t proto;
        group_of[i] = -1;
        next[i] = -1;
        int ihl = ip_header(pkt, len, &v6, &proto);
        if (ihl < 0 || proto != PROTO_TCP || len < (size_t)ihl + 20) continue;
        if (!v6 && ((pkt[6] & 0x3f) || pkt[7] || ihl != 20)) continue; /* fragments, options */
        const uint8_t *th = pkt + ihl;
        size_t hdr = (size_t)ihl + (size_t)(th[12] >> 4) * 4;
        if (hdr < (size_t)ihl + 20 || hdr > len) continue;
        size_t payload = len - hdr;
        uint8_t fl = th[13];
        if (payload == 0 || (fl & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG)) || !(fl & TCP_ACK)) continue;
        if (!tcp_checksum_ok(pkt, (size_t)ihl, v6, len)) continue; /* the kernel will judge it */
        uint32_t seq = get32(th + 4);
        int joined = 0;
        for (size_t g = 0; g < ngroups && !joined; g++) {
            group_t *gr = &groups[g];
            if (gr->closed || !same_flow(gr, pkt, (size_t)ihl, v6, hdr)) continue;
            if (seq != gr->next_seq || payload > gr->gso_size || gr->count >= PYWG_GRO_MAX_SEGS ||
                gr->hdr + gr->payload + payload > 65535) {
                gr->closed = 1; /* out of order or too big: this flow's group ends here */
                continue;
            }
            next[gr->last] = (int32_t)i;
            gr->last = (int)i;
            gr->payload += payload;
            gr->count++;
            gr->next_seq = seq + (uint32_t)payload;
            gr->flags = fl;
            if (payload < gr->gso_size || (fl & TCP_PSH)) gr->closed = 1;
            group_of[i] = (int32_t)g;
            joined = 1;
        }
        if (joined || ngroups >= PYWG_GRO_MAX_GROUPS) continue;
        group_t *gr = &groups[ngroups];
        gr->pkt = pkt;
        gr->hdr = hdr;
        gr->ihl = (size_t)ihl;
        gr->v6 = v6;
        gr->next_seq = seq + (uint32_t)payload;
        gr->gso_size = payload;
        gr->payload = payload;
        gr->count = 1;
        gr->closed = (fl & TCP_PSH) != 0;
        gr->last = (int)i;
        gr->flags = fl;
        first_of[ngroups] = (int32_t)i;
        group_of[i] = (int32_t)ngroups;
        ngroups++;
    }

    /* Pass 2: write frames (virtio-net header + packet) in the order of first packets. */
    size_t pos = 0, nout = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t g = group_of[i];
        if (g >= 0 && first_of[g] != (int32_t)i) continue; /* written with its group */
        const uint8_t *pkt = in + in_off[i];
        size_t len = in_len[i];
        if (g < 0 || groups[g].count == 1) {
            if (pos + VNET_HDR_LEN + len > out_cap) return PYWG_OFFLOAD_NOSPACE;
            memset(out + pos, 0, VNET_HDR_LEN);
            memcpy(out + pos + VNET_HDR_LEN, pkt, len);
            out_off[nout] = (uint32_t)pos;
            out_len[nout++] = (uint32_t)(VNET_HDR_LEN + len);
            pos += VNET_HDR_LEN + len;
            continue;
        }
        group_t *gr = &groups[g];
        size_t total = gr->hdr + gr->payload;
        if (pos + VNET_HDR_LEN + total > out_cap) return PYWG_OFFLOAD_NOSPACE;
        uint8_t *vh = out + pos, *p = vh + VNET_HDR_LEN;
        vh[0] = VNET_F_NEEDS_CSUM;
        vh[1] = gr->v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
        put_le16(vh + 2, (uint16_t)gr->hdr);
        put_le16(vh + 4, (uint16_t)gr->gso_size);
        put_le16(vh + 6, (uint16_t)gr->ihl);
        put_le16(vh + 8, 16);
        memcpy(p, pkt, gr->hdr);
        size_t at = gr->hdr;
        for (int32_t m = (int32_t)i; m >= 0; m = next[m]) {
            size_t plen = in_len[m] - gr->hdr;
            memcpy(p + at, in + in_off[m] + gr->hdr, plen);
            at += plen;
        }
        if (gr->v6) {
            put16(p + 4, (uint16_t)(total - 40));
        } else {
            put16(p + 2, (uint16_t)total);
            ipv4_fix_header(p, gr->ihl);
        }
        uint8_t *th = p + gr->ihl;
        th[13] = (uint8_t)(th[13] | (gr->flags & TCP_PSH));
        /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum. */
        put16(th + 16, csum_fold(pseudo_sum(p, gr->v6, PROTO_TCP, total - gr->ihl)));
        out_off[nout] = (uint32_t)pos;
        out_len[nout++] = (uint32_t)(VNET_HDR_LEN + total);
        pos += VNET_HDR_LEN + total;
    }
    return (int)nout;
}

int pywg_coalesce_run(const uint8_t *base, size_t stride, const uint32_t *lengths, const uint8_t *ok,
                      size_t n, uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                      int32_t *group_of, uint32_t *in_off, uint32_t *in_len, uint8_t *source,
                      int32_t *info) {
    size_t k = 0;
    int32_t invalid = 0, same = 1, source_len = 0;
    for (size_t i = 0; i < n; i++) {
        if (!ok[i] || lengths[i] == 0 || lengths[i] > stride) continue; /* failed, keepalive */
        const uint8_t *p = base + i * stride;
        size_t len = lengths[i], total;
        const uint8_t *src;
        int32_t src_len;
        if (len >= 20 && p[0] >> 4 == 4) {
            total = get16(p + 2);
            src = p + 12;
            src_len = 4;
            if (total < 20) total = len + 1; /* invalid */
        } else if (len >= 40 && p[0] >> 4 == 6) {
            total = 40 + (size_t)get16(p + 4);
            src = p + 8;
            src_len = 16;
        } else {
            invalid++;
            continue;
        }
        if (total > len) {
            invalid++;
            continue;
        }
        if (k == 0) {
            memcpy(source, src, (size_t)src_len);
            source_len = src_len;
        } else if (src_len != source_len || memcmp(source, src, (size_t)src_len)) {
            same = 0;
        }
        in_off[k] = (uint32_t)(i * stride);
        in_len[k] = (uint32_t)total;
        k++;
    }
    info[0] = invalid;
    info[1] = same;
    info[2] = source_len;
    info[3] = (int32_t)k;
    if (k == 0) return 0;
    return pywg_coalesce(base, in_off, in_len, k, out, out_cap, out_off, out_len, group_of);
}
