"""The metadata journal: a ring of committed transactions, and recovery.

A transaction is every metadata page changed since the previous commit, as full
page images. Committing writes one record to the ring and makes it durable;
only then are the images written to their home locations (in the background).
Recovery replays complete records from the checkpointed tail, so a crash at any
instant leaves the pool as of the last durable commit: a record whose checksum
does not match (torn, or never completed) ends the replay.

Record layout (page granular, contiguous in the ring)::

    header page   magic, seq, npages, index pages, total pages, flags, crc,
                  then the first page numbers (u64)
    index pages   the remaining page numbers, 512 per page
    images        npages page images, in the order of the page numbers

The CRC covers the header (with the CRC field zero), the index and the images.
A record that does not fit before the end of the ring is preceded by a PAD
record, which sends the reader back to the start. The sequence number of each
record is one more than the previous, which is how the reader tells a current
record from a stale one left by an earlier lap of the ring.

The superblock holds the tail: the ring position and sequence number of the
oldest record recovery may need. It moves (a checkpoint) only after every page
image written so far has been written home and synced, and only when the
ring is full or the pool is closed, so a superblock write is rare. A
checkpoint empties the ring, so it puts the tail back at the ring's first
page: from anywhere else a large record could need a PAD that leaves it no
room even in an empty ring. Stale records there have older sequence numbers.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from nbdserver.pool.format import PAGE_SIZE

JOURNAL_MAGIC = b"NBDJRNL1"
_HDR = struct.Struct("<8sQIIIII")  # magic, seq, npages, index_pages, total_pages, flags, crc
HDR_IDS = (PAGE_SIZE - _HDR.size) // 8
IDS_PER_INDEX = PAGE_SIZE // 8
FLAG_PAD = 1


def record_pages(npages: int) -> int:
    """Ring pages a record of `npages` images takes (header + index + images)."""
    extra = max(0, npages - HDR_IDS)
    return 1 + -(-extra // IDS_PER_INDEX) + npages


def encode_record(seq: int, images: Sequence[tuple[int, bytes | bytearray | memoryview]],
                  out: memoryview) -> int:
    """Encode a record into `out` (page aligned, large enough); returns its length in pages."""
    npages = len(images)
    total = record_pages(npages)
    index_pages = total - 1 - npages
    ids = struct.pack(f"<{npages}Q", *(pno for pno, _ in images))
    hdr_ids = ids[:HDR_IDS * 8]
    rest = ids[HDR_IDS * 8:]
    header = bytearray(PAGE_SIZE)
    _HDR.pack_into(header, 0, JOURNAL_MAGIC, seq, npages, index_pages, total, 0, 0)
    header[_HDR.size:_HDR.size + len(hdr_ids)] = hdr_ids
    out[:PAGE_SIZE] = header
    if index_pages:
        idx = bytearray(index_pages * PAGE_SIZE)
        idx[:len(rest)] = rest
        out[PAGE_SIZE:(1 + index_pages) * PAGE_SIZE] = idx
    base = (1 + index_pages) * PAGE_SIZE
    for i, (_, image) in enumerate(images):
        out[base + i * PAGE_SIZE:base + (i + 1) * PAGE_SIZE] = image
    crc = zlib.crc32(out[:total * PAGE_SIZE])
    struct.pack_into("<I", out, _HDR.size - 4, crc)
    return total


def encode_pad(seq: int) -> bytes:
    page = bytearray(PAGE_SIZE)
    _HDR.pack_into(page, 0, JOURNAL_MAGIC, seq, 0, 0, 1, FLAG_PAD, 0)
    struct.pack_into("<I", page, _HDR.size - 4, zlib.crc32(page))
    return bytes(page)


@dataclass
class ReplayedRecord:
    seq: int
    position: int  # ring page where it starts
    total_pages: int
    images: dict[int, bytes]


def read_records(read_pages: Callable[[int, int], bytes], ring_pages: int, tail: int,
                 seq: int) -> Iterator[ReplayedRecord | tuple[int, int]]:
    """Yield the complete records from (`tail`, `seq`) on, then the end as (position, seq).

    `read_pages(ring_page, count)` returns `count` pages of the ring from `ring_page`.
    """
    pos = tail
    laps = 0
    while True:
        if pos >= ring_pages:
            pos = 0
        header = read_pages(pos, 1)
        magic, rseq, npages, index_pages, total, flags, crc = _HDR.unpack_from(header)
        if magic != JOURNAL_MAGIC or rseq != seq or total < 1 or pos + total > ring_pages:
            break
        if flags & FLAG_PAD:
            check = bytearray(header)
            struct.pack_into("<I", check, _HDR.size - 4, 0)
            if zlib.crc32(check) != crc:
                break
            seq += 1
            pos = 0
            laps += 1
            if laps > 1:
                break
            continue
        if total != 1 + index_pages + npages:
            break
        data = bytearray(read_pages(pos, total))
        struct.pack_into("<I", data, _HDR.size - 4, 0)
        if zlib.crc32(data) != crc:
            break
        ids_bytes = bytes(data[_HDR.size:_HDR.size + min(npages, HDR_IDS) * 8])
        if npages > HDR_IDS:
            ids_bytes += bytes(data[PAGE_SIZE:PAGE_SIZE + (npages - HDR_IDS) * 8])
        ids = struct.unpack(f"<{npages}Q", ids_bytes)
        base = (1 + index_pages) * PAGE_SIZE
        images = {pno: bytes(data[base + i * PAGE_SIZE:base + (i + 1) * PAGE_SIZE])
                  for i, pno in enumerate(ids)}
        yield ReplayedRecord(seq, pos, total, images)
        pos += total
        seq += 1
    yield (pos, seq)


class JournalRing:
    """Space accounting of the ring: where the next record goes and when to checkpoint."""

    def __init__(self, ring_pages: int, tail: int, head: int, seq: int) -> None:
        self.ring_pages = ring_pages
        self.tail = tail  # oldest needed record (as in the superblock)
        self.head = head  # where the next record goes
        self.seq = seq  # sequence number of the next record
        self.used = (head - tail) % ring_pages if head != tail else 0

    def place(self, total: int) -> tuple[int, bool] | None:
        """Where a record of `total` pages goes, and whether a PAD must precede it.

        None when the ring lacks the space (checkpoint first).
        """
        if total > self.ring_pages - 1:
            raise ValueError(f"a journal record of {total} pages exceeds the ring "
                             f"({self.ring_pages} pages)")
        pad = self.head + total > self.ring_pages
        waste = (self.ring_pages - self.head) if pad else 0
        if self.used + waste + total > self.ring_pages - 1:
            return None
        return (0 if pad else self.head), pad

    def advance(self, position: int, total: int, padded: bool) -> None:
        waste = (self.ring_pages - self.head) if padded else 0
        self.used += waste + total
        self.head = position + total
        self.seq += 2 if padded else 1
        if self.head >= self.ring_pages:
            self.head = 0

    def checkpointed(self) -> None:
        """Every record so far is home and synced: the ring is empty, and starts again at
        its first page (so that any record of up to ring-1 pages fits, with no PAD)."""
        self.tail = self.head = 0
        self.used = 0

    def free_pages(self) -> int:
        return self.ring_pages - 1 - self.used
