#!/usr/bin/env python3
"""What a TRIM costs on a fragmented volume, and how many map pages are left after.

A pool in a local file (O_DIRECT), opened in this process through the same pool
and volume layer the server uses (no NBD: the map's work is what is measured).
Two thin volumes are written chunk by chunk, interleaved and in random order,
so that each chunk of the measured volume is a record of its own; a snapshot
then shares its whole map. The measured work trims a share of the volume's
chunks one at a time, in random order, and flushes. It reports the user CPU
and the wall time per trim, and the metadata pages in use before and after:
the copies a trim of a shared map makes, and the nodes it frees or joins.

    scripts/trim-cost.py                              # extent, radix, linear
    scripts/trim-cost.py --blockmap extent --share 0.9 --json

To compare two versions of the package, run the script of each checkout (its
directory first on PYTHONPATH) one after the other; the machine's noise is a
few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "pool"))

from poolkit import MiB, PoolEnv, pattern


async def measure(design: str, chunks: int, share: float, workdir: Path,
                  seed: int) -> dict[str, object]:
    env = PoolEnv(workdir / f"{design}.img", design, size=1024 * MiB, offline=False,
                  cache_bytes=64 * MiB, small=False)
    await env.open()
    try:
        chunk = env.chunk_size
        v = await env.create("v", chunks * chunk)
        w = await env.create("w", chunks * chunk)
        rng = random.Random(seed)
        order = list(range(chunks))
        rng.shuffle(order)
        for i, lc in enumerate(order):  # interleaved: no two neighbours contiguous
            await v.write(lc * chunk, pattern(lc, chunk))
            await w.write(i * chunk, pattern(i, chunk))
        await env.snapshot("v", "s")
        await v.flush()
        pages_before = env.pool.meta.used
        trims = rng.sample(range(chunks), int(chunks * share))
        wall = time.perf_counter()
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        for lc in trims:
            await v.trim(lc * chunk, chunk)
        await v.flush()
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu
        wall = time.perf_counter() - wall
        report = await env.pool.check()
        return {"design": design, "chunks": chunks, "trims": len(trims),
                "user_us_per_trim": round(1e6 * cpu / len(trims), 1),
                "wall_us_per_trim": round(1e6 * wall / len(trims), 1),
                "meta_pages_before": pages_before, "meta_pages_after": env.pool.meta.used,
                "check_ok": report.ok}
    finally:
        await env.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockmap", action="append", choices=["extent", "radix", "linear"],
                    help="design to measure (repeatable; default: all three)")
    ap.add_argument("--chunks", type=int, default=8192, help="volume size in 4 KiB chunks")
    ap.add_argument("--share", type=float, default=0.9,
                    help="share of the chunks trimmed, one by one (default 0.9)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path,
                    help="where the pools go (on a file system with O_DIRECT, not tmpfs; "
                         "removed after); default: a new directory in /var/tmp")
    ap.add_argument("--json", action="store_true", help="one JSON object per design")
    args = ap.parse_args()
    if not 0 < args.share <= 1 or int(args.chunks * args.share) < 1:
        ap.error("--share must be in (0, 1] and leave at least one chunk to trim")
    workdir = Path(tempfile.mkdtemp(prefix="trim-cost-", dir=args.workdir or "/var/tmp"))
    failed = False
    try:
        for design in args.blockmap or ["extent", "radix", "linear"]:
            r = asyncio.run(measure(design, args.chunks, args.share, workdir, args.seed))
            failed |= not r["check_ok"]
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{design}: {r['trims']} trims, {r['user_us_per_trim']} us user and "
                      f"{r['wall_us_per_trim']} us wall per trim; metadata pages "
                      f"{r['meta_pages_before']} -> {r['meta_pages_after']}"
                      f"{'' if r['check_ok'] else '; POOL CHECK FAILED'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
