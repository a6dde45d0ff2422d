"""qemu-img and qemu-io (QEMU's own NBD client) against a running server.

Each test gets a fresh server (``nbd_server``: 'disk', 64 MiB sparse and
writable, 'ro', 1 MiB read-only holding bytes(range(256)) repeated), writes
through the real client, and checks the result both through the client and in
the image file itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import NbdServerProcess, pattern, run

KiB = 1024
MiB = 1024 * KiB


def qemu_io(uri: str, *commands: str, check: bool = True, read_only: bool = False) -> str:
    """Run qemu-io commands on `uri`; with `check`, fails on a non-zero exit (qemu-io
    exits 1 when a command, or a ``read -P`` pattern check, fails) or a reported failure."""
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for cmd in commands:
        args += ["-c", cmd]
    proc = run([*args, uri], timeout=60, check=check)
    out = proc.stdout + proc.stderr
    if check:
        for bad in ("failed", "error", "Error", "usage", "Parsing"):
            assert bad not in out, f"qemu-io reported a failure:\n{out}"
    return out


def qemu_img_map(uri: str) -> list[dict[str, object]]:
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout
    data = json.loads(out)
    assert isinstance(data, list)
    return data


def region_flags(extents: list[dict[str, object]], offset: int, length: int) -> set[tuple]:
    """The (data, zero) flags of every extent overlapping [offset, offset+length)."""
    out = set()
    for e in extents:
        start, size = int(e["start"]), int(e["length"])  # type: ignore[call-overload]
        if start < offset + length and offset < start + size:
            out.add((e["data"], e["zero"]))
    return out


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_img_info(nbd_server: NbdServerProcess, transport: str) -> None:
    uri = nbd_server.unix_uri("disk") if transport == "unix" else nbd_server.tcp_uri("disk")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 64 * MiB
    assert info["format"] == "raw"
    ro = json.loads(run(["qemu-img", "info", "--output=json",
                         nbd_server.unix_uri("ro")]).stdout)
    assert ro["virtual-size"] == 1 * MiB


def test_qemu_img_convert_in_and_out(nbd_server: NbdServerProcess, tmp_path: Path,
                                     disk_image: Path) -> None:
    src = tmp_path / "src.img"
    data = bytearray(64 * MiB)
    data[0:3 * MiB] = pattern(3 * MiB, seed=1)
    data[10 * MiB:10 * MiB + 12345] = pattern(12345, seed=2)  # an unaligned end
    data[63 * MiB:] = pattern(1 * MiB, seed=3)
    src.write_bytes(data)
    uri = nbd_server.unix_uri("disk")
    # In: the target exists (-n), convert writes data and zeroes/trims the rest.
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri], timeout=120)
    assert disk_image.read_bytes() == bytes(data)
    # Out, to raw and to qcow2.
    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out], timeout=120)
    assert out.read_bytes() == bytes(data)
    qcow2 = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, qcow2], timeout=120)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, uri], timeout=120)


def test_qemu_img_compare(nbd_server: NbdServerProcess, tmp_path: Path) -> None:
    copy = tmp_path / "copy.img"
    uri = nbd_server.unix_uri("disk")
    qemu_io(uri, "write -P 0x5c 1M 64k", "write -P 0x11 20M 4k")
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, copy], timeout=120)
    same = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", copy, uri], timeout=120)
    assert "Images are identical" in same.stdout
    qemu_io(uri, "write -P 0x12 20M 512")  # one sector differs now
    diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", copy, uri], check=False,
               timeout=120)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert f"Content mismatch at offset {20 * MiB}" in diff.stdout


def test_qemu_img_map_shows_holes_after_trim_and_zero(nbd_server: NbdServerProcess,
                                                      disk_image: Path) -> None:
    uri = nbd_server.unix_uri("disk")
    assert region_flags(qemu_img_map(uri), 0, 64 * MiB) == {(False, True)}  # all sparse
    qemu_io(uri, "write -P 0xab 0 2M", "write -P 0xcd 8M 2M",
            "discard 0 1M",               # trim: a hole
            "write -z -u 8M 512k",        # zero, may unmap: a hole
            "write -z 9M 256k",           # zero, keep allocated: reads as zero
            "flush")
    extents = qemu_img_map(uri)
    covered = sum(int(e["length"]) for e in extents)  # type: ignore[call-overload]
    assert covered == 64 * MiB
    assert region_flags(extents, 0, 1 * MiB) == {(False, True)}
    assert region_flags(extents, 1 * MiB, 1 * MiB) == {(True, False)}
    assert region_flags(extents, 2 * MiB, 6 * MiB) == {(False, True)}
    assert region_flags(extents, 8 * MiB, 512 * KiB) == {(False, True)}
    assert all(zero for _, zero in region_flags(extents, 9 * MiB, 256 * KiB))
    assert region_flags(extents, 8 * MiB + 512 * KiB, 512 * KiB) == {(True, False)}
    assert region_flags(extents, 10 * MiB, 54 * MiB) == {(False, True)}
    # And the file agrees.
    assert file_bytes(disk_image, 0, 1 * MiB) == bytes(1 * MiB)
    assert file_bytes(disk_image, 1 * MiB, 1 * MiB) == b"\xab" * MiB
    assert file_bytes(disk_image, 8 * MiB, 512 * KiB) == bytes(512 * KiB)
    assert file_bytes(disk_image, 9 * MiB, 256 * KiB) == bytes(256 * KiB)
    assert file_bytes(disk_image, 9 * MiB + 256 * KiB, 768 * KiB) == b"\xcd" * (768 * KiB)


def test_qemu_io_aligned_patterns(nbd_server: NbdServerProcess, disk_image: Path) -> None:
    uri = nbd_server.unix_uri("disk")
    out = qemu_io(uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k",
                  "write -P 0x01 1M 1M", "read -P 0x01 1M 1M",
                  "write -f -P 0x02 4M 4k",  # FUA
                  "read -P 0x02 4M 4k", "read -P 0x00 8M 4k", "flush")
    assert out.count("read ") == 4
    assert file_bytes(disk_image, 0, 64 * KiB) == b"\xab" * (64 * KiB)
    assert file_bytes(disk_image, 4 * MiB, 4 * KiB) == b"\x02" * (4 * KiB)


def test_qemu_io_pattern_check_can_fail(nbd_server: NbdServerProcess) -> None:
    """Negative control: qemu-io's pattern check does notice wrong data."""
    uri = nbd_server.unix_uri("disk")
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", "-c", "read -P 0xac 0 4k",
                uri], check=False, timeout=60)
    assert proc.returncode == 1
    assert "Pattern verification failed" in proc.stdout


def test_qemu_io_unaligned(nbd_server: NbdServerProcess, disk_image: Path) -> None:
    """Writes that start and end inside 512-byte sectors (qemu does the read-modify-write
    for the advertised 512 minimum, or sends them as is): neighbours stay intact."""
    uri = nbd_server.unix_uri("disk")
    qemu_io(uri, "write -P 0xab 0 16k",
            "write -P 0x11 1000 3000",     # inside sectors 1..7
            "write -P 0x22 5 1",           # one byte
            "write -P 0x33 8191 2",        # across a 4 KiB boundary
            "read -P 0xab 0 5", "read -P 0x22 5 1", "read -P 0xab 6 994",
            "read -P 0x11 1000 3000", "read -P 0xab 4000 4191",
            "read -P 0x33 8191 2", "read -P 0xab 8193 8191", "flush")
    expected = bytearray(b"\xab" * 16 * KiB)
    expected[1000:4000] = b"\x11" * 3000
    expected[5] = 0x22
    expected[8191:8193] = b"\x33\x33"
    assert file_bytes(disk_image, 0, 16 * KiB) == bytes(expected)


def test_qemu_io_discard_and_write_zeroes(nbd_server: NbdServerProcess,
                                          disk_image: Path) -> None:
    uri = nbd_server.unix_uri("disk")
    qemu_io(uri, "write -P 0x77 0 4M",
            "discard 1M 1M", "read -P 0 1M 1M",
            "write -z 2M 64k", "read -P 0 2M 64k",
            "write -z -u 3M 64k", "read -P 0 3M 64k",
            "write -z 100 300",             # unaligned zeroing
            "read -P 0x77 0 100", "read -P 0 100 300", "read -P 0x77 400 624",
            "read -P 0x77 1044480 4k", "read -P 0x77 2162688 4k",
            "flush")
    assert file_bytes(disk_image, 1 * MiB, 1 * MiB) == bytes(MiB)
    assert file_bytes(disk_image, 3 * MiB + 64 * KiB, 4096) == b"\x77" * 4096


def test_qemu_io_read_only_export(nbd_server: NbdServerProcess) -> None:
    """qemu sees the read-only flag: opening for writing fails; reading works."""
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", nbd_server.unix_uri("ro")],
               check=False, timeout=60)
    assert proc.returncode != 0
    assert "wrote" not in proc.stdout
    assert "Permission denied" in proc.stderr or "read-only" in proc.stderr, proc.stderr
    out = qemu_io(nbd_server.unix_uri("ro"), "read -P 0 0 1", "read -P 1 1 1",
                  "read -P 0xff 255 1", "read -P 0 256 1", read_only=True)
    assert out.count("read 1/1") == 4
