"""The data order of training: which examples each step's mini-batch holds.

Every order is a pure function `indices(key, start_step, num_steps,
num_examples, batch_size) -> (num_steps, batch_size)` of a key and the step,
usable under `jit` and `vmap`, so a resumed run (or another process) draws
exactly the batches of an uninterrupted one. Epoch permutations are drawn on
the host by NumPy through `jax.pure_callback` (much faster than XLA:CPU's sort).

* :func:`epoch_batch_indices`: shuffled epochs (the default, i.i.d. batches);
* :func:`class_grouped_batch_indices`: every batch holds exactly `k` classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.training._rng import raw_key

__all__ = ["class_grouped_batch_indices", "epoch_batch_indices", "epoch_permutation"]

Array = jax.Array


def _host_permutations(words: np.ndarray, num_examples: int) -> np.ndarray:
    """One NumPy permutation of `range(num_examples)` per uint32 word pair (leading dims kept)."""
    words = np.asarray(words, np.uint32)
    out = np.empty(words.shape[:-1] + (num_examples,), np.int32)
    for i in np.ndindex(words.shape[:-1]):
        out[i] = np.random.default_rng([int(w) for w in words[i]]).permutation(num_examples)
    return out



def epoch_permutation(key: Array, num_examples: int) -> Array:
    """The example order of one epoch: a permutation of `range(num_examples)` drawn from `key`.

    Drawn on the host by NumPy (`np.random.default_rng(key words).permutation`,
    a Fisher-Yates shuffle, ~0.5 ms for 60,000 examples) through
    `jax.pure_callback`: XLA:CPU's sort makes `jax.random.permutation` cost
    ~25 ms for 60,000, which was ~8% of a Figure 1 training chunk. A pure function
    of `key` (old-style uint32 or typed), usable under `jit` and `vmap`.

    Returns:
      int32 array `(num_examples,)`.
    """
    key = jnp.asarray(raw_key(key), jnp.uint32)
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
    """Example indices of the mini-batches of steps `start_step .. start_step + num_steps - 1`.

    Shuffled epochs: epoch `e` visits the examples in the order
    :func:`epoch_permutation` `(fold_in(key, e), num_examples)`, cut into
    `num_examples // batch_size` batches (the remainder is dropped); step
    `t` takes batch `t % steps_per_epoch` of epoch `t // steps_per_epoch`.
    `start_step` may be traced (jit/vmap); `num_steps` must be static.

    Returns:
      int32 array `(num_steps, batch_size)`.

    Example:

    ```python
    >>> idx = epoch_batch_indices(jax.random.PRNGKey(0), 0, 10, 60, 6)
    >>> sorted(idx.ravel().tolist()) == list(range(60))   # one epoch: a permutation
    True
    ```
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
    """Rows `start .. start + num_steps - 1` of the epochs' batches (see the callers).

    `epoch_order(keys)` maps the epoch keys `(E, 2)` to each epoch's example
    order `(E, >= spe * batch_size)`, whose consecutive `batch_size` slices
    are the epoch's `spe` mini-batches.
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
    """`(chunk, chunks per class, steps per epoch)` of a class-grouped order, validated."""
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
    """One class-grouped epoch per uint32 word pair: `(..., spe * batch_size)` int32."""
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
    """A non-i.i.d. data order: every mini-batch holds examples of exactly `k` classes.

    Returns `indices(key, start_step, num_steps, num_examples, batch_size)`
    with the signature and contract of :func:`epoch_batch_indices` (a pure
    function of `(key, step)`, usable under `jit`/`vmap`; pass it to
    :func:`make_train_loop` as `batch_indices`). Epoch `e`, drawn on the
    host from `fold_in(key, e)`: each class's examples shuffled and cut into
    chunks of `batch_size // k`; each of the `steps_per_epoch` batches
    takes one chunk of each of `k` different classes, drawn at random in
    proportion to the chunks the classes have left (so the classes that meet
    in a batch change from batch to batch: no fixed partners for a network to
    learn), the examples shuffled within each batch. An epoch uses every
    example at most once and drops fewer than `batch_size // k` examples per
    class plus fewer than `k` chunks.

    This is the setting of Ioffe (2017), Sec. 4.3 (mini-batches with few
    labels, several examples per label), under which batch norm's inference
    output and its training output disagree.

    Args:
      labels: the integer class of every training example, `(N,)` (on the host).
      classes_per_batch: `k`; must divide the batch size, and no class may
        hold more than `1/k` of the examples.

    Raises:
      ValueError: (when called) `num_examples != len(labels)`, `k` not
        dividing `batch_size`, more classes asked than exist, or a class too
        large for `k`.

    Example:

    ```python
    >>> y = np.repeat(np.arange(10), 60)
    >>> f = class_grouped_batch_indices(y, 2)
    >>> idx = np.asarray(f(jax.random.PRNGKey(0), 0, 3, 600, 20))
    >>> [len(set(y[b])) for b in idx]
    [2, 2, 2]
    ```
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
            keys = jnp.asarray(raw_key(keys), jnp.uint32)
            out = jax.ShapeDtypeStruct(keys.shape[:-1] + (spe * batch_size,), jnp.int32)
            return jax.pure_callback(host, out, keys, vmap_method="expand_dims")

        return _steps_of_epochs(key, start_step, num_steps, spe, batch_size, order)

    indices.steps_per_epoch = lambda batch_size: _class_chunks(  # type: ignore[attr-defined]
        labels, classes_per_batch, batch_size
    )[2]
    return indices

