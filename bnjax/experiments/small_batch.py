"""Experiment 3: batch norm with small and non-i.i.d. mini-batches, and Batch Renorm's fix.

Batch norm normalizes a training example with the statistics of its
mini-batch, an inference example with population statistics. When the
mini-batch statistics are poor estimates of the population's (very small
batches) or systematically different from them (batches of one or two
classes), the network learns under one transform and is evaluated under
another. Ioffe (2017, "Batch Renormalization", arXiv 1702.03275) shows the
failure on ImageNet and fixes it with Batch Renorm
(:class:`bnjax.linen.BatchRenorm`).

Here, on MNIST (or Fashion-MNIST) with the Figure-1 MLP
(:class:`bnjax.experiments.models.MLP`, 784-100-100-100-10, a normalization layer after
every hidden `Dense`), four methods are compared under five batch settings:

| method | network |
|---|---|
| `none` | no normalization (hidden biases instead) |
| `bn` | :class:`bnjax.linen.BatchNorm`, EMA population statistics |
| `bn_precise` | the `bn` network after training, population statistics recomputed by PreciseBN (:func:`bnjax.recalibrate`, `mode="layerwise"`) on i.i.d. training mini-batches |
| `renorm` | :class:`bnjax.linen.BatchRenorm` with the paper's schedule (:func:`bnjax.functional.renorm_schedule`) scaled to the run |

| setting | mini-batches of `batch_size` (32) ... |
|---|---|
| `iid` | (a) shuffled epochs, statistics over the whole batch |
| `micro4` | (b) statistics over micro-batches of 4 (`virtual_batch_size`) |
| `micro2` | (b) statistics over micro-batches of 2 |
| `classes2` | (c) each batch holds 2 classes, 16 examples each |
| `classes1` | (c) each batch holds a single class |

(:func:`bnjax.training.class_grouped_batch_indices` makes the non-i.i.d.
order.) Every trained network is evaluated on the test set twice: in
*eval mode* (population statistics, the usual test accuracy) and in
*train mode* (each test mini-batch normalized by its own statistics,
:func:`bnjax.training.make_eval_step` with `batch_statistics=True`), with
test mini-batches built as the training ones are (the same micro-batching,
the same k-class grouping of the test set). The gap between the two is
batch norm's train/inference mismatch. The no-normalization network does
not depend on the micro-batching, so `none` is trained once for `iid`,
`micro4` and `micro2` (shown in all three rows) and once per class
grouping.

All networks of all settings train side by side in one
:func:`bnjax.training.fit` (seed-vmapped, scan-compiled loops; the same
initial weights and, per setting, the same data order for every method).

Outputs in the run folder (`--workdir`): `small_batch.png` (grouped bars
of eval- and train-mode accuracy per setting and method; eval-mode accuracy
against steps), `results.md` (the table), `summary.json` and
`summary.csv` (per setting and method, per seed), `metrics.json`
(config, summary, history), `config.json` and `checkpoints/`.

Run:

```bash
bnjax-small-batch                                  # the full run (~6 CPU-minutes)
bnjax-small-batch --quick --workdir runs/smoke     # a smoke test (seconds)
bnjax-small-batch --config.methods=bn,renorm --config.settings=iid,classes1
bnjax-small-batch --config.dataset=fashion-mnist --workdir runs/small_batch_fashion
```

Programmatic use: `results = run(get_config(), "runs/small_batch")`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnjax import training
from bnjax.experiments import _common
from bnjax.experiments.models import MLP

__all__ = [
    "CONFIG_HELP",
    "METHODS",
    "SETTINGS",
    "ConfigError",
    "Setting",
    "get_config",
    "quick_config",
    "selected",
    "renorm_bounds",
    "build",
    "test_batches",
    "summarize",
    "results_markdown",
    "plot",
    "run",
    "main",
]


ConfigError = _common.ConfigError

@dataclasses.dataclass(frozen=True)
class Setting:
    """How the mini-batches of one setting are formed.

    Attributes:
      label: the name in the table and the plot.
      virtual_batch_size: statistics over micro-batches of this many examples
        inside each mini-batch (`None`: the whole mini-batch).
      classes_per_batch: every mini-batch holds this many classes (`None`:
        i.i.d. mini-batches from shuffled epochs).
    """

    label: str
    virtual_batch_size: int | None = None
    classes_per_batch: int | None = None

    @property
    def data_order(self) -> str:
        """The key of the data order: settings with the same one share the no-norm net."""
        return "iid" if self.classes_per_batch is None else f"classes{self.classes_per_batch}"


SETTINGS: dict[str, Setting] = {
    "iid": Setting("(a) i.i.d., stats over 32"),
    "micro4": Setting("(b) micro-batches of 4", virtual_batch_size=4),
    "micro2": Setting("(b) micro-batches of 2", virtual_batch_size=2),
    "classes2": Setting("(c) 2 classes per batch", classes_per_batch=2),
    "classes1": Setting("(c) 1 class per batch", classes_per_batch=1),
}
METHODS: dict[str, str] = {
    "none": "no normalization",
    "bn": "BN",
    "bn_precise": "BN + PreciseBN",
    "renorm": "Batch Renorm",
}
COLORS = {"none": "tab:gray", "bn": "tab:red", "bn_precise": "tab:orange", "renorm": "tab:blue"}

CONFIG_HELP = {
    "dataset": "'mnist' or 'fashion-mnist'",
    "hidden": "hidden layer widths (a normalization layer after each hidden Dense)",
    "activation": "hidden nonlinearity",
    "init_std": "std of the Gaussian initial weights N(0, init_std^2) of every Dense kernel",
    "optimizer": "'momentum' (SGD + heavy ball), 'sgd', 'nesterov' or 'adam'",
    "learning_rate": "learning rate (the same for every net)",
    "momentum": "momentum of the 'momentum'/'nesterov' optimizers",
    "batch_size": "mini-batch size (the paper's non-i.i.d. runs: 32)",
    "num_steps": "training steps of every net",
    "num_seeds": "seeds trained in parallel (vmap); seeds are seed, seed+1, ...",
    "seed": "first seed: initial weights and data order (shared by the methods of a setting)",
    "eval_every": "evaluate (eval mode, full test set) every this many steps",
    "eval_batch_size": "eval-mode evaluation in chunks of this size (0: all at once)",
    "checkpoint_every": "save an orbax checkpoint every this many steps (0: only at the end)",
    "settings": f"comma-separated batch settings, of {', '.join(SETTINGS)}",
    "methods": f"comma-separated methods, of {', '.join(METHODS)}",
    "bn_momentum": "EMA momentum of BN's population statistics (flax convention)",
    "bn_epsilon": "epsilon of BN and Batch Renorm",
    "renorm_momentum": "EMA momentum of Batch Renorm's moving statistics (the paper: a "
    "larger update rate than BN's, i.e. a smaller momentum)",
    "renorm_r_max": "final r_max of Batch Renorm (the paper: 3)",
    "renorm_d_max": "final d_max of Batch Renorm (the paper: 5)",
    "renorm_schedule": "(warm-up end, d_max end, r_max end) as fractions of num_steps: plain "
    "BN until the first, then d_max 0 -> d_max and r_max 1 -> r_max linearly (the paper: "
    "5k, 25k, 40k steps)",
    "precise_bn_batches": "i.i.d. training mini-batches (of batch_size) for PreciseBN",
}


def get_config() -> ml_collections.ConfigDict:
    """The default configuration: MNIST, relu MLP, SGD+momentum, batch 32, 6,000 steps, 3 seeds.

    6,000 steps of 32 are 3.2 epochs of MNIST: every method reaches 96-98% in
    the i.i.d. setting, long enough for the moving statistics and the Batch
    Renorm schedule to matter, short enough that the 13 trained networks x 3
    seeds take about 6 CPU-minutes (measured: 365 CPU-seconds; 25 minutes of
    wall time on a 2-core machine shared at load ~19). Relu (not the paper's sigmoid)
    with `N(0, 0.05^2)` weights so that the network without normalization
    trains too. The Batch Renorm schedule keeps the paper's proportions
    (plain BN for 5k steps, `d_max = 5` by 25k, `r_max = 3` by 40k) as
    fractions 0.05 / 0.25 / 0.40 of the run, so the last 60% of training runs
    at the full bounds; its moving-average momentum is 0.9 (update rate 0.1)
    against BN's 0.99 (0.01), the paper's advice to let the moving averages
    follow the changing network more closely since they enter the training
    output.
    """
    c = ml_collections.ConfigDict()
    c.dataset = "mnist"
    c.hidden = (100, 100, 100)
    c.activation = "relu"
    c.init_std = 0.05
    c.optimizer = "momentum"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.batch_size = 32
    c.num_steps = 6000
    c.num_seeds = 3
    c.seed = 0
    c.eval_every = 500
    c.eval_batch_size = 0
    c.checkpoint_every = 0
    c.settings = ",".join(SETTINGS)
    c.methods = ",".join(METHODS)
    c.bn_momentum = 0.99
    c.bn_epsilon = 1e-5
    c.renorm_momentum = 0.9
    c.renorm_r_max = 3.0
    c.renorm_d_max = 5.0
    c.renorm_schedule = (0.05, 0.25, 0.40)
    c.precise_bn_batches = 200
    return c


@_common.quick_time("measured: 27 s wall, 42 CPU-s on 2 cores")
def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` (default :func:`get_config`) shortened to a smoke test of the same pipeline.

    Every setting and method, 100 steps, 2 seeds, one hidden layer of 64 (the
    time is mostly compilation: one train loop and two evaluators per network).
    """
    return _common.updated(
        get_config() if config is None else config,
        hidden=(64,),
        num_steps=100,
        num_seeds=2,
        eval_every=100,
        precise_bn_batches=5,
    )


def _names(value: str, known: dict, field: str) -> list[str]:
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise ConfigError(
            f"config.{field}={value!r}: unknown or empty {unknown or names}; choose from "
            f"{', '.join(known)}"
        )
    return list(dict.fromkeys(names))


def selected(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """The config's `(settings, methods)`, validated, in the order given.

    Raises:
      ConfigError: an unknown name, a micro-batch size or class count that does
        not divide `batch_size`, a bad Batch Renorm schedule, or `renorm`
        asked for where `bnjax.linen.BatchRenorm` is missing.
    """
    settings = _names(config.settings, SETTINGS, "settings")
    methods = _names(config.methods, METHODS, "methods")
    bs = config.batch_size
    for name in settings:
        s = SETTINGS[name]
        for what, v in (("micro-batch", s.virtual_batch_size), ("classes", s.classes_per_batch)):
            if v is not None and (bs % v or bs // v < (2 if what == "micro-batch" else 1)):
                raise ConfigError(
                    f"setting {name!r}: {what} {v} needs batch_size={bs} to be a multiple of it"
                )
    if "renorm" in methods:
        renorm_bounds(config)  # validates the schedule
    return settings, methods


def renorm_bounds(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Batch Renorm's keyword arguments: the paper's schedule scaled to `num_steps`.

    `r_max` 1 -> `renorm_r_max` and `d_max` 0 -> `renorm_d_max`
    (:func:`bnjax.functional.renorm_schedule`), plain BN for the first
    `renorm_schedule[0] * num_steps` steps.
    """
    try:
        from bnjax.functional import renorm_schedule
    except ImportError:
        raise ConfigError(
            "method 'renorm' needs Batch Renorm (bnjax.functional.renorm_schedule), which this "
            "version of bnjax lacks; leave it out of config.methods"
        ) from None
    sched = tuple(float(f) for f in config.renorm_schedule)
    if len(sched) != 3 or not 0 <= sched[0] <= sched[1] <= 1 or not sched[0] <= sched[2] <= 1:
        raise ConfigError(
            f"config.renorm_schedule={config.renorm_schedule!r} must be three fractions "
            "(warm-up end, d_max end, r_max end) with 0 <= warm-up <= the others <= 1"
        )
    start, d_end, r_end = (int(round(f * config.num_steps)) for f in sched)
    try:
        r_fn, d_fn = renorm_schedule(
            start=start,
            r_max=config.renorm_r_max,
            r_max_steps=max(r_end, start + 1),
            d_max=config.renorm_d_max,
            d_max_steps=max(d_end, start + 1),
        )
    except ValueError as e:
        raise ConfigError(f"Batch Renorm schedule: {e}") from None
    return {
        "r_max": r_fn,
        "d_max": d_fn,
        "warmup_steps": start,
        "steps": {"warmup": start, "d_max_end": max(d_end, start + 1), "r_max_end": r_end},
    }


def _norm_kwargs(config, method: str, setting: Setting) -> tuple[Any, tuple]:
    """`(norm class, its keyword arguments)` of `method` in `setting`."""
    vbs = (
        (("virtual_batch_size", setting.virtual_batch_size),) if setting.virtual_batch_size else ()
    )
    if method == "renorm":
        from bnjax.linen import BatchRenorm

        b = renorm_bounds(config)
        kw = (
            ("momentum", config.renorm_momentum),
            ("epsilon", config.bn_epsilon),
            ("r_max", b["r_max"]),
            ("d_max", b["d_max"]),
            ("warmup_steps", b["warmup_steps"]),
        )
        return BatchRenorm, kw + vbs
    return None, (("momentum", config.bn_momentum), ("epsilon", config.bn_epsilon)) + vbs


def _trained(config) -> dict[str, tuple[str, str]]:
    """Run name -> `(setting, method)` of every network to train (`bn_precise` reuses `bn`;
    `none` once per data order, under the first setting with that order)."""
    settings, methods = selected(config)
    out, orders = {}, set()
    for s in settings:
        for m in methods:
            if m == "bn_precise":
                m = "bn"
            if m == "none":
                if SETTINGS[s].data_order in orders:
                    continue
                orders.add(SETTINGS[s].data_order)
            out.setdefault(f"{m}/{s}", (s, m))
    return out


def _source_run(config, setting: str, method: str) -> str:
    """The trained run a table cell `(setting, method)` reads."""
    if method == "bn_precise":
        method = "bn"
    if method == "none":
        order = SETTINGS[setting].data_order
        for run_name, (s, m) in _trained(config).items():
            if m == "none" and SETTINGS[s].data_order == order:
                return run_name
    return f"{method}/{setting}"


def build(
    config: ml_collections.ConfigDict, train_labels: np.ndarray
) -> dict[str, tuple[MLP, Any, Any]]:
    """`{run: (model, optimizer, batch_indices)}` for every network to train.

    `batch_indices` is `None` (i.i.d. shuffled epochs) or a
    :func:`bnjax.training.class_grouped_batch_indices` order over `train_labels`.
    """
    tx = _common.make_optimizer(config.optimizer, config.learning_rate, config.momentum)
    out = {}
    for name, (s, m) in _trained(config).items():
        setting = SETTINGS[s]
        common = dict(hidden=tuple(config.hidden), init_std=config.init_std, act=config.activation)
        if m == "none":
            model = MLP(use_bn=False, **common)
        else:
            norm, kw = _norm_kwargs(config, m, setting)
            model = MLP(use_bn=True, norm=norm, bn=kw, **common)
        order = (
            None
            if setting.classes_per_batch is None
            else training.class_grouped_batch_indices(train_labels, setting.classes_per_batch)
        )
        out[name] = (model, tx, order)
    return out


def test_batches(labels: np.ndarray, setting: Setting, batch_size: int, seed: int) -> np.ndarray:
    """The test set's indices cut into mini-batches as the training set is: `(batches, size)`.

    I.i.d. settings: one random order of the test set (the remainder dropped);
    k-class settings: one epoch of :func:`bnjax.training.class_grouped_batch_indices`
    over the test labels. Micro-batching is the model's (`virtual_batch_size`).
    """
    labels = np.asarray(labels)
    key = jax.random.PRNGKey(seed)
    if setting.classes_per_batch is None:
        n = labels.size // batch_size
        order = np.random.default_rng(seed).permutation(labels.size)[: n * batch_size]
        return order.reshape(n, batch_size)
    f = training.class_grouped_batch_indices(labels, setting.classes_per_batch)
    spe = f.steps_per_epoch(batch_size)
    return np.asarray(f(key, 0, spe, labels.size, batch_size))


# --------------------------------------------------------------------------- evaluation


def _precise_bn(config, model, state, train_x):
    """The seed-stacked `state` with PreciseBN statistics (layerwise, i.i.d. batches)."""
    from bnjax.recalibration import recalibrate

    bs = config.batch_size
    n = min(config.precise_bn_batches, train_x.shape[0] // bs)
    order = np.random.default_rng(config.seed).permutation(train_x.shape[0])[: n * bs]
    batches = [jnp.asarray(train_x[order[i * bs : (i + 1) * bs]]) for i in range(n)]
    per_seed = []
    for k in range(state.step.shape[0]):
        v = jax.tree.map(lambda a, k=k: a[k], state).variables()
        new = recalibrate(model, v, batches, mode="layerwise", variance="within", train=False)
        per_seed.append(new["batch_stats"])
    return state.replace(batch_stats=jax.tree.map(lambda *a: jnp.stack(a), *per_seed))


def _evaluate_all(config, nets, runs, states, train, test, progress) -> dict[str, Any]:
    """Eval- and train-mode test accuracy per (setting, method), per seed.

    Eval mode reuses each run's compiled evaluator from training (full test set).
    """
    settings, methods = selected(config)
    test_x, test_y = (np.asarray(a) for a in test)
    full_x, full_y = jnp.asarray(test_x), jnp.asarray(test_y)
    bs = config.batch_size
    eval_full = {}
    train_mode: dict[str, Any] = {}  # run -> evaluator (one compilation per run and shape)
    cells: dict[str, dict[str, Any]] = {}
    precise: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(settings) * len(methods), desc="evaluate (eval + train mode)")
    for s in settings:
        idx = test_batches(test_y, SETTINGS[s], bs, config.seed).ravel()
        gx, gy = jnp.asarray(test_x[idx]), jnp.asarray(test_y[idx])
        cells[s] = {}
        for m in methods:
            run_name = _source_run(config, s, m)
            model = nets[run_name][0]
            state = states[run_name]
            t0 = time.perf_counter()
            if m == "bn_precise":
                if run_name not in precise:
                    precise[run_name] = _precise_bn(config, model, state, train[0])
                state = precise[run_name]
            key = (run_name, m == "bn_precise")
            if key not in eval_full:
                eval_full[key] = runs[run_name].evaluate(state, full_x, full_y)
            if run_name not in train_mode:
                train_mode[run_name] = training.make_eval_step(
                    model, batch_size=bs, batch_statistics=True
                )
            tm = train_mode[run_name](state, gx, gy)
            em = eval_full[key]
            cells[s][m] = {
                "run": run_name,
                "eval_accuracy": np.asarray(em["accuracy"]).tolist(),
                "eval_loss": np.asarray(em["loss"]).tolist(),
                "train_mode_accuracy": np.asarray(tm["accuracy"]).tolist(),
                "train_mode_loss": np.asarray(tm["loss"]).tolist(),
                "train_mode_examples": int(idx.size),
                "seconds": time.perf_counter() - t0,
            }
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return cells


# --------------------------------------------------------------------------- summary


def summarize(cells: dict[str, Any], history: list[dict], config) -> dict[str, Any]:
    """Per setting and method: eval / train-mode accuracy (mean, std, per seed), their gap,
    the final training loss and accuracy (the chunk mean), and the drop from the i.i.d. row."""
    out: dict[str, Any] = {
        "settings": {},
        "seeds": [config.seed + k for k in range(config.num_seeds)],
    }
    for s, row in cells.items():
        out["settings"][s] = {}
        for m, c in row.items():
            ev_mean, ev_std = _common.mean_std(c["eval_accuracy"])
            tr_mean, tr_std = _common.mean_std(c["train_mode_accuracy"])
            recs = [r for r in history if r["run"] == c["run"]]
            last = recs[-1] if recs else {}
            out["settings"][s][m] = {
                "run": c["run"],
                "eval_accuracy_mean": ev_mean,
                "eval_accuracy_std": ev_std,
                "eval_accuracy": c["eval_accuracy"],
                "train_mode_accuracy_mean": tr_mean,
                "train_mode_accuracy_std": tr_std,
                "train_mode_accuracy": c["train_mode_accuracy"],
                "gap_mean": tr_mean - ev_mean,
                "train_mode_examples": c["train_mode_examples"],
                "final_train_loss_mean": float(np.mean(last["train_loss"])) if last else None,
                "final_train_accuracy_mean": float(np.mean(last["train_accuracy"]))
                if last
                else None,
            }
    iid = out["settings"].get("iid", {})
    for row in out["settings"].values():
        for m, c in row.items():
            ref = iid.get(m)
            c["eval_drop_from_iid"] = (
                None if ref is None else ref["eval_accuracy_mean"] - c["eval_accuracy_mean"]
            )
    return out


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (setting, method, seed)."""
    rows = []
    for s, row in summary["settings"].items():
        for m, c in row.items():
            for j, seed in enumerate(summary["seeds"]):
                rows.append(
                    {
                        "setting": s,
                        "method": m,
                        "seed": seed,
                        "eval_accuracy": c["eval_accuracy"][j],
                        "train_mode_accuracy": c["train_mode_accuracy"][j],
                        "trained_run": c["run"],
                    }
                )
    return rows


# --------------------------------------------------------------------------- outputs


def _setting_text(config) -> str:
    opt = config.optimizer + (
        f" {config.momentum:g}" if config.optimizer in ("momentum", "nesterov") else ""
    )
    return (
        f"{config.dataset}, MLP 784-{'-'.join(map(str, config.hidden))}-10 {config.activation} "
        f"(init N(0, {config.init_std:g}^2)), {opt} lr {config.learning_rate:g}, batch "
        f"{config.batch_size}, {config.num_steps:,} steps, {config.num_seeds} seeds"
    )


def _schedule_text(config) -> str:
    b = renorm_bounds(config)["steps"]
    return (
        f"Batch Renorm: plain BN for steps < {b['warmup']:,}, then d_max 0 -> "
        f"{config.renorm_d_max:g} by step {b['d_max_end']:,} and r_max 1 -> "
        f"{config.renorm_r_max:g} by step {b['r_max_end']:,} (the paper's 5k / 25k / 40k as "
        f"fractions {', '.join(f'{f:g}' for f in config.renorm_schedule)} of the run), "
        f"momentum {config.renorm_momentum:g}"
    )


def results_markdown(
    summary: dict[str, Any], config: ml_collections.ConfigDict, seconds: dict[str, float] | None
) -> str:
    """The table (eval- and train-mode accuracy per setting and method) as Markdown."""
    _, methods = selected(config)
    lines = [
        "# Small and non-i.i.d. mini-batches: BN, PreciseBN and Batch Renorm",
        "",
        f"{_setting_text(config)}. Test accuracy, mean ± sample std over seeds "
        f"{', '.join(map(str, summary['seeds']))}: **eval** = inference mode (population "
        "statistics, full test set); **train** = training mode on test mini-batches built like "
        "the training ones (same micro-batching, same k-class grouping), each normalized by its "
        f"own statistics. BN momentum {config.bn_momentum:g}; PreciseBN: "
        f"{config.precise_bn_batches} i.i.d. training batches, layerwise.",
    ]
    if "renorm" in methods:
        lines += ["", _schedule_text(config) + "."]
    head = "| setting | " + " | ".join(f"{METHODS[m]} eval / train" for m in methods) + " |"
    lines += ["", head, "|---|" + "---|" * len(methods)]
    for s, row in summary["settings"].items():
        cells = [SETTINGS[s].label]
        for m in methods:
            c = row[m]
            cells.append(
                _common.pm(c["eval_accuracy_mean"], c["eval_accuracy_std"], config.num_seeds)
                + " / "
                + _common.pm(
                    c["train_mode_accuracy_mean"], c["train_mode_accuracy_std"], config.num_seeds
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Eval-mode accuracy lost against the i.i.d. row (points; positive = worse):",
        "",
        "| setting | " + " | ".join(METHODS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for s, row in summary["settings"].items():
        drops = [row[m]["eval_drop_from_iid"] for m in methods]
        lines.append(
            f"| {SETTINGS[s].label} | "
            + " | ".join("-" if d is None else f"{100 * d:+.2f}" for d in drops)
            + " |"
        )
    if "none" in methods:
        lines += [
            "",
            "The network without normalization has no batch statistics (its train and eval "
            "modes are the same function); it is trained once per data order, so its (a) and "
            "(b) rows are the same network.",
        ]
    if seconds:
        lines += [
            "",
            f"Wall time: {seconds['total']:.0f} s in all: training {seconds['train']:.0f} s "
            f"({len(_trained(config))} networks x {config.num_seeds} seeds side by side, eval "
            f"every {config.eval_every} steps, compilation included), final evaluation and "
            f"PreciseBN {seconds['evaluate']:.0f} s; {os.cpu_count()} CPU core(s) / "
            f"{jax.devices()[0].platform}, 5-minute load average {os.getloadavg()[1]:.1f} at "
            "the end"
            + (
                f"; the process used {seconds['cpu']:.0f} CPU-seconds (all threads; on an "
                "otherwise idle machine the wall time is about this divided by the cores used)."
                if "cpu" in seconds
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(
    summary: dict[str, Any], history: list[dict], config: ml_collections.ConfigDict, path: Path
) -> None:
    """Writes `small_batch.png`: (a) grouped bars, eval vs train mode; (b) eval accuracy vs
    steps of BN and Batch Renorm per setting."""
    settings, methods = selected(config)
    fig, axes = _common.new_figure(2, figsize=(16, 5.2))
    ax = axes[0]
    width = 0.8 / len(methods)
    lows = []
    for j, m in enumerate(methods):
        xs = np.arange(len(settings)) + (j - (len(methods) - 1) / 2) * width
        ev = [summary["settings"][s][m]["eval_accuracy"] for s in settings]
        tr = [summary["settings"][s][m]["train_mode_accuracy"] for s in settings]
        ev_mean = np.array([np.mean(v) for v in ev])
        tr_mean = np.array([np.mean(v) for v in tr])
        err = np.array([[np.mean(v) - np.min(v), np.max(v) - np.mean(v)] for v in ev]).T
        ax.bar(xs, ev_mean, width * 0.9, color=COLORS[m], label=f"{METHODS[m]} (eval)")
        ax.errorbar(xs, ev_mean, yerr=err, fmt="none", ecolor="k", lw=0.8, capsize=2)
        ax.scatter(
            xs,
            tr_mean,
            marker="D",
            s=22,
            color="white",
            edgecolor="k",
            zorder=3,
            label="train mode (batch statistics)" if j == 0 else None,
        )
        lows += [ev_mean.min(), tr_mean.min()]
    ax.set_xticks(np.arange(len(settings)))
    ax.set_xticklabels([SETTINGS[s].label.replace(" ", "\n", 1) for s in settings], fontsize=8)
    ax.set_ylim(max(0.0, np.floor(min(lows) * 10) / 10 - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(
        "(a) bars: eval mode (population statistics, min-max over seeds);\n"
        "diamonds: train mode (test batches built like the training ones)"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    styles = ["-", "--", ":", "-.", (0, (3, 1, 1, 1, 1, 1))]
    plotted = set()
    last_step, line_lows = 0, []
    for i, s in enumerate(settings):
        for m in ("bn", "renorm", "none"):
            run_name = _source_run(config, s, m)
            if m not in methods or run_name in plotted:
                continue
            plotted.add(run_name)
            steps, acc = _common.series(history, run_name, "accuracy")
            if steps.size:
                last_step = max(last_step, int(steps.max()))
                line_lows.append(float(acc.mean(1).min()))
                label = f"{METHODS[m]}, {SETTINGS[s].label}"
                if m == "none":
                    k = SETTINGS[s].classes_per_batch
                    label = "no norm, " + (f"{k} class(es) per batch" if k else "i.i.d.")
                ax.plot(
                    steps,
                    acc.mean(1),
                    color=COLORS[m],
                    ls=styles[i % len(styles)],
                    lw=1.4,
                    marker="o" if steps.size < 5 else None,  # a quick run: one or two points
                    ms=4,
                    label=label,
                )
    ax.set(xlabel="training steps", ylabel="test accuracy (eval mode, seed mean)")
    ax.set_title("(b) eval-mode test accuracy during training")
    ax.set_xlim(0, max(last_step, 1) * 1.05)
    ax.set_ylim(max(0.0, np.floor(min(lows + line_lows) * 10) / 10 - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"Small / non-i.i.d. mini-batches: {_setting_text(config)}", fontsize=10)
    _common.save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- run


_RESUMABLE = ("num_steps", "precise_bn_batches", "eval_batch_size")


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    download: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the experiment and writes its outputs to `workdir`.

    Args:
      config: from :func:`get_config` (or a config file), possibly overridden.
      workdir: the run folder (created).
      data_dir: the dataset root (else `$BNJAX_DATA_DIR`, then the cache).
      download: download the dataset if missing.
      resume: continue from `workdir/checkpoints` (the config must match,
        except `num_steps` and the evaluation fields).
      progress: show progress bars.

    Returns:
      The `metrics.json` content (`config`, `summary`, `cells`,
      `seconds`, `history`, ...) plus `states` (the final train states,
      by trained run).

    Raises:
      ConfigError: see :func:`selected` (before anything is trained or written).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    selected(config)
    workdir = _common.prepare_workdir(
        workdir, config.to_dict(), resume=resume, resumable=_RESUMABLE
    )
    train, test = _common.load_data(config.dataset, data_dir, download=download)
    nets = build(config, train[1])
    runs, result = _common.train_side_by_side(
        {name: (model, tx) for name, (model, tx, _) in nets.items()},
        config,
        train,
        test,
        workdir,
        batch_indices={name: order for name, (_, _, order) in nets.items()},
        resume=resume,
        progress=progress,
        desc=f"small_batch ({len(nets)} nets x {config.num_seeds} seeds)",
    )
    t1 = time.perf_counter()
    cells = _evaluate_all(config, nets, runs, result.states, train, test, progress)
    seconds = {"train": result.seconds, "evaluate": time.perf_counter() - t1}
    summary = summarize(cells, result.history, config)
    seconds["total"] = time.perf_counter() - t0
    seconds["cpu"] = time.process_time() - cpu0
    metrics = _common.write_metrics(
        workdir, config, summary, result, t0, cells=cells, wall_seconds=seconds
    )
    _common.write_json(workdir / "summary.json", dict(summary, seconds=seconds))
    _common.write_csv(workdir / "summary.csv", summary_rows(summary))
    (workdir / "results.md").write_text(results_markdown(summary, config, seconds))
    plot(summary, result.history, config, workdir / "small_batch.png")
    return dict(metrics, states=result.states)


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-small-batch` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="bnjax-small-batch",
        default_workdir="runs/small_batch",
        exit_on=(DataError, FileExistsError, ConfigError),
    )
    print(results_markdown(out["summary"], cl.config, out["wall_seconds"]))
    print(
        f"wrote {cl.workdir}/small_batch.png, results.md, summary.json, summary.csv, metrics.json"
    )


if __name__ == "__main__":
    main()
