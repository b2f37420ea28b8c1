"""Whitening, the road the paper set aside: its three reasons measured.

The paper (Sec. 2-3) prefers per-dimension batch norm to whitening the layer
inputs because (1) whitening converges faster but (2) costs too much (the
covariance, its inverse square root and their gradients) and (3) the joint
covariance is singular when the mini-batch holds fewer examples than features.
Decorrelated BN (Huang et al., CVPR 2018: ZCA per group, :mod:`bnjax.whitening`)
and IterNorm (Huang et al., CVPR 2019: Newton-Schulz) make whitening trainable;
this experiment puts numbers on the three reasons:

* **convergence**: the Figure-1 MLP (784-100-100-100-10 sigmoid, plain SGD,
  batch 60, real MNIST, the `bnjax-figure1` schedule) with no normalization,
  BN, DBN (ZCA) with groups of 4, 20 (16 does not divide 100) and 100 (full),
  and IterNorm (full, T = 5), several seeds side by side: test accuracy vs
  steps and steps to 97%. Full whitening of 100 features from 60 examples is
  singular: those two nets run with `allow_singular=True` (eps alone).
* **cost**: the layer alone (forward+backward) and a whole training step of
  the MLP with hidden width d, as multiples of BN, for d in {100, 256, 1024},
  group sizes {4, 16, 64, d} (a group size that does not divide d is replaced
  by the nearest divisor), ZCA vs IterNorm; interleaved rounds, medians.
* **singularity**: mini-batches of m examples of the MLP's first-layer
  pre-activations (d = G = 100) whitened with eps only: the error raised
  without the opt-in, and with it the whitened scale of the batch's own
  examples vs held-out examples of the same distribution.

Outputs in the run folder: `whitening.png` (accuracy, cost, singularity),
`results.md` (tables), `metrics.json`, `metrics.csv`, `config.json`,
`checkpoints/`.

Run:

```bash
bnjax-whitening                                  # the configured run
bnjax-whitening --quick --workdir runs/smoke     # a smoke test
bnjax-whitening --config configs/whitening.py --config.num_steps=50000
```

Programmatic use: `results = run(get_config(), "runs/whitening")`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bnjax import functional as F
from bnjax import whitening as W
from bnjax.experiments import _common
from bnjax.experiments.models import MLP
from bnjax.linen import BatchWhitening

__all__ = [
    "CONFIG_HELP",
    "get_config",
    "quick_config",
    "build",
    "measure_cost",
    "measure_singularity",
    "summarize",
    "run",
    "main",
]

CONFIG_HELP = {
    "dataset": "'mnist' or 'fashion-mnist'",
    "hidden": "hidden layer widths of the convergence MLP",
    "activation": "hidden nonlinearity",
    "init_std": "std of the Gaussian initial weights",
    "optimizer": "'sgd', 'momentum', 'nesterov', 'adam'",
    "learning_rate": "learning rate (all nets)",
    "momentum": "momentum of the 'momentum'/'nesterov' optimizers",
    "batch_size": "mini-batch size (the paper: 60)",
    "num_steps": "training steps (bnjax-figure1: 50,000)",
    "num_seeds": "seeds trained in parallel (vmap)",
    "seed": "first seed",
    "eval_every": "evaluate on the test set every this many steps",
    "eval_batch_size": "evaluate in chunks of this size (0: all at once)",
    "checkpoint_every": "orbax checkpoint every this many steps (0: only at the end)",
    "parallel_runs": "train the nets in one thread each (True) or one after another (False)",
    "nets": "the compared nets: name:kind[:group_size] with kind none|bn|zca|iternorm",
    "norm_momentum": "EMA momentum of the population statistics (BN and whitening)",
    "epsilon": "epsilon of BN and of the whitening layers",
    "iterations": "IterNorm's Newton-Schulz steps T",
    "thresholds": "accuracies for the 'steps to reach' table",
    "cost_dims": "feature counts d of the cost measurement (0: skip the cost part)",
    "cost_groups": "group sizes of the cost measurement (0 stands for d)",
    "cost_batch": "rows of the cost measurement's batch",
    "cost_rounds": "interleaved timing rounds (median reported)",
    "singular_sizes": "mini-batch sizes m of the singularity measurement (0: skip)",
    "singular_eps": "epsilons of the singularity measurement",
}


def get_config() -> ml_collections.ConfigDict:
    """The default configuration: bnjax-figure1's MLP and schedule, six nets.

    The schedule is `bnjax-figure1`'s (MNIST, sigmoid 784-100-100-100-10,
    SGD lr 1, N(0, 1) init, batch 60, 3 seeds) cut to `num_steps = 5,000`
    (not 50,000): six nets times three seeds did not fit the shared 2-core
    machine's budget (docs/whitening/results.md: ~21 min of training there with
    `OPENBLAS_NUM_THREADS=1`); pass `--config.num_steps=50000` for the full
    schedule. The thresholds include lower accuracies, which a short run reaches.
    On a CPU run with `OPENBLAS_NUM_THREADS=1`: jaxlib's `eigh` calls scipy's
    OpenBLAS, whose threads cost 10-18x more CPU on a busy machine.
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
    c.num_steps = 5_000
    c.num_seeds = 3
    c.seed = 0
    c.eval_every = 250
    c.eval_batch_size = 0
    c.checkpoint_every = 0
    # One net after another: concurrent executions (one thread per net, the
    # bnjax.training.fit default) hung on the shared 2-core machine (all threads
    # waiting, no CPU used) once several nets ran LAPACK eigh at the same time.
    c.parallel_runs = False
    c.nets = ("none:none", "bn:bn", "dbn4:zca:4", "dbn20:zca:20", "dbn100:zca:100",
              "iternorm100:iternorm:100")
    c.norm_momentum = 0.99
    c.epsilon = 1e-5
    c.iterations = 5
    c.thresholds = (0.9, 0.93, 0.95, 0.97)
    c.cost_dims = (100, 256, 1024)
    c.cost_groups = (4, 16, 64, 0)
    c.cost_batch = 256
    c.cost_rounds = 5
    c.singular_sizes = (20, 60, 99, 100, 101, 150, 200, 400, 1000)
    c.singular_eps = (1e-5, 1e-3, 1e-1)
    return c


@_common.quick_time("measured: 27 s wall, 36 CPU-s on 2 cores")
def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` shortened to a smoke test of the same pipeline (well under a minute)."""
    return _common.updated(
        get_config() if config is None else config,
        num_steps=200,
        num_seeds=1,
        eval_every=100,
        eval_batch_size=0,
        nets=("none:none", "bn:bn", "dbn20:zca:20", "iternorm100:iternorm:100"),
        cost_dims=(64,),
        cost_groups=(16, 0),
        cost_batch=128,
        cost_rounds=2,
        singular_sizes=(20, 100, 200),
        singular_eps=(1e-3,),
    )


def parse_net(spec: str) -> tuple[str, str, int | None]:
    """`"dbn4:zca:4"` -> `("dbn4", "zca", 4)`; kinds `none`, `bn`, `zca`, `iternorm`."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("none", "bn", "zca", "iternorm"):
        raise ValueError(f"nets: expected name:kind[:group_size], kind none|bn|zca|iternorm, "
                         f"got {spec!r}")
    size = int(parts[2]) if len(parts) == 3 else None
    return parts[0], parts[1], size


def _mlp(config, kind: str, group_size: int | None, hidden=None, batch_size=None) -> MLP:
    common = dict(
        hidden=tuple(hidden or config.hidden), init_std=config.init_std, act=config.activation
    )
    if kind == "none":
        return MLP(use_bn=False, **common)
    norm = (("momentum", config.norm_momentum), ("epsilon", config.epsilon))
    if kind == "bn":
        return MLP(use_bn=True, bn=norm, **common)
    m = batch_size or config.batch_size
    opts = norm + (
        ("group_size", group_size),
        ("method", kind),
        ("iterations", config.iterations),
        # Full whitening from fewer examples than features is singular: eps alone.
        ("allow_singular", m <= (group_size or max(common["hidden"]))),
    )
    return MLP(use_bn=True, norm=BatchWhitening, bn=opts, **common)


def build(config: ml_collections.ConfigDict) -> tuple[dict[str, MLP], Any]:
    """The compared nets (by name, from `config.nets`) and the shared optimizer."""
    models = {}
    for spec in config.nets:
        name, kind, size = parse_net(spec)
        models[name] = _mlp(config, kind, size)
    tx = _common.make_optimizer(config.optimizer, config.learning_rate, config.momentum)
    return models, tx


# --------------------------------------------------------------------------- cost


def _divisor(d: int, g: int) -> int:
    """`g` if it divides `d`, else the divisor of `d` nearest to `g` (ties: smaller)."""
    if g == 0 or g >= d:
        return d
    divs = [k for k in range(1, d + 1) if d % k == 0]
    return min(divs, key=lambda k: (abs(k - g), k))


def _median_ratio_rounds(fns: dict[str, Any], rounds: int, rng) -> dict[str, list[float]]:
    """Times every zero-argument blocking function once per round, in a random order."""
    for f in fns.values():  # compile and warm up
        f()
    reps = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        reps[name] = max(1, min(50, int(0.05 / max(dt, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return times


def _layer_fns(kind: str, d: int, g: int, x, dy, iterations: int):
    if kind == "bn":
        cfg = F.BatchNormConfig()
        params, state = F.init(d, cfg)
        apply = lambda p, x: F.apply_train(p, state, x, cfg)[0]
    else:
        cfg = W.WhiteningConfig(group_size=g, method=kind, iterations=iterations,
                                allow_singular=True)
        params, state = W.init(d, cfg)
        apply = lambda p, x: W.apply_train(p, state, x, cfg)[0]

    @jax.jit
    def fwdbwd(p, x, dy):
        y, vjp = jax.vjp(apply, p, x)
        return vjp(dy)

    return lambda: jax.block_until_ready(fwdbwd(params, x, dy))


def _step_fn(config, kind: str, d: int, g: int, x, y):
    model = _mlp(config, "none" if kind == "none" else kind, g, hidden=(d, d, d),
                 batch_size=x.shape[0])
    from bnjax import training

    tx = optax.sgd(0.1)
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), x[:1])
    step = jax.jit(training.make_train_step(model, tx))
    return lambda: jax.block_until_ready(step(state, x, y)[0].params)


def measure_cost(config, progress: bool = True) -> list[dict[str, Any]]:
    """Layer-alone forward+backward and whole-train-step times, as multiples of BN.

    For each `d` in `config.cost_dims` one interleaved timing session holds BN
    and every (method, group size) variant; each row reports the medians over
    `config.cost_rounds` rounds and the median over rounds of the per-round
    ratio to BN.
    """
    from tqdm.auto import tqdm

    rows = []
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    dims = [d for d in config.cost_dims if d]
    for d in tqdm(dims, desc="whitening cost", disable=not progress):
        m = config.cost_batch
        x = jax.random.normal(key, (m, d)) @ (jnp.eye(d) + 0.1 * jax.random.normal(key, (d, d)))
        dy = jax.random.normal(jax.random.fold_in(key, 1), (m, d))
        xi = jax.random.normal(jax.random.fold_in(key, 2), (m, 784))
        yi = jax.random.randint(jax.random.fold_in(key, 3), (m,), 0, 10)
        groups = sorted({_divisor(d, g) for g in config.cost_groups})
        variants = [("bn", d)] + [(k, g) for k in ("zca", "iternorm") for g in groups]
        layer = {f"{k}:{g}": _layer_fns(k, d, g, x, dy, config.iterations) for k, g in variants}
        step = {f"{k}:{g}": _step_fn(config, k, d, g, xi, yi) for k, g in variants}
        tl = _median_ratio_rounds(layer, config.cost_rounds, rng)
        ts = _median_ratio_rounds(step, config.cost_rounds, rng)
        for k, g in variants:
            name = f"{k}:{g}"
            rows.append({
                "d": d, "method": k, "group_size": g, "batch": m,
                "requested": [q for q in config.cost_groups if _divisor(d, q) == g]
                if k != "bn" else [],
                "layer_s": float(np.median(tl[name])),
                "layer_ratio": float(np.median(np.array(tl[name]) / np.array(tl["bn:" + str(d)]))),
                "step_s": float(np.median(ts[name])),
                "step_ratio": float(np.median(np.array(ts[name]) / np.array(ts["bn:" + str(d)]))),
            })
    return rows


# --------------------------------------------------------------------------- singularity


def measure_singularity(config, train_x: np.ndarray) -> dict[str, Any]:
    """Whitening d = G = 100 first-layer pre-activations from m examples, eps only.

    The inputs are `x @ V` with the Figure-1 net's initial first-layer weights
    `V ~ N(0, init_std^2)` (784 x 100). Per m and eps: whether training without
    the opt-in raises (and the message), the smallest eigenvalue of the batch
    covariance, and the RMS of the whitened values of the batch's own examples
    and of 1,000 held-out examples whitened with the same batch map (1 for a
    well-posed whitening; `>> 1` when the batch's null space is amplified by
    `1 / sqrt(eps)`).
    """
    d = config.hidden[0]
    rng = np.random.default_rng(config.seed)
    v = rng.normal(0, config.init_std, (train_x.shape[1], d)).astype(np.float32)
    order = rng.permutation(train_x.shape[0])
    held = jnp.asarray(train_x[order[-1000:]] @ v)
    out: dict[str, Any] = {"d": d, "rows": []}
    msg = None
    try:
        cfg = W.WhiteningConfig(group_size=d)
        W.apply_train(*W.init(d, cfg), jnp.asarray(train_x[order[:60]] @ v), cfg)
    except ValueError as e:
        msg = str(e)
    out["error_at_60"] = msg
    for m in config.singular_sizes:
        if not m:
            continue
        xb = jnp.asarray(train_x[order[:m]] @ v)
        raises = False
        try:
            cfg = W.WhiteningConfig(group_size=d)
            W.apply_train(*W.init(d, cfg), xb, cfg)
        except ValueError:
            raises = True
        cm = W.batch_comoments(xb, W.WhiteningConfig(group_size=d))
        lam_min = float(jnp.linalg.eigvalsh(cm.cov()[0])[0])
        for eps in config.singular_eps:
            cfg = W.WhiteningConfig(group_size=d, epsilon=eps, allow_singular=True,
                                    momentum=0.0)
            params, state = W.init(d, cfg)
            yb, st = W.apply_train(params, state, xb, cfg)
            yh = W.apply_eval(params, st, held, cfg)  # the batch's own map, momentum 0
            out["rows"].append({
                "m": m, "eps": eps, "raises": raises, "lambda_min": lam_min,
                "rms_batch": float(jnp.sqrt(jnp.mean(yb**2))),
                "rms_heldout": float(jnp.sqrt(jnp.mean(yh**2))),
            })
    return out


# --------------------------------------------------------------------------- summary


def summarize(history: list[dict], config) -> dict[str, Any]:
    """Per net: final/max test accuracy (seed mean ± std) and steps to each threshold."""
    out: dict[str, Any] = {}
    for spec in config.nets:
        net = parse_net(spec)[0]
        steps, acc = _common.series(history, net, "accuracy")
        if steps.size == 0:
            continue
        loss = _common.series(history, net, "loss")[1]
        mean, std = _common.mean_std(acc[-1])
        s = {
            "final_step": int(steps[-1]),
            "final_accuracy": acc[-1].tolist(),
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "max_accuracy_mean": float(acc.max(0).mean()),
            "nan": bool(np.isnan(acc).any() or np.isnan(loss).any()),  # e.g. a diverged net
            "steps_to": {},
        }
        for thr in config.thresholds:
            per = [_common.first_step_reaching(steps, acc[:, j], thr) for j in range(acc.shape[1])]
            hit = [p for p in per if p is not None]
            s["steps_to"][f"{thr:g}"] = {
                "mean_curve": _common.first_step_reaching(steps, acc.mean(1), thr),
                "per_seed": per,
                "seed_mean": float(np.mean(hit)) if len(hit) == len(per) else None,
                "seed_std": _common.mean_std(hit)[1] if len(hit) == len(per) else None,
            }
        out[net] = s
    return out


def _fmt(v) -> str:
    return "never" if v is None else f"{v:,}"


def results_markdown(config, summary, cost, singular, seconds) -> str:
    """The three tables as Markdown."""
    lines = [
        "# Whitening vs batch norm: results",
        "",
        f"## Convergence (MNIST, 784-{'-'.join(map(str, config.hidden))}-10 {config.activation}, "
        f"{config.optimizer} lr {config.learning_rate:g}, init N(0, {config.init_std:g}^2), "
        f"batch {config.batch_size}, {config.num_steps:,} steps, {config.num_seeds} seeds)",
        "",
        "Test accuracy with population statistics; mean ± sample std over seeds. Steps to "
        "reach: first evaluation (every "
        f"{config.eval_every}) at which the seed-mean curve reaches the threshold (per seed in "
        "parentheses).",
        "",
    ]
    thr = [f"{t:g}" for t in config.thresholds]
    lines += ["| net | final accuracy | max accuracy (mean) | "
              + " | ".join(f"steps to {t}" for t in thr) + " |",
              "|" + "---|" * (3 + len(thr))]
    for spec in config.nets:
        name, kind, size = parse_net(spec)
        s = summary.get(name)
        if s is None:
            continue
        label = {"none": "no normalization", "bn": "BN"}.get(kind, f"{kind} G={size}")
        if kind in ("zca", "iternorm") and size and config.batch_size <= size:
            label += " (singular: eps only)"
        if s.get("nan"):
            label += ", NaN loss"
        cells = [f"{name} ({label})",
                 _common.pm(s["final_accuracy_mean"], s["final_accuracy_std"], config.num_seeds),
                 f"{s['max_accuracy_mean']:.4f}"]
        for t in thr:
            st = s["steps_to"][t]
            cells.append(f"{_fmt(st['mean_curve'])} ({', '.join(_fmt(v) for v in st['per_seed'])})")
        lines.append("| " + " | ".join(cells) + " |")
    if cost:
        lines += [
            "",
            "## Cost, as multiples of BN (CPU, shared machine; medians of interleaved rounds)",
            "",
            f"Layer alone: forward+backward of one layer on a ({cost[0]['batch']}, d) batch. "
            f"Whole step: one SGD step of a 784-d-d-d-10 MLP on a batch of {cost[0]['batch']}. "
            "A group size that does not divide d is replaced by the nearest divisor "
            "(requested sizes in brackets).",
            "",
            "| d | method | G | layer time | layer / BN | step time | step / BN |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in cost:
            stand_in = [q for q in r["requested"] if q not in (0, r["group_size"], r["d"])]
            req = f" [{', '.join(map(str, stand_in))}]" if stand_in else ""
            lines.append(
                f"| {r['d']} | {r['method']} | {r['group_size']}{req} | "
                f"{r['layer_s'] * 1e3:.3f} ms | {r['layer_ratio']:.2f} | "
                f"{r['step_s'] * 1e3:.2f} ms | {r['step_ratio']:.2f} |"
            )
    if singular and singular.get("rows"):
        lines += [
            "",
            f"## Singularity (d = G = {singular['d']}, first-layer pre-activations of MNIST)",
            "",
            "Without `allow_singular=True` training raises:",
            "",
            f"> {singular['error_at_60']}",
            "",
            "With it (eps only): RMS of the whitened values of the batch itself and of 1,000 "
            "held-out examples under the same batch whitening (1 = well posed).",
            "",
            "| m | raises without opt-in | smallest eigenvalue of the batch covariance | eps | "
            "RMS batch | RMS held-out |",
            "|---|---|---|---|---|---|",
        ]
        for r in singular["rows"]:
            lines.append(
                f"| {r['m']} | {'yes' if r['raises'] else 'no'} | {r['lambda_min']:.3g} | "
                f"{r['eps']:g} | {r['rms_batch']:.3f} | {r['rms_heldout']:.3f} |"
            )
    if seconds is not None:
        lines += ["", f"Wall time: {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(config, history, cost, singular, path: Path) -> None:
    """`whitening.png`: (a) accuracy vs steps, (b) layer cost / BN, (c) step cost / BN,
    (d) held-out RMS vs m."""
    fig, axes = _common.new_figure(4, figsize=(20, 4.4))
    ax = axes[0]
    colors, lows = {}, []
    for spec in config.nets:
        name = parse_net(spec)[0]
        steps, acc = _common.series(history, name, "accuracy")
        finite = acc[np.isfinite(acc)] if steps.size else acc
        if steps.size:
            marker = "o" if steps.size < 5 else None  # a quick run: one or two evaluations
            line, = ax.plot(steps, acc.mean(1), lw=1.5, label=name, marker=marker, ms=4)
            colors[name] = line.get_color()
            ax.fill_between(steps, acc.min(1), acc.max(1), color=line.get_color(), alpha=0.2, lw=0)
            if finite.size:
                lows.append(float(finite.min()))
    # limits from the data: the full run's accuracies sit in 0.93-0.96, a quick run's near 0.8
    low = min(lows) if lows else 0.0
    ax.set(xlabel="training steps", ylabel="test accuracy", title="(a) convergence (seed mean, "
           "min-max)", ylim=(max(0.0, np.floor(low * 20) / 20 - 0.02), 1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    for ax, key, title in ((axes[1], "layer_ratio", "(b) layer fwd+bwd / BN"),
                           (axes[2], "step_ratio", "(c) whole train step / BN")):
        for d in sorted({r["d"] for r in cost}):
            for method, ls in (("zca", "-"), ("iternorm", "--")):
                rs = [r for r in cost if r["d"] == d and r["method"] == method]
                if rs:
                    ax.plot([r["group_size"] for r in rs], [r[key] for r in rs], ls, marker="o",
                            label=f"{method} d={d}")
        ax.set(xscale="log", yscale="log", xlabel="group size G", title=title)
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        sizes = sorted({r["group_size"] for r in cost})
        ax.set_xticks(sizes, [str(g) for g in sizes])  # the measured group sizes, plainly
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[3]
    rows = singular.get("rows", []) if singular else []
    for eps in sorted({r["eps"] for r in rows}):
        rs = [r for r in rows if r["eps"] == eps]
        ax.plot([r["m"] for r in rs], [r["rms_heldout"] for r in rs], marker="o",
                label=f"held-out, eps={eps:g}")
        ax.plot([r["m"] for r in rs], [r["rms_batch"] for r in rs], ":", color="gray",
                label="on the batch itself" if eps == min(r["eps"] for r in rows) else None)
    if rows:
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.axvline(singular["d"], color="k", lw=0.8, label=f"m = d = {singular['d']}")
        ax.set(xscale="log", yscale="log", xlabel="mini-batch size m",
               title=f"(d) whitening d=G={singular['d']} from m examples", ylabel="RMS output")
        # major ticks at decades only: the default minor labels overlap on a short log axis
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(base=10))
            axis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    _common.save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- run


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    download: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the three measurements and writes the outputs to `workdir`.

    Returns:
      The `metrics.json` content plus `states` (final train states by net).
    """
    t0 = time.perf_counter()
    workdir = _common.prepare_workdir(
        workdir, config.to_dict(), resume=resume, resumable=("num_steps", "thresholds")
    )
    train, test = _common.load_data(config.dataset, data_dir, download=download)
    test = tuple(jax.device_put(a) for a in test)
    models, tx = build(config)
    _, result = _common.train_side_by_side(
        {net: (model, tx) for net, model in models.items()},
        config, train, test, workdir,
        resume=resume, progress=progress, desc="whitening (convergence)",
        parallel=bool(config.get("parallel_runs", False)),
    )
    summary = summarize(result.history, config)
    cost = measure_cost(config, progress) if any(config.cost_dims) else []
    singular = measure_singularity(config, train[0]) if any(config.singular_sizes) else {}
    metrics = _common.write_metrics(workdir, config, summary, result, t0, cost=cost,
                                    singularity=singular)
    write_outputs(workdir, config, result.history, summary, cost, singular, metrics["seconds"])
    return dict(metrics, states=result.states)


def write_outputs(workdir: Path, config, history, summary, cost, singular, seconds) -> None:
    """Writes `metrics.csv`, `results.md` and `whitening.png`."""
    seeds = [config.seed + k for k in range(config.num_seeds)]
    rows = [{"net": r["run"], "step": r["step"], "seed": s, "accuracy": r["accuracy"][j],
             "loss": r["loss"][j]} for r in history for j, s in enumerate(seeds)]
    _common.write_csv(workdir / "metrics.csv", rows)
    (workdir / "results.md").write_text(results_markdown(config, summary, cost, singular, seconds))
    plot(config, history, cost, singular, workdir / "whitening.png")


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-whitening` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv, sys.modules[__name__], prog="bnjax-whitening",
        default_workdir="runs/whitening", exit_on=(DataError, FileExistsError),
    )
    for net, s in out["summary"].items():
        acc = _common.pm(s["final_accuracy_mean"], s["final_accuracy_std"], cl.config.num_seeds)
        print(f"{net:>12}: final test accuracy {acc}")
    print(f"wrote {cl.workdir}/whitening.png, results.md, metrics.json ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
