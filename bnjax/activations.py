"""Invertible activations that batch norm can fuse with (In-Place Activated BN).

`BatchNormConfig(activation=...)` (and `bnjax.linen.BatchNormAct` /
`bnjax.nnx.BatchNormAct`) computes `z = f(gamma xhat + beta)` in one layer
and keeps only its output `z` for the backward pass (Rota Bulò, Porzi and
Kontschieder, CVPR 2018): the pre-activation is recovered as `y = f^-1(z)`,
`f'(y)` from `z` alone, and batch norm's backward from `y`. That needs an
invertible `f` whose derivative is a function of its output (the second form
holds below 0):

| activation | `f(y)` | `f^-1(z)` | `f'` from `z` |
|---|---|---|---|
| :class:`Identity` | `y` | `z` | `1` |
| :class:`LeakyReLU` (a) | `y` or `a y` | `z` or `z / a` | `1` or `a` |
| :class:`ELU` (a) | `y`, `a(e^y-1)` | `z`, `log1p(z/a)` | `1`, `z+a` |

Plain ReLU is not invertible (`y` is lost wherever `z = 0`, and batch norm's
input gradient needs it everywhere): :func:`resolve` rejects it and names
`leaky_relu` as the alternative.

Precision: ELU saturates; for `y` below about `log(eps)` of the dtype
(`-16` in float32) `z = -alpha` to rounding, so `y` is not recoverable
there. The inverse is clamped to `log(eps)` (finite), and the gradient of
such elements is then approximate (their own `f'` is `~0`; only the
`xhat` term of the other elements' gradients sees the clamp).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ELU", "Activation", "Identity", "LeakyReLU", "resolve"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Activation:
    """An invertible activation (frozen, hashable: a static part of a config).

    Subclasses define `__call__(y)`, `inverse(z)` and `derivative(z)` (the
    derivative at `y = inverse(z)`, from the output alone).
    """

    name = "activation"

    def __call__(self, y: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def derivative(self, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Activation):
    """`f(y) = y`: batch norm alone, recomputed from its output (no input kept)."""

    name = "identity"

    def __call__(self, y: Array) -> Array:
        return y

    def inverse(self, z: Array) -> Array:
        return z

    def derivative(self, z: Array) -> Array:
        return jnp.ones_like(z)


@dataclasses.dataclass(frozen=True)
class LeakyReLU(Activation):
    """`f(y) = y` for `y >= 0`, `negative_slope * y` below (`flax.linen.leaky_relu`).

    Attributes:
      negative_slope: the slope below 0; must be > 0 (0 is ReLU, not invertible).
    """

    negative_slope: float = 0.01
    name = "leaky_relu"

    def __post_init__(self):
        s = self.negative_slope
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(
                f"LeakyReLU needs negative_slope > 0 to be invertible, got negative_slope={s!r} "
                "(negative_slope=0 is ReLU)"
            )
        object.__setattr__(self, "negative_slope", float(s))

    def __call__(self, y: Array) -> Array:
        return jnp.where(y >= 0, y, self.negative_slope * y)

    def inverse(self, z: Array) -> Array:
        return jnp.where(z >= 0, z, z / self.negative_slope)

    def derivative(self, z: Array) -> Array:
        return jnp.where(z >= 0, 1, self.negative_slope).astype(z.dtype)


@dataclasses.dataclass(frozen=True)
class ELU(Activation):
    """`f(y) = y` for `y > 0`, `alpha (e^y - 1)` below (`flax.linen.elu`).

    Attributes:
      alpha: the negative saturation value's magnitude; must be > 0.
    """

    alpha: float = 1.0
    name = "elu"

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
            raise ValueError(f"ELU needs alpha > 0 to be invertible, got alpha={a!r}")
        object.__setattr__(self, "alpha", float(a))

    def __call__(self, y: Array) -> Array:
        return jnp.where(y > 0, y, self.alpha * jnp.expm1(jnp.minimum(y, 0)))

    def inverse(self, z: Array) -> Array:
        floor = jnp.log(jnp.finfo(z.dtype).eps)
        neg = jnp.maximum(jnp.log1p(jnp.minimum(z, 0) / self.alpha), floor)
        return jnp.where(z > 0, z, neg)

    def derivative(self, z: Array) -> Array:
        return jnp.where(z > 0, 1, z + self.alpha).astype(z.dtype)


_BY_NAME = {"identity": Identity, "leaky_relu": LeakyReLU, "elu": ELU}


def resolve(activation: Any) -> Activation | None:
    """An :class:`Activation` from `activation`: `None`, an :class:`Activation`, or
    one of the names `"identity"`, `"leaky_relu"`, `"elu"` (default parameters).

    Raises:
      ValueError: `"relu"` (not invertible; use `"leaky_relu"`) or an unknown name.
      TypeError: anything else.
    """
    if activation is None or isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        if activation == "relu":
            raise ValueError(
                "activation='relu' cannot be fused: ReLU is not invertible (the backward pass "
                "recomputes batch norm's output from the activation's, lost where relu gives "
                "0); use activation='leaky_relu' (bnjax.activations.LeakyReLU(negative_slope)) "
                "or a separate BatchNorm followed by nn.relu"
            )
        if activation in _BY_NAME:
            return _BY_NAME[activation]()
        raise ValueError(
            f"activation must be one of {tuple(_BY_NAME)} or a bnjax.activations.Activation, "
            f"got {activation!r}"
        )
    raise TypeError(
        f"activation must be None, a name or a bnjax.activations.Activation, got {activation!r}"
    )
