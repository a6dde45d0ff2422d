"""fio's nbd engine (libnbd underneath) against a running server, with data verification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import NbdServerProcess, run

MiB = 1024 * 1024


def fio(tmp_path: Path, uri: str, *args: str, check: bool = True,
        name: str = "job") -> tuple[int, dict[str, Any], str]:
    out = tmp_path / f"{name}.json"
    proc = run(["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
                "--output-format=json", f"--output={out}", *args], timeout=120, check=check,
               cwd=tmp_path)  # fio saves verify state files in its working directory
    text = out.read_text() if out.exists() else ""
    data = json.loads(text[text.index("{"):]) if "{" in text else {}
    return proc.returncode, data, proc.stdout + proc.stderr + text


@pytest.mark.slow
def test_fio_randrw_with_verify(nbd_server: NbdServerProcess, tmp_path: Path) -> None:
    status, data, _ = fio(tmp_path, nbd_server.unix_uri("disk"),
                          "--rw=randrw", "--bs=4k", "--size=32M", "--iodepth=16",
                          "--time_based", "--runtime=3",
                          "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1")
    assert status == 0
    (job,) = data["jobs"]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 4 * MiB
    assert job["write"]["io_bytes"] > 4 * MiB
    assert job["read"]["short_ios"] == 0 and job["write"]["short_ios"] == 0
    nbd_server.assert_alive()


def test_fio_verify_detects_corruption(nbd_server: NbdServerProcess, tmp_path: Path,
                                       disk_image: Path) -> None:
    """Negative control: fio's verification reads through the server and does notice a
    block changed behind its back (so a passing verify run means something)."""
    uri = nbd_server.unix_uri("disk")
    job = ["--rw=write", "--bs=64k", "--size=4M", "--verify=crc32c", "--iodepth=8"]
    status, data, _ = fio(tmp_path, uri, *job, "--do_verify=1", name="write")
    assert status == 0 and data["jobs"][0]["error"] == 0
    status, _, _ = fio(tmp_path, uri, *job, "--verify_only", name="verify")
    assert status == 0
    with open(disk_image, "r+b") as f:
        f.seek(1 * MiB + 100)
        f.write(b"corrupted!")
    status, data, out = fio(tmp_path, uri, *job, "--verify_only", check=False, name="bad")
    assert status != 0
    assert "verify" in out and str(1 * MiB) in out, out[-2000:]
