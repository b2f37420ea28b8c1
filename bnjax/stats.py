"""Per-feature moments: count, mean and centred second moment (M2).

This is the bottom of bnjax's data path. Everything here is pure `jax.numpy`
and knows nothing about parameters, running statistics or Flax.

A :class:`Moments` triple `(count, mean, m2)` is what Algorithm 1 of the paper
needs (`mu_B = mean`, `sigma2_B = m2 / count`) and, unlike a `(mean, var)`
pair, it can be merged *exactly* across batches or devices with the parallel
formula of Chan et al. (:func:`merge`), whatever the element counts are.

Numerics:

* Accumulation is in at least float32 (bf16/fp16 inputs get float32 moments;
  float64 inputs stay float64).
* The variance is never computed as `E[x^2] - E[x]^2`. Two exact methods:
  `algorithm="two_pass"` takes the mean first and then `sum((x - mean)^2)`;
  `algorithm="shifted"` accumulates `sum(x - a)` and `sum((x - b)^2)` around
  per-feature shifts `a`, `b` taken from the data itself (the max and min of
  the first two elements of each feature), so both sums are of order `std`
  rather than `|mean|` and the cancellation is harmless; its two reductions are
  independent (one pass over `x` on GPU/TPU, where XLA fuses them). The default
  `algorithm="auto"` is `"two_pass"` on CPU and `"shifted"` elsewhere: on
  XLA:CPU a plain `sum(x)` runs at about twice the speed of a reduction with a
  fused subtraction, so the two-pass form (one plain, one centred reduction) is
  the faster one there (benchmarks/ops.py, docs/benchmarks.md).
  With a mask the shift element may be an invalid (padding) value, so masked
  inputs always use the two-pass form. (`BatchNormConfig.stats_method` picks
  the algorithm for a layer.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._checks import canonicalize_axes, check_mask
from bnjax._numerics import abs2, head, real_dtype, stats_dtype
from bnjax._sharding import all_gather_invariant, explicitly_sharded, replicated_out, varying_axes

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "CoMoments",
    "Moments",
    "all_reduce",
    "all_reduce_comoments",
    "comoments",
    "merge",
    "merge_along",
    "merge_comoments_along",
    "moments",
    "resolve_algorithm",
]

Array = jax.Array
AxisName = str | tuple[str, ...] | None
Algorithm = Literal["auto", "two_pass", "shifted"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


class Moments(NamedTuple):
    """Per-feature sufficient statistics of a set of values.

    All three fields have the same shape (the feature shape, or the keepdims
    shape of the reduction) and the statistics dtype (at least float32). For
    complex inputs `mean` is complex (complex64 at least) while `count` and
    `m2` are real (float32 for complex64), as is :meth:`var`.

    Attributes:
      count: number of valid elements `n` (a float, so it can be summed).
      mean: `sum(x) / n` (0 where `n == 0`).
      m2: centred sum of squares `sum(|x - mean|^2)` (0 where `n == 0`).
    """

    count: Array
    mean: Array
    m2: Array

    def var(self, ddof: int = 0) -> Array:
        """Variance `m2 / (count - ddof)`; 0 where `count <= ddof`."""
        denom = self.count - ddof
        return jnp.where(denom > 0, self.m2 / jnp.where(denom > 0, denom, 1), 0)


def _reduce_sum(x: Array, axes: tuple[int, ...]) -> Array:
    return jnp.sum(x, axis=axes, keepdims=True)


def moments(
    x: Array,
    reduction_axes: int | Sequence[int],
    *,
    mask: Array | None = None,
    algorithm: Algorithm = "auto",
) -> Moments:
    """Count, mean and centred M2 of `x` over `reduction_axes` (keepdims shape).

    Args:
      x: input of any float dtype, shape `(..., )`.
      reduction_axes: the axes to reduce (for batch norm: all but the feature axes).
      mask: optional boolean array broadcastable to `x`; `False` marks elements
        that must not contribute.
      algorithm: `"auto"` (default: `"two_pass"` on CPU, else `"shifted"`),
        `"two_pass"` or `"shifted"` (see the module docstring).

    An input with no element to reduce gives `count = mean = m2 = 0`, like a
    fully masked one.

    Returns:
      :class:`Moments` whose fields have `x`'s shape with size 1 on the reduced
      axes, in the statistics dtype of `x.dtype` (at least float32).

    Examples:
      >>> x = 1e4 + jax.random.normal(jax.random.key(0), (256, 8))
      >>> m = moments(x, (0,))
      >>> m.mean.shape, m.var().shape
      ((1, 8), (1, 8))
    """
    axes = canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    algorithm = resolve_algorithm(algorithm)
    dt = stats_dtype(x.dtype)
    rdt = real_dtype(dt)  # count and M2 (dt itself for real inputs)
    xf = x.astype(dt)
    if mask is None:
        kshape = [1 if i in axes else s for i, s in enumerate(x.shape)]
        n = math.prod(x.shape[a] for a in axes)
        if n == 0:  # nothing to reduce: n = 0, mean = M2 = 0 (no 0/0)
            zero = jnp.zeros(kshape, rdt)
            return Moments(zero, jnp.zeros(kshape, dt), zero)
        count = jnp.full(kshape, n, rdt)
        if algorithm == "shifted":
            # complex: a, b are data values too (max/min order lexicographically)
            a, b = _shifts(xf, axes)
            s1 = _reduce_sum(xf - a, axes)
            s2 = _reduce_sum(abs2(xf - b) if rdt != dt else jnp.square(xf - b), axes)
            # mean = a + s1 / n;  M2 = sum((x - b)^2) - n (mean - b)^2, where
            # mean - b = (a - b) + s1 / n is of the order of the spread.
            mean_a = s1 / count
            mean = a + mean_a
            mean_b = (a - b) + mean_a
            mb2 = count * abs2(mean_b) if rdt != dt else count * mean_b * mean_b
            m2 = jnp.maximum(s2 - mb2, 0)
            return Moments(count, mean, m2)
        mean = _reduce_sum(xf, axes) / count
        d = xf - mean
        return Moments(count, mean, _reduce_sum(abs2(d), axes))
    mask = check_mask(mask, x.shape)
    w = jnp.broadcast_to(mask, x.shape)
    count = _reduce_sum(w.astype(rdt), axes)
    safe = jnp.maximum(count, 1)
    mean = _reduce_sum(jnp.where(w, xf, 0), axes) / safe
    d = jnp.where(w, xf - mean, 0)
    return Moments(count, mean, _reduce_sum(abs2(d), axes))


def resolve_algorithm(algorithm: Algorithm) -> Literal["two_pass", "shifted"]:
    """`"two_pass"` or `"shifted"` for `algorithm` (`"auto"`: by JAX's default backend).

    Raises:
      ValueError: for an unknown algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        return "two_pass" if jax.default_backend() == "cpu" else "shifted"
    return algorithm


def _shifts(xf: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Two per-feature shifts taken from the data (keepdims shape).

    The max and the min of the first two elements of each feature, so each shift
    is an actual data value and `|x - shift|` is of the order of the spread
    rather than of `|mean|`. They are *different* small reductions on purpose:
    XLA:CPU fuses a reduction such as `sum(x - a)` into one pass over `x` only
    if the broadcast shift is not shared with another large consumer; one shared
    shift `k` makes it materialize `x - k` or the broadcast `k` (an extra
    write and read of a whole input). The values are unchanged by this; only speed.
    """
    if explicitly_sharded(xf, axes):
        # Explicit sharding (jax.make_mesh's default axis type) forbids slicing a
        # sharded axis; shift by the (exact) per-feature mean instead: one more pass.
        k = lax.stop_gradient(jnp.mean(xf, axis=axes, keepdims=True))
        return k, k
    first = head(xf, axes, 0, 2)
    return jnp.max(first, axis=axes, keepdims=True), jnp.min(first, axis=axes, keepdims=True)


def merge(a: Moments, b: Moments) -> Moments:
    """Exact combination of two sets of moments (Chan, Golub & LeVeque).

    `n = n_a + n_b`, `d = mean_b - mean_a`, `mean = mean_a + d n_b / n`,
    `M2 = M2_a + M2_b + |d|^2 n_a n_b / n`. Exact for unequal counts; a side
    with `n == 0` contributes nothing, and `n_a = n_b = 0` gives zeros.
    """
    n = a.count + b.count
    safe = jnp.where(n > 0, n, 1)
    d = b.mean - a.mean
    mean = a.mean + d * (b.count / safe)
    m2 = a.m2 + b.m2 + abs2(d) * (a.count * b.count / safe)
    return Moments(n, jnp.where(n > 0, mean, 0), jnp.where(n > 0, m2, 0))


def merge_along(m: Moments, axis: int, *, keepdims: bool = False) -> Moments:
    """Exactly merges moments stacked along `axis` (e.g. per device or per ghost batch).

    Uses the pooled form `mean = sum(n_i mean_i) / n` and
    `M2 = sum(M2_i) + sum(n_i |mean_i - mean|^2)`, which is Chan's formula
    applied to all parts at once (no `E[x^2]` cancellation).
    """
    n = jnp.sum(m.count, axis=axis, keepdims=True)
    safe = jnp.where(n > 0, n, 1)
    mean = jnp.sum(m.count * m.mean, axis=axis, keepdims=True) / safe
    d = m.mean - mean
    dd = m.count * abs2(d) if jnp.iscomplexobj(d) else m.count * d * d
    m2 = jnp.sum(m.m2 + dd, axis=axis, keepdims=True)
    out = Moments(n, mean, m2)
    if not keepdims:
        out = Moments(*(jnp.squeeze(f, axis) for f in out))
    return out


def all_reduce(
    m: Moments,
    axis_name: AxisName,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Exactly merges per-device moments over a named axis with one collective.

    The three fields are stacked and all-gathered in a single `all_gather`
    (`3 x features` floats per device; 4 for a complex mean, gathered as its
    real and imaginary parts), then merged with :func:`merge_along`.
    This is exact for unequal per-device counts and ignores devices without
    valid elements, unlike averaging per-device means.

    Raises:
      NameError: if `axis_name` is not bound (from JAX, re-raised with context).
    """
    if axis_name is None:
        return m
    if jnp.iscomplexobj(m.mean):  # one real collective: count, re(mean), im(mean), M2
        rows = [m.count, lax.real(m.mean), lax.imag(m.mean), m.m2]
        gathered, typed = _gather(jnp.stack(rows), axis_name, axis_index_groups)
        mean = lax.complex(gathered[:, 1], gathered[:, 2])
        parts = Moments(gathered[:, 0], mean, gathered[:, 3])
    else:
        rows = [m.count, m.mean, m.m2]
        gathered, typed = _gather(jnp.stack(rows), axis_name, axis_index_groups)
        parts = Moments(gathered[:, 0], gathered[:, 1], gathered[:, 2])
    out = merge_along(parts, 0)
    return out if typed else Moments(*_per_device(tuple(out), axis_name))


def _gather(
    stacked: Array, axis_name: AxisName, axis_index_groups: Sequence[Sequence[int]] | None
) -> tuple[Array, bool]:
    """All-gathers `stacked` over `axis_name` (one collective): `(gathered, typed)`.

    `typed`: inside `shard_map(check_vma=True)` with `stacked` varying over
    `axis_name`; then the result is typed invariant (the same on every device).
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    typed = set(names) <= varying_axes(stacked)
    try:
        if all_gather_invariant is not None and axis_index_groups is None and typed:
            # Inside shard_map(check_vma=True): the pooled moments are the same on
            # every device; type them so (invariant), so that the new running
            # statistics can leave shard_map with out_specs=P().
            gathered = all_gather_invariant(stacked, axis_name)
        else:
            gathered = lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    except NameError as e:
        raise NameError(
            f"axis_name={axis_name!r} is not bound here: call batch norm inside "
            "shard_map / pmap / vmap with that axis name, or set axis_name=None"
        ) from e
    return gathered, typed


def _per_device(fields: tuple[Array, ...], axis_name: AxisName) -> tuple[Array, ...]:
    """`fields` as one copy per device of `axis_name` (values unchanged).

    Also under vmap (whose all_gather result is a single unbatched value): then
    every untyped context (pmap, vmap, shard_map with check_vma=False) hands each
    device its own cotangent of the pooled moments, which the custom_vjp backward
    sums with one psum.
    """
    zero = (0 * lax.axis_index(axis_name)).astype(real_dtype(fields[1].dtype))
    return tuple(f + zero for f in fields)


class CoMoments(NamedTuple):
    """Sufficient statistics of groups of features *jointly*: the covariance form of
    :class:`Moments`, merged exactly by :func:`merge_comoments_along` /
    :func:`all_reduce_comoments` (Chan's formula with outer products).

    For `g` groups of `G` features:

    Attributes:
      count: `(g,)` number of valid examples `n` per group (a float).
      mean: `(g, G)` mean of each group's features (0 where `n == 0`).
      c2: `(g, G, G)` centred co-moment matrix `sum((x - mean)(x - mean)^T)`
        (0 where `n == 0`); `c2 / n` is the (biased) covariance.
    """

    count: Array
    mean: Array
    c2: Array

    def cov(self) -> Array:
        """The biased covariance `c2 / n` (0 where `n == 0`), `(g, G, G)`."""
        n = self.count[..., None, None]
        return jnp.where(n > 0, self.c2 / jnp.where(n > 0, n, 1), 0)


def comoments(x: Array, group_size: int, *, weights: Array | None = None) -> CoMoments:
    """Count, mean and centred co-moment matrix of contiguous feature groups of `x`.

    Args:
      x: `(m, d)` rows (examples, or examples times positions), any float dtype;
        `d` must be a multiple of `group_size`. Group `k` is features
        `k G .. (k + 1) G - 1`.
      group_size: `G`.
      weights: optional `(m,)` 0/1 weights of the rows (a mask of examples).

    Two passes in the statistics dtype, at least float32 (the mean first, then the
    products of the centred rows), so the covariance stays exact when `|mean| >> std`.

    Returns:
      :class:`CoMoments` with `count (g,)`, `mean (g, G)`, `c2 (g, G, G)`.
    """
    m, d = x.shape
    if d % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {d} features")
    dt = stats_dtype(x.dtype)
    xg = x.astype(dt).reshape(m, d // group_size, group_size)
    if weights is None:
        count = jnp.full((d // group_size,), m, dt)
        safe = max(m, 1)
        mean = jnp.sum(xg, axis=0) / safe
        xc = xg - mean
        c2 = jnp.einsum("mgi,mgj->gij", xc, xc, out_sharding=replicated_out(xg))
    else:
        w = weights.astype(dt)[:, None, None]
        n = jnp.sum(weights.astype(dt))
        count = jnp.full((d // group_size,), 1, dt) * n
        mean = jnp.sum(w * xg, axis=0) / jnp.maximum(n, 1)
        xc = xg - mean
        c2 = jnp.einsum("mgi,mgj->gij", w * xc, xc, out_sharding=replicated_out(xg))
    return CoMoments(count, mean, c2)


def merge_comoments_along(c: CoMoments, axis: int = 0) -> CoMoments:
    """Exactly merges co-moments stacked along `axis` (per device or per batch).

    `n = sum n_i`, `mean = sum(n_i mean_i) / n`,
    `C2 = sum(C2_i) + sum(n_i (mean_i - mean)(mean_i - mean)^T)`: :func:`merge_along`
    with outer products; exact for unequal counts, parts with `n_i = 0` ignored.
    """
    count = jnp.moveaxis(c.count, axis, 0)
    mean_i = jnp.moveaxis(c.mean, axis, 0)
    c2_i = jnp.moveaxis(c.c2, axis, 0)
    n = jnp.sum(count, axis=0)
    safe = jnp.where(n > 0, n, 1)
    mean = jnp.sum(count[..., None] * mean_i, axis=0) / safe[..., None]
    dm = mean_i - mean
    c2 = jnp.sum(c2_i, axis=0) + jnp.einsum("k...,k...i,k...j->...ij", count, dm, dm)
    return CoMoments(n, mean, c2)


def all_reduce_comoments(
    c: CoMoments,
    axis_name: AxisName,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> CoMoments:
    """Exactly merges per-device co-moments over a named axis with one all-gather.

    The co-moment counterpart of :func:`all_reduce` (same collective, same
    typing rules): exact for unequal per-device counts, devices without a valid
    example contribute nothing.
    """
    if axis_name is None:
        return c
    g, k = c.mean.shape
    flat = jnp.concatenate([c.count[:, None], c.mean, c.c2.reshape(g, k * k)], axis=1)
    gathered, typed = _gather(flat, axis_name, axis_index_groups)
    parts = CoMoments(
        gathered[:, :, 0], gathered[:, :, 1 : 1 + k], gathered[:, :, 1 + k :].reshape(-1, g, k, k)
    )
    out = merge_comoments_along(parts, 0)
    return out if typed else CoMoments(*_per_device(tuple(out), axis_name))
