"""Tests of the population update rules in bnjax.population (EMA and the paper's average).

The references are float64 NumPy, written from PAPER.md:

* EMA (flax convention): ``new = momentum * old + (1 - momentum) * batch``, with the
  biased batch variance ``sigma2_B``;
* Algorithm 2: ``E[x] = E_B[mu_B]`` (count weighted) and
  ``Var[x] = sum_B n_B sigma2_B / sum_B (n_B - 1)``, which is ``m/(m-1) E_B[sigma2_B]``
  for equal batch sizes ``m``; for a convolution ``n_B`` counts spatial positions too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.functional as F
from bnjax import population as pop
from bnjax import stats
from bnjax.population import BatchStats

# --------------------------------------------------------------------------- references


def np_batch(x: np.ndarray, red: tuple[int, ...], mask: np.ndarray | None = None):
    """float64 (n_B, mu_B, sigma2_B) per feature of one batch (flattened feature shape)."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(axis=red)
    mu = (w * x).sum(axis=red) / np.maximum(n, 1)
    mu_b = np.expand_dims(mu, red)
    s2 = (w * (x - mu_b) ** 2).sum(axis=red) / np.maximum(n, 1)
    return n, mu, s2


def np_algorithm2(batches):
    """Algorithm 2 over a list of (n_B, mu_B, sigma2_B): E[x] and the unbiased Var[x]."""
    n = np.stack([b[0] for b in batches])
    mu = np.stack([b[1] for b in batches])
    s2 = np.stack([b[2] for b in batches])
    mean = (n * mu).sum(0) / n.sum(0)
    var = (n * s2).sum(0) / np.maximum(n - 1, 0).sum(0)
    return mean, var


def np_ema(batches, momentum, mean0, var0):
    mean, var = np.array(mean0, np.float64), np.array(var0, np.float64)
    for n, mu, s2 in batches:
        seen = n > 0
        mean = np.where(seen, momentum * mean + (1 - momentum) * mu, mean)
        var = np.where(seen, momentum * var + (1 - momentum) * s2, var)
    return mean, var


def f32(a) -> np.ndarray:
    return np.asarray(np.asarray(a, np.float32), np.float64)


def moments_of(x, red, mask=None) -> stats.Moments:
    m = stats.moments(jnp.asarray(x, jnp.float32), red, mask=None if mask is None else mask)
    fshape = tuple(s for i, s in enumerate(x.shape) if i not in red)
    return stats.Moments(*(f.reshape(fshape) for f in m))


# --------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.0])
def test_ema_update_rule_matches_numpy(momentum, rng):
    state = bnjax.init_stats(5)
    batches = []
    for t in range(4):
        x = f32(t + (1 + t) * rng.standard_normal((20 + 7 * t, 5)))
        batches.append(np_batch(x, (0,)))
        state = pop.update(state, moments_of(x, (0,)), population="ema", momentum=momentum)
    mean, var = np_ema(batches, momentum, np.zeros(5), np.ones(5))
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var), var, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.count), sum(b[0] for b in batches))
    np.testing.assert_array_equal(np.asarray(state.batches), 4)
    assert all(a.dtype == jnp.float32 for a in state)


def test_ema_through_apply_train_default_momentum(rng):
    """apply_train's state update: the flax convention with default momentum 0.99."""
    cfg = F.BatchNormConfig()
    assert cfg.momentum == 0.99 and cfg.epsilon == 1e-5
    params, state = F.init(6, cfg)
    state = state._replace(mean=jnp.arange(6.0), var=jnp.full(6, 2.0))
    x = f32(3 + 2 * rng.standard_normal((60, 6)))
    _, new = F.apply_train(params, state, jnp.asarray(x, jnp.float32), cfg)
    n, mu, s2 = np_batch(x, (0,))
    np.testing.assert_allclose(np.asarray(new.mean), 0.99 * np.arange(6.0) + 0.01 * mu, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), 0.99 * 2.0 + 0.01 * s2, rtol=1e-6)


def test_ema_empty_feature_keeps_state(rng):
    state = bnjax.init_stats(3)._replace(
        mean=jnp.array([1.0, 2.0, 3.0]), var=jnp.array([4.0, 5, 6])
    )
    x = f32(rng.standard_normal((10, 3)))
    mask = np.ones((10, 3), bool)
    mask[:, 1] = False
    for estimator in pop.POPULATIONS:
        new = pop.update(
            state, moments_of(x, (0,), jnp.asarray(mask)), population=estimator, momentum=0.9
        )
        assert float(new.mean[1]) == 2.0 and float(new.var[1]) == 5.0
        assert float(new.count[1]) == 0 and float(new.batches[1]) == 0
        assert float(new.count[0]) == 10 and float(new.batches[0]) == 1
        assert np.isfinite(np.asarray(new.mean)).all() and np.isfinite(np.asarray(new.var)).all()


def test_unknown_estimator():
    m = stats.Moments(jnp.ones(2), jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="population must be one of.*'median'"):
        pop.update(bnjax.init_stats(2), m, population="median", momentum=0.9)
    with pytest.raises(ValueError, match="population"):
        F.BatchNormConfig(population="median")


# --------------------------------------------------------------------------- average


def _batches_dense(rng):
    """Unequal batch sizes, masks, a batch of one valid element, an empty feature."""
    out = []
    for t, size in enumerate([60, 13, 2, 37, 60]):
        x = f32(2 - t + (1 + 0.3 * t) * rng.standard_normal((size, 4)))
        mask = rng.random((size, 4)) < 0.8
        mask[:2] = True
        if t == 1:
            mask[:, 2] = False  # feature 2 sees nothing in this batch
        if t == 2:
            mask[1, 0] = False  # feature 0: a batch of one element (no degrees of freedom)
        out.append((x, mask))
    return out


def _batches_conv(rng):
    out = []
    for t, size in enumerate([8, 3, 5]):
        x = f32(1 + t + rng.standard_normal((size, 4, 3, 2)))
        mask = np.broadcast_to(rng.random((size, 4, 3, 1)) < 0.7, x.shape).copy()
        out.append((x, mask))
    return out


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_average_equals_algorithm2(kind, rng):
    batches = _batches_dense(rng) if kind == "dense" else _batches_conv(rng)
    red = (0,) if kind == "dense" else (0, 1, 2)
    fdim = batches[0][0].shape[-1]
    cfg = F.BatchNormConfig(population="average")
    params, state = F.init(fdim, cfg)
    step = jax.jit(lambda p, s, x, m: F.apply_train(p, s, x, cfg, mask=m))
    refs = []
    for x, mask in batches:
        _, state = step(params, state, jnp.asarray(x, jnp.float32), jnp.asarray(mask))
        refs.append(np_batch(x, red, mask))
    mean, var = np_algorithm2(refs)
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var), var, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.count), sum(r[0] for r in refs))
    np.testing.assert_array_equal(np.asarray(state.batches), sum(r[0] > 0 for r in refs))


def test_average_equal_sizes_is_paper_formula(rng):
    """Equal m: E[x] = mean of mu_B and Var[x] = m/(m-1) * mean of sigma2_B, conv m' = m p q."""
    m, p, q, c = 6, 3, 2, 5
    state = bnjax.init_stats(c)
    mus, s2s = [], []
    for t in range(5):
        x = f32(t + rng.standard_normal((m, p, q, c)))
        state = pop.update(state, moments_of(x, (0, 1, 2)), population="average", momentum=0.9)
        mus.append(x.mean(axis=(0, 1, 2)))
        s2s.append(x.var(axis=(0, 1, 2)))
    mp = m * p * q
    np.testing.assert_allclose(np.asarray(state.mean), np.mean(mus, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var), mp / (mp - 1) * np.mean(s2s, 0), rtol=1e-5)


def test_average_is_not_the_variance_of_the_union(rng):
    """Algorithm 2 pools *within-batch* variances: batches with different means do not
    inflate Var[x] (unlike the variance of all samples together)."""
    state = bnjax.init_stats(1)
    xs = [f32(10 * t + rng.standard_normal((50, 1))) for t in range(3)]
    for x in xs:
        state = pop.update(state, moments_of(x, (0,)), population="average", momentum=0.9)
    within = np_algorithm2([np_batch(x, (0,)) for x in xs])[1]
    union = np.concatenate(xs).var(ddof=1)
    np.testing.assert_allclose(np.asarray(state.var), within, rtol=1e-5)
    assert union > 10 * within[0]


def test_reset_population_under_jit_with_traced_flag(rng):
    cfg = F.BatchNormConfig(population="average")
    params, state = F.init(3, cfg)

    @jax.jit
    def step(state, x, reset):
        state = pop.reset_population(state, reset)
        return F.apply_train(params, state, x, cfg)[1]

    xs = [f32(t + rng.standard_normal((16 + t, 3))) for t in range(5)]
    for t, x in enumerate(xs):
        state = step(state, jnp.asarray(x, jnp.float32), jnp.asarray(t == 2))
    mean, var = np_algorithm2([np_batch(x, (0,)) for x in xs[2:]])
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.var), var, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.count), sum(len(x) for x in xs[2:]))
    np.testing.assert_array_equal(np.asarray(state.batches), 3)
    # where=False leaves everything; where=True keeps mean/var and zeroes the counters.
    same = jax.jit(pop.reset_population)(state, jnp.asarray(False))
    for a, b in zip(same, state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = pop.reset_population(state)
    np.testing.assert_array_equal(np.asarray(fresh.mean), np.asarray(state.mean))
    assert float(jnp.abs(fresh.count).sum() + jnp.abs(fresh.batches).sum()) == 0


def test_update_keeps_dtypes_and_shapes():
    state = bnjax.init_stats((2, 3))
    m = stats.Moments(jnp.full((2, 3), 4.0), jnp.ones((2, 3)), jnp.ones((2, 3)))
    for est in pop.POPULATIONS:
        new = pop.update(state, m, population=est, momentum=0.9)
        assert isinstance(new, BatchStats)
        assert all(a.shape == (2, 3) and a.dtype == jnp.float32 for a in new)


# --------------------------------------------------------------------------- PyTorch's rules


def np_torch_running(batches, momentum, mean0, var0):
    """PyTorch's running statistics (float64): unbiased batch variance
    ``n/(n-1) sigma2_B``; ``momentum`` the weight of the batch, or ``None`` for the
    cumulative average ``factor = 1 / num_batches_tracked``."""
    mean, var = np.array(mean0, np.float64), np.array(var0, np.float64)
    for k, (n, mu, s2) in enumerate(batches, start=1):
        f = 1.0 / k if momentum is None else momentum
        mean = (1 - f) * mean + f * mu
        var = (1 - f) * var + f * s2 * n / (n - 1)
    return mean, var


@pytest.mark.parametrize("torch_momentum", [0.1, 0.5, None])
def test_unbiased_and_cumulative_match_torch_rule(torch_momentum, rng):
    """bnjax's PyTorch options against a NumPy transcription of torch's update, over
    unequal batch sizes (no torch needed: tests/test_torch.py checks torch itself)."""
    cfg = F.BatchNormConfig(
        momentum=0.0 if torch_momentum is None else 1 - torch_momentum,
        population="ema" if torch_momentum is not None else "cumulative",
        running_variance="unbiased",
    )
    params, state = F.init(3, cfg)
    batches = []
    for n in (2, 9, 4, 5):
        x = rng.normal(3.0, 2.0, (n, 3))
        batches.append(np_batch(x, (0,)))
        _, state = F.apply_train(params, state, jnp.asarray(x, jnp.float32), cfg)
    mean, var = np_torch_running(batches, torch_momentum, np.zeros(3), np.ones(3))
    np.testing.assert_allclose(state.mean, mean, rtol=2e-6)
    np.testing.assert_allclose(state.var, var, rtol=2e-6)
    np.testing.assert_array_equal(state.batches, 4)
    if torch_momentum is None:  # every batch weighs the same: not the paper's average
        avg, _ = np_algorithm2(batches)
        assert np.max(np.abs(avg - mean)) > 1e-2


def test_unbiased_variance_skips_a_feature_with_one_valid_element():
    m = stats.Moments(jnp.array([1.0, 4.0]), jnp.array([2.0, 0.5]), jnp.array([0.0, 3.0]))
    st = pop.update(bnjax.init_stats(2), m, population="ema", momentum=0.5, variance="unbiased")
    np.testing.assert_allclose(st.var, [1.0, 0.5 * 1 + 0.5 * 1.0])
    np.testing.assert_allclose(st.mean, [1.0, 0.25])


def test_torch_options_rejected_with_names():
    with pytest.raises(ValueError, match="running_variance must be one of.*'sample'"):
        F.BatchNormConfig(running_variance="sample")
    m = stats.Moments(jnp.ones(2), jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="variance must be one of"):
        pop.update(bnjax.init_stats(2), m, population="ema", momentum=0.9, variance="x")
    with pytest.raises(ValueError, match="population must be one of.*'cumulative'"):
        bnjax.WhiteningConfig(population="cumulative")
