"""Shared exports for the protocol tests.

``client.py`` (the in-memory NBD client) is loaded here under the unique module
name ``nbd_protocol_client``: the test directories have no ``__init__.py``, and
a plain ``import client`` could pick up a helper of the same name from another
test directory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load_client() -> None:
    name = "nbd_protocol_client"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("client.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load_client()
