"""The control socket's queue: one operation at a time per pool, and what waits its turn.

A walk of a large map (``volume info``, ``volume list``) may take minutes; requests
behind it wait for the pool's control lock. One whose client has gone meanwhile (a
Ctrl-C, a script's timeout) is not run when its turn comes, and a server stop does not
run the queue: the operation under way finishes, the waiting ones end unanswered.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from poolkit import PoolFactory

from nbdserver.control.socket import ControlServer


def _send(path: str, op: str, args: dict[str, object]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
    return s


async def _queued(control: ControlServer, n: int) -> None:
    """Wait until `n` clients are connected (their requests read, waiting for the lock)."""
    for _ in range(500):
        if len(control._clients) >= n:
            await asyncio.sleep(0.05)
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(control._clients)} clients, not {n}")


async def test_a_request_whose_client_has_gone_is_not_run(make_pool: PoolFactory) -> None:
    env = await make_pool("radix", offline=False)
    control = ControlServer(env.pool)
    await control.start()
    try:
        await control._lock.acquire()  # an operation under way, for as long as we like
        gone = [_send(str(control.path), "volume.create", {"name": f"gone{i}", "size": 1 << 20})
                for i in range(5)]
        waiting = _send(str(control.path), "volume.create", {"name": "kept", "size": 1 << 20})
        await _queued(control, 6)
        for s in gone:
            s.close()
        await asyncio.sleep(0.1)
        control._lock.release()
        loop = asyncio.get_running_loop()
        reply = json.loads(await loop.run_in_executor(None, waiting.makefile().readline))
        waiting.close()
        assert reply["ok"], reply
        assert env.names() == ["kept"], env.names()
    finally:
        await control.stop()


async def test_a_stop_does_not_run_the_queue(make_pool: PoolFactory) -> None:
    env = await make_pool("radix", offline=False)
    control = ControlServer(env.pool)
    await control.start()
    await control._lock.acquire()
    waiting = [_send(str(control.path), "volume.create", {"name": f"w{i}", "size": 1 << 20})
               for i in range(5)]
    await _queued(control, 5)
    stopping = asyncio.ensure_future(control.stop())
    await asyncio.sleep(0.1)
    control._lock.release()  # the operation under way ends
    await asyncio.wait_for(stopping, 5)
    assert env.names() == [], env.names()
    for s in waiting:
        assert s.recv(100) == b""  # ended unanswered
        s.close()


async def test_a_walk_whose_client_has_gone_is_stopped(make_pool: PoolFactory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A `volume list` under way whose client goes (a Ctrl-C, `timeout`) stops: it only
    reads, and the operations behind it need not wait for a walk nobody will see."""
    from nbdserver.pool.pool import Pool

    env = await make_pool("radix", offline=False)
    await env.create("a", 1 << 20)
    started = asyncio.Event()
    stopped: list[str] = []

    async def slow_stats(self: Pool, vol: object) -> None:
        started.set()
        try:
            await asyncio.sleep(60)  # a walk of a large map
        except asyncio.CancelledError:
            stopped.append(getattr(vol, "name", "?"))
            raise

    monkeypatch.setattr(Pool, "volume_stats", slow_stats)
    control = ControlServer(env.pool)
    await control.start()
    loop = asyncio.get_running_loop()
    try:
        walker = _send(str(control.path), "volume.list", {})
        await asyncio.wait_for(started.wait(), 10)
        walker.close()
        began = loop.time()
        after = _send(str(control.path), "volume.create", {"name": "b", "size": 1 << 20})
        reply = json.loads(await loop.run_in_executor(None, after.makefile().readline))
        after.close()
        assert reply["ok"], reply
        assert loop.time() - began < 10  # not the walk's 60 s
        assert stopped == ["a"]
        assert env.names() == ["a", "b"], env.names()
    finally:
        await control.stop()
