"""Preallocated pools: ``pool create --preallocate[=full]`` and ``create: {preallocate:
true | falloc | full}``.

A new pool file is sparse by default; preallocating allocates every block at once
(fallocate), so that first writes into fresh chunks do not wait for the
filesystem, and the host filesystem cannot fail them later; ``full`` also writes
zeros over the file, so that no block is left an unwritten extent (checked with
FIEMAP). The pool itself must work the same either way: written through a real
server with qemu-io, snapshotted (first writes after it go into fresh chunks),
read back, checked.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerFactory, run

from nbdserver.errors import UserError
from nbdserver.pool.pool import Pool

MiB = 1 << 20


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserver", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags


def extents(path: Path) -> list[tuple[int, int, bool]]:
    """The file's extents from FIEMAP: (logical offset, length, unwritten)."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            count = 256
            buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC,
                                   0, count, 0)
            fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            last = False
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                out.append((logical, length, bool(flags & _FIEMAP_EXTENT_UNWRITTEN)))
                start = logical + length
                last = bool(flags & _FIEMAP_EXTENT_LAST)
            if last or not mapped:
                return out


def test_create_preallocates_only_when_asked(tmp_path: Path) -> None:
    sparse, whole = tmp_path / "sparse.pool", tmp_path / "whole.pool"
    Pool.create(sparse, 64 * MiB)
    Pool.create(whole, 64 * MiB, preallocate=True)
    assert allocated(sparse) < 8 * MiB  # the head pages only
    assert allocated(whole) >= 64 * MiB
    assert sparse.stat().st_size == whole.stat().st_size == 64 * MiB


def test_full_preallocation_leaves_no_unwritten_block(tmp_path: Path) -> None:
    """falloc leaves the data area unwritten extents (each first write converts one);
    full writes zeros over the whole file, with progress, and leaves none."""
    falloc, full = tmp_path / "falloc.pool", tmp_path / "full.pool"
    Pool.create(falloc, 64 * MiB, preallocate="falloc")
    seen: list[tuple[int, int]] = []
    Pool.create(full, 64 * MiB, preallocate="full",
                progress=lambda done, total: seen.append((done, total)))
    unwritten = sum(n for _, n, u in extents(falloc) if u)
    assert unwritten > 60 * MiB, extents(falloc)[:4]
    whole = extents(full)
    assert sum(n for _, n, _ in whole) == 64 * MiB
    assert not [e for e in whole if e[2]], whole
    assert seen and seen[-1] == (64 * MiB, 64 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    for pool in (falloc, full):  # both are pools, and empty ones
        r = cli("pool", "check", pool, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout + r.stderr
    with pytest.raises(ValueError, match="unknown preallocation 'fulll'"):
        Pool.create(tmp_path / "x.pool", 64 * MiB, preallocate="fulll")
    assert not (tmp_path / "x.pool").exists()


def test_cli_full_preallocation(tmp_path: Path) -> None:
    pool = tmp_path / "p.pool"
    r = cli("pool", "create", pool, "--size", "64M", "--preallocate=full")
    assert r.returncode == 0, r.stderr
    assert "64 MiB, preallocated and zero-filled" in r.stdout, r.stdout
    assert not [e for e in extents(pool) if e[2]]
    # a bare --preallocate followed by the pool: the mode it took is explained, nothing made
    other = tmp_path / "q.pool"
    r = cli("pool", "create", "--preallocate", other, "--size", "64M")
    assert r.returncode == 2
    assert f"expected falloc or full, got '{other}'" in r.stderr, r.stderr
    assert "--preallocate=falloc" in r.stderr
    assert not other.exists()
    r = cli("pool", "create", other, "--size", "64M", "--preallocate=zeros")
    assert r.returncode == 2 and "expected falloc or full, got 'zeros'" in r.stderr
    help_text = cli("pool", "create", "--help").stdout
    assert "--preallocate [{falloc,full}]" in help_text and "write zeros" in help_text


def test_interrupted_zero_fill_leaves_no_file(tmp_path: Path) -> None:
    """Ctrl-C while the pool file is being zero-filled (raised from the progress callback,
    as the signal would be between two writes): the interrupt goes on up, and the
    half-made file and the directories made for it are removed."""
    pool = tmp_path / "new" / "big.pool"
    calls: list[int] = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        assert allocated(pool) >= total  # fallocate came first: the fill is under way
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Pool.create(pool, 256 * MiB, preallocate="full", make_parents=True,
                    progress=interrupt)
    assert len(calls) == 3 and calls[-1] < 256 * MiB
    assert not pool.exists() and not pool.parent.exists()


def test_sigterm_during_pool_create_removes_the_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`pool create --preallocate=full` takes SIGTERM (a supervisor, `timeout`) and SIGHUP (a
    lost terminal) as Ctrl-C: the half-made file is removed, the exit status is 128 + the
    signal, and the handlers are put back. The signal is sent from within the fill."""
    from nbdserver import cli

    original = Pool.create

    def create(*args: object, progress: Callable[[int, int], None] | None = None,
               **kwargs: object) -> object:
        def signalled(done: int, total: int) -> None:
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # (another thread may take the signal: the
                time.sleep(0.01)  # main thread runs the handler at its next check)
            raise AssertionError("no signal came")
        return original(*args, progress=signalled, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Pool, "create", staticmethod(create))
    # An in-process serve (another test) may have left SIGHUP ignored, which the command
    # keeps as it is (as under nohup): not here.
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            pool = tmp_path / f"p{sig}.pool"
            status = cli.main(["pool", "create", str(pool), "--size", "64M",
                               "--preallocate=full"])
            assert status == 128 + sig
            assert not pool.exists()
            assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) \
                == before
    finally:
        signal.signal(signal.SIGHUP, hup)


def test_a_stop_while_serve_zero_fills_a_new_pool(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """serve creates a `preallocate: full` pool in a worker thread: SIGTERM during the fill is
    taken at once (the event loop is free), the fill stops between two writes, the half-made
    file and its directory are removed, and serve returns as stopped, not failed. The fill
    is slowed (50 ms a step) so that it is still under way when the signal comes."""
    import uvloop

    from nbdserver.config import parse_config
    from nbdserver.server import app

    pool = tmp_path / "new" / "p.pool"
    original = Pool.create
    filling = threading.Event()

    def create(*args: object, progress: Callable[[int, int], None] | None = None,
               **kwargs: object) -> object:
        def slowly(done: int, total: int) -> None:
            assert progress is not None
            filling.set()
            time.sleep(0.05)
            progress(done, total)
        return original(*args, progress=slowly, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Pool, "create", staticmethod(create))
    config = parse_config(
        f"listen: [{{unix: {tmp_path / 's.sock'}}}]\n"
        f"pools: [{{name: p, path: {pool}, create: {{size: 256M, preallocate: full}}}}]\n"
        "exports: [{name: v, pool: p, volume: v, create: {size: 1M}}]\n",
        source=tmp_path / "c.yaml")

    async def main() -> tuple[bool, float]:
        task = asyncio.ensure_future(app.serve(config))
        await asyncio.get_running_loop().run_in_executor(None, filling.wait, 30)
        began = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 30), time.monotonic() - began

    caplog.set_level("INFO")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stopped, took = runner.run(main())
    assert stopped is True
    assert took < 1.0  # not the whole fill: 32 steps of 50 ms at least
    assert not pool.exists() and not pool.parent.exists()
    assert "c.yaml:2: pools[0].create: stopped while zero-filling the new pool file" \
        in caplog.text, caplog.text


def test_full_preallocation_of_a_size_not_whole_blocks(tmp_path: Path) -> None:
    """A pool file whose size is not a multiple of the direct-I/O block: the zero fill
    stops at the last whole block (O_DIRECT cannot write less); the pool is whole."""
    pool = tmp_path / "odd.pool"
    seen: list[tuple[int, int]] = []
    Pool.create(pool, 100_000_000, preallocate="full",
                progress=lambda done, total: seen.append((done, total)))
    assert pool.stat().st_size == 100_000_000
    end = seen[-1][1]
    assert seen[-1][0] == end and 100_000_000 - 4096 < end < 100_000_000
    assert not [e for e in extents(pool) if e[2] and e[0] < end]
    r = cli("pool", "check", pool, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout + r.stderr


def test_a_pool_file_left_half_made_is_named_so(tmp_path: Path) -> None:
    """A file that begins with zeros where the superblock copies go (what a `pool create`
    killed during its zero fill leaves): said so, with what to do."""
    pool = tmp_path / "p.pool"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    r = cli("pool", "info", pool)
    assert r.returncode == 1
    assert "it begins with zeros, as an empty disk image does, and a pool file whose " \
        "creation was stopped" in r.stderr
    assert "if it is such a pool file, delete it to create the pool again" in r.stderr
    assert "a disk image is served as a file export" in r.stderr  # (an empty one, say)


def test_cli_reports_allocation(tmp_path: Path) -> None:
    whole, sparse = tmp_path / "whole.pool", tmp_path / "sparse.pool"
    r = cli("pool", "create", whole, "--size", "64M", "--preallocate", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["allocated_bytes"] == info["size_bytes"] == 64 * MiB  # (as documented)
    relative = subprocess.run([sys.executable, "-m", "nbdserver", "pool", "info", whole.name,
                               "--json"], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
    assert json.loads(relative.stdout)["path"] == str(whole)  # absolute, as a server says

    r = cli("pool", "create", sparse, "--size", "64M")
    assert r.returncode == 0, r.stderr
    assert "sparse (grows as data is written; see --preallocate)" in r.stdout
    info = json.loads(cli("pool", "info", sparse, "--json").stdout)
    assert 0 < info["allocated_bytes"] < info["size_bytes"]
    human = cli("pool", "info", whole).stdout
    assert any(line.split()[:1] == ["allocated"] and "64 MiB" in line
               for line in human.splitlines()), human

    help_text = cli("pool", "create", "--help").stdout
    assert "--preallocate" in help_text and "fallocate" in help_text


def test_a_failed_preallocation_leaves_no_file(tmp_path: Path) -> None:
    """A pool larger than the filesystem can hold: a clear error naming the path, and no
    half-made pool left behind (a sparse file of that size would be created fine)."""
    path = tmp_path / "huge.pool"
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UserError, match=f"{path}: cannot preallocate"):
        Pool.create(path, free + (64 << 30), preallocate=True)
    assert not path.exists()


@pytest.mark.parametrize(("args", "status", "needle"), [
    (("--size", "8E"), 2, "argument --size: '8E' is too large"),
    (("--size", "7E"), 1, "File too large"),  # past the filesystem's limit
    (("--size", "1G", "--max-volumes", "0"), 2, "argument --max-volumes: must be at least 1"),
    (("--size", "1G", "--max-volumes", "-5"), 2, "must be at least 1"),
    (("--size", "1G", "--max-volumes", "100000000"), 2,
     "argument --max-volumes: at most 1048576, got 100000000"),
    (("--size", "1G", "--chunk-size", "3K"), 2,
     "argument --chunk-size: expected a power of two"),
    (("--size", "1G", "--chunk-size", "3K", "--preallocate"), 2, "a power of two"),
    (("--size", "64K"), 2, "is too small: with 4 KiB chunks and room for 4096 volumes it "
                           "needs at least 6377472 bytes (for example 7M)"),
])
def test_a_refused_pool_create_says_why_and_leaves_nothing(
        tmp_path: Path, args: tuple[str, ...], status: int, needle: str) -> None:
    """Every mistake is one line naming it, with no traceback, and no file is left behind
    (before, a retry with the mistake fixed was refused: the file already existed)."""
    path = tmp_path / "p.pool"
    r = cli("pool", "create", path, *args)
    assert r.returncode == status, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not path.exists()
    r = cli("pool", "create", path, "--size", "64M")  # the retry
    assert r.returncode == 0, r.stderr


def test_create_over_an_empty_file_sizes_it(tmp_path: Path) -> None:
    path = tmp_path / "p.pool"
    path.touch()
    r = cli("pool", "create", path, "--size", "64M")
    assert r.returncode == 0, r.stderr
    assert path.stat().st_size == 64 * MiB


def test_create_over_an_empty_file_another_process_holds_leaves_it_alone(
        tmp_path: Path) -> None:
    """The lock is taken before the file is grown, and a create that fails leaves an
    empty file it found empty (a retry is then not refused as "already exists")."""
    path = tmp_path / "p.pool"
    path.touch()
    with open(path, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        r = cli("pool", "create", path, "--size", "64M")
        assert r.returncode == 1 and "in use by another process" in r.stderr, r.stderr
        assert path.stat().st_size == 0
    r = cli("pool", "create", path, "--size", "64M")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", [True, "full"])
def test_preallocated_pool_serves_first_writes(tmp_path: Path, mode: bool | str,
                                               nbd_server_factory: ServerFactory) -> None:
    pool = tmp_path / "p.pool"
    srv = nbd_server_factory(
        [{"name": "vm", "pool": "main", "volume": "vm", "create": {"size": "16M"}}],
        pools=[{"name": "main", "path": pool,
                "create": {"size": "64M", "preallocate": mode}}])
    assert allocated(pool) >= 64 * MiB
    assert bool([e for e in extents(pool) if e[2]]) is (mode is True)  # unwritten extents
    uri = srv.unix_uri("vm")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", uri])
    r = cli("volume", "snapshot", pool, "vm", "golden")
    assert r.returncode == 0, r.stderr
    # 4 KiB first writes after the snapshot, into fresh chunks of the preallocated file
    for k in range(0, 64):
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x22 {k * 256 * 1024} 4k", uri])
    for k in (0, 17, 63):
        run(["qemu-io", "-f", "raw", "-c", f"read -P 0x22 {k * 256 * 1024} 4k", uri])
        run(["qemu-io", "-f", "raw", "-c", f"read -P 0x11 {k * 256 * 1024 + 4096} 60k", uri])
    srv.stop()
    r = cli("pool", "check", pool, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is True
    r = cli("volume", "info", pool, "golden", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mapped_bytes"] == 16 * MiB


def test_guarantee_on_a_sparse_pool_says_what_it_cannot_promise(tmp_path: Path) -> None:
    sparse, whole = tmp_path / "sparse.pool", tmp_path / "whole.pool"
    assert cli("pool", "create", sparse, "--size", "64M").returncode == 0
    assert cli("pool", "create", whole, "--size", "64M", "--preallocate").returncode == 0
    for pool, noted in ((sparse, True), (whole, False)):
        r = cli("volume", "create", pool, "g", "--size", "8M", "--guarantee")
        assert r.returncode == 0, r.stderr
        assert ("is a sparse file: the guarantee holds inside the pool" in r.stderr) is noted
        r = cli("volume", "fork", pool, "g", "f", "--guarantee")
        assert r.returncode == 0, r.stderr
        assert ("--preallocate rules that out" in r.stderr) is noted
        r = cli("volume", "create", pool, "thin", "--size", "8M")
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_block_device_is_always_whole(loop_device: Callable[..., Path]) -> None:
    """On a block device --preallocate changes nothing, and nothing is called sparse."""
    dev = loop_device("64M", sector_size=4096)
    r = cli("pool", "create", dev, "--preallocate")
    assert r.returncode == 0, r.stderr
    assert "sparse" not in r.stdout and "preallocated" not in r.stdout
    info = json.loads(cli("pool", "info", dev, "--json").stdout)
    assert info["allocated_bytes"] == info["size_bytes"] == 64 * MiB
    r = cli("volume", "create", dev, "g", "--size", "8M", "--guarantee")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_pool_create_over_an_existing_file_says_what_it_is(tmp_path: Path) -> None:
    """A pool is not to be deleted on the tool's advice (a server may be serving it); a
    file that is not one may be."""
    pool = tmp_path / "p.pool"
    assert cli("pool", "create", pool, "--size", "64M").returncode == 0
    r = cli("pool", "create", pool, "--size", "64M")
    assert r.returncode == 1 and "already exists; refusing to overwrite it (it is a pool: " \
        "'nbdserver pool info' shows it)" in r.stderr, r.stderr
    other = tmp_path / "disk.img"
    other.write_bytes(b"x" * 4096)
    r = cli("pool", "create", other, "--size", "64M")
    assert r.returncode == 1 and "(delete it first to create a new pool)" in r.stderr, r.stderr
