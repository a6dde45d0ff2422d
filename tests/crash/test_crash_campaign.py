"""Kill -9 campaign, short run: every block-map design, ten kills each.

What one iteration does is in :mod:`crashharness`; the long campaign is
``scripts/crash-test`` (``make crash-test``). The seed is new at every run
(set ``CRASH_SEED`` to repeat one); a failure names it, with the command that
reruns it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import ServerFactory
from crashharness import Campaign

from nbdserver.blockmap.base import designs

MiB = 1 << 20
ITERATIONS = 10


@pytest.mark.slow
@pytest.mark.parametrize("design", sorted(designs()))
async def test_kill_9_at_random_moments_loses_nothing_promised(
        design: str, nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(1 << 31))
    lines: list[str] = []
    campaign = Campaign(tmp_path, design, seed, factory=nbd_server_factory,
                        iterations=ITERATIONS, volume_size=4 * MiB, pool_size=128 * MiB,
                        run_seconds=(0.1, 1.0), log=lines.append)
    stats = await campaign.run()  # raises Violation, naming the seed, at the first fault
    print("\n".join(lines), stats.summary(), sep="\n")
    assert stats.kills == ITERATIONS
    assert stats.acked > stats.kills  # the workload really ran between the kills
    # The last run and the check after the clean stop read every volume, v0 and v1 at least.
    assert stats.bytes_checked >= 2 * 2 * 4 * MiB
