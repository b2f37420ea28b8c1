"""Train/eval consistency: how far are batch statistics from the population statistics?

A batch-norm network is trained with batch statistics (Algorithm 1) and deployed
with population statistics (Algorithm 2). When the two disagree (stale EMA,
small or non-i.i.d. batches, a distribution shift), eval-mode accuracy suffers.
:func:`consistency` (linen) and :func:`consistency_nnx` measure, on given data and
for every batch-norm layer, per batch `B` and feature `c`:

* `mean_shift`: `|mu_B - mean| / sqrt(var + eps)`, the batch mean's distance
  from the population mean in population standard deviations;
* `var_ratio`: `sigma2_B / var` (biased batch variance over the population
  variance; with `"average"` statistics and equal batches its expectation is
  `(m - 1) / m`, not 1);
* `output_gap`: `max |y_train - y_eval|` over the layer's output, batch
  statistics vs population statistics, on the same input.

`upstream="eval"` (default) feeds each layer the input of the inference network
(earlier layers with population statistics); `upstream="train"` that of the
training network (earlier layers with batch statistics).

Example:

```python
report = consistency(model, variables, batches, train=False)
print(format_table(report))
report["Block_0/BatchNorm_0"].mean_shift
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import functional as F
from bnjax._capture import as_args, compiled

__all__ = ["LayerConsistency", "consistency", "consistency_nnx", "format_table"]

Array = jax.Array


class LayerConsistency(NamedTuple):
    """Train/eval gap of one batch-norm layer, over the features and batches seen.

    Attributes:
      mean_shift: mean over features and batches of `|mu_B - mean| / sqrt(var + eps)`.
      mean_shift_max: its maximum.
      var_ratio: mean over features and batches of `sigma2_B / var`.
      var_ratio_min: its extremes.
      var_ratio_max: its extremes.
      output_gap: maximum `|y_train - y_eval|` over all outputs.
      batches: number of calls (batches) measured.
    """

    mean_shift: float
    mean_shift_max: float
    var_ratio: float
    var_ratio_min: float
    var_ratio_max: float
    output_gap: float
    batches: int


def _record_gap(x, mask, cfg, params, state, upstream):
    m = F.batch_moments(x, cfg, mask=mask)
    y_train = F.apply_train(params, state, x, cfg, mask=mask)[0]
    y_eval = F.apply_eval(params, state, x, cfg)
    dt = m.mean.dtype
    var = state.var.astype(dt)
    shift = jnp.abs(m.mean - state.mean.astype(dt)) * jax.lax.rsqrt(var + cfg.epsilon)
    ratio = m.var() / var
    gap = jnp.max(jnp.abs(y_train.astype(dt) - y_eval.astype(dt)))
    rec = jnp.stack(
        [jnp.mean(shift), jnp.max(shift), jnp.mean(ratio), jnp.min(ratio), jnp.max(ratio), gap]
    )
    return (y_train if upstream == "train" else y_eval), rec


def _collect(kind, model, kwargs, carry, batches, upstream: str) -> dict[str, LayerConsistency]:
    if upstream not in ("eval", "train"):
        raise ValueError(f"upstream must be 'eval' or 'train', got {upstream!r}")
    _, step = compiled(kind, model, kwargs, upstream, _record_gap)
    rows: dict[str, list] = {}
    for batch in batches:
        for path, recs in step(carry, as_args(batch)).items():
            rows.setdefault(path, []).extend(recs)
    if not rows:
        raise ValueError("batches is empty (or the model called no batch-norm layer)")
    out = {}
    for path in sorted(rows):
        r = jnp.stack(rows[path])
        out[path] = LayerConsistency(
            mean_shift=float(jnp.mean(r[:, 0])),
            mean_shift_max=float(jnp.max(r[:, 1])),
            var_ratio=float(jnp.mean(r[:, 2])),
            var_ratio_min=float(jnp.min(r[:, 3])),
            var_ratio_max=float(jnp.max(r[:, 4])),
            output_gap=float(jnp.max(r[:, 5])),
            batches=int(r.shape[0]),
        )
    return out


def consistency(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable,
    *,
    upstream: str = "eval",
    **apply_kwargs: Any,
) -> dict[str, LayerConsistency]:
    """Per batch-norm layer of a linen model, the gap between batch and population stats.

    Args:
      model: the `flax.linen` module (unbound); bnjax and flax batch norms are measured.
      variables: its variables.
      batches: iterable of inputs (arrays, or tuples of positional arguments).
      upstream: `"eval"` or `"train"` (see the module docstring).
      **apply_kwargs: passed to `model.apply` (e.g. `train=False`).

    Returns:
      `{layer path: LayerConsistency}`, sorted by path.
    """
    return _collect("linen", model, apply_kwargs, variables, batches, upstream)


def consistency_nnx(
    model: nnx.Module, batches: Iterable, *, upstream: str = "eval", **call_kwargs: Any
) -> dict[str, LayerConsistency]:
    """:func:`consistency` for an NNX model with `bnjax.nnx.BatchNorm` layers (no mutation)."""
    graphdef, state = nnx.split(model)
    return _collect("nnx", graphdef, call_kwargs, state, batches, upstream)


_COLUMNS: tuple[tuple[str, Callable[[LayerConsistency], str]], ...] = (
    ("mean shift", lambda r: f"{r.mean_shift:.3g}"),
    ("max shift", lambda r: f"{r.mean_shift_max:.3g}"),
    ("var ratio", lambda r: f"{r.var_ratio:.3g}"),
    ("var ratio range", lambda r: f"[{r.var_ratio_min:.3g}, {r.var_ratio_max:.3g}]"),
    ("output gap", lambda r: f"{r.output_gap:.3g}"),
    ("batches", lambda r: str(r.batches)),
)


def format_table(report: Mapping[str, LayerConsistency]) -> str:
    """A Markdown table of a :func:`consistency` report, one row per layer.

    Columns: mean shift (mean and max of `|mu_B - mean| / sigma`), var ratio
    (mean and range of `sigma2_B / var`), output gap (max `|y_train - y_eval|`).
    """
    header = ["layer"] + [c[0] for c in _COLUMNS]
    rows = [[path] + [c[1](r) for c in _COLUMNS] for path, r in report.items()]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
