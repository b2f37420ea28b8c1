"""Experiment: test-time adaptation of batch norm under distribution shift (bnjax.adapt).

A batch-norm network trained on clean MNIST (or Fashion-MNIST) is evaluated on the
15 corruptions of MNIST-C (:mod:`bnjax.experiments.corruptions`, built on the test
set) with its frozen source statistics and with every method of
:mod:`bnjax.adapt`:

| method | what each batch-norm layer does on the test stream |
|---|---|
| `source` | the source (training) statistics: plain evaluation |
| `norm0` | the test batch's own statistics (prediction-time BN) |
| `prior<N>` | Schneider et al.'s mixture of source and batch statistics, prior N |
| `tent` | batch statistics + entropy minimization of the BN affine params |
| `robust` | statistics estimated across batches (RoTTA's robust BN, EMA) |

on test streams of i.i.d. batches of 1, 4, 16, 64 and 256 examples, and on two
label-shifted streams of 64 (`sorted`: class by class; `dirichlet`: class
proportions `Dirichlet(alpha)` per batch). Every stream starts from the source
model (online adaptation within a corruption, reset between corruptions). Two
networks: a BN convnet (:class:`bnjax.experiments.models.ConvNet`) and the
Figure-1 BN MLP; the convnet is evaluated again as the same model built with
`flax.linen.BatchNorm` (the same variables: flax's layer is adapted too).

Outputs in the run folder (`--workdir`): `shift.png` (mean corruption error
against test batch size per method; error per corruption and method at batch
64), `results.md` (tables), `summary.json`, `summary.csv`, `config.json`.

Run:

```bash
bnjax-shift --data-dir DATA      # the full run (DATA holds mnist/ and fashion-mnist/)
bnjax-shift --quick --workdir runs/smoke              # a smoke test
bnjax-shift --config.datasets=mnist --config.models=convnet
```

Programmatic use: `results = run(get_config(), "runs/shift")`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import bnjax
from bnjax.experiments import _common
from bnjax.experiments.corruptions import CORRUPTIONS, corrupted, label_shift_order
from bnjax.experiments.models import MLP, ConvNet

__all__ = [
    "CONFIG_HELP",
    "ConfigError",
    "adapters",
    "evaluate_stream",
    "get_config",
    "main",
    "plot",
    "quick_config",
    "results_markdown",
    "run",
]


ConfigError = _common.ConfigError

CONFIG_HELP = {
    "datasets": "comma-separated: 'mnist', 'fashion-mnist'",
    "models": "comma-separated: 'convnet' (BN convnet), 'mlp' (the Figure-1 BN MLP)",
    "corruptions": "comma-separated MNIST-C corruptions, or 'all'",
    "num_seeds": "networks trained per model and dataset (seeds seed, seed+1, ...)",
    "seed": "first seed (weights, data order, corruptions, test streams)",
    "batch_size": "training mini-batch size",
    "convnet_steps": "training steps of the convnet",
    "mlp_steps": "training steps of the MLP",
    "convnet_learning_rate": "SGD + momentum 0.9 learning rate of the convnet",
    "mlp_learning_rate": "SGD learning rate of the sigmoid MLP (Figure 1's 1.0)",
    "eval_images": "test images per corruption (the first ones of the test set)",
    "batch_sizes": "test batch sizes of the i.i.d. streams",
    "shift_batch_size": "batch size of the label-shifted streams",
    "dirichlet_alpha": "alpha of the Dirichlet class proportions per batch",
    "priors": "priors N of the norm(prior=N) methods",
    "tent_learning_rate": "TENT's Adam learning rate (one step per batch; TENT's CIFAR setting)",
    "robust_momentum": "the robust method's EMA momentum",
    "flax_check": "also evaluate the convnet built with flax.linen.BatchNorm (batch 64)",
    "cache_dir": "where corrupted sets are cached ('' : <workdir>/cache)",
}


def get_config() -> ml_collections.ConfigDict:
    """The default configuration: MNIST and Fashion-MNIST, convnet and MLP, 2 seeds.

    The convnet (two stride-2 3x3 conv blocks of 32 and 64 channels and a dense
    layer of 128, BN before every ReLU) trains 2,000 steps of 64 with SGD +
    momentum (99% clean MNIST accuracy); the MLP is Figure 1's (sigmoid, BN, SGD
    1.0, 6,000 steps of 60). Each corruption is evaluated on the first 2,000 test
    images (the i.i.d. streams shuffle them; a batch size that does not divide
    2,000 drops the remainder).
    """
    c = ml_collections.ConfigDict()
    c.datasets = "mnist,fashion-mnist"
    c.models = "convnet,mlp"
    c.corruptions = "all"
    c.num_seeds = 2
    c.seed = 0
    c.batch_size = 64
    c.convnet_steps = 2000
    c.mlp_steps = 6000
    c.convnet_learning_rate = 0.05
    c.mlp_learning_rate = 1.0
    c.eval_images = 2000
    c.batch_sizes = (1, 4, 16, 64, 256)
    c.shift_batch_size = 64
    c.dirichlet_alpha = 0.1
    c.priors = (16.0, 64.0)
    c.tent_learning_rate = 1e-3
    c.robust_momentum = 0.05
    c.flax_check = True
    c.cache_dir = ""
    # the fields train_side_by_side reads
    c.num_steps = 0
    c.learning_rate = 0.0
    c.eval_every = 0
    c.eval_batch_size = 1000
    c.checkpoint_every = 0
    return c


@_common.quick_time("measured: 24 s wall, 34 CPU-s on 2 cores")
def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A smoke test of the same pipeline: MNIST, the convnet, 3 corruptions, 256 images."""
    return _common.updated(
        get_config() if config is None else config,
        datasets="mnist",
        models="convnet",
        corruptions="shot_noise,rotate,stripe",
        num_seeds=1,
        convnet_steps=150,
        eval_images=256,
        batch_sizes=(4, 64),
        priors=(16.0,),
    )


def _names(value: str, known, field: str) -> list[str]:
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if names == ["all"]:
        return list(known)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(
            f"{field} must be a comma-separated subset of {sorted(known)}, got {value!r}"
        )
    return names


def adapters(config: ml_collections.ConfigDict) -> dict[str, bnjax.adapt.Adapter]:
    """Method name -> :class:`bnjax.adapt.Adapter` (see the module docstring)."""
    out = {"source": bnjax.adapt.norm(prior=math.inf), "norm0": bnjax.adapt.norm(prior=0)}
    for n in config.priors:
        out[f"prior{n:g}"] = bnjax.adapt.norm(prior=float(n))
    out["tent"] = bnjax.adapt.tent(optax.adam(config.tent_learning_rate))
    out["robust"] = bnjax.adapt.robust(momentum=config.robust_momentum)
    return out


def _model(name: str, norm: Any = None) -> nn.Module:
    if name == "convnet":
        return ConvNet(downsample="stride", bn=(("momentum", 0.9),), norm=norm)
    return MLP(use_bn=True, norm=norm, bn=(("momentum", 0.99),))


def evaluate_stream(
    adapter: bnjax.adapt.Adapter,
    model: nn.Module,
    variables: Any,
    x: np.ndarray,
    y: np.ndarray,
    cache: dict,
) -> tuple[float, float]:
    """`(error, seconds)` of `adapter` on the stream `x` `(batches, size, ...)`,
    labels `y` `(batches, size)`: one compiled `lax.scan` from the source model
    (compiled once per adapter, model and shape, kept in `cache`; the time
    excludes compilation)."""
    key = (id(adapter), model, x.shape)
    state, x = adapter.init(model, variables, train=False), jnp.asarray(x)
    if key not in cache:

        def stream(state, xs):
            return jax.lax.scan(lambda s, xb: adapter.step(s, xb)[::-1], state, xs)[1]

        cache[key] = jax.jit(stream).lower(state, x).compile()
    t = time.perf_counter()
    logits = jax.block_until_ready(cache[key](state, x))
    seconds = time.perf_counter() - t
    return float(np.mean(np.argmax(logits, -1) != y)), seconds


def _streams(labels: np.ndarray, config) -> dict[str, np.ndarray]:
    """Stream name -> test indices `(batches, size)`: i.i.d. `b<size>` and the
    label-shifted `sorted` / `dirichlet`."""
    rng = np.random.default_rng(config.seed)
    out = {}
    for b in config.batch_sizes:
        order = rng.permutation(labels.size)
        n = labels.size // b
        out[f"b{b}"] = order[: n * b].reshape(n, b)
    for kind in ("sorted", "dirichlet"):
        out[kind] = label_shift_order(
            labels,
            config.shift_batch_size,
            kind=kind,
            alpha=config.dirichlet_alpha,
            seed=config.seed,
        )
    return out


def _train(config, dataset, model_name, train, test, workdir, progress):
    """Per seed, the trained variables of one model on one dataset."""
    steps = config.convnet_steps if model_name == "convnet" else config.mlp_steps
    lr = config.convnet_learning_rate if model_name == "convnet" else config.mlp_learning_rate
    opt = "momentum" if model_name == "convnet" else "sgd"
    tx = _common.make_optimizer(opt, lr, 0.9)
    cfg = _common.updated(
        config,
        num_steps=steps,
        learning_rate=lr,
        eval_every=steps,
        batch_size=config.batch_size if model_name == "convnet" else 60,
    )
    model = _model(model_name)
    _, result = _common.train_side_by_side(
        {model_name: (model, tx)},
        cfg,
        train,
        test,
        workdir / f"{dataset}-{model_name}",
        resume=False,
        progress=progress,
        desc=f"train {model_name} on {dataset}",
    )
    state = result.states[model_name]
    clean_acc = [r for r in result.history if r["run"] == model_name][-1]["accuracy"]
    per_seed = [
        jax.tree.map(lambda a, k=k: a[k], state).variables() for k in range(config.num_seeds)
    ]
    return model, per_seed, np.asarray(clean_acc).tolist()


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    download: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains, corrupts, adapts, evaluates; writes the outputs to `workdir`.

    Returns:
      The `summary.json` content: `cells` (`dataset/model/method/stream/
      corruption` -> error per seed), `clean_accuracy`, `seconds_per_batch`,
      `flax_check` and `seconds`.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    datasets = _names(config.datasets, ("mnist", "fashion-mnist"), "datasets")
    models = _names(config.models, ("convnet", "mlp"), "models")
    corruptions = _names(config.corruptions, CORRUPTIONS, "corruptions")
    workdir = _common.prepare_workdir(workdir, config.to_dict(), resume=False, resumable=())
    cache_dir = Path(config.cache_dir or workdir / "cache")
    methods = adapters(config)
    compiled: dict = {}
    cells: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    clean: dict[str, Any] = {}
    flax_check: dict[str, float] = {}
    tqdm = _tqdm(progress)
    for dataset in datasets:
        train, test = _common.load_data(dataset, data_dir, download=download, flatten=False)
        n = min(config.eval_images, test[0].shape[0])
        test_x, test_y = np.asarray(test[0][:n]), np.asarray(test[1][:n])
        streams = _streams(test_y, config)
        sets = {
            c: corrupted(test_x, c, seed=config.seed, cache_dir=cache_dir, tag=dataset)
            for c in tqdm(corruptions, desc=f"corrupt {dataset} ({n} images each)")
        }
        for model_name in models:
            model, per_seed, acc = _train(
                config, dataset, model_name, train, test, workdir, progress
            )
            clean[f"{dataset}/{model_name}"] = acc
            jobs = [(m, s, c) for m in methods for s in streams for c in corruptions]
            for method, stream, corr in tqdm(jobs, desc=f"adapt {dataset}/{model_name}"):
                idx = streams[stream]
                key = f"{dataset}/{model_name}/{method}/{stream}/{corr}"
                for variables in per_seed:
                    try:
                        err, sec = evaluate_stream(
                            methods[method],
                            model,
                            variables,
                            sets[corr][idx],
                            test_y[idx],
                            compiled,
                        )
                    except ValueError:  # a variance from one value per feature (batch 1)
                        err, sec = float("nan"), float("nan")
                    cells.setdefault(key, []).append(err)
                    seconds.setdefault(f"{dataset}/{model_name}/{method}/{stream}", []).append(
                        sec / idx.shape[0]
                    )
            if model_name == "convnet" and config.flax_check:
                # the same variables in the convnet built with flax.linen.BatchNorm
                flax_model = _model("convnet", norm=nn.BatchNorm)
                stream = f"b{config.shift_batch_size}"
                idx = streams.get(stream, streams["sorted"])
                stream = stream if stream in streams else "sorted"
                for method in methods:
                    for corr in corruptions:
                        err, _ = evaluate_stream(
                            methods[method],
                            flax_model,
                            per_seed[0],
                            sets[corr][idx],
                            test_y[idx],
                            compiled,
                        )
                        mine = cells[f"{dataset}/convnet/{method}/{stream}/{corr}"][0]
                        flax_check[f"{dataset}/{method}/{stream}/{corr}"] = abs(err - mine)
    summary = {
        "cells": cells,
        "clean_accuracy": clean,
        "seconds_per_batch": {
            k: float(np.median([t for t in v if np.isfinite(t)]))
            if np.any(np.isfinite(v))
            else float("nan")
            for k, v in seconds.items()
        },
        "flax_check": flax_check,
        "methods": list(methods),
        "streams": list(streams),
        "corruptions": corruptions,
        "datasets": datasets,
        "models": models,
        "seconds": {"total": time.perf_counter() - t0, "cpu": time.process_time() - cpu0},
    }
    _common.write_json(workdir / "summary.json", summary)
    _common.write_csv(workdir / "summary.csv", summary_rows(summary))
    (workdir / "results.md").write_text(results_markdown(summary, config))
    plot(summary, config, workdir / "shift.png")
    return summary


def _tqdm(progress: bool):
    if progress:
        from tqdm.auto import tqdm

        return tqdm
    return lambda it, **_: it


# --------------------------------------------------------------------------- summary


def _nanmean(values) -> float:
    """The mean of the finite values (NaN, without a warning, if there is none)."""
    v = np.asarray(values, np.float64)
    return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else float("nan")


def mean_error(summary: dict, dataset: str, model: str, method: str, stream: str) -> np.ndarray:
    """Per seed, the mean error over the corruptions (NaN where undefined)."""
    errs = [
        summary["cells"][f"{dataset}/{model}/{method}/{stream}/{c}"] for c in summary["corruptions"]
    ]
    return np.mean(np.asarray(errs, np.float64), axis=0)


def _fmt(values) -> str:
    """`mean ± std` over seeds in percent; `n/a` for undefined; one seed: no spread."""
    v = np.asarray(values, np.float64)
    if np.all(np.isnan(v)):
        return "n/a"
    m = 100 * _nanmean(v)
    finite = v[~np.isnan(v)]
    if finite.size == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * np.std(finite, ddof=1):.1f}"


def summary_rows(summary: dict) -> list[dict[str, Any]]:
    rows = []
    for key, errs in summary["cells"].items():
        dataset, model, method, stream, corr = key.split("/")
        for seed, e in enumerate(errs):
            rows.append(
                dict(
                    dataset=dataset,
                    model=model,
                    method=method,
                    stream=stream,
                    corruption=corr,
                    seed=seed,
                    error=e,
                )
            )
    return rows


def results_markdown(summary: dict, config: ml_collections.ConfigDict) -> str:
    """The results tables (mean corruption error per method and stream; per corruption at
    batch 64; cost per batch; the flax check)."""
    seeds = config.num_seeds
    out = [
        "# Test-time adaptation under distribution shift (`bnjax-shift`)",
        "",
        f"Mean error (%) over {len(summary['corruptions'])} MNIST-C corruptions of the first "
        f"{config.eval_images} test images, {seeds} seed(s) (mean ± std over seeds); "
        "streams `b<k>`: i.i.d. batches of k, `sorted` / `dirichlet`: label-shifted batches of "
        f"{config.shift_batch_size} (Dirichlet alpha {config.dirichlet_alpha}). "
        "Every stream starts from the source model.",
        "",
        "![mean corruption error against test batch size per method, label-shifted streams at "
        "the right; error per corruption and method at batch 64](shift.png)",
        "",
    ]
    streams = summary["streams"]
    for dataset in summary["datasets"]:
        for model in summary["models"]:
            acc = np.asarray(summary["clean_accuracy"][f"{dataset}/{model}"], np.float64)
            out += [
                f"## {dataset}, {model} (clean test error {_fmt(1 - np.atleast_1d(acc))}%)",
                "",
                "| method | " + " | ".join(streams) + " |",
                "|---|" + "---|" * len(streams),
            ]
            for method in summary["methods"]:
                cells = [_fmt(mean_error(summary, dataset, model, method, s)) for s in streams]
                out.append(f"| {method} | " + " | ".join(cells) + " |")
            out.append("")
    ref = f"b{config.shift_batch_size}"
    if ref in streams:
        for dataset in summary["datasets"]:
            model = summary["models"][0]
            out += [
                f"### {dataset}, {model}: error (%) per corruption, i.i.d. batches of "
                f"{config.shift_batch_size}",
                "",
                "| corruption | " + " | ".join(summary["methods"]) + " |",
                "|---|" + "---|" * len(summary["methods"]),
            ]
            for c in summary["corruptions"]:
                row = [
                    _fmt(summary["cells"][f"{dataset}/{model}/{m}/{ref}/{c}"])
                    for m in summary["methods"]
                ]
                out.append(f"| {c} | " + " | ".join(row) + " |")
            out.append("")
        out += [
            f"### Cost per batch of {config.shift_batch_size}, relative to `source` "
            "(median wall time of the compiled stream)",
            "",
            "| dataset/model | " + " | ".join(summary["methods"]) + " |",
            "|---|" + "---|" * len(summary["methods"]),
        ]
        for dataset in summary["datasets"]:
            for model in summary["models"]:
                spb = summary["seconds_per_batch"]
                base = spb[f"{dataset}/{model}/source/{ref}"]
                row = [
                    f"{spb[f'{dataset}/{model}/{m}/{ref}'] / base:.2f}x" for m in summary["methods"]
                ]
                out.append(f"| {dataset}/{model} | " + " | ".join(row) + " |")
        out.append("")
    if summary["flax_check"]:
        worst = max(summary["flax_check"].values())
        out += [
            "The convnet built with `flax.linen.BatchNorm` (same variables), every method on "
            f"every corruption at batch {config.shift_batch_size}: largest error difference to "
            f"the bnjax model {100 * worst:.2f} points.",
            "",
        ]
    sec = summary["seconds"]
    out.append(f"Wall time {sec['total'] / 60:.1f} min ({sec['cpu'] / 60:.1f} CPU-min).")
    return "\n".join(out) + "\n"


def plot(summary: dict, config: ml_collections.ConfigDict, path: Path) -> None:
    """One row per dataset: per model, the mean corruption error against the test batch
    size per method (the label-shifted streams as markers at the right); then a heat map
    of the error per corruption and method at batch ``shift_batch_size`` (first model)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    iid = [s for s in summary["streams"] if s.startswith("b")]
    sizes = [int(s[1:]) for s in iid]
    datasets, models = summary["datasets"], summary["models"]
    ncols = len(models) + 1
    fig = Figure(figsize=(4.6 * ncols, 4.0 * len(datasets)))
    axes = fig.subplots(len(datasets), ncols, squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(summary["methods"])}
    xshift = {"sorted": max(sizes) * 3, "dirichlet": max(sizes) * 8}
    ref = f"b{config.shift_batch_size}" if f"b{config.shift_batch_size}" in iid else iid[-1]
    for row, dataset in enumerate(datasets):
        for col, model in enumerate(models):
            ax = axes[row, col]
            for method in summary["methods"]:
                ys = [_nanmean(mean_error(summary, dataset, model, method, s)) * 100 for s in iid]
                ax.plot(sizes, ys, "o-", color=colors[method], label=method, ms=4)
                for s, x in xshift.items():
                    y = _nanmean(mean_error(summary, dataset, model, method, s)) * 100
                    ax.plot([x], [y], "s" if s == "sorted" else "^", color=colors[method], ms=6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(
                sizes + list(xshift.values()),
                [str(s) for s in sizes] + ["sorted", "Dirichlet"],
                fontsize=8,
            )
            ax.minorticks_off()
            ax.set_xlabel(
                f"test batch size (i.i.d.)   |   label-shifted, batch {config.shift_batch_size}",
                fontsize=8,
            )
            ax.set_ylabel("mean corruption error (%)")
            ax.set_title(f"({chr(97 + row * ncols + col)}) {dataset}, {model}", fontsize=10)
            ax.grid(alpha=0.3)
        ax = axes[row, -1]
        grid = np.array(
            [
                [
                    _nanmean(summary["cells"][f"{dataset}/{models[0]}/{m}/{ref}/{c}"]) * 100
                    for c in summary["corruptions"]
                ]
                for m in summary["methods"]
            ]
        )
        im = ax.imshow(grid, cmap="magma_r", aspect="auto", vmin=0, vmax=100)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v > 50 else "black",
                )
        ax.set_yticks(range(len(summary["methods"])), summary["methods"], fontsize=8)
        ax.set_xticks(
            range(len(summary["corruptions"])),
            summary["corruptions"],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.set_title(
            f"({chr(97 + row * ncols + ncols - 1)}) error (%) per corruption, "
            f"{dataset} {models[0]}, i.i.d. batches of {ref[1:]}",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, fraction=0.04)
    handles, _ = axes[0, 0].get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="s", ls="", color="gray", label="class-sorted stream"),
        Line2D([], [], marker="^", ls="", color="gray", label="Dirichlet stream"),
    ]
    axes[0, 0].legend(handles=handles, fontsize=7)
    fig.suptitle("Batch-norm test-time adaptation on MNIST-C corruptions", fontsize=11)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-shift` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="bnjax-shift",
        default_workdir="runs/shift",
        exit_on=(DataError, FileExistsError, ConfigError),
    )
    print(results_markdown(out, cl.config))
    print(f"wrote {cl.workdir}/shift.png, results.md, summary.json, summary.csv")


if __name__ == "__main__":
    main()
