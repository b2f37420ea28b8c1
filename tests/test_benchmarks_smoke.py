"""Smoke test of benchmarks/ops.py: it runs end to end on the smallest shape.

Not a performance test (timings on a shared CI machine mean nothing); it keeps the
benchmark script from rotting when the library or a competitor's API changes.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ops():
    spec = importlib.util.spec_from_file_location("bnjax_bench_ops", ROOT / "benchmarks" / "ops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_parse_shapes(ops):
    cases = ops.parse_shapes("60x100, 32x64x8x8:nchw,4x8x8x16")
    assert [(c.shape, c.axis, c.layout) for c in cases] == [
        ((60, 100), -1, "NC"),
        ((32, 64, 8, 8), 1, "NCHW"),
        ((4, 8, 8, 16), -1, "NHWC"),
    ]
    assert cases[1].features == 64
    for bad in ("60", "60xa", "8x8:nhcw", "0x4"):
        with pytest.raises(ValueError, match="--shapes"):
            ops.parse_shapes(bad)


def test_smoke_run_writes_tables(ops, tmp_path):
    out = tmp_path / "bench.md"
    names = ops.available(list(ops.BUILDERS))
    assert ops.main(["--smoke", "--out", str(out), "--impls", ",".join(names)]) == 0
    text = out.read_text()
    for title in ops.MODE_TITLES.values():
        assert f"## {title}" in text
    assert "Compiled temporary memory" in text
    assert "jax " in text and "machine:" in text and "date:" in text
    rows = [line for line in text.splitlines() if line.startswith("| NC 60x100 |")]
    renorm = [r for r in rows if "renorm` / `" in r]  # the Batch Renorm / batch norm table
    rows = [r for r in rows if r not in renorm]
    assert len(rows) == 3 + 3  # one per mode in the timing tables, three in the memory table
    assert "## Batch Renorm / batch norm" in text
    assert len(renorm) == len(ops.RENORM_PAIRS)  # one per (renorm, batch norm) pair
    for row in renorm:  # three positive ratios
        ratios = [float(c.strip().rstrip("×")) for c in row.strip("| ").split(" | ")[2:]]
        assert len(ratios) == 3 and min(ratios) > 0, row
    header = next(line for line in text.splitlines() if line.startswith("| shape | floor"))
    for name in ("bnjax", "flax.linen", "flax.nnx"):
        assert f"`{name}`" in header
    # The baseline's ratio to itself is 1 in every round.
    col = header.split(" | ").index("`flax.linen`")
    for row in rows[:3]:
        cell = row.split(" | ")[col]
        assert "**1.00×**" in cell, cell
        assert float(re.match(r"\s*([\d.]+)", cell).group(1)) > 0
