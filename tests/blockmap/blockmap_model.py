"""The block-map contract as a hypothesis state machine, checked against a plain model.

:class:`PoolModel` runs random sequences of volume operations on a real pool
(one design, one chunk size, offline or with a 16-page cache) through the real
data path (:class:`~nbdserver.volume.VolumeBackend`), and keeps a model: one
``bytearray`` per live volume. Operations: create, write (any offset and
length: aligned, unaligned, several chunks, random bytes, FUA or not), trim,
write-zeroes (with and without NO_HOLE, and FAST_ZERO), snapshot, fork, delete,
flush, bursts of concurrent writes and trims, close and reopen, and a crash
after a flush (journal replay). Volumes and forks are thin or guaranteed.
A write, trim or zero may fail only when a thin volume needs a metadata page
and every free one is promised to guaranteed volumes (ENOSPC); then each chunk
of its range reads as before or as written.

After every step (:meth:`PoolModel.check_everything`):

- every live volume reads back exactly as the model says, all of it
  (isolation: nothing unwritten, trimmed or deleted shows through;
  independence: a write to one volume changed no other);
- ``base:allocation`` never calls a range a hole or zero where the model has
  a nonzero byte, and ``qemu:allocation-depth`` 0 means the model reads zeros;
- ``pool.check()`` is clean: no problem, no leaked chunk or page, the
  volumes' reservations add up to the pool's, and a guaranteed volume holds
  at most its size in promises and at least what it may need; right after a
  deletion, the guaranteed volumes of its family hold exactly that need;
- with no volume left at all, every data chunk is free again (reclamation).

Designs with documented limits refuse operations with ``UserError`` exactly
when their ``clone_refused``/``delete_refused`` say so, and then nothing
changes; a design without clones of clones (``supports_clone_of_clone``
False, linear) must refuse to clone a clone and to delete a volume with live
clones, and nothing else is refused.

The pytest entry point is ``test_blockmap_contract.py``; ``scripts/soak-model.py``
runs the same machine for many more examples.
"""

from __future__ import annotations

import asyncio
import errno
import random
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from poolkit import TINY_CACHE, KiB, PoolEnv, describe_diff

from nbdserver.backend.base import ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO
from nbdserver.blockmap.base import (
    ASK,
    FRESH,
    HOLE,
    BlockMap,
    Claim,
    InPlace,
    Redirect,
    designs,
    target_at,
)
from nbdserver.errors import NbdError, UserError
from nbdserver.pool.format import VolumeRecord

T = TypeVar("T")

MAX_LIVE = 8
REOPEN_EVERY = 6  # steps between two reopens (or crashes) at least: they are slow
VOLUME_SIZES = (64 * KiB, 100 * KiB + 512, 192 * KiB, 256 * KiB)
ZEROS = bytes(max(VOLUME_SIZES))
PAGES_PER_CHANGE = 16  # more than one map change of a tiny-node map takes (a path)

settings.register_profile(
    "model-ci", max_examples=20, stateful_step_count=40, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much], print_blob=True)
settings.register_profile(
    "model-soak", max_examples=2000, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much], print_blob=True)


@dataclass(frozen=True)
class ModelConfig:
    """Which pool a machine runs on."""

    design: str
    chunk_size: int = 4096
    offline: bool = True
    base_dir: Path = Path(".")

    @property
    def label(self) -> str:
        return (f"{self.design}-{self.chunk_size // KiB}k-"
                f"{'offline' if self.offline else 'tiny-cache'}")


def machine_for(config: ModelConfig) -> type[PoolModel]:
    """A PoolModel subclass bound to `config` (hypothesis instantiates it per example)."""
    return type(f"PoolModel_{config.label.replace('-', '_')}", (PoolModel,), {"config": config})


def data_bytes(seed: int, length: int) -> bytes:
    """Random bytes; every fifth seed with a run of zeros inside (seed 0: all zeros)."""
    if seed == 0:
        return bytes(length)
    out = bytearray(random.Random(seed).randbytes(length))
    if seed % 5 == 0 and length > 2:
        out[length // 3:2 * length // 3] = bytes(2 * length // 3 - length // 3)
    return bytes(out)


class PoolModel(RuleBasedStateMachine):
    """See the module note."""

    config: ClassVar[ModelConfig]

    def __init__(self) -> None:
        super().__init__()
        self.loop = uvloop.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.config.label}-",
                                         dir=self.config.base_dir))
        self.env = PoolEnv(self.dir / "pool.img", self.config.design,
                           chunk_size=self.config.chunk_size, offline=self.config.offline,
                           cache_bytes=TINY_CACHE)
        self.run(self.env.open())
        self.free0 = self.env.pool.data.free
        self.model: dict[str, bytearray] = {}
        self.read_only: set[str] = set()
        self.parent: dict[str, str | None] = {}
        self.clones: dict[str, set[str]] = {}  # live volumes cloned from a volume
        self.counter = 0
        self.since_reopen = 0
        self.design_cls = designs()[self.config.design]
        self.chunk = self.config.chunk_size

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def teardown(self) -> None:
        try:
            self.run(self.env.shutdown())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------

    def _new_name(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    def _writable(self) -> list[str]:
        return sorted(n for n in self.model if n not in self.read_only)

    def _draw_range(self, data: st.DataObject, size: int, label: str) -> tuple[int, int]:
        chunk = self.chunk
        kind = data.draw(st.sampled_from(["chunk", "sector", "byte"]), label=f"{label} kind")
        if kind == "chunk":
            off = data.draw(st.integers(0, (size - 1) // chunk), label=f"{label} chunk") * chunk
            length = data.draw(st.integers(1, 3), label=f"{label} chunks") * chunk
        elif kind == "sector":
            off = data.draw(st.integers(0, (size - 1) // 512), label=f"{label} sector") * 512
            length = data.draw(st.integers(1, 3 * chunk // 512 + 2), label=f"{label} sectors") * 512
        else:
            off = data.draw(st.integers(0, size - 1), label=f"{label} offset")
            length = data.draw(st.integers(1, 3 * chunk + 100), label=f"{label} length")
        return off, min(length, size - off)

    def _assert_pages_not_promised(self, e: UserError, guaranteed: bool,
                                   names: list[str]) -> None:
        """A guaranteed create, or a clone involving a guaranteed volume, may be refused
        when the free metadata pages cannot cover every promise of map pages (tiny nodes
        make them large: see Pool.may_take_page); then nothing changed."""
        assert guaranteed, e
        m = re.search(r"may need (\d+) metadata pages .* only (\d+) are free", str(e))
        assert m is not None and int(m[2]) < int(m[1]), e
        assert self.env.names() == names

    async def _outcome(self, change: Awaitable[None]) -> BaseException | None:
        try:
            await change
        except NbdError as e:
            return e
        return None

    def _settle(self, name: str, off: int, new: bytes, error: BaseException | None) -> None:
        """Put a write, trim or zero of `new` at `off` in volume `name` into the model.
        The one failure allowed: a thin volume refused (ENOSPC) a metadata page because
        every free one is promised to guaranteed volumes (Pool.may_take_page; tiny nodes
        make promises large; the pages the refused change took are free again, and a
        concurrent one may have freed some). Then each chunk of the range reads as before
        or as written (a map change is all or nothing), and the model takes what it reads."""
        model = self.model[name]
        end = off + len(new)
        if error is None:
            model[off:end] = new
            return
        pool = self.env.pool
        if not (isinstance(error, NbdError) and error.errno == errno.ENOSPC
                and "promised to guaranteed volumes" in str(error)
                and not pool.volume(name).guaranteed
                and pool.meta.free - pool.pages_promised() < PAGES_PER_CHANGE):
            raise error
        got = self.run(self.env.vol(name).read(off, len(new)))
        pos = off
        while pos < end:
            stop = min(end, (pos // self.chunk + 1) * self.chunk)
            assert got[pos - off:stop - off] in (model[pos:stop], new[pos - off:stop - off]), (
                f"{name}: chunk {pos // self.chunk} after a refused change ({error}) reads "
                "neither as before nor as written")
            pos = stop
        model[off:end] = got

    def _snapshot_state(self) -> tuple[dict[str, bytes], frozenset[str]]:
        return ({n: bytes(b) for n, b in self.model.items()}, frozenset(self.env.names()))

    # -- rules -----------------------------------------------------------------------------

    @initialize(sizes=st.lists(st.sampled_from(VOLUME_SIZES), min_size=1, max_size=3),
                seed=st.integers(1, 1 << 16))
    def start(self, sizes: list[int], seed: int) -> None:
        """Every run starts with a few volumes, some data in them."""
        for i, size in enumerate(sizes):
            name = self._new_name()
            vol = self.run(self.env.create(name, size))
            payload = data_bytes(seed + i, size // 2)
            self.run(vol.write(size // 4, payload))
            self.model[name] = bytearray(size)
            self.model[name][size // 4:size // 4 + len(payload)] = payload
            self.parent[name] = None
            self.clones[name] = set()

    @precondition(lambda self: len(self.model) < MAX_LIVE)
    @rule(size=st.sampled_from(VOLUME_SIZES), guarantee=st.booleans())
    def create(self, size: int, guarantee: bool) -> None:
        name = self._new_name()
        names = self.env.names()
        try:
            self.run(self.env.create(name, size, guarantee=guarantee))
        except UserError as e:
            self._assert_pages_not_promised(e, guarantee, names)
            return
        self.model[name] = bytearray(size)
        self.parent[name] = None
        self.clones[name] = set()

    @precondition(lambda self: any(n not in self.read_only for n in self.model))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._writable()), label="volume")
        vol = self.env.vol(name)
        off, length = self._draw_range(data, vol.size, "write")
        seed = data.draw(st.integers(0, 1 << 16), label="seed")
        fua = data.draw(st.booleans(), label="fua")
        payload = data_bytes(seed, length)
        self._settle(name, off, payload, self.run(self._outcome(vol.write(off, payload, fua))))

    @precondition(lambda self: any(n not in self.read_only for n in self.model))
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._writable()), label="volume")
        vol = self.env.vol(name)
        off, length = self._draw_range(data, vol.size, "trim")
        fua = data.draw(st.booleans(), label="fua")
        self._settle(name, off, bytes(length), self.run(self._outcome(vol.trim(off, length, fua))))

    @precondition(lambda self: any(n not in self.read_only for n in self.model))
    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._writable()), label="volume")
        vol = self.env.vol(name)
        off, length = self._draw_range(data, vol.size, "zero")
        no_hole = data.draw(st.booleans(), label="no_hole")
        fast = data.draw(st.booleans(), label="fast_zero")
        outcome = self.run(self._outcome(
            vol.zero(off, length, may_trim=not no_hole, fast_only=fast)))
        # A zero that would write (NO_HOLE, part of a chunk, a linear origin's chunks its
        # snapshots read) is not fast: ENOTSUP, refused before anything changes. A range
        # to the volume's end covers its last chunk whole, however long that chunk is.
        slow = no_hole or off % self.chunk or (off + length != vol.size
                                               and length % self.chunk)
        if fast and (slow or self.config.design == "linear") and isinstance(outcome, NbdError) \
                and outcome.errno == errno.ENOTSUP:
            return
        assert not (fast and slow), f"a fast zero that must write was not refused: {outcome}"
        self._settle(name, off, bytes(length), outcome)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        vol = self.env.vol(name)
        off, length = self._draw_range(data, vol.size, "read")
        got = self.run(vol.read(off, length))
        assert got == self.model[name][off:off + length], (
            f"{name}: read {off}+{length}: "
            + describe_diff(self.model[name][off:off + length], got, self.chunk))

    def _clone(self, data: st.DataObject, snapshot: bool) -> None:
        src = data.draw(st.sampled_from(sorted(self.model)), label="source")
        guarantee = not snapshot and data.draw(st.booleans(), label="guarantee")
        name = self._new_name()
        pool = self.env.pool
        why = pool.map.clone_refused(pool.volume(src))
        if not self.design_cls.supports_clone_of_clone and self.parent[src] is not None:
            assert why, f"{self.config.design}: cloning the clone {src!r} must be refused"
        if self.design_cls.supports_clone_of_clone:
            assert why is None, f"{self.config.design} refused to clone {src!r}: {why}"
        if why:
            before = self._snapshot_state()
            refused: UserError | None = None
            try:
                self.run(self.env.fork(src, name, guarantee=guarantee) if not snapshot
                         else self.env.snapshot(src, name))
            except UserError as e:
                refused = e
            assert refused is not None, f"clone of {src!r} succeeded although refused: {why}"
            assert self._snapshot_state() == before
            assert name not in self.env.names()
            return
        names = self.env.names()
        try:
            if snapshot:
                self.run(self.env.snapshot(src, name))
            else:
                self.run(self.env.fork(src, name, guarantee=guarantee))
        except UserError as e:
            self._assert_pages_not_promised(e, guarantee or pool.volume(src).guaranteed,
                                            names)
            return
        if snapshot:
            self.read_only.add(name)
        self.model[name] = bytearray(self.model[src])
        self.parent[name] = src
        self.clones[name] = set()
        self.clones[src].add(name)

    @precondition(lambda self: 0 < len(self.model) < MAX_LIVE)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        self._clone(data, snapshot=True)

    @precondition(lambda self: 0 < len(self.model) < MAX_LIVE)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        self._clone(data, snapshot=False)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        pool = self.env.pool
        why = pool.map.delete_refused(pool.volume(name))
        if not self.design_cls.supports_clone_of_clone:
            assert bool(why) == bool(self.clones[name]), (
                f"{self.config.design}: delete of {name!r} (live clones "
                f"{sorted(self.clones[name])}): refused={why!r}")
        else:
            assert why is None, f"{self.config.design} refused to delete {name!r}: {why}"
        if why:
            before = self._snapshot_state()
            refused: UserError | None = None
            try:
                self.run(self.env.delete(name))
            except UserError as e:
                refused = e
            assert refused is not None, f"delete of {name!r} succeeded although refused: {why}"
            assert self._snapshot_state() == before
            assert name in self.env.names()
            return
        root = pool.ancestry(pool.volume(name))[-1]
        self.run(self.env.delete(name))
        # The guaranteed volumes of its family are promised exactly what they may still
        # need again: a chunk per chunk they do not hold alone (nothing else runs now).
        for vol in pool.live_volumes():
            if (vol.guaranteed and pool.map.needs_reservation(vol)
                    and pool.ancestry(vol)[-1] == root):
                sole = self.run(pool.volume_stats(vol)).exclusive_chunks
                assert vol.reserved == -(-vol.size // self.chunk) - sole, (
                    f"after deleting {name!r}, {vol.name!r} is promised {vol.reserved} "
                    f"chunks but holds {sole} of its {-(-vol.size // self.chunk)} alone")
        del self.model[name]
        self.read_only.discard(name)
        parent = self.parent.pop(name)
        if parent is not None and parent in self.clones:
            self.clones[parent].discard(name)
        for child in self.clones.pop(name):
            self.parent[child] = None if self.parent.get(child) == name else self.parent[child]

    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        if self.model:
            name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
            self.run(self.env.vol(name).flush())
        else:
            self.run(self.env.pool.commit())

    @precondition(lambda self: any(n not in self.read_only for n in self.model))
    @rule(data=st.data())
    def burst(self, data: st.DataObject) -> None:
        """Concurrent writes and trims (to disjoint bytes within one volume)."""
        n = data.draw(st.integers(2, 8), label="burst size")
        taken: dict[str, list[tuple[int, int]]] = {}
        ops: list[Callable[[], Awaitable[None]]] = []
        effects: list[tuple[str, int, bytes]] = []
        names = self._writable()
        for _ in range(n):
            name = data.draw(st.sampled_from(names), label="volume")
            vol = self.env.vol(name)
            if data.draw(st.booleans(), label="same chunk"):  # pile onto one chunk
                lc = data.draw(st.integers(0, min(2, (vol.size - 1) // self.chunk)),
                               label="chunk")
                off = lc * self.chunk + data.draw(st.integers(0, self.chunk - 1),
                                                  label="offset")
                off = min(off, vol.size - 1)
                length = min(data.draw(st.integers(1, 1500), label="length"), vol.size - off)
            else:
                off, length = self._draw_range(data, vol.size, "burst")
            if any(off < e and s < off + length for s, e in taken.get(name, [])):
                continue
            taken.setdefault(name, []).append((off, off + length))
            if data.draw(st.integers(0, 3), label="kind") == 0:
                ops.append(lambda vol=vol, off=off, length=length: vol.trim(off, length))
                effects.append((name, off, bytes(length)))
            else:
                payload = data_bytes(data.draw(st.integers(1, 1 << 16), label="seed"), length)
                ops.append(lambda vol=vol, off=off, payload=payload: vol.write(off, payload))
                effects.append((name, off, payload))

        async def go() -> list[BaseException | None]:
            return await asyncio.gather(*(self._outcome(op()) for op in ops))

        for (name, off, payload), error in zip(effects, self.run(go()), strict=True):
            self._settle(name, off, payload, error)

    @precondition(lambda self: self.since_reopen >= REOPEN_EVERY)
    @rule()
    def reopen(self) -> None:
        self.since_reopen = 0
        self.run(self.env.reopen())

    @precondition(lambda self: self.since_reopen >= REOPEN_EVERY)
    @rule()
    def crash_after_flush(self) -> None:
        """Everything is flushed, then the process dies: replay must restore it all."""
        async def crash() -> None:
            await self.env.pool.commit()
            await self.env.crash()

        self.since_reopen = 0
        self.run(crash())

    # -- the invariants --------------------------------------------------------------------

    @invariant()
    def check_everything(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        self.since_reopen += 1
        env = self.env
        assert sorted(env.names()) == sorted(self.model), "live volumes differ from the model"
        for name, want in self.model.items():
            vol = env.vol(name)
            assert vol.size == len(want)
            got = await vol.read_all()
            if got != want:
                raise AssertionError(f"{name} reads wrong: " + describe_diff(want, got,
                                                                             self.chunk))
            pos = 0
            for n, flags in await vol.block_status(0, vol.size, BASE_ALLOCATION):
                if flags & (STATE_HOLE | STATE_ZERO):
                    assert want[pos:pos + n] == ZEROS[:n], (
                        f"{name}: block status says hole/zero at {pos}+{n} over data")
                pos += n
            pos = 0
            for n, depth in await vol.block_status(0, vol.size, ALLOCATION_DEPTH):
                if depth == 0:
                    assert want[pos:pos + n] == ZEROS[:n], (
                        f"{name}: allocation depth 0 at {pos}+{n} over data")
                pos += n
        for record in env.pool.live_volumes():  # the range query agrees chunk by chunk
            chunks = -(-record.size // self.chunk)
            for lo, hi in ((0, chunks), (chunks // 3, chunks - chunks // 4)):
                if hi > lo:
                    assert await env.pool.cache.run(partial(expand_runs, env.pool.map, record,
                                                            lo, hi)) == [], record.name
            # and so do the one-chunk short forms of lookup and write_target
            assert await env.pool.cache.run(partial(short_forms, env.pool.map, record,
                                                    chunks)) == [], record.name
        for vol in env.pool.live_volumes():
            assert 0 <= vol.reserved <= -(-vol.size // self.chunk), vol
            assert vol.guaranteed or vol.reserved == 0, vol
        report = await env.check()
        assert report.ok, "pool check:\n" + "\n".join(report.problems)
        assert report.leaked_chunks == 0 and report.leaked_pages == 0
        pool = env.pool
        if not pool.volumes:
            assert pool.data.free == self.free0, (
                f"no volume left but {self.free0 - pool.data.free} chunk(s) still used")
            assert pool.state.data_reserved == 0


def expand_runs(bmap: BlockMap, vol: VolumeRecord, lo: int, hi: int) -> list[str]:
    """Where ``write_runs`` over chunks [lo, hi) disagrees with ``write_target`` per chunk."""
    runs = bmap.write_runs(vol, lo, hi - lo)
    got = [target_at(r.target, i) for r in runs for i in range(r.count)]
    pos = lo
    for r in runs:
        if r.lc != pos or r.count < 1:
            return [f"run {r} does not start at {pos}"]
        pos += r.count
    return [f"chunk {lc}: write_runs says {t}, write_target {want}"
            for lc, t in zip(range(lo, hi), got, strict=True)
            if t != (want := bmap.write_target(vol, lc))] if pos == hi else [
        f"runs end at {pos}, not {hi}"]


def short_forms(bmap: BlockMap, vol: VolumeRecord, chunks: int) -> list[str]:
    """Where ``chunk_at`` disagrees with ``lookup``, or ``write_chunk`` with
    ``write_target``, for chunks [0, chunks)."""
    out = []
    for lc in range(chunks):
        pc = bmap.chunk_at(vol, lc)
        want_pc = bmap.lookup(vol, lc, 1)[0].pc
        if pc != want_pc:
            out.append(f"chunk {lc}: chunk_at says {pc}, lookup {want_pc}")
        short = bmap.write_chunk(vol, lc)
        target = bmap.write_target(vol, lc)
        want = (target.pc if type(target) is InPlace
                else FRESH if type(target) is Redirect and target.into == HOLE
                else FRESH if (type(target) is Claim and bmap.fresh_for_claims
                               and not vol.guaranteed) else ASK)
        if short != want:
            out.append(f"chunk {lc}: write_chunk says {short}, write_target {target}")
    return out


def run_model(config: ModelConfig, profile: str, **overrides: Any) -> None:
    """Run the machine for `config` with a registered settings profile."""
    from hypothesis.stateful import run_state_machine_as_test

    chosen = settings(settings.get_profile(profile), **overrides)
    run_state_machine_as_test(machine_for(config), settings=chosen)
