"""Events that the sans-IO NBD core hands to the transport, and the export data it needs.

The core (:class:`nbdserver.protocol.connection.ServerConnection`) is fed bytes
and returns these events from ``next_event()``. It never touches a socket, a
file or the event loop; everything it needs to know about exports comes in as
plain :class:`ExportInfo` values from an :class:`ExportCatalog`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class NeedData(enum.Enum):
    """Sentinel: the core needs more bytes before it can produce an event."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


class Command(enum.IntEnum):
    """Transmission commands (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a client may learn about one export during the handshake.

    Block sizes follow NBD_INFO_BLOCK_SIZE: ``min_block`` is the alignment the
    server insists on (unaligned requests get EINVAL), ``pref_block`` the size
    that avoids read-modify-write, ``max_block`` the largest READ/WRITE payload.
    ``meta_contexts`` are the fully qualified context names this export can
    answer in BLOCK_STATUS, e.g. ``("base:allocation", "qemu:allocation-depth")``.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    min_block: int = 512
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    meta_contexts: tuple[str, ...] = ("base:allocation",)


class ExportCatalog(Protocol):
    """Read-only view of the exports a server offers (names are exact matches)."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export called `name`, or None. The empty name means the default export."""
        ...

    def list_exports(self) -> Iterable[ExportInfo]:
        """Every export, in the order NBD_OPT_LIST should show them."""
        ...


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A metadata context chosen with NBD_OPT_SET_META_CONTEXT, and its wire id."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """The handshake finished (EXPORT_NAME or GO); requests follow.

    ``structured_replies`` tells whether NBD_OPT_STRUCTURED_REPLY was agreed,
    ``meta_contexts`` the contexts agreed with SET_META_CONTEXT for this export.
    """

    export: ExportInfo
    structured_replies: bool
    meta_contexts: tuple[MetaContext, ...] = ()


@dataclass(slots=True)
class Request:
    """One validated transmission request.

    Offsets and lengths are already checked against the export size, the block
    size constraints, read-only state and the negotiated features; a request that
    fails those checks never becomes a Request (the core answers it itself).
    ``data`` is the WRITE payload: a view into the core's receive buffer that is
    valid only until the next call into the core, so copy it at once.
    Flags are the raw NBD_CMD_FLAG_* bits; the boolean properties name them.
    """

    command: Command
    handle: int
    offset: int
    length: int
    flags: int = 0
    data: memoryview | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & 0x1)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & 0x2)

    @property
    def df(self) -> bool:
        return bool(self.flags & 0x4)

    @property
    def req_one(self) -> bool:
        return bool(self.flags & 0x8)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & 0x10)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end the session (NBD_CMD_DISC, or NBD_OPT_ABORT).

    The transport finishes the requests still in flight, sends their replies,
    then closes. No further events follow.
    """


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The client broke the protocol in a way that ends the connection.

    (bad magic, an oversized option or name, a payload that cannot be skipped,
    input after DISC...). The transport sends ``data_to_send()`` if any and
    closes at once; ``reason`` is for the log.
    """

    reason: str


Event = TransmissionStarted | Request | Disconnect | ProtocolViolation


@dataclass(slots=True)
class ConnectionLimits:
    """Bounds that keep a hostile client from making the server buffer unbounded input."""

    max_option_length: int = 65536
    max_name_length: int = 4096
    max_options: int = 4096
    extra: dict[str, int] = field(default_factory=dict)
