"""The drop-in under Flax/JAX transforms and the tools around them (issue 18's cases).

References: ``flax.linen.BatchNorm(use_fast_variance=False)`` on the same variables,
the unsharded run for sharded ones (4 simulated CPU devices, in a subprocess), and
plain NumPy for masks. Tiny shapes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax import whitening as W
from bnjax.compat import batch_norm_mask, is_batch_norm, load_into


def _x(rng, shape=(4, 8, 5)):
    return jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)


# --------------------------------------------------------------------------- vmap


@pytest.mark.parametrize(
    "cfg",
    [
        bnjax.BatchNormConfig(axis_name="b"),
        bnjax.BatchNormConfig(axis_name="b", renorm=bnjax.RenormConfig(2.0, 1.0)),
        bnjax.BatchNormConfig(axis_name="b", activation="leaky_relu"),
        W.WhiteningConfig(group_size=5, axis_name="b"),
    ],
    ids=["bn", "renorm", "act", "whitening"],
)
def test_vmap_with_axis_name_returns_unmapped_statistics(cfg, rng):
    """jax.vmap(..., axis_name=, out_axes=(0, None)): the pooled state leaves unmapped
    and equals the state of the whole batch on one device."""
    x = _x(rng)
    params, state = (W.init(5, cfg) if isinstance(cfg, W.WhiteningConfig) else bnjax.init(5, cfg))
    kernel = cfg.kernel()
    f = lambda xi: kernel.apply_train(params, state, xi, cfg)  # noqa: E731
    y, new = jax.vmap(f, axis_name="b", out_axes=(0, None))(x)
    one = type(cfg)(**{**cfg.__dict__, "axis_name": None})
    y1, new1 = kernel.apply_train(params, state, x.reshape(32, 5), one)
    np.testing.assert_allclose(y.reshape(32, 5), y1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, new1)


def _pooled(cls, **kw):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            layer = nn.vmap(
                lambda mdl, x: cls(axis_name="b", use_running_average=not train, **kw)(x),
                variable_axes={"params": None, "batch_stats": None},
                split_rngs={"params": False},
                axis_name="b",
            )
            return layer(self, x)

    return Net()


def test_nn_vmap_pooled_statistics_match_flax(rng):
    """The nn.vmap ensemble with pooled statistics: outputs, updated batch_stats and
    gradients (x, scale, bias) equal flax's BatchNorm."""
    x = _x(rng)
    ours, ref = _pooled(bnjax.linen.BatchNorm), _pooled(nn.BatchNorm, use_fast_variance=False)
    v = ref.init(jax.random.key(0), x, train=False)
    v = jax.tree.map(lambda a: a + 0.1, v)

    def run(net, params, x):
        y, upd = net.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * jnp.cos(y)), upd

    (l0, u0), g0 = jax.value_and_grad(run, (1, 2), has_aux=True)(ref, v["params"], x)
    (l1, u1), g1 = jax.value_and_grad(run, (1, 2), has_aux=True)(ours, v["params"], x)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree.map(close, u1, u0)
    jax.tree.map(close, g1, g0)


# --------------------------------------------------------------------------- meshes


def test_explicit_and_auto_meshes_equal_the_unsharded_run():
    """BatchNorm, BatchRenorm, BatchNormAct and BatchWhitening under jit on 4 simulated
    devices, Explicit and Auto mesh axes, 1-D (batch) and 2-D (batch x features):
    outputs, new statistics and gradients equal the unsharded run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    impl = Path(__file__).with_name("_mesh_impl.py")
    out = subprocess.run([sys.executable, str(impl)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(worst) == 16, worst  # 4 layers x 2 axis types x 2 meshes
    bad = {k: v for k, v in worst.items() if not v < 2e-5}
    assert bad == {}, bad


# --------------------------------------------------------------------------- tabulate


@pytest.mark.parametrize("cls", [bnjax.nnx.BatchNorm, bnjax.nnx.BatchRenorm,
                                 bnjax.nnx.BatchNormAct])
def test_nnx_tabulate_works_and_leaves_the_class_intact(cls):
    x = jnp.arange(32.0).reshape(8, 4) ** 1.5
    table = nnx.tabulate(cls(4, rngs=nnx.Rngs(0)), x)
    assert cls.__name__ in table and "BatchStat" in table
    assert cls.__name__ in repr(cls(4))  # nnx.tabulate restored the methods


def test_nnx_tabulate_batch_whitening():
    x = jnp.arange(32.0).reshape(8, 4) ** 1.5
    assert "BatchWhitening" in nnx.tabulate(bnjax.nnx.BatchWhitening(4, group_size=2), x)


def test_linen_tabulate_has_no_warning():
    """nn.tabulate of a model with bnjax layers inside: no warning (it reported the
    layers' config() return value, a BatchNormConfig, as a non-array output)."""
    x = jnp.ones((8, 4)) + jnp.arange(8.0)[:, None]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = bnjax.linen.BatchNorm()(nn.Dense(4)(x), train=train)
            return bnjax.linen.BatchRenorm()(x, train=train)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = nn.tabulate(Net(), jax.random.key(0))(x, train=False)
    assert "Net Summary" in table
    assert [str(w.message) for w in caught if "BatchNormConfig" in str(w.message)] == []


# --------------------------------------------------------------------------- checkpoints


class _ResNetish(nn.Module):
    """Auto-named norms, as the flax examples build them (``partial(nn.BatchNorm, ...)``)."""

    norm_cls: type

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.norm_cls, use_running_average=not train, momentum=0.9)
        for width in (6, 6):
            x = nn.Dense(width, use_bias=False)(x)
            x = nn.relu(norm()(x))
        return nn.Dense(3)(x)


def _trained_flax(rng):
    model = _ResNetish(nn.BatchNorm)
    x = _x(rng, (16, 5))
    v = model.init(jax.random.key(0), x, train=False)
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    return model, {**v, **upd}, x


def test_batch_renorm_loads_an_auto_named_flax_batch_norm_checkpoint(rng):
    """partial(nn.BatchNorm) -> partial(bnjax.linen.BatchRenorm): the names differ
    (BatchNorm_0 vs BatchRenorm_0) and steps is missing; load_into maps them, and the
    eval output equals flax's."""
    flax_model, v, x = _trained_flax(rng)
    renorm = _ResNetish(bnjax.linen.BatchRenorm)
    like = renorm.init(jax.random.key(1), x, train=False)
    assert "BatchRenorm_0" in like["params"] and "BatchNorm_0" in v["params"]
    loaded = load_into(v, like)
    assert int(loaded["batch_stats"]["BatchRenorm_1"]["steps"]) == 0
    np.testing.assert_allclose(renorm.apply(loaded, x, train=False),
                               flax_model.apply(v, x, train=False), rtol=1e-5, atol=1e-5)
    y, upd = renorm.apply(loaded, x, train=True, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["BatchRenorm_0"]["steps"]) == 1
    act = _ResNetish(functools.partial(bnjax.linen.BatchNormAct, activation="identity"))
    assert "BatchNormAct_0" in load_into(v, act.init(jax.random.key(1), x, train=False))["params"]


def test_batch_renorm_restores_an_orbax_batch_norm_checkpoint(rng, tmp_path):
    """orbax: restore with the writing model's tree, then load_into the new one."""
    pytest.importorskip("orbax.checkpoint")
    from bnjax import training

    flax_model, v, x = _trained_flax(rng)
    training.save_checkpoint(tmp_path, 0, v)
    restored, _ = training.restore_checkpoint(tmp_path, like=v)
    renorm = _ResNetish(bnjax.linen.BatchRenorm)
    loaded = load_into(restored, renorm.init(jax.random.key(1), x, train=False))
    np.testing.assert_allclose(renorm.apply(loaded, x, train=False),
                               flax_model.apply(v, x, train=False), rtol=1e-5, atol=1e-5)


def test_load_into_names_the_missing_and_mismatched_layers(rng):
    _, v, x = _trained_flax(rng)
    other = _ResNetish(bnjax.linen.BatchRenorm).init(jax.random.key(1), x[:, :4], train=False)
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*\(5, 6\).*\(4, 6\)"):
        load_into(v, other)
    with pytest.raises(KeyError, match="params/Dense_9/kernel"):
        load_into(v, {"params": {"Dense_9": {"kernel": jnp.zeros((5, 6))}}})


# --------------------------------------------------------------------------- isinstance


def test_is_batch_norm_and_the_weight_decay_mask(rng):
    """The predicate covers flax's and bnjax's layers (linen and NNX), not whitening; an
    optax weight-decay mask from batch_norm_mask leaves the batch-norm parameters alone."""
    assert all(map(is_batch_norm, [nn.BatchNorm(), bnjax.linen.BatchNorm(),
                                   bnjax.linen.BatchRenorm(), bnjax.linen.BatchNormAct(),
                                   nnx.BatchNorm(3, rngs=nnx.Rngs(0)), bnjax.nnx.BatchNorm(3)]))
    assert not is_batch_norm(bnjax.linen.BatchWhitening())
    assert not isinstance(bnjax.linen.BatchNorm(), nn.BatchNorm)  # why the predicate exists
    model = _ResNetish(bnjax.linen.BatchRenorm)
    x = _x(rng, (16, 5))
    v = model.init(jax.random.key(0), x, train=False)
    norm = batch_norm_mask(model, v, x, train=False)
    assert norm["BatchRenorm_0"] == {"scale": True, "bias": True}
    assert norm["Dense_0"] == {"kernel": False}
    tx = optax.add_decayed_weights(0.5, mask=jax.tree.map(lambda b: not b, norm))
    zeros = jax.tree.map(jnp.zeros_like, v["params"])
    updates, _ = tx.update(zeros, tx.init(v["params"]), v["params"])
    assert float(jnp.abs(updates["BatchRenorm_0"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["Dense_0"]["kernel"]).max()) > 0.0


# --------------------------------------------------------------------------- shapes


def test_eval_accepts_an_unbatched_vector_and_train_explains_the_batch_of_one():
    x = jnp.arange(4.0)
    for m in (bnjax.linen.BatchNorm(use_running_average=True), nn.BatchNorm(True)):
        v = m.init(jax.random.key(0), x)
        np.testing.assert_allclose(m.apply(v, x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    bn = bnjax.linen.BatchNorm()
    v = bn.init(jax.random.key(0), jnp.ones((1, 4)), train=False)
    with pytest.raises(ValueError, match="one element per feature.*larger batch.*inference"):
        bn.apply(v, jnp.ones((1, 4)), train=True, mutable=["batch_stats"])
