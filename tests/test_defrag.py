"""``volume defrag``: every design, offline and online under a concurrent writer.

Fragmented volumes are made the way they happen: two volumes written side by
side in random order (one then deleted), a fork whose parent is deleted after
it rewrote chunks here and there, a fork that shares most of its data. After a
defrag each logical run of the volume's own chunks is one physical run, shared
chunks have not moved, every byte reads back, and ``pool check`` is clean.
The online test drives a real server: a client keeps writing (and checking
what it reads) while ``nbdserver volume defrag`` runs through the control
socket.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_CMD, ServerFactory, default_signals, run
from nbdclient import connect

from nbdserver import admin
from nbdserver.blockmap.base import HOLE, Claim, InPlace, designs
from nbdserver.defrag import WINDOW_BYTES, Defrag, defrag_volume
from nbdserver.pool.pool import Pool
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import make_engine
from nbdserver.volume import VolumeBackend


def _load(name: str, path: Path) -> None:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_load("poolkit", Path(__file__).parent / "pool" / "poolkit.py")

from poolkit import MiB, PoolEnv, PoolFactory, Vol, make_pool, pattern  # noqa: E402

__all__ = ["make_pool"]

KiB = 1024
GiB = 1 << 30
CHUNK = 4 * KiB
PIECE = 64 * KiB

FORKING = [d for d in sorted(designs()) if designs()[d].supports_clone_of_clone]


async def new_env(make_pool: PoolFactory, design: str, **kwargs: Any) -> PoolEnv:
    kwargs.setdefault("size", 128 * MiB)
    return await make_pool(design, journal_bytes=None, cache_bytes=8 * MiB, small=False,
                           **kwargs)


async def runs_of(env: PoolEnv, name: str, lc: int = 0, count: int | None = None) -> list[Any]:
    pool = env.pool
    vol = pool.volume(name)
    if count is None:
        count = -(-vol.size // pool.chunk_size) - lc
    return await pool.cache.run(lambda: pool.map.lookup(vol, lc, count))


def mapped(runs: list[Any]) -> dict[int, int]:
    return {r.lc + k: r.pc + k for r in runs if r.pc != HOLE for k in range(r.count)}


def physical_extents(runs: list[Any]) -> int:
    """Maximal logically and physically contiguous mapped runs, whoever wrote them (radix's
    statistics also split a run where the writing volume changes)."""
    count, end = 0, (-1, -1)
    for r in runs:
        if r.pc == HOLE:
            continue
        if (r.lc, r.pc) != end:
            count += 1
        end = (r.lc + r.count, r.pc + r.count)
    return count


async def write_side_by_side(env: PoolEnv, name: str, other: str, length: int,
                             seed: int) -> bytes:
    """Write [0, length) of `name` in 64 KiB pieces in random order, each followed by a
    piece of `other`: what two guests installing at once do to a pool."""
    vol, filler = env.vol(name), env.vol(other)
    data = pattern(seed, length)
    order = list(range(0, length, PIECE))
    random.Random(seed).shuffle(order)
    for i, off in enumerate(order):
        await vol.write(off, data[off:off + PIECE])
        await filler.write(i * PIECE, pattern(seed + 1, PIECE))
    return data


@pytest.mark.parametrize("design", FORKING)
async def test_defrag_makes_an_exclusive_volume_contiguous(make_pool: PoolFactory,
                                                           design: str) -> None:
    env = await new_env(make_pool, design)
    pool = env.pool
    await env.create("v", GiB)
    await env.create("w", 64 * MiB)
    data = await write_side_by_side(env, "v", "w", 8 * MiB, seed=5)
    await env.delete("w")
    stats = await pool.volume_stats(pool.volume("v"))
    assert stats.extents > 4, f"{design}: the setup did not fragment the volume"
    seen: list[tuple[int, int, int]] = []
    result = await defrag_volume(pool, "v", progress=lambda *a: seen.append(a))
    assert result["before"]["extents"] == stats.extents
    assert result["after"]["extents"] == 1
    assert result["after"]["extents_per_gib"] == 1.0
    assert result["done"] and result["next"] is None
    assert 0 < result["moved_bytes"] <= len(data)
    assert result["shared_bytes"] == 0 and result["no_space_bytes"] == 0
    assert seen and seen[-1] == (GiB, GiB, result["moved_bytes"])
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    vol = env.vol("v")
    assert await vol.read(0, len(data)) == data
    assert await vol.read(len(data), 4 * MiB) == bytes(4 * MiB)
    await env.assert_clean()
    assert pool.data.used == len(data) // CHUNK  # the old chunks were freed
    again = await defrag_volume(pool, "v")
    assert again["moved_bytes"] == 0 and again["after"]["extents"] == 1
    await env.reopen()
    assert await env.vol("v").read(0, len(data)) == data
    await env.assert_clean()


@pytest.mark.parametrize("design", FORKING)
@pytest.mark.parametrize("how", ["opened", "reopened"])
async def test_a_volume_opened_during_a_window_keeps_its_writes(
        make_pool: PoolFactory, design: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defrag pauses the writes of the backend the volume has when a window starts. One
    opened during the window's copy (a first export, or a client that reconnects) is
    not paused: its write in place at the old chunk must not be undone by installing
    the copy taken before it. The window is left as it is then."""
    env = await new_env(make_pool, design)
    await env.create("v", GiB)
    await env.create("w", 64 * MiB)
    data = bytearray(await write_side_by_side(env, "v", "w", 2 * MiB, seed=7))
    await env.delete("w")
    if how == "opened":
        await env.release("v")  # not exported when defrag starts
    copy = Defrag._copy
    written: list[int] = []

    async def copy_then_write(self: Defrag, moves: list[tuple[int, int, int]]) -> None:
        await copy(self, moves)
        if not written:  # the first window: a client connects now and writes
            lc = moves[0][0]
            written.append(lc)
            await env.release("v")
            await env.vol("v").write(lc * CHUNK, pattern(99, CHUNK))

    monkeypatch.setattr(Defrag, "_copy", copy_then_write)
    await defrag_volume(env.pool, "v")
    data[written[0] * CHUNK:(written[0] + 1) * CHUNK] = pattern(99, CHUNK)
    assert await env.vol("v").read(0, len(data)) == data
    await env.reopen()
    assert await env.vol("v").read(0, len(data)) == data
    await env.assert_clean()


@pytest.mark.parametrize("design", FORKING)
async def test_defrag_of_an_orphaned_fork_moves_only_the_misplaced_chunks(
        make_pool: PoolFactory, design: str) -> None:
    """A fork rewrote 40 chunks, then its parent was deleted: the 40 chunks go back into
    the holes the parent's copies left, and nothing else moves."""
    env = await new_env(make_pool, design)
    pool = env.pool
    golden = await env.create("golden", 4 * MiB)
    want = bytearray(pattern(1, 4 * MiB))
    for off in range(0, len(want), PIECE):
        await golden.write(off, bytes(want[off:off + PIECE]))
    fork = await env.fork("golden", "fork")
    for lc in random.Random(2).sample(range(1024), 40):
        piece = pattern(100 + lc, CHUNK)
        await fork.write(lc * CHUNK, piece)
        want[lc * CHUNK:(lc + 1) * CHUNK] = piece
    await env.delete("golden")
    assert physical_extents(await runs_of(env, "fork")) > 40
    result = await defrag_volume(pool, "fork")
    assert result["before"]["extents"] > 40
    assert physical_extents(await runs_of(env, "fork")) == 1
    # radix's count also splits where the writer changes (the fork's own chunks, moved or
    # not, and its parent's): it reports physical extents only for one writer
    assert result["after"]["extents"] < result["before"]["extents"]
    if design == "extent":
        assert result["after"]["extents"] == 1
    assert result["moved_bytes"] == 40 * CHUNK
    assert await fork.read_all() == want
    await env.assert_clean()


@pytest.mark.parametrize("design", FORKING)
async def test_defrag_of_a_randomly_rewritten_fork_searches_once_per_window(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork rewrote half its chunks at random (its parent lives on): hundreds of short
    segments of own chunks between shared ones per window. They go one after another
    into the fresh free run the first of them found (its tail), not a search each; every
    segment ends up physically contiguous, shared chunks stay, every byte reads back."""
    env = await new_env(make_pool, design)
    pool = env.pool
    size = 16 * MiB
    golden = await env.create("golden", size)
    base = pattern(8, size)
    for off in range(0, size, MiB):
        await golden.write(off, base[off:off + MiB])
    fork = await env.fork("golden", "fork")
    want = bytearray(base)
    for lc in random.Random(8).sample(range(size // CHUNK), size // CHUNK // 2):
        piece = pattern(300 + lc, CHUNK)
        await fork.write(lc * CHUNK, piece)
        want[lc * CHUNK:(lc + 1) * CHUNK] = piece
    golden_before = mapped(await runs_of(env, "golden"))
    searches = []
    find_free_run = type(pool.data).find_free_run

    def counting(table: Any, *args: Any, **kwargs: Any) -> Any:
        searches.append(args)
        return find_free_run(table, *args, **kwargs)

    monkeypatch.setattr(type(pool.data), "find_free_run", counting)
    result = await defrag_volume(pool, "fork")
    monkeypatch.undo()
    windows = size // WINDOW_BYTES
    assert result["moved_bytes"] > size // 8 and result["no_space_bytes"] == 0
    assert 0 < len(searches) <= 2 * windows, len(searches)
    assert result["after"]["extents"] < result["before"]["extents"]
    vol = pool.volume("fork")
    own = await pool.cache.run(lambda: {
        lc: pc for lc, pc in mapped(pool.map.lookup(vol, 0, size // CHUNK)).items()
        if isinstance(pool.map.write_target(vol, lc), InPlace | Claim)})
    assert len(own) == size // CHUNK // 2
    window = WINDOW_BYTES // CHUNK
    for lc, pc in own.items():  # each logical run of own chunks is one physical run, but
        if lc + 1 in own and (lc + 1) % window:  # where a window's end splits it
            assert own[lc + 1] == pc + 1, f"{design}: chunks {lc} and {lc + 1} apart"
    assert mapped(await runs_of(env, "golden")) == golden_before
    assert await fork.read_all() == want
    assert await golden.read_all() == base
    await env.assert_clean()


@pytest.mark.parametrize("design", FORKING)
async def test_defrag_leaves_shared_chunks_where_they_are(make_pool: PoolFactory,
                                                          design: str) -> None:
    env = await new_env(make_pool, design)
    pool = env.pool
    golden = await env.create("golden", 2 * MiB)
    base = pattern(3, 2 * MiB)
    await golden.write(0, base)
    fork = await env.fork("golden", "fork")
    other = await env.create("other", 2 * MiB)
    want = bytearray(base)
    for lc in range(100, 164):  # the fork's own run, written beside another volume's
        piece = pattern(200 + lc, CHUNK)
        await fork.write(lc * CHUNK, piece)
        want[lc * CHUNK:(lc + 1) * CHUNK] = piece
        await other.write(lc * CHUNK, pattern(7, CHUNK))
    golden_before = mapped(await runs_of(env, "golden"))
    fork_before = mapped(await runs_of(env, "fork"))
    assert len([r for r in await runs_of(env, "fork", 100, 64) if r.pc != HOLE]) >= 2
    result = await defrag_volume(pool, "fork")
    assert result["shared_bytes"] == (512 - 64) * CHUNK
    assert mapped(await runs_of(env, "golden")) == golden_before
    fork_after = mapped(await runs_of(env, "fork"))
    assert {lc: pc for lc, pc in fork_after.items() if not 100 <= lc < 164} == \
        {lc: pc for lc, pc in fork_before.items() if not 100 <= lc < 164}
    own = await runs_of(env, "fork", 100, 64)
    assert len(own) == 1 and own[0].pc != HOLE
    assert await fork.read_all() == want
    assert await golden.read_all() == base
    await env.assert_clean()


async def test_defrag_in_slices_resumes_where_it_stopped(make_pool: PoolFactory) -> None:
    env = await new_env(make_pool, "extent")
    pool = env.pool
    await env.create("v", 64 * MiB)
    await env.create("w", 64 * MiB)
    data = await write_side_by_side(env, "v", "w", 4 * MiB, seed=9)
    await env.delete("w")
    results = []
    start = 0
    while True:
        result = await defrag_volume(pool, "v", start=start, limit=16 * MiB)
        results.append(result)
        if result["done"]:
            break
        assert result["next"] == start + 16 * MiB
        start = result["next"]
    assert len(results) == 4
    assert "before" in results[0] and all("before" not in r for r in results[1:])
    assert "after" in results[-1] and all("after" not in r for r in results[:-1])
    assert results[-1]["after"]["extents"] == 1
    assert sum(r["scanned_bytes"] for r in results) == 64 * MiB
    assert await env.vol("v").read(0, len(data)) == data
    await env.assert_clean()


@pytest.mark.skipif("linear" not in designs(), reason="no linear design registered")
async def test_defrag_of_linear_origin_and_snapshot(make_pool: PoolFactory) -> None:
    """A thick origin's layout is fixed (left alone); a snapshot's exception store, filled
    by copy-outs beside another volume's writes, becomes contiguous."""
    env = await new_env(make_pool, "linear")
    pool = env.pool
    origin = await env.create("origin", 4 * MiB)
    old = pattern(4, 4 * MiB)
    await origin.write(0, old)
    await env.snapshot("origin", "snap")
    other = await env.create("other", 4 * MiB)
    new = pattern(5, 4 * MiB)
    order = list(range(0, 4 * MiB, PIECE))
    random.Random(4).shuffle(order)
    for off in order:  # each write copies the old piece out into the snapshot first
        await origin.write(off, new[off:off + PIECE])
        await other.write(off, pattern(6, PIECE))
    before = mapped(await runs_of(env, "origin"))
    result = await defrag_volume(pool, "origin")
    assert result["moved_bytes"] == 0 and mapped(await runs_of(env, "origin")) == before
    snap_before = await pool.volume_stats(pool.volume("snap"))
    assert snap_before.extents > 4
    result = await defrag_volume(pool, "snap")
    assert result["after"]["extents"] == 1 and result["moved_bytes"] > 0
    assert await env.vol("snap").read_all() == old
    assert await origin.read_all() == new
    await env.assert_clean()


async def test_defrag_without_free_space_moves_what_it_can_and_says_so(
        make_pool: PoolFactory) -> None:
    # radix: next fit interleaves two volumes written side by side (extent's allocator
    # keeps them apart: 3 extents, nothing for defrag to do)
    env = await make_pool("radix", size=16 * MiB, journal_bytes=None, cache_bytes=8 * MiB,
                          small=False)
    pool = env.pool
    v, w = await env.create("v", 16 * MiB), await env.create("w", 16 * MiB)
    want = bytearray()
    off = 0
    while pool.available_chunks() >= 2 * PIECE // CHUNK + 32:  # leave less than 32 chunks
        piece = pattern(off // PIECE, PIECE)
        await v.write(off, piece)
        await w.write(off, piece)
        want += piece
        off += PIECE
    before = await pool.volume_stats(pool.volume("v"))
    assert before.extents > 8
    result = await defrag_volume(pool, "v")
    assert result["no_space_bytes"] > 0
    assert result["after"]["extents"] <= before.extents
    assert await v.read(0, len(want)) == want
    assert await w.read(0, len(want)) == want
    await env.assert_clean()


@pytest.mark.parametrize("design", FORKING)
async def test_a_write_during_a_window_gets_the_space_the_window_holds(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A defrag window claims its target chunks before copying and gives as many back
    after. A write of another volume that needs more than is left meanwhile waits for
    the window instead of failing with ENOSPC (the pool has room for it before and
    after the window), and the next window waits for that write."""
    env = await new_env(make_pool, design, size=64 * MiB)
    pool = env.pool
    await env.create("v", 64 * MiB)
    await env.create("w", 64 * MiB)
    data = await write_side_by_side(env, "v", "w", 4 * MiB, seed=11)
    off = 4 * MiB
    w = env.vol("w")
    while pool.available_chunks() > 1200:  # a nearly full pool
        await w.write(off, pattern(3, 16 * CHUNK))
        off += 16 * CHUNK
    free = pool.available_chunks()
    x = await env.create("x", 16 * MiB)
    big = pattern(12, 512 * CHUNK)  # more than a window leaves free
    copy = Defrag._copy
    during: list[int] = []
    writes: list[asyncio.Task[None]] = []

    async def copy_beside_a_write(self: Defrag, moves: list[tuple[int, int, int]]) -> None:
        if not writes:  # the first window: another client writes meanwhile
            during.append(pool.available_chunks())
            writes.append(asyncio.ensure_future(x.write(0, big)))
            await asyncio.sleep(0.05)  # (it has found too little space and waits)
        await copy(self, moves)

    monkeypatch.setattr(Defrag, "_copy", copy_beside_a_write)
    result = await defrag_volume(pool, "v")
    assert writes, result
    await writes[0]  # no ENOSPC
    assert result["moved_bytes"] > 0
    assert during[0] < len(big) // CHUNK < free  # the write needed more than was left
    assert await x.read(0, len(big)) == big
    assert await env.vol("v").read(0, len(data)) == data
    await env.assert_clean()


# -- the command line -------------------------------------------------------------------------


async def prepared_pool(tmp_path: Path, size: int, regions: list[tuple[int, int]],
                        seed: int) -> tuple[Path, dict[int, bytes]]:
    """A closed extent pool with a fragmented volume "v" of `size` bytes, written in the
    (offset, length) `regions`; returns its path and what each region holds."""
    env = PoolEnv(tmp_path / "pool.img", "extent", size=256 * MiB, journal_bytes=None,
                  cache_bytes=8 * MiB, small=False)
    await env.open()
    try:
        await env.create("v", size)
        await env.create("w", 256 * MiB)
        vol, filler = env.vol("v"), env.vol("w")
        contents: dict[int, bytes] = {}
        for offset, length in regions:
            data = contents[offset] = pattern(seed + offset // MiB, length)
            order = list(range(0, length, PIECE))
            random.Random(seed).shuffle(order)
            for i, off in enumerate(order):
                await vol.write(offset + off, data[off:off + PIECE])
                await filler.write((offset // 16 + i * PIECE) % (256 * MiB), pattern(1, PIECE))
        await env.delete("w")
        await env.assert_clean()
    finally:
        await env.shutdown()
    return env.path, contents


def cli(*args: str | Path, timeout: float = 120.0) -> Any:
    return run([*SERVER_CMD, *args], timeout=timeout)


async def read_back(path: Path, contents: dict[int, bytes]) -> None:
    """Open the closed pool and check that volume "v" holds `contents` (offset -> bytes)."""
    engine = make_engine(asyncio.get_running_loop())
    try:
        pool = await Pool.open(path, engine, BufferPool(), offline=True)
        try:
            vol = Vol(None, "v", VolumeBackend(pool, pool.volume("v")))  # type: ignore[arg-type]
            for offset, data in contents.items():
                assert await vol.read(offset, len(data)) == data, f"region {offset}"
            await vol.backend.close()
        finally:
            await pool.close()
    finally:
        engine.close()


async def test_defrag_command_offline(tmp_path: Path) -> None:
    path, contents = await prepared_pool(tmp_path, 2 * GiB, [(0, 4 * MiB)], seed=11)
    await read_back(path, contents)
    out = cli("volume", "defrag", path, "v", "--json")
    result = json.loads(out.stdout)
    assert result["before"]["extents"] > 4
    assert result["after"] == {"extents": 1, "extents_per_gib": 0.5,
                               "mapped_bytes": 4 * MiB, "exclusive_bytes": 4 * MiB}
    assert result["done"] and result["moved_bytes"] > 0
    again = cli("volume", "defrag", path, "v")
    assert "1 -> 1 extents (0.5 -> 0.5 per GiB); moved 0" in again.stdout
    info = json.loads(cli("volume", "info", path, "v", "--json").stdout)
    assert info["extents"] == 1
    check = json.loads(cli("pool", "check", path, "--json").stdout)
    assert check["ok"], check["problems"]
    await read_back(path, contents)


# Injected into the CLI process by a sitecustomize module on its PYTHONPATH (nothing in
# nbdserver knows about it): once the first window has copied, the next commit either gets
# SIGINT delivered inside it (Ctrl-C at the worst moment), or the window's device writes
# fail with ENOSPC (the pool file's filesystem is full).
_INJECT = '''
import errno, os, signal
from nbdserver import defrag
from nbdserver.pool import pool
from nbdserver.storage import engine

_how = {how!r}
_copy, _commit, _write = defrag.Defrag._copy, pool.Pool.commit, engine.LinuxAioEngine.write
_armed = []


async def copy(self, moves):
    _armed.append(1)
    return await _copy(self, moves)


async def commit(self, *args, **kwargs):
    if _how == "sigint" and len(_armed) == 1:
        _armed.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the commit's first await
    return await _commit(self, *args, **kwargs)


def write(self, fd, buf, buf_offset, length, offset, callback, dsync=False):
    if _how == "enospc" and _armed:
        self.loop.call_soon(callback, -errno.ENOSPC)
        return
    return _write(self, fd, buf, buf_offset, length, offset, callback, dsync)


defrag.Defrag._copy = copy
pool.Pool.commit = commit
engine.LinuxAioEngine.write = write
'''


@pytest.mark.parametrize("how", ["sigint", "enospc"])
async def test_defrag_command_interrupted_or_failing_says_so(tmp_path: Path, how: str) -> None:
    """Ctrl-C inside a window's commit exits 130, and a device error names its cause
    (exit 1); no traceback either way, and the pool is consistent and whole after."""
    path, contents = await prepared_pool(tmp_path, 64 * MiB, [(0, 4 * MiB)], seed=13)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_INJECT.format(how=how))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH")) if p)
    out = subprocess.run([*map(str, SERVER_CMD), "volume", "defrag", str(path), "v"],
                         capture_output=True, text=True, timeout=120, env=env,
                         preexec_fn=default_signals)  # (Ctrl-C reaches it)
    assert "Traceback" not in out.stderr, out.stderr
    if how == "sigint":
        assert out.returncode == 130, out.stderr
        # an interruption, not a device fault: no server-style "restart the server" error
        assert "interrupted; the pool recovers its last commit" in out.stderr, out.stderr
        assert "durable any more" not in out.stderr and "ERROR" not in out.stderr, out.stderr
    else:
        assert out.returncode == 1, out.stderr
        assert "No space left on device" in out.stderr
    check = json.loads(cli("pool", "check", path, "--json").stdout)
    assert check["ok"], check["problems"]
    await read_back(path, contents)


def test_progress_goes_to_stderr_once_a_second(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    monkeypatch.setattr(admin.time, "monotonic", lambda: now[0])
    progress = admin._Progress("defrag v")
    for t, done in ((100.5, 1), (101.2, 2), (101.5, 3), (102.3, 4), (102.4, 8)):
        now[0] = t
        progress(done * MiB, 8 * MiB, MiB)
    progress.finish()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "defrag v:  25.0% (2 MiB of 8 MiB scanned, 1 MiB moved)",
        "defrag v:  50.0% (4 MiB of 8 MiB scanned, 1 MiB moved)",
    ]


# -- online ------------------------------------------------------------------------------------


async def test_defrag_online_keeps_every_concurrent_write(nbd_server_factory: ServerFactory,
                                                          tmp_path: Path) -> None:
    """A client writes (in place and into new chunks, some with FUA) and reads back without
    a pause while ``nbdserver volume defrag`` runs through the server's control socket, in
    two 1 GiB slices: no write is lost, the volume ends contiguous, the pool checks clean."""
    regions = [(0, 8 * MiB), (GiB + 512 * MiB, 8 * MiB)]
    path, contents = await prepared_pool(tmp_path, 2 * GiB, regions, seed=21)
    srv = nbd_server_factory([{"name": "v", "pool": "p", "volume": "v"}],
                             pools=[{"name": "p", "path": path}], tcp=False)
    assert srv.socket_path is not None
    client = await connect(srv.socket_path, "v", meta=())
    model: dict[int, bytes] = {}  # 4 KiB block offset -> what it holds
    for offset, data in contents.items():
        for off in range(0, len(data), CHUNK):
            model[offset + off] = data[off:off + CHUNK]
    blocks = sorted(model)
    stop = asyncio.Event()
    counts = {"writes": 0, "reads": 0, "during": 0, "new": 0}
    defragging = asyncio.Event()

    async def writer(k: int) -> None:
        """Writes and reads back blocks with (offset / 4 KiB) % 2 == k: the two writers never
        touch one block, so the model stays exact with both in flight."""
        rng = random.Random(3 + k)
        mine = [off for off in blocks if off // CHUNK % 2 == k]
        i = 0
        while not stop.is_set():
            i += 1
            if rng.random() < 0.8:
                off = rng.choice(mine)  # mapped: in place, or wherever defrag put it
            else:  # a hole next to a region: a new chunk
                off = rng.choice(regions)[0] + 8 * MiB + (2 * rng.randrange(32) + k) * CHUNK
                if off not in model:
                    counts["new"] += 1
            data = pattern(1000 * (k + 1) + i, CHUNK)
            await client.write(off, data, fua=rng.random() < 0.1)
            model[off] = data
            counts["writes"] += 1
            if defragging.is_set():
                counts["during"] += 1
            check = rng.choice([o for o in model if o // CHUNK % 2 == k])
            assert await client.read(check, CHUNK) == model[check], f"block {check}"
            counts["reads"] += 1

    tasks = [asyncio.ensure_future(writer(k)) for k in (0, 1)]
    try:
        await asyncio.sleep(0.3)
        defragging.set()
        out = await asyncio.to_thread(cli, "volume", "defrag", path, "v", "--json")
        defragging.clear()
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    result = json.loads(out.stdout)
    assert counts["during"] > 20, counts  # the writer really ran alongside
    assert result["before"]["extents"] > 8
    # each logical run is one extent, but for the new chunks the writer mapped (each can
    # break or join runs)
    offsets = sorted(model)
    logical_runs = 1 + sum(1 for a, b in itertools.pairwise(offsets) if b != a + CHUNK)
    assert result["after"]["extents"] <= logical_runs + counts["new"], counts
    assert result["after"]["extents"] < result["before"]["extents"] // 3
    assert result["moved_bytes"] > 0 and result["no_space_bytes"] == 0
    for off in sorted(model):
        assert await client.read(off, CHUNK) == model[off], f"block {off} lost"
    await client.flush()
    await client.close()
    srv.stop()
    check = json.loads(cli("pool", "check", path, "--json").stdout)
    assert check["ok"], check["problems"]
    # and after a restart, from disk
    srv = nbd_server_factory([{"name": "v", "pool": "p", "volume": "v"}],
                             pools=[{"name": "p", "path": path}], tcp=False, name="again")
    assert srv.socket_path is not None
    client = await connect(srv.socket_path, "v", meta=())
    for off in sorted(model):
        assert await client.read(off, CHUNK) == model[off], f"block {off} lost after restart"
    await client.close()
    srv.stop()


@pytest.mark.parametrize("design", FORKING)
async def test_a_window_is_installed_within_a_journal_record(make_pool: PoolFactory,
                                                             design: str) -> None:
    """With a small journal (64 pages) and deep maps (small parameters), one window's
    remapping in a single mini-transaction dirtied 197 pages: the commit's record did
    not fit the ring and the pool failed (every FLUSH EIO). A window is installed in
    parts bounded by the journal now."""
    env = await make_pool(design, size=512 * MiB, cache_bytes=8 * MiB)  # (poolkit's
    pool = env.pool                                        # 256 KiB journal, small maps)
    await env.create("v", 64 * MiB)
    await env.create("w", 64 * MiB)
    data = await write_side_by_side(env, "v", "w", 8 * MiB, seed=5)
    result = await asyncio.wait_for(defrag_volume(pool, "v"), 120)
    assert result["moved_bytes"] > 0
    assert pool.failed is None
    vol = env.vol("v")
    await vol.flush()
    assert await vol.read(0, len(data)) == data
    await env.reopen()
    assert await env.vol("v").read(0, len(data)) == data
    await env.assert_clean()


def test_an_online_defrag_whose_server_stops_between_slices_says_how_far_it_got(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopping while the CLI defragments a large volume through it, a slice at
    a time: the CLI cannot reach it for the next slice (nor open the pool, which the
    server still holds while it closes). It says how far the defrag got, that what was
    moved stays moved, and to run it again; it used to print only "no server answers"."""
    from nbdserver.errors import UserError

    calls: list[dict[str, Any]] = []

    def run_pool_op(pool: str, op: str, args: dict[str, Any], local: object = None, *,
                    online: bool = False) -> dict[str, Any]:
        calls.append({"start": args["start"], "online": online})
        if calls[1:]:
            raise UserError(f"{pool}: the pool is in use by another process, and no server "
                            "answers on its control socket")
        return {"name": "v", "size": 3 << 30, "scanned_bytes": 1 << 30, "moved_bytes": 75 << 20,
                "shared_bytes": 0, "no_space_bytes": 0, "seconds": 1.0, "done": False,
                "next": 1 << 30, "before": {"extents": 9}}

    monkeypatch.setattr(admin, "run_pool_op", run_pool_op)
    with pytest.raises(UserError) as stopped:
        admin.cmd_volume_defrag(admin.argparse.Namespace(pool="p.img", name="v", json=False))
    assert calls == [{"start": 0, "online": False}, {"start": 1 << 30, "online": True}]
    assert str(stopped.value).startswith(
        "defrag of 'v' stopped after 1 GiB of 3 GiB (75 MiB moved, which stays moved; run it "
        "again to finish): p.img: the pool is in use"), stopped.value
