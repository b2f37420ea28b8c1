"""Living with flax's ecosystem: batch-norm layers told apart, variables moved across flavours.

`bnjax.linen.BatchNorm` is not a subclass of `flax.linen.BatchNorm` (nor the
NNX classes of flax's): code that dispatches on flax's class misses bnjax's
layers. :func:`is_batch_norm` is the predicate that covers both libraries (linen
and NNX), and :func:`batch_norm_mask` applies it where it is needed most: an
optax mask over a linen model's parameters, e.g. weight decay without the
batch-norm scales and biases:

```python
norm = bnjax.compat.batch_norm_mask(model, variables, x, train=False)
tx = optax.adamw(1e-3, weight_decay=1e-4, mask=jax.tree.map(lambda b: not b, norm))
```


A checkpoint of a model built with `flax.linen.BatchNorm` (or
`bnjax.linen.BatchNorm`) loads unchanged into the same model built with
`bnjax.linen.BatchNorm` (same names, same variables). Swapping in
`BatchRenorm` or `BatchNormAct` changes two things a checkpoint sees:

* auto-named layers are named after their class (flax's rule), so
  `functools.partial(nn.BatchNorm, ...)` layers `BatchNorm_0, BatchNorm_1, ...`
  become `BatchRenorm_0, ...` (`ScopeParamNotFoundError` at `apply`);
* `BatchRenorm` stores a step counter `batch_stats/.../steps` that a
  batch-norm checkpoint lacks (orbax: `Structure mismatch` when restoring
  into the new model's tree).

:func:`load_into` maps one onto the other. With orbax, restore the checkpoint
with the tree of the model that wrote it, then map it:

```python
restored = checkpointer.restore(path, target=old_model.init(key, x, train=False))
variables = bnjax.compat.load_into(restored, new_model.init(key, x, train=False))
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import unfreeze

from bnjax import linen as bnlinen
from bnjax import nnx as bnnnx

__all__ = ["BATCH_NORM_CLASSES", "batch_norm_mask", "is_batch_norm", "load_into"]

# Auto-name prefixes of layers whose variables are batch norm's (plus, for
# BatchRenorm, the step counter): a layer of one may load from a layer of another.
BATCH_NORM_CLASSES = ("BatchNorm", "BatchRenorm", "BatchNormAct")
_AUTO = re.compile(rf"^({'|'.join(BATCH_NORM_CLASSES)})_(\d+)$")


def _candidates(path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`path` with each auto-named batch-norm component renamed to the other classes."""
    out = [path]
    for i, part in enumerate(path):
        m = _AUTO.match(part)
        if m:
            out = [
                p[:i] + (f"{cls}_{m.group(2)}",) + p[i + 1 :]
                for p in out
                for cls in BATCH_NORM_CLASSES
            ]
    return list(dict.fromkeys(out))


def load_into(source: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """`source`'s values arranged as the tree `like` (e.g. the new model's `init`).

    Every leaf of `like` is taken from `source` at the same path, or at the path
    with auto-named batch-norm layers renamed (`BatchNorm_3` <-> `BatchRenorm_3`
    <-> `BatchNormAct_3`); a `steps` counter that `source` lacks keeps
    `like`'s value (0 for a fresh `BatchRenorm`: its warm-up and schedules
    start from the beginning; set it to resume at step `k`). Entries of
    `source` that `like` has no place for are dropped.

    Args:
      source: the checkpoint's variables (`{"params": ..., "batch_stats": ...}`).
      like: the target model's variables (shapes and dtypes to match; values are
        used only for missing `steps`).

    Returns:
      Variables with `like`'s structure and `source`'s values.

    Raises:
      KeyError: a leaf of `like` found nowhere in `source` (naming its path).
      ValueError: a leaf whose shape differs (naming the path and both shapes).
    """
    src = traverse_util.flatten_dict(unfreeze(dict(source)))
    want = traverse_util.flatten_dict(unfreeze(dict(like)))
    out = {}
    for path, target in want.items():
        hit = next((p for p in _candidates(path) if p in src), None)
        if hit is None:
            if path[-1] == "steps" and path[0] == "batch_stats":
                out[path] = target
                continue
            raise KeyError(
                f"{'/'.join(path)} of the target is not in the source variables (nor under "
                f"another batch-norm class name); source has e.g. "
                f"{sorted('/'.join(p) for p in src)[:6]}"
            )
        value = src[hit]
        if jnp.shape(value) != jnp.shape(target):
            raise ValueError(
                f"{'/'.join(path)}: the source's {'/'.join(hit)} has shape "
                f"{tuple(jnp.shape(value))}, the target wants {tuple(jnp.shape(target))}"
            )
        out[path] = value
    return traverse_util.unflatten_dict(out)


def is_batch_norm(module: Any) -> bool:
    """Whether `module` is a batch-norm layer of flax or bnjax, linen or NNX.

    True for `flax.linen.BatchNorm`, `flax.nnx.BatchNorm` and bnjax's
    `BatchNorm`, `BatchRenorm`, `BatchNormAct` (linen and NNX); False for
    `BatchWhitening` (a different layer) and everything else.
    """
    return isinstance(
        module, (nn.BatchNorm, nnx.BatchNorm, bnlinen.BatchNorm, bnnnx.BatchNorm)
    )


def batch_norm_mask(model: nn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any):
    """A pytree like `variables["params"]`: True for the parameters of batch-norm layers.

    Traces `model.apply(variables, *args, **kwargs)` abstractly (no FLOPs) and
    records the path of every module :func:`is_batch_norm` accepts; a layer's
    `scale` and `bias` are True, every other parameter False. Pass the arguments
    of any valid call (e.g. `x, train=False`).
    """
    paths: set[tuple[str, ...]] = set()

    def interceptor(next_fun, a, kw, context):
        if is_batch_norm(context.module):
            paths.add(tuple(context.module.path))
        return next_fun(*a, **kw)

    def run(v):
        with nn.intercept_methods(interceptor):
            return model.apply(v, *args, **kwargs)

    jax.eval_shape(run, variables)
    flat = traverse_util.flatten_dict(unfreeze(dict(variables["params"])))
    mask = {k: k[:-1] in paths for k in flat}
    return traverse_util.unflatten_dict(mask)
