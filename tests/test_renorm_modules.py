"""Batch Renorm modules (``bnjax.linen.BatchRenorm``, ``bnjax.nnx.BatchRenorm``).

References: the functional core (:func:`bnjax.apply_train` with a
:class:`~bnjax.RenormConfig`, itself tested against float64 NumPy in
test_renorm.py), ``bnjax.linen.BatchNorm`` / ``flax.linen.BatchNorm`` for the eval
map and checkpoints, one device for ``axis_name`` under ``vmap``, the linen module
for the NNX one, and float64 NumPy for the PreciseBN statistics. Tiny shapes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
import bnjax.functional as F
from bnjax.functional import BatchNormConfig, BNParams, RenormConfig

MOM = 0.5  # a fast moving average: the running statistics move between steps
EPS = 1e-5


def _batches(rng, n=3, shape=(8, 5), loc=2.0, scale=3.0):
    """``n`` batches whose mean and spread drift (so r and d are clipped in places)."""
    return [
        jnp.asarray(loc * (k + 1) + scale * (1 + k) * rng.standard_normal(shape), jnp.float32)
        for k in range(n)
    ]


def _cfg(axis=-1, **renorm):
    return BatchNormConfig(axis=axis, momentum=MOM, epsilon=EPS, renorm=RenormConfig(**renorm))


def _close(a, b, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- linen


RENORM_OPTIONS = [
    {"r_max": 1.5, "d_max": 0.5},  # clipped
    {"r_max": 50.0, "d_max": 50.0},  # not clipped: the eval map
    {"r_max": optax.linear_schedule(1.0, 2.0, 2), "d_max": 0.7, "warmup_steps": 1},
]


@pytest.mark.parametrize(
    "opts,axis,shape",
    [
        (RENORM_OPTIONS[0], -1, (8, 5)),
        (RENORM_OPTIONS[1], -1, (8, 5)),
        (RENORM_OPTIONS[2], 1, (4, 5, 3)),
    ],
    ids=["clipped-dense", "unclipped-dense", "schedule-nchw"],
)
def test_linen_equals_functional_core(opts, axis, shape, rng):
    """Three training steps: outputs, gradients (x, scale, bias) and the state, step by
    step, equal the functional core's with the same RenormConfig; steps counts 1, 2, 3."""
    xs = _batches(rng, shape=shape)
    m = bnjax.linen.BatchRenorm(axis=axis, momentum=MOM, **opts)
    v = m.init(jax.random.key(0), xs[0], train=False)
    fshape = (shape[axis],)
    params = BNParams(
        jnp.asarray(1 + 0.3 * rng.standard_normal(fshape), jnp.float32),
        jnp.asarray(rng.standard_normal(fshape), jnp.float32),
    )
    v = {"params": {"scale": params.scale, "bias": params.bias}, "batch_stats": v["batch_stats"]}
    cfg = _cfg(axis, **opts)
    state = F.init(fshape, cfg)[1]

    @jax.jit
    def lin(p, bs, x, dy):
        def loss(p, x):
            y, upd = m.apply(
                {"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * dy), (y, upd)

        return jax.grad(loss, (0, 1), has_aux=True)(p, x)

    @jax.jit
    def fun(p, state, x, dy):
        def loss(p, x):
            y, new = F.apply_train(BNParams(p["scale"], p["bias"]), state, x, cfg)
            return jnp.sum(y * dy), (y, new)

        return jax.grad(loss, (0, 1), has_aux=True)(p, x)

    for k, x in enumerate(xs):
        dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        g_lin, (y_lin, upd) = lin(v["params"], v["batch_stats"], x, dy)
        g_fun, (y_fun, state) = fun(v["params"], state, x, dy)
        _close(y_lin, y_fun)
        jax.tree.map(_close, g_lin, g_fun)
        bs = upd["batch_stats"]
        assert sorted(bs) == ["mean", "steps", "var"]
        _close(bs["mean"], state.mean)
        _close(bs["var"], state.var)
        assert bs["steps"].dtype == jnp.int32 and bs["steps"].shape == ()
        assert int(bs["steps"]) == int(state.steps) == k + 1
        v = {**v, "batch_stats": bs}


def test_linen_renorm_differs_from_batch_norm_after_warmup(rng):
    """Positive control: with clipping bounds > (1, 0) the training output is not batch
    norm's (else the tests above could not tell the two apart); during the warm-up it is."""
    x0, x1 = _batches(rng, n=2)
    kw = {"momentum": MOM}
    bn, brn = bnjax.linen.BatchNorm(**kw), bnjax.linen.BatchRenorm(warmup_steps=1, **kw)
    v = brn.init(jax.random.key(0), x0, train=False)
    y_bn, _ = bn.apply(v, x0, train=True, mutable=["batch_stats"])
    y0, upd = brn.apply(v, x0, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y0, y_bn)  # step 0 < warmup_steps: plain BN, bit for bit
    v = {**v, **upd}
    y_bn, _ = bn.apply(v, x1, train=True, mutable=["batch_stats"])
    y1, _ = brn.apply(v, x1, train=True, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(y1) - np.asarray(y_bn))) > 0.1


def test_eval_is_batch_norm_eval_exactly(rng):
    """Eval mode is BN's Algorithm 2 map: bit-identical to bnjax BatchNorm on the same
    variables (with and without ``steps``), and to flax.linen.BatchNorm up to rounding."""
    xs = _batches(rng)
    brn = bnjax.linen.BatchRenorm(momentum=MOM, r_max=2.0, d_max=1.0)
    v = brn.init(jax.random.key(0), xs[0], train=False)
    for x in xs:
        _, upd = brn.apply(v, x, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
    x = xs[-1] + 1.0
    y = brn.apply(v, x, train=False)
    no_steps = {**v, "batch_stats": {k: a for k, a in v["batch_stats"].items() if k != "steps"}}
    np.testing.assert_array_equal(y, bnjax.linen.BatchNorm().apply(no_steps, x, train=False))
    np.testing.assert_array_equal(y, brn.apply(no_steps, x, train=False))
    # the same program, not just the same numbers (so the same speed)
    jaxpr = lambda m: str(jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(no_steps, x))
    assert jaxpr(brn) == jaxpr(bnjax.linen.BatchNorm())
    y_flax = nn.BatchNorm(use_running_average=True).apply(no_steps, x)
    _close(y, y_flax, rtol=1e-5, atol=1e-5)
    # ... and the same through use_running_average (attribute or argument)
    np.testing.assert_array_equal(y, brn.apply(v, x, use_running_average=True))
    brn_ra = bnjax.linen.BatchRenorm(use_running_average=True, r_max=2.0, d_max=1.0)
    np.testing.assert_array_equal(y, brn_ra.apply(v, x))


def test_train_switch_equals_use_running_average(rng):
    x = _batches(rng, n=1)[0]
    brn = bnjax.linen.BatchRenorm(momentum=MOM, r_max=2.0, d_max=1.0)
    v = brn.init(jax.random.key(0), x, train=False)
    a = brn.apply(v, x, train=True, mutable=["batch_stats"])
    b = brn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    c = bnjax.linen.BatchRenorm(use_running_average=False, momentum=MOM, r_max=2.0, d_max=1.0)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    jax.tree.map(np.testing.assert_array_equal, a, c.apply(v, x, mutable=["batch_stats"]))
    with pytest.raises(ValueError, match="contradictory"):
        brn.apply(v, x, train=True, use_running_average=True)
    with pytest.raises(ValueError, match="needs train="):
        brn.apply(v, x)


def test_steps_advance_in_training_only(rng):
    """``init`` (even with train=True) leaves steps at 0; each training call adds one;
    eval calls (even with mutable batch_stats) change nothing; under jit and scan too."""
    xs = _batches(rng)
    brn = bnjax.linen.BatchRenorm(momentum=MOM)
    v = brn.init(jax.random.key(0), xs[0], train=True)
    assert int(v["batch_stats"]["steps"]) == 0
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(5, np.float32))
    _, upd = brn.apply(v, xs[0], train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])

    @jax.jit
    def step(v, x):
        return {**v, **brn.apply(v, x, train=True, mutable=["batch_stats"])[1]}

    v1 = step(step(v, xs[0]), xs[1])
    assert int(v1["batch_stats"]["steps"]) == 2

    def body(v, x):
        return step(v, x), None

    v2, _ = jax.lax.scan(body, v, jnp.stack(xs))
    assert int(v2["batch_stats"]["steps"]) == 3


def test_flax_batch_norm_checkpoint_loads(rng):
    """flax.linen.BatchNorm variables (no ``steps``): eval equals flax's eval; the first
    training call creates steps = 0 (warm-up from the beginning) and returns 1, with the
    functional core's output for a fresh counter."""
    xs = _batches(rng)
    flax_bn = nn.BatchNorm(momentum=MOM)
    v = flax_bn.init(jax.random.key(0), xs[0], use_running_average=True)
    for x in xs:
        _, upd = flax_bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        v = {**v, **upd}
    assert "steps" not in v["batch_stats"]
    x = xs[0]
    brn = bnjax.linen.BatchRenorm(momentum=MOM, r_max=1.5, d_max=0.5, warmup_steps=1)
    _close(brn.apply(v, x, train=False), flax_bn.apply(v, x, use_running_average=True))
    # warm-up counted from 0: the first step is plain BN, the second is not
    y, upd = brn.apply(v, x, train=True, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["steps"]) == 1
    y_flax, _ = flax_bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    _close(y, y_flax, rtol=1e-4, atol=1e-4)
    cfg = _cfg(r_max=1.5, d_max=0.5, warmup_steps=1)
    state = bnjax.renorm_stats(
        bnjax.BatchStats(
            *(v["batch_stats"][k] for k in ("mean", "var")), jnp.zeros(5), jnp.zeros(5)
        )
    )
    y_ref, _ = F.apply_train(BNParams(v["params"]["scale"], v["params"]["bias"]), state, x, cfg)
    np.testing.assert_array_equal(y, y_ref)
    # Resuming at step k: add steps yourself.
    v_k = {**v, "batch_stats": {**v["batch_stats"], "steps": jnp.int32(7)}}
    _, upd = brn.apply(v_k, x, train=True, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["steps"]) == 8


def test_extra_entries_are_ignored_and_passed_through(rng):
    """A checkpoint that also stores r_max/d_max (other implementations do): the bounds come
    from the module's attributes; the extra entries come back unchanged."""
    xs = _batches(rng, n=2)
    brn = bnjax.linen.BatchRenorm(momentum=MOM, r_max=1.5, d_max=0.5)
    v = brn.init(jax.random.key(0), xs[0], train=False)
    _, upd = brn.apply(v, xs[0], train=True, mutable=["batch_stats"])
    v = {**v, **upd}
    extra = {"r_max": jnp.float32(100.0), "d_max": jnp.float32(100.0)}
    v_extra = {**v, "batch_stats": {**v["batch_stats"], **extra}}
    y, upd = brn.apply(v, xs[1], train=True, mutable=["batch_stats"])
    y_e, upd_e = brn.apply(v_extra, xs[1], train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y_e, y)
    for k in ("mean", "var", "steps"):
        np.testing.assert_array_equal(upd_e["batch_stats"][k], upd["batch_stats"][k])
    for k, a in extra.items():
        np.testing.assert_array_equal(upd_e["batch_stats"][k], a)
    np.testing.assert_array_equal(
        brn.apply(v_extra, xs[1], train=False), brn.apply(v, xs[1], train=False)
    )


def test_bad_steps_and_bad_bounds_raise(rng):
    x = _batches(rng, n=1)[0]
    brn = bnjax.linen.BatchRenorm()
    v = brn.init(jax.random.key(0), x, train=False)
    bad = {**v, "batch_stats": {**v["batch_stats"], "steps": jnp.float32(3.0)}}
    with pytest.raises(ValueError, match="batch_stats/steps.*integer scalar"):
        brn.apply(bad, x, train=True, mutable=["batch_stats"])
    bad = {**v, "batch_stats": {**v["batch_stats"], "steps": jnp.zeros(2, jnp.int32)}}
    with pytest.raises(ValueError, match="batch_stats/steps.*integer scalar"):
        brn.apply(bad, x, train=True, mutable=["batch_stats"])
    for kw, what in [
        ({"r_max": 0.5}, "r_max=0.5"),
        ({"d_max": -1.0}, "d_max=-1"),
        ({"warmup_steps": -2}, "warmup_steps=-2"),
    ]:
        with pytest.raises(ValueError, match=what):
            bnjax.linen.BatchRenorm(**kw).init(jax.random.key(0), x, train=False)
        with pytest.raises(ValueError, match=what):
            bnjax.nnx.BatchRenorm(5, **kw)


def test_bad_inputs_raise_as_batch_norm():
    """Integer input, feature mismatch, bad mask shape, one element per feature: the same
    exception type and message as bnjax.linen.BatchNorm."""
    key = jax.random.key(0)
    ok = jnp.ones((4, 3)) + jnp.arange(4.0)[:, None]
    v = bnjax.linen.BatchRenorm().init(key, ok, train=False)

    def both(fn):
        errs = []
        for cls in (bnjax.linen.BatchNorm, bnjax.linen.BatchRenorm):
            with pytest.raises(Exception) as e:  # noqa: PT011 (compared below)
                fn(cls())
            errs.append((type(e.value), str(e.value)))
        assert errs[0] == errs[1], errs
        return errs[0]

    t, msg = both(lambda m: m.init(key, jnp.ones((4, 3), jnp.int32), train=True))
    assert t is TypeError and "floating-point" in msg
    t, msg = both(lambda m: m.apply(v, jnp.ones((4, 2)), train=True, mutable=["batch_stats"]))
    assert "shape (2,)" in msg
    t, msg = both(
        lambda m: m.apply(v, ok, train=True, mask=jnp.ones((4, 2), bool), mutable=["batch_stats"])
    )
    assert "mask of shape (4, 2)" in msg
    t, msg = both(lambda m: m.apply(v, ok[:1], train=True, mutable=["batch_stats"]))
    assert "one element per feature" in msg


def test_mask_equals_functional_core(rng):
    """Masked training (one feature fully masked on the second step) equals the core;
    the masked-out feature keeps its state and gets batch norm's (= eval) output."""
    xs = _batches(rng, n=2)
    mask = jnp.asarray(rng.random((8, 5)) < 0.6)
    mask = mask.at[:, 2].set(False)
    brn = bnjax.linen.BatchRenorm(momentum=MOM, r_max=1.5, d_max=0.5)
    v = brn.init(jax.random.key(0), xs[0], train=False)
    cfg, state = _cfg(r_max=1.5, d_max=0.5), F.init(5, _cfg(r_max=1.5, d_max=0.5))[1]
    params = BNParams(v["params"]["scale"], v["params"]["bias"])
    for x in xs:
        y, upd = brn.apply(v, x, train=True, mask=mask, mutable=["batch_stats"])
        y_ref, state = F.apply_train(params, state, x, cfg, mask=mask)
        np.testing.assert_array_equal(y, y_ref)
        _close(upd["batch_stats"]["mean"], state.mean)
        _close(upd["batch_stats"]["var"], state.var)
        assert float(upd["batch_stats"]["mean"][2]) == float(v["batch_stats"]["mean"][2])
        v = {**v, **upd}


def test_axis_name_under_vmap_equals_one_device(rng):
    """Four simulated devices (vmap with axis_name), unequal valid counts and one device
    without any valid example: outputs, state and gradients equal one device on the whole
    batch with the same mask."""
    x = _batches(rng, n=1, shape=(16, 5))[0]
    mask = jnp.asarray(np.r_[np.ones(7), np.zeros(5), np.ones(1), np.zeros(3)].astype(bool))
    mask = mask[:, None]
    kw = {"momentum": MOM, "r_max": 1.5, "d_max": 0.5}
    one, many = bnjax.linen.BatchRenorm(**kw), bnjax.linen.BatchRenorm(axis_name="dev", **kw)
    v = one.init(jax.random.key(0), x, train=False)
    v = {
        **v,
        "batch_stats": {
            **v["batch_stats"],
            "mean": jnp.full(5, 1.0),
            "var": jnp.full(5, 4.0),
            "steps": jnp.int32(3),
        },
    }
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(m, p, x, mask, dy):
        y, upd = m.apply({**v, "params": p}, x, train=True, mask=mask, mutable=["batch_stats"])
        return jnp.sum(y * dy), (y, upd)

    g1, (y1, u1) = jax.jit(jax.grad(loss, (1, 2), has_aux=True), static_argnums=0)(
        one, v["params"], x, mask, dy
    )
    split = lambda a: a.reshape((4, 4) + a.shape[1:])
    per_device = jax.vmap(
        jax.grad(loss, (1, 2), has_aux=True), in_axes=(None, None, 0, 0, 0), axis_name="dev"
    )
    gm, (ym, um) = jax.jit(per_device, static_argnums=0)(
        many, v["params"], split(x), split(mask), split(dy)
    )
    _close(ym.reshape(x.shape), y1)
    _close(gm[1].reshape(x.shape), g1[1])
    for k in ("scale", "bias"):  # per-device contributions: their sum is the gradient
        _close(gm[0][k].sum(0), g1[0][k], rtol=1e-4, atol=1e-4)
    for k in ("mean", "var"):
        for d in range(4):
            _close(um["batch_stats"][k][d], u1["batch_stats"][k])
    np.testing.assert_array_equal(um["batch_stats"]["steps"], [4] * 4)


# --------------------------------------------------------------------------- nnx


def _nnx_like(linen_vars, **kw):
    m = bnjax.nnx.BatchRenorm(5, momentum=MOM, rngs=nnx.Rngs(0), **kw)
    m.scale[...] = linen_vars["params"]["scale"]
    m.bias[...] = linen_vars["params"]["bias"]
    return m


def test_nnx_equals_linen(rng):
    """Three training steps (warm-up, schedule): outputs, parameter gradients and the
    state of the NNX module equal the linen module's; steps is an int32 BatchStat."""
    xs = _batches(rng)
    kw = {"r_max": optax.linear_schedule(1.0, 2.0, 2), "d_max": 0.7, "warmup_steps": 1}
    lin = bnjax.linen.BatchRenorm(momentum=MOM, **kw)
    v = lin.init(jax.random.key(0), xs[0], train=False)
    v = {
        **v,
        "params": {
            "scale": 1 + 0.3 * jnp.asarray(rng.standard_normal(5), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),
        },
    }
    m = _nnx_like(v, **kw)
    assert isinstance(m.steps, nnx.BatchStat) and m.steps[...].dtype == jnp.int32

    @jax.jit
    def lin_step(v, x, dy):
        def loss(p):
            y, upd = lin.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, upd)

        return jax.grad(loss, has_aux=True)(v["params"])

    @nnx.jit
    def nnx_step(m, x, dy):
        return nnx.grad(lambda m: (jnp.sum(m(x) * dy), m(x)), has_aux=True)(m)

    for k, x in enumerate(xs):
        dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        g_lin, (y_lin, upd) = lin_step(v, x, dy)
        if k == 0:  # the gradient once (m(x) runs twice inside: redo the state after)
            g_nnx, _ = nnx_step(m, x, dy)
            _close(g_nnx["scale"][...], g_lin["scale"])
            _close(g_nnx["bias"][...], g_lin["bias"])
            m.mean[...], m.var[...] = v["batch_stats"]["mean"], v["batch_stats"]["var"]
            m.steps[...] = v["batch_stats"]["steps"]
        y_nnx = m(x)
        _close(y_nnx, y_lin)
        for name in ("mean", "var"):
            _close(getattr(m, name)[...], upd["batch_stats"][name])
        assert int(m.steps[...]) == int(upd["batch_stats"]["steps"]) == k + 1
        v = {**v, **upd}
    # eval: Algorithm 2, steps unchanged; .eval(), nnx.view and train=False agree
    y_eval = lin.apply(v, xs[0], train=False)
    np.testing.assert_array_equal(m(xs[0], train=False), y_eval)
    np.testing.assert_array_equal(nnx.view(m, use_running_average=True)(xs[0]), y_eval)
    m.eval()
    np.testing.assert_array_equal(m(xs[0]), y_eval)
    assert int(m.steps[...]) == 3


def test_nnx_jit_and_flax_nnx_state_loads(rng):
    """Under nnx.jit steps advances once per training call; the state of a
    flax.nnx.BatchNorm loads with nnx.update (steps kept) and evaluates as flax does."""
    xs = _batches(rng)
    m = bnjax.nnx.BatchRenorm(5, momentum=MOM, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(m, x):
        return m(x)

    for x in xs:
        step(m, x)
    assert int(m.steps[...]) == 3
    fb = nnx.BatchNorm(5, momentum=MOM, rngs=nnx.Rngs(1))
    for x in xs[::-1]:
        fb(x)
    nnx.update(m, nnx.state(fb))
    assert int(m.steps[...]) == 3
    fb.eval()
    m.eval()
    _close(m(xs[0]), fb(xs[0]), rtol=1e-5, atol=1e-5)
    _close(m.mean[...], fb.mean[...], rtol=0, atol=0)


# --------------------------------------------------------------------------- tools


class _Net(nn.Module):
    """Dense -> norm -> relu -> Dense -> norm (or Dense with bias and no norm: folded)."""

    norm: type | None = bnjax.linen.BatchRenorm
    kw: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (6, 4):
            x = nn.Dense(width, use_bias=self.norm is None)(x)
            if self.norm is not None:
                x = self.norm(**dict(self.kw))(x, train=train)
            if width == 6:
                x = nn.relu(x)
        return x


RN_KW = (("momentum", MOM), ("r_max", 1.5), ("d_max", 0.5))


@functools.cache
def _net_fns(kw):
    """The net and its jitted init and training step, compiled once per ``kw``."""
    net = _Net(kw=kw)
    init = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))
    step = jax.jit(lambda v, x: {**v, **net.apply(v, x, train=True, mutable=["batch_stats"])[1]})
    return net, init, step


def _trained_net(rng, kw=RN_KW, steps=3):
    xs = _batches(rng, n=4, shape=(8, 5))
    net, init, step = _net_fns(kw)
    v = init(xs[0])
    for x in xs[:steps]:
        v = step(v, x)
    return net, v, xs


def _f64_within(xs):
    """PreciseBN's reference: mean of batch means, pooled unbiased within-batch variance."""
    xs = [np.asarray(x, np.float64) for x in xs]
    mean = np.mean([x.mean(0) for x in xs], 0)
    var = np.sum([((x - x.mean(0)) ** 2).sum(0) for x in xs], 0) / sum(len(x) - 1 for x in xs)
    return mean, var


def test_recalibrate_linen_train_mode_vs_float64_and_steps_kept(rng):
    """mode="train": layer 1 sees Dense_0's output, layer 2 the *Batch Renorm training*
    output of layer 1 (the functional core, at the stored steps) through relu and Dense_1;
    the new mean/var equal float64 NumPy; steps (and params) are untouched."""
    net, v, xs = _trained_net(rng)
    new = bnjax.recalibrate(net, v, xs, train=False)
    p, bs = v["params"], v["batch_stats"]
    h1 = [x @ p["Dense_0"]["kernel"] for x in xs]
    ref1 = _f64_within(h1)
    cfg = _cfg(r_max=1.5, d_max=0.5)
    st = bnjax.RenormStats(
        bs["BatchRenorm_0"]["mean"],
        bs["BatchRenorm_0"]["var"],
        jnp.zeros(6),
        jnp.zeros(6),
        bs["BatchRenorm_0"]["steps"],
    )
    bnp = BNParams(p["BatchRenorm_0"]["scale"], p["BatchRenorm_0"]["bias"])
    brn = jax.jit(lambda h: F.apply_train(bnp, st, h, cfg)[0])
    h2 = [jax.nn.relu(brn(h)) @ p["Dense_1"]["kernel"] for h in h1]
    ref2 = _f64_within(h2)
    for layer, (mean, var) in (("BatchRenorm_0", ref1), ("BatchRenorm_1", ref2)):
        _close(new["batch_stats"][layer]["mean"], mean, rtol=1e-4, atol=1e-4)
        _close(new["batch_stats"][layer]["var"], var, rtol=1e-4, atol=1e-4)
        assert int(new["batch_stats"][layer]["steps"]) == 3
        assert new["batch_stats"][layer]["steps"].dtype == jnp.int32
    assert new["params"] is v["params"]
    # Positive control: the renorm training map differs from BN's here, so layer 2's
    # statistics would differ had the tracer run plain batch norm.
    bn = jax.jit(lambda h: F.apply_train(bnp, st.batch_stats, h, BatchNormConfig())[0])
    h2_bn = [jax.nn.relu(bn(h)) @ p["Dense_1"]["kernel"] for h in h1]
    assert np.max(np.abs(_f64_within(h2_bn)[0] - ref2[0])) > 1e-2


def test_recalibrate_variables_without_steps_count_from_zero(rng):
    """Variables without ``steps`` (a batch-norm checkpoint in a Batch Renorm net):
    recalibration runs the training map at steps = 0 (here: in the warm-up, plain batch
    norm) and adds no ``steps`` entry; at steps = 5 (past the warm-up) it differs."""
    net, v, xs = _trained_net(rng, kw=RN_KW + (("warmup_steps", 1),), steps=2)
    strip = lambda v, **extra: {
        **v,
        "batch_stats": {
            k: {**{n: a for n, a in s.items() if n != "steps"}, **extra}
            for k, s in v["batch_stats"].items()
        },
    }
    new = bnjax.recalibrate(net, strip(v), xs, train=False)
    assert all("steps" not in s for s in new["batch_stats"].values())
    at = lambda k: bnjax.recalibrate(net, strip(v, steps=jnp.int32(k)), xs, train=False)
    ref0, ref5 = at(0), at(5)
    for k in ("mean", "var"):
        np.testing.assert_array_equal(
            new["batch_stats"]["BatchRenorm_1"][k], ref0["batch_stats"]["BatchRenorm_1"][k]
        )
    gap = new["batch_stats"]["BatchRenorm_1"]["mean"] - ref5["batch_stats"]["BatchRenorm_1"]["mean"]
    assert np.max(np.abs(gap)) > 1e-3


@pytest.mark.parametrize("mode", ["layerwise", "single_pass"])
def test_recalibrate_eval_modes_equal_batch_norm_and_nnx(mode, rng):
    """Eval upstream: a Batch Renorm net recalibrates exactly as the same net with batch
    norm on the same variables (the inference maps are the same); recalibrate_nnx on an
    NNX copy gives the same statistics; steps are kept in both; consistency_nnx of the
    NNX copy equals consistency of the linen net."""
    net, v, xs = _trained_net(rng)
    new = bnjax.recalibrate(net, v, xs, mode=mode, train=False)
    bn_net = _Net(norm=bnjax.linen.BatchNorm, kw=(("momentum", MOM),))
    rename = lambda t: {
        k.replace("BatchRenorm", "BatchNorm"): (
            {n: a for n, a in s.items() if n != "steps"} if isinstance(s, dict) else s
        )
        for k, s in t.items()
    }
    v_bn = {"params": rename(v["params"]), "batch_stats": rename(v["batch_stats"])}
    new_bn = bnjax.recalibrate(bn_net, v_bn, xs, mode=mode, train=False)
    for i in range(2):
        for k in ("mean", "var"):
            np.testing.assert_array_equal(
                new["batch_stats"][f"BatchRenorm_{i}"][k],
                new_bn["batch_stats"][f"BatchNorm_{i}"][k],
            )
        assert int(new["batch_stats"][f"BatchRenorm_{i}"]["steps"]) == 3

    class NNet(nnx.Module):
        def __init__(self):
            self.d0 = nnx.Linear(5, 6, use_bias=False, rngs=nnx.Rngs(0))
            self.n0 = bnjax.nnx.BatchRenorm(6, momentum=MOM, r_max=1.5, d_max=0.5)
            self.d1 = nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0))
            self.n1 = bnjax.nnx.BatchRenorm(4, momentum=MOM, r_max=1.5, d_max=0.5)

        def __call__(self, x):
            return self.n1(self.d1(nnx.relu(self.n0(self.d0(x)))))

    mod = NNet()
    for i in range(2):
        getattr(mod, f"d{i}").kernel[...] = v["params"][f"Dense_{i}"]["kernel"]
        n = getattr(mod, f"n{i}")
        for k in ("scale", "bias"):
            getattr(n, k)[...] = v["params"][f"BatchRenorm_{i}"][k]
        for k in ("mean", "var", "steps"):
            getattr(n, k)[...] = v["batch_stats"][f"BatchRenorm_{i}"][k]
    bnjax.recalibrate_nnx(mod, xs, mode=mode)
    for i in range(2):
        n = getattr(mod, f"n{i}")
        for k in ("mean", "var"):
            _close(getattr(n, k)[...], new["batch_stats"][f"BatchRenorm_{i}"][k])
        assert int(n.steps[...]) == 3
    if mode == "single_pass":  # consistency_nnx measures the NNX layers as linen's
        rep_nnx = bnjax.consistency_nnx(mod, xs[:2])
        rep = bnjax.consistency(net, new, xs[:2], train=False)
        for i in range(2):
            a, b = rep_nnx[f"n{i}"], rep[f"BatchRenorm_{i}"]
            _close(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
            assert int(getattr(mod, f"n{i}").steps[...]) == 3


def test_fold_batch_renorm(rng):
    """find_pairs sees both Dense -> BatchRenorm pairs; the folded net (Dense with bias,
    no norm) computes the eval output; the layers' batch_stats (steps too) are dropped."""
    net, v, xs = _trained_net(rng)
    pairs = bnjax.find_pairs(net, v, xs[0], train=False)
    assert [(p.linear, p.bn) for p in pairs] == [
        ("Dense_0", "BatchRenorm_0"),
        ("Dense_1", "BatchRenorm_1"),
    ]
    folded = bnjax.fold(v, pairs)
    assert "batch_stats" not in folded
    y = _Net(norm=None).apply(folded, xs[3], train=False)
    _close(y, net.apply(v, xs[3], train=False), rtol=1e-4, atol=1e-4)


def test_consistency_of_batch_renorm(rng):
    """consistency measures a Batch Renorm layer with its own training map: the output
    gap is max |y_renorm_train - y_eval| (the functional core); with unclipped bounds it
    is ~0 (the point of Batch Renorm; with clipped bounds it is not). The variables
    (steps) are not changed."""
    net, v, xs = _trained_net(rng, kw=(("momentum", MOM), ("r_max", 1e3), ("d_max", 1e3)))
    before = jax.tree.map(np.asarray, v)
    rep = bnjax.consistency(net, v, xs, train=False)
    assert sorted(rep) == ["BatchRenorm_0", "BatchRenorm_1"]
    assert rep["BatchRenorm_0"].output_gap < 1e-4 and rep["BatchRenorm_1"].output_gap < 1e-4
    jax.tree.map(np.testing.assert_array_equal, v, before)
    net_c, v_c, _ = _trained_net(rng)  # clipped bounds: the gap is the core's
    rep_c = bnjax.consistency(net_c, v_c, xs[:1], train=False)
    p, bs = v_c["params"], v_c["batch_stats"]
    h = xs[0] @ p["Dense_0"]["kernel"]
    st = bnjax.renorm_stats(
        bnjax.BatchStats(
            bs["BatchRenorm_0"]["mean"], bs["BatchRenorm_0"]["var"], jnp.zeros(6), jnp.zeros(6)
        ),
        bs["BatchRenorm_0"]["steps"],
    )
    bnp = BNParams(p["BatchRenorm_0"]["scale"], p["BatchRenorm_0"]["bias"])
    gap = jnp.max(
        jnp.abs(
            F.apply_train(bnp, st, h, _cfg(r_max=1.5, d_max=0.5))[0]
            - F.apply_eval(bnp, st, h, BatchNormConfig())
        )
    )
    _close(rep_c["BatchRenorm_0"].output_gap, gap, rtol=1e-5, atol=1e-6)
    assert rep_c["BatchRenorm_0"].output_gap > 1e-2


def test_multisteps_recipe_counts_optimizer_updates(rng):
    """Under optax.MultiSteps(k) the steps counter advances per training call (k per
    update); the documented recipe (warmup_steps=k w, schedules at steps // k) makes the
    warm-up end after w updates and the schedule follow the update count."""
    k, w = 3, 2
    r_fn = optax.linear_schedule(1.0, 3.0, 4)  # in updates
    brn = bnjax.linen.BatchRenorm(
        momentum=MOM, warmup_steps=k * w, r_max=lambda s: r_fn(s // k), d_max=0.0
    )
    x = _batches(rng, n=1)[0]
    v = brn.init(jax.random.key(0), x, train=False)
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k)
    opt = tx.init(v["params"])
    cfg_of = lambda steps: brn.config().renorm.bounds(jnp.int32(steps))[0]  # noqa: E731
    for call in range(k * 4):
        def loss(p, bs):
            y, upd = brn.apply({"params": p, "batch_stats": bs}, x, train=True,
                               mutable=["batch_stats"])
            return jnp.sum(y**2), upd
        g, upd = jax.grad(loss, has_aux=True)(v["params"], v["batch_stats"])
        delta, opt = tx.update(g, opt, v["params"])
        v = {"params": optax.apply_updates(v["params"], delta), **upd}
        updates = int(opt.gradient_step)
        assert int(v["batch_stats"]["steps"]) == call + 1  # training calls
        assert updates == (call + 1) // k
        r_max = float(cfg_of(v["batch_stats"]["steps"]))
        want = 1.0 if (call + 1) < k * w else float(r_fn((call + 1) // k))
        assert r_max == pytest.approx(want)
