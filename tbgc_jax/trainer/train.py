"""``train_and_evaluate(config, workdir)``: the multi-task trainer with TBGC (paper's Algorithm 1).

One step takes one batch per task. Inside one jitted, donated step: per task, forward and
``jax.grad`` of that task's loss (one task's activations alive at a time), the gradient method
(any registered name: ``tbgc_jax.method_names()``), then AdamW with the backbone learning rate
multiplier. Data parallel over a ``jax.sharding.Mesh`` of all devices; orbax checkpoints of the
model, optimizer and grain iterator states with automatic resume; JSONL/TensorBoard logs and
plots; evaluation every ``config.eval_every`` steps (0: none) and at the end.
"""

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tbgc_jax.data import configs as data_configs
from tbgc_jax.data import pipeline
from tbgc_jax.data.augment import AUGMENT_MODES
from tbgc_jax.models.multitask import backbone_mask
from tbgc_jax.tasks import get_task, task_names
from tbgc_jax.trainer import evaluate as eval_lib
from tbgc_jax.trainer import logs
from tbgc_jax.trainer.model_factory import build_model
from tbgc_jax.trainer.optim import make_optimizer, method_hyperparameters
from tbgc_jax.trainer.step import STEP_MODES, make_train_step

NO_PRETRAINED = "none"  # config.model.pretrained value that asks for random init explicitly
NONFINITE_POLICIES = ("drop_task", "stop")
_log = logging.getLogger(__name__)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, with a message naming the field, on an invalid value or combination."""
  tasks, registered = tuple(config.tasks), task_names()
  if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(registered):
    raise ValueError(f"config.tasks must be distinct names among the registered tasks "
                     f"{registered}, got {tasks}")
  method_hyperparameters(config.grad)  # the method and its hyperparameters (registry checks)
  if config.grad.step_mode not in STEP_MODES:
    raise ValueError(f"config.grad.step_mode must be one of {STEP_MODES}, got "
                     f"{config.grad.step_mode!r}")
  if config.augment_mode not in AUGMENT_MODES:
    raise ValueError(f"config.augment_mode must be one of {AUGMENT_MODES}, got "
                     f"{config.augment_mode!r}")
  for task in tasks:
    if task not in config.data:
      raise ValueError(f"config.data has no section for task {task!r}")
    if task not in config.loss_weights or not config.loss_weights[task] > 0:
      raise ValueError(f"config.loss_weights.{task} must be > 0")
  if not config.total_steps > 0 and not config.num_epochs > 0:
    raise ValueError("set config.num_epochs or config.total_steps to a positive value")
  if config.log_every <= 0 or config.checkpoint_every <= 0:
    raise ValueError("config.log_every and config.checkpoint_every must be positive")
  if not int(config.get("eval_every", 0) or 0) >= 0:
    raise ValueError(f"config.eval_every must be >= 0 (0: evaluate only at the end), got "
                     f"{config.eval_every}")
  pretrained = str(config.model.pretrained)
  if config.model.get("require_pretrained", False) and not pretrained:
    raise ValueError(
        "config.model.pretrained: this config trains from an ImageNet-pretrained backbone; "
        "expected a converted InternImage .npz (python -m tbgc_jax.models.convert), got ''. "
        "Set it to 'none' to start from random weights")
  if pretrained == NO_PRETRAINED:
    _log.warning("config.model.pretrained='none': the backbone starts from random weights")
  nonfinite = config.get("nonfinite", None)
  if nonfinite is not None:
    if nonfinite.policy not in NONFINITE_POLICIES:
      raise ValueError(f"config.nonfinite.policy must be one of {NONFINITE_POLICIES}, got "
                       f"{nonfinite.policy!r}")
    if not int(nonfinite.max_consecutive) >= 1:
      raise ValueError(f"config.nonfinite.max_consecutive must be >= 1, got "
                       f"{nonfinite.max_consecutive}")
  if config.mesh_devices < 0 or config.mesh_devices > jax.device_count():
    raise ValueError(f"config.mesh_devices must be in [0, {jax.device_count()}] (0 = all), "
                     f"got {config.mesh_devices}")


def use_compilation_cache(workdir: str) -> None:
  """Persistent XLA compilation cache in ``<workdir>/jax_cache``, unless one is set already.

  ``eval.py`` and resumed runs then reuse the training run's compiles.
  ``$JAX_COMPILATION_CACHE_DIR`` (or an earlier ``jax.config`` setting) wins.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir), "jax_cache"))


def make_mesh(config) -> jax.sharding.Mesh:
  devices = jax.devices()[: config.mesh_devices or None]
  return jax.sharding.Mesh(np.array(devices), ("data",))


class Setup:
  """Everything ``train_and_evaluate`` and ``eval.py`` build from a config, in one place."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    data_configs.set_augment_mode(config.data, config.augment_mode)
    self.config = config
    self.tasks = tuple(config.tasks)
    self.mesh = make_mesh(config)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    def create():
      return build_model(config, rngs=nnx.Rngs(config.seed))

    abstract = nnx.eval_shape(create)
    abstract.train()
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    self.eval_graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    self.params, self.rest = jax.jit(
        lambda: tuple(nnx.split(create(), nnx.Param, ...)[1:]),
        out_shardings=(jax.tree.map(lambda _: self.replicated, abs_params),
                       jax.tree.map(lambda _: self.replicated, abs_rest)))()
    if config.model.pretrained and config.model.pretrained != NO_PRETRAINED:
      from tbgc_jax.models.convert import load_backbone_weights

      model = nnx.merge(self.graphdef, self.params, self.rest)
      load_backbone_weights(model, config.model.pretrained)
      _, params, _ = nnx.split(model, nnx.Param, ...)
      self.params = jax.device_put(params, self.replicated)

  def local_batch_size(self, task: str) -> int:
    """Examples of ``task`` per step on this host: per-device batch x this host's devices."""
    local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    return int(self.config.data[task].batch_size) * local


def _schedule_lengths(setup: Setup, sources: dict) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch is one pass over the largest task's data."""
  per_task = {t: len(sources[t]) // jax.process_count() // setup.local_batch_size(t)
              for t in setup.tasks}
  for t, n in per_task.items():
    if n < 1:
      raise ValueError(f"task {t!r}: {len(sources[t])} training examples do not fill one "
                       f"batch of {setup.local_batch_size(t)} per host")
  steps_per_epoch = max(per_task.values())
  cfg = setup.config
  total = int(cfg.total_steps) if cfg.total_steps > 0 else int(cfg.num_epochs) * steps_per_epoch
  return steps_per_epoch, total


def _max_consecutive_nonfinite(config) -> int:
  """Dropped steps in a row after which a task stops the run (1 under policy "stop")."""
  nonfinite = config.get("nonfinite", None)
  if nonfinite is None or nonfinite.policy == "stop":
    return 1
  return int(nonfinite.max_consecutive)


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=int(config.keep_checkpoints), enable_async_checkpointing=True,
          create=True, cleanup_tmp_directories=True),
  )


def _state_args(state, iterators, config, counters) -> ocp.args.Composite:
  items = {"state": ocp.args.StandardSave(state),
           "config": ocp.args.JsonSave(config.to_dict()),
           "counters": ocp.args.JsonSave(counters)}
  items.update({f"data_{t}": grain.checkpoint.CheckpointSave(it) for t, it in iterators.items()})
  return ocp.args.Composite(**items)


def _restore_args(abstract_state, iterators) -> ocp.args.Composite:
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


class Preemption:
  """A preemption notice (SIGTERM) turned into "checkpoint at the next step boundary".

  On several processes, orbax's ``reached_preemption`` (jax's preemption sync service, which
  handles SIGTERM itself) agrees on one step for all of them; on one process a Python SIGTERM
  handler sets a flag. Call `reached` at every step boundary, on every process.
  """

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    return bool(self._mngr.reached_preemption(step)) or self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def restore_params(setup: Setup, workdir: str, step: int | None = None):
  """Parameters of the latest (or a given) finalized checkpoint in ``workdir``."""
  mngr = _checkpoint_manager(workdir, setup.config)
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


def _write_summary(workdir: str, step: int, summary: dict) -> None:
  """``<workdir>/summary.json``: the run's counts (dropped steps, skipped records) at ``step``."""
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"step": step, **summary}, f, indent=2)
  os.replace(path + ".tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None, evaluate: bool = True
                       ) -> dict[str, float]:
  """Trains on ``config`` in ``workdir`` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a trainer config (see ``configs/tiny.py``).
    workdir: where checkpoints, logs, plots and metrics go.
    stop_after: stop (after checkpointing) once this step is reached, as a preemption would;
      a later call resumes. For tests and time-boxed jobs.
    evaluate: evaluate on the val splits after the last step (False: train only, besides
      the evaluations of ``config.eval_every``).

  With ``config.eval_every = N > 0`` the val splits are also evaluated after every N-th step
  (and after the last one), before that step's checkpoint; the metrics go to the same logs as
  the training metrics, as ``val/<task>/<metric>`` and ``val/score`` in the row of the last
  training step (0-based, like the training rows).

  Returns:
    The evaluation metrics (empty if stopped early or not evaluated).
  """
  setup = Setup(config)
  tasks, is_main = setup.tasks, jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  sources = {t: pipeline.make_source(config.data[t], t, "train") for t in tasks}
  steps_per_epoch, total_steps = _schedule_lengths(setup, sources)
  iterators = {}
  for t in tasks:
    per_host = len(sources[t]) // jax.process_count()
    epochs = math.ceil(total_steps * setup.local_batch_size(t) / per_host) + 1
    iterators[t] = pipeline.train_iterator(
        config.data[t], t, seed=config.seed + 1000 * (get_task(t).stream + 1), num_epochs=epochs,
        batch_size=setup.local_batch_size(t), num_workers=int(config.num_workers),
        shard_index=jax.process_index(), shard_count=jax.process_count(), source=sources[t])

  tx, schedules = make_optimizer(config, tasks, backbone_mask, total_steps, steps_per_epoch)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": setup.params,
      "opt_state": jax.jit(tx.init)(setup.params),
      "rng": jax.random.PRNGKey(config.seed),
  }
  state = jax.device_put(state, setup.replicated)
  # Records passed over by the data pipeline (policy "skip"), per task, counted by this process.
  skipped = {t: 0 for t in tasks}

  mngr = _checkpoint_manager(workdir, config)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.replicated), state)
  restored, latest = restore_latest_intact(mngr, _restore_args(abstract, iterators), workdir)
  if restored is not None:
    state = restored["state"]
    saved = restored["counters"]["data_skipped"]
    skipped = {t: int(saved[t][jax.process_index()]) if len(saved[t]) == jax.process_count()
               else int(sum(saved[t])) * is_main for t in tasks}
    _log.info("resumed from step %d in %s", latest, workdir)

  jstep = make_train_step(setup.graphdef, tasks, tx, schedules, config, backbone_mask,
                          setup.mesh, state, setup.rest)
  evaluation = eval_lib.Evaluation(config, setup.eval_graphdef, setup.mesh)
  eval_every = int(config.get("eval_every", 0) or 0)
  last_eval: tuple[int, dict[str, float]] | None = None  # (steps done, metrics)
  start = int(state["step"])
  writer = logs.MetricWriter(workdir, enabled=is_main, resume_step=start)
  max_consecutive = _max_consecutive_nonfinite(config)
  from jax.experimental import multihost_utils
  from tqdm import tqdm

  # The bar starts after the first step, which compiles: its rate and ETA are the steps'.
  bar = tqdm(total=total_steps, initial=start, disable=True)
  pending: list[tuple[int, Any, float, dict[str, int]]] = []
  flush_t = time.perf_counter()
  last_step = min(total_steps, stop_after) if stop_after else total_steps
  if is_main and start < last_step:
    print("compiling the train step (a later run in this workdir loads it from jax_cache/)...",
          flush=True)
  preemption = Preemption(mngr)
  summary = {"tasks": list(tasks), "dropped_steps": {t: 0 for t in tasks},
             "data_skipped": {t: 0 for t in tasks}, "skipped_by_process": {}}

  def flush():
    nonlocal flush_t
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _, _ in pending])
    # Every process's skip counts (the same flush steps on all of them).
    by_process = np.asarray(multihost_utils.process_allgather(
        np.asarray([[c[t] for t in tasks] for _, _, _, c in pending], np.int64)))
    by_process = by_process.reshape(jax.process_count(), len(pending), len(tasks))
    now = time.perf_counter()
    wall = (now - flush_t) / len(pending)
    flush_t = now
    for i, ((step, _, wait, _), metrics) in enumerate(zip(pending, fetched, strict=True)):
      row = {k: float(v) for k, v in metrics.items()}
      dropped = logs.check_nonfinite(step, row, tasks, max_consecutive)
      for t in dropped:
        _log.warning("step %d: task %r has a non-finite loss or gradient (loss %s): dropped "
                     "from this update (%d dropped steps in a row, %d in all; stop at %d)",
                     step, t, row[f"{t}/loss"], row[f"{t}/dropped_streak"],
                     row[f"{t}/dropped_total"], max_consecutive)
      row.update({f"{t}/data_skipped": float(by_process[:, i, k].sum())
                  for k, t in enumerate(tasks)})
      row.update(step_time=wall, data_wait=wait)
      writer.write(step, row)
    summary["dropped_steps"] = {t: int(row[f"{t}/dropped_total"]) for t in tasks}
    summary["data_skipped"] = {t: int(by_process[:, -1, k].sum()) for k, t in enumerate(tasks)}
    summary["skipped_by_process"] = {t: by_process[:, -1, k].tolist()
                                     for k, t in enumerate(tasks)}
    bar.set_postfix({t: f"{float(fetched[-1][f'{t}/loss']):.3g}" for t in tasks})
    pending.clear()

  try:
    for step in range(start, last_step):
      t0 = time.perf_counter()
      host = {t: next(iterators[t]) for t in tasks}
      wait = time.perf_counter() - t0
      for t in tasks:
        skipped[t] += int(np.sum(host[t].pop("skipped")))
      batches = {t: eval_lib.global_batch(b, setup.data_sharding) for t, b in host.items()}
      state, metrics = jstep(state, setup.rest, batches)
      pending.append((step, metrics, wait, dict(skipped)))
      if step == start:
        if is_main:
          # Compiling is synchronous; the step itself is only dispatched here.
          print(f"compiled the train step in {time.perf_counter() - t0:.0f} s", flush=True)
        bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc="train",
                   dynamic_ncols=True)
      bar.update(1)
      done = step + 1
      preempted = preemption.reached(done)
      save = done % config.checkpoint_every == 0 or done == last_step or preempted
      if done % config.log_every == 0 or save:
        flush()  # raises under the non-finite policy before anything is saved
      if eval_every and not preempted and (
          done % eval_every == 0 or (evaluate and done == total_steps)):
        flush()
        if is_main:
          print(f"\nevaluating on the val splits after step {done}...", flush=True)
        val, _ = evaluation(state["params"], setup.rest)
        writer.write(step, {f"val/{k}": v for k, v in val.items()})
        last_eval = (done, val)
      if save:
        counters = {"data_skipped": summary["skipped_by_process"]}
        mngr.save(done, args=_state_args(state, iterators, config, counters), force=preempted)
        if is_main:
          _write_summary(workdir, done, summary)
      if preempted:
        _log.warning("preemption notice: checkpoint of step %d written; rerun the same "
                     "command to resume", done)
        break
    flush()
  finally:
    preemption.close()
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if int(state["step"]) < total_steps:
    return {}

  if is_main:
    _write_summary(workdir, int(state["step"]), summary)
  if is_main and os.path.exists(writer.path):
    logs.plot_training(writer.path, workdir, tasks)
  if not evaluate:
    return {}
  if last_eval is not None and last_eval[0] == int(state["step"]):
    metrics = last_eval[1]  # evaluated in the loop, after the last step
  else:
    if is_main:
      print("evaluating on the val splits (the first evaluation compiles)...", flush=True)
    metrics, _ = evaluation(state["params"], setup.rest)
  if is_main:
    with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
      json.dump({"step": int(state["step"]), **metrics}, f, indent=2)
    print(eval_lib.format_table(metrics))
  return metrics
