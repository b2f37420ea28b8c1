"""Batch norm fused with an invertible activation (In-Place Activated BN).

References are independent of the fused kernel: ``f(BN(x))`` written in plain
``jax.numpy`` (masked two-pass statistics, the effective scale
``gamma + eps sign(gamma)``) differentiated by JAX's autodiff in float64, one
device for ``axis_name`` under ``vmap``, ``flax.linen.BatchNorm`` followed by the
activation for the modules, and the compiled step's memory analysis for the
"no input kept" property. Tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import bnjax
from bnjax import activations as A
from bnjax.functional import BatchNormConfig, BNParams

ACTS = [A.Identity(), A.LeakyReLU(0.01), A.LeakyReLU(0.3), A.ELU(1.0), A.ELU(0.4)]
IDS = ["identity", "leaky0.01", "leaky0.3", "elu1", "elu0.4"]


def _reference(x, g, b, act, *, mask=None, eps=1e-5, seps=1e-5, axes=(0,)):
    """f(gamma' (x - mu) / sqrt(var + eps) + beta), statistics over ``axes`` (masked)."""
    ge = g + jnp.where(g < 0, -seps, seps)
    w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = jnp.sum(w, axes, keepdims=True)
    mu = jnp.sum(w * x, axes, keepdims=True) / n
    var = jnp.sum(w * (x - mu) ** 2, axes, keepdims=True) / n
    return act(ge * (x - mu) / jnp.sqrt(var + eps) + b)


def _data(rng, shape=(24, 5), dtype=np.float64):
    c = shape[-1]
    x = rng.normal(1.5, 2.5, shape).astype(dtype)
    g = rng.normal(0.2, 1.0, c).astype(dtype)  # some negative gammas
    b = rng.normal(0, 1, c).astype(dtype)
    w = rng.normal(0, 1, shape).astype(dtype)
    return jnp.asarray(x), jnp.asarray(g), jnp.asarray(b), jnp.asarray(w)


def _grads(fn, x, g, b, w):
    def loss(x, g, b):
        return jnp.sum(fn(x, g, b) * w)

    return jax.value_and_grad(loss, (0, 1, 2))(x, g, b)


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("act", ACTS, ids=IDS)
@pytest.mark.parametrize("grad", ["vjp", "jvp", "autodiff"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_fused_equals_activation_of_batch_norm_float64(act, grad, masked, rng, x64):
    """Outputs and x / scale / bias gradients equal autodiff of f(BN(x)) in float64, for
    every gradient rule, with and without a mask (the mask keeps 70% of the elements)."""
    x, g, b, w = _data(rng)
    mask = jnp.asarray(rng.random(x.shape) < 0.7) if masked else None
    cfg = BatchNormConfig(activation=act, grad=grad, param_dtype=jnp.float64)
    state = bnjax.init_stats(5, jnp.float64)

    def fused(x, g, b):
        return bnjax.apply_train(BNParams(g, b), state, x, cfg, mask=mask)[0]

    val, grads = _grads(fused, x, g, b, w)
    val_r, grads_r = _grads(lambda x, g, b: _reference(x, g, b, act, mask=mask), x, g, b, w)
    _close(val, val_r)
    jax.tree.map(_close, grads, grads_r)


@pytest.mark.parametrize("act", [A.LeakyReLU(0.1), A.ELU(1.0)], ids=["leaky", "elu"])
def test_fused_ghost_batches_nhwc_and_feature_tuples(act, rng, x64):
    """Ghost batches (each of 4 normalized alone) and an NHWC input with features on
    axes (2, 3) (statistics over N and H): outputs and gradients of the reference."""
    x, _, _, _ = _data(rng, (16, 3, 2, 4))
    g = jnp.asarray(rng.normal(0.5, 1, (2, 4)))
    b = jnp.asarray(rng.normal(0, 1, (2, 4)))
    w = jnp.asarray(rng.normal(0, 1, x.shape))
    cfg = BatchNormConfig(axis=(2, 3), activation=act, param_dtype=jnp.float64)
    state = bnjax.init_stats((2, 4), jnp.float64)
    fused = lambda x, g, b: bnjax.apply_train(BNParams(g, b), state, x, cfg)[0]  # noqa: E731
    got = _grads(fused, x, g, b, w)
    want = _grads(lambda x, g, b: _reference(x, g, b, act, axes=(0, 1)), x, g, b, w)
    jax.tree.map(_close, got, want)

    x2, g2, b2, w2 = _data(rng, (16, 5))
    ghost = BatchNormConfig(activation=act, virtual_batch_size=4, param_dtype=jnp.float64)
    st = bnjax.init_stats(5, jnp.float64)
    fused = lambda x, g, b: bnjax.apply_train(BNParams(g, b), st, x, ghost)[0]  # noqa: E731

    def ref(x, g, b):
        parts = [_reference(x[i : i + 4], g, b, act) for i in range(0, 16, 4)]
        return jnp.concatenate(parts)

    jax.tree.map(_close, _grads(fused, x2, g2, b2, w2), _grads(ref, x2, g2, b2, w2))


def test_fused_axis_name_with_unequal_device_counts_equals_pooled(rng, x64):
    """4 simulated devices (vmap with axis_name) holding 6, 2, 0 and 4 valid rows (a
    mask): outputs and gradients equal the reference on the valid rows pooled."""
    x, g, b, w = _data(rng, (4, 6, 5))
    valid = jnp.asarray(np.arange(6)[None, :] < np.array([6, 2, 0, 4])[:, None])[..., None]
    act = A.LeakyReLU(0.2)
    cfg = BatchNormConfig(activation=act, axis_name="d", param_dtype=jnp.float64)
    state = bnjax.init_stats(5, jnp.float64)

    def fused(x, g, b):
        f = lambda xi, mi: bnjax.apply_train(BNParams(g, b), state, xi, cfg, mask=mi)[0]  # noqa: E731
        return jax.vmap(f, axis_name="d")(x, valid)

    def ref(x, g, b):
        flat = _reference(x.reshape(24, 5), g, b, act, mask=valid.reshape(24, 1))
        return flat.reshape(4, 6, 5)

    jax.tree.map(_close, _grads(fused, x, g, b, w), _grads(ref, x, g, b, w))


def test_fused_batch_renorm_equals_reference(rng, x64):
    """Batch Renorm (r, d clipped, constant for the gradient) then leaky ReLU: outputs and
    gradients of f(gamma' (r xhat + d) + beta) built from the running statistics."""
    x, g, b, w = _data(rng)
    act = A.LeakyReLU(0.1)
    renorm = bnjax.RenormConfig(r_max=1.2, d_max=0.3)
    cfg = BatchNormConfig(activation=act, renorm=renorm, param_dtype=jnp.float64)
    state = bnjax.renorm_stats(
        bnjax.init_stats(5, jnp.float64)._replace(
            mean=jnp.asarray(rng.normal(0, 1, 5)), var=jnp.asarray(rng.uniform(0.5, 3, 5))
        )
    )

    def ref(x, g, b):
        ge = g + jnp.where(g < 0, -1e-5, 1e-5)
        mu, var = x.mean(0), x.var(0)
        sb, s = jnp.sqrt(var + 1e-5), jnp.sqrt(state.var + 1e-5)
        r = jax.lax.stop_gradient(jnp.clip(sb / s, 1 / 1.2, 1.2))
        d = jax.lax.stop_gradient(jnp.clip((mu - state.mean) / s, -0.3, 0.3))
        return act(ge * (r * (x - mu) / sb + d) + b)

    fused = lambda x, g, b: bnjax.apply_train(BNParams(g, b), state, x, cfg)[0]  # noqa: E731
    jax.tree.map(_close, _grads(fused, x, g, b, w), _grads(ref, x, g, b, w))


def test_bf16_input_float32_statistics(rng):
    """bf16 input: bf16 output, float32 statistics; the values are the float32
    reference's to bf16 rounding, the gradients to a few bf16 ulps."""
    x, g, b, w = (a.astype(jnp.float32) for a in _data(rng, dtype=np.float32))
    cfg = BatchNormConfig(activation="leaky_relu")
    params, state = bnjax.init(5, cfg)
    y, new = bnjax.apply_train(BNParams(g, b), state, x.astype(jnp.bfloat16), cfg)
    assert y.dtype == jnp.float32 and new.mean.dtype == jnp.float32  # result_type(bf16, f32)
    cfg16 = BatchNormConfig(activation="leaky_relu", dtype=jnp.bfloat16)
    y16, _ = bnjax.apply_train(BNParams(g, b), state, x.astype(jnp.bfloat16), cfg16)
    assert y16.dtype == jnp.bfloat16
    ref = _reference(x.astype(jnp.bfloat16).astype(jnp.float32), g, b, A.LeakyReLU())
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=1e-2, atol=2e-2)
    gx = jax.grad(lambda x: jnp.sum(bnjax.apply_train(BNParams(g, b), state, x, cfg16)[0]
                                    .astype(jnp.float32) * w))(x.astype(jnp.bfloat16))
    gr = jax.grad(lambda x: jnp.sum(_reference(x, g, b, A.LeakyReLU()) * w))(x)
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gx, np.float32), gr, rtol=0.1, atol=0.05)


def test_gamma_at_zero_stays_finite_and_exact(rng, x64):
    """gamma = 0 and gamma = +-1e-9: the effective scale is +-scale_epsilon, outputs and
    gradients are finite and equal the reference; d gamma' / d gamma = 1."""
    x, _, b, w = _data(rng)
    g = jnp.asarray([0.0, 1e-9, -1e-9, 1.0, -2.0])
    cfg = BatchNormConfig(activation="leaky_relu", param_dtype=jnp.float64)
    state = bnjax.init_stats(5, jnp.float64)
    fused = lambda x, g, b: bnjax.apply_train(BNParams(g, b), state, x, cfg)[0]  # noqa: E731
    got = _grads(fused, x, g, b, w)
    want = _grads(lambda x, g, b: _reference(x, g, b, A.LeakyReLU()), x, g, b, w)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))
    jax.tree.map(lambda a, c: _close(a, c, 1e-7), got, want)


def test_backward_keeps_no_input_sized_residual_but_the_output(rng):
    """The fused layer's vjp saves one input-sized array, the output; plain batch norm +
    leaky_relu saves the input too (the positive control)."""
    x = jnp.asarray(rng.normal(0, 1, (32, 4, 4, 8)), jnp.float32)
    p, s = bnjax.init(8)

    def fused(x, p):
        return bnjax.apply_train(p, s, x, BatchNormConfig(activation="leaky_relu"))[0]

    def plain(x, p):
        return nn.leaky_relu(bnjax.apply_train(p, s, x, BatchNormConfig())[0])

    def big(fn):
        return [src for aval, src in saved_residuals(fn, x, p) if aval.shape == x.shape]

    got = big(fused)
    assert len(got) == 1 and "argument" not in got[0], got
    assert any("argument x" in src for src in big(plain))


def _memory(scheduler_flag: str) -> dict[str, int]:
    env = dict(os.environ, XLA_FLAGS=scheduler_flag, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_inplace_memory.py")), "16"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_train_step_needs_less_temporary_memory():
    """A conv stack's compiled training step with BatchNormAct needs less temporary memory
    than with BatchNorm + nn.leaky_relu, and less than without normalization, under XLA's
    memory-minimizing scheduler (a property, not a timing). XLA:CPU's default scheduler
    trades memory for concurrency and does not show the saving (docs/benchmarks.md)."""
    mem = _memory("--xla_cpu_enable_concurrency_optimized_scheduler=false")
    assert mem["fused"] < 0.8 * mem["plain"], mem
    assert mem["fused"] < mem["none"], mem


# --------------------------------------------------------------------------- modules


def test_linen_module_variables_checkpoint_and_flax_reference(rng):
    """BatchNormAct has BatchNorm's variables; a flax.linen.BatchNorm checkpoint loads;
    train and eval outputs equal flax's BatchNorm + leaky_relu with the effective scale."""
    x = jnp.asarray(rng.normal(2, 3, (16, 6)), jnp.float32)
    fl = nn.BatchNorm(use_running_average=False, use_fast_variance=False, momentum=0.9)
    v = fl.init(jax.random.key(0), x)
    v = {"params": {"scale": jnp.asarray(rng.normal(0, 1, 6), jnp.float32),
                    "bias": jnp.asarray(rng.normal(0, 1, 6), jnp.float32)},
         "batch_stats": v["batch_stats"]}
    m = bnjax.linen.BatchNormAct(momentum=0.9, activation=A.LeakyReLU(0.2))
    assert jax.tree.map(jnp.shape, m.init(jax.random.key(1), x, train=False)) == jax.tree.map(
        jnp.shape, v
    )
    g = v["params"]["scale"]
    ve = {**v, "params": {**v["params"], "scale": g + jnp.where(g < 0, -1e-5, 1e-5)}}
    y, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    y_ref, upd_ref = fl.apply(ve, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, nn.leaky_relu(y_ref, 0.2), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-6), upd, upd_ref)
    v2 = {**v, **upd}
    y_eval = m.apply(v2, x, train=False)
    fl_eval = nn.BatchNorm(use_running_average=True, momentum=0.9)
    y_eval_ref = fl_eval.apply({**ve, **upd_ref}, x)
    np.testing.assert_allclose(y_eval, nn.leaky_relu(y_eval_ref, 0.2), rtol=1e-5, atol=1e-5)


def test_nnx_equals_linen(rng):
    x = jnp.asarray(rng.normal(1, 2, (12, 4)), jnp.float32)
    lin = bnjax.linen.BatchNormAct(activation="elu")
    v = lin.init(jax.random.key(0), x, train=False)
    y_lin, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
    mod = bnjax.nnx.BatchNormAct(4, activation="elu", rngs=nnx.Rngs(0))
    y = mod(x)
    np.testing.assert_array_equal(y, y_lin)
    np.testing.assert_array_equal(mod.mean[...], upd["batch_stats"]["mean"])
    mod.eval()
    np.testing.assert_array_equal(mod(x), lin.apply({**v, **upd}, x, train=False))


def test_fold_keeps_the_activation_after_the_folded_layer(rng):
    """fold_sequential of Dense -> BatchNormAct -> Dense gives Dense -> activation -> Dense
    computing the eval output; find_pairs reports the activation with the pair."""
    x = jnp.asarray(rng.normal(1, 2, (16, 5)), jnp.float32)
    seq = nn.Sequential([
        nn.Dense(6, use_bias=False),
        bnjax.linen.BatchNormAct(activation=A.LeakyReLU(0.1), use_running_average=False),
        nn.Dense(3),
    ])
    v = seq.init(jax.random.key(0), x)
    _, upd = seq.apply(v, x, mutable=["batch_stats"])
    v = {**v, **upd}
    v["params"]["layers_1"]["scale"] = jnp.asarray([1.0, -0.5, 0.0, 2.0, 0.3, -1.0])
    ev = nn.Sequential([
        nn.Dense(6, use_bias=False),
        bnjax.linen.BatchNormAct(activation=A.LeakyReLU(0.1), use_running_average=True),
        nn.Dense(3),
    ])
    want = ev.apply(v, x)
    folded, fv = bnjax.fold_sequential(ev, v)
    assert len(folded.layers) == 3 and folded.layers[1] == A.LeakyReLU(0.1)
    np.testing.assert_allclose(folded.apply(fv, x), want, rtol=1e-5, atol=1e-5)
    pairs = bnjax.find_pairs(ev, v, x)
    assert [(p.linear, p.bn, p.activation) for p in pairs] == [
        ("layers_0", "layers_1", A.LeakyReLU(0.1))
    ]


def test_recalibrate_and_consistency_accept_it(rng):
    """PreciseBN over a BatchNormAct net sets the statistics of the data (float64 NumPy of
    the layer's input), and the consistency report runs."""
    x = jnp.asarray(rng.normal(3, 2, (32, 4)), jnp.float32)
    m = bnjax.linen.BatchNormAct(activation="leaky_relu")
    v = m.init(jax.random.key(0), x, train=False)
    new = bnjax.recalibrate(m, v, [x[:16], x[16:]], train=False)
    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(new["batch_stats"]["mean"], xs.mean(0), rtol=1e-5)
    within = (xs[:16].var(0) * 16 + xs[16:].var(0) * 16) / 30
    np.testing.assert_allclose(new["batch_stats"]["var"], within, rtol=1e-4)
    report = bnjax.consistency(m, new, [x[:16]], train=False)
    assert list(report) == [""] and report[""].batches == 1


# --------------------------------------------------------------------------- bad input


def test_bad_activations_raise_clear_errors():
    with pytest.raises(ValueError, match="ReLU is not invertible.*leaky_relu"):
        BatchNormConfig(activation="relu")
    with pytest.raises(ValueError, match="negative_slope > 0.*negative_slope=0"):
        A.LeakyReLU(0.0)
    with pytest.raises(ValueError, match="negative_slope=-0.1"):
        A.LeakyReLU(-0.1)
    with pytest.raises(ValueError, match="alpha > 0"):
        A.ELU(0.0)
    with pytest.raises(ValueError, match="one of"):
        BatchNormConfig(activation="gelu")
    with pytest.raises(TypeError, match="activation must be"):
        BatchNormConfig(activation=3)
    with pytest.raises(ValueError, match="scale_epsilon must be > 0"):
        BatchNormConfig(activation="elu", scale_epsilon=0.0)
    with pytest.raises(ValueError, match="relu"):
        bnjax.linen.BatchNormAct(activation="relu").init(
            jax.random.key(0), jnp.ones((4, 3)), train=False
        )
    p, s = bnjax.init(3)
    with pytest.raises(TypeError, match="real inputs only"):
        bnjax.apply_train(p, s, jnp.ones((4, 3), jnp.complex64) * jnp.arange(4)[:, None],
                          BatchNormConfig(activation="elu"))


def test_elu_inverse_is_finite_where_it_saturates():
    """Far below 0 ELU's output is -alpha to rounding; the inverse is clamped (finite),
    so gradients stay finite (approximate there, as documented)."""
    z = A.ELU(1.0)(jnp.asarray([-40.0, -5.0, 0.0, 3.0]))
    y = A.ELU(1.0).inverse(z)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y[1:], [-5.0, 0.0, 3.0], rtol=1e-5)
