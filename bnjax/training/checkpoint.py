"""Orbax checkpoints of a training state plus JSON-able metadata (needs `orbax-checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["latest_checkpoint_step", "restore_checkpoint", "save_checkpoint"]

PyTree = Any


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
    """Saves `state` (any pytree of arrays) and JSON-able `meta` as checkpoint `step`.

    Synchronous (the files are complete when this returns); keeps the newest
    `max_to_keep` checkpoints under `directory`.
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
    """The newest checkpoint step under `directory` (None if there is none)."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def restore_checkpoint(
    directory: str | Path, like: PyTree, *, step: int | None = None
) -> tuple[PyTree, dict[str, Any]]:
    """Restores `(state, meta)` saved by :func:`save_checkpoint`.

    Args:
      directory: the checkpoint folder.
      like: a pytree with the structure, shapes and dtypes of the saved state
        (e.g. a freshly initialized one), which the result takes.
      step: the checkpoint to restore; default the newest.

    Raises:
      FileNotFoundError: no checkpoint in `directory`.
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

