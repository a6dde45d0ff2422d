"""Deterministic kill -9 cases: each one a moment the random campaign found or could miss.

Each test drives a real ``nbdserver serve`` over its Unix socket, kills it with
SIGKILL at a chosen moment, restarts it on the same pool and reads back. The
random campaign (test_crash_campaign.py, scripts/crash-test) hits these
moments by chance; here they are hit every time.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_CMD, NbdServerProcess, ServerFactory, pattern, run
from nbdclient import NbdClient, NbdReplyError, connect

from nbdserver.pool.pool import Pool
from nbdserver.protocol import constants as c

KiB = 1024
MiB = 1024 * KiB
CHUNK = 4 * KiB


def volume_export(name: str, **create: Any) -> dict[str, Any]:
    # min-block-size 1: byte-granular requests reach the volume layer unaligned
    item: dict[str, Any] = {"name": name, "pool": "p", "volume": name, "min-block-size": 1}
    if create:
        item["create"] = create
    return item


def serve(factory: ServerFactory, pool: Path, exports: list[dict[str, Any]],
          name: str) -> NbdServerProcess:
    return factory(exports, pools=[{"name": "p", "path": pool}], tcp=False, name=name)


async def clients(srv: NbdServerProcess, *names: str) -> list[NbdClient]:
    assert srv.socket_path is not None
    return [await connect(srv.socket_path, name, meta=()) for name in names]


def check_clean(pool: Path) -> None:
    out = run([*SERVER_CMD, "pool", "check", pool, "--json"], check=False)
    assert out.returncode == 0 and '"ok": true' in out.stdout, out.stdout + out.stderr


def which(data: bytes, **values: bytes) -> str:
    """The name of the value `data` equals ("zeros", "other"), for readable assertions."""
    values.setdefault("zeros", bytes(len(data)))
    return next((name for name, v in values.items() if v == data), "other")


def pool_at(tmp_path: Path) -> Path:
    path = tmp_path / "pool.img"
    Pool.create(path, 64 * MiB)
    return path


async def test_fua_write_in_place_over_an_unflushed_allocation_survives_kill(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A FUA write to a chunk mapped by an earlier, unflushed write goes in place: its
    reply promises the mapping is durable too."""
    pool = pool_at(tmp_path)
    srv = serve(nbd_server_factory, pool, [volume_export("v", size="8M")], "first")
    (v,) = await clients(srv, "v")
    await v.write(0, pattern(CHUNK, 1))  # maps a new chunk; not flushed
    await v.write(0, pattern(CHUNK, 2), fua=True)  # in place, with FUA
    srv.kill()
    await v.close()
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    got = which(await v.read(0, CHUNK), new=pattern(CHUNK, 2), first=pattern(CHUNK, 1))
    assert got == "new"
    await v.close()
    srv.stop()
    check_clean(pool)


async def test_unaligned_fua_write_over_an_unflushed_allocation_survives_kill(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """The same through the slow path (unaligned: read-modify-write in place)."""
    pool = pool_at(tmp_path)
    srv = serve(nbd_server_factory, pool, [volume_export("v", size="8M")], "first")
    (v,) = await clients(srv, "v")
    await v.write(0, pattern(3 * CHUNK, 1))
    await v.write(1000, pattern(9000, 2), fua=True)
    srv.kill()
    await v.close()
    srv = serve(nbd_server_factory, pool, [volume_export("v")], "after")
    (v,) = await clients(srv, "v")
    got = which(await v.read(1000, 9000), new=pattern(9000, 2),
                first=pattern(3 * CHUNK, 1)[1000:10000])
    assert got == "new"
    await v.close()
    srv.stop()
    check_clean(pool)


async def test_claiming_a_chunk_another_volume_just_stopped_sharing_survives_kill(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """Fork v as w; w rewrites a chunk (copy-on-write: the old chunk is now v's alone, in
    memory); v rewrites it in place. Killed before any commit, the pool on disk still has
    w pointing at that chunk: w must read its fork-time bytes or its own write, never v's."""
    pool = pool_at(tmp_path)
    old, mine, theirs = pattern(CHUNK, 1), pattern(CHUNK, 2), pattern(CHUNK, 3)
    srv = serve(nbd_server_factory, pool, [volume_export("v", size="8M")], "first")
    (v,) = await clients(srv, "v")
    await v.write(0, old)
    await v.close()
    srv.stop()
    srv = serve(nbd_server_factory, pool,
                [volume_export("v"), volume_export("w", fork="v")], "forked")
    v, w = await clients(srv, "v", "w")
    await w.write(0, mine)  # copy-on-write in w
    await v.write(0, theirs)  # the old chunk is v's alone now: claimed, written in place
    srv.kill()
    await v.close()
    await w.close()
    srv = serve(nbd_server_factory, pool, [volume_export("v"), volume_export("w")], "after")
    v, w = await clients(srv, "v", "w")
    got = which(await w.read(0, CHUNK), old=old, mine=mine, theirs=theirs)
    assert got in ("old", "mine"), f"w reads {got}"
    got = which(await v.read(0, CHUNK), old=old, mine=mine, theirs=theirs)
    assert got in ("old", "theirs"), f"v reads {got}"
    await v.close()
    await w.close()
    srv.stop()
    check_clean(pool)


async def test_promised_map_pages_survive_kill(nbd_server_factory: ServerFactory,
                                               tmp_path: Path) -> None:
    """A guaranteed volume's promise of map pages is counted again when the pool opens
    after a kill: the thin volume that filled the metadata area is still refused new
    map pages, and the guaranteed one writes every chunk (radix, fan-out 4: a map page
    per few chunks)."""
    pool = tmp_path / "pool.img"
    Pool.create(pool, 64 * MiB, map_params=(4, 0, 0, 0))
    run([*SERVER_CMD, "volume", "create", pool, "g", "--size", str(64 * CHUNK), "--guarantee"])
    run([*SERVER_CMD, "volume", "create", pool, "hog", "--size", str(3072 * CHUNK)])
    exports = [volume_export("g"), volume_export("hog")]
    srv = serve(nbd_server_factory, pool, exports, "first")
    g, hog = await clients(srv, "g", "hog")
    refused = None
    for lc in range(0, 3072, 16):
        try:
            await hog.write(lc * CHUNK, pattern(CHUNK, lc))
        except NbdReplyError as e:
            assert e.code == errno.ENOSPC, e
            refused = lc
            break
    assert refused is not None and refused > 0, "the metadata area never filled"
    flushed = b"".join(pattern(CHUNK, 1000 + lc) for lc in range(0, 64, 2))
    for lc in range(0, 64, 2):
        await g.write(lc * CHUNK, pattern(CHUNK, 1000 + lc))
    await g.flush()
    for lc in range(1, 64, 2):  # in flight when the server dies
        g.submit(c.CMD_WRITE, lc * CHUNK, data=pattern(CHUNK, 2000 + lc))
    await g.drain()
    srv.kill()
    await g.close()
    await hog.close()

    srv = serve(nbd_server_factory, pool, exports, "after")
    g, hog = await clients(srv, "g", "hog")
    got = await g.read(0, 64 * CHUNK)
    assert b"".join(got[lc * CHUNK:(lc + 1) * CHUNK] for lc in range(0, 64, 2)) == flushed
    with pytest.raises(NbdReplyError) as exc:
        await hog.write(refused * CHUNK, pattern(CHUNK, 7))
    assert exc.value.code == errno.ENOSPC
    want = b"".join(pattern(CHUNK, 3000 + lc) for lc in range(64))
    for lc in reversed(range(64)):
        await g.write(lc * CHUNK, want[lc * CHUNK:(lc + 1) * CHUNK])
    await g.flush()
    assert await g.read(0, 64 * CHUNK) == want
    await g.close()
    await hog.close()
    srv.stop()
    check_clean(pool)


def _json(*args: str | Path) -> Any:
    return json.loads(run([*SERVER_CMD, *args, "--json"]).stdout)


async def test_a_promise_given_back_by_a_deletion_survives_kill(nbd_server_factory: ServerFactory,
                                                                tmp_path: Path) -> None:
    """A snapshot of the guaranteed volume g shares its chunks, so g is promised its
    whole size; deleting the snapshot (through the running server) gives back the
    promise of the chunks g holds alone. The server is then killed with g's writes to
    its holes in flight. After the restart the smaller promise still covers g's need
    exactly (pool check counts it), and g writes every chunk."""
    pool = pool_at(tmp_path)
    chunk = _json("pool", "info", pool)["chunk_size"]
    n = 64
    run([*SERVER_CMD, "volume", "create", pool, "g", "--size", str(n * chunk), "--guarantee"])
    srv = serve(nbd_server_factory, pool, [volume_export("g")], "first")
    (g,) = await clients(srv, "g")
    flushed = pattern(32 * chunk, 1)
    await g.write(0, flushed)
    await g.flush()
    run([*SERVER_CMD, "volume", "snapshot", pool, "g", "s"])
    assert _json("volume", "info", pool, "g")["reserved_bytes"] == n * chunk
    run([*SERVER_CMD, "volume", "delete", pool, "s"])
    assert _json("volume", "info", pool, "g")["reserved_bytes"] == (n - 32) * chunk
    for lc in range(32, n):  # in flight when the server dies
        g.submit(c.CMD_WRITE, lc * chunk, data=pattern(chunk, 100 + lc))
    await g.drain()
    srv.kill()
    await g.close()

    check_clean(pool)  # (also: every guaranteed volume is promised what it may need)
    info = _json("volume", "info", pool, "g")
    assert info["reserved_bytes"] + info["exclusive_bytes"] == n * chunk, info
    srv = serve(nbd_server_factory, pool, [volume_export("g")], "after")
    (g,) = await clients(srv, "g")
    assert await g.read(0, 32 * chunk) == flushed
    want = pattern(n * chunk, 7)
    await g.write(0, want)
    await g.flush()
    assert await g.read(0, n * chunk) == want
    await g.close()
    srv.stop()
    check_clean(pool)
