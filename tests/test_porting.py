"""docs/porting.md runs as written: its code blocks, executed in order in one namespace
(batch_norm_kwargs, from_torch on torchvision's ResNet-18 with an eval-logit check, a
compiled fine-tuning step that advances the counters, to_torch, folding)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the porting guide needs the torch extra")
from test_torch import _torchvision  # noqa: E402  (the test-only torchvision shim)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "porting.md"


def test_porting_page_code_runs():
    _torchvision()
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), namespace)
    assert int(namespace["torch_model"].bn1.num_batches_tracked) == 1
