"""Tests of Experiment 2 (bnjax.experiments.lr_tolerance): config, summary, CLI end to end."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from bnjax.experiments import lr_tolerance as lt


def _data_available() -> bool:
    try:
        from bnjax.experiments.data import load_dataset

        load_dataset("fashion-mnist")
    except Exception:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _data_available(), reason="Fashion-MNIST not found: set BNJAX_DATA_DIR"
)


def test_config_variants_and_learning_rates():
    c = lt.get_config()
    # the defaults are the first session's eight variants (their results stay reproducible)
    first = ["no_bn", "no_bn_x5", "bn", "bn_x5", "bn_x10", "bn_x30", "sigmoid", "bn_x5_sigmoid"]
    assert lt.variant_names(c) == first == list(lt.ORIGINAL)
    built = lt.build(c)
    assert set(built) == set(first)
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


def test_line_style_pairs_each_sec421_variant_with_its_original():
    styles = {n: lt.line_style(n) for n in lt.VARIANTS}
    for n in lt.ORIGINAL:
        assert styles[n][0] is not None, n
        if f"{n}_421" in styles:  # same color as the original, another line style
            assert styles[f"{n}_421"][0] == styles[n][0]
            assert styles[f"{n}_421"][1] != styles[n][1]
    assert styles["bn_x30_421_warmup"][1] not in (styles["bn_x30"][1], styles["bn_x30_421"][1])


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

    from bnjax.experiments.models import ConvNet

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


# --------------------------------------------------------------------------- Sec. 4.2.1 options


def _sgd_config(**fields):
    """The default config with plain SGD: an update is exactly ``-lr(t) * gradient``."""
    return lt._common.updated(lt.get_config(), optimizer="sgd", **fields)


def _lr_seen(tx, steps):
    """The rate ``tx`` applies at each step: ``-update`` for a unit gradient."""
    import jax.numpy as jnp

    p = {"w": jnp.zeros(())}
    opt = tx.init(p)
    out = []
    for _ in range(steps):
        u, opt = tx.update({"w": jnp.ones(())}, opt, p)
        out.append(-float(u["w"]))
    return out


def test_schedules_closed_form_and_used_by_the_optimizer():
    c = _sgd_config()
    steps = [0, 1, 2, 3, 5, 14, 15, 16, 29, 30, 100, 301]
    base = lt.schedule(c, "bn_421")
    fast = lt.schedule(c, "bn_x30_421")
    for t in steps:  # Inception-style staircase: lr * 0.96 ** floor(t / 15), 6x: t / 2.5
        assert float(base(t)) == pytest.approx(0.05 * 0.96 ** math.floor(t / 15), rel=1e-5)
        assert float(fast(t)) == pytest.approx(1.5 * 0.96 ** math.floor(t / 2.5), rel=1e-5)
    warm = lt.schedule(c, "bn_x30_421_warmup")  # linear 0 -> 1.5 over 50 steps, then the decay
    for t in (0, 10, 25, 49):
        assert float(warm(t)) == pytest.approx(1.5 * t / 50, abs=1e-6)
    for t in (50, 52, 53, 100):
        assert float(warm(t)) == pytest.approx(1.5 * 0.96 ** math.floor((t - 50) / 2.5), rel=1e-5)
    # the optimizer applies the schedule: SGD steps with a unit gradient move by lr(t)
    seen = _lr_seen(lt.make_optimizer(c, "bn_x10_421"), 8)
    assert seen == pytest.approx([0.5 * 0.96 ** math.floor(t / 2.5) for t in range(8)], rel=1e-5)
    assert _lr_seen(lt.make_optimizer(c, "bn_x10"), 3) == pytest.approx([0.5] * 3)
    assert lt.schedule(c, "bn_x30") == pytest.approx(1.5)  # the originals: a constant float
    assert lt.settings_text(c, "bn_x30") == "constant rate"
    assert "every 2.5 steps (6x faster), L2 0.0001" in lt.settings_text(c, "bn_x30_421")


def test_schedule_and_variant_validation():
    c = _sgd_config(lr_decay_steps=0.0)
    with pytest.raises(ValueError, match="lr_decay_steps"):
        lt.schedule(c, "bn_421")
    with pytest.raises(ValueError, match="lr_decay_rate"):
        lt.schedule(_sgd_config(lr_decay_rate=1.5), "bn_421")
    lt.schedule(c, "bn")  # a constant-rate variant does not use the decay fields
    bad = lt.Variant("bad", True, "base", 1.0, schedule="cosine")
    lt.VARIANTS["_bad"] = bad
    try:
        with pytest.raises(ValueError, match="schedule must be one of"):
            lt.schedule(c, "_bad")
    finally:
        del lt.VARIANTS["_bad"]
    groups = {n: v.group for n, v in lt.VARIANTS.items()}
    assert groups["bn_x30"] == "original" and groups["bn_x30_421"] == "sec421"
    assert groups["bn_x30_421_warmup"] == groups["bn_x30_421_clip"] == "beyond"
    # the paper's assignment: base-rate nets get the base decay and L2, accelerated ones 6x, 1/5
    for n, v in lt.VARIANTS.items():
        if v.group == "sec421":
            fast = v.lr_mult > 1
            assert v.schedule == ("inception_6x" if fast else "inception"), n
            assert v.weight_decay == (0.2 if fast else 1.0), n


def test_weight_decay_is_l2_on_the_kernels_only():
    """add_decayed_weights == SGD(+momentum) on loss + wd/2 ||kernels||^2; BN/bias untouched."""
    import jax
    import jax.numpy as jnp
    import optax

    c = lt._common.updated(lt.get_config(), weight_decay=0.01)  # momentum 0.9 (the default)
    params = {
        "conv_0": {"kernel": jnp.full((3, 3, 1, 2), 0.5)},
        "bn_0": {"scale": jnp.ones(2), "bias": jnp.full(2, 0.3)},
        "head": {"kernel": jnp.full((2, 10), -1.0), "bias": jnp.full(10, 0.2)},
    }

    def loss(p):  # any differentiable loss of every parameter
        return sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(p))

    def l2(p):
        return loss(p) + 0.5 * 0.2 * 0.01 * sum(
            jnp.sum(p[m]["kernel"] ** 2) for m in ("conv_0", "head")
        )

    for name, wd_loss in (("bn_x30_421", l2), ("bn_x30", loss)):
        tx = lt.make_optimizer(c, name)
        ref_tx = optax.sgd(lt.schedule(c, name), momentum=0.9)  # the same schedule, plain SGD
        p, q = params, params
        s, r = tx.init(p), ref_tx.init(q)
        for _ in range(3):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
            v, r = ref_tx.update(jax.grad(wd_loss)(q), r, q)
            q = optax.apply_updates(q, v)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the decay is really there: with a zero gradient only the kernels move
    tx = lt.make_optimizer(lt._common.updated(c, optimizer="sgd"), "bn_421")
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["head"]["kernel"], -0.05 * 0.01 * params["head"]["kernel"])
    assert not np.any(u["bn_0"]["bias"]) and not np.any(u["head"]["bias"])


def test_side_by_side_table():
    c = lt.sec421_config()
    names = lt.variant_names(c)
    assert {"bn_x30", "bn_x30_421", "no_bn_421", "bn_x30_421_warmup"} <= set(names)
    with c.unlocked():
        c.variants = "no_bn,bn_x30,bn_x30_421,bn_x30_421_warmup"
    history = []
    for step, acc in ((100, 0.7), (200, 0.8)):
        history.append(_record("no_bn", step, (acc, acc), (0.5, 0.5)))
        history.append(_record("bn_x30", step, (0.1, 0.1), (2.3, 2.3)))
        history.append(_record("bn_x30_421", step, (acc + 0.05, acc + 0.05), (0.4, 0.4)))
        history.append(_record("bn_x30_421_warmup", step, (acc, acc), (0.4, 0.4)))
    md = lt.results_markdown(lt.summarize(history, c), c, None)
    assert "## Constant rate vs the paper's Sec. 4.2.1 changes" in md
    row = next(line for line in md.splitlines() if line.startswith("| BN-x30 | 1.5 | - |"))
    assert "chance level" in row and "every 2.5 steps (6x faster)" in row
    assert row.endswith("| 200 | 85.00% | 85.00% |")
    assert "| BN-x30, Sec. 4.2.1 + warm-up (not in the paper) | 1.5 | " in md
    # without *_421 variants the table is the first session's
    with c.unlocked():
        c.variants = "no_bn,bn_x30"
    assert "side by side" not in lt.results_markdown(lt.summarize(history, c), c, None)
