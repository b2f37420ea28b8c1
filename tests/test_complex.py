"""Complex inputs: bnjax's batch norm on complex64 / complex128 arrays.

The rule (flax's): a complex mean ``mu = E[x]``, a *real* variance
``sigma2 = E|x - mu|^2``, ``y = gamma (x - mu) / sqrt(sigma2 + eps) + beta`` in the
complex output dtype; the stored running mean is complex and the running variance
real. References, all independent of bnjax's core:

* :func:`ref_bn_c`: the rule written in complex128 NumPy;
* :func:`ref_bn_jnp`: the same rule in plain ``jax.numpy``, whose *JAX autodiff* is
  the gradient reference (JAX's convention for complex gradients);
* ``flax.linen.BatchNorm(use_fast_variance=False)`` and ``flax.nnx.BatchNorm``;
* ``jax.test_util.check_grads`` (numerical derivatives in complex directions).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import bnjax
import bnjax.functional as F
import bnjax.linen as bnl
from bnjax import folding as bfold
from bnjax import recalibration as brecal
from bnjax import stats as S
from bnjax.functional import BatchNormConfig, BNParams
from bnjax.nnx import BatchNorm as NnxBatchNorm

EPS = 1e-5
FlaxBN = functools.partial(nn.BatchNorm, use_fast_variance=False)
COMPLEX_PRIMS = {"real", "imag", "conj", "complex"}


# --------------------------------------------------------------------------- references


def _axes(ndim, axis):
    axis = (axis,) if isinstance(axis, int) else axis
    faxes = tuple(sorted(a % ndim for a in axis))
    return faxes, tuple(i for i in range(ndim) if i not in faxes)


def ref_bn_c(x, gamma, beta, axis=-1, eps=EPS, mask=None):
    """Complex batch norm in complex128 NumPy: ``(y, mu, sigma2, count)`` (feature-shaped)."""
    x = np.asarray(x, np.complex128)
    faxes, red = _axes(x.ndim, axis)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(x.shape))
    fshape = tuple(x.shape[a] for a in faxes)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = w.sum(red, keepdims=True)
    mu = (w * x).sum(red, keepdims=True) / n
    var = (w * np.abs(x - mu) ** 2).sum(red, keepdims=True) / n
    gamma, beta = (np.broadcast_to(v, fshape).reshape(bshape) for v in (gamma, beta))
    y = gamma * (x - mu) / np.sqrt(var + eps) + beta
    return y, mu.reshape(fshape), var.reshape(fshape), n.reshape(fshape)


def ref_bn_jnp(x, gamma, beta, axis=-1, eps=EPS, mask=None):
    """The same rule in plain jax.numpy (for JAX-autodiff reference gradients)."""
    faxes, red = _axes(x.ndim, axis)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(x.shape))
    w = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(float)
    n = jnp.sum(w, red, keepdims=True)
    mu = jnp.sum(w * x, red, keepdims=True) / n
    d = x - mu
    var = jnp.sum(w * (d.real**2 + d.imag**2), red, keepdims=True) / n
    y = gamma.reshape(bshape) * d / jnp.sqrt(var + eps) + beta.reshape(bshape)
    return y, jnp.squeeze(mu, red), jnp.squeeze(var, red)


def cx(rng, shape, loc=0.0, spread=1.0, dtype=np.complex64):
    """Complex normal samples with a complex offset and unequal real/imaginary spreads."""
    re = rng.standard_normal(shape) * spread
    im = rng.standard_normal(shape) * 0.5 * spread
    return (loc + re + 1j * im).astype(dtype)


def _params(rng, c, dtype=np.float32):
    return rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.complex128) - np.asarray(b, np.complex128))))


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("method", ["two_pass", "shifted"])
@pytest.mark.parametrize("masked", [False, True])
def test_moments_complex_match_numpy(method, masked, rng):
    """Complex mean, real M2 = sum |x - mu|^2, exact at |mean| >> std (complex64)."""
    x = cx(rng, (40, 3), loc=3e3 - 2e3j, spread=2.0)
    mask = (rng.random((40, 3)) < 0.6) if masked else None
    if masked:
        mask[:2] = True
    m = S.moments(jnp.asarray(x), 0, mask=None if mask is None else jnp.asarray(mask),
                  algorithm=method)
    assert (m.count.dtype, m.mean.dtype, m.m2.dtype) == (jnp.float32, jnp.complex64, jnp.float32)
    _, mu, var, n = ref_bn_c(x, 1.0, 0.0, -1, 0.0, mask)
    np.testing.assert_array_equal(np.asarray(m.count[0]), n)
    assert _maxdiff(m.mean[0], mu) <= 1e-6 * 3e3
    np.testing.assert_allclose(np.asarray(m.var()[0]), var, rtol=1e-4)


def test_merge_and_all_reduce_complex(rng):
    """Chan's merge (pairwise, stacked, across a vmap axis) with |d|^2: exact pooling."""
    x = cx(rng, (24, 3), loc=5 + 5j)
    _, mu, var, _ = ref_bn_c(x, 1.0, 0.0, -1, 0.0)
    a, b = S.moments(jnp.asarray(x[:7]), 0), S.moments(jnp.asarray(x[7:]), 0)
    for m in (S.merge(a, b), S.merge_along(S.Moments(*map(jnp.stack, zip(a, b, strict=True))), 0)):
        assert _maxdiff(m.mean[0], mu) < 1e-5 and m.m2.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(m.var()[0]), var, rtol=1e-5)
    pooled = jax.jit(jax.vmap(lambda v: S.all_reduce(S.moments(v, 0), "d"), axis_name="d"))(
        jnp.asarray(x).reshape(4, 6, 3)
    )
    assert pooled.count.dtype == jnp.float32 and pooled.mean.dtype == jnp.complex64
    assert _maxdiff(pooled.mean[2, 0], mu) < 1e-5
    np.testing.assert_allclose(np.asarray(pooled.var()[2, 0]), var, rtol=1e-5)


# --------------------------------------------------------------------------- functional

LAYOUTS = [((12, 4), -1), ((4, 3, 3, 5), -1), ((4, 5, 3, 3), 1), ((3, 4, 2, 2), (1, 2))]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_apply_train_and_eval_match_numpy(shape, axis, masked, rng):
    """complex64 in: complex64 out, complex64 running mean (from a float32 one), float32
    running variance; values equal the complex128 reference; eval is the affine map."""
    faxes, _ = _axes(len(shape), axis)
    fshape = tuple(shape[a] for a in faxes)
    x = cx(rng, shape, loc=2 - 1j, spread=1.5)
    gamma, beta = _params(rng, fshape)
    mask = None
    if masked:
        mask = rng.random(shape) < 0.7
        mask[:2] = True
    cfg = BatchNormConfig(axis=axis, momentum=0.9)
    params = BNParams(jnp.asarray(gamma), jnp.asarray(beta))
    state = bnjax.init_stats(fshape)  # float32 mean, as flax makes it
    y, new = jax.jit(functools.partial(F.apply_train, config=cfg))(
        params, state, jnp.asarray(x), mask=None if mask is None else jnp.asarray(mask)
    )
    ry, mu, var, _ = ref_bn_c(x, gamma, beta, axis, EPS, mask)
    assert y.dtype == jnp.complex64 and new.mean.dtype == jnp.complex64
    assert new.var.dtype == jnp.float32 and new.count.dtype == jnp.float32
    assert _maxdiff(y, ry) < 2e-5 * np.abs(ry).max()
    assert _maxdiff(new.mean, 0.1 * mu) < 1e-6
    np.testing.assert_allclose(np.asarray(new.var), 0.9 + 0.1 * var, rtol=1e-6)
    # Algorithm 2 with the complex state: y = gamma (x - mean) / sqrt(var + eps) + beta
    ye = F.apply_eval(params, new, jnp.asarray(x), cfg)
    bshape = tuple(s if i in faxes else 1 for i, s in enumerate(shape))
    re = (gamma.reshape(bshape) * (x - np.asarray(new.mean).reshape(bshape))
          / np.sqrt(np.asarray(new.var, np.float64).reshape(bshape) + EPS) + beta.reshape(bshape))
    assert ye.dtype == jnp.complex64 and _maxdiff(ye, re) < 2e-5 * np.abs(re).max()


def test_complex128_stays_complex128(x64, rng):
    x = cx(rng, (16, 3), loc=1e4 + 1e4j, dtype=np.complex128)
    cfg = BatchNormConfig(param_dtype=jnp.float64)
    params, state = F.init(3, cfg)
    assert state.mean.dtype == jnp.float64
    y, new = F.apply_train(params, state, jnp.asarray(x), cfg)
    assert (y.dtype, new.mean.dtype, new.var.dtype) == (
        jnp.complex128, jnp.complex128, jnp.float64)
    ry, mu, var, _ = ref_bn_c(x, np.ones(3), np.zeros(3))
    assert _maxdiff(y, ry) < 1e-9 and _maxdiff(new.mean, 0.01 * mu) < 1e-9


def test_complex_params_and_output_dtype(rng):
    """Complex gamma/beta (param_dtype=complex64) work; a real output dtype for a complex
    input is an error (it would drop the imaginary part), an integer input too."""
    x = cx(rng, (10, 3), loc=1j)
    gamma = (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64)
    beta = (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64)
    params = BNParams(jnp.asarray(gamma), jnp.asarray(beta))
    cfg = BatchNormConfig(param_dtype=jnp.complex64)
    y, _ = F.apply_train(params, bnjax.init_stats(3), jnp.asarray(x), cfg)
    assert _maxdiff(y, ref_bn_c(x, gamma, beta)[0]) < 1e-5
    with pytest.raises(ValueError, match=r"dtype=float32 is real.*complex64 input.*\(10, 3\)"):
        F.apply_train(
            params, bnjax.init_stats(3), jnp.asarray(x), BatchNormConfig(dtype=jnp.float32)
        )
    with pytest.raises(TypeError, match="floating-point or complex"):
        F.apply_train(*F.init(3), jnp.ones((4, 3), jnp.int32))


def test_complex_errors_name_argument_and_shape(rng):
    """Batch Renorm on complex input, complex parameters with a real input: clear errors."""
    x = jnp.asarray(cx(rng, (6, 3)))
    cfg = BatchNormConfig(renorm=F.RenormConfig())
    with pytest.raises(TypeError, match=r"Batch Renorm.*real inputs only.*complex64 x.*\(6, 3\)"):
        F.apply_train(*F.init(3, cfg), x, cfg)
    cparams = BNParams(jnp.ones(3, jnp.complex64), jnp.zeros(3, jnp.complex64))
    with pytest.raises(TypeError, match=r"params.scale is complex64.*x \(shape \(6, 3\)\) is real"):
        F.apply_train(cparams, bnjax.init_stats(3), jnp.ones((6, 3)))
    with pytest.raises(ValueError, match=r"dtype=float32 is real.*complex64 input x.*\(6, 3\)"):
        F.apply_eval(*F.init(3), x, BatchNormConfig(dtype=jnp.float32))


@pytest.mark.parametrize("grad", ["vjp", "jvp"])
def test_complex_empty_feature_uses_running_statistics(grad, rng):
    """The empty-feature rule on complex input: a fully masked feature gets the inference
    map of the (complex mean, real var) running statistics and finite gradients."""
    x = jnp.asarray(cx(rng, (8, 3), loc=2 + 1j))
    mask = np.ones((8, 3), bool)
    mask[:, 2] = False
    mean0 = jnp.asarray(cx(rng, (3,)))
    var0 = jnp.asarray([0.5, 2.0, 1e-3], jnp.float32)
    state = bnjax.init_stats(3)._replace(mean=mean0, var=var0)
    gamma, beta = map(jnp.asarray, _params(rng, 3))

    def f(x, gamma):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, BatchNormConfig(grad=grad),
                               mask=jnp.asarray(mask))
        return jnp.sum(jnp.abs(y) ** 2), (y, new)

    (_, (y, new)), (gx, gg) = jax.value_and_grad(f, (0, 1), has_aux=True)(x, gamma)
    xn = np.asarray(x, np.complex128)[:, 2]
    want = gamma[2] * (xn - complex(mean0[2])) / np.sqrt(float(var0[2]) + EPS) + beta[2]
    assert _maxdiff(y[:, 2], want) < 1e-5 * np.abs(want).max()
    ry = ref_bn_c(np.asarray(x)[:, :2], gamma[:2], beta[:2])[0]
    assert _maxdiff(y[:, :2], ry) < 2e-5 * np.abs(ry).max()
    assert complex(new.mean[2]) == complex(mean0[2]) and float(new.var[2]) == float(var0[2])
    # the inference map's gradient: d|y|^2/dx = 2 conj(y) gamma / sigma (JAX's convention)
    inv = 1 / np.sqrt(float(var0[2]) + EPS)
    assert _maxdiff(gx[:, 2], 2 * np.conj(want) * float(gamma[2]) * inv) < 1e-4 * np.abs(
        2 * want * inv).max()
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gg)).all()


# --------------------------------------------------------------------------- gradients


def _loss(y, mean, var, wy, wm, wv):
    """A real loss of a complex output and the new (complex mean, real var) state."""
    return (jnp.sum(jnp.real(wy * y) + jnp.abs(y) ** 2 * 0.1)
            + jnp.sum(jnp.real(wm * mean)) + jnp.sum(wv * var))


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_jax_autodiff_of_plain_reference(grad, masked, rng):
    """d/dx (complex), d/dgamma, d/dbeta (real) through y and the new state, vs JAX
    autodiff of the plain jnp rule (same complex-gradient convention)."""
    shape = (6, 2, 2, 3)
    x = jnp.asarray(cx(rng, shape, loc=1 + 2j))
    gamma, beta = map(jnp.asarray, _params(rng, 3))
    mask = None
    if masked:
        m = rng.random(shape) < 0.7
        m[:2] = True
        mask = jnp.asarray(m)
    wy = jnp.asarray(cx(rng, shape))
    wm, wv = jnp.asarray(cx(rng, (3,))), jnp.asarray(rng.standard_normal(3), jnp.float32)
    mom = 0.9
    cfg = BatchNormConfig(grad=grad, momentum=mom)

    def bn_loss(x, gamma, beta):
        y, new = F.apply_train(BNParams(gamma, beta), bnjax.init_stats(3), x, cfg, mask=mask)
        return _loss(y, new.mean, new.var, wy, wm, wv)

    def ref_loss(x, gamma, beta):
        y, mu, var = ref_bn_jnp(x, gamma, beta, mask=mask)
        return _loss(y, (1 - mom) * mu, mom + (1 - mom) * var, wy, wm, wv)

    got = jax.jit(jax.grad(bn_loss, argnums=(0, 1, 2)))(x, gamma, beta)
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(x, gamma, beta)
    assert got[0].dtype == jnp.complex64 and got[1].dtype == got[2].dtype == jnp.float32
    for g, w in zip(got, want, strict=True):
        assert _maxdiff(g, w) < 1e-4 * float(jnp.max(jnp.abs(w))), (grad, _maxdiff(g, w))


CHECK_GRADS_CASES = [  # (grad, modes, masked, axis_name, order); "autodiff" is JAX's own
    ("vjp", ["rev"], False, False, 2),
    ("vjp", ["rev"], True, True, 1),
    ("jvp", ["fwd", "rev"], True, False, 1),
]


@pytest.mark.parametrize("grad,modes,masked,axis_name,order", CHECK_GRADS_CASES)
def test_check_grads_complex128(x64, grad, modes, masked, axis_name, order):
    """Numerical vs analytic derivatives in complex directions, of y and the new state
    (complex cotangents through the custom_vjp / custom_jvp), also over a vmap axis."""
    rng = np.random.default_rng(7)
    shape = (8, 3)
    x = jnp.asarray(cx(rng, shape, loc=1 - 1j, dtype=np.complex128))
    gamma, beta = map(jnp.asarray, _params(rng, 3, np.float64))
    mask = None
    if masked:
        m = rng.random(shape) < 0.75
        m[:2] = m[4:6] = True
        mask = jnp.asarray(m)
    cfg = BatchNormConfig(grad=grad, param_dtype=jnp.float64, momentum=0.9,
                          axis_name="d" if axis_name else None)
    state = bnjax.init_stats(3, jnp.float64)

    def one(x, gamma, beta, mask):
        y, new = F.apply_train(BNParams(gamma, beta), state, x, cfg, mask=mask)
        return y, new.mean, new.var

    if axis_name:
        def f(x, gamma, beta):
            xs = x.reshape(2, 4, 3)
            ms = None if mask is None else mask.reshape(2, 4, 3)
            y, mean, var = jax.vmap(lambda a, m: one(a, gamma, beta, m), axis_name="d",
                                    in_axes=(0, None if ms is None else 0))(xs, ms)
            return y.reshape(shape), mean[0], var[0]
    else:
        def f(x, gamma, beta):
            return one(x, gamma, beta, mask)

    # (not jitted: differentiating a jit of a vmap with axis_name through the custom_vjp
    # hits an unbound axis name in the backward pass, also for real inputs)
    check_grads(f if axis_name else jax.jit(f), (x, gamma, beta), order=order, modes=modes)


# --------------------------------------------------------------------------- modules vs flax


class _Net(nn.Module):
    """Complex Dense -> BN -> |.|-ish nonlinearity -> Dense, with either BatchNorm."""

    bn: type = bnl.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = nn.Dense(6, use_bias=False, param_dtype=jnp.complex64)(x)
        x = self.bn(momentum=0.8)(x, use_running_average=not train, mask=mask)
        x = x * jax.nn.sigmoid(jnp.abs(x))
        return nn.Dense(2, param_dtype=jnp.complex64)(x)


@pytest.mark.parametrize("masked", [False, True])
def test_linen_matches_flax_linen(masked, rng):
    """bnjax.linen.BatchNorm vs flax.linen.BatchNorm(use_fast_variance=False) on complex
    input: outputs, running statistics after three steps, eval outputs, gradients."""
    x = jnp.asarray(cx(rng, (3, 16, 5), loc=1 + 0.5j))
    masks = [None] * 3
    if masked:
        masks = [jnp.asarray(rng.random((16, 1)) < 0.7) for _ in range(3)]
    ours, ref = _Net(bnl.BatchNorm), _Net(FlaxBN)
    v = ours.init(jax.random.key(0), x[0], train=False)
    fv = ref.init(jax.random.key(0), x[0], train=False)
    chex_params = jax.tree.map(lambda a, b: _maxdiff(a, b), v["params"], fv["params"])
    assert max(jax.tree.leaves(chex_params)) == 0.0
    # flax stores a float32 mean until the first update, bnjax complex64 from init
    assert fv["batch_stats"]["BatchNorm_0"]["mean"].dtype == jnp.float32
    assert v["batch_stats"]["BatchNorm_0"]["mean"].dtype == jnp.complex64

    @functools.partial(jax.jit, static_argnums=0)
    def step(model, variables, x, mask):
        def loss(params):
            out, upd = model.apply({**variables, "params": params}, x, train=True, mask=mask,
                                   mutable=["batch_stats"])
            return jnp.sum(jnp.abs(out) ** 2), (out, upd)
        (_, (out, upd)), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        gx = jax.grad(lambda x: jnp.sum(jnp.abs(model.apply(
            variables, x, train=True, mask=mask, mutable=["batch_stats"])[0]) ** 2))(x)
        return out, {**variables, **upd}, g, gx

    diffs = {"y": 0.0, "grad_params_rel": 0.0, "grad_x": 0.0}
    for i in range(3):
        out, v, g, gx = step(ours, v, x[i], masks[i])
        rout, fv, rg, rgx = step(ref, fv, x[i], masks[i])
        diffs["y"] = max(diffs["y"], _maxdiff(out, rout))
        scale = max(jax.tree.leaves(jax.tree.map(lambda a: float(jnp.abs(a).max()), rg)))
        rel = max(jax.tree.leaves(jax.tree.map(_maxdiff, g, rg))) / scale
        diffs["grad_params_rel"] = max(diffs["grad_params_rel"], rel)
        diffs["grad_x"] = max(diffs["grad_x"], _maxdiff(gx, rgx))
    bs, fbs = v["batch_stats"]["BatchNorm_0"], fv["batch_stats"]["BatchNorm_0"]
    assert (bs["mean"].dtype, bs["var"].dtype) == (fbs["mean"].dtype, fbs["var"].dtype) == (
        jnp.complex64, jnp.float32)
    diffs["mean"], diffs["var"] = _maxdiff(bs["mean"], fbs["mean"]), _maxdiff(bs["var"], fbs["var"])
    ye = ours.apply(v, x[0], train=False)
    diffs["eval"] = _maxdiff(ye, ref.apply(fv, x[0], train=False))
    # variables cross-load both ways (flax's fresh float32 mean included)
    diffs["cross"] = _maxdiff(ours.apply(fv, x[0], train=False), ref.apply(v, x[0], train=False))
    print("complex linen vs flax, max abs diff:", diffs)
    assert max(diffs.values()) < 2e-5, diffs


def test_linen_axis_name_matches_flax_under_vmap(rng):
    """Pooled over a vmap axis (equal per-device counts: flax's pmean of means is exact)."""
    x = jnp.asarray(cx(rng, (4, 6, 3), loc=2j))

    def run(bn):
        m = bn(axis_name="d", momentum=0.5)
        v = m.init(jax.random.key(0), x[0], use_running_average=False)

        def f(xi):
            return m.apply(v, xi, use_running_average=False, mutable=["batch_stats"])

        return jax.jit(jax.vmap(f, axis_name="d"))(x)

    (y, s), (ry, rs) = run(bnl.BatchNorm), run(FlaxBN)
    whole = ref_bn_c(np.asarray(x).reshape(24, 3), np.ones(3), np.zeros(3))[0]
    assert _maxdiff(y.reshape(24, 3), whole) < 2e-5
    assert _maxdiff(y, ry) < 2e-5
    assert _maxdiff(s["batch_stats"]["mean"], rs["batch_stats"]["mean"]) < 1e-6
    np.testing.assert_allclose(s["batch_stats"]["var"], rs["batch_stats"]["var"], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_nnx_matches_flax_nnx(rng):
    """bnjax.nnx.BatchNorm vs flax.nnx.BatchNorm and NumPy: two complex training calls,
    then eval. bnjax's float32 mean turns complex64 (flax.linen's convention); flax.nnx
    0.12 keeps it float32, i.e. drops its imaginary part: only the real part is compared
    with flax.nnx, the whole mean (and the eval output) with NumPy."""
    x = cx(rng, (2, 12, 4), loc=-1 + 3j)
    ours = NnxBatchNorm(4, momentum=0.7, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(4, momentum=0.7, use_fast_variance=False, rngs=nnx.Rngs(0))
    mean, var = np.zeros(4, np.complex128), np.ones(4)
    for i in range(2):
        assert _maxdiff(ours(jnp.asarray(x[i])), ref(jnp.asarray(x[i]))) < 2e-5
        _, mu, v, _ = ref_bn_c(x[i], 1.0, 0.0)
        mean, var = 0.7 * mean + 0.3 * mu, 0.7 * var + 0.3 * v
    assert ours.mean[...].dtype == jnp.complex64 and ours.var[...].dtype == jnp.float32
    assert _maxdiff(ours.mean[...], mean) < 1e-5
    np.testing.assert_allclose(np.asarray(ours.var[...]), var, rtol=1e-5)
    assert _maxdiff(np.real(ours.mean[...]), ref.mean[...]) < 1e-6
    assert _maxdiff(ours.var[...], ref.var[...]) < 1e-6
    ours.eval()
    want = (x[0] - mean) / np.sqrt(var + EPS)
    assert _maxdiff(ours(jnp.asarray(x[0])), want) < 2e-5 * np.abs(want).max()


# --------------------------------------------------------------------------- fold, recalibrate


def test_fold_complex_dense(rng):
    """A complex Dense -> BatchNorm folds into one complex Dense equal to the eval network."""
    model = nn.Sequential([nn.Dense(4, param_dtype=jnp.complex64),
                           bnl.BatchNorm(use_running_average=True)])
    x = jnp.asarray(cx(rng, (16, 5), loc=1j))
    v = model.init(jax.random.key(0), x)
    # a trained-looking complex state
    bs = {"mean": jnp.asarray(cx(rng, (4,))),
          "var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)}
    v = {**v, "batch_stats": {"layers_1": bs}}
    folded, fvars = bfold.fold_sequential(model, v)
    want = model.apply(v, x)
    got = folded.apply(fvars, x)
    assert got.dtype == jnp.complex64 and _maxdiff(got, want) < 1e-5 * float(jnp.abs(want).max())
    # the folded bias is complex even for a real kernel (the BN mean is complex)
    k, b = bfold.fold_linear(jnp.ones((5, 4)), None, *bfold.affine({}, bs))
    assert k.dtype == jnp.float32 and b.dtype == jnp.complex64
    assert _maxdiff(b, -np.asarray(bs["mean"]) / np.sqrt(np.asarray(bs["var"]) + EPS)) < 1e-5


def test_recalibrate_complex_matches_numpy_population_average(rng):
    """PreciseBN on complex activations: the count-weighted mean of the batch means and
    the pooled unbiased within-batch variance sum_B M2_B / sum_B (n_B - 1), |.|^2."""
    model = bnl.BatchNorm(momentum=0.9)
    batches = [jnp.asarray(cx(rng, (n, 3), loc=3 - 1j)) for n in (8, 5, 11)]
    v = model.init(jax.random.key(0), batches[0], use_running_average=True)
    new = brecal.recalibrate(model, v, batches, use_running_average=True)
    xs = [np.asarray(b, np.complex128) for b in batches]
    n = sum(len(b) for b in xs)
    mean = sum(len(b) * b.mean(0) for b in xs) / n
    m2 = sum((np.abs(b - b.mean(0)) ** 2).sum(0) for b in xs)
    var = m2 / (n - len(xs))
    assert new["batch_stats"]["mean"].dtype == jnp.complex64
    assert _maxdiff(new["batch_stats"]["mean"], mean) < 1e-5
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["var"]), var, rtol=1e-5)


# --------------------------------------------------------------------------- real path unchanged


@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
def test_real_inputs_trace_no_complex_op(grad):
    """Real inputs: the jaxpr of the forward + backward pass (masked and not) has no
    complex primitive and no complex dtype, i.e. the complex support costs nothing."""
    x = jnp.ones((8, 3))
    for mask in (None, jnp.ones((8, 1), bool)):
        cfg = BatchNormConfig(grad=grad)

        def loss(p, x, mask=mask, cfg=cfg):
            y, s = F.apply_train(p, bnjax.init_stats(3), x, cfg, mask=mask)
            return jnp.sum(y**2) + jnp.sum(s.var)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(F.init(3)[0], x)
        text = str(jaxpr)
        prims = {e.primitive.name for e in _all_eqns(jaxpr.jaxpr)}
        assert not prims & COMPLEX_PRIMS, prims & COMPLEX_PRIMS
        assert "c64" not in text and "c128" not in text


def _all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' params."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(q, "jaxpr", q)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)
