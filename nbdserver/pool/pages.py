"""The metadata page cache, with mini-transactions.

Every metadata page the block maps and space maps touch goes through this
cache. It is bounded (``capacity`` pages, the ``cache-size`` knob), whatever
the pool size: clean pages are evicted in LRU order.

**Mini-transactions.** Block-map code is synchronous: it runs between two
awaits, so nothing else can interleave. It reads pages with :meth:`get` and
changes them with :meth:`modify`, inside ``with cache.mtr():``. A page that
is not in memory raises :class:`PageMiss`; the mini-transaction then rolls
back every page it changed (each page's before-image was saved on its first
:meth:`modify`), the caller awaits :meth:`load` for the missing page and runs
the operation again from the start. The same rollback undoes a half-done
operation that fails (ENOSPC while allocating, say). So an operation is
all-or-nothing in memory, and the code that implements it has no awaits and
no partial-failure paths. Pages loaded for a retry are pinned until the
operation succeeds, so a small cache cannot evict them between attempts.

**Dirty pages and commits.** A changed page stays in memory, marked dirty,
until :meth:`take_dirty` hands its image to a commit (journal write). After
the commit its image is written home; until that write completes the page
cannot be evicted (re-reading it from home would see the old contents). A
read of a home copy that was in flight while its page was evicted may have
read the contents from before that page's home write: it is read again.

**Read-ahead for scans.** An operation that walks much of a map (volume
stats, unmapping a large range, a check) on a cold cache would restart once
per page it misses, so its cost would grow with the square of the pages it
walks. From an operation's second miss on, while the cache has room (a cache
warming up after the pool was opened), :meth:`run` loads the missing page
together with the pages after it (one device read of ``READ_AHEAD`` pages,
within the page's region, through ``read_ahead``): map pages are allocated
near each other, so a scan restarts a few times per batch, not per page. The
extra pages go in at the cold end of the LRU order, unpinned. A full cache
loads one page at a time: there, pages read ahead would be evicted before
they are used, and verifying them would multiply the cost of every miss
(seen: a server with a 1 MiB cache under a kill -9 campaign's workload spent
most of its CPU verifying pages read ahead and evicted unused).

Cost: :meth:`get` is a dict lookup plus an LRU bump; :meth:`modify` copies
the 4 KiB page once per mini-transaction, :meth:`modify_span` (one entry
changed: a map entry, a reference count) only the bytes it changes, up to
``SPANS_PER_MTR`` of them. The hottest readers (a radix volume's leaves, read
for every 4 KiB request) skip even that: they keep the :class:`Page`
(:meth:`keep`), check that it is still cached and mark it ``recent``, and
eviction gives a recent page a second chance (moves it to the hot end) instead
of evicting it: the LRU bump, paid only when the page reaches the cold end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nbdserver.pool.format import PAGE_SIZE, PT_FREE, FormatError, seal_page, verify_page

T = TypeVar("T")
READ_AHEAD = 32  # pages read at once after an operation's first miss
# Spans one mini-transaction keeps (modify_span) before it takes whole images instead: a
# batch of first writes keeps a few dozen; bulk work (an unmap, a delete) changing many
# counts per page is cheaper with one image per page than with a span per change.
SPANS_PER_MTR = 128


class PageMiss(Exception):
    """The page is not in memory; load it and retry the operation."""

    def __init__(self, page_no: int) -> None:
        super().__init__(page_no)
        self.page_no = page_no


class _MiniTransaction:
    """The context manager of :meth:`PageCache.mtr` (a class: this is on the hot path)."""

    __slots__ = ("_cache", "_outer")

    def __init__(self, cache: PageCache) -> None:
        self._cache = cache
        self._outer = False

    def __enter__(self) -> None:
        self._outer = self._cache._begin()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if self._outer:
            self._cache._end(kind is None)


class Page:
    """One cached page. A reader that keeps the Page itself (a block map's memory of
    hot pages, to skip :meth:`PageCache.get`) must check ``cached`` before each use
    and set ``recent`` instead of the LRU bump (see :meth:`PageCache.keep`)."""

    __slots__ = ("cached", "data", "dirty", "home_pending", "no", "pins", "ptype", "recent",
                 "words")

    def __init__(self, no: int, data: bytearray, ptype: int) -> None:
        self.no = no
        self.data = data  # the same bytearray for as long as the page is cached
        self.ptype = ptype
        self.dirty = False
        self.home_pending = 0
        self.pins = 0
        self.cached = True  # False once evicted or dropped: a kept Page is then stale
        self.recent = False  # used since it was last spared at the cold end (second chance)
        self.words: memoryview | None = None  # data as 64-bit words (see keep)

    def leave(self) -> None:
        """The page has left the cache: a reader that kept it must see that, and its
        bytes must not outlive it there (the cache's memory bound)."""
        self.cached = False
        if self.words is not None:
            self.words.release()
            self.words = None
            self.data = bytearray()


class PageCache:
    """Bounded LRU page cache with mini-transactions; see the module note."""

    def __init__(self, capacity: int,
                 read_page: Callable[[int], Awaitable[bytes]],
                 read_ahead: Callable[[int, int], Awaitable[list[tuple[int, bytes]]]]
                 | None = None) -> None:
        self.capacity = max(16, capacity)
        self._read_page = read_page
        self._read_ahead = read_ahead  # (page, count) -> [(page, bytes)], from `page` on
        self.read_ahead_pages = 0
        # Pages evicted while a read of home copies is in flight: its copy of them may
        # predate a home write that completed meanwhile, so it must not insert them.
        self._evicted_during: dict[int, set[int]] = {}  # read token -> pages
        self._read_token = 0
        self._pages: OrderedDict[int, Page] = OrderedDict()
        # Dirty pages by number (read it, never change it: modify, create and take_dirty
        # do). The same dict for the cache's life, so a hot path may keep it and ask len().
        self.dirty: dict[int, Page] = {}
        self._undo: dict[int, tuple[bytearray, bool, int, bool]] | None = None
        # Undo of modify_span: (page, offset, bytes before, was dirty, page type before).
        self._undo_spans: list[tuple[Page, int, bytearray, bool, int]] = []
        self._undo_hooks: list[Callable[[], None]] = []
        self.loads = 0
        self.evictions = 0
        # Offline tools and `check` read missing pages synchronously instead of PageMiss.
        self.sync_reader: Callable[[int], bytes] | None = None

    # -- reading -----------------------------------------------------------------------

    def get(self, page_no: int) -> bytearray:
        """The page's bytes (do not change them; use modify). Raises PageMiss."""
        page = self._pages.get(page_no)
        if page is None:
            page = self._miss(page_no)
        self._pages.move_to_end(page_no)
        return page.data

    def _miss(self, page_no: int) -> Page:
        if self.sync_reader is None:
            raise PageMiss(page_no)
        page = self._add_loaded(page_no, self.sync_reader(page_no))
        page.pins += 1  # (evict others, not the page the caller is about to use)
        self._evict()
        page.pins -= 1
        return page

    def keep(self, page_no: int) -> Page:
        """The cached page itself (raises PageMiss), for a reader that keeps it to read
        again without :meth:`get`: each such read checks ``page.cached`` (False once
        the page has left the cache, whose next copy is another Page) and sets
        ``page.recent``, which :meth:`_evict` honours as an LRU bump. ``page.words``
        views the page as native 64-bit words (the block maps' little-endian entries,
        on a little-endian host)."""
        page = self._pages.get(page_no)
        if page is None:
            page = self._miss(page_no)
        self._pages.move_to_end(page_no)
        if page.words is None:
            page.words = memoryview(page.data).cast("Q")
        return page

    def _add_loaded(self, page_no: int, raw: bytes) -> Page:
        """Put a page just read from its home into the cache (hot end), checksum verified."""
        page = Page(page_no, bytearray(raw), verify_page(page_no, raw))
        self._pages[page_no] = page
        self.loads += 1
        return page

    def pin(self, page_no: int) -> None:
        """Keep a page in memory until :meth:`unpin` (the state and catalog pages)."""
        self._pages[page_no].pins += 1

    def unpin(self, page_no: int) -> None:
        self._pages[page_no].pins -= 1

    def peek(self, page_no: int) -> bytearray | None:
        page = self._pages.get(page_no)
        return page.data if page is not None else None

    def __contains__(self, page_no: int) -> bool:
        return page_no in self._pages

    async def load(self, page_no: int, *, pin: bool = False) -> Page:
        """Read a page into the cache (verifying its checksum); pin it if asked.

        The pin is taken before anything is evicted: when every other page is pinned
        or dirty, evicting first would drop the page just loaded (and a retrying
        operation would load it again forever).
        """
        page = self._pages.get(page_no)
        while page is None:
            raw, evicted = await self._watching(self._read_page(page_no))
            page = self._pages.get(page_no)  # someone else may have loaded it meanwhile
            if page is None and page_no not in evicted:
                page = self._add_loaded(page_no, raw)
                if pin:
                    page.pins += 1
                self._evict()
                return page
            # else: loaded, changed, written home and evicted while this read was in
            # flight, which may have read the home copy from before: read it again
        if pin:
            page.pins += 1
        return page

    async def _watching(self, read: Awaitable[T]) -> tuple[T, set[int]]:
        """Await a read of home copies; also the pages evicted while it was in flight
        (a copy of one of those may predate a home write that completed meanwhile)."""
        evicted: set[int] = set()
        self._read_token += 1
        token = self._read_token
        self._evicted_during[token] = evicted
        try:
            return await read, evicted
        finally:
            del self._evicted_during[token]

    async def load_ahead(self, page_no: int) -> Page:
        """Like ``load(page_no, pin=True)``, also bringing in up to ``READ_AHEAD - 1``
        following pages (cold, unpinned; never-written or unreadable ones are left out:
        whoever needs one loads it, and a bad checksum is reported then)."""
        if (page_no in self._pages or self._read_ahead is None
                or len(self._pages) + READ_AHEAD > self.capacity):
            return await self.load(page_no, pin=True)  # a full cache: nothing to gain
        pages, evicted = await self._watching(self._read_ahead(page_no, READ_AHEAD))
        for no, raw in reversed(pages):  # each inserted at the cold end: keep their order
            if no == page_no or no in self._pages or no in evicted:
                continue
            try:
                ptype = verify_page(no, raw)
            except FormatError:
                continue
            if ptype == PT_FREE:
                continue
            self._pages[no] = Page(no, bytearray(raw), ptype)
            self._pages.move_to_end(no, last=False)
            self.read_ahead_pages += 1
        page = self._pages.get(page_no)
        if page is None and page_no in evicted:
            return await self.load(page_no, pin=True)
        if page is None:
            page = self._add_loaded(page_no, pages[0][1])
        page.pins += 1
        self._evict()
        return page

    @property
    def cached_count(self) -> int:
        """Pages in memory now."""
        return len(self._pages)

    def insert_clean(self, page_no: int, data: bytes, ptype: int, *, pin: bool = False) -> None:
        """Put a page known to match its home copy into the cache (open, recovery);
        `pin` keeps it for good (pinned before anything is evicted, see load)."""
        page = self._pages.get(page_no)
        if page is None:
            page = self._pages[page_no] = Page(page_no, bytearray(data), ptype)
        if pin:
            page.pins += 1
        self._evict()

    # -- mini-transactions -------------------------------------------------------------------

    def mtr(self) -> _MiniTransaction:
        """``with cache.mtr():`` runs the body as one all-or-nothing change (see the
        module note). A nested one joins the outer one, which owns rollback."""
        return _MiniTransaction(self)

    def _begin(self) -> bool:
        if self._undo is not None:
            return False
        self._undo = {}
        return True

    def _end(self, ok: bool) -> None:
        if ok:
            self._undo = None
            self._undo_hooks.clear()
            self._undo_spans.clear()
            self._evict()
        else:
            self._rollback()

    @property
    def in_mtr(self) -> bool:
        return self._undo is not None

    def add_undo(self, hook: Callable[[], None]) -> None:
        """Run `hook` if the current mini-transaction rolls back (for in-memory state)."""
        if self._undo is None:
            raise RuntimeError("add_undo() outside a mini-transaction")
        self._undo_hooks.append(hook)

    def _rollback(self) -> None:
        undo = self._undo
        self._undo = None
        assert undo is not None
        hooks = self._undo_hooks
        self._undo_hooks = []
        for hook in reversed(hooks):
            hook()
        for page_no, (before, was_dirty, ptype, existed) in undo.items():
            page = self._pages[page_no]
            if existed:
                page.data[:] = before
                page.ptype = ptype
                page.dirty = was_dirty
                if not was_dirty:
                    self.dirty.pop(page_no, None)
            else:
                del self._pages[page_no]
                page.leave()
                self.dirty.pop(page_no, None)
        # After the images (a page imaged after its spans: the image holds their changes),
        # latest first, so that a page's first span restores its state before the mtr.
        spans = self._undo_spans
        self._undo_spans = []
        for page, off, before_span, was_dirty, ptype in reversed(spans):
            page.data[off:off + len(before_span)] = before_span
            page.ptype = ptype
            page.dirty = was_dirty
            if not was_dirty:
                self.dirty.pop(page.no, None)

    def modify(self, page_no: int, ptype: int | None = None) -> bytearray:
        """The page's bytes, to change in place within the current mini-transaction."""
        undo = self._undo
        if undo is None:
            raise RuntimeError("modify() outside a mini-transaction")
        page = self._pages.get(page_no)
        if page is None:
            page = self._miss(page_no)
        if page_no not in undo:
            undo[page_no] = (bytearray(page.data), page.dirty, page.ptype, True)
        if ptype is not None:
            page.ptype = ptype
        if not page.dirty:
            page.dirty = True
            self.dirty[page_no] = page
        self._pages.move_to_end(page_no)
        return page.data

    def modify_span(self, page_no: int, offset: int, size: int, ptype: int) -> bytearray:
        """:meth:`modify` for a change of the `size` bytes at `offset` only (an entry):
        the undo keeps those bytes instead of an image of the page (up to SPANS_PER_MTR
        spans; :meth:`modify` after that). For the hottest changes (a first write's map
        entry and reference counts): a 4 KiB copy per page and batch cost more than the
        change, and pushed everything else out of the CPU's caches."""
        undo = self._undo
        if undo is None:
            raise RuntimeError("modify_span() outside a mini-transaction")
        if len(self._undo_spans) >= SPANS_PER_MTR:
            return self.modify(page_no, ptype)  # bulk work: an image per page is cheaper
        page = self._pages.get(page_no)
        if page is None:
            page = self._miss(page_no)
        data = page.data
        if page_no not in undo:  # (else its image undoes this too)
            self._undo_spans.append((page, offset, data[offset:offset + size], page.dirty,
                                     page.ptype))
        page.ptype = ptype
        if not page.dirty:
            page.dirty = True
            self.dirty[page_no] = page
        self._pages.move_to_end(page_no)
        return data

    def create(self, page_no: int, ptype: int) -> bytearray:
        """A newly allocated page: zero-filled, no read needed."""
        undo = self._undo
        if undo is None:
            raise RuntimeError("create() outside a mini-transaction")
        page = self._pages.get(page_no)
        if page is not None:
            data = self.modify(page_no, ptype)
            data[:] = bytes(PAGE_SIZE)
            return data
        page = Page(page_no, bytearray(PAGE_SIZE), ptype)
        page.dirty = True
        self._pages[page_no] = page
        self.dirty[page_no] = page
        undo[page_no] = (bytearray(), False, ptype, False)
        return page.data

    async def run(self, op: Callable[[], T],
                  gate: Callable[[], Awaitable[None]] | None = None) -> T:
        """Run a synchronous operation as a mini-transaction, loading pages until it
        succeeds; `gate`, if given, is awaited before each attempt (the attempt follows
        it with no await in between, so whatever the gate waited for still holds)."""
        pinned: list[Page] = []
        try:
            while True:
                if gate is not None:
                    await gate()
                try:
                    with self.mtr():
                        return op()
                except PageMiss as miss:
                    if pinned and self._read_ahead is not None:
                        pinned.append(await self.load_ahead(miss.page_no))
                    else:
                        pinned.append(await self.load(miss.page_no, pin=True))
        finally:
            for page in pinned:
                page.pins -= 1
            if pinned:
                self._evict()

    # -- commits and eviction -----------------------------------------------------------------

    @property
    def dirty_count(self) -> int:
        return len(self.dirty)

    def take_dirty(self, seq: int) -> list[tuple[int, bytearray]]:
        """Seal and copy every dirty page for a commit; they become clean, home-pending."""
        assert self._undo is None, "commit inside a mini-transaction"
        images = []
        for page_no, page in self.dirty.items():
            image = bytearray(page.data)
            seal_page(page_no, image, page.ptype, seq)
            page.data[:16] = image[:16]
            page.dirty = False
            page.home_pending += 1
            images.append((page_no, image))
        self.dirty.clear()
        images.sort()
        return images

    def home_written(self, page_no: int) -> None:
        page = self._pages.get(page_no)
        if page is not None and page.home_pending:
            page.home_pending -= 1
        self._evict()

    def _evict(self) -> None:
        excess = len(self._pages) - self.capacity
        while excess > 0:
            victims = []  # from the cold end, stopping as soon as there are enough
            spared = []  # used through a kept Page since they last came here: bumped now
            for page_no, page in self._pages.items():
                if page.dirty or page.home_pending or page.pins:
                    continue
                if page.recent:
                    page.recent = False
                    spared.append(page_no)
                    continue
                victims.append(page_no)
                if len(victims) >= excess:
                    break
            for page_no in spared:
                self._pages.move_to_end(page_no)
            for page_no in victims:
                self._pages.pop(page_no).leave()
                self.evictions += 1
                for watch in self._evicted_during.values():
                    watch.add(page_no)
            if not spared:
                return  # (what is left over is dirty, being written home or pinned)
            excess -= len(victims)

    def over_capacity(self) -> bool:
        return len(self._pages) > self.capacity

    def drop_all(self) -> None:
        for page in self._pages.values():
            page.leave()
        self._pages.clear()
        self.dirty.clear()
