"""Tests for Experiment 3 (bnjax.experiments.small_batch) and the pieces it adds to
bnjax.training: the class-grouped (non-i.i.d.) data order, train-mode evaluation with batch
statistics, micro-batching as ``virtual_batch_size``; a short real-MNIST run end to end and
the command line."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest

from bnjax import training as T
from bnjax.experiments import _common, small_batch
from bnjax.experiments.models import MLP
from bnjax.training._rng import data_key

# --------------------------------------------------------------------------- data order


def _labels(rng, counts):
    y = np.repeat(np.arange(len(counts)), counts)
    return rng.permutation(y).astype(np.int32)


@pytest.mark.parametrize("k,bs", [(1, 12), (2, 12), (3, 12), (4, 8)])
def test_class_grouped_batches_hold_k_classes_and_cover_each_epoch(rng, k, bs):
    counts = [61, 48, 55, 70, 39, 52, 66, 44]  # unequal classes, remainders per class
    y = _labels(rng, counts)
    f = T.class_grouped_batch_indices(y, k)
    chunk = bs // k
    spe = f.steps_per_epoch(bs)
    assert spe == sum(c // chunk for c in counts) // k
    idx = np.asarray(
        jax.jit(f, static_argnums=(2, 3, 4))(jax.random.PRNGKey(3), 0, 3 * spe, y.size, bs)
    )
    assert idx.shape == (3 * spe, bs)
    for b in idx:
        classes, per = np.unique(y[b], return_counts=True)
        assert classes.size == k and np.all(per == chunk), (b, y[b])
    epochs = idx.reshape(3, spe * bs)
    for e in epochs:
        assert np.unique(e).size == e.size  # no example twice in an epoch
        # dropped: < chunk per class (remainders) plus < k chunks (the last partial batch)
        assert e.size > y.size - len(counts) * (chunk - 1) - k * chunk
        assert e.size == spe * bs
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order every epoch
    # The batches of an epoch come in a random order, not class block after class block.
    groups = [tuple(sorted(set(y[b]))) for b in idx[:spe]]
    changes = sum(a != b for a, b in zip(groups[:-1], groups[1:], strict=True))
    assert changes > 2 * len(counts), groups
    # The class partners change between epochs (k >= 2): not always the same pairs.
    if k >= 2:
        pairs = [{tuple(sorted(set(y[b]))) for b in idx[e * spe : (e + 1) * spe]} for e in range(3)]
        assert pairs[0] != pairs[1] or pairs[1] != pairs[2]
        # ... and within an epoch: the k classes are drawn per batch, not fixed partners
        # (pairing class blocks at a fixed offset gave <= 8 distinct groups here, 20-39 now).
        assert all(len(p) > 2 * len(counts) for p in pairs), [len(p) for p in pairs]
    # A function of (key, step) only: a later start sees the same batches (resume).
    part = np.asarray(f(jax.random.PRNGKey(3), spe - 2, 5, y.size, bs))
    np.testing.assert_array_equal(part, idx[spe - 2 : spe + 3])


def test_class_grouped_under_vmap_draws_one_order_per_key(rng):
    y = _labels(rng, [30] * 5)
    f = T.class_grouped_batch_indices(y, 2)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(3))
    both = np.asarray(jax.vmap(lambda k: f(k, 0, 7, y.size, 10))(keys))
    for j in range(3):
        np.testing.assert_array_equal(both[j], np.asarray(f(keys[j], 0, 7, y.size, 10)))
    assert not np.array_equal(both[0], both[1])


def test_class_grouped_rejects_bad_arguments(rng):
    y = _labels(rng, [30] * 4)
    key = jax.random.PRNGKey(0)
    with pytest.raises(
        ValueError, match="classes_per_batch=3 must be >= 1 and divide batch_size=8"
    ):
        T.class_grouped_batch_indices(y, 3)(key, 0, 2, y.size, 8)
    with pytest.raises(ValueError, match="exceeds the 4 classes"):
        T.class_grouped_batch_indices(y, 5)(key, 0, 2, y.size, 10)
    with pytest.raises(ValueError, match="built for 120 labels, but the data has 100"):
        T.class_grouped_batch_indices(y, 2)(key, 0, 2, 100, 8)
    big = _labels(rng, [90, 10, 10, 10])  # one class holds 3/4 of the data: no 2-class epoch
    with pytest.raises(ValueError, match="more than 1/classes_per_batch"):
        T.class_grouped_batch_indices(big, 2)(key, 0, 2, big.size, 10)
    with pytest.raises(ValueError, match="1-D integer"):
        T.class_grouped_batch_indices(y.astype(np.float32), 2)


def test_make_train_loop_uses_the_given_order(rng):
    """With ``batch_indices`` the loop trains on exactly those batches (a model whose update
    depends on the batch: the BN population mean after one step with momentum 0)."""
    y = _labels(rng, [20] * 5)
    x = jnp.asarray(rng.normal(size=(y.size, 3)).astype(np.float32) + y[:, None])
    model = MLP(hidden=(3,), act="identity", bn=(("momentum", 0.0),))
    tx = optax.sgd(0.0)
    order = T.class_grouped_batch_indices(y, 1)
    states = T.create_train_states(model, tx, [0], x[:1])
    loop = T.make_train_loop(model, tx, batch_size=10, batch_indices=order)
    new, _ = loop(states, x, jnp.asarray(y), num_steps=1)
    key = data_key(jax.random.PRNGKey(0))
    batch = np.asarray(order(key, 0, 1, y.size, 10))[0]
    assert np.unique(y[batch]).size == 1
    kernel = np.asarray(states.params["dense_0"]["kernel"][0], np.float64)
    want = (np.asarray(x, np.float64)[batch] @ kernel).mean(0)
    np.testing.assert_allclose(new.batch_stats["bn_0"]["mean"][0], want, rtol=1e-5, atol=1e-6)


def test_real_mnist_test_batches_by_setting(data_dir):
    (_, _), (_, ty) = _common.load_data("mnist", str(data_dir))
    for name, s in small_batch.SETTINGS.items():
        b = small_batch.test_batches(ty, s, 32, seed=0)
        assert b.shape[1] == 32 and np.unique(b).size == b.size
        assert b.size >= 0.96 * ty.size, (name, b.size)
        if s.classes_per_batch:
            assert all(np.unique(ty[r]).size == s.classes_per_batch for r in b)
        else:  # i.i.d.: most batches hold many classes
            assert np.median([np.unique(ty[r]).size for r in b]) >= 8


# --------------------------------------------------------------------------- micro-batches


def test_micro_batches_are_virtual_batch_size(rng):
    """The micro4 network in training mode equals the plain BN network applied to each
    4-example slice as its own batch: statistics over micro-batches of 4 inside 32."""
    cfg = small_batch.quick_config()
    nets = small_batch.build(
        _common.updated(cfg, settings="micro4", methods="bn"), np.arange(10).repeat(4)
    )
    model = nets["bn/micro4"][0]
    assert ("virtual_batch_size", 4) in model.bn
    plain = model.clone(bn=tuple(kv for kv in model.bn if kv[0] != "virtual_batch_size"))
    x = jnp.asarray(rng.normal(size=(32, 784)).astype(np.float32))
    v = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    y, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    parts = [
        plain.apply(v, x[i : i + 4], train=True, mutable=["batch_stats"])[0]
        for i in range(0, 32, 4)
    ]
    np.testing.assert_allclose(y, jnp.concatenate(parts), rtol=1e-4, atol=1e-5)
    whole = plain.apply(v, x, train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(y, whole, atol=1e-3)  # and it is not whole-batch BN
    # The population statistics still see the whole mini-batch (as with plain BN).
    mean0 = upd["batch_stats"]["bn_0"]["mean"]
    want = 0.01 * (
        np.asarray(x, np.float64) @ np.asarray(v["params"]["dense_0"]["kernel"], np.float64)
    ).mean(0)
    np.testing.assert_allclose(mean0, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- train mode


def _numpy_forward(v, x, chunk, eps):
    """A 784-h-10 BN MLP (relu) in float64 NumPy, BN with the statistics of each chunk."""
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    out = []
    for i in range(0, x.shape[0], chunk):
        h = x[i : i + chunk] @ p["dense_0"]["kernel"]
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + eps) * p["bn_0"]["scale"] + p["bn_0"]["bias"]
        out.append(np.maximum(h, 0) @ p["head"]["kernel"] + p["head"]["bias"])
    return np.concatenate(out)


def test_train_mode_evaluation_uses_batch_statistics(rng):
    """``make_eval_step(batch_statistics=True)`` (the experiment's train-mode accuracy) equals a
    float64 NumPy forward pass with each chunk's own statistics, ignores broken population
    statistics (which ruin the eval-mode accuracy), depends on the grouping, and leaves the
    state unchanged."""
    model = MLP(hidden=(16,), act="relu", init_std=0.3)
    x = rng.normal(size=(64, 784)).astype(np.float32) * 0.5 + 0.2
    v = model.init(jax.random.PRNGKey(1), jnp.asarray(x[:1]), train=False)
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 50.0, v["batch_stats"])}
    logits = _numpy_forward(v, x.astype(np.float64), 8, 1e-5)
    y = np.argmax(logits, 1).astype(np.int32)
    y[::4] = (y[::4] + 1) % 10  # 3/4 right
    state = T.state_from_variables(v, optax.sgd(0.1), jax.random.PRNGKey(0))
    states = jax.tree.map(lambda a: a[None], state)
    train_mode = T.make_eval_step(model, batch_size=8, batch_statistics=True)(states, x, y)
    assert float(train_mode["accuracy"][0]) == pytest.approx(0.75)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref_loss = np.mean(lse - logits[np.arange(64), y])
    np.testing.assert_allclose(float(train_mode["loss"][0]), ref_loss, rtol=1e-4)
    eval_mode = T.make_eval_step(model)(states, x, y)
    assert float(eval_mode["accuracy"][0]) < 0.5  # the broken population statistics
    # Chunks of 16 instead of 8: other statistics, other outputs.
    other = T.make_eval_step(model, batch_size=16, batch_statistics=True)(states, x, y)
    assert float(other["loss"][0]) != pytest.approx(float(train_mode["loss"][0]), rel=1e-3)
    with pytest.raises(ValueError, match="must divide the number of examples 64"):
        T.make_eval_step(model, batch_size=24, batch_statistics=True)(states, x, y)


# --------------------------------------------------------------------------- config, CLI


def _methods() -> list[str]:
    """Every method (Batch Renorm included)."""
    return list(small_batch.METHODS)


def test_trained_runs_share_the_no_norm_net_per_data_order():
    cfg = small_batch.get_config()
    cfg.methods = "none,bn,bn_precise"
    runs = small_batch._trained(cfg)
    assert set(runs) == {
        "none/iid", "none/classes2", "none/classes1",
        "bn/iid", "bn/micro4", "bn/micro2", "bn/classes2", "bn/classes1",
    }  # fmt: skip
    assert small_batch._source_run(cfg, "micro2", "none") == "none/iid"
    assert small_batch._source_run(cfg, "classes1", "bn_precise") == "bn/classes1"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("settings", "iid,nope", "config.settings='iid,nope': unknown or empty \\['nope'\\]"),
        ("methods", "", "config.methods='': unknown or empty"),
        ("batch_size", 30, "setting 'micro4': micro-batch 4 needs batch_size=30"),
        ("renorm_schedule", (0.5, 0.2, 0.9), "renorm_schedule"),
    ],
)
def test_bad_config_is_a_one_line_cli_error(tmp_path, field, value, message):
    args = [f"--workdir={tmp_path / 'w'}", "--noprogress", "--quick"]
    if field == "renorm_schedule":
        args += ["--config.renorm_schedule=(0.5, 0.2, 0.9)"]
    else:
        args.append(f"--config.{field}={value}")
        if field != "methods":
            args.append(f"--config.methods={','.join(_methods())}")
    with pytest.raises(SystemExit) as e:
        small_batch.main(args)
    text = str(e.value.code)
    assert text.startswith("bnjax-small-batch: ") and "\n" not in text
    import re

    assert re.search(message, text), text
    assert not (tmp_path / "w").exists()  # nothing written before the check


def test_missing_data_is_a_one_line_cli_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BNJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        small_batch.main(
            [
                "--quick",
                "--noprogress",
                f"--config.methods={','.join(_methods())}",
                f"--workdir={tmp_path / 'w'}",
                f"--data-dir={tmp_path}",
            ]
        )
    text = str(e.value.code)  # the message of bnjax.experiments.data.DataError, no traceback
    assert text.startswith("bnjax-small-batch: ") and "mnist" in text
    assert "Traceback" not in text and not (tmp_path / "w" / "checkpoints").exists()


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        small_batch.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for field in small_batch.get_config():
        assert f"  {field} = " in text and field in small_batch.CONFIG_HELP


# --------------------------------------------------------------------------- end to end


def test_quick_run_writes_the_outputs(tmp_path, data_dir):
    """The quick pipeline on real MNIST (settings iid and micro2 to keep CI short, every
    available method; the notebook's CI run covers a k-class setting): outputs written, the
    table's numbers are the summary's, and the micro-batch-of-2 BN net's train-mode accuracy
    differs from its eval-mode one."""
    cfg = small_batch.quick_config()
    cfg.settings = "iid,micro2"
    cfg.methods = ",".join(_methods())
    out = small_batch.run(cfg, tmp_path, data_dir=str(data_dir), progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    want = {"small_batch.png", "results.md", "summary.json", "summary.csv", "metrics.json"}
    assert want <= names
    s = json.loads((tmp_path / "summary.json").read_text())
    settings, methods = small_batch.selected(cfg)
    assert list(s["settings"]) == settings
    for row in s["settings"].values():
        assert list(row) == methods
        for c in row.values():
            assert len(c["eval_accuracy"]) == len(c["train_mode_accuracy"]) == cfg.num_seeds
    iid = s["settings"]["iid"]
    assert np.mean(iid["bn"]["eval_accuracy"]) > 0.8 and np.mean(iid["none"]["eval_accuracy"]) > 0.7
    # no normalization: train mode and eval mode are the same function (on almost the same set)
    np.testing.assert_allclose(
        iid["none"]["eval_accuracy"], iid["none"]["train_mode_accuracy"], atol=0.01
    )
    m2 = s["settings"]["micro2"]["bn"]
    assert m2["eval_accuracy"] != m2["train_mode_accuracy"]
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(settings) * len(methods) * cfg.num_seeds
    md = (tmp_path / "results.md").read_text()
    c = iid["bn"]
    assert f"{c['eval_accuracy_mean']:.4f} ± {c['eval_accuracy_std']:.4f}" in md
    img = matplotlib.image.imread(tmp_path / "small_batch.png")
    assert img.ndim == 3 and img.shape[1] > 1000
    assert out["summary"]["settings"]["iid"]["bn"]["eval_accuracy"] == c["eval_accuracy"]
    assert "renorm" in methods  # Batch Renorm's step counter ran with the training steps
    steps = out["states"]["renorm/iid"].batch_stats["bn_0"]["steps"]
    np.testing.assert_array_equal(steps, cfg.num_steps)
    # Batch Renorm after the ramp, i.i.d. batches of 32: r and d within their bounds, so its
    # training-mode output is its inference output (the same accuracy on almost the same set).
    np.testing.assert_allclose(
        iid["renorm"]["eval_accuracy"], iid["renorm"]["train_mode_accuracy"], atol=0.01
    )


def test_renorm_schedule_is_the_papers_scaled_to_the_run():
    """5k / 25k / 40k steps of the paper as fractions 0.05 / 0.25 / 0.40 of num_steps: plain BN
    (r_max 1, d_max 0) during the warm-up, d_max 5 and r_max 3 at the ends of the ramps."""
    cfg = small_batch.get_config()
    b = small_batch.renorm_bounds(cfg)
    n = cfg.num_steps
    assert b["warmup_steps"] == round(0.05 * n)
    assert b["steps"] == {"warmup": 300, "d_max_end": 1500, "r_max_end": 2400}
    r, d = b["r_max"], b["d_max"]
    for step, want_r, want_d in [
        (0, 1, 0),
        (300, 1, 0),
        (1500, 1 + 2 * 1200 / 2100, 5),
        (2400, 3, 5),
        (n, 3, 5),
    ]:
        assert float(r(step)) == pytest.approx(want_r) and float(d(step)) == pytest.approx(want_d)
    nets = small_batch.build(
        _common.updated(cfg, settings="micro4", methods="renorm"), np.arange(4)
    )
    model = nets["renorm/micro4"][0]
    import bnjax.linen

    assert model.norm is bnjax.linen.BatchRenorm
    kw = dict(model.bn)
    assert kw["virtual_batch_size"] == 4 and kw["momentum"] == cfg.renorm_momentum
    assert kw["warmup_steps"] == 300 and kw["r_max"] is not None
