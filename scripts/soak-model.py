#!/usr/bin/env python3
"""Soak the block-map contract: the model state machine of the tests, for much longer.

Runs ``tests/blockmap/blockmap_model.py`` (the hypothesis state machine behind
``tests/blockmap/test_blockmap_contract.py``) with many more examples and steps
than ``make test`` does, over every registered design (or those given), each
with 4 KiB chunks offline, 4 KiB and 16 KiB chunks with a 16-page cache::

    .venv/bin/python scripts/soak-model.py                      # every design, 300 examples
    .venv/bin/python scripts/soak-model.py --design radix --examples 2000 --steps 120
    .venv/bin/python scripts/soak-model.py --minutes 60         # rounds until time is up

Pools are files under ``--dir`` (default ``data/soak-model`` in the repository,
which must be on a filesystem with O_DIRECT: not tmpfs). Failing examples are
kept in a hypothesis database there, so the next run replays them first.
Exits 1 if any configuration failed (hypothesis prints the shrunk steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import argtypes  # (beside this script)

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", action="append", help="a design to soak (repeatable; "
                    "default: every registered one)")
    ap.add_argument("--variant", action="append", choices=["4k-offline", "4k-tiny", "16k-tiny"],
                    help="pool variant (repeatable; default: all three)")
    ap.add_argument("--examples", type=argtypes.count(1), default=300,
                    help="examples per configuration")
    ap.add_argument("--steps", type=argtypes.count(1), default=80, help="steps per example")
    ap.add_argument("--minutes", type=argtypes.amount(0, above=False), default=0,
                    help="repeat rounds (new random examples) until this much time has passed")
    ap.add_argument("--dir", type=argtypes.work_dir, default=REPO / "data" / "soak-model",
                    help="where the pools and the failure database go")
    args = ap.parse_args()

    _load("poolkit", REPO / "tests" / "pool" / "poolkit.py")
    model = _load("blockmap_model", REPO / "tests" / "blockmap" / "blockmap_model.py")
    from hypothesis.database import DirectoryBasedExampleDatabase

    from nbdserver.blockmap.base import designs

    known = sorted(designs())
    chosen = args.design or known
    unknown = [d for d in chosen if d not in known]
    if unknown:
        ap.error(f"unknown design(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    variants = {"4k-offline": (4096, True), "4k-tiny": (4096, False), "16k-tiny": (16384, False)}
    picked = args.variant or list(variants)
    args.dir.mkdir(parents=True, exist_ok=True)
    database = DirectoryBasedExampleDatabase(str(args.dir / "hypothesis-db"))

    failed: list[str] = []
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    while True:
        rounds += 1
        for design in chosen:
            for variant in picked:
                chunk, offline = variants[variant]
                config = model.ModelConfig(design, chunk, offline, args.dir)  # type: ignore[attr-defined]
                label = f"{design} {variant}"
                start = time.monotonic()
                print(f"round {rounds}: {label}: {args.examples} examples of up to "
                      f"{args.steps} steps ...", flush=True)
                try:
                    model.run_model(config, "model-soak",  # type: ignore[attr-defined]
                                    max_examples=args.examples,
                                    stateful_step_count=args.steps, database=database)
                except Exception:
                    traceback.print_exc()
                    failed.append(label)
                    print(f"round {rounds}: {label}: FAILED", flush=True)
                else:
                    print(f"round {rounds}: {label}: ok in {time.monotonic() - start:.0f}s",
                          flush=True)
        if failed or time.monotonic() >= deadline:
            break
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"all configurations passed ({rounds} round(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
