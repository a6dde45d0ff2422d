"""The I/O engines (Linux AIO and the thread pool) on a real O_DIRECT file.

Every test runs for both engines, on uvloop as the server does. Completions
are callbacks with a byte count or ``-errno``; errors must arrive that way,
never as exceptions, and every queued request must complete exactly once.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import on_uvloop

from nbdserver.storage import engine as engine_mod
from nbdserver.storage.buffers import AlignedBuffer, BufferPool
from nbdserver.storage.device import BlockDevice, open_device
from nbdserver.storage.engine import IoEngine, LinuxAioEngine, ThreadEngine, make_engine

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(params=["aio", "threads"])
def engine(request: pytest.FixtureRequest) -> str:
    """The engine kind; tests make() it inside their running loop."""
    return str(request.param)


def make(kind: str) -> IoEngine:
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop"), "the server runs on uvloop"
    eng = make_engine(loop, kind)
    assert eng.name == kind
    return eng


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    """An 8 MiB file whose first 64 KiB hold data (reads of holes do no device I/O, so
    the kernel checks no alignment for them)."""
    (tmp_path / "f.img").write_bytes(os.urandom(64 * KiB))
    os.truncate(tmp_path / "f.img", 8 * MiB)
    dev = open_device(tmp_path / "f.img")
    yield dev
    dev.close()


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    p = BufferPool()
    yield p
    p.clear()


def submit_read(eng: IoEngine, fd: int, buf: AlignedBuffer, length: int,
                offset: int, buf_offset: int = 0) -> asyncio.Future[int]:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    eng.read(fd, buf, buf_offset, length, offset, fut.set_result)
    return fut


def submit_write(eng: IoEngine, fd: int, buf: AlignedBuffer, length: int, offset: int,
                 dsync: bool = False, buf_offset: int = 0) -> asyncio.Future[int]:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    eng.write(fd, buf, buf_offset, length, offset, fut.set_result, dsync)
    return fut


@on_uvloop
async def test_round_trip(engine: str, device: BlockDevice, pool: BufferPool,
                          tmp_path: Path) -> None:
    eng = make(engine)
    try:
        out = pool.get(64 * KiB)
        out.view[:64 * KiB] = os.urandom(64 * KiB)
        futs = [submit_write(eng, device.fd, out, 64 * KiB, 1 * MiB),
                submit_write(eng, device.fd, out, 4096, 0, dsync=True)]
        eng.kick()
        assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [64 * KiB, 4096]
        back = pool.get(64 * KiB)
        assert await asyncio.wait_for(submit_read(eng, device.fd, back, 64 * KiB, 1 * MiB),
                                      10) == 64 * KiB
        assert bytes(back.view[:64 * KiB]) == bytes(out.view[:64 * KiB])
        # And it really is in the file.
        with open(tmp_path / "f.img", "rb") as f:
            f.seek(1 * MiB)
            assert f.read(64 * KiB) == bytes(out.view[:64 * KiB])
    finally:
        eng.close()


@on_uvloop
async def test_read_at_end_of_file_is_short(engine: str, device: BlockDevice,
                                            pool: BufferPool) -> None:
    eng = make(engine)
    try:
        buf = pool.get(8192)
        res = await asyncio.wait_for(submit_read(eng, device.fd, buf, 8192, 8 * MiB - 4096), 10)
        assert res == 4096
        assert await asyncio.wait_for(submit_read(eng, device.fd, buf, 4096, 8 * MiB), 10) == 0
    finally:
        eng.close()


@on_uvloop
async def test_errors_are_negative_errno(engine: str, device: BlockDevice, pool: BufferPool,
                                         tmp_path: Path) -> None:
    eng = make(engine)
    ro = open_device(tmp_path / "f.img", read_only=True)
    try:
        buf = pool.get(8192)
        results = await asyncio.wait_for(asyncio.gather(
            submit_read(eng, device.fd, buf, 4096, 1),                  # unaligned offset
            submit_read(eng, device.fd, buf, 4096, 0, buf_offset=1),    # unaligned buffer
            submit_read(eng, 987654, buf, 4096, 0),                     # bad descriptor
            submit_write(eng, ro.fd, buf, 4096, 0),                     # read-only descriptor
            submit_read(eng, device.fd, buf, 4096, 4096),               # and one good one
        ), 10)
        assert results == [-errno.EINVAL, -errno.EINVAL, -errno.EBADF, -errno.EBADF, 4096]
    finally:
        ro.close()
        eng.close()


@on_uvloop
async def test_many_in_flight(engine: str, device: BlockDevice, pool: BufferPool) -> None:
    """More requests than AIO slots at once: the overflow waits and all complete, once."""
    eng = make(engine)
    try:
        n = engine_mod.AIO_SLOTS * 3 + 17
        bufs = []
        calls: dict[int, list[int]] = {}
        done = asyncio.Event()

        def completion(i: int):  # type: ignore[no-untyped-def]
            def cb(res: int) -> None:
                calls.setdefault(i, []).append(res)
                if len(calls) == n:
                    done.set()
            return cb

        for i in range(n):
            buf = pool.get(4096)
            buf.view[:8] = i.to_bytes(8, "little")
            bufs.append(buf)
            eng.write(device.fd, buf, 0, 4096, (i % 2048) * 4096, completion(i))
        eng.kick()
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.05)  # a duplicate completion would show up here
        assert sorted(calls) == list(range(n))
        assert all(v == [4096] for v in calls.values())
        if isinstance(eng, LinuxAioEngine):
            assert eng.in_flight == 0
        # Offsets that were written once hold their data.
        check = pool.get(4096)
        for i in (0, 1, n // 2, n - 1):
            assert await submit_read(eng, device.fd, check, 4096, i * 4096) == 4096
            assert int.from_bytes(check.view[:8], "little") == i
    finally:
        eng.close()


def _flaky_submit(eng: LinuxAioEngine, script: list[str]):  # type: ignore[no-untyped-def]
    """Wrap io_submit: each call takes the next action from `script` ("eagain": fail
    with EAGAIN, "one": submit only the first iocb, "ok": as asked) until it is empty."""
    real = eng._syscall

    def syscall(nr: int, *args: object) -> int:
        if nr == engine_mod._SYS_IO_SUBMIT and script:
            action = script.pop(0)
            if action == "eagain":
                ctypes.set_errno(errno.EAGAIN)
                return -1
            if action == "one":
                ctx, _count, ptrs = args
                return int(real(nr, ctx, 1, ptrs))
        return int(real(nr, *args))

    eng._syscall = syscall  # type: ignore[method-assign]


@pytest.mark.parametrize("script", [
    pytest.param(["eagain"], id="eagain-once"),
    pytest.param(["eagain"] * 5, id="eagain-repeatedly-nothing-in-flight"),
    pytest.param(["one", "eagain", "eagain", "one", "eagain"], id="partial-then-eagain"),
])
@on_uvloop
async def test_aio_eagain_requeues(device: BlockDevice, pool: BufferPool,
                                   script: list[str]) -> None:
    """io_submit refusing some or all iocbs with EAGAIN (kernel ring full): the refused
    ones are submitted later, even when nothing is in flight to complete and retry."""
    eng = LinuxAioEngine(asyncio.get_running_loop())
    try:
        _flaky_submit(eng, script)
        bufs = [pool.get(4096) for _ in range(8)]
        futs = [submit_read(eng, device.fd, b, 4096, i * 4096) for i, b in enumerate(bufs)]
        eng.kick()
        assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [4096] * 8
        assert not script, "the fault script was not used up"
    finally:
        eng.close()


@on_uvloop
async def test_aio_bad_iocb_fails_alone(device: BlockDevice, pool: BufferPool) -> None:
    """io_submit rejecting the first remaining iocb (EBADF at submission) fails that
    request and submits the rest of the batch."""
    eng = LinuxAioEngine(asyncio.get_running_loop())
    try:
        buf = pool.get(4096)
        futs = [submit_read(eng, device.fd, buf, 4096, 0),
                submit_read(eng, 987654, buf, 4096, 0),  # EBADF at submission
                submit_read(eng, device.fd, buf, 4096, 4096)]
        eng.kick()
        res = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert res == [4096, -errno.EBADF, 4096]
    finally:
        eng.close()


@on_uvloop
async def test_requests_are_submitted_without_kick(engine: str, device: BlockDevice,
                                                   pool: BufferPool) -> None:
    """Code that queues I/O and never calls kick() still gets it done (call_soon)."""
    eng = make(engine)
    try:
        buf = pool.get(4096)
        assert await asyncio.wait_for(submit_read(eng, device.fd, buf, 4096, 0), 10) == 4096
    finally:
        eng.close()


@on_uvloop
async def test_coroutine_forms(engine: str, device: BlockDevice, pool: BufferPool,
                               tmp_path: Path) -> None:
    eng = make(engine)
    ro = open_device(tmp_path / "f.img", read_only=True)
    try:
        buf = pool.get(8192)
        buf.view[:8192] = b"\x5a" * 8192
        assert await eng.awrite(device.fd, buf, 0, 8192, 0, dsync=True) == 8192
        assert await eng.aread(device.fd, buf, 0, 8192, 0) == 8192
        assert await eng.aread(device.fd, buf, 0, 8192, 8 * MiB - 4096) == 4096  # short: ok
        with pytest.raises(OSError) as exc:
            await eng.awrite(ro.fd, buf, 0, 4096, 0)
        assert exc.value.errno == errno.EBADF
        with pytest.raises(OSError) as exc:
            await eng.aread(device.fd, buf, 0, 4096, 3)
        assert exc.value.errno == errno.EINVAL
    finally:
        ro.close()
        eng.close()


@on_uvloop
async def test_run_blocking(engine: str) -> None:
    eng = make(engine)
    try:
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        eng.run_blocking(lambda a, b: a + b, 2, 3, callback=got.set_result)
        assert await asyncio.wait_for(got, 10) == 5
        failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        eng.run_blocking(os.fdatasync, 987654, callback=failed.set_result)
        err = await asyncio.wait_for(failed, 10)
        assert isinstance(err, OSError) and err.errno == errno.EBADF
        assert await eng.call_blocking(sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await eng.call_blocking(lambda: 1 // 0)
    finally:
        eng.close()


@on_uvloop
async def test_make_engine_choices(monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="unknown I/O engine"):
        make_engine(loop, "io_uring")
    eng = make_engine(loop, "threads")
    assert isinstance(eng, ThreadEngine)
    eng.close()

    def no_aio(self: LinuxAioEngine, loop: object, slots: int = 0) -> None:
        raise OSError(errno.ENOSYS, "io_setup: Function not implemented")

    monkeypatch.setattr(LinuxAioEngine, "__init__", no_aio)
    with caplog.at_level(logging.WARNING):
        eng = make_engine(loop, "aio")
    assert isinstance(eng, ThreadEngine)
    assert "Linux AIO unavailable" in caplog.text
    eng.close()


@on_uvloop
async def test_close_releases_the_eventfd(device: BlockDevice) -> None:
    before = len(os.listdir("/proc/self/fd"))
    eng = LinuxAioEngine(asyncio.get_running_loop())
    assert len(os.listdir("/proc/self/fd")) == before + 1
    eng.close()
    eng.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == before


@on_uvloop
async def test_aio_hooks_of_a_batch_end_run_with_it_even_when_one_fails(
        device: BlockDevice, pool: BufferPool, caplog: pytest.LogCaptureFixture) -> None:
    """after_completions() from a completion runs at the end of that batch of completions;
    one registered by such a hook runs there too, not on a later turn of the loop (a
    volume maps a batch of first writes in a hook, and the replies that answers go out
    from another); a hook that raises is logged and the others still run."""
    eng = LinuxAioEngine(asyncio.get_running_loop())
    try:
        seen: list[str] = []
        loop_turn = [0]

        def tick() -> None:
            loop_turn[0] += 1
            seen.append(f"turn {loop_turn[0]}")

        def second() -> None:
            seen.append("second")

        def first() -> None:
            seen.append("first")
            eng.after_completions(second)

        def broken() -> None:
            raise RuntimeError("a hook that fails")

        def completed(res: int) -> None:
            seen.append(f"io {res}")
            eng.after_completions(broken)
            eng.after_completions(first)
            asyncio.get_running_loop().call_soon(tick)

        buf = pool.get(4096)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(res: int) -> None:
            completed(res)
            fut.set_result(res)

        with caplog.at_level(logging.ERROR):
            eng.read(device.fd, buf, 0, 4096, 0, done)
            eng.kick()
            assert await asyncio.wait_for(fut, 10) == 4096
            await asyncio.sleep(0.01)
        assert seen[:3] == ["io 4096", "first", "second"], seen
        assert "turn 1" in seen[3:]
        assert "batch-end hook failed" in caplog.text
    finally:
        eng.close()
