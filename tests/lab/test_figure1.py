"""Tests for Experiment 1 (bnjax.experiments.figure1): a short real-MNIST run end to end,
the command line, and the summary statistics against NumPy on synthetic histories."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from bnjax.experiments import _common, figure1


def test_column_percentiles_match_numpy_under_jit_and_vmap():
    import jax

    rng = np.random.default_rng(0)
    v = np.asarray(rng.standard_normal((3, 501, 7)), np.float32)
    q = (15.0, 50.0, 85.0)
    got = jax.jit(jax.vmap(lambda a: figure1.column_percentiles(a, q)))(v)
    assert got.shape == (3, 3, 7)
    ref = np.moveaxis(np.percentile(v.astype(np.float64), q, axis=1), 0, 1)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)


def test_short_run_learns_and_writes_outputs(tmp_path, data_dir):
    """300 steps x 2 seeds x 2 nets on real MNIST through the public ``run`` (one test, so
    ``pytest -n`` runs it once)."""
    cfg = figure1.get_config()
    cfg.num_steps = 300
    cfg.num_seeds = 2
    cfg.eval_every = 100
    cfg.checkpoint_every = 300
    cfg.population_batches = 20
    cfg.precise_bn_batches = 10
    out = figure1.run(cfg, tmp_path, data_dir=str(data_dir), progress=False)

    s = out["summary"]
    for net in figure1.NETS:
        acc = np.asarray(s[net]["final_accuracy"])
        assert acc.shape == (2,)
        assert np.all(acc > 0.5), (net, acc)  # chance is 0.1
        assert s[net]["final_step"] == 300
    # The paper's claim at the start of training: BN is ahead (here 0.857 vs 0.807).
    bn, no_bn = (np.mean(s[n]["final_accuracy"]) for n in ("bn", "no_bn"))
    assert bn > no_bn + 0.02, (bn, no_bn)
    pop = out["population"]
    assert set(pop) == {"ema", "average", "precise_bn"}
    for p in pop.values():
        assert all(a > 0.8 for a in p["accuracy"])
    # Recalibrated statistics give different numbers from the EMA ones.
    assert pop["average"]["loss_mean"] != pop["ema"]["loss_mean"]

    names = {p.name for p in tmp_path.iterdir()}
    assert {"figure1.png", "metrics.json", "metrics.csv", "results.md", "config.json"} <= names
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["num_steps"] == 300
    assert len(metrics["history"]) == 2 * 3  # 2 nets x 3 evaluations
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2  # nets x evaluations x seeds
    bn_rows = [r for r in rows if r["net"] == "bn"]
    assert all(r["bn_in_p15"] and r["act_in_p85"] for r in bn_rows)
    for r in rows:  # percentiles are ordered
        assert float(r["act_in_p15"]) <= float(r["act_in_p50"]) <= float(r["act_in_p85"])
    # The CSV holds the same numbers as the history.
    last = [h for h in metrics["history"] if h["run"] == "bn"][-1]
    csv_last = [r for r in bn_rows if int(r["step"]) == 300]
    np.testing.assert_allclose([float(r["accuracy"]) for r in csv_last], last["accuracy"])
    img = matplotlib.image.imread(tmp_path / "figure1.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 800
    md = (tmp_path / "results.md").read_text()
    assert "With BN" in md and "Without BN" in md and "PreciseBN" in md
    assert f"{s['bn']['final_accuracy_mean']:.4f}" in md


@pytest.mark.parametrize("experiment", ["figure1", "lr_tolerance"])
def test_resume_refuses_a_changed_config_or_an_existing_run(experiment, tmp_path):
    """Both experiments share ``_common.prepare_workdir``: the guards act before any
    training (not after it, when orbax refuses to overwrite the old checkpoint)."""
    import importlib

    import jax.numpy as jnp

    from bnjax import training

    mod = importlib.import_module(f"bnjax.experiments.{experiment}")
    cfg = mod.quick_config()
    _common.write_json(tmp_path / "config.json", cfg.to_dict())
    changed = mod.quick_config()
    changed.learning_rate = 0.1
    with pytest.raises(ValueError, match="learning_rate"):
        mod.run(changed, tmp_path, resume=True, progress=False)
    training.save_checkpoint(tmp_path / "checkpoints", 1, {"a": jnp.zeros(2)})
    with pytest.raises(FileExistsError, match="--resume"):
        mod.run(cfg, tmp_path, resume=False, progress=False)


# --------------------------------------------------------------------------- CLI


def test_help_lists_every_option_and_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        figure1.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--workdir", "--data-dir", "--resume", "--quick", "--config", "--progress"):
        assert flag in text
    for field in figure1.get_config():
        assert f"  {field} = " in text
        assert field in figure1.CONFIG_HELP


def test_command_line_overrides_and_quick():
    cl = _common.parse_command_line(
        ["--quick", "--config.num_steps=123", "--out=/tmp/x", "--data-dir=/d", "--noprogress"],
        prog="p",
        doc="d",
        default_config=figure1.__file__,
        config_help=figure1.CONFIG_HELP,
        default_workdir="runs/x",
        quick=figure1.quick_config,
    )
    quick = figure1.quick_config()
    assert cl.config.num_steps == 123  # an explicit override beats --quick
    assert cl.config.num_seeds == quick.num_seeds != figure1.get_config().num_seeds
    assert str(cl.workdir) == "/tmp/x" and cl.data_dir == "/d" and not cl.progress
    with pytest.raises(SystemExit, match="Try --help"):
        _common.parse_command_line(
            ["--config.no_such_field=1"],
            prog="p",
            doc="d",
            default_config=figure1.__file__,
            config_help={},
            default_workdir="w",
        )


@pytest.mark.parametrize(
    "name,lr,std", [("figure1", 1.0, 1.0), ("figure1_lr05", 0.5, 0.1), ("figure1_quick", 1.0, 1.0)]
)
def test_config_files_load(name, lr, std):
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.py"
    cl = _common.parse_command_line(
        ["--config", str(path)],
        prog="p",
        doc="d",
        default_config=figure1.__file__,
        config_help={},
        default_workdir="w",
    )
    assert cl.config.learning_rate == lr and cl.config.init_std == std
    assert set(cl.config) == set(figure1.get_config())


# --------------------------------------------------------------------------- summary


def _history(acc_no_bn, acc_bn, pct, steps):
    hist = []
    for i, s in enumerate(steps):
        for net, acc in (("no_bn", acc_no_bn), ("bn", acc_bn)):
            rec = {"run": net, "step": int(s), "accuracy": acc[i].tolist()}
            for key in ("act_in", "bn_in") if net == "bn" else ("act_in",):
                rec[f"{key}_pct"] = pct[i, :, 0].tolist()
                rec[f"{key}_pct_units"] = pct[i].tolist()
            hist.append(rec)
    return hist


def test_summarize_against_numpy():
    rng = np.random.default_rng(0)
    cfg = figure1.get_config()
    steps = np.arange(1, 21) * 500
    base = np.linspace(0.9, 0.99, 20)[:, None] + rng.normal(0, 0.003, (20, 3))
    pct = np.sort(rng.normal(0, 1, (20, 3, 4, 3)), axis=-1)  # (steps, seeds, units, q)
    s = figure1.summarize(_history(base - 0.01, base, pct, steps), cfg)
    for net, acc in (("no_bn", base - 0.01), ("bn", base)):
        assert s[net]["final_accuracy_mean"] == pytest.approx(acc[-1].mean())
        assert s[net]["final_accuracy_std"] == pytest.approx(acc[-1].std(ddof=1))
        assert s[net]["max_accuracy_mean"] == pytest.approx(acc.max(0).mean())
        assert s[net]["accuracy_at"][10_000] == pytest.approx(acc[steps == 10_000].mean())
        for thr in cfg.thresholds:
            hit = np.nonzero(acc.mean(1) >= thr)[0]
            want = int(steps[hit[0]]) if hit.size else None
            assert s[net]["steps_to"][f"{thr:g}"]["mean_curve"] == want
        d = s[net]["act_in_drift"]["p50"]
        v = pct[..., 1].reshape(20, 12)  # every (seed, unit)
        width = (pct[..., 2] - pct[..., 0]).reshape(20, 12).mean(0)
        assert d["range"] == pytest.approx((v.max(0) - v.min(0)).mean())
        assert d["std"] == pytest.approx(v.std(0).mean())
        assert d["drift"] == pytest.approx(np.abs(v[-1] - v[0]).mean())
        assert d["range_rel"] == pytest.approx(((v.max(0) - v.min(0)) / width).mean())
    assert "bn_in_drift" in s["bn"] and "bn_in_drift" not in s["no_bn"]
    assert s["bn_ahead_every_step"] and s["bn_ahead_fraction"] == 1.0


# --------------------------------------------------------------------------- plot


def _forbid(*args, **kwargs):
    raise AssertionError("plotting must not select a matplotlib backend")


def test_plot_leaves_matplotlib_global_state_alone(tmp_path, monkeypatch):
    """``plot`` draws on a pyplot-free ``Figure``: a notebook's backend and figures stay as
    they are (no ``matplotlib.use``, no pyplot import), and the PNG is still written."""
    import matplotlib

    monkeypatch.setattr(matplotlib, "use", _forbid)
    backend = matplotlib.rcParams._get("backend")  # _get: reading "backend" may resolve it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    rng = np.random.default_rng(0)
    steps = np.arange(1, 6) * 100
    acc = np.linspace(0.8, 0.95, 5)[:, None] + rng.normal(0, 0.003, (5, 3))
    pct = np.sort(rng.normal(0, 1, (5, 3, 4, 3)), axis=-1)  # (steps, seeds, units, q)
    path = tmp_path / "figure1.png"
    figure1.plot(_history(acc - 0.01, acc, pct, steps), figure1.get_config(), path)
    assert matplotlib.image.imread(path).shape == (504, 2160, 4)  # figsize (18, 4.2) x 120 dpi
    assert matplotlib.rcParams._get("backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
