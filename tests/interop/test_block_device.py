"""Serving a block device (a loop device with 4 KiB logical sectors) to real clients.

The export advertises a 512-byte minimum block (the config default) over a
device that only does 4 KiB direct I/O, so 512-byte client requests must be
served by read-modify-write; zeroing a block device is not fast, so FAST_ZERO
is not offered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import ServerFactory, nbd_python, pattern, run

KiB = 1024
MiB = 1024 * KiB


def test_block_device_export(nbd_server_factory: ServerFactory,
                             loop_device: Callable[..., Path], tmp_path: Path) -> None:
    dev = loop_device("32M", sector_size=4096)
    srv = nbd_server_factory([{"name": "blk", "file": dev}])
    uri = srv.unix_uri("blk")
    (export,) = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"]
    assert export["export-size"] == 32 * MiB
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["can_zero"] is True and export["can_trim"] is True
    assert export["can_fast_zero"] is False

    # 512-byte writes inside 4 KiB sectors, from qemu.
    out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", "-c", "write -P 0x22 512 512",
               "-c", "write -P 0x33 3584 1024", "-c", "read -P 0x11 0 512",
               "-c", "read -P 0x22 512 512", "-c", "read -P 0x11 1024 2560",
               "-c", "read -P 0x33 3584 1024", "-c", "read -P 0 4608 3584", uri]).stdout
    assert out.count("read ") == 5
    with open(dev, "rb") as f:
        head = f.read(8192)
    assert head == (b"\x11" * 512 + b"\x22" * 512 + b"\x11" * 2560 + b"\x33" * 1024
                    + bytes(3584))

    res = nbd_python("""
import nbd, sys, json
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
def code(fn):
    try:
        fn()
        return "ok"
    except nbd.Error as e:
        return e.errno
out = {"can_fast_zero": h.can_fast_zero(),
       "fast_zero": code(lambda: h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)),
       "zero": code(lambda: h.zero(4096, 1 << 20)),
       "zeroed": h.pread(4096, 1 << 20) == bytes(4096)}
print(json.dumps(out))
""", uri)
    result = json.loads(res.stdout)
    # Not advertised, so the flag is refused up front (and nothing is zeroed by it).
    assert result == {"can_fast_zero": False, "fast_zero": "EINVAL", "zero": "ok",
                      "zeroed": True}
    data = pattern(4 * MiB, seed=12)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run(["nbdcopy", src, uri])
    with open(dev, "rb") as f:
        assert f.read(4 * MiB) == data
    srv.stop()
