"""The driver experiments share: named runs trained side by side, evaluated, checkpointed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnjax.training.checkpoint import latest_checkpoint_step, restore_checkpoint, save_checkpoint
from bnjax.training.state import TrainState

__all__ = ["FitResult", "Run", "fit"]

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Run:
    """One named network trained by :func:`fit`.

    Attributes:
      state: its (seed-stacked) :class:`TrainState`.
      train_loop: from :func:`make_train_loop` (same `over_seeds` as `state`).
      evaluate: from :func:`make_eval_step`.
    """

    state: TrainState
    train_loop: Callable[..., tuple[TrainState, dict[str, Array]]]
    evaluate: Callable[[TrainState, Array, Array], dict[str, Array]]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      states: the final state of every run, by name.
      history: one record per evaluation and run: `{"run", "step",
        "train_loss", "train_accuracy", <eval metrics>}`; every metric is a
        list over seeds (nested lists for array-valued probes).
      seconds: wall time of this call (training and evaluation, compilation included).
      resumed_from: the checkpoint step the run continued from, or None.
    """

    states: dict[str, TrainState]
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None


def _tolist(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def _boundaries(start: int, num_steps: int, every: Sequence[int | None]) -> list[int]:
    points = {num_steps}
    for k in every:
        if k:
            points.update(range(k, num_steps, k))
    return sorted(p for p in points if p > start)


def fit(
    runs: Mapping[str, Run],
    train_data: tuple[Array, Array],
    eval_data: tuple[Array, Array],
    *,
    num_steps: int,
    eval_every: int,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    parallel: bool = True,
    put_on_device: bool = True,
) -> FitResult:
    """Trains several named runs side by side to `num_steps`, evaluating every `eval_every`.

    Steps run in compiled chunks between consecutive multiples of
    `eval_every` and `checkpoint_every` (and `num_steps`): one dispatch
    per run and chunk. After a chunk ending on a multiple of `eval_every` (or
    at the end) every run is evaluated on `eval_data`; after one ending on a
    multiple of `checkpoint_every` (and at the end) the states and the
    history are saved to `checkpoint_dir` with orbax.

    With `resume=True` and a checkpoint in `checkpoint_dir`, training
    continues from it (its states and history replace the given ones) and ends
    with exactly the states of an uninterrupted run, since the data order
    depends only on `(rng, step)` and the chunk boundaries are the same.

    Args:
      runs: name -> :class:`Run`.
      train_data: `(images, labels)`, the whole training set (put on the device once).
      eval_data: `(images, labels)` for evaluation.
      num_steps: the total number of steps (counting those before a resume).
      eval_every: evaluation interval in steps.
      checkpoint_dir: where to save checkpoints (None: never).
      checkpoint_every: checkpoint interval (None: only at the end).
      resume: continue from the newest checkpoint in `checkpoint_dir` if any.
      progress: show a tqdm bar (steps, elapsed time, latest mean accuracies).
      desc: the bar's label.
      parallel: run the runs' chunks (training and evaluation) in one thread per
        run, so several runs use several CPU cores (the results are the same
        either way: the runs are independent).
      put_on_device: put `train_data` and `eval_data` on the default device
        once (for the loops of :func:`make_train_loop`); `False` passes them
        as given, e.g. host arrays for :func:`bnjax.training.parallel.make_sharded_train_loop`,
        which feeds each process its share of every batch.

    Several processes (`jax.distributed`): every process calls `fit` with the
    same arguments and states replicated over the global mesh
    (:func:`bnjax.training.parallel.replicate`); checkpoints are written and read by all
    processes together through orbax (`checkpoint_dir` on a file system every
    process sees), and the progress bar is shown by process 0 only.

    Returns:
      A :class:`FitResult`.
    """
    if eval_every < 1 or num_steps < 0:
        raise ValueError(f"need eval_every >= 1 and num_steps >= 0, got {eval_every}, {num_steps}")
    t0 = time.perf_counter()
    states = {name: r.state for name, r in runs.items()}
    states, history, resumed_from = _resume(states, checkpoint_dir, num_steps, resume)
    start = resumed_from or 0
    put = jax.device_put if put_on_device else (lambda a: a)
    train_x, train_y = (put(a) for a in train_data)
    eval_x, eval_y = (put(a) for a in eval_data)

    def chunk(name: str, state: TrainState, length: int, evaluate: bool):
        r = runs[name]
        state, train_metrics = r.train_loop(state, train_x, train_y, num_steps=length)
        metrics = r.evaluate(state, eval_x, eval_y) if evaluate else None
        return jax.block_until_ready((state, train_metrics, metrics))

    bar = _progress_bar(progress, num_steps, start, desc)
    # One thread per run: JAX runs executions from different threads concurrently (async
    # dispatch from one thread serializes them), so the runs share the CPU cores.
    pool = ThreadPoolExecutor(max_workers=len(runs)) if parallel and len(runs) > 1 else None
    step = start
    try:
        for end in _boundaries(start, num_steps, (eval_every, checkpoint_every)):
            evaluate = end % eval_every == 0 or end == num_steps
            args = [(name, states[name], end - step, evaluate) for name in runs]
            outs = list(pool.map(lambda a: chunk(*a), args) if pool else (chunk(*a) for a in args))
            advanced, step = end - step, end
            states.update({name: out[0] for name, out in zip(runs, outs, strict=True)})
            latest = _record(history, step, runs, outs) if evaluate else {}
            if bar is not None:
                if latest:
                    bar.set_postfix(latest, refresh=False)
                bar.update(advanced)
            at_checkpoint = checkpoint_every and step % checkpoint_every == 0
            if checkpoint_dir is not None and (at_checkpoint or step == num_steps):
                save_checkpoint(checkpoint_dir, step, states, {"step": step, "history": history})
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown()
    jax.block_until_ready(states)
    return FitResult(states, history, time.perf_counter() - t0, resumed_from)


def _resume(states, checkpoint_dir, num_steps: int, resume: bool):
    """`(states, history, resumed_from)`: the newest checkpoint's if resuming, else fresh
    (`resumed_from` is then None)."""
    if not (resume and checkpoint_dir is not None):
        return states, [], None
    if latest_checkpoint_step(checkpoint_dir) is None:
        return states, [], None
    states, meta = restore_checkpoint(checkpoint_dir, states)
    start = int(meta["step"])
    if start > num_steps:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} is at step {start}, past num_steps={num_steps}"
        )
    return states, list(meta.get("history", [])), start


def _progress_bar(enabled: bool, total: int, start: int, desc: str):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def _record(history: list, step: int, runs, outs) -> dict[str, str]:
    """Appends one record per run to `history`; returns the runs' mean accuracies."""
    latest = {}
    for name, (_, train_metrics, metrics) in zip(runs, outs, strict=True):
        record = {"run": name, "step": step}
        record.update({f"train_{k}": v for k, v in train_metrics.items()})
        record.update(metrics)
        history.append(_tolist(record))
        latest[name] = f"{float(np.mean(metrics['accuracy'])):.4f}"
    return latest
