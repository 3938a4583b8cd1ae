"""The run's orbax checkpoints: what is saved, resuming from the newest intact step, parameters."""

import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from tbgc_jax.trainer.setup import Setup

_log = logging.getLogger(__name__)


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """``<workdir>/checkpoints``, asynchronous saves, the newest ``config.keep_checkpoints`` kept."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=int(config.keep_checkpoints), enable_async_checkpointing=True,
          create=True, cleanup_tmp_directories=True),
  )


def save_args(state, iterators, config, counters) -> ocp.args.Composite:
  """One checkpoint: the train state, the config, the counters and each task's data iterator."""
  items = {"state": ocp.args.StandardSave(state),
           "config": ocp.args.JsonSave(config.to_dict()),
           "counters": ocp.args.JsonSave(counters)}
  items.update({f"data_{t}": grain.checkpoint.CheckpointSave(it) for t, it in iterators.items()})
  return ocp.args.Composite(**items)


def restore_args(abstract_state, iterators) -> ocp.args.Composite:
  """What a resume reads back of `save_args`: the state, the counters, the data iterators."""
  items = {"state": ocp.args.StandardRestore(abstract_state),
           "counters": ocp.args.JsonRestore()}
  items.update({f"data_{t}": grain.checkpoint.CheckpointRestore(it)
                for t, it in iterators.items()})
  return ocp.args.Composite(**items)


def restore_latest_intact(mngr: ocp.CheckpointManager, args: Any, workdir: str
                          ) -> tuple[Any, int | None]:
  """Restores the newest checkpoint that reads back whole; sets damaged ones aside.

  A step that fails to restore (files truncated, missing or unreadable; a save cut short)
  is logged with a warning naming the step and the error, and the next older one is tried.
  Once one restores, the damaged newer steps are moved to ``<workdir>/checkpoints_damaged``
  (kept for inspection, never deleted), so that the run can save those steps again.

  Args:
    mngr: the run's checkpoint manager.
    args: the ``ocp.args.Composite`` to restore with (the same for every step).
    workdir: the run's directory.

  Returns:
    ``(restored, step)``, or ``(None, None)`` when there is no checkpoint at all.

  Raises:
    RuntimeError: checkpoints exist but none restores (the run does not start from scratch).
  """
  damaged: list[tuple[int, str]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - any failure means this step is not usable
      what = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      _log.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one",
                   step, mngr.directory, what)
      damaged.append((step, what))
      continue
    if damaged:
      _set_aside(mngr, [d for d, _ in damaged], workdir)
      _log.warning("resumed from step %d; damaged newer checkpoint(s) %s moved to %s", step,
                   [d for d, _ in damaged], os.path.join(workdir, "checkpoints_damaged"))
    return restored, step
  if damaged:
    raise RuntimeError(
        f"no checkpoint in {mngr.directory} can be restored: "
        + "; ".join(f"step {d}: {w}" for d, w in damaged)
        + ". Not starting from scratch: move that directory away to start over.")
  return None, None


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int], workdir: str) -> None:
  if jax.process_index() == 0:
    target = os.path.join(workdir, "checkpoints_damaged")
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest = os.path.join(target, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
      shutil.move(os.path.join(str(mngr.directory), str(step)), dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("tbgc_set_aside_damaged_checkpoints")
  mngr.reload()


def restore_params(setup: Setup, workdir: str, step: int | None = None):
  """Parameters of the latest (or a given) finalized checkpoint in ``workdir``."""
  mngr = checkpoint_manager(workdir, setup.config)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no finalized checkpoint under {workdir}/checkpoints")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.replicated), setup.params)
  # Restore only the parameters: a partial restore of the "state" item.
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abstract},
          restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=setup.replicated),
                                    {"params": abstract}),
          partial_restore=True)))
  mngr.close()
  return restored["state"]["params"], step
