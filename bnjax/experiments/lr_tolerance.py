"""Experiment 2: learning-rate tolerance, a CPU-sized analogue of the paper's Figure 3 table.

The paper (Sec. 4.2) trains Inception with and without batch norm and finds that
BN lets the learning rate grow 5x and 30x (BN-x5, BN-x30) and makes a sigmoid
network trainable (BN-x5-Sigmoid), while Inception without BN diverges at 5x
the rate and does not train with sigmoids. Here the same comparison runs on a
small NHWC convnet (:class:`bnjax.experiments.models.ConvNet`: two 3x3 stride-2 conv layers
and a dense layer, each followed by BN per feature map when enabled, then the
activation) on Fashion-MNIST (or MNIST), SGD with momentum:

| variant | BN | activation | lr |
|---|---|---|---|
| `no_bn` | no | relu | base |
| `no_bn_x5` | no | relu | 5x base |
| `bn` | yes | relu | base |
| `bn_x5` | yes | relu | 5x base |
| `bn_x10` | yes | relu | 10x base (not in the paper) |
| `bn_x30` | yes | relu | 30x base |
| `sigmoid` | no | sigmoid | base |
| `bn_x5_sigmoid` | yes | sigmoid | 5x base |

These run at a constant rate with nothing else changed, isolating BN's own
effect. The paper's accelerated BN networks (BN-x5, BN-x30) also came with the
changes of its Sec. 4.2.1; those that exist in this setting are options of a
variant (:class:`Variant`) and make a second set of named variants, `<name>_421`:

* an Inception-style staircase exponential decay of the rate,
  `lr * lr_decay_rate ** floor(step / lr_decay_steps)` (Inception: 4% every
  8 epochs; `optax.exponential_decay(staircase=True)`), for the base-rate
  networks (as the paper's Inception and BN-Baseline), and the same decay 6x
  faster (every `lr_decay_steps / 6` steps) for the accelerated ones;
* L2 weight decay on the conv and dense kernels, `weight_decay` for the
  base-rate networks and `weight_decay / 5` for the accelerated ones;
* no dropout: :class:`bnjax.experiments.models.ConvNet` has none (nor local response
  normalization, nor photometric distortions: there is no augmentation);
* thorough shuffling: every epoch already visits the training set in a fresh
  permutation per seed (:func:`bnjax.training.epoch_batch_indices`).

Changes that are *not* in the paper are separate, labelled variants
(`*_warmup`: a linear warm-up of the rate; `*_clip`: gradient clipping),
never applied silently. The default `variants` are the eight above (their
results unchanged); `configs/lr_tolerance_sec421.py` runs both sets side by
side and `results.md` then also gets a side-by-side table.

All variants share the initial-weight seeds and the data order per seed
(:func:`bnjax.training.create_train_states`), are trained side by side with
:func:`bnjax.training.fit` (several seeds in parallel by `jax.vmap`) and are
evaluated on the test set every `eval_every` steps in inference mode, with
the population statistics (EMA). The table gives, per variant, the first
evaluated step at which the seed-mean test accuracy reaches the maximum
seed-mean accuracy of the reference (`no_bn`), and its own maximum.

Outputs in the run folder (`--workdir`): `lr_tolerance.png` (test accuracy
and training loss against steps), `results.md` (the table), `metrics.json`
(config, summary, history), `metrics.csv` (one row per variant, step and
seed), `summary.csv` (the table), `config.json` and `checkpoints/`.

Run:

```bash
bnjax-lr-tolerance                                   # the full run, defaults below
bnjax-lr-tolerance --quick --workdir runs/smoke      # a smoke test
bnjax-lr-tolerance --config.learning_rate=0.05 --config.num_seeds=3
python -m bnjax.experiments.lr_tolerance --config configs/lr_tolerance.py
```

Programmatic use: `results = run(get_config(), "runs/lr_tolerance")`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from bnjax.experiments import _common
from bnjax.experiments.models import ConvNet

__all__ = [
    "CONFIG_HELP",
    "VARIANTS",
    "Variant",
    "ORIGINAL",
    "get_config",
    "quick_config",
    "sec421_config",
    "schedule",
    "make_optimizer",
    "make_model",
    "build",
    "summarize",
    "results_markdown",
    "side_by_side_markdown",
    "settings_text",
    "line_style",
    "plot",
    "run",
    "main",
]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One network of the comparison.

    Attributes:
      label: the name in the table and the plot (the paper's names where they exist).
      use_bn: batch norm before every hidden activation.
      act: `"base"` (the config's `activation`) or an activation name.
      lr_mult: the (initial) learning rate is `lr_mult * config.learning_rate`.
      schedule: `"constant"`, `"inception"` (staircase exponential decay by
        `config.lr_decay_rate` every `config.lr_decay_steps` steps) or
        `"inception_6x"` (the same, 6x faster: every `lr_decay_steps / 6` steps).
      weight_decay: L2 weight decay of the kernels, as a multiple of
        `config.weight_decay` (0: none).
      warmup: (not in the paper) a linear warm-up from 0 over `config.warmup_steps`.
      clip: (not in the paper) clip the gradient's global norm at `config.clip_norm`.
    """

    label: str
    use_bn: bool
    act: str
    lr_mult: float
    schedule: str = "constant"
    weight_decay: float = 0.0
    warmup: bool = False
    clip: bool = False

    @property
    def group(self) -> str:
        """`"original"` (constant rate), `"sec421"` or `"beyond"` (beyond the paper)."""
        if self.warmup or self.clip:
            return "beyond"
        if self.schedule != "constant" or self.weight_decay:
            return "sec421"
        return "original"


VARIANTS: dict[str, Variant] = {
    "no_bn": Variant("No BN (base lr)", False, "base", 1.0),
    "no_bn_x5": Variant("No BN, lr x5", False, "base", 5.0),
    "bn": Variant("BN-Baseline", True, "base", 1.0),
    "bn_x5": Variant("BN-x5", True, "base", 5.0),
    "bn_x10": Variant("BN-x10", True, "base", 10.0),
    "bn_x30": Variant("BN-x30", True, "base", 30.0),
    "sigmoid": Variant("Sigmoid, no BN", False, "sigmoid", 1.0),
    "bn_x5_sigmoid": Variant("BN-x5-Sigmoid", True, "sigmoid", 5.0),
    # The paper's Sec. 4.2.1: base-rate nets get the Inception schedule and the base L2 (as the
    # paper's Inception and BN-Baseline), accelerated BN nets the 6x faster decay and L2 / 5.
    "no_bn_421": Variant("No BN (base lr), decay + L2", False, "base", 1.0, "inception", 1.0),
    "no_bn_x5_421": Variant("No BN, lr x5, Sec. 4.2.1", False, "base", 5.0, "inception_6x", 0.2),
    "bn_421": Variant("BN-Baseline, decay + L2", True, "base", 1.0, "inception", 1.0),
    "bn_x5_421": Variant("BN-x5, Sec. 4.2.1", True, "base", 5.0, "inception_6x", 0.2),
    "bn_x10_421": Variant("BN-x10, Sec. 4.2.1", True, "base", 10.0, "inception_6x", 0.2),
    "bn_x30_421": Variant("BN-x30, Sec. 4.2.1", True, "base", 30.0, "inception_6x", 0.2),
    "sigmoid_421": Variant("Sigmoid, no BN, decay + L2", False, "sigmoid", 1.0, "inception", 1.0),
    "bn_x5_sigmoid_421": Variant(
        "BN-x5-Sigmoid, Sec. 4.2.1", True, "sigmoid", 5.0, "inception_6x", 0.2
    ),
    # Beyond the paper (labelled): Sec. 4.2.1 plus a warm-up, or plus gradient clipping.
    "bn_x30_421_warmup": Variant(
        "BN-x30, Sec. 4.2.1 + warm-up (not in the paper)",
        True,
        "base",
        30.0,
        "inception_6x",
        0.2,
        warmup=True,
    ),
    "bn_x30_421_clip": Variant(
        "BN-x30, Sec. 4.2.1 + grad clipping (not in the paper)",
        True,
        "base",
        30.0,
        "inception_6x",
        0.2,
        clip=True,
    ),
}
ORIGINAL = tuple(n for n, v in VARIANTS.items() if v.group == "original")
"""The variants of the first session (the default `variants`)."""
SCHEDULES = ("constant", "inception", "inception_6x")
COLORS = {
    "no_bn": "black",
    "no_bn_x5": "tab:gray",
    "bn": "tab:blue",
    "bn_x5": "tab:orange",
    "bn_x10": "tab:purple",
    "bn_x30": "tab:red",
    "sigmoid": "tab:olive",
    "bn_x5_sigmoid": "tab:green",
    "bn_x30_421_warmup": "tab:brown",
    "bn_x30_421_clip": "tab:pink",
}

CHANCE = 0.2  # final test accuracy below this (10 classes): the net did not train

CONFIG_HELP = {
    "dataset": "'fashion-mnist' or 'mnist'",
    "features": "channels of the conv layers (3x3, BN per feature map)",
    "dense": "width of the hidden dense layer after the convs (0: none)",
    "downsample": "'stride' (3x3 stride-2 convs, fast on CPU) or 'max_pool' (conv + 2x2 pool)",
    "activation": "hidden nonlinearity of the non-sigmoid variants",
    "optimizer": "'momentum' (SGD + heavy ball), 'sgd', 'nesterov' or 'adam'",
    "learning_rate": "the base learning rate (x1); variants use 1x, 5x, 10x or 30x it",
    "momentum": "momentum of the 'momentum'/'nesterov' optimizers",
    "batch_size": "mini-batch size",
    "num_steps": "training steps of every variant",
    "num_seeds": "seeds trained in parallel (vmap); seeds are seed, seed+1, ...",
    "seed": "first seed; a seed fixes the initial weights and the data order of every variant",
    "eval_every": "evaluate on the test set every this many steps",
    "eval_batch_size": "evaluate in chunks of this size (must divide 10,000; 0: all at once)",
    "steps_per_call": "training steps per compiled call, unrolled (default 1: a Python loop of "
    "compiled steps; 0: one rolled lax.scan per chunk, which XLA:CPU runs several times slower "
    "with convolutions; k > 1 unrolls k steps: compile time grows with k, 10 took 30-45 s per "
    "variant for a 15% faster step)",
    "checkpoint_every": "save an orbax checkpoint every this many steps (0: only at the end)",
    "variants": f"comma-separated variants to train, of {', '.join(VARIANTS)}",
    "reference": "the variant whose max accuracy is the 'steps to reach' target",
    "bn_momentum": "EMA momentum of the BN population statistics (flax convention)",
    "bn_epsilon": "BN epsilon",
    "lr_decay_rate": "Sec. 4.2.1 variants: the staircase decay factor (Inception: 0.96)",
    "lr_decay_steps": "Sec. 4.2.1 variants: steps per decay of the base schedule ('inception'); "
    "'inception_6x' decays every lr_decay_steps / 6 steps",
    "weight_decay": "Sec. 4.2.1 variants: base L2 weight decay of the kernels (accelerated "
    "variants use 1/5 of it)",
    "warmup_steps": "'*_warmup' variants (not in the paper): linear warm-up steps",
    "clip_norm": "'*_clip' variants (not in the paper): max global gradient norm",
}


def get_config() -> ml_collections.ConfigDict:
    """The default configuration (about 5 minutes on 2 CPU cores measured with 10 unrolled
    steps per call, 857 s with a rolled loop; see `steps_per_call`: the default is now one
    compiled step per call, which compiles in seconds instead of 30-45 s per variant and
    runs each step about 20% slower than 10 unrolled ones).

    The base learning rate 0.05 (SGD, momentum 0.9, batch 50) is close to the
    largest rate at which the relu network without BN trains: in 1,000-step
    probes (one seed) it trained at 0.05 and 0.1 and ended at chance level
    (dead units, loss log 10) at 0.2 and 0.5. With BN the same network trained
    at 0.25 and 0.5 but not at 1.2, 1.5 or 3.0, so BN-x10 is included next to
    the paper's x5 and x30 to locate the limit (measured numbers of the full
    run: `docs/lr_tolerance/results.md`). BN's EMA momentum is 0.9 so that
    the population statistics used at the first evaluations (every 100 steps)
    are not dominated by their initial values (flax's 0.99 averages over
    ~100 steps).
    """
    c = ml_collections.ConfigDict()
    c.dataset = "fashion-mnist"
    c.features = (8, 16)
    c.dense = 32
    c.downsample = "stride"
    c.activation = "relu"
    c.optimizer = "momentum"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.batch_size = 50
    c.num_steps = 1500
    c.num_seeds = 2
    c.seed = 0
    c.eval_every = 100
    c.eval_batch_size = 0
    c.steps_per_call = 1
    c.checkpoint_every = 0
    c.variants = ",".join(ORIGINAL)
    c.reference = "no_bn"
    c.bn_momentum = 0.9
    c.bn_epsilon = 1e-5
    # Sec. 4.2.1 options (used only by the *_421 variants, see sec421_config).
    c.lr_decay_rate = 0.96
    c.lr_decay_steps = 15.0
    c.weight_decay = 5e-4
    c.warmup_steps = 50
    c.clip_norm = 1.0
    return c


def sec421_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` (default :func:`get_config`) with the reference and accelerated variants in
    both settings, the original and the paper's Sec. 4.2.1 (plus the labelled extras).

    The schedule's time base: at 32 examples a step, Inception's 31.0M steps to its
    maximum (the paper's Figure 3) are about 775 passes over ImageNet's 1.28M images,
    so its decay of 4% every 8 epochs had made about 97 decays (a factor ~0.02) when it
    peaked. The no-BN net here peaks near the end of its 1,500 steps, so the base
    schedule decays by 4% every 15 steps (1,500 / ~97) and the 6x one every 2.5 steps.
    The base L2 is 5e-4, the usual value for small convnets: Inception's own (4e-5)
    would shrink the weights here by under 3% over the run, nothing to measure.
    """
    names = ["no_bn", "no_bn_x5", "bn", "bn_x5", "bn_x10", "bn_x30"]
    names += [f"{n}_421" for n in names] + ["bn_x30_421_warmup", "bn_x30_421_clip"]
    return _common.updated(get_config() if config is None else config, variants=",".join(names))


@_common.quick_time("measured: 29 s wall, 48 CPU-s on 2 cores")
def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` (default :func:`get_config`) shortened to a smoke test of the same pipeline."""
    return _common.updated(
        get_config() if config is None else config, num_steps=200, num_seeds=1, eval_every=100
    )


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
    """The config's variants, validated, in the order given (the reference first if missing)."""
    names = [v.strip() for v in str(config.variants).split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variants {unknown or names}; choose from {list(VARIANTS)}")
    if config.reference not in VARIANTS:
        raise ValueError(f"reference={config.reference!r} is not one of {list(VARIANTS)}")
    if config.reference not in names:
        names.insert(0, config.reference)
    return list(dict.fromkeys(names))


def learning_rate(config: ml_collections.ConfigDict, name: str) -> float:
    """The (initial, peak) learning rate of variant `name`."""
    return VARIANTS[name].lr_mult * config.learning_rate


def schedule(
    config: ml_collections.ConfigDict, name: str, *, lr: float | None = None
) -> float | optax.Schedule:
    """Variant `name`'s learning rate: a float (constant) or an optax schedule of the step.

    `"inception"`: `lr * lr_decay_rate ** floor(step / lr_decay_steps)`;
    `"inception_6x"`: the same with `lr_decay_steps / 6`; with `warmup` the
    rate first grows linearly from 0 to `lr` over `warmup_steps` and the decay
    starts after it (`optax.warmup_exponential_decay_schedule`). `lr`
    overrides the variant's initial rate.
    """
    v = VARIANTS[name]
    lr = learning_rate(config, name) if lr is None else lr
    if v.schedule not in SCHEDULES:
        raise ValueError(
            f"variant {name!r}: schedule must be one of {SCHEDULES}, got {v.schedule!r}"
        )
    if v.schedule == "constant":
        if v.warmup:
            return optax.linear_schedule(0.0, lr, config.warmup_steps)
        return lr
    if not (config.lr_decay_steps > 0 and 0 < config.lr_decay_rate <= 1):
        raise ValueError(
            f"need lr_decay_steps > 0 and 0 < lr_decay_rate <= 1, got "
            f"{config.lr_decay_steps} and {config.lr_decay_rate}"
        )
    period = config.lr_decay_steps / (6.0 if v.schedule == "inception_6x" else 1.0)
    if v.warmup:
        return optax.warmup_exponential_decay_schedule(
            0.0, lr, config.warmup_steps, period, config.lr_decay_rate, staircase=True
        )
    return optax.exponential_decay(lr, period, config.lr_decay_rate, staircase=True)


def _kernels(params):
    """The weight-decay mask: True for conv/dense kernels, False for biases and BN's gamma/beta."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(
    config: ml_collections.ConfigDict,
    name: str,
    *,
    lr: float | None = None,
    momentum: float | None = None,
) -> optax.GradientTransformation:
    """Variant `name`'s optimizer: `config.optimizer` at :func:`schedule`, plus its options.

    L2 weight decay (`weight_decay * config.weight_decay`) is
    `optax.add_decayed_weights` on the kernels, before the optimizer: it adds
    `wd * W` to the gradient, exactly the gradient of a loss term
    `wd / 2 * ||W||^2`, so with SGD (+ momentum) it *is* the paper's L2
    regularization, while the reported training loss stays the cross-entropy
    (comparable across variants) and BN's gamma/beta and the biases are left out
    by a mask. Clipping (`clip`) acts on the raw gradient, first. `lr` and
    `momentum` override the variant's (for the diagnosis).
    """
    v = VARIANTS[name]
    mom = config.momentum if momentum is None else momentum
    tx = _common.make_optimizer(config.optimizer, schedule(config, name, lr=lr), mom)
    parts = []
    if v.clip:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if v.weight_decay:
        parts.append(optax.add_decayed_weights(v.weight_decay * config.weight_decay, _kernels))
    return optax.chain(*parts, tx) if parts else tx


def make_model(config: ml_collections.ConfigDict, name: str) -> ConvNet:
    """Variant `name`'s network."""
    v = VARIANTS[name]
    bn = (("momentum", config.bn_momentum), ("epsilon", config.bn_epsilon))
    return ConvNet(
        features=tuple(config.features),
        dense=config.dense,
        use_bn=v.use_bn,
        act=config.activation if v.act == "base" else v.act,
        bn=bn if v.use_bn else (),
        downsample=config.downsample,
    )


def build(config: ml_collections.ConfigDict) -> dict[str, tuple[ConvNet, Any]]:
    """`{variant: (model, optimizer)}` for the config's variants."""
    return {
        name: (make_model(config, name), make_optimizer(config, name))
        for name in variant_names(config)
    }


# --------------------------------------------------------------------------- summary


def summarize(history: list[dict], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Per variant: max / final accuracy, steps to the reference's max accuracy, divergence.

    The target is the reference's maximum over the evaluations of its
    seed-mean test accuracy; a variant's `steps_to_target` is the first
    evaluation step at which its seed-mean accuracy reaches it (`None`: never),
    `per_seed` the same per seed against the same target. `diverged` counts
    the seeds whose final training loss is not finite, `at_chance` those with
    a finite loss but a final test accuracy below :data:`CHANCE` (a net that
    blew up into dead units: the loss stays at `log(10)`).
    """
    names = [n for n in variant_names(config) if any(r["run"] == n for r in history)]
    ref = config.reference
    target = None
    if ref in names:
        _, acc = _common.series(history, ref, "accuracy")
        target = float(np.nanmax(acc.mean(1)))
    out: dict[str, Any] = {"target": target, "reference": ref, "variants": {}}
    for name in names:
        steps, acc = _common.series(history, name, "accuracy")
        _, loss = _common.series(history, name, "train_loss")
        curve = acc.mean(1)
        final_mean, final_std = _common.mean_std(acc[-1])
        s: dict[str, Any] = {
            "label": VARIANTS[name].label,
            "learning_rate": learning_rate(config, name),
            "use_bn": VARIANTS[name].use_bn,
            "max_accuracy": float(np.nanmax(curve)),
            "max_accuracy_step": int(steps[int(np.nanargmax(curve))]),
            "max_accuracy_per_seed": np.nanmax(acc, 0).tolist(),
            "final_accuracy_mean": final_mean,
            "final_accuracy_std": final_std,
            "final_accuracy": acc[-1].tolist(),
            "final_train_loss": loss[-1].tolist(),
            "diverged": int(np.sum(~np.isfinite(loss[-1]))),
            "at_chance": int(np.sum(np.isfinite(loss[-1]) & (acc[-1] < CHANCE))),
            "seeds": int(acc.shape[1]),
            "steps_to_target": None,
            "steps_to_target_per_seed": None,
        }
        if target is not None:
            s["steps_to_target"] = _common.first_step_reaching(steps, curve, target)
            s["steps_to_target_per_seed"] = [
                _common.first_step_reaching(steps, acc[:, j], target) for j in range(acc.shape[1])
            ]
        out["variants"][name] = s
    ref_steps = out["variants"].get(ref, {}).get("steps_to_target")
    for s in out["variants"].values():
        st = s["steps_to_target"]
        s["speedup"] = None if (st is None or ref_steps is None) else ref_steps / st
    return out


def history_rows(history: list[dict], config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """One flat row per (variant, step, seed) for `metrics.csv`."""
    rows = []
    for r in history:
        for j, acc in enumerate(r["accuracy"]):
            row = {
                "variant": r["run"],
                "learning_rate": learning_rate(config, r["run"]),
                "step": r["step"],
                "seed": config.seed + j,
                "test_accuracy": acc,
                "test_loss": r["loss"][j],
                "train_loss": r["train_loss"][j],
                "train_accuracy": r["train_accuracy"][j],
            }
            rows.append(row)
    return rows


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The table as CSV rows (`summary.csv`)."""
    return [
        {
            "variant": name,
            "label": s["label"],
            "learning_rate": s["learning_rate"],
            "steps_to_target": s["steps_to_target"],
            "target_accuracy": summary["target"],
            "max_accuracy": s["max_accuracy"],
            "final_accuracy_mean": s["final_accuracy_mean"],
            "final_accuracy_std": s["final_accuracy_std"],
            "diverged_seeds": s["diverged"],
            "at_chance_seeds": s["at_chance"],
            "seeds": s["seeds"],
        }
        for name, s in summary["variants"].items()
    ]


# --------------------------------------------------------------------------- outputs


def _setting(config: ml_collections.ConfigDict) -> str:
    convs = "-".join(map(str, config.features))
    dense = f", dense {config.dense}" if config.dense else ""
    opt = config.optimizer + (
        f" {config.momentum:g}" if config.optimizer in ("momentum", "nesterov") else ""
    )
    return (
        f"{config.dataset}, convnet {convs} (3x3, {config.downsample}){dense}, {opt}, "
        f"base lr {config.learning_rate:g}, batch {config.batch_size}, "
        f"{config.num_steps:,} steps, {config.num_seeds} seed(s)"
    )


def line_style(name: str) -> tuple[str | None, str]:
    """`(color, linestyle)` of variant `name` in the plot: a `*_421` (or beyond-the-paper)
    variant without its own color takes its original's, and the line style tells the settings
    apart: original `"-"` (no BN: `"--"`), Sec. 4.2.1 `":"`, beyond the paper `"-."`."""
    v = VARIANTS[name]
    base = name.split("_421")[0]
    color = COLORS.get(name, COLORS.get(base))
    ls = {"original": "-" if v.use_bn else "--", "sec421": ":", "beyond": "-."}[v.group]
    return color, ls


def plot(history: list[dict], summary: dict[str, Any], config, path: Path) -> None:
    """Writes `lr_tolerance.png`: (a) test accuracy, (b) training loss, against steps."""
    fig, axes = _common.new_figure(2, figsize=(14, 5))
    names = list(summary["variants"])
    for name in names:
        steps, acc = _common.series(history, name, "accuracy")
        _, loss = _common.series(history, name, "train_loss")
        lr = learning_rate(config, name)
        label = f"{VARIANTS[name].label}, lr {lr:g}"
        if summary["variants"][name]["diverged"]:
            label += ", diverged"
        elif summary["variants"][name]["at_chance"]:
            label += ", at chance"
        c, ls = line_style(name)
        axes[0].plot(steps, acc.mean(1), color=c, ls=ls, lw=1.6, label=label)
        axes[0].fill_between(steps, acc.min(1), acc.max(1), color=c, alpha=0.2, lw=0)
        finite = np.where(np.isfinite(loss), loss, np.nan)
        axes[1].plot(steps, np.nanmean(finite, 1), color=c, ls=ls, lw=1.6, label=label)
    target = summary.get("target")
    if target is not None:
        axes[0].axhline(target, color="k", lw=0.8, ls=":")
        axes[0].annotate(
            f"no-BN max {target:.4f}",
            (0.01, target),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
        )
    best = max((s["max_accuracy"] for s in summary["variants"].values()), default=1.0)
    axes[0].set_ylim(max(0.0, min(best - 0.3, 0.6)), min(1.0, best + 0.03))
    axes[0].set(xlabel="training steps", ylabel="test accuracy (eval mode, population stats)")
    axes[0].set_title("(a) test accuracy; band: min-max over seeds")
    axes[1].set_yscale("log")
    axes[1].set(xlabel="training steps", ylabel="training loss (mean of the chunk)")
    axes[1].set_title("(b) training loss (gaps: non-finite, diverged)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Learning-rate tolerance: {_setting(config)}", fontsize=10)
    _common.save_figure(fig, path, dpi=110)


def _fmt_steps(v) -> str:
    return "-" if v is None else f"{v:,}"


def results_markdown(
    summary: dict[str, Any], config: ml_collections.ConfigDict, seconds: float | None
) -> str:
    """The Figure-3-style table and what it shows, as Markdown."""
    target = summary["target"]
    ref = VARIANTS[summary["reference"]].label
    tgt = "-" if target is None else f"{target:.2%}"
    lines = [
        "# Learning-rate tolerance (the paper's Figure 3 table, CPU-sized)",
        "",
        f"{_setting(config)}. Test accuracy in eval mode (population statistics, EMA momentum "
        f"{config.bn_momentum:g}), evaluated every {config.eval_every} steps; accuracies are "
        "seed means.",
        "",
        "![test accuracy and training loss against steps, per variant](lr_tolerance.png)",
        "",
        f"| model | lr | steps to {tgt} | max accuracy | final accuracy | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary["variants"].values():
        per = s["steps_to_target_per_seed"] or []
        per_txt = f" ({', '.join(_fmt_steps(p) for p in per)})" if len(per) > 1 else ""
        div = _failures(s, short=True)
        speed = "-" if s["speedup"] is None else f"{s['speedup']:.1f}x"
        final = _common.pm(
            s["final_accuracy_mean"], s["final_accuracy_std"], config.num_seeds, ".2%"
        )
        lines.append(
            f"| {s['label']} | {s['learning_rate']:g} | {_fmt_steps(s['steps_to_target'])}"
            f"{per_txt} | {s['max_accuracy']:.2%} | {final}{div} | {speed} |"
        )
    lines += [
        "",
        f"Steps to {tgt}: the first evaluated step at which the seed-mean test accuracy reaches "
        f"the maximum seed-mean accuracy of {ref} (per seed in parentheses, against the same "
        "target); '-' = never within the run. Speed-up: the reference's steps over the "
        "variant's. Max accuracy: the best seed-mean accuracy over the evaluations.",
        "",
        "## What the run shows",
        "",
    ]
    lines += [f"- {t}" for t in observations(summary)]
    lines += side_by_side_markdown(summary, config)
    if seconds is not None:
        lines += [
            "",
            f"Wall time: {seconds:.0f} s (training, evaluation, compilation) on "
            f"{os.cpu_count()} CPU core(s) / {jax.devices()[0].platform}, load average "
            f"{os.getloadavg()[1]:.1f} over the last 5 minutes at the end.",
        ]
    return "\n".join(lines) + "\n"


def settings_text(config: ml_collections.ConfigDict, name: str) -> str:
    """Variant `name`'s training changes in words (`"constant rate"` for the originals)."""
    v = VARIANTS[name]
    parts = []
    if v.schedule == "constant":
        parts.append("constant rate")
    else:
        period = config.lr_decay_steps / (6.0 if v.schedule == "inception_6x" else 1.0)
        fast = " (6x faster)" if v.schedule == "inception_6x" else ""
        parts.append(f"rate x{config.lr_decay_rate:g} every {period:g} steps{fast}")
    if v.weight_decay:
        parts.append(f"L2 {v.weight_decay * config.weight_decay:g}")
    if v.warmup:
        parts.append(f"linear warm-up over {config.warmup_steps} steps (not in the paper)")
    if v.clip:
        parts.append(f"gradient norm clipped at {config.clip_norm:g} (not in the paper)")
    return ", ".join(parts)


def side_by_side_markdown(summary: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Lines of the "original vs Sec. 4.2.1" table (`[]` without any `*_421` variant):
    one row per original variant whose `<name>_421` was also trained, then the variants
    beyond the paper, with their settings."""
    v = summary["variants"]
    pairs = [(n, f"{n}_421") for n in ORIGINAL if n in v and f"{n}_421" in v]
    extra = [n for n in v if VARIANTS[n].group != "original" and n not in dict(pairs).values()]
    if not pairs and not extra:
        return []
    tgt = "-" if summary["target"] is None else f"{summary['target']:.2%}"

    def cells(name):
        s = v[name]
        final = f"{s['final_accuracy_mean']:.2%}{_failures(s, short=True)}"
        return f"{_fmt_steps(s['steps_to_target'])} | {s['max_accuracy']:.2%} | {final}"

    lines = [
        "",
        "## Constant rate vs the paper's Sec. 4.2.1 changes, side by side",
        "",
        f"Same nets, seeds and data order. Steps to {tgt} (the constant-rate no-BN maximum, "
        "the same target for every row); accuracies are seed means.",
        "",
        f"| model | lr | constant: steps to {tgt} | max | final | Sec. 4.2.1 changes "
        f"| 4.2.1: steps to {tgt} | max | final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        lines.append(
            f"| {v[a]['label']} | {v[a]['learning_rate']:g} | {cells(a)} | "
            f"{settings_text(config, b)} | {cells(b)} |"
        )
    if extra:
        lines += [
            "",
            "| other variant | lr | changes | steps to | max | final |",
            "|---|---|---|---|---|---|",
        ]
        for n in extra:
            lines.append(
                f"| {v[n]['label']} | {v[n]['learning_rate']:g} | {settings_text(config, n)} "
                f"| {cells(n)} |"
            )
    return lines


def _failures(s: dict[str, Any], short: bool = False) -> str:
    """`"diverged in 2/2 seeds"` and the like, or `""`."""
    parts = []
    if s["diverged"]:
        parts.append(f"diverged (non-finite loss) in {s['diverged']}/{s['seeds']} seeds")
    if s["at_chance"]:
        parts.append(
            f"ended at chance level (accuracy < {CHANCE:g}) in {s['at_chance']}/{s['seeds']} seeds"
        )
    text = " and ".join(parts)
    return (", " + text if text else "") if short else text


def observations(summary: dict[str, Any]) -> list[str]:
    """Plain statements read off the summary (no claims the numbers do not support)."""
    v = summary["variants"]
    out = []

    def desc(name):
        s = v[name]
        return _failures(s) or f"reached {s['max_accuracy']:.2%} at best"

    if "no_bn" in v and "no_bn_x5" in v:
        a, b = v["no_bn"], v["no_bn_x5"]
        verdict = (
            "it hurt"
            if b["diverged"] or b["at_chance"] or b["max_accuracy"] < a["max_accuracy"] - 0.005
            else "it did not hurt here: the base rate is not at the no-BN net's limit"
        )
        out.append(
            f"Without BN, the base rate {a['learning_rate']:g} reached {a['max_accuracy']:.2%}; "
            f"at 5x ({b['learning_rate']:g}) the net {desc('no_bn_x5')}: {verdict}."
        )
    later = [n for n in v if VARIANTS[n].group != "original"]
    for name in ("bn", "bn_x5", "bn_x10", "bn_x30", *later):
        if name in v:
            s = v[name]
            when = s["steps_to_target"]
            reach = (
                f"reached the no-BN maximum at step {when:,}"
                if when is not None
                else "never reached the no-BN maximum"
            )
            out.append(f"{s['label']} (lr {s['learning_rate']:g}) {reach} and {desc(name)}.")
    if "sigmoid" in v:
        out.append(
            f"The sigmoid net without BN {desc('sigmoid')} (steps to the target: "
            f"{_fmt_steps(v['sigmoid']['steps_to_target'])})."
        )
    if "bn_x5_sigmoid" in v:
        out.append(
            f"With BN at 5x, the sigmoid net {desc('bn_x5_sigmoid')} (steps to the "
            f"target: {_fmt_steps(v['bn_x5_sigmoid']['steps_to_target'])})."
        )
    return out


# --------------------------------------------------------------------------- run


_RESUMABLE = ("num_steps",)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    download: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs Experiment 2 and writes its outputs to `workdir`.

    Args:
      config: from :func:`get_config` (or a config file), possibly overridden.
      workdir: the run folder (created).
      data_dir: the dataset root (else `$BNJAX_DATA_DIR`, then the cache).
      download: download the dataset if missing.
      resume: continue from `workdir/checkpoints` (the config must match, except
        `num_steps`).
      progress: show a progress bar.

    Returns:
      The `metrics.json` content (`config`, `summary`, `history`,
      `seconds`, ...) plus `states` (the final train states, by variant).
    """
    t0 = time.perf_counter()
    workdir = _common.prepare_workdir(
        workdir, config.to_dict(), resume=resume, resumable=_RESUMABLE
    )
    train, test = _common.load_data(config.dataset, data_dir, download=download, flatten=False)
    nets = build(config)
    _, result = _common.train_side_by_side(
        nets,
        config,
        train,
        test,
        workdir,
        resume=resume,
        progress=progress,
        desc=f"lr_tolerance ({len(nets)} nets)",
    )
    summary = summarize(result.history, config)
    metrics = _common.write_metrics(workdir, config, summary, result, t0)
    _common.write_csv(workdir / "metrics.csv", history_rows(result.history, config))
    _common.write_csv(workdir / "summary.csv", summary_rows(summary))
    (workdir / "results.md").write_text(results_markdown(summary, config, metrics["seconds"]))
    plot(result.history, summary, config, workdir / "lr_tolerance.png")
    return dict(metrics, states=result.states)


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-lr-tolerance` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="bnjax-lr-tolerance",
        default_workdir="runs/lr_tolerance",
        exit_on=(DataError, FileExistsError),
    )
    print(results_markdown(out["summary"], cl.config, out["seconds"]))
    print(f"wrote {cl.workdir}/lr_tolerance.png, results.md, metrics.json, metrics.csv")


if __name__ == "__main__":
    main()
