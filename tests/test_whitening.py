"""Batch whitening (bnjax.whitening, linen/NNX BatchWhitening) against float64 NumPy references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import bnjax
from bnjax import whitening as W
from bnjax.functional import BNParams

# --------------------------------------------------------------------------- references


def np_inv_sqrt(s: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(s)
    return (u / np.sqrt(lam)) @ u.T


def np_groups_cov(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean ``(g, G)`` and biased covariance ``(g, G, G)`` of rows ``x (m, d)``."""
    m, d = x.shape
    xg = x.reshape(m, d // size, size)
    mu = xg.mean(0)
    xc = xg - mu
    return mu, np.einsum("mgi,mgj->gij", xc, xc) / m


def np_zca(x: np.ndarray, size: int, eps: float) -> np.ndarray:
    """``Sigma^(-1/2) (x - mu)`` per group (block-diagonal), rows ``(m, d)``."""
    mu, cov = np_groups_cov(x, size)
    m, d = x.shape
    xc = x.reshape(m, d // size, size) - mu
    out = [xc[:, k] @ np_inv_sqrt(cov[k] + eps * np.eye(size)).T for k in range(d // size)]
    return np.stack(out, 1).reshape(m, d)


def np_newton_schulz(s: np.ndarray, iterations: int) -> np.ndarray:
    tr = np.trace(s)
    sn = s / tr
    p = np.eye(s.shape[0])
    for _ in range(iterations):
        p = 0.5 * (3 * p - np.linalg.matrix_power(p, 3) @ sn)
    return p / np.sqrt(tr)


def correlated(rng, m, d, *, offset=0.0):
    """Rows with a random full covariance (condition number ~10-100)."""
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return rng.normal(size=(m, d)) @ a + offset


# Compiled (the config is static): one XLA program per shape instead of op-by-op dispatch,
# which keeps this file fast; shape / dtype validation still raises while tracing.
_apply_train = jax.jit(W.apply_train, static_argnums=3)


def train(cfg, x, **kw):
    params, state = W.init(x.shape[cfg.axis], cfg)
    return _apply_train(params, state, jnp.asarray(x), cfg, **kw)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("size", [2, 4, 12])
def test_zca_equals_numpy_eigh_blockdiag(x64, rng, size):
    x = correlated(rng, 300, 12, offset=5.0)
    cfg = W.WhiteningConfig(group_size=size, epsilon=1e-3)
    y, _ = train(cfg, x)
    np.testing.assert_allclose(np.asarray(y), np_zca(x, size, 1e-3), rtol=1e-10, atol=1e-10)


def test_zca_covariance_identity_per_group_cross_groups_kept(x64, rng):
    x = correlated(rng, 500, 8)
    y, _ = train(W.WhiteningConfig(group_size=4, epsilon=0.0), x)
    y = np.asarray(y)
    c = np.cov(y.T, bias=True)
    for k in range(2):
        blk = c[4 * k : 4 * k + 4, 4 * k : 4 * k + 4]
        np.testing.assert_allclose(blk, np.eye(4), atol=1e-10)
    # Across groups: W_1 C_12 W_2^T, not zero (DBN does not decorrelate groups).
    _, cov = np_groups_cov(x, 4)
    c12 = np.cov(x.T, bias=True)[:4, 4:]
    want = np_inv_sqrt(cov[0]) @ c12 @ np_inv_sqrt(cov[1]).T
    np.testing.assert_allclose(c[:4, 4:], want, atol=1e-10)
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_iternorm_equals_numpy_iteration(x64, rng, iterations):
    x = correlated(rng, 200, 8, offset=-3.0)
    cfg = W.WhiteningConfig(group_size=4, method="iternorm", iterations=iterations, epsilon=1e-4)
    y, _ = train(cfg, x)
    mu, cov = np_groups_cov(x, 4)
    xc = x.reshape(200, 2, 4) - mu
    want = np.stack(
        [xc[:, k] @ np_newton_schulz(cov[k] + 1e-4 * np.eye(4), iterations).T for k in range(2)],
        1,
    ).reshape(200, 8)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-10, atol=1e-10)


def test_iternorm_matches_zca_when_well_conditioned(x64, rng):
    a = np.diag(np.linspace(1.0, 1.6, 6)) + 0.05 * rng.normal(size=(6, 6))
    x = rng.normal(size=(400, 6)) @ a
    zca, _ = train(W.WhiteningConfig(), x)
    it, _ = train(W.WhiteningConfig(method="iternorm", iterations=10), x)
    np.testing.assert_allclose(np.asarray(it), np.asarray(zca), atol=1e-6)
    it5, _ = train(W.WhiteningConfig(method="iternorm", iterations=2), x)
    assert np.abs(np.asarray(it5) - np.asarray(zca)).max() > 1e-3  # T matters


def test_conv_layouts_reduce_over_nhw(x64, rng):
    x = correlated(rng, 4 * 5 * 6, 8).reshape(4, 5, 6, 8)
    cfg = W.WhiteningConfig(group_size=4)
    y, st = train(cfg, x)
    y2, st2 = train(cfg, x.reshape(-1, 8))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), np.asarray(y2), atol=1e-12)
    nchw = np.transpose(x, (0, 3, 1, 2))
    y3, st3 = train(W.WhiteningConfig(group_size=4, axis=1), nchw)
    y3 = np.transpose(np.asarray(y3), (0, 2, 3, 1))
    np.testing.assert_allclose(y3, np.asarray(y), atol=1e-12)
    np.testing.assert_allclose(st3.whitening, st.whitening, atol=1e-12)


def test_bf16_input_float32_statistics(rng):
    x = jnp.asarray(correlated(rng, 256, 8, offset=100.0), jnp.bfloat16)
    y, st = train(W.WhiteningConfig(group_size=4, dtype=jnp.bfloat16), x)
    assert y.dtype == jnp.bfloat16 and st.cov.dtype == jnp.float32
    assert train(W.WhiteningConfig(group_size=4), x)[0].dtype == jnp.float32  # as flax
    assert st.whitening.dtype == jnp.float32
    ref = np_zca(np.asarray(x, np.float64), 4, 1e-5)
    assert np.abs(np.asarray(y, np.float64) - ref).max() < 0.05  # bf16 output rounding only


def test_covariance_exact_when_mean_dominates(rng):
    """Centred two-pass covariance in float32: E[x x^T] - mu mu^T would lose it at |mu| = 1e3."""
    x = (1e3 + correlated(rng, 512, 8)).astype(np.float32)
    cm = W.batch_comoments(jnp.asarray(x), W.WhiteningConfig(group_size=4))
    _, cov = np_groups_cov(x.astype(np.float64), 4)
    np.testing.assert_allclose(np.asarray(cm.cov()), cov, rtol=0, atol=2e-5 * np.abs(cov).max())


def test_mask_selects_examples(x64, rng):
    x = correlated(rng, 120, 8)
    keep = rng.random(120) < 0.6
    cfg = W.WhiteningConfig(group_size=4)
    y, st = train(cfg, x, mask=jnp.asarray(keep)[:, None])
    y_ref, st_ref = train(cfg, x[keep])
    np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(y_ref), atol=1e-10)
    np.testing.assert_allclose(st.whitening, st_ref.whitening, atol=1e-12)
    with pytest.raises(NotImplementedError, match="feature axis"):
        train(cfg, x, mask=jnp.ones((120, 8), bool))


# --------------------------------------------------------------------------- gradients


def test_inv_sqrtm_repeated_eigenvalues_divided_difference(x64):
    s = 2.0 * jnp.eye(3)
    g = jax.jit(jax.grad(lambda s: W.inv_sqrtm(s)[0, 0]))(s)
    np.testing.assert_allclose(g[0, 0], -0.5 * 2.0**-1.5, rtol=1e-12)
    assert np.all(np.isfinite(g))
    # Plain autodiff through eigh is not finite here (why the custom rule exists).
    def plain(s):
        lam, u = jnp.linalg.eigh(s)
        return ((u / jnp.sqrt(lam)) @ u.T)[0, 0]

    assert not np.all(np.isfinite(jax.jit(jax.grad(plain))(s)))
    # First order at repeated eigenvalues; second order (the rule's own derivative
    # goes through eigh) only where they are distinct.
    f = jax.jit(W.inv_sqrtm)  # one compilation instead of eager op-by-op dispatch
    check_grads(f, (s,), order=1, modes=["fwd", "rev"])
    check_grads(f, (jnp.diag(jnp.array([1.0, 1.0, 3.0])),), order=1, modes=["rev"])
    s2 = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 3.0]])
    check_grads(f, (s2,), order=2, modes=["rev"])


@pytest.mark.parametrize("method", ["zca", "iternorm"])
def test_gradients_match_finite_differences(x64, rng, method):
    x = jnp.asarray(correlated(rng, 40, 6, offset=2.0))
    cfg = W.WhiteningConfig(group_size=3, method=method, epsilon=1e-3)
    params, state = W.init(6, cfg)
    params = BNParams(jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.normal(size=6)))
    proj = jnp.asarray(rng.normal(size=(40, 6)))

    @jax.jit
    def f(x, scale, bias):
        y, _ = W.apply_train(BNParams(scale, bias), state, x, cfg)
        return jnp.sum(jnp.sin(y) * proj)

    check_grads(f, (x, params.scale, params.bias), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_gradients_with_repeated_eigenvalues_and_identical_features(x64, rng):
    cfg = W.WhiteningConfig(group_size=4, epsilon=1e-3)
    # (a) an exactly white batch: every eigenvalue of Sigma + eps I equals 1 + eps.
    z = rng.normal(size=(50, 4))
    z = z - z.mean(0)
    z = z @ np_inv_sqrt(z.T @ z / 50)
    # (b) two identical features (one eigenvalue is eps alone).
    dup = correlated(rng, 50, 4)
    dup[:, 1] = dup[:, 0]
    params, state = W.init(4, cfg)
    proj = jnp.asarray(rng.normal(size=(50, 4)))

    @jax.jit
    def f(x):
        return jnp.sum(jnp.tanh(W.apply_train(params, state, x, cfg)[0]) * proj)

    for x in (z, dup):
        g = jax.grad(f)(jnp.asarray(x))
        assert np.all(np.isfinite(g))
        check_grads(f, (jnp.asarray(x),), order=1, modes=["rev", "fwd"], eps=1e-6)


def test_jit_vmap_grad(rng):
    cfg = W.WhiteningConfig(group_size=4, method="zca")
    xs = jnp.asarray(correlated(rng, 3 * 64, 8).reshape(3, 64, 8), jnp.float32)
    params, state = W.init(8, cfg)
    run = lambda x: W.apply_train(params, state, x, cfg)
    y_v, st_v = jax.jit(jax.vmap(run))(xs)
    for k in range(3):
        y_k, st_k = jax.jit(run)(xs[k])
        xk = np.asarray(xs[k], np.float64)
        np.testing.assert_allclose(y_k, np_zca(xk, 4, 1e-5), atol=2e-4)
        np.testing.assert_allclose(y_v[k], y_k, atol=1e-5)
        np.testing.assert_allclose(st_v.whitening[k], st_k.whitening, atol=1e-5)
    g = jax.jit(jax.grad(lambda x: jnp.sum(run(x)[0] ** 3)))(xs[0])
    assert g.shape == xs[0].shape and np.all(np.isfinite(g))


# --------------------------------------------------------------------------- population


def test_ema_and_eval_per_example(x64, rng):
    cfg = W.WhiteningConfig(group_size=4, momentum=0.7, epsilon=1e-3, param_dtype=jnp.float64)
    params, state = W.init(8, cfg)
    params = BNParams(jnp.asarray(rng.normal(size=8)), jnp.asarray(rng.normal(size=8)))
    batches = [correlated(rng, 64, 8, offset=1.0) for _ in range(3)]
    mean, wm = np.zeros(8), np.stack([np.eye(4)] * 2)
    for b in batches:
        _, state = _apply_train(params, state, jnp.asarray(b), cfg)
        mu, cov = np_groups_cov(b, 4)
        mean = 0.7 * mean + 0.3 * mu.reshape(-1)
        wb = np.stack([np_inv_sqrt(cov[k] + 1e-3 * np.eye(4)) for k in range(2)])
        wm = 0.7 * wm + 0.3 * wb
    np.testing.assert_allclose(state.mean, mean, atol=1e-12)
    np.testing.assert_allclose(state.whitening, wm, atol=1e-10)
    x = correlated(rng, 5, 8)
    gamma, beta = np.asarray(params.scale), np.asarray(params.bias)
    want = np.concatenate(
        [(x[:, 4 * k : 4 * k + 4] - mean[4 * k : 4 * k + 4]) @ wm[k].T for k in range(2)], 1
    ) * gamma + beta
    y = W.apply_eval(params, state, jnp.asarray(x), cfg)
    np.testing.assert_allclose(y, want, atol=1e-12)
    np.testing.assert_allclose(W.apply_eval(params, state, jnp.asarray(x[2:3]), cfg), want[2:3])


def test_average_population_is_pooled_within_batch_covariance(x64, rng):
    cfg = W.WhiteningConfig(
        group_size=4, population="average", epsilon=1e-3, param_dtype=jnp.float64
    )
    params, state = W.init(8, cfg)
    batches = [correlated(rng, n, 8, offset=k) for k, n in enumerate((30, 50, 40))]
    for b in batches:
        _, state = _apply_train(params, state, jnp.asarray(b), cfg)
    c2 = sum(np_groups_cov(b, 4)[1] * len(b) for b in batches)
    cov = c2 / sum(len(b) - 1 for b in batches)
    np.testing.assert_allclose(state.cov, cov, rtol=1e-10)
    np.testing.assert_allclose(state.mean, np.concatenate(batches).mean(0), rtol=1e-10)
    wants = [np_inv_sqrt(cov[k] + 1e-3 * np.eye(4)) for k in range(2)]
    np.testing.assert_allclose(state.whitening, np.stack(wants), rtol=1e-8)
    # A fresh average after reset_population: only the new batch counts.
    state = bnjax.reset_population(state)
    _, state = _apply_train(params, state, jnp.asarray(batches[0]), cfg)
    np.testing.assert_allclose(state.cov, np_groups_cov(batches[0], 4)[1] * 30 / 29, rtol=1e-10)


# --------------------------------------------------------------------------- errors


def test_singular_batch_is_an_error_unless_allowed(rng):
    x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    with pytest.raises(ValueError, match=r"8 example\(s\).*group_size=16"):
        train(W.WhiteningConfig(group_size=16), x)
    with pytest.raises(ValueError, match="group_size=8"):  # m = G is singular too
        train(W.WhiteningConfig(group_size=8), x)
    y, st = train(W.WhiteningConfig(group_size=16, allow_singular=True, epsilon=1e-3), x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(st.whitening))
    train(W.WhiteningConfig(group_size=4), x)  # m > G: fine


def test_bad_inputs(rng):
    x = jnp.asarray(rng.normal(size=(32, 12)), jnp.float32)
    with pytest.raises(ValueError, match="group_size=5 does not divide the 12 features"):
        train(W.WhiteningConfig(group_size=5), x)
    # The layer's own check (stats.comoments has another one, for the train path only).
    cfg5 = W.WhiteningConfig(group_size=5)
    with pytest.raises(ValueError, match="group_size=5 does not divide the 12 features of the"):
        W.init(12, cfg5)
    with pytest.raises(ValueError, match="group_size=5 does not divide the 12 features of the"):
        W.apply_eval(*W.init(12, W.WhiteningConfig(group_size=4)), x, cfg5)
    with pytest.raises(TypeError, match=r"floating-point x, got dtype int32 \(shape \(32, 12\)\)"):
        W.apply_train(*W.init(12, W.WhiteningConfig()), jnp.ones((32, 12), jnp.int32))
    with pytest.raises(ValueError, match=r"axis=\(2,\) is out of range .* shape \(32, 12\)"):
        W.apply_train(*W.init(12, W.WhiteningConfig()), x, W.WhiteningConfig(axis=2))
    with pytest.raises(ValueError, match="one feature axis"):
        W.WhiteningConfig(axis=(0, 1))
    with pytest.raises(ValueError, match="method"):
        W.WhiteningConfig(method="pca")
    with pytest.raises(ValueError, match="iterations"):
        W.WhiteningConfig(iterations=0)
    params, state = W.init(12, W.WhiteningConfig(group_size=4))
    with pytest.raises(ValueError, match=r"state.whitening has shape \(3, 4, 4\)"):
        W.apply_train(params, state, x, W.WhiteningConfig(group_size=6))
    with pytest.raises(ValueError, match="params.scale"):
        W.apply_eval(params, state, x[:, :8], W.WhiteningConfig(group_size=4))


# --------------------------------------------------------------------------- modules


def test_linen_module_whitens_and_evaluates(rng):
    x = jnp.asarray(correlated(rng, 2000, 16, offset=3.0), jnp.float32)
    mod = bnjax.linen.BatchWhitening(group_size=8, momentum=0.0)
    v = mod.init(jax.random.key(0), x[:1], train=False)
    assert jax.tree.map(jnp.shape, v) == {
        "params": {"scale": (16,), "bias": (16,)},
        "batch_stats": {"mean": (16,), "whitening": (2, 8, 8)},
    }
    y, upd = mod.apply(v, x, train=True, mutable=["batch_stats"])
    c = np.cov(np.asarray(y, np.float64).T, bias=True)
    for k in range(2):
        np.testing.assert_allclose(c[8 * k : 8 * k + 8, 8 * k : 8 * k + 8], np.eye(8), atol=1e-3)
    v2 = {"params": v["params"], **upd}
    # momentum 0: the population map is this batch's, so eval reproduces the train output.
    y_eval = mod.apply(v2, x, train=False)
    np.testing.assert_allclose(y_eval, y, atol=2e-4)
    with pytest.raises(ValueError, match="train="):
        mod.apply(v2, x)


def test_nnx_module_matches_linen(rng):
    x = jnp.asarray(correlated(rng, 128, 8), jnp.float32)
    kw = dict(group_size=4, method="iternorm", population="average")
    lin = bnjax.linen.BatchWhitening(**kw)
    v = lin.init(jax.random.key(0), x, train=False)
    assert set(v["batch_stats"]) == {"mean", "whitening", "cov", "count", "batches"}
    y_l, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
    bw = bnjax.nnx.BatchWhitening(8, rngs=nnx.Rngs(0), **kw)
    y_n = bw(x)
    np.testing.assert_allclose(y_n, y_l, atol=1e-6)
    np.testing.assert_allclose(bw.whitening[...], upd["batch_stats"]["whitening"], atol=1e-6)
    bw.eval()
    np.testing.assert_allclose(
        bw(x[:1]), lin.apply({"params": v["params"], **upd}, x[:1], train=False), atol=1e-6
    )
    grads = nnx.grad(lambda m: jnp.sum(m(x, train=True) ** 2))(bw)
    assert np.all(np.isfinite(grads.scale[...]))


# --------------------------------------------------------------------------- multi-device


_MULTI = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from bnjax import whitening as W
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 24, 6)) @ rng.normal(size=(6, 6)) + 2.0
    counts = [24, 5, 17, 0]                     # unequal, one device without examples
    mask = np.arange(24)[None, :] < np.array(counts)[:, None]
    proj = rng.normal(size=(4, 24, 6))
    out = {}
    for method in ("zca",):  # the pooling is the method's input; one method keeps CI short
        cfg = W.WhiteningConfig(group_size=3, method=method, axis_name="d", epsilon=1e-3)
        params, state = W.init(6, cfg)
        def dev(x, m, p):
            def loss(x):
                y, st = W.apply_train(params, state, x, cfg, mask=m[:, None])
                return jnp.sum(jnp.where(m[:, None], y * p, 0)), (y, st)
            (_, (y, st)), g = jax.value_and_grad(loss, has_aux=True)(x)
            return y, st, g
        y, st, g = jax.pmap(dev, axis_name="d")(x, mask, proj)
        one = W.WhiteningConfig(group_size=3, method=method, epsilon=1e-3)
        xs, ps = x[mask], proj[mask]
        def loss1(x):
            y, st = W.apply_train(params, state, x, one)
            return jnp.sum(y * ps), (y, st)
        (_, (y1, st1)), g1 = jax.jit(jax.value_and_grad(loss1, has_aux=True))(xs)
        out[method] = dict(
            y=float(np.abs(np.asarray(y)[mask] - y1).max()),
            g=float(np.abs(np.asarray(g)[mask] - g1).max()),
            w=float(np.abs(np.asarray(st.whitening) - st1.whitening).max()),
            mean=float(np.abs(np.asarray(st.mean) - st1.mean).max()),
        )
    print(json.dumps(out))
    """
)


def test_multidevice_pooled_covariance_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", _MULTI], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for method, errs in out.items():
        for name, err in errs.items():
            assert err < 1e-10, (method, name, err)


@pytest.mark.parametrize("conv", [False, True])
def test_fold_whitening_into_linear_reproduces_eval(rng, conv):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            lin = nn.Conv(8, (3, 3), name="lin") if conv else nn.Dense(8, name="lin")
            return bnjax.linen.BatchWhitening(group_size=4, momentum=0.0, name="bw")(
                lin(x), train=train
            )

    shape = (16, 6, 6, 3) if conv else (64, 5)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    net = Net()
    v = jax.jit(lambda k, x: net.init(k, x, train=False))(jax.random.key(0), x)
    _, upd = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    params = jax.tree.map(lambda a: a, v["params"])
    params["bw"]["scale"] = jnp.asarray(rng.normal(size=8), jnp.float32)  # A not symmetric
    v = {"params": params, **upd}
    y = jax.jit(lambda v, x: net.apply(v, x, train=False))(v, x)
    p = v["params"]
    a, b = bnjax.folding.whitening_affine(p["bw"], v["batch_stats"]["bw"])
    k, c = bnjax.folding.fold_whitening(p["lin"]["kernel"], p["lin"]["bias"], a, b)
    folded = nn.Conv(8, (3, 3)) if conv else nn.Dense(8)
    y_fold = folded.apply({"params": {"kernel": k, "bias": c}}, x)
    np.testing.assert_allclose(y_fold, y, atol=2e-5)
    with pytest.raises(ValueError, match="must number 8"):
        bnjax.folding.fold_whitening(p["lin"]["kernel"][..., :4], None, a, b)


def test_float64_eval_is_per_example_to_float64_rounding(rng, x64):
    """A float64 input is whitened in float64 at inference: an example evaluated alone
    equals the same example inside a batch to float64 rounding (it was 2.4e-7 when the
    map ran in the statistics' float32)."""
    cfg = W.WhiteningConfig(group_size=4)
    params, state = W.init(8, cfg)
    x = jnp.asarray(rng.normal(size=(64, 8)))
    _, state = W.apply_train(params, state, x, cfg)
    alone = W.apply_eval(params, state, x[:1], cfg)
    inside = W.apply_eval(params, state, x, cfg)[:1]
    assert alone.dtype == jnp.float64
    np.testing.assert_allclose(alone, inside, rtol=0, atol=1e-13)
