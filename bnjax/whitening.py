"""Batch whitening: Decorrelated BN (ZCA per group) and IterNorm (Newton-Schulz).

The route the paper set aside (PAPER.md, "Why not whitening"; BEYOND.md §2):
normalize groups of features *jointly*. The `d` features are split into
`d / G` contiguous groups of `G = group_size` (features `0 .. G-1` form the
first group, as in DBN); per group, over the mini-batch (all non-feature axes:
`m = N H W` for a convolution, like BN):

```python
mu = mean(x),  xc = x - mu,  Sigma = xc xc^T / m + eps I
W  = Sigma^(-1/2)                        method="zca"      (eigendecomposition)
W  = P_T / sqrt(tr Sigma)                method="iternorm" (T Newton-Schulz steps)
y  = gamma * (W xc) + beta               per-feature gamma, beta as in BN
```

Pure functions on explicit pytrees, like :mod:`bnjax.functional`:

```python
cfg = WhiteningConfig(group_size=16, method="zca")
params, state = init(64, cfg)                    # BNParams, WhiteningStats
y, state = apply_train(params, state, x, cfg)    # batch statistics, state updated
y = apply_eval(params, state, x, cfg)            # y = gamma W_pop (x - mu_pop) + beta
```

Numerics: statistics in at least float32 (bf16 input -> float32 covariance);
the covariance is centred in two passes (:func:`bnjax.stats.comoments`), never
`E[x x^T] - mu mu^T`.

Gradients. `"zca"`: :func:`inv_sqrtm` is a `jax.custom_jvp` whose tangent is
the exact Fréchet derivative of `S -> S^(-1/2)` in the eigenbasis,
`dW = U (K o (U^T dS U)) U^T` with the divided differences
`K_ij = (l_i^(-1/2) - l_j^(-1/2)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j))`,
`s = sqrt(l)`: finite and correct when eigenvalues repeat (`K_ii = -l^(-3/2)/2`),
unlike autodiff through `eigh`; JAX transposes it for reverse mode.
`"iternorm"`: plain autodiff through the matrix products.

Population statistics (:class:`WhiteningStats`): `mean`, and the whitening
matrix `whitening` used at inference; `population="ema"` (default, as in DBN
and IterNorm) keeps exponential moving averages of the batch mean and of the
batch whitening matrix `W_B`; `population="average"` keeps the paper's exact
running average (:mod:`bnjax.population`): the count-weighted mean and the pooled
unbiased within-batch covariance `cov = sum_B C2_B / sum_B (n_B - 1)`, and sets
`whitening` to the method's whitening matrix of `cov` (+ eps I) after every
batch. :func:`bnjax.reset_population` starts a fresh average, so a frozen
network's statistics can be recomputed exactly by train-mode passes
(PreciseBN-style; `bnjax.recalibrate` itself handles batch-norm layers only).

Cross-device: with `axis_name` the co-moment matrices are merged exactly
(:func:`bnjax.stats.all_reduce_comoments`, Chan's formula with outer products),
for unequal per-device counts too. Masks: a boolean `mask` broadcastable to
`x` with size 1 on the feature axis (whole examples / positions in or out).

Singular covariance (the paper's argument): with `m <= G` examples the batch
covariance of a group has rank at most `m - 1 < G`; training then raises a
`ValueError` naming both numbers unless `allow_singular=True` (eps alone
then regularizes it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from bnjax import population as _pop
from bnjax._checks import (
    canonicalize_axes,
    check_input,
    check_mask,
    check_shape,
    check_use_flags,
    out_dtype,
)
from bnjax._config import check_choice, check_common
from bnjax._numerics import stats_dtype
from bnjax._sharding import unmapped
from bnjax.functional import BNParams, Kernel
from bnjax.population import BatchStats, Population
from bnjax.stats import CoMoments, Moments, all_reduce_comoments, comoments

__all__ = [
    "METHODS",
    "Method",
    "WhiteningConfig",
    "WhiteningStats",
    "apply_eval",
    "apply_train",
    "batch_comoments",
    "feature_layout",
    "inference_affine",
    "init",
    "init_stats",
    "inv_sqrtm",
    "newton_schulz",
    "whitening_matrix",
]

Array = jax.Array
Method = Literal["zca", "iternorm"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclasses.dataclass(frozen=True)
class WhiteningConfig:
    """Static (hashable) configuration of a batch-whitening layer.

    Attributes:
      group_size: features per group `G` (must divide the feature count);
        `None`: one group of all features (full whitening).
      method: `"zca"` (`Sigma^(-1/2)` by an eigendecomposition, DBN) or
        `"iternorm"` (`iterations` Newton-Schulz steps, IterNorm).
      iterations: Newton-Schulz steps `T` of `"iternorm"` (default 5, the
        paper's; more is not safer, the iteration drifts in floating point).
      axis: the feature axis (one int). Statistics over all other axes.
      epsilon: added to the diagonal of the covariance (>= 0).
      momentum: EMA momentum (flax convention `new = momentum old + (1 - momentum) batch`).
      use_scale: learn per-feature gamma / beta.
      use_bias: learn per-feature gamma / beta.
      dtype: output dtype (`None`: `result_type(x, params)`).
      param_dtype: dtype of gamma and beta made by :func:`init`.
      population: `"ema"` or `"average"` (see the module docstring).
      axis_name: pool the co-moments exactly over a named axis.
      axis_index_groups: pool the co-moments exactly over a named axis.
      allow_singular: train even when a mini-batch holds no more examples than
        the group size (singular batch covariance, regularized by eps only).
    """

    group_size: int | None = None
    method: Method = "zca"
    iterations: int = 5
    axis: int = -1
    epsilon: float = 1e-5
    momentum: float = 0.99
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    population: Population = "ema"
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    allow_singular: bool = False

    def __post_init__(self):
        check_common(self)
        check_choice("population", self.population, ("ema", "average"))
        check_choice("method", self.method, METHODS)
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {self.iterations!r}")
        if isinstance(self.axis, Sequence):
            if len(self.axis) != 1:
                raise ValueError(
                    f"batch whitening takes one feature axis, got axis={tuple(self.axis)!r}"
                )
            object.__setattr__(self, "axis", int(self.axis[0]))
        if not isinstance(self.axis, int):
            raise TypeError(f"axis must be an int, got {self.axis!r}")

    def kernel(self) -> Kernel:
        """This layer's pure functions, `Kernel(apply_train, apply_eval)`
        (see :func:`bnjax.apply`)."""
        return Kernel(apply_train, apply_eval)

    def groups(self, num_features: int) -> tuple[int, int]:
        """`(number of groups, group size)` for `num_features` features.

        Raises:
          ValueError: `group_size` does not divide `num_features`.
        """
        size = num_features if self.group_size is None else self.group_size
        if num_features % size:
            raise ValueError(
                f"group_size={size} does not divide the {num_features} features of the input"
            )
        return num_features // size, size


class WhiteningStats(NamedTuple):
    """Population statistics of one batch-whitening layer (`g` groups of `G`).

    Attributes:
      mean: `(d,)` population mean `mu_pop`.
      whitening: `(g, G, G)` the whitening matrix `W_pop` of each group
        used at inference (EMA of the batch `W_B`, or computed from `cov`).
      cov: `(g, G, G)` population covariance: EMA of the biased batch
        covariance (`"ema"`), or the pooled unbiased within-batch covariance
        (`"average"`).
      count: `(d,)` examples and batches seen since the last reset
        (:func:`bnjax.reset_population`), as in :class:`bnjax.BatchStats`.
      batches: `(d,)` examples and batches seen since the last reset
        (:func:`bnjax.reset_population`), as in :class:`bnjax.BatchStats`.
    """

    mean: Array
    whitening: Array
    cov: Array
    count: Array
    batches: Array


# --------------------------------------------------------------------------- matrix functions


def _sym(a: Array) -> Array:
    return (a + jnp.swapaxes(a, -1, -2)) / 2


@jax.custom_jvp
def inv_sqrtm(s: Array) -> Array:
    """`S^(-1/2)` of symmetric positive definite matrices `(..., G, G)` by `eigh`.

    The symmetric (ZCA) inverse square root `U diag(l^(-1/2)) U^T`. Its
    derivative is a custom rule (the module docstring), finite and exact for
    repeated eigenvalues; forward and reverse mode, any order of reverse mode.
    Eigenvalues are clamped at the smallest normal float (a singular input with
    eps = 0 gives huge, not infinite, values).

    Examples:
      >>> s = jnp.array([[2.0, 0.0], [0.0, 2.0]])          # repeated eigenvalue
      >>> jax.grad(lambda s: inv_sqrtm(s)[0, 0])(s)[0, 0]  # -(1/2) 2^(-3/2)
      Array(-0.17677669, dtype=float32)
    """
    w, _, _ = _inv_sqrtm_parts(s)
    return w


def _inv_sqrtm_parts(s):
    lam, u = jnp.linalg.eigh(_sym(s))
    lam = jnp.maximum(lam, jnp.finfo(lam.dtype).tiny)
    r = jax.lax.rsqrt(lam)
    w = jnp.einsum("...ik,...k,...jk->...ij", u, r, u)
    return w, u, jnp.sqrt(lam)


@inv_sqrtm.defjvp
def _inv_sqrtm_jvp(primals, tangents):
    (s,), (ds,) = primals, tangents
    w, u, root = _inv_sqrtm_parts(s)
    # Divided differences of f(l) = l^(-1/2): -1 / (s_i s_j (s_i + s_j)), s = sqrt(l).
    k = -1 / (root[..., :, None] * root[..., None, :] * (root[..., :, None] + root[..., None, :]))
    ds_eig = jnp.einsum("...ki,...kl,...lj->...ij", u, _sym(ds), u)
    dw = jnp.einsum("...ik,...kl,...jl->...ij", u, k * ds_eig, u)
    return w, dw


def newton_schulz(s: Array, iterations: int = 5) -> Array:
    """IterNorm's whitening matrix: `iterations` Newton-Schulz steps, `(..., G, G)`.

    `S_N = S / tr(S)`, `P_0 = I`, `P_k = (3 P_{k-1} - P_{k-1}^3 S_N) / 2`,
    `W = P_T / sqrt(tr(S))`: approximately `S^(-1/2)` (exactly in the limit,
    before floating-point drift), only matrix products; differentiated by autodiff.
    """
    tr = jnp.trace(s, axis1=-2, axis2=-1)[..., None, None]
    tr = jnp.where(tr > 0, tr, 1)
    sn = s / tr
    p = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
    for _ in range(iterations):
        p3 = p @ p @ p
        p = 1.5 * p - 0.5 * (p3 @ sn)
    return p * jax.lax.rsqrt(tr)


def whitening_matrix(cov: Array, config: WhiteningConfig) -> Array:
    """The whitening matrix of `cov + eps I` by `config.method`, `(..., G, G)`."""
    s = cov + config.epsilon * jnp.eye(cov.shape[-1], dtype=cov.dtype)
    if config.method == "zca":
        return inv_sqrtm(s)
    return newton_schulz(s, config.iterations)


# --------------------------------------------------------------------------- shapes


def _check_input(x: Array) -> None:
    check_input(x, "batch whitening", complex_ok=False)


def feature_layout(x: Array, config: WhiteningConfig) -> tuple[int, int, int, int]:
    """`(feature axis, d, groups, G)` of an input `x`; validates the axis and the grouping.

    Raises:
      ValueError: an input without a batch and a feature axis, a bad axis, or a
        `group_size` that does not divide the `d` features.
    """
    if x.ndim < 2:
        raise ValueError(
            f"batch whitening needs an input with a batch and a feature axis, got shape "
            f"{tuple(x.shape)}"
        )
    try:
        (faxis,) = canonicalize_axes(x.ndim, config.axis, name="axis")
    except ValueError as e:
        raise ValueError(f"{e} (batch whitening input of shape {tuple(x.shape)})") from None
    d = x.shape[faxis]
    g, size = config.groups(d)
    return faxis, d, g, size


def _rows(x: Array, faxis: int) -> Array:
    """`x` as `(m, d)` rows: the feature axis last, all others flattened."""
    return jnp.moveaxis(x, faxis, -1).reshape(-1, x.shape[faxis])


def _unrows(r: Array, shape: tuple[int, ...], faxis: int) -> Array:
    moved = tuple(s for i, s in enumerate(shape) if i != faxis) + (shape[faxis],)
    return jnp.moveaxis(r.reshape(moved), -1, faxis)


def _row_weights(mask: Array | None, shape: tuple[int, ...], faxis: int) -> Array | None:
    """A mask (size 1 on the feature axis) as `(m,)` row weights."""
    if mask is None:
        return None
    mask = check_mask(mask, shape)
    full = (1,) * (len(shape) - mask.ndim) + tuple(mask.shape)
    if full[faxis] != 1:
        raise NotImplementedError(
            f"a mask of shape {tuple(mask.shape)} varies along the feature axis {faxis} of "
            f"the input {tuple(shape)}: batch whitening needs whole examples in or out "
            "(give the mask size 1 on the feature axis)"
        )
    b = jnp.broadcast_to(mask.reshape(full), shape[:faxis] + (1,) + shape[faxis + 1 :])
    return _rows(b, faxis)[:, 0]


def _check_params(params: BNParams, state: WhiteningStats | None, d, g, size, config, shape):
    check_shape(params.scale, (d,), "params.scale", shape, f"{d} features")
    check_shape(params.bias, (d,), "params.bias", shape, f"{d} features")
    check_use_flags(params, config)
    if state is not None:
        want = {"mean": (d,), "count": (d,), "batches": (d,), "whitening": (g, size, size),
                "cov": (g, size, size)}
        for name, s in want.items():
            got = tuple(getattr(state, name).shape)
            if got != s:
                raise ValueError(
                    f"state.{name} has shape {got}, expected {s} for an input of shape {shape} "
                    f"with {g} group(s) of {size}"
                )


# --------------------------------------------------------------------------- init


def init_stats(
    num_features: int, config: WhiteningConfig = WhiteningConfig(), dtype=jnp.float32
) -> WhiteningStats:
    """Fresh population statistics: mean 0, whitening = cov = identity, count 0."""
    g, size = config.groups(num_features)
    eye = jnp.broadcast_to(jnp.eye(size, dtype=dtype), (g, size, size))
    zeros = jnp.zeros((num_features,), dtype)
    return WhiteningStats(mean=zeros, whitening=eye, cov=eye, count=zeros, batches=zeros)


def init(
    num_features: int, config: WhiteningConfig = WhiteningConfig()
) -> tuple[BNParams, WhiteningStats]:
    """Parameters (gamma = 1, beta = 0, shape `(d,)`) and fresh statistics.

    Examples:
      >>> params, state = init(64, WhiteningConfig(group_size=16))
      >>> params.scale.shape, state.whitening.shape
      ((64,), (4, 16, 16))
    """
    pdt = config.param_dtype
    params = BNParams(
        scale=jnp.ones((num_features,), pdt) if config.use_scale else None,
        bias=jnp.zeros((num_features,), pdt) if config.use_bias else None,
    )
    return params, init_stats(num_features, config, stats_dtype(pdt))


# --------------------------------------------------------------------------- train


def batch_comoments(
    x: Array, config: WhiteningConfig = WhiteningConfig(), *, mask: Array | None = None
) -> CoMoments:
    """The (cross-device pooled) co-moments of `x`'s feature groups.

    Returns:
      :class:`bnjax.stats.CoMoments`: `count (g,)`, `mean (g, G)`, `c2 (g, G, G)`.
    """
    x = jnp.asarray(x)
    _check_input(x)
    faxis, _, _, size = feature_layout(x, config)
    cm = comoments(_rows(x, faxis), size, weights=_row_weights(mask, x.shape, faxis))
    return all_reduce_comoments(cm, config.axis_name, config.axis_index_groups)


def _update(
    state: WhiteningStats, cm: CoMoments, w_batch: Array, config: WhiteningConfig
) -> WhiteningStats:
    """Folds one batch into the population statistics (see the module docstring)."""
    g, size = cm.mean.shape
    n_group = cm.count.astype(state.count.dtype)
    n = jnp.repeat(n_group, size)
    # The mean, count and batches by bnjax.population's rules (per feature; var unused).
    diag = jnp.diagonal(cm.c2, axis1=-2, axis2=-1).reshape(-1)
    per_feature = _pop.update(
        BatchStats(state.mean, jnp.ones_like(state.mean), state.count, state.batches),
        Moments(n, cm.mean.reshape(-1).astype(state.mean.dtype), diag),
        population=config.population,
        momentum=config.momentum,
    )
    seen = (n_group > 0)[:, None, None]
    dt = state.cov.dtype
    if config.population == "ema":
        mom = config.momentum
        cov = mom * state.cov + (1 - mom) * cm.cov().astype(dt)
        whitening = mom * state.whitening + (1 - mom) * w_batch.astype(dt)
    else:
        first = jnp.arange(g) * size  # every feature of a group has the group's counts
        dof_old = (state.count - state.batches)[first][:, None, None]
        dof = dof_old + jnp.maximum(n_group - 1, 0)[:, None, None]
        cov = (state.cov * dof_old + cm.c2.astype(dt)) / jnp.where(dof > 0, dof, 1)
        cov = jnp.where(dof > 0, cov, state.cov)
        whitening = jax.lax.stop_gradient(whitening_matrix(cov, config)).astype(dt)
    return WhiteningStats(
        mean=per_feature.mean,
        whitening=jnp.where(seen, whitening, state.whitening).astype(dt),
        cov=jnp.where(seen, cov, state.cov).astype(dt),
        count=per_feature.count,
        batches=per_feature.batches,
    )


def apply_train(
    params: BNParams,
    state: WhiteningStats,
    x: Array,
    config: WhiteningConfig = WhiteningConfig(),
    *,
    mask: Array | None = None,
) -> tuple[Array, WhiteningStats]:
    """Whitens `x` per group with its mini-batch statistics; updates the state.

    Args:
      params: :class:`bnjax.BNParams` with `scale`/`bias` of shape `(d,)`.
      state: :class:`WhiteningStats` (from :func:`init`).
      x: floating input, features on `config.axis`: `(N, d)`, NHWC
        `(N, H, W, d)` or NCHW with `axis=1`; statistics over all other axes.
      config: a :class:`WhiteningConfig`.
      mask: optional boolean array broadcastable to `x` with size 1 on the
        feature axis; only `True` examples enter the statistics (all are whitened).

    Returns:
      `(y, new_state)`, `y` of `x`'s shape.

    Raises:
      TypeError: integer input, non-boolean mask.
      ValueError: bad axis, `group_size` not dividing the features, mismatched
        params/state shapes, or (without `allow_singular`) no more examples
        than the group size (a singular batch covariance).
      NotImplementedError: a mask that varies along the feature axis.
    """
    x = jnp.asarray(x)
    _check_input(x)
    faxis, d, g, size = feature_layout(x, config)
    _check_params(params, state, d, g, size, config, tuple(x.shape))
    m = math.prod(x.shape) // d
    if mask is None and config.axis_name is None and m <= size and not config.allow_singular:
        raise ValueError(
            f"training batch whitening on {m} example(s) per group (input shape "
            f"{tuple(x.shape)}) with group_size={size}: a covariance of {size} features "
            f"estimated from {m} examples has rank at most {max(m - 1, 0)} < {size}, so it is "
            "singular (the paper's reason for per-dimension statistics). Use a larger batch "
            "or a smaller group_size, or pass allow_singular=True to rely on epsilon alone"
        )
    rows = _rows(x, faxis)
    cm = comoments(rows, size, weights=_row_weights(mask, x.shape, faxis))
    cm = all_reduce_comoments(cm, config.axis_name, config.axis_index_groups)
    w = whitening_matrix(cm.cov(), config)  # (g, G, G), >= float32
    dt = w.dtype
    xc = rows.astype(dt).reshape(-1, g, size) - cm.mean
    y = jnp.einsum("gij,mgj->mgi", w, xc).reshape(-1, d)
    if params.scale is not None:
        y = y * params.scale.astype(dt)
    if params.bias is not None:
        y = y + params.bias.astype(dt)
    y = _unrows(y, x.shape, faxis).astype(out_dtype(x, params, config))
    # The pooled co-moments (and their whitening matrix), one unmapped copy: a
    # replicated state stays unmapped under vmap / shard_map (see bnjax._sharding).
    cm, w = unmapped((cm, w), config.axis_name, config.axis_index_groups, like=x)
    return y, _update(state, jax.lax.stop_gradient(cm), jax.lax.stop_gradient(w), config)


# --------------------------------------------------------------------------- eval


def inference_affine(params: BNParams, state: WhiteningStats) -> tuple[Array, Array]:
    """The inference map `y = A x + b` per group, in at least float32.

    `A_k = diag(gamma_k) W_pop,k` of shape `(g, G, G)` and `b = beta - A mu_pop`
    of shape `(d,)`; `y_k = A_k x_k + b_k` for each group `k` (a
    block-diagonal `d x d` map, see :func:`bnjax.folding.fold_whitening`).
    """
    g, size, _ = state.whitening.shape
    dt = stats_dtype(state.whitening.dtype)
    a = state.whitening.astype(dt)
    if params.scale is not None:
        a = a * params.scale.astype(dt).reshape(g, size, 1)
    b = -jnp.einsum("gij,gj->gi", a, state.mean.astype(dt).reshape(g, size)).reshape(-1)
    if params.bias is not None:
        b = b + params.bias.astype(dt)
    return a, b


def apply_eval(
    params: BNParams,
    state: WhiteningStats,
    x: Array,
    config: WhiteningConfig = WhiteningConfig(),
) -> Array:
    """Inference: `y = gamma * W_pop (x - mu_pop) + beta` per group, per example.

    No batch statistics (a batch of one works); formed in at least float32 and at
    least the input's precision (a float64 input is whitened in float64).
    """
    x = jnp.asarray(x)
    _check_input(x)
    faxis, d, g, size = feature_layout(x, config)
    _check_params(params, state, d, g, size, config, tuple(x.shape))
    dt = stats_dtype(jnp.promote_types(x.dtype, state.whitening.dtype))
    xc = _rows(x, faxis).astype(dt).reshape(-1, g, size) - state.mean.astype(dt).reshape(g, size)
    y = jnp.einsum("gij,mgj->mgi", state.whitening.astype(dt), xc).reshape(-1, d)
    if params.scale is not None:
        y = y * params.scale.astype(dt)
    if params.bias is not None:
        y = y + params.bias.astype(dt)
    return _unrows(y, x.shape, faxis).astype(out_dtype(x, params, config))

