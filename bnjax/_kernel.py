"""The normalizing kernel of batch norm (private): Algorithm 1's forward pass and its
gradient, as `jax.custom_vjp` (the paper's fused backward), `jax.custom_jvp`
(its linearization) or plain autodiff; the rules are documented in
:mod:`bnjax.functional`, which prepares every call (shapes, ghost batches, the
running statistics) and is this module's only user.

Inputs are already reshaped so that `spec.stat_axes` are the reduced axes and
the parameters broadcast against `x`; everything here works in the statistics
dtype (at least float32; complex inputs: complex mean, real variance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._numerics import (
    cast,
    data_point,
    is_complex,
    param_dtype,
    real_dtype,
    safe_rsqrt,
    stats_dtype,
)
from bnjax._sharding import like_sharding, match_varying, varying_axes
from bnjax.stats import Moments, all_reduce, moments

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one normalization call (hashable, for custom_vjp)."""

    stat_axes: tuple[int, ...]
    epsilon: float
    axis_name: Any
    axis_index_groups: Any
    algorithm: str
    out_dtype: Any
    activation: Any = None  # a bnjax.activations.Activation fused after the affine map
    in_dtype: Any = None  # the input's dtype (the fused kernel keeps no input to read it from)


def _forward(spec: Spec, x, mask, scale, bias, run=None, bounds=None):
    """Algorithm 1 on (possibly reshaped) `x`. Returns (y, moments, mean, inv, rd).

    `run` is `None` or the running `(mean, var)` (broadcast to `x`'s rank),
    passed with a mask or Batch Renorm. With a mask, a feature without a valid
    element (pooled count 0) is normalized with them: `mean`/`inv` are then the
    running ones (the inference map; see :func:`bnjax.functional.apply_train`).
    `bounds` is `None` (batch norm; `rd` is `None`) or Batch Renorm's
    `(r_max, d_max)`; then `rd = (r, d)`. The returned moments are the batch's in every case.

    Complex `x`: the statistics dtype `dt` is complex (mean, `x - mean`, the
    output), its real part `rdt` holds the variance and `inv`.
    """
    dt = stats_dtype(x.dtype)
    rdt = real_dtype(dt)  # dt itself for real inputs
    xf = x.astype(dt)
    m = moments(xf, spec.stat_axes, mask=mask, algorithm=spec.algorithm)
    m = all_reduce(m, spec.axis_name, spec.axis_index_groups)
    # (explicit-axis meshes: a masked count may come out replicated, the mean sharded)
    m = Moments(*(like_sharding(f, m.mean) for f in m))
    mean = m.mean
    eps = jnp.asarray(spec.epsilon, rdt)
    var_eps = m.var() + eps
    if mask is not None and run is not None:
        # Features without a valid element: the running statistics (inference map).
        seen = m.count > 0
        mu_run, var_run = (like_sharding(lax.stop_gradient(r), mean) for r in run)
        mean = jnp.where(seen, mean, mu_run.astype(dt))
        var_eps = jnp.where(seen, var_eps, var_run.astype(rdt) + eps)
    inv = safe_rsqrt(var_eps)
    sdt = None if scale is None else param_dtype(scale, dt, rdt)
    bdt = None if bias is None else param_dtype(bias, dt, rdt)
    if bounds is None:
        rd = None
        a = inv if scale is None else inv * scale.astype(sdt)
        b = None if bias is None else bias.astype(bdt)
    else:
        rd = _renorm_rd(spec, m, var_eps, run, bounds)
        r, d = rd
        a, b = inv * r, d
        if scale is not None:
            a, b = a * scale.astype(sdt), b * scale.astype(sdt)
        if bias is not None:
            b = b + bias.astype(bdt)
    y = _centred_affine(xf, a, b, mean, _centre(spec, xf, mask, 0))
    if spec.activation is not None:
        y = spec.activation(y)
    return y.astype(spec.out_dtype), m, mean, inv, rd


def _renorm_rd(spec: Spec, m: Moments, var_eps, run, bounds):
    """Batch Renorm's per-feature `(r, d)` (gradient stopped), keepdims shape.

    `r = clip(sigma_B / sigma, 1/r_max, r_max)`, `d = clip((mu_B - mu) / sigma,
    -d_max, d_max)` with the running `mu`, `sigma = sqrt(var + eps)`; a feature
    without a valid element gets `r = 1`, `d = 0`: with its running statistics
    as the normalizing ones (batch norm's rule for empty features), its output is
    the inference map.
    """
    (mu, var), (r_max, d_max) = run, bounds
    dt = m.mean.dtype
    inv_run = safe_rsqrt(var.astype(dt) + jnp.asarray(spec.epsilon, dt))
    r = jnp.clip(jnp.sqrt(var_eps) * inv_run, 1 / r_max, r_max)
    d = jnp.clip((m.mean - mu.astype(dt)) * inv_run, -d_max, d_max)
    seen = m.count > 0
    r = jnp.where(seen, r, 1).astype(dt)
    d = jnp.where(seen, d, 0).astype(dt)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _centre(spec: Spec, xf, mask, j: int):
    """Data point `j` of each feature (see :func:`bnjax._numerics.data_point`), or None.

    Masked inputs may hold padding anywhere, so they are centred on the mean.
    """
    return None if mask is not None else data_point(xf, spec.stat_axes, j)


def _centred_affine(xf, a, b, mean, c):
    """`a * (x - mean) + b` (`b` may be None), formed as `a (x - c) + (a (c - mean) + b)`.

    The full-size broadcast is of the data point `c`, not of `mean`, which a
    statistics reduction also broadcasts: one broadcast shared by a reduction and
    another full-size consumer is materialized by XLA:CPU (an extra write and read
    of the whole input). With `|x - c|` of the order of the spread, the rounding
    error stays at that of the float32 mean itself (about half the error of the
    folded `a x + (b - a mean)` when `|mean| >> std`).
    """
    if c is None:
        y = (xf - mean) * a
        return y if b is None else y + b
    shift = (c - mean) * a
    return (xf - c) * a + (shift if b is None else shift + b)


def _sum_to(a: Array, shape: tuple[int, ...]) -> Array:
    pairs = enumerate(zip(a.shape, shape, strict=True))
    axes = tuple(i for i, (s, t) in pairs if t == 1 and s != 1)
    return jnp.sum(a, axis=axes, keepdims=True) if axes else a


def _psum(a, spec: Spec):
    if spec.axis_name is None:
        return a
    return lax.psum(a, spec.axis_name, axis_index_groups=spec.axis_index_groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bn_vjp(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


def _bn_vjp_fwd(spec, x, mask, scale, bias, run, bounds):
    y, m, mean, inv, rd = _forward(spec, x, mask, scale, bias, run, bounds)
    return (y, m), (x, mask, scale, bias, mean, inv, m.count, rd)


def _bn_vjp_bwd(spec, res, cts):
    x, mask, scale, bias, mean, inv, count, rd = res
    gy, gm = cts
    dt = mean.dtype
    xf = x.astype(dt)
    gyf = cast(gy, dt)  # (a complex output of a real input: its real part)
    # The two reductions of the fused backward (local), then one collective.
    # Complex inputs (JAX's convention: the cotangent pairing is Re(sum(ct * t))):
    # sum_dy and sum_dy_xhat are complex sums, the same expressions.
    sum_dy = jnp.sum(gyf, axis=spec.stat_axes, keepdims=True)
    k = _centre(spec, xf, mask, 1)
    if k is None:
        sum_dy_xc = jnp.sum(gyf * (xf - mean), axis=spec.stat_axes, keepdims=True)
    else:
        # sum(dy (x - mean)) = sum(dy (x - k)) + (k - mean) sum(dy) around a data
        # point k (|x - k| ~ spread: no cancellation). A second data point (not the
        # forward's mean, nor the point that dx below is centred on): a broadcast
        # shared between a reduction and another full-size consumer is
        # materialized by XLA:CPU.
        s_k = jnp.sum(gyf * (xf - k), axis=spec.stat_axes, keepdims=True)
        sum_dy_xc = s_k + (k - mean) * sum_dy
    g = _Cotangents(spec, x, scale, bias, inv, count, rd, gm, sum_dy, inv * sum_dy_xc)
    if is_complex(mean):
        corr = jnp.conj(xf - mean) * g.q + g.p
    else:
        corr = _centred_affine(xf, g.q, g.p, mean, _centre(spec, xf, mask, 0))
    dx = gyf * g.gamma_inv + (corr if mask is None else mask.astype(g.q.dtype) * corr)
    return _typed_like(x, scale, bias, dx.astype(x.dtype), g.dscale, g.dbias)


def _typed_like(x, scale, bias, dx, dscale, dbias):
    """The backward's outputs with the primal inputs' shardings (explicit-axis meshes:
    a replicated gamma gets a replicated cotangent, not the batch's feature sharding)."""
    dscale = None if dscale is None else like_sharding(dscale, scale)
    dbias = None if dbias is None else like_sharding(dbias, bias)
    return like_sharding(dx, x), None, dscale, dbias, None, None


class _Cotangents:
    """The per-feature algebra of batch norm's backward, shared by both vjp kernels.

    From the local sums `sum(dy)` and `sum(dy xhat)` (one all-reduce over
    `axis_name`, with the cotangents of the returned moments), the parameter
    gradients and the per-feature coefficients of
    `dx = gamma_inv dy + w (p + q (x - mean))` (`w` the mask): batch norm's
    `dx = gamma / (m sigma) (m dy - sum(dy) - xhat sum(dy xhat))` plus the
    moments' cotangents. Complex `x`: `dx = gamma_inv dy + w (p + q conj(x - mean))`
    with a real `q = -inv Re(gamma_inv sum(dy xhat)) / m` (the variance is real).
    A feature without a valid element (`w = 0`) gets the inference map's `dx`.
    Batch Renorm (`rd = (r, d)`, constant): `gamma -> gamma r` and
    `dgamma = sum(dy (r xhat + d))`.
    """

    def __init__(self, spec, x, scale, bias, inv, count, rd, gm, sum_dy, sum_dy_xhat):
        dt = sum_dy.dtype
        cplx = is_complex(sum_dy)
        rdt = real_dtype(dt)  # dt for real inputs
        if scale is None:
            self.dscale = None
        elif rd is None:
            self.dscale = cast(_sum_to(sum_dy_xhat, scale.shape), scale.dtype)
        else:  # Batch Renorm: y = gamma (r xhat + d) + beta, r and d constant
            dscale = rd[0] * sum_dy_xhat + rd[1] * sum_dy
            self.dscale = _sum_to(dscale, scale.shape).astype(scale.dtype)
        self.dbias = None if bias is None else cast(_sum_to(sum_dy, bias.shape), bias.dtype)
        gmean = None if gm is None else gm.mean.astype(dt)
        gm2 = None if gm is None else gm.m2.astype(rdt)
        if spec.axis_name is not None:
            # One all-reduce. The pooled moments feed every device, so their
            # cotangent is the sum of the per-device ones (all_gather's transpose);
            # unless they are typed invariant (shard_map, check_vma): then it already is.
            names = spec.axis_name if isinstance(spec.axis_name, tuple) else (spec.axis_name,)
            typed = set(names) <= varying_axes(x)
            rows = [sum_dy, sum_dy_xhat]
            sum_gm = gm is not None and (not typed or set(names) <= varying_axes(gmean))
            if sum_gm:
                rows += [
                    jnp.broadcast_to(gmean, sum_dy.shape),
                    jnp.broadcast_to(gm2, sum_dy.shape),
                ]
            both = _psum(jnp.stack(rows), spec)
            sum_dy, sum_dy_xhat = both[0], both[1]
            if sum_gm:
                gmean, gm2 = both[2], cast(both[3], rdt)
        gamma_inv = inv if scale is None else scale.astype(param_dtype(scale, dt, rdt)) * inv
        if rd is not None:  # Batch Renorm: batch norm's dx with gamma -> gamma r
            gamma_inv = gamma_inv * rd[0]
        n = jnp.where(count > 0, count, 1)
        p = -gamma_inv * sum_dy / n
        if cplx:
            q = -inv * jnp.real(gamma_inv * sum_dy_xhat) / n
        else:
            q = -gamma_inv * inv * sum_dy_xhat / n
        if gm is not None:
            p = p + gmean / n
            q = q + 2 * gm2
        self.gamma_inv, self.p, self.q = gamma_inv, p, q


_bn_vjp.defvjp(_bn_vjp_fwd, _bn_vjp_bwd)


# ----------------------------------------------------------- fused with an activation


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bn_act_vjp(spec, x, mask, scale, bias, run, bounds):
    z, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return z, m


def _bn_act_vjp_fwd(spec, x, mask, scale, bias, run, bounds):
    z, m, _, inv, rd = _forward(spec, x, mask, scale, bias, run, bounds)
    # In-Place Activated BN: the output z and per-feature vectors, never the input.
    return (z, m), (z, mask, scale, bias, inv, m.count, rd)


def _bn_act_vjp_bwd(spec, res, cts):
    """Batch norm's backward recomputed from the output `z = f(y)`.

    `y = f^-1(z)` is the affine map's output `A (x - mean) + B` (`A = gamma r /
    sigma`, `B = gamma d + beta`; `r = 1`, `d = 0` without Batch Renorm), so
    `x - mean = (y - B) / A`; `dy = dz f'(z)`; then the same per-feature algebra
    as :func:`_bn_vjp_bwd`. `gamma` is never 0 here (the functional layer uses an
    effective scale bounded away from 0); a feature with `A = 0` (a constant
    feature with `epsilon = 0`) has `x - mean = 0`.
    """
    z, mask, scale, bias, inv, count, rd = res
    gz, gm = cts
    dt = inv.dtype
    act = spec.activation
    zf = z.astype(dt)
    y = act.inverse(zf)
    gyf = gz.astype(dt) * act.derivative(zf)
    a = inv if scale is None else inv * scale.astype(dt)
    b = None if bias is None else bias.astype(dt)
    if rd is not None:
        a = a * rd[0]
        d = rd[1] if scale is None else rd[1] * scale.astype(dt)
        b = d if b is None else b + d
    yb = y if b is None else y - b
    nonzero = a != 0
    xc = jnp.where(nonzero, yb / jnp.where(nonzero, a, 1), 0)
    # Every element is normalized with the batch statistics, so the sums run over all
    # of them; the mask enters only through the statistics' derivative (as in
    # _bn_vjp_bwd).
    sum_dy = jnp.sum(gyf, axis=spec.stat_axes, keepdims=True)
    sum_dy_xhat = inv * jnp.sum(gyf * xc, axis=spec.stat_axes, keepdims=True)
    g = _Cotangents(spec, z, scale, bias, inv, count, rd, gm, sum_dy, sum_dy_xhat)
    corr = xc * g.q + g.p
    dx = gyf * g.gamma_inv + (corr if mask is None else mask.astype(dt) * corr)
    return _typed_like(z, scale, bias, dx.astype(spec.in_dtype), g.dscale, g.dbias)


_bn_act_vjp.defvjp(_bn_act_vjp_fwd, _bn_act_vjp_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _bn_jvp(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


@_bn_jvp.defjvp
def _bn_jvp_rule(spec, primals, tangents):
    x, mask, scale, bias, run, bounds = primals
    tx, _, tscale, tbias, _, _ = tangents  # running statistics, Batch Renorm's r, d: constants
    y, m, mean, inv, rd = _forward(spec, x, mask, scale, bias, run, bounds)
    dt = mean.dtype
    cplx = is_complex(mean)
    rdt = real_dtype(dt)
    n = jnp.where(m.count > 0, m.count, 1)
    w = 1 if mask is None else mask.astype(rdt)
    xc = x.astype(dt) - mean
    xhat = xc * inv
    txf = tx.astype(dt)
    # d sigma2 = 2 mean(Re(conj(x - mean) dx)) (complex; the real case without conj/Re)
    s0 = jnp.sum(w * txf, axis=spec.stat_axes, keepdims=True)
    dvar_terms = w * jnp.real(jnp.conj(xc) * txf) if cplx else w * xc * txf
    sums = jnp.stack([s0, jnp.sum(dvar_terms, axis=spec.stat_axes, keepdims=True).astype(dt)])
    sums = _psum(sums, spec)
    tmean = sums[0] / n
    if cplx:  # the variance's tangent is real
        s1 = jnp.real(sums[1])
        tm2 = 2 * s1
        txhat = inv * (txf - tmean - xhat * (inv * s1 / n))
    else:  # (the real program as written before complex support, op for op)
        tm2 = 2 * sums[1]
        txhat = inv * (txf - tmean - xhat * (inv * sums[1] / n))
    if rd is not None:  # Batch Renorm: y = gamma (r xhat + d) + beta
        txhat = rd[0] * txhat
        xhat = rd[0] * xhat + rd[1]
    ty = txhat if scale is None else txhat * scale.astype(param_dtype(scale, dt, rdt))
    if tscale is not None and scale is not None:
        ty = ty + xhat * tscale.astype(param_dtype(scale, dt, rdt))
    if tbias is not None and bias is not None:
        ty = ty + tbias.astype(param_dtype(bias, dt, rdt))
    if spec.activation is not None:  # z = f(y): tz = f'(y) ty, f' read from z
        ty = ty * spec.activation.derivative(y.astype(ty.dtype))
    tmean, tm2 = match_varying(tmean, tm2, like=(m.mean,))
    tm = Moments(jnp.zeros_like(m.count), tmean.astype(m.mean.dtype), tm2.astype(m.m2.dtype))
    return (y, m), (ty.astype(y.dtype), tm)


def _bn_autodiff(spec, x, mask, scale, bias, run, bounds):
    y, m, _, _, _ = _forward(spec, x, mask, scale, bias, run, bounds)
    return y, m


_KERNELS = {"vjp": _bn_vjp, "jvp": _bn_jvp, "autodiff": _bn_autodiff}


def normalize(grad: str, spec: Spec, x, mask, scale, bias, run=None, bounds=None):
    """`(y, batch moments)` of one normalization call, differentiated by the rule `grad`
    (`"vjp"`, `"jvp"` or `"autodiff"`); the arguments are those of :func:`_forward`."""
    if grad == "vjp" and spec.activation is not None:
        return _bn_act_vjp(spec, x, mask, scale, bias, run, bounds)
    return _KERNELS[grad](spec, x, mask, scale, bias, run, bounds)
