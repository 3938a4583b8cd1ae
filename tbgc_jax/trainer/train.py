"""``train_and_evaluate(config, workdir)``: the multi-task trainer with TBGC (paper's Algorithm 1).

One step takes one batch per task. Inside one jitted, donated step: per task, forward and
``jax.grad`` of that task's loss (one task's activations alive at a time), the gradient method
(any registered name: ``tbgc_jax.method_names()``), then AdamW with the backbone learning rate
multiplier. Data parallel over a ``jax.sharding.Mesh`` of all devices; orbax checkpoints of the
model, optimizer and grain iterator states with automatic resume; JSONL/TensorBoard logs and
plots; evaluation every ``config.eval_every`` steps (0: none) and at the end.

This module is the loop. Its parts: `setup` (config checks, mesh, model), `checkpointing`,
`sharding` (mesh axis, shardings, batch placement), `step`, `optim`, `logs`, `evaluate`.
"""

import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tbgc_jax.data import pipeline
from tbgc_jax.data.fields import pop_counts
from tbgc_jax.models.multitask import backbone_mask
from tbgc_jax.tasks import get_task
from tbgc_jax.trainer import checkpointing, logs, sharding
from tbgc_jax.trainer import evaluate as eval_lib
from tbgc_jax.trainer import setup as setup_lib
from tbgc_jax.trainer.optim import make_optimizer, method_hyperparameters
from tbgc_jax.trainer.setup import Setup, max_consecutive_nonfinite, schedule_lengths
from tbgc_jax.trainer.step import PerTaskStep, make_train_step

_log = logging.getLogger(__name__)


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


def _write_summary(workdir: str, step: int, summary: dict) -> None:
  """``<workdir>/summary.json``: the run's counts (dropped steps, skipped records) at ``step``."""
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"step": step, **summary}, f, indent=2)
  os.replace(path + ".tmp", path)


def run_summary(setup: Setup, sources: dict, total_steps: int, steps_per_epoch: int,
                workdir: str) -> str:
  """What a run trains, on what, for how long: the lines ``train.py`` prints first."""
  config = setup.config
  devices = setup.mesh.devices.size
  params = sum(x.size for x in jax.tree.leaves(setup.params))
  hparams = method_hyperparameters(config.grad)
  grad = config.grad.method + (
      " (" + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in hparams.items()) + ")" if hparams else "")
  n = len(setup.tasks)
  lines = [f"{n} task{'s' * (n != 1)} on {devices} {jax.devices()[0].platform} device(s); "
           f"workdir {workdir}"]
  k = setup.grad_accum_steps
  micro = f" x {k} micro-batches" if k > 1 else ""
  lines += [f"  {t:5s} {len(sources[t]):,} train examples, {config.data[t].batch_size} per device "
            f"per step{micro}" for t in setup.tasks]
  lines += [f"  model: InternImage {config.model.backbone!r} + heads, {params / 1e6:.1f} M "
            f"parameters ({config.get('precision', 'float32')} compute); gradient method: "
            f"{grad}; augmentation: {config.augment_mode}",
            f"  {total_steps:,} steps ({total_steps / steps_per_epoch:g} epochs of "
            f"{steps_per_epoch:,}), seed {config.seed}"]
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None, evaluate: bool = True
                       ) -> dict[str, float]:
  """Trains on ``config`` in ``workdir`` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a trainer config (see ``configs/tiny.py``); not modified.
    workdir: where checkpoints, logs, plots and metrics go.
    stop_after: stop (after checkpointing) once this step is reached, as a preemption would;
      a later call resumes. For tests and time-boxed jobs.
    evaluate: evaluate on the val splits after the last step (False: train only, besides
      the evaluations of ``config.eval_every``).

  With ``config.eval_every = N > 0`` the val splits are also evaluated after every N-th step
  (and after the last one), before that step's checkpoint; the metrics go to the same logs as
  the training metrics, as ``val/<task>/<metric>`` and ``val/score`` in a row with the step of
  the last training row (0-based).

  Returns:
    The evaluation metrics (empty if stopped early or not evaluated).
  """
  setup = Setup(config)
  config = setup.config
  tasks, is_main = setup.tasks, jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  specs = {t: get_task(t).data for t in tasks}
  sources = {t: pipeline.make_source(config.data[t], specs[t], "train") for t in tasks}
  steps_per_epoch, total_steps = schedule_lengths(setup, sources)
  iterators = {}
  for t in tasks:
    per_host = len(sources[t]) // jax.process_count()
    epochs = math.ceil(total_steps * setup.local_update_size(t) / per_host) + 1
    iterators[t] = pipeline.train_iterator(
        config.data[t], specs[t], seed=config.seed + 1000 * (specs[t].stream + 1),
        num_epochs=epochs,
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

  mngr = checkpointing.checkpoint_manager(workdir, config)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.replicated), state)
  restored, latest = checkpointing.restore_latest_intact(
      mngr, checkpointing.restore_args(abstract, iterators), workdir)
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
  max_consecutive = max_consecutive_nonfinite(config)
  from jax.experimental import multihost_utils
  from tqdm import tqdm

  # The bar starts after the first step, which compiles: its rate and ETA are the steps'.
  bar = tqdm(total=total_steps, initial=start, disable=True)
  pending: list[tuple[int, Any, float, dict[str, int], dict[str, int]]] = []
  flush_t = time.perf_counter()
  last_step = min(total_steps, stop_after) if stop_after else total_steps
  if is_main and start < last_step:
    print(run_summary(setup, sources, total_steps, steps_per_epoch, workdir), flush=True)
    print("compiling the train step (a later run in this workdir loads it from jax_cache/)...",
          flush=True)
  # Compile before the first batch is drawn: the data pipeline's read threads would otherwise
  # run beside the compile (and its Python tracing) on the same cores.
  abstract_batches = None
  if start < last_step:
    t0 = time.perf_counter()
    abstract_batches = setup_lib.train_batch_shapes(config, setup.mesh)
    if isinstance(jstep, PerTaskStep):
      jstep.warm_up(state, setup.rest, abstract_batches)
    else:
      jstep = jstep.lower(state, setup.rest, abstract_batches).compile()
    if is_main:
      print(f"compiled the train step in {time.perf_counter() - t0:.0f} s", flush=True)
  preemption = Preemption(mngr)
  summary = {"tasks": list(tasks), "dropped_steps": {t: 0 for t in tasks},
             "data_skipped": {t: 0 for t in tasks}, "skipped_by_process": {}}

  def flush():
    nonlocal flush_t
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _, _, _ in pending])
    # Every process's skip counts (the same flush steps on all of them).
    by_process = np.asarray(multihost_utils.process_allgather(
        np.asarray([[c[t] for t in tasks] for _, _, _, c, _ in pending], np.int64)))
    # The batches' drop counters (``num_dropped_<field>``), summed over the processes.
    drop_keys = sorted(pending[0][4])
    drops = np.zeros((len(pending), 0), np.int64)
    if drop_keys:
      drops = np.asarray(multihost_utils.process_allgather(
          np.asarray([[d[k] for k in drop_keys] for *_, d in pending], np.int64)))
      drops = drops.reshape(jax.process_count(), len(pending), len(drop_keys)).sum(0)
    by_process = by_process.reshape(jax.process_count(), len(pending), len(tasks))
    now = time.perf_counter()
    wall = (now - flush_t) / len(pending)
    flush_t = now
    for i, ((step, _, wait, _, _), metrics) in enumerate(zip(pending, fetched, strict=True)):
      row = {k: float(v) for k, v in metrics.items()}
      dropped = logs.check_nonfinite(step, row, tasks, max_consecutive)
      for t in dropped:
        _log.warning("step %d: task %r has a non-finite loss or gradient (loss %s): dropped "
                     "from this update (%d dropped steps in a row, %d in all; stop at %d)",
                     step, t, row[f"{t}/loss"], row[f"task/{t}/nonfinite_streak"],
                     row[f"task/{t}/nonfinite_total"], max_consecutive)
      row.update({f"{t}/data_skipped": float(by_process[:, i, k].sum())
                  for k, t in enumerate(tasks)})
      row.update({k: float(v) for k, v in zip(drop_keys, drops[i], strict=True)})
      row.update(step_time=wall, data_wait=wait)
      writer.write(step, row)
    summary["dropped_steps"] = {t: int(row[f"task/{t}/nonfinite_total"]) for t in tasks}
    summary["data_skipped"] = {t: int(by_process[:, -1, k].sum()) for k, t in enumerate(tasks)}
    summary["skipped_by_process"] = {t: by_process[:, -1, k].tolist()
                                     for k, t in enumerate(tasks)}
    bar.set_postfix({t: f"{float(fetched[-1][f'{t}/loss']):.3g}" for t in tasks})
    pending.clear()

  try:
    for step in range(start, last_step):
      t0 = time.perf_counter()
      host = {t: setup_lib.draw_batch(iterators[t], setup.grad_accum_steps) for t in tasks}
      wait = time.perf_counter() - t0
      dropped = {}
      for t in tasks:
        skipped[t] += int(np.sum(host[t].pop("skipped")))
        dropped |= {f"{t}/{k}": v for k, v in pop_counts(host[t]).items()}
      batches = {t: sharding.global_batch(b, setup.train_sharding) for t, b in host.items()}
      if step == start and abstract_batches is not None:
        setup_lib.check_batches(batches, abstract_batches)
      state, metrics = jstep(state, setup.rest, batches)
      pending.append((step, metrics, wait, dict(skipped), dropped))
      if step == start:
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
        mngr.save(done, args=checkpointing.save_args(state, iterators, config, counters),
                  force=preempted)
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
