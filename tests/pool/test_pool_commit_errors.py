"""A device error in a commit or a home write: the pool stops committing (fail-stop).

A commit takes its snapshot of the dirty pages before it writes anything, so
one that fails after that cannot be retried; before this was fail-stop, the
next FLUSH found nothing dirty and reported success for a mapping that never
reached the disk, and a page whose home write failed could be evicted and read
back stale. Each test injects the error into the real engine or device of a
pool on a real O_DIRECT file, then checks what the clients see (every later
FLUSH and FUA write fails with EIO, reads stay right) and what a crash
recovers (everything flushed before the error, and a clean ``pool check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable
from typing import Any

import pytest
from poolkit import KiB, PoolEnv, PoolFactory, design_names, pattern

from nbdserver.errors import NbdError
from nbdserver.pool.format import PAGE_SIZE, PT_MAP, seal_page
from nbdserver.pool.pages import PageCache


def _fail_journal_writes(env: PoolEnv, times: int) -> list[int]:
    """Make the next `times` journal writes (the commits' RWF_DSYNC writes) fail with EIO;
    the list counts the failures injected."""
    engine = env.engine
    real = engine.awrite
    failed: list[int] = []

    async def awrite(fd: int, buf: Any, buf_offset: int, length: int, offset: int,
                     dsync: bool = False) -> int:
        if dsync and len(failed) < times:
            failed.append(offset)
            raise OSError(errno.EIO, "injected: journal write failed")
        return await real(fd, buf, buf_offset, length, offset, dsync)

    engine.awrite = awrite  # type: ignore[method-assign]
    return failed


def _fail_fdatasync(env: PoolEnv, times: int) -> list[int]:
    device = env.pool.device
    real = device.flush
    failed: list[int] = []

    def flush() -> None:
        if len(failed) < times:
            failed.append(1)
            raise OSError(errno.EIO, "injected: fdatasync failed")
        real()

    device.flush = flush  # type: ignore[method-assign]
    return failed


async def _eio(op: Callable[[], Any]) -> NbdError:
    with pytest.raises(NbdError) as info:
        await op()
    assert info.value.errno == errno.EIO, info.value
    return info.value


@pytest.mark.parametrize("where", ["journal write", "fdatasync"])
async def test_a_failed_commit_fails_every_later_flush(make_pool: PoolFactory,
                                                       where: str) -> None:
    env = await make_pool("radix", offline=False, cache_bytes=1 << 20)
    vol = await env.create("v", 1 << 20)
    kept = pattern(1, 64 * KiB)
    await vol.write(0, kept)
    await vol.flush()  # durable before any error
    lost = pattern(2, 4096)
    await vol.write(512 * KiB, lost)  # maps a new chunk: the next commit has pages
    failed = (_fail_journal_writes if where == "journal write" else _fail_fdatasync)(env, 1)
    await _eio(vol.flush)
    assert failed, "the error was not injected"
    assert env.pool.failed is not None and where.split()[0] in env.pool.failed
    # The device works again, but the pool does not pretend: the snapshot of the failed
    # commit is gone, so no later FLUSH, FUA write or volume operation may succeed.
    err = await _eio(vol.flush)
    assert "restart" in str(err)
    await _eio(lambda: vol.write(600 * KiB, pattern(3, 4096), fua=True))
    with pytest.raises(NbdError):
        await env.pool.create_volume("w", 1 << 20)
    assert env.pool.info()["failed"] == env.pool.failed
    # Reads still serve what was written, from memory.
    assert await vol.read(0, 64 * KiB) == kept
    assert await vol.read(512 * KiB, 4096) == lost
    # Closing does not commit either (it reports the failure); what a restart finds is
    # the last durable commit: the flushed data, and a consistent pool.
    await env.release("v")
    await _eio(env.pool.close)
    await env.open()
    got = await env.vol("v").read(0, 1 << 20)
    assert got[:64 * KiB] == kept
    assert got[512 * KiB:512 * KiB + 4096] in (lost, bytes(4096))
    await env.assert_clean()
    await env.vol("v").flush()  # the reopened pool commits again
    assert env.pool.failed is None


async def test_a_failed_home_write_keeps_the_page_in_memory(make_pool: PoolFactory) -> None:
    """The journal holds the page, its home copy is stale: it must never be evicted and
    read back from home (with a 16-page cache, other writes would evict it at once)."""
    env = await make_pool("radix", offline=False, journal_bytes=4 << 20)
    pool = env.pool
    vol = await env.create("v", 8 << 20)
    await vol.flush()
    engine = env.engine
    real = engine.write
    data_start = pool.layout.data_start
    refused: list[int] = []
    armed = [True]

    def write(fd: int, buf: Any, buf_offset: int, length: int, offset: int,
              callback: Callable[[int], None], dsync: bool = False) -> None:
        if armed[0] and fd == pool.device.fd and offset < data_start and not dsync:
            refused.append(offset // PAGE_SIZE)  # a home write of a metadata page
            asyncio.get_running_loop().call_soon(callback, -errno.EIO)
            return
        real(fd, buf, buf_offset, length, offset, callback, dsync)

    engine.write = write  # type: ignore[method-assign]
    first = pattern(9, 4096)
    await vol.write(0, first)
    await vol.flush()  # the journal write succeeds: this FLUSH is durable
    await pool._home_done.wait()
    armed[0] = False
    assert refused, "no home write was refused"
    assert pool.failed is not None and "home" in pool.failed
    assert all(p in pool.cache for p in refused)
    for i in range(1, 60):  # other parts of the map: the tiny cache evicts all it can
        await vol.write(i * 16 * KiB, pattern(100 + i, 4096))
    assert all(p in pool.cache for p in refused), "a page not written home was evicted"
    assert await vol.read(0, 4096) == first
    await _eio(vol.flush)
    await env.crash()  # recovery replays the journal, which holds the refused pages
    assert await env.vol("v").read(0, 4096) == first
    await env.assert_clean()


async def test_a_load_does_not_insert_a_copy_older_than_a_home_write() -> None:
    """A page read from home, evicted after a newer image was written home while the
    read was in flight, is read again, not inserted stale."""
    page_no = 500
    disk: dict[int, bytes] = {}

    def sealed(value: int, seq: int) -> bytes:
        b = bytearray(PAGE_SIZE)
        b[100] = value
        seal_page(page_no, b, PT_MAP, seq)
        return bytes(b)

    disk[page_no] = sealed(1, 1)
    late = asyncio.Event()
    reads: list[int] = []

    async def read_page(no: int) -> bytes:
        reads.append(no)
        copy = disk.get(no, bytes(PAGE_SIZE))  # what the device reads now...
        if no == page_no and len(reads) == 1:
            await late.wait()  # ...delivered late
        return copy

    cache = PageCache(16, read_page)
    slow = asyncio.ensure_future(cache.load(page_no))
    await asyncio.sleep(0)
    await cache.load(page_no)  # loaded meanwhile, changed, committed, written home
    with cache.mtr():
        cache.modify(page_no)[100] = 2
    [(_, image)] = cache.take_dirty(2)
    disk[page_no] = bytes(image)
    for p in range(1000, 1020):
        cache.insert_clean(p, bytes(PAGE_SIZE), 0)
    cache.home_written(page_no)
    cache.insert_clean(2000, bytes(PAGE_SIZE), 0)  # evicts it: the coldest clean page
    assert page_no not in cache
    late.set()
    await slow
    assert cache.get(page_no)[100] == 2, "the stale copy of the first read went in"
    assert reads.count(page_no) == 3  # the slow read, the other load, and the read again


@pytest.mark.parametrize("aligned", [True, False])
async def test_no_fua_write_is_acknowledged_after_a_failed_commit(make_pool: PoolFactory,
                                                                  aligned: bool) -> None:
    """A FUA write in place into a chunk whose mapping only the failed commit held: the
    reply would promise that mapping too, so it fails (the fast path, and the slow one)."""
    env = await make_pool("radix", offline=False, cache_bytes=1 << 20)
    chunk = env.chunk_size
    vol = await env.create("v", 16 * chunk)
    await vol.flush()
    await vol.write(0, pattern(7, chunk))  # a new chunk: mapped, not durable
    _fail_journal_writes(env, 1)
    await _eio(vol.flush)
    new = pattern(8, chunk)
    offset, data = (0, new) if aligned else (100, new[100:600])
    await _eio(lambda: vol.write(offset, data, fua=True))
    await env.crash()
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_no_claim_writes_in_place_after_a_failed_commit(make_pool: PoolFactory,
                                                              design: str) -> None:
    """b's copy-on-write left a chunk a's alone, in memory; that change is in the failed
    commit. a's write must not claim the chunk and write it in place: after a restart
    b maps it again, and would read a's bytes. Nor may the claim outlive the failed
    commit it waited for: before, the next write of the chunk found it claimed and went
    in place (the fast path), and was acknowledged."""
    env = await make_pool(design, offline=False, cache_bytes=1 << 20)
    chunk = env.chunk_size
    a = await env.create("a", 16 * chunk)
    old = pattern(1, 16 * chunk)
    await a.write(0, old)
    await env.fork("a", "b")  # commits: every chunk shared
    b = env.vol("b")
    await b.write(3 * chunk, pattern(2, chunk))  # copy-on-write: a's chunk 3 is a's alone
    _fail_journal_writes(env, 1)
    await _eio(b.flush)
    await _eio(lambda: a.write(3 * chunk + 512, pattern(99, 1024)))  # would be a claim
    with contextlib.suppress(NbdError):  # (EIO, as the claim's commit fails again)
        await a.write(3 * chunk, pattern(98, chunk))  # whole chunk: the fast path if claimed
    await env.crash()
    assert await env.vol("b").read(3 * chunk, chunk) == old[3 * chunk:4 * chunk]
    assert await env.vol("a").read(0, 16 * chunk) == old
    await env.assert_clean()


async def test_a_write_waiting_for_freed_space_leaves_no_count_behind_when_the_commit_fails(
        make_pool: PoolFactory) -> None:
    """A write that finds the pool full right after a trim waits for the commit that
    frees the trimmed chunks. When that commit fails, the write fails, and the volume's
    count of writes in flight must be back at zero: a snapshot of the volume (which
    waits for the writes in flight) must answer, not wait for good."""
    env = await make_pool("radix", chunk_size=4096, small=False, offline=False)
    chunk = env.chunk_size
    v = await env.create("v", 64 << 20)
    off = 0
    while True:  # fill the pool
        try:
            await v.write(off, b"\x01" * chunk)
        except NbdError as e:
            assert e.errno == errno.ENOSPC, e
            break
        off += chunk
    await v.flush()
    await v.trim(0, 16 * chunk)  # freed: reusable once a commit makes the trim durable
    assert env.pool.frees_waiting()
    _fail_journal_writes(env, 1)
    await _eio(lambda: v.write(off + 512, b"x" * 1000))  # slow path: waits, commit fails
    assert v.backend._writes == 0
    with pytest.raises(NbdError):  # the pool has failed: refused, not hung
        await asyncio.wait_for(env.pool.clone_volume("v", "s", snapshot=True), 10)
    await env.crash()  # and a restart recovers the last durable commit
    await env.assert_clean()


async def test_a_background_commit_of_a_failed_pool_is_not_reported_at_exit(
        make_pool: PoolFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Background commits queued behind one that failed (or was cancelled by Ctrl-C)
    fail again with the pool's error, which was said once already: nothing more is
    reported when they are collected (it was "Task exception was never retrieved",
    with a traceback, after an interrupted `volume delete`)."""
    import gc

    env = await make_pool("radix")
    env.pool._fail("the fdatasync of a commit was cancelled", quiet=True)
    for _ in range(2):
        env.pool._spawn(env.pool.commit())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not env.pool._background
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text, caplog.text
    await env.crash()  # (a failed pool recovers when opened again)
