"""Training utilities: a train-state pytree, compiled multi-step loops over seeds, orbax.

The pieces, from small to large (each usable on its own):

* :class:`TrainState`: ``step``, ``params``, ``batch_stats``, ``opt_state``,
  ``rng`` (a flax ``struct`` pytree: jit-, vmap- and checkpoint-friendly).
  :func:`init_state` makes one; :func:`init_states` makes one per seed,
  stacked on a leading "seed" axis.
* :func:`make_train_step`: one SGD step of a flax model with batch norm
  (``model.apply(..., train=True, mutable=["batch_stats"])``), pure, no jit.
* :func:`epoch_batch_indices`: the mini-batches of steps ``[s, s + n)``: shuffled
  epochs (a fresh permutation of the training set per epoch, drawn on the host by
  :func:`epoch_permutation`; the last incomplete batch dropped), a pure function
  of ``(key, step)`` so a resumed run sees exactly the batches of an
  uninterrupted one.
* :func:`make_train_loop`: ``n`` steps compiled into one ``lax.scan`` with the
  mini-batches sampled inside from the whole training set on the device,
  ``jax.vmap``-ed over seeds and jitted: one dispatch per ``n`` steps.
* :func:`make_eval_step`: accuracy / loss in inference mode (population
  statistics) on a whole evaluation set, plus optional probes of intermediates.
* :func:`save_checkpoint` / :func:`restore_checkpoint`: orbax, state plus
  JSON-able metadata (for example the metric history).
* :func:`fit`: the loop that experiments share: several named runs trained
  side by side in chunks (one thread per run, so they share the CPU cores),
  evaluated every ``eval_every`` steps, checkpointed every ``checkpoint_every``
  steps, resumable (bit-identical to an uninterrupted run), with a tqdm bar.

Performance note (CPU): a step of the paper's MLP at batch 60 is dominated by
its matrix products (about 26 MFLOP); the scan-compiled loop runs within ~20%
of a loop of the bare products, so what it removes is the per-step Python,
dispatch and host-to-device cost of a one-jitted-step-per-iteration loop.

Example (3 seeds of the paper's MNIST net in parallel)::

    model, tx = MLP(use_bn=True), optax.sgd(1.0)
    states = init_states(model, tx, seeds=jnp.arange(3), sample_input=train_x[:1])
    loop = make_train_loop(model, tx, batch_size=60)
    evaluate = make_eval_step(model)
    states, metrics = loop(states, train_x, train_y, num_steps=500)   # 500 steps x 3 seeds
    evaluate(states, test_x, test_y)["accuracy"]                     # shape (3,)

The model must take ``train`` as a keyword (``model.apply(v, x, train=...)``);
models without batch norm simply have an empty ``batch_stats``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

__all__ = [
    "TrainState",
    "Run",
    "FitResult",
    "cross_entropy_loss",
    "init_state",
    "init_states",
    "state_from_variables",
    "make_train_step",
    "epoch_batch_indices",
    "epoch_permutation",
    "class_grouped_batch_indices",
    "make_train_loop",
    "make_eval_step",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint_step",
    "fit",
]

Array = jax.Array
PyTree = Any
LossFn = Callable[[Array, Array], Array]
StepProbe = Callable[..., dict[str, Array]]

_DATA_STREAM = 0x0DA7A  # fold_in tag: the data-order key of a state's rng


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: int32 scalar, steps taken (``(seeds,)`` when stacked over seeds).
      params: the model's ``"params"`` collection.
      batch_stats: the model's ``"batch_stats"`` collection (``{}`` without BN).
      opt_state: the optax state.
      rng: a raw ``uint32[2]`` PRNG key; the data order and any per-step
        randomness (``"dropout"``) are derived from it by ``fold_in``, never by
        splitting, so they depend only on ``(rng, step)``.
    """

    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: Array

    def variables(self) -> dict[str, PyTree]:
        """``{"params": ..., "batch_stats": ...}`` for ``model.apply`` (no empty collections)."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def cross_entropy_loss(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy; ``logits (B, C)``, integer ``labels (B,)`` -> scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: Array, sample_input: Array
) -> TrainState:
    """A fresh :class:`TrainState` for one seed.

    Args:
      model: a flax module called as ``model(x, train=...)``.
      tx: the optax optimizer.
      rng: a raw PRNG key (``jax.random.PRNGKey(seed)``); the parameters are
        initialized from ``fold_in(rng, 1)``, ``rng`` itself is kept for the data order.
      sample_input: an input batch with the training shapes (e.g. ``x[:1]``).
    """
    variables = model.init(jax.random.fold_in(rng, 1), sample_input, train=False)
    return state_from_variables(variables, tx, rng)


def state_from_variables(
    variables: Mapping[str, PyTree], tx: optax.GradientTransformation, rng: Array
) -> TrainState:
    """A :class:`TrainState` at step 0 from initialized flax ``variables`` (fresh optimizer)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jnp.asarray(rng),
    )


def init_states(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seeds: Sequence[int] | Array,
    sample_input: Array,
) -> TrainState:
    """One :class:`TrainState` per seed, stacked: every leaf gets a leading axis ``len(seeds)``.

    Seed ``s`` uses ``jax.random.PRNGKey(s)``; two models with the same
    parameter shapes get the same initial weights and the same data order for
    the same seed (a paired comparison).

    Example::

        states = init_states(MLP(), optax.sgd(1.0), seeds=[0, 1, 2], sample_input=x[:1])
        states.step.shape   # (3,)
    """
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda k: init_state(model, tx, k, sample_input))(keys)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy_loss,
    *,
    probe: StepProbe | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """One training step ``(state, x, y) -> (new_state, {"loss", "accuracy"})`` (pure, not jitted).

    Batch norm runs in training mode (mini-batch statistics, Algorithm 1) and
    its population statistics are updated; ``loss_fn(logits, y)`` is
    differentiated w.r.t. ``state.params``; the per-step ``"dropout"`` key is
    ``fold_in(state.rng, state.step)``.

    ``probe``: optional ``probe(params=, grads=, updates=, intermediates=,
    logits=, labels=) -> dict`` of extra metrics of this step, from its own
    forward pass (training mode, the parameters *before* the update):
    ``updates`` are the optimizer's parameter deltas, ``intermediates`` the
    model's ``"intermediates"`` collection (made mutable for the probe; see
    :mod:`bnjax.models` and :func:`bnjax.dynamics.layer_probe`). Its metrics are
    added to ``"loss"`` and ``"accuracy"``.

    ``axis_name``: the data-parallel form of the same step, written per device
    for a mapped axis (``jax.shard_map`` over a mesh axis, as
    :func:`bnjax.parallel.data_parallel` does, or ``pmap``): ``x`` and ``y``
    are the device's shard of the global batch, the loss is the ``lax.pmean``
    over ``axis_name`` of the per-device ``loss_fn`` (the global-batch mean for
    equal shards), so its gradient with respect to the replicated parameters
    is the full-batch gradient (``shard_map`` with ``check_vma=True`` sums the
    per-device contributions of a replicated value); the metrics (``"loss"``,
    ``"accuracy"`` and every floating probe metric) are ``pmean``-ed too, and
    identical on every device. The model's batch-norm layers should pool over
    the same axis (``BatchNorm(axis_name=...)``) so the statistics are those
    of the global batch. The ``"dropout"`` key is additionally folded with
    the device's ``lax.axis_index(axis_name)``, so devices draw independent
    masks. ``None`` (default): the single-device step.
    """
    mutable = ["batch_stats", "intermediates"] if probe is not None else ["batch_stats"]

    def over_devices(v: Array) -> Array:
        return v if axis_name is None else lax.pmean(v, axis_name)

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        rngs = {"dropout": key}

        def loss(params):
            variables = state.replace(params=params).variables()
            logits, updates = model.apply(variables, x, train=True, mutable=mutable, rngs=rngs)
            return over_devices(loss_fn(logits, y)), (logits, updates)

        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, deltas),
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        acc = over_devices(jnp.mean(jnp.argmax(logits, -1) == y))
        metrics = {"loss": value, "accuracy": acc}
        if probe is not None:
            extra = probe(
                params=state.params,
                grads=grads,
                updates=deltas,
                intermediates=updates.get("intermediates", {}),
                logits=logits,
                labels=y,
            )
            floating = lambda v: jnp.issubdtype(jnp.result_type(v), jnp.floating)
            metrics.update(jax.tree.map(lambda v: over_devices(v) if floating(v) else v, extra))
        return new, metrics

    return step


def _host_permutations(words: np.ndarray, num_examples: int) -> np.ndarray:
    """One NumPy permutation of ``range(num_examples)`` per uint32 word pair (leading dims kept)."""
    words = np.asarray(words, np.uint32)
    out = np.empty(words.shape[:-1] + (num_examples,), np.int32)
    for i in np.ndindex(words.shape[:-1]):
        out[i] = np.random.default_rng([int(w) for w in words[i]]).permutation(num_examples)
    return out


def _raw_key(key: Array) -> Array:
    """``key`` as a raw key array (``uint32[2]`` for the default PRNG; typed keys unwrapped)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key)


def epoch_permutation(key: Array, num_examples: int) -> Array:
    """The example order of one epoch: a permutation of ``range(num_examples)`` drawn from ``key``.

    Drawn on the host by NumPy (``np.random.default_rng(key words).permutation``,
    a Fisher-Yates shuffle, ~0.5 ms for 60,000 examples) through
    ``jax.pure_callback``: XLA:CPU's sort makes ``jax.random.permutation`` cost
    ~25 ms for 60,000, which was ~8% of a Figure 1 training chunk. A pure function
    of ``key`` (old-style uint32 or typed), usable under ``jit`` and ``vmap``.

    Returns:
      int32 array ``(num_examples,)``.
    """
    key = jnp.asarray(_raw_key(key), jnp.uint32)
    out = jax.ShapeDtypeStruct(key.shape[:-1] + (num_examples,), jnp.int32)
    return jax.pure_callback(
        functools.partial(_host_permutations, num_examples=num_examples),
        out,
        key,
        vmap_method="expand_dims",
    )


def epoch_batch_indices(
    key: Array, start_step: Array | int, num_steps: int, num_examples: int, batch_size: int
) -> Array:
    """Example indices of the mini-batches of steps ``start_step .. start_step + num_steps - 1``.

    Shuffled epochs: epoch ``e`` visits the examples in the order
    :func:`epoch_permutation` ``(fold_in(key, e), num_examples)``, cut into
    ``num_examples // batch_size`` batches (the remainder is dropped); step
    ``t`` takes batch ``t % steps_per_epoch`` of epoch ``t // steps_per_epoch``.
    ``start_step`` may be traced (jit/vmap); ``num_steps`` must be static.

    Returns:
      int32 array ``(num_steps, batch_size)``.

    Example::

        >>> idx = epoch_batch_indices(jax.random.PRNGKey(0), 0, 10, 60, 6)
        >>> sorted(idx.ravel().tolist()) == list(range(60))   # one epoch: a permutation
        True
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be in [1, num_examples={num_examples}], got {batch_size}"
        )
    spe = num_examples // batch_size
    return _steps_of_epochs(
        key,
        start_step,
        num_steps,
        spe,
        batch_size,
        lambda keys: epoch_permutation(keys, num_examples),
    )


def _steps_of_epochs(key, start, num_steps: int, spe: int, batch_size: int, epoch_order):
    """Rows ``start .. start + num_steps - 1`` of the epochs' batches (see the callers).

    ``epoch_order(keys)`` maps the epoch keys ``(E, 2)`` to each epoch's example
    order ``(E, >= spe * batch_size)``, whose consecutive ``batch_size`` slices
    are the epoch's ``spe`` mini-batches.
    """
    start = jnp.asarray(start, jnp.int32)
    first_epoch = start // spe
    touched = num_steps // spe + 2  # static bound on the epochs a chunk can touch
    epochs = first_epoch + jnp.arange(touched, dtype=jnp.int32)
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(epochs)
    order = epoch_order(keys)
    t = start + jnp.arange(num_steps, dtype=jnp.int32)
    rows = (t // spe - first_epoch)[:, None]
    cols = ((t % spe) * batch_size)[:, None] + jnp.arange(batch_size, dtype=jnp.int32)
    return order[rows, cols].astype(jnp.int32)


def _class_chunks(labels: np.ndarray, classes_per_batch: int, batch_size: int):
    """``(chunk, chunks per class, steps per epoch)`` of a class-grouped order, validated."""
    if classes_per_batch < 1 or batch_size % classes_per_batch:
        raise ValueError(
            f"classes_per_batch={classes_per_batch} must be >= 1 and divide batch_size="
            f"{batch_size}"
        )
    chunk = batch_size // classes_per_batch
    _, counts = np.unique(labels, return_counts=True)
    if classes_per_batch > counts.size:
        raise ValueError(
            f"classes_per_batch={classes_per_batch} exceeds the {counts.size} classes in labels"
        )
    per_class = counts // chunk
    spe = int(per_class.sum()) // classes_per_batch
    if spe < 1 or per_class.max() > spe:
        raise ValueError(
            f"cannot cut batches of {batch_size} holding {classes_per_batch} classes of "
            f"{chunk} examples each from class counts {counts.tolist()}: one class would "
            "fill more than 1/classes_per_batch of the epoch (or no batch fits)"
        )
    return chunk, per_class, spe


def _host_class_grouped(words, labels, classes_per_batch, batch_size):
    """One class-grouped epoch per uint32 word pair: ``(..., spe * batch_size)`` int32."""
    chunk, per_class, spe = _class_chunks(labels, classes_per_batch, batch_size)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    words = np.asarray(words, np.uint32)
    out = np.empty(words.shape[:-1] + (spe * batch_size,), np.int32)
    k = classes_per_batch
    for i in np.ndindex(words.shape[:-1]):
        rng = np.random.default_rng([int(w) for w in words[i]])
        chunks = []
        for c in range(classes.size):
            idx = rng.permutation(members[c])
            chunks.append(idx[: idx.size // chunk * chunk].reshape(-1, chunk))
        # Keep spe * k chunks: drop the surplus (< k chunks) from random classes.
        left = per_class.astype(np.int64).copy()
        for _ in range(int(left.sum()) - spe * k):
            left[rng.choice(classes.size, p=left / left.sum())] -= 1
        # Batch after batch, k different classes drawn in proportion to the chunks each
        # has left, without replacement (Gumbel top-k); a class with as many chunks left
        # as there are batches left is taken first, which keeps every later batch
        # feasible (each class has at most `batches left` chunks, k * `batches left` in all).
        gumbel = rng.gumbel(size=(spe, classes.size))
        picks = np.empty((spe, k), np.int64)
        with np.errstate(divide="ignore"):
            for b in range(spe):
                w = np.log(left) + gumbel[b]
                w[left == spe - b] = np.inf
                pick = np.argpartition(-w, k - 1)[:k]
                picks[b] = pick
                left[pick] -= 1
        batches = np.empty((spe, k, chunk), np.int64)
        for c in range(classes.size):  # each class's chunks in the order its batches come
            where = picks == c
            batches[where] = chunks[c][: int(where.sum())]
        batches = batches.reshape(spe, batch_size)
        out[i] = rng.permuted(batches, axis=1).ravel()  # classes mixed within a batch
    return out


def class_grouped_batch_indices(
    labels: np.ndarray | Sequence[int], classes_per_batch: int
) -> Callable[..., Array]:
    """A non-i.i.d. data order: every mini-batch holds examples of exactly ``k`` classes.

    Returns ``indices(key, start_step, num_steps, num_examples, batch_size)``
    with the signature and contract of :func:`epoch_batch_indices` (a pure
    function of ``(key, step)``, usable under ``jit``/``vmap``; pass it to
    :func:`make_train_loop` as ``batch_indices``). Epoch ``e``, drawn on the
    host from ``fold_in(key, e)``: each class's examples shuffled and cut into
    chunks of ``batch_size // k``; each of the ``steps_per_epoch`` batches
    takes one chunk of each of ``k`` different classes, drawn at random in
    proportion to the chunks the classes have left (so the classes that meet
    in a batch change from batch to batch: no fixed partners for a network to
    learn), the examples shuffled within each batch. An epoch uses every
    example at most once and drops fewer than ``batch_size // k`` examples per
    class plus fewer than ``k`` chunks.

    This is the setting of Ioffe (2017), Sec. 4.3 (mini-batches with few
    labels, several examples per label), under which batch norm's inference
    output and its training output disagree.

    Args:
      labels: the integer class of every training example, ``(N,)`` (on the host).
      classes_per_batch: ``k``; must divide the batch size, and no class may
        hold more than ``1/k`` of the examples.

    Raises:
      ValueError: (when called) ``num_examples != len(labels)``, ``k`` not
        dividing ``batch_size``, more classes asked than exist, or a class too
        large for ``k``.

    Example::

        >>> y = np.repeat(np.arange(10), 60)
        >>> f = class_grouped_batch_indices(y, 2)
        >>> idx = np.asarray(f(jax.random.PRNGKey(0), 0, 3, 600, 20))
        >>> [len(set(y[b])) for b in idx]
        [2, 2, 2]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")

    def indices(key, start_step, num_steps: int, num_examples: int, batch_size: int) -> Array:
        if num_examples != labels.size:
            raise ValueError(
                f"class_grouped_batch_indices was built for {labels.size} labels, but the "
                f"data has {num_examples} examples"
            )
        _, _, spe = _class_chunks(labels, classes_per_batch, batch_size)
        host = functools.partial(
            _host_class_grouped,
            labels=labels,
            classes_per_batch=classes_per_batch,
            batch_size=batch_size,
        )

        def order(keys):
            keys = jnp.asarray(_raw_key(keys), jnp.uint32)
            out = jax.ShapeDtypeStruct(keys.shape[:-1] + (spe * batch_size,), jnp.int32)
            return jax.pure_callback(host, out, keys, vmap_method="expand_dims")

        return _steps_of_epochs(key, start_step, num_steps, spe, batch_size, order)

    indices.steps_per_epoch = lambda batch_size: _class_chunks(  # type: ignore[attr-defined]
        labels, classes_per_batch, batch_size
    )[2]
    return indices


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
    """``loop(state, images, labels, num_steps) -> (state, metrics)``: ``num_steps`` compiled steps.

    The whole training set (``images (N, ...)``, ``labels (N,)``) stays on the
    device; each step gathers its mini-batch of ``batch_size`` examples by
    :func:`epoch_batch_indices` from the state's data key, so nothing crosses
    the host boundary inside a chunk. The steps run in one ``lax.scan``; with
    ``over_seeds`` (default) the whole loop is ``jax.vmap``-ed over the leading
    seed axis of ``state`` (all seeds share the data, each has its own order).
    Jitted, with ``num_steps`` static (one compilation per distinct chunk length).

    ``steps_per_call=k``: instead, a Python loop over jitted calls of ``k`` steps
    each, every call a *fully unrolled* scan (no ``while`` loop; the last call
    may be shorter; the chunk's batch indices are drawn once and sliced per
    call). On XLA:CPU, convolutions inside a ``while`` loop (a rolled
    ``lax.scan``) run several times slower than outside one (measured: 20
    ConvNet steps 5.8 s rolled, 1.0 s unrolled, 1.2 s as a Python loop of
    jitted single steps), so models with convolutions want ``k`` of about 10-20
    (compile time grows with ``k``); dense models run fastest rolled (the
    default). Same batches and the same result either way.

    ``probe``: per-step extra metrics (see :func:`make_train_step`);
    ``per_step=True``: return every step's metrics (a trajectory, e.g. for
    :func:`bnjax.dynamics.trace`) instead of their mean over the chunk.

    ``batch_indices``: the data order, a function with the signature of
    :func:`epoch_batch_indices` (the default: shuffled epochs, i.i.d.
    mini-batches), e.g. :func:`class_grouped_batch_indices` for mini-batches
    of few classes each.

    Returns:
      The new state and the mean training ``loss`` and ``accuracy`` (and probe
      metrics) over the chunk's steps (shape ``(seeds,)`` with ``over_seeds``);
      with ``per_step``, every step's values (shape ``(seeds, num_steps)``).
    """
    if steps_per_call is not None and steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1 or None, got {steps_per_call}")
    step_fn = make_train_step(model, tx, loss_fn, probe=probe)
    sample = epoch_batch_indices if batch_indices is None else batch_indices
    unroll = steps_per_call is not None

    def check(images, labels):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels disagree on the number of examples: images "
                f"{images.shape}, labels {labels.shape}"
            )

    def indices(state, *, num_steps, num_examples):
        key = jax.random.fold_in(state.rng, _DATA_STREAM)
        return sample(key, state.step, num_steps, num_examples, batch_size)

    def run_steps(state, images, labels, idx):
        def body(s, i):
            return step_fn(s, images[i], labels[i])

        state, metrics = lax.scan(body, state, idx, unroll=unroll)
        return state, metrics if per_step else jax.tree.map(lambda m: jnp.mean(m, 0), metrics)

    def one_seed(state, images, labels, *, num_steps):
        idx = indices(state, num_steps=num_steps, num_examples=images.shape[0])
        return run_steps(state, images, labels, idx)

    @functools.partial(jax.jit, static_argnames="num_steps")
    def compiled(state: TrainState, images: Array, labels: Array, num_steps: int):
        check(images, labels)
        f = functools.partial(one_seed, num_steps=num_steps)
        if over_seeds:
            f = jax.vmap(f, in_axes=(0, None, None))
        return f(state, images, labels)

    if steps_per_call is None:
        return compiled

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
            return compiled(state, images, labels, num_steps=0)
        check(images, labels)
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
        if per_step:
            axis = 1 if over_seeds else 0
            return state, jax.tree.map(
                lambda *ms: jnp.concatenate(ms, axis), *[m for _, m in parts]
            )
        mean = jax.tree.map(
            lambda *ms: sum(k * m for (k, _), m in zip(parts, ms, strict=True)) / done,
            *[m for _, m in parts],
        )
        return state, mean

    return loop


def make_eval_step(
    model: nn.Module,
    *,
    loss_fn: LossFn = cross_entropy_loss,
    probe: Callable[[PyTree], dict[str, Array]] | None = None,
    batch_size: int | None = None,
    over_seeds: bool = True,
    batch_statistics: bool = False,
) -> Callable[[TrainState, Array, Array], dict[str, Array]]:
    """``evaluate(state, images, labels) -> metrics`` in inference mode (population statistics).

    Args:
      model: the flax module.
      loss_fn: as for training; reported as ``"loss"`` next to ``"accuracy"``.
      probe: optional ``probe(intermediates) -> dict`` of extra metrics computed
        from the ``"intermediates"`` collection the model sows (e.g. the
        percentiles of one unit, see :mod:`bnjax.models`), over the whole set.
      batch_size: evaluate in chunks of this many examples (must divide ``N``)
        to bound memory; default: the whole set at once.
      over_seeds: ``jax.vmap`` over the leading seed axis of ``state``.
      batch_statistics: evaluate in *training* mode instead (``train=True``):
        every chunk of ``batch_size`` examples (default: the whole set) is
        normalized with its own statistics, as a training mini-batch is
        (Algorithm 1; ghost batches as configured in the model), so the
        grouping of ``images`` into consecutive chunks matters. The stored
        statistics are only read (by layers that use them in training, such as
        Batch Renorm); the updates are discarded, ``state`` is unchanged. The
        gap to the default inference-mode accuracy is batch norm's
        train/inference mismatch.

    Returns:
      A jitted function; metrics have shape ``(seeds,)`` (plus the probe's own shape).
    """
    mutable = (["intermediates"] if probe is not None else []) + (
        ["batch_stats"] if batch_statistics else []
    )

    def forward(state, x):
        if not mutable:
            return model.apply(state.variables(), x, train=False), {}
        logits, aux = model.apply(state.variables(), x, train=batch_statistics, mutable=mutable)
        return logits, aux.get("intermediates", {}) if probe is not None else {}

    def one_seed(state, images, labels):
        n = images.shape[0]
        if batch_size is None or batch_size >= n:
            logits, inter = forward(state, images)
        else:
            if n % batch_size:
                raise ValueError(
                    f"eval batch_size={batch_size} must divide the number of examples {n} "
                    f"(images {images.shape})"
                )
            chunks = images.reshape((n // batch_size, batch_size) + images.shape[1:])
            logits, inter = lax.map(lambda c: forward(state, c), chunks)
            merge = lambda a: a.reshape((n,) + a.shape[2:])
            logits, inter = merge(logits), jax.tree.map(merge, inter)
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "loss": loss_fn(logits, labels),
        }
        if probe is not None:
            metrics.update(probe(inter))
        return metrics

    f = jax.vmap(one_seed, in_axes=(0, None, None)) if over_seeds else one_seed
    return jax.jit(f)


# --------------------------------------------------------------------------- checkpoints


def _manager(directory: str | Path, max_to_keep: int | None = 2):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def save_checkpoint(
    directory: str | Path,
    step: int,
    state: PyTree,
    meta: Mapping[str, Any] | None = None,
    *,
    max_to_keep: int | None = 2,
) -> None:
    """Saves ``state`` (any pytree of arrays) and JSON-able ``meta`` as checkpoint ``step``.

    Synchronous (the files are complete when this returns); keeps the newest
    ``max_to_keep`` checkpoints under ``directory``.
    """
    import orbax.checkpoint as ocp

    with _manager(directory, max_to_keep) as mngr:
        mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))
            ),
            force=True,
        )
        mngr.wait_until_finished()


def latest_checkpoint_step(directory: str | Path) -> int | None:
    """The newest checkpoint step under ``directory`` (None if there is none)."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def restore_checkpoint(
    directory: str | Path, like: PyTree, *, step: int | None = None
) -> tuple[PyTree, dict[str, Any]]:
    """Restores ``(state, meta)`` saved by :func:`save_checkpoint`.

    Args:
      directory: the checkpoint folder.
      like: a pytree with the structure, shapes and dtypes of the saved state
        (e.g. a freshly initialized one), which the result takes.
      step: the checkpoint to restore; default the newest.

    Raises:
      FileNotFoundError: no checkpoint in ``directory``.
    """
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    return out["state"], dict(out["meta"] or {})


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class Run:
    """One named network trained by :func:`fit`.

    Attributes:
      state: its (seed-stacked) :class:`TrainState`.
      train_loop: from :func:`make_train_loop` (same ``over_seeds`` as ``state``).
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
      history: one record per evaluation and run: ``{"run", "step",
        "train_loss", "train_accuracy", <eval metrics>}``; every metric is a
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
    """Trains several named runs side by side to ``num_steps``, evaluating every ``eval_every``.

    Steps run in compiled chunks between consecutive multiples of
    ``eval_every`` and ``checkpoint_every`` (and ``num_steps``): one dispatch
    per run and chunk. After a chunk ending on a multiple of ``eval_every`` (or
    at the end) every run is evaluated on ``eval_data``; after one ending on a
    multiple of ``checkpoint_every`` (and at the end) the states and the
    history are saved to ``checkpoint_dir`` with orbax.

    With ``resume=True`` and a checkpoint in ``checkpoint_dir``, training
    continues from it (its states and history replace the given ones) and ends
    with exactly the states of an uninterrupted run, since the data order
    depends only on ``(rng, step)`` and the chunk boundaries are the same.

    Args:
      runs: name -> :class:`Run`.
      train_data: ``(images, labels)``, the whole training set (put on the device once).
      eval_data: ``(images, labels)`` for evaluation.
      num_steps: the total number of steps (counting those before a resume).
      eval_every: evaluation interval in steps.
      checkpoint_dir: where to save checkpoints (None: never).
      checkpoint_every: checkpoint interval (None: only at the end).
      resume: continue from the newest checkpoint in ``checkpoint_dir`` if any.
      progress: show a tqdm bar (steps, elapsed time, latest mean accuracies).
      desc: the bar's label.
      parallel: run the runs' chunks (training and evaluation) in one thread per
        run, so several runs use several CPU cores (the results are the same
        either way: the runs are independent).
      put_on_device: put ``train_data`` and ``eval_data`` on the default device
        once (for the loops of :func:`make_train_loop`); ``False`` passes them
        as given, e.g. host arrays for :func:`bnjax.parallel.make_train_loop`,
        which feeds each process its share of every batch.

    Several processes (``jax.distributed``): every process calls ``fit`` with the
    same arguments and states replicated over the global mesh
    (:func:`bnjax.parallel.replicate`); checkpoints are written and read by all
    processes together through orbax (``checkpoint_dir`` on a file system every
    process sees), and the progress bar is shown by process 0 only.

    Returns:
      A :class:`FitResult`.
    """
    if eval_every < 1 or num_steps < 0:
        raise ValueError(f"need eval_every >= 1 and num_steps >= 0, got {eval_every}, {num_steps}")
    t0 = time.perf_counter()
    states = {name: r.state for name, r in runs.items()}
    history: list[dict[str, Any]] = []
    start = 0
    resumed_from = None
    if resume and checkpoint_dir is not None and latest_checkpoint_step(checkpoint_dir) is not None:
        states, meta = restore_checkpoint(checkpoint_dir, states)
        history = list(meta.get("history", []))
        start = resumed_from = int(meta["step"])
        if start > num_steps:
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} is at step {start}, past num_steps={num_steps}"
            )
    put = jax.device_put if put_on_device else (lambda a: a)
    train_x, train_y = (put(a) for a in train_data)
    eval_x, eval_y = (put(a) for a in eval_data)

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def chunk(name: str, state: TrainState, length: int, evaluate: bool):
        r = runs[name]
        state, train_metrics = r.train_loop(state, train_x, train_y, num_steps=length)
        metrics = r.evaluate(state, eval_x, eval_y) if evaluate else None
        return jax.block_until_ready((state, train_metrics, metrics))

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
            latest = {}
            for name, (state, train_metrics, metrics) in zip(runs, outs, strict=True):
                states[name] = state
                if evaluate:
                    record = {"run": name, "step": step}
                    record.update({f"train_{k}": v for k, v in train_metrics.items()})
                    record.update(metrics)
                    history.append(_tolist(record))
                    latest[name] = f"{float(np.mean(metrics['accuracy'])):.4f}"
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
