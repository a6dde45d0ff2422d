"""nbdserver.sizes: parse_size, format_size, parse_duration."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.sizes import format_duration, format_size, parse_duration, parse_size

K, M, G, T, P = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096),
    (4096, 4096),
    ("1", 1),
    ("123B", 123),
    ("64K", 64 * K),
    ("64k", 64 * K),
    ("64KiB", 64 * K),
    ("64kib", 64 * K),
    ("64KB", 64 * K),
    ("512M", 512 * M),
    ("1G", G),
    ("1g", G),
    ("1.5G", 3 * G // 2),
    ("20GiB", 20 * G),
    ("1T", T),
    ("2P", 2 * P),
    ("1E", 1 << 60),
    (" 1 GiB ", G),
    ("1.5 GiB", 3 * G // 2),
    (".5K", 512),
    ("1_024", 1024),
    ("0.25M", 256 * K),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text, what="x") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "expected a size"),
    ("G", "expected a size"),
    ("1X", "expected a size"),
    ("1Gi", "expected a size"),
    ("1 G B", "expected a size"),
    ("one", "expected a size"),
    ("1e9", "expected a size"),
    ("-1G", "cannot be negative"),
    (-5, "cannot be negative"),
    ("0", "greater than zero"),
    (0, "greater than zero"),
    ("0.3K", "not a whole number of bytes"),
    ("1.5", "not a whole number of bytes"),
    (True, "expected a size"),
    (1.5, "expected a size"),
])
def test_parse_size_errors_name_what(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=r"^exports\[0\]\.size: ") as info:
        parse_size(text, what="exports[0].size")  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_parse_size_allow_zero() -> None:
    assert parse_size("0", what="x", allow_zero=True) == 0
    assert parse_size("0K", what="x", allow_zero=True) == 0


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"),
    (123, "123 B"),
    (1023, "1023 B"),
    (K, "1 KiB"),
    (64 * K, "64 KiB"),
    (1536, "1.5 KiB"),
    (G, "1 GiB"),
    (3 * G // 2, "1.5 GiB"),
    (5 * G // 4, "1.25 GiB"),
    (256 * M, "256 MiB"),
    (4 * T, "4 TiB"),
    (P, "1 PiB"),
    (1025, "1.00 KiB"),          # inexact: always two decimals
    (2 * K - 1, "1.99 KiB"),     # cut, not rounded up to a size it is not
    ((1 << 63) - 1, "7.99 EiB"),
    (500107862016, "465.76 GiB"),
    (-K, "-1 KiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [1, 512, 4096, 1536, G, 3 * G // 2, 20 * G, 256 * M, T, 7 * P])
def test_round_trip_exact(n: int) -> None:
    assert parse_size(format_size(n), what="x") == n


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_then_parse(n: int) -> None:
    """Exact when two decimals suffice, else cut to two decimals: never more than `n`,
    less than a hundredth of the unit below it."""
    unit = 1 << (10 * min(6, max(0, (n.bit_length() - 1) // 10))) if n else 1
    text = format_size(n)
    if (n * 100) % unit == 0:
        assert parse_size(text, what="x", allow_zero=True) == n
    else:
        number, suffix = text.split()
        assert suffix == ("B" if unit == 1 else "KMGTPE"[unit.bit_length() // 10 - 1] + "iB")
        assert len(number.split(".")[1]) == 2
        whole, cents = number.split(".")
        shown = (int(whole) * 100 + int(cents)) * unit  # a hundred times what is shown
        assert shown <= 100 * n < shown + unit


@pytest.mark.parametrize(("text", "expected"), [
    ("10", 10.0), (10, 10.0), (2.5, 2.5), ("2.5", 2.5), ("500ms", 0.5), ("10s", 10.0),
    ("2m", 120.0), ("2min", 120.0), ("1h", 3600.0), (" 3 S ", 3.0),
])
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text, what="x") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "expected seconds"), ("soon", "expected seconds"), ("10d", "expected seconds"),
    ("-1", "cannot be negative"), (-1, "cannot be negative"), (0, "greater than zero"),
    (float("nan"), "finite"), (float("inf"), "finite"), (True, "expected seconds"),
])
def test_parse_duration_errors(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=r"^server\.handshake-timeout: ") as info:
        parse_duration(text, what="server.handshake-timeout")  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_format_duration() -> None:
    assert format_duration(10.0) == "10 s"
    assert format_duration(2.5) == "2.5 s"
    assert format_duration(0.5) == "500 ms"
