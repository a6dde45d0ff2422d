"""The pool's on-disk format: layout, superblock, page header, catalog records.

See ``docs/format.md`` for the full description. In short, a pool is one file
or block device cut into fixed regions, in 4 KiB metadata pages followed by the
data area in chunks::

    page 0, 1          superblock, two copies (A/B), written alternately
    journal            ring of committed transactions (page images)
    state page         counters that change with every allocation
    catalog            volume records, 16 per page
    meta refcounts     u32 per metadata page
    data refcounts     u32 per data chunk
    metadata pages     block-map nodes, allocated one page at a time
    data area          chunks (chunk_size, aligned to it), allocated by the space map

Every metadata page except the superblock and journal starts with a 16-byte
header: CRC32 (over the page number and bytes 4..4096), page type, format,
and the sequence number of the transaction that last wrote it. A page read
back with a bad CRC, or with another page's number baked into its CRC (a
misdirected write), is an error, never silently used.

The superblock is written only when the journal is checkpointed; the copy with
the highest sequence number and a valid CRC wins, so a torn superblock write
loses at most the copy being written.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field, replace

PAGE_SIZE = 4096
PAGE_HEADER = struct.Struct("<IHHQ")  # crc, type, format, seq
PAGE_HEADER_SIZE = PAGE_HEADER.size  # 16
PAGE_PAYLOAD = PAGE_SIZE - PAGE_HEADER_SIZE

SUPERBLOCK_MAGIC = b"NBDSPOOL"
FORMAT_VERSION = 1
SUPERBLOCK_COPIES = 2

# Page types
PT_FREE = 0
PT_STATE = 1
PT_CATALOG = 2
PT_REFCOUNT = 3
PT_RADIX = 4
PT_EXTENT = 5
PT_LINEAR = 6
PT_MAP = 7  # generic block-map page
PAGE_TYPE_NAMES = {PT_FREE: "free", PT_STATE: "state", PT_CATALOG: "catalog",
                   PT_REFCOUNT: "refcount", PT_RADIX: "radix node", PT_EXTENT: "extent node",
                   PT_LINEAR: "linear", PT_MAP: "map"}

REFS_PER_PAGE = PAGE_PAYLOAD // 4  # 1020 u32 reference counts per refcount page
CATALOG_RECORD_SIZE = 254
RECORDS_PER_CATALOG_PAGE = PAGE_PAYLOAD // CATALOG_RECORD_SIZE  # 16
MAX_VOLUME_NAME = 128
VOLUME_NAME_RULE = (f"1 to {MAX_VOLUME_NAME} ASCII letters, digits, '.', '_', '+' or '-', "
                    "starting with a letter or digit")
MAP_STATE_SIZE = 64

MIN_CHUNK = 4096
MAX_CHUNK = 1 << 20
DEFAULT_CHUNK = 4096


class FormatError(Exception):
    """The pool's bytes are not what this format says they must be."""


class NotAPool(FormatError):
    """No superblock at all (no magic where one must be): not a pool, rather than a
    damaged one."""


def page_crc(page_no: int, data: bytes | bytearray | memoryview) -> int:
    """CRC of a page's bytes 4.. seeded with its page number (detects misdirected writes)."""
    return zlib.crc32(memoryview(data)[4:], zlib.crc32(page_no.to_bytes(8, "little")))


def seal_page(page_no: int, data: bytearray, page_type: int, seq: int) -> None:
    """Write the header of `data` (type, seq) and its CRC, in place."""
    PAGE_HEADER.pack_into(data, 0, 0, page_type, 0, seq)
    struct.pack_into("<I", data, 0, page_crc(page_no, data))


_ZERO_PAGE = bytes(PAGE_SIZE)


def verify_page(page_no: int, data: bytes | bytearray | memoryview) -> int:
    """The page type of a sealed page; raises FormatError if its CRC does not match.

    An all-zero page (never written) is valid and has type PT_FREE.
    """
    crc, page_type, _fmt, _seq = PAGE_HEADER.unpack_from(data, 0)
    if crc == 0 and page_type == 0 and data == _ZERO_PAGE:  # (a memcmp, not a byte loop)
        return PT_FREE
    if crc != page_crc(page_no, data):
        raise FormatError(f"metadata page {page_no}: checksum mismatch")
    return int(page_type)


# -- layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each region starts (in pages, except the data area in bytes) and how big it is."""

    journal_start: int
    journal_pages: int
    state_page: int
    catalog_start: int
    catalog_pages: int
    meta_ref_start: int
    meta_ref_pages: int
    data_ref_start: int
    data_ref_pages: int
    meta_start: int
    meta_pages: int
    data_start: int  # byte offset of chunk 0
    data_chunks: int

    @property
    def max_volumes(self) -> int:
        return self.catalog_pages * RECORDS_PER_CATALOG_PAGE

    def meta_page(self, index: int) -> int:
        """The absolute page number of metadata page `index`."""
        return self.meta_start + index


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PoolTooSmall(ValueError):
    """A pool of that size leaves no room for data (:func:`plan_layout`)."""


def valid_chunk_size(n: int) -> bool:
    """Whether `n` bytes can be a pool's chunk: a power of two, MIN_CHUNK to MAX_CHUNK."""
    return MIN_CHUNK <= n <= MAX_CHUNK and not n & (n - 1)


def min_pool_size(size: int, chunk_size: int, *, max_volumes: int = 4096,
                  journal_bytes: int | None = None) -> int | None:
    """None if a pool of `size` bytes can be laid out (:func:`plan_layout`, the same
    arguments); else the smallest size above it that can (by bisection). Raises
    ValueError for arguments no size can fix (a bad chunk size)."""
    def fits(n: int) -> bool:
        try:
            plan_layout(n, chunk_size, max_volumes=max_volumes, journal_bytes=journal_bytes)
        except PoolTooSmall:
            return False
        return True

    if fits(size):
        return None
    low, high = size, max(2 * size, 64 << 20)  # `low` does not fit, `high` does
    while not fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def plan_layout(size: int, chunk_size: int, *, max_volumes: int = 4096,
                meta_fraction: float = 1 / 64, journal_bytes: int | None = None) -> Layout:
    """Cut a pool of `size` bytes into regions. Raises PoolTooSmall if it is too small,
    ValueError if the chunk size is not one."""
    if not valid_chunk_size(chunk_size):
        raise ValueError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
    total_pages = size // PAGE_SIZE
    if journal_bytes is None:
        journal_bytes = min(64 << 20, max(4 << 20, size // 128))
    journal_pages = max(64, journal_bytes // PAGE_SIZE)
    catalog_pages = _ceil_div(max_volumes, RECORDS_PER_CATALOG_PAGE)
    meta_pages = max(256, int(total_pages * meta_fraction))
    fixed = SUPERBLOCK_COPIES + journal_pages + 1 + catalog_pages
    meta_ref_pages = _ceil_div(meta_pages, REFS_PER_PAGE)
    # Solve for the chunk count: the data refcount table grows with it.
    avail = size - (fixed + meta_ref_pages + meta_pages) * PAGE_SIZE - chunk_size
    chunks = max(0, avail // chunk_size)
    while chunks > 0:
        data_ref_pages = _ceil_div(chunks, REFS_PER_PAGE)
        head = (fixed + meta_ref_pages + data_ref_pages + meta_pages) * PAGE_SIZE
        data_start = _ceil_div(head, chunk_size) * chunk_size
        if data_start + chunks * chunk_size <= size:
            break
        chunks -= max(1, (data_start + chunks * chunk_size - size) // chunk_size)
    if chunks < 16:
        raise PoolTooSmall(f"a pool of {size} bytes is too small: it leaves no room for data")
    data_ref_pages = _ceil_div(chunks, REFS_PER_PAGE)
    journal_start = SUPERBLOCK_COPIES
    state_page = journal_start + journal_pages
    catalog_start = state_page + 1
    meta_ref_start = catalog_start + catalog_pages
    data_ref_start = meta_ref_start + meta_ref_pages
    meta_start = data_ref_start + data_ref_pages
    head = (meta_start + meta_pages) * PAGE_SIZE
    data_start = _ceil_div(head, chunk_size) * chunk_size
    return Layout(journal_start, journal_pages, state_page, catalog_start, catalog_pages,
                  meta_ref_start, meta_ref_pages, data_ref_start, data_ref_pages,
                  meta_start, meta_pages, data_start, chunks)


# -- superblock ------------------------------------------------------------------------------

_SB = struct.Struct("<8sII16sQII16sQ" + "Q" * 13 + "QQ" + "IIII" + "Q")
_LAYOUT_FIELDS = ("journal_start", "journal_pages", "state_page", "catalog_start",
                  "catalog_pages", "meta_ref_start", "meta_ref_pages", "data_ref_start",
                  "data_ref_pages", "meta_start", "meta_pages", "data_start", "data_chunks")


@dataclass(frozen=True)
class Superblock:
    """The pool's identity and layout, plus the journal position recovery starts from."""

    uuid: bytes
    seq: int
    page_size: int
    chunk_size: int
    blockmap: str
    size: int
    layout: Layout
    journal_tail: int  # page offset inside the journal ring of the oldest needed record
    journal_seq: int  # sequence number expected at journal_tail
    map_params: tuple[int, int, int, int] = (0, 0, 0, 0)  # design-specific (e.g. radix fan-out)
    created_ns: int = 0
    flags: int = 0
    version: int = FORMAT_VERSION

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def pack(self) -> bytes:
        layout = [getattr(self.layout, f) for f in _LAYOUT_FIELDS]
        body = _SB.pack(SUPERBLOCK_MAGIC, self.version, self.flags, self.uuid, self.seq,
                        self.page_size, self.chunk_size, self.blockmap.encode().ljust(16, b"\0"),
                        self.size, *layout, self.journal_tail, self.journal_seq,
                        *self.map_params, self.created_ns)
        page = bytearray(PAGE_SIZE)
        page[:len(body)] = body
        struct.pack_into("<I", page, PAGE_SIZE - 4, zlib.crc32(page[:PAGE_SIZE - 4]))
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes | bytearray | memoryview) -> Superblock:
        page = bytes(page)
        if page[:8] != SUPERBLOCK_MAGIC:
            raise NotAPool("not an nbdserver pool (bad magic)")
        (crc,) = struct.unpack_from("<I", page, PAGE_SIZE - 4)
        if crc != zlib.crc32(page[:PAGE_SIZE - 4]):
            raise FormatError("superblock checksum mismatch")
        f = _SB.unpack_from(page)
        version = f[1]
        if version != FORMAT_VERSION:
            raise FormatError(f"pool format version {version} is not supported "
                              f"(this build reads version {FORMAT_VERSION})")
        layout = Layout(*f[9:22])
        return cls(uuid=f[3], seq=f[4], page_size=f[5], chunk_size=f[6],
                   blockmap=f[7].rstrip(b"\0").decode(), size=f[8], layout=layout,
                   journal_tail=f[22], journal_seq=f[23], map_params=(f[24], f[25], f[26], f[27]),
                   created_ns=f[28], flags=f[2], version=version)

    def next(self, **changes: object) -> Superblock:
        return replace(self, seq=self.seq + 1, **changes)  # type: ignore[arg-type]


# -- the state page ------------------------------------------------------------------------------

_STATE = struct.Struct("<QQQQQQQQQ")


@dataclass
class PoolState:
    """Counters kept in the journaled state page."""

    next_volume_id: int = 1
    data_high_water: int = 0  # chunks at or above this index have never been allocated (read zero)
    data_used: int = 0  # chunks with a nonzero reference count
    meta_used: int = 0  # metadata pages with a nonzero reference count
    data_reserved: int = 0  # chunks promised to guaranteed volumes and not yet allocated
    meta_reserved: int = 0
    meta_next: int = 0  # next-fit cursor for metadata pages
    data_next: int = 0  # next-fit cursor for chunks
    generation: int = 0  # bumped by every snapshot/fork (used by designs that need epochs)

    def pack_into(self, page: bytearray) -> None:
        _STATE.pack_into(page, PAGE_HEADER_SIZE, self.next_volume_id, self.data_high_water,
                         self.data_used, self.meta_used, self.data_reserved, self.meta_reserved,
                         self.meta_next, self.data_next, self.generation)

    @classmethod
    def unpack(cls, page: bytes | bytearray | memoryview) -> PoolState:
        return cls(*_STATE.unpack_from(page, PAGE_HEADER_SIZE))


# -- catalog records -----------------------------------------------------------------------------

VF_IN_USE = 1
VF_READ_ONLY = 2
VF_SNAPSHOT = 4  # created by `volume snapshot`
VF_GUARANTEE = 8
VF_DELETED = 16  # a tombstone: kept while other records name it as parent (depth, lineage)
VF_DELETING = 32  # being deleted: its map is being released; finished at next open

_REC = struct.Struct(f"<IIIHHQQQQ{MAP_STATE_SIZE}s{MAX_VOLUME_NAME}s")
assert _REC.size <= CATALOG_RECORD_SIZE


@dataclass
class VolumeRecord:
    """One volume in the catalog. ``map_state`` is the block map's own bytes (its root)."""

    id: int
    name: str
    size: int
    parent: int = 0
    flags: int = VF_IN_USE
    created_ns: int = 0
    reserved: int = 0  # chunks still promised to this volume (guarantee)
    generation: int = 0
    map_state: bytes = field(default=bytes(MAP_STATE_SIZE))
    slot: int = -1  # index in the catalog (not stored)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & VF_READ_ONLY)

    @property
    def is_snapshot(self) -> bool:
        return bool(self.flags & VF_SNAPSHOT)

    @property
    def guaranteed(self) -> bool:
        return bool(self.flags & VF_GUARANTEE)

    @property
    def deleted(self) -> bool:
        return bool(self.flags & (VF_DELETED | VF_DELETING))

    def pack(self) -> bytes:
        name = self.name.encode()
        rec = _REC.pack(self.id, self.flags, self.parent, len(name), 0, self.size,
                        self.created_ns, self.reserved, self.generation,
                        self.map_state.ljust(MAP_STATE_SIZE, b"\0"), name)
        return rec.ljust(CATALOG_RECORD_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, slot: int) -> VolumeRecord | None:
        f = _REC.unpack_from(data)
        if not f[1] & VF_IN_USE:
            return None
        name = bytes(f[10][:f[3]]).decode()
        return cls(id=f[0], flags=f[1], parent=f[2], size=f[5], created_ns=f[6],
                   reserved=f[7], generation=f[8], map_state=bytes(f[9]), name=name, slot=slot)
