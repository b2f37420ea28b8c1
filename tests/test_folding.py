"""Folding Algorithm 2's affine map into Dense / Conv kernels.

Reference: the eval-mode network with flax.linen.BatchNorm (an implementation
independent of bnjax; random non-trivial statistics); the folded BN-free network
must give the same outputs within 1e-5 relative in float32 (and so must the
eval-mode network with bnjax.linen.BatchNorm, which is what gets folded). The
affine map itself is checked against float64 NumPy, the folded kernels against
float32 NumPy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax.linen as bl
from bnjax.folding import FoldPair, affine, find_pairs, fold, fold_linear, fold_sequential


def _init(model, *args, seed=0, **kwargs):
    """Variables of ``model`` filled from NumPy (no jax.random compiles; fast tests).

    Kernels and biases ~ N(0, 0.5^2); BN scale and var in [0.2, 3], BN bias and
    mean ~ N(0, 1): non-trivial statistics for the fold to get right.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))

    def fill(path, s):
        name = path[-1].key
        in_bn = any("BatchNorm" in str(k.key) or str(k.key) == "bn" for k in path)
        if name in ("scale", "var"):
            a = rng.uniform(0.2, 3.0, s.shape)
        elif in_bn or name == "mean":
            a = rng.normal(size=s.shape)
        else:
            a = 0.5 * rng.normal(size=s.shape)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class _Pair(nn.Module):
    """One linear layer followed by batch norm; ``folded=True`` is the BN-free twin;
    ``flax_bn=True`` uses flax.linen.BatchNorm (same variables) as the reference."""

    kind: str
    use_bias: bool
    features: int = 6
    window: tuple[int, ...] = ()
    groups: int = 1
    folded: bool = False
    flax_bn: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bias = self.use_bias or self.folded
        if self.kind == "dense":
            x = nn.Dense(self.features, use_bias=bias, param_dtype=self.param_dtype)(x)
        else:
            x = nn.Conv(
                self.features, self.window, feature_group_count=self.groups, use_bias=bias,
                param_dtype=self.param_dtype,
            )(x)
        if not self.folded:
            bn = nn.BatchNorm if self.flax_bn else bl.BatchNorm
            x = bn(use_running_average=True, epsilon=1e-3, param_dtype=self.param_dtype,
                   name="BatchNorm_0")(x)
        return x


CASES = [  # (kind, window, groups, input shape, use_bias of the linear layer)
    ("dense", (), 1, (8, 5), False),
    ("dense", (), 1, (8, 5), True),
    ("conv", (3,), 1, (4, 9, 4), True),  # 1D
    ("conv", (3, 3), 1, (2, 7, 7, 4), False),  # 2D NHWC
    ("conv", (2, 2, 2), 1, (2, 4, 4, 4, 4), True),  # 3D
    ("conv", (3, 3), 2, (2, 6, 6, 4), False),  # grouped
    ("conv", (3, 3), 2, (2, 6, 6, 4), True),
    ("conv", (3, 3), 6, (2, 6, 6, 6), False),  # depthwise (groups = in = out)
    ("conv", (3, 3), 6, (2, 6, 6, 6), True),
]


@pytest.mark.parametrize("kind,window,groups,xshape,use_bias", CASES)
def test_folded_equals_eval_mode(kind, window, groups, xshape, use_bias):
    x = _normal(xshape)
    model = _Pair(kind, use_bias, window=window, groups=groups)
    v = _init(model, x)
    pairs = find_pairs(model, v, x)
    assert pairs == [FoldPair("Dense_0" if kind == "dense" else "Conv_0", "BatchNorm_0", 1e-3)]
    folded = fold(v, pairs)
    assert "batch_stats" not in folded and "BatchNorm_0" not in folded["params"]
    # Reference: flax.linen.BatchNorm's eval mode on the same variables.
    y_ref = jax.jit(model.clone(flax_bn=True).apply)(v, x)
    y_bn = jax.jit(model.apply)(v, x)  # bnjax's eval mode, the network that was folded
    y = jax.jit(model.clone(folded=True).apply)(folded, x)
    # Measured (CPU): rel <= 2.9e-7 folded vs flax, <= 2.0e-7 bnjax eval vs flax.
    for out in (y, y_bn):
        rel = float(jnp.max(jnp.abs(out - y_ref)) / jnp.max(jnp.abs(y_ref)))
        assert rel < 1e-5, rel


def test_bf16_params_fold_in_float32():
    x = _normal((4, 6, 6, 4))
    model = _Pair("conv", True, window=(3, 3), param_dtype=jnp.bfloat16)
    v = _init(model, x)
    folded = fold(v, [("Conv_0", "BatchNorm_0")], epsilon=1e-3)
    k = folded["params"]["Conv_0"]["kernel"]
    assert k.dtype == jnp.bfloat16
    # The fold is computed in float32 and rounded once to bfloat16. Expected kernel from
    # float32 NumPy, scale / sqrt(var + eps), independent of bnjax's affine.
    f32np = lambda a: np.asarray(a, np.float32)
    bn_p, bn_s = v["params"]["BatchNorm_0"], v["batch_stats"]["BatchNorm_0"]
    a = f32np(bn_p["scale"]) / np.sqrt(f32np(bn_s["var"]) + np.float32(1e-3))
    assert a.dtype == np.float32
    assert affine(bn_p, bn_s, 1e-3)[0].dtype == jnp.float32
    expect = (f32np(v["params"]["Conv_0"]["kernel"]) * a).astype(jnp.bfloat16)
    np.testing.assert_array_equal(k, expect)
    # Stored in float32 the folded network is exact to float32 rounding ...
    f32 = fold(v, [("Conv_0", "BatchNorm_0")], epsilon=1e-3, dtype=jnp.float32)
    y_ref = model.apply(v, x).astype(jnp.float32)
    ref64 = np.asarray(y_ref, np.float64)
    y32 = _Pair("conv", True, window=(3, 3), folded=True).apply(f32, x)
    assert np.max(np.abs(y32 - ref64)) / np.max(np.abs(ref64)) < 1e-2  # bf16 conv in ref
    # ... and in bfloat16 within bfloat16 rounding of the kernel (2^-8 relative).
    y16 = model.clone(folded=True).apply(folded, x).astype(jnp.float32)
    assert np.max(np.abs(y16 - y32)) / np.max(np.abs(y32)) < 2e-2


def test_affine_matches_numpy(rng):
    scale, bias = rng.normal(size=5), rng.normal(size=5)
    mean, var = rng.normal(size=5), rng.uniform(0.1, 2, size=5)
    a, b = affine(
        {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
        {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)},
        1e-2,
    )
    a_ref = scale / np.sqrt(var + 1e-2)
    np.testing.assert_allclose(a, a_ref, rtol=1e-6)
    np.testing.assert_allclose(b, bias - mean * a_ref, rtol=1e-5, atol=1e-6)
    # No scale / no bias: gamma = 1, beta = 0.
    a1, b1 = affine({}, {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}, 0.0)
    np.testing.assert_allclose(a1, 1 / np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(b1, -mean / np.sqrt(var), rtol=1e-5)


class _Nested(nn.Module):
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        class Block(nn.Module):
            folded: bool

            @nn.compact
            def __call__(self, x):
                x = nn.Conv(4, (3, 3), use_bias=self.folded)(x)
                if not self.folded:
                    x = bl.BatchNorm()(x, train=train)
                return nn.relu(x)

        h = Block(self.folded, name="block")(x)
        skip = nn.Dense(4, name="skip")(h)  # not followed by BN
        h = nn.Dense(4, name="proj")(h)
        if not self.folded:
            h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        return h + skip


def test_find_pairs_nested_and_fold_mixed_bn_types():
    x = _normal((2, 5, 5, 3))
    v = _init(_Nested(), x)
    pairs = find_pairs(_Nested(), v, x, train=False)
    assert sorted(pairs) == sorted(
        [FoldPair("block/Conv_0", "block/BatchNorm_0", 1e-5), FoldPair("proj", "bn", 1e-5)]
    )
    folded = fold(v, pairs)
    y_ref = _Nested().apply(v, x)
    y = _Nested(folded=True).apply(folded, x)
    assert float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref))) < 1e-5


def test_fold_sequential():
    layers = [nn.Dense(7, use_bias=False), bl.BatchNorm(use_running_average=True), nn.sigmoid,
              nn.Dense(3), nn.BatchNorm(use_running_average=True, epsilon=1e-2), nn.Dense(2)]
    seq = nn.Sequential(layers)
    x = _normal((6, 4))
    v = _init(seq, x)
    seq2, v2 = fold_sequential(seq, v)
    assert len(seq2.layers) == 4
    assert set(v2["params"]) == {"layers_0", "layers_2", "layers_3"}
    np.testing.assert_allclose(seq2.apply(v2, x), seq.apply(v, x), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    kernel = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"kernel of shape \(3, 4\).*must number 5"):
        fold_linear(kernel, None, jnp.ones(5), jnp.ones(5))
    with pytest.raises(ValueError, match="bias of shape"):
        fold_linear(kernel, jnp.ones(3), jnp.ones(4), jnp.ones(4))
    v = {
        "params": {"Dense_0": {"kernel": kernel}, "BatchNorm_0": {"scale": jnp.ones(5)}},
        "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(5), "var": jnp.ones(5)}},
    }
    with pytest.raises(ValueError, match="folding 'BatchNorm_0' into 'Dense_0'"):
        fold(v, [("Dense_0", "BatchNorm_0")])
    with pytest.raises(KeyError, match="Dense_9"):
        fold(v, [("Dense_9", "BatchNorm_0")])
    ok = {**v, "params": {**v["params"], "Dense_0": {"kernel": jnp.ones((3, 5))}}}
    assert fold(ok, [("Dense_0", "BatchNorm_0")])["params"]["Dense_0"]["bias"].shape == (5,)
    with pytest.raises(ValueError, match="more than one pair"):
        fold(ok, [("Dense_0", "BatchNorm_0"), ("Dense_0", "BatchNorm_0")])
    with pytest.raises(ValueError, match="scale has shape"):
        affine({"scale": jnp.ones(3)}, {"mean": jnp.zeros(5), "var": jnp.ones(5)})


class _SharedDense(nn.Module):
    """One Dense called twice (shared weights), each call followed by its own BN, next to
    an ordinary Dense -> BN pair (the positive control)."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, use_bias=False, name="shared")
        h1 = bl.BatchNorm(use_running_average=True, name="bn1")(shared(x))
        h2 = bl.BatchNorm(use_running_average=True, name="bn2")(shared(x + 1.0))
        h3 = bl.BatchNorm(use_running_average=True, name="bn3")(nn.Dense(4, name="own")(x))
        return h1 + h2 + h3


def test_find_pairs_skips_a_linear_layer_called_twice():
    """Folding the shared kernel into bn1 would also rescale the call that feeds bn2."""
    x = _normal((3, 5))
    v = _init(_SharedDense(), x)
    assert find_pairs(_SharedDense(), v, x) == [FoldPair("own", "bn3", 1e-5)]


class _FeatureAxis0(nn.Module):
    """Dense -> BatchNorm(axis=0) (normalizes per example, not per output feature: no
    per-feature affine map of the Dense outputs) next to an ordinary Dense -> BN pair."""

    @nn.compact
    def __call__(self, x):
        h = bl.BatchNorm(use_running_average=True, axis=0, name="bn_axis0")(
            nn.Dense(4, name="first")(x)
        )
        return bl.BatchNorm(use_running_average=True, name="bn_last")(nn.Dense(4, name="second")(h))


def test_find_pairs_skips_a_batch_norm_whose_feature_axis_is_not_last():
    x = _normal((3, 5))
    v = _init(_FeatureAxis0(), x)
    assert find_pairs(_FeatureAxis0(), v, x) == [FoldPair("second", "bn_last", 1e-5)]
