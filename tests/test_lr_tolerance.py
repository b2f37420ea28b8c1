"""Tests of Experiment 2 (bnjax.experiments.lr_tolerance): config, summary, CLI end to end."""

from __future__ import annotations

import json
import math
import sys

import pytest

from bnjax.experiments import lr_tolerance as lt


def _data_available() -> bool:
    try:
        from bnjax.data import load_dataset

        load_dataset("fashion-mnist")
    except Exception:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _data_available(), reason="Fashion-MNIST not found: set BNJAX_DATA_DIR"
)


def test_config_variants_and_learning_rates():
    c = lt.get_config()
    assert lt.variant_names(c) == list(lt.VARIANTS)
    built = lt.build(c)
    assert set(built) == set(lt.VARIANTS)
    assert lt.learning_rate(c, "bn_x5") == pytest.approx(5 * c.learning_rate)
    assert lt.learning_rate(c, "bn_x30") == pytest.approx(30 * c.learning_rate)
    assert built["bn_x5_sigmoid"][0].act == "sigmoid" and built["bn_x5_sigmoid"][0].use_bn
    assert built["no_bn"][0].act == c.activation and not built["no_bn"][0].use_bn
    with c.unlocked():
        c.variants = "bn_x5"
    assert lt.variant_names(c) == ["no_bn", "bn_x5"]  # the reference is always trained
    with c.unlocked():
        c.variants = "bn_x7"
    with pytest.raises(ValueError, match="unknown variants"):
        lt.variant_names(c)
    q = lt.quick_config()
    assert q.num_steps < lt.get_config().num_steps and q.variants == lt.get_config().variants


def _record(run, step, acc, loss):
    return {
        "run": run,
        "step": step,
        "accuracy": list(acc),
        "loss": [0.5] * len(acc),
        "train_loss": list(loss),
        "train_accuracy": [0.5] * len(acc),
    }


def test_summary_steps_to_reference_max_and_divergence():
    c = lt.get_config()
    with c.unlocked():
        c.variants = "no_bn,no_bn_x5,bn_x5"
        c.num_seeds = 2
    nan = float("nan")
    history = []
    for step, ref, fast in ((100, 0.70, 0.80), (200, 0.80, 0.86), (300, 0.85, 0.90)):
        history.append(_record("no_bn", step, (ref - 0.01, ref + 0.01), (1.0, 1.0)))
        history.append(_record("no_bn_x5", step, (0.1, 0.1), (nan, nan)))
        history.append(_record("bn_x5", step, (fast, fast), (0.3, 0.3)))
    s = lt.summarize(history, c)
    assert s["target"] == pytest.approx(0.85)
    v = s["variants"]
    assert v["no_bn"]["steps_to_target"] == 300
    assert v["no_bn"]["steps_to_target_per_seed"] == [None, 300]
    assert v["bn_x5"]["steps_to_target"] == 200 and v["bn_x5"]["speedup"] == pytest.approx(1.5)
    assert v["no_bn_x5"]["steps_to_target"] is None and v["no_bn_x5"]["diverged"] == 2
    md = lt.results_markdown(s, c, 1.0)
    assert "| BN-x5 | 0.25 | 200 (200, 200) | 90.00% |" in md
    assert "diverged (non-finite loss) in 2/2 seeds" in md and "it hurt" in md
    history[-2]["train_loss"] = [2.3, 2.3]  # finite loss, chance accuracy: dead units
    s = lt.summarize(history, c)
    assert s["variants"]["no_bn_x5"]["diverged"] == 0
    assert s["variants"]["no_bn_x5"]["at_chance"] == 2
    assert "chance level" in lt.results_markdown(s, c, None)
    rows = lt.summary_rows(s)
    assert [r["variant"] for r in rows] == ["no_bn", "no_bn_x5", "bn_x5"]


def test_plot_leaves_matplotlib_global_state_alone(tmp_path, monkeypatch):
    """``plot`` writes its PNG without selecting a backend or importing pyplot."""
    import matplotlib
    import matplotlib.image

    def forbid(*args, **kwargs):
        raise AssertionError("plotting must not select a matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", forbid)
    backend = matplotlib.rcParams._get("backend")  # _get: reading "backend" may resolve it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    c = lt.get_config()
    with c.unlocked():
        c.variants = "no_bn,bn_x5"
    history = [
        _record(name, step, (acc, acc + 0.02), (loss, loss))
        for step, acc, loss in ((100, 0.7, 1.0), (200, 0.8, 0.6))
        for name in ("no_bn", "bn_x5")
    ]
    path = tmp_path / "lr_tolerance.png"
    lt.plot(history, lt.summarize(history, c), c, path)
    assert matplotlib.image.imread(path).shape == (550, 1540, 4)  # figsize (14, 5) x 110 dpi
    assert matplotlib.rcParams._get("backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_help_lists_the_config_fields(capsys):
    with pytest.raises(SystemExit) as e:
        lt.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "learning_rate" in out and "--quick" in out and "--workdir" in out


@needs_data
def test_cli_end_to_end_tiny(tmp_path):
    """The CLI (--quick plus overrides) on a tiny net: every output file, consistent numbers."""
    work = tmp_path / "run"
    lt.main(
        [
            "--quick",
            "--noprogress",
            f"--workdir={work}",
            "--config.variants=bn_x30",
            "--config.reference=bn_x30",  # one net: the shortest pipeline
            "--config.features=(4,)",
            "--config.dense=0",
            "--config.num_steps=30",
            "--config.eval_every=15",
            "--config.num_seeds=2",
        ]
    )
    for f in ("lr_tolerance.png", "results.md", "metrics.json", "metrics.csv", "summary.csv"):
        assert (work / f).stat().st_size > 0, f
    m = json.loads((work / "metrics.json").read_text())
    assert m["config"]["num_steps"] == 30 and m["config"]["num_seeds"] == 2
    assert [r["step"] for r in m["history"] if r["run"] == "bn_x30"] == [15, 30]
    v = m["summary"]["variants"]
    assert set(v) == {"bn_x30"}
    assert v["bn_x30"]["learning_rate"] == pytest.approx(30 * lt.get_config().learning_rate)
    assert all(0.0 <= a <= 1.0 for s in v.values() for a in s["max_accuracy_per_seed"])
    assert math.isfinite(v["bn_x30"]["max_accuracy"])
    assert "| BN-x30 |" in (work / "results.md").read_text()
    rows = (work / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + evaluations x seeds


@pytest.mark.slow
@needs_data
def test_quick_config_all_variants(tmp_path):
    """The --quick smoke test as shipped: every variant, 200 steps (a few minutes on a CPU)."""
    out = lt.run(lt.quick_config(), tmp_path, progress=False)
    assert set(out["summary"]["variants"]) == set(lt.VARIANTS)
    assert out["summary"]["variants"]["bn"]["max_accuracy"] > 0.5


def test_convnet_stride_downsampling_shapes():
    """The experiment's ConvNet(downsample="stride") keeps max-pool's feature-map sizes."""
    import jax
    import jax.numpy as jnp

    from bnjax.models import ConvNet

    x = jax.ShapeDtypeStruct((2, 28, 28), jnp.float32)
    key = jax.random.PRNGKey(0)
    shapes = {}
    for mode in ("max_pool", "stride"):  # shapes only (eval_shape): no FLOPs, no compilation
        net = ConvNet(features=(4, 8), dense=0, downsample=mode)
        v = jax.eval_shape(lambda x, net=net: net.init(key, x, train=False), x)
        out = jax.eval_shape(lambda v, x, net=net: net.apply(v, x, train=False), v, x)
        assert out.shape == (2, 10)
        shapes[mode] = jax.tree.map(lambda a: a.shape, v)
    assert shapes["max_pool"] == shapes["stride"]  # same parameters: the head sees 7x7x8
    with pytest.raises(ValueError, match="downsample"):
        jax.eval_shape(lambda x: ConvNet(downsample="avg").init(key, x, train=False), x)

