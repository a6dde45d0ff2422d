"""Fuzz the running server's handshake and request parser over real connections.

Deterministic: cases come from fixed seeds (``tests/nbdfuzz.py``). Between
batches the server must be alive, within its memory bound, and serving the
reference data to a good client; at the end it must stop cleanly with nothing
alarming in its log. ``scripts/fuzz.py`` runs the same fuzzer for longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ServerFactory, on_uvloop
from nbdfuzz import (
    BAD_LOG_WORDS,
    SERVER_SETTINGS,
    FuzzFailure,
    check_pool,
    fuzz,
    make_case,
    make_pattern_volume,
    server_exports,
    server_pools,
    vfuzz_mapped,
    write_keep,
)

MiB = 1024 * 1024
FIRST_SEED = 1_000_000
CASES = 6144


def test_cases_are_deterministic_and_varied() -> None:
    a = [make_case(FIRST_SEED + i) for i in range(300)]
    b = [make_case(FIRST_SEED + i) for i in range(300)]
    assert [(x.kind, x.stream, x.pieces, x.ending) for x in a] == \
        [(x.kind, x.stream, x.pieces, x.ending) for x in b]
    assert {x.kind for x in a} == {"garbage", "garbage-after-flags", "mutated-handshake",
                                   "random-options", "transmission"}
    assert {x.ending for x in a} == {"close", "eof", "linger"}
    assert len({x.stream for x in a}) > 290


@pytest.mark.slow
@on_uvloop
async def test_fuzz_server(nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv = nbd_server_factory(server_exports(tmp_path), pools=server_pools(tmp_path),
                             server=SERVER_SETTINGS)
    assert srv.socket_path is not None
    make_pattern_volume(tmp_path)
    keep = await write_keep(srv.socket_path, seed=FIRST_SEED)
    baseline = srv.rss_bytes()
    try:
        stats = await fuzz(srv.socket_path, keep, alive=srv.alive, rss=srv.rss_bytes,
                           first_seed=FIRST_SEED, cases=CASES, concurrency=8,
                           check_every=64, rss_limit=baseline + 512 * MiB)
    except FuzzFailure as e:
        pytest.fail(f"{e}\n--- server stderr (end)\n{srv.stderr[-3000:]}", pytrace=False)
    assert stats.cases == CASES
    assert stats.checks == CASES // 64 + 1
    assert set(stats.by_kind) == {"garbage", "garbage-after-flags", "mutated-handshake",
                                  "random-options", "transmission"}
    assert stats.server_closed > CASES // 4, "the server closed hardly any bad connection"
    err = srv.stop()
    for word in BAD_LOG_WORDS:
        assert word not in err, f"{word!r} in the server log:\n{err[-3000:]}"
    problems = check_pool(tmp_path)
    assert not problems, problems
    assert vfuzz_mapped(tmp_path) > 0, "no case wrote to the volume served by pattern"
