"""Tests of bnjax.stats: per-feature moments, exact Chan merges, cross-device reduction.

References are float64 NumPy on the same (float32-rounded) values.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from bnjax import _checks, _numerics, stats
from bnjax.stats import Moments

METHODS = ("shifted", "two_pass")

# (shape, reduction axes): dense, NHWC conv, NCHW conv, two feature axes.
CASES = [
    ((60, 100), (0,)),
    ((8, 5, 5, 6), (0, 1, 2)),
    ((8, 6, 5, 5), (0, 2, 3)),
    ((4, 3, 5, 2), (0, 3)),
]


def np_moments(x: np.ndarray, axes, mask: np.ndarray | None = None):
    """float64 count / mean / M2 per feature (keepdims), 0 where nothing is valid."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(axis=axes, keepdims=True)
    mean = np.where(n > 0, (w * x).sum(axis=axes, keepdims=True) / np.maximum(n, 1), 0.0)
    m2 = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True)
    return n, mean, m2


def f32(a) -> np.ndarray:
    """Rounds to float32 and back to float64, so references see exactly bnjax's input."""
    return np.asarray(np.asarray(a, np.float32), np.float64)


def assert_moments(m: Moments, ref, *, rtol=2e-5, atol=1e-5):
    n, mean, m2 = ref
    np.testing.assert_array_equal(np.asarray(m.count), n)
    np.testing.assert_allclose(np.asarray(m.mean), mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(m.m2), m2, rtol=rtol, atol=atol * max(1, n.max()))


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,axes", CASES)
def test_moments_match_float64_numpy(shape, axes, method, rng):
    x = f32(3.0 + 2.0 * rng.standard_normal(shape))
    m = stats.moments(jnp.asarray(x, jnp.float32), axes, algorithm=method)
    assert m.mean.shape == tuple(1 if i in axes else s for i, s in enumerate(shape))
    assert m.mean.dtype == m.m2.dtype == m.count.dtype == jnp.float32
    assert_moments(m, np_moments(x, axes))
    # The biased variance of Algorithm 1 and the unbiased one.
    n, _, m2 = np_moments(x, axes)
    np.testing.assert_allclose(np.asarray(m.var()), m2 / n, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(m.var(ddof=1)), m2 / (n - 1), rtol=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_moments_negative_axes_equal_positive(method, rng):
    x = f32(rng.standard_normal((6, 4, 3)))
    a = stats.moments(jnp.asarray(x, jnp.float32), (-3, -2), algorithm=method)
    b = stats.moments(jnp.asarray(x, jnp.float32), (1, 0), algorithm=method)
    # Both against float64 NumPy (reduction over axes 0 and 1, keepdims), with the
    # tolerances of assert_moments (measured: relative <= 2.1e-6 mean, <= 9.2e-7 M2).
    ref = np_moments(x, (0, 1))
    assert a.mean.shape == ref[1].shape == (1, 1, 3)
    assert_moments(a, ref)
    assert_moments(b, ref)
    for u, v in zip(a, b, strict=True):  # and the same float32 computation
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask_shape", [(60, 7), (60, 1)])
def test_moments_masked_match_numpy_incl_empty_feature(method, mask_shape, rng):
    x = f32(5.0 + rng.standard_normal((60, 7)))
    mask = rng.random(mask_shape) < 0.6
    mask[:2] = True  # at least two valid rows
    if mask_shape[1] > 1:
        mask[:, 3] = False  # feature 3: nothing valid
    m = stats.moments(jnp.asarray(x, jnp.float32), (0,), mask=jnp.asarray(mask), algorithm=method)
    assert_moments(m, np_moments(x, (0,), mask))
    if mask_shape[1] > 1:
        assert float(m.count[0, 3]) == 0
        assert float(m.mean[0, 3]) == 0 and float(m.m2[0, 3]) == 0
        assert float(m.var()[0, 3]) == 0 and float(m.var(ddof=1)[0, 3]) == 0
    assert all(np.isfinite(np.asarray(f)).all() for f in m)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("method", METHODS + ("masked",))
def test_moments_large_offset_float32(offset, method, rng):
    """|mean| >> std: E[x^2] - E[x]^2 would lose every digit; bnjax must not."""
    x = np.asarray(offset + rng.standard_normal((4096, 16)), np.float32)
    ref_var = np.asarray(x, np.float64).var(axis=0)
    if method == "masked":
        mask = jnp.asarray(np.arange(4096)[:, None] % 3 != 0)
        m = stats.moments(jnp.asarray(x), (0,), mask=mask)
        ref_var = np.asarray(x, np.float64)[np.arange(4096) % 3 != 0].var(axis=0)
    else:
        m = stats.moments(jnp.asarray(x), (0,), algorithm=method)
    rel = np.abs(np.asarray(m.var())[0] - ref_var) / ref_var
    assert rel.max() < 1e-3, rel.max()


def test_moments_bf16_input_gives_float32_moments(rng):
    x = rng.standard_normal((128, 8)) * 3 + 1
    xb = jnp.asarray(x, jnp.bfloat16)
    m = stats.moments(xb, (0,))
    assert m.mean.dtype == m.m2.dtype == jnp.float32
    assert_moments(m, np_moments(np.asarray(xb.astype(jnp.float32), np.float64), (0,)))


def test_moments_float64_stays_float64(x64, rng):
    x = rng.standard_normal((50, 3)) + 1e8
    m = stats.moments(jnp.asarray(x), (0,))
    assert m.mean.dtype == jnp.float64
    assert_moments(m, np_moments(x, (0,)), rtol=1e-9, atol=1e-9)


def test_stats_dtype():
    assert _numerics.stats_dtype(jnp.bfloat16) == jnp.float32
    assert _numerics.stats_dtype(jnp.float16) == jnp.float32
    assert _numerics.stats_dtype(jnp.float32) == jnp.float32


def test_moments_autodiff_matches_plain_variance(rng):
    """The shift of the one-pass form is a stop_gradient: it must not change gradients."""
    x = jnp.asarray(rng.standard_normal((30, 4)) + 2, jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 4)), jnp.float32)

    def plain(x):
        mean = jnp.mean(x, 0, keepdims=True)
        return jnp.sum(w * jnp.mean((x - mean) ** 2, 0, keepdims=True)) + jnp.sum(w * mean)

    for method in METHODS:
        def f(x, method=method):
            m = stats.moments(x, (0,), algorithm=method)
            return jnp.sum(w * m.var()) + jnp.sum(w * m.mean)

        np.testing.assert_allclose(jax.grad(f)(x), jax.grad(plain)(x), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- errors


def test_moments_bad_method():
    with pytest.raises(ValueError, match="algorithm"):
        stats.moments(jnp.ones((4, 2)), (0,), algorithm="naive")
    with pytest.raises(ValueError, match="algorithm"):
        stats.moments(jnp.ones((4, 2)), (0,), algorithm="naive", mask=jnp.ones((4, 2), bool))


def test_canonicalize_axes():
    assert _checks.canonicalize_axes(4, -1) == (3,)
    assert _checks.canonicalize_axes(4, (2, -4)) == (0, 2)
    with pytest.raises(ValueError, match=r"axis=\(4,\).*rank 4"):
        _checks.canonicalize_axes(4, 4)
    with pytest.raises(ValueError, match=r"reduction_axes=\(-3,\).*rank 2"):
        _checks.canonicalize_axes(2, (-3,), name="reduction_axes")
    with pytest.raises(ValueError, match="repeats"):
        _checks.canonicalize_axes(3, (1, -2))
    with pytest.raises(TypeError, match="axis"):
        _checks.canonicalize_axes(3, (1.0,))


def test_check_mask_errors():
    with pytest.raises(TypeError, match="mask must be a boolean.*float32"):
        _checks.check_mask(jnp.ones((4, 3)), (4, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2\).*input shape \(4, 3\)"):
        _checks.check_mask(jnp.ones((4, 2), bool), (4, 3))
    # Broadcasting must not grow the input: a mask of higher rank is refused.
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 3\)"):
        _checks.check_mask(jnp.ones((2, 4, 3), bool), (4, 3))
    # Broadcastable masks are accepted as they are.
    assert _checks.check_mask(jnp.ones((4, 1), bool), (4, 3)).shape == (4, 1)
    assert _checks.check_mask(jnp.ones((3,), bool), (4, 3)).shape == (3,)


# --------------------------------------------------------------------------- merges


def _np_part(x):
    n, mean, m2 = np_moments(x, (0,)) if len(x) else (np.zeros((1, 3)),) * 3
    return Moments(*(jnp.asarray(a[0], jnp.float32) for a in (n, mean, m2)))


@pytest.mark.parametrize("sizes", [(5, 17), (1, 40), (0, 9), (9, 0), (0, 0), (2, 2)])
def test_merge_exact_for_unequal_and_zero_counts(sizes, rng):
    a_np = f32(2.0 + rng.standard_normal((sizes[0], 3)))
    b_np = f32(-1.0 + 3 * rng.standard_normal((sizes[1], 3)))
    merged = stats.merge(_np_part(a_np), _np_part(b_np))
    both = np.concatenate([a_np, b_np])
    if len(both) == 0:
        for f in merged:
            np.testing.assert_array_equal(np.asarray(f), 0)
        return
    n, mean, m2 = (r[0] for r in np_moments(both, (0,)))
    np.testing.assert_array_equal(np.asarray(merged.count), n)
    np.testing.assert_allclose(np.asarray(merged.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.m2), m2, rtol=1e-5, atol=1e-5)


def test_merge_differs_from_naive_mean_of_means(rng):
    """Documents why the counts matter: averaging means of unequal parts is wrong."""
    a, b = f32(rng.standard_normal((2, 1))), f32(10 + rng.standard_normal((30, 1)))
    merged = stats.merge(_np_part(a), _np_part(b))
    true_mean = np.concatenate([a, b]).mean()
    naive = (a.mean() + b.mean()) / 2
    assert abs(float(merged.mean[0]) - true_mean) < 1e-5
    assert abs(naive - true_mean) > 1


@pytest.mark.parametrize("keepdims", [False, True])
def test_merge_along_exact_incl_zero_counts(keepdims, rng):
    sizes = [5, 0, 17, 1, 40, 0]
    parts = [f32(i + (1 + i) * rng.standard_normal((s, 3))) for i, s in enumerate(sizes)]
    stacked = Moments(*(jnp.stack(f) for f in zip(*map(_np_part, parts), strict=True)))
    out = stats.merge_along(stacked, 0, keepdims=keepdims)
    n, mean, m2 = np_moments(np.concatenate(parts), (0,))
    if not keepdims:
        n, mean, m2 = n[0], mean[0], m2[0]
    np.testing.assert_array_equal(np.asarray(out.count), n)
    np.testing.assert_allclose(np.asarray(out.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.m2), m2, rtol=1e-5)
    # All parts empty: zeros, no NaN.
    empty = Moments(*(jnp.zeros((3, 2)) for _ in range(3)))
    for f in stats.merge_along(empty, 0):
        np.testing.assert_array_equal(np.asarray(f), 0)


@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_merge_of_parts_equals_moments_of_whole(sizes, offset, seed):
    """Splitting a batch anywhere and merging (pairwise or at once) changes nothing."""
    rng = np.random.default_rng(seed)
    parts = [f32(offset + rng.standard_normal((s, 3))) for s in sizes]
    whole = np.concatenate(parts)
    ps = [_np_part(p) for p in parts]
    acc = ps[0]
    for p in ps[1:]:
        acc = stats.merge(acc, p)
    at_once = stats.merge_along(Moments(*(jnp.stack(f) for f in zip(*ps, strict=True))), 0)
    if len(whole) == 0:
        for f in (*acc, *at_once):
            np.testing.assert_array_equal(np.asarray(f), 0)
        return
    n, mean, m2 = (r[0] for r in np_moments(whole, (0,)))
    for m in (acc, at_once):
        np.testing.assert_array_equal(np.asarray(m.count), n)
        np.testing.assert_allclose(np.asarray(m.mean), mean, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m.m2), m2, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- all_reduce


def test_all_reduce_none_is_identity(rng):
    m = stats.moments(jnp.asarray(rng.standard_normal((5, 2)), jnp.float32), (0,))
    assert stats.all_reduce(m, None) is m


def test_all_reduce_pools_unequal_device_counts_exactly(rng):
    """Four 'devices' (a vmap axis) with 7, 0, 3 and 12 valid rows: pooled exactly."""
    x = f32(4.0 + rng.standard_normal((4, 12, 3)))
    valid = np.arange(12)[None, :] < np.array([7, 0, 3, 12])[:, None]  # (4, 12)
    mask = jnp.asarray(valid[:, :, None])

    def per_device(x, mask):
        return stats.all_reduce(stats.moments(x, (0,), mask=mask), "devices")

    out = jax.vmap(per_device, axis_name="devices")(jnp.asarray(x, jnp.float32), mask)
    n, mean, m2 = np_moments(x[valid], (0,))
    for d in range(4):  # every device gets the same pooled result
        np.testing.assert_array_equal(np.asarray(out.count[d]), n)
        np.testing.assert_allclose(np.asarray(out.mean[d]), mean, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out.m2[d]), m2, rtol=1e-4)


def test_all_reduce_unbound_axis_name_error(rng):
    m = stats.moments(jnp.ones((4, 2)), (0,))
    with pytest.raises(NameError, match="axis_name='batch' is not bound"):
        jax.jit(lambda m: stats.all_reduce(m, "batch"))(m)
