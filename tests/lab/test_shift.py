"""The bnjax-shift experiment end to end on real MNIST (a tiny config) and its command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="bnjax-shift needs the shift extra (scikit-image)")

from bnjax.experiments import _common, shift  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    try:
        _common.load_data("mnist")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MNIST not found ({e}): set BNJAX_DATA_DIR")
    config = _common.updated(
        shift.quick_config(),
        models="convnet,mlp",
        corruptions="stripe,scale",
        eval_images=64,
        batch_sizes=(1, 16),
        shift_batch_size=16,
        convnet_steps=30,
        mlp_steps=30,
    )
    workdir = tmp_path_factory.mktemp("shift")
    return config, workdir, shift.run(config, workdir, progress=False)


def test_outputs_and_tables(tiny):
    config, workdir, summary = tiny
    for name in ("shift.png", "results.md", "summary.json", "summary.csv", "config.json"):
        assert (workdir / name).exists(), name
    text = (workdir / "results.md").read_text()
    assert "## mnist, convnet" in text and "## mnist, mlp" in text
    assert "| tent |" in text and "| robust |" in text and "| prior16 |" in text
    assert json.loads((workdir / "summary.json").read_text())["corruptions"] == ["stripe", "scale"]
    streams = ["b1", "b16", "sorted", "dirichlet"]
    assert summary["streams"] == streams
    assert len(summary["cells"]) == 2 * 5 * 4 * 2  # models x methods x streams x corruptions


def test_source_is_per_example_and_the_flax_model_agrees(tiny):
    """The source model classifies each example alone: every stream of the same images
    has the same error; the flax.linen.BatchNorm convnet gives the same numbers."""
    _, _, summary = tiny
    for model in ("convnet", "mlp"):
        for c in ("stripe", "scale"):
            errs = {summary["cells"][f"mnist/{model}/source/{s}/{c}"][0] for s in ("b1", "b16")}
            assert len(errs) == 1, errs
    assert summary["flax_check"] and max(summary["flax_check"].values()) == 0.0


def test_batch_of_one_without_prior_is_undefined(tiny):
    """norm(prior=0) (and TENT) on one example of a dense batch-norm layer (both models
    have one) has no variance: n/a, not a number; a prior or the robust estimate is
    defined."""
    _, _, summary = tiny
    for model in ("mlp", "convnet"):
        for method in ("norm0", "tent"):
            assert np.isnan(summary["cells"][f"mnist/{model}/{method}/b1/stripe"][0])
        for method in ("prior16", "robust", "source"):
            assert np.isfinite(summary["cells"][f"mnist/{model}/{method}/b1/stripe"][0])
    assert "n/a" in shift.results_markdown(summary, tiny[0])


def test_command_line_rejects_bad_names(tmp_path, capsys):
    with pytest.raises(SystemExit, match="corruptions must be a comma-separated subset"):
        shift.main(["--quick", "--workdir", str(tmp_path), "--config.corruptions=blur"])
