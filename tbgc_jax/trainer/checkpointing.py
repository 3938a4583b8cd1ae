"""The run's orbax checkpoints: what is saved, resuming from the newest intact step, parameters,
and the checks that a checkpoint was written by a compatible config before it is restored.

Every checkpoint records its run's (resolved) config. Before a resume or an evaluation, the
recorded config and the stored tree of arrays are compared with the current ones; a
checkpoint of another model or method is refused with one message naming what differs,
instead of orbax's tree or shape errors. A new run starts from another run's weights with
``config.init_from`` (`load_init_from`).
"""

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from tbgc_jax.trainer.setup import ConfigError, Setup

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


class NoCheckpoint(ConfigError, FileNotFoundError):
  """A workdir (or the step asked for) has no finalized checkpoint."""


# Config fields that decide what a checkpoint holds: a resume refuses when they differ.
IDENTITY_FIELDS = ("tasks", "model", "grad.method")
# Fields a resumed run may change without a word (how often to log, where to run, ...).
OPERATIONAL_FIELDS = ("total_steps", "num_epochs", "log_every", "checkpoint_every",
                      "keep_checkpoints", "eval_every", "evals", "num_workers", "mesh_devices",
                      "init_from", "init_from_parts")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaves_by_path(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of a tree of arrays, shape structs or orbax array metadata;
  paths as tuples of strings, the same for a tree and its checkpoint's metadata (attribute,
  dict key and sequence index alike)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in flat}


def _show(path: tuple[str, ...]) -> str:
  return "/".join(p for p in path if p != "value")


def tree_difference(stored: Mapping, current: Mapping, *, subset: bool = False) -> str | None:
  """The first difference between two `leaves_by_path` trees, in words, or None.

  Args:
    stored: the checkpoint's leaves.
    current: the leaves the current config builds.
    subset: only ``current``'s leaves must be in ``stored`` (with the same shapes).
  """
  for path in sorted(set(current) | (set() if subset else set(stored))):
    if path not in stored:
      return f"{_show(path)} {list(current[path][0])} is not in the checkpoint"
    if path not in current:
      return f"the checkpoint's {_show(path)} {list(stored[path][0])} is not built here"
    if stored[path][0] != current[path][0]:
      return (f"{_show(path)} has shape {list(stored[path][0])} in the checkpoint, "
              f"{list(current[path][0])} here")
  return None


def _flat_config(d, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(recorded: Mapping, config) -> dict[str, tuple[Any, Any]]:
  """``{dotted field: (recorded value, current value)}`` where two configs differ."""
  now = json.loads(json.dumps(config.to_dict(), default=str))
  a, b = _flat_config(recorded), _flat_config(now)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(field: str, prefixes) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def recorded(directory: str, step: int) -> tuple[dict | None, dict | None]:
  """``(config, state leaves)`` a checkpoint step recorded (`leaves_by_path` of its "state"
  item), each None where it cannot be read (a damaged step: the restore reports it)."""
  step_dir = os.path.join(str(directory), str(step))
  config = leaves = None
  try:
    with open(os.path.join(step_dir, "config", "metadata")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    pass
  try:
    leaves = leaves_by_path(_state_metadata(directory, step))
  except Exception:  # noqa: BLE001 - unreadable metadata: the restore tries and reports
    pass
  return config, leaves


def _state_metadata(directory: str, step: int):
  """The tree of array metadata (shape, dtype) of a step's "state" item."""
  from etils import epath

  return ocp.StandardCheckpointHandler().metadata(
      epath.Path(os.path.join(str(directory), str(step), "state")))


def _mismatch(what: str, step: int, directory: str, diffs: dict, tree: str | None,
              hint: str) -> ConfigError:
  shown = [f"{k} is {a!r} there, {b!r} here" for k, (a, b) in diffs.items()][:6]
  parts = []
  if shown:
    parts.append("; ".join(shown) + ("; ..." if len(diffs) > 6 else ""))
  if tree:
    parts.append(f"first differing array: {tree}")
  return ConfigError(f"the checkpoint of step {step} in {directory} {what} ("
                     + "; ".join(parts) + f"). {hint}")


def check_resumable(mngr: ocp.CheckpointManager, config, abstract_state, workdir: str) -> None:
  """Refuses a resume from a checkpoint written by another model, task set or method.

  Compares the latest step's recorded config (`IDENTITY_FIELDS`) and its tree of arrays
  (paths and shapes) with those of ``config`` and ``abstract_state``. Other config changes
  (the learning rate, ...) are logged with a warning and the run resumes.

  Raises:
    ConfigError: naming the differing fields, the first differing array with both shapes,
      and how to start a new run from these weights instead (``config.init_from``).
  """
  step = mngr.latest_step()
  if step is None:
    return
  saved, leaves = recorded(mngr.directory, step)
  diffs = config_differences(saved, config) if saved is not None else {}
  identity = {k: v for k, v in diffs.items() if _matches(k, IDENTITY_FIELDS)}
  tree = tree_difference(leaves, leaves_by_path(abstract_state)) if leaves else None
  if identity or tree:
    raise _mismatch(
        "was written by another configuration", step, str(mngr.directory), identity, tree,
        f"To resume, run with the checkpoint's values (its config is in "
        f"{mngr.directory}/{step}/config); to start a new run from its weights, use another "
        f"--workdir with --config.init_from={os.path.abspath(workdir)} (docs/trainer.md)")
  other = {k: v for k, v in diffs.items() if not _matches(k, OPERATIONAL_FIELDS)}
  if other:
    _log.warning("resuming from step %d with a changed config: %s", step,
                 "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in other.items()))


def _restore_subtree(directory: str, step: int, item: dict, sharding) -> dict:
  """A partial restore of the "state" item of ``step``: the subtree ``item`` (abstract)."""
  with ocp.CheckpointManager(directory) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding),
                                             item),
        partial_restore=True)))["state"]


def _finalized_step(workdir: str, step: int | None) -> tuple[str, int]:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory) as mngr:
    steps = list(mngr.all_steps()) if os.path.isdir(directory) else []
  if not steps:
    raise NoCheckpoint(f"no finalized checkpoint under {directory}")
  if step is None:
    return directory, max(steps)
  if step not in steps:
    raise NoCheckpoint(f"no finalized checkpoint of step {step} under {directory} (steps "
                       f"{sorted(steps)})")
  return directory, step


def restore_params(setup: Setup, workdir: str, step: int | None = None):
  """Parameters of the latest (or a given) finalized checkpoint in ``workdir``, restored into
  ``setup.abstract_params`` (nothing is initialised, no pretrained file read).

  Raises:
    NoCheckpoint: there is no such checkpoint.
    ConfigError: the checkpoint holds another model (the message names the config fields
      and the first parameter that differ).
  """
  directory, step = _finalized_step(workdir, step)
  saved, leaves = recorded(directory, step)
  if leaves is not None:
    params = {k[1:]: v for k, v in leaves.items() if k[0] == "params"}
    tree = tree_difference(params, leaves_by_path(setup.abstract_params), subset=True)
    if tree:
      diffs = config_differences(saved, setup.config) if saved is not None else {}
      raise _mismatch(
          "holds another model than this config builds", step, directory,
          {k: v for k, v in diffs.items() if _matches(k, ("tasks", "model"))}, tree,
          "Evaluate with the config the run was trained with (recorded in "
          f"{directory}/{step}/config)")
  restored = _restore_subtree(directory, step, {"params": setup.abstract_params},
                              setup.replicated)
  return restored["params"], step


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """``"WORKDIR[:STEP]"`` -> ``(workdir, step or None)``."""
  head, _, tail = spec.rpartition(":")
  if head and tail.isdigit():
    return head, int(tail)
  return spec, None


def load_init_from(setup: Setup, spec: str, parts: str, abstract_opt_state=None
                   ) -> tuple[Any, Any, list[str]]:
  """The starting point of a new run from another run's checkpoint (``config.init_from``).

  Args:
    setup: the new run's setup (its ``params`` are the initialisation).
    spec: ``"WORKDIR[:STEP]"`` (default step: the latest).
    parts: "params", or "params+opt_state" (the optimizer state too: then it must have the
      same structure, i.e. the same method and optimizer).
    abstract_opt_state: the new run's optimizer state, abstract (for "params+opt_state").

  Returns:
    ``(params, opt_state or None, fresh)``: every parameter the source holds with the same
    path and shape comes from it, the others keep their initialisation; ``fresh`` lists
    those (paths as ``a/b/c``).

  Raises:
    NoCheckpoint, ConfigError: no such checkpoint; an optimizer state of another structure.
  """
  directory, step = _finalized_step(*parse_init_from(spec))
  _, leaves = recorded(directory, step)
  if leaves is None:
    raise ConfigError(f"config.init_from: cannot read the checkpoint of step {step} in "
                      f"{directory}")
  stored = {k[1:]: v for k, v in leaves.items() if k[0] == "params"}
  current = leaves_by_path(setup.abstract_params)
  take = {p for p, (shape, _) in current.items() if p in stored and stored[p][0] == shape}
  fresh = sorted(_show(p) for p in current if p not in take)
  # Restore the source's parameters as stored (its own tree), then pick by path.
  abstract = _abstract_from_metadata(directory, step, "params")
  source = leaves_by_value(_restore_subtree(directory, step, {"params": abstract},
                                            setup.replicated)["params"])

  def pick(path, x):
    key = tuple(_key_name(k) for k in path)
    return source[key].astype(x.dtype) if key in take else x

  params = jax.tree_util.tree_map_with_path(pick, setup.params)
  opt_state = None
  if parts == "params+opt_state":
    opt = {k[1:]: v for k, v in leaves.items() if k[0] == "opt_state"}
    tree = tree_difference(opt, leaves_by_path(abstract_opt_state))
    if tree:
      raise ConfigError(f"config.init_from_parts='params+opt_state': the optimizer state of "
                        f"step {step} in {directory} has another structure ({tree}); take "
                        "'params' only, or use the source's method and optimizer")
    opt_state = _restore_subtree(directory, step, {"opt_state": abstract_opt_state},
                                 setup.replicated)["opt_state"]
  _log.info("init_from %s: %d parameter arrays from step %d of %s, %d initialised: %s",
            spec, len(take), step, directory, len(fresh), fresh)
  return params, opt_state, fresh


def _abstract_from_metadata(directory: str, step: int, key: str):
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                      dict(_state_metadata(directory, step))[key])


def leaves_by_value(tree) -> dict[tuple[str, ...], Any]:
  """``{path: leaf}`` with the paths of `leaves_by_path`."""
  return {tuple(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
