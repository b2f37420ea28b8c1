"""Data parallelism: one train step that runs on 1 device or on a mesh of N devices.

The batch is split over a mesh axis (`"data"`); parameters, batch statistics
and optimizer state are replicated. Every :class:`bnjax.linen.BatchNorm` built
with `axis_name="data"` pools its statistics exactly over the whole global
batch (one all-gather of `(count, mean, M2)` per layer, and one all-reduce in
its backward pass), so the step computes *the same numbers* as the unsharded
step on the full batch, whatever the number of devices:

```python
model = MLP()                                   # uses bnjax.linen.BatchNorm(axis_name="data")
tx = optax.sgd(0.5)
state = state_from_variables(model.init(key, x[:2], train=False), tx, key)
mesh = jax.make_mesh((jax.device_count(),), ("data",))
step = data_parallel(make_train_step(model, tx, axis_name="data"), mesh)
state, metrics = step(state, x, y)               # x: (B, ...), B divisible by the mesh
```

The step is a `jax.shard_map` (`check_vma=True`) inside `jax.jit`. The
loss is the `pmean` over devices of the per-device mean loss, i.e. the mean
over the global batch; its gradient with respect to the replicated parameters
is therefore the full-batch gradient (JAX sums the per-device contributions of
a replicated value), identical on every device.

Several processes (hosts): call :func:`bnjax.training.distributed.initialize` first and
build the mesh over `jax.devices()` (all devices of all processes);
:func:`replicate` puts a state on it, :func:`make_sharded_train_loop` trains with the
single-process batch order while each process loads only its share of every
batch (:func:`global_batch`), and :func:`make_sharded_eval_step` evaluates over all
processes. `bnjax-data-parallel` (:mod:`bnjax.experiments.data_parallel`) is
the complete job; see `docs/multidevice.md`.

The state is :class:`bnjax.training.TrainState` and the step is
:func:`bnjax.training.make_train_step` with an `axis_name`: one state type and
one step for one device and for many (`state_from_variables` and
`make_train_step` above are those of :mod:`bnjax.training`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax.training import distributed
from bnjax.training._rng import data_key
from bnjax.training.data_order import epoch_batch_indices
from bnjax.training.state import TrainState, cross_entropy_loss
from bnjax.training.steps import make_train_step

__all__ = [
    "data_parallel",
    "global_batch",
    "make_sharded_eval_step",
    "make_sharded_train_loop",
    "replicate",
    "shard_batch",
]

Array = jax.Array
PyTree = Any
StepFn = Callable[..., tuple[Any, dict[str, Array]]]


def data_parallel(
    step_fn: StepFn,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    num_batch_args: int = 2,
    donate_state: bool = False,
) -> StepFn:
    """Runs `step_fn(state, *batch)` with the batch split over `mesh`'s `axis_name`.

    `state` (the first argument) and the outputs are replicated; each of the
    `num_batch_args` batch arguments is split along its axis 0, whose size
    must be divisible by `mesh.shape[axis_name]`. Other mesh axes (e.g. a
    `"model"` axis) are left to the compiler. The same `step_fn` gives the
    same result on a 1-device mesh and on an N-device mesh.

    Args:
      step_fn: a per-device step whose collectives use `axis_name`, e.g.
        :func:`bnjax.training.make_train_step` with `axis_name`.
      mesh: a :class:`jax.sharding.Mesh` with an axis `axis_name`.
      axis_name: the data-parallel mesh axis.
      num_batch_args: how many arguments after `state` are batch-sharded.
      donate_state: donate the state buffers to the step (saves memory).

    Returns:
      A jitted function with `step_fn`'s signature.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    n = mesh.shape[axis_name]
    sharded = jax.shard_map(
        step_fn,
        mesh=mesh,
        in_specs=(P(),) + (P(axis_name),) * num_batch_args,
        out_specs=P(),
        axis_names=frozenset({axis_name}),
    )

    def run(state, *batch):
        if len(batch) != num_batch_args:
            raise TypeError(f"expected {num_batch_args} batch arguments, got {len(batch)}")
        for i, b in enumerate(jax.tree.leaves(batch)):
            if b.ndim == 0 or b.shape[0] % n:
                raise ValueError(
                    f"batch argument {i} has shape {tuple(b.shape)}: its axis 0 must be "
                    f"divisible by the {n} devices of mesh axis {axis_name!r}"
                )
        # Lay the batch out as shard_map expects (a no-op if it already is);
        # needed for meshes with explicit axis types (jax.make_mesh's default).
        batch = jax.device_put(batch, NamedSharding(mesh, P(axis_name)))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        return sharded(state, *batch)

    return jax.jit(run, donate_argnums=(0,) if donate_state else ())


def shard_batch(batch: PyTree, mesh: Mesh, axis_name: str = "data") -> PyTree:
    """Places each array of `batch` on `mesh`, split along axis 0 over `axis_name`.

    Optional (the jitted step also accepts host arrays); use it to overlap the
    transfer with compute, or on several hosts with
    `jax.make_array_from_process_local_data` instead.
    """
    sharding = NamedSharding(mesh, P(axis_name))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)


# --------------------------------------------------------------------------- several processes


def _host_value(a) -> np.ndarray:
    """The value of a replicated (possibly multi-process) array as NumPy, from a local copy."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(a.addressable_data(0))
    return np.asarray(a)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array of `tree` replicated over `mesh` (all devices of all processes).

    Each process passes the same value (e.g. a state from
    :func:`bnjax.training.create_train_state` with the same key, or a restored
    checkpoint); the result is a pytree of global `jax.Array`s, as the
    multi-process step, loop and evaluation take them. On one process: a
    `device_put`.
    """
    sharding = NamedSharding(mesh, P())

    def one(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        return jax.make_array_from_process_local_data(sharding, _host_value(a))

    return jax.tree.map(one, tree)


def global_batch(
    arrays: PyTree, mesh: Mesh, rows: np.ndarray, *, axis_name: str = "data"
) -> PyTree:
    """The global arrays `a[rows]` for each host array `a`, each process loading only its share.

    `rows` are example indices `(..., B)` (the last axis is the batch,
    split over `axis_name`), the same on every process; this process gathers
    only its block of the last axis (:func:`bnjax.training.distributed.process_rows`)
    from its host copy of the data and `jax.make_array_from_process_local_data`
    assembles the global array of shape `rows.shape + a.shape[1:]`.
    """
    rows = np.asarray(rows)
    batch_axis = rows.ndim - 1
    spec = P(*([None] * batch_axis), axis_name)
    sharding = NamedSharding(mesh, spec)
    mine = distributed.process_rows(sharding, rows.shape, axis=batch_axis)
    local_rows = rows[..., mine]

    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(
            sharding, a[local_rows], rows.shape + a.shape[1:]
        )

    return jax.tree.map(one, arrays)


def make_sharded_train_loop(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_size: int,
    axis_name: str = "data",
    loss_fn: Callable[[Array, Array], Array] = cross_entropy_loss,
    steps_per_call: int | None = None,
    batch_indices: Callable[..., Array] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, np.ndarray]]]:
    """`loop(state, images, labels, num_steps) -> (state, metrics)`, data-parallel, N processes.

    The multi-process counterpart of :func:`bnjax.training.make_train_loop` (one
    seed): the step is :func:`bnjax.training.make_train_step` with `axis_name`
    inside `jax.shard_map` over `mesh` (state replicated, every mini-batch
    split over `axis_name`), `num_steps` of them in one `lax.scan` per call.

    Data: `images (N, ...)`, `labels (N,)` are host (NumPy) arrays, the
    whole training set on every process. The example indices of the steps are
    drawn on the host exactly as the single-process loop draws them
    (:func:`bnjax.training.epoch_batch_indices` from the state's data key and
    step, or `batch_indices`), identically on every process, so the global
    batch sequence is the single-process one; each process then gathers only
    its block of every global batch (:func:`global_batch`). Model batch-norm
    layers must pool over `axis_name` (`BatchNorm(axis_name="data")`): the
    statistics are then exact over the global batch, across processes.

    Args:
      model: as for :func:`bnjax.training.make_train_step`.
      tx: as for :func:`bnjax.training.make_train_step`.
      loss_fn: as for :func:`bnjax.training.make_train_step`.
      mesh: a mesh with the axis `axis_name` (e.g. `jax.make_mesh((jax.device_count(),),
        ("data",))`: every device of every process).
      batch_size: the *global* batch size; must be divisible by the number of
        devices along `axis_name`.
      steps_per_call: at most this many steps per compiled call (bounds the
        memory of one call's batches; same result); default: all at once.
      batch_indices: the data order (see :func:`bnjax.training.make_train_loop`).

    Returns:
      `loop`; `state` must be replicated over `mesh` (:func:`replicate`).
      The metrics are the means over the steps of the global-batch `loss` and
      `accuracy`, NumPy scalars, the same on every process.

    Raises:
      ValueError: `batch_size` not divisible by the devices, unknown axis.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    ndev = mesh.shape[axis_name]
    if batch_size % ndev:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the {ndev} devices of mesh axis "
            f"{axis_name!r}"
        )
    if steps_per_call is not None and steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1 or None, got {steps_per_call}")
    step = make_train_step(model, tx, loss_fn, axis_name=axis_name)
    sample = epoch_batch_indices if batch_indices is None else batch_indices

    def steps(state, xs, ys):
        state, metrics = lax.scan(lambda s, b: step(s, *b), state, (xs, ys))
        return state, jax.tree.map(lambda m: jnp.mean(m, 0), metrics)

    call = jax.jit(
        jax.shard_map(
            steps,
            mesh=mesh,
            in_specs=(P(), P(None, axis_name), P(None, axis_name)),
            out_specs=(P(), P()),
            axis_names=frozenset({axis_name}),
        )
    )

    def loop(state: TrainState, images, labels, num_steps: int):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels disagree on the number of examples: images "
                f"{images.shape}, labels {labels.shape}"
            )
        rng, start = _host_value(state.rng), int(_host_value(state.step))
        # The single-process loop's batches (same key, same steps), drawn locally on each process.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            key = data_key(rng)
            idx = np.asarray(sample(key, start, num_steps, images.shape[0], batch_size))
        done, total = 0, None
        k_max = steps_per_call or max(num_steps, 1)
        while done < num_steps:
            k = min(k_max, num_steps - done)
            xs, ys = global_batch((images, labels), mesh, idx[done : done + k], axis_name=axis_name)
            state, metrics = call(state, xs, ys)
            part = {name: k * _host_value(v) for name, v in metrics.items()}
            total = part if total is None else {n: total[n] + part[n] for n in total}
            done += k
        if total is None:
            return state, {"loss": np.float32(np.nan), "accuracy": np.float32(np.nan)}
        return state, {name: v / done for name, v in total.items()}

    return loop


def make_sharded_eval_step(
    model: nn.Module,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    loss_fn: Callable[[Array, Array], Array] = cross_entropy_loss,
) -> Callable[[TrainState, Any, Any], dict[str, np.ndarray]]:
    """`evaluate(state, images, labels) -> {"accuracy", "loss"}` over N processes.

    Inference mode (population statistics). `images`/`labels` are the host
    evaluation set (the same on every process, `N` divisible by the devices
    of `axis_name`); each process feeds only its block of it and the
    metrics are means over *all* `N` examples (XLA reduces across devices
    and processes), returned as NumPy scalars on every process. `state`
    replicated over `mesh`.
    """

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def metrics(state, x, y):
        logits = model.apply(state.variables(), x, train=False)
        return {
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "loss": loss_fn(logits, y),
        }

    def evaluate(state: TrainState, images, labels) -> dict[str, np.ndarray]:
        n, ndev = np.shape(images)[0], mesh.shape[axis_name]
        if n % ndev:
            raise ValueError(
                f"the evaluation set ({n} examples, images {np.shape(images)}) must be divisible "
                f"by the {ndev} devices of mesh axis {axis_name!r}"
            )
        x, y = global_batch((images, labels), mesh, np.arange(n), axis_name=axis_name)
        return {k: _host_value(v) for k, v in metrics(state, x, y).items()}

    return evaluate
