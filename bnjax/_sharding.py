"""Sharding-type helpers (private): varying axes under `shard_map` and explicit meshes.

Inside `shard_map(check_vma=True)` every value carries the set of manual mesh
axes over which it varies; a `custom_vjp` needs inputs and cotangents of
matching types. Under an explicit-axis-type mesh, slicing a sharded axis is not
allowed. These queries and casts are the only places bnjax touches either rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

try:  # Varying -> Invariant all-gather (shard_map with check_vma=True); not public API.
    from jax._src.lax.parallel import all_gather_invariant
except ImportError:  # pragma: no cover - older/newer JAX: fall back to lax.all_gather
    all_gather_invariant = None
try:  # the tracer of jax.vmap (not public API): tells a vmap-bound axis from pmap's
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover
    _BatchTracer = None

Array = jax.Array


def varying_axes(a: Array) -> frozenset:
    """The manual mesh axes over which `a` varies (`shard_map(check_vma=True)`).

    Empty outside `shard_map`, under `pmap` and with `check_vma=False`.
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
    """Casts `arrays` to vary over the union of their (and `like`'s) varying axes.

    Inside `shard_map(check_vma=True)` a `custom_vjp`/`custom_jvp` needs
    inputs and cotangents of matching types; an invariant (replicated) parameter
    cast to varying gets, by JAX's transpose of the cast, the *sum* over devices
    of its per-device cotangents. A no-op elsewhere. `None` passes through.
    """
    present = [a for a in (*arrays, *like) if a is not None]
    union = frozenset().union(*(varying_axes(a) for a in present))
    out = []
    for a in arrays:
        missing = tuple(sorted(union - varying_axes(a))) if a is not None else ()
        out.append(_pvary(a, missing) if missing else a)
    return tuple(out)


def explicitly_sharded(a: Array, axes: tuple[int, ...]) -> bool:
    """Whether one of `axes` of `a` is split over a mesh axis of explicit type."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    return spec is not None and any(i < len(spec) and spec[i] is not None for i in axes)


def unmapped(tree, axis_name, axis_index_groups=None, *, like: Array):
    """Pooled (device-identical) values as one unmapped value per group: the copy of the
    first device of each group (one all-gather of `tree`'s float leaves), exactly,
    not an average.

    The pooled statistics come out of :func:`bnjax.stats.all_reduce` as one copy per
    device in untyped contexts (`vmap`, `pmap`, `shard_map(check_vma=False)`),
    so that the kernel's backward can sum their cotangents; what the *state* update
    takes from them should be unmapped, as flax's pooled statistics are, so that a
    replicated state leaves `vmap` / `shard_map` unmapped (`out_axes=None`,
    `out_specs=P()`). Done under `vmap` only (where the all-gather is a reshape,
    not communication): `pmap` returns per-device outputs anyway, and
    `shard_map(check_vma=False)` accepts the copies with `out_specs=P()`; there
    the layer keeps its one collective. Only pooled values may pass through here (a per-device value
    would be replaced by device 0's). A no-op where `like` (the layer's input) is
    typed varying over `axis_name` (`shard_map(check_vma=True)`): the statistics
    are typed invariant there already. The cotangent of the result reaches device 0's
    copy only; the kernel's backward sums the copies' cotangents, so the total is kept.
    """
    if axis_name is None or _BatchTracer is None:
        return tree
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if set(names) <= varying_axes(like):
        return tree
    if not all(isinstance(lax.axis_index(n), _BatchTracer) for n in names):
        # pmap, shard_map(check_vma=False): per-device outputs anyway; no extra collective
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.inexact)]
    if not floats:
        return tree
    stacked = [leaves[i] for i in floats]
    gathered = lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    for i, g in zip(floats, gathered, strict=True):
        leaves[i] = g[0]
    return jax.tree.unflatten(treedef, leaves)


def _explicit_spec(a: Array):
    """`a`'s PartitionSpec on a mesh with explicit axes, else None."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_types", None):
        return None
    if not any("Explicit" in str(t) for t in mesh.axis_types):
        return None
    return sharding.spec


def like_sharding(a: Array, ref: Array) -> Array:
    """`a` resharded as `ref` (same shape) under an explicit-axis mesh, else `a`.

    Explicit sharding types every value; `jnp.where` needs its branches sharded
    alike, so a replicated running statistic meets the batch's feature-sharded one
    only after this (values unchanged).
    """
    spec, want = _explicit_spec(a), _explicit_spec(ref)
    if want is None or spec == want or jnp.shape(a) != jnp.shape(ref):
        return a
    # the full sharding (its mesh included): works without a jax.set_mesh context too
    return jax.sharding.reshard(a, jax.typeof(ref).sharding)


def replicated_out(x: Array) -> object | None:
    """`out_sharding` for a contraction over `x`'s sharded axes: replicated under an
    explicit-axis mesh (the co-moment matrices are small), else None (the compiler's)."""
    spec = _explicit_spec(x)
    if spec is None or all(s is None for s in spec):
        return None
    mesh = jax.typeof(x).sharding.mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
