"""Compiled multi-step training loops: `n` steps per dispatch, vmapped over seeds."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax.training._rng import data_key
from bnjax.training.data_order import epoch_batch_indices
from bnjax.training.state import TrainState, cross_entropy_loss
from bnjax.training.steps import LossFn, StepProbe, make_train_step

__all__ = ["make_train_loop"]

Array = jax.Array


def make_train_loop(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    loss_fn: LossFn = cross_entropy_loss,
    over_seeds: bool = True,
    steps_per_call: int | None = None,
    probe: StepProbe | None = None,
    per_step: bool = False,
    batch_indices: Callable[..., Array] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """`loop(state, images, labels, num_steps) -> (state, metrics)`: `num_steps` compiled steps.

    The whole training set (`images (N, ...)`, `labels (N,)`) stays on the
    device; each step gathers its mini-batch of `batch_size` examples by
    :func:`epoch_batch_indices` from the state's data key, so nothing crosses
    the host boundary inside a chunk. The steps run in one `lax.scan`; with
    `over_seeds` (default) the whole loop is `jax.vmap`-ed over the leading
    seed axis of `state` (all seeds share the data, each has its own order).
    Jitted, with `num_steps` static (one compilation per distinct chunk length).

    `steps_per_call=k`: instead, a Python loop over jitted calls of `k` steps
    each, every call a *fully unrolled* scan (no `while` loop; the last call
    may be shorter; the chunk's batch indices are drawn once and sliced per
    call). On XLA:CPU, convolutions inside a `while` loop (a rolled
    `lax.scan`) run several times slower than outside one (measured: 20
    ConvNet steps 5.8 s rolled, 1.0 s unrolled, 1.2 s as a Python loop of
    jitted single steps), so models with convolutions want `k` of about 10-20
    (compile time grows with `k`); dense models run fastest rolled (the
    default). Same batches and the same result either way.

    `probe`: per-step extra metrics (see :func:`make_train_step`);
    `per_step=True`: return every step's metrics (a trajectory, e.g. for
    :func:`bnjax.experiments.dynamics.trace`) instead of their mean over the chunk.

    `batch_indices`: the data order, a function with the signature of
    :func:`epoch_batch_indices` (the default: shuffled epochs, i.i.d.
    mini-batches), e.g. :func:`class_grouped_batch_indices` for mini-batches
    of few classes each.

    Returns:
      The new state and the mean training `loss` and `accuracy` (and probe
      metrics) over the chunk's steps (shape `(seeds,)` with `over_seeds`);
      with `per_step`, every step's values (shape `(seeds, num_steps)`).
    """
    if steps_per_call is not None and steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1 or None, got {steps_per_call}")
    sample = epoch_batch_indices if batch_indices is None else batch_indices

    def indices(state: TrainState, num_steps: int, num_examples: int) -> Array:
        return sample(data_key(state.rng), state.step, num_steps, num_examples, batch_size)

    run_steps = functools.partial(
        _run_steps,
        make_train_step(model, tx, loss_fn, probe=probe),
        unroll=steps_per_call is not None,
        per_step=per_step,
    )
    rolled = _rolled_loop(run_steps, indices, over_seeds)
    if steps_per_call is None:
        return rolled
    return _unrolled_loop(run_steps, indices, rolled, steps_per_call, over_seeds, per_step)


def _check_data(images: Array, labels: Array) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images and labels disagree on the number of examples: images "
            f"{images.shape}, labels {labels.shape}"
        )


def _run_steps(step_fn, state, images, labels, idx, *, unroll: bool, per_step: bool):
    """The steps of the batches `idx (num_steps, batch_size)` in one `lax.scan`."""

    def body(s, i):
        return step_fn(s, images[i], labels[i])

    state, metrics = lax.scan(body, state, idx, unroll=unroll)
    return state, metrics if per_step else jax.tree.map(lambda m: jnp.mean(m, 0), metrics)


def _rolled_loop(run_steps, indices, over_seeds: bool):
    """The whole chunk in one jitted call (batch indices drawn inside)."""

    def one_seed(state, images, labels, *, num_steps):
        return run_steps(state, images, labels, indices(state, num_steps, images.shape[0]))

    @functools.partial(jax.jit, static_argnames="num_steps")
    def loop(state: TrainState, images: Array, labels: Array, num_steps: int):
        _check_data(images, labels)
        f = functools.partial(one_seed, num_steps=num_steps)
        if over_seeds:
            f = jax.vmap(f, in_axes=(0, None, None))
        return f(state, images, labels)

    return loop


def _unrolled_loop(run_steps, indices, rolled, steps_per_call: int, over_seeds, per_step):
    """A Python loop over jitted calls of `steps_per_call` unrolled steps each."""

    @functools.partial(jax.jit, static_argnames=("num_steps", "num_examples"))
    def chunk_indices(state: TrainState, num_steps: int, num_examples: int):
        f = functools.partial(indices, num_steps=num_steps, num_examples=num_examples)
        return jax.vmap(f)(state) if over_seeds else f(state)

    @jax.jit
    def call(state: TrainState, images: Array, labels: Array, idx: Array):
        f = jax.vmap(run_steps, in_axes=(0, None, None, 0)) if over_seeds else run_steps
        return f(state, images, labels, idx)

    def loop(state: TrainState, images: Array, labels: Array, num_steps: int):
        if num_steps <= 0:
            return rolled(state, images, labels, num_steps=0)
        _check_data(images, labels)
        # The whole chunk's batch indices at once (its epoch permutations drawn once), each
        # call of k steps gets its slice: the same batches as k-step chunks would draw.
        idx = chunk_indices(state, num_steps=num_steps, num_examples=images.shape[0])
        done, parts = 0, []
        while done < num_steps:
            k = min(steps_per_call, num_steps - done)
            part = idx[:, done : done + k] if over_seeds else idx[done : done + k]
            state, metrics = call(state, images, labels, part)
            parts.append((k, metrics))
            done += k
        return state, _combine(parts, per_step, axis=1 if over_seeds else 0)

    return loop


def _combine(parts: list, per_step: bool, axis: int):
    """The metrics of consecutive calls `[(steps, metrics), ...]` as one chunk's."""
    if per_step:
        return jax.tree.map(lambda *ms: jnp.concatenate(ms, axis), *[m for _, m in parts])
    done = sum(k for k, _ in parts)
    return jax.tree.map(
        lambda *ms: sum(k * m for (k, _), m in zip(parts, ms, strict=True)) / done,
        *[m for _, m in parts],
    )
