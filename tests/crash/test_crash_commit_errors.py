"""kill -9 after a device error in a commit: the server never claims what it lost.

A real ``nbdserver serve`` whose journal writes fail with EIO while a trigger
file exists (injected by a ``sitecustomize`` module put on its PYTHONPATH by
the test: nothing in the server knows about it). A FLUSH then fails; the next
FLUSH, with the device working again, must fail too (the failed commit's
snapshot of dirty metadata is gone, so a success would be a lie), and so must
a FUA write. Then SIGKILL, a normal server on the same pool, and every write
acknowledged before the last successful FLUSH reads back, the pool clean.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import SERVER_CMD, NbdServerProcess, ServerFactory, pattern, run
from nbdclient import NbdClient, NbdReplyError
from test_crash_kill import check_clean, clients, pool_at, serve, volume_export, which

KiB = 1024
EIO_WIRE = 5  # NBD_EIO

INJECT = '''
import errno, os
from nbdserver.storage import engine

_real = engine.IoEngine.awrite
_trigger = {trigger!r}

async def awrite(self, fd, buf, buf_offset, length, offset, dsync=False):
    if dsync and os.path.exists(_trigger):  # the commits' journal writes
        raise OSError(errno.EIO, "injected by the test: journal write failed")
    return await _real(self, fd, buf, buf_offset, length, offset, dsync)

engine.IoEngine.awrite = awrite
'''


def _failing_server(factory: ServerFactory, tmp_path: Path) -> tuple[
        NbdServerProcess, Path, Path]:
    """A server on a new pool whose journal writes fail while the returned trigger file
    exists; (server, pool, trigger)."""
    pool = pool_at(tmp_path)
    inject = tmp_path / "inject"
    inject.mkdir()
    trigger = tmp_path / "journal-fails"
    (inject / "sitecustomize.py").write_text(INJECT.format(trigger=str(trigger)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH"))
                                        if p)
    srv = factory([volume_export("v", size="8M")], pools=[{"name": "p", "path": pool}],
                  tcp=False, name="failing", env=env)
    return srv, pool, trigger


async def _fail_a_flush(v: NbdClient, trigger: Path) -> tuple[bytes, bytes]:
    """Write and flush `kept`, write `unflushed` (a new chunk), then a FLUSH that fails
    (EIO on its journal write); the device works again after. (kept, unflushed)."""
    kept = pattern(64 * KiB, 1)
    await v.write(0, kept)
    await v.flush()  # durable
    unflushed = pattern(4 * KiB, 2)
    await v.write(1024 * KiB, unflushed)  # maps a new chunk: the next commit has work
    trigger.touch()
    with pytest.raises(NbdReplyError) as failed:
        await v.flush()
    assert failed.value.code == EIO_WIRE
    trigger.unlink()  # the device works again
    return kept, unflushed


async def test_a_failed_pool_makes_the_server_exit_1_and_a_restart_recovers(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool, trigger = _failing_server(nbd_server_factory, tmp_path)
    (v,) = await clients(srv, "v")
    kept, _ = await _fail_a_flush(v, trigger)
    await v.close()
    srv.signal(signal.SIGTERM)
    assert srv.wait(30) == 1  # a supervisor restarting on failure recovers the pool
    assert "a pool had failed" in srv.stderr
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    assert await v.read(0, 64 * KiB) == kept
    await v.close()
    srv.stop()
    check_clean(pool)


async def test_flush_after_a_failed_commit_fails_until_restart_and_kill_keeps_flushed_data(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool, trigger = _failing_server(nbd_server_factory, tmp_path)
    (v,) = await clients(srv, "v")
    kept, unflushed = await _fail_a_flush(v, trigger)
    for attempt in ("flush", "fua write"):
        with pytest.raises(NbdReplyError) as again:
            if attempt == "flush":
                await v.flush()
            else:
                await v.write(2048 * KiB, pattern(4 * KiB, 3), fua=True)
        assert again.value.code == EIO_WIRE, attempt
    assert await v.read(0, 64 * KiB) == kept  # reads go on
    assert "restart the server" in srv.stderr
    # The CLI asks the running server: the reason is in pool info, text and JSON.
    info = json.loads(run([*SERVER_CMD, "pool", "info", pool, "--json"]).stdout)
    assert "journal write" in info["failed"]
    assert "FAILED" in run([*SERVER_CMD, "pool", "info", pool]).stdout
    srv.kill()
    await v.close()
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    assert await v.read(0, 64 * KiB) == kept
    got = which(await v.read(1024 * KiB, 4 * KiB), unflushed=unflushed)
    assert got in ("unflushed", "zeros")
    await v.flush()  # a restarted server commits again
    await v.close()
    srv.stop()
    check_clean(pool)
