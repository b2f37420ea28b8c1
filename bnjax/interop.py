"""PyTorch interop: torch's batch-norm semantics as bnjax options, torch weights converted.

PyTorch and flax disagree on four batch-norm conventions that silently change
results (BEYOND.md section 4, and the porting guide `docs/porting.md`):

| torch (`nn.BatchNorm*d`)                | bnjax (`bnjax.linen.BatchNorm`)                    |
|-------------------------------------------|------------------------------------------------------|
| `momentum=0.1` (weight of the batch)    | `momentum=0.9` (weight of the old value)           |
| `running_var`: EMA of the *unbiased*    | `running_variance="unbiased"` (flax's default is   |
| batch variance `m/(m-1) sigma2_B`       | the biased one)                                      |
| `momentum=None`: cumulative average     | `population="cumulative"` (counted by `batches`) |
| `num_batches_tracked`                   | `batch_stats/batches` (`count_batches=True`)     |
| `track_running_stats=False`             | `track_running_stats=False`                        |
| `affine=False`                          | `use_scale=False, use_bias=False`                  |
| `eps`                                   | `epsilon`                                          |
| NCHW inputs, OIHW conv weights            | NHWC inputs (`axis=-1`), HWIO kernels              |

:func:`batch_norm_kwargs` reads those off a torch layer; :func:`from_torch`
converts a whole model's weights and statistics, :func:`to_torch` writes them
back. `torch` is imported only when a function needs it (install the
`torch` extra).

Example:

```python
kw = bnjax.interop.batch_norm_kwargs(torch_model.bn1)   # {"momentum": 0.9, ...}
variables = bnjax.interop.from_torch(torch_model, flax_model, x, train=False)
logits = flax_model.apply(variables, x, train=False)
bnjax.interop.to_torch(variables, flax_model, torch_model, x, train=False)
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import nnx, traverse_util
from flax.core import unfreeze

from bnjax import nnx as bnnnx
from bnjax.compat import is_batch_norm

__all__ = ["batch_norm_kwargs", "from_torch", "to_torch", "torch_input"]

_Path = tuple[Any, ...]

# torch's buffers/parameters of each kind of layer -> the flax variable names
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("bnjax.interop needs PyTorch: pip install 'bnjax[torch]'") from e
    return torch


def batch_norm_kwargs(torch_bn: Any, *, axis: int = -1) -> dict[str, Any]:
    """Keyword arguments of :class:`bnjax.linen.BatchNorm` (and :class:`bnjax.nnx.BatchNorm`)
    that reproduce the torch layer `torch_bn` exactly, in training and at inference.

    Args:
      torch_bn: a `torch.nn.BatchNorm1d/2d/3d` or `SyncBatchNorm`.
      axis: the feature axis in the flax model's layout (-1: channels last).

    Returns:
      `epsilon`, `momentum` (`1 - torch's`) or `population="cumulative"`
      (torch's `momentum=None`), `running_variance="unbiased"`,
      `use_scale` / `use_bias` (torch's `affine`), `track_running_stats`
      and `count_batches=True` (`num_batches_tracked`).

    Raises:
      TypeError: `torch_bn` is not a torch batch-norm layer.
    """
    torch = _torch()
    if not isinstance(torch_bn, torch.nn.modules.batchnorm._NormBase) or isinstance(
        torch_bn, torch.nn.modules.instancenorm._InstanceNorm
    ):
        raise TypeError(f"torch_bn must be a torch.nn.BatchNorm*d layer, got {type(torch_bn)}")
    kw: dict[str, Any] = dict(
        axis=axis,
        epsilon=float(torch_bn.eps),
        use_scale=bool(torch_bn.affine),
        use_bias=bool(torch_bn.affine),
        running_variance="unbiased",
        track_running_stats=bool(torch_bn.track_running_stats),
        count_batches=bool(torch_bn.track_running_stats),
    )
    if torch_bn.momentum is None:
        kw.update(population="cumulative", momentum=0.0)
    else:
        kw.update(momentum=1.0 - float(torch_bn.momentum))
    return kw


def torch_input(x: Any) -> Any:
    """`x` in the flax model's layout (channels last) as torch wants it (channels
    first): `(N, ..., C) -> (N, C, ...)` for inputs of rank 3 or more, a float
    `torch.Tensor` sharing nothing with `x`."""
    torch = _torch()
    a = np.asarray(x)
    if a.ndim >= 3:
        a = np.moveaxis(a, -1, 1)
    return torch.from_numpy(np.array(a, order="C", copy=True))


# --------------------------------------------------------------------------- layers


class _Layer(NamedTuple):
    """One convertible layer: its kind ("conv", "linear", "bn"), a name and the
    names -> shapes of its variables (flax) or tensors (torch)."""

    kind: str
    name: str
    slots: dict[str, Any]


def _torch_layers(torch_module: Any, x: Any) -> list[_Layer]:
    """The torch layers with their own parameters or buffers, in call order on `x`
    (run in eval mode, without gradients; the training flags are restored)."""
    torch = _torch()
    names = {id(m): n for n, m in torch_module.named_modules()}
    order: list[Any] = []

    def hook(module, args):
        if any(True for _ in module.parameters(recurse=False)) or any(
            b is not None for _, b in module.named_buffers(recurse=False)
        ):
            order.append(module)

    modes = {m: m.training for m in torch_module.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in torch_module.modules()]
    try:
        torch_module.eval()
        with torch.no_grad():
            torch_module(torch_input(x))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    out, seen = [], set()
    for m in order:
        name = names.get(id(m), type(m).__name__)
        if id(m) in seen:
            raise ValueError(
                f"torch layer {name!r} ({type(m).__name__}) is called more than once: "
                "pass name_map= to pair shared layers explicitly"
            )
        seen.add(id(m))
        tensors = {k: v for k, v in m.named_parameters(recurse=False)}
        tensors.update({k: v for k, v in m.named_buffers(recurse=False) if v is not None})
        if isinstance(m, torch.nn.modules.conv._ConvNd) and not isinstance(
            m, torch.nn.modules.conv._ConvTransposeNd
        ):
            kind = "conv"
        elif isinstance(m, torch.nn.Linear):
            kind = "linear"
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            kind = "bn"
        else:
            raise ValueError(
                f"torch layer {name!r} ({type(m).__name__}) has parameters or buffers "
                f"{sorted(tensors)} that bnjax.interop cannot convert (Conv1d/2d/3d, Linear "
                "and BatchNorm*d are supported)"
            )
        out.append(_Layer(kind, name, tensors))
    return out


def _flax_kind(module: Any) -> str | None:
    if is_batch_norm(module):
        return "bn"
    if isinstance(module, (nn.Conv, nnx.Conv)):
        return "conv"
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return "linear"
    return None


def _linen_layers(module: nn.Module, x: Any, call_kwargs: Mapping[str, Any]):
    """`(layers, shapes)`: the linen model's convertible layers in call order (their
    slots map names to flat variable paths) and the flat shapes of `init`'s variables."""
    calls: list[tuple[str, _Path]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            kind = _flax_kind(context.module)
            path = tuple(context.module.path)
            if kind is not None and (kind, path) not in calls:
                calls.append((kind, path))
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(interceptor):
            return module.init(jax.random.key(0), x, **call_kwargs)

    shapes = traverse_util.flatten_dict(unfreeze(dict(jax.eval_shape(init))))
    layers = []
    for kind, path in calls:
        slots = {k[-1]: k for k in shapes if len(k) == len(path) + 2 and k[1:-1] == path}
        layers.append(_Layer(kind, "/".join(path), slots))
    return layers, shapes


@contextlib.contextmanager
def _record_nnx_calls(record: Callable[[Any], None]) -> Iterator[None]:
    """Temporarily wraps `__call__` of flax's and bnjax's NNX Conv / Linear /
    BatchNorm classes to record each call's module."""
    classes = (nnx.Conv, nnx.Linear, nnx.BatchNorm, bnnnx.BatchNorm)  # (subclasses inherit)
    saved = {c: c.__dict__.get("__call__") for c in classes}

    def wrap(call):
        def __call__(self, *args, **kwargs):
            record(self)
            return call(self, *args, **kwargs)

        return __call__

    for c in classes:
        c.__call__ = wrap(c.__call__)
    try:
        yield
    finally:
        for c, f in saved.items():
            if f is None:
                del c.__call__
            else:
                c.__call__ = f


def _nnx_layers(model: nnx.Module, x: Any, call_kwargs: Mapping[str, Any]):
    """As :func:`_linen_layers` for an NNX model (called on a clone, eagerly)."""
    clone = nnx.clone(model)
    paths = {id(m): p for p, m in nnx.iter_graph(clone) if isinstance(m, nnx.Module)}
    calls: list[Any] = []

    def record(m):
        if id(m) in paths and m not in calls:
            calls.append(m)

    with _record_nnx_calls(record):
        clone(x, **call_kwargs)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    shapes = {
        k: jax.ShapeDtypeStruct(np.shape(v.get_value()), v.get_value().dtype)
        for k, v in flat.items()
        if v.get_value() is not None
    }
    layers = []
    for m in calls:
        kind, path = _flax_kind(m), tuple(paths[id(m)])
        if kind is None:
            continue
        slots = {k[-1]: k for k in shapes if len(k) == len(path) + 1 and k[:-1] == path}
        layers.append(_Layer(kind, "/".join(map(str, path)), slots))
    return layers, shapes


def _layers(flax_module: Any, x: Any, call_kwargs: Mapping[str, Any]):
    if isinstance(flax_module, nn.Module):
        return _linen_layers(flax_module, x, call_kwargs)
    if isinstance(flax_module, nnx.Module):
        return _nnx_layers(flax_module, x, call_kwargs)
    raise TypeError(f"flax_module must be a flax.linen or flax.nnx Module, got {type(flax_module)}")


def _pairs(torch_layers, flax_layers, name_map: Mapping[str, str] | None):
    """The layers paired by call order (or by `name_map`: torch name -> flax path)."""
    if name_map is not None:
        by_name = {f.name: f for f in flax_layers}
        pairs = []
        for t in torch_layers:
            if t.name not in name_map:
                raise ValueError(f"torch layer {t.name!r} ({t.kind}) is not in name_map")
            target = name_map[t.name]
            if target not in by_name:
                raise ValueError(
                    f"name_map pairs torch layer {t.name!r} with {target!r}, which is not a "
                    f"convertible layer of the flax model (it has e.g. {list(by_name)[:5]})"
                )
            pairs.append((t, by_name[target]))
        unpaired = set(by_name) - {f.name for _, f in pairs}
        if unpaired:
            raise ValueError(f"flax layers {sorted(unpaired)} are not paired by name_map")
        return pairs
    for i in range(max(len(torch_layers), len(flax_layers))):
        t = torch_layers[i] if i < len(torch_layers) else None
        f = flax_layers[i] if i < len(flax_layers) else None
        if t is None or f is None:
            which = (
                f"torch layer {t.name!r} ({t.kind})"
                if t is not None
                else f"flax layer {f.name!r} ({f.kind})"
            )
            raise ValueError(
                f"call #{i}: {which} has no counterpart in the other model ({len(torch_layers)} "
                f"torch layers, {len(flax_layers)} flax layers with parameters); pass name_map="
            )
        if t.kind != f.kind:
            raise ValueError(
                f"call #{i}: torch layer {t.name!r} is a {t.kind} but flax layer {f.name!r} "
                f"is a {f.kind}; the models do not call their layers in the same order "
                "(pass name_map=)"
            )
    return list(zip(torch_layers, flax_layers, strict=True))


def _flax_name(kind: str, name: str) -> str:
    """The flax variable name of a torch layer's tensor `name`."""
    if kind in ("conv", "linear"):
        return "kernel" if name == "weight" else name
    if name == "num_batches_tracked":
        return "batches"
    return _BN_NAMES.get(name, name)


def _to_flax(kind: str, name: str, a: np.ndarray) -> tuple[str, np.ndarray]:
    """A torch tensor's flax name and value (OI... weights -> ...IO kernels)."""
    fname = _flax_name(kind, name)
    if fname == "kernel":
        a = a.transpose(tuple(range(2, a.ndim)) + (1, 0))
    return fname, a


def _check_shape(t: _Layer, f: _Layer, tname: str, fname: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"torch layer {t.name!r} {tname} (converted shape {tuple(got)}) does not fit flax "
            f"layer {f.name!r} {fname} of shape {tuple(want)}"
        )


def from_torch(
    torch_module: Any,
    flax_module: Any,
    x: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    **call_kwargs: Any,
) -> Any:
    """The weights and batch-norm statistics of `torch_module` as `flax_module`'s variables.

    Both models are traced on the example input `x` (given in the flax model's
    layout; the torch model gets :func:`torch_input` of it, channels first) and
    their layers with parameters are paired by call order: torch `Conv*d` with
    `nn.Conv` / `nnx.Conv` (OIHW -> HWIO), `Linear` with `nn.Dense` /
    `nnx.Linear` (transposed), `BatchNorm*d` with any batch-norm layer of flax
    or bnjax (`weight, bias, running_mean, running_var` -> `scale, bias, mean,
    var`; `num_batches_tracked` -> `batches` where the layer stores it, e.g.
    with :func:`batch_norm_kwargs`). A flax layer that stores `count` (the
    paper's `population="average"`) gets `count = batches = 0`: torch does not
    record element counts, so the average restarts from the loaded statistics.

    Args:
      torch_module: a `torch.nn.Module` (left unchanged: traced in eval mode,
        its training flags restored).
      flax_module: a `flax.linen.Module` or a `flax.nnx.Module` with the same
        architecture.
      x: an example input in the flax layout (any batch size; values unused).
      name_map: optional `{torch module name: flax layer path}` (linen paths
        `"layer1_0/conv1"`, NNX paths with `/` between attribute names),
        instead of pairing by call order.
      **call_kwargs: passed to the flax model's call (e.g. `train=False`).

    Returns:
      linen: the variables (`{"params": ..., "batch_stats": ...}`) for
      `flax_module.apply`. NNX: an `nnx.State` for `nnx.update(model, state)`
      (the model itself is not modified).

    Raises:
      ValueError: a torch layer the converter cannot handle, a layer without a
        counterpart or of another kind (naming the first one), or a shape
        mismatch (naming both layers and both shapes).
    """
    torch_layers = _torch_layers(torch_module, x)
    flax_layers, shapes = _layers(flax_module, x, call_kwargs)
    values: dict[_Path, Any] = {}
    for t, f in _pairs(torch_layers, flax_layers, name_map):
        for tname, tensor in t.slots.items():
            fname, a = _to_flax(t.kind, tname, tensor.detach().cpu().numpy())
            if fname not in f.slots:
                if fname == "batches":  # the flax layer keeps no counter
                    continue
                raise ValueError(
                    f"torch layer {t.name!r} has {tname!r} but flax layer {f.name!r} has no "
                    f"{fname!r} (it has {sorted(f.slots)}): e.g. affine or "
                    "track_running_stats differ; see bnjax.interop.batch_norm_kwargs"
                )
            target = shapes[f.slots[fname]]
            if fname == "batches":
                a = np.full(target.shape, a, target.dtype)
            _check_shape(t, f, tname, fname, a.shape, target.shape)
            values[f.slots[fname]] = np.asarray(a, target.dtype)
        missing = set(f.slots) - {_flax_name(t.kind, n) for n in t.slots}
        for fname in sorted(missing):
            if fname in ("count", "batches", "steps"):
                target = shapes[f.slots[fname]]
                values[f.slots[fname]] = np.zeros(target.shape, target.dtype)
            else:
                raise ValueError(
                    f"flax layer {f.name!r} has {fname!r} but torch layer {t.name!r} has no "
                    f"counterpart (it has {sorted(t.slots)})"
                )
    left = [k for k in shapes if k not in values]
    if left:
        raise ValueError(
            f"flax variable {'/'.join(map(str, left[0]))} belongs to no layer paired with the "
            f"torch model ({len(left)} such variables): its layer is not a Conv, Dense/Linear "
            "or BatchNorm"
        )
    if isinstance(flax_module, nn.Module):
        return traverse_util.unflatten_dict({k: jax.numpy.asarray(v) for k, v in values.items()})
    state = nnx.to_flat_state(nnx.state(flax_module))
    out = []
    for k, v in state:
        out.append((k, v.replace(jax.numpy.asarray(values[k])) if k in values else v))
    return nnx.from_flat_state(out)


def to_torch(
    variables: Any,
    flax_module: Any,
    torch_module: Any,
    x: Any,
    *,
    name_map: Mapping[str, str] | None = None,
    **call_kwargs: Any,
) -> Any:
    """Writes `variables` into `torch_module`'s parameters and buffers, in place:
    the inverse of :func:`from_torch` (same pairing, same arguments), bit for bit
    (`num_batches_tracked` from `batches` where the flax layer stores it).

    Args:
      variables: linen variables, or for an NNX model its `nnx.State` (or `None`:
        the model's current state).
      flax_module: as :func:`from_torch`.
      torch_module: as :func:`from_torch`.
      x: as :func:`from_torch`.
      name_map: as :func:`from_torch`.
      call_kwargs: as :func:`from_torch`.

    Returns:
      `torch_module`.
    """
    torch = _torch()
    torch_layers = _torch_layers(torch_module, x)
    flax_layers, _ = _layers(flax_module, x, call_kwargs)
    if isinstance(flax_module, nn.Module):
        flat = traverse_util.flatten_dict(unfreeze(dict(variables)))
    else:
        state = nnx.state(flax_module) if variables is None else variables
        flat = {k: v.get_value() for k, v in nnx.to_flat_state(state)}
    with torch.no_grad():
        for t, f in _pairs(torch_layers, flax_layers, name_map):
            for tname, tensor in t.slots.items():
                fname = _flax_name(t.kind, tname)
                if fname not in f.slots:
                    continue  # num_batches_tracked of a layer that keeps no counter
                a = np.asarray(flat[f.slots[fname]])
                if fname == "kernel":
                    a = a.transpose((a.ndim - 1, a.ndim - 2) + tuple(range(a.ndim - 2)))
                elif fname == "batches":
                    a = np.asarray(a.reshape(-1)[0] if a.size else 0)
                _check_shape(t, f, tname, fname, tensor.shape, a.shape)
                tensor.copy_(torch.from_numpy(np.array(a, order="C", copy=True)).to(tensor.dtype))
    return torch_module
