"""Fixtures for the pool tests: ``make_pool`` (a pool of a design on a real file).

The helpers live in ``poolkit.py`` (see its note), loaded here under that unique
module name: the test directories have no ``__init__.py``, so a plain
``import helpers`` could pick up a module of the same name from elsewhere.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load(name: str, path: Path) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load("poolkit", Path(__file__).with_name("poolkit.py"))

import poolkit  # noqa: E402
from poolkit import make_pool  # noqa: E402

__all__ = ["make_pool"]


def pytest_configure(config: object) -> None:
    poolkit.remember_config(config)


def __getattr__(name: str) -> object:
    """`from conftest import X` elsewhere means tests/conftest.py: see poolkit's note."""
    return poolkit.root_conftest_attr(name)
