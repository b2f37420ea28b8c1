"""Capturing every batch-norm layer of a Flax model (private).

One traced forward pass of a linen model (through `flax.linen.intercept_methods`)
or of an NNX model (through :func:`bnjax.nnx.intercept`) hands each batch-norm
call's input, mask, functional config, parameters and statistics to a
`record` function, which returns the layer's output (the pass goes on with
it) and a record; the pass returns `{layer path: [record, ...]}`. Used by
:mod:`bnjax.recalibration` (PreciseBN) and :mod:`bnjax.diagnostics`.

Handles `bnjax.linen.BatchNorm` / `BatchRenorm` and `flax.linen.BatchNorm`
in linen models, and `bnjax.nnx.BatchNorm` / `BatchRenorm` in NNX models.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import functional as F
from bnjax import linen as bnlinen
from bnjax import nnx as bnnnx
from bnjax._module_common import batch_stats, config_from

Array = jax.Array

# record(x, mask, cfg, params, state, upstream) -> (y, record)
Recorder = Callable[..., tuple[Array, Any]]


def local(cfg: F.BatchNormConfig) -> F.BatchNormConfig:
    """`cfg` without cross-device pooling (statistics of this device's data)."""
    return dataclasses.replace(cfg, axis_name=None, axis_index_groups=None)


def linen_config(mod: nn.Module) -> F.BatchNormConfig | None:
    """The local functional config of a bnjax or flax linen batch norm, else `None`."""
    if isinstance(mod, bnlinen.BatchNorm):
        return local(mod.config())
    if isinstance(mod, nn.BatchNorm):
        return config_from(mod, F.BatchNormConfig, local=True)
    return None


def linen_params(mod: nn.Module, cfg: F.BatchNormConfig) -> F.BNParams:
    """The `scale` and `bias` a bound linen batch-norm layer holds (`None` where unused)."""
    return F.BNParams(
        mod.get_variable("params", "scale") if cfg.use_scale else None,
        mod.get_variable("params", "bias") if cfg.use_bias else None,
    )


def as_args(batch: Any) -> tuple:
    """A batch as the model's positional arguments (a tuple is already several)."""
    return batch if isinstance(batch, tuple) else (batch,)


def _with_path(path: str, fn: Callable, *a):
    try:
        return fn(*a)
    except (ValueError, TypeError) as e:
        raise type(e)(f"batch-norm layer {path!r}: {e}") from None


def _linen_stats(mod: nn.Module, cfg: F.BatchNormConfig, path: str):
    renorm = cfg.renorm is not None  # BatchRenorm: also its step counter
    names = F.BatchStats._fields + (("steps",) if renorm else ())
    stored = {k: mod.get_variable("batch_stats", k) for k in names}
    if stored["mean"] is None or stored["var"] is None:
        raise ValueError(f"batch-norm layer {path!r} has no batch_stats/mean and var")
    stored = {k: v for k, v in stored.items() if v is not None}
    return _with_path(path, batch_stats, stored, renorm)


def linen_tracer(model: nn.Module, apply_kwargs: Mapping[str, Any]) -> Callable:
    """`trace(variables, args, upstream, record) -> {path: [record, ...]}` for linen."""

    def trace(variables, args, upstream, record):
        out: dict[str, list] = {}

        def interceptor(next_fun, a, kw, context):
            mod = context.module
            cfg = linen_config(mod) if context.method_name == "__call__" else None
            if cfg is None:
                return next_fun(*a, **kw)
            path = "/".join(mod.path)
            params = linen_params(mod, cfg)
            state = _linen_stats(mod, cfg, path)
            x = jnp.asarray(a[0])
            y, rec = _with_path(path, record, x, kw.get("mask"), cfg, params, state, upstream)
            out.setdefault(path, []).append(rec)
            return y

        with nn.intercept_methods(interceptor):
            model.apply(variables, *args, **apply_kwargs)
        return out

    return trace


def nnx_layers(model: nnx.Module) -> dict[str, bnnnx.BatchNorm]:
    """The batch-norm layers of an NNX model by path (`"block/bn"`)."""
    return {
        "/".join(map(str, p)): m
        for p, m in nnx.iter_modules(model)
        if isinstance(m, bnnnx.BatchNorm)
    }


def nnx_tracer(graphdef: Any, call_kwargs: Mapping[str, Any]) -> Callable:
    """`trace(state, args, upstream, record) -> {path: [record, ...]}` for NNX."""

    def trace(state, args, upstream, record):
        model = nnx.merge(graphdef, state)
        paths = {id(m): p for p, m in nnx_layers(model).items()}
        out: dict[str, list] = {}

        def hook(mod, x, mask, use_running_average):
            path = paths[id(mod)]
            cfg = local(mod.config())
            y, rec = _with_path(
                path, record, x, mask, cfg, mod.bn_params(), mod.bn_state(), upstream
            )
            out.setdefault(path, []).append(rec)
            return y

        with bnnnx.intercept(hook):
            model(*args, **call_kwargs)
        return out

    return trace


@functools.lru_cache(maxsize=64)
def _compiled_cached(kind, model, kwargs_items, upstream, record, fold):
    tracer = linen_tracer if kind == "linen" else nnx_tracer
    trace = tracer(model, dict(kwargs_items))
    if fold is not None:

        def fn(acc, carry, args):
            return fold(acc, trace(carry, args, upstream, record))

    else:

        def fn(carry, args):
            return trace(carry, args, upstream, record)

    return trace, jax.jit(fn)


def compiled(
    kind: str,
    model: Any,
    kwargs: Mapping[str, Any],
    upstream: str,
    record: Recorder,
    fold: Callable | None = None,
) -> tuple[Callable, Callable]:
    """`(trace, jitted step)` for a linen model or NNX graphdef, cached.

    Equal models (flax modules and graphdefs compare by structure) with equal
    hashable keyword arguments share one compiled step, so recalibrating again
    (e.g. every epoch) does not recompile. The step is
    `(carry, args) -> {path: [record]}`, or with `fold`
    `(acc, carry, args) -> fold(acc, {path: [record]})` (an accumulation).
    """
    items = tuple(sorted(kwargs.items()))
    try:
        hash((model, items))
    except TypeError:
        return _compiled_cached.__wrapped__(kind, model, items, upstream, record, fold)
    return _compiled_cached(kind, model, items, upstream, record, fold)
