"""cffi build script for ``pywg._offload`` (out-of-line API mode): TUN offload helpers
(virtio-net header split, TCP coalescing). Registered in setup.py beside _fastpath;
``pip install -e .`` builds it."""

from __future__ import annotations

from cffi import FFI

CDEF = """
#define VNET_HDR_LEN 10
#define PYWG_OFFLOAD_BAD -1
#define PYWG_OFFLOAD_NOSPACE -2
#define PYWG_GRO_MAX_BATCH 1024
#define PYWG_GRO_MAX_SEGS 64
uint16_t pywg_checksum(const uint8_t *data, size_t len, uint32_t initial);
int pywg_split(const uint8_t *frame, size_t frame_len, uint8_t *out, size_t out_cap,
               uint32_t *seg_off, uint32_t *seg_len, size_t max_segs);
int pywg_coalesce(const uint8_t *in, const uint32_t *in_off, const uint32_t *in_len, size_t n,
                  uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                  int32_t *group_of);
int pywg_coalesce_run(const uint8_t *base, size_t stride, const uint32_t *lengths, const uint8_t *ok,
                      size_t n, uint8_t *out, size_t out_cap, uint32_t *out_off, uint32_t *out_len,
                      int32_t *group_of, uint32_t *in_off, uint32_t *in_len, uint8_t *source,
                      int32_t *info);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pywg._offload",
    '#include "offload.h"\n',
    sources=["native/offload.c"],
    include_dirs=["native"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
)
