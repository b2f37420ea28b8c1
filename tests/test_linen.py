"""Tests of bnjax.linen.BatchNorm as a drop-in for flax.linen.BatchNorm.

The reference is flax.linen.BatchNorm with ``use_fast_variance=False`` (its exact
two-pass variance); both modules are dropped into the same model definitions, so the
variable trees, outputs, updated statistics and a few SGD steps must agree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax.linen as bnl

FlaxBN = functools.partial(nn.BatchNorm, use_fast_variance=False)


class MLP(nn.Module):
    """Three sigmoid hidden layers with BN before each (the paper's MNIST network, small)."""

    bn: Callable = bnl.BatchNorm
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(3):
            x = nn.Dense(16, use_bias=False)(x)
            x = self.bn(momentum=self.momentum)(x, use_running_average=not train)
            x = nn.sigmoid(x)
        return nn.Dense(10)(x)


class ConvNet(nn.Module):
    """NHWC convs with BN per channel, one NCHW BN (axis=1) and one with two feature axes."""

    bn: Callable = bnl.BatchNorm
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        x = nn.Conv(6, (3, 3), use_bias=False)(x)
        x = nn.relu(self.bn(momentum=self.momentum)(x, use_running_average=ura))
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)
        x = jnp.transpose(x, (0, 3, 1, 2))  # NCHW
        x = nn.relu(self.bn(axis=1, momentum=self.momentum)(x, use_running_average=ura))
        x = self.bn(axis=(2, 3), momentum=self.momentum)(x, use_running_average=ura)
        x = jnp.mean(x, axis=(2, 3))
        return nn.Dense(10)(x)


MODELS = {
    "mlp": (MLP, (12, 20)),
    "conv": (ConvNet, (6, 8, 8, 3)),
}


def _data(shape, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = 2.0 + 3.0 * jax.random.normal(k1, shape)
    y = jax.random.randint(k2, (shape[0],), 0, 10)
    return x, y


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(
            np.asarray(u), np.asarray(v), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module", params=sorted(MODELS))
def models(request):
    """(flax model, bnjax model, flax-created variables, input shape)."""
    cls, shape = MODELS[request.param]
    flax_model, bnjax_model = cls(bn=FlaxBN), cls(bn=bnl.BatchNorm)
    variables = jax.jit(flax_model.init, static_argnames="train")(
        jax.random.key(1), jnp.ones(shape), train=True
    )
    return flax_model, bnjax_model, variables, shape


def test_same_variable_tree(models):
    """Same collections, names, shapes and dtypes (the values of one layer's variables are
    compared in test_init_does_not_update_batch_stats)."""
    flax_model, bnjax_model, flax_vars, shape = models
    ours = jax.eval_shape(
        functools.partial(bnjax_model.init, train=True), jax.random.key(1), jnp.ones(shape)
    )
    spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert spec(ours) == spec(flax_vars)
    for train in (True, False):  # the output has the same shape and dtype too
        outs = [
            jax.eval_shape(functools.partial(m.apply, train=train, mutable=["batch_stats"]),
                           flax_vars, jnp.ones(shape))
            for m in (flax_model, bnjax_model)
        ]
        assert spec(outs[0]) == spec(outs[1])


def _randomize_bn_variables(variables, seed=7):
    """Random BN scale/bias (N(0, 1) + 1 / N(0, 1)), running mean (N(0, 1)) and var
    (U[0.5, 2]): at flax's initial values (scale 1, bias 0, mean 0, var 1) an eval-mode
    comparison could not see a sign, eps or sqrt error. Dense/Conv weights are kept."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, a), k in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "BatchNorm" not in name:
            out.append(a)
        elif name.endswith("['var']"):
            out.append(jax.random.uniform(k, a.shape, a.dtype, 0.5, 2.0))
        elif name.endswith("['scale']"):
            out.append(1.0 + jax.random.normal(k, a.shape, a.dtype))
        else:  # bias, mean
            out.append(jax.random.normal(k, a.shape, a.dtype))
    return jax.tree.unflatten(treedef, out)


def test_train_and_eval_match_flax(models):
    flax_model, bnjax_model, variables, shape = models
    variables = _randomize_bn_variables(variables)  # the same values for both models
    n_bn = sum("BatchNorm" in jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_leaves_with_path(variables))
    assert n_bn >= 12  # 3 layers x (scale, bias, mean, var), each randomized
    x, _ = _data(shape)
    for train in (True, False):
        outs = []
        for model in (flax_model, bnjax_model):
            fn = jax.jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))
            outs.append(fn(variables, x))
        (y_f, upd_f), (y_b, upd_b) = outs
        # Measured (CPU, float32, outputs up to ~2.4): |diff| <= 3.0e-7 train, 2.4e-7 eval;
        # updated statistics <= 6e-8. Tolerance 1e-5 leaves > 30x headroom.
        np.testing.assert_allclose(np.asarray(y_b), np.asarray(y_f), rtol=1e-5, atol=1e-5)
        _assert_trees_close(upd_b, upd_f)
        if not train:  # eval does not touch the statistics
            _assert_trees_close(upd_b, {"batch_stats": variables["batch_stats"]}, rtol=0, atol=0)


def test_sgd_steps_from_flax_variables_match_flax(models):
    """Load flax-created variables into the bnjax model; 5 optax SGD steps each; the
    parameters and running statistics stay equal within float32 tolerance."""
    flax_model, bnjax_model, variables, shape = models
    tx = optax.sgd(0.1)

    def make_step(model):
        def loss_fn(params, batch_stats, x, y):
            logits, upd = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        @jax.jit
        def step(params, batch_stats, opt_state, x, y):
            (loss, batch_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch_stats, x, y
            )
            updates, opt_state = tx.update(g, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        return step

    p, bs = variables["params"], variables["batch_stats"]
    states = [[p, bs, tx.init(p)], [p, bs, tx.init(p)]]  # flax, bnjax: the same start
    steps = [make_step(flax_model), make_step(bnjax_model)]
    for t in range(5):
        x, y = _data(shape, seed=10 + t)
        losses = []
        for s, step in zip(states, steps, strict=True):
            s[0], s[1], s[2], loss = step(s[0], s[1], s[2], x, y)
            losses.append(float(loss))
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    (pf, bsf, _), (pb, bsb, _) = states
    _assert_trees_close(pb, pf, rtol=1e-4, atol=1e-5)
    _assert_trees_close(bsb, bsf, rtol=1e-4, atol=1e-5)
    # The parameters did move: the comparison is not between untouched trees.
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), pb, variables["params"])
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_masked_train_matches_flax():
    x, _ = _data((16, 5, 4))
    mask = jax.random.uniform(jax.random.key(3), (16, 5, 1)) < 0.6
    outs = []
    for bn in (FlaxBN(use_running_average=False), bnl.BatchNorm(use_running_average=False)):
        v = bn.init(jax.random.key(0), x)
        outs.append(bn.apply(v, x, mask=mask, mutable=["batch_stats"]))
    (y_f, s_f), (y_b, s_b) = outs
    np.testing.assert_allclose(np.asarray(y_b), np.asarray(y_f), rtol=1e-4, atol=1e-5)
    _assert_trees_close(s_b, s_f)


# --------------------------------------------------------------------------- switches


def _bn_apply(bn, x, **kw):
    v = bn.init(jax.random.key(0), x, **kw)
    return bn.apply(v, x, mutable=["batch_stats"], **kw)


def test_train_switch_equals_use_running_average():
    x, _ = _data((8, 3))
    a = _bn_apply(bnl.BatchNorm(), x, train=True)
    b = _bn_apply(bnl.BatchNorm(), x, use_running_average=False)
    c = _bn_apply(bnl.BatchNorm(use_running_average=False), x)
    d = _bn_apply(bnl.BatchNorm(use_running_average=False), x, train=True)  # consistent
    for other in (b, c, d):
        _assert_trees_close(a, other, rtol=0, atol=0)
    e = _bn_apply(bnl.BatchNorm(), x, train=False)
    f = _bn_apply(bnl.BatchNorm(), x, use_running_average=True)
    _assert_trees_close(e, f, rtol=0, atol=0)
    assert not np.allclose(np.asarray(a[0]), np.asarray(e[0]))


def test_contradictory_switches_raise():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="contradictory.*train=True.*use_running_average=True"):
        bnl.BatchNorm(use_running_average=True).init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match="contradictory"):
        bnl.BatchNorm().init(jax.random.key(0), x, use_running_average=False, train=False)
    with pytest.raises(ValueError, match="train=.*use_running_average"):
        bnl.BatchNorm().init(jax.random.key(0), x)
    # Giving use_running_average twice is flax's error too.
    for bn in (bnl.BatchNorm, nn.BatchNorm):
        with pytest.raises(ValueError, match="use_running_average"):
            bn(use_running_average=True).init(jax.random.key(0), x, use_running_average=False)


def test_init_does_not_update_batch_stats():
    x, _ = _data((32, 4))
    v = bnl.BatchNorm().init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), 0)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["var"]), 1)
    # init on a single example (a common idiom) works, like flax, and also changes nothing.
    v1 = bnl.BatchNorm().init(jax.random.key(0), x[:1], train=True)
    vf = nn.BatchNorm().init(jax.random.key(0), x[:1], use_running_average=False)
    _assert_trees_close(v1, vf, rtol=0, atol=0)


def test_population_average_adds_count_and_batches():
    bn = bnl.BatchNorm(population="average")
    xs = [_data((n, 3), seed=n)[0] for n in (10, 7, 21)]
    v = bn.init(jax.random.key(0), xs[0], train=True)
    assert set(v["batch_stats"]) == {"mean", "var", "count", "batches"}
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["count"]), 0)
    apply = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"])[1])
    for x in xs:
        v = {**v, **apply(v, x)}
    bs = v["batch_stats"]
    xs64 = [np.asarray(x, np.float64) for x in xs]
    n = np.array([len(x) for x in xs])[:, None]
    mean = sum(x.mean(0) * len(x) for x in xs64) / n.sum()
    var = sum(x.var(0) * len(x) for x in xs64) / (n - 1).sum()  # Algorithm 2, pooled
    np.testing.assert_allclose(np.asarray(bs["mean"]), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bs["var"]), var, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(bs["count"]), n.sum())
    np.testing.assert_array_equal(np.asarray(bs["batches"]), 3)
    # Variables made by flax.linen.BatchNorm (no count/batches) evaluate unchanged; a
    # training step on them starts a fresh average.
    x = xs[0]
    flax_vars = jax.tree.map(lambda a: a + 0.5, nn.BatchNorm().init(jax.random.key(0), x, True))
    np.testing.assert_allclose(
        np.asarray(bn.apply(flax_vars, x, train=False)),
        np.asarray(nn.BatchNorm(use_running_average=True).apply(flax_vars, x)),
        rtol=1e-6,
        atol=1e-6,
    )
    _, upd = bn.apply(flax_vars, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["count"]), len(x))
    # The default keeps flax's variables only.
    assert set(bnl.BatchNorm().init(jax.random.key(0), xs[0], train=True)["batch_stats"]) == {
        "mean",
        "var",
    }


def test_exact_variance_even_with_use_fast_variance_true():
    """flax's default E[x^2] - E[x]^2 collapses at 1e4 + N(0, 1); bnjax ignores the flag."""
    x = 1e4 + jax.random.normal(jax.random.key(0), (4096, 16))
    ref = np.asarray(x, np.float64).var(0)
    kw = dict(use_running_average=False, momentum=0.0, use_fast_variance=True)
    (_, ours), (_, theirs) = (_bn_apply(bn(**kw), x) for bn in (bnl.BatchNorm, nn.BatchNorm))
    ours_err = np.max(np.abs(np.asarray(ours["batch_stats"]["var"]) - ref) / ref)
    theirs_err = np.max(np.abs(np.asarray(theirs["batch_stats"]["var"]) - ref) / ref)
    assert ours_err < 1e-3
    assert theirs_err > 0.1


@pytest.mark.parametrize(
    "x_dtype,kw",
    [
        (jnp.bfloat16, {}),
        (jnp.bfloat16, {"dtype": jnp.bfloat16}),
        (jnp.float32, {"param_dtype": jnp.bfloat16}),
        (jnp.bfloat16, {"param_dtype": jnp.bfloat16}),
    ],
)
def test_dtypes_match_flax(x_dtype, kw):
    x = _data((16, 4))[0].astype(x_dtype)
    (y_b, s_b), (y_f, s_f) = (
        _bn_apply(bn(use_running_average=False, **kw), x) for bn in (bnl.BatchNorm, FlaxBN)
    )
    assert y_b.dtype == y_f.dtype
    spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert spec(s_b) == spec(s_f)
    # Measured (CPU): output |diff| <= 2.4e-7 for float32 outputs (|y| <~ 2), 0 for
    # bfloat16 outputs; updated statistics (float32) equal exactly. Tolerances: 1e-5 for
    # float32 outputs, one bfloat16 ulp at 1 (2**-7 ~ 8e-3) for bfloat16 outputs, 1e-6
    # relative for the statistics.
    tol = 1e-5 if y_f.dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(
        np.asarray(y_b, np.float32), np.asarray(y_f, np.float32), rtol=tol, atol=tol
    )
    _assert_trees_close(s_b, s_f, rtol=1e-6, atol=1e-7)


def test_errors_are_the_functional_ones():
    with pytest.raises(TypeError, match="floating-point.*int32"):
        bnl.BatchNorm().init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), train=True)
    v = bnl.BatchNorm().init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    with pytest.raises(ValueError, match="one element per feature"):
        bnl.BatchNorm().apply(v, jnp.ones((1, 3)), train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2\)"):
        bnl.BatchNorm().apply(
            v, jnp.ones((4, 3)), train=True, mask=jnp.ones((4, 2), bool), mutable=["batch_stats"]
        )


def test_axis_name_initializes_in_train_mode_outside_a_mapped_context():
    """flax's convention: ``init`` makes no collective, so a layer with ``axis_name`` set
    initializes with ``train=True`` on a real batch outside ``vmap``/``pmap``/``shard_map``
    (the variables are the fresh ones). Applying it in train mode there does need the axis
    (the positive control that ``axis_name`` is in use at all)."""
    x = _data((8, 3))[0]
    bn = bnl.BatchNorm(axis_name="batch")
    v = bn.init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3, np.float32))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3, np.float32))
    with pytest.raises(NameError, match="axis_name='batch' is not bound"):
        bn.apply(v, x, train=True, mutable=["batch_stats"])
    # Inside a mapped context with that name the same variables train (pooled statistics).
    y, upd = jax.vmap(
        lambda xi: bn.apply(v, xi, train=True, mutable=["batch_stats"]), axis_name="batch"
    )(x.reshape(2, 4, 3))
    ref = np.asarray(x, np.float64)
    np.testing.assert_allclose(upd["batch_stats"]["mean"][0], 0.01 * ref.mean(0), rtol=1e-5)


def test_track_running_stats_false_has_no_state_and_uses_batch_statistics():
    """PyTorch's track_running_stats=False: no batch_stats at all; train and eval both
    normalize with the batch's statistics (flax's use_running_average=False)."""
    x = jax.random.normal(jax.random.key(0), (6, 4)) * 2 + 1
    bn = bnl.BatchNorm(track_running_stats=False)
    variables = bn.init(jax.random.key(1), x)
    assert set(variables) == {"params"}
    ref = nn.BatchNorm(use_running_average=False)
    y_ref, _ = ref.apply(ref.init(jax.random.key(1), x), x, mutable=["batch_stats"])
    for train in (True, False):
        np.testing.assert_allclose(bn.apply(variables, x, train=train), y_ref, atol=1e-6)
