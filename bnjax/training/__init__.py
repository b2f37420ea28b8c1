"""Training with batch norm: a train-state pytree, compiled steps and loops, checkpoints.

The pieces, from small to large (each usable on its own):

* :class:`TrainState`: `step`, `params`, `batch_stats`, `opt_state`,
  `rng` (a flax `struct` pytree: jit-, vmap- and checkpoint-friendly).
  :func:`create_train_state` makes one; :func:`create_train_states` one per seed,
  stacked on a leading "seed" axis.
* :func:`make_train_step`: one SGD step of a flax model with batch norm
  (`model.apply(..., train=True, mutable=["batch_stats"])`), pure, no jit.
* :func:`epoch_batch_indices`: the mini-batches of steps `[s, s + n)`: shuffled
  epochs (a fresh permutation of the training set per epoch, drawn on the host by
  :func:`epoch_permutation`; the last incomplete batch dropped), a pure function
  of `(key, step)` so a resumed run sees exactly the batches of an
  uninterrupted one.
* :func:`make_train_loop`: `n` steps compiled into one `lax.scan` with the
  mini-batches sampled inside from the whole training set on the device,
  `jax.vmap`-ed over seeds and jitted: one dispatch per `n` steps.
* :func:`make_eval_step`: accuracy / loss in inference mode (population
  statistics) on a whole evaluation set, plus optional probes of intermediates.
* :func:`save_checkpoint` / :func:`restore_checkpoint`: orbax, state plus
  JSON-able metadata (for example the metric history).
* :func:`fit`: the loop that experiments share: several named runs trained
  side by side in chunks (one thread per run, so they share the CPU cores),
  evaluated every `eval_every` steps, checkpointed every `checkpoint_every`
  steps, resumable (bit-identical to an uninterrupted run), with a tqdm bar.

Performance note (CPU): a step of the paper's MLP at batch 60 is dominated by
its matrix products (about 26 MFLOP); the scan-compiled loop runs within ~20%
of a loop of the bare products, so what it removes is the per-step Python,
dispatch and host-to-device cost of a one-jitted-step-per-iteration loop.

Example (3 seeds of the paper's MNIST net in parallel):

```python
model, tx = MLP(use_bn=True), optax.sgd(1.0)
states = create_train_states(model, tx, seeds=jnp.arange(3), sample_input=train_x[:1])
loop = make_train_loop(model, tx, batch_size=60)
evaluate = make_eval_step(model)
states, metrics = loop(states, train_x, train_y, num_steps=500)   # 500 steps x 3 seeds
evaluate(states, test_x, test_y)["accuracy"]                     # shape (3,)
```

The model must take `train` as a keyword (`model.apply(v, x, train=...)`);
models without batch norm simply have an empty `batch_stats`.

Data parallelism on N devices and N processes: :mod:`bnjax.training.parallel`
(the same step with `axis_name`, inside `shard_map`) and
:mod:`bnjax.training.distributed` (`jax.distributed` start-up and local launches).

The submodules, in the order of the data path: `state` (the pytree),
`data_order` (which examples each step sees), `steps` (one train / eval
step), `loops` (compiled chunks of steps), `checkpoint` (orbax), `fit`
(the driver), `distributed` and `parallel` (several devices and processes).
"""

from bnjax.training import distributed, parallel
from bnjax.training.checkpoint import latest_checkpoint_step, restore_checkpoint, save_checkpoint
from bnjax.training.data_order import (
    class_grouped_batch_indices,
    epoch_batch_indices,
    epoch_permutation,
)
from bnjax.training.fit import FitResult, Run, fit
from bnjax.training.loops import make_train_loop
from bnjax.training.state import (
    TrainState,
    create_train_state,
    create_train_states,
    cross_entropy_loss,
    state_from_variables,
)
from bnjax.training.steps import make_eval_step, make_train_step

__all__ = [
    "FitResult",
    "Run",
    "TrainState",
    "class_grouped_batch_indices",
    "create_train_state",
    "create_train_states",
    "cross_entropy_loss",
    "distributed",
    "epoch_batch_indices",
    "epoch_permutation",
    "fit",
    "latest_checkpoint_step",
    "make_eval_step",
    "make_train_loop",
    "make_train_step",
    "parallel",
    "restore_checkpoint",
    "save_checkpoint",
    "state_from_variables",
]
