"""libnbd's tools and bindings against a running server: nbdinfo, nbdcopy, nbdsh.

The Python scripts run under the system Python, which has libnbd's ``nbd``
module (``python3-libnbd``), and print JSON for the assertions here. libnbd
checks requests client-side (bounds, alignment, read-only) unless strict mode
is turned off with ``set_strict_mode(0)``; the error tests turn it off so the
requests reach the server and it is the server's answer being checked.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_CMD, NbdServerProcess, ServerFactory, nbd_python, pattern, run

KiB = 1024
MiB = 1024 * KiB


PRELUDE = """import nbd, json, sys, errno
def code(fn):
    # "ok", or the errno name of the nbd.Error the request raised
    try:
        fn()
        return "ok"
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno, e.errno)
"""


def nbd_json(script: str, *args: str | Path) -> Any:
    """Run `script` (after PRELUDE: the imports and ``code(fn)``) and parse the JSON it
    prints last."""
    proc = nbd_python(PRELUDE + script, *args)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nbdinfo_json(*args: str) -> dict[str, Any]:
    data = json.loads(run(["nbdinfo", "--json", *args]).stdout)
    assert isinstance(data, dict)
    return data


# -- nbdinfo ------------------------------------------------------------------------------------


def test_nbdinfo_list(nbd_server: NbdServerProcess) -> None:
    out = run(["nbdinfo", "--list", nbd_server.unix_uri()]).stdout
    assert 'export="disk":' in out and 'export="ro":' in out
    assert "description: test disk" in out
    data = nbdinfo_json("--list", nbd_server.unix_uri())
    names = [e["export-name"] for e in data["exports"]]
    assert names == ["disk", "ro"]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdinfo_json_disk(nbd_server: NbdServerProcess, transport: str) -> None:
    uri = nbd_server.unix_uri("disk") if transport == "unix" else nbd_server.tcp_uri("disk")
    data = nbdinfo_json(uri)
    assert data["protocol"] == "newstyle-fixed"
    assert data["structured"] is True
    (export,) = data["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == 64 * MiB
    assert export["description"] == "test disk"
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in export["contexts"]
    assert export["is_read_only"] is False
    assert export["is_rotational"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert export[flag] is True, flag


def test_nbdinfo_json_read_only(nbd_server: NbdServerProcess) -> None:
    (export,) = nbdinfo_json(nbd_server.unix_uri("ro"))["exports"]
    assert export["export-size"] == 1 * MiB
    assert export["is_read_only"] is True
    for flag in ("can_trim", "can_zero", "can_fast_zero"):
        assert export[flag] is False, flag
    assert export["can_flush"] is True and export["can_multi_conn"] is True


def test_nbdinfo_size_and_can(nbd_server: NbdServerProcess) -> None:
    assert run(["nbdinfo", "--size", nbd_server.unix_uri("disk")]).stdout.strip() == \
        str(64 * MiB)
    assert run(["nbdinfo", "--can", "trim", nbd_server.unix_uri("disk")],
               check=False).returncode == 0
    assert run(["nbdinfo", "--can", "trim", nbd_server.unix_uri("ro")],
               check=False).returncode == 2  # "false"
    assert run(["nbdinfo", "--is", "read-only", nbd_server.unix_uri("ro")],
               check=False).returncode == 0


def test_nbdinfo_map_holes_and_data(nbd_server: NbdServerProcess) -> None:
    uri = nbd_server.unix_uri("disk")
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 10M 64k",
         "-c", "discard 1M 512k", uri])
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    spans = [(e["offset"], e["length"], e["type"]) for e in entries]
    assert sum(length for _, length, _ in spans) == 64 * MiB
    hole = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert spans == [(0, 1536 * KiB, hole), (1536 * KiB, 512 * KiB, 0),
                     (2 * MiB, 8 * MiB, hole), (10 * MiB, 64 * KiB, 0),
                     (10 * MiB + 64 * KiB, 54 * MiB - 64 * KiB, hole)]
    totals = run(["nbdinfo", "--map", "--totals", uri]).stdout
    assert "data" in totals and "hole,zero" in totals


# -- nbdcopy ------------------------------------------------------------------------------------


def test_nbdcopy_both_ways(nbd_server: NbdServerProcess, tmp_path: Path,
                           disk_image: Path) -> None:
    src = tmp_path / "src.img"
    data = bytearray(64 * MiB)
    for i in range(0, 64, 3):  # a mixture of data and zero runs
        data[i * MiB:i * MiB + 700 * KiB] = pattern(700 * KiB, seed=i)
    src.write_bytes(data)
    uri = nbd_server.unix_uri("disk")
    run(["nbdcopy", "--flush", src, uri], timeout=120)
    assert disk_image.read_bytes() == bytes(data)
    out = tmp_path / "out.img"
    run(["nbdcopy", uri, out], timeout=120)
    assert out.read_bytes() == bytes(data)
    # Several connections and requests at once (nbdcopy uses multi-conn when offered).
    out2 = tmp_path / "out2.img"
    run(["nbdcopy", "--connections=4", "--requests=32", "--request-size=65536", uri, out2],
        timeout=120)
    assert out2.read_bytes() == bytes(data)


def test_nbdcopy_between_exports_over_tcp(nbd_server_factory: ServerFactory,
                                          tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(pattern(16 * MiB, seed=8))
    srv = nbd_server_factory([{"name": "a", "file": a}, {"name": "b", "file": b, "size": "16M"}])
    run(["nbdcopy", srv.tcp_uri("a"), srv.tcp_uri("b")], timeout=120)
    assert b.read_bytes() == a.read_bytes()


# -- nbdsh and the Python bindings ------------------------------------------------------------


def test_nbdsh_command_line(nbd_server: NbdServerProcess) -> None:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    proc = run(["nbdsh", "-u", nbd_server.unix_uri("disk"),
                "-c", "h.pwrite(b'nbdsh!' * 1024, 4096)",
                "-c", "print(h.pread(512, 4096 + 6 * 512)[:12].decode(), h.get_size())"],
               env=env)
    assert proc.stdout.split() == ["nbdsh!nbdsh!", str(64 * MiB)]


STRUCTURED_READ = """
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
offset, count = int(sys.argv[2]), int(sys.argv[3])
chunks = []
def chunk(buf, off, status, err):
    kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, str(status))
    chunks.append([off, len(buf), kind, buf.hex() if kind == "data" and len(buf) <= 16 else ""])
    return 0
buf = h.pread_structured(count, offset, chunk)
print(json.dumps({"chunks": chunks, "sha": __import__("hashlib").sha256(buf).hexdigest()}))
"""


def test_structured_read_from_a_file(nbd_server: NbdServerProcess) -> None:
    """A file export answers with data chunks that cover the request exactly."""
    import hashlib
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 12k 4k", nbd_server.unix_uri("disk")])
    res = nbd_json(STRUCTURED_READ, nbd_server.unix_uri("disk"), "8192", str(1 * MiB))
    chunks = sorted(res["chunks"])
    assert chunks[0][0] == 8192
    assert sum(c[1] for c in chunks) == 1 * MiB
    assert all(c1[0] + c1[1] == c2[0] for c1, c2 in itertools.pairwise(chunks))
    expected = bytes(4096) + b"\x3c" * 4096 + bytes(1 * MiB - 8192)
    assert res["sha"] == hashlib.sha256(expected).hexdigest()


def test_structured_read_with_hole_chunks(nbd_server_factory: ServerFactory,
                                          tmp_path: Path) -> None:
    """A thin pool volume answers unwritten ranges with OFFSET_HOLE chunks: libnbd
    sees data and hole chunks that tile the request and the data it gets is right."""
    import hashlib
    srv = nbd_server_factory(
        [{"name": "vol", "pool": "main", "volume": "v", "create": {"size": "16M"}}],
        pools=[{"name": "main", "path": tmp_path / "pool.img", "create": {"size": "128M"}}])
    uri = srv.unix_uri("vol")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 3M 4k", uri])
    res = nbd_json(STRUCTURED_READ, uri, "0", str(4 * MiB))
    chunks = sorted(res["chunks"])
    assert {c[2] for c in chunks} == {"data", "hole"}
    pos = 0
    for off, length, _, _ in chunks:
        assert off == pos, chunks
        pos += length
    assert pos == 4 * MiB
    written = [(1 * MiB, 64 * KiB), (3 * MiB, 4 * KiB)]
    for off, length, kind, _ in chunks:  # data chunks only where something was written
        if kind == "data":
            assert any(off < w + n and w < off + length for w, n in written), chunks
    expected = bytearray(4 * MiB)
    expected[1 * MiB:1 * MiB + 64 * KiB] = b"\xab" * (64 * KiB)
    expected[3 * MiB:3 * MiB + 4 * KiB] = b"\xcd" * (4 * KiB)
    assert res["sha"] == hashlib.sha256(bytes(expected)).hexdigest()
    assert any(c[2] == "hole" and c[0] == 0 for c in chunks)  # nothing written below 1M


LARGEST_REQUESTS = """
uri, raw = sys.argv[1], sys.argv[2]
out = {}
h = nbd.NBD()
h.connect_uri(uri)  # block sizes asked for (libnbd's default): a 512-byte minimum
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
data = bytes(range(256)) * (128 << 10)  # 32 MiB
for name, off in (("write_fresh", (64 << 20) + 512), ("write_over", (64 << 20) + 1024)):
    h.pwrite(data, off)  # 32 MiB over chunks new to the volume, then over its own
    out[name] = h.pread(32 << 20, off) == data
h.pwrite(data[:2 << 20], 0)
out["fast_zero_partial"] = code(lambda: h.zero(512, 4096, nbd.CMD_FLAG_FAST_ZERO))
out["fast_zero_chunks"] = code(lambda: h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO))
out["after_partial"] = h.pread(2 << 20, 0) == data[:1 << 20] + bytes(1 << 20)
# A client that does not ask for block sizes may send any alignment (minimum 1):
r = nbd.NBD()
r.set_request_block_size(False)
r.set_strict_mode(0)
r.connect_uri(raw)
r.pwrite(data, 1)
out["raw_unaligned"] = r.pread(32 << 20, 1) == data
out["raw_still_connected"] = r.pread(1, 0) == bytes(1)
print(json.dumps(out))
"""


def test_largest_requests_at_any_alignment(nbd_server_factory: ServerFactory,
                                           tmp_path: Path) -> None:
    """A 32 MiB request (the advertised maximum) that is not aligned to the volume's
    chunks or the file's blocks spans more than 32 MiB of them: it still reads and
    writes right. A FAST_ZERO that would have to write part of a chunk is refused
    (ENOTSUP) and changes nothing; over whole chunks it zeroes."""
    srv = nbd_server_factory(
        [{"name": "vol", "pool": "main", "volume": "v", "create": {"size": "128M"}},
         {"name": "raw", "file": tmp_path / "raw.img", "size": "40M"}],
        pools=[{"name": "main", "path": tmp_path / "pool.img", "create": {"size": "256M"}}])
    res = nbd_json(LARGEST_REQUESTS, srv.unix_uri("vol"), srv.unix_uri("raw"))
    assert res == {"write_fresh": True, "write_over": True,
                   "fast_zero_partial": "ENOTSUP", "fast_zero_chunks": "ok",
                   "after_partial": True,
                   "raw_unaligned": True, "raw_still_connected": True}, res
    assert "Traceback" not in srv.stderr


HOLES_STAY = """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
big = nbd.NBD()
big.connect_uri(sys.argv[2])
size = h.get_size()
def status():
    got = []
    def extent(ctx, off, entries, err):
        got.extend(entries)
        return 0
    h.block_status(size, 0, extent)
    return got
out = {"size": size}
# The pool is filled up by another volume first: nothing may be allocated now.
n = 0
while code(lambda: big.pwrite(bytes([0x5a]) * (1 << 20), n << 20)) == "ok":
    n += 1
out["big_chunks"] = n
out["again"] = [code(lambda: big.pwrite(bytes(1 << 20), n << 20)) for _ in range(3)]
out["trim_part_of_hole"] = code(lambda: h.trim(8192, 4096))
out["trim_parts_of_two_holes"] = code(lambda: h.trim((1 << 20) - 4096, 8192))
out["zero_part_of_hole"] = code(lambda: h.zero(512, 512))
out["fast_zero_whole"] = code(lambda: h.zero(size, 0, nbd.CMD_FLAG_FAST_ZERO))
out["status_empty"] = status()
out["reads_zeros"] = h.pread(size, 0) == bytes(size)
# Now space for it, data everywhere, then one trim of the whole volume (its last chunk
# is partial): nothing stays mapped.
big.trim(big.get_size(), 0)
big.flush()
h.pwrite(bytes([0xc3]) * size, 0)
out["status_full"] = status()
out["trim_whole"] = code(lambda: h.trim(size, 0))
out["status_trimmed"] = status()
out["reads_zeros_after"] = h.pread(size, 0) == bytes(size)
print(json.dumps(out))
"""


def test_trim_and_zero_leave_holes_alone(nbd_server_factory: ServerFactory,
                                         tmp_path: Path) -> None:
    """A TRIM or WRITE_ZEROES (without NO_HOLE) over part of a chunk that holds nothing
    leaves it a hole (it reads zeros already): nothing is allocated, so it succeeds in a
    full pool. A range to the end of a volume whose size is not a multiple of the chunk
    covers its last chunk whole (trimmed, unmapped; FAST_ZERO accepted)."""
    pool = tmp_path / "pool.img"
    size = 8 * MiB + 512
    srv = nbd_server_factory(
        [{"name": "v", "pool": "main", "volume": "v", "create": {"size": size}},
         {"name": "big", "pool": "main", "volume": "big", "create": {"size": "64M"}}],
        pools=[{"name": "main", "path": pool,
                "create": {"size": "48M", "chunk-size": "1M"}}])
    res = nbd_json(HOLES_STAY, srv.unix_uri("v"), srv.unix_uri("big"))
    hole = 3  # STATE_HOLE | STATE_ZERO
    assert res["big_chunks"] > 0 and res["again"] == ["ENOSPC"] * 3
    assert {k: res[k] for k in ("trim_part_of_hole", "trim_parts_of_two_holes",
                                "zero_part_of_hole", "fast_zero_whole", "trim_whole")} \
        == dict.fromkeys(("trim_part_of_hole", "trim_parts_of_two_holes",
                          "zero_part_of_hole", "fast_zero_whole", "trim_whole"), "ok"), res
    assert res["status_empty"] == [size, hole], res["status_empty"]
    assert res["reads_zeros"] and res["reads_zeros_after"]
    assert res["status_full"] == [size, 0], res["status_full"]
    assert res["status_trimmed"] == [size, hole], res["status_trimmed"]
    srv.stop()
    said = [line for line in srv.stderr.splitlines() if "ENOSPC" in line or "no free" in line]
    assert len(said) == 1, srv.stderr  # four writes failed: the first is logged, with why
    assert "WRITE failed" in said[0] and "the first in 60 s" in said[0], said
    info = json.loads(run([*SERVER_CMD, "volume", "info", pool, "v", "--json"]).stdout)
    assert info["mapped_bytes"] == 0, info
    check = run([*SERVER_CMD, "pool", "check", pool, "--json"], check=False)
    assert check.returncode == 0 and json.loads(check.stdout)["ok"] is True, check.stdout


BLOCK_STATUS = """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
out = {}
for name, flags in (("all", 0), ("one", nbd.CMD_FLAG_REQ_ONE)):
    got = []
    def extent(ctx, off, entries, err):
        got.append([ctx, off, list(entries)])
        return 0
    h.block_status(int(sys.argv[3]), int(sys.argv[2]), extent, flags)
    out[name] = got
print(json.dumps(out))
"""


def test_block_status_with_and_without_req_one(nbd_server: NbdServerProcess) -> None:
    uri = nbd_server.unix_uri("disk")
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 64k 64k", "-c", "write -P 2 256k 4k", uri])
    res = nbd_json(BLOCK_STATUS, uri, "0", str(1 * MiB))
    ((ctx, off, entries),) = res["all"]
    assert (ctx, off) == ("base:allocation", 0)
    pairs = list(zip(entries[::2], entries[1::2], strict=True))
    hole, data = 3, 0
    assert pairs[:4] == [(64 * KiB, hole), (64 * KiB, data), (128 * KiB, hole), (4 * KiB, data)]
    assert pairs[4][1] == hole and sum(p[0] for p in pairs) >= 1 * MiB
    ((ctx, off, entries),) = res["one"]
    assert entries == [64 * KiB, hole]
    # REQ_ONE from inside a data extent: one descriptor, no longer than the request.
    res = nbd_json(BLOCK_STATUS, uri, str(96 * KiB), str(16 * KiB))
    ((_, _, entries),) = res["one"]
    assert entries == [16 * KiB, data]


MULTI_CONN = """
uri = sys.argv[1]
handles = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn()
    handles.append(h)
a, b, c = handles
data = bytes(range(256)) * 256
a.pwrite(data, 1 << 20)            # no FUA
b.flush()                          # a flush on another connection covers it
out = {"read": c.pread(len(data), 1 << 20) == data}
a.pwrite(b"\\x42" * 512, 4096, nbd.CMD_FLAG_FUA)
out["fua"] = b.pread(512, 4096) == b"\\x42" * 512
for h in handles:
    h.shutdown()
print(json.dumps(out))
"""


def test_multi_conn_write_flush_read(nbd_server: NbdServerProcess, disk_image: Path) -> None:
    res = nbd_json(MULTI_CONN, nbd_server.unix_uri("disk"))
    assert res == {"read": True, "fua": True}
    with open(disk_image, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(65536) == bytes(range(256)) * 256


ERRORS = """
h = nbd.NBD()
h.set_strict_mode(0)           # let the requests through to the server
h.connect_uri(sys.argv[1])
size = h.get_size()
out = {
    "read_past_end": code(lambda: h.pread(4096, size)),
    "read_across_end": code(lambda: h.pread(8192, size - 4096)),
    "write_past_end": code(lambda: h.pwrite(b"x" * 4096, size)),
    "trim_past_end": code(lambda: h.trim(4096, size)),
    "zero_past_end": code(lambda: h.zero(4096, size)),
    "unaligned_read": code(lambda: h.pread(100, 3)),
    "unaligned_write": code(lambda: h.pwrite(b"y" * 100, 3)),
    "fast_zero": code(lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)),
    "still_works": code(lambda: h.pread(512, 0)),
}
print(json.dumps(out))
"""


def test_error_replies(nbd_server: NbdServerProcess) -> None:
    res = nbd_json(ERRORS, nbd_server.unix_uri("disk"))
    assert res == {
        "read_past_end": "EINVAL",
        "read_across_end": "EINVAL",
        "write_past_end": "ENOSPC",
        "trim_past_end": "EINVAL",
        "zero_past_end": "ENOSPC",
        "unaligned_read": "EINVAL",     # libnbd asked for block sizes: 512 is enforced
        "unaligned_write": "EINVAL",
        "fast_zero": "ok",              # a file's fallocate is fast
        "still_works": "ok",
    }


READ_ONLY_ERRORS = """
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
print(json.dumps({
    "write": code(lambda: h.pwrite(b"x" * 512, 0)),
    "trim": code(lambda: h.trim(512, 0)),
    "zero": code(lambda: h.zero(512, 0)),
    "flush": code(lambda: h.flush()),
    "read": code(lambda: h.pread(512, 0)),
}))
"""


def test_read_only_export_errors(nbd_server: NbdServerProcess, tmp_path: Path) -> None:
    before = (tmp_path / "ro.img").read_bytes()
    res = nbd_json(READ_ONLY_ERRORS, nbd_server.unix_uri("ro"))
    assert res == {"write": "EPERM", "trim": "EPERM", "zero": "EPERM", "flush": "ok",
                   "read": "ok"}
    assert (tmp_path / "ro.img").read_bytes() == before


def test_strict_mode_is_really_off(nbd_server: NbdServerProcess) -> None:
    """Control for the error tests: with strict mode on, libnbd refuses the same requests
    itself, with its own message, so the tests above really reached the server."""
    proc = nbd_python("""
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pread(100, 3)
except nbd.Error as e:
    print(e.string)
h.set_strict_mode(0)
try:
    h.pread(100, 3)
except nbd.Error as e:
    print(e.string)
""", nbd_server.unix_uri("disk"))
    client_side, server_side = proc.stdout.strip().splitlines()
    assert "unaligned" in client_side
    assert "command failed" in server_side


def test_min_block_size_setting_is_advertised_and_enforced(nbd_server_factory: ServerFactory,
                                                           tmp_path: Path) -> None:
    srv = nbd_server_factory([{"name": "d", "file": tmp_path / "d.img", "size": "1M",
                               "min-block-size": 4096}])
    (export,) = nbdinfo_json(srv.unix_uri("d"))["exports"]
    assert export["block_size_minimum"] == 4096
    res = nbd_json(ERRORS.replace("h.pread(100, 3)", "h.pread(512, 512)"), srv.unix_uri("d"))
    assert res["unaligned_read"] == "EINVAL"
