"""Tests of bnjax.functional: Algorithm 1, its gradient, Algorithm 2, transformations, errors.

Every reference here is written in the test from PAPER.md, not taken from bnjax:
:func:`ref_bn` is Algorithm 1 written once against an array namespace, run as
float64 NumPy for outputs and statistics and as plain ``jax.numpy`` (with JAX
autodiff) for gradients.
"""

from __future__ import annotations

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from jax.test_util import check_grads

import bnjax
import bnjax.functional as F
from bnjax.functional import BatchNormConfig, BNParams

EPS = 1e-5
MOMENTUM = 0.99

# (name, shape, axis): dense, NHWC conv, NCHW conv, two feature axes.
LAYOUTS = [
    ("dense", (60, 100), -1),
    ("nhwc", (8, 5, 5, 6), -1),
    ("nchw", (8, 6, 5, 5), 1),
    ("tuple_axes", (4, 3, 5, 2), (1, 2)),
]
SMALL_LAYOUTS = [  # the same layouts, small enough for float64 numerical gradients
    ("dense", (7, 3), -1),
    ("nhwc", (3, 2, 2, 2), -1),
    ("nchw", (3, 2, 2, 2), 1),
    ("tuple_axes", (3, 2, 2, 2), (1, 2)),
]

# --------------------------------------------------------------------------- references


def faxes_of(ndim: int, axis) -> tuple[int, ...]:
    axis = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axis))


def ref_bn(xp, x, gamma, beta, axis, eps=EPS, mask=None, fallback=None):
    """Algorithm 1 (PAPER.md) in namespace ``xp``: returns (y, mu_B, sigma2_B, count).

    ``mu_B`` / ``sigma2_B`` are feature-shaped; with a mask only valid elements enter
    them (all elements are normalized). ``fallback = (mean, var)``: the running
    statistics, which normalize a feature without any valid element (bnjax's rule for
    empty features: the inference map for them).
    """
    faxes = faxes_of(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in faxes)
    fshape = tuple(x.shape[a] for a in faxes)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(x.shape))
    w = xp.ones(x.shape, x.dtype) if mask is None else xp.broadcast_to(mask, x.shape) * 1.0
    m = xp.sum(w, axis=red, keepdims=True)
    m_safe = xp.maximum(m, 1.0)
    mu = xp.sum(w * x, axis=red, keepdims=True) / m_safe
    sigma2 = xp.sum(w * (x - mu) ** 2, axis=red, keepdims=True) / m_safe
    mu_n, s2_n = mu, sigma2
    if fallback is not None:
        mu_n = xp.where(m > 0, mu, xp.reshape(fallback[0], bshape))
        s2_n = xp.where(m > 0, sigma2, xp.reshape(fallback[1], bshape))
    xhat = (x - mu_n) / xp.sqrt(s2_n + eps)
    y = xp.reshape(gamma, bshape) * xhat + xp.reshape(beta, bshape)
    return y, xp.reshape(mu, fshape), xp.reshape(sigma2, fshape), xp.reshape(m, fshape)


def ref_train(xp, x, gamma, beta, mean0, var0, axis, eps=EPS, mask=None, momentum=MOMENTUM):
    """Algorithm 1 plus the flax-convention EMA of the (biased) batch statistics."""
    y, mu, s2, m = ref_bn(xp, x, gamma, beta, axis, eps, mask, fallback=(mean0, var0))
    seen = m > 0
    mean = xp.where(seen, momentum * mean0 + (1 - momentum) * mu, mean0)
    var = xp.where(seen, momentum * var0 + (1 - momentum) * s2, var0)
    return y, mean, var


def make_inputs(rng, shape, axis, dtype=np.float32):
    """x with a per-feature offset and spread, random gamma/beta, a non-trivial state."""
    faxes = faxes_of(len(shape), axis)
    fshape = tuple(shape[a] for a in faxes)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(shape))
    loc = rng.uniform(-3, 3, bshape)
    spread = rng.uniform(0.5, 2, bshape)
    x = (loc + spread * rng.standard_normal(shape)).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, fshape).astype(dtype)
    beta = rng.standard_normal(fshape).astype(dtype)
    mean0 = rng.standard_normal(fshape).astype(dtype)
    var0 = rng.uniform(0.5, 2, fshape).astype(dtype)
    return x, gamma, beta, mean0, var0


def bn_setup(gamma, beta, mean0, var0):
    params = BNParams(jnp.asarray(gamma), jnp.asarray(beta))
    state = bnjax.init_stats(gamma.shape, jnp.asarray(mean0).dtype)
    return params, state._replace(mean=jnp.asarray(mean0), var=jnp.asarray(var0))


def f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def make_mask(rng, shape, axis, empty_feature=True):
    """A random mask with >= 2 valid elements per feature, one feature fully masked."""
    mask = rng.random(shape) < 0.7
    faxes = faxes_of(len(shape), axis)
    first = tuple(slice(0, 2) if i == 0 else slice(None) for i in range(len(shape)))
    mask[first] = True
    if empty_feature:
        idx = tuple(0 if i in faxes else slice(None) for i in range(len(shape)))
        mask[idx] = False
    return mask


# --------------------------------------------------------------------------- Algorithm 1


class AlgorithmOneTest(chex.TestCase):
    """Outputs, batch statistics and the state update, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        *[(f"{n}_shifted", s, a, "shifted") for n, s, a in LAYOUTS],
        *[(f"{n}_two_pass", s, a, "two_pass") for n, s, a in LAYOUTS],
    )
    def test_matches_float64_numpy(self, shape, axis, method):
        rng = np.random.default_rng(0)
        x, gamma, beta, mean0, var0 = make_inputs(rng, shape, axis)
        cfg = BatchNormConfig(axis=axis, stats_method=method)
        params, state = bn_setup(gamma, beta, mean0, var0)
        step = self.variant(lambda p, s, x: F.apply_train(p, s, x, cfg))
        y, new = step(params, state, jnp.asarray(x))
        ry, rmean, rvar = ref_train(np, *map(f64, (x, gamma, beta, mean0, var0)), axis)
        assert y.shape == x.shape and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(new.mean), rmean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var), rvar, rtol=1e-5, atol=1e-6)
        n = np.prod(x.shape) // np.prod(gamma.shape)
        np.testing.assert_array_equal(np.asarray(new.count), n)
        np.testing.assert_array_equal(np.asarray(new.batches), 1)
        # batch_moments: mu_B and the *biased* sigma2_B of Algorithm 1.
        _, mu, s2, _ = ref_bn(np, f64(x), f64(gamma), f64(beta), axis)
        bm = self.variant(lambda x: F.batch_moments(x, cfg))(jnp.asarray(x))
        assert bm.mean.shape == gamma.shape
        np.testing.assert_allclose(np.asarray(bm.mean), mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(bm.var()), s2, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(n, s, a) for n, s, a in LAYOUTS])
    def test_masked_matches_numpy_and_empty_feature_keeps_state(self, shape, axis):
        rng = np.random.default_rng(1)
        x, gamma, beta, mean0, var0 = make_inputs(rng, shape, axis)
        mask = make_mask(rng, shape, axis)
        cfg = BatchNormConfig(axis=axis)
        params, state = bn_setup(gamma, beta, mean0, var0)
        step = self.variant(lambda p, s, x, m: F.apply_train(p, s, x, cfg, mask=m))
        y, new = step(params, state, jnp.asarray(x), jnp.asarray(mask))
        ry, rmean, rvar = ref_train(np, *map(f64, (x, gamma, beta, mean0, var0)), axis, mask=mask)
        # The empty feature (the first) is normalized with the running statistics.
        np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(new.mean), rmean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var), rvar, rtol=1e-5, atol=1e-6)
        first = (0,) * gamma.ndim
        assert float(new.mean[first]) == float(mean0[first])
        assert float(new.var[first]) == float(var0[first])
        assert float(new.count[first]) == 0 and float(new.batches[first]) == 0
        assert all(np.isfinite(np.asarray(a)).all() for a in new)


def test_all_masked_batch_leaves_state_unchanged(rng):
    x, gamma, beta, mean0, var0 = make_inputs(rng, (10, 4), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    before = [np.array(a) for a in state]
    y, new = F.apply_train(params, state, jnp.asarray(x), mask=jnp.zeros((10, 4), bool))
    for a, b, c in zip(before, state, new, strict=True):
        np.testing.assert_array_equal(np.asarray(b), a)  # the input state is untouched
        np.testing.assert_array_equal(np.asarray(c), a)  # and so is the new one
    # no feature has data: the whole output is the inference map of the running statistics
    np.testing.assert_allclose(np.asarray(y), eval_map(x, gamma, beta, mean0, var0),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- empty features


def eval_map(x, gamma, beta, mean, var, eps=EPS):
    """Algorithm 2 per feature (last axis), float64 NumPy."""
    return f64(gamma) * (f64(x) - f64(mean)) / np.sqrt(f64(var) + eps) + f64(beta)


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
def test_empty_feature_uses_running_statistics(grad, rng):
    """The rule for a feature without a valid element: its output is the inference map
    of the running statistics (never x / sqrt(eps)), its gradients are that map's, its
    state is unchanged; the other features are untouched by the rule."""
    x, gamma, beta, mean0, var0 = make_inputs(rng, (10, 4), -1)
    var0[1] = 1e-4  # nothing special: the running variance of the empty feature is used
    params, state = bn_setup(gamma, beta, mean0, var0)
    mask = np.ones((10, 4), bool)
    mask[:, 1] = False  # feature 1: no valid element
    mask[3:, 2] = False  # feature 2: three
    w = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
    cfg = BatchNormConfig(grad=grad)

    def loss(x, gamma, beta):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg, mask=jnp.asarray(mask))
        return jnp.sum(w * y), (y, new)

    (_, (y, new)), (gx, gg, gb) = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        jnp.asarray(x), params.scale, params.bias
    )
    ry = ref_bn(np, f64(x), f64(gamma), f64(beta), -1, mask=mask)[0]
    want = eval_map(x[:, 1], gamma[1], beta[1], mean0[1], var0[1])
    np.testing.assert_allclose(np.asarray(y[:, 1]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, [0, 2, 3]], ry[:, [0, 2, 3]], rtol=1e-4,
                               atol=2e-5)
    assert float(new.mean[1]) == float(mean0[1]) and float(new.var[1]) == float(var0[1])
    assert float(new.count[1]) == 0 and float(new.mean[2]) != float(mean0[2])
    # gradients of the inference map for feature 1: dx = gamma w / sigma, dgamma = sum w xhat
    inv = 1 / np.sqrt(f64(var0[1]) + EPS)
    wf = f64(w[:, 1])
    np.testing.assert_allclose(np.asarray(gx[:, 1]), f64(gamma[1]) * inv * wf, rtol=1e-5)
    xhat = (f64(x[:, 1]) - f64(mean0[1])) * inv
    np.testing.assert_allclose(float(gg[1]), np.sum(wf * xhat), rtol=1e-4)
    np.testing.assert_allclose(float(gb[1]), np.sum(wf), rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(np.asarray(a)).all() for a in (gx, gg, gb))


def test_empty_feature_in_one_ghost_batch(rng):
    """virtual_batch_size: a ghost batch without a valid element for a feature uses the
    running statistics for it; the other ghost batches (and the state) their own data."""
    x, gamma, beta, mean0, var0 = make_inputs(rng, (12, 3), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    mask = np.ones((12, 3), bool)
    mask[4:8, 0] = False  # ghost batch 1 has no valid element for feature 0
    mask[9, 2] = False
    cfg = BatchNormConfig(virtual_batch_size=4)
    y, new = F.apply_train(params, state, jnp.asarray(x), cfg, mask=jnp.asarray(mask))
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        ry = ref_bn(np, f64(x[rows]), f64(gamma), f64(beta), -1, mask=mask[rows],
                    fallback=(f64(mean0), f64(var0)))[0]
        np.testing.assert_allclose(np.asarray(y[rows]), ry, rtol=1e-4, atol=2e-5)
    want = eval_map(x[4:8, 0], gamma[0], beta[0], mean0[0], var0[0])
    np.testing.assert_allclose(np.asarray(y[4:8, 0]), want, rtol=1e-5, atol=1e-5)
    _, rmean, rvar = ref_train(np, *map(f64, (x, gamma, beta, mean0, var0)), -1, mask=mask)
    np.testing.assert_allclose(np.asarray(new.mean), rmean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), rvar, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", ["vjp", "jvp"])
def test_empty_feature_with_axis_name(grad, rng):
    """Over a vmap axis a feature empty on one device but not on another is not empty
    (the pooled statistics normalize it on both); one empty everywhere gets the running
    statistics. Outputs, state and gradients equal one unsharded batch with that mask."""
    x, gamma, beta, mean0, var0 = make_inputs(rng, (12, 3), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    mask = np.ones((12, 3), bool)
    mask[:6, 0] = False  # feature 0: empty on device 0 only
    mask[:, 1] = False  # feature 1: empty on both devices
    w = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)

    def sharded(x, params):
        cfg = BatchNormConfig(axis_name="d", grad=grad)
        y, new = jax.vmap(lambda x, m: F.apply_train(params, state, x, cfg, mask=m),
                          axis_name="d")(x.reshape(2, 6, 3), jnp.asarray(mask).reshape(2, 6, 3))
        return y.reshape(12, 3), jax.tree.map(lambda a: a[0], new)

    def whole(x, params):
        return F.apply_train(params, state, x, BatchNormConfig(grad=grad), mask=jnp.asarray(mask))

    (y, new), (yw, neww) = sharded(jnp.asarray(x), params), whole(jnp.asarray(x), params)
    ry = ref_train(np, *map(f64, (x, gamma, beta, mean0, var0)), -1, mask=mask)[0]
    np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-4, atol=2e-5)
    want = eval_map(x[:, 1], gamma[1], beta[1], mean0[1], var0[1])
    np.testing.assert_allclose(np.asarray(y[:, 1]), want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close((y, new), (yw, neww), rtol=1e-5, atol=1e-6)

    def loss(fn):
        return lambda x, p: jnp.sum(w * jnp.sin(fn(x, p)[0]))

    gs = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(jnp.asarray(x), params)
    gw = jax.jit(jax.grad(loss(whole), argnums=(0, 1)))(jnp.asarray(x), params)
    chex.assert_trees_all_close(gs, gw, rtol=1e-4, atol=1e-5)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(gs))


def test_mask_broadcasting_equals_full_mask(rng):
    x, gamma, beta, mean0, var0 = make_inputs(rng, (6, 3, 3, 4), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    rows = rng.random((6, 1, 1, 1)) < 0.6
    rows[:2] = True
    a = F.apply_train(params, state, jnp.asarray(x), mask=jnp.asarray(rows))
    full = jnp.asarray(np.broadcast_to(rows, x.shape))
    b = F.apply_train(params, state, jnp.asarray(x), mask=full)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


def test_eval_is_algorithm2_affine_map(rng):
    x, gamma, beta, mean0, var0 = make_inputs(rng, (8, 6, 5, 5), 1)
    cfg = BatchNormConfig(axis=1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    y = jax.jit(lambda p, s, x: F.apply_eval(p, s, x, cfg))(params, state, jnp.asarray(x))
    scale = f64(gamma) / np.sqrt(f64(var0) + EPS)
    shift = f64(beta) - scale * f64(mean0)
    ref = f64(x) * scale[:, None, None] + shift[:, None, None]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    a, b = F.inference_affine(params, state, EPS)
    np.testing.assert_allclose(np.asarray(a), scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b), shift, rtol=1e-5, atol=1e-6)
    # Per example: the output of one example does not depend on the rest of the batch.
    np.testing.assert_allclose(
        np.asarray(F.apply_eval(params, state, jnp.asarray(x[:1]), cfg)),
        np.asarray(y[:1]),
        rtol=1e-6,
        atol=1e-6,  # jit may fuse differently (FMA); the map itself is the same
    )
    # apply(train=False) is eval and returns the state itself.
    y2, s2 = F.apply(params, state, jnp.asarray(x), cfg, train=False)
    assert s2 is state
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-6, atol=1e-6)
    y3, s3 = F.apply(params, state, jnp.asarray(x), cfg, train=True)
    chex.assert_trees_all_close((y3, s3), F.apply_train(params, state, jnp.asarray(x), cfg))


def test_init_shapes_dtypes_and_flags():
    params, state = F.init((3, 4), BatchNormConfig(axis=(1, 2)))
    assert params.scale.shape == params.bias.shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(params.scale), 1)
    np.testing.assert_array_equal(np.asarray(params.bias), 0)
    np.testing.assert_array_equal(np.asarray(state.mean), 0)
    np.testing.assert_array_equal(np.asarray(state.var), 1)
    p, s = F.init(5, BatchNormConfig(use_scale=False, use_bias=False, param_dtype=jnp.bfloat16))
    assert p.scale is None and p.bias is None and s.mean.dtype == jnp.float32
    x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 5)), jnp.float32)
    y, _ = F.apply_train(p, s, x, BatchNormConfig(use_scale=False, use_bias=False))
    _, mu, s2, _ = ref_bn(np, f64(x), np.ones(5), np.zeros(5), -1)
    np.testing.assert_allclose(np.asarray(y), (f64(x) - mu) / np.sqrt(s2 + EPS), atol=1e-5)
    # Gradients without gamma / beta, every implementation, vs the plain reference.
    w = jnp.asarray(np.random.default_rng(1).standard_normal((9, 5)), jnp.float32)
    one, zero = jnp.ones(5), jnp.zeros(5)
    ref = jax.grad(lambda x: jnp.sum(w * jnp.sin(ref_bn(jnp, x, one, zero, -1)[0])))(x)
    for grad in ("vjp", "jvp", "autodiff"):
        cfg = BatchNormConfig(use_scale=False, use_bias=False, grad=grad)
        g = jax.jit(
            jax.grad(lambda x, cfg=cfg: jnp.sum(w * jnp.sin(F.apply_train(p, s, x, cfg)[0])))
        )(x)
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_output_dtype_config(rng):
    x = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    params, state = F.init(3)
    y, new = F.apply_train(params, state, x, BatchNormConfig(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
    assert F.apply_eval(params, state, x, BatchNormConfig(dtype=jnp.bfloat16)).dtype == jnp.bfloat16


def test_virtual_batch_size_is_ghost_batch_norm(rng):
    """Each ghost batch of 4 is normalized on its own; the state sees the whole batch."""
    x, gamma, beta, mean0, var0 = make_inputs(rng, (12, 3, 2), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    y, new = F.apply_train(params, state, jnp.asarray(x), BatchNormConfig(virtual_batch_size=4))
    parts = [ref_bn(np, f64(x[i : i + 4]), f64(gamma), f64(beta), -1)[0] for i in (0, 4, 8)]
    np.testing.assert_allclose(np.asarray(y), np.concatenate(parts), rtol=1e-4, atol=2e-5)
    _, rmean, rvar = ref_train(np, *map(f64, (x, gamma, beta, mean0, var0)), -1)
    np.testing.assert_allclose(np.asarray(new.mean), rmean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), rvar, rtol=1e-5, atol=1e-6)
    # Gradients (of y and the state) vs autodiff of the same plain reference per ghost batch.
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def ref_loss(x, gamma, beta):
        ys = [ref_bn(jnp, x[i : i + 4], gamma, beta, -1)[0] for i in (0, 4, 8)]
        _, mu, s2, _ = ref_bn(jnp, x, gamma, beta, -1)
        mean = MOMENTUM * mean0 + (1 - MOMENTUM) * mu
        var = MOMENTUM * var0 + (1 - MOMENTUM) * s2
        return jnp.sum(w * jnp.sin(jnp.concatenate(ys))) + jnp.sum(mean) + jnp.sum(var * var)

    args = tuple(jnp.asarray(a) for a in (x, gamma, beta))
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*args)
    for grad in ("vjp", "jvp"):
        cfg = BatchNormConfig(virtual_batch_size=4, grad=grad)

        def loss(x, gamma, beta, cfg=cfg):
            y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg)
            return jnp.sum(w * jnp.sin(y)) + jnp.sum(new.mean) + jnp.sum(new.var * new.var)

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- gradients


def _loss_fns(shape, axis, mask, cfg, use_state: bool):
    """bnjax loss and plain-jnp reference loss of (x, gamma, beta) with fixed weights."""
    rng = np.random.default_rng(7)
    fshape = tuple(shape[a] for a in faxes_of(len(shape), axis))
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cm = jnp.asarray(rng.standard_normal(fshape), jnp.float32)
    cv = jnp.asarray(rng.standard_normal(fshape), jnp.float32)
    mean0 = jnp.asarray(rng.standard_normal(fshape), jnp.float32)
    var0 = jnp.asarray(rng.uniform(0.5, 2, fshape), jnp.float32)
    k = 1.0 if use_state else 0.0

    def loss(y, mean, var):
        nonlin = jnp.sum(jnp.sin(y))
        return jnp.sum(w * y) + nonlin + k * (jnp.sum(cm * mean) + jnp.sum(cv * var))

    def bnjax_loss(x, gamma, beta):
        state = bnjax.init_stats(fshape)._replace(mean=mean0, var=var0)
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg, mask=mask)
        return loss(y, new.mean, new.var)

    def ref_loss(x, gamma, beta):
        return loss(*ref_train(jnp, x, gamma, beta, mean0, var0, axis, cfg.epsilon, mask))

    return bnjax_loss, ref_loss


GRAD_CASES = [  # (layout, masked, use_state)
    (LAYOUTS[0], False, True),
    (LAYOUTS[1], False, False),
    (LAYOUTS[1], True, True),
    (LAYOUTS[2], False, True),
    (LAYOUTS[2], True, False),
    (LAYOUTS[3], False, False),
    (LAYOUTS[3], True, True),
]


@pytest.mark.parametrize(
    "layout,masked,use_state",
    GRAD_CASES,
    ids=[f"{c[0][0]}-{'mask' if c[1] else 'nomask'}-{'y+state' if c[2] else 'y'}"
         for c in GRAD_CASES],
)
def test_gradient_matches_autodiff_of_plain_reference(layout, masked, use_state):
    """d/dx, d/dgamma, d/dbeta of a loss of y (and of the new running mean/var) for every
    gradient implementation vs JAX autodiff of the plain jnp reference, float32."""
    _, shape, axis = layout
    rng = np.random.default_rng(3)
    x, gamma, beta, _, _ = make_inputs(rng, shape, axis)
    mask = jnp.asarray(make_mask(rng, shape, axis)) if masked else None
    args = tuple(jnp.asarray(a) for a in (x, gamma, beta))
    want = None
    for grad in ("vjp", "jvp", "autodiff"):
        cfg = BatchNormConfig(axis=axis, grad=grad)
        bnjax_loss, ref_loss = _loss_fns(shape, axis, mask, cfg, use_state)
        if want is None:
            want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*args)
        got = jax.jit(jax.grad(bnjax_loss, argnums=(0, 1, 2)))(*args)
        for g, r in zip(got, want, strict=True):
            scale = float(jnp.max(jnp.abs(r)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=2e-5 * scale)


# (layout, masked, grad, modes, order). Kept small, each compiles a lot: the layouts are
# covered against the plain reference in float32 above; here every gradient implementation,
# each mode and order, with and without masks, on a spread of layouts.
CHECK_GRADS_CASES = [
    (SMALL_LAYOUTS[0], False, "vjp", ["rev"], 2),
    (SMALL_LAYOUTS[2], True, "vjp", ["rev"], 2),
    (SMALL_LAYOUTS[3], False, "vjp", ["rev"], 2),
    (SMALL_LAYOUTS[0], True, "jvp", ["fwd", "rev"], 2),
    (SMALL_LAYOUTS[1], False, "jvp", ["fwd", "rev"], 1),
    (SMALL_LAYOUTS[3], True, "autodiff", ["fwd", "rev"], 1),
]


@pytest.mark.parametrize(
    "layout,masked,grad,modes,order",
    CHECK_GRADS_CASES,
    ids=[f"{c[0][0]}-{'mask' if c[1] else 'nomask'}-{c[2]}-o{c[4]}" for c in CHECK_GRADS_CASES],
)
def test_check_grads_float64(x64, layout, masked, grad, modes, order):
    """Numerical vs analytic derivatives (orders 1 and 2) of y and the new state.

    grad="vjp" is reverse mode only (custom_vjp); "jvp" and "autodiff" do both modes.
    """
    _, shape, axis = layout
    rng = np.random.default_rng(5)
    x, gamma, beta, mean0, var0 = make_inputs(rng, shape, axis, np.float64)
    mask = jnp.asarray(make_mask(rng, shape, axis, empty_feature=False)) if masked else None
    cfg = BatchNormConfig(axis=axis, grad=grad, param_dtype=jnp.float64, momentum=0.9)
    state = bn_setup(gamma, beta, mean0, var0)[1]
    assert state.mean.dtype == jnp.float64

    @jax.jit
    def f(x, gamma, beta):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg, mask=mask)
        return y, new.mean, new.var

    check_grads(f, tuple(jnp.asarray(a) for a in (x, gamma, beta)), order=order, modes=modes)


def test_vjp_rejects_forward_mode(rng):
    """grad="vjp" is a jax.custom_vjp: forward mode raises JAX's TypeError (documented)."""
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    params, state = F.init(3)

    def f(x, cfg):
        return F.apply_train(params, state, x, cfg)[0]

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: f(x, BatchNormConfig(grad="vjp")), (x,), (x,))
    # grad="jvp" supports it, and agrees with the reverse mode of grad="vjp":
    # <J t, u> == <t, J^T u> for random t, u.
    t, u = (jnp.asarray(rng.standard_normal((8, 3)), jnp.float32) for _ in range(2))
    jvp = jax.jit(lambda x, t: jax.jvp(lambda x: f(x, BatchNormConfig(grad="jvp")), (x,), (t,)))
    vjp = jax.jit(lambda x, u: jax.vjp(lambda x: f(x, BatchNormConfig(grad="vjp")), x)[1](u))
    lhs = float(jnp.vdot(jvp(x, t)[1], u))
    rhs = float(jnp.vdot(t, vjp(x, u)[0]))
    assert abs(lhs) > 1e-2  # not trivially zero
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


# --------------------------------------------------------------------------- paper properties


# Shapes come from small sets so that the jitted functions below compile a few times
# only; the values are what hypothesis varies.
PROP_N = st.sampled_from([2, 3, 17, 60])
PROP_C = st.sampled_from([1, 4])


def _rand_case(seed, n, c):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, c) + rng.uniform(0.1, 10, c) * rng.standard_normal((n, c))
    return rng, x.astype(np.float32)


@jax.jit
def _train_vjp(gamma, x, dy):
    params = BNParams(gamma, jnp.zeros_like(gamma))
    y, pullback = jax.vjp(lambda x: F.apply_train(params, bnjax.init_stats(gamma.shape), x)[0], x)
    return y, pullback(dy)[0]


@given(seed=st.integers(0, 2**16), n=PROP_N, c=PROP_C)
def test_gradient_sums_vanish(seed, n, c):
    """sum_i dl/dx_i = 0 and sum_i dl/dx_i * xhat_i = 0 per feature (train mode).

    The second identity is exact for eps = 0; with eps > 0 the fused backward gives
    exactly ``gamma / sigma * sum(dy xhat) * eps / (sigma2 + eps)`` (sum(xhat^2) is
    m sigma2 / (sigma2 + eps)), which is what is checked.
    """
    rng, x = _rand_case(seed, n, c)
    x[:, 0] = x[:, 0] * 1e-3  # sigma2 comparable to eps: the eps term matters
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    dy = rng.standard_normal((n, c)).astype(np.float32)
    _, dx = _train_vjp(jnp.asarray(gamma), jnp.asarray(x), jnp.asarray(dy))
    dx = f64(dx)
    _, mu, s2, _ = ref_bn(np, f64(x), np.ones(c), np.zeros(c), -1)
    inv = 1 / np.sqrt(s2 + EPS)
    xhat = (f64(x) - mu) * inv
    # Rounding scale: the size of the terms that cancel, gamma / sigma * sum |dy|, and the
    # float32 rounding of x - mu relative to sigma.
    rel = 1e-5 + 8 * np.finfo(np.float32).eps * np.abs(x).max(0) * inv
    scale = rel * gamma * inv * np.abs(dy).sum(0)
    assert (np.abs(dx.sum(0)) <= scale).all()
    residual = gamma * inv * (dy * xhat).sum(0) * EPS / (s2 + EPS)
    assert (np.abs((dx * xhat).sum(0) - residual) <= scale * np.abs(xhat).max(0)).all()


@given(seed=st.integers(0, 2**16), n=PROP_N, c=PROP_C)
def test_normalized_output_moments(seed, n, c):
    """Per feature, xhat has mean 0 and variance sigma2 / (sigma2 + eps)."""
    rng, x = _rand_case(seed, n, c)
    x[:, 0] = x[:, 0] * 1e-3  # sigma2 comparable to eps: the eps term matters
    y, _ = _train_vjp(jnp.ones(c), jnp.asarray(x), jnp.zeros((n, c)))
    y = f64(y)
    s2 = f64(x).var(0)
    # float32 rounding of x - mu, relative to sigma (large when |mu| >> sigma).
    tol = 1e-6 + 8 * np.finfo(np.float32).eps * np.abs(x).max(0) / np.sqrt(s2 + EPS)
    assert (np.abs(y.mean(0)) <= tol).all()
    assert (np.abs(y.var(0) - s2 / (s2 + EPS)) <= 10 * tol).all()


@functools.cache
def _scale_invariance_fns():
    cfg = BatchNormConfig(epsilon=0.0, param_dtype=jnp.float64)

    def out(u, w, g):
        c = w.shape[1]
        params, state = F.init(c, cfg)
        return jnp.sum(g * F.apply_train(params, state, u @ w, cfg)[0])

    y = jax.jit(lambda u, w: F.apply_train(*F.init(w.shape[1], cfg), u @ w, cfg)[0])
    return y, jax.jit(jax.grad(out, argnums=(0, 1)))


@given(
    seed=st.integers(0, 2**16),
    n=st.sampled_from([3, 24]),
    k=st.sampled_from([1, 5]),
    a=st.floats(0.01, 100),
)
def test_scale_invariance(seed, n, k, a):
    """BN((aW)u) = BN(Wu); d/du equal; d/d(aW) = (1/a) d/dW (eps = 0, float64)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        u = jnp.asarray(rng.standard_normal((n, k)))
        w = jnp.asarray(rng.standard_normal((k, 3)))
        g = jnp.asarray(rng.standard_normal((n, 3)))
        y, grad = _scale_invariance_fns()
        np.testing.assert_allclose(np.asarray(y(u, a * w)), np.asarray(y(u, w)), atol=1e-7)
        du1, dw1 = grad(u, w, g)
        dua, dwa = grad(u, a * w, g)
        np.testing.assert_allclose(np.asarray(dua), np.asarray(du1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(dwa), np.asarray(dw1) / a, rtol=1e-6, atol=1e-7)


def test_scale_invariance_with_eps_float32(rng):
    """With the default eps the invariance holds up to O(eps / sigma2)."""
    u = jnp.asarray(rng.standard_normal((60, 20)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((20, 10)), jnp.float32)
    params, state = F.init(10)
    y1 = F.apply_train(params, state, u @ w)[0]
    y5 = F.apply_train(params, state, u @ (5 * w))[0]
    np.testing.assert_allclose(np.asarray(y5), np.asarray(y1), atol=2e-4)


# --------------------------------------------------------------------------- transformations


def test_vmap_normalizes_each_slice_with_its_own_statistics(rng):
    xs, gammas, betas, means, vars_ = zip(
        *[make_inputs(rng, (10, 4), -1) for _ in range(3)], strict=True
    )
    params = BNParams(jnp.asarray(np.stack(gammas)), jnp.asarray(np.stack(betas)))
    state = bnjax.init_stats((3, 4))._replace(
        mean=jnp.asarray(np.stack(means)), var=jnp.asarray(np.stack(vars_))
    )
    def loss(p, s, x):
        y, new = F.apply_train(p, s, x)
        return jnp.sum(jnp.sin(y)), new

    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
    (_, new), (gp, gx) = jax.jit(jax.vmap(one))(params, state, jnp.asarray(np.stack(xs)))
    for i in range(3):  # a Python loop over the slices, one model each
        p, s = bn_setup(gammas[i], betas[i], means[i], vars_[i])
        (_, si), (gpi, gxi) = one(p, s, jnp.asarray(xs[i]))
        pick = lambda t, i=i: jax.tree.map(lambda a: a[i], t)
        chex.assert_trees_all_close(pick((new, gp, gx)), (si, gpi, gxi), rtol=1e-5, atol=1e-6)
    y = jax.vmap(F.apply_train)(params, state, jnp.asarray(np.stack(xs)))[0]
    for i in range(3):  # the output of each slice is Algorithm 1 on that slice
        ry = ref_bn(np, f64(xs[i]), f64(gammas[i]), f64(betas[i]), -1)[0]
        np.testing.assert_allclose(np.asarray(y[i]), ry, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
def test_axis_name_pools_exactly_over_a_vmap_axis(grad, rng):
    """Statistics pooled over 3 'devices' equal one big batch: outputs, state, gradients
    (including the gradient through the returned state)."""
    x, gamma, beta, mean0, var0 = make_inputs(rng, (12, 4), -1)
    params, state = bn_setup(gamma, beta, mean0, var0)
    w = jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)
    cfg = BatchNormConfig(axis_name="d", grad=grad)

    def sharded(x, params):
        y, new = jax.vmap(
            lambda x: F.apply_train(params, state, x, cfg), axis_name="d"
        )(x.reshape(3, 4, 4))
        return y.reshape(12, 4), jax.tree.map(lambda a: a[0], new)

    def whole(x, params):
        return F.apply_train(params, state, x, BatchNormConfig(grad=grad))

    def loss(fn):
        def f(x, params):
            y, new = fn(x, params)
            return jnp.sum(w * y) + jnp.sum(new.mean * 2.0) + jnp.sum(new.var * 3.0)
        return f

    chex.assert_trees_all_close(
        jax.jit(sharded)(jnp.asarray(x), params),
        jax.jit(whole)(jnp.asarray(x), params),
        rtol=1e-5,
        atol=1e-6,
    )
    gs = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(jnp.asarray(x), params)
    gw = jax.jit(jax.grad(loss(whole), argnums=(0, 1)))(jnp.asarray(x), params)
    chex.assert_trees_all_close(gs, gw, rtol=1e-4, atol=1e-5)


def test_eval_shape(rng):
    cfg = BatchNormConfig(axis=1)
    params, state = F.init(6, cfg)
    x = jax.ShapeDtypeStruct((8, 6, 5, 5), jnp.bfloat16)
    y, new = jax.eval_shape(lambda p, s, x: F.apply_train(p, s, x, cfg), params, state, x)
    assert y.shape == (8, 6, 5, 5) and y.dtype == jnp.float32
    assert new.mean.shape == (6,) and new.mean.dtype == jnp.float32
    ye = jax.eval_shape(lambda p, s, x: F.apply_eval(p, s, x, cfg), params, state, x)
    assert ye.shape == (8, 6, 5, 5)


def test_jit_does_not_retrace_for_equal_configs(rng):
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)
        return F.apply_train(params, state, x, BatchNormConfig(axis=-1, momentum=0.9))

    def step_static(params, state, x, cfg):
        traces.append(1)
        return F.apply_train(params, state, x, cfg)

    step_static = jax.jit(step_static, static_argnums=3)
    params, state = F.init(4)
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    for _ in range(3):
        state = step(params, state, x)[1]
    assert len(traces) == 1
    traces.clear()
    for axis in ([-1], (-1,), [-1]):
        cfg = BatchNormConfig(axis=axis)
        step_static(params, state, x, cfg)
    assert len(traces) == 1  # [-1] and (-1,) compare equal after normalization
    assert BatchNormConfig(axis=[1, 2]) == BatchNormConfig(axis=(1, 2))
    assert hash(BatchNormConfig(axis=[1, 2])) == hash(BatchNormConfig(axis=(1, 2)))
    traces.clear()
    step_static(params, state, x, BatchNormConfig(momentum=0.5))
    step_static(params, state, x, BatchNormConfig(momentum=0.5))
    assert len(traces) == 1


# --------------------------------------------------------------------------- numerics


def test_large_offset_variance_float32_vs_flax(rng):
    """x = 1e4 + N(0, 1) in float32: bnjax's variance is exact to ~1e-6; flax.linen's
    default one-pass E[x^2] - E[x]^2 (use_fast_variance=True) is off by O(1)."""
    import flax.linen as nn

    x = np.asarray(1e4 + rng.standard_normal((4096, 16)), np.float32)
    ref = f64(x).var(0)
    mask = np.arange(4096)[:, None] % 4 != 0
    ref_masked = f64(x)[mask[:, 0]].var(0)
    params, state = F.init(16)
    xj = jnp.asarray(x)
    errors = {}
    for method in ("shifted", "two_pass"):
        cfg = BatchNormConfig(stats_method=method, momentum=0.0)
        errors[f"bnjax {method}"] = np.abs(f64(F.batch_moments(xj, cfg).var()) - ref) / ref
        new = F.apply_train(params, state, xj, cfg)[1]
        errors[f"bnjax {method} state"] = np.abs(f64(new.var) - ref) / ref
        new = F.apply_train(params, state, xj, cfg, mask=jnp.asarray(mask))[1]
        errors[f"bnjax {method} masked"] = np.abs(f64(new.var) - ref_masked) / ref_masked
    for fast in (True, False):
        bn = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=fast)
        _, upd = bn.apply(bn.init(jax.random.key(0), xj), xj, mutable=["batch_stats"])
        errors[f"flax fast={fast}"] = np.abs(f64(upd["batch_stats"]["var"]) - ref) / ref
    report = {k: float(v.max()) for k, v in errors.items()}
    print("max relative variance error:", report)
    for k, v in report.items():
        if k.startswith("bnjax") or k == "flax fast=False":
            assert v < 1e-3, (k, v)
    # If this ever fails, flax changed its default variance: update the docs, not bnjax.
    assert report["flax fast=True"] > 0.1, report
    # bnjax's normalized output is right too (flax's default is not).
    y = F.apply_train(params, state, xj)[0]
    np.testing.assert_allclose(f64(y).std(0), np.sqrt(ref / (ref + EPS)), rtol=1e-3)


@pytest.mark.parametrize("method", ["shifted", "two_pass"])
def test_large_offset_output_and_gradient_float32(method, rng):
    """|mean| = 1e4 std: y and dx are as accurate as float32 inputs allow.

    At 1e4 a float32 holds x only to a spacing of ~1e-3 std, and the float32
    mean is within a few spacings (two-pass: the rounding of the plain sum), so
    no method gets y closer than ~1e-3 gamma to the float64 answer. Checks that
    y and dx (and dgamma, dbeta) stay within a few spacings, i.e. at the input's
    own resolution (a cancellation in the backward or a wrong centring would show
    as O(1e-2..1) errors).
    """
    x = np.asarray(1e4 + rng.standard_normal((512, 8)), np.float32)
    dy = np.asarray(rng.standard_normal((512, 8)), np.float32)
    gamma = np.asarray(rng.uniform(0.5, 2.0, 8), np.float32)
    beta = np.asarray(rng.standard_normal(8), np.float32)
    cfg = BatchNormConfig(stats_method=method)
    state = bnjax.init_stats(8)

    def f(x, g, b):
        return F.apply_train(BNParams(g, b), state, x, cfg)[0]

    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    dx, dg, db = vjp(jnp.asarray(dy))
    ry = ref_train(np, f64(x), f64(gamma), f64(beta), np.zeros(8), np.ones(8), -1)[0]
    spacing = float(np.spacing(np.float32(1e4)))  # ~9.8e-4, std = 1
    np.testing.assert_allclose(f64(y), ry, rtol=0, atol=3 * spacing * gamma.max())
    # The paper's backward in float64.
    xc = f64(x) - f64(x).mean(0)
    inv = 1 / np.sqrt(f64(x).var(0) + EPS)
    xhat, m = xc * inv, x.shape[0]
    rdg, rdb = (f64(dy) * xhat).sum(0), f64(dy).sum(0)
    rdx = f64(gamma) * inv / m * (m * f64(dy) - rdb - xhat * rdg)
    scale = np.abs(f64(gamma) * inv).max() * np.abs(f64(dy)).max()
    np.testing.assert_allclose(f64(dx), rdx, rtol=0, atol=3 * spacing * scale)
    # dgamma sums m products dy * xhat, each off by up to ~spacing.
    assert np.all(np.abs(f64(dg) - rdg) <= 3 * spacing * np.abs(f64(dy)).sum(0)), (dg, rdg)
    np.testing.assert_allclose(f64(db), rdb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
def test_epsilon_zero_constant_feature_gives_beta_not_nan(grad, rng):
    """var + eps = 0 (a constant feature, epsilon = 0): output beta, finite gradients, in
    training and in eval, instead of 0 * inf = NaN."""
    x = np.asarray(rng.standard_normal((16, 3)), np.float32)
    x[:, 1] = 5.0
    cfg = BatchNormConfig(epsilon=0.0, grad=grad)
    params = BNParams(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([0.1, -0.2, 0.3]))
    state = bnjax.init_stats(3)

    def loss(p, x):
        y, new = F.apply_train(p, state, x, cfg)
        return jnp.sum(jnp.sin(y)), (y, new)

    (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(x)
    )
    np.testing.assert_array_equal(np.asarray(y[:, 1]), np.float32(-0.2))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((y, new, g)))
    np.testing.assert_array_equal(np.asarray(g[1][:, 1]), 0.0)
    frozen = new._replace(var=new.var.at[1].set(0.0))
    ye = F.apply_eval(params, frozen, jnp.asarray(x), cfg)
    np.testing.assert_array_equal(np.asarray(ye[:, 1]), np.float32(-0.2))


def test_empty_input_moments_are_zero_not_nan():
    from bnjax import stats

    for method in ("shifted", "two_pass"):
        m = stats.moments(jnp.ones((0, 4)), (0,), algorithm=method)
        for f in m:
            np.testing.assert_array_equal(np.asarray(f), np.zeros((1, 4)))
    m = F.batch_moments(jnp.ones((0, 5, 5, 4)))
    assert m.mean.shape == (4,) and not np.any(np.asarray(m.count))
    with pytest.raises(ValueError, match="no elements"):
        F.apply_train(*F.init(4), jnp.ones((0, 4)))


def test_state_count_and_batches_shapes_are_checked():
    params, state = F.init(4)
    x = jnp.ones((8, 4))
    for name in ("count", "batches"):
        bad = state._replace(**{name: jnp.zeros(3)})
        with pytest.raises(ValueError, match=f"state.{name} has shape"):
            F.apply_train(params, bad, x)
        with pytest.raises(ValueError, match=f"state.{name} has shape"):
            F.apply_eval(params, bad, x)


def test_inference_affine_is_at_least_float32():
    params, state = F.init(4)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
    a, b = F.inference_affine(params, low)
    assert a.dtype == b.dtype == jnp.float32


def test_auto_method_resolves_by_backend():
    from bnjax import stats

    expected = "two_pass" if jax.default_backend() == "cpu" else "shifted"
    assert stats.resolve_algorithm("auto") == expected
    assert BatchNormConfig().stats_method == "auto"
    with pytest.raises(ValueError, match="algorithm must be one of"):
        stats.resolve_algorithm("naive")


def test_bf16_input_float32_statistics(rng):
    x32 = np.asarray(2 + 3 * rng.standard_normal((64, 5, 5, 8)), np.float32)
    xb = jnp.asarray(x32, jnp.bfloat16)
    for pdt, out_dt in ((jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16)):
        cfg = BatchNormConfig(param_dtype=pdt)
        params, state = F.init(8, cfg)
        assert state.mean.dtype == jnp.float32
        y, new = jax.jit(lambda p, s, x, cfg=cfg: F.apply_train(p, s, x, cfg))(params, state, xb)
        assert y.dtype == out_dt and new.mean.dtype == new.var.dtype == jnp.float32
        xr = f64(xb.astype(jnp.float32))  # the values bnjax actually saw
        ry, rmean, rvar = ref_train(np, xr, np.ones(8), np.zeros(8), np.zeros(8), np.ones(8), -1)
        np.testing.assert_allclose(np.asarray(new.mean), rmean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var), rvar, rtol=1e-5, atol=1e-6)
        tol = 1e-5 if out_dt == jnp.float32 else 1e-2  # bf16 output rounding
        np.testing.assert_allclose(f64(y.astype(jnp.float32)), ry, rtol=tol, atol=tol * 4)
        bm = F.batch_moments(xb)
        assert bm.mean.dtype == jnp.float32
        # Gradients come back in the input's / the parameters' dtypes, and are finite.
        def loss(p, x, cfg=cfg, state=state):
            y = F.apply_train(p, state, x, cfg)[0].astype(jnp.float32)
            return jnp.sum(y * jnp.arange(8.0))

        g = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xb)
        assert g[1].dtype == jnp.bfloat16 and g[0].scale.dtype == pdt
        assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves(g))


@pytest.mark.parametrize("value", [0.0, 7.0, 1e4])
@pytest.mark.parametrize("method", ["shifted", "two_pass"])
def test_constant_feature_outputs_beta_with_finite_gradient(value, method, rng):
    x = np.asarray(rng.standard_normal((32, 3)), np.float32)
    x[:, 1] = value
    gamma = jnp.asarray([1.5, 2.0, 0.5], jnp.float32)
    beta = jnp.asarray([0.1, -0.3, 0.2], jnp.float32)
    cfg = BatchNormConfig(stats_method=method)
    state = bnjax.init_stats(3)

    def loss(x, gamma, beta):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg)
        return jnp.sum(jnp.sin(y)) + jnp.sum(new.var), (y, new)

    (_, (y, new)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        jnp.asarray(x), gamma, beta
    )
    np.testing.assert_array_equal(np.asarray(y[:, 1]), np.float32(-0.3))
    assert float(new.var[1]) == pytest.approx(0.99, abs=1e-7)  # 0.99 * 1 + 0.01 * 0
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


# --------------------------------------------------------------------------- errors


def _setup(c=10):
    return F.init(c)


def test_error_feature_mismatch():
    params, state = _setup(10)
    with pytest.raises(ValueError, match=r"params.scale has shape \(10,\).*\(4, 7\).*\(7,\)"):
        F.apply_train(params, state, jnp.ones((4, 7)))
    with pytest.raises(ValueError, match=r"params.scale has shape \(10,\).*\(4, 7\)"):
        F.apply_eval(params, state, jnp.ones((4, 7)))
    p7, _ = _setup(7)
    with pytest.raises(ValueError, match=r"state.mean has shape \(10,\).*\(4, 7\)"):
        F.apply_train(p7, state, jnp.ones((4, 7)))
    with pytest.raises(ValueError, match=r"use_scale=False"):
        F.apply_train(p7, bnjax.init_stats(7), jnp.ones((4, 7)), BatchNormConfig(use_scale=False))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_error_non_float_input(dtype):
    params, state = _setup(10)
    x = jnp.ones((4, 10), dtype)
    msg = rf"floating-point or complex x, got dtype {jnp.dtype(dtype)}.*\(4, 10\)"
    with pytest.raises(TypeError, match=msg):
        F.apply_train(params, state, x)
    with pytest.raises(TypeError, match="floating-point"):
        F.apply_eval(params, state, x)
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_moments(x)


def test_error_axis_out_of_range():
    params, state = _setup(10)
    with pytest.raises(ValueError, match=r"axis=\(2,\) is out of range.*rank 2"):
        F.apply_train(params, state, jnp.ones((4, 10)), BatchNormConfig(axis=2))
    with pytest.raises(ValueError, match=r"axis=\(-3,\) is out of range.*rank 2"):
        F.apply_eval(params, state, jnp.ones((4, 10)), BatchNormConfig(axis=-3))
    with pytest.raises(ValueError, match=r"every axis.*\(4, 10\)"):
        F.apply_train(params, state, jnp.ones((4, 10)), BatchNormConfig(axis=(0, 1)))


def test_error_bad_mask():
    params, state = _setup(10)
    x = jnp.ones((4, 10))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 3\).*input shape \(4, 10\)"):
        F.apply_train(params, state, x, mask=jnp.ones((4, 3), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array, got dtype float32"):
        F.apply_train(params, state, x, mask=jnp.ones((4, 10), jnp.float32))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        F.batch_moments(x, mask=jnp.ones((4, 10), jnp.int32))


def test_error_single_element_reduction():
    params, state = _setup(10)
    with pytest.raises(ValueError, match=r"shape \(1, 10\).*one element per feature"):
        F.apply_train(params, state, jnp.ones((1, 10)))
    with pytest.raises(ValueError, match="one element per feature"):
        F.apply_train(params, state, jnp.ones((4, 10)), BatchNormConfig(virtual_batch_size=1))
    with pytest.raises(ValueError, match=r"shape \(0, 10\).*no elements per feature"):
        F.apply_train(params, state, jnp.ones((0, 10)))
    # Inference on one example is fine.
    assert F.apply_eval(params, state, jnp.ones((1, 10))).shape == (1, 10)


def test_error_virtual_batch_size():
    params, state = _setup(10)
    with pytest.raises(ValueError, match=r"virtual_batch_size=3 does not divide.*10.*\(10, 10\)"):
        F.apply_train(params, state, jnp.ones((10, 10)), BatchNormConfig(virtual_batch_size=3))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        BatchNormConfig(virtual_batch_size=0)


def test_error_bad_config_values():
    with pytest.raises(ValueError, match="grad"):
        BatchNormConfig(grad="finite_differences")
    with pytest.raises(ValueError, match="stats_method"):
        BatchNormConfig(stats_method="naive")
    with pytest.raises(ValueError, match="momentum"):
        BatchNormConfig(momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        BatchNormConfig(epsilon=-1.0)
