"""Killed while a change that ended sharing is not durable yet: the sharer keeps its bytes.

A change that makes a volume stop reading a chunk (a delete, a trim, a
copy-on-write) is made in memory and made durable by the next commit. Until
then, on disk the other volume still shares the chunk, so nothing may act on
the change by writing that chunk in place. A real ``nbdserver serve`` whose
data fdatasync (the first step of every commit) takes DELAY seconds while a
trigger file exists (a ``sitecustomize`` on its PYTHONPATH; nothing in the
server knows about it) holds a commit open; a volume then writes the chunks
and the server is killed with SIGKILL (reads can be made slow the same way).
After the restart the other volume reads exactly what it read before. Two
cases, on every design:

- **A fork whose delete was cut off.** Deleting a volume marks it "being
  deleted", commits the mark, then releases its map. Linear acted on the mark
  at once: its origin stopped preserving chunks for the fork and overwrote
  them in place (after a TRIM, made them unwritten: zeros around the new
  bytes). Killed before the mark's commit, the fork came back reading the
  origin's new bytes (the kill -9 campaign found it once: a fork read its
  origin's content at the same offset).
- **The neighbours of a claimed chunk.** The fork trims a chunk its parent
  wrote; the parent writes it (a claim: commit, wait for the reads begun
  before, then claim and write in place). While the claim waited for a slow
  read, the fork trimmed the neighbouring chunks. Extent's claim made the
  whole run of unshared chunks around the claimed one writable, so the
  parent's next write of a neighbour went in place at once, while on disk the
  fork still shared it. (Also: every design claimed before the claim's commit,
  so a claim outlived a failed commit; tests/pool/test_pool_commit_errors.py.)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_CMD, NbdServerProcess, ServerFactory, pattern, run
from test_crash_kill import check_clean, clients, volume_export

from nbdserver.blockmap.base import designs
from nbdserver.pool.pool import Pool
from nbdserver.protocol import constants as c

KiB = 1024
MiB = 1024 * KiB
CHUNK = 4 * KiB
DELAY = 6.0  # seconds the data fdatasync of a commit takes while the trigger exists
AT, END = 2867459, 2873300  # the origin's byte-granular write (as the campaign's was)

INJECT = '''
import os
import time
from nbdserver import volume
from nbdserver.storage import device

_slow_flush_trigger = {flush!r}
_slow_read_trigger = {reads!r}
_flush = device.BlockDevice.flush


def _slow_flush(self):
    if os.path.exists(_slow_flush_trigger):
        time.sleep({delay!r})
    _flush(self)


device.BlockDevice.flush = _slow_flush


class _SlowReads:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def read(self, fd, buf, buf_offset, length, offset, callback):
        if os.path.exists(_slow_read_trigger):
            real = callback

            def callback(res):
                self._real.loop.call_later({delay!r}, real, res)

        return self._real.read(fd, buf, buf_offset, length, offset, callback)


_init = volume.VolumeBackend.__init__


def _slow_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.engine = _SlowReads(self.engine)


volume.VolumeBackend.__init__ = _slow_init
'''


def _slow_commits(factory: ServerFactory, tmp_path: Path, design: str,
                  exports: list[dict[str, Any]]) -> tuple[NbdServerProcess, Path, Path]:
    """A server on a new pool whose commits hang in their fdatasync for DELAY seconds
    while the returned trigger file exists, and whose volume reads complete DELAY
    seconds late while `tmp_path / "slow-reads"` exists; (server, pool, trigger)."""
    pool = tmp_path / "pool.img"
    Pool.create(pool, 64 * MiB, blockmap=design)
    inject = tmp_path / "inject"
    inject.mkdir()
    trigger = tmp_path / "slow-fdatasync"
    (inject / "sitecustomize.py").write_text(INJECT.format(
        flush=str(trigger), reads=str(tmp_path / "slow-reads"), delay=DELAY))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH")) if p)
    srv = factory(exports, pools=[{"name": "p", "path": pool}], tcp=False, name="first",
                  env=env)
    return srv, pool, trigger


async def _reads_as_before(factory: ServerFactory, pool: Path, name: str, old: bytes,
                           trimmed: tuple[int, int] = (0, 0)) -> None:
    """After the kill: `name` (if it still exists) reads `old`, or zeros in the
    `trimmed` range [start, end); the pool checks clean."""
    listing = run([*SERVER_CMD, "volume", "list", pool, "--json"]).stdout
    exports = [volume_export(name)] if f'"{name}"' in listing else []
    srv = factory(exports, pools=[{"name": "p", "path": pool}], tcp=False, name="after")
    if exports:
        (v,) = await clients(srv, name)
        got = await v.read(0, len(old))
        await v.close()
        zeros = bytes(512)
        bad = [i for i in range(0, len(old), 512) if got[i:i + 512] != old[i:i + 512]
               and not (trimmed[0] <= i < trimmed[1] and got[i:i + 512] == zeros)]
        assert not bad, (f"{name} changed at bytes {bad[0]}..{bad[-1] + 512} after the kill: "
                         f"{'zeros' if not any(got[bad[0]:bad[0] + 512]) else 'other bytes'}")
    srv.stop()
    check_clean(pool)


@pytest.mark.parametrize("trim", [False, True], ids=["write", "trim-then-write"])
@pytest.mark.parametrize("design", sorted(designs()))
async def test_a_fork_whose_delete_was_cut_off_keeps_its_bytes(
        nbd_server_factory: ServerFactory, tmp_path: Path, design: str, trim: bool) -> None:
    srv, pool, trigger = _slow_commits(nbd_server_factory, tmp_path, design,
                                       [volume_export("c2", size="4M")])
    (c2,) = await clients(srv, "c2")
    old = pattern(4 * MiB, 1)
    await c2.write(0, old)
    await c2.flush()
    run([*SERVER_CMD, "volume", "fork", pool, "c2", "f8"])  # (through the server)
    trigger.touch()
    delete = subprocess.Popen([*SERVER_CMD, "volume", "delete", str(pool), "f8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await asyncio.sleep(1.5)  # the CLI starts, the server marks f8, its commit hangs
        assert delete.poll() is None, delete.communicate()[0]
        sent = []
        if trim:  # the chunks the write covers, whole
            sent.append(c2.submit(c.CMD_TRIM, AT // 4096 * 4096, 3 * 4096))
        sent.append(c2.submit(c.CMD_WRITE, AT, data=pattern(END - AT, 2)))
        await c2.drain()
        await asyncio.wait(sent, timeout=1.0)  # answered or not: both are allowed
        assert delete.poll() is None  # the delete is still not durable
        srv.kill()
    finally:
        delete.kill()
        delete.communicate()
    await c2.close()
    trigger.unlink()
    await _reads_as_before(nbd_server_factory, pool, "f8", old)


@pytest.mark.parametrize("design", sorted(designs()))
async def test_the_neighbours_of_a_claimed_chunk_are_not_written_in_place_early(
        nbd_server_factory: ServerFactory, tmp_path: Path, design: str) -> None:
    srv, pool, _ = _slow_commits(nbd_server_factory, tmp_path, design,
                                 [volume_export("a", size="1M")])
    (a,) = await clients(srv, "a")
    old = pattern(1 * MiB, 1)
    await a.write(0, old)  # (one extent, on extent)
    await a.close()
    srv.stop()
    srv = nbd_server_factory([volume_export("a"), volume_export("f", fork="a")],
                             pools=[{"name": "p", "path": pool}], tcp=False, name="forked",
                             env=srv.env)
    a, f = await clients(srv, "a", "f")
    await f.trim(0, CHUNK)  # a's chunk 0 is a's alone, in memory
    (tmp_path / "slow-reads").touch()
    sent = [f.submit(c.CMD_READ, 512 * KiB, CHUNK)]  # in flight for DELAY seconds
    await f.drain()
    await asyncio.sleep(0.3)
    # a claim: commits, then waits for the reads begun before (f's), then claims
    sent.append(a.submit(c.CMD_WRITE, 0, data=pattern(CHUNK, 2)))
    await a.drain()
    await asyncio.sleep(0.5)
    await f.trim(CHUNK, 5 * CHUNK)  # meanwhile a's chunks 1..5 are a's alone, in memory
    await asyncio.wait(sent, timeout=2 * DELAY)
    (tmp_path / "slow-reads").unlink()
    # Claimed with chunk 0 (the run of unshared chunks around it), chunk 5 went in place
    # at once, while on disk f still shared it; now it is a claim of its own: commit first.
    await asyncio.wait([a.submit(c.CMD_WRITE, 5 * CHUNK, data=pattern(CHUNK, 3))],
                       timeout=1.0)
    srv.kill()
    await a.close()
    await f.close()
    await _reads_as_before(nbd_server_factory, pool, "f", old, trimmed=(0, 6 * CHUNK))
