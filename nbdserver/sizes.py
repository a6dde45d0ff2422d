"""Sizes and durations as people write them: ``1G``, ``512M``, ``1.5GiB``, ``10s``.

Size units are binary and case-insensitive: ``K``, ``M``, ``G``, ``T``, ``P`` and
``E`` are powers of 1024, optionally followed by ``iB`` or ``B`` (so ``1G``,
``1g``, ``1GB`` and ``1GiB`` all mean 1073741824 bytes). A bare number, or a
number followed by ``B``, is a count of bytes. A fraction is allowed when the
result is a whole number of bytes (``1.5G``, but not ``0.3K``).

:func:`format_size` goes the other way for messages: ``1 GiB``, ``64 KiB``,
``1.5 GiB``, ``123 B``. Its output parses back to the same number whenever it
is exact, i.e. whenever the value has at most two decimals in its unit;
otherwise it is rounded to two decimals (and always shows both, ``465.76 GiB``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["UNITS", "format_duration", "format_size", "parse_duration", "parse_size"]

#: Unit letter -> multiplier, smallest first.
UNITS: dict[str, int] = {
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "P": 1 << 50,
    "E": 1 << 60,
}

_SIZE_RE = re.compile(
    r"""^\s*
    (?P<number>[0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)
    \s*
    (?P<unit>[KMGTPE](?:I?B)?|B)?
    \s*$""",
    re.IGNORECASE | re.VERBOSE,
)

_SIZE_EXAMPLES = "a size such as 4096, 64K, 512M, 1.5G or 20GiB"
MAX_SIZE = (1 << 63) - 1  # NBD sizes are 64-bit, and files are at most this large


def parse_size(text: str | int, *, what: str, allow_zero: bool = False) -> int:
    """Parse `text` (``"1G"``, ``"512M"``, ``"64K"``, ``"4096"``, ``"1.5G"``, ``"20GiB"``) to bytes.

    An int is taken as a number of bytes. Raises ValueError naming `what` (for
    example ``"exports[0].size"``) when the text is not a size, is negative, is
    not a whole number of bytes, or is zero (unless `allow_zero`).
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"{what}: expected {_SIZE_EXAMPLES}, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        if text.strip().startswith("-"):
            raise ValueError(f"{what}: a size cannot be negative, got {text!r}")
        m = _SIZE_RE.match(text)
        if m is None:
            raise ValueError(f"{what}: expected {_SIZE_EXAMPLES}, got {text!r}")
        try:
            number = Decimal(m["number"].replace("_", ""))
        except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
            raise ValueError(f"{what}: expected {_SIZE_EXAMPLES}, got {text!r}") from None
        unit = (m["unit"] or "B")[0].upper()
        exact = number * (UNITS[unit] if unit != "B" else 1)
        if exact != exact.to_integral_value():
            raise ValueError(f"{what}: {text!r} is not a whole number of bytes")
        value = int(exact)
    if value < 0:
        raise ValueError(f"{what}: a size cannot be negative, got {text!r}")
    if value == 0 and not allow_zero:
        raise ValueError(f"{what}: a size must be greater than zero, got {text!r}")
    if value > MAX_SIZE:
        raise ValueError(f"{what}: '{text}' is too large (sizes must be less than 8 EiB: "
                         f"at most {MAX_SIZE} bytes)")
    return value


def not_whole_sectors(size: int, what: str) -> str | None:
    """Why `size` bytes cannot be the size of `what` (a volume, a file export: served
    in 512-byte sectors), or None if it can."""
    if not size % 512:
        return None
    return (f"{what} must be a multiple of 512 bytes, got {size} (for example "
            f"{-(-size // 512) * 512})")


def not_whole_blocks(size: int, min_block: int) -> str:
    """Why a size not a multiple of `min_block` serves badly (for messages)."""
    return (f"{format_size(size)} ({size} bytes) is not a multiple of min-block-size "
            f"{min_block}: a client that keeps to the block size could not reach the last "
            f"{size % min_block} bytes")


def format_size(n: int) -> str:
    """``1 GiB``, ``64 KiB``, ``1.5 GiB``, ``123 B``: `n` bytes for people to read
    (inexact: two decimals, cut; ``(1 << 63) - 1`` is ``7.99 EiB``, not 8)."""
    if n < 0:
        return "-" + format_size(-n)
    unit, mult = "", 1
    for letter, m in UNITS.items():
        if n >= m:
            unit, mult = letter, m
    if not unit:
        return f"{n} B"
    if (n * 100) % mult == 0:  # exact with at most two decimals
        text = f"{Decimal(n) / Decimal(mult):f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return f"{text} {unit}iB"
    hundredths = n * 100 // mult  # cut, not rounded: never more than there is
    return f"{hundredths // 100}.{hundredths % 100:02d} {unit}iB"


_DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "min": Decimal(60),
    "h": Decimal(3600),
}

_DURATION_RE = re.compile(
    r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|min|m|h)?\s*$",
    re.IGNORECASE,
)


def parse_duration(text: str | int | float, *, what: str, allow_zero: bool = False) -> float:
    """Parse seconds: ``10``, ``2.5``, ``500ms``, ``10s``, ``2m`` (or ``2min``), ``1h``.

    Raises ValueError naming `what` when the text is not a duration, is
    negative, or is zero (unless `allow_zero`).
    """
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"{what}: expected seconds such as 10, 2.5, 500ms or 2m, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        if text.strip().startswith("-"):
            raise ValueError(f"{what}: a duration cannot be negative, got {text!r}")
        m = _DURATION_RE.match(text)
        if m is None:
            raise ValueError(
                f"{what}: expected seconds such as 10, 2.5, 500ms or 2m, got {text!r}")
        value = float(Decimal(m["number"]) * _DURATION_UNITS[(m["unit"] or "s").lower()])
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what}: expected a finite number of seconds, got {text!r}")
    if value < 0:
        raise ValueError(f"{what}: a duration cannot be negative, got {text!r}")
    if value == 0 and not allow_zero:
        raise ValueError(f"{what}: a duration must be greater than zero, got {text!r}")
    return value


def format_duration(seconds: float) -> str:
    """``10 s``, ``2.5 s``, ``500 ms``: a duration for people to read."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g} ms"
    return f"{seconds:g} s"
