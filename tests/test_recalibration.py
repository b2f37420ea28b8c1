"""PreciseBN recalibration and the train/eval consistency report.

Reference: the same networks written in float64 NumPy, recalibrated layer by
layer with Algorithm 2's rule (count-weighted mean, pooled unbiased within-batch
variance) in each of the three modes; the module-level "average" estimator
(training with frozen weights); linen vs NNX.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

import bnjax.linen as bl
import bnjax.nnx as bx
from bnjax.diagnostics import consistency, consistency_nnx, format_table
from bnjax.recalibration import recalibrate, recalibrate_nnx

EPS = 1e-5


# ------------------------------------------------------------------------ models


class _Block(nn.Module):
    features: int
    conv: bool = False
    population: str = "ema"

    @nn.compact
    def __call__(self, x, train):
        if self.conv:
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        else:
            x = nn.Dense(self.features, use_bias=False)(x)
        return nn.sigmoid(bl.BatchNorm(population=self.population)(x, train=train))


class MLP(nn.Module):
    """Three BN layers, two of them nested in submodules."""

    population: str = "ema"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _Block(6, population=self.population)(x, train)
        x = _Block(5, population=self.population)(x, train)
        x = nn.Dense(4)(x)
        return bl.BatchNorm(population=self.population)(x, train=train)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _Block(4, conv=True)(x, train)
        x = _Block(3, conv=True)(x, train)
        x = nn.Dense(5)(x.mean(axis=(1, 2)))
        return bl.BatchNorm()(x, train=train)


CONV_LAYERS = ["_Block_0/BatchNorm_0", "_Block_1/BatchNorm_0", "BatchNorm_0"]
MLP_LAYERS = ["_Block_0/BatchNorm_0", "_Block_1/BatchNorm_0", "BatchNorm_0"]


def _sigmoid(h):
    return 1 / (1 + np.exp(-h))


def _conv_same(x, k):
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))  # N, H, W, C, kh, kw
    return np.einsum("nhwcij,ijco->nhwo", win, k)


def _np_forward(params, x, bn, conv):
    """The float64 network; ``bn(layer, h) -> normalized h`` decides the statistics."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64)
    for i in range(2):
        blk = p[f"_Block_{i}"]
        h = _conv_same(h, blk["Conv_0"]["kernel"]) if conv else h @ blk["Dense_0"]["kernel"]
        h = _sigmoid(bn(f"_Block_{i}/BatchNorm_0", h))
    if conv:
        h = h.mean(axis=(1, 2))
    h = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    return bn("BatchNorm_0", h)


def _bn_params(params, layer):
    node = params
    for k in layer.split("/"):
        node = node[k]
    return np.asarray(node["scale"], np.float64), np.asarray(node["bias"], np.float64)


def _np_recalibrate(params, stats, batches, mode, conv, layers, variance="within"):
    """Float64 Algorithm 2, layer by layer: {layer: (mean, var)}."""
    stats = {k: (np.asarray(m, np.float64), np.asarray(v, np.float64)) for k, (m, v) in
             stats.items()}
    new = dict(stats)

    def collect(target_stats, upstream_train):
        seen = {k: [] for k in layers}

        def bn(layer, h):
            flat = h.reshape(-1, h.shape[-1])
            seen[layer].append(flat)
            g, b = _bn_params(params, layer)
            mu, var = (flat.mean(0), flat.var(0)) if upstream_train else target_stats[layer]
            return (h - mu) / np.sqrt(var + EPS) * g + b

        for xb in batches:
            _np_forward(params, xb, bn, conv)
        return seen

    def estimate(parts):
        allx = np.concatenate(parts)
        if variance == "total":
            return allx.mean(0), allx.var(0, ddof=1)
        m2 = sum(((q - q.mean(0)) ** 2).sum(0) for q in parts)
        return allx.mean(0), m2 / sum(len(q) - 1 for q in parts)

    if mode in ("train", "single_pass"):
        seen = collect(stats, mode == "train")
        return {k: estimate(seen[k]) for k in layers}
    for k in layers:  # layerwise: earlier layers already recalibrated
        new[k] = estimate(collect(new, False)[k])
    return new


def _stats_of(variables, layers):
    out = {}
    for layer in layers:
        node = variables["batch_stats"]
        for k in layer.split("/"):
            node = node[k]
        out[layer] = (node["mean"], node["var"])
    return out


def _assert_matches_reference(new, v, batches, mode, variance, *, conv, layers):
    """``new`` (``v`` recalibrated on ``batches``) matches the float64 reference per layer."""
    ref = _np_recalibrate(v["params"], _stats_of(v, layers), batches, mode, conv, layers,
                          variance)
    got = _stats_of(new, layers)
    for layer in layers:
        np.testing.assert_allclose(got[layer][0], ref[layer][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[layer][1], ref[layer][1], rtol=2e-5, atol=1e-7)


def _trained_like(model, args, rng):
    """Variables with random (non-init) weights and stale statistics."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))  # no RNG compiles
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype),
                          shapes["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 1.0 if p[-1].key == "scale" else a, params
    )
    stats = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes["batch_stats"])
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def mlp_setup():
    r = np.random.default_rng(0)
    x = (2 + 1.5 * r.normal(size=(60, 7))).astype(np.float32)
    return MLP(), _trained_like(MLP(), (x[:2],), r), [x[i : i + 12] for i in range(0, 60, 12)]


# ------------------------------------------------------------------------ linen


@pytest.mark.parametrize(
    "mode,variance", [("train", "within"), ("layerwise", "within"), ("single_pass", "total")]
)
def test_mlp_matches_float64_reference(mlp_setup, mode, variance):
    model, v, batches = mlp_setup
    new = recalibrate(model, v, batches, mode=mode, variance=variance, train=False)
    _assert_matches_reference(new, v, batches, mode, variance, conv=False, layers=MLP_LAYERS)
    # params untouched (the very same arrays)
    assert all(a is b for a, b in zip(jax.tree.leaves(new["params"]),
                                      jax.tree.leaves(v["params"]), strict=True))


def test_convnet_matches_float64_reference(rng):
    mode, variance = "layerwise", "within"
    x = (1 + rng.normal(size=(12, 6, 6, 3))).astype(np.float32)
    model = ConvNet()
    v = _trained_like(model, (x[:2],), rng)
    batches = [x[:8], x[8:]]  # unequal sizes
    new = recalibrate(model, v, batches, mode=mode, variance=variance)
    _assert_matches_reference(new, v, batches, mode, variance, conv=True, layers=CONV_LAYERS)


def test_order_and_split(mlp_setup):
    model, v, batches = mlp_setup
    base = _stats_of(recalibrate(model, v, batches, mode="layerwise"), MLP_LAYERS)
    shuffled = _stats_of(recalibrate(model, v, batches[::-1], mode="layerwise"), MLP_LAYERS)
    for layer in MLP_LAYERS:
        for a, b in zip(base[layer], shuffled[layer], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # A different split (sizes 30) of the same data, with the eval-mode network
    # upstream: the mean and the "total" variance are invariant; the paper's
    # "within" variance is not by design (it is the variance within batches of
    # that size) and is checked against its reference in the tests above.
    x = np.concatenate(batches)
    halves = [x[:30], x[30:]]
    tot12 = _stats_of(recalibrate(model, v, batches, mode="single_pass", variance="total"),
                      MLP_LAYERS)
    tot30 = _stats_of(recalibrate(model, v, halves, mode="single_pass", variance="total"),
                      MLP_LAYERS)
    for layer in MLP_LAYERS:
        np.testing.assert_allclose(tot12[layer][0], tot30[layer][0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(tot12[layer][1], tot30[layer][1], rtol=1e-5, atol=1e-8)


def test_train_mode_equals_population_average_training(mlp_setup):
    """mode="train" is exactly what population="average" accumulates with frozen weights."""
    _, v, batches = mlp_setup
    model = MLP(population="average")
    v_avg = model.init(jax.random.key(0), batches[0])
    v_avg = {"params": v["params"],
             "batch_stats": jax.tree.map(lambda a: a * 0, v_avg["batch_stats"])}
    step = jax.jit(lambda vv, xb: model.apply(vv, xb, train=True, mutable=["batch_stats"])[1])
    trained = v_avg
    for xb in batches:
        trained = {**trained, **step(trained, xb)}
    recal = recalibrate(model, v_avg, batches, mode="train", progress=True)
    for a, b in zip(jax.tree.leaves(recal["batch_stats"]),
                    jax.tree.leaves(trained["batch_stats"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


class _Masked(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return bl.BatchNorm(use_running_average=True)(nn.Dense(3)(x), mask=mask)


def test_bad_inputs_and_empty_features(mlp_setup):
    model, v, batches = mlp_setup
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate(model, v, iter([]))
    with pytest.raises(ValueError, match="mode must be"):
        recalibrate(model, v, batches, mode="exact")
    bad = _Masked()
    vb = _trained_like(bad, (batches[0], None), np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"BatchNorm_0.*shape"):
        # a batch norm whose input has 4 features while its statistics have 3
        vb4 = {**vb, "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
        recalibrate(bad, vb4, [(batches[0], None)])
    # Feature 0 never valid: its statistics are kept (no NaN), the others recomputed.
    mask = np.ones((12, 3), bool)
    mask[:, 0] = False
    vb = {**vb, "batch_stats": {"BatchNorm_0": {"mean": jnp.full(3, 7.0),
                                                "var": jnp.full(3, 2.0)}}}
    new = recalibrate(bad, vb, [(b, mask) for b in batches])["batch_stats"]["BatchNorm_0"]
    assert new["mean"][0] == 7.0 and new["var"][0] == 2.0
    k, b = (np.asarray(vb["params"]["Dense_0"][n], np.float64) for n in ("kernel", "bias"))
    h = [np.asarray(xb, np.float64) @ k + b for xb in batches]
    m2 = sum(((q - q.mean(0)) ** 2).sum(0) for q in h)
    np.testing.assert_allclose(new["mean"][1:], np.concatenate(h).mean(0)[1:], rtol=1e-5)
    np.testing.assert_allclose(new["var"][1:], (m2 / (60 - len(h)))[1:], rtol=1e-4)


# ------------------------------------------------------------------------ NNX


class _NnxBlock(nnx.Module):
    def __init__(self, din, dout, rngs):
        zeros = nnx.initializers.zeros_init()  # weights are copied from the linen model
        self.lin = nnx.Linear(din, dout, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.bn = bx.BatchNorm(dout, rngs=rngs)

    def __call__(self, x):
        return nnx.sigmoid(self.bn(self.lin(x)))


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_NnxBlock(7, 6, rngs), _NnxBlock(6, 5, rngs)])
        self.out = nnx.Linear(5, 4, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.bn = bx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.bn(self.out(x))


def _nnx_from_linen(v):
    m = _NnxMLP(nnx.Rngs(0))
    p, s = v["params"], v["batch_stats"]
    for i, blk in enumerate(m.blocks):
        blk.lin.kernel[...] = p[f"_Block_{i}"]["Dense_0"]["kernel"]
        for name in ("scale", "bias"):
            getattr(blk.bn, name)[...] = p[f"_Block_{i}"]["BatchNorm_0"][name]
        for name in ("mean", "var"):
            getattr(blk.bn, name)[...] = s[f"_Block_{i}"]["BatchNorm_0"][name]
    m.out.kernel[...], m.out.bias[...] = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    for name in ("scale", "bias"):
        getattr(m.bn, name)[...] = p["BatchNorm_0"][name]
    for name in ("mean", "var"):
        getattr(m.bn, name)[...] = s["BatchNorm_0"][name]
    return m


@pytest.mark.parametrize("mode", ["train", "layerwise"])
def test_nnx_matches_linen(mlp_setup, mode):
    model, v, batches = mlp_setup
    m = _nnx_from_linen(v)
    params_before = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
    recalibrate_nnx(m, lambda: iter(batches), mode=mode)
    got = [m.blocks[0].bn, m.blocks[1].bn, m.bn]
    # Independent reference: the float64 NumPy network, Algorithm 2 layer by layer.
    # Measured (CPU): relative error <= 1.6e-7 (mean), <= 3.2e-7 (var); the tolerances
    # are those of _assert_matches_reference (rtol 1e-5 mean, 2e-5 var).
    np_ref = _np_recalibrate(v["params"], _stats_of(v, MLP_LAYERS), batches, mode,
                             False, MLP_LAYERS)
    for layer, bn in zip(MLP_LAYERS, got, strict=True):
        np.testing.assert_allclose(bn.mean[...], np_ref[layer][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], np_ref[layer][1], rtol=2e-5, atol=1e-7)
    # ... and the linen recalibration (same float32 arithmetic) within float32 rounding.
    ref = _stats_of(recalibrate(model, v, batches, mode=mode), MLP_LAYERS)
    for layer, bn in zip(MLP_LAYERS, got, strict=True):
        np.testing.assert_allclose(bn.mean[...], ref[layer][0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bn.var[...], ref[layer][1], rtol=1e-5, atol=1e-8)
    for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.Param)), jax.tree.leaves(params_before),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_nnx(m, [])


# ------------------------------------------------------------------------ consistency


def test_consistency_after_layerwise_recalibration(mlp_setup):
    """On its calibration batch, a layerwise-recalibrated network has no train/eval gap
    in the mean, and sigma2_B / var = (n-1)/n exactly with the "total" variance."""
    model, v, batches = mlp_setup
    x = np.concatenate(batches)
    stale = consistency(model, v, [x])
    new = recalibrate(model, v, [x], mode="layerwise", variance="total")
    rep = consistency(model, new, [x])
    assert list(rep) == sorted(MLP_LAYERS)
    n = x.shape[0]
    for layer, r in rep.items():
        assert r.mean_shift_max < 1e-4, (layer, r)
        assert abs(r.var_ratio_min - (n - 1) / n) < 1e-4
        assert abs(r.var_ratio_max - (n - 1) / n) < 1e-4
        assert r.output_gap < 0.05 and r.batches == 1
        assert stale[layer].mean_shift > 10 * r.mean_shift_max
    table = format_table(rep)
    assert all(layer in table for layer in MLP_LAYERS)
    nrep = consistency_nnx(_nnx_from_linen(new), [x])
    assert sorted(nrep) == ["blocks/0/bn", "blocks/1/bn", "bn"]
    for key, layer in zip(["blocks/0/bn", "blocks/1/bn", "bn"], MLP_LAYERS, strict=True):
        # closed form, as for linen above: sigma2_B / var = (n-1)/n; measured (CPU)
        # |ratio - (n-1)/n| <= 1.4e-7, tolerance 1e-5.
        r = nrep[key]
        for ratio in (r.var_ratio, r.var_ratio_min, r.var_ratio_max):
            assert abs(ratio - (n - 1) / n) < 1e-5, (key, r)
        assert r.mean_shift_max < 1e-4, (key, r)
        np.testing.assert_allclose(nrep[key].var_ratio, rep[layer].var_ratio, rtol=1e-4)


class _FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))


def test_flax_linen_batchnorm_layers_are_recalibrated_too(mlp_setup):
    _, _, batches = mlp_setup
    model = _FlaxBN()
    v = _trained_like(model, (batches[0],), np.random.default_rng(2))
    new = recalibrate(model, v, batches[:3], train=True)["batch_stats"]["BatchNorm_0"]
    k, b = (np.asarray(v["params"]["Dense_0"][n], np.float64) for n in ("kernel", "bias"))
    h = [np.asarray(xb, np.float64) @ k + b for xb in batches[:3]]
    m2 = sum(((q - q.mean(0)) ** 2).sum(0) for q in h)
    np.testing.assert_allclose(new["mean"], np.concatenate(h).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new["var"], m2 / (36 - 3), rtol=1e-4)
