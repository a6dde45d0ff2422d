"""The metadata journal: record encoding, the ring with PAD and wrap-around, replay.

The ring is simulated in a bytearray here (the journal module is pure: it
encodes into a buffer and reads through a callback); the last tests run it
through a real pool whose journal is small enough to wrap many times.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from poolkit import KiB, PoolEnv, PoolFactory, pattern

from nbdserver.pool.format import PAGE_SIZE
from nbdserver.pool.journal import (
    FLAG_PAD,
    HDR_IDS,
    IDS_PER_INDEX,
    JOURNAL_MAGIC,
    JournalRing,
    ReplayedRecord,
    encode_pad,
    encode_record,
    read_records,
    record_pages,
)
from nbdserver.pool.pool import Pool

_HDR = struct.Struct("<8sQIIIII")


def image(tag: int) -> bytes:
    return pattern(tag, PAGE_SIZE)


class Ring:
    """A journal ring in memory, written the way Pool._commit_locked writes it."""

    def __init__(self, pages: int, start: int = 0, seq: int = 1) -> None:
        """An empty ring whose tail is at `start` (a fresh pool: 0; after a recovery, where
        the replay ended)."""
        self.pages = pages
        self.data = bytearray(pages * PAGE_SIZE)
        self.state = JournalRing(pages, start, start, seq)

    def read(self, pos: int, count: int) -> bytes:
        assert pos >= 0 and pos + count <= self.pages, (pos, count)
        return bytes(self.data[pos * PAGE_SIZE:(pos + count) * PAGE_SIZE])

    def put(self, pos: int, raw: bytes | bytearray | memoryview) -> None:
        self.data[pos * PAGE_SIZE:pos * PAGE_SIZE + len(raw)] = raw

    def commit(self, images: list[tuple[int, bytes]]) -> tuple[int, int, bool]:
        """Append a record (PAD first if needed); returns (position, seq, padded)."""
        total = record_pages(len(images))
        placement = self.state.place(total)
        assert placement is not None, "ring full"
        position, padded = placement
        seq = self.state.seq + (1 if padded else 0)
        if padded:
            self.put(self.state.head, encode_pad(self.state.seq))
        buf = bytearray(total * PAGE_SIZE)
        assert encode_record(seq, images, memoryview(buf)) == total
        self.put(position, buf)
        self.state.advance(position, total, padded)
        return position, seq, padded

    def replay(self, tail: int | None = None, seq: int | None = None
               ) -> tuple[list[ReplayedRecord], tuple[int, int]]:
        records: list[ReplayedRecord] = []
        end: tuple[int, int] | None = None
        for item in read_records(self.read, self.pages,
                                 self.state.tail if tail is None else tail,
                                 1 if seq is None else seq):
            if isinstance(item, tuple):
                end = item
            else:
                records.append(item)
        assert end is not None, "read_records must end with (position, seq)"
        return records, end


def test_record_pages() -> None:
    assert record_pages(1) == 2
    assert record_pages(HDR_IDS) == 1 + HDR_IDS
    assert record_pages(HDR_IDS + 1) == 1 + 1 + HDR_IDS + 1
    assert record_pages(HDR_IDS + IDS_PER_INDEX) == 1 + 1 + HDR_IDS + IDS_PER_INDEX
    assert record_pages(HDR_IDS + IDS_PER_INDEX + 1) == 1 + 2 + HDR_IDS + IDS_PER_INDEX + 1


@pytest.mark.parametrize("npages", [0, 1, 3, HDR_IDS, HDR_IDS + 1, HDR_IDS + IDS_PER_INDEX + 5])
def test_encode_and_read_back(npages: int) -> None:
    images = [(1000 + 7 * i, image(i)) for i in range(npages)]
    ring = Ring(record_pages(npages) + 8)
    position, seq, padded = ring.commit(images)
    assert (position, seq, padded) == (0, 1, False)
    records, end = ring.replay()
    assert len(records) == 1
    rec = records[0]
    assert (rec.seq, rec.position, rec.total_pages) == (1, 0, record_pages(npages))
    assert rec.images == dict(images)
    assert end == (record_pages(npages), 2)


def test_header_fields_and_crc() -> None:
    buf = bytearray(3 * PAGE_SIZE)
    total = encode_record(42, [(5, image(1)), (9, image(2))], memoryview(buf))
    magic, seq, npages, index_pages, tot, flags, crc = _HDR.unpack_from(buf)
    assert (magic, seq, npages, index_pages, tot, flags) == (JOURNAL_MAGIC, 42, 2, 0, 3, 0)
    assert total == 3
    check = bytearray(buf)
    struct.pack_into("<I", check, _HDR.size - 4, 0)
    assert zlib.crc32(check) == crc
    assert struct.unpack_from("<2Q", buf, _HDR.size) == (5, 9)
    assert buf[PAGE_SIZE:2 * PAGE_SIZE] == image(1)


def test_pad_record() -> None:
    pad = encode_pad(7)
    magic, seq, npages, index_pages, total, flags, crc = _HDR.unpack_from(pad)
    assert (magic, seq, npages, index_pages, total, flags) == (JOURNAL_MAGIC, 7, 0, 0, 1,
                                                                FLAG_PAD)
    check = bytearray(pad)
    struct.pack_into("<I", check, _HDR.size - 4, 0)
    assert zlib.crc32(check) == crc


def test_replay_in_order_with_sequence_numbers() -> None:
    ring = Ring(64)
    for i in range(5):
        ring.commit([(i, image(i)), (100 + i, image(100 + i))])
    records, end = ring.replay()
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert [r.position for r in records] == [0, 3, 6, 9, 12]
    assert end == (15, 6)
    assert records[3].images == {3: image(3), 103: image(103)}


def test_replay_from_a_later_tail() -> None:
    ring = Ring(64)
    for i in range(4):
        ring.commit([(i, image(i))])
    records, end = ring.replay(tail=4, seq=3)
    assert [r.seq for r in records] == [3, 4]
    assert end == (8, 5)


def test_wrong_expected_seq_replays_nothing() -> None:
    ring = Ring(64)
    ring.commit([(1, image(1))])
    records, end = ring.replay(tail=0, seq=2)
    assert records == [] and end == (0, 2)


def test_pad_and_wrap_around() -> None:
    """Records of varying sizes through a small ring whose tail starts anywhere (as after
    a recovery), checkpointing when it is full (as the pool does): after every commit,
    replay from the checkpoint finds exactly the records written since, in order, across
    PADs and the end of the ring."""
    pads = wraps = 0
    for start in range(0, 23, 2):
        ring = Ring(23, start)
        tail, tail_seq = start, 1
        since: list[tuple[int, dict[int, bytes]]] = []
        for i in range(25):
            n = 1 + (i * 5 + start) % 7
            images = [(1000 * i + k, image(1000 * i + k)) for k in range(n)]
            if ring.state.place(record_pages(n)) is None:
                ring.state.checkpointed()
                assert ring.state.place(record_pages(n)) is not None
                tail, tail_seq = ring.state.tail, ring.state.seq
                since = []
            head = ring.state.head
            pos, seq, padded = ring.commit(images)
            pads += padded
            wraps += ring.state.head < head or padded
            assert pos == (0 if padded else head)
            since.append((seq, dict(images)))
            records, end = ring.replay(tail=tail, seq=tail_seq)
            assert [(r.seq, r.images) for r in records] == since
            assert end == (ring.state.head, ring.state.seq)
    assert pads >= 3 and wraps >= 5


def test_torn_record_stops_replay() -> None:
    ring = Ring(64)
    for i in range(4):
        ring.commit([(i, image(i)), (i + 100, image(i + 100))])
    # Tear the third record: one byte of its second image never reached the disk.
    ring.data[(6 + 2) * PAGE_SIZE + 100] ^= 0xFF
    records, end = ring.replay()
    assert [r.seq for r in records] == [1, 2]
    assert end == (6, 3)


def test_torn_header_stops_replay() -> None:
    ring = Ring(64)
    for i in range(3):
        ring.commit([(i, image(i))])
    ring.data[2 * PAGE_SIZE + 40] ^= 1  # a page number in the second header
    records, end = ring.replay()
    assert [r.seq for r in records] == [1]
    assert end == (2, 2)


def test_torn_pad_stops_replay() -> None:
    ring = Ring(12, start=9, seq=3)  # after a recovery that ended at 9
    pos, seq, padded = ring.commit([(k, image(k)) for k in range(3)])  # pad at 9, then 0..4
    assert padded and pos == 0
    ring.data[9 * PAGE_SIZE + 20] ^= 1
    records, end = ring.replay(tail=9, seq=seq - 1)
    assert records == [] and end == (9, seq - 1)


def test_stale_record_from_an_earlier_lap_stops_replay() -> None:
    ring = Ring(16)
    for i in range(5):  # 5 records of 3 pages: 0..15
        ring.commit([(i, image(i)), (50 + i, image(50 + i))])
    assert ring.state.head == 15
    ring.state = JournalRing(16, 15, 15, 6)  # reopened after a recovery that ended at 15
    ring.commit([(7, image(7))])  # 2 pages: PAD at 15, record at 0..2 with seq 7
    records, end = ring.replay(tail=15, seq=6)
    # After the new record comes the old one at 2? No: the old ones start at 0, 3, 6...;
    # the page at 2 is inside old record 1 (an image), not a header: replay stops there.
    assert [r.seq for r in records] == [7]
    assert end == (2, 8)
    # Make the position after the new record hold an old header (seq 2, stale).
    ring2 = Ring(16)
    for i in range(5):
        ring2.commit([(i, image(i)), (50 + i, image(50 + i))])
    ring2.state = JournalRing(16, 15, 15, 6)
    ring2.commit([(8, image(8)), (9, image(9))])  # 3 pages: PAD at 15, record 0..3
    records, end = ring2.replay(tail=15, seq=6)
    assert [r.seq for r in records] == [7]
    old_header = _HDR.unpack_from(ring2.data, 3 * PAGE_SIZE)
    assert old_header[0] == JOURNAL_MAGIC and old_header[1] == 2  # the stale one is there
    assert end == (3, 8)


def test_record_running_past_the_end_is_ignored() -> None:
    ring = Ring(8)
    buf = bytearray(4 * PAGE_SIZE)
    encode_record(1, [(1, image(1)), (2, image(2)), (3, image(3))], memoryview(buf))
    ring.put(6, buf[:2 * PAGE_SIZE])  # claims 4 pages from 6 in an 8-page ring
    records, end = ring.replay(tail=6, seq=1)
    assert records == [] and end == (6, 1)


def test_ring_accounting() -> None:
    ring = JournalRing(10, 0, 0, 1)
    assert ring.free_pages() == 9
    assert ring.place(4) == (0, False)
    ring.advance(0, 4, False)
    assert (ring.head, ring.seq, ring.used) == (4, 2, 4)
    assert ring.place(5) == (4, False)
    ring.advance(4, 5, False)
    assert ring.free_pages() == 0
    assert ring.place(1) is None  # one page always stays free
    ring.checkpointed()
    assert (ring.tail, ring.head, ring.used) == (0, 0, 0), "empty: starts again at page 0"
    assert ring.place(9) == (0, False)
    ring = JournalRing(10, 9, 9, 3)  # after a recovery that ended at 9
    assert ring.place(2) == (0, True)  # 9 + 2 > 10: PAD at 9
    ring.advance(0, 2, True)
    assert (ring.head, ring.seq, ring.used) == (2, 5, 3)
    assert ring.place(8) is None  # 3 + 8 > 9
    ring.checkpointed()
    assert ring.place(8) == (0, False)
    with pytest.raises(ValueError, match="exceeds the ring"):
        ring.place(10)
    assert JournalRing(10, 3, 7, 1).used == 4
    assert JournalRing(10, 7, 3, 1).used == 6


# -- through a real pool -----------------------------------------------------------------


async def test_pool_journal_wraps_and_recovers(make_pool: PoolFactory) -> None:
    """Many commits through a 64-page ring (PADs, checkpoints), then a crash: every
    flushed write survives the replay and the pool checks clean."""
    env = await make_pool("radix", journal_bytes=256 * KiB)
    pool = env.pool
    vol = await env.create("v", 256 * KiB)
    model = bytearray(256 * KiB)
    start_seq, sb_seq = pool.ring.seq, pool.sb.seq
    wraps = 0
    for i in range(120):
        off = (i * 37 % 60) * 4096 + (i % 3) * 512
        data = pattern(i, 4096 + 512 * (i % 5))
        data = data[:256 * KiB - off]
        await vol.write(off, data)
        model[off:off + len(data)] = data
        gone = (i * 11 % 64) * 4096  # a trim every time: each flush commits metadata
        await vol.trim(gone, 4096)
        model[gone:gone + 4096] = bytes(4096)
        head = pool.ring.head
        await vol.flush()
        wraps += pool.ring.head < head
    assert pool.ring.seq - start_seq >= 120
    assert wraps >= 3, "the ring never wrapped"
    assert pool.sb.seq > sb_seq, "never checkpointed"
    await env.crash()  # no final commit, no checkpoint
    assert await env.vol("v").read_all() == model
    await env.assert_clean()


async def test_recovery_replays_unwritten_home_pages(make_pool: PoolFactory) -> None:
    """Crash right after the journal write, before any home write: replay restores."""
    env = await make_pool("radix", journal_bytes=1024 * KiB)
    vol = await env.create("v", 128 * KiB)
    await env.pool.close()  # checkpointed: a clean start
    await env.release("v")
    await env.open()
    vol = env.vol("v")
    data = pattern(5, 64 * KiB)
    await vol.write(4096, data)
    pool = env.pool
    written: list[int] = []
    pool._write_home = lambda images: written.extend(p for p, _ in images)  # type: ignore[method-assign]
    await vol.flush()
    assert written, "the commit had metadata to write home"
    await env.crash()
    got = await env.vol("v").read_all()
    assert got[4096:4096 + len(data)] == data and not any(got[:4096])
    await env.assert_clean()


def test_a_checkpoint_makes_room_for_any_record_that_fits_the_ring() -> None:
    """After a checkpoint the ring is empty: any record of up to ring-1 pages must then be
    placeable, wherever the head was (else commit checkpoints forever)."""
    for head in range(0, 64):
        ring = JournalRing(64, 0, 0, 1)
        if head:
            ring.advance(0, head, False)
        ring.checkpointed()
        for total in (1, 30, 50, 63):
            assert ring.place(total) is not None, (head, total)


async def test_large_commit_when_the_head_is_near_the_end(make_pool: PoolFactory) -> None:
    """A commit of most of the ring's size, when the head is far along: it does not fit
    before the end, and with a PAD it would overrun the tail; after a checkpoint it must
    fit (it used to checkpoint forever)."""
    import asyncio

    from nbdserver.pool.format import PT_RADIX

    env = await make_pool("radix", journal_bytes=256 * KiB, cache_bytes=4 << 20)
    pool = env.pool
    assert pool.ring.ring_pages == 64
    vol = await env.create("v", 1 << 40)  # fan-out 4: a 14-level tree
    for i in range(5):
        await vol.write(i * (200 << 30), pattern(i, 4096))
        await vol.flush()
    nodes = [pool.layout.meta_page(p) for p in range(pool.layout.meta_pages)
             if pool.cache.peek(pool.layout.meta_page(p)) is not None
             and pool.meta.get(p) > 0]
    assert len(nodes) >= 45
    while pool.ring.head < 30:
        await vol.trim(0, 4096)
        await vol.write(0, pattern(9, 4096))
        await vol.flush()

    def touch() -> None:
        for page_no in nodes[:45]:
            pool.cache.modify(page_no, PT_RADIX)  # dirty, unchanged

    await pool.cache.run(touch)
    await asyncio.wait_for(pool.commit(), timeout=30)
    await env.reopen()
    assert await env.vol("v").read(3 * (200 << 30), 4096) == pattern(3, 4096)
    await env.assert_clean()


async def test_a_commit_after_a_slow_fdatasync_fits_one_buffer(tmp_path: Path) -> None:
    """With the default 64 MiB journal (pools of 8 GiB and more), half the ring let 8,188
    pages be dirty; a commit taken after a slow fdatasync then held more pages than one
    buffer can encode (32 MiB), failed, and the pool stopped committing (every FLUSH
    EIO until a restart). The limit is now also half of what one buffer holds."""
    from nbdserver.pool import journal
    from nbdserver.pool.pool import MAX_RECORD_PAGES

    # (radix: first writes 2 MiB apart dirty a leaf each, so the dirty pages pile up)
    env = PoolEnv(tmp_path / "pool.img", "radix", size=8 << 30, cache_bytes=64 << 20,
                  offline=False, small=False, journal_bytes=None, max_volumes=64)
    await env.open()
    pool = env.pool
    assert pool.layout.journal_pages >= 2 * MAX_RECORD_PAGES  # (the default: 64 MiB)
    limit = pool.dirty_limit()
    assert journal.record_pages(limit + pool.record_room()) <= MAX_RECORD_PAGES
    largest = [0]
    engine = pool.engine
    plain_call, plain_commit = engine.call_blocking, Pool._commit_locked
    slowed: list[int] = []
    waited: list[int] = []  # the dirty pages when the slow fdatasync ended

    async def slow(fn: Any, *args: Any) -> Any:  # the first fdatasync lasts until the
        if getattr(fn, "__name__", "") == "flush" and not slowed:  # limit is reached
            slowed.append(1)
            end = time.monotonic() + 30
            while pool.cache.dirty_count < limit - 16 and time.monotonic() < end:
                await asyncio.sleep(0.05)
            waited.append(pool.cache.dirty_count)
        return await plain_call(fn, *args)

    async def watching(self: Pool) -> None:
        largest[0] = max(largest[0], self.cache.dirty_count)
        await plain_commit(self)

    fanout = 510  # first writes 2 MiB apart: each dirties a leaf of its own
    writes = pool.commit_threshold() + limit + 600
    vol = await env.create("v", writes * fanout * 4096 + (1 << 20))
    engine.call_blocking = slow  # type: ignore[method-assign]  # (after the create's commit)
    Pool._commit_locked = watching  # type: ignore[method-assign]
    try:
        room = asyncio.Semaphore(256)

        async def write(i: int) -> None:
            async with room:
                await vol.write(i * fanout * 4096, b"\x5a" * 4096)

        await asyncio.gather(*(write(i) for i in range(writes)))
        await vol.flush()
    finally:
        engine.call_blocking = plain_call  # type: ignore[method-assign]
        Pool._commit_locked = plain_commit  # type: ignore[method-assign]
    assert waited and waited[0] >= limit - 16, (waited, limit)  # they piled up meanwhile
    assert largest[0] >= limit - 16  # and the commit after it really held that many
    assert pool.failed is None
    await env.close()
