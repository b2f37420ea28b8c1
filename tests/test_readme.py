"""The README's "API in 30 lines" snippet runs as written (extracted from README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    section = text[text.index("## The API in 30 lines") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_snippet_runs_as_written():
    ns: dict = {}
    exec(compile(snippet(), str(README), "exec"), ns)
    # what the snippet claims: eval is the affine map, the average saw 3 batches
    np.testing.assert_allclose(ns["y"], ns["a"] * ns["x"] + ns["b"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ns["avg"].batches, 3)
    assert ns["logits"].shape == (64, 10)
    assert set(ns["updates"]["batch_stats"]) == {"BatchNorm_0"}
