"""Helpers shared by the experiment programs: command line, data, training, outputs.

An experiment module defines `get_config()` (an `ml_collections.ConfigDict`
with the defaults), `quick_config(config)`, `CONFIG_HELP` (one line per
config field), `run(config, workdir, *, data_dir, download, resume,
progress)` and `main(argv)`, and its docstring ends with a paragraph
starting "Programmatic use" (left out of `--help`).
:func:`parse_command_line` gives every experiment the same command line, the
Flax examples' convention, and :func:`run_command_line` runs a module from it:

```python
python -m bnjax.experiments.figure1 --config configs/figure1.py \\
    --config.num_seeds=5 --workdir runs/fig1 --data-dir /data
```

`--config` is an `ml_collections` config file (a Python file with
`get_config()`); `--config.<field>=<value>` overrides single fields.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bnjax import training

__all__ = [
    "ConfigError",
    "CommandLine",
    "parse_command_line",
    "run_command_line",
    "updated",
    "make_optimizer",
    "load_data",
    "prepare_workdir",
    "train_side_by_side",
    "write_metrics",
    "write_json",
    "write_csv",
    "series",
    "mean_std",
    "first_step_reaching",
    "config_changes",
    "new_figure",
    "save_figure",
]


class ConfigError(ValueError):
    """A config value an experiment cannot run with (the CLI prints it on one line)."""


@dataclasses.dataclass
class CommandLine:
    """The parsed command line of an experiment."""

    config: ml_collections.ConfigDict
    workdir: Path
    data_dir: str | None
    resume: bool
    progress: bool
    download: bool
    distributed: dict[str, Any] | None = None  # bnjax.training.distributed.initialize's arguments


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([\w.]+)(\(\))?`")


def plain_text(doc: str) -> str:
    """A docstring (Markdown, Google style) as plain terminal text for `--help`.

    Sphinx roles become the bare name, Markdown code spans lose their backticks,
    fenced code blocks become 4-space indented blocks, Markdown tables become
    aligned columns.
    """
    doc = _ROLE.sub(lambda m: (m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2))
                    + (m.group(3) or ""), doc)
    doc = re.sub(r"\[`([^`]+)`\]\[[\w.]+\]", r"\1", doc)
    out: list[str] = []
    table: list[list[str]] = []
    fence = False

    def flush():
        if table:
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            out.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                       for r in table)
            table.clear()

    for line in doc.split("\n"):
        s = line.strip()
        if s.startswith("```"):
            fence = not fence
            continue
        if fence:
            out.append("    " + line)
            continue
        if s.startswith("|") and s.endswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", s):
                table.append([c.strip().replace("`", "") for c in s.strip("|").split("|")])
            continue
        flush()
        out.append(re.sub(r"`([^`]+)`", r"\1", line))
    flush()
    return "\n".join(out)


def _usage(prog, doc, fv: flags.FlagValues, config, config_help: Mapping[str, str], default: str):
    lines = [plain_text(doc).strip(), "", f"usage: {prog} [flags]", "", "flags:"]
    for name in sorted(fv):
        if name in ("config",):
            continue
        f = fv[name]
        if f.name != name:
            continue
        shown = "" if f.default is None else f" (default: {f.default!r})"
        lines.append(f"  --{name}: {f.help}{shown}")
    lines.append(f"  --config: {fv['config'].help} (default: {default}, the values below)")
    lines += ["", "config fields (override any with --config.<field>=<value>):"]
    for key, value in config.items():
        lines.append(f"  {key} = {value!r}: {config_help.get(key, '')}")
    return "\n".join(lines)


def parse_command_line(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str,
    default_config: str,
    config_help: Mapping[str, str],
    default_workdir: str,
    quick: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None,
    distributed: bool = False,
) -> CommandLine:
    """Parses an experiment's command line (`--help` prints every option and exits).

    Args:
      argv: the arguments without the program name (`None`: `sys.argv[1:]`).
      prog: the program name for `--help`.
      doc: the text `--help` starts with.
      default_config: the config file used without `--config`.
      config_help: one-line descriptions of the config fields.
      default_workdir: the output folder used without `--workdir`.
      quick: if given, `--quick` applies it to the config; fields given
        explicitly as `--config.<field>=...` keep their given values.
      distributed: add the multi-process flags `--coordinator-address`,
        `--num-processes`, `--process-id` (default: the environment, see
        :func:`bnjax.training.distributed.initialize`), `--auto-distributed` and
        `--init-timeout`; their values go to `CommandLine.distributed`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file(
            "config",
            default=default_config,
            help_string="an ml_collections config file (a Python file with get_config())",
            flag_values=fv,
            lock_config=True,
            sys_argv=[prog, *argv],  # config_flags finds the --config.<field> overrides here
        )
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
        raise SystemExit(f"{prog}: unknown config field in an override: {e}\nTry --help.") from None
    quick_time = getattr(quick, "__quick_time__", "")
    _define_run_flags(fv, default_workdir, quick=quick is not None, quick_time=quick_time)
    if distributed:
        _define_distributed_flags(fv)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv):
        fv([prog])
        print(_usage(prog, doc, fv, fv["config"].value, config_help, default_config))
        raise SystemExit(0)
    try:
        fv([prog, *argv])
    except flags.Error as e:
        raise SystemExit(f"{prog}: {e}\nTry --help.") from None
    config = fv["config"].value
    if quick is not None and fv["quick"].value:
        _apply_quick(config, quick, argv)
    return CommandLine(
        config=config,
        workdir=Path(fv["workdir"].value),
        data_dir=fv["data-dir"].value,
        resume=fv["resume"].value,
        progress=fv["progress"].value,
        download=fv["download"].value,
        distributed=dict(
            coordinator_address=fv["coordinator-address"].value,
            num_processes=fv["num-processes"].value,
            process_id=fv["process-id"].value,
            auto=fv["auto-distributed"].value,
            initialization_timeout=fv["init-timeout"].value,
            heartbeat_timeout=fv["heartbeat-timeout"].value,
        )
        if distributed
        else None,
    )


def _define_run_flags(
    fv: flags.FlagValues, default_workdir: str, *, quick: bool, quick_time: str = ""
) -> None:
    """The flags every experiment has: --workdir, --data-dir, --resume, --progress,
    --download (and --quick if the experiment has a quick mode)."""
    flags.DEFINE_string("workdir", default_workdir, "output folder of the run", flag_values=fv)
    flags.DEFINE_alias("out", "workdir", flag_values=fv)
    flags.DEFINE_string(
        "data-dir",
        None,
        "folder holding mnist/ and fashion-mnist/ (IDX files); else $BNJAX_DATA_DIR, "
        "then the user cache",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "resume",
        False,
        "continue from the newest checkpoint in <workdir>/checkpoints",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "progress", True, "show a progress bar (--noprogress: none)", flag_values=fv
    )
    flags.DEFINE_boolean(
        "download", False, "download the dataset (MD5-verified) if it is missing", flag_values=fv
    )
    if quick:
        flags.DEFINE_boolean(
            "quick",
            False,
            "a smoke-test run of the same pipeline" + (f" ({quick_time})" if quick_time else ""),
            flag_values=fv,
        )


def _define_distributed_flags(fv: flags.FlagValues) -> None:
    """The multi-process flags (`CommandLine.distributed`)."""
    flags.DEFINE_string(
        "coordinator-address",
        None,
        "multi-process run: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num-processes", None, "number of processes (else $JAX_NUM_PROCESSES)", flag_values=fv
    )
    flags.DEFINE_integer(
        "process-id", None, "this process, 0..N-1 (else $JAX_PROCESS_ID)", flag_values=fv
    )
    flags.DEFINE_boolean(
        "auto-distributed",
        False,
        "let JAX detect the processes from the cluster (SLURM, Open MPI, Kubernetes)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "init-timeout",
        300,
        "seconds to wait for every process to join (a missing one ends the run)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "heartbeat-timeout",
        100,
        "seconds after which a silent (dead) process ends the whole run",
        flag_values=fv,
    )


def _apply_quick(config: ml_collections.ConfigDict, quick: Callable, argv: Sequence[str]) -> None:
    """`--quick`: the quick config's values, except for fields given as `--config.<f>=`."""
    given = {a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")}
    fast = quick(ml_collections.ConfigDict(config.to_dict()))
    with config.unlocked():
        for key, value in fast.items():
            if key not in given:
                config[key] = value


def run_command_line(
    argv: Sequence[str] | None,
    experiment: ModuleType,
    *,
    prog: str,
    default_workdir: str,
    exit_on: tuple[type[BaseException], ...] = (),
) -> tuple[CommandLine, dict[str, Any]]:
    """An experiment's `main`: parses the command line and calls `experiment.run` with it.

    Args:
      argv: as for :func:`parse_command_line`.
      experiment: the experiment module (see the module docstring): its
        docstring up to "Programmatic use" starts `--help`, its file is the
        default `--config`, `CONFIG_HELP` describes the fields and
        `quick_config` makes `--quick`.
      prog: the program name.
      default_workdir: the output folder used without `--workdir`.
      exit_on: exceptions of `run` that end the program with the message
        `"<prog>: <error>"` instead of a traceback.

    Returns:
      The parsed command line and what `experiment.run` returned.
    """
    cl = parse_command_line(
        argv,
        prog=prog,
        doc=experiment.__doc__.split("Programmatic use")[0],
        default_config=experiment.__file__,
        config_help=experiment.CONFIG_HELP,
        default_workdir=default_workdir,
        quick=experiment.quick_config,
        distributed=getattr(experiment, "DISTRIBUTED", False),
    )
    multi = False
    if cl.distributed is not None:
        from bnjax.training import distributed

        multi = distributed.initialize(**cl.distributed)
    try:
        out = experiment.run(
            cl.config,
            cl.workdir,
            data_dir=cl.data_dir,
            download=cl.download,
            resume=cl.resume,
            progress=cl.progress,
        )
    except BaseException as e:
        if multi:
            _end_process_group(prog, e, expected=isinstance(e, exit_on))
        if isinstance(e, exit_on):
            raise SystemExit(f"{prog}: {e}") from None
        raise
    return cl, out


def _end_process_group(prog: str, error: BaseException, *, expected: bool) -> None:
    """A failed process of a multi-process run: reports and exits at once (status 1).

    Skips the normal exit, whose `jax.distributed.shutdown` barrier would wait
    for the other processes (up to its timeout) while they wait in a collective
    for this one; exiting stops its heartbeats, so JAX's runtime ends the others
    after `--heartbeat-timeout` seconds.
    """
    import os
    import traceback

    import jax

    if not expected:
        traceback.print_exception(error)
    print(
        f"{prog}: process {jax.process_index()} of {jax.process_count()} failed: "
        f"{type(error).__name__}: {error}\n{prog}: ending this process now; the other "
        "processes stop when they miss its heartbeats (--heartbeat-timeout)",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def updated(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of `config` (unlocked, `config` itself unchanged) with `fields` set."""
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in fields.items():
        setattr(c, key, value)
    return c


def make_optimizer(name: str, learning_rate: float | optax.Schedule, momentum: float = 0.0):
    """`"sgd"` (plain), `"momentum"` (heavy ball), `"nesterov"` or `"adam"`.

    `learning_rate` is a constant or an optax schedule of the step count."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "nesterov":
        return optax.sgd(learning_rate, momentum=momentum, nesterov=True)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"optimizer must be 'sgd', 'momentum', 'nesterov' or 'adam', got {name!r}")


def load_data(
    dataset: str, data_dir: str | None = None, *, download: bool = False, flatten: bool = True
):
    """`(train_x, train_y), (test_x, test_y)`: float32 images in [0, 1], int32 labels."""
    from bnjax.experiments.data import load_dataset

    ds = load_dataset(dataset, data_dir=data_dir, download=download, flatten=flatten)
    return (ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` (NumPy scalars and arrays allowed) as indented JSON."""

    def default(o):
        if isinstance(o, np.generic | np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o)}")

    # Atomically (a temporary file renamed over `path`): another process of a
    # multi-process run may read `path` meanwhile (`--resume` reads config.json
    # while process 0 rewrites it) and must never see a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=default, allow_nan=True) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes dict rows as CSV (the columns are the union of the keys, in first-seen order)."""
    rows = list(rows)
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def quick_time(text: str) -> Callable:
    """Decorates an experiment's `quick_config` with how long `--quick` takes (measured),
    which `--help` shows next to the flag."""

    def mark(fn: Callable) -> Callable:
        fn.__quick_time__ = text
        return fn

    return mark


def pm(mean: float, std: float, n: int, fmt: str = ".4f") -> str:
    """`mean ± std` over `n` seeds; with one seed the spread is undefined: `± n/a`."""
    spread = f"{std:{fmt}}" if n > 1 else "n/a"
    return f"{mean:{fmt}} ± {spread}"


def first_step_reaching(steps: Sequence[int], values: Sequence[float], threshold: float):
    """The first step whose value is `>= threshold` (None if never)."""
    for s, v in zip(steps, values, strict=True):
        if v >= threshold:
            return int(s)
    return None


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore=()) -> list[str]:
    """Field names whose values differ between two config dicts (`ignore` excepted)."""
    keys = set(old) | set(new)
    norm = lambda v: json.loads(json.dumps(v, default=str))
    return sorted(k for k in keys if k not in ignore and norm(old.get(k)) != norm(new.get(k)))


def prepare_workdir(
    workdir: str | Path, config_dict: Mapping[str, Any], *, resume: bool, resumable: Sequence[str]
) -> Path:
    """Creates `workdir` and writes `config.json`; guards `--resume` and old checkpoints.

    Raises:
      ValueError: `resume` with a `config.json` that differs in a field not in
        `resumable`.
      FileExistsError: no `resume` but `workdir/checkpoints` holds checkpoints
        (training would end by failing to overwrite them).
    """
    from bnjax import training

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.json"
    if resume and cfg_path.exists():
        changed = config_changes(json.loads(cfg_path.read_text()), config_dict, resumable)
        if changed:
            raise ValueError(
                f"--resume: the config differs from the one in {cfg_path} in {changed}; "
                "use a fresh --workdir or the same config"
            )
    ckpt = workdir / "checkpoints"
    if not resume and training.latest_checkpoint_step(ckpt) is not None:
        raise FileExistsError(
            f"{ckpt} already holds checkpoints: pass --resume to continue that run, or use "
            "another --workdir (or delete the folder)"
        )
    import jax

    if jax.process_index() == 0:  # one writer in a multi-process run
        write_json(cfg_path, config_dict)
    return workdir


def train_side_by_side(
    nets: Mapping[str, tuple[Any, optax.GradientTransformation]],
    config: ml_collections.ConfigDict,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    workdir: Path,
    *,
    probe: Callable[[Any], dict[str, Any]] | None = None,
    batch_indices: Mapping[str, Callable[..., Any] | None] | None = None,
    resume: bool,
    progress: bool,
    desc: str,
    parallel: bool = True,
) -> tuple[dict[str, training.Run], training.FitResult]:
    """Trains `nets` (name -> `(model, optimizer)`) side by side (:func:`bnjax.training.fit`).

    Every net gets the seeds `config.seed, ..., config.seed + config.num_seeds - 1`
    (:func:`bnjax.training.create_train_states`: the same initial weights and data
    order for nets of the same shapes), mini-batches of `config.batch_size`,
    compiled calls of `config.steps_per_call` steps if the config has that
    field and it is not 0 (else one `lax.scan` per chunk), and an evaluation
    on `test` every `config.eval_every` steps in chunks of
    `config.eval_batch_size` (0: all at once) with `probe`. It trains to
    `config.num_steps`, checkpointing to `workdir/checkpoints` every
    `config.checkpoint_every` steps (0: only at the end). `batch_indices`
    (name -> data order, see `make_train_loop`; missing or `None`: shuffled
    epochs) gives a net another data order. `parallel`: one thread per net
    (:func:`bnjax.training.fit`), else one net after another.

    Returns:
      The :class:`bnjax.training.Run` of every net (its `evaluate` can be
      reused) and the :class:`bnjax.training.FitResult`.
    """
    from bnjax import training

    seeds = [config.seed + k for k in range(config.num_seeds)]
    eval_bs = config.eval_batch_size or None
    runs = {}
    for name, (model, tx) in nets.items():
        runs[name] = training.Run(
            state=training.create_train_states(model, tx, seeds, train[0][:1]),
            train_loop=training.make_train_loop(
                model,
                tx,
                batch_size=config.batch_size,
                steps_per_call=config.get("steps_per_call") or None,
                batch_indices=(batch_indices or {}).get(name),
            ),
            evaluate=training.make_eval_step(model, probe=probe, batch_size=eval_bs),
        )
    result = training.fit(
        runs,
        train,
        test,
        num_steps=config.num_steps,
        eval_every=config.eval_every,
        checkpoint_dir=workdir / "checkpoints",
        checkpoint_every=config.checkpoint_every or None,
        resume=resume,
        progress=progress,
        desc=desc,
        parallel=parallel,
    )
    return runs, result


def write_metrics(
    workdir: Path,
    config: ml_collections.ConfigDict,
    summary: Mapping[str, Any],
    result: training.FitResult,
    t0: float,
    **extra: Any,
) -> dict[str, Any]:
    """Writes and returns `workdir/metrics.json`.

    Its fields: `config`, `summary`, `extra` (in the order given),
    `seconds` (since `t0`, a :func:`time.perf_counter` time taken at the
    start of the run), `train_seconds`, `resumed_from`, `device` and
    `history` (from `result`). In a multi-process run only process 0 writes.
    """
    import jax

    metrics = {
        "config": config.to_dict(),
        "summary": summary,
        **extra,
        "seconds": time.perf_counter() - t0,
        "train_seconds": result.seconds,
        "resumed_from": result.resumed_from,
        "device": str(jax.devices()[0]),
        "history": result.history,
    }
    if jax.process_index() == 0:
        write_json(workdir / "metrics.json", metrics)
    return metrics


def series(
    history: Sequence[Mapping[str, Any]], run: str, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, values)` of one run's `key` in a :func:`bnjax.training.fit` history.

    `values` is float64 of shape `(evaluations, seeds, ...)`.
    """
    recs = [r for r in history if r["run"] == run]
    steps = np.array([r["step"] for r in recs], np.int64)
    vals = np.array([r[key] for r in recs], np.float64)
    return steps, vals


def new_figure(ncols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray[Any, Any]]:
    """A figure with `ncols` axes side by side, made without pyplot.

    The figure is not registered with pyplot and no backend is selected, so
    plotting does not change the state of the caller's session (its backend,
    its current figure); :func:`save_figure` renders it with Agg.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_figure(fig: Figure, path: Path, *, dpi: int) -> None:
    """Lays out `fig` (`tight_layout`) and writes it to `path` (a PNG at `dpi`)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
