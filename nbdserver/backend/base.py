"""The interface between the NBD transport and whatever stores the bytes.

A backend is byte addressed: any offset and length inside ``size`` works (the
backend does read-modify-write where its storage needs alignment), so that the
protocol layer alone decides which alignment to demand of clients.

Operations complete through a callback, not a future, because this is the hot
path (see :mod:`nbdserver.storage.engine`). Each operation calls its ``done``
exactly once, on the event loop thread, possibly before returning. Errors are
:class:`~nbdserver.errors.NbdError` values passed to ``done``, never raised.

The transport guarantees what the protocol core validated: ranges lie inside
the export, writes are not sent to read-only backends, and flags are valid.

Implementations: :class:`nbdserver.backend.file.FileBackend` (a raw file or
block device) and, over a pool, :class:`nbdserver.volume.VolumeBackend`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from nbdserver.errors import NbdError

ReadChunk = tuple[int, int, memoryview | None]  # (offset, length, data or None for a hole)
# A block-status extent: (length, flags); flags depend on the context
# (base:allocation: 1 = hole, 2 = reads as zero; qemu:allocation-depth: the depth).
StatusExtent = tuple[int, int]


class ReadResult:
    """The answer to a read: chunks covering the range in order, plus a release hook.

    ``release()`` must be called once the chunks' memory has been handed to the
    transport (which copies whatever it cannot send at once).
    """

    __slots__ = ("_release", "chunks")

    def __init__(self, chunks: Sequence[ReadChunk], release: Callable[[], None] | None) -> None:
        self.chunks = chunks
        self._release = release

    def release(self) -> None:
        """Idempotent: the hook runs at most once, even if it raises."""
        release, self._release = self._release, None
        if release is not None:
            release()


ReadDone = Callable[[ReadResult | NbdError], None]
Done = Callable[[NbdError | None], None]
StatusDone = Callable[[Sequence[StatusExtent] | NbdError], None]

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
STATE_HOLE = 1
STATE_ZERO = 2


class ExportTraits(Protocol):
    """What the handshake tells of an export (a volume not opened yet has these too)."""

    size: int
    read_only: bool
    description: str
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    rotational: bool
    preferred_block: int
    meta_contexts: tuple[str, ...]  # block-status contexts it can answer


class Backend(ExportTraits, Protocol):
    """Storage behind one export. See the module note for the calling contract."""

    def read(self, offset: int, length: int, done: ReadDone) -> None: ...

    def write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        """Write `data` at `offset`. `data` is valid only during the call: copy it at once."""
        ...

    def trim(self, offset: int, length: int, fua: bool, done: Done) -> None: ...

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool,
             done: Done) -> None:
        """Make the range read as zeros; with `fast_only`, fail with ENOTSUP unless cheap."""
        ...

    def flush(self, done: Done) -> None:
        """Make every write already acknowledged, on any connection, durable."""
        ...

    def cache(self, offset: int, length: int, done: Done) -> None: ...

    def block_status(self, offset: int, length: int, context: str, done: StatusDone) -> None:
        """Extents from `offset` for at least one byte, at most `length` bytes (more is clipped)."""
        ...

    async def close(self) -> None:
        """Flush and release resources; called once, after the last connection ended."""
        ...


def fail(done: Callable[[NbdError], None], errno_value: int, message: str = "") -> None:
    """Complete an operation with an error."""
    done(NbdError(errno_value, message))
