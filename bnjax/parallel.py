"""Data parallelism: one train step that runs on 1 device or on a mesh of N devices.

The batch is split over a mesh axis (``"data"``); parameters, batch statistics
and optimizer state are replicated. Every :class:`bnjax.linen.BatchNorm` built
with ``axis_name="data"`` pools its statistics exactly over the whole global
batch (one all-gather of ``(count, mean, M2)`` per layer, and one all-reduce in
its backward pass), so the step computes *the same numbers* as the unsharded
step on the full batch, whatever the number of devices::

    model = MLP()                                   # uses bnjax.linen.BatchNorm(axis_name="data")
    tx = optax.sgd(0.5)
    state = create_train_state(model, tx, jax.random.key(0), x[:2])   # a training.TrainState
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    step = data_parallel(make_train_step(model, tx), mesh)
    state, metrics = step(state, x, y)               # x: (B, ...), B divisible by the mesh

The step is a ``jax.shard_map`` (``check_vma=True``) inside ``jax.jit``. The
loss is the ``pmean`` over devices of the per-device mean loss, i.e. the mean
over the global batch; its gradient with respect to the replicated parameters
is therefore the full-batch gradient (JAX sums the per-device contributions of
a replicated value), identical on every device. On several hosts, call
``jax.distributed.initialize()`` first and build the mesh over
``jax.devices()``; see ``docs/multidevice.md``.

The state is :class:`bnjax.training.TrainState` (re-exported here as
``TrainState``) and the step is :func:`bnjax.training.make_train_step` with an
``axis_name``: one state type and one step for one device and for many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax import training
from bnjax.training import TrainState, _raw_key, cross_entropy_loss, state_from_variables

__all__ = [
    "TrainState",
    "create_train_state",
    "make_train_step",
    "data_parallel",
    "shard_batch",
    "cross_entropy_loss",
]

Array = jax.Array
PyTree = Any
StepFn = Callable[..., tuple[Any, dict[str, Array]]]


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, key: Array, sample_x: Array
) -> TrainState:
    """A fresh :class:`bnjax.training.TrainState`, built outside any mesh.

    ``axis_name`` is unused at init. Unlike :func:`bnjax.training.init_state`,
    the parameters are drawn from ``key`` itself (not ``fold_in(key, 1)``). The
    state's ``rng`` is ``key`` as a raw ``uint32`` key array (the raw data of a
    typed key); the step of :func:`make_train_step` does not use it.

    Args:
      model: a linen module called as ``model(x, train=...)``.
      tx: an optax optimizer.
      key: PRNG key for the parameters (typed, ``jax.random.key``, or raw).
      sample_x: an example input batch ``(b, ...)`` fixing the shapes.
    """
    variables = model.init(key, sample_x, train=False)
    return state_from_variables(variables, tx, _raw_key(key))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss_fn: Callable[[Array, Array], Array] = cross_entropy_loss,
    axis_name: str | None = "data",
) -> StepFn:
    """A train step ``(state, x, y) -> (state, metrics)`` for a linen model with batch norm.

    :func:`bnjax.training.make_train_step` with ``axis_name`` (default
    ``"data"``): the library's one train step, written per device, ``x`` and
    ``y`` being the device's shard of the batch. The loss and the metrics are
    averaged over that axis (bind it with :func:`data_parallel`); with
    ``axis_name=None`` the step is the ordinary single-device step (the model's
    BatchNorm layers must then have ``axis_name=None`` too).

    ``state`` is a :class:`bnjax.training.TrainState` (e.g. from
    :func:`create_train_state`); its ``rng`` is only read (the per-step
    ``"dropout"`` key is ``fold_in(fold_in(rng, step), device index)``).

    Metrics: ``loss`` (mean over the global batch) and ``accuracy``.
    """
    return training.make_train_step(model, tx, loss_fn, axis_name=axis_name)


def data_parallel(
    step_fn: StepFn,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    num_batch_args: int = 2,
    donate_state: bool = False,
) -> StepFn:
    """Runs ``step_fn(state, *batch)`` with the batch split over ``mesh``'s ``axis_name``.

    ``state`` (the first argument) and the outputs are replicated; each of the
    ``num_batch_args`` batch arguments is split along its axis 0, whose size
    must be divisible by ``mesh.shape[axis_name]``. Other mesh axes (e.g. a
    ``"model"`` axis) are left to the compiler. The same ``step_fn`` gives the
    same result on a 1-device mesh and on an N-device mesh.

    Args:
      step_fn: a per-device step, e.g. from :func:`make_train_step`, whose
        collectives use ``axis_name``.
      mesh: a :class:`jax.sharding.Mesh` with an axis ``axis_name``.
      axis_name: the data-parallel mesh axis.
      num_batch_args: how many arguments after ``state`` are batch-sharded.
      donate_state: donate the state buffers to the step (saves memory).

    Returns:
      A jitted function with ``step_fn``'s signature.
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
    """Places each array of ``batch`` on ``mesh``, split along axis 0 over ``axis_name``.

    Optional (the jitted step also accepts host arrays); use it to overlap the
    transfer with compute, or on several hosts with
    ``jax.make_array_from_process_local_data`` instead.
    """
    sharding = NamedSharding(mesh, P(axis_name))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)
