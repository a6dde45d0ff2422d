"""argparse types shared by the scripts (standard library only at import time).

Every number, size and path a script takes is checked where it is parsed, so a
bad value is a one-line usage error naming the option (exit 2): never a
traceback after minutes of work, a run that hangs, or a run reported as a
failure of the server. Output files are checked before the run starts (their
directory must exist), and directories are made absolute (a server started in
another directory must find them).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def count(least: int = 1) -> Callable[[str], int]:
    """A whole number of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def amount(least: float = 0.0, *, above: bool = True) -> Callable[[str], float]:
    """A finite number greater than `least` (at least `least` unless `above`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < least or (above and value == least):
            word = "greater than" if above else "at least"
            raise argparse.ArgumentTypeError(f"must be a finite number {word} {least:g}, "
                                             f"got {text}")
        return value
    return parse


def size(least: int = 1) -> Callable[[str], int]:
    """A size as people write it (``64M``, ``1G``), of at least `least` bytes."""
    def parse(text: str) -> int:
        # (imported here: a script may be started by a Python without the project, and
        # switch to the project's virtualenv only after it has imported this module)
        from nbdserver.sizes import parse_size

        try:
            value = parse_size(text, what="size")
        except (ValueError, OverflowError) as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} bytes, got {text}")
        return value
    return parse


def out_file(text: str) -> Path:
    """A file to write at the end of a run: its directory must exist and be writable now,
    and the path must not be a directory."""
    path = Path(text).resolve()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no directory {path.parent} to write {text} in")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {path.parent}")
    return path


def in_file(text: str) -> Path:
    """A file to read: it must exist and be a file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def work_dir(text: str) -> Path:
    """A directory to work in, absolute; it may not exist yet, but nothing else may be
    there."""
    path = Path(text).resolve()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path
