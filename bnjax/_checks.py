"""Input checks shared by every layer (private): axes, masks, dtypes, feature shapes.

Each raises a `TypeError` / `ValueError` that names the argument and the
shapes involved, so a bad call never gives a silently wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def canonicalize_axes(
    ndim: int, axes: int | Sequence[int], *, name: str = "axis"
) -> tuple[int, ...]:
    """Normalizes `axes` to a sorted tuple of non-negative ints.

    Raises:
      ValueError: naming `name`, if an axis is out of range for `ndim` or repeated.
    """
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not isinstance(a, int):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axes!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={tuple(axes)!r} is out of range for an input of rank {ndim}"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={tuple(axes)!r} repeats an axis")
    return tuple(sorted(out))


def check_mask(mask: Array, shape: tuple[int, ...]) -> Array:
    """Checks that `mask` is boolean and broadcastable to `shape`."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    try:
        jnp.broadcast_shapes(mask.shape, shape)
        ok = mask.ndim <= len(shape) and jnp.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} is not broadcastable to the input shape "
            f"{tuple(shape)}"
        )
    return mask


def check_input(x: Array, layer: str = "batch norm", *, complex_ok: bool = True) -> None:
    """A floating (or, if `complex_ok`, complex) input; else a `TypeError` naming `layer`."""
    dt = jnp.result_type(x)
    ok = jnp.issubdtype(dt, jnp.floating) or (
        complex_ok and jnp.issubdtype(dt, jnp.complexfloating)
    )
    if not ok:
        kind = "floating-point or complex" if complex_ok else "floating-point"
        raise TypeError(
            f"{layer} needs a {kind} x, got dtype {dt} (shape "
            f"{tuple(jnp.shape(x))}); cast it first, e.g. x.astype(jnp.float32)"
        )


def check_shape(arr: Array | None, want: tuple[int, ...], name: str, x_shape, what: str) -> None:
    """`arr` (unless `None`) has shape `want`; else a `ValueError` naming `name`,
    the input shape `x_shape` and `what` the expected shape stands for."""
    if arr is not None and tuple(arr.shape) != tuple(want):
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)} but the input of shape {tuple(x_shape)} "
            f"has {what}"
        )


def check_use_flags(params: Any, config: Any) -> None:
    """`params` (a `BNParams`) holds exactly what `config.use_scale` / `use_bias` say."""
    if config.use_scale != (params.scale is not None) or config.use_bias != (
        params.bias is not None
    ):
        present = [f for f, v in zip(params._fields, params, strict=True) if v is not None]
        raise ValueError(
            f"params hold {present} but the config says use_scale={config.use_scale}, "
            f"use_bias={config.use_bias}"
        )


def out_dtype(x: Array, params: Any, config: Any):
    """The output dtype: `config.dtype`, or `result_type(x, params)` as flax."""
    if config.dtype is not None:
        return jnp.dtype(config.dtype)
    return jnp.result_type(x, *(p for p in params if p is not None))
