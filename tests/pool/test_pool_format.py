"""The on-disk format: layout, superblock copies, page checksums, catalog records."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SERVER_CMD, run
from poolkit import KiB, MiB, PoolEnv, PoolFactory, pattern

from nbdserver.errors import NbdError, UserError
from nbdserver.pool.format import (
    CATALOG_RECORD_SIZE,
    MAP_STATE_SIZE,
    PAGE_SIZE,
    PT_CATALOG,
    PT_FREE,
    PT_RADIX,
    VF_GUARANTEE,
    VF_IN_USE,
    VF_SNAPSHOT,
    FormatError,
    PoolState,
    Superblock,
    VolumeRecord,
    page_crc,
    plan_layout,
    seal_page,
    verify_page,
)
from nbdserver.pool.pool import Pool, _read_superblock, read_superblock
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.device import open_device
from nbdserver.storage.engine import make_engine

# -- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8 * MiB, 16 * MiB + 12345, 100 * MiB, 3 << 30])
@pytest.mark.parametrize("chunk", [4096, 16384, 1 << 20])
def test_layout_regions_are_ordered_and_fit(size: int, chunk: int) -> None:
    try:
        lay = plan_layout(size, chunk)
    except ValueError:
        assert size < 32 * MiB and chunk == 1 << 20  # 16 chunks of 1 MiB do not fit
        return
    assert lay.journal_start == 2
    assert lay.state_page == lay.journal_start + lay.journal_pages
    assert lay.catalog_start == lay.state_page + 1
    assert lay.meta_ref_start == lay.catalog_start + lay.catalog_pages
    assert lay.data_ref_start == lay.meta_ref_start + lay.meta_ref_pages
    assert lay.meta_start == lay.data_ref_start + lay.data_ref_pages
    assert lay.meta_ref_pages * 1020 >= lay.meta_pages
    assert lay.data_ref_pages * 1020 >= lay.data_chunks
    assert lay.data_start >= (lay.meta_start + lay.meta_pages) * PAGE_SIZE
    assert lay.data_start % chunk == 0
    assert lay.data_start + lay.data_chunks * chunk <= size
    assert size - (lay.data_start + lay.data_chunks * chunk) < 2 * chunk + 1020 * PAGE_SIZE
    assert lay.max_volumes >= 4096


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="power of two"):
        plan_layout(64 * MiB, 3 * 4096)
    with pytest.raises(ValueError, match="power of two"):
        plan_layout(64 * MiB, 2048)
    with pytest.raises(ValueError, match="too small"):
        plan_layout(1 * MiB, 4096)


# -- superblock ----------------------------------------------------------------------------


def sample_superblock() -> Superblock:
    return Superblock(uuid=bytes(range(16)), seq=77, page_size=PAGE_SIZE, chunk_size=16384,
                      blockmap="extent", size=123 * MiB,
                      layout=plan_layout(123 * MiB, 16384, max_volumes=64),
                      journal_tail=13, journal_seq=9001, map_params=(4, 5, 6, 7),
                      created_ns=1_700_000_000_123_456_789, flags=3)


def test_superblock_round_trip() -> None:
    sb = sample_superblock()
    raw = sb.pack()
    assert len(raw) == PAGE_SIZE and raw[:8] == b"NBDSPOOL"
    assert Superblock.unpack(raw) == sb
    nxt = sb.next(journal_tail=1)
    assert (nxt.seq, nxt.journal_tail, nxt.layout) == (78, 1, sb.layout)
    assert sb.uuid_str == "00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_superblock_bad_crc_magic_version() -> None:
    raw = bytearray(sample_superblock().pack())
    raw[100] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        Superblock.unpack(raw)
    with pytest.raises(FormatError, match="bad magic"):
        Superblock.unpack(bytes(PAGE_SIZE))
    newer = replace(sample_superblock(), version=2).pack()
    with pytest.raises(FormatError, match="version 2 is not supported"):
        Superblock.unpack(newer)


def _write_raw(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_raw(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def test_torn_superblock_copy_falls_back_to_the_other(make_pool: PoolFactory) -> None:
    env = await make_pool("radix")
    vol = await env.create("v", 64 * KiB)
    await vol.write(0, pattern(1, 64 * KiB))
    await env.close()
    await env.open()  # each close checkpoints: both copies have been written
    await env.close()
    copies = [Superblock.unpack(_read_raw(env.path, c * PAGE_SIZE, PAGE_SIZE)) for c in (0, 1)]
    newest = max(range(2), key=lambda c: copies[c].seq)
    assert copies[newest].seq == copies[1 - newest].seq + 1, "copies are written alternately"
    # Tear the newest copy: half of it is from the new write, half is old garbage.
    _write_raw(env.path, newest * PAGE_SIZE + 2048, b"\xa5" * 2048)
    sb = read_superblock(env.path)
    assert sb.seq == copies[1 - newest].seq
    await env.open()
    assert await env.vol("v").read_all() == pattern(1, 64 * KiB)
    report = await env.assert_clean()  # clean, and `pool check` says what it saw
    assert len(report.warnings) == 1
    assert f"superblock copy {newest} is damaged" in report.warnings[0]
    await env.close()
    # The next checkpoint goes over the torn copy (the older valid one stays): both valid.
    again = sorted(Superblock.unpack(_read_raw(env.path, c * PAGE_SIZE, PAGE_SIZE)).seq
                   for c in (0, 1))
    assert again == [sb.seq, sb.seq + 1]
    await env.open()
    assert (await env.assert_clean()).warnings == []


async def test_superblock_writes_never_overwrite_the_newest_copy(
        make_pool: PoolFactory) -> None:
    """Every superblock write goes over the older copy, so a torn write always leaves
    the newest complete state readable."""
    env = await make_pool("radix")
    pool = env.pool
    vol = await env.create("v", 64 * KiB)
    for i in range(6):
        before = [Superblock.unpack(_read_raw(env.path, c * PAGE_SIZE, PAGE_SIZE))
                  for c in (0, 1)]
        newest = max(before, key=lambda s: s.seq)
        await vol.write(0, pattern(i, 4096))
        async with pool._commit_lock:
            await pool._checkpoint()
        after = [Superblock.unpack(_read_raw(env.path, c * PAGE_SIZE, PAGE_SIZE))
                 for c in (0, 1)]
        assert newest in after, f"checkpoint {i} overwrote the newest superblock copy"


async def test_both_superblock_copies_bad(make_pool: PoolFactory) -> None:
    env = await make_pool("radix")
    await env.close()
    _write_raw(env.path, 100, b"\xff")
    _write_raw(env.path, PAGE_SIZE + 100, b"\xff")
    with pytest.raises(UserError, match="no valid superblock"):
        read_superblock(env.path)
    with pytest.raises(UserError, match="no valid superblock"):
        await env.open()


def test_superblock_copies_of_different_pools(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    Pool.create(a, 16 * MiB, max_volumes=64)
    Pool.create(b, 16 * MiB, max_volumes=64)
    _write_raw(a, PAGE_SIZE, _read_raw(b, PAGE_SIZE, PAGE_SIZE))
    dev = open_device(a)
    try:
        with pytest.raises(FormatError, match="different pools"):
            _read_superblock(dev)
    finally:
        dev.close()


# -- page checksums ---------------------------------------------------------------------------


def test_page_seal_and_verify() -> None:
    page = bytearray(PAGE_SIZE)
    page[16:] = pattern(4, PAGE_SIZE - 16)
    seal_page(1234, page, PT_RADIX, 55)
    assert verify_page(1234, page) == PT_RADIX
    assert struct.unpack_from("<I", page)[0] == page_crc(1234, page)
    assert struct.unpack_from("<Q", page, 8)[0] == 55
    assert verify_page(99, bytes(PAGE_SIZE)) == PT_FREE, "a never-written page is free"
    for pos in (4, 8, 16, 2000, PAGE_SIZE - 1):
        bad = bytearray(page)
        bad[pos] ^= 0x10
        with pytest.raises(FormatError, match="metadata page 1234: checksum mismatch"):
            verify_page(1234, bad)


def test_misdirected_page_is_detected() -> None:
    """A page image written at the wrong place (or read from it) carries another page's
    number in its CRC: it must never be taken for the page that belongs there."""
    page = bytearray(PAGE_SIZE)
    page[16:] = pattern(5, PAGE_SIZE - 16)
    seal_page(500, page, PT_RADIX, 1)
    for wrong in (501, 499, 500 + (1 << 32), 0):
        with pytest.raises(FormatError, match=f"metadata page {wrong}"):
            verify_page(wrong, page)


async def _two_written_volumes(env: PoolEnv, b_bytes: int) -> tuple[int, int]:
    """Radix volumes 'a' (256 KiB of pattern 1) and 'b' (`b_bytes` of pattern 2); the
    metadata page numbers of their map roots."""
    a = await env.create("a", 256 * KiB)
    b = await env.create("b", 256 * KiB)
    await a.write(0, pattern(1, 256 * KiB))
    await b.write(0, pattern(2, b_bytes))
    pool = env.pool
    roots = (pool.map._root(pool.volume(name))[0] for name in ("a", "b"))
    page_a, page_b = (pool.layout.meta_page((root & ((1 << 40) - 1)) - 1) for root in roots)
    return page_a, page_b


async def test_misdirected_map_page_on_disk_is_reported(make_pool: PoolFactory,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Overwrite one block-map page on disk with another's image: reading the volume
    fails loudly (EIO, never the wrong data) and `check` names the problem."""
    env = await make_pool("radix", offline=False)
    page_a, page_b = await _two_written_volumes(env, 256 * KiB)
    await env.close()
    _write_raw(env.path, page_a * PAGE_SIZE, _read_raw(env.path, page_b * PAGE_SIZE, PAGE_SIZE))
    await env.open()
    with caplog.at_level(logging.ERROR, logger="nbdserver.volume"), \
            pytest.raises(NbdError) as e:
        await env.vol("a").read(0, 4096)
    assert e.value.errno == errno.EIO and "checksum mismatch" in str(e.value)
    assert not any(r.exc_info for r in caplog.records), "a damaged page is not a bug"
    assert await env.vol("b").read_all() == pattern(2, 256 * KiB)
    report = await env.check()
    assert not report.ok
    assert any(f"metadata page {page_a}: checksum mismatch" in p and "'a'" in p
               for p in report.problems), report.problems


async def test_a_damaged_map_page_is_one_line_in_the_cli_and_no_leak_in_check(
        make_pool: PoolFactory) -> None:
    """A map page that fails its checksum: the volume commands that walk that map fail
    with one line naming the pool and pool check (no traceback); a delete that cannot
    finish says so, and the pool still opens (the deletion is retried and logged at each
    open); the other volume still answers; check names the page and does not call the
    chunks below it leaked."""
    env = await make_pool("radix")
    page_a, _ = await _two_written_volumes(env, 64 * KiB)
    await env.close()
    _write_raw(env.path, page_a * PAGE_SIZE + 300, b"\x5a")
    proc = run([*SERVER_CMD, "volume", "info", env.path, "a"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"pool {env.path}: damaged metadata: metadata page {page_a}: checksum " \
           f"mismatch ('nbdserver pool check {env.path}'" in proc.stderr, proc.stderr
    # volume list still lists every volume (the catalog is whole), says which one it could
    # not walk, and exits 1
    damage = f"volume 'a': damaged metadata: metadata page {page_a}: checksum mismatch"
    for json_out in (False, True):
        proc = run([*SERVER_CMD, "volume", "list", env.path, *(["--json"] * json_out)],
                   check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and damage in proc.stderr, proc.stderr
        if json_out:
            listed = {v["name"]: v for v in json.loads(proc.stdout)}
            assert listed["a"]["exclusive_bytes"] is None and "checksum" in listed["a"]["damaged"]
            assert listed["b"]["exclusive_bytes"] == 64 * KiB and "damaged" not in listed["b"]
        else:
            assert [line.split()[0] for line in proc.stdout.splitlines()] == ["NAME", "a", "b"]
    # --brief reads the catalog only: no map page, so the damage is not in its way
    proc = run([*SERVER_CMD, "volume", "list", env.path, "--brief", "--json"])
    brief = json.loads(proc.stdout)
    assert [v["name"] for v in brief] == ["a", "b"] and proc.stderr == "", proc.stderr
    assert "exclusive_bytes" not in brief[0] and brief[0]["size"] == 256 * KiB, brief
    table = run([*SERVER_CMD, "volume", "list", env.path, "--brief"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PARENT", "DEPTH", "RO", "CREATED", "IN",
                                "USE"], table
    assert [line.split()[0] for line in table[1:]] == ["a", "b"], table
    proc = run([*SERVER_CMD, "volume", "delete", env.path, "a"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"volume 'a' is deleted, but not all of its space could be freed: metadata page " \
           f"{page_a}: checksum mismatch" in proc.stderr, proc.stderr
    proc = run([*SERVER_CMD, "volume", "info", env.path, "b", "--json"])
    assert json.loads(proc.stdout)["name"] == "b"
    assert "the deletion of volume 'a' cannot finish" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    proc = run([*SERVER_CMD, "volume", "list", env.path, "--json"])
    assert [v["name"] for v in json.loads(proc.stdout)] == ["b"]
    await env.open()
    await env.create("a", 64 * KiB)  # the name is free again (the old 'a' is half deleted)
    report = await env.check()
    assert report.volumes == 2 and not any("two live volumes" in p for p in report.problems)
    assert any(f"metadata page {page_a}: checksum mismatch" in p and "'a'" in p
               for p in report.problems), report.problems
    assert not any("leaked" in p and "not counted as leaked" not in p
                   for p in report.problems), report.problems
    assert any(p.startswith("data chunks: ") and "not counted as leaked" in p
               for p in report.problems), report.problems
    assert report.leaked_chunks is None and report.leaked_pages is None  # unknown


async def test_bad_catalog_page_refuses_open(make_pool: PoolFactory) -> None:
    env = await make_pool("radix")
    await env.create("a", 64 * KiB)
    cat = env.pool.layout.catalog_start
    await env.close()
    _write_raw(env.path, cat * PAGE_SIZE + 300, b"\x01")
    engine = make_engine(asyncio.get_running_loop())
    try:
        with pytest.raises(UserError, match=f"metadata page {cat}: checksum"):
            await Pool.open(env.path, engine, BufferPool())
    finally:
        engine.close()


# -- records ---------------------------------------------------------------------------------


def test_volume_record_round_trip() -> None:
    rec = VolumeRecord(id=77, name="vm-7.disk+1_x", size=10 << 30, parent=3,
                       flags=VF_IN_USE | VF_SNAPSHOT | VF_GUARANTEE, created_ns=123456789,
                       reserved=42, generation=9, map_state=bytes(range(MAP_STATE_SIZE)),
                       slot=5)
    raw = rec.pack()
    assert len(raw) == CATALOG_RECORD_SIZE
    back = VolumeRecord.unpack(raw, 5)
    assert back == rec
    assert back is not None and back.is_snapshot and back.guaranteed and not back.deleted
    assert VolumeRecord.unpack(bytes(CATALOG_RECORD_SIZE), 0) is None
    long = VolumeRecord(id=1, name="n" * 128, size=512)
    back = VolumeRecord.unpack(long.pack(), 0)
    assert back is not None and back.name == "n" * 128


def test_pool_state_round_trip() -> None:
    st = PoolState(next_volume_id=5, data_high_water=6, data_used=7, meta_used=8,
                   data_reserved=9, meta_reserved=10, meta_next=11, data_next=12, generation=13)
    page = bytearray(PAGE_SIZE)
    st.pack_into(page)
    seal_page(3, page, PT_CATALOG, 1)
    assert PoolState.unpack(page) == st
