"""Batch Renormalization (BEYOND.md §1): the functional core against independent references.

:func:`ref_renorm` is §1 written here in float64 NumPy (outputs, ``r``, ``d``, the
state update) with the closed-form gradient of §1 (``r``, ``d`` constants:
batch norm's backward with ``gamma -> gamma r``, ``dgamma = sum(dy (r xhat + d))``,
``dbeta = sum(dy)``). Other references: bnjax's batch norm (``r_max = 1``,
``d_max = 0``; warm-up), the eval map (unclipped ``r``, ``d``), ``check_grads`` in
float64 where ``r`` and ``d`` are saturated (so locally constant), and one device
for the multi-device case (a subprocess with simulated devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from jax.test_util import check_grads

import bnjax
import bnjax.functional as F
from bnjax.functional import BatchNormConfig, BNParams, RenormConfig

EPS = 1e-5
MOM = 0.9
LAYOUTS = [  # (name, shape, axis)
    ("dense", (40, 50), -1),
    ("nhwc", (6, 3, 3, 8), -1),
    ("nchw", (6, 8, 3, 3), 1),
    ("tuple_axes", (5, 3, 4, 2), (1, 2)),
]


# --------------------------------------------------------------------------- reference


def _axes(shape, axis):
    axis = (axis,) if isinstance(axis, int) else axis
    faxes = tuple(sorted(a % len(shape) for a in axis))
    red = tuple(i for i in range(len(shape)) if i not in faxes)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(shape))
    return faxes, red, bshape


def ref_renorm(x, gamma, beta, mean0, var0, axis, r_max, d_max, dy, mask=None, mom=MOM):
    """BEYOND.md §1 in float64 NumPy. Returns dict of y, r, d, new mean/var, dx, dgamma, dbeta."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    faxes, red, bshape = _axes(x.shape, axis)
    fshape = tuple(x.shape[a] for a in faxes)
    b = lambda a: np.reshape(np.asarray(a, np.float64), bshape)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(red, keepdims=True)
    ns = np.maximum(n, 1)
    mu = (w * x).sum(red, keepdims=True) / ns
    s2 = (w * (x - mu) ** 2).sum(red, keepdims=True) / ns
    sig_b, sig = np.sqrt(s2 + EPS), np.sqrt(b(var0) + EPS)
    r = np.where(n > 0, np.clip(sig_b / sig, 1 / r_max, r_max), 1.0)
    d = np.where(n > 0, np.clip((mu - b(mean0)) / sig, -d_max, d_max), 0.0)
    xhat = (x - mu) / sig_b
    g = b(gamma)
    y = g * (r * xhat + d) + b(beta)
    # gradient with r, d constant: all outputs depend on mu_B, sigma_B (valid elements only)
    sdy, sdyx = dy.sum(red, keepdims=True), (dy * xhat).sum(red, keepdims=True)
    dx = g * r / sig_b * (dy - w * (sdy + xhat * sdyx) / ns)
    seen = n.reshape(fshape) > 0
    return {
        "y": y,
        "r": r.reshape(fshape),
        "d": d.reshape(fshape),
        "mean": np.where(seen, mom * mean0 + (1 - mom) * mu.reshape(fshape), mean0),
        "var": np.where(seen, mom * var0 + (1 - mom) * s2.reshape(fshape), var0),
        "dx": dx,
        "dgamma": (dy * (r * xhat + d)).sum(red).reshape(fshape),
        "dbeta": dy.sum(red).reshape(fshape),
    }


def make_case(rng, shape, axis, dtype=np.float32):
    faxes, _, bshape = _axes(shape, axis)
    fshape = tuple(shape[a] for a in faxes)
    x = rng.uniform(-3, 3, bshape) + rng.uniform(0.3, 3, bshape) * rng.standard_normal(shape)
    return {
        "x": x.astype(dtype),
        "gamma": rng.uniform(0.5, 1.5, fshape).astype(dtype),
        "beta": rng.standard_normal(fshape).astype(dtype),
        "mean0": rng.standard_normal(fshape).astype(dtype),
        "var0": rng.uniform(0.5, 2, fshape).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
    }


def setup(c, steps=0):
    params = BNParams(jnp.asarray(c["gamma"]), jnp.asarray(c["beta"]))
    state = bnjax.init_stats(c["gamma"].shape, jnp.asarray(c["mean0"]).dtype)
    state = state._replace(mean=jnp.asarray(c["mean0"]), var=jnp.asarray(c["var0"]))
    return params, bnjax.renorm_stats(state, steps)


def run(cfg, params, state, x, dy, mask=None):
    """y, new state and (dx, dgamma, dbeta) of <y, dy>, jitted."""

    @jax.jit
    def f(params, state, x, dy):
        def g(x, p):
            return F.apply_train(p, state, x, cfg, mask=mask)

        (y, new), pull = jax.vjp(g, x, params)
        dx, dp = pull((dy, jax.tree.map(jnp.zeros_like, new)))
        return y, new, dx, dp

    return f(params, state, jnp.asarray(x), jnp.asarray(dy))


def f64(a):
    return np.asarray(a, np.float64)


# --------------------------------------------------------------------------- §1 reference


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_matches_float64_reference(layout, grad, rng):
    """Outputs, state update, step counter and gradients vs §1 in float64 NumPy; both
    clipped and unclipped features occur."""
    _, shape, axis = layout
    c = make_case(rng, shape, axis)
    r_max, d_max = 1.5, 1.0
    cfg = BatchNormConfig(axis=axis, momentum=MOM, grad=grad, renorm=RenormConfig(r_max, d_max))
    params, state = setup(c, steps=3)
    mask = None
    if layout[0] == "nhwc":  # masked: unequal counts, one feature-independent row mask
        mask = np.arange(shape[0]).reshape((-1, 1, 1, 1)) % 3 != 1
    y, new, dx, dp = run(
        cfg, params, state, c["x"], c["dy"], None if mask is None else jnp.asarray(mask)
    )
    ref = ref_renorm(c["x"], c["gamma"], c["beta"], c["mean0"], c["var0"], axis, r_max, d_max,
                     c["dy"], mask)
    r_raw_clipped = (ref["r"] == r_max) | (ref["r"] == 1 / r_max)
    d_clipped = np.abs(ref["d"]) == d_max
    assert r_raw_clipped.any() and (~r_raw_clipped).any(), "both regimes must occur"
    assert d_clipped.any() and (~d_clipped).any(), "both regimes must occur"
    np.testing.assert_allclose(f64(y), ref["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(new.mean), ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(new.var), ref["var"], rtol=1e-5, atol=1e-6)
    assert isinstance(new, F.RenormStats) and new.steps.dtype == jnp.int32 and int(new.steps) == 4
    scale = lambda a: 1e-5 * np.abs(a).max()
    np.testing.assert_allclose(f64(dx), ref["dx"], rtol=1e-4, atol=scale(ref["dx"]))
    np.testing.assert_allclose(f64(dp.scale), ref["dgamma"], rtol=1e-4, atol=scale(ref["dgamma"]))
    np.testing.assert_allclose(f64(dp.bias), ref["dbeta"], rtol=1e-4, atol=scale(ref["dbeta"]))
    # Eval is exactly batch norm's Algorithm 2 map, whatever the state type.
    bn_state = F.BatchStats(*new[:4])
    np.testing.assert_array_equal(
        np.asarray(F.apply_eval(params, new, jnp.asarray(c["x"]), cfg)),
        np.asarray(F.apply_eval(params, bn_state, jnp.asarray(c["x"]), BatchNormConfig(axis=axis))),
    )


def test_ghost_batches_r_d_per_ghost_batch_state_from_whole_batch(rng):
    """virtual_batch_size: each ghost batch gets its own r, d against the running stats;
    the running statistics are updated with the whole batch."""
    c = make_case(rng, (12, 5), -1)
    cfg = BatchNormConfig(momentum=MOM, virtual_batch_size=4, renorm=RenormConfig(1.5, 1.0))
    params, state = setup(c)
    y, new, dx, dp = run(cfg, params, state, c["x"], c["dy"])
    refs = [
        ref_renorm(c["x"][i : i + 4], c["gamma"], c["beta"], c["mean0"], c["var0"], -1, 1.5, 1.0,
                   c["dy"][i : i + 4])
        for i in (0, 4, 8)
    ]
    np.testing.assert_allclose(f64(y), np.concatenate([r["y"] for r in refs]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(dx), np.concatenate([r["dx"] for r in refs]), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(f64(dp.scale), sum(r["dgamma"] for r in refs), rtol=1e-4, atol=1e-5)
    whole = ref_renorm(c["x"], c["gamma"], c["beta"], c["mean0"], c["var0"], -1, 1.5, 1.0, c["dy"])
    np.testing.assert_allclose(f64(new.mean), whole["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(new.var), whole["var"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(refs[0]["r"], refs[1]["r"])  # per ghost batch, not shared


# --------------------------------------------------------------------------- batch norm limits


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
def test_r_max_1_d_max_0_is_batch_norm(grad, rng):
    """Outputs, new statistics and gradients (through y and the new statistics) equal
    bnjax BatchNorm; masked, NCHW."""
    c = make_case(rng, (8, 4, 3, 3), 1)
    mask = jnp.asarray(rng.random((8, 1, 3, 3)) < 0.7)
    w = jnp.asarray(rng.standard_normal(4), jnp.float32)
    bn = BatchNormConfig(axis=1, grad=grad, momentum=MOM)
    rn = BatchNormConfig(axis=1, grad=grad, momentum=MOM, renorm=RenormConfig(1.0, 0.0))
    params, state = setup(c, steps=5)

    def loss(cfg, st):
        def f(x, p):
            y, new = F.apply_train(p, st, x, cfg, mask=mask)
            return jnp.sum(jnp.sin(y) * c["dy"]) + jnp.sum(w * new.mean) + jnp.sum(w * new.var), (
                y,
                new,
            )

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (yb, sb)), gb = loss(bn, state.batch_stats)(jnp.asarray(c["x"]), params)
    (_, (yr, sr)), gr = loss(rn, state)(jnp.asarray(c["x"]), params)
    chex.assert_trees_all_close((yr, sr.batch_stats, gr), (yb, sb, gb), rtol=1e-6, atol=1e-6)


def test_warmup_is_plain_batch_norm_then_renorm(rng):
    """steps < warmup_steps: bit-identical to batch norm; from steps == warmup_steps: renorm."""
    c = make_case(rng, (16, 6), -1)
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(1.5, 1.0, warmup_steps=3))
    bn = BatchNormConfig(momentum=MOM)
    params, state = setup(c)
    x = jnp.asarray(c["x"])
    step = jax.jit(lambda s, x: F.apply_train(params, s, x, cfg))
    bn_step = jax.jit(lambda s, x: F.apply_train(params, s, x, bn))
    bn_state = state.batch_stats
    for k in range(5):
        y, state = step(state, x + k)
        yb, bn_state = bn_step(bn_state, x + k)
        assert int(state.steps) == k + 1
        if k < 3:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(yb))
            chex.assert_trees_all_close(state.batch_stats, bn_state, rtol=1e-6, atol=1e-6)
        else:
            assert np.abs(np.asarray(y) - np.asarray(yb)).max() > 1e-2


# hypothesis: sizes from small sets (few compilations); values vary.
@given(
    seed=st.integers(0, 2**16),
    n=st.sampled_from([2, 5, 32]),
    loc=st.floats(-50, 50),
    spread=st.floats(0.05, 20),
)
def test_unclipped_training_output_is_the_eval_output(seed, n, loc, spread):
    """r, d unclipped (huge bounds): y_train == apply_eval under the statistics before
    the update, whatever the batch (BEYOND.md §1)."""
    rng = np.random.default_rng(seed)
    c = make_case(rng, (n, 3), -1)
    x = (loc + spread * rng.standard_normal((n, 3))).astype(np.float32)
    params, state = setup(c, steps=1)
    y, ye = _unclipped(params, state, jnp.asarray(x))
    # rounding: float32 arithmetic on |x| ~ |loc| + spread, scaled by gamma / sigma
    tol = 3e-6 * (abs(loc) + 4 * spread + 3) * float(np.max(c["gamma"] / np.sqrt(c["var0"])))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ye), rtol=0, atol=tol)


@jax.jit
def _unclipped(params, state, x):
    cfg = BatchNormConfig(renorm=RenormConfig(1e6, 1e6))
    return F.apply_train(params, state, x, cfg)[0], F.apply_eval(params, state, x, cfg)


# --------------------------------------------------------------------------- schedules


def test_schedules_are_evaluated_at_the_stored_step(rng):
    """A plain callable and optax schedules, traced inside jit, at state.steps (before
    the increment): equal to fixed floats with the schedule's value at that step."""
    c = make_case(rng, (16, 6), -1)
    params, state = setup(c)
    x = jnp.asarray(c["x"])
    r_fn = lambda s: 1.0 + 0.1 * s  # noqa: E731
    d_fn = optax.linear_schedule(0.0, 1.0, 10)
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(r_fn, d_fn))
    step = jax.jit(lambda s: F.apply_train(params, s, x, cfg))
    for k in (0, 2, 7):
        s = state._replace(steps=jnp.asarray(k, jnp.int32))
        y, new = step(s)
        fixed = BatchNormConfig(momentum=MOM, renorm=RenormConfig(1.0 + 0.1 * k, k / 10))
        yf, newf = F.apply_train(params, s, x, fixed)
        np.testing.assert_allclose(np.asarray(y), np.asarray(yf), rtol=1e-6, atol=1e-6)
        assert int(new.steps) == k + 1 and int(newf.steps) == k + 1
    # the paper's schedule: plain BN before `start`, full bounds after the end steps
    r_fn, d_fn = bnjax.renorm_schedule(start=10, r_max=3.0, r_max_steps=50, d_max=5.0,
                                       d_max_steps=30)
    assert [float(r_fn(s)) for s in (0, 10, 30, 50, 1000)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [float(d_fn(s)) for s in (0, 10, 20, 30, 1000)] == [0.0, 0.0, 2.5, 5.0, 5.0]
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(r_fn, d_fn))
    y0 = F.apply_train(params, state._replace(steps=jnp.asarray(9)), x, cfg)[0]
    yb = F.apply_train(params, state.batch_stats, x, BatchNormConfig(momentum=MOM))[0]
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(yb))
    # A schedule value out of range is clamped (r_max >= 1, d_max >= 0): here plain BN.
    bad = BatchNormConfig(momentum=MOM, renorm=RenormConfig(lambda s: 0.5, lambda s: -1.0))
    np.testing.assert_allclose(
        np.asarray(F.apply_train(params, state, x, bad)[0]), np.asarray(yb), rtol=1e-6, atol=1e-6
    )


def test_steps_count_training_calls_in_a_scan(rng):
    c = make_case(rng, (8, 3), -1)
    cfg = BatchNormConfig(renorm=RenormConfig(warmup_steps=2))
    params, state = setup(c)

    def body(s, x):
        return F.apply_train(params, s, x, cfg)[1], None

    xs = jnp.asarray(rng.standard_normal((5, 8, 3)), jnp.float32)
    out, _ = jax.lax.scan(body, state, xs)
    assert int(out.steps) == 5
    assert int(F.apply(params, out, xs[0], cfg, train=False)[1].steps) == 5  # eval: unchanged


# --------------------------------------------------------------------------- transforms, dtypes


def test_vmap_ensemble_and_population_average(rng):
    """vmap over an ensemble of (params, state) equals a loop; population="average"
    accumulates like batch norm's."""
    cs = [make_case(np.random.default_rng(i), (10, 4), -1) for i in range(3)]
    cfg = BatchNormConfig(population="average", renorm=RenormConfig(1.5, 1.0))
    pairs = [setup(c, steps=i) for i, c in enumerate(cs)]
    stack = lambda *a: jnp.stack(a)
    params = jax.tree.map(stack, *[p for p, _ in pairs])
    states = jax.tree.map(stack, *[s for _, s in pairs])
    xs = jnp.stack([jnp.asarray(c["x"]) for c in cs])
    ys, news = jax.jit(jax.vmap(lambda p, s, x: F.apply_train(p, s, x, cfg)))(params, states, xs)
    for i, (p, s) in enumerate(pairs):
        y, new = F.apply_train(p, s, xs[i], cfg)
        chex.assert_trees_all_close((ys[i], jax.tree.map(lambda a, i=i: a[i], news)), (y, new),
                                    rtol=1e-6, atol=1e-6)
        bn_new = F.apply_train(p, s.batch_stats, xs[i], BatchNormConfig(population="average"))[1]
        chex.assert_trees_all_close(new.batch_stats, bn_new, rtol=1e-6, atol=1e-6)


def test_bf16_input_float32_statistics_and_large_offset(rng):
    """bf16 input: float32 statistics; |mean| = 1e4 std: exact variance (not E[x^2]-E[x]^2)
    and outputs at the input's resolution vs float64 §1."""
    x = np.asarray(2 + 3 * rng.standard_normal((64, 8)), np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(1.5, 1.0))
    params, state = F.init(8, cfg)
    y, new = jax.jit(lambda s, x: F.apply_train(params, s, x, cfg))(state, xb)
    assert y.dtype == jnp.float32 and new.mean.dtype == new.var.dtype == jnp.float32
    xr = f64(xb.astype(jnp.float32))
    ref = ref_renorm(xr, np.ones(8), np.zeros(8), np.zeros(8), np.ones(8), -1, 1.5, 1.0, xr)
    np.testing.assert_allclose(f64(y), ref["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(new.var), ref["var"], rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(F.apply_train(params, state, x, cfg)[0] ** 2))(xb)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
    # large offset, float32
    x = np.asarray(1e4 + rng.standard_normal((512, 8)), np.float32)
    st = state._replace(mean=jnp.full(8, 1e4 + 0.3, jnp.float32), var=jnp.full(8, 1.3, jnp.float32))
    y, new = F.apply_train(params, st, jnp.asarray(x), cfg)
    ref = ref_renorm(x, np.ones(8), np.zeros(8), np.full(8, 1e4 + 0.3), np.full(8, 1.3), -1, 1.5,
                     1.0, x)
    np.testing.assert_allclose(f64(new.var), ref["var"], rtol=1e-5)
    spacing = float(np.spacing(np.float32(1e4)))
    np.testing.assert_allclose(f64(y), ref["y"], rtol=0, atol=4 * spacing)


def test_nan_batch_keeps_the_stored_statistics_of_that_feature(rng):
    """A NaN in feature 0: its outputs are NaN (visible in the loss), its stored statistics
    and count are kept (no poisoning of later steps); other features update normally."""
    c = make_case(rng, (16, 4), -1)
    c["x"][3, 0] = np.nan
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(1.5, 1.0))
    params, state = setup(c, steps=2)
    y, new = jax.jit(lambda s, x: F.apply_train(params, s, x, cfg))(state, jnp.asarray(c["x"]))
    assert np.isnan(np.asarray(y[:, 0])).all() and np.isfinite(np.asarray(y[:, 1:])).all()
    assert float(new.mean[0]) == float(state.mean[0]) and float(new.var[0]) == float(state.var[0])
    assert float(new.count[0]) == 0 and float(new.count[1]) == 16
    assert np.isfinite(np.asarray(new.mean)).all() and int(new.steps) == 3
    ref = ref_renorm(c["x"][:, 1:], c["gamma"][1:], c["beta"][1:], c["mean0"][1:], c["var0"][1:],
                     -1, 1.5, 1.0, c["dy"][:, 1:])
    np.testing.assert_allclose(f64(new.mean[1:]), ref["mean"], rtol=1e-5, atol=1e-6)
    # the next, clean batch trains normally
    y2, _ = F.apply_train(params, new, jnp.asarray(c["x"][:, :]) .at[3, 0].set(0.0), cfg)
    assert np.isfinite(np.asarray(y2)).all()


def test_empty_feature_gets_batch_norm_output(rng):
    c = make_case(rng, (10, 3), -1)
    mask = np.ones((10, 3), bool)
    mask[:, 1] = False
    cfg = BatchNormConfig(momentum=MOM, renorm=RenormConfig(1.5, 1.0))
    params, state = setup(c)
    y, new = F.apply_train(params, state, jnp.asarray(c["x"]), cfg, mask=jnp.asarray(mask))
    yb, _ = F.apply_train(params, state.batch_stats, jnp.asarray(c["x"]), BatchNormConfig(),
                          mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(y[:, 1]), np.asarray(yb[:, 1]), rtol=1e-6)
    assert float(new.mean[1]) == float(state.mean[1]) and np.isfinite(np.asarray(y)).all()


# --------------------------------------------------------------------------- check_grads


@pytest.mark.parametrize(
    "grad,modes,order",
    [("vjp", ["rev"], 2), ("jvp", ["fwd", "rev"], 2), ("autodiff", ["fwd", "rev"], 1)],
)
def test_check_grads_float64_saturated(x64, grad, modes, order):
    """Numerical vs analytic derivatives of y and the new state, where every r and d is
    clipped (so locally constant and the analytic gradient is the true one)."""
    rng = np.random.default_rng(5)
    c = make_case(rng, (7, 3), -1, np.float64)
    c["var0"] = np.asarray([0.05, 20.0, 0.04])  # sigma_B / sigma far outside [1/1.2, 1.2]
    c["mean0"] = np.asarray([8.0, -8.0, 9.0])  # |mu_B - mu| / sigma far above 0.3
    cfg = BatchNormConfig(grad=grad, param_dtype=jnp.float64, momentum=MOM,
                          renorm=RenormConfig(1.2, 0.3))
    _, state = setup(c)
    ref = ref_renorm(c["x"], c["gamma"], c["beta"], c["mean0"], c["var0"], -1, 1.2, 0.3, c["dy"])
    assert np.all(np.isin(ref["r"], [1.2, 1 / 1.2])) and np.all(np.abs(ref["d"]) == 0.3)

    @jax.jit
    def f(x, gamma, beta):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg)
        return y, new.mean, new.var

    check_grads(f, tuple(jnp.asarray(c[k]) for k in ("x", "gamma", "beta")), order=order,
                modes=modes)


# --------------------------------------------------------------------------- errors


def test_bad_config_values_name_the_value():
    with pytest.raises(ValueError, match=r"r_max must be >= 1, got r_max=0.5"):
        RenormConfig(r_max=0.5)
    with pytest.raises(ValueError, match=r"r_max must be >= 1, got r_max=nan"):
        RenormConfig(r_max=float("nan"))
    with pytest.raises(ValueError, match=r"d_max must be >= 0, got d_max=-0.1"):
        RenormConfig(d_max=-0.1)
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 0, got warmup_steps=-1"):
        RenormConfig(warmup_steps=-1)
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        RenormConfig(warmup_steps=1.5)
    with pytest.raises(TypeError, match="r_max must be a float or a schedule"):
        RenormConfig(r_max="3")
    with pytest.raises(TypeError, match="renorm must be None or a RenormConfig"):
        BatchNormConfig(renorm=True)
    with pytest.raises(ValueError, match=r"r_max must be >= 1, got r_max=0.9"):
        bnjax.renorm_schedule(r_max=0.9)
    with pytest.raises(ValueError, match=r"d_max_steps=10 must be after start=100"):
        bnjax.renorm_schedule(start=100, d_max_steps=10)
    assert RenormConfig(r_max=1, d_max=0).r_max == 1.0  # ints are fine


def test_bad_inputs_as_batch_norm():
    cfg = BatchNormConfig(renorm=RenormConfig())
    params, state = F.init(10, cfg)
    with pytest.raises(ValueError, match=r"shape \(1, 10\).*one element per feature"):
        F.apply_train(params, state, jnp.ones((1, 10)), cfg)
    with pytest.raises(TypeError, match=r"floating-point or complex x, got dtype int32"):
        F.apply_train(params, state, jnp.ones((4, 10), jnp.int32), cfg)
    with pytest.raises(ValueError, match=r"params.scale has shape \(10,\).*\(4, 7\)"):
        F.apply_train(params, state, jnp.ones((4, 7)), cfg)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 3\).*input shape \(4, 10\)"):
        F.apply_train(params, state, jnp.ones((4, 10)), cfg, mask=jnp.ones((4, 3), bool))
    with pytest.raises(ValueError, match="needs a RenormStats state with a step counter, got "
                       "BatchStats"):
        F.apply_train(params, state.batch_stats, jnp.ones((4, 10)), cfg)
    with pytest.raises(ValueError, match=r"state.steps must be an integer scalar"):
        F.apply_train(params, state._replace(steps=jnp.zeros(10, jnp.int32)), jnp.ones((4, 10)),
                      cfg)
    with pytest.raises(ValueError, match=r"state.steps must be an integer scalar"):
        F.apply_train(params, state._replace(steps=jnp.zeros(())), jnp.ones((4, 10)), cfg)
    with pytest.raises(ValueError, match="steps must be an integer scalar"):
        bnjax.renorm_stats(state, 1.5)


# --------------------------------------------------------------------------- multi-device


@pytest.mark.multidevice
def test_multidevice_equals_one_device(tmp_path):
    """shard_map (check_vma on/off), pmap, the three gradient implementations and ghost
    batches on 4 simulated devices with unequal valid counts (one device empty) equal one
    device (outputs, state, gradients through y and the new statistics)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    impl = Path(__file__).with_name("_renorm_multidevice.py")
    proc = subprocess.run([sys.executable, str(impl)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["steps"] == 8
    assert r["renorm_vs_bn"] > 1e-2  # the comparison is not vacuous
    bad = {k: v for k, v in r.items() if k not in ("steps", "renorm_vs_bn") and not v <= 2e-6}
    assert not bad, r
    assert len(r) == 8, r
