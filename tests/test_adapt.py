"""bnjax.adapt against independent references.

* ``norm(prior=0)``: flax's own ``BatchNorm(use_running_average=False)`` on the batch;
* ``norm(prior=N)``: a float64 NumPy forward pass of the mixture rule, per layer;
* ``norm(prior=inf)``: ``model.apply(variables, x, train=False)``;
* ``tent``: entropy of the predictions before / after, which leaves change, resets;
* ``robust``: a NumPy EMA of the first layer's batch statistics;
* the bad inputs named in the docstrings.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax import adapt


class MLP(nn.Module):
    """Dense -> BN -> relu -> Dense -> BN -> Dense (flax's or bnjax's BN)."""

    flax_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        bn = nn.BatchNorm if self.flax_bn else bnjax.linen.BatchNorm
        x = nn.Dense(8, name="d0")(x)
        x = nn.relu(bn(use_running_average=not train, name="bn0")(x))
        x = nn.Dense(6, name="d1")(x)
        x = bn(use_running_average=not train, name="bn1")(x)
        return nn.Dense(3, name="head")(x)


class ConvNet(nn.Module):
    flax_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        bn = nn.BatchNorm if self.flax_bn else bnjax.linen.BatchNorm
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.relu(bn(use_running_average=not train, name="bn0")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _trained(model, x):
    """Variables with non-trivial statistics and parameters (a shifted source)."""
    v = model.init(jax.random.key(1), x, train=False)
    for i in range(3):
        _, upd = model.apply(v, 0.5 * x + i, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
    params = jax.tree.map(
        lambda a: a * 1.3 + 0.1 if a.ndim == 1 else a, v["params"]
    )  # scales and biases away from 1 / 0
    return {"params": params, "batch_stats": v["batch_stats"]}


@pytest.fixture
def data():
    x = jax.random.normal(jax.random.key(0), (16, 5)) * 2 + 1
    return x, MLP(), _trained(MLP(), x)


def entropy(logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return float(-jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1)))


def same_tree(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------- norm


@pytest.mark.parametrize("flax_bn", [False, True], ids=["bnjax", "flax"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_prior_zero_is_train_mode_normalization(flax_bn, jit):
    x = jax.random.normal(jax.random.key(0), (16, 5)) * 2 + 1
    model = MLP(flax_bn=flax_bn)
    v = _trained(model, x)
    ref, _ = MLP(flax_bn=True).apply(v, x, train=True, mutable=["batch_stats"])
    ad = adapt.norm(prior=0)
    st = ad.init(model, v, train=False)
    step = jax.jit(ad.step) if jit else ad.step
    y, st2 = step(st, x)
    np.testing.assert_allclose(y, ref, atol=2e-5)
    same_tree(st2.source, v)  # nothing updated
    same_tree(ad.variables(st2), v)
    assert int(st2.steps) == 1


def _np_mixture_forward(v, x, prior, conv=False):
    """float64 NumPy: every BN normalizes with (N mu_s + n mu_B) / (N + n) etc."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), v["batch_stats"])
    x = np.asarray(x, np.float64)
    n = x.shape[0]

    def bn(h, name):
        red = tuple(range(h.ndim - 1))
        mu_b, var_b = h.mean(red), h.var(red)
        mu = (prior * s[name]["mean"] + n * mu_b) / (prior + n)
        var = (prior * s[name]["var"] + n * var_b) / (prior + n)
        return (h - mu) / np.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

    if conv:
        h = np.asarray(nn.Conv(4, (3, 3)).apply({"params": v["params"]["conv"]}, x), np.float64)
        h = np.maximum(bn(h, "bn0"), 0).mean(axis=(1, 2))
        return h @ p["head"]["kernel"] + p["head"]["bias"]
    h = x @ p["d0"]["kernel"] + p["d0"]["bias"]
    h = np.maximum(bn(h, "bn0"), 0)
    h = h @ p["d1"]["kernel"] + p["d1"]["bias"]
    h = bn(h, "bn1")
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("prior", [1.0, 16.0, 100.0])
def test_prior_mixture_matches_numpy(prior, data):
    x, model, v = data
    ad = adapt.norm(prior=prior)
    y, _ = ad.step(ad.init(model, v, train=False), x)
    np.testing.assert_allclose(y, _np_mixture_forward(v, x, prior), rtol=1e-4, atol=1e-4)


def test_prior_counts_examples_not_positions_for_convolutions():
    """n is the number of images (8), not images x positions (8 * 36)."""
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2)) * 2 + 1
    model = ConvNet()
    v = _trained(model, x)
    ad = adapt.norm(prior=8.0)
    y, _ = ad.step(ad.init(model, v, train=False), x)
    np.testing.assert_allclose(y, _np_mixture_forward(v, x, 8.0, conv=True), rtol=1e-4, atol=1e-4)
    wrong = _np_mixture_forward(v, x, 8.0 / 36, conv=True)  # positions as examples
    assert np.max(np.abs(np.asarray(y) - wrong)) > 1e-3


@pytest.mark.parametrize("prior", [math.inf, 1e12])
def test_infinite_prior_is_the_source_model(prior, data):
    x, model, v = data
    ad = adapt.norm(prior=prior)
    y, _ = ad.step(ad.init(model, v, train=False), x)
    np.testing.assert_allclose(y, model.apply(v, x, train=False), atol=1e-5)


def test_step_inside_scan_over_a_stream(data):
    x, model, v = data
    ad = adapt.robust(momentum=0.2)
    stream = jnp.stack([x, x + 1, x - 1])
    st0 = ad.init(model, v, train=False)
    st, ys = jax.lax.scan(lambda s, xb: ad.step(s, xb)[::-1], st0, stream)
    st_loop = st0
    for xb in stream:
        y, st_loop = ad.step(st_loop, xb)
    np.testing.assert_allclose(ys[-1], y, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), st.stats, st_loop.stats)


# --------------------------------------------------------------------------- tent


def test_tent_lowers_entropy_and_changes_only_bn_affine(data):
    x, model, v = data
    ad = adapt.tent(optax.sgd(0.05, momentum=0.9))
    st = ad.init(model, v, train=False)
    y0, st1 = ad.step(st, x)
    y1, _ = ad.step(st1, x)  # the same batch, after one update
    assert entropy(y1) < entropy(y0)
    new = ad.variables(st1)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    flat_old = dict(jax.tree_util.tree_leaves_with_path(v))
    changed = {
        jax.tree_util.keystr(k) for k in flat_old if not np.array_equal(flat_old[k], flat_new[k])
    }
    expected = {f"['params']['{b}']['{p}']" for b in ("bn0", "bn1") for p in ("scale", "bias")}
    assert changed == expected
    same_tree(st1.source, v)
    # the first prediction is prediction-time BN (before any update)
    y_pt, _ = adapt.norm(prior=0).step(adapt.norm(prior=0).init(model, v, train=False), x)
    np.testing.assert_allclose(y0, y_pt, atol=1e-6)


def test_tent_episodic_and_reset_give_back_the_source_bit_for_bit(data):
    x, model, v = data
    ad = adapt.tent(optax.sgd(0.05, momentum=0.9), steps=2, episodic=True)
    st0 = ad.init(model, v, train=False)
    y_a, st = ad.step(st0, x)
    same_tree(st.params, st0.params)
    same_tree(st.opt_state, st0.opt_state)
    y_b, _ = ad.step(st, x)
    np.testing.assert_array_equal(y_a, y_b)  # every batch adapted alone
    online = adapt.tent(optax.sgd(0.05, momentum=0.9))
    st = online.init(model, v, train=False)
    for _ in range(3):
        _, st = online.step(st, x)
    back = online.reset(st)
    fresh = online.init(model, v, train=False)
    same_tree(back.params, fresh.params)
    same_tree(back.opt_state, fresh.opt_state)
    same_tree(online.variables(back), v)
    assert int(back.steps) == 0


class NNXMLP(nnx.Module):
    def __init__(self, flax_bn: bool):
        rngs = nnx.Rngs(0)
        bn = nnx.BatchNorm if flax_bn else bnjax.nnx.BatchNorm
        self.d0, self.bn0 = nnx.Linear(5, 8, rngs=rngs), bn(8, rngs=rngs)
        self.d1, self.bn1 = nnx.Linear(8, 6, rngs=rngs), bn(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.d0(x)))
        return self.head(self.bn1(self.d1(x)))


def _nnx_from_linen(v, flax_bn):
    m = NNXMLP(flax_bn)
    for name in ("d0", "d1", "head"):
        getattr(m, name).kernel[...] = v["params"][name]["kernel"]
        getattr(m, name).bias[...] = v["params"][name]["bias"]
    for name in ("bn0", "bn1"):
        layer = getattr(m, name)
        layer.scale[...] = v["params"][name]["scale"]
        layer.bias[...] = v["params"][name]["bias"]
        layer.mean[...] = v["batch_stats"][name]["mean"]
        layer.var[...] = v["batch_stats"][name]["var"]
    m.eval()
    return m


@pytest.mark.parametrize(
    "make",
    [lambda: adapt.norm(4.0), lambda: adapt.tent(optax.sgd(0.05, 0.9)), adapt.robust],
    ids=["norm", "tent", "robust"],
)
def test_linen_nnx_flax_and_bnjax_give_the_same_numbers(make, data):
    x, _, v = data
    outs = []
    for flax_bn in (False, True):
        ad = make()
        st = ad.init(MLP(flax_bn=flax_bn), v, train=False)
        ys = []
        for xb in (x, x + 0.5, x):
            y, st = ad.step(st, xb)
            ys.append(y)
        outs.append(np.stack(ys))
        m = _nnx_from_linen(v, flax_bn)
        before = jax.tree.map(np.asarray, nnx.state(m))
        ad = make()
        st = ad.init(m)
        ys = []
        for xb in (x, x + 0.5, x):
            y, st = ad.step(st, xb)
            ys.append(y)
        outs.append(np.stack(ys))
        same_tree(jax.tree.map(np.asarray, nnx.state(m)), before)  # the model is untouched
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


# --------------------------------------------------------------------------- robust


def test_robust_moves_statistics_by_momentum(data):
    x, model, v = data
    ad = adapt.robust(momentum=0.3)
    st = ad.init(model, v, train=False)
    mean, var = (
        np.asarray(v["batch_stats"]["bn0"]["mean"]),
        np.asarray(v["batch_stats"]["bn0"]["var"]),
    )
    p = v["params"]["d0"]
    for xb in (x, 2 * x, x - 3):
        _, st = ad.step(st, xb)
        h = np.asarray(xb, np.float64) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
        mean = 0.7 * mean + 0.3 * h.mean(0)
        var = 0.7 * var + 0.3 * h.var(0)
    np.testing.assert_allclose(st.stats["bn0"][0], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.stats["bn0"][1], var, rtol=1e-5, atol=1e-5)
    adapted = ad.variables(st)
    np.testing.assert_allclose(adapted["batch_stats"]["bn0"]["mean"], mean, rtol=1e-5, atol=1e-5)
    same_tree(adapted["params"], v["params"])
    # momentum 1 is prediction-time BN
    one = adapt.robust(momentum=1.0)
    y1, _ = one.step(one.init(model, v, train=False), x)
    y0, _ = adapt.norm(0).step(adapt.norm(0).init(model, v, train=False), x)
    np.testing.assert_allclose(y1, y0, atol=1e-6)


def test_robust_on_a_batch_of_one_keeps_the_variance(data):
    x, model, v = data
    ad = adapt.robust()
    y, st = ad.step(ad.init(model, v, train=False), x[:1])
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(st.stats["bn0"][1], v["batch_stats"]["bn0"]["var"])


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors(data):
    x, model, v = data
    with pytest.raises(ValueError, match="prior must be >= 0.*prior=-1"):
        adapt.norm(prior=-1)
    with pytest.raises(ValueError, match="prior"):
        adapt.norm(prior=float("nan"))
    with pytest.raises(TypeError, match="prior must be a number"):
        adapt.norm(prior="16")
    ad = adapt.norm(prior=0)
    with pytest.raises(ValueError, match=r"prior=0.*'bn0'.*\(1, 8\).*one value per feature"):
        ad.step(ad.init(model, v, train=False), x[:1])
    y, _ = adapt.norm(prior=4).step(adapt.norm(prior=4).init(model, v, train=False), x[:1])
    assert np.all(np.isfinite(y))  # with a prior, one example is fine
    with pytest.raises(TypeError, match="optax.GradientTransformation.*'sgd'"):
        adapt.tent("sgd")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        adapt.tent(optax.sgd(0.1), steps=0)
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]"):
        adapt.robust(momentum=0.0)
    with pytest.raises(TypeError, match="needs the linen model's variables"):
        ad.init(model)
    with pytest.raises(TypeError, match="model must be a flax"):
        ad.init(object(), v)


def test_models_without_batch_norm_or_with_whitening_are_refused():
    x = jnp.ones((4, 5))
    dense = nn.Dense(3)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        adapt.norm(0).init(dense, dense.init(jax.random.key(0), x))

    class White(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return bnjax.linen.BatchWhitening(group_size=5)(x, train=train)

    v = White().init(jax.random.key(0), jnp.ones((8, 5)), train=False)
    with pytest.raises(TypeError, match="BatchWhitening.*not support|not support.*BatchWhitening"):
        adapt.tent(optax.sgd(0.1)).init(White(), v, train=False)
    with pytest.raises(TypeError, match="not support"):
        adapt.norm(0).init(bnjax.nnx.BatchWhitening(5, rngs=nnx.Rngs(0)))


def test_nnx_variables_are_an_updatable_state(data):
    """For an NNX model, `variables(state)` is an nnx.State: robust's adapted statistics
    (and the source parameters) load into a copy with nnx.update; the model is untouched."""
    x, _, v = data
    m = _nnx_from_linen(v, flax_bn=True)
    ad = adapt.robust(momentum=0.5)
    st = ad.init(m)
    for xb in (x, x + 1.0):
        _, st = ad.step(st, xb)
    copy = nnx.clone(m)
    nnx.update(copy, ad.variables(st))
    np.testing.assert_allclose(copy.bn0.mean[...], st.stats["bn0"][0], rtol=1e-6)
    np.testing.assert_allclose(copy.bn1.var[...], st.stats["bn1"][1], rtol=1e-6)
    np.testing.assert_array_equal(m.bn0.mean[...], v["batch_stats"]["bn0"]["mean"])
    np.testing.assert_array_equal(copy.d0.kernel[...], m.d0.kernel[...])
