/* TUN offload helpers for pywg: virtio-net header split (TSO/USO/partial checksums) and
 * TCP coalescing (GRO). See offload.c. */
#ifndef PYWG_OFFLOAD_H
#define PYWG_OFFLOAD_H

#include <stddef.h>
#include <stdint.h>

#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_UDP 3
#define VNET_GSO_TCPV6 4
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_ECN 0x80

#define PYWG_OFFLOAD_BAD (-1)     /* malformed frame */
#define PYWG_OFFLOAD_NOSPACE (-2) /* the caller's buffers are too small */

#define PYWG_GRO_MAX_BATCH 1024
#define PYWG_GRO_MAX_GROUPS 32
#define PYWG_GRO_MAX_SEGS 64

/* Internet checksum (RFC 1071) of data, starting from `initial` (an unfolded sum). */
uint16_t pywg_checksum(const uint8_t *data, size_t len, uint32_t initial);

/* Split one TUN frame (virtio-net header + packet) into IP packets with complete
 * checksums, written back to back into out; segment i at out[seg_off[i]], seg_len[i]
 * bytes. Returns the number of segments or a negative PYWG_OFFLOAD_* error. */
int pywg_split(const uint8_t *frame, size_t frame_len, uint8_t *out, size_t out_cap,
               uint32_t *seg_off, uint32_t *seg_len, size_t max_segs);

/* Coalesce n IP packets (in[in_off[i]], in_len[i]) into TUN frames (virtio-net header +
 * packet): consecutive in-order TCP segments of one flow with verified checksums become one
 * super-packet; everything else is passed through with an empty header. Frames go back to
 * back into out (out_off/out_len, n entries of room); group_of[i] (n entries) receives the
 * group of packet i or -1. Returns the number of frames or a negative error. */
int pywg_coalesce(const uint8_t *in, const uint32_t *in_off, const uint32_t *in_len, size_t n,
                  uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                  int32_t *group_of);

/* Coalesce a run of opened transport plaintexts (i at base + i * stride, lengths[i]
 * bytes, ok[i] set if it authenticated): each is cut to its IP length (padding removed;
 * not IP: counted in info[0]), keepalives skipped, then coalesced as pywg_coalesce does.
 * source receives the first packet's source address; info[1] = 1 if every packet has that
 * source, info[2] = its length (4 or 16), info[3] = packets kept. in_off/in_len: n
 * entries of scratch. Returns the number of frames or a negative error. */
int pywg_coalesce_run(const uint8_t *base, size_t stride, const uint32_t *lengths, const uint8_t *ok,
                      size_t n, uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                      int32_t *group_of, uint32_t *in_off, uint32_t *in_len, uint8_t *source,
                      int32_t *info);

#endif
