"""Figure 1's BN network trained data-parallel, on 1 device, N devices or N processes.

The paper's MNIST network (784-100-100-100-10, sigmoid, batch norm before each
hidden sigmoid, plain SGD, mini-batches of 60, 50,000 steps: the "with BN" net
of `bnjax-figure1`, one seed), trained with :mod:`bnjax.training.parallel`: every
global mini-batch is split over all devices of all processes, the batch-norm
statistics are pooled exactly over the global batch (`axis_name="data"`),
the gradient is the global-batch gradient. The global batch sequence is the
single-process one (the same host-drawn epoch orders as `bnjax-figure1`'s
seed), so 1 device, 4 devices and 2 processes x 2 devices train the same
network up to float32 summation order. Each process loads only its share of
every batch; evaluation on the 10,000 test images is pooled over all
processes; orbax checkpoints are written by all processes together and resume
bit-identically; the progress bar, `metrics.json`, `results.md` and
`accuracy.png` come from process 0.

Run:

```python
bnjax-data-parallel --workdir runs/dp                    # one process, all its devices
XLA_FLAGS=--xla_force_host_platform_device_count=4 bnjax-data-parallel --quick
# two processes (each on its host, or both here), 2 simulated CPU devices each:
XLA_FLAGS=--xla_force_host_platform_device_count=2 bnjax-data-parallel --workdir runs/dp \\
    --coordinator-address 10.0.0.1:1234 --num-processes 2 --process-id 0   # host 0
... --process-id 1                                                           # host 1
```

The multi-process flags fall back to `$JAX_COORDINATOR_ADDRESS`,
`$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID`; `--auto-distributed` lets
JAX read them from SLURM / Open MPI / Kubernetes (the documentation's "Beyond one
device" guide has launch recipes).

Programmatic use: `results = run(get_config(), "runs/dp")` (after
`bnjax.training.distributed.initialize(...)` in a multi-process run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bnjax import training
from bnjax.experiments import _common
from bnjax.experiments.models import MLP
from bnjax.training import distributed, parallel

__all__ = ["CONFIG_HELP", "DISTRIBUTED", "get_config", "quick_config", "build", "run", "main"]

DISTRIBUTED = True  # _common.run_command_line: the multi-process flags, initialize() first

CONFIG_HELP = {
    "dataset": "'mnist' or 'fashion-mnist'",
    "hidden": "hidden layer widths",
    "activation": "hidden nonlinearity (the paper: sigmoid)",
    "init_std": "std of the Gaussian initial weights N(0, init_std^2)",
    "learning_rate": "plain SGD learning rate",
    "batch_size": "GLOBAL mini-batch size (divisible by the total number of devices)",
    "num_steps": "training steps",
    "seed": "the seed (initial weights and data order; bnjax-figure1's seed of the same number)",
    "eval_every": "evaluate on the test set every this many steps",
    "checkpoint_every": "save an orbax checkpoint every this many steps (0: only at the end)",
    "steps_per_call": "at most this many steps per compiled call (0: a whole chunk)",
    "bn_momentum": "EMA momentum of the BN population statistics",
    "bn_epsilon": "BN epsilon",
}


def get_config() -> ml_collections.ConfigDict:
    """Figure 1's BN net and schedule (`bnjax-figure1`'s defaults), one seed."""
    c = ml_collections.ConfigDict()
    c.dataset = "mnist"
    c.hidden = (100, 100, 100)
    c.activation = "sigmoid"
    c.init_std = 1.0
    c.learning_rate = 1.0
    c.batch_size = 60
    c.num_steps = 50_000
    c.seed = 0
    c.eval_every = 500
    c.checkpoint_every = 10_000
    c.steps_per_call = 0
    c.bn_momentum = 0.99
    c.bn_epsilon = 1e-5
    return c


def quick_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` shortened to a smoke test (600 steps)."""
    return _common.updated(
        get_config() if config is None else config,
        num_steps=600,
        eval_every=100,
        checkpoint_every=300,
    )


def build(config: ml_collections.ConfigDict, axis_name: str = "data"):
    """The BN network (batch norm pooled over `axis_name`) and its SGD optimizer."""
    bn = (
        ("momentum", config.bn_momentum),
        ("epsilon", config.bn_epsilon),
        ("axis_name", axis_name),
    )
    model = MLP(
        hidden=tuple(config.hidden),
        init_std=config.init_std,
        act=config.activation,
        use_bn=True,
        bn=bn,
    )
    return model, _common.make_optimizer("sgd", config.learning_rate)


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
    """Trains the network on every device of every process; writes the outputs from process 0.

    Every process calls this with the same arguments. `workdir` must be on a
    file system all processes see (the checkpoints are written jointly).

    Returns:
      The `metrics.json` content plus `state` (the final replicated
      :class:`bnjax.training.TrainState`, not written to JSON).
    """
    t0 = time.perf_counter()
    workdir = _common.prepare_workdir(
        workdir, config.to_dict(), resume=resume, resumable=_RESUMABLE
    )
    train, test = _common.load_data(config.dataset, data_dir, download=download)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    model, tx = build(config)
    with jax.default_device(jax.local_devices()[0]):
        key = jax.random.PRNGKey(config.seed)
        state = training.create_train_state(model, tx, key, train[0][:1])
    run_ = training.Run(
        state=parallel.replicate(state, mesh),
        train_loop=parallel.make_sharded_train_loop(
            model,
            tx,
            mesh,
            batch_size=config.batch_size,
            steps_per_call=config.steps_per_call or None,
        ),
        evaluate=parallel.make_sharded_eval_step(model, mesh),
    )
    result = training.fit(
        {"bn": run_},
        train,
        test,
        num_steps=config.num_steps,
        eval_every=config.eval_every,
        checkpoint_dir=workdir / "checkpoints",
        checkpoint_every=config.checkpoint_every or None,
        resume=resume,
        progress=progress,
        desc=f"data-parallel ({jax.process_count()} proc x {jax.local_device_count()} dev)",
        put_on_device=False,
    )
    steps, acc = (np.asarray(v) for v in _common.series(result.history, "bn", "accuracy"))
    summary = {
        "final_step": int(steps[-1]) if steps.size else 0,
        "final_accuracy": float(acc[-1]) if acc.size else None,
        "max_accuracy": float(acc.max()) if acc.size else None,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    metrics = _common.write_metrics(workdir, config, summary, result, t0)
    if distributed.is_main_process():
        _write_outputs(workdir, config, result.history, summary, metrics["seconds"])
    return dict(metrics, state=result.states["bn"])


def _write_outputs(workdir: Path, config, history, summary, seconds: float) -> None:
    steps, acc = _common.series(history, "bn", "accuracy")
    lines = [
        "# Figure 1's BN net, data-parallel: results",
        "",
        f"{summary['processes']} process(es) x {summary['local_devices']} device(s) "
        f"({summary['devices']} in all), global batch {config.batch_size}, "
        f"{config.num_steps:,} steps, seed {config.seed}, SGD lr {config.learning_rate:g}.",
        "",
        "| final step | final test accuracy | max test accuracy | wall time |",
        "|---|---|---|---|",
        f"| {summary['final_step']:,} | {summary['final_accuracy']:.4f} | "
        f"{summary['max_accuracy']:.4f} | {seconds:.0f} s |",
    ]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    fig, axes = _common.new_figure(1, figsize=(6, 4))
    axes[0].plot(steps, np.asarray(acc)[:, 0] if np.ndim(acc) > 1 else acc, color="tab:red")
    axes[0].set(xlabel="training steps", ylabel="test accuracy", title="With BN, data-parallel")
    axes[0].grid(alpha=0.3)
    _common.save_figure(fig, workdir / "accuracy.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    """The `bnjax-data-parallel` command (`--help` lists every option)."""
    from bnjax.experiments.data import DataError

    cl, out = _common.run_command_line(
        argv,
        sys.modules[__name__],
        prog="bnjax-data-parallel",
        default_workdir="runs/data_parallel",
        exit_on=(DataError, FileExistsError),
    )
    s = out["summary"]
    distributed.main_print(
        f"final test accuracy {s['final_accuracy']:.4f} after {s['final_step']:,} steps on "
        f"{s['processes']} process(es), {s['devices']} device(s); wrote {cl.workdir}/results.md, "
        f"metrics.json, accuracy.png ({out['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
