"""docs/export.md runs as written: its code blocks, executed in order in one namespace
(exporting the eval-mode model and the folded model with jax.export, serialized to
bytes and called back, with a symbolic batch size). Needs ``flatbuffers``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_export_page_code_runs():
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), namespace)
    assert namespace["restored"].call(namespace["x"]).shape == (32, 10)
