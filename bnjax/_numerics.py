"""Numeric building blocks shared by the statistics and the kernels (private).

The dtype rules (statistics in at least float32; complex inputs: a complex
mean, a real variance), a safe inverse square root, and the per-feature data
points that centre reductions and elementwise maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._sharding import explicitly_sharded

Array = jax.Array


def safe_rsqrt(v: Array) -> Array:
    """`1 / sqrt(v)` where `v > 0`, else 0 (with finite gradients).

    With `epsilon = 0` a constant feature has `var + epsilon = 0`; its centred
    values are exactly 0, so a zero inverse scale gives the limit `y = beta`
    (and zero gradient through the scale) instead of `0 * inf = NaN`.
    """
    pos = v > 0
    return jnp.where(pos, lax.rsqrt(jnp.where(pos, v, 1)), 0)


def stats_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype for inputs of `dtype`: at least float32.

    Complex inputs keep a complex dtype (complex64 at least; complex128 stays).
    """
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype of `dtype`: float32 for complex64, unchanged for a real float."""
    return jnp.finfo(dtype).dtype


def is_complex(a: Array | None) -> bool:
    """Whether `a` is a complex array (`False` for `None`)."""
    return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.complexfloating)


def abs2(d: Array) -> Array:
    """`|d|^2`, real: `d * d` for real `d`; `re(d)^2 + im(d)^2` for complex `d`."""
    if jnp.iscomplexobj(d):
        return lax.square(lax.real(d)) + lax.square(lax.imag(d))
    return d * d


def cast(a: Array, dtype) -> Array:
    """`a` cast to `dtype`; a complex `a` cast to a real dtype keeps its real part
    (explicitly: the transpose of a real-to-complex cast, without JAX's warning)."""
    if is_complex(a) and not jnp.issubdtype(dtype, jnp.complexfloating):
        a = jnp.real(a)
    return a.astype(dtype)


def param_dtype(p: Array, dt, rdt):
    """The compute dtype of a parameter: the real statistics dtype `rdt` (so a real
    gamma scales a complex input with real products), `dt` for a complex parameter."""
    return dt if is_complex(p) else rdt


def head(xf: Array, axes: tuple[int, ...], start: int, width: int) -> Array:
    """Elements `start .. start + width - 1` of each feature along the longest reduced
    axis (element 0 of the other reduced axes), keepdims shape, gradient stopped."""
    long_axis = max(axes, key=lambda i: xf.shape[i])
    idx = tuple(
        slice(None) if i not in axes
        else slice(start, start + width) if i == long_axis
        else slice(0, 1)
        for i in range(xf.ndim)
    )
    return lax.stop_gradient(xf[idx])


def data_point(xf: Array, axes: tuple[int, ...], j: int = 0) -> Array | None:
    """Element `j` of each feature (along the longest reduced axis), keepdims shape.

    A per-feature value of the order of the data, used to centre elementwise
    maps (`(x - c) * a + b'` instead of the folded `x * a + b`, whose rounding
    error is about twice as large when `|mean| >> std`; mainly, the broadcast
    is then of `c`, not of a value a reduction also uses). It is a plain
    slice, which XLA fuses into the consumer; different `j` give different HLO
    values, so two consumers never share one broadcast (XLA:CPU would then
    materialize it, see `bnjax.stats`' shifted moments).
    `None` under explicit sharding of a reduced axis (slicing it is not allowed).
    """
    if explicitly_sharded(xf, axes):
        return None
    size = max(xf.shape[i] for i in axes)
    return head(xf, axes, min(j, size - 1), 1)
