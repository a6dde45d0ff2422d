"""Every number the NBD protocol puts on the wire (NetworkBlockDevice/nbd ``doc/proto.md``).

Names follow the spec with the ``NBD_`` prefix dropped. Plain ``int`` constants
rather than enums: they are compared and packed on the hot path, and an int
compares and packs faster than an enum member.

:func:`nbd_error_code` is the only place in the project that turns a POSIX
``errno`` value into an NBD wire error number.
"""

from __future__ import annotations

import errno as _errno
from typing import Final

# -- magics -------------------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT", newstyle magic and option magic
CLISERV_MAGIC: Final = 0x00420281861253  # oldstyle only; never sent by this server
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71  # EXTENDED_HEADERS extension; not supported
EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C  # EXTENDED_HEADERS extension; not supported

# -- handshake flags (server, 16 bits) and client flags (32 bits) -------------------------

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# -- transmission flags (16 bits) ---------------------------------------------------------

FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9  # RESIZE extension; never advertised
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD: Final = 1 << 12  # EXTENDED_HEADERS extension; never advertised

# -- options ------------------------------------------------------------------------------

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4  # withdrawn
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

OPTION_NAMES: Final[dict[int, str]] = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# -- option reply types -------------------------------------------------------------------

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD: Final = REP_FLAG_ERROR | 10

# -- NBD_REP_INFO information types -------------------------------------------------------

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# -- commands and command flags -----------------------------------------------------------

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8  # RESIZE extension; rejected as unknown

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4
CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5  # EXTENDED_HEADERS extension; rejected as unknown

# -- structured replies ---------------------------------------------------------------------

REPLY_FLAG_DONE: Final = 1 << 0

REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6  # EXTENDED_HEADERS extension; never sent
REPLY_TYPE_FLAG_ERROR: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_FLAG_ERROR | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_FLAG_ERROR | 2

# -- base:allocation status flags ---------------------------------------------------------

STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# -- metadata contexts --------------------------------------------------------------------

CONTEXT_BASE_ALLOCATION: Final = "base:allocation"

# -- sizes ----------------------------------------------------------------------------------

MAX_STRING: Final = 4096  # longest string (name, message) the spec allows
DEFAULT_MAX_PAYLOAD: Final = 1 << 25  # what a client may assume without NBD_INFO_BLOCK_SIZE
MAX_EXTENTS: Final = 1 << 20  # most block descriptors the spec wants in one chunk

# -- wire errors ----------------------------------------------------------------------------

EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

_ERRNO_TO_NBD: Final[dict[int, int]] = {
    _errno.EPERM: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP,
    _errno.EOPNOTSUPP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
    # proto.md "Error values": the server "SHOULD map the EDQUOT and EFBIG errors to
    # NBD_ENOSPC"; a read-only file system is the EPERM case of a read-only export.
    _errno.EFBIG: ENOSPC,
    _errno.EROFS: EPERM,
}
if hasattr(_errno, "EDQUOT"):
    _ERRNO_TO_NBD[_errno.EDQUOT] = ENOSPC


def nbd_error_code(errno_value: int) -> int:
    """The NBD wire error for POSIX `errno_value`; anything unlisted becomes NBD_EIO.

    EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP (and EOPNOTSUPP),
    ESHUTDOWN map to their NBD namesakes; EDQUOT and EFBIG to NBD_ENOSPC as the
    spec recommends, EROFS to NBD_EPERM. The result is never zero.
    """
    return _ERRNO_TO_NBD.get(errno_value, EIO)
