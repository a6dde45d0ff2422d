"""A deterministic fuzzer for a running NBD server (used by test_fuzz_server.py and
scripts/fuzz.py).

Each case is generated from its own seed (``random.Random(seed)``), so any
failure is reproduced by its seed alone. A case is a byte stream sent on one
fresh connection, split into random pieces: pure garbage; a valid handshake
mutated; or a valid handshake followed by a mutated stream of requests (every
command, with flags, offsets and lengths drawn from the values at the edges:
0, 1, the block sizes, the export end, 2^25, 2^32-1, 2^63...). The fuzzer
reads and drops whatever the server answers while it sends, then closes the
connection in one of several ways (at once, half-close and wait, wait).

Every ``check_every`` cases the server is checked: still running, RSS under
the bound, and a well-behaved client can still read the reference data
written to the 'keep' export before fuzzing began. Cases only name the
'fuzz' export (the first one, so the empty name also lands there) and the
volume 'vfuzz' of a pool, served by pattern (``volumes:``: its backend opens
and closes with the connections), the only things they can scribble on; the
pool must check clean once the server has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nbdclient import NbdClient, client_flags, info_payload, meta_payload, option, request

from nbdserver.protocol import constants as c

KiB = 1024
MiB = 1024 * KiB
FUZZ_SIZE = 16 * MiB  # size of the 'fuzz' export
KEEP_SIZE = 1 * MiB  # size of the 'keep' export

U32 = (0, 1, 2, 7, 8, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20,
       (1 << 25) - 1, 1 << 25, (1 << 25) + 1, 1 << 26, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
U64 = (0, 1, 511, 512, 4096, FUZZ_SIZE - 4096, FUZZ_SIZE - 512, FUZZ_SIZE - 1, FUZZ_SIZE,
       FUZZ_SIZE + 512, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 512, (1 << 64) - 1)
NAMES = ("fuzz", "", "fuzz\0", "f" * 300, "nope", "\u00e9", "fuzz/../keep", "vfuzz",
         "vfuzz-gone")
TARGETS = ("fuzz", "fuzz", "vfuzz")  # the export a well-formed handshake names
QUERIES = ("base:allocation", "base:", "qemu:", "qemu:allocation-depth", "x", "",
           "base:allocation\0", ":" * 50)


@dataclass
class Case:
    seed: int
    kind: str
    stream: bytes
    pieces: list[int]  # split points
    ending: str  # "close" | "eof" | "linger"


@dataclass
class Stats:
    cases: int = 0
    checks: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    server_closed: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    peak_rss: int = 0
    rss_samples: list[int] = field(default_factory=list)


class FuzzFailure(AssertionError):
    pass


# -- generating cases ------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits: bit flips, byte changes, edge values over 4/8-byte fields,
    insertions, deletions, duplications, truncation."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b += rng.randbytes(rng.randint(1, 32))
            continue
        i = rng.randrange(len(b))
        op = rng.randrange(8)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            b[i:i + 4] = struct.pack(">I", rng.choice(U32))
        elif op == 3:
            b[i:i + 8] = struct.pack(">Q", rng.choice(U64))
        elif op == 4:
            b[i:i] = rng.randbytes(rng.randint(1, 64))
        elif op == 5:
            del b[i:i + rng.randint(1, 64)]
        elif op == 6:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 200)]
        else:
            del b[i:]
    return bytes(b)


def random_option(rng: random.Random) -> bytes:
    name = rng.choice(NAMES)
    infos = [rng.choice((0, 1, 2, 3, 3, 9, 0xFFFF)) for _ in range(rng.randint(0, 4))]
    queries = [rng.choice(QUERIES) for _ in range(rng.randint(0, 3))]
    choice = rng.randrange(10)
    if choice == 0:
        return option(c.OPT_STRUCTURED_REPLY)
    if choice == 1:
        return option(c.OPT_LIST)
    if choice == 2:
        return option(c.OPT_INFO, info_payload(name, infos))
    if choice == 3:
        return option(c.OPT_LIST_META_CONTEXT, meta_payload(name, queries))
    if choice == 4:
        return option(c.OPT_SET_META_CONTEXT, meta_payload(name, queries))
    if choice == 5:
        return option(c.OPT_STARTTLS)
    if choice == 6:
        return option(rng.choice((0, 4, 11, 12, 99, 0xFFFFFFFF)), rng.randbytes(rng.randint(0, 40)))
    if choice == 7:
        return option(c.OPT_ABORT) if rng.random() < 0.2 else option(c.OPT_LIST, b"junk")
    return option(c.OPT_GO, info_payload(name, infos))


def good_handshake(rng: random.Random, structured: bool) -> bytes:
    target = rng.choice(TARGETS)
    out = client_flags(rng.choice((3, 3, 3, 1, 2, 0)))
    if structured:
        out += option(c.OPT_STRUCTURED_REPLY)
        out += option(c.OPT_SET_META_CONTEXT, meta_payload(target, ["base:allocation"]))
    if rng.random() < 0.2:
        return out + option(c.OPT_EXPORT_NAME, target.encode())
    return out + option(c.OPT_GO, info_payload(target, (c.INFO_BLOCK_SIZE,)))


def random_request(rng: random.Random, cookie: int) -> bytes:
    cmd = rng.choice((c.CMD_READ, c.CMD_READ, c.CMD_WRITE, c.CMD_WRITE, c.CMD_FLUSH,
                      c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS,
                      c.CMD_DISC if rng.random() < 0.1 else c.CMD_READ,
                      rng.randrange(8, 64)))
    if rng.random() < 0.7:
        offset = rng.randrange(0, FUZZ_SIZE // 512) * 512
        length = rng.choice((512, 4096, 65536, 1 << 20, rng.randrange(1, 8) * 512))
    else:
        offset = rng.choice(U64) if rng.random() < 0.7 else rng.randrange(1 << 64)
        length = rng.choice(U32) if rng.random() < 0.7 else rng.randrange(1 << 32)
    flags = 0 if rng.random() < 0.6 else (
        rng.choice((1, 2, 4, 8, 16, 32, 3, 17)) if rng.random() < 0.7 else rng.randrange(1 << 16))
    payload = b""
    if cmd == c.CMD_WRITE:
        if length <= 1 << 20:
            payload = rng.randbytes(16) * (length // 16) + rng.randbytes(length % 16)
        else:  # an absurd length: send some, the rest never comes
            payload = rng.randbytes(rng.randint(0, 4096))
        if rng.random() < 0.1:
            payload = payload[:rng.randrange(len(payload) + 1)]
    return request(cmd, cookie, offset % (1 << 64), length % (1 << 32), flags, payload)


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.1:
        kind = "garbage"
        stream = rng.randbytes(rng.randint(0, 3000))
    elif roll < 0.2:
        kind = "garbage-after-flags"
        stream = client_flags() + rng.randbytes(rng.randint(0, 3000))
    elif roll < 0.45:
        kind = "mutated-handshake"
        options = b"".join(random_option(rng) for _ in range(rng.randint(1, 6)))
        stream = mutate(rng, client_flags() + options + good_handshake(rng, False)[4:])
    elif roll < 0.6:
        kind = "random-options"
        stream = client_flags() + b"".join(random_option(rng) for _ in range(rng.randint(1, 30)))
    else:
        kind = "transmission"
        structured = rng.random() < 0.6
        reqs = b"".join(random_request(rng, i) for i in range(rng.randint(1, 40)))
        if rng.random() < 0.7:
            reqs = mutate(rng, reqs)
        stream = good_handshake(rng, structured) + reqs
    n = len(stream)
    if n and rng.random() < 0.7:
        pieces = sorted(rng.sample(range(1, n + 1), min(n, rng.randint(1, 12))))
    else:
        pieces = [n]
    ending = rng.choice(("close", "eof", "linger"))
    return Case(seed, kind, stream, pieces, ending)


# -- running cases ------------------------------------------------------------------------


async def _drain(reader: asyncio.StreamReader, stats: Stats) -> bool:
    """Read and drop everything; True once the server closed the connection."""
    try:
        while data := await reader.read(1 << 16):
            stats.bytes_received += len(data)
    except (ConnectionError, OSError):
        pass
    return True


async def run_case(socket_path: Path, case: Case, stats: Stats) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(socket_path)), 10)
    drainer = asyncio.ensure_future(_drain(reader, stats))
    try:
        pos = 0
        for end in case.pieces:
            if drainer.done():
                break
            writer.write(case.stream[pos:end])
            pos = end
            await asyncio.wait_for(writer.drain(), 5)
        stats.bytes_sent += pos
        if case.ending == "eof":
            if writer.can_write_eof():
                writer.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drainer), 1.0)
        elif case.ending == "linger":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drainer), 0.05)
    except (ConnectionError, OSError, TimeoutError, RuntimeError):
        pass  # the server closed on us (uvloop: RuntimeError), or stopped reading
    finally:
        if drainer.done():
            stats.server_closed += 1
        drainer.cancel()
        writer.transport.abort()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await drainer


async def _run_limited(sem: asyncio.Semaphore, socket_path: Path, case: Case,
                       stats: Stats) -> None:
    async with sem:
        await asyncio.wait_for(run_case(socket_path, case, stats), 30)


async def check_server(socket_path: Path, keep: bytes, alive: Callable[[], bool],
                       rss: Callable[[], int], stats: Stats, rss_limit: int) -> None:
    """The server runs, its memory is bounded, and a good client reads the 'keep' data."""
    if not alive():
        raise FuzzFailure("the server died")
    now = rss()
    stats.rss_samples.append(now)
    stats.peak_rss = max(stats.peak_rss, now)
    if now > rss_limit:
        raise FuzzFailure(f"server RSS {now >> 20} MiB is over the {rss_limit >> 20} MiB bound")
    client = await NbdClient.connect(socket_path)
    try:
        details = await asyncio.wait_for(client.handshake("keep"), 10)
        if details.size != len(keep):
            raise FuzzFailure(f"'keep' has size {details.size}")
        got = await asyncio.wait_for(client.read(0, len(keep)), 10)
        if got != keep:
            raise FuzzFailure("the data in 'keep' changed")
        await asyncio.wait_for(client.disconnect(), 10)
    finally:
        await client.close()
    stats.checks += 1


async def fuzz(socket_path: Path, keep: bytes, *, alive: Callable[[], bool],
               rss: Callable[[], int], first_seed: int, cases: int | None = None,
               seconds: float | None = None, concurrency: int = 8, check_every: int = 64,
               rss_limit: int = 1 << 30,
               progress: Callable[[Stats, float], None] | None = None) -> Stats:
    """Run cases first_seed, first_seed+1, ... until `cases` are done or `seconds` pass.
    Raises FuzzFailure naming the seeds of the batch after which a check failed."""
    stats = Stats()
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    seed = first_seed
    await check_server(socket_path, keep, alive, rss, stats, rss_limit)
    while True:
        if cases is not None and stats.cases >= cases:
            break
        if seconds is not None and time.monotonic() - start >= seconds:
            break
        n = check_every if cases is None else min(check_every, cases - stats.cases)
        batch = [make_case(s) for s in range(seed, seed + n)]
        seed += n
        try:
            await asyncio.gather(*(_run_limited(sem, socket_path, case, stats)
                                   for case in batch))
            await check_server(socket_path, keep, alive, rss, stats, rss_limit)
        except FuzzFailure as e:
            raise FuzzFailure(f"{e} (after cases with seeds {batch[0].seed}.."
                              f"{batch[-1].seed}; reproduce with make_case(seed))") from None
        except Exception as e:
            raise FuzzFailure(f"{type(e).__name__}: {e} (cases with seeds {batch[0].seed}.."
                              f"{batch[-1].seed})") from e
        for case in batch:
            stats.by_kind[case.kind] = stats.by_kind.get(case.kind, 0) + 1
        stats.cases += len(batch)
        if progress is not None:
            progress(stats, time.monotonic() - start)
    return stats


def server_exports(workdir: Path) -> list[dict[str, object]]:
    """The exports a fuzzed server needs ('fuzz' first, so the empty name means it; the
    volumes of the pool of server_pools() by pattern: 'vfuzz', once made_pattern_volume()
    made it)."""
    return [{"name": "fuzz", "file": str(workdir / "fuzz.img"), "size": FUZZ_SIZE},
            {"name": "keep", "file": str(workdir / "keep.img"), "size": KEEP_SIZE},
            {"pool": "fuzzpool", "volumes": "vfuzz*"}]


def server_pools(workdir: Path) -> list[dict[str, object]]:
    return [{"name": "fuzzpool", "path": str(workdir / "fuzzpool.img"),
             "create": {"size": "128M", "blockmap": "radix"}}]


def pool_path(workdir: Path) -> Path:
    return workdir / "fuzzpool.img"


def make_pattern_volume(workdir: Path) -> None:
    """Create 'vfuzz' through the running server (the CLI goes through its control
    socket), as a fork of another volume."""
    import subprocess
    import sys

    pool = str(pool_path(workdir))
    cli = [sys.executable, "-m", "nbdserver", "volume"]
    for args in (["create", pool, "vfuzz-base", "--size", str(FUZZ_SIZE)],
                 ["fork", pool, "vfuzz-base", "vfuzz"]):
        subprocess.run([*cli, *args], check=True, capture_output=True, timeout=60)


def _pool_cli(workdir: Path, *args: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nbdserver", *args], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def check_pool(workdir: Path) -> str:
    """Offline `pool check --json` of the stopped server's pool: '' when clean, else the
    report."""
    import json

    status, out, err = _pool_cli(workdir, "pool", "check", str(pool_path(workdir)), "--json")
    report = json.loads(out) if out.strip() else {}
    return "" if status == 0 and report.get("ok") else out + err


def vfuzz_mapped(workdir: Path) -> int:
    """Bytes the cases left mapped in 'vfuzz' (offline, once the server has stopped)."""
    import json

    status, out, err = _pool_cli(workdir, "volume", "info", str(pool_path(workdir)), "vfuzz",
                                 "--json")
    assert status == 0, err
    mapped: int = json.loads(out)["mapped_bytes"]
    return mapped


SERVER_SETTINGS = {"handshake-timeout": "2s", "max-connections": 64, "log-level": "error"}

BAD_LOG_WORDS = ("Traceback", "Exception in callback", "unexpected error", "CRITICAL")


async def write_keep(socket_path: Path, seed: int) -> bytes:
    """Write the reference data to 'keep' with a good client; returns it."""
    keep = random.Random(seed).randbytes(KEEP_SIZE)
    client = await NbdClient.connect(socket_path)
    try:
        await client.handshake("keep")
        await client.write(0, keep, fua=True)
        await client.disconnect()
    finally:
        await client.close()
    return keep
