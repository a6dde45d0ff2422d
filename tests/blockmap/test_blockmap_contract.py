"""The block-map contract, for every registered design: the model state machine.

See ``blockmap_model.py`` for what the machine does and checks after every
step. Each design runs with tiny nodes (``poolkit.small_params``), 4 KiB chunks
offline and with a 16-page cache (PageMiss, retry and eviction all the time),
and 16 KiB chunks with the tiny cache. ``scripts/soak-model.py`` runs the same
machine for many more examples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from blockmap_model import ModelConfig, run_model
from poolkit import design_names

VARIANTS = [
    pytest.param(4096, True, id="4k-offline"),
    pytest.param(4096, False, id="4k-tiny-cache"),
    pytest.param(16384, False, id="16k-tiny-cache"),
]


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size,offline", VARIANTS)
@pytest.mark.parametrize("design", design_names())
def test_model(design: str, chunk_size: int, offline: bool, tmp_path: Path) -> None:
    run_model(ModelConfig(design, chunk_size, offline, tmp_path), "model-ci")
