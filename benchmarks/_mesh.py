"""Shared by ``benchmarks/multidevice_step.py`` and ``tests/_multidevice_impl.py``.

A 1-D device mesh and the small BN MLP that :mod:`bnjax.training.parallel`'s train step is
timed (benchmark) and checked (tests) on. Import it only after ``XLA_FLAGS`` is
set (it imports JAX). ``benchmarks/`` is not a package: the benchmark finds this
module on its own folder's path; the tests' subprocess puts ``benchmarks/`` on
``sys.path`` first.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh

import bnjax.linen as bl


def mesh1d(n: int, name: str, axis_type: AxisType = AxisType.Explicit) -> Mesh:
    """A 1-D mesh named ``name`` over the first ``n`` devices."""
    return jax.make_mesh((n,), (name,), axis_types=(axis_type,), devices=jax.devices()[:n])


class MLP(nn.Module):
    """``layers`` x (``Dense(100)``, no bias -> BN(``axis_name``) -> sigmoid), then ``Dense(10)``.

    Hidden kernels are drawn from ``N(0, 1)``; the head's from ``head_init``.
    """

    axis_name: str | None = "data"
    layers: int = 3
    momentum: float = 0.99
    head_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(self.layers):
            x = nn.Dense(100, use_bias=False, kernel_init=nn.initializers.normal(1.0))(x)
            x = bl.BatchNorm(axis_name=self.axis_name, momentum=self.momentum)(x, train=train)
            x = nn.sigmoid(x)
        return nn.Dense(10, kernel_init=self.head_init)(x)
