"""Tests of bnjax.experiments.dynamics: the per-step layer probe against an independent
float64 NumPy
computation (module outputs captured by flax's ``capture_intermediates``, not the model's
``sow``), and the trace against the training loop it claims to reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import training
from bnjax.experiments import dynamics
from bnjax.experiments.models import ConvNet

LR = 0.3


def _tiny(use_bn=True):
    model = ConvNet(features=(3,), dense=4, use_bn=use_bn, downsample="stride")
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8), jnp.float32) + 0.5
    y = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    return model, variables, x, y


def _reference(model, variables, x, y):
    """Float64 NumPy numbers of the step, from module outputs (capture_intermediates)."""
    _, inter = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    mods = {
        k: np.asarray(v["__call__"][0], np.float64)
        for k, v in inter["intermediates"].items()
        if isinstance(v, dict) and "__call__" in v
    }
    grads = jax.grad(
        lambda p: training.cross_entropy_loss(
            model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0], y
        )
    )(variables["params"])
    return mods, grads


def _feature_stats(a):
    a = a.reshape(-1, a.shape[-1])
    mu = a.mean(0)
    sd = np.sqrt(((a - mu) ** 2).mean(0))
    return np.abs(mu).mean(), sd.mean(), sd.max(), np.all(a <= 0, 0).mean(), (a <= 0).mean()


@pytest.mark.parametrize("use_bn", [True, False])
def test_layer_probe_matches_numpy(use_bn):
    model, variables, x, y = _tiny(use_bn)
    if use_bn:  # make channel 0 of the conv layer dead: beta = -100 (BN output ~ -100 everywhere)
        p = jax.tree.map(lambda a: a, variables["params"])
        p["bn_0"]["bias"] = p["bn_0"]["bias"].at[0].set(-100.0)
        variables = {**variables, "params": p}
    tx = optax.sgd(LR)
    state = training.state_from_variables(variables, tx, jax.random.PRNGKey(0))
    step = training.make_train_step(model, tx, probe=dynamics.layer_probe)
    new, m = step(state, x, y)
    mods, grads = _reference(model, variables, x, y)

    # parameters: norms, gradient norms, update ratios (plain SGD: update = -lr * grad)
    flat_p = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    flat_g = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    for path, w in flat_p:
        key = "/".join(k.key for k in path)
        wn = np.linalg.norm(np.asarray(w, np.float64))
        gn = np.linalg.norm(np.asarray(flat_g[path], np.float64))
        np.testing.assert_allclose(m[f"w_norm/{key}"], wn, rtol=1e-5)
        np.testing.assert_allclose(
            m[f"w_mean/{key}"], np.asarray(w, np.float64).mean(), rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(m[f"g_norm/{key}"], gn, rtol=1e-4, atol=1e-7)
        if wn > 0:
            np.testing.assert_allclose(m[f"update_ratio/{key}"], LR * gn / wn, rtol=1e-4)
        else:
            assert np.isnan(m[f"update_ratio/{key}"])
    # the update really is the one the probe saw: new - old = -lr * grad
    np.testing.assert_allclose(
        new.params["head"]["kernel"] - variables["params"]["head"]["kernel"],
        -LR * grads["head"]["kernel"],
        rtol=1e-5,
        atol=1e-7,
    )

    # layer inputs: BN input = the conv/dense output, activation input = the BN output
    # (no BN: the conv/dense output)
    for i, lin in enumerate(("conv_0", "dense")):
        act = mods[f"bn_{i}"] if use_bn else mods[lin]
        mean_abs, sd, sd_max, dead, nonpos = _feature_stats(act)
        np.testing.assert_allclose(m[f"act_in_{i}/mean_abs"], mean_abs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m[f"act_in_{i}/std"], sd, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m[f"act_in_{i}/std_max"], sd_max, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m[f"act_in_{i}/dead"], dead, atol=1e-7)
        np.testing.assert_allclose(m[f"act_in_{i}/nonpos"], nonpos, atol=1e-7)
        if use_bn:
            mean_abs, sd, sd_max, _, _ = _feature_stats(mods[lin])
            np.testing.assert_allclose(m[f"bn_in_{i}/mean_abs"], mean_abs, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(m[f"bn_in_{i}/std"], sd, rtol=1e-4)
            assert f"bn_in_{i}/dead" not in m  # dead units are measured after BN only
        else:
            assert f"bn_in_{i}/std" not in m
    if use_bn:
        assert float(m["act_in_0/dead"]) == pytest.approx(1 / 3)  # the channel made dead
    logits = mods["head"]
    np.testing.assert_allclose(m["logit_rms"], np.sqrt((logits**2).mean()), rtol=1e-5)
    np.testing.assert_allclose(m["logit_max"], np.abs(logits).max(), rtol=1e-6)
    np.testing.assert_allclose(m["logit_std"], logits.std(-1).mean(), rtol=1e-5)


def test_layer_probe_prefixes_select_what_is_measured():
    x = (jnp.arange(12.0).reshape(3, 4) - 6.0).at[:, 0].set(-1.0)  # column 0 <= 0: dead
    out = dynamics.layer_probe(
        params={},
        grads={},
        updates={},
        logits=jnp.zeros((3, 2)),
        intermediates={"act_in_0": (x,), "other": (x,), "blk": {"pre_1": (x,)}},
        act_prefix="pre",
    )
    assert "blk/pre_1/dead" in out and not any(k.startswith(("act_in_0", "other")) for k in out)
    assert float(out["blk/pre_1/dead"]) == pytest.approx(1 / 4)
    assert float(out["blk/pre_1/nonpos"]) == pytest.approx(8 / 12)


@pytest.mark.parametrize("steps_per_call", [None, 2])
def test_trace_is_the_training_loop(steps_per_call):
    """trace = make_train_loop's steps (same batches and updates) plus per-step records."""
    model = ConvNet(features=(2,), dense=0, use_bn=True, downsample="stride")
    x = jax.random.uniform(jax.random.PRNGKey(2), (40, 8, 8))
    y = jax.random.randint(jax.random.PRNGKey(3), (40,), 0, 10)
    tx = optax.sgd(0.5, momentum=0.9)
    states = training.create_train_states(model, tx, [0, 1], x[:1])
    loop = training.make_train_loop(model, tx, batch_size=8, steps_per_call=steps_per_call)
    ref, mean = loop(states, x, y, num_steps=5)
    out, rec = dynamics.trace(
        model, tx, states, x, y, num_steps=5, batch_size=8, steps_per_call=steps_per_call
    )
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert rec["loss"].shape == (2, 5) and rec["act_in_0/dead"].shape == (2, 5)
    np.testing.assert_allclose(rec["loss"].mean(1), mean["loss"], rtol=1e-6)
    # step 0 is measured at the initial parameters
    w0 = np.linalg.norm(np.asarray(states.params["conv_0"]["kernel"][1], np.float64))
    np.testing.assert_allclose(rec["w_norm/conv_0/kernel"][1, 0], w0, rtol=1e-6)


def test_first_step():
    assert dynamics.first_step([0.1, 0.2, 5.0, 1.0], 1.0) == 2
    assert dynamics.first_step([0.1, float("nan")], 1.0) == 1  # non-finite counts
    assert dynamics.first_step([3.0, 2.0, 0.5], 1.0, above=False) == 2
    assert dynamics.first_step([0.1, 0.2], 1.0) is None
