"""Why BN-x30 fails in Experiment 2: per-layer measurements of the first training steps.

Experiment 2 (:mod:`bnjax.experiments.lr_tolerance`) finds that its BN-x30
network (lr 1.5 with momentum 0.9) ends at chance level. This program retraces
the first `diag_steps` steps of that run, and of runs that change one thing
at a time (the rate, the momentum, the Sec. 4.2.1 changes, ...), with
:func:`bnjax.experiments.dynamics.trace` (the same mini-batches and updates as the
experiment) and records at every step, per layer: the weight norms, the
mini-batch statistics going into every batch norm, the fraction of dead relu
units, the size of each update, and the logits' scale and the loss.

Outputs in the run folder (`--workdir`): `diagnosis.png` (the plot),
`diagnosis.md` (tables: per case the first step each layer is mostly dead,
and BN-x30's layers step by step), `diagnosis.csv` (every `csv_every`-th
step of every case and seed, the main measurements), `records.npz` (every step,
keys `"<case>:<measurement>"`, `(seeds, steps)` arrays), `events.json` and
`config.json`.

Run:

```bash
python -m bnjax.experiments.lr_diagnosis --workdir runs/lr_diagnosis
python -m bnjax.experiments.lr_diagnosis --quick --workdir runs/smoke
```

Programmatic use: `out = run(get_config(), "runs/lr_diagnosis")`;
`out["records"][case]` holds the `(seeds, steps)` arrays.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from bnjax import training
from bnjax.experiments import _common, dynamics
from bnjax.experiments import lr_tolerance as lt

__all__ = [
    "CASES",
    "CONFIG_HELP",
    "Case",
    "get_config",
    "quick_config",
    "case_settings",
    "events",
    "run",
    "main",
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One traced run: an Experiment 2 variant, optionally with another rate or momentum.

    Attributes:
      label: the name in the plot and tables.
      variant: the :data:`bnjax.experiments.lr_tolerance.VARIANTS` entry it starts from
        (network, schedule, weight decay, ...).
      lr_mult: overrides the variant's multiple of the base rate.
      momentum: overrides the config's momentum.
    """

    label: str
    variant: str
    lr_mult: float | None = None
    momentum: float | None = None


CASES: dict[str, Case] = {
    "bn_x30": Case("BN-x30: lr 1.5, momentum 0.9", "bn_x30"),
    "bn_x30_m0": Case("lr 1.5, no momentum", "bn_x30", momentum=0.0),
    "bn_x3": Case("lr 0.15, momentum 0.9", "bn", lr_mult=3.0),
    "bn_x300_m0": Case("lr 15, no momentum", "bn_x30", lr_mult=300.0, momentum=0.0),
    "bn_x10": Case("BN-x10: lr 0.5, momentum 0.9", "bn_x10"),
    "bn_x5": Case("BN-x5: lr 0.25, momentum 0.9", "bn_x5"),
    "no_bn_x5": Case("No BN: lr 0.25, momentum 0.9", "no_bn_x5"),
    "bn_x30_421": Case("BN-x30, Sec. 4.2.1", "bn_x30_421"),
    "bn_x30_421_warmup": Case("BN-x30, Sec. 4.2.1 + warm-up", "bn_x30_421_warmup"),
    "bn_x30_421_clip": Case("BN-x30, Sec. 4.2.1 + clipping", "bn_x30_421_clip"),
}
COLORS = {
    "bn_x30": "tab:red",
    "bn_x30_m0": "tab:blue",
    "bn_x3": "tab:cyan",
    "bn_x300_m0": "tab:pink",
    "bn_x10": "tab:purple",
    "bn_x5": "tab:orange",
    "no_bn_x5": "tab:gray",
    "bn_x30_421": "tab:green",
    "bn_x30_421_warmup": "tab:brown",
    "bn_x30_421_clip": "tab:olive",
}
DEAD = 0.5  # a layer "is dead" when at least this fraction of its units is
CHANCE_LOSS = 2.0  # a 20-step mean training loss above this: no better than chance (log 10 = 2.3)

CONFIG_HELP = dict(
    lt.CONFIG_HELP,
    diag_steps="steps traced per case",
    cases=f"comma-separated cases, of {', '.join(CASES)}",
    csv_every="diagnosis.csv keeps every this-many-th step",
)


def get_config() -> ml_collections.ConfigDict:
    """Experiment 2's config (:func:`bnjax.experiments.lr_tolerance.get_config`) plus the
    diagnosis fields: 300 traced steps, 2 seeds, every case (about 3 minutes on 2 cores)."""
    c = lt.get_config()
    c.diag_steps = 300
    c.cases = ",".join(CASES)
    c.csv_every = 10
    return c


def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A smoke test: 30 steps, 1 seed, BN-x30 with and without momentum."""
    return _common.updated(
        get_config() if config is None else config,
        diag_steps=30,
        num_seeds=1,
        cases="bn_x30,bn_x30_m0",
        csv_every=5,
    )


def case_names(config: ml_collections.ConfigDict) -> list[str]:
    """The config's cases, validated."""
    names = [c.strip() for c in str(config.cases).split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        raise ValueError(f"unknown cases {unknown or names}; choose from {list(CASES)}")
    return list(dict.fromkeys(names))


def case_settings(config: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    """`{"lr", "momentum", "effective_lr"}` of a case; `effective_lr = lr / (1 - momentum)`
    (the step of heavy-ball SGD under a constant gradient), the initial rate for schedules."""
    c = CASES[name]
    mult = lt.VARIANTS[c.variant].lr_mult if c.lr_mult is None else c.lr_mult
    lr = mult * config.learning_rate
    mom = config.momentum if c.momentum is None else c.momentum
    if config.optimizer not in ("momentum", "nesterov"):
        mom = 0.0
    return {"lr": lr, "momentum": mom, "effective_lr": lr / (1.0 - mom)}


def _running_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over `k` steps along the last axis (shorter at the start)."""
    c = np.cumsum(np.nan_to_num(a, nan=np.inf), axis=-1)  # a non-finite value poisons its windows
    out = np.empty_like(c)
    out[..., :k] = c[..., :k] / np.arange(1, min(k, a.shape[-1]) + 1)
    with np.errstate(invalid="ignore"):  # inf - inf = nan: still non-finite
        out[..., k:] = (c[..., k:] - c[..., :-k]) / k
    return out


def layers(record: dict[str, np.ndarray]) -> list[str]:
    """The hidden layers' activation-input names in a record (`act_in_0`, ...), in order."""
    return sorted(k.split("/")[0] for k in record if k.endswith("/dead"))


def events(record: dict[str, np.ndarray]) -> dict[str, list[int | None]]:
    """Per seed, the first step at which each layer is mostly dead (`dead >= DEAD`) and at
    which the 20-step mean training loss first exceeds :data:`CHANCE_LOSS` after step 20
    (`"loss"`; None: never)."""
    out = {}
    for layer in layers(record):
        out[layer] = [dynamics.first_step(d, DEAD - 1e-9) for d in record[f"{layer}/dead"]]
    run = _running_mean(record["loss"], 20)
    out["loss"] = [
        None if (s := dynamics.first_step(r[20:], CHANCE_LOSS)) is None else s + 20 for r in run
    ]
    return out


def trace_case(config, name: str, train, *, progress_bar=None):
    """Traces one case: `(seeds, steps)` arrays of the loss and the probe's measurements."""
    c = CASES[name]
    s = case_settings(config, name)
    model = lt.make_model(config, c.variant)
    tx = lt.make_optimizer(config, c.variant, lr=s["lr"], momentum=s["momentum"])
    seeds = [config.seed + k for k in range(config.num_seeds)]
    states = training.create_train_states(model, tx, seeds, train[0][:1])
    _, rec = dynamics.trace(
        model,
        tx,
        states,
        train[0],
        train[1],
        num_steps=config.diag_steps,
        batch_size=config.batch_size,
        steps_per_call=config.get("steps_per_call") or None,
    )
    return {k: np.asarray(v, np.float64) for k, v in rec.items()}


# --------------------------------------------------------------------------- outputs

CSV_KEYS = ("loss", "accuracy", "logit_rms", "logit_max")


def _csv_columns(record) -> list[str]:
    cols = list(CSV_KEYS)
    for layer in layers(record):
        i = layer.rsplit("_", 1)[-1]
        cols += [f"{layer}/dead", f"{layer}/nonpos", f"{layer}/mean_abs", f"{layer}/std"]
        cols += [k for k in (f"bn_in_{i}/mean_abs", f"bn_in_{i}/std") if k in record]
    for k in record:
        if k.startswith(("w_norm/", "w_mean/", "update_ratio/")):
            cols.append(k)
    return cols


def csv_rows(records: dict[str, dict[str, np.ndarray]], config) -> list[dict[str, Any]]:
    """Rows `(case, seed, step, measurements...)` of every `csv_every`-th step."""
    rows = []
    for name, rec in records.items():
        cols = _csv_columns(rec)
        n_seeds, n_steps = rec["loss"].shape
        for j in range(n_seeds):
            for t in range(0, n_steps, config.csv_every):
                row = {"case": name, "seed": config.seed + j, "step": t}
                row.update({k: float(f"{rec[k][j, t]:.5g}") for k in cols})
                rows.append(row)
    return rows


def _setting(config) -> str:
    convs = "-".join(map(str, config.features))
    return (
        f"{config.dataset}, convnet {convs} (3x3, {config.downsample}), dense {config.dense}, "
        f"{config.optimizer} {config.momentum:g}, base lr {config.learning_rate:g}, "
        f"batch {config.batch_size}"
    )


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def markdown(records, config, seconds: float | None) -> str:
    """`diagnosis.md`: the per-case table and BN-x30's layers step by step."""
    n = config.diag_steps
    lines = [
        "# Why BN-x30 fails: the first steps, layer by layer",
        "",
        f"{_setting(config)}, {n} traced steps, "
        f"{config.num_seeds} seed(s) (per seed: 'a, b'). Layers: conv_0, conv_1, dense "
        "(the hidden layers, each BN + relu in the BN nets), then the head (no BN). "
        f"'dead': the fraction of a layer's units whose relu input is <= 0 for the whole "
        f"mini-batch; first step dead: the first step with >= {DEAD:.0%} of the layer dead; "
        f"loss > {CHANCE_LOSS:g}: the first step after 20 whose 20-step mean training loss "
        "exceeds it (chance: log 10 = 2.30).",
        "",
        "![training loss, dead units, logit scale and BN parameters per step, per case]"
        "(diagnosis.png)",
        "",
        "| case | lr | momentum | lr/(1-m) | first step dead: "
        + " | ".join(layers(next(iter(records.values()))))
        + f" | loss > {CHANCE_LOSS:g} | loss, last 20 steps | max logit rms "
        "| dense BN beta norm, end |",
        "|---|---|---|---|" + "---|" * (len(layers(next(iter(records.values())))) + 4),
    ]
    for name, rec in records.items():
        s = case_settings(config, name)
        ev = events(rec)
        per = lambda vs: ", ".join(_fmt(v) for v in vs)
        last = rec["loss"][:, -20:].mean(1)
        beta_keys = sorted(k for k in rec if k.startswith("w_norm/bn_") and k.endswith("/bias"))
        beta = "-" if not beta_keys else per(f"{v:.3g}" for v in rec[beta_keys[-1]][:, -1])
        lines.append(
            f"| {CASES[name].label} | {s['lr']:g} | {s['momentum']:g} | {s['effective_lr']:g} | "
            + " | ".join(per(ev[layer]) for layer in layers(rec))
            + f" | {per(ev['loss'])} | {per(f'{v:.2f}' for v in last)} | "
            f"{per(f'{v:.3g}' for v in rec['logit_rms'].max(1))} | {beta} |"
        )
    if "bn_x30" in records:
        rec = records["bn_x30"]
        steps = [t for t in (0, 2, 5, 10, 20, 30, 50, 100, 200, n - 1) if t < n]
        lines += [
            "",
            "## BN-x30 layer by layer (seed mean)",
            "",
            "| step | loss | logit rms | "
            + " | ".join(f"{layer} dead" for layer in layers(rec))
            + " | "
            + " | ".join(f"pre-BN std {i}" for i in range(len(layers(rec))))
            + " | "
            + " | ".join(f"beta norm {i}" for i in range(len(layers(rec))))
            + " | last beta mean | last beta update / norm | head kernel norm |",
            "|---|---|---|" + "---|" * (3 * len(layers(rec)) + 3),
        ]
        for t in steps:
            m = lambda k, t=t: float(np.mean(rec[k][:, t])) if k in rec else float("nan")
            nl = len(layers(rec))
            lines.append(
                f"| {t} | {m('loss'):.2f} | {m('logit_rms'):.2f} | "
                + " | ".join(f"{m(f'act_in_{i}/dead'):.2f}" for i in range(nl))
                + " | "
                + " | ".join(f"{m(f'bn_in_{i}/std'):.3g}" for i in range(nl))
                + " | "
                + " | ".join(f"{m(f'w_norm/bn_{i}/bias'):.3g}" for i in range(nl))
                + f" | {m(f'w_mean/bn_{nl - 1}/bias'):.3g}"
                + f" | {m(f'update_ratio/bn_{nl - 1}/bias'):.3g} | "
                f"{m('w_norm/head/kernel'):.3g} |"
            )
    if seconds is not None:
        lines += ["", f"Wall time: {seconds:.0f} s on a shared 2-core CPU."]
    return "\n".join(lines) + "\n"


def plot(records, config, path: Path) -> None:
    """`diagnosis.png`: (a) training loss, (b) dead units of the last hidden layer,
    (c) logits' scale, for every case; (d-f) BN-x30's layers: dead units, BN beta norms,
    pre-BN standard deviations."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9))
    ax = fig.subplots(2, 3).ravel()
    for name, rec in records.items():
        c = COLORS.get(name)
        steps = np.arange(rec["loss"].shape[1])
        last = layers(rec)[-1]
        for a, key, smooth in (
            (ax[0], "loss", 10),
            (ax[1], f"{last}/dead", 1),
            (ax[2], "logit_rms", 1),
        ):
            y = rec[key].mean(0)
            if smooth > 1:
                y = _running_mean(rec[key], smooth).mean(0)
            a.plot(steps, y, color=c, lw=1.4, label=CASES[name].label)
    ax[0].axhline(np.log(10), color="k", lw=0.8, ls=":")
    ax[0].set_ylim(0, 3.5)
    ax[0].set(
        title="(a) training loss (10-step mean, clipped at 3.5; dotted: chance)", xlabel="step"
    )
    ax[1].set(title="(b) dense layer: fraction of dead relu units", xlabel="step")
    ax[2].set(title="(c) logits: root mean square (head, no BN)", xlabel="step")
    ax[2].set_yscale("log")
    ax[0].legend(fontsize=7, loc="lower left")
    if "bn_x30" in records:
        rec = records["bn_x30"]
        steps = np.arange(rec["loss"].shape[1])
        for i, layer in enumerate(layers(rec)):
            col = f"C{i}"
            ax[3].plot(steps, rec[f"{layer}/dead"].mean(0), color=col, label=f"layer {i} ({layer})")
            if f"w_norm/bn_{i}/bias" in rec:
                ax[4].plot(steps, rec[f"w_norm/bn_{i}/bias"].mean(0), color=col, label=f"beta_{i}")
                ax[4].plot(
                    steps,
                    rec[f"w_norm/bn_{i}/scale"].mean(0),
                    color=col,
                    ls="--",
                    label=f"gamma_{i}",
                )
            if f"bn_in_{i}/std" in rec:
                ax[5].plot(steps, rec[f"bn_in_{i}/std"].mean(0), color=col, label=f"BN input {i}")
        ax[4].plot(steps, rec["w_norm/head/kernel"].mean(0), color="k", label="head kernel")
        ax[3].set(title="(d) BN-x30: dead units per layer", xlabel="step")
        ax[4].set(title="(e) BN-x30: norms of BN beta (solid), gamma (dashed)", xlabel="step")
        ax[5].set(title="(f) BN-x30: pre-BN batch std (mean over features)", xlabel="step")
        ax[4].set_yscale("log")
        ax[5].set_yscale("log")
        for a in ax[3:]:
            a.legend(fontsize=7)
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(
        f"First {config.diag_steps} steps of Experiment 2's nets, seed means "
        f"({config.num_seeds} seeds)",
        fontsize=10,
    )
    _common.save_figure(fig, path, dpi=100)


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
    """Traces every case and writes the outputs to `workdir`.

    Returns:
      `{"config", "records": {case: {key: (seeds, steps) array}}, "events", "seconds"}`.
    """
    del resume  # nothing to resume: a trace is short
    t0 = time.perf_counter()
    names = case_names(config)
    workdir = _common.prepare_workdir(workdir, config.to_dict(), resume=False, resumable=())
    train, _ = _common.load_data(config.dataset, data_dir, download=download, flatten=False)
    records = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc="lr_diagnosis", unit="case")
    for name in bar if bar is not None else names:
        records[name] = trace_case(config, name, train)
    seconds = time.perf_counter() - t0
    _common.write_csv(workdir / "diagnosis.csv", csv_rows(records, config))
    (workdir / "diagnosis.md").write_text(markdown(records, config, seconds))
    plot(records, config, workdir / "diagnosis.png")
    ev = {name: events(rec) for name, rec in records.items()}
    _common.write_json(workdir / "events.json", ev)
    np.savez_compressed(
        workdir / "records.npz",
        **{f"{name}:{k}": v for name, rec in records.items() for k, v in rec.items()},
    )
    return {"config": config.to_dict(), "records": records, "events": ev, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    """`python -m bnjax.experiments.lr_diagnosis` (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="python -m bnjax.experiments.lr_diagnosis",
        default_workdir="runs/lr_diagnosis",
        exit_on=(DataError, FileExistsError),
    )
    print((cl.workdir / "diagnosis.md").read_text())
    print(f"wrote {cl.workdir}/diagnosis.png, diagnosis.md, diagnosis.csv")


if __name__ == "__main__":
    main()
