"""Experiment 1: the paper's Figure 1 on MNIST (Sec. 4.1), with and without batch norm.

The paper's network, 784-100-100-100-10 with sigmoid hidden units, trained
with and without batch norm before each hidden sigmoid, mini-batches of 60, for
50,000 steps; several seeds of both nets trained in parallel (`jax.vmap` over
seeds, `lax.scan` over steps; see :mod:`bnjax.training`), evaluated on the
10,000 test images every `eval_every` steps with population statistics.

Outputs in the run folder (`--workdir`):

* `figure1.png`: (a) test accuracy vs steps (seed mean, min-max band);
  (b, c) the 15th/50th/85th percentiles over the test set of the input to one
  fixed sigmoid of the last hidden layer, without and with BN (post-BN, the
  sigmoid's input, as in the paper); (d) the same unit's pre-BN input `W u`;
* `metrics.json` (config, history, summary, population statistics),
  `metrics.csv` (every logged point, one row per net, step and seed),
  `results.md` (the tables), `config.json`, `checkpoints/` (orbax).

Run:

```bash
bnjax-figure1                                   # the full run, defaults below
bnjax-figure1 --quick --workdir runs/smoke      # a smoke test (< 1 minute)
bnjax-figure1 --config configs/figure1_lr05.py  # lr 0.5, init N(0, 0.1^2)
bnjax-figure1 --config.num_seeds=5 --workdir runs/fig1_5seeds
bnjax-figure1 --workdir runs/fig1_5seeds --config.num_seeds=5 --resume  # continue it
```

Programmatic use: `results = run(get_config(), "runs/fig1")`.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnjax.experiments import _common
from bnjax.experiments.models import MLP

__all__ = [
    "CONFIG_HELP",
    "NETS",
    "get_config",
    "quick_config",
    "build",
    "make_probe",
    "summarize",
    "run",
    "write_report",
    "main",
]

NETS = ("no_bn", "bn")
LABELS = {"no_bn": "Without BN", "bn": "With BN"}
COLORS = {"no_bn": "tab:blue", "bn": "tab:red"}

CONFIG_HELP = {
    "dataset": "'mnist' or 'fashion-mnist'",
    "hidden": "hidden layer widths",
    "activation": "hidden nonlinearity (the paper: sigmoid)",
    "init_std": "std of the Gaussian initial weights N(0, init_std^2) of every Dense kernel",
    "optimizer": "'sgd' (plain, the paper's likely setting), 'momentum', 'nesterov', 'adam'",
    "learning_rate": "learning rate (the same for both nets)",
    "momentum": "momentum of the 'momentum'/'nesterov' optimizers",
    "batch_size": "mini-batch size (the paper: 60)",
    "num_steps": "training steps (the paper: 50,000)",
    "num_seeds": "seeds trained in parallel (vmap); seeds are seed, seed+1, ...",
    "seed": "first seed; a seed fixes the initial weights and the data order of both nets",
    "eval_every": "evaluate on the test set every this many steps",
    "eval_batch_size": "evaluate in chunks of this size (0: all 10,000 at once)",
    "checkpoint_every": "save an orbax checkpoint every this many steps (and at the end)",
    "bn_momentum": "EMA momentum of the BN population statistics (flax convention)",
    "bn_epsilon": "BN epsilon",
    "probe_layer": "hidden layer whose sigmoid input is tracked (-1: the last)",
    "probe_unit": "the unit of that layer plotted in (b-d) (the same index for every run)",
    "probe_units": "units 0..probe_units-1 of that layer enter the percentile-drift table",
    "percentiles": "percentiles of the probed sigmoid input over the test set",
    "thresholds": "accuracies for the 'steps to reach' table",
    "population_batches": "mini-batches for the paper's Algorithm 2 population average (0: skip)",
    "precise_bn_batches": "mini-batches for PreciseBN recalibration (0: skip)",
}


def get_config() -> ml_collections.ConfigDict:
    """The default Figure 1 configuration (the paper's setting, read as plain SGD).

    Plain SGD with `learning_rate=1.0` and initial weights `N(0, 1)`: the
    paper gives neither; of the two settings in the project's reference runs
    (PAPER.md), this one matches the paper's figure best (the no-BN net ends
    near 0.96, BN is far ahead early and at 0.97+ at 50k steps, and the no-BN
    sigmoid inputs start wide and drift as in Fig. 1(b)). `N(0, 1)` is
    "small" relative to nothing, so the no-BN net starts with saturated
    sigmoids, the regime the paper's argument is about; BN removes the scale.
    The other setting (`lr 0.5`, `N(0, 0.1^2)`) is `configs/figure1_lr05.py`.
    """
    c = ml_collections.ConfigDict()
    c.dataset = "mnist"
    c.hidden = (100, 100, 100)
    c.activation = "sigmoid"
    c.init_std = 1.0
    c.optimizer = "sgd"
    c.learning_rate = 1.0
    c.momentum = 0.0
    c.batch_size = 60
    c.num_steps = 50_000
    c.num_seeds = 3
    c.seed = 0
    c.eval_every = 500
    c.eval_batch_size = 0
    c.checkpoint_every = 10_000
    c.bn_momentum = 0.99
    c.bn_epsilon = 1e-5
    c.probe_layer = -1
    c.probe_unit = 1
    c.probe_units = 10
    c.percentiles = (15, 50, 85)
    c.thresholds = (0.97, 0.98)
    c.population_batches = 1000
    c.precise_bn_batches = 100
    return c


@_common.quick_time("measured: 13 s wall, 17 CPU-s on 2 cores")
def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` (default :func:`get_config`) shortened to a smoke test of the same pipeline."""
    return _common.updated(
        get_config() if config is None else config,
        num_steps=600,
        num_seeds=2,
        eval_every=100,
        checkpoint_every=300,
        population_batches=50,
        precise_bn_batches=20,
    )


def build(config: ml_collections.ConfigDict) -> tuple[dict[str, MLP], Any]:
    """The two networks (`"no_bn"`, `"bn"`) and the shared optimizer."""
    common = dict(hidden=tuple(config.hidden), init_std=config.init_std, act=config.activation)
    bn = (("momentum", config.bn_momentum), ("epsilon", config.bn_epsilon))
    models = {"no_bn": MLP(use_bn=False, **common), "bn": MLP(use_bn=True, bn=bn, **common)}
    tx = _common.make_optimizer(config.optimizer, config.learning_rate, config.momentum)
    return models, tx


def _probe_layer(config) -> int:
    n = len(config.hidden)
    k = config.probe_layer % n if -n <= config.probe_layer < n else None
    if k is None:
        raise ValueError(
            f"probe_layer={config.probe_layer} out of range for hidden={config.hidden}"
        )
    return k


def _host_percentiles(v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`np.percentile` of the columns of `v (..., n, cols)` -> `(..., len(q), cols)`."""
    return np.moveaxis(np.percentile(v, q, axis=-2), 0, -2).astype(np.float32)


def column_percentiles(v: jax.Array, q: Sequence[float]) -> jax.Array:
    """Percentiles (NumPy's linear method) of each column of `v (n, cols)`: `(len(q), cols)`.

    Same values as `jnp.percentile(v, q, axis=0)`, computed on the host by
    NumPy's selection (`np.partition`) through `jax.pure_callback`: XLA:CPU
    sorts ~10x slower, and sorting was ~10% of the whole Figure 1 job.
    Works under `jit` and `vmap`.
    """
    qs = np.asarray(q, np.float64)
    out = jax.ShapeDtypeStruct(v.shape[:-2] + (len(qs), v.shape[-1]), jnp.float32)
    return jax.pure_callback(
        functools.partial(_host_percentiles, q=qs), out, v, vmap_method="expand_dims"
    )


def make_probe(config: ml_collections.ConfigDict):
    """`probe(intermediates)`: percentiles over the evaluation set of the probed unit's inputs.

    `act_in`: the sigmoid's input (post-BN with BN); `bn_in`: the BN
    input `W u` (BN net only).
    """
    layer, unit, units = _probe_layer(config), config.probe_unit, config.probe_units
    width = config.hidden[layer]
    if not 0 <= unit < width or not 1 <= units <= width:
        raise ValueError(
            f"need 0 <= probe_unit < {width} and 1 <= probe_units <= {width} (the width of "
            f"hidden layer {layer}), got probe_unit={unit}, probe_units={units}"
        )
    q = tuple(float(p) for p in config.percentiles)
    cols = max(units, unit + 1)

    def probe(inter):
        out = {}
        for name in ("act_in", "bn_in"):
            key = f"{name}_{layer}"
            if key in inter:
                v = inter[key][0]  # (examples, width)
                p = column_percentiles(v[:, :cols], q)  # (len(q), cols)
                out[f"{name}_pct"] = p[:, unit]
                out[f"{name}_pct_units"] = p[:, :units].T
        return out

    return probe


# --------------------------------------------------------------------------- population


def _seed(tree, k):
    return jax.tree.map(lambda a: a[k], tree)


def _population_comparison(config, model, state, evaluate, train, test, progress):
    """Test accuracy of the BN net with EMA vs Algorithm 2 average vs PreciseBN statistics.

    `test` may already be on the device (then it is not copied again); the
    mini-batches are one random order of the training set, cut once: every
    method uses the first `n` of them.
    """
    from bnjax.recalibration import recalibrate

    x, _ = train
    bs = config.batch_size
    available = x.shape[0] // bs
    methods = {"ema": None}
    if config.population_batches:
        methods["average"] = dict(
            n=min(config.population_batches, available), mode="train", variance="within"
        )
    if config.precise_bn_batches:
        methods["precise_bn"] = dict(
            n=min(config.precise_bn_batches, available), mode="layerwise", variance="within"
        )
    order = np.random.default_rng(config.seed).permutation(x.shape[0])
    num_batches = max((spec["n"] for spec in methods.values() if spec), default=0)
    data = [jnp.asarray(x[order[i * bs : (i + 1) * bs]]) for i in range(num_batches)]
    out = {}
    num_seeds = state.step.shape[0]
    bar_labels = {"average": "Algorithm 2 average", "precise_bn": "PreciseBN"}
    test_x, test_y = (jnp.asarray(a) for a in test)
    for name, spec in methods.items():
        t0 = time.perf_counter()
        if spec is None:
            st = state
        else:
            per_seed = []
            for k in range(num_seeds):
                v = _seed(state, k).variables()
                new = recalibrate(
                    model,
                    v,
                    data[: spec["n"]],
                    mode=spec["mode"],
                    variance=spec["variance"],
                    train=False,
                    progress=progress and f"{bar_labels[name]}, seed {k + 1}/{num_seeds}",
                )
                per_seed.append(new["batch_stats"])
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_seed)
            st = state.replace(batch_stats=stacked)
        m = evaluate(st, test_x, test_y)
        acc = np.asarray(m["accuracy"]).tolist()
        mean, std = _common.mean_std(acc)
        out[name] = {
            "accuracy": acc,
            "accuracy_mean": mean,
            "accuracy_std": std,
            "loss_mean": float(np.mean(m["loss"])),
            "batches": 0 if spec is None else spec["n"],
            "mode": None if spec is None else spec["mode"],
            "seconds": time.perf_counter() - t0,
        }
    return out


# --------------------------------------------------------------------------- summary


def summarize(history: list[dict], config) -> dict[str, Any]:
    """Per net: final/max accuracy, steps to the thresholds, percentile drift; and BN vs no-BN."""
    out: dict[str, Any] = {}
    for net in NETS:
        steps, acc = _common.series(history, net, "accuracy")
        if steps.size == 0:
            continue
        mean_curve = acc.mean(1)
        final_mean, final_std = _common.mean_std(acc[-1])
        s: dict[str, Any] = {
            "final_step": int(steps[-1]),
            "final_accuracy": acc[-1].tolist(),
            "final_accuracy_mean": final_mean,
            "final_accuracy_std": final_std,
            "max_accuracy_mean": float(acc.max(0).mean()),
            "max_accuracy": acc.max(0).tolist(),
            "accuracy_at": {
                int(k): float(mean_curve[steps == k][0]) for k in (10_000, 50_000) if k in steps
            },
            "steps_to": {},
        }
        for thr in config.thresholds:
            per_seed = [
                _common.first_step_reaching(steps, acc[:, j], thr) for j in range(acc.shape[1])
            ]
            s["steps_to"][f"{thr:g}"] = {
                "mean_curve": _common.first_step_reaching(steps, mean_curve, thr),
                "per_seed": per_seed,
            }
        for key in ("act_in_pct", "bn_in_pct"):
            if not any(key in r for r in history if r["run"] == net):
                continue
            _, p = _common.series(history, net, key + "_units")  # (steps, seeds, units, q)
            p = p.reshape(p.shape[0], -1, p.shape[-1])  # every (seed, unit) a sample
            drift = {}
            spread = p[:, :, -1] - p[:, :, 0]
            named = [(f"p{q:g}", p[:, :, j]) for j, q in enumerate(config.percentiles)]
            for name, v in named + [("spread", spread)]:  # v: (steps, seeds)
                drift[name] = {
                    "range": float((v.max(0) - v.min(0)).mean()),
                    "std": float(v.std(0).mean()),
                    "drift": float(np.abs(v[-1] - v[0]).mean()),
                    # in units of the distribution's width (scale-free, comparable across nets)
                    "range_rel": float(((v.max(0) - v.min(0)) / spread.mean(0)).mean()),
                    # mean change between consecutive evaluations, in units of the width
                    "jitter_rel": float(
                        (np.abs(np.diff(v, axis=0)).mean(0) / spread.mean(0)).mean()
                    )
                    if v.shape[0] > 1
                    else 0.0,
                }
            s[key.replace("_pct", "_drift")] = drift
        out[net] = s
    if all(n in out for n in NETS):
        _, a0 = _common.series(history, "no_bn", "accuracy")
        _, a1 = _common.series(history, "bn", "accuracy")
        ahead = a1.mean(1) > a0.mean(1)
        out["bn_ahead_fraction"] = float(ahead.mean())
        out["bn_ahead_every_step"] = bool(ahead.all())
    return out


def history_rows(history: list[dict], config) -> list[dict[str, Any]]:
    """One flat row per (net, step, seed) for `metrics.csv`."""
    rows = []
    seeds = [config.seed + k for k in range(config.num_seeds)]
    for r in history:
        for j, seed in enumerate(seeds):
            row = {"net": r["run"], "step": r["step"], "seed": seed}
            for key, value in r.items():
                if key in ("run", "step") or key.endswith("_units"):
                    continue
                v = value[j]
                if isinstance(v, list):
                    for q, x in zip(config.percentiles, v, strict=True):
                        row[f"{key.replace('_pct', '')}_p{q:g}"] = x
                else:
                    row[key] = v
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- outputs


def plot(history: list[dict], config, path: Path) -> None:
    """Writes `figure1.png`: (a) accuracy, (b, c) sigmoid-input percentiles, (d) pre-BN."""
    layer, unit = _probe_layer(config), config.probe_unit
    fig, axes = _common.new_figure(4, figsize=(18, 4.2))
    ax = axes[0]
    for net in NETS:
        steps, acc = _common.series(history, net, "accuracy")
        if steps.size:
            ax.plot(steps, acc.mean(1), color=COLORS[net], label=LABELS[net], lw=1.6)
            ax.fill_between(steps, acc.min(1), acc.max(1), color=COLORS[net], alpha=0.25, lw=0)
    ax.set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy")
    curves = [_common.series(history, net, "accuracy")[1].mean(1) for net in NETS]
    early = [c[len(c) // 10 :] for c in curves]
    lowest = min((float(e.min()) for e in early if e.size), default=0.9)
    ax.set_ylim(min(0.9, np.floor(lowest * 20) / 20), 1.0)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    styles = ("--", "-", "--")

    def percentiles(ax, net, key, title):
        # One network (the first seed) as the paper shows; the other seeds thin and faint
        # (a unit index names a different neuron in each seed, so no mean over seeds).
        steps, p = _common.series(history, net, key)
        for j, q in enumerate(config.percentiles):
            ls = styles[j] if len(config.percentiles) == 3 else "-"
            for k in range(1, p.shape[1]):
                ax.plot(steps, p[:, k, j], color=COLORS[net], ls=ls, lw=0.6, alpha=0.3)
            ax.plot(steps, p[:, 0, j], color=COLORS[net], ls=ls, lw=1.6, label=f"{q:g}th")
        ax.set(xlabel="training steps", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)

    unit_txt = f"layer {layer + 1}, unit {unit}"
    percentiles(axes[1], "no_bn", "act_in_pct", f"(b) without BN: sigmoid input\n({unit_txt})")
    percentiles(axes[2], "bn", "act_in_pct", f"(c) with BN: sigmoid input (post-BN)\n({unit_txt})")
    percentiles(axes[3], "bn", "bn_in_pct", f"(d) with BN: pre-BN input Wu\n({unit_txt})")
    lo = min(axes[i].get_ylim()[0] for i in (1, 2))
    hi = max(axes[i].get_ylim()[1] for i in (1, 2))
    for i in (1, 2):
        axes[i].set_ylim(lo, hi)
    axes[1].set_ylabel("percentiles over the test set")
    fig.suptitle(
        f"MNIST 784-{'-'.join(map(str, config.hidden))}-10 {config.activation}, "
        f"{config.optimizer} lr {config.learning_rate:g}, init N(0, {config.init_std:g}^2), "
        f"batch {config.batch_size}. (a): mean and min-max over {config.num_seeds} seeds; "
        f"(b-d): seed {config.seed} (other seeds faint)",
        fontsize=10,
    )
    _common.save_figure(fig, path, dpi=120)


def _fmt_steps(v) -> str:
    return "never" if v is None else f"{v:,}"


def results_markdown(summary, population, config, seconds: float | None) -> str:
    """The results tables as Markdown."""
    n = config.num_seeds
    lines = [
        "# Figure 1 (MNIST): results",
        "",
        f"784-{'-'.join(map(str, config.hidden))}-10 {config.activation}, {config.optimizer} "
        f"lr {config.learning_rate:g}, init N(0, {config.init_std:g}^2), batch "
        f"{config.batch_size}, {config.num_steps:,} steps, {n} seeds "
        f"(mean ± sample std over seeds); test set, population statistics (EMA, momentum "
        f"{config.bn_momentum:g}) for BN.",
        "",
        "![Figure 1: (a) test accuracy against steps; (b, c) percentiles of a sigmoid's input "
        "without and with BN; (d) the pre-BN input](figure1.png)",
        "",
    ]
    lines += _accuracy_table(summary, config)
    lines += _probe_table(summary, config)
    if population:
        lines += _population_table(population, config)
    if seconds is not None:
        lines += ["", f"Wall time: {seconds:.0f} s (training, evaluation, population passes)."]
    return "\n".join(lines) + "\n"




def _accuracy_table(summary, config) -> list[str]:
    """Final / max accuracy and steps to each threshold, per net."""
    lines: list[str] = []
    thr = [f"{t:g}" for t in config.thresholds]
    head = (
        "| net | final accuracy | max accuracy | acc @10k | acc @50k | "
        + " | ".join(f"steps to {t}" for t in thr)
        + " |"
    )
    lines += [head, "|" + "---|" * (5 + len(thr))]
    for net in NETS:
        s = summary.get(net)
        if s is None:
            continue
        at = s["accuracy_at"]
        cells = [
            LABELS[net],
            _common.pm(s["final_accuracy_mean"], s["final_accuracy_std"], config.num_seeds),
            f"{s['max_accuracy_mean']:.4f}",
            f"{at[10000]:.4f}" if 10000 in at else "-",
            f"{at[50000]:.4f}" if 50000 in at else "-",
        ]
        for t in thr:
            st = s["steps_to"][t]
            per = ", ".join(_fmt_steps(v) for v in st["per_seed"])
            cells.append(f"{_fmt_steps(st['mean_curve'])} ({per})")
        lines.append("| " + " | ".join(cells) + " |")
    if "bn_ahead_fraction" in summary:
        lines += [
            "",
            f"BN ahead of no-BN (seed means) at {summary['bn_ahead_fraction']:.0%} of the logged "
            f"steps (every step: {summary['bn_ahead_every_step']}).",
            "Steps to reach: first logged step (every "
            f"{config.eval_every}) where the seed-mean accuracy reaches the threshold; per seed "
            "in parentheses.",
        ]
    return lines


def _probe_table(summary, config) -> list[str]:
    """The drift of the probed sigmoid's input percentiles (Figure 1 b, c)."""
    lines: list[str] = []
    lines += [
        "",
        "## Input of the probed sigmoid (Figure 1 b, c)",
        "",
        f"Percentiles over the test set of the inputs to units 0-{config.probe_units - 1} of "
        f"hidden layer {_probe_layer(config) + 1} (the figure shows unit {config.probe_unit} of "
        f"seed {config.seed}), evaluated every {config.eval_every} steps. Per unit and seed: "
        "range = max - min over training, std = std over training, drift = |last - first|, "
        "range/width = range divided by the mean p85 - p15 width (scale-free), jitter/width = "
        "mean |change| between consecutive evaluations divided by that width; then averaged "
        "over units and seeds. spread = p85 - p15.",
        "",
        "| net | quantity | percentile | range | std | drift | range/width | jitter/width |",
        "|---|---|---|---|---|---|---|---|",
    ]
    what = {"act_in_drift": "sigmoid input", "bn_in_drift": "pre-BN input Wu"}
    for net in NETS:
        s = summary.get(net, {})
        for key, label in what.items():
            for q, d in s.get(key, {}).items():
                lines.append(
                    f"| {LABELS[net]} | {label} | {q} | {d['range']:.3f} | {d['std']:.3f} | "
                    f"{d['drift']:.3f} | {d['range_rel']:.3f} | {d['jitter_rel']:.4f} |"
                )
    return lines


def _population_table(population, config) -> list[str]:
    """Test accuracy of the BN net under each estimate of the population statistics."""
    lines: list[str] = []
    names = {
        "ema": f"EMA during training (momentum {config.bn_momentum:g})",
        "average": "Algorithm 2 average (frozen net, train-mode pass, m/(m-1) E[var_B])",
        "precise_bn": "PreciseBN (bnjax.recalibrate, layerwise)",
    }
    lines += [
        "",
        "## Population statistics of the BN net (final weights)",
        "",
        "| statistics | mini-batches of "
        f"{config.batch_size} | test accuracy | per seed | test loss |",
        "|---|---|---|---|---|",
    ]
    for k, p in population.items():
        per = ", ".join(f"{a:.4f}" for a in p["accuracy"])
        lines.append(
            f"| {names.get(k, k)} | {p['batches'] or '-'} | {p['accuracy_mean']:.4f} ± "
            f"{p['accuracy_std']:.4f} | {per} | {p['loss_mean']:.4f} |"
        )
    return lines


# --------------------------------------------------------------------------- run


_RESUMABLE = ("num_steps", "population_batches", "precise_bn_batches", "thresholds")


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    download: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs Experiment 1 and writes its outputs to `workdir`.

    Args:
      config: from :func:`get_config` (or a config file), possibly overridden.
      workdir: the run folder (created).
      data_dir: the dataset root (else `$BNJAX_DATA_DIR`, then the cache).
      download: download the dataset if missing.
      resume: continue from `workdir/checkpoints` (the config must match,
        except `num_steps` and the post-training fields).
      progress: show a progress bar.

    Returns:
      The `metrics.json` content: `config`, `history`, `summary`,
      `population`, `seconds`, `states` (the final train states, by net;
      not written to JSON).
    """
    t0 = time.perf_counter()
    workdir = _common.prepare_workdir(
        workdir, config.to_dict(), resume=resume, resumable=_RESUMABLE
    )
    train, test = _common.load_data(config.dataset, data_dir, download=download)
    # On the device once: training.fit's evaluations and the population comparison share it.
    test = tuple(jax.device_put(a) for a in test)
    models, tx = build(config)
    runs, result = _common.train_side_by_side(
        {net: (model, tx) for net, model in models.items()},
        config,
        train,
        test,
        workdir,
        probe=make_probe(config),
        resume=resume,
        progress=progress,
        desc="figure1 (no BN + BN)",
    )
    population = _population_comparison(
        config, models["bn"], result.states["bn"], runs["bn"].evaluate, train, test, progress
    )
    summary = summarize(result.history, config)
    metrics = _common.write_metrics(workdir, config, summary, result, t0, population=population)
    _write_outputs(workdir, config, result.history, summary, population, metrics["seconds"])
    return dict(metrics, states=result.states)


def _write_outputs(workdir: Path, config, history, summary, population, seconds) -> None:
    """Writes `metrics.csv`, `results.md` and `figure1.png` (not `metrics.json`).

    `summary` as :func:`summarize` returns it (`accuracy_at` keyed by int steps).
    """
    _common.write_csv(workdir / "metrics.csv", history_rows(history, config))
    md = results_markdown(summary, population, config, seconds)
    (workdir / "results.md").write_text(md)
    plot(history, config, workdir / "figure1.png")


def write_report(workdir: str | Path) -> dict[str, Any]:
    """(Re)writes `metrics.csv`, `results.md` and `figure1.png` from `metrics.json`.

    The summary is recomputed from the history, so a report can be regenerated
    (e.g. after changing the tables) without training again; `metrics.json` is
    rewritten only if its stored summary differs. Returns the summary.
    """
    workdir = Path(workdir)
    metrics = json.loads((workdir / "metrics.json").read_text())
    config = ml_collections.ConfigDict(metrics["config"])
    history = metrics["history"]
    summary = summarize(history, config)
    # Compared as JSON: the stored summary has string keys where `summary` has ints.
    if json.loads(json.dumps(summary)) != metrics["summary"]:
        metrics["summary"] = summary
        _common.write_json(workdir / "metrics.json", metrics)
    _write_outputs(workdir, config, history, summary, metrics["population"], metrics["seconds"])
    return summary


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-figure1` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="bnjax-figure1",
        default_workdir="runs/figure1",
        exit_on=(DataError, FileExistsError),
    )
    print("\n".join(_accuracy_table(out["summary"], cl.config)))
    print(
        f"wrote {cl.workdir}/figure1.png, results.md, metrics.json, metrics.csv "
        f"({out['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
