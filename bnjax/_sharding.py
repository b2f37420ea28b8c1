"""Sharding-type helpers (private): varying axes under ``shard_map`` and explicit meshes.

Inside ``shard_map(check_vma=True)`` every value carries the set of manual mesh
axes over which it varies; a ``custom_vjp`` needs inputs and cotangents of
matching types. Under an explicit-axis-type mesh, slicing a sharded axis is not
allowed. These queries and casts are the only places bnjax touches either rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax

try:  # Varying -> Invariant all-gather (shard_map with check_vma=True); not public API.
    from jax._src.lax.parallel import all_gather_invariant
except ImportError:  # pragma: no cover - older/newer JAX: fall back to lax.all_gather
    all_gather_invariant = None

Array = jax.Array


def varying_axes(a: Array) -> frozenset:
    """The manual mesh axes over which ``a`` varies (``shard_map(check_vma=True)``).

    Empty outside ``shard_map``, under ``pmap`` and with ``check_vma=False``.
    """
    t = jax.typeof(a)
    v = getattr(t, "vma", None)
    if v is None:
        v = getattr(getattr(t, "mat", None), "varying", frozenset())
    return frozenset(v)


def _pvary(a: Array, axes: tuple) -> Array:
    if hasattr(lax, "pcast"):  # JAX >= 0.8
        return lax.pcast(a, axes, to="varying")
    return lax.pvary(a, axes)  # JAX 0.6 - 0.7


def match_varying(*arrays: Array | None, like: Sequence[Array | None] = ()) -> tuple:
    """Casts ``arrays`` to vary over the union of their (and ``like``'s) varying axes.

    Inside ``shard_map(check_vma=True)`` a ``custom_vjp``/``custom_jvp`` needs
    inputs and cotangents of matching types; an invariant (replicated) parameter
    cast to varying gets, by JAX's transpose of the cast, the *sum* over devices
    of its per-device cotangents. A no-op elsewhere. ``None`` passes through.
    """
    present = [a for a in (*arrays, *like) if a is not None]
    union = frozenset().union(*(varying_axes(a) for a in present))
    out = []
    for a in arrays:
        missing = tuple(sorted(union - varying_axes(a))) if a is not None else ()
        out.append(_pvary(a, missing) if missing else a)
    return tuple(out)


def explicitly_sharded(a: Array, axes: tuple[int, ...]) -> bool:
    """Whether one of ``axes`` of ``a`` is split over a mesh axis of explicit type."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    return spec is not None and any(i < len(spec) and spec[i] is not None for i in axes)
