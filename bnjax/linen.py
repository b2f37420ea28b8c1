"""`bnjax.linen.BatchNorm`: a drop-in replacement for `flax.linen.BatchNorm`.

Same attributes, defaults and variables (`params/{scale,bias}`,
`batch_stats/{mean,var}`, same shapes and dtypes), so variables made by
`flax.linen.BatchNorm` load unchanged. All numerics live in
:mod:`bnjax.functional`; this module only maps Flax variables to the functional
pytrees and back.

Differences from flax (all improvements, none changes a checkpoint):

* the variance is always exact (`use_fast_variance` is accepted for
  compatibility and ignored: bnjax's two-pass (CPU) or shifted one-pass (GPU/TPU)
  variance does not collapse when `|mean| >> std`; see docs/benchmarks.md for
  what it costs against flax's inexact default);
* the gradient is the paper's fused backward pass (`grad=` to change);
* `__call__(x, train=...)` is an explicit switch besides `use_running_average`;
* `population="average"` keeps the paper's exact population average (adds
  `batch_stats/count` and `batch_stats/batches`);
* `axis_name` pools statistics exactly across devices with unequal counts;
* a training call that reduces over one element per feature raises instead of
  returning zeros;
* with a `mask`, a feature without any valid element in the batch (after pooling
  over `axis_name`; per ghost batch with `virtual_batch_size`) is normalized
  with the running statistics, i.e. the inference map for that feature, and its
  statistics are not updated (flax returns NaN for it and writes NaN into
  `batch_stats`).

Complex inputs follow flax's rule: complex mean, real variance `E|x - mu|^2`,
output in the complex dtype, `batch_stats/mean` complex and `batch_stats/var`
real (float32 for complex64 inputs). flax creates the mean float32 and it turns
complex64 at the first update; bnjax creates it complex at `init` on a complex
input, so its type never changes (variables load either way). A real `dtype`
for a complex input is an error, as is Batch Renorm on complex inputs.

Example:

```python
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(100, use_bias=False)(x)
        x = bnjax.linen.BatchNorm()(x, train=train)
        return nn.sigmoid(x)

variables = MLP().init(key, x, train=False)
y, updates = MLP().apply(variables, x, train=True, mutable=["batch_stats"])
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from bnjax import functional as F
from bnjax import whitening as W
from bnjax._module_common import (
    BATCH_NORM,
    BATCH_RENORM,
    BATCH_WHITENING,
    Layer,
    resolve_use_running_average,
    tracks_running_stats,
)
from bnjax.population import Population, Variance

__all__ = ["BatchNorm", "BatchNormAct", "BatchRenorm", "BatchWhitening"]


Array = jax.Array


def _use_running_average(
    module: nn.Module, use_running_average: bool | None, train: bool | None
) -> bool:
    """The attribute and the call's `use_running_average` merged (flax's rule), or
    bnjax's `train=`; an error naming the class if neither is set. (A function, not a
    method: flax records every method call of a module, e.g. as rows of nn.tabulate.)"""
    use_ra = None
    if module.use_running_average is not None or use_running_average is not None:
        use_ra = nn.merge_param(
            "use_running_average", module.use_running_average, use_running_average
        )
    name = type(module).__name__
    return resolve_use_running_average(
        use_ra,
        train,
        missing=f"{name} needs train=... (or use_running_average=...) as an attribute or "
        "a call argument",
        hint=" (train = not use_running_average)",
    )


class _Layer(nn.Module):
    """The one call path of bnjax's linen layers, driven by the class's `_layer`
    description (:mod:`bnjax._module_common`): resolve the switch, create or read
    `params` and `batch_stats`, run the functional kernel, write the statistics."""

    _layer: ClassVar[Layer]

    # The attributes every layer shares, in flax.linen.BatchNorm's order.
    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    def config(self, *, initializing: bool = False) -> Any:
        """The functional config this module runs (`initializing`: without `axis_name`)."""
        return self._layer.config(self, initializing)

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes `x`.

        Args:
          x: floating input, features on `axis`.
          use_running_average: flax's switch (giving it both here and as an
            attribute is an error, as in flax).
          train: bnjax's explicit switch, `train = not use_running_average`.
            `train=True` needs `mutable=["batch_stats"]` (outside `init`).
          mask: optional boolean array broadcastable to `x`; only `True`
            elements enter the batch statistics. A feature with no `True`
            element is normalized with the running statistics (the inference
            map) and keeps them.

        Returns:
          The normalized `x`, of `x`'s shape.
        """
        layer = self._layer
        if tracks_running_stats(self):
            use_ra = _use_running_average(self, use_running_average, train)
        else:  # PyTorch's track_running_stats=False: batch statistics in either mode
            use_ra = False
        x = jnp.asarray(x)
        layer.check_input(x)
        initializing = self.is_initializing()
        cfg = layer.config(self, initializing)  # (not self.config(): see nnx's _Layer)
        fshape = layer.feature_shape(x, cfg)
        params = F.BNParams(
            scale=self.param("scale", self.scale_init, fshape, self.param_dtype)
            if self.use_scale
            else None,
            bias=self.param("bias", self.bias_init, fshape, self.param_dtype)
            if self.use_bias
            else None,
        )
        fresh = layer.fresh(fshape, cfg, x.dtype)
        names = layer.stat_names(cfg, self)
        if use_ra and not initializing:
            # Inference reads only what it needs: variables from flax.linen.BatchNorm (no
            # count/batches/steps) evaluate unchanged under population="average" or
            # as BatchRenorm.
            names = tuple(
                k for k in names if k in layer.eval_stats or self.has_variable("batch_stats", k)
            )
        variables = {
            k: self.variable("batch_stats", k, lambda k=k: getattr(fresh, k)) for k in names
        }
        state = layer.state({k: v.value for k, v in variables.items()}, fresh)
        kernel = cfg.kernel()
        if use_ra or (initializing and layer.degenerate(x, fshape, cfg)):
            # Inference; or init on a batch whose statistics are undefined (flax
            # returns zeros there; init does not update them anyway).
            return kernel.apply_eval(params, state, x, cfg)
        y, new_state = kernel.apply_train(params, state, x, cfg, mask=mask)
        if not initializing:
            for k, v in variables.items():
                v.value = getattr(new_state, k)
        return y


class BatchNorm(_Layer):
    """Batch normalization (Ioffe & Szegedy 2015) as a `flax.linen` module.

    Attributes:
      use_running_average: if True, use the stored population statistics
        (inference, Algorithm 2); if False, use batch statistics (Algorithm 1)
        and update `batch_stats`. May instead be given to `__call__`.
      axis: the feature axis or axes (default -1).
      momentum: EMA momentum (flax convention), default 0.99.
      epsilon: default 1e-5.
      dtype: output dtype (default: `result_type(x, params)`).
      param_dtype: dtype of scale and bias (default float32).
      use_bias: learn beta / gamma.
      use_scale: learn beta / gamma.
      bias_init: initializers (zeros / ones).
      scale_init: initializers (zeros / ones).
      axis_name: named axis to pool statistics over (exact, see :mod:`bnjax.stats`).
      axis_index_groups: groups within `axis_name`.
      use_fast_variance: accepted for flax compatibility; ignored (always exact).
      force_float32_reductions: accepted for flax compatibility; statistics are
        always at least float32.
      population: `"ema"` (flax's), `"average"` (the paper's Algorithm 2)
        or `"cumulative"` (PyTorch's `momentum=None`; stores `batches`).
      virtual_batch_size: ghost batch norm sub-batch size along axis 0.
      grad: `"vjp"` (paper's backward, default), `"jvp"` or `"autodiff"`.
      running_variance: `"biased"` (flax's, default) or `"unbiased"`
        (PyTorch's `running_var`: the moving average of `m / (m - 1)
        sigma2_B`); see :class:`bnjax.BatchNormConfig`.
      track_running_stats: `False` is PyTorch's option of that name: no
        `batch_stats` at all, batch statistics in training and at inference
        (the `train` switch is then optional and ignored).
      count_batches: also store `batch_stats/batches` (the number of training
        batches, PyTorch's `num_batches_tracked`) under `population="ema"`.

    :func:`bnjax.interop.batch_norm_kwargs` gives the attributes that reproduce a
    `torch.nn.BatchNorm*d` layer exactly (see the porting guide).
    """

    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    population: Population = "ema"
    virtual_batch_size: int | None = None
    grad: F.Grad = "vjp"
    running_variance: Variance = "biased"
    track_running_stats: bool = True
    count_batches: bool = False

    _layer: ClassVar[Layer] = BATCH_NORM


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) as a `flax.linen` module.

    :class:`BatchNorm` (same attributes, call, `train=` / `use_running_average`
    switch, `mask`, `axis_name` pooling, ghost batches, variables) whose
    training output is corrected towards the inference map: per feature, with
    the running `mu`, `sigma = sqrt(var + eps)` before the update,
    `y = gamma (r xhat + d) + beta` with `r = clip(sigma_B / sigma, 1/r_max,
    r_max)` and `d = clip((mu_B - mu) / sigma, -d_max, d_max)` held constant for
    the gradient (numerics: :class:`bnjax.RenormConfig`). Inference is exactly
    batch norm's Algorithm 2 map.

    Attributes:
      r_max: a float `>= 1` or a schedule `f(steps)` (plain callable or optax
        schedule, e.g. from :func:`bnjax.renorm_schedule`), default 3.
      d_max: a float `>= 0` or a schedule, default 5.
      warmup_steps: plain batch norm while `steps < warmup_steps` (default 0).

    And all of :class:`BatchNorm`'s attributes, with the same defaults (the paper
    and CrossQ use a faster moving average than batch norm, e.g.
    `momentum=0.9`; `use_fast_variance`/`force_float32_reductions` are
    accepted and ignored as there).

    Variables: `params/{scale,bias}` and `batch_stats/{mean,var}` exactly as
    :class:`BatchNorm` and `flax.linen.BatchNorm` (plus `count`/`batches`
    with `population="average"`), and `batch_stats/steps`, an int32 scalar
    counting training calls (the name CrossQ-style flax layers use). `steps`
    advances by one per training call (not in `init`, not in eval mode); the
    warm-up and the `r_max`/`d_max` schedules are evaluated at the stored
    value before the increment.

    Loading other checkpoints:

    * variables of `flax.linen.BatchNorm` or :class:`BatchNorm` (no `steps`)
      load unchanged: inference needs only `mean` and `var`; the first
      training call (with `mutable=["batch_stats"]`) creates `steps = 0`, so
      the warm-up and the schedules start from the beginning. To resume at step
      `k` instead, add `batch_stats/.../steps = jnp.int32(k)` yourself;
    * entries that this layer does not use, such as a stored `r_max` or
      `d_max`, are ignored (the bounds always come from the attributes) and
      passed through unchanged in the returned `batch_stats`;
    * a `steps` that is not an integer scalar raises `ValueError`.

    `steps` counts training *calls*, not optimizer updates: under gradient
    accumulation (`optax.MultiSteps(opt, every_k_schedule=k)`) it advances `k`
    times per update, so `warmup_steps` and the `r_max` / `d_max` schedules
    run in micro-steps. To count updates instead, give them in micro-steps
    (`warmup_steps=k * w`) and evaluate the schedules at `steps // k`:

    ```python
    r_fn, d_fn = bnjax.renorm_schedule(start=5_000)              # in updates
    bnjax.linen.BatchRenorm(warmup_steps=k * 5_000,
                            r_max=lambda s: r_fn(s // k), d_max=lambda s: d_fn(s // k))
    ```

    A training batch with a NaN or inf leaves the stored `mean`/`var` of the
    affected features unchanged (their outputs and the loss are NaN, so the bad
    batch is visible); see :class:`bnjax.RenormConfig`.

    Example:

    ```python
    r_max, d_max = bnjax.renorm_schedule(start=5_000)   # the paper's relaxation
    x = nn.Dense(100, use_bias=False)(x)
    x = bnjax.linen.BatchRenorm(momentum=0.9, r_max=r_max, d_max=d_max,
                                warmup_steps=5_000)(x, train=train)

    variables = model.init(key, x, train=False)   # batch_stats: mean, var, steps
    y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    ```
    """

    r_max: float | Callable[[Array], Array] = 3.0
    d_max: float | Callable[[Array], Array] = 5.0
    warmup_steps: int = 0

    _layer: ClassVar[Layer] = BATCH_RENORM


class BatchNormAct(BatchNorm):
    """Batch norm fused with an invertible activation (In-Place Activated BN) in `flax.linen`.

    :class:`BatchNorm` (same attributes, call, switches, `mask`, `axis_name`,
    ghost batches and variables: a batch-norm checkpoint loads) whose output is
    `f(gamma' xhat + beta)` and whose backward pass keeps only that output
    (Rota Bulò et al. 2018): batch norm's input is never saved, so a
    conv -> BN -> activation -> conv chain holds one full-size buffer per layer
    instead of two. Numerics: :mod:`bnjax.activations` and
    :class:`bnjax.BatchNormConfig` (`activation`, `scale_epsilon`).

    Attributes:
      activation: `"leaky_relu"` (default, slope 0.01), `"elu"`, `"identity"`
        or an :class:`~bnjax.activations.Activation` such as
        `bnjax.activations.LeakyReLU(0.1)`; `"relu"` is an error (not invertible).
      scale_epsilon: the scale applied is `gamma' = gamma + scale_epsilon sign(gamma)`
        (never 0: the affine map stays invertible); default 1e-5. A batch-norm
        checkpoint evaluates within `scale_epsilon |xhat|` of `BatchNorm` + `f`.

    And all of :class:`BatchNorm`'s attributes, with the same defaults. The
    memory saving needs `grad="vjp"` (the default); `"jvp"` and
    `"autodiff"` compute the same values with JAX's own residuals.

    Example:

    ```python
    x = nn.Conv(64, (3, 3), use_bias=False)(x)
    x = bnjax.linen.BatchNormAct(activation="leaky_relu")(x, train=train)
    x = nn.Conv(64, (3, 3), use_bias=False)(x)     # no separate activation
    ```
    """

    activation: Any = "leaky_relu"
    scale_epsilon: float = 1e-5


class BatchWhitening(_Layer):
    """Batch whitening (Decorrelated BN / IterNorm) as a `flax.linen` module.

    Groups of `group_size` contiguous features are whitened jointly over the
    batch (and spatial) axes, then scaled and shifted per feature; numerics in
    :mod:`bnjax.whitening`. Variables: `params/{scale,bias}` of shape `(d,)`
    as BatchNorm; `batch_stats/mean (d,)` and `batch_stats/whitening
    (g, G, G)` (the inference map `W_pop` per group), with
    `population="average"` also `cov`, `count`, `batches`.

    Attributes:
      group_size: features per group (must divide the features; `None`: all).
      method: `"zca"` (DBN) or `"iternorm"` (Newton-Schulz).
      iterations: Newton-Schulz steps of `"iternorm"` (default 5).
      use_running_average: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      axis: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      momentum: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      epsilon: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      dtype: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      param_dtype: as
        :class:`BatchNorm` (`axis` is one int here), and so are `use_bias`,
        `use_scale`, `bias_init`, `scale_init`, `axis_name`,
        `axis_index_groups`, `population`.
      allow_singular: train on batches with no more examples than `group_size`.

    Example:

    ```python
    x = nn.Dense(64, use_bias=False)(x)
    x = bnjax.linen.BatchWhitening(group_size=16)(x, train=train)
    ```
    """

    group_size: int | None = None
    method: W.Method = "zca"
    iterations: int = 5
    population: Population = "ema"
    allow_singular: bool = False

    _layer: ClassVar[Layer] = BATCH_WHITENING
