#!/usr/bin/env python3
"""Fuzz a running nbdserver for a while: ``make fuzz`` runs ``scripts/fuzz.py --minutes 10``.

The same fuzzer as tests/server/test_fuzz_server.py (tests/nbdfuzz.py), for
longer: it starts ``nbdserver serve`` on scratch files, writes reference data
to a 'keep' export, then sends garbage and mutated handshake and request
streams on many connections, checking between batches that the server is
alive, its memory bounded, and 'keep' still readable and unchanged. Cases come
from consecutive seeds from --seed (default: from the clock, printed), so a
failure names the seeds that reproduce it::

    scripts/fuzz.py --minutes 10
    scripts/fuzz.py --seed 1234567 --cases 640     # replay

Exit status 0 if the server came through, 1 if not (with its log tail).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
sys.path.insert(0, str(REPO / "tests"))
import argtypes  # noqa: E402  (beside this script)

try:
    import uvloop
except ImportError:  # run as scripts/fuzz.py with a python lacking the project: use .venv
    if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    raise
from conftest import NbdServerProcess  # noqa: E402
from nbdfuzz import (  # noqa: E402
    BAD_LOG_WORDS,
    SERVER_SETTINGS,
    FuzzFailure,
    Stats,
    check_pool,
    fuzz,
    make_pattern_volume,
    server_exports,
    server_pools,
    write_keep,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=argtypes.amount(0), default=None,
                        help="how long to fuzz (default 1, unless --cases is given)")
    parser.add_argument("--cases", type=argtypes.count(1), default=None,
                        help="stop after this many cases (the server is checked every 64 "
                             "and after the last)")
    parser.add_argument("--seed", type=int, default=None, help="first case seed")
    parser.add_argument("--concurrency", type=argtypes.count(1), default=16,
                        help="connections at once (default 16)")
    parser.add_argument("--rss-limit", type=argtypes.count(1), default=512,
                        help="MiB the server's RSS may grow by (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if args.minutes is None and args.cases is None:
        args.minutes = 1.0
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 10**9
    print(f"fuzz: first seed {seed}", flush=True)
    # On the repository's filesystem (data/ is git-ignored), not /tmp: a tmpfs /tmp
    # may refuse O_DIRECT.
    (REPO / "data").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-", dir=REPO / "data"))
    srv = NbdServerProcess(workdir, server_exports(workdir), pools=server_pools(workdir),
                           server=SERVER_SETTINGS)
    srv.start()
    assert srv.socket_path is not None
    make_pattern_volume(workdir)
    last = [0.0]

    def progress(stats: Stats, elapsed: float) -> None:
        if elapsed - last[0] >= 10:
            last[0] = elapsed
            print(f"fuzz: {elapsed:6.0f}s {stats.cases} cases, {stats.checks} checks, "
                  f"{stats.bytes_sent >> 20} MiB sent, {stats.bytes_received >> 20} MiB "
                  f"received, server RSS {stats.rss_samples[-1] >> 20} MiB", flush=True)

    async def go() -> Stats:
        keep = await write_keep(srv.socket_path, seed)  # type: ignore[arg-type]
        return await fuzz(srv.socket_path, keep,  # type: ignore[arg-type]
                          alive=srv.alive, rss=srv.rss_bytes, first_seed=seed,
                          cases=args.cases,
                          seconds=None if args.minutes is None else args.minutes * 60,
                          concurrency=args.concurrency,
                          rss_limit=srv.rss_bytes() + (args.rss_limit << 20),
                          progress=progress)

    status = 0
    try:
        stats = uvloop.run(go())
        print(f"fuzz: done: {stats.cases} cases ({stats.by_kind}), peak server RSS "
              f"{stats.peak_rss >> 20} MiB", flush=True)
        srv.signal(15)
        code = srv.wait(60)
        log = srv.stderr
        bad = [w for w in BAD_LOG_WORDS if w in log]
        problems = check_pool(workdir)
        if code != 0 or bad or problems:
            print(f"fuzz: FAILED: exit status {code}, log has {bad}, pool check: "
                  f"{problems or 'clean'}\n{log[-4000:]}")
            status = 1
    except (FuzzFailure, Exception) as e:
        print(f"fuzz: FAILED: {e}\n--- server log (end)\n{srv.stderr[-4000:]}")
        status = 1
    finally:
        srv.cleanup()
        if args.keep or status:
            print(f"fuzz: scratch directory kept: {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
