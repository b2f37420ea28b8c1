"""bnjax.nnx.BatchNorm: a drop-in for flax.nnx.BatchNorm, and the paper's population average.

References: flax.nnx.BatchNorm (outputs, state, rng streams), float64 NumPy
(Algorithm 2 over unequal masked batches), flax.linen.BatchNorm with
``use_fast_variance=False`` (a training trajectory with optax: an independent
implementation, not bnjax.linen, which shares bnjax's core).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.linen as bl
from bnjax.nnx import BatchNorm


def _x(shape, seed=0, loc=1.0, scale=3.0):
    # NumPy randomness: no jax.random compiles per shape (they dominate test time)
    return jnp.asarray(loc + scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((16, 6), {}),
        ((4, 5, 5, 3), {"momentum": 0.9}),
        ((8, 3, 4, 4), {"axis": 1, "use_bias": False}),
        ((16, 6), {"use_scale": False, "epsilon": 1e-3}),
    ],
)
def test_matches_flax_nnx_in_both_modes(shape, kw):
    feats = shape[kw.get("axis", -1)]
    ref = nnx.BatchNorm(feats, rngs=nnx.Rngs(0), **kw)
    bn = BatchNorm(feats, rngs=nnx.Rngs(1), **kw)
    # Give the reference non-trivial params and stats, then load its state.
    state = nnx.state(ref)
    state = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape), state)
    nnx.update(ref, state)
    nnx.update(bn, nnx.state(ref))
    x = _x(shape)
    call = nnx.jit(lambda m, x: m(x))
    for _ in range(2):  # train mode twice: outputs and running stats agree
        np.testing.assert_allclose(call(bn, x), call(ref, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.mean[...], ref.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], ref.var[...], rtol=1e-5, atol=1e-6)
    ref.eval()
    bn.eval()
    assert bn.use_running_average is True
    mean_before = np.asarray(bn.mean[...])
    np.testing.assert_allclose(call(bn, x), call(ref, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], mean_before)  # eval does not update


def test_same_variables_and_rng_stream_as_flax():
    rngs_a, rngs_b = nnx.Rngs(3), nnx.Rngs(3)
    ref = nnx.BatchNorm(5, rngs=rngs_a, param_dtype=jnp.bfloat16)
    bn = BatchNorm(5, rngs=rngs_b, param_dtype=jnp.bfloat16)
    sa, sb = nnx.state(ref), nnx.state(bn)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert type(bn.scale) is nnx.Param and type(bn.mean) is nnx.BatchStat
    # Later layers draw the same keys.
    np.testing.assert_array_equal(
        jax.random.key_data(rngs_a.params()), jax.random.key_data(rngs_b.params())
    )


def test_switches():
    bn = BatchNorm(3, rngs=nnx.Rngs(0))
    x = _x((8, 3))
    assert bn.use_running_average is False
    bn.eval()
    np.testing.assert_allclose(bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)  # init stats
    view = nnx.view(bn, use_running_average=False)
    assert view.use_running_average is False and bn.use_running_average is True
    y = bn(x, train=True)  # the call switch overrides the attribute
    np.testing.assert_allclose(np.mean(y, 0), 0, atol=1e-5)
    with pytest.raises(ValueError, match="contradictory"):
        bn(x, use_running_average=True, train=True)
    with pytest.raises(ValueError, match="use_running_average"):
        BatchNorm(3, use_running_average=None)(x)
    with pytest.raises(ValueError, match="population"):
        BatchNorm(3, population="median")


def _numpy_average(chunks, masks):
    """Algorithm 2 in float64: count-weighted mean, pooled unbiased within-batch variance."""
    n = s = 0.0
    m2 = dof = 0.0
    for x, w in zip(chunks, masks, strict=True):
        w = np.broadcast_to(np.asarray(w), x.shape).reshape(-1, x.shape[-1])
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        nb = w.sum(0)
        mu = (x * w).sum(0) / nb
        n, s = n + nb, s + (x * w).sum(0)
        m2 = m2 + (((x - mu) ** 2) * w).sum(0)
        dof = dof + nb - 1
    return s / n, m2 / dof, n


def test_population_average_matches_numpy_linen_and_nnx(rng):
    sizes = [7, 12, 5]
    chunks = [rng.normal(2.0, 1.5, (b, 4, 3)).astype(np.float32) for b in sizes]
    masks = [rng.random((b, 4, 1)) < 0.7 for b in sizes]
    mean, var, count = _numpy_average(chunks, masks)

    bn = BatchNorm(3, population="average", momentum=0.5, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda m, x, w: m(x, mask=w))
    for x, w in zip(chunks, masks, strict=True):
        step(bn, x, w)
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
    np.testing.assert_array_equal(bn.count[...], count)
    np.testing.assert_array_equal(bn.batches[...], len(sizes))

    mod = bl.BatchNorm(population="average", momentum=0.5)
    variables = mod.init(jax.random.key(0), chunks[0], train=False)
    for x, w in zip(chunks, masks, strict=True):
        _, upd = mod.apply(variables, x, train=True, mask=w, mutable=["batch_stats"])
        variables = {**variables, **upd}
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["var"], var, rtol=1e-5)


def test_transforms_jit_vmap_split_eval_shape():
    # eval_shape: abstract construction with the population option
    abstract = nnx.eval_shape(lambda: BatchNorm(4, population="average", rngs=nnx.Rngs(0)))
    assert abstract.count.shape == (4,)
    # vmap: an ensemble, each member with its own batch and statistics
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return BatchNorm(4, momentum=0.5, rngs=rngs)

    ens = create(nnx.Rngs(0))
    xs = _x((3, 8, 4)) * jnp.arange(1.0, 4.0)[:, None, None]
    nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(ens, xs)
    np.testing.assert_allclose(ens.var[...], 0.5 + 0.5 * np.var(xs, axis=1), rtol=1e-5)
    # split / merge round trip under jit
    bn = BatchNorm(4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)

    @jax.jit
    def pure(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, nnx.state(m)

    y, state2 = pure(state, xs[0])
    nnx.jit(lambda m, x: m(x))(bn, xs[0])
    np.testing.assert_allclose(state2["mean"][...], bn.mean[...], rtol=1e-6)
    np.testing.assert_allclose(y, (xs[0] - xs[0].mean(0)) / np.sqrt(xs[0].var(0) + 1e-5),
                               rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------- training trajectory


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Dense(8, use_bias=False)(x)
            # flax's own BatchNorm (exact two-pass variance), not bnjax.linen: the
            # reference must not share bnjax's core. Same variable names.
            bn = nn.BatchNorm(momentum=0.9, use_fast_variance=False,
                              use_running_average=not train)
            x = nn.sigmoid(bn(x))
        return nn.Dense(3)(x)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        zeros = nnx.initializers.zeros_init()  # the weights are copied from the linen model
        self.l0 = nnx.Linear(5, 8, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.b0 = BatchNorm(8, momentum=0.9, rngs=rngs)
        self.l1 = nnx.Linear(8, 8, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.b1 = BatchNorm(8, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(8, 3, kernel_init=zeros, rngs=rngs)

    def __call__(self, x):
        x = nnx.sigmoid(self.b0(self.l0(x)))
        x = nnx.sigmoid(self.b1(self.l1(x)))
        return self.out(x)


def test_optax_trajectory_matches_linen(rng):
    xs = rng.normal(size=(10, 16, 5)).astype(np.float32)
    ys = rng.integers(0, 3, size=(10, 16))
    lin = _LinenMLP()
    shapes = jax.eval_shape(lambda: lin.init(jax.random.key(0), xs[0], train=False))
    v = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
    v["batch_stats"] = jax.tree.map(lambda a: jnp.abs(a) + 0.5, v["batch_stats"])
    model = _NnxMLP(nnx.Rngs(0))
    p = v["params"]
    model.l0.kernel[...] = p["Dense_0"]["kernel"]
    model.l1.kernel[...] = p["Dense_1"]["kernel"]
    model.out.kernel[...] = p["Dense_2"]["kernel"]
    model.out.bias[...] = p["Dense_2"]["bias"]
    for i, bn in enumerate([model.b0, model.b1]):
        bn.scale[...] = p[f"BatchNorm_{i}"]["scale"]
        bn.bias[...] = p[f"BatchNorm_{i}"]["bias"]
        bn.mean[...] = v["batch_stats"][f"BatchNorm_{i}"]["mean"]
        bn.var[...] = v["batch_stats"][f"BatchNorm_{i}"]["var"]
    tx = optax.sgd(0.5)

    def loss_linen(params, stats, x, y):
        logits, upd = lin.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def step_linen(params, stats, opt, x, y):
        (loss, upd), g = jax.value_and_grad(loss_linen, has_aux=True)(params, stats, x, y)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), upd["batch_stats"], opt, loss

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step_nnx(model, optimizer, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, g)
        return loss

    params, stats, opt = v["params"], v["batch_stats"], tx.init(v["params"])
    for x, y in zip(xs, ys, strict=True):
        params, stats, opt, loss_a = step_linen(params, stats, opt, x, y)
        loss_b = step_nnx(model, optimizer, x, y)
        np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(model.l1.kernel[...], params["Dense_1"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(model.b1.scale[...], params["BatchNorm_1"]["scale"], atol=1e-5)
    np.testing.assert_allclose(model.b0.var[...], stats["BatchNorm_0"]["var"], rtol=1e-5)
    model.eval()
    # Measured (CPU) after 10 steps: losses, weights and statistics within 2e-7 absolute
    # (<= 3e-6 relative on near-zero entries), eval outputs within 2.1e-7 absolute.
    np.testing.assert_allclose(
        model(xs[0]), lin.apply({"params": params, "batch_stats": stats}, xs[0], train=False),
        rtol=1e-5, atol=1e-5,
    )
