#!/usr/bin/env python3
"""Benchmark nbdserver beside qemu-nbd, nbdkit and the device itself, in one run.

What it does (``make bench``, or ``.venv/bin/python scripts/bench.py --help``):

1. Creates a test file (default 1 GiB) filled once with random data, under
   ``bench-results/`` at the top of the repository (``--dir`` to change; tmpfs
   and ramfs are refused: O_DIRECT figures from memory mean nothing).
2. Serves it over Unix sockets with
     - nbdserver (``--io aio|threads``),
     - ``qemu-nbd -f raw --cache=none --aio=native -t -e 8`` (O_DIRECT, the closest peer),
     - ``nbdkit --foreground file`` (buffered: the page cache answers),
   and runs the standard workloads against each with fio's nbd engine, plus the
   same workloads with fio's libaio engine and ``direct=1`` on the file itself
   (``raw``: the device's own O_DIRECT limit, no NBD at all):
     randread-4k QD16, randwrite-4k QD16, randrw-4k QD32 x 2 jobs,
     seqread-1m QD4, seqwrite-1m QD4 (time based, ``--seconds`` each).
3. Repeats every (server, workload) ``--rounds`` times. Rounds are interleaved
   (round, then workload, then server, the server order rotating) so that a
   noisy neighbour on a shared machine hits every server alike; the median of
   the rounds is reported.
4. Samples each server's CPU time (utime + stime of the whole process, from
   /proc/PID/stat) around every fio run, giving CPU microseconds per I/O, and
   the machine's busy and steal time (from /proc/stat).

Between runs the test file is fsynced and dropped from the page cache, so that
no server inherits another's cached or dirty pages.

Output: a table on stdout (with the ratio nbdserver / qemu-nbd per workload),
``--json [FILE]`` (every sample and the medians; no FILE: JSON on stdout and the
table on stderr), ``--markdown FILE``, and ``--plot FILE.png`` (needs matplotlib).
Every process started is killed on exit, also on Ctrl-C.

``--volumes radix,extent,linear`` also serves, for each design, a pool volume of
the same size (target ``vol-DESIGN``, a pool file beside the test file) filled
with the test file's data before the first run (``--empty-volumes``: left
empty, so writes allocate and reads find holes); the table gets a
``vol-DESIGN/nbdserver`` column: the volume against the raw file export.

To try a change to nbdserver, copy the package somewhere, edit it there, and add
``--candidate NAME=DIR``: it is served and measured like nbdserver, interleaved
with it in the same run, and the table gets a ``NAME/nbdserver`` ratio column
(with ``--only`` leaving nbdserver out, candidates are compared with the first).
With ``--volumes``, each candidate serves each volume design too (target
``vol-DESIGN@NAME``, its own pool), so a change of the volume path is measured
beside the current one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import argtypes  # the scripts' shared argparse types (scripts/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
SOCKET_TIMEOUT = 20.0  # seconds a server may take to start listening
STOP_TIMEOUT = 15.0  # seconds a server may take to exit after SIGTERM
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int

    @property
    def label(self) -> str:
        jobs = f"x{self.numjobs}" if self.numjobs > 1 else ""
        return f"{self.name} QD{self.iodepth}{jobs}"


# The standard NBD workloads (same parameters as the project's reference fio scripts).
WORKLOADS = {
    w.name: w
    for w in (
        Workload("randread-4k", "randread", "4k", 16, 1),
        Workload("randwrite-4k", "randwrite", "4k", 16, 1),
        Workload("randrw-4k", "randrw", "4k", 32, 2),
        Workload("seqread-1m", "read", "1m", 4, 1),
        Workload("seqwrite-1m", "write", "1m", 4, 1),
    )
}
TARGETS = ("nbdserver", "qemu-nbd", "nbdkit", "raw")
VOLUME_PREFIX = "vol-"  # vol-DESIGN: a pool volume of that block-map design
DESIGNS = ("radix", "extent", "linear")
TARGET_TITLES = {
    "nbdserver": "nbdserver",
    "qemu-nbd": "qemu-nbd",
    "nbdkit": "nbdkit",
    "raw": "raw O_DIRECT",
}


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    _children.append(proc)
    return proc


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    with contextlib.suppress(ValueError):
        _children.remove(proc)


def kill_all() -> None:
    for proc in list(_children):
        stop_process(proc)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# -- machine facts -----------------------------------------------------------------------


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (longest mount point prefix)."""
    path = path.resolve()
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def machine_info(targets: list[str], io: str) -> dict[str, object]:
    info: dict[str, object] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": first_line(["fio", "--version"]),
        "nbdserver_io": io,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    rev = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    info["nbdserver_rev"] = rev
    if "qemu-nbd" in targets:
        info["qemu-nbd"] = first_line(["qemu-nbd", "--version"])
    if "nbdkit" in targets:
        info["nbdkit"] = first_line(["nbdkit", "--version"])
    return info


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the whole process `pid`."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def host_cpu() -> tuple[int, int, int]:
    """(total, busy, steal) jiffies of all CPUs, from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, iowait, steal = vals[3], vals[4], vals[7]
    total = sum(vals)
    return total, total - idle - iowait - steal, steal


# -- the test file -----------------------------------------------------------------------


def parse_size(text: str) -> int:
    """A test file size (an argparse type): a whole number of MiB, at least 16 MiB."""
    value = argtypes.size()(text)
    if value < 16 * MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"must be a multiple of 1M, at least 16M, got {text}")
    return value


def json_out(text: str) -> Path | str:
    """--json's FILE (an argparse type): ``-`` for stdout, else a file checked now
    (argtypes.out_file), written at the end."""
    return text if text == "-" else argtypes.out_file(text)


def make_dir(p: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """Create the work directory `path` of option `flag` (absolute: argtypes.work_dir);
    one that cannot be created or written in is a usage error naming `flag`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"argument {flag}: cannot create {path}: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        p.error(f"argument {flag}: cannot write in {path}")


def drop_cache(path: Path) -> None:
    """Write back and drop `path` from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_test_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        log(f"bench: reusing {path.name} ({size // MiB} MiB of random data)")
        return
    log(f"bench: writing {size // MiB} MiB of random data to {path.name} ...")
    rng = random.Random()
    tmp = path.with_suffix(".partial")
    chunk = 4 * MiB
    with open(tmp, "wb") as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            f.write(rng.randbytes(n))
            done += n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


# -- servers ---------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test (or ``raw``: fio on the file itself)."""

    name: str
    uri: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}"
                             f"{log_tail(self.log_path)}")


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("; its output:\n  " + "\n  ".join(text)) if text else ""


def wait_for_socket(target: Target, sock: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        target.check_alive()
        if sock.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                return
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise BenchError(f"{target.name} did not listen on its socket within {timeout:.0f}s"
                             f"{log_tail(target.log_path)}")
        time.sleep(0.05)


def start_target(name: str, file: Path, rundir: Path, io: str,
                 src: Path | None = None, size: int = 0, fill: bool = True) -> Target:
    """Start server `name`; `src` (for nbdserver and candidates) holds the package to run.
    A ``vol-DESIGN`` target serves a pool volume of `size` bytes, filled from `file`."""
    if name == "raw":
        return Target(name)
    sock = rundir / f"{name}.sock"
    log_path = rundir / f"{name}.log"
    env = None
    cwd = REPO
    if name.startswith(VOLUME_PREFIX) and src is None:
        src = REPO
    if src is not None:
        cfg = rundir / f"{name}.yaml"
        if name.startswith(VOLUME_PREFIX):
            pool = file.parent / f"bench-{name}.pool"
            with contextlib.suppress(FileNotFoundError):
                pool.unlink()
            blockmap = name[len(VOLUME_PREFIX):].partition("@")[0]
            export = (f"pools: [{{name: p, path: {json.dumps(str(pool))}, create: "
                      f"{{size: {size + size // 4 + 256 * MiB}, blockmap: {blockmap}}}}}]\n"
                      f"exports: [{{name: disk, pool: p, volume: disk, create: "
                      f"{{size: {size}}}}}]\n")
        else:
            export = f"exports: [{{name: disk, file: {json.dumps(str(file))}}}]\n"
        cfg.write_text(
            f"listen: [{{unix: {json.dumps(str(sock))}}}]\n"
            + export
            + f"server: {{io: {io}, log-level: warning}}\n"
        )
        argv = [sys.executable, "-m", "nbdserver", "serve", "-c", str(cfg), "--io", io]
        uri = f"nbd+unix:///disk?socket={sock}"
        cwd = src  # `python -m` imports the package from the current directory first
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
    elif name == "qemu-nbd":
        argv = ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native", "-t", "-e", "8",
                "-k", str(sock), str(file)]
        uri = f"nbd+unix:///?socket={sock}"
    elif name == "nbdkit":
        argv = ["nbdkit", "-U", str(sock), "--foreground", "file", str(file)]
        uri = f"nbd+unix:///?socket={sock}"
    else:
        raise BenchError(f"unknown target {name}")
    with open(log_path, "wb") as out:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                     cwd=str(cwd), env=env)
    target = Target(name, uri, proc, log_path)
    wait_for_socket(target, sock, SOCKET_TIMEOUT)
    if name.startswith(VOLUME_PREFIX) and fill:
        t0 = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw",
                        str(file), uri], check=True)
        log(f"bench: filled {name} from the test file in {time.monotonic() - t0:.1f}s")
    return target


# -- fio -------------------------------------------------------------------------------


@dataclass
class Sample:
    target: str
    workload: str
    round: int
    iops: float
    mibps: float
    ios: int
    runtime_s: float
    server_user_s: float | None = None
    server_sys_s: float | None = None
    host_busy_pct: float = 0.0
    host_steal_pct: float = 0.0
    fio_cpu_pct: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_us_per_io(self) -> float | None:
        if self.server_user_s is None or self.server_sys_s is None or not self.ios:
            return None
        return (self.server_user_s + self.server_sys_s) / self.ios * 1e6

    @property
    def cpu_pct(self) -> float | None:
        if self.server_user_s is None or self.server_sys_s is None or not self.runtime_s:
            return None
        return (self.server_user_s + self.server_sys_s) / self.runtime_s * 100


def fio_argv(target: Target, w: Workload, file: Path, size: int, seconds: int) -> list[str]:
    argv = ["fio", f"--name={w.name}"]
    if target.name == "raw":
        argv += [f"--filename={file}", "--ioengine=libaio", "--direct=1"]
    else:
        argv += ["--ioengine=nbd", f"--uri={target.uri}"]
    argv += [f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}",
             f"--numjobs={w.numjobs}", "--group_reporting", f"--size={size}",
             f"--runtime={seconds}", "--time_based", "--output-format=json"]
    return argv


def run_fio(target: Target, w: Workload, file: Path, size: int, seconds: int,
            rnd: int) -> Sample:
    target.check_alive()
    argv = fio_argv(target, w, file, size, seconds)
    pid = target.pid
    cpu0 = proc_cpu(pid) if pid else None
    host0 = host_cpu()
    proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        stop_process(proc, signal.SIGKILL)
        raise BenchError(f"fio {w.name} against {target.name} did not finish") from None
    finally:
        with contextlib.suppress(ValueError):
            _children.remove(proc)
    host1 = host_cpu()
    cpu1 = proc_cpu(pid) if pid else None
    text = out.decode(errors="replace")
    try:
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {w.name} against {target.name} failed (status {proc.returncode}): "
                         f"{err.decode(errors='replace').strip()[-800:]}"
                         f"{log_tail(target.log_path)}") from None
    if proc.returncode != 0 or job.get("error"):
        raise BenchError(f"fio {w.name} against {target.name}: error {job.get('error')}: "
                         f"{err.decode(errors='replace').strip()[-800:]}")
    rd, wr = job["read"], job["write"]
    runtime_ms = max(rd.get("runtime", 0), wr.get("runtime", 0)) or seconds * 1000
    dt, dbusy, dsteal = (b - a for a, b in zip(host0, host1, strict=True))
    s = Sample(
        target=target.name, workload=w.name, round=rnd,
        iops=rd["iops"] + wr["iops"],
        mibps=(rd["bw"] + wr["bw"]) / 1024,
        ios=int(rd["total_ios"] + wr["total_ios"]),
        runtime_s=runtime_ms / 1000,
        host_busy_pct=100 * dbusy / dt if dt else 0.0,
        host_steal_pct=100 * dsteal / dt if dt else 0.0,
        fio_cpu_pct=float(job.get("usr_cpu", 0)) + float(job.get("sys_cpu", 0)),
    )
    if cpu0 is not None and cpu1 is not None:
        s.server_user_s = cpu1[0] - cpu0[0]
        s.server_sys_s = cpu1[1] - cpu0[1]
    for key, d in (("read", rd), ("write", wr)):
        if d.get("total_ios"):
            s.extra[f"{key}_clat_us"] = d.get("clat_ns", {}).get("mean", 0) / 1000
    return s


# -- results ---------------------------------------------------------------------------


def median_of(samples: list[Sample], attr: str) -> float | None:
    vals = [getattr(s, attr) for s in samples]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[Sample], targets: list[str],
              workloads: list[Workload]) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for w in workloads:
        row: dict[str, dict[str, float | None]] = {}
        for t in targets:
            mine = [s for s in samples if s.target == t and s.workload == w.name]
            if not mine:
                continue
            iops = [s.iops for s in mine]
            row[t] = {
                "iops": median_of(mine, "iops"),
                "mibps": median_of(mine, "mibps"),
                "iops_min": min(iops),
                "iops_max": max(iops),
                "cpu_us_per_io": median_of(mine, "cpu_us_per_io"),
                "cpu_pct": median_of(mine, "cpu_pct"),
                "host_busy_pct": median_of(mine, "host_busy_pct"),
                "host_steal_pct": median_of(mine, "host_steal_pct"),
                "rounds": len(mine),
            }
        out[w.name] = row
    return out


def ratio(summary: dict[str, dict[str, float | None]], top: str = "nbdserver",
          bottom: str = "qemu-nbd") -> float | None:
    a = summary.get(top, {}).get("iops")
    b = summary.get(bottom, {}).get("iops")
    return a / b if a and b else None


def fmt_iops(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def tables(summary: dict[str, dict[str, dict[str, float | None]]], targets: list[str],
           workloads: list[Workload]) -> tuple[list[list[str]], list[list[str]]]:
    """(throughput rows, CPU rows); the first row of each is the header."""
    head = ["workload"]
    for t in targets:
        head += [f"{TARGET_TITLES.get(t, t)} IOPS", "MiB/s"]
    show_ratio = "nbdserver" in targets and "qemu-nbd" in targets
    if show_ratio:
        head.append("nbdserver/qemu-nbd")
    # candidates are compared with nbdserver, or without it with the first candidate
    candidates = [t for t in targets if t not in TARGETS]
    ref = "nbdserver" if "nbdserver" in targets else (candidates[0] if candidates else "")
    candidates = [c for c in candidates if c != ref]
    head += [f"{c}/{ref}" for c in candidates]
    rows = [head]
    for w in workloads:
        s = summary.get(w.name, {})
        row = [w.label]
        for t in targets:
            row += [fmt_iops(s.get(t, {}).get("iops")), fmt_mib(s.get(t, {}).get("mibps"))]
        if show_ratio:
            r = ratio(s)
            row.append("-" if r is None else f"{r:.2f}")
        for c in candidates:
            r = ratio(s, c, ref)
            row.append("-" if r is None else f"{r:.2f}")
        rows.append(row)
    servers = [t for t in targets if t != "raw"]
    cpu_rows = [["workload"] + [f"{t} CPU us/IO (CPU %)" for t in servers]
                + ["machine busy %", "steal %"]]
    for w in workloads:
        s = summary.get(w.name, {})
        row = [w.label]
        for t in servers:
            us, pct = s.get(t, {}).get("cpu_us_per_io"), s.get(t, {}).get("cpu_pct")
            row.append("-" if us is None or pct is None else f"{us:.1f} ({pct:.0f}%)")
        busy = [v for t in targets if (v := s.get(t, {}).get("host_busy_pct")) is not None]
        steal = [v for t in targets if (v := s.get(t, {}).get("host_steal_pct")) is not None]
        row.append(f"{statistics.median(busy):.0f}" if busy else "-")
        row.append(f"{statistics.median(steal):.1f}" if steal else "-")
        cpu_rows.append(row)
    return rows, cpu_rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def describe_run(args: argparse.Namespace, info: dict[str, object]) -> str:
    parts = [f"{info['nproc']} CPUs ({info['cpu']})", f"Linux {info['kernel']}",
             str(info["fio"])]
    for k in ("qemu-nbd", "nbdkit"):
        if k in info:
            parts.append(str(info[k]))
    return (f"{args.size // MiB} MiB test file on {info['fs']}, {args.seconds}s per run, "
            f"median of {args.rounds} interleaved round(s), nbdserver io={args.io} "
            f"({info['nbdserver_rev']}); " + ", ".join(parts) + f"; {info['date']}")


def write_plot(path: Path, summary: dict[str, dict[str, dict[str, float | None]]],
               targets: list[str], workloads: list[Workload]) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.6))
    if len(workloads) == 1:
        axes = [axes]
    for ax, w in zip(axes, workloads, strict=True):
        s = summary.get(w.name, {})
        is_seq = w.bs.endswith("m")
        vals = [(s.get(t, {}).get("mibps" if is_seq else "iops") or 0) for t in targets]
        ax.bar(range(len(targets)), vals, color=[f"C{i}" for i in range(len(targets))])
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
        ax.set_title(w.label, fontsize=9)
        ax.set_ylabel("MiB/s" if is_seq else "IOPS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main ------------------------------------------------------------------------------


def names_from(p: argparse.ArgumentParser, flag: str, text: str, valid: Iterable[str], *,
               empty_ok: bool = False) -> list[str]:
    """The comma-separated names of `text`, each one of `valid`, in `valid`'s order;
    an unknown name (or none, unless `empty_ok`) is a usage error naming `flag`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    valid = list(valid)
    bad = [n for n in names if n not in valid]
    if bad or not (names or empty_ok):
        p.error(f"{flag}: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(valid)}")
    return [n for n in valid if n in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark nbdserver against qemu-nbd, nbdkit and the raw device with fio "
                    "(fio's nbd engine over Unix sockets). See the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default="1G",
                   help="test file size (e.g. 1G, 512M; a multiple of 1M, at least 16M)")
    p.add_argument("--seconds", type=argtypes.count(1), default=8, help="seconds per fio run")
    p.add_argument("--rounds", type=argtypes.count(1), default=3,
                   help="interleaved repetitions of every server/workload; the median is shown")
    p.add_argument("--io", choices=("aio", "threads"), default="aio",
                   help="nbdserver I/O engine")
    p.add_argument("--only", default=",".join(TARGETS),
                   help=f"comma-separated targets, from {','.join(TARGETS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated workloads, from {','.join(WORKLOADS)}")
    p.add_argument("--dir", type=argtypes.work_dir, default=REPO / "bench-results",
                   help="where the test file goes (not tmpfs); created if need be")
    p.add_argument("--keep", action="store_true",
                   help="keep the test file (reused by later runs of the same size) and logs")
    p.add_argument("--json", type=json_out, nargs="?", const="-", metavar="FILE",
                   help="write samples and medians as JSON to FILE (no FILE: JSON on stdout, "
                        "table on stderr)")
    p.add_argument("--markdown", type=argtypes.out_file, metavar="FILE",
                   help="write the tables as Markdown")
    p.add_argument("--plot", type=argtypes.out_file, metavar="PNG",
                   help="bar chart (needs matplotlib)")
    p.add_argument("--volumes", default="", metavar="DESIGNS",
                   help="also serve a pool volume of each of these block-map designs "
                        f"(from {','.join(DESIGNS)}) as target vol-DESIGN, filled with the "
                        "test file's data first")
    p.add_argument("--empty-volumes", action="store_true",
                   help="leave the --volumes volumes empty (writes allocate, reads are holes)")
    p.add_argument("--candidate", action="append", metavar="NAME=DIR",
                   help="also serve the nbdserver package found in DIR (a scratch copy with a "
                        "change to try) as target NAME, interleaved with the others; repeatable")
    args = p.parse_args(argv)
    args.targets = names_from(p, "--only", args.only, TARGETS)  # fixed column order
    args.sources = {"nbdserver": REPO} if "nbdserver" in args.targets else {}
    for spec in args.candidate or []:
        name, sep, src = spec.partition("=")
        path = Path(src).expanduser().resolve()
        if not sep or not name or name in TARGETS or name in args.sources:
            p.error(f"--candidate {spec!r}: want NAME=DIR, NAME new and not one of "
                    f"{', '.join(TARGETS)}")
        if not (path / "nbdserver" / "__main__.py").is_file():
            p.error(f"--candidate {spec!r}: {path} holds no nbdserver package")
        args.sources[name] = path
    volumes = names_from(p, "--volumes", args.volumes, DESIGNS, empty_ok=True)
    # candidates and volumes go right after nbdserver, before the peers; each candidate
    # also serves each volume design (vol-DESIGN@NAME), to try a change of the volume path
    first = [t for t in args.targets if t == "nbdserver"]
    candidates = [c for c in args.sources if c != "nbdserver"]
    for c in candidates:
        for d in volumes:
            args.sources[f"{VOLUME_PREFIX}{d}@{c}"] = args.sources[c]
    args.targets = first + candidates + [
        VOLUME_PREFIX + d + at for d in volumes for at in ["", *(f"@{c}" for c in candidates)]
    ] + [t for t in args.targets if t != "nbdserver"]
    args.workload_list = [WORKLOADS[n]
                          for n in names_from(p, "--workloads", args.workloads, WORKLOADS)]
    if args.plot:  # refused now, not after the whole run
        try:
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            p.error("argument --plot: needs matplotlib (pip install matplotlib)")
    make_dir(p, "--dir", args.dir)  # last: no directory made for a refused command line
    return args


def check_tools(targets: list[str]) -> None:
    need = {"fio": "fio"}
    if "qemu-nbd" in targets:
        need["qemu-nbd"] = "qemu-utils"
    if "nbdkit" in targets:
        need["nbdkit"] = "nbdkit"
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in need.items()
               if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)}; install with `make deps` or "
                         "apt-get install, or leave the server out with --only")
    help_text = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
    if [t for t in targets if t != "raw"] and "uri" not in help_text.stdout:
        raise BenchError("this fio has no nbd engine (Debian's fio package has it)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args.targets)
    kind = fs_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        raise BenchError(f"--dir {args.dir} is on {kind}; O_DIRECT figures need a real disk")
    info = machine_info(args.targets, args.io)
    info["fs"] = kind
    file = args.dir / f"bench-{args.size // MiB}M.img"
    rundir = Path(tempfile.mkdtemp(prefix="nbd-bench-"))  # short paths for the sockets
    workloads: list[Workload] = args.workload_list
    samples: list[Sample] = []
    try:
        make_test_file(file, args.size)
        drop_cache(file)
        targets = {t: start_target(t, file, rundir, args.io, args.sources.get(t), args.size,
                                   not args.empty_volumes)
                   for t in args.targets}
        runs = args.rounds * len(workloads) * len(targets)
        log(f"bench: {runs} fio runs of {args.seconds}s: about "
            f"{runs * (args.seconds + 1) / 60:.0f} minutes")
        n = 0
        for rnd in range(args.rounds):
            for wi, w in enumerate(workloads):
                order = list(targets)
                k = (rnd + wi) % len(order)
                order = order[k:] + order[:k]
                for name in order:
                    n += 1
                    s = run_fio(targets[name], w, file, args.size, args.seconds, rnd)
                    drop_cache(file)
                    samples.append(s)
                    cpu = s.cpu_us_per_io
                    cpu_txt = "" if cpu is None else f"  server CPU {cpu:6.1f} us/IO"
                    log(f"[{n:3}/{runs}] round {rnd + 1} {w.name:13} {name:10}"
                        f" {s.iops:10,.0f} IOPS {s.mibps:8.1f} MiB/s{cpu_txt}"
                        f"  (steal {s.host_steal_pct:.0f}%)")
        for t in targets.values():
            if t.proc is not None:
                t.check_alive()
                stop_process(t.proc)
    finally:
        kill_all()
        if not args.keep:
            with contextlib.suppress(OSError):
                file.unlink()
            for t in args.targets:
                if t.startswith(VOLUME_PREFIX):
                    with contextlib.suppress(OSError):
                        (file.parent / f"bench-{t}.pool").unlink()
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            log(f"bench: kept {file} and the server logs in {rundir}")

    summary = summarize(samples, args.targets, workloads)
    rows, cpu_rows = tables(summary, args.targets, workloads)
    header = describe_run(args, info)
    text = (f"{header}\n\n{render_text(rows)}\n\nServer CPU time per I/O (user+sys, whole "
            f"process) and share of one CPU:\n\n{render_text(cpu_rows)}\n")
    if args.json == "-":
        log(text)
    else:
        print(text)
    if args.json:
        doc = {
            "machine": info,
            "params": {"size": args.size, "seconds": args.seconds, "rounds": args.rounds,
                       "io": args.io, "targets": args.targets,
                       "candidates": sorted(c for c in args.sources if c != "nbdserver"),
                       "workloads": [asdict(w) for w in workloads]},
            "median": summary,
            "ratio_nbdserver_qemu": {w.name: ratio(summary.get(w.name, {})) for w in workloads},
            "samples": [asdict(s) | {"cpu_us_per_io": s.cpu_us_per_io, "cpu_pct": s.cpu_pct}
                        for s in samples],
        }
        blob = json.dumps(doc, indent=2)
        if args.json == "-":
            print(blob)
        else:
            Path(args.json).write_text(blob + "\n")
    if args.markdown:
        args.markdown.write_text(
            f"{header}\n\n{render_markdown(rows)}\n\n"
            "Server CPU time per I/O (user+sys of the whole process) and share of one CPU:\n\n"
            f"{render_markdown(cpu_rows)}\n")
    if args.plot:
        write_plot(args.plot, summary, args.targets, workloads)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        kill_all()
        sys.exit(130)
