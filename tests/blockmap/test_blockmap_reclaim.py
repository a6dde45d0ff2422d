"""Reclamation (invariant 4), for every design, and `pool check` through the CLI.

Volumes are written, forked and snapshotted deeply, trimmed, then all deleted
in random order: the pool's free space is exactly a fresh pool's, no metadata
page stays used, nothing is reserved, and `check` finds no leak, also after
reopening. `nbdserver pool check --json` exits 0 on such a pool, and exits 1
naming the chunk when a reference count is changed on disk behind its back.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from poolkit import MiB, PoolEnv, PoolFactory, design_names, pattern

from nbdserver.blockmap.base import designs
from nbdserver.errors import UserError
from nbdserver.pool.format import (
    PAGE_HEADER,
    PAGE_HEADER_SIZE,
    PAGE_SIZE,
    PT_REFCOUNT,
    VF_DELETING,
    seal_page,
)
from nbdserver.pool.format import REFS_PER_PAGE as REFS


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserver", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


# Pools for build_family: room in the metadata area for its four guaranteed volumes' map
# promises (with extent's tiny nodes about a page per chunk) beside the thin ones' maps.
FAMILY_POOL = 128 * MiB


async def build_family(env: PoolEnv, rng: random.Random) -> None:
    """Volumes with data, deep chains of forks and snapshots, trims and overwrites."""
    chunk = env.chunk_size
    deep = designs()[env.design].supports_clone_of_clone
    for r in range(3):
        root = f"r{r}"
        size = rng.choice([24, 40, 64]) * chunk
        vol = await env.create(root, size, guarantee=r == 2)
        await vol.write(0, pattern(r, size))
        await vol.trim(5 * chunk, 3 * chunk)
        src = root
        for depth in range(6 if deep else 3):
            name = f"{root}-{depth}"
            if depth % 3 == 2:
                await env.snapshot(src, name)
            else:
                await env.fork(src, name, guarantee=depth == 1)
                fvol = env.vol(name)
                for _ in range(4):
                    off = rng.randrange(size - chunk)
                    length = min(size - off, rng.randrange(1, 2 * chunk))
                    await fvol.write(off, pattern(rng.randrange(1000), length))
                await fvol.trim(rng.randrange(size - chunk), chunk + 100)
            if deep:
                src = name if depth % 3 != 2 or rng.random() < 0.5 else src
            # the source writes after each clone: copy-on-write (or copy-out) on its side
            if not env.pool.volume(src).read_only:
                await env.vol(src).write(rng.randrange(size - 100), b"\x5a" * 100)
    await env.pool.commit()


async def delete_all(env: PoolEnv, rng: random.Random) -> None:
    """Delete every volume in random order (a refused one is retried after the others)."""
    left = env.names()
    rng.shuffle(left)
    while left:
        for name in list(left):
            try:
                await env.delete(name)
            except UserError:
                assert env.pool.map.delete_refused(env.pool.volume(name)), (
                    f"delete of {name!r} refused without the design saying why")
                continue
            left.remove(name)


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "tiny-cache"])
@pytest.mark.parametrize("design", design_names())
async def test_deleting_everything_frees_everything(make_pool: PoolFactory, tmp_path: Path,
                                                    design: str, offline: bool) -> None:
    env = await make_pool(design, offline=offline, size=FAMILY_POOL)
    pool = env.pool
    fresh = pool.info()
    fresh_meta = pool.meta.used
    rng = random.Random(f"{design}-{offline}")
    await build_family(env, rng)
    assert pool.data.used > 0
    await env.assert_clean()
    await env.reopen()
    pool = env.pool
    await delete_all(env, rng)
    assert pool.volumes == {}, "tombstones must go with their last descendant"
    info = pool.info()
    assert info["free_bytes"] == fresh["free_bytes"]
    assert info["used_bytes"] == 0 and info["reserved_bytes"] == 0
    assert info["available_bytes"] <= fresh["available_bytes"]  # quarantine until durable
    assert pool.meta.used == fresh_meta
    report = await env.assert_clean()
    assert report.data_chunks_referenced == 0
    await env.reopen()
    assert env.pool.info()["free_bytes"] == fresh["free_bytes"]
    assert env.pool.info()["available_bytes"] == fresh["available_bytes"]
    assert env.pool.meta.used == fresh_meta
    await env.assert_clean()
    # And exactly what a pool made afresh has.
    other = await make_pool(design, offline=offline, size=FAMILY_POOL)
    assert other.pool.info()["free_bytes"] == info["free_bytes"]


def _flip_count(path: Path, page_no: int, index: int, delta: int) -> int:
    """Add `delta` to entry `index` of refcount page `page_no` on disk, resealing the
    page (a valid checksum: only the count is wrong). Returns the new count."""
    fd = os.open(path, os.O_RDWR)
    try:
        page = bytearray(os.pread(fd, PAGE_SIZE, page_no * PAGE_SIZE))
        seq = PAGE_HEADER.unpack_from(page)[3]
        off = PAGE_HEADER_SIZE + 4 * index
        (count,) = struct.unpack_from("<I", page, off)
        struct.pack_into("<I", page, off, count + delta)
        seal_page(page_no, page, PT_REFCOUNT, seq)
        os.pwrite(fd, bytes(page), page_no * PAGE_SIZE)
        os.fsync(fd)
        return count + delta
    finally:
        os.close(fd)


@pytest.mark.parametrize("design", design_names())
async def test_cli_pool_check(make_pool: PoolFactory, design: str) -> None:
    env = await make_pool(design, size=FAMILY_POOL, journal_bytes=None)
    rng = random.Random(design)
    await build_family(env, rng)
    pool = env.pool
    # A chunk mapped by some volume, and a chunk nobody uses.
    vol = pool.volume("r0")
    runs = await pool.cache.run(lambda: pool.map.lookup(vol, 0, 4))
    used_pc = next(r.pc for r in runs if r.pc >= 0)
    free_pc = pool.layout.data_chunks - 1
    while await pool.cache.run(lambda pc=free_pc: pool.data.get(pc)):
        free_pc -= 1
    data_ref = pool.layout.data_ref_start
    await env.close()

    proc = cli("pool", "check", "--json", env.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["leaked_chunks"] == 0 and report["leaked_pages"] == 0
    assert report["data_chunks_referenced"] > 0

    # One count too many on a used chunk: exit 1, the chunk named.
    _flip_count(env.path, data_ref + used_pc // REFS, used_pc % REFS, +1)
    proc = cli("pool", "check", "--json", env.path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert any(f"data chunk {used_pc}:" in p for p in report["problems"]), report["problems"]
    proc = cli("pool", "check", env.path)  # the human form names it too
    assert proc.returncode == 1 and f"data chunk {used_pc}" in proc.stdout

    # Repair that, and leak a free chunk instead: exit 1, named as leaked.
    _flip_count(env.path, data_ref + used_pc // REFS, used_pc % REFS, -1)
    assert cli("pool", "check", env.path).returncode == 0
    _flip_count(env.path, data_ref + free_pc // REFS, free_pc % REFS, +1)
    proc = cli("pool", "check", "--json", env.path)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["leaked_chunks"] == 1
    assert any(f"data chunk {free_pc}: leaked" in p for p in report["problems"])
    assert "Traceback" not in proc.stderr


class _Crash(Exception):
    pass


@pytest.mark.parametrize("design", design_names())
async def test_delete_interrupted_by_a_crash_finishes_at_open(make_pool: PoolFactory,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              design: str) -> None:
    """A crash in the middle of a delete (its map partly released, some of that committed):
    the next open finishes it, and everything comes back."""
    import nbdserver.pool.pool as poolmod

    env = await make_pool(design, offline=False, size=FAMILY_POOL)
    pool = env.pool
    fresh = pool.info()["free_bytes"]
    rng = random.Random(design)
    await build_family(env, rng)
    victim = next(n for n in ("r1", "r1-0", "r1-1") if not pool.map.delete_refused(
        pool.volume(n)))  # r1 has clones: a tombstone stays (linear refuses: its fork)
    keep = {name: await env.vol(name).read_all() for name in env.names() if name != victim}
    monkeypatch.setattr(poolmod, "RELEASE_BUDGET", 3)  # many small steps
    steps = 0
    release = pool.map.release

    def crashing_release(vol: object, budget: int) -> bool:
        nonlocal steps
        steps += 1
        if steps == 6:
            raise _Crash
        return release(vol, budget)  # type: ignore[arg-type]

    monkeypatch.setattr(pool.map, "release", crashing_release)
    with pytest.raises(_Crash):
        await env.delete(victim)
    await pool.commit()  # what was released so far is durable; the rest is not done
    assert steps == 6 and any(v.name == victim and v.flags & VF_DELETING
                              for v in pool.volumes.values())
    await env.crash(reopen=False)
    monkeypatch.undo()
    await env.open()
    assert victim not in env.names()
    for name, data in keep.items():
        assert await env.vol(name).read_all() == data, name
    await env.assert_clean()
    await delete_all(env, rng)
    assert env.pool.info()["free_bytes"] == fresh
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_a_long_delete_reports_its_progress(make_pool: PoolFactory, design: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`volume delete` releases a big map in steps; offline, the CLI shows the bytes freed
    so far (once a second): the operation reports them after each step, growing to what
    the answer says was freed."""
    from nbdserver.control.ops import run_op
    from nbdserver.pool import pool as pool_module

    monkeypatch.setattr(pool_module, "RELEASE_BUDGET", 64)  # entries per step: many steps
    env = await make_pool(design, journal_bytes=None)
    chunk = env.chunk_size
    vol = await env.create("v", 512 * chunk)
    for at in range(0, 512 * chunk, 16 * chunk):
        await vol.write(at, pattern(at, 16 * chunk))
    await env.release("v")
    seen: list[int] = []
    result = await run_op(env.pool, "volume.delete", {"name": "v", "progress": seen.append})
    assert len(seen) > 1, seen
    assert seen == sorted(seen) and seen[-1] <= result["freed_bytes"]
    assert result["freed_bytes"] >= 512 * chunk
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_a_long_check_reports_its_progress(make_pool: PoolFactory, design: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`pool check` counts every reference of every map in one long step; offline, the
    CLI shows which volume it is in and how many references it has counted (once a
    second): the operation reports before each volume and every CHECK_PROGRESS chunk
    references within one, the counts growing to every chunk referenced."""
    from nbdserver.control.ops import run_op
    from nbdserver.pool import pool as pool_module

    monkeypatch.setattr(pool_module, "CHECK_PROGRESS", 32)
    env = await make_pool(design, journal_bytes=None)
    chunk = env.chunk_size
    vol = await env.create("v", 256 * chunk)
    await vol.write(0, pattern(1, 256 * chunk))
    await env.snapshot("v", "s")
    await env.create("w", 64 * chunk)
    seen: list[tuple[str, int, int, int]] = []
    report = await run_op(env.pool, "pool.check",
                          {"progress": lambda *a: seen.append(a)})  # type: ignore[misc]
    assert report["ok"], report
    assert list(dict.fromkeys(s[:3] for s in seen)) == [("v", 1, 3), ("s", 2, 3), ("w", 3, 3)]
    within_v = [s[3] for s in seen if s[0] == "v"]
    assert within_v[0] == 0 and len(within_v) >= 256 // 32
    counts = [s[3] for s in seen]
    assert counts == sorted(counts) and counts[-1] >= 256  # (v's, at least)


@pytest.mark.parametrize("design", design_names())
async def test_a_long_trim_lets_freed_chunks_out_of_quarantine(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TRIM over a big volume unmaps in steps, and commits happen meanwhile (here
    after every step; in a server, FLUSHes and the dirty-page limit). A chunk freed
    by one step leaves quarantine once a commit makes the free durable and the I/O
    begun before it has ended: the TRIM's own steps must not count as such I/O, or
    every chunk it frees stays quarantined (memory, and space a write cannot take)
    until the whole TRIM ends."""
    from nbdserver.blockmap import extent
    monkeypatch.setattr(extent, "UNMAP_BUDGET", 1024)  # (radix: 2,048 per step already)
    env = await make_pool(design, size=64 * MiB, small=False, journal_bytes=None)
    chunk = env.chunk_size
    chunks = 40 * MiB // chunk
    vol = await env.create("v", chunks * chunk)
    for at in range(0, chunks * chunk, MiB):
        await vol.write(at, pattern(at, MiB))
    await vol.flush()
    pool = env.pool
    data = pool.data
    peak = 0
    run_step = pool.run

    async def run_then_commit(op: Any) -> Any:  # a commit after every unmap step
        nonlocal peak
        result = await run_step(op)
        await pool.commit()
        peak = max(peak, len(data.quarantine))
        return result

    monkeypatch.setattr(pool, "run", run_then_commit)
    await vol.trim(0, chunks * chunk)
    monkeypatch.undo()
    await vol.flush()
    assert len(data.quarantine) == 0
    assert await vol.read(0, 4 * chunk) == bytes(4 * chunk)
    assert peak < chunks // 2, f"{peak} of {chunks} freed chunks quarantined at once"
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_chunks_freed_wait_in_bounded_batches(make_pool: PoolFactory, design: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk freed costs memory until the commit that makes the free durable, and
    one map page can free thousands, so frees alone start a commit (FREED_COMMIT) and
    make metadata operations wait for one (FREED_LIMIT), however few pages are dirty:
    deleting and trimming big volumes never piles up more than about FREED_LIMIT."""
    from nbdserver.pool import pool as pool_module
    monkeypatch.setattr(pool_module, "FREED_COMMIT", 512)
    monkeypatch.setattr(pool_module, "FREED_LIMIT", 1024)
    monkeypatch.setattr(pool_module, "RELEASE_BUDGET", 256)
    from nbdserver.blockmap import extent
    monkeypatch.setattr(extent, "UNMAP_BUDGET", 1024)  # chunks one step frees at most
    env = await make_pool(design, size=64 * MiB, small=False, journal_bytes=None,
                          cache_bytes=16 * MiB)
    chunk = env.chunk_size
    chunks = 40 * MiB // chunk
    for name in ("a", "b"):
        vol = await env.create(name, chunks * chunk // 2)
        for at in range(0, chunks * chunk // 2, MiB):
            await vol.write(at, pattern(at, MiB))
    await env.vol("a").flush()
    data = env.pool.data
    batches: list[int] = []
    snapshot = data.snapshot_freed

    def counting_snapshot(seq: int, quarantine: bool) -> None:
        batches.append(data.freed_pending_count())
        snapshot(seq, quarantine)

    monkeypatch.setattr(data, "snapshot_freed", counting_snapshot)
    await env.vol("a").trim(0, chunks * chunk // 2)
    await env.delete("b")
    await env.vol("a").flush()
    assert sum(batches) >= chunks // 2, batches  # (a linear origin's TRIM frees none)
    assert max(batches) <= 1024 + 2048, batches
    await env.assert_clean()


@pytest.mark.parametrize("design", ["radix", "extent"])
async def test_a_long_write_zeroes_does_not_hold_other_frees_in_quarantine(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WRITE_ZEROES with NO_HOLE writes zeros a step (ZERO_STEP) at a time; its I/O
    epoch begins again between steps, or every chunk freed meanwhile by any volume
    (here another volume's TRIM, committed after every step) would stay quarantined
    until the whole request ends."""
    from nbdserver.blockmap import extent
    monkeypatch.setattr(extent, "UNMAP_BUDGET", 1024)
    env = await make_pool(design, size=128 * MiB, small=False, journal_bytes=None)
    chunk = env.chunk_size
    a = await env.create("a", 16 * MiB)
    b = await env.create("b", 64 * MiB)
    for vol, size in ((a, 16 * MiB), (b, 64 * MiB)):
        for at in range(0, size, MiB):
            await vol.write(at, pattern(at, MiB))
    await a.flush()
    pool = env.pool
    peak = 0
    run_step = pool.run

    async def run_then_commit(op: Any) -> Any:
        nonlocal peak
        result = await run_step(op)
        await pool.commit()
        peak = max(peak, len(pool.data.quarantine))
        return result

    zeroing = asyncio.ensure_future(b.zero(0, 64 * MiB, may_trim=False))
    await asyncio.sleep(0.01)  # (its first steps are under way)
    monkeypatch.setattr(pool, "run", run_then_commit)
    await a.trim(0, 16 * MiB)
    still_zeroing = not zeroing.done()
    await zeroing
    monkeypatch.undo()
    assert still_zeroing, "the WRITE_ZEROES ended before the TRIM: nothing was tested"
    freed = 16 * MiB // chunk
    assert peak < freed // 2, f"{peak} of {freed} freed chunks quarantined at once"
    assert await b.read(0, MiB) == bytes(MiB)
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_long_unmaps_fit_a_small_journal(make_pool: PoolFactory, design: str) -> None:
    """With deep maps (small parameters: radix fan-out 4) and a 64-page journal, one
    release step of 2,048 entries dirtied 695 pages: the delete's commit record did not
    fit the ring and the pool failed. A step of TRIM or delete also stops at a quarter
    of the ring of dirty pages (as linear's did), once it has dropped something."""
    env = await make_pool(design, size=512 * MiB, cache_bytes=8 * MiB)  # (small maps and
    chunk = env.chunk_size                                  # poolkit's 256 KiB journal)
    piece = 16 * chunk
    for name in ("v", "w"):
        await env.create(name, 64 * MiB)
    order = list(range(0, 8 * MiB, piece))
    random.Random(3).shuffle(order)
    for i, off in enumerate(order):  # interleaved: each volume's chunks scattered
        await env.vol("v").write(off, pattern(off, piece))
        await env.vol("w").write(i * piece, pattern(i, piece))
    await env.vol("v").trim(0, 4 * MiB)
    await env.delete("w")
    await env.vol("v").flush()
    assert env.pool.failed is None
    assert await env.vol("v").read(4 * MiB, piece) == pattern(4 * MiB, piece)
    await env.reopen()
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_delete_reports_what_it_freed_while_other_volumes_are_written(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """freed_bytes is what the delete itself freed: writes to another volume that take
    chunks during the delete's steps and commits do not count (they made it negative)."""
    from nbdserver.control.ops import run_op
    from nbdserver.pool import pool as pool_module

    monkeypatch.setattr(pool_module, "RELEASE_BUDGET", 64)  # many steps, with awaits
    env = await make_pool(design, journal_bytes=None)
    chunk = env.chunk_size
    a = await env.create("a", 256 * chunk)
    await a.write(0, pattern(1, 256 * chunk))
    await env.snapshot("a", "s")  # shares every chunk of a: frees nothing when deleted
    await env.release("s")
    own = await env.create("own", 64 * chunk)
    await own.write(0, pattern(2, 64 * chunk))  # 64 chunks of its own
    await env.release("own")
    other = await env.create("other", 2048 * chunk)
    stop = asyncio.Event()
    written = [0]

    async def writer() -> None:  # first writes into other: each takes a new chunk
        at = 0
        while not stop.is_set() and at < 2048 * chunk:
            await other.write(at, pattern(at, chunk))
            written[0] += 1
            at += chunk

    task = asyncio.ensure_future(writer())
    await asyncio.sleep(0)
    try:
        before = written[0]
        snap = await run_op(env.pool, "volume.delete", {"name": "s", "progress": None})
        mid = written[0]
        mine = await run_op(env.pool, "volume.delete", {"name": "own", "progress": None})
        assert written[0] > before, "the writer ran during the deletes"
        assert mid > before or written[0] > mid
    finally:
        stop.set()
        await task
    assert snap["freed_bytes"] == 0, snap
    assert mine["freed_bytes"] == 64 * chunk, mine
    await env.assert_clean()
