"""Fixtures for the block-map contract tests: ``make_pool`` from ``tests/pool/poolkit.py``.

``poolkit`` (pools on real files, volumes driven through the NBD data path) and
``blockmap_model`` (the hypothesis state machine, also run by
``scripts/soak-model.py``) are loaded under those unique module names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load("poolkit", HERE.parent / "pool" / "poolkit.py")
_load("blockmap_model", HERE / "blockmap_model.py")

import poolkit  # noqa: E402
from poolkit import make_pool  # noqa: E402

__all__ = ["make_pool"]


def pytest_configure(config: object) -> None:
    poolkit.remember_config(config)


def __getattr__(name: str) -> object:
    """`from conftest import X` elsewhere means tests/conftest.py: see poolkit's note."""
    return poolkit.root_conftest_attr(name)
