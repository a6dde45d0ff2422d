"""Stopping a server whose device is slow: nothing acknowledged is lost.

A real ``nbdserver serve`` whose data writes complete late while a trigger
file exists (a ``sitecustomize`` module on its PYTHONPATH reports each data
write's completion some seconds after the kernel did; the data is written at
once; nothing in the server knows about it). Then:

- SIGTERM with `server.stop-timeout` shorter than the delay: the connection of
  the request still in flight is dropped, so the client is never told of the
  write, and the pool closes only once the write has ended, so what it wrote is
  in the final commit. Before, the server closed the pool, then acknowledged
  the write, and the write was lost on restart with exit status 0.
- SIGINT during the stop (Ctrl-C twice): the server exits at once with status
  1, as a crash would, and a restart recovers everything flushed before. A
  repeated SIGTERM changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import NbdServerProcess, ServerFactory, pattern
from nbdclient import NbdClient, ServerClosed
from test_crash_kill import check_clean, clients, pool_at, serve, volume_export

from nbdserver.protocol import constants as c

KiB = 1024
DELAY = 4.0  # seconds each data write's completion is held back

INJECT = '''
import os
from nbdserver import volume

_trigger = {trigger!r}


class _SlowWrites:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def write(self, fd, buf, buf_offset, length, offset, callback, dsync=False):
        if os.path.exists(_trigger):
            real = callback
            with open(_trigger + ".held", "a") as held:  # (tests wait for it)
                held.write("x ")

            def callback(res):
                self._real.loop.call_later({delay!r}, real, res)

        return self._real.write(fd, buf, buf_offset, length, offset, callback, dsync)


_init = volume.VolumeBackend.__init__


def _slow_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.engine = _SlowWrites(self.engine)


volume.VolumeBackend.__init__ = _slow_init
'''


def _slow_server(factory: ServerFactory, tmp_path: Path, stop_timeout: str) -> tuple[
        NbdServerProcess, Path, Path]:
    """A server on a new pool whose volumes' data writes complete DELAY seconds late
    while the returned trigger file exists; (server, pool, trigger)."""
    pool = pool_at(tmp_path)
    inject = tmp_path / "inject"
    inject.mkdir()
    trigger = tmp_path / "slow-device"
    (inject / "sitecustomize.py").write_text(INJECT.format(trigger=str(trigger), delay=DELAY))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH"))
                                        if p)
    srv = factory([volume_export("v", size="8M")], pools=[{"name": "p", "path": pool}],
                  server={"stop-timeout": stop_timeout}, tcp=False, name="slow", env=env)
    return srv, pool, trigger


async def _writes_held(trigger: Path, count: int) -> None:
    """Wait until the slow device holds `count` data writes (they were taken)."""
    held = Path(f"{trigger}.held")
    deadline = time.monotonic() + 15
    while not held.exists() or len(held.read_text().split()) < count:
        assert time.monotonic() < deadline, "the writes never reached the device"
        await asyncio.sleep(0.02)


async def _stderr_says(srv: NbdServerProcess, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in srv.stderr:
        assert time.monotonic() < deadline, f"the server never logged {text!r}"
        await asyncio.sleep(0.02)


async def _flushed_then_slow(v: NbdClient, trigger: Path, seed: int) -> bytes:
    """Write and flush 64 KiB at 0 (returned), then make the device slow."""
    flushed = pattern(64 * KiB, seed)
    await v.write(0, flushed)
    await v.flush()
    trigger.touch()
    return flushed


async def test_stop_timeout_drops_requests_in_flight_and_commits_what_they_wrote(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool, trigger = _slow_server(nbd_server_factory, tmp_path, "1s")
    (v,) = await clients(srv, "v")
    flushed = await _flushed_then_slow(v, trigger, 1)
    late = pattern(4 * KiB, 2)
    fresh = v.submit(c.CMD_WRITE, 1024 * KiB, data=late)  # a new chunk: maps when it ends
    await v.drain()
    await _writes_held(trigger, 1)  # taken: in flight, not refused with ESHUTDOWN
    start = time.monotonic()
    srv.signal(signal.SIGTERM)
    with pytest.raises(ServerClosed):  # never acknowledged
        await asyncio.wait_for(fresh, 3 * DELAY)
    assert srv.wait(30) == 0
    assert time.monotonic() - start >= DELAY - 1  # the pool waited for the write to end
    assert "dropping them" in srv.stderr
    await v.close()
    trigger.unlink()
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    assert await v.read(0, 64 * KiB) == flushed
    # The write ended before the final commit: what it wrote is there, mapped.
    assert await v.read(1024 * KiB, 4 * KiB) == late
    await v.close()
    srv.stop()
    check_clean(pool)


async def test_sigint_during_a_stop_exits_at_once_and_a_restart_recovers(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool, trigger = _slow_server(nbd_server_factory, tmp_path, "60s")
    (v,) = await clients(srv, "v")
    flushed = await _flushed_then_slow(v, trigger, 3)
    for i in range(8):  # in flight for DELAY seconds each
        v.submit(c.CMD_WRITE, (1024 + 4 * i) * KiB, data=pattern(4 * KiB, 10 + i))
    await v.drain()
    await _writes_held(trigger, 8)
    srv.signal(signal.SIGTERM)
    await _stderr_says(srv, "stopping: finishing")
    srv.signal(signal.SIGTERM)  # a repeated SIGTERM: still a clean stop, waiting
    await _stderr_says(srv, "already stopping")
    assert srv.proc is not None and srv.proc.poll() is None
    start = time.monotonic()
    srv.signal(signal.SIGINT)
    assert srv.wait(DELAY) == 1  # at once, not after the writes or the stop timeout
    assert time.monotonic() - start < DELAY
    assert "SIGINT while stopping" in srv.stderr
    await v.close()
    trigger.unlink()
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    assert await v.read(0, 64 * KiB) == flushed
    await v.close()
    srv.stop()
    check_clean(pool)
