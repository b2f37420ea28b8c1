"""Algorithm 2, line 11: batch norm at inference is one affine map; fold it away.

At inference a batch-norm layer computes `y = a * x + b` per feature with
`a = gamma / sqrt(var + eps)` and `b = beta - mean * a`
(:func:`bnjax.functional.inference_affine`). When `x = u @ W + c` comes
straight from a Dense or Conv layer, the map can be folded into that layer:
`W' = W * a` (on the output-feature axis) and `c' = a * c + b`. The result
is a network without batch norm whose outputs equal the eval-mode network.

The kernel layouts handled are flax's: Dense `(in, out)` and Conv
`(*window, in // groups, out)` (any spatial rank, any `feature_group_count`
including depthwise). In all of them the output feature is the *last* axis and
batch norm scales output features, so `kernel[..., o] *= a[o]` is the whole
fold whatever the group count. The fold is computed in at least float32 and cast
back to the kernel's dtype (or `dtype=`).

Three levels:

```python
a, b = affine(bn_params, bn_stats, epsilon)                 # per-feature map
kernel, bias = fold_linear(kernel, bias, a, b)               # one layer
new_variables = fold(variables, [("Dense_0", "BatchNorm_0")])  # a Flax tree
seq2, vars2 = fold_sequential(seq, variables)                # an nn.Sequential
pairs = find_pairs(model, variables, x, train=False)         # detect the pairs
```

The folded variables drop the batch-norm entries and give every folded layer a
`bias`; they belong to the same model *without* those batch-norm layers and
with `use_bias=True` on the folded Dense/Conv layers (flax's automatic names
`Dense_0`, `Conv_1`... do not change when the `BatchNorm_k` layers are
removed, since each type is counted separately).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from bnjax import functional as F
from bnjax import whitening as W
from bnjax._module_common import batch_stats
from bnjax.activations import Activation
from bnjax.linen import BatchNorm as LinenBatchNorm

__all__ = [
    "FoldPair",
    "affine",
    "fold_linear",
    "fold",
    "fold_sequential",
    "find_pairs",
    "fold_whitening",
    "whitening_affine",
]

Array = jax.Array
Path = str | Sequence[str]


class FoldPair(NamedTuple):
    """A Dense/Conv layer followed directly by a batch-norm layer.

    Attributes:
      linear: path of the Dense/Conv layer in the params tree (`"block/Conv_0"`
        or `("block", "Conv_0")`).
      bn: path of the batch-norm layer.
      epsilon: the batch-norm layer's epsilon.
      activation: the activation fused into the batch-norm layer
        (`bnjax.linen.BatchNormAct`; :mod:`bnjax.activations`), or `None`. It is
        not folded: the model without the batch-norm layer applies it right after
        the folded Dense/Conv (:func:`fold_sequential` inserts it).
      scale_epsilon: with an activation, the fused layer's `scale_epsilon` (its
        effective scale, :func:`bnjax.functional.effective_params`, is folded).
    """

    linear: Path
    bn: Path
    epsilon: float = 1e-5
    activation: Activation | None = None
    scale_epsilon: float = 1e-5


def _path(p: Path) -> tuple[str, ...]:
    return tuple(p.split("/")) if isinstance(p, str) else tuple(p)


def _get(tree: Mapping, path: tuple[str, ...], what: str) -> Mapping:
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(
                f"{what} {'/'.join(path)!r}: no entry {k!r} under "
                f"{'/'.join(path[:i]) or '<root>'!r} (have {have})"
            )
        node = node[k]
    return node


def affine(
    bn_params: F.BNParams | Mapping[str, Array],
    bn_stats: F.BatchStats | Mapping[str, Array],
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """The per-feature inference map `y = a * x + b` of one batch-norm layer.

    Args:
      bn_params: :class:`~bnjax.BNParams` or a Flax params subtree with optional
        `scale` / `bias` of shape `(C,)`.
      bn_stats: :class:`~bnjax.BatchStats` or a `batch_stats` subtree with
        `mean` and `var` of shape `(C,)`.
      epsilon: the layer's epsilon.

    Returns:
      `(a, b)`, each `(C,)`, in at least float32.

    Examples:
      >>> a, b = affine({"scale": jnp.ones(3)}, {"mean": jnp.zeros(3), "var": jnp.ones(3)})
      >>> a.shape
      (3,)
    """
    if not isinstance(bn_params, F.BNParams):
        bn_params = F.BNParams(bn_params.get("scale"), bn_params.get("bias"))
    if not isinstance(bn_stats, F.BatchStats):  # inference_affine casts to >= float32
        bn_stats = batch_stats({k: jnp.asarray(bn_stats[k]) for k in ("mean", "var")})
    for name, arr in (("scale", bn_params.scale), ("bias", bn_params.bias)):
        if arr is not None and arr.shape != bn_stats.mean.shape:
            raise ValueError(
                f"batch-norm {name} has shape {tuple(arr.shape)} but its mean has shape "
                f"{tuple(bn_stats.mean.shape)}"
            )
    return F.inference_affine(bn_params, bn_stats, epsilon)


def fold_linear(
    kernel: Array,
    bias: Array | None,
    a: Array,
    b: Array,
    *,
    dtype: Any = None,
) -> tuple[Array, Array]:
    """Folds `y = a * (x @ kernel + bias) + b` into a new `(kernel, bias)`.

    Args:
      kernel: Dense `(in, C)` or Conv `(*window, in // groups, C)` kernel
        (output features last, flax's layout; grouped/depthwise included).
      bias: the layer's bias `(C,)`, or `None` for `use_bias=False`.
      a: the batch-norm map from :func:`affine`, `(C,)`.
      b: the batch-norm map from :func:`affine`, `(C,)`.
      dtype: dtype of the result (default: the kernel's). The fold itself is
        computed in at least float32.

    Returns:
      `(kernel * a, a * bias + b)`; the bias is always present. A batch norm
      trained on complex inputs has a complex `b`: the new bias is then complex
      (complex64 at least) even for a real kernel, whose new kernel stays real.

    Raises:
      ValueError: if the kernel's output features, the bias and `a`/`b`
        do not all have `C` entries.
    """
    kernel = jnp.asarray(kernel)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 1 or b.shape != a.shape:
        raise ValueError(
            f"the batch-norm map must be per feature, got a of shape {tuple(a.shape)} and "
            f"b of shape {tuple(b.shape)}"
        )
    if kernel.ndim < 2 or kernel.shape[-1] != a.shape[0]:
        raise ValueError(
            f"cannot fold a batch norm over {a.shape[0]} features into a kernel of shape "
            f"{tuple(kernel.shape)}: its output features (last axis) must number {a.shape[0]}"
        )
    if bias is not None and tuple(jnp.shape(bias)) != a.shape:
        raise ValueError(
            f"bias of shape {tuple(jnp.shape(bias))} does not match the {a.shape[0]} "
            "batch-norm features"
        )
    out_dt = kernel.dtype if dtype is None else jnp.dtype(dtype)
    ct = jnp.promote_types(jnp.promote_types(kernel.dtype, a.dtype), jnp.float32)
    new_kernel = kernel.astype(ct) * a.astype(ct)
    bias_dt = out_dt
    if jnp.iscomplexobj(b) or (bias is not None and jnp.iscomplexobj(bias)):
        # Complex inputs: the batch-norm mean, so b, is complex; a real kernel stays
        # real (a is real), its new bias is complex.
        ct = jnp.promote_types(ct, b.dtype if bias is None else jnp.result_type(b, bias))
        if not jnp.issubdtype(out_dt, jnp.complexfloating):
            if dtype is not None:
                raise ValueError(
                    f"dtype={jnp.dtype(dtype)} is real but the folded bias is complex "
                    f"({ct}): the batch norm was trained on complex inputs"
                )
            bias_dt = ct
    new_bias = b.astype(ct)
    if bias is not None:
        new_bias = new_bias + a.astype(ct) * jnp.asarray(bias).astype(ct)
    return new_kernel.astype(out_dt), new_bias.astype(bias_dt)


def _as_pair(p: FoldPair | tuple, epsilon: float | Mapping[str, float]) -> FoldPair:
    if isinstance(p, FoldPair):
        return p
    linear, bn = p
    eps = epsilon.get("/".join(_path(bn)), 1e-5) if isinstance(epsilon, Mapping) else epsilon
    return FoldPair(linear, bn, float(eps))


def fold(
    variables: Mapping[str, Any],
    pairs: Iterable[FoldPair | tuple[Path, Path]],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
    dtype: Any = None,
) -> dict[str, Any]:
    """Folds each `(linear, bn)` pair of a Flax variables tree; drops the BN entries.

    Args:
      variables: `{"params": ..., "batch_stats": ...}` of the model with batch norm.
      pairs: :class:`FoldPair` s (e.g. from :func:`find_pairs`), or `(linear, bn)`
        path tuples; a path is `"a/b/Dense_0"` or a tuple of names.
      epsilon: batch-norm epsilon for plain tuples (a float, or a mapping
        `"path/of/bn" -> eps`); :class:`FoldPair` s carry their own.
      dtype: dtype of the folded kernels and biases (default: each kernel's).

    Returns:
      New variables for the model without those batch-norm layers, where each
      folded layer has `use_bias=True`: its `kernel` and `bias` replaced and
      the batch-norm `params` and `batch_stats` removed (empty parents too).
      Other collections and layers are passed through unchanged.

    Raises:
      KeyError: naming the path, if a layer is missing.
      ValueError: if a pair's feature counts do not match, or a layer appears twice.
    """
    params = traverse_util.flatten_dict(unfreeze(variables["params"]))
    stats = traverse_util.flatten_dict(unfreeze(variables.get("batch_stats", {})))
    seen: set[tuple[str, ...]] = set()
    for p in pairs:
        p = _as_pair(p, epsilon)
        lin, bn = _path(p.linear), _path(p.bn)
        for q in (lin, bn):
            if q in seen:
                raise ValueError(f"layer {'/'.join(q)!r} appears in more than one pair")
            seen.add(q)
        lp = _get(variables["params"], lin, "linear layer")
        if "kernel" not in lp:
            raise KeyError(f"linear layer {'/'.join(lin)!r} has no kernel (has {sorted(lp)})")
        bs = _get(variables.get("batch_stats", {}), bn, "batch-norm statistics of")
        bp = variables["params"]
        try:
            bp = _get(bp, bn, "batch-norm layer")
        except KeyError:
            bp = {}  # use_scale=False and use_bias=False: no params
        if p.activation is not None and bp.get("scale") is not None:
            cfg = F.BatchNormConfig(activation=p.activation, scale_epsilon=p.scale_epsilon)
            scale = F.effective_params(F.BNParams(jnp.asarray(bp["scale"]), None), cfg).scale
            bp = dict(bp, scale=scale)
        a, b = affine(bp, bs, p.epsilon)
        try:
            k, c = fold_linear(lp["kernel"], lp.get("bias"), a, b, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"folding {'/'.join(bn)!r} into {'/'.join(lin)!r}: {e}") from None
        params[lin + ("kernel",)] = k
        params[lin + ("bias",)] = c
        for tree in (params, stats):
            for key in [key for key in tree if key[: len(bn)] == bn]:
                del tree[key]
    out = {k: unfreeze(v) for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = traverse_util.unflatten_dict(params)
    if stats:
        out["batch_stats"] = traverse_util.unflatten_dict(stats)
    return out


_LINEAR = (nn.Dense, nn.Conv)


def _is_bn(mod: Any) -> bool:
    """`flax.linen.BatchNorm` or `bnjax.linen.BatchNorm`."""
    return isinstance(mod, (nn.BatchNorm, LinenBatchNorm))


def _pair(linear: Path, bn: Path, mod: nn.Module) -> FoldPair:
    """The :class:`FoldPair` of a linear layer and the batch-norm module `mod`."""
    act = getattr(mod, "activation", None)
    if act is None:
        return FoldPair(linear, bn, float(mod.epsilon))
    cfg = mod.config()
    return FoldPair(linear, bn, float(mod.epsilon), cfg.activation, float(cfg.scale_epsilon))


def _last_axis_only(bn: nn.Module) -> bool:
    axis = bn.axis
    return axis == -1 or (not isinstance(axis, int) and tuple(axis) == (-1,))


def fold_sequential(
    model: nn.Sequential, variables: Mapping[str, Any], *, dtype: Any = None
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Folds every Dense/Conv -> BatchNorm pair of an `nn.Sequential`.

    A pair is a `flax.linen.Dense` or `flax.linen.Conv` immediately followed
    by a `bnjax.linen.BatchNorm` or `flax.linen.BatchNorm` with `axis=-1`.
    Returns a new `nn.Sequential` without those batch-norm layers (the folded
    layers cloned with `use_bias=True`) and its variables (`layers_i` renumbered).

    Examples:
      >>> seq = nn.Sequential([nn.Dense(4), bnjax.linen.BatchNorm(use_running_average=True)])
      >>> folded, folded_vars = fold_sequential(seq, variables)  # doctest: +SKIP
    """
    layers = list(model.layers)
    new_layers, pairs, renames = [], [], {}
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, _LINEAR) and _is_bn(nxt) and _last_axis_only(nxt):
            pair = _pair(f"layers_{i}", f"layers_{i + 1}", nxt)
            pairs.append(pair)
            renames[f"layers_{i}"] = f"layers_{len(new_layers)}"
            new_layers.append(layer.clone(use_bias=True))
            if pair.activation is not None:  # BatchNormAct: its activation stays
                new_layers.append(pair.activation)
            i += 2
            continue
        renames[f"layers_{i}"] = f"layers_{len(new_layers)}"
        new_layers.append(layer.clone() if isinstance(layer, nn.Module) else layer)
        i += 1
    folded = fold(variables, pairs, dtype=dtype)
    out = {
        col: {renames.get(k, k): v for k, v in tree.items()} for col, tree in folded.items()
    }
    return nn.Sequential(new_layers), out


def find_pairs(
    model: nn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any
) -> list[FoldPair]:
    """Detects the foldable Dense/Conv -> BatchNorm pairs by tracing one call.

    Runs `model.apply(variables, *args, **kwargs)` abstractly (`jax.eval_shape`,
    no FLOPs) and records every `flax.linen.Dense`/`Conv` whose output array
    is passed *unchanged* as the input of a `bnjax.linen.BatchNorm` or
    `flax.linen.BatchNorm` with `axis=-1`. Pass the arguments of an eval-mode
    call (e.g. `train=False`).

    Limits (declare those pairs yourself and call :func:`fold`):

    * it cannot see whether the pre-normalization activation is *also* used
      elsewhere (a skip connection, an auxiliary output, a `sow`); folding
      such a pair changes the other use, so check your model;
    * anything between the two layers, even a reshape or a cast, hides the pair;
    * only `nn.Dense` and `nn.Conv` (and subclasses) are recognized, not
      `DenseGeneral`, `Einsum`, `ConvTranspose`, `ConvLocal` or custom layers;
    * a layer called more than once (weight sharing) is never folded;
    * only batch norms over the last axis (NHWC / `(N, C)`) are folded.
    """
    outputs: dict[int, tuple[Any, tuple[str, ...]]] = {}
    calls: dict[tuple[str, ...], int] = {}
    found: list[FoldPair] = []

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*a, **kw)
        path = tuple(mod.path)
        is_bn = _is_bn(mod)
        if is_bn or isinstance(mod, _LINEAR):
            calls[path] = calls.get(path, 0) + 1
        if is_bn and a and _last_axis_only(mod):
            hit = outputs.get(id(a[0]))
            if hit is not None and hit[0] is a[0]:
                found.append(_pair(hit[1], path, mod))
        y = next_fun(*a, **kw)
        if isinstance(mod, _LINEAR):
            outputs[id(y)] = (y, path)  # keeps y alive, so its id stays unique
        return y

    def run(v):
        with nn.intercept_methods(interceptor):
            return model.apply(v, *args, **kwargs)

    jax.eval_shape(run, variables)
    return [
        p._replace(linear="/".join(p.linear), bn="/".join(p.bn))
        for p in found
        if calls[p.linear] == 1 and calls[p.bn] == 1
    ]


def whitening_affine(
    bw_params: F.BNParams | Mapping[str, Array],
    bw_stats: W.WhiteningStats | Mapping[str, Array],
) -> tuple[Array, Array]:
    """The inference map of one batch-whitening layer: `y_k = A_k x_k + b_k` per group.

    Args:
      bw_params: :class:`~bnjax.BNParams` or a Flax params subtree (`scale`/`bias`, `(d,)`).
      bw_stats: :class:`~bnjax.whitening.WhiteningStats` or a `batch_stats`
        subtree with `mean (d,)` and `whitening (g, G, G)`.

    Returns:
      `A (g, G, G)` and `b (d,)` (:func:`bnjax.whitening.inference_affine`).
    """
    if not isinstance(bw_params, F.BNParams):
        bw_params = F.BNParams(bw_params.get("scale"), bw_params.get("bias"))
    if not isinstance(bw_stats, W.WhiteningStats):
        mean, wm = jnp.asarray(bw_stats["mean"]), jnp.asarray(bw_stats["whitening"])
        zeros = jnp.zeros_like(mean)
        bw_stats = W.WhiteningStats(mean, wm, wm, zeros, zeros)
    return W.inference_affine(bw_params, bw_stats)


def fold_whitening(
    kernel: Array, bias: Array | None, a: Array, b: Array, *, dtype: Any = None
) -> tuple[Array, Array]:
    """Folds a batch-whitening layer's inference map into the preceding Dense/Conv.

    With `x = u @ kernel + bias` and per group `y_k = A_k x_k + b_k`, the
    block-diagonal `A = blockdiag(A_1, ..., A_g)` folds as
    `kernel' = kernel @ A^T` (on the output-feature axis) and
    `bias' = A bias + b`. Dense `(in, d)` and ordinary Conv kernels
    `(*window, in, d)` (`feature_group_count=1`: whitening mixes output
    channels, which a grouped convolution cannot express).

    Args:
      kernel: the linear layer's (`bias` may be `None`).
      bias: the linear layer's (`bias` may be `None`).
      a: from :func:`whitening_affine`, `(g, G, G)` and `(d,)`.
      b: from :func:`whitening_affine`, `(g, G, G)` and `(d,)`.
      dtype: dtype of the result (default: the kernel's); computed in >= float32.

    Raises:
      ValueError: if the shapes do not agree.
    """
    kernel = jnp.asarray(kernel)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or b.shape != (a.shape[0] * a.shape[1],):
        raise ValueError(
            f"the whitening map must be A (g, G, G) and b (g*G,), got A of shape "
            f"{tuple(a.shape)} and b of shape {tuple(b.shape)}"
        )
    g, size, _ = a.shape
    d = g * size
    if kernel.ndim < 2 or kernel.shape[-1] != d:
        raise ValueError(
            f"cannot fold a whitening layer over {d} features into a kernel of shape "
            f"{tuple(kernel.shape)}: its output features (last axis) must number {d}"
        )
    if bias is not None and tuple(jnp.shape(bias)) != (d,):
        raise ValueError(f"bias of shape {tuple(jnp.shape(bias))} does not match the {d} features")
    out_dt = kernel.dtype if dtype is None else jnp.dtype(dtype)
    ct = jnp.promote_types(jnp.promote_types(kernel.dtype, a.dtype), jnp.float32)
    af = a.astype(ct)
    kg = kernel.astype(ct).reshape(kernel.shape[:-1] + (g, size))
    new_kernel = jnp.einsum("...gj,gij->...gi", kg, af).reshape(kernel.shape)
    new_bias = b.astype(ct)
    if bias is not None:
        cb = jnp.asarray(bias).astype(ct).reshape(g, size)
        new_bias = new_bias + jnp.einsum("gij,gj->gi", af, cb).reshape(d)
    return new_kernel.astype(out_dt), new_bias.astype(out_dt)
