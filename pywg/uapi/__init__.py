"""The cross-platform configuration protocol (UAPI) that ``wg(8)`` speaks, sans I/O.

``protocol`` frames the byte stream (``RequestReader``), validates set requests into a
typed, all-or-nothing ``SetRequest`` (``parse_set``) and writes get responses
(``format_get``). The socket server that uses it lives in ``pywg.device``.
"""

from pywg.uapi.protocol import (
    ERRNO_OK,
    GET_REQUEST,
    IPC_ERROR_INVALID,
    IPC_ERROR_IO,
    IPC_ERROR_PORT_IN_USE,
    IPC_ERROR_PROTOCOL,
    IPC_ERROR_UNKNOWN,
    UNCHANGED,
    AllowedIPChange,
    DeviceChanges,
    DeviceSnapshot,
    PeerChanges,
    PeerSnapshot,
    Request,
    RequestReader,
    SetRequest,
    UapiError,
    format_errno,
    format_get,
    format_set,
    parse_get,
    parse_set,
)

__all__ = [
    "ERRNO_OK",
    "GET_REQUEST",
    "IPC_ERROR_INVALID",
    "IPC_ERROR_IO",
    "IPC_ERROR_PORT_IN_USE",
    "IPC_ERROR_PROTOCOL",
    "IPC_ERROR_UNKNOWN",
    "UNCHANGED",
    "AllowedIPChange",
    "DeviceChanges",
    "DeviceSnapshot",
    "PeerChanges",
    "PeerSnapshot",
    "Request",
    "RequestReader",
    "SetRequest",
    "UapiError",
    "format_errno",
    "format_get",
    "format_set",
    "parse_get",
    "parse_set",
]
