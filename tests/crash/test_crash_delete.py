"""Killed while a fork's delete is not durable yet: the fork keeps its bytes.

Deleting a volume first marks it "being deleted" and commits that mark; only
then is its map released. Until the mark is durable, a crash brings the volume
back whole, so nothing may act on the mark before then. Linear did: from the
moment of the mark (in memory), its origin stopped preserving chunks for the
fork being deleted, and overwrote them in place. Killed before the mark's
commit, the pool came back with the fork reading the origin's new bytes (the
kill -9 campaign found it once: a fork read its origin's content at the same
offset). With a TRIM of the origin first, the chunk became unwritten and the
fork read zeros around the new bytes.

A real ``nbdserver serve``, whose data fdatasync (the first step of every
commit) takes DELAY seconds while a trigger file exists (a ``sitecustomize``
on its PYTHONPATH; nothing in the server knows about it): the delete of the
fork is sent through the CLI, its commit hangs in that fdatasync, the origin
writes (or trims and writes) the fork's chunks, and the server is killed with
SIGKILL. After the restart the fork either is gone (its delete was durable) or
reads exactly what it read before.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SERVER_CMD, ServerFactory, pattern, run
from test_crash_kill import check_clean, clients, volume_export

from nbdserver.blockmap.base import designs
from nbdserver.pool.pool import Pool
from nbdserver.protocol import constants as c

KiB = 1024
MiB = 1024 * KiB
DELAY = 6.0  # seconds the data fdatasync of a commit takes while the trigger exists
AT, END = 2867459, 2873300  # the origin's byte-granular write (as the campaign's was)

INJECT = '''
import os
import time
from nbdserver.storage import device

_trigger = {trigger!r}
_flush = device.BlockDevice.flush


def _slow_flush(self):
    if os.path.exists(_trigger):
        time.sleep({delay!r})
    _flush(self)


device.BlockDevice.flush = _slow_flush
'''


@pytest.mark.parametrize("trim", [False, True], ids=["write", "trim-then-write"])
@pytest.mark.parametrize("design", sorted(designs()))
async def test_a_fork_whose_delete_was_cut_off_keeps_its_bytes(
        nbd_server_factory: ServerFactory, tmp_path: Path, design: str, trim: bool) -> None:
    pool = tmp_path / "pool.img"
    Pool.create(pool, 64 * MiB, blockmap=design)
    inject = tmp_path / "inject"
    inject.mkdir()
    trigger = tmp_path / "slow-fdatasync"
    (inject / "sitecustomize.py").write_text(INJECT.format(trigger=str(trigger), delay=DELAY))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH")) if p)
    pools = [{"name": "p", "path": pool}]
    srv = nbd_server_factory([volume_export("c2", size="4M")], pools=pools, tcp=False,
                             name="first", env=env)
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
    listing = run([*SERVER_CMD, "volume", "list", pool, "--json"]).stdout
    exports = [volume_export("c2")]
    if '"f8"' in listing:
        exports.append(volume_export("f8"))
    srv = nbd_server_factory(exports, pools=pools, tcp=False, name="after")
    if len(exports) == 2:
        (f8,) = await clients(srv, "f8")
        got = await f8.read(0, 4 * MiB)
        await f8.close()
        bad = [i for i in range(0, 4 * MiB, 512) if got[i:i + 512] != old[i:i + 512]]
        assert not bad, (f"f8 changed at bytes {bad[0]}..{bad[-1] + 512} after the kill: "
                         f"{'zeros' if not any(got[bad[0]:bad[0] + 512]) else 'other bytes'}")
    srv.stop()
    check_clean(pool)
